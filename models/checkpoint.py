"""Checkpoint loading: safe (`weights_only=True`), explicit about formats, always strict.

Known sources and their key maps:
- torchvision ImageNet state dicts: keys as they are.
- `{"state_dict": ...}` / `{"model": ...}` wrappers (training scripts), DataParallel `module.`.
- akamaster/pytorch_resnet_cifar10 (the published CIFAR-10 checkpoints): classifier `linear.*`
  becomes `fc.*`, option-B `shortcut.*` becomes `downsample.*`.
A mismatch raises `CheckpointMismatchError` naming the missing, unexpected and wrongly shaped keys.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.hub
from torch import Tensor, nn

from contract.hashing import sha256_file

from .registry import ArchSpec

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
# (pattern, replacement) applied to every key; each source's map is tested on its own.
AKAMASTER_KEY_MAP = (
    (re.compile(r"^linear\."), "fc."),
    (re.compile(r"\.shortcut\."), ".downsample."),
)


class CheckpointError(ValueError):
    """The file is not a loadable checkpoint (corrupt, truncated, wrong format)."""


class CheckpointMismatchError(CheckpointError):
    def __init__(
        self,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
    ) -> None:
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        parts = []
        if missing:
            parts.append(f"missing keys {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_preview(unexpected)}")
        if mismatched:
            shapes = [f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in mismatched]
            parts.append(f"wrong shapes {_preview(shapes)}")
        super().__init__("checkpoint does not match the architecture: " + "; ".join(parts))


def _preview(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}] ({len(items)})"


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a checkpoint file into a flat {key: tensor} dict, unwrapped and de-prefixed."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or truncated files
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {first_line}") from exc
    return normalize_state_dict(obj)


def normalize_state_dict(obj: object) -> dict[str, Tensor]:
    for key in WRAPPER_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError("checkpoint holds no state dict (expected a mapping of tensors)")
    non_tensors = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if non_tensors:
        raise CheckpointError(f"checkpoint entries are not tensors: {_preview(non_tensors)}")
    state = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    if "linear.weight" in state:
        state = {_apply(AKAMASTER_KEY_MAP, k): v for k, v in state.items()}
    return state


def _apply(key_map: tuple[tuple[re.Pattern[str], str], ...], key: str) -> str:
    for pattern, replacement in key_map:
        key = pattern.sub(replacement, key)
    return key


def check_state_dict(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Raise CheckpointMismatchError unless `state` fits `model` exactly.

    BatchNorm's `num_batches_tracked` may be absent (checkpoints from before torch 0.4.1): it is a
    training counter that does not affect inference, and BatchNorm fills it in on load.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        (k, tuple(v.shape), tuple(expected[k].shape))
        for k, v in state.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(missing, unexpected, mismatched)


def load_weights(model: nn.Module, state: Mapping[str, Tensor]) -> nn.Module:
    check_state_dict(model, state)
    model.load_state_dict(dict(state), strict=True)
    return model


def load_checkpoint(spec: ArchSpec, path: str | os.PathLike[str]) -> nn.Module:
    """Build `spec` and load the checkpoint at `path` strictly; returns the model in eval mode."""
    return load_weights(spec.build(), read_state_dict(path)).eval()


class WeightsUnavailableError(CheckpointError):
    """Official weights could not be had (offline, unreachable): the caller may fall back."""


DOWNLOAD_TIMEOUT_S = 60.0


def fetch_pretrained(
    spec: ArchSpec,
    keyword: str,
    *,
    cache_dir: Path,
    offline: bool = False,
    mirror: str | None = None,
) -> Path:
    """Path to the official weights `keyword` for `spec`, downloading them once into the cache.

    The download is torch.hub's (`download_url_to_file` with the hash prefix of the published
    file name): a file whose sha256 does not start with that prefix is refused and nothing is
    written. `mirror` replaces the directory of the published URL (an internal mirror holding
    the same file names). A file already in the cache (or placed there by hand, for air-gapped
    hosts) is verified and used without network. `offline`, or unreachable, it raises
    WeightsUnavailableError. (The exporter reads both from its environment: export/settings.py.)
    """
    try:
        weights = spec.pretrained[keyword]
    except KeyError:
        known = ", ".join(sorted(spec.pretrained)) or "none"
        raise CheckpointError(
            f"{spec.name} has no pretrained weights {keyword!r} (available: {known})"
        ) from None
    file_name = weights.url.rsplit("/", 1)[-1]
    url = f"{mirror.rstrip('/')}/{file_name}" if mirror else weights.url
    target = cache_dir / file_name
    if not target.exists():
        if offline:
            raise WeightsUnavailableError(
                f"{file_name} is not in the cache {cache_dir} and downloads are off "
                "(RESNET_SERVE_OFFLINE); place the file there or pass a checkpoint path"
            )
        _download(url, target, weights.sha256_prefix)
    digest = sha256_file(target)
    if not digest.startswith(weights.sha256_prefix):
        raise CheckpointError(
            f"{target} has sha256 {digest[:16]}..., expected a hash starting with "
            f"{weights.sha256_prefix}; delete it and try again"
        )
    return target


def _download(url: str, target: Path, hash_prefix: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # torch.hub opens the URL without a timeout
    try:
        torch.hub.download_url_to_file(url, str(target), hash_prefix=hash_prefix, progress=False)
    except RuntimeError as exc:  # torch.hub's hash check; its partial file is already gone
        raise CheckpointError(
            f"refused {url}: {exc}; nothing was written (expected sha256 prefix {hash_prefix})"
        ) from exc
    except (OSError, ValueError) as exc:  # URLError, HTTPError, timeouts, refused connections
        reason = getattr(exc, "reason", None) or exc
        raise WeightsUnavailableError(f"cannot download {url}: {reason}") from exc
    finally:
        socket.setdefaulttimeout(previous)
