"""Checkpoint loading: the real published CIFAR-10 checkpoints reach their published accuracy;
every known format loads strictly; every mismatch is named; files load with weights_only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    load_checkpoint,
    read_state_dict,
)
from models.registry import get_spec

from .conftest import CIFAR_CHECKPOINT_FILES, CIFAR_CHECKPOINTS, normalize_cifar, require


@pytest.mark.parametrize("depth", sorted(CIFAR_CHECKPOINT_FILES))
def test_real_cifar_checkpoints_reach_published_accuracy(
    depth: int, cifar_test_set: tuple[np.ndarray, np.ndarray]
) -> None:
    file, correct = CIFAR_CHECKPOINT_FILES[depth]
    model = load_checkpoint(get_spec(f"cifar_resnet{depth}"), require(CIFAR_CHECKPOINTS / file))
    assert not model.training
    images, labels = cifar_test_set
    with torch.no_grad():
        predictions = model(torch.from_numpy(normalize_cifar(images))).argmax(1).numpy()
    assert int((predictions == labels).sum()) == correct


def test_akamaster_key_map(resnet20_checkpoint: Path) -> None:
    raw = torch.load(resnet20_checkpoint, map_location="cpu", weights_only=True)
    assert set(raw) == {"state_dict", "best_prec1"}
    assert all(k.startswith("module.") for k in raw["state_dict"])
    state = read_state_dict(resnet20_checkpoint)
    assert "fc.weight" in state and "linear.weight" not in state
    assert not any(k.startswith("module.") for k in state)


def _save(obj: object, path: Path) -> Path:
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "module", "both"])
def test_torchvision_format_and_wrappers_round_trip(tmp_path: Path, wrap: str) -> None:
    torch.manual_seed(1)
    spec = get_spec("resnet18")
    source = spec.build().eval()
    state = source.state_dict()
    if wrap in ("module", "both"):
        state = {f"module.{k}": v for k, v in state.items()}
    obj = {"state_dict": state, "epoch": 3} if wrap in ("state_dict", "both") else state
    model = load_checkpoint(spec, _save(obj, tmp_path / "ckpt.pth"))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))


def test_wrong_architecture_names_missing_keys(resnet20_checkpoint: Path) -> None:
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(get_spec("cifar_resnet32"), resnet20_checkpoint)
    assert "layer1.3.conv1.weight" in info.value.missing
    assert not info.value.unexpected and not info.value.mismatched
    assert "missing keys [layer1.3.conv1.weight" in str(info.value)


def test_wrong_shapes_and_unexpected_keys_are_named(tmp_path: Path) -> None:
    spec = get_spec("cifar_resnet20")
    state = spec.build().state_dict()
    state["fc.weight"] = torch.zeros(100, 64)
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(spec, _save(state, tmp_path / "bad.pth"))
    assert info.value.mismatched == [("fc.weight", (100, 64), (10, 64))]
    assert info.value.unexpected == ["extra.weight"]
    assert "fc.weight: checkpoint [100, 64] vs model [10, 64]" in str(info.value)


def test_truncated_and_missing_files(tmp_path: Path, resnet20_checkpoint: Path) -> None:
    truncated = tmp_path / "truncated.th"
    truncated.write_bytes(resnet20_checkpoint.read_bytes()[:50_000])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_state_dict(truncated)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "nope.pth")


def test_non_tensor_entries_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not tensors"):
        read_state_dict(_save({"a": torch.zeros(1), "b": 3}, tmp_path / "x.pth"))
