"""Image bytes -> model input, exactly as the model was trained (torchvision's PIL path).

Decode (in full; JPEG at reduced scale when much larger than needed only if `dct_scaling` is
asked for, since that changes the input: see `decode`), apply EXIF orientation,
convert to RGB, resize the shorter side (bilinear, antialiased), center-crop, scale to [0, 1],
normalize, and write float32 CHW into a buffer the caller owns (a slice of the request's array),
so that no per-image tensor is allocated. Runs in worker threads: Pillow releases the GIL while
it decodes and resizes.

Alpha is dropped, keeping the stored colour under it, rather than composited onto a background:
that is what `Image.convert("RGB")` in torchvision's `ImageFolder` loader did at training time.

Small plain PNGs (8-bit RGB or RGBA, no EXIF, no transparency key: `plain_png_size`), which
`probe` finds for callers that decode small images on their event loop, are decoded by libspng
(pyspng) instead of Pillow: a PNG's pixels are exact whichever decoder reads them, and for a
32x32 CIFAR image libspng skips most of Pillow's per-image set-up. Larger images stay with
Pillow, which releases the GIL while it decodes in a thread (libspng's binding does not).
Everything after decoding is the same code.
"""

from __future__ import annotations

import functools
import io
import math
import struct
import threading
from dataclasses import dataclass

import numpy as np
import pyspng
from PIL import Image, ImageOps, UnidentifiedImageError

from contract.preprocessing import Preprocessing

# What the service accepts; other formats Pillow knows (EPS, PSD, ICO, ...) are refused, which
# keeps rarely exercised decoders away from untrusted bytes.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


class ImageError(Exception):
    """Bytes that cannot become a model input (the service answers 4xx)."""


class UndecodableImageError(ImageError):
    """Not an image of an accepted format, or a corrupt one."""


class OversizedImageError(ImageError):
    """More pixels than allowed, or a decompression bomb."""


# A progressive JPEG is decoded scan by scan, and libjpeg decodes a repeated ("bogus") scan again
# with only a warning: thousands of copies of the last scan make a small file that costs minutes.
# Encoders write about 10 scans (libjpeg's default progression), mozjpeg a few more.
MAX_JPEG_SCANS = 100


class PixelBudget:
    """The pixels one request's images may have together (each image's are taken before it is
    decoded); shared by the threads that decode them."""

    def __init__(self, pixels: int) -> None:
        self.left = pixels
        self.limit = pixels
        self._lock = threading.Lock()

    def take(self, pixels: int) -> None:
        with self._lock:
            if pixels > self.left:
                raise OversizedImageError(
                    f"the request's images have more than {self.limit} pixels together "
                    "(max_request_pixels)"
                )
            self.left -= pixels


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHUNK = struct.Struct(">I4s")
_IHDR = struct.Struct(">IIBB")  # width, height, bit depth, colour type
# Chunks that change nothing of what Pillow's path makes of an 8-bit RGB or RGBA image (Pillow
# applies no gamma or colour profile). Any other chunk (eXIf and text chunks, which can carry an
# EXIF orientation; tRNS; private ones) sends the image down Pillow's path.
_PLAIN_CHUNKS = frozenset(
    {
        *(b"IHDR", b"PLTE", b"IDAT", b"IEND", b"gAMA", b"cHRM", b"sRGB"),
        *(b"iCCP", b"sBIT", b"pHYs", b"bKGD", b"tIME", b"sPLT", b"hIST"),
    }
)


@dataclass(frozen=True, slots=True)
class PlainPng:
    """A PNG that `plain_png_size` accepted, and its size."""

    width: int
    height: int


def plain_png_size(data: bytes) -> PlainPng | None:
    """The size of a PNG whose pixels libspng decodes exactly as Pillow's path does: 8-bit RGB
    or RGBA, every chunk up to IEND one of `_PLAIN_CHUNKS`; None for anything else."""
    if len(data) < 33 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height, depth, colour = _IHDR.unpack_from(data, 16)
    if depth != 8 or colour not in (2, 6) or not width or not height:
        return None
    offset, end = 8, len(data)
    while offset + 8 <= end:
        length, kind = _CHUNK.unpack_from(data, offset)
        if kind not in _PLAIN_CHUNKS:
            return None
        if kind == b"IEND":
            return PlainPng(width, height)
        offset += 12 + length
    return None  # truncated: Pillow's path says what is wrong


def probe(data: bytes, max_pixels: int) -> Image.Image | PlainPng | None:
    """The image's header (a plain PNG's size, or the image opened but not decoded) when it has
    at most `max_pixels` pixels and an accepted format; None otherwise (the full path then gives
    the right answer). For callers that decode small images where they are rather than in a
    thread."""
    plain = plain_png_size(data)
    if plain is not None:
        return plain if plain.width * plain.height <= max_pixels else None
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Exception:
        return None
    width, height = image.size
    return image if 0 < width * height <= max_pixels else None


def decode(
    data: bytes,
    *,
    min_shorter_side: int,
    max_pixels: int,
    dct_scaling: bool = False,
    budget: PixelBudget | None = None,
    opened: Image.Image | None = None,
) -> Image.Image:
    """An upright RGB image, in full; with `dct_scaling`, a JPEG much larger than needed is
    decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT-domain downscaling, far cheaper for large
    photos) as long as its shorter side stays >= `min_shorter_side`.

    Off by default because it is not torchvision's input: on the 2000 CIFAR-10 test images
    upscaled to JPEGs, the trained ResNet-20 scored 1689 and 1656/2000 at 96 and 160 pixels with
    it against 1745 and 1731 decoding in full (and 1797 against 1673 at 64, where the scaling
    lands exactly on 32); the precision gates allow 0.3 points. `opened` is the image from
    `probe`, when the caller has it."""
    if not data:
        raise UndecodableImageError("image is empty (0 bytes)")
    try:
        image = opened if opened is not None else Image.open(io.BytesIO(data), formats=FORMATS)
        width, height = image.size
        if width * height > max_pixels:
            raise OversizedImageError(
                f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
            )
        if min(width, height) < 1:
            raise UndecodableImageError(f"image has no pixels ({width}x{height})")
        if budget is not None:
            budget.take(width * height)
        if image.format == "JPEG" and (scans := data.count(b"\xff\xda")) > MAX_JPEG_SCANS:
            raise UndecodableImageError(
                f"a JPEG of {scans} scans (start-of-scan markers); more than {MAX_JPEG_SCANS} "
                "is refused"
            )
        if dct_scaling and image.format == "JPEG" and min(width, height) > min_shorter_side:
            # DCT-domain downscaling by 1/2, 1/4 or 1/8: Pillow picks the largest factor that
            # keeps both sides >= the requested size, so the resize below still only shrinks.
            scale = min_shorter_side / min(width, height)
            image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
        ImageOps.exif_transpose(image, in_place=True)
        return _to_rgb(image)
    except Image.DecompressionBombError as exc:
        raise OversizedImageError(f"image refused as a decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        # Pillow's own message names its file object (`<_io.BytesIO object at 0x...>`).
        raise UndecodableImageError(
            f"not an image: the data is none of the accepted formats ({', '.join(FORMATS)})"
        ) from None
    except ImageError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # Pillow's decoders raise many kinds; each means a bad image
        raise UndecodableImageError(
            f"not a decodable image ({', '.join(FORMATS)}): {exc}"
        ) from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):
        # convert() would clip 16-bit samples at 255; keep their high byte instead.
        image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))
    return image.convert("RGB")


def resized_size(width: int, height: int, prep: Preprocessing) -> tuple[int, int]:
    """torchvision's Resize(resize_shorter) size: the shorter side to resize_shorter, the other
    scaled and truncated."""
    side = prep.resize_shorter
    if width <= height:
        return side, int(side * height / width)
    return int(side * width / height), side


def resize_all_then_crop(image: Image.Image, prep: Preprocessing) -> Image.Image:
    """torchvision's order, Resize then CenterCrop on the whole image: the reference that
    `resize_and_crop` is measured and tested against."""
    size = resized_size(*image.size, prep)
    image = image.resize(size, _RESAMPLE[prep.interpolation], reducing_gap=None)
    top, left = round((size[1] - prep.crop) / 2.0), round((size[0] - prep.crop) / 2.0)
    return image.crop((left, top, left + prep.crop, top + prep.crop))


def resize_and_crop(image: Image.Image, prep: Preprocessing) -> Image.Image:
    """torchvision's Resize(resize_shorter) then CenterCrop(crop), same size and offset rules.

    When the resize shrinks the image, only the pixels the crop keeps are computed
    (`Image.resize(box=...)`: the same filter and scale, over the crop's region of the source),
    which takes about a quarter off the cost of a 500x375 photo (`python -m bench decode`).
    Pillow then places its filter windows from another origin, so some values (0.1-25% by
    photo) differ by one 8-bit level, never more, from resizing everything first; images that
    need no shrinking (upscaled or kept as they are, such as CIFAR's 32x32) take the full path
    and stay exact.
    """
    width, height = image.size
    size = resized_size(width, height, prep)
    top = round((size[1] - prep.crop) / 2.0)
    left = round((size[0] - prep.crop) / 2.0)
    if size[0] < width and size[1] < height and top >= 0 and left >= 0:
        sx, sy = width / size[0], height / size[1]
        box = (left * sx, top * sy, (left + prep.crop) * sx, (top + prep.crop) * sy)
        resample = _RESAMPLE[prep.interpolation]
        return image.resize((prep.crop, prep.crop), resample, box=box, reducing_gap=None)
    if size != image.size:
        image = image.resize(size, _RESAMPLE[prep.interpolation], reducing_gap=None)
    if (left, top, size[0], size[1]) != (0, 0, prep.crop, prep.crop):
        image = image.crop((left, top, left + prep.crop, top + prep.crop))
    return image


@functools.cache
def _constants(prep: Preprocessing) -> tuple[np.float32, np.ndarray, np.ndarray]:
    """scale, mean and std as float32, shaped to broadcast over CHW: once per preprocessing."""
    return (
        np.float32(prep.scale),
        np.asarray(prep.mean, dtype=np.float32)[:, None, None],
        np.asarray(prep.std, dtype=np.float32)[:, None, None],
    )


def normalize_into(pixels: np.ndarray, prep: Preprocessing, out: np.ndarray) -> None:
    """uint8 HWC RGB -> ((x * scale) - mean) / std as float32 CHW, written into `out`."""
    scale, mean, std = _constants(prep)
    out[...] = pixels.transpose(2, 0, 1)
    out *= scale
    out -= mean
    out /= std


def preprocess_into(
    data: bytes,
    prep: Preprocessing,
    out: np.ndarray,
    *,
    max_pixels: int,
    dct_scaling: bool = False,
    budget: PixelBudget | None = None,
    opened: Image.Image | PlainPng | None = None,
) -> None:
    """Decode one encoded image and write the model's input for it into `out` [3, crop, crop]."""
    if isinstance(opened, PlainPng):  # from `probe`: small, decoded where the caller is
        pixels = _plain_png(data, opened, prep, max_pixels, budget)
        if pixels is not None:
            normalize_into(pixels, prep, out)
            return
        budget = None  # taken already; Pillow's path now says what is wrong with the image
    image = decode(
        data,
        min_shorter_side=prep.resize_shorter,
        max_pixels=max_pixels,
        dct_scaling=dct_scaling,
        budget=budget,
        opened=opened if isinstance(opened, Image.Image) else None,
    )
    try:
        image = resize_and_crop(image, prep)
        pixels = np.asarray(image, dtype=np.uint8)
    except MemoryError:
        raise
    except Exception as exc:  # pixels that only fail once decoded (truncated data)
        raise UndecodableImageError(f"not a decodable image: {exc}") from None
    normalize_into(pixels, prep, out)


def _plain_png(
    data: bytes, size: PlainPng, prep: Preprocessing, max_pixels: int, budget: PixelBudget | None
) -> np.ndarray | None:
    """A plain PNG's model-sized RGB pixels, decoded by libspng; None when libspng refuses it
    (after the size checks, which are the same as on Pillow's path)."""
    pixels_in = size.width * size.height
    if pixels_in > max_pixels:
        raise OversizedImageError(
            f"image is {size.width}x{size.height} = {pixels_in} pixels; the limit is {max_pixels}"
        )
    if budget is not None:
        budget.take(pixels_in)
    try:
        pixels = pyspng.load(data)
    except MemoryError:
        raise
    except Exception:  # corrupt data: Pillow's path names the problem
        return None
    if pixels.ndim != 3 or pixels.shape[:2] != (size.height, size.width):
        return None
    pixels = pixels[:, :, :3]
    if (
        (size.width, size.height)
        == (prep.crop, prep.crop)
        == resized_size(*pixels.shape[1::-1], prep)
    ):
        return pixels  # already the model's size: nothing to resize or crop
    return np.asarray(resize_and_crop(Image.fromarray(pixels), prep), dtype=np.uint8)
