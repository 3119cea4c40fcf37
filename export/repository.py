"""The model repository on disk: REPO/<name>/<version>/{model.onnx, metadata.json}.

Writes are atomic: everything goes into a hidden temporary directory beside the target, which is
renamed into place only when complete. A reader never sees a half-written version, and a failed
export leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from service.repository import version_numbers

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class RepositoryError(RuntimeError):
    pass


def validate_name(name: str) -> str:
    if not NAME.match(name) or name in {".", ".."}:
        raise RepositoryError(
            f"invalid model name {name!r}: use letters, digits, '_', '.', '-' (max 128)"
        )
    return name


def versions(repo: Path, name: str) -> list[int]:
    return version_numbers(repo / name)


def read_metadata(repo: Path, name: str, version: int) -> dict[str, Any]:
    with open(repo / name / str(version) / "metadata.json", encoding="utf-8") as f:
        return json.load(f)


def write_version(
    repo: Path, name: str, version: int, model_file: Path, metadata: dict[str, Any]
) -> Path:
    """Copy `model_file` and write `metadata` as REPO/name/version, atomically."""
    validate_name(name)
    if version < 1:
        raise RepositoryError(f"versions are positive integers, got {version}")
    model_dir = repo / name
    target = model_dir / str(version)
    if target.exists():
        raise RepositoryError(f"{target} already exists; versions are never overwritten")
    created_model_dir = not model_dir.exists()
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / f".tmp-{uuid.uuid4().hex}"
    try:
        tmp.mkdir()
        shutil.copyfile(model_file, tmp / "model.onnx")
        with open(tmp / "metadata.json", "w", encoding="utf-8") as f:
            json.dump(metadata, f, indent=2)
            f.write("\n")
        for path in (tmp / "model.onnx", tmp / "metadata.json"):
            fsync_path(path)
        os.rename(tmp, target)  # fails if another writer created the version meanwhile
        fsync_path(model_dir)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if created_model_dir:
            shutil.rmtree(model_dir, ignore_errors=True)
        if isinstance(exc, OSError):
            raise RepositoryError(f"cannot write {target}: {exc}") from exc
        raise
    return target


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a rename is durable only once its directory is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
