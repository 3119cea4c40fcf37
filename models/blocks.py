"""Residual blocks and shortcuts, in the order the papers introduce them.

References:
- [1] He, Zhang, Ren, Sun. "Deep Residual Learning for Image Recognition", CVPR 2016.
- [2] He, Zhang, Ren, Sun. "Identity Mappings in Deep Residual Networks", ECCV 2016.

Attribute names (conv1, bn1, downsample, ...) are the checkpoint keys: they follow torchvision, so
ImageNet state dicts are interchangeable with torchvision's.
"""

from __future__ import annotations

from enum import StrEnum

import torch.nn.functional as F
from torch import Tensor, nn


class Shortcut(StrEnum):
    """Shortcut options of [1], Sec. 4.1 / 4.2."""

    A = "A"  # parameter-free: identity, or subsample + zero-pad channels where shapes change
    B = "B"  # projection (1x1 conv + BN) where shapes change, identity elsewhere
    C = "C"  # projection on every block
    NONE = "none"  # plain network: no shortcut at all

    @classmethod
    def parse(cls, value: str | Shortcut) -> Shortcut:
        if isinstance(value, Shortcut):
            return value
        try:
            return cls(value if value == "none" else value.upper())
        except ValueError:
            choices = ", ".join(m.value for m in cls)
            raise ValueError(
                f"unknown shortcut option {value!r}; choose one of {choices}"
            ) from None


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class ZeroPadShortcut(nn.Module):
    """Option A of [1]: subsample spatially by `stride`, zero-pad the new channels.

    Adds no parameters. Padding is split evenly on both sides of the channel axis, as in the
    published CIFAR-10 checkpoints this project serves (akamaster/pytorch_resnet_cifar10).
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        if out_planes < in_planes or (out_planes - in_planes) % 2:
            raise ValueError(f"zero-padding cannot map {in_planes} to {out_planes} channels")
        self.in_planes, self.out_planes, self.stride = in_planes, out_planes, stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        pad = (self.out_planes - self.in_planes) // 2
        return F.pad(x, (0, 0, 0, 0, pad, pad))

    def extra_repr(self) -> str:
        return f"{self.in_planes} -> {self.out_planes}, stride={self.stride}"


class ProjectionShortcut(nn.Sequential):
    """Options B and C of [1]: a strided 1x1 convolution followed by BatchNorm.

    A Sequential so that its keys are torchvision's `downsample.0.weight` / `downsample.1.*`.
    Pre-activation blocks [2] project the already normalized input, so they omit the BatchNorm.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, *, norm: bool = True) -> None:
        layers: list[nn.Module] = [conv1x1(in_planes, out_planes, stride)]
        if norm:
            layers.append(nn.BatchNorm2d(out_planes))
        super().__init__(*layers)


def make_shortcut(
    option: Shortcut, in_planes: int, out_planes: int, stride: int, *, norm: bool = True
) -> nn.Module | None:
    """The shortcut module for one block, or None for identity / no shortcut."""
    shape_changes = stride != 1 or in_planes != out_planes
    if option is Shortcut.NONE:
        return None
    if option is Shortcut.C or (option is Shortcut.B and shape_changes):
        return ProjectionShortcut(in_planes, out_planes, stride, norm=norm)
    if option is Shortcut.A and shape_changes:
        return ZeroPadShortcut(in_planes, out_planes, stride)
    return None


class BasicBlock(nn.Module):
    """Two 3x3 convolutions ([1], Fig. 5 left), post-activation."""

    expansion = 1

    def __init__(
        self, in_planes: int, planes: int, stride: int, shortcut: Shortcut, *, v1: bool = False
    ) -> None:
        super().__init__()
        del v1  # only bottlenecks have a choice of stride placement
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = make_shortcut(shortcut, in_planes, planes, stride)
        self.residual = shortcut is not Shortcut.NONE

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand ([1], Fig. 5 right), post-activation.

    The stride sits on the 3x3 convolution ("ResNet v1.5", torchvision's placement); `v1=True`
    puts it on the first 1x1 as in the paper, which is cheaper (3.8 vs 4.1 GMACs for ResNet-50)
    and slightly less accurate.
    """

    expansion = 4

    def __init__(
        self, in_planes: int, planes: int, stride: int, shortcut: Shortcut, *, v1: bool = False
    ) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = conv1x1(in_planes, planes, stride if v1 else 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, 1 if v1 else stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, out_planes)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = make_shortcut(shortcut, in_planes, out_planes, stride)
        self.residual = shortcut is not Shortcut.NONE

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class PreActBasicBlock(nn.Module):
    """Full pre-activation basic block ([2], Fig. 4e): BN-ReLU-conv, twice, then add.

    A projection shortcut takes the pre-activated input, as in the authors' code.
    """

    expansion = 1

    def __init__(
        self, in_planes: int, planes: int, stride: int, shortcut: Shortcut, *, v1: bool = False
    ) -> None:
        super().__init__()
        del v1
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = make_shortcut(shortcut, in_planes, planes, stride, norm=False)
        self.residual = shortcut is not Shortcut.NONE

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        if not self.residual:
            return out
        return out + (x if self.downsample is None else self.downsample(pre))


class PreActBottleneck(nn.Module):
    """Full pre-activation bottleneck ([2]): BN-ReLU-conv 1x1, 3x3 (strided), 1x1, then add."""

    expansion = 4

    def __init__(
        self, in_planes: int, planes: int, stride: int, shortcut: Shortcut, *, v1: bool = False
    ) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = conv1x1(in_planes, planes, stride if v1 else 1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, 1 if v1 else stride)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, out_planes)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = make_shortcut(shortcut, in_planes, out_planes, stride, norm=False)
        self.residual = shortcut is not Shortcut.NONE

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        if not self.residual:
            return out
        return out + (x if self.downsample is None else self.downsample(pre))


Block = type[BasicBlock] | type[Bottleneck] | type[PreActBasicBlock] | type[PreActBottleneck]

BLOCKS: dict[tuple[str, bool], Block] = {
    ("basic", False): BasicBlock,
    ("bottleneck", False): Bottleneck,
    ("basic", True): PreActBasicBlock,
    ("bottleneck", True): PreActBottleneck,
}


def block_class(block: str, preact: bool) -> Block:
    try:
        return BLOCKS[(block, preact)]
    except KeyError:
        raise ValueError(f"unknown block type {block!r}; choose basic or bottleneck") from None


__all__ = [
    "BasicBlock",
    "Bottleneck",
    "PreActBasicBlock",
    "PreActBottleneck",
    "ProjectionShortcut",
    "Shortcut",
    "ZeroPadShortcut",
    "block_class",
    "conv1x1",
    "conv3x3",
    "make_shortcut",
]
