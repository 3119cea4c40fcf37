"""Representative images for a set export (`--calibration-dir`): which of the files in one
directory suit which model, and the one line printed for a model that has none.

Where images suit a model, it is exported with `--precision auto`, gated and calibrated on them,
under its own name (so the service loads the fastest precision that passed as the model's next
version). Where none suit it, it stays fp32 and one line says what this host offers and how to
get it.

Which images suit a model: an image belongs to the input size its shorter side is nearest to on
a log scale, among the input sizes of the registered models (CIFAR's 32 and ImageNet's 224: the
boundary is 85 pixels), so ImageNet-sized photos go to ImageNet models and 32x32 images to CIFAR
models. An `.npz` with uint8 `images` [N, H, W, 3] is judged by its H and W the same way; when it
also holds `labels` and `class_names` equal to the model's labels, the gate checks top-1 accuracy
on it too (at most 0.3 points below fp32). Image files win over an `.npz` as the calibration and
agreement set; the labeled `.npz` still gates accuracy. Fewer than MIN_IMAGES suited images are
too few to judge a 95% agreement gate: the model stays fp32.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from contract.cpu import cpu_flags
from models.registry import ArchSpec, list_specs
from runtime.image_files import IMAGE_SUFFIXES

MIN_IMAGES = 20
HINT = "a few hundred images like your traffic"


@dataclass(frozen=True)
class Source:
    path: Path
    size: int  # the input size (crop) these images suit
    count: int
    labeled_classes: tuple[str, ...] | None = None  # a labeled .npz's class names


@dataclass(frozen=True)
class Selection:
    images: Path  # a directory of image files, or an .npz: calibration and agreement gate
    labeled: Path | None  # a labeled .npz with the model's classes: the accuracy gate
    count: int
    described: str


@functools.cache
def input_sizes() -> tuple[int, ...]:
    return tuple(sorted({spec.preprocessing.crop for spec in list_specs()}))


def suited_size(shorter_side: int) -> int:
    """The registered input size nearest to `shorter_side` on a log scale."""
    return min(input_sizes(), key=lambda size: abs(math.log(shorter_side / size)))


def scan(directory: Path) -> list[Source]:
    """Every image file and image .npz under `directory` (hidden entries skipped)."""
    sources = []
    for path in sorted(directory.rglob("*")):
        if any(part.startswith(".") for part in path.relative_to(directory).parts):
            continue
        if not path.is_file():
            continue
        if path.suffix.lower() == ".npz":
            sources.extend(_npz_source(path))
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            try:
                with Image.open(path) as image:
                    side = min(image.size)
            except (OSError, ValueError):
                continue  # not an image after all: not representative of anything
            if side > 0:
                sources.append(Source(path, suited_size(side), 1))
    return sources


def _npz_source(path: Path) -> list[Source]:
    with np.load(path) as data:
        if "images" not in data:
            return []
        images = data["images"]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            return []
        classes = None
        if "labels" in data and "class_names" in data:
            classes = tuple(str(name) for name in data["class_names"])
        side = min(images.shape[1:3])
        return [Source(path, suited_size(side), len(images), classes)] if side > 0 else []


def select(spec: ArchSpec, directory: Path, staging: Path) -> Selection | None:
    """What `spec` is gated and calibrated on from `directory`, or None when too little suits it.
    Suited image files are linked into `staging` (one directory per input size) so that the
    exporter reads them as one set."""
    size = spec.preprocessing.crop
    suited = [s for s in scan(directory) if s.size == size]
    files = [s.path for s in suited if s.path.suffix.lower() != ".npz"]
    arrays = [s for s in suited if s.path.suffix.lower() == ".npz"]
    labeled = next((s.path for s in arrays if s.labeled_classes == tuple(spec.labels)), None)
    if len(files) >= MIN_IMAGES:
        target = staging / str(size)
        if not target.exists():
            target.mkdir(parents=True)
            for i, file in enumerate(files):
                (target / f"{i:06d}{file.suffix.lower()}").symlink_to(file.resolve())
        described = f"{len(files)} images in {directory}/"
        images, count = target, len(files)
    elif arrays and (labeled is not None or arrays[0].count >= MIN_IMAGES):
        chosen = next(s for s in arrays if labeled is None or s.path == labeled)
        images, count = chosen.path, chosen.count
        described = f"{count} images of {chosen.path}"
    else:
        return None
    if labeled is not None:
        described += f", accuracy on the labeled {labeled.name}"
    return Selection(images, labeled, count, described)


@functools.cache
def offers() -> str:
    """What this host offers beyond fp32, from its CPU flags and CUDA devices."""
    flags = set(cpu_flags())
    found = []
    int8 = [name for flag, name in _INT8_UNITS if flag in flags]
    if int8:
        found.append(f"int8 on {'/'.join(dict.fromkeys(int8))}")
    bf16 = [name for flag, name in _BF16_UNITS if flag in flags]
    if bf16:
        found.append(f"bf16 on {'/'.join(dict.fromkeys(bf16))}")
    devices = _cuda_devices()
    if devices:
        found.append(f"fp16 on {devices} CUDA device{'s' if devices > 1 else ''}")
    if found:
        return "this host offers " + ", ".join(found)
    base = "AVX2" if "avx2" in flags else "no AVX2"
    return f"this CPU has {base} but no VNNI, BF16, AMX or CUDA device (int8 may still be faster)"


_INT8_UNITS = (("amx_int8", "AMX"), ("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI"))
_BF16_UNITS = (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16"))


def _cuda_devices() -> int:
    try:
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return 0
        from runtime.engines.providers import cuda_devices

        return cuda_devices()[0]
    except Exception:  # no CUDA is an answer here, not an error
        return 0


def fp32_line(arch: str, why: str, place: str) -> str:
    return (
        f"{arch}: fp32 ({why}); {offers()}: put {HINT} in {place} and export again "
        "for the fastest precision that passes the gate"
    )


_STAGING: list[Path] = []


def _staging() -> Path:
    if not _STAGING:
        _STAGING.append(Path(tempfile.mkdtemp(prefix="resnet-calibration-")))
        atexit.register(shutil.rmtree, _STAGING[0], True)
    return _STAGING[0]


def arguments_for(args: argparse.Namespace, spec: ArchSpec) -> argparse.Namespace:
    """The export arguments for `spec` in a set export: `--precision auto` on the representative
    images that suit it, or the arguments as given, after one line saying what fp32 leaves."""
    if args.precision != "fp32":
        return args  # an explicit precision stands
    directory = getattr(args, "calibration_dir", None)
    if directory is None:
        place = "a directory given to --calibration-dir"
        print(fp32_line(spec.name, "no --calibration-dir", place), flush=True)
        return args
    selection = select(spec, directory, _staging())
    size = spec.preprocessing.crop
    if selection is None:
        count = sum(s.count for s in scan(directory) if s.size == size)
        amount = f"only {count} images" if count else "no images"
        why = f"{amount} in {directory}/ suit its {size}x{size} input"
        print(fp32_line(spec.name, why, f"{directory}/"), flush=True)
        return args
    print(f"{spec.name}: --precision auto on {selection.described}", flush=True)
    return argparse.Namespace(
        **{
            **vars(args),
            "precision": "auto",
            "name": spec.name,
            "calibration_images": selection.images,
            "gate_images": selection.images,
            "gate_labeled": selection.labeled,
        }
    )
