"""The paper preset for `bench engine`: exported by `python -m export --preset` (the one preset
exporter), into a cache repository, once.

Versions already present with the same weights are reused (the exporter's skip rule), so a
second benchmark run starts measuring at once. Checkpoints come from `weights_dir`, random:SEED
weights otherwise: a benchmark never downloads (`--pretrained never`).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from export.__main__ import PRESETS
from export.__main__ import main as export_main


def ensure_preset(
    preset: str,
    repository: Path,
    *,
    weights_dir: Path,
    seed: int = 0,
    only: list[str] | None = None,
) -> list[str]:
    """Export the preset's architectures that are missing from `repository`; their names."""
    archs = [a for a in PRESETS[preset] if not only or a in only]
    unknown = sorted(set(only or ()) - set(PRESETS[preset]))
    if unknown:
        raise ValueError(f"{unknown} are not in the {preset} preset: {list(PRESETS[preset])}")
    argv = ["--preset", preset] if not only else ["--archs", ",".join(archs)]
    argv += ["--out", str(repository), "--weights-dir", str(weights_dir)]
    argv += ["--seed", str(seed), "--pretrained", "never"]
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries bench's tables
        if export_main(argv) != 0:
            raise RuntimeError(f"python -m export {' '.join(argv)} failed (its reason is above)")
    return archs
