"""The ResNet network: a stem, residual stages, global average pooling, a linear classifier.

Two stems, as in [1]: ImageNet (7x7/2 conv + 3x3/2 max-pool, four stages of 64-512 planes) and
CIFAR (one 3x3 conv, three stages of 16/32/64 planes, Sec. 4.2). `forward_with_embedding` returns
both heads the service needs: logits and the pooled (GAP) embedding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .blocks import Shortcut, block_class, conv3x3

IMAGENET_PLANES = (64, 128, 256, 512)
CIFAR_PLANES = (16, 32, 64)


class ResNet(nn.Module):
    def __init__(
        self,
        *,
        family: str,
        block: str,
        layers: Sequence[int],
        shortcut: Shortcut | str,
        preact: bool = False,
        v1: bool = False,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        shortcut = Shortcut.parse(shortcut)
        block_cls = block_class(block, preact)
        if family == "imagenet":
            planes, stem_planes = IMAGENET_PLANES, 64
        elif family == "cifar":
            planes, stem_planes = CIFAR_PLANES, 16
        else:
            raise ValueError(f"unknown family {family!r}; choose imagenet or cifar")
        if len(layers) != len(planes):
            raise ValueError(f"{family} ResNets have {len(planes)} stages, got layers={layers}")

        self.family, self.preact = family, preact
        if family == "imagenet":
            self.conv1 = nn.Conv2d(3, stem_planes, kernel_size=7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = conv3x3(3, stem_planes)
        # The CIFAR pre-activation nets of [2] start with a bare conv: the first block's BN-ReLU
        # follows it directly (authors' resnet-pre-act.lua).
        self.bn1 = None if preact and family == "cifar" else nn.BatchNorm2d(stem_planes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = (
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if family == "imagenet" else None
        )

        in_planes = stem_planes
        for index, (width, count) in enumerate(zip(planes, layers, strict=True)):
            stride = 1 if index == 0 else 2
            blocks = []
            for i in range(count):
                blocks.append(block_cls(in_planes, width, stride if i == 0 else 1, shortcut, v1=v1))
                in_planes = width * block_cls.expansion
            setattr(self, f"layer{index + 1}", nn.Sequential(*blocks))
        self.num_stages = len(planes)
        # Pre-activation nets end with the BN-ReLU that the last block left out ([2], Sec. 3.2).
        self.final_bn = nn.BatchNorm2d(in_planes) if preact else None
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.embedding_dim = in_planes
        self.fc = nn.Linear(in_planes, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """The last feature map, before pooling."""
        x = self.conv1(x)
        if self.bn1 is not None:
            x = self.relu(self.bn1(x))
        if self.maxpool is not None:
            x = self.maxpool(x)
        for index in range(self.num_stages):
            x = getattr(self, f"layer{index + 1}")(x)
        if self.final_bn is not None:
            x = self.relu(self.final_bn(x))
        return x

    def forward_embedding(self, x: Tensor) -> Tensor:
        """The global-average-pooled embedding, [N, embedding_dim]."""
        return torch.flatten(self.avgpool(self.forward_features(x)), 1)

    def forward_with_embedding(self, x: Tensor) -> tuple[Tensor, Tensor]:
        embedding = self.forward_embedding(x)
        return self.fc(embedding), embedding

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.forward_embedding(x))


class WithEmbedding(nn.Module):
    """Wraps a ResNet so that its forward returns (logits, embedding): the exported graph."""

    def __init__(self, model: ResNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.forward_with_embedding(images)
