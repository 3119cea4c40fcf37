"""The images the scenarios send, and the service under test (bench's launcher: `python -m
service` in a subprocess on a free 127.0.0.1 port)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def encode_image(image: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def encode(pixels: np.ndarray, fmt: str = "PNG", **options: Any) -> bytes:
    """uint8 HWC pixels as an encoded image."""
    return encode_image(Image.fromarray(pixels), fmt, **options)


def sample_images(count: int, *, size: int = 64, seed: int = 0) -> list[bytes]:
    """`count` distinct JPEG and PNG images of smooth noise, never brighter than 200 (so that
    `graphs.poison_graph` accepts them)."""
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        small = rng.integers(0, 200, size=(8, 8, 3), dtype=np.uint8)
        pixels = np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BILINEAR))
        images.append(encode(pixels, "JPEG" if index % 2 else "PNG"))
    return images


def solid(value: int, size: int = 16) -> bytes:
    return encode(np.full((size, size, 3), value, dtype=np.uint8))
