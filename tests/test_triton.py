"""Triton files of an exported model: config.pbtxt parses with Triton's own ModelConfig definition
and agrees with the ONNX graph and metadata.json; labels.txt matches the labels; both follow the
highest version and are rewritten only when they change; our service still reads the repository."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import onnx
import pytest
from google.protobuf import text_format

from contract.repository import scan_repository
from export import triton
from export.exporter import ExportError, ExportRequest, export_model, resolve_labels
from models.registry import get_spec

NAME = "cifar_resnet20"
MAX_BATCH = 8
# ONNX TensorProto element types -> Triton data types, written out independently of export.triton.
ONNX_TO_TRITON = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16"}


def load_model_config_pb2() -> ModuleType:
    """Triton's generated `model_config_pb2`, shipped in tritonclient.

    `tritonclient.grpc` refuses to import without grpcio (its [grpc] extra, which also pins
    protobuf < 7 against onnx's protobuf 7), yet the generated module needs only protobuf: load
    that file by path when the package import fails.
    """
    pytest.importorskip("tritonclient", reason="tritonclient (a dev dependency) is not installed")
    try:
        from tritonclient.grpc import model_config_pb2
    except (ImportError, RuntimeError):
        spec = importlib.util.find_spec("tritonclient")
        assert spec is not None and spec.submodule_search_locations
        path = Path(spec.submodule_search_locations[0]) / "grpc" / "model_config_pb2.py"
        file_spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
        assert file_spec is not None and file_spec.loader is not None
        model_config_pb2 = importlib.util.module_from_spec(file_spec)
        file_spec.loader.exec_module(model_config_pb2)
    return model_config_pb2


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("repo")
    export_model(ExportRequest(arch=NAME, weights="random:0", out=out, max_batch_size=MAX_BATCH))
    return out


@pytest.fixture(scope="module")
def config(repo: Path) -> Any:
    pb2 = load_model_config_pb2()
    return text_format.Parse((repo / NAME / "config.pbtxt").read_text(), pb2.ModelConfig())


def metadata(repo: Path, version: int = 1) -> dict[str, Any]:
    return json.loads((repo / NAME / str(version) / "metadata.json").read_text())


def graph_signature(path: Path) -> dict[str, tuple[str, list[int]]]:
    """{tensor name: (Triton type, dims without the batch axis)} of the graph's inputs and outputs;
    the batch axis must be symbolic, or Triton could not batch."""
    graph = onnx.load(path, load_external_data=False).graph
    signature = {}
    for value in [*graph.input, *graph.output]:
        tensor = value.type.tensor_type
        batch, *rest = tensor.shape.dim
        assert batch.dim_param and not batch.dim_value, f"{value.name}: fixed batch axis"
        signature[value.name] = (ONNX_TO_TRITON[tensor.elem_type], [d.dim_value for d in rest])
    return signature


def test_config_matches_the_onnx_graph(repo: Path, config: Any) -> None:
    meta = metadata(repo)
    graph = repo / NAME / "1" / config.default_model_filename
    assert graph.is_file()
    pb2 = load_model_config_pb2()
    described = {
        t.name: (pb2.DataType.Name(t.data_type), list(t.dims))
        for t in [*config.input, *config.output]
    }
    assert described == graph_signature(graph)
    assert [t.name for t in config.input] == [meta["input"]["name"]]
    assert [t.name for t in config.output] == [o["name"] for o in meta["outputs"].values()]


def test_config_matches_metadata(repo: Path, config: Any) -> None:
    meta = metadata(repo)
    assert config.name == NAME == meta["name"]
    assert config.platform == "onnxruntime_onnx"
    assert config.backend == "onnxruntime"
    assert config.max_batch_size == meta["max_batch_size"] == MAX_BATCH
    assert config.version_policy.latest.num_versions == 1
    batching = config.dynamic_batching
    assert list(batching.preferred_batch_size) == [MAX_BATCH]
    assert 0 < batching.max_queue_delay_microseconds <= 100_000
    # Omitted on purpose: Triton picks the GPUs it sees, or the CPU (KIND_GPU fails without one).
    assert not config.instance_group
    image = config.input[0]
    assert image.format == load_model_config_pb2().ModelInput.FORMAT_NCHW
    for warmup in config.model_warmup:
        assert 1 <= warmup.batch_size <= config.max_batch_size
        assert list(warmup.inputs[image.name].dims) == list(image.dims)
        assert warmup.inputs[image.name].zero_data
    assert sorted(w.batch_size for w in config.model_warmup) == [1, MAX_BATCH]


def test_labels_file_serves_the_classification_extension(repo: Path, config: Any) -> None:
    logits = next(t for t in config.output if t.name == "logits")
    assert logits.label_filename == triton.LABELS_FILE
    embedding = next(t for t in config.output if t.name == "embedding")
    assert not embedding.label_filename
    lines = (repo / NAME / logits.label_filename).read_text().splitlines()
    assert lines == metadata(repo)["labels"]
    assert len(lines) == logits.dims[0] == 10


def test_the_service_ignores_the_triton_files(repo: Path) -> None:
    entries = scan_repository(repo)
    assert list(entries) == [NAME]
    assert entries[NAME].version == 1


def test_files_follow_the_highest_version_and_change_only_when_needed(
    repo: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy)
    model_dir = copy / NAME
    config_file = model_dir / triton.CONFIG_FILE
    before = config_file.stat()
    triton.write_model_config(copy, NAME)
    assert config_file.stat().st_mtime_ns == before.st_mtime_ns  # unchanged: not touched
    assert config_file.stat().st_ino == before.st_ino

    meta = metadata(copy)
    meta.update(version=3, max_batch_size=4, labels=[f"c{i}" for i in range(5)], num_classes=5)
    meta["outputs"]["logits"]["shape"] = [None, 5]
    shutil.copytree(model_dir / "1", model_dir / "3")
    (model_dir / "3" / "metadata.json").write_text(json.dumps(meta))
    triton.write_model_config(copy, NAME)
    config = text_format.Parse(config_file.read_text(), load_model_config_pb2().ModelConfig())
    assert config.max_batch_size == 4
    assert list(config.output[0].dims) == [5]
    assert (model_dir / triton.LABELS_FILE).read_text() == "c0\nc1\nc2\nc3\nc4\n"
    assert not [p.name for p in model_dir.iterdir() if p.name.startswith(".")]  # no temp files


def test_skipped_export_restores_missing_files(repo: Path, tmp_path: Path) -> None:
    """Repositories exported before the Triton files existed gain them on the next run."""
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy)
    for name in (triton.CONFIG_FILE, triton.LABELS_FILE):
        (copy / NAME / name).unlink()
    result = export_model(
        ExportRequest(
            arch=NAME,
            weights="random:0",
            out=copy,
            max_batch_size=MAX_BATCH,  # what `repo` was exported with, or it is a new version
            skip_if_same_weights=True,
        )
    )
    assert result.skipped
    assert (copy / NAME / triton.CONFIG_FILE).read_text() == (
        repo / NAME / triton.CONFIG_FILE
    ).read_text()
    assert (copy / NAME / triton.LABELS_FILE).is_file()


def test_bad_metadata_is_refused(repo: Path) -> None:
    meta = metadata(repo)
    fixed = json.loads(json.dumps(meta))
    fixed["input"]["shape"] = [8, 3, 32, 32]
    with pytest.raises(triton.TritonConfigError, match="no dynamic batch axis"):
        triton.render_config(fixed)
    odd = json.loads(json.dumps(meta))
    odd["outputs"]["logits"]["dtype"] = "complex64"
    with pytest.raises(triton.TritonConfigError, match="no Triton type"):
        triton.render_config(odd)
    with pytest.raises(triton.TritonConfigError, match="line break"):
        triton.render_labels(["cat", "dog\nbird"])


def test_labels_with_line_breaks_fail_the_export_before_anything_is_written() -> None:
    labels = [f"class {i}" for i in range(9)] + ["two\nlines"]
    with pytest.raises(ExportError, match="line breaks"):
        resolve_labels(get_spec(NAME), labels)
