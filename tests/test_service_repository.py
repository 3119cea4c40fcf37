"""Repository scanning and engine checks, on tiny hand-made graphs (no torch, no export)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from service.engine import CPU, Engine, EngineConfig, EngineError, warm
from service.repository import RepositoryError, scan_repository

from .service_helpers import write_tiny_model


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
    engine = Engine(
        entry.model_file, config, input_name="images", output_names=names, input_shape=(3, 8, 8)
    )
    batch = np.random.default_rng(0).normal(size=(5, 3, 8, 8)).astype(np.float32)
    logits, embedding = engine.run(batch)
    assert engine.provider == CPU and not engine.io_binding
    assert logits.shape == (5, 4) and embedding.shape == (5, 3)
    np.testing.assert_allclose(embedding, batch.mean(axis=(2, 3)), atol=1e-6)
    assert warm(engine, [1, 3], (3, 8, 8)) == [1, 3]

    # The IO-binding path (what CUDA uses) gives the same answers when bound to the CPU.
    bound = Engine(
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
        Engine(path, EngineConfig(providers=(CPU,)), **arguments)  # type: ignore[arg-type]


def test_engine_refuses_a_frozen_batch_dimension(tmp_path: Path) -> None:
    path = write_tiny_model(tmp_path, dynamic=False) / "model.onnx"
    with pytest.raises(EngineError, match="fixed at 1"):
        Engine(
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
        Engine(
            path,
            EngineConfig(require_cuda=True),
            input_name="images",
            output_names=["logits", "embedding"],
            input_shape=(3, 8, 8),
        )


def test_exporter_and_service_agree_on_which_directories_are_versions(tmp_path: Path) -> None:
    from export import repository as export_repository
    from service.repository import version_numbers

    for name in ("1", "3", "0", "²", "x", ".tmp-1"):
        (tmp_path / "m" / name).mkdir(parents=True)
    (tmp_path / "m" / "5").write_text("a file, not a version")
    assert version_numbers(tmp_path / "m") == [1, 3]
    assert export_repository.versions(tmp_path, "m") == [1, 3]
    assert export_repository.versions(tmp_path, "absent") == []
