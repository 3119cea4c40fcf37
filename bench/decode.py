"""`bench decode`: what one image costs to decode, resize and normalize on one core.

Times the service's path (Pillow: decode with DCT-domain downscaling by 1/2, 1/4 or 1/8 where
it still leaves the shorter side >= the resize target, antialiased bilinear resize, center crop,
normalize) against alternatives, per image, pinned to one core, on the photos of one size
(500x375 by default, ImageNet's most common):
- each stage alone (Pillow decode, simplejpeg decode, resize + crop, normalize);
- simplejpeg (libjpeg-turbo) decoding, with and without its DCT scaling to any M/8 factor;
- Pillow resizing only the region that the crop keeps (`Image.resize(box=...)`).
Each alternative's output is compared with the service's: `exact` when every value is equal.
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

from models.preprocessing import Preprocessing
from service.preprocess import image_files, normalize_into, preprocess_into, resize_and_crop

from .images import MAX_PIXELS

RESULTS_MD = "decode.md"


def _resized_size(width: int, height: int, prep: Preprocessing) -> tuple[int, int]:
    s = prep.resize_shorter
    return (s, int(s * height / width)) if width <= height else (int(s * width / height), s)


def _box_resize(image: Image.Image, prep: Preprocessing) -> Image.Image:
    """Resize + center crop computing only the pixels the crop keeps."""
    width, height = image.size
    size = _resized_size(width, height, prep)
    top = round((size[1] - prep.crop) / 2.0)
    left = round((size[0] - prep.crop) / 2.0)
    sx, sy = width / size[0], height / size[1]
    box = (left * sx, top * sy, (left + prep.crop) * sx, (top + prep.crop) * sy)
    return image.resize((prep.crop, prep.crop), Image.Resampling.BILINEAR, box, reducing_gap=None)


def variants(prep: Preprocessing) -> dict[str, Callable[[bytes, np.ndarray], None]]:
    """Each path from encoded bytes to the model input, written into `out`."""
    import simplejpeg

    def service(data: bytes, out: np.ndarray) -> None:
        preprocess_into(data, prep, out, max_pixels=MAX_PIXELS)

    def simplejpeg_full(data: bytes, out: np.ndarray) -> None:
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB")
        image = resize_and_crop(Image.fromarray(pixels), prep)
        normalize_into(np.asarray(image), prep, out)

    def simplejpeg_scaled(data: bytes, out: np.ndarray) -> None:
        side = prep.resize_shorter
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=side, min_width=side)
        image = resize_and_crop(Image.fromarray(pixels), prep)
        normalize_into(np.asarray(image), prep, out)

    def pillow_box(data: bytes, out: np.ndarray) -> None:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        normalize_into(np.asarray(_box_resize(image, prep)), prep, out)

    def simplejpeg_box(data: bytes, out: np.ndarray) -> None:
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB")
        normalize_into(np.asarray(_box_resize(Image.fromarray(pixels), prep)), prep, out)

    return {
        "Pillow (the service's path)": service,
        "simplejpeg decode + Pillow resize": simplejpeg_full,
        "simplejpeg DCT-scaled (M/8) + Pillow resize": simplejpeg_scaled,
        "Pillow decode + crop-box resize": pillow_box,
        "simplejpeg decode + crop-box resize": simplejpeg_box,
    }


def stages(prep: Preprocessing, sample: bytes) -> dict[str, Callable[[bytes, np.ndarray], Any]]:
    import simplejpeg

    image = Image.open(io.BytesIO(sample)).convert("RGB")
    pixels = np.asarray(resize_and_crop(image, prep))
    return {
        "stage: Pillow decode": lambda d, o: Image.open(io.BytesIO(d)).convert("RGB"),
        "stage: simplejpeg decode": lambda d, o: simplejpeg.decode_jpeg(d, colorspace="RGB"),
        "stage: resize + crop (Pillow)": lambda d, o: resize_and_crop(image, prep),
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
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})  # one core
    out = np.empty((3, prep.crop, prep.crop), dtype=np.float32)
    reference = []
    for _, data in photos:
        preprocess_into(data, prep, out, max_pixels=MAX_PIXELS)
        reference.append(out.copy())
    rows = []
    paths = {**variants(prep), **stages(prep, photos[0][1])}
    for name, fn in paths.items():
        ms = 1e3 * float(np.mean([_time(fn, data, out, runs) for _, data in photos]))
        row: dict[str, Any] = {"path": name, "ms_per_image": round(ms, 3)}
        if not name.startswith("stage"):
            diffs = []
            for (_, data), expected in zip(photos, reference, strict=True):
                fn(data, out)
                diffs.append((float(np.abs(out - expected).max()), float(np.mean(out != expected))))
            row["max_abs_diff"] = max(d for d, _ in diffs)
            row["values_differing"] = round(float(np.mean([f for _, f in diffs])), 5)
            row["exact"] = row["max_abs_diff"] == 0.0
        rows.append(row)
    return {"photos": [n for n, _ in photos], "size": list(size), "runs": runs, "rows": rows}


def table(section: dict[str, Any]) -> str:
    lines = [
        "| path | ms per image, one core | same model input as the service |",
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
