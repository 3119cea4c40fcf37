"""Preprocessing: training-identical inputs, every image mode, orientation, reduced-scale JPEG
decoding, and refusals of what is not a (safe) image."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from contract.preprocessing import CIFAR, IMAGENET, Preprocessing
from runtime.preprocess import (
    OversizedImageError,
    PlainPng,
    UndecodableImageError,
    decode,
    normalize_into,
    plain_png_size,
    preprocess_into,
    probe,
    resize_all_then_crop,
    resize_and_crop,
)

from .conftest import PHOTOS, SAMPLES, normalize_cifar, require
from .reliability.hostile import png_bomb
from .support.images import encode, encode_image

MAX_PIXELS = 40_000_000


def preprocess(data: bytes, prep=IMAGENET) -> np.ndarray:  # type: ignore[no-untyped-def]
    out = np.empty((3, prep.crop, prep.crop), dtype=np.float32)
    preprocess_into(data, prep, out, max_pixels=MAX_PIXELS)
    return out


def two_colour_image(width: int, height: int) -> Image.Image:
    """Left half red, right half blue: orientation shows."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2, 0] = 255
    pixels[:, width // 2 :, 2] = 255
    return Image.fromarray(pixels)


def test_cifar_png_gives_exactly_the_training_input() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    out = preprocess(encode(pixels), CIFAR)
    np.testing.assert_allclose(out, normalize_cifar(pixels[None])[0], atol=1e-6)


@pytest.mark.parametrize(
    ("size", "resized"),
    [((500, 375), (341, 256)), ((335, 500), (256, 382)), ((411, 120), (876, 256))],
)
def test_resize_shorter_side_then_center_crop(
    size: tuple[int, int], resized: tuple[int, int]
) -> None:
    image = Image.new("RGB", size)
    assert image.resize(resized).size == resized  # the torchvision Resize(256) sizes
    assert resize_and_crop(image, IMAGENET).size == (224, 224)


def test_center_crop_keeps_the_center() -> None:
    pixels = np.zeros((256, 400, 3), dtype=np.uint8)
    pixels[:, 88:312] = 200  # the central 224 columns
    crop = np.asarray(resize_and_crop(Image.fromarray(pixels), IMAGENET))
    assert crop.shape == (224, 224, 3)
    assert (crop == 200).all()


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    data = encode_image(two_colour_image(64, 32), "JPEG", quality=95, exif=exif)
    image = decode(data, min_shorter_side=32, max_pixels=MAX_PIXELS)
    assert image.size == (32, 64)
    pixels = np.asarray(image).astype(int)
    assert pixels[:24, :, 0].mean() > 200 and pixels[:24, :, 2].mean() < 50  # red on top
    assert pixels[40:, :, 2].mean() > 200 and pixels[40:, :, 0].mean() < 50  # blue below


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "1"])
def test_every_mode_becomes_rgb(mode: str) -> None:
    image = two_colour_image(40, 40).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    decoded = decode(encode_image(image, fmt), min_shorter_side=8, max_pixels=MAX_PIXELS)
    assert decoded.mode == "RGB"
    assert preprocess(encode_image(image, fmt), CIFAR).shape == (3, 32, 32)


def test_grayscale_gives_three_equal_channels() -> None:
    data = encode_image(Image.linear_gradient("L").resize((64, 64)), "PNG")
    out = preprocess(data, CIFAR)
    std = np.asarray(CIFAR.std)[:, None, None]
    mean = np.asarray(CIFAR.mean)[:, None, None]
    raw = out * std + mean  # back to [0, 1]
    np.testing.assert_allclose(raw[0], raw[1], atol=1e-5)
    np.testing.assert_allclose(raw[1], raw[2], atol=1e-5)


def test_alpha_is_dropped_keeping_the_stored_colour() -> None:
    pixels = np.zeros((32, 32, 4), dtype=np.uint8)
    pixels[..., 1] = 180  # green everywhere, fully transparent
    data = encode(pixels)
    out = preprocess(data, CIFAR)
    np.testing.assert_allclose(out, normalize_cifar(pixels[None, ..., :3])[0], atol=1e-6)


def test_sixteen_bit_images_keep_their_range() -> None:
    pixels = np.full((32, 32), 40000, dtype=np.uint16)
    decoded = decode(
        encode_image(Image.fromarray(pixels), "PNG"), min_shorter_side=8, max_pixels=10**6
    )
    assert np.asarray(decoded)[0, 0].tolist() == [40000 >> 8] * 3


def test_large_jpeg_is_decoded_in_full_unless_dct_scaling_is_asked_for() -> None:
    path = require(PHOTOS / "n02091032_Italian_greyhound.jpg")  # 2400x1600
    data = path.read_bytes()
    assert decode(data, min_shorter_side=256, max_pixels=MAX_PIXELS).size == (2400, 1600)
    reduced = decode(data, min_shorter_side=256, max_pixels=MAX_PIXELS, dct_scaling=True)
    assert reduced.size == (600, 400)  # DCT scaling by 1/4: still >= 256 on the short side

    full = Image.open(io.BytesIO(data)).convert("RGB")
    reference = np.empty((3, 224, 224), dtype=np.float32)
    normalize_into(np.asarray(resize_and_crop(full, IMAGENET)), IMAGENET, reference)
    np.testing.assert_array_equal(preprocess(data), reference)  # the default: the full decode
    scaled = np.empty((3, 224, 224), dtype=np.float32)
    preprocess_into(data, IMAGENET, scaled, max_pixels=MAX_PIXELS, dct_scaling=True)
    assert 0 < np.abs(scaled - reference).mean() < 0.03  # of inputs spanning about [-2, 2.6]


def test_small_jpeg_is_decoded_in_full() -> None:
    data = encode_image(two_colour_image(300, 260), "JPEG")
    assert decode(data, min_shorter_side=256, max_pixels=MAX_PIXELS).size == (300, 260)


def test_first_frame_of_an_animation() -> None:
    frames = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    out = preprocess(buffer.getvalue(), CIFAR)
    assert out[0].mean() > out[2].mean()  # red


@pytest.mark.parametrize("side", [8_000, 20_000])  # over our limit; over Pillow's own
def test_decompression_bombs_are_refused_before_decoding(side: int) -> None:
    with pytest.raises(OversizedImageError):
        preprocess(png_bomb(side))


def test_pixel_limit_is_configurable() -> None:
    data = encode(np.zeros((100, 100, 3), dtype=np.uint8))
    with pytest.raises(OversizedImageError, match="10000 pixels; the limit is 9999"):
        decode(data, min_shorter_side=8, max_pixels=9_999)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello, this is text and not an image",
        b"\xff\xd8\xff\xe0" + bytes(100),  # a JPEG signature, then garbage
        encode_image(Image.new("RGB", (64, 64)), "JPEG")[:300],  # truncated
        encode_image(Image.new("RGB", (64, 64)), "ICO"),  # a format we do not accept
    ],
    ids=["empty", "text", "corrupt", "truncated", "ico"],
)
def test_undecodable_bytes_are_invalid_images(data: bytes) -> None:
    with pytest.raises(UndecodableImageError) as refused:
        preprocess(data)
    assert " at 0x" not in str(refused.value)  # no Python object repr in the client's message


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"resize_shorter": 8, "crop": 9}, "crop <= resize_shorter"),
        ({"interpolation": "lanczos"}, r"interpolation\n  Input should be 'bilinear'"),
        ({"antialias": False}, r"antialias\n  Input should be True"),
        ({"color": "BGR"}, r"color\n  Input should be 'RGB'"),
        ({"std": [0.2, 0.0, 0.2]}, "std must be strictly positive"),
        ({"gamma": 2.2}, r"gamma\n  Extra inputs are not permitted"),
    ],
)
def test_metadata_preprocessing_the_service_cannot_honour_is_refused(
    values: dict[str, object], message: str
) -> None:
    data = {**IMAGENET.model_dump(), **values}
    with pytest.raises(ValueError, match=message):
        Preprocessing.model_validate(data)


def _resize_all_then_crop(image: Image.Image, prep: Preprocessing) -> np.ndarray:
    return np.asarray(resize_all_then_crop(image, prep))


@pytest.mark.parametrize("size", [(200, 150), (256, 300), (224, 224), (120, 411)])
def test_images_that_need_no_shrinking_are_exact(size: tuple[int, int]) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    expected = _resize_all_then_crop(image, IMAGENET)
    np.testing.assert_array_equal(np.asarray(resize_and_crop(image, IMAGENET)), expected)


def test_shrinking_computes_the_crop_only_within_one_level() -> None:
    photos = [p for p in sorted(require(PHOTOS).glob("*.jpg")) if Image.open(p).size[0] >= 300]
    assert len(photos) >= 10
    for path in photos:
        image = Image.open(path).convert("RGB")
        ours = np.asarray(resize_and_crop(image, IMAGENET)).astype(int)
        difference = np.abs(ours - _resize_all_then_crop(image, IMAGENET))
        assert difference.max() <= 1, path.name  # one 8-bit level at most
        assert difference.mean() < 0.3, path.name


def test_cifar_images_upscaled_to_jpegs_give_torchvisions_input_exactly(
    cifar_test_set: tuple[np.ndarray, np.ndarray],
) -> None:
    """CIFAR's crop is its whole resize, so shrinking an upscaled JPEG computes every pixel: the
    same input (and so the same accuracy) as torchvision's decode and resize, for all 2000 real
    images (DCT-domain scaling, off by default, would change it)."""
    for pixels in cifar_test_set[0]:
        data = encode_image(
            Image.fromarray(pixels).resize((64, 64), Image.Resampling.BICUBIC), "JPEG"
        )
        image = Image.open(io.BytesIO(data)).convert("RGB")
        expected = _resize_all_then_crop(image, CIFAR)
        np.testing.assert_array_equal(np.asarray(resize_and_crop(image, CIFAR)), expected)
        reference = np.empty((3, 32, 32), dtype=np.float32)
        normalize_into(expected, CIFAR, reference)
        np.testing.assert_array_equal(preprocess(data, CIFAR), reference)


def _png(pixels: np.ndarray, *chunks: tuple[bytes, bytes], **options: object) -> bytes:
    info = PngInfo()
    for kind, data in chunks:
        info.add(kind, data)
    return encode_image(Image.fromarray(pixels), "PNG", pnginfo=info, **options)


def _rotated() -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = 6
    return exif


def _both_paths(data: bytes, prep: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """(small images' path, from `probe`; Pillow's path) for the same bytes."""
    fast, pillow = (np.empty((3, prep.crop, prep.crop), dtype=np.float32) for _ in range(2))
    preprocess_into(data, prep, fast, max_pixels=MAX_PIXELS, opened=probe(data, 64 * 64))
    preprocess_into(data, prep, pillow, max_pixels=MAX_PIXELS)
    return fast, pillow


def test_plain_small_pngs_are_decoded_by_libspng_to_exactly_pillows_input() -> None:
    """The CIFAR samples, RGBA, chunks Pillow ignores for pixels (gamma, physical size, time),
    and sizes that are resized and cropped: libspng's pixels and Pillow's give the same input."""
    rng = np.random.default_rng(7)
    cases = [path.read_bytes() for path in sorted(require(SAMPLES).glob("*.png"))]
    cases += [
        _png(rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)),  # alpha dropped
        _png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), (b"gAMA", b"\x00\x00\xb1\x8f")),
        _png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), dpi=(300, 300)),
        _png(rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)),  # resized, then cropped
        _png(rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)),  # upscaled
    ]
    for data in cases:
        assert isinstance(probe(data, 64 * 64), PlainPng), data[:64]
        fast, pillow = _both_paths(data, CIFAR)
        assert np.array_equal(fast, pillow)


@pytest.mark.parametrize(
    "data",
    [
        encode(np.zeros((8, 8), dtype=np.uint8)),  # grey
        encode_image(Image.new("P", (8, 8))),  # palette
        encode_image(Image.new("I;16", (8, 8))),  # 16 bits
        _png(np.zeros((8, 8, 3), dtype=np.uint8), transparency=(0, 0, 0)),
        _png(np.zeros((8, 8, 3), dtype=np.uint8), (b"tEXt", b"Comment\x00hello")),
        encode_image(two_colour_image(8, 4), "PNG", exif=_rotated()),
    ],
    ids=["grey", "palette", "16-bit", "transparency key", "text", "exif orientation"],
)
def test_other_pngs_take_pillows_path(data: bytes) -> None:
    assert plain_png_size(data) is None
    assert isinstance(probe(data, 64 * 64), Image.Image)


def test_a_corrupt_plain_png_gets_pillows_error() -> None:
    data = bytearray(_png(np.zeros((8, 8, 3), dtype=np.uint8)))
    start = data.index(b"IDAT") + 4
    data[start : start + 8] = b"\xff" * 8  # the compressed pixels, broken
    assert isinstance(probe(bytes(data), 64 * 64), PlainPng)
    with pytest.raises(UndecodableImageError):
        _both_paths(bytes(data), CIFAR)
