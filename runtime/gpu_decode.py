"""JPEG decoding on the GPU (NVIDIA nvImageCodec), behind `--jpeg-decoder nvimgcodec`.

Off by default: whether a GPU decode plus the copy back and the CPU resize beats Pillow's
(libjpeg-turbo) decode on a GPU host's 16 cores is what `make gpu-check` measures (its
`http-nvimgcodec` variant), not something to assume. Everything after decoding is the
service's own code (`resize_and_crop`, `normalize_into`), so the model sees the same
preprocessing. Only JPEGs go to the GPU; other
formats, and any JPEG nvImageCodec cannot decode, take the Pillow path, which also produces the
error a bad image gets.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from contract.preprocessing import Preprocessing

from .engines import EngineError
from .preprocess import (
    FORMATS,
    MAX_JPEG_SCANS,
    OversizedImageError,
    PixelBudget,
    UndecodableImageError,
    normalize_into,
    preprocess_into,
    resize_and_crop,
)

JPEG_DECODERS = ("pillow", "nvimgcodec")
Preprocess = Callable[..., None]


def image_preprocessor(decoder: str, *, dct_scaling: bool = False) -> Preprocess:
    """`preprocess_into` for the `jpeg_decoder` and `jpeg_dct_scaling` settings; refuses at
    start-up what cannot run."""
    if decoder == "pillow":
        return functools.partial(preprocess_into, dct_scaling=dct_scaling)
    if decoder == "nvimgcodec":
        return NvImageCodecPreprocessor()
    raise EngineError(f"jpeg_decoder must be one of {JPEG_DECODERS}, not {decoder!r}")


class NvImageCodecPreprocessor:
    """`preprocess_into` with JPEGs decoded on the GPU (EXIF orientation applied there)."""

    def __init__(self) -> None:
        try:
            from nvidia import nvimgcodec
        except ImportError:
            raise EngineError(
                "jpeg_decoder=nvimgcodec needs NVIDIA nvImageCodec, which is not installed: "
                "pip install 'resnet-serve[gpu,gpu-options]' on a host with an NVIDIA GPU, "
                "or use jpeg_decoder=pillow"
            ) from None
        try:
            self._decoder: Any = nvimgcodec.Decoder()
        except Exception as exc:  # no GPU, no driver: the library says which
            raise EngineError(f"jpeg_decoder=nvimgcodec: nvImageCodec cannot start: {exc}") from exc

    def __call__(
        self,
        data: bytes,
        prep: Preprocessing,
        out: np.ndarray,
        *,
        max_pixels: int,
        budget: PixelBudget | None = None,
    ) -> None:
        pixels = self._decode_jpeg(data, max_pixels, budget)
        if pixels is None:
            preprocess_into(data, prep, out, max_pixels=max_pixels, budget=budget)
            return
        image = resize_and_crop(Image.fromarray(pixels), prep)
        normalize_into(np.asarray(image, dtype=np.uint8), prep, out)

    def _decode_jpeg(
        self, data: bytes, max_pixels: int, budget: PixelBudget | None
    ) -> np.ndarray | None:
        """uint8 HWC RGB for a JPEG within the pixel limit; None for anything Pillow should do."""
        try:
            header = Image.open(io.BytesIO(data), formats=FORMATS)
        except Exception:
            return None  # Pillow's path turns it into the right 400
        width, height = header.size
        if width * height > max_pixels:
            raise OversizedImageError(
                f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
            )
        if header.format != "JPEG" or header.mode not in ("RGB", "L", "YCbCr"):
            return None
        if data.count(b"\xff\xda") > MAX_JPEG_SCANS:
            return None  # Pillow's path refuses it with the right message
        if budget is not None:
            budget.take(width * height)
        try:
            decoded = self._decoder.decode(data)
        except Exception:
            return None
        if decoded is None:
            return None
        pixels = np.asarray(decoded.cpu())
        if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
            raise UndecodableImageError(f"nvImageCodec decoded an unexpected array {pixels.shape}")
        return pixels
