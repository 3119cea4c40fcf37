"""Facts about this machine's CPU that decide which precision and engine run fastest on it, and
how many cores this process may use.

Read by the exporter (`--precision auto` records them beside its measurements), by the service
(it warns when it serves an `auto` choice on a CPU whose flags differ from the exporting one's;
it sizes its thread pools by `usable_cores`) and by `bench` (every results.json names the
machine). Standard library only.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

# The x86 extensions that decide fp32, bf16 and int8 convolution speed: AVX2/FMA (fp32), AVX-512
# (wider fp32), VNNI (int8 dot products; avx_vnni is the 256-bit form), AVX512-BF16 and AMX
# (bf16 and int8 tiles), AVX512-FP16.
ISA_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


def _cpuinfo_field(key: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == key:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The ISA_FLAGS this CPU has, in ISA_FLAGS order ([] where /proc/cpuinfo is not there)."""
    present = set((_cpuinfo_field("flags") or "").split())
    return [flag for flag in ISA_FLAGS if flag in present]


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, which a container's cpuset or
    `taskset` narrows), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def host_facts() -> dict[str, object]:
    return {"cpu_model": cpu_model(), "cpu_flags": cpu_flags(), "cores": usable_cores()}


def choice_mismatch(recorded: dict[str, object]) -> str | None:
    """Why a precision chosen by measurement on the host `recorded` describes may not be the
    fastest here, or None when this CPU has the same flags."""
    here = cpu_flags()
    there = [str(f) for f in recorded.get("cpu_flags", []) or []]  # type: ignore[union-attr]
    if here == there:
        return None
    missing = [f for f in there if f not in here]
    extra = [f for f in here if f not in there]
    parts = []
    if missing:
        parts.append(f"lacks {' '.join(missing)}")
    if extra:
        parts.append(f"adds {' '.join(extra)}")
    return (
        f"chosen by measurement on {recorded.get('cpu_model', '?')}; this CPU "
        f"({cpu_model()}) {' and '.join(parts)}, so another precision may be faster here: "
        "re-export with --precision auto on this host"
    )
