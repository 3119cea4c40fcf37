"""Triton Inference Server files for a model of the repository, so that it loads there unchanged.

Triton's model repository layout is ours (REPO/<name>/<version>/model.onnx); it needs two more
files per model beside the version directories: `config.pbtxt` and the labels file that its
classification extension reads. Both describe the highest version, because that is the one both
servers serve (`version_policy: latest 1` mirrors the service). Our service ignores them: it only
reads numbered directories.

The text is rendered here by hand so that exporting needs no Triton package (Triton's
`model_config_pb2` ships only inside tritonclient's gRPC client, which does not import without
grpcio); the tests parse it with that `ModelConfig` protobuf definition.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from contract import defaults, repository

CONFIG_FILE = "config.pbtxt"
LABELS_FILE = "labels.txt"
PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
# The service's default batching window, so that both servers batch alike.
MAX_QUEUE_DELAY_US = round(defaults.MAX_DELAY_MS * 1000)
DATA_TYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "bfloat16": "TYPE_BF16",
    "uint8": "TYPE_UINT8",
    "int8": "TYPE_INT8",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
}


class TritonConfigError(ValueError):
    """Metadata that no valid Triton configuration can be written for."""


def render_config(metadata: Mapping[str, Any]) -> str:
    """config.pbtxt for one model version's metadata (docs/repository.md)."""
    name = repository.validate_name(metadata["name"])
    max_batch = int(metadata["max_batch_size"])
    if max_batch < 1:
        raise TritonConfigError(f"max_batch_size must be positive, got {max_batch}")
    image = metadata["input"]
    logits = metadata["outputs"]["logits"]
    embedding = metadata["outputs"]["embedding"]
    image_dims = _dims(image)
    lines = [
        f"# Written by `python -m export` from {name}/{metadata['version']}/metadata.json; "
        "rewritten on every export.",
    ]
    engine = metadata.get("engine", BACKEND)
    if engine != BACKEND:
        lines.append(
            f"# The service runs this model with {engine} at {metadata.get('precision')}; "
            f"Triton runs the same graph with {BACKEND}."
        )
    lines += [
        f"name: {_string(name)}",
        f"platform: {_string(PLATFORM)}",
        f"backend: {_string(BACKEND)}",
        f"default_model_filename: {_string(metadata.get('model_file', 'model.onnx'))}",
        # > 0: the batch axis is implicit, so every dims below leaves it out.
        f"max_batch_size: {max_batch}",
        "version_policy: { latest: { num_versions: 1 } }",
        "input [",
        "  {",
        f"    name: {_string(image['name'])}",
        f"    data_type: {_data_type(image)}",
        "    format: FORMAT_NCHW",
        f"    dims: {_list(image_dims)}",
        "  }",
        "]",
        "output [",
        "  {",
        f"    name: {_string(logits['name'])}",
        f"    data_type: {_data_type(logits)}",
        f"    dims: {_list(_dims(logits))}",
        f"    label_filename: {_string(LABELS_FILE)}",
        "  },",
        "  {",
        f"    name: {_string(embedding['name'])}",
        f"    data_type: {_data_type(embedding)}",
        f"    dims: {_list(_dims(embedding))}",
        "  }",
        "]",
        # Like the service's batcher: a batch closes at max_batch_size images or after the delay.
        "dynamic_batching {",
        f"  preferred_batch_size: {_list([max_batch])}",
        f"  max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US}",
        "}",
        # Ready only once warm, as the service's /readyz: the smallest and the largest batch.
        "model_warmup [",
    ]
    sizes = sorted({1, max_batch})
    for i, size in enumerate(sizes):
        lines += [
            "  {",
            f'    name: "zeros_batch_{size}"',
            f"    batch_size: {size}",
            "    inputs {",
            f"      key: {_string(image['name'])}",
            f"      value: {{ data_type: {_data_type(image)} dims: {_list(image_dims)} "
            "zero_data: true }",
            "    }",
            "  }" + ("," if i < len(sizes) - 1 else ""),
        ]
    lines += [
        "]",
        "# No instance_group: Triton then runs one instance on each visible GPU, or one on the CPU",
        "# when there is none. KIND_GPU would fail to load on a CPU-only host.",
    ]
    return "\n".join(lines) + "\n"


def render_labels(labels: Sequence[str]) -> str:
    """labels.txt: line i names class i, which is how Triton's classification extension reads it."""
    for label in labels:
        if "\n" in label or "\r" in label:
            raise TritonConfigError(f"label {label!r} has a line break; labels.txt is one per line")
    return "".join(f"{label}\n" for label in labels)


def write_model_config(repo: Path, name: str) -> Path:
    """(Re)write REPO/name/{config.pbtxt, labels.txt} from the highest version's metadata.

    Each file is replaced atomically and only when its content changes: Triton's polling mode
    reloads a model whose files were touched.
    """
    versions = repository.versions(repo, name)
    if not versions:
        raise TritonConfigError(f"{repo / name} has no version to describe")
    metadata = repository.read_metadata(repo / name / str(versions[-1])).model_dump(mode="json")
    classes = _dims(metadata["outputs"]["logits"])[-1]
    if len(metadata["labels"]) != classes:
        raise TritonConfigError(f"{len(metadata['labels'])} labels for {classes} classes")
    config = render_config(metadata)
    labels = render_labels(metadata["labels"])
    model_dir = repo / name
    changed = [
        _replace_if_changed(model_dir / CONFIG_FILE, config),
        _replace_if_changed(model_dir / LABELS_FILE, labels),
    ]
    if any(changed):
        repository.fsync_path(model_dir)
    return model_dir / CONFIG_FILE


def _dims(tensor: Mapping[str, Any]) -> list[int]:
    """The shape without its batch axis, which must be dynamic for Triton to batch."""
    shape = list(tensor["shape"])
    if not shape or shape[0] is not None:
        raise TritonConfigError(f"{tensor['name']}: shape {shape} has no dynamic batch axis")
    dims = shape[1:]
    if not all(isinstance(d, int) and d > 0 for d in dims):
        raise TritonConfigError(f"{tensor['name']}: dims {dims} must be positive integers")
    return dims


def _data_type(tensor: Mapping[str, Any]) -> str:
    try:
        return DATA_TYPES[tensor["dtype"]]
    except KeyError:
        raise TritonConfigError(
            f"{tensor['name']}: no Triton type for {tensor['dtype']!r}"
        ) from None


def _string(text: str) -> str:
    if any(ord(c) < 0x20 for c in text):
        raise TritonConfigError(f"{text!r} has control characters")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _list(values: Sequence[int]) -> str:
    return "[ " + ", ".join(str(v) for v in values) + " ]"


def _replace_if_changed(path: Path, text: str) -> bool:
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except FileNotFoundError:
        pass
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise repository.RepositoryError(f"cannot write {path}: {exc}") from exc
        raise
    return True
