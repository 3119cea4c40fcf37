"""The preprocessing a model was trained with: one typed object, written verbatim into
metadata.json by the exporter and rebuilt from it by the service.

Torch-free on purpose: the service imports this module, and it must never load torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side, center-crop a square, scale to [0, 1], normalize per channel.

    Images become RGB first (EXIF orientation applied; grayscale, palette and alpha converted);
    the result is float32 in NCHW layout.
    """

    resize_shorter: int
    crop: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    antialias: bool = True
    scale: float = 1.0 / 255.0
    color: str = "RGB"
    layout: str = "NCHW"

    def __post_init__(self) -> None:
        if self.crop <= 0 or self.resize_shorter < self.crop:
            raise ValueError(
                f"need 0 < crop <= resize_shorter, got crop={self.crop}, "
                f"resize_shorter={self.resize_shorter}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ValueError("mean and std need three values each, std strictly positive")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"unknown interpolation {self.interpolation!r}; choose one of {INTERPOLATIONS}"
            )
        if self.color != "RGB" or self.layout != "NCHW":
            raise ValueError("only RGB input in NCHW layout is supported")
        if not self.antialias:
            raise ValueError("only antialiased resizing is supported (what Pillow's resize does)")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown preprocessing fields: {sorted(unknown)}")
        values = dict(data)
        for key in ("mean", "std"):
            if key in values:
                values[key] = tuple(float(v) for v in values[key])
        return cls(**values)


IMAGENET = Preprocessing(resize_shorter=256, crop=224)
# The published CIFAR-10 checkpoints were trained with ImageNet mean/std (see shared/data/README).
CIFAR = Preprocessing(resize_shorter=32, crop=32)
