"""`python -m export`: trace a checkpoint to ONNX, prove parity, write a model repository version.

The only place where exceptions become exit codes: 0 after parity passed and the version was
written atomically; 1 with a one-line reason otherwise (nothing is left in REPO); 2 for usage.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from contract.preprocessing import Preprocessing
from models.registry import PAPER_SET, get_spec

from .exporter import DEFAULT_MAX_BATCH_SIZE, PRECISION_CHOICES, ExportRequest, export_model
from .parity import Tolerances
from .representative import HINT, arguments_for
from .weights import Pretrained, resolve_weights

PRESETS = {
    "paper": PAPER_SET,
    "imagenet": tuple(a for a in PAPER_SET if not a.startswith("cifar_")),
    "cifar": tuple(a for a in PAPER_SET if a.startswith("cifar_")),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description=(
            "Export a ResNet checkpoint to ONNX, prove parity with PyTorch, and write "
            "REPO/<name>/<version>/{model.onnx,metadata.json} atomically."
        ),
        epilog=(
            "examples:\n"
            "  python -m export cifar_resnet20 --weights resnet20-12fca82f.th --out repo\n"
            "  python -m export resnet50 --weights random:0 --out model_repository\n"
            "  python -m export resnet50 --out model_repository   # official weights, else random\n"
            "  python -m export --preset paper --weights-dir weights --out model_repository\n"
            "  python -m export --archs cifar_resnet20,resnet18 --pretrained never --out repo"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("arch", nargs="?", help="architecture name (`python -m models list`)")
    parser.add_argument(
        "--weights",
        help="checkpoint path, random or random:SEED (untrained, for benchmarks), or an official "
        "keyword such as torchvision (downloaded once with a hash check); default: a checkpoint "
        "in --weights-dir, else official weights as --pretrained says, else random:SEED",
    )
    parser.add_argument("--out", required=True, type=Path, help="model repository directory")
    parser.add_argument("--name", help="model name in the repository (default: the arch)")
    parser.add_argument("--version", type=int, help="version number (default: latest + 1)")
    parser.add_argument("--labels", type=Path, help="text file with one class label per line")
    parser.add_argument("--num-classes", type=int, help="classifier size if not the arch default")
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=DEFAULT_MAX_BATCH_SIZE,
        help="largest batch the service may form; parity is verified at it (default: %(default)s)",
    )
    parser.add_argument(
        "--calibration-images",
        type=Path,
        help="directory of images, or an .npz with uint8 `images` [N,H,W,3], for parity on real "
        "data (preprocessed exactly as the service does)",
    )
    parser.add_argument("--calibration-limit", type=int, default=512, help="at most this many")
    parser.add_argument("--atol", type=float, default=Tolerances.atol, help="absolute tolerance")
    parser.add_argument(
        "--rtol",
        type=float,
        default=Tolerances.rtol,
        help="tolerance relative to each output's max |value|",
    )
    parser.add_argument(
        "--noise-factor",
        type=float,
        default=Tolerances.noise_factor,
        help="tolerance as a multiple of PyTorch's own fp32-vs-fp64 difference, when larger",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISION_CHOICES,
        default="fp32",
        help="served precision: bf16 (OpenVINO, AMX), int8 (onnxruntime, static quantization "
        "calibrated on --calibration-images) or fp16 (onnxruntime, for CUDA; float32 input and "
        "outputs kept) are accepted only if they pass the gate, which records the device it "
        "ran on; auto tries every precision and engine this host can run (fp32, bf16, int8 by "
        "onnxruntime and by OpenVINO/NNCF, fp16 on CUDA), gates and measures each, and keeps "
        "the fastest that passes, with the comparison in metadata.json (default name "
        "ARCH_PRECISION, e.g. resnet50_auto)",
    )
    parser.add_argument(
        "--gate-images",
        type=Path,
        help="real photos for the precision gate: top-1 agreement with fp32 must be >= 95%%",
    )
    parser.add_argument(
        "--gate-labeled",
        type=Path,
        help="labeled .npz (images, labels, class_names) for the precision gate: top-1 may drop "
        "by at most 0.3 points against fp32 when its classes are the model's",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random parity inputs")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="export a whole set (paper: ImageNet 18-152 and CIFAR 20-110; imagenet or cifar: "
        "half of it): checkpoints found in --weights-dir, else official weights (--pretrained), "
        "else random ones; versions already present with the same weights are skipped",
    )
    parser.add_argument(
        "--archs",
        help="comma-separated architectures exported with the preset's rules (instead of --preset)",
    )
    parser.add_argument(
        "--weights-dir",
        type=Path,
        default=Path("weights"),
        help="checkpoints picked by file name when --weights is not given (default: %(default)s)",
    )
    parser.add_argument(
        "--pretrained",
        choices=[p.value for p in Pretrained],
        default=Pretrained.AUTO.value,
        help="where no checkpoint is found: auto downloads the official weights (torchvision, or "
        "the published CIFAR-10 ones) and falls back to seeded random weights with a warning "
        "when they cannot be had; require fails instead; never uses random weights "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--pretrained-mirror",
        metavar="URL",
        help="download official weights from this directory (same file names) instead of their "
        "published location, e.g. an internal mirror",
    )
    parser.add_argument(
        "--calibration-dir",
        type=Path,
        help=f"with --preset/--archs: {HINT} (image files, or an .npz of uint8 images, labeled "
        "or not); every model whose input they suit is exported with --precision auto, gated and "
        "calibrated on them, under its own name; the others stay fp32 with one line saying what "
        "this host offers",
    )
    parser.add_argument(
        "--skip-existing",
        action="store_true",
        help="do nothing if the latest version already has the same weights (implied by --preset)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="tracebacks on failure")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.preset and args.archs:
        parser.error("give --preset or --archs, not both")
    if (args.preset or args.archs) and (args.arch or args.weights or args.name or args.version):
        parser.error("--preset/--archs export a set: leave out ARCH, --weights, --name, --version")
    if not (args.preset or args.archs or args.arch):
        parser.error("give ARCH (with or without --weights), --preset or --archs")
    if args.calibration_dir is not None and not (args.preset or args.archs):
        parser.error("--calibration-dir goes with --preset or --archs")
    if args.calibration_dir is not None and not args.calibration_dir.is_dir():
        parser.error(f"--calibration-dir {args.calibration_dir} is not a directory")
    try:
        if args.preset or args.archs:
            archs = PRESETS[args.preset] if args.preset else _split(args.archs)
            return run_set(args, archs)
        spec = get_spec(args.arch)
        weights = args.weights or resolve_weights(
            spec,
            args.weights_dir,
            Pretrained(args.pretrained),
            args.seed,
            mirror=args.pretrained_mirror,
        )
        return run_one(args, args.arch, weights, skip=args.skip_existing)
    except Exception as exc:  # the CLI boundary: one line, non-zero
        if args.verbose:
            traceback.print_exc()
        text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        message = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        print(f"export failed: {message}", file=sys.stderr)
        return 1


@functools.cache
def _calibration(path: Path, prep: Preprocessing, limit: int) -> np.ndarray:
    """Read and preprocess calibration images once per preprocessing (a preset has two)."""
    from .calibration import load_calibration

    return load_calibration(path, prep, limit)


def run_one(args: argparse.Namespace, arch: str, weights: str, *, skip: bool) -> int:
    spec = get_spec(arch)
    images, source = None, ""
    if args.calibration_images:
        images = _calibration(args.calibration_images, spec.preprocessing, args.calibration_limit)
        source = str(args.calibration_images)
    labels = None
    if args.labels:
        labels = [ln.strip() for ln in args.labels.read_text("utf-8").splitlines() if ln.strip()]
    result = export_model(
        ExportRequest(
            arch=arch,
            weights=weights,
            out=args.out,
            name=args.name,
            version=args.version,
            labels=labels,
            num_classes=args.num_classes,
            max_batch_size=args.max_batch_size,
            calibration_images=images,
            calibration_source=source,
            tolerances=Tolerances(atol=args.atol, rtol=args.rtol, noise_factor=args.noise_factor),
            seed=args.seed,
            skip_if_same_weights=skip,
            precision=args.precision,
            gate_images=args.gate_images,
            gate_labeled=args.gate_labeled,
            pretrained_mirror=args.pretrained_mirror,
        )
    )
    meta = result.metadata
    if result.skipped:
        print(f"{result.name} v{result.version}: already present with the same weights, skipped")
        return 0
    note = gate_device_note(meta)
    if note:
        print(note)
    if meta.get("precision_choice"):
        print(choice_table(meta["precision_choice"]))
    worst = max(r["logits"]["max_abs"] for r in meta["parity"]["results"])
    gate = meta["precision_gate"]
    gate_text = f", {meta['precision']} gate passed" if gate else ""
    print(
        f"{result.name} v{result.version}: {result.path} "
        f"(weights {meta['weights']['source']}, trained={meta['weights']['trained']}, "
        f"parity passed, max |logit diff| {worst:.2e}{gate_text})"
    )
    return 0


def gate_device_note(meta: dict[str, object]) -> str | None:
    """One plain line when an fp16 gate ran somewhere other than CUDA."""
    gate = meta.get("precision_gate")
    if meta.get("precision") != "fp16" or not isinstance(gate, dict):
        return None
    device = str(gate.get("device"))
    if device in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        return None
    return (
        f"note: the fp16 gate ran on {device} (no CUDA on this host); the CPU computes fp16 "
        "differently from CUDA, so re-export on a GPU host to gate what a GPU will serve"
    )


def choice_table(choice: dict[str, Any]) -> str:
    """`--precision auto`'s comparison, one line per candidate."""
    host = choice["host"]
    sizes = choice["batch_sizes"]
    lines = [
        f"precision auto on {host['cpu_model']} ({' '.join(host['cpu_flags']) or 'no AVX2'}, "
        f"{host['cores']} cores): images/s at batch {'/'.join(map(str, sizes))}"
    ]
    for row in choice["candidates"]:
        speed = row.get("images_per_s")
        figures = " / ".join(f"{speed[str(b)]:.1f}" for b in sizes) if speed else "-"
        why = f" ({row['reason']})" if row.get("reason") else ""
        lines.append(f"  {row['precision']}-{row['engine']:<12} {row['status']:<12} {figures}{why}")
    return "\n".join(lines)


def _split(archs: str) -> tuple[str, ...]:
    names = tuple(a.strip() for a in archs.split(",") if a.strip())
    for name in names:
        get_spec(name)  # an unknown name fails before anything is exported
    return names


def run_set(args: argparse.Namespace, archs: tuple[str, ...]) -> int:
    """Each architecture with a checkpoint from --weights-dir, else official weights (as
    --pretrained says), else random ones; versions already present with the same weights are
    skipped."""
    for arch in archs:
        spec = get_spec(arch)
        weights = resolve_weights(
            spec,
            args.weights_dir,
            Pretrained(args.pretrained),
            args.seed,
            mirror=args.pretrained_mirror,
        )
        if weights.startswith("random"):
            origin = "random weights (untrained)"
        elif weights in spec.pretrained:
            origin = f"official {weights} weights"
        else:
            origin = f"checkpoint {weights}"
        print(f"{arch}: {origin}", flush=True)
        run_one(arguments_for(args, spec), arch, weights, skip=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
