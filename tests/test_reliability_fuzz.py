"""Hostile input against the real service: property-based image bodies (Hypothesis), the whole
OpenAPI surface (Schemathesis), HTTP protocol abuse, and model names from URLs. Example counts
come from the `reliability-ci` profile; HYPOTHESIS_PROFILE=reliability-long runs thousands."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.launcher import Service

from .reliability.fuzz import check_answer, fuzz_openapi, fuzz_protocol
from .reliability.hostile import HostileBody, hostile_bodies
from .support.graphs import write_tiny
from .support.images import solid

PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "reliability-ci"))
MAX_REQUEST_BYTES = 4 * 2**20
TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("fuzz")
    write_tiny(root / "repo", "tiny")
    write_tiny(root, "outside")  # a valid model beside the repository, never to be reached
    flags = (
        f"--request-timeout-ms={int(TIMEOUT_S * 1000)}",
        f"--max-request-bytes={MAX_REQUEST_BYTES}",
    )
    with Service(root / "repo", root / "server.log", *flags) as service:
        service.wait_ready()
        yield service
        assert service.terminate() == 0
    errors = [line for line in service.log().splitlines() if " ERROR " in line]
    assert not errors and "Traceback" not in service.log(), service.log()


@pytest.fixture(scope="module")
def client(service: Service) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, timeout=30) as client:
        yield client


@settings(PROFILE)
@given(case=hostile_bodies())
def test_hostile_image_bodies_never_get_a_server_error(
    client: httpx.Client, case: HostileBody
) -> None:
    headers = {"content-type": case.content_type} if case.content_type else {}
    check_answer(case, client.post("/classify?model=tiny", content=case.body, headers=headers))


NAMES = st.text(
    st.characters(exclude_categories=("Cs",)), min_size=1, max_size=40
) | st.sampled_from(
    ["tiny", "../outside", "..", ".", "tiny/..", "/etc/passwd", "%2e%2e", "tiny\x00", "TINY"]
)


@settings(PROFILE)
@given(name=NAMES)
def test_model_names_from_urls_are_looked_up_never_used_as_paths(
    client: httpx.Client, name: str
) -> None:
    served = name == "tiny"
    # A path holding "/" (uvicorn decodes %2F) matches no route; clients drop "." and "..".
    if "/" not in name and name not in {".", ".."}:
        listed = client.get(f"/models/{quote(name, safe='')}")
        assert listed.status_code == (200 if served else 404), (name, listed.text)
    response = client.post("/embed", params={"model": name}, content=solid(90),
                           headers={"content-type": "image/png"})  # fmt: skip
    assert response.status_code == (200 if served else 404), (name, response.text)


def test_the_openapi_surface_passes_schemathesis(service: Service, tmp_path: Path) -> None:
    result = fuzz_openapi(service.url, examples=5, report=tmp_path / "schemathesis.json")
    assert not result["failures"] and not result["errors"], result
    assert result["exit_code"] == 0, result
    assert result["operations"] >= 7
    assert result["cases"] >= 100


def test_protocol_abuse_gets_allowed_answers_and_the_service_stays_healthy(
    service: Service, client: httpx.Client
) -> None:
    result = fuzz_protocol(
        service,
        "tiny",
        request_timeout_s=TIMEOUT_S,
        max_request_bytes=MAX_REQUEST_BYTES,
        healthy=lambda: client.get("/healthz").status_code == 200,
    )
    assert not result["failed"], result["failed"]  # every case answered as allowed
    before, peak = result["rss_mb"]  # a 128 MiB header line was sent: refused, not buffered
    assert peak - before <= 32.0, result["rss_mb"]
    seconds = {r["case"]: r["seconds"] for r in result["results"]}
    fields = next(name for name in seconds if name.endswith("empty form fields"))
    assert seconds[fields] < 1.0  # refused at the 81st part, not parsed for seconds
    assert seconds["body that never ends"] < TIMEOUT_S + 2.0
