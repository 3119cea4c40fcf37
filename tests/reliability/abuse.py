"""One client trying to freeze or bloat the service (docs/reliability.md, "Abuse"): each attack is
sent while `Watch` measures what matters to everyone else: how long `/healthz` takes to answer,
whether legitimate requests sent meanwhile still get 200, and how far the service's peak
resident memory grows above where it was.

The attacks are the security review's (../shared/docs/SECURITY-REVIEW.md), each a function that
sends one hostile request (or holds many connections) and returns what it got back:
- `multipart_near_boundary`: a multipart body of `\\r\\n--aX` repeated (boundary `a`), which a
  byte-by-byte parser steps through in Python (H2a);
- `grpc_amplified`: a ModelInfer of millions of empty `outputs` entries, two bytes each on the
  wire and far more once parsed, sent with or without a token (H1);
- `grpc_compressed`: a gzip-compressed ModelInfer that inflates far past the receive limit;
- `json_echo`: an OIP request whose input name is megabytes long (M1);
- `pixel_flood`: many small PNGs that decode to huge canvases (M2); `progressive_scans`: a JPEG
  whose last scan repeats thousands of times (M2);
- `slow_heads`: connections that send part of a request head and never finish it (M3).
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from ..support.images import ROOT, solid
from ..support.launcher import Service, poll_until

GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


@dataclass
class Watch:
    """Probes `/healthz` every `every_s` and sends a legitimate request every `legit_every_s`
    while an attack runs; the service's peak resident memory is reset at the start (Linux:
    /proc/PID/clear_refs) and read at the end."""

    service: Service
    legit: Callable[[httpx.Client], int]
    every_s: float = 0.02
    legit_every_s: float = 0.1
    healthz_s: list[float] = field(default_factory=list)
    legit_statuses: Counter[int] = field(default_factory=Counter)
    rss_before_mb: float = 0.0
    peak_mb: float = 0.0
    warm_ups: int = 0  # legitimate requests sent before the attack, one per process

    @contextlib.contextmanager
    def during(self) -> Iterator[Watch]:
        # Every process has served a legitimate request before the peak is reset: what a
        # process allocates for its first request is not the attack's.
        self.service.on_each_worker(self._warm_up)
        # Every process of the service (its front-end workers too, with --workers N): the peak
        # is the sum of their peaks, an upper bound of what they held at once.
        pids = [p.pid for p in self.service.processes()]
        for pid in pids:
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak (VmHWM) restarts now
        self.rss_before_mb = sum(_status_kb(pid, "VmRSS") for pid in pids) / 1024
        stop = threading.Event()
        threads = [
            threading.Thread(target=self._probe, args=(stop,), daemon=True),
            threading.Thread(target=self._legit, args=(stop,), daemon=True),
        ]
        for thread in threads:
            thread.start()
        try:
            yield self
        finally:
            stop.set()
            for thread in threads:
                thread.join()
            self.peak_mb = sum(_status_kb(pid, "VmHWM") for pid in pids) / 1024

    def _warm_up(self) -> None:
        with httpx.Client(base_url=self.service.url, timeout=120) as client:
            self.legit(client)
            client.get("/healthz")
        self.warm_ups += 1

    def _probe(self, stop: threading.Event) -> None:
        with httpx.Client(base_url=self.service.url, timeout=120) as client:
            while not stop.is_set():
                start = time.monotonic()
                with contextlib.suppress(httpx.HTTPError):
                    client.get("/healthz")
                self.healthz_s.append(time.monotonic() - start)
                stop.wait(self.every_s)

    def _legit(self, stop: threading.Event) -> None:
        with httpx.Client(base_url=self.service.url, timeout=120) as client:
            while not stop.is_set():
                try:
                    self.legit_statuses[self.legit(client)] += 1
                except httpx.HTTPError:
                    self.legit_statuses[-1] += 1  # no answer at all
                stop.wait(self.legit_every_s)

    def report(self) -> dict[str, Any]:
        probes = sorted(self.healthz_s) or [0.0]
        return {
            "healthz_max_ms": round(probes[-1] * 1000, 1),
            "healthz_p50_ms": round(probes[len(probes) // 2] * 1000, 1),
            "healthz_probes": len(self.healthz_s),
            "legit": dict(self.legit_statuses),
            "warm_ups": self.warm_ups,
            "rss_before_mb": round(self.rss_before_mb, 1),
            "peak_growth_mb": round(self.peak_mb - self.rss_before_mb, 1),
        }


def classify_png(model: str, headers: dict[str, str] | None = None) -> Callable[..., int]:
    """A legitimate request: one small PNG to /classify."""
    body, sent = solid(90), {"content-type": "image/png", **(headers or {})}

    def send(client: httpx.Client) -> int:
        return client.post(f"/classify?model={model}", content=body, headers=sent).status_code

    return send


def attack(name: str, *args: Any) -> dict[str, Any]:
    """Run the attack `name(*args)` in a process of its own (so that building and sending it
    takes nothing from the process that watches), and return what it got and how long it took."""
    code = (
        "import json, sys, time; from tests.reliability import abuse; "
        "start = time.monotonic(); "
        f"outcome = abuse.{name}(*json.loads(sys.argv[1])); "
        "print(json.dumps({'outcome': outcome, 'seconds': round(time.monotonic() - start, 3)}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


# -- the attacks ------------------------------------------------------------------------------


def multipart_near_boundary(
    url: str, size_mb: int, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    head = b'--a\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n'
    body = head + b"\r\n--aX" * (size_mb * 2**20 // 6) + b"\r\n--a--\r\n"
    sent = {"content-type": "multipart/form-data; boundary=a", **(headers or {})}
    with httpx.Client(timeout=300) as client:
        response = client.post(url + "/classify", content=body, headers=sent)
    return {"status": response.status_code, "body": response.text[:300]}


def grpc_amplified(
    target: str, size_mb: float, metadata: list[list[str]] | None = None
) -> dict[str, str]:
    """ModelInfer as raw bytes: model "tiny" and (size/2) million empty `outputs` entries."""
    import grpc

    message = b"\x0a\x04tiny" + b"\x32\x00" * int(size_mb * 2**20 // 2)
    options = [("grpc.max_send_message_length", -1)]
    with grpc.insecure_channel(target, options=options) as channel:
        infer = channel.unary_unary(GRPC_INFER)
        try:
            infer(message, timeout=300, metadata=[tuple(m) for m in metadata or ()])
        except grpc.RpcError as error:
            return {"code": error.code().name, "details": (error.details() or "")[:300]}
    return {"code": "OK", "details": ""}


def grpc_compressed(
    target: str, inflated_mb: int, metadata: list[list[str]] | None = None
) -> dict[str, str]:
    """A ModelInfer whose raw input is `inflated_mb` of zeros, sent gzip-compressed (about
    1/1000 of that on the wire)."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb

    request = pb.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="images", datatype="FP32", shape=[1, 3, 16, 16])
    request.raw_input_contents.append(bytes(inflated_mb * 2**20))
    options = [("grpc.max_send_message_length", -1)]
    with grpc.insecure_channel(target, options=options, compression=grpc.Compression.Gzip) as ch:
        infer = ch.unary_unary(
            GRPC_INFER, request_serializer=pb.ModelInferRequest.SerializeToString
        )
        try:
            infer(request, timeout=300, metadata=[tuple(m) for m in metadata or ()])
        except grpc.RpcError as error:
            return {"code": error.code().name, "details": (error.details() or "")[:300]}
    return {"code": "OK", "details": ""}


def json_echo(url: str, size_mb: float) -> dict[str, int]:
    """An OIP request whose input name is `size_mb` long: what comes back, and how big."""
    name = b"x" * int(size_mb * 2**20)
    body = b'{"inputs":[{"name":"' + name + b'","datatype":"BYTES","shape":[1],"data":["a"]}]}'
    with httpx.Client(timeout=300) as client:
        response = client.post(
            url + "/v2/models/tiny/infer",
            content=body,
            headers={"content-type": "application/json"},
        )
    return {"status": response.status_code, "body_bytes": len(response.content)}


def pixel_flood(url: str, images: int, side: int) -> dict[str, Any]:
    """`images` PNGs of `side` x `side` black pixels (a few KB each) in one /classify."""
    buffer = io.BytesIO()
    Image.new("L", (side, side)).save(buffer, "PNG")
    png = buffer.getvalue()
    files = [("file", (f"{i}.png", png, "image/png")) for i in range(images)]
    with httpx.Client(timeout=300) as client:
        response = client.post(url + "/classify?model=tiny", files=files)
    return {"status": response.status_code, "body": response.text[:300]}


def progressive_scans(url: str, repeats: int, side: int = 2000) -> dict[str, Any]:
    """A progressive JPEG whose last scan is repeated `repeats` times (each repeat is decoded)."""
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (128, 128, 128)).save(buffer, "JPEG", progressive=True)
    data = buffer.getvalue()
    sos, eoi = data.rfind(b"\xff\xda"), data.rfind(b"\xff\xd9")
    bomb = data[:eoi] + data[sos:eoi] * repeats + data[eoi:]
    with httpx.Client(timeout=300) as client:
        response = client.post(
            url + "/classify?model=tiny", content=bomb, headers={"content-type": "image/jpeg"}
        )
    return {"status": response.status_code, "body": response.text[:300]}


def slow_heads(host: str, port: int, connections: int, deadline_s: float) -> dict[str, Any]:
    """Open `connections` sockets that send part of a request head and never the rest; how
    many the service closed, and when the last one was closed (None: not within deadline_s)."""
    sockets = []
    for _ in range(connections):
        sock = socket.create_connection((host, port), timeout=10)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        sock.setblocking(False)
        sockets.append(sock)
    start, open_ = time.monotonic(), set(range(connections))

    def all_closed() -> bool:
        for index in list(open_):
            try:
                if sockets[index].recv(1) == b"":
                    open_.discard(index)
            except BlockingIOError:
                pass
            except OSError:
                open_.discard(index)
        return not open_

    with contextlib.suppress(TimeoutError):
        poll_until(all_closed, deadline_s, "every slow head closed", every_s=0.05)
    for sock in sockets:
        sock.close()
    closed_s = round(time.monotonic() - start, 2) if not open_ else None
    return {"opened": connections, "closed_by_service": connections - len(open_), "s": closed_s}


def watched(
    service: Service, legit: Callable[[httpx.Client], int], name: str, *args: Any
) -> dict[str, Any]:
    """Attack `name(*args)` from its own process while `Watch` measures; both results."""
    watch = Watch(service, legit)
    with watch.during():
        result = attack(name, *args)
    return {**result, **watch.report()}
