"""The preprocessing a model was trained with: one typed object, written verbatim into
metadata.json by the exporter (inside `contract.repository.ModelMetadata`) and validated from it
by the service. `models.registry` gives each architecture its own.
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Interpolation = Literal["bilinear", "bicubic", "nearest"]


class Preprocessing(BaseModel):
    """Resize the shorter side, center-crop a square, scale to [0, 1], normalize per channel.

    Images become RGB first (EXIF orientation applied; grayscale, palette and alpha converted);
    the result is float32 in NCHW layout.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    resize_shorter: int = Field(description="the shorter side is resized to this, in pixels")
    crop: int = Field(description="then the center square of this side is cut out")
    mean: tuple[float, float, float] = Field(IMAGENET_MEAN, description="per channel, RGB")
    std: tuple[float, float, float] = Field(IMAGENET_STD, description="per channel, RGB")
    interpolation: Interpolation = "bilinear"
    antialias: Literal[True] = Field(
        True, description="only antialiased resizing is supported (what Pillow's resize does)"
    )
    scale: float = Field(1.0 / 255.0, description="pixel values are multiplied by this first")
    color: Literal["RGB"] = "RGB"
    layout: Literal["NCHW"] = "NCHW"

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.crop <= 0 or self.resize_shorter < self.crop:
            raise ValueError(
                f"need 0 < crop <= resize_shorter, got crop={self.crop}, "
                f"resize_shorter={self.resize_shorter}"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError("std must be strictly positive")
        return self


IMAGENET = Preprocessing(resize_shorter=256, crop=224)
# The published CIFAR-10 checkpoints were trained with ImageNet mean/std (see shared/data/README).
CIFAR = Preprocessing(resize_shorter=32, crop=32)
