"""Real encoded images for the benchmarks, and the service's own preprocessing of them."""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from contract.preprocessing import Preprocessing
from runtime.image_files import image_files
from runtime.preprocess import preprocess_into
from service.core.settings import Settings

MAX_PIXELS: int = Settings.model_fields["max_image_pixels"].default


def load_images(directory: Path, limit: int = 256) -> list[tuple[str, bytes]]:
    """(file name, bytes) of up to `limit` images in `directory`, sorted by name."""
    return [(p.name, p.read_bytes()) for p in image_files(directory, limit)]


def cycle_batches(images: list[bytes], batch_size: int) -> itertools.cycle[list[bytes]]:
    """Batches of `batch_size` encoded images, cycling through all of them."""
    stream = itertools.cycle(images)
    batches = [[next(stream) for _ in range(batch_size)] for _ in range(len(images))]
    return itertools.cycle(batches)


class Preprocessor:
    """Decodes and preprocesses a batch with a thread pool, as the service's decode workers do."""

    def __init__(self, prep: Preprocessing, workers: int) -> None:
        self.prep = prep
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bench-decode")

    def __call__(self, encoded: list[bytes]) -> np.ndarray:
        out = np.empty((len(encoded), 3, self.prep.crop, self.prep.crop), dtype=np.float32)

        def one(i: int) -> None:
            preprocess_into(encoded[i], self.prep, out[i], max_pixels=MAX_PIXELS)

        list(self.pool.map(one, range(len(encoded))))
        return out

    def close(self) -> None:
        self.pool.shutdown(wait=True)
