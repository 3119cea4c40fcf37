"""One table of architectures: a frozen spec per name; builders, `python -m models list`, the
exporter and the tests all read it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

import torch
from torch import nn

from contract.preprocessing import CIFAR, IMAGENET, Preprocessing

from .blocks import Shortcut
from .resnet import ResNet

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


@functools.cache
def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ILSVRC-2012 class names in the standard (sorted WordNet ID) order."""
    text = resources.files(__package__).joinpath("imagenet_classes.txt").read_text("utf-8")
    names = tuple(line for line in text.splitlines() if line)
    if len(names) != 1000:
        raise RuntimeError(f"imagenet_classes.txt holds {len(names)} names, expected 1000")
    return names


@dataclass(frozen=True)
class PretrainedWeights:
    """Official weights: downloaded once, checked against the hash prefix in the file name
    (torch.hub's convention for torchvision's files), cached."""

    url: str
    sha256_prefix: str
    description: str


Family = Literal["imagenet", "cifar"]
Block = Literal["basic", "bottleneck"]


@dataclass(frozen=True, kw_only=True)
class ArchSpec:
    name: str
    family: Family
    block: Block
    layers: tuple[int, ...]
    shortcut: Shortcut
    preact: bool = False
    v1: bool = False  # bottleneck stride on the first 1x1 (paper) instead of the 3x3 (v1.5)
    num_classes: int = 1000
    pretrained: dict[str, PretrainedWeights] = field(default_factory=dict, compare=False)

    @property
    def plain(self) -> bool:
        return self.shortcut is Shortcut.NONE

    @property
    def depth(self) -> int:
        """Weighted layers: convolutions on the main path plus the classifier."""
        per_block = 2 if self.block == "basic" else 3
        return per_block * sum(self.layers) + 2

    @property
    def expansion(self) -> int:
        return 1 if self.block == "basic" else 4

    @property
    def embedding_dim(self) -> int:
        last = 512 if self.family == "imagenet" else 64
        return last * self.expansion

    @property
    def preprocessing(self) -> Preprocessing:
        return IMAGENET if self.family == "imagenet" else CIFAR

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (3, self.preprocessing.crop, self.preprocessing.crop)

    @property
    def labels(self) -> tuple[str, ...]:
        return imagenet_classes() if self.family == "imagenet" else CIFAR10_CLASSES

    def build(self) -> ResNet:
        return ResNet(
            family=self.family,
            block=self.block,
            layers=self.layers,
            shortcut=self.shortcut,
            preact=self.preact,
            v1=self.v1,
            num_classes=self.num_classes,
        )

    def describe(self) -> dict[str, Any]:
        """The row `python -m models list` prints."""
        params, macs = complexity(self)
        return {
            "name": self.name,
            "family": self.family,
            "depth": self.depth,
            "block": self.block,
            "preact": self.preact,
            "plain": self.plain,
            "shortcut": self.shortcut.value,
            "stride_on": "1x1" if self.v1 and self.block == "bottleneck" else "3x3",
            "params": params,
            "macs": macs,
            "input_size": list(self.input_size),
            "embedding_dim": self.embedding_dim,
            "num_classes": self.num_classes,
            "pretrained": sorted(self.pretrained),
        }


_REGISTRY: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"architecture {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def get_spec(name: str) -> ArchSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown architecture {name!r}; `python -m models list` shows the choices"
        ) from None


def list_specs() -> list[ArchSpec]:
    return list(_REGISTRY.values())


@functools.cache
def complexity(spec: ArchSpec) -> tuple[int, int]:
    """(parameters, multiply-accumulates) at the default input size, batch 1.

    Built on the meta device, so even ResNet-1202 costs no memory or arithmetic. MACs count
    convolutions and the classifier, as [1] Table 1 and torchvision's figures do.
    """
    with torch.device("meta"):
        model = spec.build()
    params = sum(p.numel() for p in model.parameters())
    macs = 0

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            macs += output.numel() * (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, nn.Linear):
            macs += output.numel() * module.in_features

    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            module.register_forward_hook(count)
    with torch.no_grad():
        model.eval()(torch.empty(1, *spec.input_size, device="meta"))
    return params, macs


# --- the table -----------------------------------------------------------------------------

_TORCHVISION = "https://download.pytorch.org/models/"
_TORCHVISION_V1 = {
    18: ("resnet18-f37072fd.pth", "f37072fd"),
    34: ("resnet34-b627a593.pth", "b627a593"),
    50: ("resnet50-0676ba61.pth", "0676ba61"),
    101: ("resnet101-63fe2227.pth", "63fe2227"),
    152: ("resnet152-394f9c45.pth", "394f9c45"),
}
# The published CIFAR-10 checkpoints (BSD-2-Clause; also shipped in weights/), at the commit
# they were last renamed; the hex suffix is the start of each file's sha256.
_AKAMASTER_URL = (
    "https://github.com/akamaster/pytorch_resnet_cifar10/raw/"
    "d5489e8995e81e91ce6b1d69dcc98ad579b0b153/pretrained_models/"
)
_AKAMASTER = {
    20: ("resnet20-12fca82f.th", "12fca82f"),
    32: ("resnet32-d509ac18.th", "d509ac18"),
    44: ("resnet44-014dd654.th", "014dd654"),
    56: ("resnet56-4bfd9763.th", "4bfd9763"),
}
IMAGENET_LAYERS: dict[int, tuple[Block, tuple[int, ...]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)

for _depth, (_block, _layers) in IMAGENET_LAYERS.items():
    _file, _prefix = _TORCHVISION_V1[_depth]
    register(
        ArchSpec(
            name=f"resnet{_depth}",
            family="imagenet",
            block=_block,
            layers=_layers,
            shortcut=Shortcut.B,
            pretrained={
                "torchvision": PretrainedWeights(
                    _TORCHVISION + _file,
                    _prefix,
                    f"torchvision ResNet{_depth}_Weights.IMAGENET1K_V1",
                )
            },
        )
    )
    if _block == "bottleneck":
        register(
            ArchSpec(
                name=f"resnet{_depth}_v1",
                family="imagenet",
                block=_block,
                layers=_layers,
                shortcut=Shortcut.B,
                v1=True,
            )
        )
    register(
        ArchSpec(
            name=f"preact_resnet{_depth}",
            family="imagenet",
            block=_block,
            layers=_layers,
            shortcut=Shortcut.B,
            preact=True,
        )
    )
for _depth in (18, 34):
    _block, _layers = IMAGENET_LAYERS[_depth]
    register(
        ArchSpec(
            name=f"plain{_depth}",
            family="imagenet",
            block=_block,
            layers=_layers,
            shortcut=Shortcut.NONE,
        )
    )

for _depth in CIFAR_DEPTHS:
    _n = (_depth - 2) // 6
    _published = _AKAMASTER.get(_depth)
    register(
        ArchSpec(
            name=f"cifar_resnet{_depth}",
            family="cifar",
            block="basic",
            layers=(_n,) * 3,
            shortcut=Shortcut.A,
            num_classes=10,
            pretrained={
                "akamaster": PretrainedWeights(
                    _AKAMASTER_URL + _published[0],
                    _published[1],
                    f"akamaster/pytorch_resnet_cifar10 ResNet-{_depth} (CIFAR-10, BSD-2-Clause)",
                )
            }
            if _published
            else {},
        )
    )
for _depth in CIFAR_DEPTHS[:5]:
    _n = (_depth - 2) // 6
    for _option in (Shortcut.B, Shortcut.C):
        register(
            ArchSpec(
                name=f"cifar_resnet{_depth}_{_option.value.lower()}",
                family="cifar",
                block="basic",
                layers=(_n,) * 3,
                shortcut=_option,
                num_classes=10,
            )
        )
for _depth in CIFAR_DEPTHS[:4]:
    _n = (_depth - 2) // 6
    register(
        ArchSpec(
            name=f"cifar_plain{_depth}",
            family="cifar",
            block="basic",
            layers=(_n,) * 3,
            shortcut=Shortcut.NONE,
            num_classes=10,
        )
    )

# Pre-activation CIFAR nets of [2]: ResNet-110 (basic), ResNet-164 and -1001 (bottleneck, 9n+2),
# with projection shortcuts where shapes change and, as in the authors' code, the bottleneck's
# stride on its first 1x1 convolution.
register(
    ArchSpec(
        name="cifar_preact_resnet110",
        family="cifar",
        block="basic",
        layers=(18,) * 3,
        shortcut=Shortcut.B,
        preact=True,
        num_classes=10,
    )
)
register(
    ArchSpec(
        name="cifar_preact_resnet164",
        family="cifar",
        block="bottleneck",
        layers=(18,) * 3,
        shortcut=Shortcut.B,
        preact=True,
        v1=True,
        num_classes=10,
    )
)
register(
    ArchSpec(
        name="cifar_preact_resnet1001",
        family="cifar",
        block="bottleneck",
        layers=(111,) * 3,
        shortcut=Shortcut.B,
        preact=True,
        v1=True,
        num_classes=10,
    )
)

# The paper set: what the presets export and the benchmark measures.
PAPER_SET = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "cifar_resnet20", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56", "cifar_resnet110",
)  # fmt: skip
