"""The model repository contract (docs/repository.md), torch-free: `ModelMetadata`, the one typed
object the exporter writes and the service validates, and the repository on disk,
REPO/<name>/<version>/{model.onnx, metadata.json}.

Writes are atomic: everything goes into a hidden temporary directory beside the target, which is
renamed into place only when complete. A reader never sees a half-written version, and a failed
export leaves nothing of its own behind (and never removes anything another writer published).
Reads return the highest version of every model; engines are built by `runtime.engines`. Model
names from requests are looked up in the dict `scan_repository` returns and never used as paths.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .hashing import sha256_file
from .preprocessing import Preprocessing

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
Precision = Literal["fp32", "bf16", "int8", "fp16"]
EngineName = Literal["onnxruntime", "openvino"]


class RepositoryError(ValueError):
    """The repository cannot be written or served as it is: a bad name, an existing version,
    malformed metadata, a missing or altered graph."""


class IncompleteVersionError(RepositoryError):
    """A version directory whose files are not all there yet (no readable metadata.json, no
    graph, or a graph that does not match its digest yet): possibly still being copied in by a
    writer that is not atomic, so worth another look later, unlike a version that is there and
    wrong."""


class TensorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    shape: list[int | None] = Field(description="null for the (dynamic) batch axis")
    dtype: Literal["float32"] = "float32"


class OutputSpecs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    logits: TensorSpec
    embedding: TensorSpec


class Weights(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    source: str = Field(description="a checkpoint path, random:SEED or the official weights")
    sha256: str | None = Field(None, description="of the checkpoint file or of the state dict")
    trained: bool = Field(False, description="false for random weights: predictions mean nothing")


class GateReport(BaseModel):
    """A gate's report (parity, precision gate): `passed` plus its measurements, kept as written."""

    model_config = ConfigDict(extra="allow", frozen=True)

    passed: bool


class HostFacts(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    cpu_model: str
    cpu_flags: list[str] = Field(description="the ISA extensions that decide speed (contract.cpu)")
    cores: int | None = None


class CandidateRecord(BaseModel):
    """A precision/engine `--precision auto` tried: its gate, its speed, or why it did not run."""

    model_config = ConfigDict(extra="allow", frozen=True)

    precision: Precision
    engine: EngineName
    status: Literal["chosen", "passed", "failed_gate", "unavailable", "error"]
    reason: str | None = Field(None, description="why it was not run, or its error")
    gate: GateReport | None = Field(None, description="as precision_gate; null for fp32")
    images_per_s: dict[str, float] | None = Field(None, description="batch size -> images/s")
    score: float | None = Field(None, description="geometric mean of images_per_s")


class PrecisionChoice(BaseModel):
    """What `--precision auto` compared on the exporting host, and what it chose."""

    model_config = ConfigDict(extra="allow", frozen=True)

    mode: Literal["auto"] = "auto"
    host: HostFacts
    batch_sizes: list[int] = Field(description="the batch sizes each candidate was measured at")
    chosen: str = Field(description="PRECISION-ENGINE of the candidate written, e.g. int8-openvino")
    candidates: list[CandidateRecord]


class ModelMetadata(BaseModel):
    """metadata.json, format_version 1. Fields the service needs are required; descriptive ones
    that older or hand-written entries may lack have defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: Literal[1] = FORMAT_VERSION
    name: str = Field(pattern=NAME.pattern)
    version: int = Field(ge=1)
    arch: str = ""
    family: str = Field("", description='"imagenet" | "cifar"')
    depth: int | None = None
    block: str | None = Field(None, description='"basic" | "bottleneck"')
    preact: bool | None = None
    plain: bool | None = None
    shortcut: str | None = Field(None, description='"A" | "B"')
    created_at: str | None = None
    model_file: str = "model.onnx"
    model_sha256: str | None = None
    precision: Precision = "fp32"
    engine: EngineName = Field("onnxruntime", description="openvino: bf16, or int8 from NNCF")
    input: TensorSpec
    outputs: OutputSpecs
    num_classes: int = Field(ge=1)
    embedding_dim: int = Field(ge=1)
    labels: list[str]
    preprocessing: Preprocessing
    weights: Weights
    params: int | None = None
    macs: int | None = None
    max_batch_size: int | None = Field(None, ge=1, description="largest batch parity verified")
    parity: GateReport
    precision_gate: GateReport | None = Field(None, description="bf16/int8/fp16 only")
    precision_choice: PrecisionChoice | None = Field(
        None, description="--precision auto only: every candidate's gate and speed"
    )
    export: dict[str, Any] | None = Field(
        None, description="exporter, opset and the library versions that wrote it"
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        if Path(self.model_file).name != self.model_file or self.model_file in ("", ".", ".."):
            raise ValueError(f"model_file {self.model_file!r} is not a plain file name")
        if not self.model_file.endswith(".onnx"):
            # Serving reads ONNX graphs (protobuf) and nothing else: no pickle, no other format an
            # engine's readers would also accept.
            raise ValueError(f"model_file {self.model_file!r} is not an .onnx graph")
        if len(self.labels) != self.num_classes:
            raise ValueError(f"{len(self.labels)} labels for {self.num_classes} classes")
        return self

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"


def validate_name(name: str) -> str:
    if not NAME.match(name) or name in {".", ".."}:
        raise RepositoryError(
            f"invalid model name {name!r}: use letters, digits, '_', '.', '-' (max 128)"
        )
    return name


def version_numbers(model_dir: Path) -> list[int]:
    """The versions under REPO/<name>, ascending: directories named by a positive integer."""
    if not model_dir.is_dir():
        return []
    return sorted(
        int(d.name)
        for d in model_dir.iterdir()
        if d.is_dir() and d.name.isascii() and d.name.isdigit() and int(d.name) > 0
    )


def versions(repo: Path, name: str) -> list[int]:
    return version_numbers(repo / name)


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a rename is durable only once its directory is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_metadata(version_dir: Path) -> ModelMetadata:
    """A version's metadata.json, validated; RepositoryError naming the entry and the field."""
    where = f"{version_dir.parent.name} version {version_dir.name} ({version_dir})"
    try:
        text = (version_dir / METADATA_FILE).read_text("utf-8")
    except OSError as exc:
        raise IncompleteVersionError(f"{where}: cannot read {METADATA_FILE}: {exc}") from exc
    try:
        return ModelMetadata.model_validate_json(text)
    except ValidationError as exc:
        raise RepositoryError(f"{where}: invalid {METADATA_FILE}: {_problems(exc)}") from None


def _problems(exc: ValidationError) -> str:
    """One line per problem: `field.path: message` (a missing field says "missing field")."""
    problems = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "metadata"
        message = "missing field" if error["type"] == "missing" else error["msg"]
        problems.append(f"{where}: {message}")
    return "; ".join(problems)


def write_version(repo: Path, metadata: ModelMetadata, model_file: Path) -> Path:
    """Copy `model_file` and write `metadata` as REPO/<name>/<version>, atomically."""
    name, version = validate_name(metadata.name), metadata.version
    model_dir = repo / name
    target = model_dir / str(version)
    if target.exists():
        raise RepositoryError(f"{target} already exists; versions are never overwritten")
    created_model_dir = not model_dir.exists()
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / f".tmp-{uuid.uuid4().hex}"
    try:
        tmp.mkdir()
        shutil.copyfile(model_file, tmp / metadata.model_file)
        (tmp / METADATA_FILE).write_text(metadata.to_json(), "utf-8")
        for path in (tmp / metadata.model_file, tmp / METADATA_FILE):
            fsync_path(path)
        os.rename(tmp, target)  # fails if another writer created the version meanwhile
        fsync_path(model_dir)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if created_model_dir:
            # Only if still empty: a concurrent exporter may have published a version there
            # meanwhile, and a finished version is never deleted.
            with contextlib.suppress(OSError):
                os.rmdir(model_dir)
        if isinstance(exc, OSError):
            raise RepositoryError(f"cannot write {target}: {exc}") from exc
        raise
    return target


@dataclass(frozen=True)
class ModelEntry:
    """One servable model version: where its graph is, and its validated metadata."""

    path: Path
    metadata: ModelMetadata

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def version(self) -> int:
        return self.metadata.version

    @property
    def preprocessing(self) -> Preprocessing:
        return self.metadata.preprocessing

    @property
    def input_name(self) -> str:
        return self.metadata.input.name

    @property
    def logits_name(self) -> str:
        return self.metadata.outputs.logits.name

    @property
    def embedding_name(self) -> str:
        return self.metadata.outputs.embedding.name

    @property
    def num_classes(self) -> int:
        return self.metadata.num_classes

    @property
    def embedding_dim(self) -> int:
        return self.metadata.embedding_dim

    @property
    def verified_max_batch_size(self) -> int | None:
        return self.metadata.max_batch_size

    @property
    def engine(self) -> str:
        return self.metadata.engine

    @property
    def precision(self) -> str:
        return self.metadata.precision

    @property
    def trained(self) -> bool:
        return self.metadata.weights.trained

    @functools.cached_property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.metadata.labels)

    @property
    def model_file(self) -> Path:
        return self.path / self.metadata.model_file

    @property
    def input_shape(self) -> tuple[int, int, int]:
        crop = self.preprocessing.crop
        return (3, crop, crop)


def scan_repository(root: Path) -> dict[str, ModelEntry]:
    """{name: entry} for the highest version of each model under `root`."""
    if not root.is_dir():
        raise RepositoryError(f"model repository {root} is not a directory")
    entries: dict[str, ModelEntry] = {}
    for model_dir in sorted(root.iterdir()):
        if model_dir.name.startswith(".") or not model_dir.is_dir():
            continue
        numbers = version_numbers(model_dir)
        if not numbers:
            log.warning("skipping %s: no version directories", model_dir)
            continue
        entries[model_dir.name] = load_entry(model_dir / str(max(numbers)))
    if not entries:
        raise RepositoryError(
            f"model repository {root} holds no models (expected REPO/<name>/<version>/)"
        )
    return entries


def load_entry(version_dir: Path) -> ModelEntry:
    """The metadata validated, then what the files must agree with: its directory, the gate's
    verdict, the graph's presence and digest."""
    name, version = version_dir.parent.name, int(version_dir.name)
    where = f"{name} version {version} ({version_dir})"
    metadata = read_metadata(version_dir)
    if metadata.name != name or metadata.version != version:
        raise RepositoryError(
            f"{where}: metadata names {metadata.name!r} version {metadata.version!r}, "
            "not the directory it is in"
        )
    if not metadata.parity.passed:
        raise RepositoryError(f"{where}: the export's parity check did not pass")
    entry = ModelEntry(version_dir, metadata)
    if not entry.model_file.is_file():
        raise IncompleteVersionError(f"{where}: {entry.model_file.name} is missing")
    if metadata.model_sha256 and sha256_file(entry.model_file) != metadata.model_sha256:
        # Also what a graph still being copied in looks like: worth another look later.
        raise IncompleteVersionError(
            f"{where}: {entry.model_file.name} does not match model_sha256"
        )
    return entry
