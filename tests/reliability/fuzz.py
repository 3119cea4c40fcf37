"""Hostile input against a running service: property-based image bodies (Hypothesis),
schema-driven requests over the whole OpenAPI surface (Schemathesis), and protocol abuse a
fuzzer over the schema never produces (huge headers, lying lengths, slow bodies, absurd query
values). The property everywhere: an answer in the allowed set, never a 5xx, never a hang.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from hypothesis import HealthCheck, given, seed, settings

from tests.support.launcher import Service
from tests.support.wire import Outcome, build, multipart, read_response

from ..support.images import solid
from .hostile import HostileBody, hostile_bodies

# The tests run `reliability-ci` unless HYPOTHESIS_PROFILE names another; `fuzz_images` (the
# long command) runs `reliability-long` with its own example count.
settings.register_profile(
    "reliability-ci",
    max_examples=60,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
settings.register_profile(
    "reliability-long",
    max_examples=2000,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def check_answer(case: HostileBody, response: httpx.Response) -> None:
    """The property: an allowed status, JSON, and a body of the documented shape."""
    assert response.status_code in case.allowed, (response.status_code, response.text[:300])
    assert response.headers["content-type"] == "application/json", response.headers
    body = response.json()
    if response.status_code == 200:
        assert len(body["predictions"]) == case.images, body
    else:
        assert set(body) == {"error"} and body["error"]["message"], body


def fuzz_images(url: str, model: str, examples: int, seed_value: int = 0) -> dict[str, Any]:
    """`examples` Hypothesis cases against POST /classify; raises on the first bad answer
    (shrunk to a minimal case)."""
    statuses: Counter[int] = Counter()
    slowest = 0.0
    with httpx.Client(base_url=url, timeout=60) as client:

        @seed(seed_value)
        @settings(settings.get_profile("reliability-long"), max_examples=examples)
        @given(case=hostile_bodies())
        def check(case: HostileBody) -> None:
            nonlocal slowest
            headers = {"content-type": case.content_type} if case.content_type else {}
            start = time.monotonic()
            response = client.post(f"/classify?model={model}", content=case.body, headers=headers)
            slowest = max(slowest, time.monotonic() - start)
            statuses[response.status_code] += 1
            check_answer(case, response)

        started = time.monotonic()
        check()
    return {
        "cases": sum(statuses.values()),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "slowest_s": round(slowest, 3),
        "duration_s": round(time.monotonic() - started, 1),
    }


def fuzz_openapi(url: str, examples: int, report: Path, seed_value: int = 0) -> dict[str, Any]:
    """`st run` over every operation of /openapi.json, every check but one: random bytes are
    schema-valid image bodies yet not images, so `positive_data_acceptance` cannot hold."""
    report = report.resolve()
    command = [
        sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json",
        "--checks", "all", "--exclude-checks", "positive_data_acceptance",
        # One worker: with several, Hypothesis's lambda descriptions race in CPython 3.11's ast.
        "--max-examples", str(examples), "--seed", str(seed_value), "--workers", "1",
        "--max-response-time", "10", "--request-timeout", "30",
        "--generation-database", "none", "--no-color",
        "--report", "json", "--report-json-path", str(report),
    ]  # fmt: skip
    # Run beside the report: Schemathesis keeps a .schemathesis/ cache in its working directory.
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=1800, cwd=report.parent
    )
    data = json.loads(report.read_text()) if report.is_file() else {}
    cases = data.get("test_cases", {})
    return {
        "cases": cases.get("generated", 0),
        "failures": data.get("failures", []),
        "errors": data.get("errors", []),
        "operations": data.get("operations", {}).get("tested", 0),
        "exit_code": result.returncode,
        "duration_s": round(data.get("running_time", 0.0), 1),
        "output": result.stdout[-4000:] if result.returncode else "",
    }


@dataclass(frozen=True)
class ProtocolCase:
    """Raw bytes on a connection and the answers that are correct (None: the server may close
    the connection without one)."""

    name: str
    chunks: tuple[bytes, ...]
    allowed: tuple[int | None, ...]
    pause_s: float = 0.0  # between chunks: a slow client


def protocol_cases(
    service: Service, model: str, request_timeout_s: float, max_request_bytes: int
) -> list[ProtocolCase]:
    host, image = service.host, solid(100)
    ct, form = multipart([image])

    def post(target: str, body: bytes = image, content_type: str = "image/png", **kw: Any) -> bytes:
        return build("POST", target, host=host, body=body, content_type=content_type, **kw)

    def raw(head: str, body: bytes = b"") -> bytes:
        return head.replace("\n", "\r\n").encode() + b"\r\n" + body

    classify = f"/classify?model={model}"
    slow = post(classify)
    slow_head, slow_body = slow[: -len(image)], slow[-len(image) :]
    steps = max(int(request_timeout_s / 0.1) + 20, 20)
    over = max_request_bytes // 0x10000 + 2
    chunked = b"".join(b"10000\r\n" + bytes(0x10000) + b"\r\n" for _ in range(over)) + b"0\r\n\r\n"
    fields = min(100_000, max_request_bytes // 64)
    return [
        # A request head is bounded while it is incomplete (16 KiB, as h11 did): one arriving at
        # once in a single read is parsed, a larger one closes the connection with 431.
        ProtocolCase("header of 64 KiB", (post(classify, headers=[("X-Big", "a" * 65536)]),),
                     (200, 400, 431, None)),
        ProtocolCase("header of 1 MiB", (post(classify, headers=[("X-Big", "a" * 2**20)]),),
                     (400, 431, None)),
        ProtocolCase("header line of 128 MiB, never finished", (
            b"POST /classify HTTP/1.1\r\nHost: x\r\nX-Big: ", *([b"a" * 2**20] * 128)),
            (400, 431, None)),
        ProtocolCase("10,000 headers", (post(classify, headers=[(f"X-{i}", "v") for i in
                                                               range(10_000)]),),
                     (200, 400, 431, None)),
        ProtocolCase("URL of 1 MiB", (post(classify + "&x=" + "a" * 2**20),),
                     (400, 414, 431, None)),
        ProtocolCase("top_k of 5,000 digits", (post(classify + "&top_k=" + "9" * 5000),), (422,)),
        ProtocolCase("top_k = -1", (post(classify + "&top_k=-1"),), (422,)),
        ProtocolCase("top_k = 1e309", (post(classify + "&top_k=1e309"),), (422,)),
        ProtocolCase("top_k = NaN", (post(classify + "&top_k=NaN"),), (422,)),
        ProtocolCase("normalize = emoji", (post(f"/embed?model={model}&normalize=%F0%9F%98%80"),),
                     (422,)),
        ProtocolCase("model = ../<name>", (post(f"/classify?model=../{model}"),), (404,)),
        ProtocolCase("model = NUL", (post("/classify?model=%00"),), (404, 422)),
        ProtocolCase("model = invalid UTF-8", (post("/classify?model=%ff%fe"),), (404, 422)),
        ProtocolCase("model = 100 KiB", (post("/classify?model=" + "m" * 100_000),),
                     (400, 404, 431, None)),
        ProtocolCase("GET /models/ traversal", (build("GET", "/models/..%2F..%2Fetc%2Fpasswd",
                                                       host=host),), (404,)),
        ProtocolCase("Content-Length: abc", (raw(f"POST {classify} HTTP/1.1\nHost: x\n"
                     "Content-Type: image/png\nContent-Length: abc\n", image),), (400,)),
        ProtocolCase("Content-Length: 10^23", (raw(f"POST {classify} HTTP/1.1\nHost: x\n"
                     "Content-Type: image/png\nContent-Length: 99999999999999999999999\n"),),
                     (400, 413)),
        ProtocolCase("Content-Length over the limit", (raw(f"POST {classify} HTTP/1.1\nHost: x\n"
                     "Content-Type: image/png\nContent-Length: 999999999999\n"),), (413,)),
        ProtocolCase("Content-Length and chunked", (raw(f"POST {classify} HTTP/1.1\nHost: x\n"
                     "Content-Type: image/png\nContent-Length: 5\nTransfer-Encoding: chunked\n",
                     b"0\r\n\r\n"),), (400,)),
        ProtocolCase("chunked body over the limit", (raw(f"POST {classify} HTTP/1.1\nHost: x\n"
                     "Content-Type: image/png\nTransfer-Encoding: chunked\n", chunked),),
                     (413, None)),
        ProtocolCase("HTTP/1.0", (raw(f"POST {classify} HTTP/1.0\nContent-Type: image/png\n"
                     f"Content-Length: {len(image)}\n", image),), (200,)),
        ProtocolCase("TLS hello on plain HTTP", (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
                                                 + bytes(100),), (400, None)),
        # llhttp refuses a method it does not know (400); h11 took any token and routed it (405).
        ProtocolCase("unknown method", (build("BREW", "/classify", host=host),), (400, 405)),
        ProtocolCase("multipart boundary of 5,000 chars", (post(classify, b"--x\r\n",
                     "multipart/form-data; boundary=" + "x" * 5000),), (400,)),
        ProtocolCase(f"{fields:,} empty form fields", (post(classify, b"".join(
            b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\n\r\n' for _ in
            range(fields)) + b"--b--\r\n", "multipart/form-data; boundary=b"),), (413,)),
        ProtocolCase("multipart image", (post(classify, form, ct),), (200,)),
        ProtocolCase("body 5 bytes per 0.1 s", (slow_head, *(slow_body[i : i + 5] for i in
                     range(0, len(slow_body), 5))), (200, 504, None), pause_s=0.1),
        ProtocolCase("body that never ends", (slow_head, *([b"x"] * steps)), (504, None),
                     pause_s=0.1),
    ]  # fmt: skip


async def run_case(service: Service, case: ProtocolCase, timeout_s: float) -> Outcome:
    start = time.monotonic()
    reader, writer = await asyncio.open_connection(service.host, service.port)
    reading = asyncio.ensure_future(read_response(reader))
    try:
        async with asyncio.timeout(timeout_s):
            for chunk in case.chunks:
                if reading.done():
                    break
                writer.write(chunk)
                await writer.drain()
                if case.pause_s:
                    await asyncio.sleep(case.pause_s)
            answer = await reading
        return Outcome(answer.status, time.monotonic() - start, answer.headers, answer.body)
    except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
        return Outcome(None, time.monotonic() - start, error=f"{type(exc).__name__}: {exc}")
    finally:
        reading.cancel()
        writer.close()


def fuzz_protocol(
    service: Service,
    model: str,
    *,
    request_timeout_s: float,
    max_request_bytes: int,
    healthy: Callable[[], bool],
) -> dict[str, Any]:
    """Every protocol case on a fresh connection; after each, the service must still answer.
    The server's RSS is sampled every 10 ms meanwhile: what a case made it buffer shows in the
    peak, even when it is freed again once the connection closes. Pass the service's
    --request-timeout-ms and --max-request-bytes (keep them small)."""
    results = []
    rss_before = service.rss_mb()
    peak, done = [rss_before], threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], service.rss_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        for case in protocol_cases(service, model, request_timeout_s, max_request_bytes):
            outcome = asyncio.run(run_case(service, case, timeout_s=request_timeout_s + 30))
            results.append(
                {
                    "case": case.name,
                    "status": outcome.status,
                    "error": outcome.error,
                    "seconds": round(outcome.latency_s, 3),
                    "passed": outcome.status in case.allowed and healthy(),
                }
            )
    finally:
        done.set()
        sampler.join()
    return {
        "cases": len(results),
        "failed": [r for r in results if not r["passed"]],
        "rss_mb": [round(rss_before, 1), round(peak[0], 1)],
        "results": results,
    }
