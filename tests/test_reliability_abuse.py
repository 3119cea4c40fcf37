"""One client trying to freeze or bloat the service (tests/reliability/abuse.py; the security
review's findings H1, H2 and M1-M6). Each attack runs in a process of its own while the test
probes `/healthz` and sends legitimate requests: they must keep answering 200, the attack must get
the right refusal, and the service's peak memory must stay within what the request itself
holds. `make reliability` (`python -m tests.reliability abuse`) reports the same with /healthz
latencies; docs/reliability.md has the figures before and after."""

from __future__ import annotations

import http.client
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.launcher import Service, poll_until

from .reliability.abuse import classify_png, watched
from .reliability.swap import write_version_atomically
from .support.graphs import write_tiny
from .support.images import solid

TOKEN = "abuse-token-0123456789abcdef"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module", params=["open", "tokens"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Service, dict[str, str]]]:
    """The tiny model, with and without an inference token."""
    root = tmp_path_factory.mktemp(f"abuse-{request.param}")
    write_tiny(root / "repo", "tiny")
    env = {"RESNET_SERVE_INFERENCE_TOKEN": TOKEN} if request.param == "tokens" else {}
    headers = AUTH if request.param == "tokens" else {}
    with Service(root / "repo", root / "server.log", "--no-protect-metrics", env=env) as service:
        service.wait_ready()
        yield service, headers
        assert service.terminate() == 0
    assert "Traceback" not in service.log() and TOKEN not in service.log()


def grpc_target(service: Service) -> str:
    return f"{service.host}:{service.grpc_port}"


def assert_unharmed(result: dict[str, Any], request_mb: float) -> None:
    """Legitimate requests sent during the attack all answered 200, /healthz answered, and the
    peak resident memory grew by less than twice what the attack sent."""
    assert result["legit"] and set(result["legit"]) == {200}, result
    assert result["healthz_probes"] > 0, result
    assert result["peak_growth_mb"] < 2 * request_mb, result


def test_a_multipart_body_of_near_boundaries_is_refused_at_its_first(
    served: tuple[Service, dict[str, str]],
) -> None:
    """H2a: `\\r\\n--aX` repeated (boundary `a`) held the event loop for 10-20 s."""
    service, headers = served
    result = watched(
        service, classify_png("tiny", headers), "multipart_near_boundary", service.url, 60, headers
    )
    assert result["outcome"]["status"] == 400, result
    assert "occurs inside a part" in result["outcome"]["body"], result
    assert_unharmed(result, 60)


def test_an_unauthenticated_grpc_call_is_refused_unread(tmp_path: Path) -> None:
    """H1: 60 MB of empty `outputs` entries without a token were read and parsed (1.5 GB)
    before the token was checked; a smaller one (under the receive limit) too."""
    write_tiny(tmp_path / "repo", "tiny")
    env = {"RESNET_SERVE_INFERENCE_TOKEN": TOKEN}
    flags = ("--no-protect-metrics",)
    with Service(tmp_path / "repo", tmp_path / "server.log", *flags, env=env) as service:
        service.wait_ready()
        legit = classify_png("tiny", AUTH)
        for size_mb in (60, 30):
            result = watched(service, legit, "grpc_amplified", grpc_target(service), size_mb)
            assert result["outcome"]["code"] == "UNAUTHENTICATED", result
            assert_unharmed(result, size_mb)
            assert result["peak_growth_mb"] < size_mb / 4, result  # never received
        assert service.metric("resnet_serve_unauthorized_total", protocol="grpc") == 2
        assert service.terminate() == 0


def test_an_amplifying_grpc_message_is_refused_before_it_is_parsed(
    served: tuple[Service, dict[str, str]],
) -> None:
    """Millions of two-byte `outputs` entries with a valid token (or none needed): over the
    gRPC receive limit it is refused from its length prefix, under it by its field count on
    the wire; protobuf never builds the millions of messages."""
    service, headers = served
    metadata = [[k, v] for k, v in headers.items()]
    legit = classify_png("tiny", headers)
    over = watched(service, legit, "grpc_amplified", grpc_target(service), 60, metadata)
    assert over["outcome"]["code"] == "RESOURCE_EXHAUSTED", over
    assert_unharmed(over, 60)
    under = watched(service, legit, "grpc_amplified", grpc_target(service), 8, metadata)
    assert under["outcome"]["code"] == "INVALID_ARGUMENT", under
    assert "protobuf fields" in under["outcome"]["details"], under
    # grpcio holds a received message about three times over (its buffer, a bytearray, the
    # bytes handed over) before a handler can look at it: the bound of what is read at all.
    assert under["legit"] and set(under["legit"]) == {200}, under
    assert under["peak_growth_mb"] < 4 * 8, under


def test_a_compressed_grpc_message_is_refused_uninflated(tmp_path: Path) -> None:
    """H1, gzip: grpcio inflated a bomb up to the receive limit on the event loop's thread
    (/healthz held 150-190 ms); compressed messages are refused, never inflated."""
    write_tiny(tmp_path / "repo", "tiny")
    with Service(tmp_path / "repo", tmp_path / "server.log") as service:
        service.wait_ready()
        result = watched(
            service, classify_png("tiny"), "grpc_compressed", grpc_target(service), 200
        )  # 200 MB of zeros, about 200 KB on the wire
        assert result["outcome"]["code"] == "UNIMPLEMENTED", result
        assert "'gzip' is disabled" in result["outcome"]["details"], result
        assert result["legit"] and set(result["legit"]) == {200}, result
        assert result["peak_growth_mb"] < 16, result
        assert service.terminate() == 0


def test_client_input_is_never_echoed_whole(tmp_path: Path) -> None:
    """M1: a 3 MB input name came back whole in the 400 body and in one log line."""
    write_tiny(tmp_path / "repo", "tiny")
    with Service(tmp_path / "repo", tmp_path / "server.log") as service:
        service.wait_ready()
        result = watched(service, classify_png("tiny"), "json_echo", service.url, 3)
        assert result["outcome"]["status"] == 400, result
        assert result["outcome"]["body_bytes"] < 2048, result
        too_big = watched(service, classify_png("tiny"), "json_echo", service.url, 5)
        assert too_big["outcome"]["status"] == 413, too_big  # over max_json_bytes: unparsed
        assert service.terminate() == 0
    longest = max(len(line) for line in service.log().splitlines())
    assert longest < 2048, longest


def test_decoding_work_is_bounded_by_pixels(tmp_path: Path) -> None:
    """M2: a few KB of PNG per 20-MP canvas, and a progressive JPEG whose last scan repeats
    3000 times: refused before they are decoded (the pixel budget per request, the scan cap)."""
    write_tiny(tmp_path / "repo", "tiny")
    with Service(tmp_path / "repo", tmp_path / "server.log", "--decode-workers=1") as service:
        service.wait_ready()
        legit = classify_png("tiny")
        flood = watched(service, legit, "pixel_flood", service.url, 8, 4500)  # 8 x 20.25 MP
        assert flood["outcome"]["status"] == 413, flood
        assert "max_request_pixels" in flood["outcome"]["body"], flood
        assert flood["legit"] and set(flood["legit"]) == {200}, flood
        # At most the images that fit the 100 MP budget were decoded (4 of 20.25 MP).
        assert (
            service.metric("resnet_serve_preprocess_duration_seconds_count")
            <= 4 + sum(flood["legit"].values()) + flood["warm_ups"]
        )
        scans = watched(service, legit, "progressive_scans", service.url, 3000)
        assert scans["outcome"]["status"] == 400, scans
        assert "scans" in scans["outcome"]["body"], scans
        assert scans["legit"] and set(scans["legit"]) == {200}, scans
        assert service.terminate() == 0


def test_request_heads_that_never_finish_are_closed(tmp_path: Path) -> None:
    """M3: connections that send half a request head were held for good (slowloris)."""
    write_tiny(tmp_path / "repo", "tiny")
    flags = ("--request-head-timeout-ms=500",)
    with Service(tmp_path / "repo", tmp_path / "server.log", *flags) as service:
        service.wait_ready()
        result = watched(
            service, classify_png("tiny"), "slow_heads", service.host, service.port, 200, 30.0
        )
        assert result["outcome"]["closed_by_service"] == 200, result
        assert result["legit"] and set(result["legit"]) == {200}, result
        assert service.terminate() == 0


def test_requests_past_max_connections_get_a_503_with_retry_after(tmp_path: Path) -> None:
    """Past max_connections, the service's JSON 503 with Retry-After (uvicorn's own limit
    answered a plain-text 503 without it), and the connection closes; below it, served."""
    write_tiny(tmp_path / "repo", "tiny")
    flags = ("--max-connections=2",)
    with Service(tmp_path / "repo", tmp_path / "server.log", *flags) as service:
        service.wait_ready()
        held = [http.client.HTTPConnection(service.host, service.port) for _ in range(2)]
        for connection in held:
            connection.request("GET", "/healthz")
            assert connection.getresponse().read() is not None
        third = http.client.HTTPConnection(service.host, service.port)
        third.request("POST", "/classify?model=tiny", solid(90), {"content-type": "image/png"})
        refused = third.getresponse()
        body = json.loads(refused.read())
        assert refused.status == 503, body
        assert body["error"]["code"] == "too_many_connections"
        assert refused.getheader("retry-after") == "1"
        assert refused.getheader("connection") == "close"
        held.pop().close()
        poll_until(lambda: classify_once(service) == 200, 10, "served again")
        assert service.terminate() == 0


def test_a_burst_of_connections_is_served_up_to_max_connections(tmp_path: Path) -> None:
    """Connections opened at once beyond max_connections are refused, and only those: the
    first ones are served (counting every open connection refused them all, as uvicorn does)."""
    write_tiny(tmp_path / "repo", "tiny")
    with Service(tmp_path / "repo", tmp_path / "server.log", "--max-connections=2") as service:
        service.wait_ready()
        burst = [http.client.HTTPConnection(service.host, service.port) for _ in range(4)]
        for connection in burst:
            connection.connect()  # all four open before any request is sent
        statuses = []
        for connection in burst:
            connection.request(
                "POST", "/classify?model=tiny", solid(90), {"content-type": "image/png"}
            )
            answer = connection.getresponse()
            answer.read()
            statuses.append(answer.status)
        assert statuses == [200, 200, 503, 503]
        for connection in burst:
            connection.close()
        assert service.terminate() == 0


def classify_once(service: Service) -> int:
    with httpx.Client(base_url=service.url) as client:
        return classify_png("tiny")(client)


def test_poll_mode_keeps_polling_after_a_failed_scan(tmp_path: Path) -> None:
    """M4: the poller scanned on the event loop and died silently on the first OSError."""
    repo = tmp_path / "repo"
    write_tiny(repo, "tiny")
    flags = ("--model-control-mode=poll", "--repository-poll-secs=0.2")
    with Service(repo, tmp_path / "server.log", *flags) as service:
        service.wait_ready()
        gone = tmp_path / "repo-moved-away"
        os.rename(repo, gone)  # the whole repository vanishes (a mount gone stale)
        service.wait_metric("resnet_serve_repository_poll_errors_total", lambda v: v >= 2)
        assert httpx.get(f"{service.url}/readyz").status_code == 200  # serving from memory
        os.rename(gone, repo)
        write_version_atomically(repo, "tiny", 2, seed=1)
        poll_until(lambda: version_of(service) == 2, 30, "version 2 served")
        assert service.metric("resnet_serve_repository_poll_last_success_timestamp_seconds") > 0
        assert service.log().count("repository poll failed") == 1  # once per distinct failure
        assert service.terminate() == 0


def version_of(service: Service) -> int:
    response = httpx.post(
        f"{service.url}/classify", content=solid(90), headers={"content-type": "image/png"}
    )
    assert response.status_code == 200, response.text
    return int(response.json()["version"])


def test_a_model_added_by_the_poller_keeps_the_implicit_default(tmp_path: Path) -> None:
    """M5: with one model and no --default-model, a second model appearing made every request
    without ?model= answer 422."""
    repo = tmp_path / "repo"
    write_tiny(repo, "tiny")
    flags = ("--model-control-mode=poll", "--repository-poll-secs=0.2")
    with Service(repo, tmp_path / "server.log", *flags) as service:
        service.wait_ready()
        assert version_of(service) == 1
        write_tiny(tmp_path / "staging", "other")
        shutil.move(tmp_path / "staging" / "other", repo / "other")
        poll_until(lambda: httpx.get(f"{service.url}/models/other").status_code == 200, 30, "other")
        response = httpx.post(
            f"{service.url}/classify", content=solid(90), headers={"content-type": "image/png"}
        )
        assert response.status_code == 200 and response.json()["model"] == "tiny", response.text
        assert service.terminate() == 0


def test_tracing_with_the_collector_down_logs_little_and_stops_in_time(tmp_path: Path) -> None:
    """M6: one WARNING line per dropped span, and a shutdown that waited 30 s for the
    collector."""
    write_tiny(tmp_path / "repo", "tiny")
    flags = ("--otlp-endpoint=http://127.0.0.1:9",)  # nothing listens on port 9
    with Service(tmp_path / "repo", tmp_path / "server.log", *flags) as service:
        service.wait_ready()
        with httpx.Client(base_url=service.url) as client:
            for _ in range(600):  # ~3600 spans: more than the exporter's queue of 2048
                response = client.post(
                    "/classify", content=solid(90), headers={"content-type": "image/png"}
                )
                assert response.status_code == 200
        assert service.terminate(timeout_s=20) == 0
    sdk_lines = [line for line in service.log().splitlines() if "opentelemetry" in line]
    assert len(sdk_lines) <= 6, sdk_lines[:10]
