"""Export: real checkpoints keep their accuracy in onnxruntime, every family passes parity with a
report, failures exit non-zero and leave nothing behind, the batch axis is really dynamic."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from contract.hashing import sha256_file
from export.exporter import ExportError, ExportRequest, export_model
from export.parity import Tolerances
from models.checkpoint import load_checkpoint
from models.registry import CIFAR10_CLASSES, complexity, get_spec
from runtime.engines import EngineConfig
from runtime.engines.onnxruntime_engine import create_session

from .conftest import CIFAR_CHECKPOINTS, CIFAR_TEST, normalize_cifar, require
from .support.service import run_module


def run_export(*args: str) -> subprocess.CompletedProcess[str]:
    return run_module("export", *args, timeout_s=300)


@pytest.fixture(scope="module")
def resnet20_repo(tmp_path_factory: pytest.TempPathFactory, resnet20_checkpoint: Path) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    result = run_export(
        "cifar_resnet20",
        "--weights",
        str(resnet20_checkpoint),
        "--out",
        str(repo),
        "--calibration-images",
        str(require(CIFAR_TEST)),
        "--calibration-limit",
        "256",
    )
    assert result.returncode == 0, result.stderr
    assert "cifar_resnet20 v1" in result.stdout
    return repo


def test_real_checkpoint_keeps_its_accuracy_in_onnxruntime(
    resnet20_repo: Path, resnet20_checkpoint: Path, cifar_test_set: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = cifar_test_set
    x = normalize_cifar(images)
    session = create_session(resnet20_repo / "cifar_resnet20" / "1" / "model.onnx", EngineConfig())
    ort_logits = np.concatenate(
        [session.run(["logits"], {"images": x[i : i + 100]})[0] for i in range(0, len(x), 100)]
    )
    model = load_checkpoint(get_spec("cifar_resnet20"), resnet20_checkpoint)
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x)).numpy()
    assert int((ort_logits.argmax(1) == labels).sum()) == 1813
    assert np.array_equal(ort_logits.argmax(1), torch_logits.argmax(1))
    assert np.abs(ort_logits - torch_logits).max() < 1e-4


def test_metadata_contract(resnet20_repo: Path, resnet20_checkpoint: Path) -> None:
    version_dir = resnet20_repo / "cifar_resnet20" / "1"
    assert sorted(p.name for p in version_dir.iterdir()) == ["metadata.json", "model.onnx"]
    meta = json.loads((version_dir / "metadata.json").read_text())
    assert meta["name"] == "cifar_resnet20"
    assert meta["version"] == 1
    assert meta["arch"] == "cifar_resnet20"
    assert (meta["family"], meta["depth"], meta["shortcut"]) == ("cifar", 20, "A")
    assert meta["input"] == {"name": "images", "shape": [None, 3, 32, 32], "dtype": "float32"}
    assert meta["outputs"]["logits"]["shape"] == [None, 10]
    assert meta["outputs"]["embedding"]["shape"] == [None, 64]
    assert meta["labels"] == list(CIFAR10_CLASSES)
    assert meta["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    assert meta["preprocessing"]["crop"] == 32
    assert meta["weights"] == {
        "source": str(resnet20_checkpoint),
        "sha256": sha256_file(resnet20_checkpoint),
        "trained": True,
    }
    assert meta["model_sha256"] == sha256_file(version_dir / "model.onnx")
    assert (meta["params"], meta["macs"]) == (269_722, complexity(get_spec("cifar_resnet20"))[1])
    assert meta["export"]["opset"] == 18
    assert meta["export"]["torch"].startswith("2.13")
    parity = meta["parity"]
    assert parity["passed"] is True
    assert parity["batch_sizes"] == [1, 7, 32]
    assert parity["tolerances"]["atol"] == 1e-4
    cases = {(r["inputs"].split(":")[0], r["batch_size"]) for r in parity["results"]}
    assert cases == {("random", 1), ("random", 7), ("random", 32), ("images", 32)}
    real = next(r for r in parity["results"] if r["inputs"].startswith("images"))
    assert real["top1_agreement"] == 1.0
    assert real["ties"] == 0
    assert real["logits"]["max_abs"] < 1e-4
    graph = onnx.load(str(version_dir / "model.onnx"))
    assert {o.name for o in graph.graph.output} == {"logits", "embedding"}


def test_dynamic_batch_at_sizes_never_seen_in_export(resnet20_repo: Path) -> None:
    session = create_session(resnet20_repo / "cifar_resnet20" / "1" / "model.onnx", EngineConfig())
    reference = load_checkpoint(
        get_spec("cifar_resnet20"), CIFAR_CHECKPOINTS / "resnet20-12fca82f.th"
    )
    rng = np.random.default_rng(5)
    for size in (2, 13, 50):
        x = rng.standard_normal((size, 3, 32, 32), dtype=np.float32)
        logits, embedding = session.run(["logits", "embedding"], {"images": x})
        with torch.no_grad():
            ref_logits, ref_embedding = reference.forward_with_embedding(torch.from_numpy(x))
        assert logits.shape == (size, 10)
        assert embedding.shape == (size, 64)
        np.testing.assert_allclose(logits, ref_logits.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(embedding, ref_embedding.numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("arch", "max_batch"),
    [
        ("cifar_resnet20_b", 8),  # basic, option B
        ("cifar_resnet20_c", 8),  # option C
        ("cifar_plain20", 8),  # plain
        ("cifar_preact_resnet110", 8),  # pre-activation, basic
        ("resnet18", 4),  # ImageNet basic
        ("resnet50", 2),  # ImageNet bottleneck
    ],
)
def test_parity_report_for_every_family(tmp_path: Path, arch: str, max_batch: int) -> None:
    result = export_model(
        ExportRequest(arch=arch, weights="random:1", out=tmp_path, max_batch_size=max_batch)
    )
    meta = json.loads((result.path / "metadata.json").read_text())
    assert meta["weights"]["trained"] is False
    assert meta["weights"]["source"] == "random:1"
    parity = meta["parity"]
    assert parity["passed"] is True
    assert parity["batch_sizes"] == sorted({1, min(7, max_batch), max_batch})
    assert parity["noise_floor"]["logits"] >= 0
    for row in parity["results"]:
        assert row["logits"]["max_abs"] <= row["logits"]["tolerance"]
        assert row["min_cosine"] >= 0.99999
        assert row["top1_agreement_decisive"] == 1.0
    assert meta["max_batch_size"] == max_batch


def _assert_nothing_left(repo: Path) -> None:
    assert not repo.exists() or not any(repo.iterdir()), list(repo.rglob("*"))


def _one_line_failure(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("export failed: ")
    return lines[0]


def test_checkpoint_with_wrong_shapes_fails_cleanly(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    line = _one_line_failure(
        run_export(
            "cifar_resnet20_c",
            "--weights",
            str(require(CIFAR_CHECKPOINTS / "resnet20-12fca82f.th")),
            "--out",
            str(repo),
        )
    )
    assert "missing keys" in line
    assert "downsample" in line
    _assert_nothing_left(repo)


def test_truncated_checkpoint_fails_cleanly(tmp_path: Path, resnet20_checkpoint: Path) -> None:
    truncated = tmp_path / "resnet20.th"
    truncated.write_bytes(resnet20_checkpoint.read_bytes()[:4096])
    repo = tmp_path / "repo"
    line = _one_line_failure(
        run_export("cifar_resnet20", "--weights", str(truncated), "--out", str(repo))
    )
    assert "cannot read checkpoint" in line
    _assert_nothing_left(repo)


def test_parity_failure_fails_cleanly(tmp_path: Path, resnet20_checkpoint: Path) -> None:
    """Zero tolerance: onnxruntime's fused kernels never match PyTorch bit for bit."""
    repo = tmp_path / "repo"
    line = _one_line_failure(
        run_export(
            "cifar_resnet20",
            "--weights",
            str(resnet20_checkpoint),
            "--out",
            str(repo),
            *("--atol", "0", "--rtol", "0", "--noise-factor", "0"),
        )
    )
    assert line.startswith("export failed: parity failed: random:0 batch 1: logits max_abs")
    _assert_nothing_left(repo)


def test_versions_are_never_overwritten(tmp_path: Path) -> None:
    request = ExportRequest(arch="cifar_resnet20", weights="random:3", out=tmp_path, version=4)
    first = export_model(request)
    digest = sha256_file(first.path / "model.onnx")
    with pytest.raises(ExportError, match="already exists"):
        export_model(request)
    assert sha256_file(first.path / "model.onnx") == digest
    skipped = export_model(
        ExportRequest(
            arch="cifar_resnet20", weights="random:3", out=tmp_path, skip_if_same_weights=True
        )
    )
    assert skipped.skipped
    assert skipped.version == 4
    second = export_model(ExportRequest(arch="cifar_resnet20", weights="random:4", out=tmp_path))
    assert second.version == 5
    versions = sorted(p.name for p in (tmp_path / "cifar_resnet20").iterdir() if p.is_dir())
    assert versions == ["4", "5"]


def test_labels_and_num_classes(tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nbird\n")
    result = run_export(
        "cifar_resnet20",
        *("--weights", "random:0", "--out", str(tmp_path / "repo"), "--name", "pets"),
        *("--num-classes", "3", "--labels", str(labels), "--max-batch-size", "4"),
    )
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "repo" / "pets" / "1" / "metadata.json").read_text())
    assert meta["labels"] == ["cat", "dog", "bird"]
    assert meta["num_classes"] == 3
    bad = run_export(
        "cifar_resnet20",
        *("--weights", "random:0", "--out", str(tmp_path / "repo2"), "--labels", str(labels)),
    )
    assert "3 labels given for 10 classes" in _one_line_failure(bad)
    _assert_nothing_left(tmp_path / "repo2")


def test_preset_uses_checkpoints_where_found_and_says_which(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    args = (
        "--preset",
        "cifar",
        "--weights-dir",
        str(require(CIFAR_CHECKPOINTS)),
        "--out",
        str(repo),
    )
    result = run_export(*args)
    assert result.returncode == 0, result.stderr
    assert "cifar_resnet20: checkpoint" in result.stdout
    assert "cifar_resnet110: random weights (untrained)" in result.stdout
    trained = {
        p.parent.name: json.loads((p / "metadata.json").read_text())["weights"]["trained"]
        for p in repo.glob("*/1")
    }
    assert trained == {
        "cifar_resnet20": True,
        "cifar_resnet32": True,
        "cifar_resnet44": True,
        "cifar_resnet56": True,
        "cifar_resnet110": False,
    }
    again = run_export(*args)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("already present with the same weights, skipped") == 5
    assert not list(repo.glob("*/2"))


def test_cli_usage_errors() -> None:
    result = run_export("--out", "x")
    assert result.returncode == 2
    assert "give ARCH (with or without --weights), --preset or --archs" in result.stderr
    both = run_export("--preset", "cifar", "--archs", "cifar_resnet20", "--out", "x")
    assert both.returncode == 2 and "give --preset or --archs, not both" in both.stderr
    unknown = run_export("resnet19", "--weights", "random", "--out", "x")
    assert "unknown architecture 'resnet19'" in _one_line_failure(unknown)


def test_skip_existing_keeps_a_version_only_if_everything_asked_is_the_same(
    tmp_path: Path,
) -> None:
    def request(**changes: object) -> ExportRequest:
        asked: dict[str, object] = {"max_batch_size": 4, **changes}
        return ExportRequest(
            arch="cifar_resnet20",
            weights="random:3",
            out=tmp_path,
            skip_if_same_weights=True,
            **asked,  # type: ignore[arg-type]
        )

    first = export_model(request())
    assert not first.skipped
    assert export_model(request()).skipped
    labels = [f"thing_{i}" for i in range(10)]
    changes: list[dict[str, object]] = [
        {"max_batch_size": 8},
        {"labels": labels},
        {"tolerances": Tolerances(atol=2e-4)},
    ]
    versions = [first.version]
    for change in changes:
        result = export_model(request(**change))
        assert not result.skipped, change
        versions.append(result.version)
        assert export_model(request(**change)).skipped, change  # now it is there
    assert versions == [1, 2, 3, 4]
    assert (
        json.loads((tmp_path / "cifar_resnet20" / "3" / "metadata.json").read_text())["labels"]
        == labels
    )
