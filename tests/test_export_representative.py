"""`--calibration-dir`: which representative images suit which model, and the line printed for
a model that keeps fp32. The `--precision auto` export they lead to runs end to end in the
container test (tests/container/test_calibration.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export.__main__ import build_parser
from export.representative import (
    MIN_IMAGES,
    arguments_for,
    scan,
    select,
    suited_size,
)
from models.registry import get_spec

from .conftest import CIFAR_TEST, require


@pytest.mark.parametrize(
    ("side", "size"), [(32, 32), (64, 32), (84, 32), (86, 224), (140, 224), (375, 224)]
)
def test_an_image_suits_the_input_size_nearest_on_a_log_scale(side: int, size: int) -> None:
    assert suited_size(side) == size


def _images(directory: Path, count: int, size: tuple[int, int], suffix: str = ".png") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(directory / f"{i}{suffix}")


def test_photos_go_to_imagenet_models_and_small_images_to_cifar_models(tmp_path: Path) -> None:
    calibration = tmp_path / "calibration"
    _images(calibration / "photos", MIN_IMAGES, (300, 200), ".jpg")
    _images(calibration / "small", MIN_IMAGES + 1, (32, 32))
    (calibration / "README.md").write_text("not an image")
    (calibration / ".hidden").mkdir()
    _images(calibration / ".hidden", 3, (32, 32))
    sizes = sorted(s.size for s in scan(calibration))
    assert sizes == [32] * (MIN_IMAGES + 1) + [224] * MIN_IMAGES
    staging = tmp_path / "staging"
    imagenet = select(get_spec("resnet18"), calibration, staging)
    cifar = select(get_spec("cifar_resnet20"), calibration, staging)
    assert imagenet is not None and cifar is not None
    assert imagenet.count == MIN_IMAGES and imagenet.labeled is None
    assert len(list(imagenet.images.iterdir())) == MIN_IMAGES
    assert cifar.count == MIN_IMAGES + 1 and cifar.images != imagenet.images


def test_a_labeled_npz_gates_accuracy_for_the_models_with_its_classes(tmp_path: Path) -> None:
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    (calibration / CIFAR_TEST.name).symlink_to(require(CIFAR_TEST))
    chosen = select(get_spec("cifar_resnet20"), calibration, tmp_path / "staging")
    assert chosen is not None
    assert chosen.images == chosen.labeled == calibration / CIFAR_TEST.name
    assert chosen.count == 2000
    assert select(get_spec("resnet18"), calibration, tmp_path / "staging") is None


def test_too_few_images_keep_fp32_with_one_line_saying_what_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    calibration = tmp_path / "calibration"
    _images(calibration, MIN_IMAGES - 1, (32, 32))
    args = build_parser().parse_args(
        ["--archs", "cifar_resnet20", "--out", str(tmp_path), "--calibration-dir", str(calibration)]
    )
    assert arguments_for(args, get_spec("cifar_resnet20")) is args
    assert arguments_for(args, get_spec("resnet18")) is args
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    few = f"only {MIN_IMAGES - 1} images in {calibration}/ suit its 32x32 input"
    assert lines[0].startswith(f"cifar_resnet20: fp32 ({few}); ")
    assert lines[1].startswith(f"resnet18: fp32 (no images in {calibration}/ suit its 224x224")
    for line in lines:
        assert "VNNI" in line or "offers" in line
        assert line.endswith("for the fastest precision that passes the gate")


def test_suited_images_turn_the_export_into_precision_auto_under_the_model_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    calibration = tmp_path / "calibration"
    _images(calibration, MIN_IMAGES, (32, 32))
    args = build_parser().parse_args(
        ["--preset", "cifar", "--out", str(tmp_path), "--calibration-dir", str(calibration)]
    )
    changed = arguments_for(args, get_spec("cifar_resnet20"))
    assert isinstance(changed, argparse.Namespace) and changed is not args
    assert (changed.precision, changed.name) == ("auto", "cifar_resnet20")
    assert changed.calibration_images == changed.gate_images
    assert changed.gate_labeled is None
    assert "cifar_resnet20: --precision auto on 20 images in" in capsys.readouterr().out
    explicit = build_parser().parse_args(
        ["--preset", "cifar", "--out", str(tmp_path), "--precision", "int8"]
    )
    assert arguments_for(explicit, get_spec("cifar_resnet20")) is explicit  # an explicit choice


def test_calibration_dir_usage_errors(tmp_path: Path) -> None:
    from export.__main__ import main

    with pytest.raises(SystemExit) as single:
        main(["cifar_resnet20", "--out", str(tmp_path), "--calibration-dir", str(tmp_path)])
    assert single.value.code == 2
    with pytest.raises(SystemExit) as missing:
        main(["--preset", "cifar", "--out", str(tmp_path), "--calibration-dir", "/nonexistent"])
    assert missing.value.code == 2
