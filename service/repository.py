"""Reads a model repository (docs/repository.md): the highest version of every model.

Only metadata is read here; sessions are built by the engine. Model names in URLs are looked up
in the dict this returns and never used as paths.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.hashing import sha256_file
from models.preprocessing import Preprocessing

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


class RepositoryError(ValueError):
    """The repository cannot be served as it is (empty, malformed metadata, missing graph)."""


@dataclass(frozen=True)
class ModelEntry:
    """One servable model version: where its graph is and everything needed to feed it."""

    name: str
    version: int
    path: Path
    metadata: dict[str, Any]
    preprocessing: Preprocessing
    input_name: str
    logits_name: str
    embedding_name: str
    labels: tuple[str, ...]
    num_classes: int
    embedding_dim: int
    verified_max_batch_size: int | None
    engine: str = "onnxruntime"
    precision: str = "fp32"

    @property
    def model_file(self) -> Path:
        return self.path / self.metadata["model_file"]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        crop = self.preprocessing.crop
        return (3, crop, crop)


def version_numbers(model_dir: Path) -> list[int]:
    """The versions under REPO/<name>, ascending: directories named by a positive integer."""
    if not model_dir.is_dir():
        return []
    return sorted(
        int(d.name)
        for d in model_dir.iterdir()
        if d.is_dir() and d.name.isdigit() and d.name.isascii() and int(d.name) > 0
    )


def scan_repository(root: Path) -> dict[str, ModelEntry]:
    """{name: entry} for the highest version of each model under `root`."""
    if not root.is_dir():
        raise RepositoryError(f"model repository {root} is not a directory")
    entries: dict[str, ModelEntry] = {}
    for model_dir in sorted(root.iterdir()):
        if model_dir.name.startswith(".") or not model_dir.is_dir():
            continue
        versions = version_numbers(model_dir)
        if not versions:
            log.warning("skipping %s: no version directories", model_dir)
            continue
        version_dir = model_dir / str(max(versions))
        entries[model_dir.name] = load_entry(version_dir)
    if not entries:
        raise RepositoryError(
            f"model repository {root} holds no models (expected REPO/<name>/<version>/)"
        )
    return entries


def load_entry(version_dir: Path) -> ModelEntry:
    name, version = version_dir.parent.name, int(version_dir.name)
    where = f"{name} version {version} ({version_dir})"
    try:
        metadata = json.loads((version_dir / "metadata.json").read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise RepositoryError(f"{where}: cannot read metadata.json: {exc}") from exc
    if not isinstance(metadata, dict):
        raise RepositoryError(f"{where}: metadata.json is not an object")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise RepositoryError(
            f"{where}: metadata format_version {metadata.get('format_version')!r} "
            f"is not {FORMAT_VERSION}"
        )
    if metadata.get("name") != name or metadata.get("version") != version:
        raise RepositoryError(
            f"{where}: metadata names {metadata.get('name')!r} version "
            f"{metadata.get('version')!r}, not the directory it is in"
        )
    model_file = metadata.setdefault("model_file", "model.onnx")
    if not isinstance(model_file, str) or Path(model_file).name != model_file:
        raise RepositoryError(f"{where}: model_file {model_file!r} is not a plain file name")
    if not model_file.endswith(".onnx"):
        # Serving reads ONNX graphs (protobuf) and nothing else: no pickle, no other format an
        # engine's readers would also accept.
        raise RepositoryError(f"{where}: model_file {model_file!r} is not an .onnx graph")
    if metadata.get("parity", {}).get("passed") is not True:
        raise RepositoryError(f"{where}: the export's parity check did not pass")
    try:
        entry = ModelEntry(
            name=name,
            version=version,
            path=version_dir,
            metadata=metadata,
            preprocessing=Preprocessing.from_dict(metadata["preprocessing"]),
            input_name=metadata["input"]["name"],
            logits_name=metadata["outputs"]["logits"]["name"],
            embedding_name=metadata["outputs"]["embedding"]["name"],
            labels=tuple(str(label) for label in metadata["labels"]),
            num_classes=int(metadata["num_classes"]),
            embedding_dim=int(metadata["embedding_dim"]),
            verified_max_batch_size=(
                int(metadata["max_batch_size"]) if "max_batch_size" in metadata else None
            ),
            engine=str(metadata.get("engine", "onnxruntime")),
            precision=str(metadata.get("precision", "fp32")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        detail = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        raise RepositoryError(f"{where}: invalid metadata.json: {detail}") from exc
    if len(entry.labels) != entry.num_classes:
        raise RepositoryError(
            f"{where}: {len(entry.labels)} labels for {entry.num_classes} classes"
        )
    if not entry.model_file.is_file():
        raise RepositoryError(f"{where}: {entry.model_file.name} is missing")
    expected = metadata.get("model_sha256")
    if expected and sha256_file(entry.model_file) != expected:
        raise RepositoryError(f"{where}: {entry.model_file.name} does not match model_sha256")
    return entry
