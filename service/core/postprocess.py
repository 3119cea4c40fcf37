"""The model's post-processing, once for every protocol: ranking, softmax, unit-norm embeddings.

/classify ranks softmax probabilities, the Open Inference Protocol's classification extension
ranks the raw output values (as Triton does); both use `top_k`.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def top_k(values: np.ndarray, k: int) -> np.ndarray:
    """The indices of the k highest values of each row [N, C], highest first (ties: lower index
    first)."""
    return np.argsort(-values, axis=1, kind="stable")[:, :k]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, so that small probabilities keep their digits."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    probabilities = np.exp(shifted)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    return probabilities


def predictions(logits: np.ndarray, labels: tuple[str, ...], k: int) -> list[list[dict[str, Any]]]:
    """/classify's answer: the best k classes of each image, with softmax scores."""
    probabilities = softmax(logits)
    return [
        [{"index": int(i), "label": labels[i], "score": float(row[i])} for i in indices]
        for row, indices in zip(probabilities, top_k(probabilities, k), strict=True)
    ]


def classifications(values: np.ndarray, k: int, labels: tuple[str, ...]) -> list[str]:
    """Triton's classification extension: the k highest values of each row, highest first, as
    "value:index[:label]" (row-major [N, k])."""
    return [
        f"{row[i]!s}:{i}:{labels[i]}" if labels else f"{row[i]!s}:{i}"
        for row, indices in zip(values, top_k(values, k), strict=True)
        for i in indices
    ]


def unit_norm(embeddings: np.ndarray) -> np.ndarray:
    """Each row scaled to unit L2 norm (an all-zero row stays zero)."""
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings / np.maximum(norms, np.finfo(np.float32).tiny)
