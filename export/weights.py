"""Where the weights come from: a checkpoint file, official pretrained weights, or a seeded
random initialization (explicitly untrained, for latency work)."""

from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch

from contract.hashing import sha256_file
from models.checkpoint import WeightsUnavailableError, fetch_pretrained, load_checkpoint
from models.registry import ArchSpec
from models.resnet import ResNet

from .settings import ExportSettings

RANDOM = re.compile(r"^random(?::(\d+))?$")
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".th", ".ckpt", ".bin")


@dataclass(frozen=True)
class WeightsInfo:
    source: str
    sha256: str
    trained: bool

    def to_dict(self) -> dict[str, object]:
        return {"source": self.source, "sha256": self.sha256, "trained": self.trained}


def state_dict_sha256(model: ResNet) -> str:
    """A content hash of a state dict, independent of how it was serialized."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def calibrate_batchnorm(
    model: ResNet, input_size: tuple[int, int, int], seed: int, batch: int = 4
) -> ResNet:
    """Give a randomly initialized net realistic BatchNorm statistics.

    Fresh BatchNorm layers are identities in eval mode (mean 0, variance 1), so the residual
    stream of an untrained deep net grows block after block: ResNet-152's logits reach ~1e8,
    which makes latency figures fine but parity figures meaningless. One pass over seeded
    random inputs in training mode sets every running mean and variance to the statistics that
    layer actually sees, as trained weights would have them.
    """
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch, *input_size, generator=generator)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration pass
    model.train()
    with torch.no_grad():
        model(inputs)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 0.1
    return model.eval()


class Pretrained(StrEnum):
    """What to do where no checkpoint is given: official weights, or seeded random ones."""

    AUTO = "auto"  # official weights; random with a warning when they cannot be downloaded
    REQUIRE = "require"  # official weights or fail: trained models only
    NEVER = "never"  # random weights, no download


def resolve_weights(
    spec: ArchSpec,
    weights_dir: Path,
    pretrained: Pretrained,
    seed: int,
    *,
    mirror: str | None = None,
) -> str:
    """The weights source for `spec` when the user named none: a checkpoint in `weights_dir`,
    else the official weights (downloaded and hash-checked now, so that a fallback is decided
    here), else `random:SEED`. Raises CheckpointError when `pretrained` is REQUIRE and no
    trained weights can be had."""
    checkpoint = find_checkpoint(spec, weights_dir)
    if checkpoint:
        return str(checkpoint)
    keyword = next(iter(spec.pretrained), None)
    if pretrained is Pretrained.REQUIRE and keyword is None:
        raise WeightsUnavailableError(
            f"{spec.name}: no checkpoint in {weights_dir} and no official weights exist, "
            "but --pretrained require asks for trained weights"
        )
    if pretrained is Pretrained.NEVER or keyword is None:
        return f"random:{seed}"
    try:
        fetch_pretrained(spec, keyword, mirror=mirror, **_cache())
    except WeightsUnavailableError as exc:
        if pretrained is Pretrained.REQUIRE:
            raise
        print(
            f"WARNING: {spec.name}: official {keyword} weights unavailable ({exc}); exporting "
            f'seeded random weights random:{seed}, UNTRAINED ("trained": false); '
            "--pretrained require fails instead",
            file=sys.stderr,
            flush=True,
        )
        return f"random:{seed}"
    return keyword


def load_model(
    spec: ArchSpec, source: str, *, mirror: str | None = None
) -> tuple[ResNet, WeightsInfo]:
    """The eval-mode model for `source` and a description of its weights for metadata."""
    match = RANDOM.match(source)
    if match:
        seed = int(match.group(1) or 0)
        torch.manual_seed(seed)
        model = calibrate_batchnorm(spec.build(), spec.input_size, seed)
        return model, WeightsInfo(f"random:{seed}", state_dict_sha256(model), trained=False)
    if source in spec.pretrained:
        path = fetch_pretrained(spec, source, mirror=mirror, **_cache())
        model = load_checkpoint(spec, path)
        return model, WeightsInfo(source, sha256_file(path), trained=True)
    path = Path(source)
    model = load_checkpoint(spec, path)
    return model, WeightsInfo(str(path), sha256_file(path), trained=True)


def _cache() -> dict[str, Any]:
    """Where official weights are cached and whether they may be downloaded (the environment:
    RESNET_SERVE_CACHE, RESNET_SERVE_OFFLINE)."""
    settings = ExportSettings()
    return {"cache_dir": settings.weights_cache, "offline": settings.offline}


def find_checkpoint(spec: ArchSpec, weights_dir: Path) -> Path | None:
    """A checkpoint for `spec` in `weights_dir`, by file name.

    `<arch>[-<hex>].<ext>` matches (torchvision's `resnet18-f37072fd.pth`); CIFAR architectures
    also match `resnet<depth>[-<hex>].<ext>` (the published `resnet20-12fca82f.th`): CIFAR depths
    (6n+2) never collide with the ImageNet ones.
    """
    if not weights_dir.is_dir():
        return None
    stems = {spec.name}
    if (
        spec.family == "cifar"
        and spec.name.startswith("cifar_resnet")
        and spec.shortcut.value == "A"
    ):
        stems.add(spec.name.removeprefix("cifar_"))
    pattern = re.compile(rf"^({'|'.join(map(re.escape, sorted(stems)))})(-[0-9a-f]+)?$")
    matches = sorted(
        p
        for p in weights_dir.iterdir()
        if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES and pattern.match(p.stem)
    )
    if len(matches) > 1:
        raise ValueError(f"several checkpoints for {spec.name} in {weights_dir}: {matches}")
    return matches[0] if matches else None
