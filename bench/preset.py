"""The paper preset: export ImageNet 18-152 and CIFAR 20-110 into a cache repository once.

Versions already present with the same weights are reused (the exporter's skip rule), so a
second benchmark run starts measuring at once.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm

from export.exporter import ExportRequest, export_model
from export.weights import find_checkpoint
from models.registry import PAPER_SET, get_spec

PRESETS = {"paper": PAPER_SET}


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
    progress = tqdm(archs, desc="export", unit="model", file=sys.stderr, disable=None)
    for arch in progress:
        progress.set_postfix_str(arch)
        checkpoint = find_checkpoint(get_spec(arch), weights_dir)
        weights = str(checkpoint) if checkpoint else f"random:{seed}"
        export_model(
            ExportRequest(arch=arch, weights=weights, out=repository, skip_if_same_weights=True)
        )
    return archs
