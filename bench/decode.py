"""`bench decode`: what one image costs to decode, resize and normalize on one core.

Times, per photo of one size (500x375 by default, ImageNet's most common), pinned to one core:
- torchvision's order (its loader's `Image.open(f).convert("RGB")`, which copies an RGB
  image once more, then resize the whole image, center crop, normalize): the reference every
  other path's model input is compared with (`exact` when all values equal);
- the service's path (Pillow decode, resizing only the region the crop keeps), and the same with
  `--jpeg-dct-scaling` (libjpeg's 1/2, 1/4, 1/8 DCT-domain downscaling);
- simplejpeg (libjpeg-turbo through its own binding), with and without its DCT scaling to any
  M/8 factor, then the service's resize;
- each stage alone.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from contract.preprocessing import Preprocessing
from runtime.image_files import image_files
from runtime.preprocess import (
    normalize_into,
    preprocess_into,
    resize_all_then_crop,
    resize_and_crop,
)

from .images import MAX_PIXELS
from .machine import pinned

RESULTS_MD = "decode.md"


def variants(prep: Preprocessing) -> dict[str, Callable[[bytes, np.ndarray], None]]:
    """Each path from encoded bytes to the model input, written into `out`; the first is the
    reference."""
    import simplejpeg

    def torchvision_order(data: bytes, out: np.ndarray) -> None:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        normalize_into(np.asarray(resize_all_then_crop(image, prep)), prep, out)

    def service(data: bytes, out: np.ndarray) -> None:
        preprocess_into(data, prep, out, max_pixels=MAX_PIXELS)

    def service_dct(data: bytes, out: np.ndarray) -> None:
        preprocess_into(data, prep, out, max_pixels=MAX_PIXELS, dct_scaling=True)

    def simplejpeg_full(data: bytes, out: np.ndarray) -> None:
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB")
        normalize_into(np.asarray(resize_and_crop(Image.fromarray(pixels), prep)), prep, out)

    def simplejpeg_scaled(data: bytes, out: np.ndarray) -> None:
        side = prep.resize_shorter
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=side, min_width=side)
        normalize_into(np.asarray(resize_and_crop(Image.fromarray(pixels), prep)), prep, out)

    return {
        "torchvision's order: Pillow decode, resize all, crop": torchvision_order,
        "the service: Pillow decode, crop-box resize": service,
        "the service with --jpeg-dct-scaling": service_dct,
        "simplejpeg decode, crop-box resize": simplejpeg_full,
        "simplejpeg DCT-scaled (M/8), crop-box resize": simplejpeg_scaled,
    }


def stages(prep: Preprocessing, sample: bytes) -> dict[str, Callable[[bytes, np.ndarray], Any]]:
    import simplejpeg

    image = Image.open(io.BytesIO(sample)).convert("RGB")
    pixels = np.asarray(resize_and_crop(image, prep))
    return {
        "stage: Pillow decode": lambda d, o: Image.open(io.BytesIO(d)).load(),
        "stage: simplejpeg decode": lambda d, o: simplejpeg.decode_jpeg(d, colorspace="RGB"),
        "stage: resize all + crop (Pillow)": lambda d, o: resize_all_then_crop(image, prep),
        "stage: crop-box resize (Pillow)": lambda d, o: resize_and_crop(image, prep),
        "stage: normalize": lambda d, o: normalize_into(pixels, prep, o),
    }


def _time(fn: Callable[[bytes, np.ndarray], Any], data: bytes, out: np.ndarray, runs: int) -> float:
    fn(data, out)
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        fn(data, out)
        times.append(time.perf_counter() - began)
    return float(np.median(times))


def run_decode(
    images: Path, prep: Preprocessing, size: tuple[int, int], runs: int = 50
) -> dict[str, Any]:
    """ms per image (the mean over the photos of each photo's median), on one core."""
    photos = []
    for path in image_files(images, 10_000):
        with Image.open(path) as image:
            if (
                image.format == "JPEG"
                and abs(image.size[0] - size[0]) <= 1
                and (abs(image.size[1] - size[1]) <= 1)
            ):
                photos.append((path.name, path.read_bytes()))
    if not photos:
        raise ValueError(f"no {size[0]}x{size[1]} JPEG photos in {images}")
    # One core, given back afterwards: the caller may be a test process that goes on.
    core = (sorted(os.sched_getaffinity(0))[-1],) if hasattr(os, "sched_setaffinity") else None
    with pinned(core):
        out = np.empty((3, prep.crop, prep.crop), dtype=np.float32)
        paths = {**variants(prep), **stages(prep, photos[0][1])}
        reference_path = next(iter(paths.values()))
        reference = []
        for _, data in photos:
            reference_path(data, out)
            reference.append(out.copy())
        rows = []
        for name, fn in paths.items():
            ms = 1e3 * float(np.mean([_time(fn, data, out, runs) for _, data in photos]))
            row: dict[str, Any] = {"path": name, "ms_per_image": round(ms, 3)}
            if not name.startswith("stage"):
                diffs = []
                for (_, data), expected in zip(photos, reference, strict=True):
                    fn(data, out)
                    diffs.append(
                        (float(np.abs(out - expected).max()), float(np.mean(out != expected)))
                    )
                row["max_abs_diff"] = max(d for d, _ in diffs)
                row["values_differing"] = round(float(np.mean([f for _, f in diffs])), 5)
                row["exact"] = row["max_abs_diff"] == 0.0
            rows.append(row)
    return {"photos": [n for n, _ in photos], "size": list(size), "runs": runs, "rows": rows}


def table(section: dict[str, Any]) -> str:
    lines = [
        "| path | ms per image, one core | same model input as torchvision's order |",
        "|---|---|---|",
    ]
    for row in section["rows"]:
        if "exact" not in row:
            same = "-"
        elif row["exact"]:
            same = "exact"
        else:
            same = (
                f"no: max |diff| {row['max_abs_diff']:.4f}, "
                f"{100 * row['values_differing']:.2f}% of values"
            )
        lines.append(f"| {row['path']} | {row['ms_per_image']:.2f} | {same} |")
    return "\n".join(lines)


def upscaled_cifar_accuracy(
    labeled: Path, checkpoint: Path, sizes: tuple[int, ...] = (64, 96, 128, 160, 256)
) -> list[dict[str, Any]]:
    """The trained CIFAR ResNet-20 on the labeled CIFAR-10 images upscaled (bicubic) to JPEGs
    (quality 90) of each size, decoded in full (the service's default) and with DCT scaling."""
    import tempfile

    from export.exporter import ExportRequest, export_model
    from models.registry import get_spec
    from runtime.engines import EngineConfig
    from runtime.engines.onnxruntime_engine import OrtEngine

    prep = get_spec("cifar_resnet20").preprocessing
    with np.load(labeled) as data:
        pixels, labels = data["images"], data["labels"]
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        result = export_model(
            ExportRequest(arch="cifar_resnet20", weights=str(checkpoint), out=Path(tmp))
        )
        engine = OrtEngine(
            result.path / "model.onnx",
            EngineConfig(),
            input_name="images",
            output_names=["logits", "embedding"],
            input_shape=(3, prep.crop, prep.crop),
        )
    rows = []
    for size in sizes:
        encoded = []
        for image in pixels:
            buffer = io.BytesIO()
            upscaled = Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC)
            upscaled.save(buffer, "JPEG", quality=90)
            encoded.append(buffer.getvalue())
        row: dict[str, Any] = {"size": size, "images": len(encoded)}
        for key, dct in (("full_decode", False), ("dct_scaling", True)):
            inputs = np.empty((len(encoded), 3, prep.crop, prep.crop), dtype=np.float32)
            for i, data in enumerate(encoded):
                preprocess_into(data, prep, inputs[i], max_pixels=MAX_PIXELS, dct_scaling=dct)
            logits = np.concatenate(
                [engine.run(inputs[i : i + 100])[0] for i in range(0, len(inputs), 100)]
            )
            row[key] = int((logits.argmax(1) == labels).sum())
        rows.append(row)
    return rows


def accuracy_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| upscaled to | correct, decoded in full (default) | correct, --jpeg-dct-scaling |",
        "|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['size']}x{row['size']} | {row['full_decode']}/{row['images']} "
            f"| {row['dct_scaling']}/{row['images']} |"
        )
    return "\n".join(lines)
