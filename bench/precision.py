"""`bench precision`: `--precision auto` per depth (ImageNet 18-152, CIFAR 20-110) on this host.

Each architecture is exported with `--precision auto` into a repository (versions already there
with the same weights and settings are reused); the exporter itself gates and measures every
candidate at batch 1, 8 and 32 through the service's engines, so the table is read from each
version's `precision_choice`: fp32 beside the chosen precision, and every other candidate's
speed and gate, all measured in the same run on the same host.

Gate data: ImageNet models are gated and calibrated on real photos; CIFAR models on the 2000
labeled CIFAR-10 test images (top-1 may drop by at most 0.3 points). Weights: the checkpoints in
--weights-dir (the shipped CIFAR ResNet-20-56), seeded random ones otherwise (latency does not
depend on them; the gate then compares two untrained networks' top-1).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

RESULTS_JSON, RESULTS_MD = "precision.json", "precision.md"


def sweep(
    archs: list[str],
    repository: Path,
    *,
    weights_dir: Path,
    photos: Path,
    cifar_labeled: Path,
    calibration_limit: int = 300,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Export each arch with --precision auto (or reuse it); one summary row per arch."""
    from export.calibration import load_calibration
    from export.exporter import ExportRequest, export_model
    from export.weights import Pretrained, resolve_weights
    from models.registry import get_spec

    rows = []
    progress = tqdm(archs, desc="auto", unit="model", file=sys.stderr, disable=None)
    for arch in progress:
        progress.set_postfix_str(arch)
        spec = get_spec(arch)
        cifar = spec.family == "cifar"
        gate = cifar_labeled if cifar else photos
        started = time.perf_counter()
        result = export_model(
            ExportRequest(
                arch=arch,
                weights=resolve_weights(spec, weights_dir, Pretrained.NEVER, seed),
                out=repository,
                precision="auto",
                calibration_images=load_calibration(gate, spec.preprocessing, calibration_limit),
                calibration_source=str(gate),
                gate_images=gate,
                gate_labeled=cifar_labeled if cifar else None,
                skip_if_same_weights=True,
            )
        )
        rows.append(summary_row(result.metadata, time.perf_counter() - started, result.skipped))
    return rows


def summary_row(meta: dict[str, Any], export_s: float, reused: bool) -> dict[str, Any]:
    choice = meta["precision_choice"]
    candidates = {f"{c['precision']}-{c['engine']}": c for c in choice["candidates"]}
    fp32 = candidates["fp32-onnxruntime"]["images_per_s"]
    chosen = candidates[choice["chosen"]]
    speedup = {b: chosen["images_per_s"][b] / fp32[b] for b in fp32}
    return {
        "model": meta["name"],
        "arch": meta["arch"],
        "family": meta["family"],
        "depth": meta["depth"],
        "trained": meta["weights"]["trained"],
        "chosen": choice["chosen"],
        "batch_sizes": choice["batch_sizes"],
        "fp32_images_per_s": fp32,
        "chosen_images_per_s": chosen["images_per_s"],
        "speedup": speedup,
        "candidates": choice["candidates"],
        "host": choice["host"],
        "export_s": round(export_s, 1),
        "reused": reused,
    }


def _gate_text(candidate: dict[str, Any]) -> str:
    gate = candidate.get("gate")
    if not gate:
        return "reference"
    text = f"agree {gate['agreement']['top1_agreement']:.1%}"
    labeled = gate.get("labeled", {})
    if "drop_points" in labeled:
        text += f", top-1 {labeled['top1_reduced']:.2%} (drop {labeled['drop_points']:.2f} pts)"
    return text


def table(rows: list[dict[str, Any]]) -> str:
    sizes = rows[0]["batch_sizes"] if rows else [1, 8, 32]
    per = "/".join(map(str, sizes))
    lines = [
        f"| model | depth | chosen | fp32 images/s (batch {per}) | chosen images/s | speed-up "
        "| every candidate: status, images/s, gate |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        fp32 = " / ".join(f"{row['fp32_images_per_s'][str(b)]:.1f}" for b in sizes)
        best = " / ".join(f"{row['chosen_images_per_s'][str(b)]:.1f}" for b in sizes)
        gain = " / ".join(f"{row['speedup'][str(b)]:.2f}x" for b in sizes)
        others = []
        for c in row["candidates"]:
            key = f"{c['precision']}-{c['engine']}"
            if c["status"] in ("unavailable", "error"):
                others.append(f"{key} {c['status']}")
                continue
            speed = "/".join(f"{c['images_per_s'][str(b)]:.0f}" for b in sizes)
            others.append(f"{key} {c['status']} {speed} ({_gate_text(c)})")
        lines.append(
            f"| {row['model']} | {row['depth']} | {row['chosen']} | {fp32} | {best} | {gain} "
            f"| {'; '.join(others)} |"
        )
    return "\n".join(lines)


def write(rows: list[dict[str, Any]], out: Path, machine: dict[str, Any], command: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    results = {"command": command, "machine": machine, "rows": rows}
    (out / RESULTS_JSON).write_text(json.dumps(results, indent=2) + "\n")
    host = rows[0]["host"] if rows else machine
    md = [
        f"`{command}` on {host['cpu_model']} ({' '.join(host['cpu_flags'])}), "
        f"{host['cores']} cores; images/s measured by the exporter through the service's engines.",
        "",
        table(rows),
        "",
    ]
    (out / RESULTS_MD).write_text("\n".join(md))
    return out / RESULTS_JSON
