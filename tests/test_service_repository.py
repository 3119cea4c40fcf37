"""Repository scanning and engine checks, on tiny hand-made graphs (no torch, no export)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from contract import repository
from contract.preprocessing import CIFAR
from contract.repository import ModelMetadata, RepositoryError, scan_repository
from runtime.engines import CPU, EngineConfig, EngineError, warm
from runtime.engines.onnxruntime_engine import OrtEngine

from .conftest import ROOT
from .support.graphs import tiny_graph
from .support.service import write_tiny_model


def test_highest_version_of_each_model(tmp_path: Path) -> None:
    write_tiny_model(tmp_path, "a", 1)
    write_tiny_model(tmp_path, "a", 10)
    write_tiny_model(tmp_path, "a", 2)
    write_tiny_model(tmp_path, "b", 3, num_classes=7)
    (tmp_path / "a" / ".tmp-export").mkdir()
    (tmp_path / "a" / "latest").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "README.txt").write_text("not a model")

    entries = scan_repository(tmp_path)

    assert sorted(entries) == ["a", "b"]
    assert entries["a"].version == 10
    assert entries["b"].num_classes == 7
    assert entries["b"].labels[6] == "class6"
    assert entries["a"].input_shape == (3, 8, 8)
    assert entries["a"].preprocessing.crop == 8


def test_empty_repository_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="holds no models"):
        scan_repository(tmp_path)


def _edit_metadata(directory: Path, **changes: object) -> None:
    path = directory / "metadata.json"
    metadata = json.loads(path.read_text())
    metadata.update(changes)
    path.write_text(json.dumps(metadata))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"format_version": 2}, "format_version"),
        ({"name": "other"}, "not the directory"),
        ({"parity": {"passed": False}}, "parity"),
        ({"labels": ["just one"]}, "1 labels for 4 classes"),
        ({"model_file": "../../etc/passwd"}, "plain file name"),
        ({"model_file": "missing.onnx"}, "missing"),
        ({"model_sha256": "0" * 64}, "model_sha256"),
        ({"preprocessing": {"resize_shorter": 4, "crop": 8}}, "crop"),
        ({"outputs": {}}, "missing field"),
    ],
)
def test_bad_metadata_is_refused_with_the_reason(
    tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    _edit_metadata(write_tiny_model(tmp_path, "m", 1), **changes)
    with pytest.raises(RepositoryError, match=message):
        scan_repository(tmp_path)


def test_engine_runs_and_checks_the_graph(tmp_path: Path) -> None:
    write_tiny_model(tmp_path)
    entry = scan_repository(tmp_path)["tiny"]
    config = EngineConfig(providers=(CPU,), intra_op_threads=1)
    names = [entry.logits_name, entry.embedding_name]
    engine = OrtEngine(
        entry.model_file, config, input_name="images", output_names=names, input_shape=(3, 8, 8)
    )
    batch = np.random.default_rng(0).normal(size=(5, 3, 8, 8)).astype(np.float32)
    logits, embedding = engine.run(batch)
    assert engine.provider == CPU and not engine.io_binding
    assert logits.shape == (5, 4) and embedding.shape == (5, 3)
    np.testing.assert_allclose(embedding, batch.mean(axis=(2, 3)), atol=1e-6)
    assert warm(engine, [1, 3], (3, 8, 8)) == [1, 3]

    # The IO-binding path (what CUDA uses) gives the same answers when bound to the CPU.
    bound = OrtEngine(
        entry.model_file,
        config,
        input_name="images",
        output_names=names,
        input_shape=(3, 8, 8),
        io_binding=True,
    )
    for ours, theirs in zip(bound.run(batch), (logits, embedding), strict=True):
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_name": "pixels"}, "single input"),
        ({"output_names": ["logits", "features"]}, "not in the graph"),
        ({"input_shape": (3, 16, 16)}, "does not fit"),
    ],
)
def test_engine_refuses_a_graph_that_does_not_match_its_metadata(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    path = write_tiny_model(tmp_path) / "model.onnx"
    arguments: dict[str, object] = {
        "input_name": "images",
        "output_names": ["logits", "embedding"],
        "input_shape": (3, 8, 8),
    }
    arguments.update(kwargs)
    with pytest.raises(EngineError, match=message):
        OrtEngine(path, EngineConfig(providers=(CPU,)), **arguments)  # type: ignore[arg-type]


def test_engine_refuses_a_frozen_batch_dimension(tmp_path: Path) -> None:
    path = write_tiny_model(tmp_path, dynamic=False) / "model.onnx"
    with pytest.raises(EngineError, match="fixed at 1"):
        OrtEngine(
            path,
            EngineConfig(providers=(CPU,)),
            input_name="images",
            output_names=["logits", "embedding"],
            input_shape=(3, 8, 8),
        )


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available here"
)
def test_requiring_cuda_without_it_fails_loudly(tmp_path: Path) -> None:
    path = write_tiny_model(tmp_path) / "model.onnx"
    with pytest.raises(EngineError, match="CUDA is required"):
        OrtEngine(
            path,
            EngineConfig(require_cuda=True),
            input_name="images",
            output_names=["logits", "embedding"],
            input_shape=(3, 8, 8),
        )


def test_only_positive_ascii_integer_directories_are_versions(tmp_path: Path) -> None:
    for name in ("1", "3", "0", "²", "x", ".tmp-1"):
        (tmp_path / "m" / name).mkdir(parents=True)
    (tmp_path / "m" / "5").write_text("a file, not a version")
    assert repository.versions(tmp_path, "m") == [1, 3]
    assert repository.versions(tmp_path, "absent") == []


def test_a_failed_write_never_deletes_a_version_published_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two exporters race for the same new model directory: the one that loses (its version was
    published by the other first) cleans up only its own files. The race is forced by running
    the other writer's complete write from inside the first one's first fsync."""
    source = write_tiny_model(tmp_path / "source", "m")
    metadata = repository.read_metadata(source)
    repo = tmp_path / "repo"
    real_fsync = repository.fsync_path
    raced: list[Path] = []

    def fsync_after_the_other_writer(path: Path) -> None:
        monkeypatch.setattr(repository, "fsync_path", real_fsync)  # the other writer: plain
        raced.append(repository.write_version(repo, metadata, source / "model.onnx"))
        real_fsync(path)

    monkeypatch.setattr(repository, "fsync_path", fsync_after_the_other_writer)
    with pytest.raises(RepositoryError, match="cannot write"):
        repository.write_version(repo, metadata, source / "model.onnx")
    assert raced == [repo / "m" / "1"]
    assert repository.load_entry(repo / "m" / "1").metadata == metadata
    assert sorted(p.name for p in (repo / "m").iterdir()) == ["1"]  # no temporary left


# Written by `python -m export cifar_resnet20 --weights random:0 --max-batch-size 2` at 9cf61d6,
# the exporter before `ModelMetadata` existed (its graph is not kept: 1.2 MB).
PRE_CONTRACT_METADATA = Path(__file__).parent / "fixtures" / "metadata-v1-9cf61d6.json"


def test_metadata_written_before_the_typed_contract_still_loads(tmp_path: Path) -> None:
    written = json.loads(PRE_CONTRACT_METADATA.read_text())
    metadata = ModelMetadata.model_validate_json(PRE_CONTRACT_METADATA.read_text())
    assert metadata.model_dump(mode="json", exclude_unset=True) == written  # kept, none changed
    added = set(metadata.model_dump()) - set(written)  # fields added since load as absent
    assert added == {"precision_choice"} and metadata.precision_choice is None
    directory = tmp_path / "cifar_resnet20" / "1"
    directory.mkdir(parents=True)
    graph = tiny_graph(32, 10)
    (directory / "model.onnx").write_bytes(graph)
    written["model_sha256"] = hashlib.sha256(graph).hexdigest()  # the one field that must change
    (directory / "metadata.json").write_text(json.dumps(written))
    entry = scan_repository(tmp_path)["cifar_resnet20"]
    assert (entry.version, entry.num_classes, entry.embedding_dim) == (1, 10, 64)
    assert (entry.verified_max_batch_size, entry.trained, entry.precision) == (2, False, "fp32")
    assert entry.labels[0] == "airplane"
    assert entry.preprocessing == CIFAR


def _documented_example() -> dict[str, Any]:
    """docs/repository.md's metadata.json example, as JSON: `// comments` dropped and the `{...}`
    / `[...]` placeholders emptied."""
    text = (ROOT / "docs" / "repository.md").read_text()
    block = text.split("## metadata.json", 1)[1].split("```json\n", 1)[1].split("```", 1)[0]
    block = re.sub(r"//[^\n]*", "", block)
    block = block.replace("{...}", "{}").replace("[...]", "[]")
    return json.loads(block)


def test_the_documented_metadata_is_the_schema() -> None:
    example = _documented_example()
    schema = ModelMetadata.model_json_schema()
    assert set(example) == set(schema["properties"])  # every field documented, no other
    defs = schema["$defs"]
    assert set(example["preprocessing"]) == set(defs["Preprocessing"]["properties"])
    assert set(example["input"]) == set(defs["TensorSpec"]["properties"])
    assert set(example["weights"]) == set(defs["Weights"]["properties"])
    metadata = ModelMetadata.model_validate(example)  # and the example itself is valid
    assert metadata.preprocessing == CIFAR
