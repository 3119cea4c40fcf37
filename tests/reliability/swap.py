"""A live model update under steady load: clients keep classifying while a new version is swapped
in (by the repository poller, or by POST /v2/repository/models/NAME/load), and every answer's
version, issue time and arrival time are recorded, with /readyz sampled meanwhile.

What must hold: no failed request, /readyz 200 throughout, and one switch point: once an answer
shows the new version, no request issued after it gets the old one.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.support.launcher import Service, poll_until

from ..support.graphs import tiny_graph, write_entry
from ..support.images import solid


def write_version_atomically(
    repo: Path, name: str, version: int, *, seed: int, crop: int = 16, classes: int = 4
) -> Path:
    """REPO/name/version written beside the repository, then renamed in (as the exporter does):
    a poller never sees a half-written version."""
    staging = repo / f".staging-{name}-{version}"
    built = write_entry(
        staging, name, tiny_graph(crop, classes, seed=seed), crop=crop, classes=classes, dim=3,
        version=version,
    )  # fmt: skip
    target = repo / name / str(version)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(built, target)
    built.parent.rmdir()
    staging.rmdir()
    return target


def swap_under_load(
    service: Service,
    model: str,
    trigger: Callable[[], Any],
    *,
    new_version: int,
    clients: int = 4,
    answers_after: int = 100,
    headers: dict[str, str] | None = None,
    deadline_s: float = 120.0,
) -> dict[str, Any]:
    """Load from `clients` threads; `trigger()` once answers flow; stop `answers_after` answers
    after the first one from `new_version`. Returns the figures and the verdicts."""
    records: list[tuple[float, float, int, int | None]] = []  # issued, answered, status, version
    readiness: Counter[int] = Counter()
    stop = threading.Event()
    lock = threading.Lock()
    body, base = solid(90), dict(headers or {})
    base["content-type"] = "image/png"

    def client() -> None:
        with httpx.Client(base_url=service.url, timeout=30) as http:
            while not stop.is_set():
                issued = time.monotonic()
                try:
                    response = http.post(f"/classify?model={model}", content=body, headers=base)
                    status = response.status_code
                    version = response.json().get("version") if status == 200 else None
                except httpx.HTTPError:
                    status, version = 0, None
                with lock:
                    records.append((issued, time.monotonic(), status, version))

    def probe() -> None:
        with httpx.Client(base_url=service.url, timeout=10) as http:
            while not stop.is_set():
                readiness[http.get("/readyz").status_code] += 1
                stop.wait(0.02)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    threads.append(threading.Thread(target=probe))
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + deadline_s
    switched_at: float | None = None

    def new_answers() -> list[tuple[float, float, int, int | None]]:
        with lock:
            return [r for r in records if r[3] == new_version]

    try:
        poll_until(lambda: len(records) >= 20, deadline_s, "answers flowing", every_s=0.01)
        triggered = time.monotonic()
        trigger_result = trigger()
        trigger_s = time.monotonic() - triggered
        with contextlib.suppress(TimeoutError):  # judged below: "switched" or not
            remaining = max(0.0, deadline - time.monotonic())
            poll_until(lambda: len(new_answers()) >= answers_after, remaining, "new answers")
        new = new_answers()
        switched_at = min(r[1] for r in new) if new else None
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    versions = Counter(str(r[3]) for r in records if r[2] == 200)
    failures = [r for r in records if r[2] != 200]
    old_after_switch = (
        [r for r in records if r[3] not in (None, new_version) and r[0] > switched_at]
        if switched_at is not None
        else []
    )
    during = sum(1 for r in records if triggered <= r[0] <= switched_at) if switched_at else None
    return {
        "requests": len(records),
        "failures": len(failures),
        "failure_statuses": dict(Counter(r[2] for r in failures)),
        "versions": dict(versions),
        "switched": switched_at is not None,
        "time_to_switch_s": round(switched_at - triggered, 3) if switched_at else None,
        "trigger_s": round(trigger_s, 3),
        "trigger_result": trigger_result,
        "requests_during_swap": during,
        "old_version_after_switch": len(old_after_switch),
        "readyz": {str(k): v for k, v in readiness.items()},
    }
