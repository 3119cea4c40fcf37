"""Real images for the parity gate, preprocessed by the service's own code path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from contract.preprocessing import Preprocessing
from runtime.image_files import image_files
from runtime.preprocess import normalize_into, preprocess_into, resize_and_crop

MAX_PIXELS = 1 << 28  # calibration images are the operator's own files


def load_calibration(path: Path, prep: Preprocessing, limit: int) -> np.ndarray:
    """float32 [N, 3, crop, crop]: a directory of image files, or an .npz holding uint8
    `images` [N, H, W, 3] (such as the CIFAR-10 test sample), first `limit` of them."""
    if path.suffix == ".npz":
        with np.load(path) as data:
            if "images" not in data:
                raise ValueError(f"{path} has no `images` array")
            raw = data["images"][:limit]
        if raw.dtype != np.uint8 or raw.ndim != 4 or raw.shape[-1] != 3:
            raise ValueError(f"{path}: `images` must be uint8 [N, H, W, 3], got {raw.shape}")
        out = np.empty((len(raw), 3, prep.crop, prep.crop), dtype=np.float32)
        for i, pixels in enumerate(raw):
            image = resize_and_crop(Image.fromarray(pixels), prep)
            normalize_into(np.asarray(image, dtype=np.uint8), prep, out[i])
        return out
    if not path.is_dir():
        raise ValueError(f"calibration images: {path} is neither a directory nor an .npz file")
    files = image_files(path, limit)
    out = np.empty((len(files), 3, prep.crop, prep.crop), dtype=np.float32)
    for i, file in enumerate(files):
        preprocess_into(file.read_bytes(), prep, out[i], max_pixels=MAX_PIXELS)
    return out
