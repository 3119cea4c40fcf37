"""Facts about the machine a result was measured on, written into every results.json."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

from contract.cpu import cpu_flags, cpu_model, usable_cores

_LIBRARIES = ("onnxruntime", "numpy", "torch", "PIL", "httpx")


def gpus() -> list[dict[str, str]]:
    """Name, driver and memory of each NVIDIA GPU that nvidia-smi reports; [] without one."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,driver_version,memory.total",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    keys = ("name", "driver", "memory")
    return [
        dict(zip(keys, (p.strip() for p in ln.split(",")), strict=False))
        for ln in out.splitlines()
        if ln.strip()
    ]


def library_versions() -> dict[str, str]:
    """Versions of the libraries this process imported (what the figures depend on)."""
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = str(getattr(module, "__version__", "unknown"))
    return versions


def machine_facts() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "measured_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": usable_cores(),
        "logical_cpus": os.cpu_count(),
        "gpus": gpus(),
        "os": platform.platform(),
        "load_average_1m_at_end": round(load[0], 2) if load else None,
        "libraries": library_versions(),
    }


def busy_note(machine: dict[str, Any]) -> str | None:
    """A warning when the machine was busy as the run started (1-minute load above half the
    cores). The load at the end is no evidence: the benchmark itself keeps the cores busy."""
    cores = machine.get("cores") or 1
    load = machine.get("load_average_1m_at_start")
    if load is None or load <= cores / 2:
        return None
    return (
        f"the machine was busy when the run started (1-minute load {load:.2f} on {cores} "
        "cores): other work shared the cores, so these figures are noisy"
    )


@contextlib.contextmanager
def pinned(cpus: tuple[int, ...] | None) -> Iterator[None]:
    """This thread (and any process it starts) on `cpus` meanwhile, then back on the cores it had
    (bench http's load generator and service, bench decode's single core)."""
    if not cpus:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
