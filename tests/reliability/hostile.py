"""Hypothesis strategies for hostile `/classify` and `/embed` bodies.

Valid images in every accepted format, mode and odd size (1-pixel, 1 x N, animated, 16-bit,
EXIF-rotated), then broken on purpose: truncated, bit-flipped, spliced, wrapped in another
format (polyglots), header fields rewritten to claim a gigantic canvas, small files that decode
to a huge one (decompression bombs), zlib bombs in PNG text and ICC chunks, formats the service
refuses, random bytes, and wrong or odd media types. Every case says which statuses are correct:
never a 5xx.
"""

from __future__ import annotations

import functools
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st
from PIL import Image

from ..support.images import encode_image

MODES = {
    "PNG": ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"),
    "JPEG": ("L", "RGB", "CMYK"),
    "GIF": ("L", "P"),
    "BMP": ("1", "L", "P", "RGB"),
    "TIFF": ("1", "L", "LA", "RGB", "RGBA", "CMYK", "I;16", "F"),
    "WEBP": ("RGB", "RGBA"),
}
MEDIA = {"PNG": "png", "JPEG": "jpeg", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff", "WEBP": "webp"}
# Formats Pillow writes that the service must refuse (400), never hand to a decoder.
REFUSED = ("ICO", "PCX", "TGA", "PPM", "SGI", "DDS")
DECODED = (200, 400, 413)  # a body that reached the decoder: decoded, undecodable, or too large


@dataclass(frozen=True)
class HostileBody:
    """One request body and what the service may answer to it."""

    description: str
    content_type: str
    body: bytes
    allowed: tuple[int, ...]
    images: int = 1  # predictions to expect when the answer is 200

    def __repr__(self) -> str:  # what Hypothesis prints for a failing case
        head = self.body[:48]
        return (
            f"HostileBody({self.description!r}, {self.content_type!r}, {len(self.body)} bytes "
            f"starting {head!r})"
        )


@st.composite
def images(draw: st.DrawFn) -> tuple[str, bytes]:
    """(format, bytes) of a valid image in an accepted format, of an odd size or mode."""
    fmt = draw(st.sampled_from(sorted(MODES)))
    mode = draw(st.sampled_from(MODES[fmt]))
    width = draw(st.integers(1, 80) | st.sampled_from([1, 2, 3, 257]))
    height = draw(st.integers(1, 80) | st.sampled_from([1, 2, 3, 257]))
    seed = draw(st.integers(0, 2**32 - 1))
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode if mode not in {"I;16", "I", "F"} else "L")
    if mode in {"I;16", "I", "F"}:
        image = image.convert(mode if mode != "I;16" else "I").convert(mode)
    options: dict[str, object] = {}
    if fmt in {"JPEG", "PNG", "WEBP", "TIFF"} and draw(st.booleans()):
        exif = Image.Exif()
        odd = [] if fmt == "TIFF" else [0, 9, 65535]  # libtiff refuses to write those
        exif[0x0112] = draw(st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, *odd]))
        options["exif"] = exif.tobytes()
    if fmt == "JPEG":
        options.update(quality=draw(st.integers(1, 100)), progressive=draw(st.booleans()))
    elif fmt == "TIFF":
        options["compression"] = draw(
            st.sampled_from(["raw", "tiff_lzw", "tiff_adobe_deflate", "packbits"])
        )
    elif fmt != "TIFF" and mode in {"P", "L", "RGB", "RGBA"} and draw(st.booleans()):
        frames = [image.rotate(90 * k) for k in range(1, draw(st.integers(2, 4)))]
        options.update(save_all=True, append_images=frames)
    for attempt, kwargs in ((image, options), (image, {}), (image.convert("RGB"), {})):
        try:
            return fmt, encode_image(attempt, fmt, **kwargs)
        except (OSError, RuntimeError, ValueError, KeyError):  # a combination the encoder lacks
            continue
    raise AssertionError(f"cannot write even RGB as {fmt}")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = struct.pack(">I", zlib.crc32(kind + data))
    return struct.pack(">I", len(data)) + kind + data + crc


@functools.cache
def png_bomb(side: int) -> bytes:
    """A valid 1-bit PNG of side x side zeros: a few kB that decode to side^2 pixels."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


@functools.cache
def png_chunk_bomb(kind: bytes, megabytes: int) -> bytes:
    """A small valid PNG carrying a zlib bomb (`megabytes` of zeros) in a zTXt or iCCP chunk."""
    base = encode_image(Image.new("RGB", (8, 8), (10, 20, 30)), "PNG")
    payload = zlib.compress(bytes(megabytes * 2**20), 9)
    data = (b"comment\x00\x00" if kind == b"zTXt" else b"icc\x00\x00") + payload
    return base[:33] + _png_chunk(kind, data) + base[33:]


def claim_size(fmt: str, data: bytes, width: int, height: int) -> bytes:
    """`data` with its header rewritten to claim width x height (the pixels stay as they are)."""
    out = bytearray(data)
    if fmt == "PNG":
        out[16:24] = struct.pack(">II", width, height)
        out[29:33] = struct.pack(">I", zlib.crc32(bytes(out[12:29])))
    elif fmt == "GIF":
        out[6:10] = struct.pack("<HH", min(width, 65535), min(height, 65535))
    elif fmt == "BMP":
        out[18:26] = struct.pack("<ii", width, height)
    elif fmt == "JPEG":
        for marker in (b"\xff\xc0", b"\xff\xc2"):
            at = out.find(marker)
            if at >= 0:
                out[at + 5 : at + 9] = struct.pack(">HH", min(height, 65535), min(width, 65535))
                break
    return bytes(out)


POLYGLOT_TAILS = (
    b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(20),  # a ZIP (GIFAR-style)
    b"<html><script>alert(1)</script></html>",
    b"%PDF-1.7\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF",
    b"<?php system($_GET['c']); ?>",
    b"\x7fELF\x02\x01\x01" + bytes(9),
)


@st.composite
def broken_images(draw: st.DrawFn) -> HostileBody:
    """One raw image body, valid or broken in one of many ways."""
    fmt, data = draw(images())
    media = f"image/{MEDIA[fmt]}"
    kind = draw(
        st.sampled_from(
            [
                "valid",
                "truncated",
                "bit flips",
                "polyglot tail",
                "polyglot head",
                "spliced",
                "claims a huge canvas",
                "decompression bomb",
                "zlib bomb chunk",
                "refused format",
                "random bytes",
                "empty",
            ]
        )
    )
    if kind == "truncated":
        data = data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    elif kind == "bit flips":
        mutable = bytearray(data)
        for _ in range(draw(st.integers(1, 16))):
            at = draw(st.integers(0, len(mutable) - 1))
            mutable[at] ^= 1 << draw(st.integers(0, 7))
        data = bytes(mutable)
    elif kind == "polyglot tail":
        data += draw(st.sampled_from(POLYGLOT_TAILS))
    elif kind == "polyglot head":
        data = draw(st.sampled_from(POLYGLOT_TAILS)) + data
    elif kind == "spliced":
        _, other = draw(images())
        data = data[: len(data) // 2] + other[len(other) // 2 :]
    elif kind == "claims a huge canvas":
        fmt = draw(st.sampled_from(["PNG", "GIF", "BMP", "JPEG"]))
        mode = "RGB" if fmt in {"JPEG", "BMP", "PNG"} else "P"
        small = encode_image(Image.new(mode, (8, 8)), fmt)
        side = draw(st.sampled_from([65_535, 100_000, 2**31 - 1]))
        data, media = claim_size(fmt, small, side, side), f"image/{MEDIA[fmt]}"
    elif kind == "decompression bomb":
        side = draw(st.sampled_from([7_000, 20_000, 46_341]))  # over the pixel limit
        data, media = png_bomb(side), "image/png"
    elif kind == "zlib bomb chunk":
        chunk = draw(st.sampled_from([b"zTXt", b"iCCP"]))
        data, media = png_chunk_bomb(chunk, draw(st.sampled_from([8, 64]))), "image/png"
    elif kind == "refused format":
        refused = draw(st.sampled_from(REFUSED))
        mode = "L" if refused == "PPM" else "RGB"
        data = encode_image(Image.new(mode, (8, 8)), refused)
        media = draw(st.sampled_from(["image/png", "image/x-icon", "image/*"]))
    elif kind == "random bytes":
        data = draw(st.binary(min_size=1, max_size=2048))
    elif kind == "empty":
        data = b""
    media = draw(st.sampled_from([media, media, "image/*", "image/png", "image/jpeg; q=1"]))
    return HostileBody(f"{kind} {fmt}", media, data, DECODED)


@st.composite
def hostile_bodies(draw: st.DrawFn) -> HostileBody:
    """A whole request body: a raw image, a multipart form of several, or a wrong media type."""
    form = draw(st.sampled_from(["raw", "raw", "multipart", "wrong media type"]))
    if form == "raw":
        return draw(broken_images())
    if form == "wrong media type":
        case = draw(broken_images())
        media = draw(
            st.sampled_from(
                ["application/octet-stream", "text/plain", "application/json", "", "image"]
            )
        )
        return HostileBody(f"{case.description} as {media!r}", media, case.body, (415,))
    parts = draw(st.lists(broken_images(), min_size=1, max_size=4))
    boundary = draw(st.sampled_from(["b0undary", "x" * 70, "--==", "a b"]))
    chunks = []
    for index, part in enumerate(parts):
        name = draw(st.sampled_from(["file", "file", "file", "other", "FILE"]))
        filename = draw(st.sampled_from([f"{index}.png", "../../etc/passwd", "", "ü\u202e.gif"]))
        header = (
            f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            f"Content-Type: {part.content_type}\r\n\r\n"
        )
        chunks.append(f"--{boundary}\r\n".encode() + header.encode() + part.body + b"\r\n")
    body = b"".join(chunks) + f"--{boundary}--\r\n".encode()
    count = sum(1 for chunk in chunks if b'name="file"' in chunk[:200])
    return HostileBody(
        "multipart of " + ", ".join(p.description for p in parts),
        f'multipart/form-data; boundary="{boundary}"',
        body,
        DECODED,
        images=count,
    )
