"""Directories of image files, as the exporter's calibration and gates and the benchmark read
them."""

from __future__ import annotations

from pathlib import Path

# File names that hold images of the formats the service decodes (runtime.preprocess.FORMATS).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def image_files(directory: Path, limit: int) -> list[Path]:
    """The first `limit` image files in `directory` by name; raises ValueError if there are none."""
    if not directory.is_dir():
        raise ValueError(f"image directory {directory} does not exist")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    files = [p for p in files if p.is_file()][:limit]
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {directory}")
    return files
