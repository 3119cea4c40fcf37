"""The hostile-input suites again, with an inference token set and none sent: every answer is a
401 (or the protocol error the HTTP parser gives before any route), never a 5xx or a 200, and
the metrics show that not one request reached decoding or the batcher."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import given, settings

from tests.support.launcher import Service

from .reliability.fuzz import protocol_cases, run_case
from .reliability.hostile import HostileBody, hostile_bodies
from .support.graphs import write_tiny

PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "reliability-ci"))
TOKEN = "fuzz-token-0123456789abcdef0123"
MAX_REQUEST_BYTES = 4 * 2**20
TIMEOUT_S = 1.0
NEVER_REACHED = (
    "resnet_serve_preprocess_duration_seconds_count",
    "resnet_serve_images_total",
    "resnet_serve_requests_total",
    "resnet_serve_batch_size_images_count",
)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("fuzz-auth")
    write_tiny(root / "repo", "tiny")
    flags = (
        f"--request-timeout-ms={int(TIMEOUT_S * 1000)}",
        f"--max-request-bytes={MAX_REQUEST_BYTES}",
        "--no-protect-metrics",  # so that the checks below need no token either
    )
    env = {"RESNET_SERVE_INFERENCE_TOKEN": TOKEN}
    with Service(root / "repo", root / "server.log", *flags, env=env) as service:
        service.wait_ready()
        yield service
        for name in NEVER_REACHED:
            assert service.metric(name) == 0, (name, service.log()[-3000:])
        assert service.metric("resnet_serve_unauthorized_total") > 0
        assert service.terminate() == 0
    assert " ERROR " not in service.log() and "Traceback" not in service.log(), service.log()


@pytest.fixture(scope="module")
def client(service: Service) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, timeout=30) as client:
        yield client


@settings(PROFILE)
@given(case=hostile_bodies())
def test_hostile_bodies_without_a_token_are_refused_unread(
    client: httpx.Client, case: HostileBody
) -> None:
    headers = {"content-type": case.content_type} if case.content_type else {}
    headers["authorization"] = "Bearer wrong-token"
    response = client.post("/classify?model=tiny", content=case.body, headers=headers)
    assert response.status_code == 401, response.text[:300]
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["error"]["code"] == "unauthorized"


def test_protocol_abuse_without_a_token_never_gets_past_the_door(
    service: Service, client: httpx.Client
) -> None:
    failed = []
    for case in protocol_cases(service, "tiny", TIMEOUT_S, MAX_REQUEST_BYTES):
        outcome = asyncio.run(run_case(service, case, timeout_s=TIMEOUT_S + 30))
        allowed = {*case.allowed, 401} - {200}
        # A large body refused unread: the 401 and the close can reach the client while it is
        # still writing, which it sees as a reset. The door held either way.
        reset = outcome.status is None and "ConnectionResetError" in str(outcome.error)
        if (outcome.status not in allowed and not reset) or client.get(
            "/healthz"
        ).status_code != 200:
            failed.append((case.name, outcome.status, outcome.error))
    assert not failed, failed
