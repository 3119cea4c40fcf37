"""The exporter's environment, read in one place: where official weights are cached and whether
they may be downloaded. (Everything else the exporter is told comes from its command line.)"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ExportSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RESNET_SERVE_", extra="ignore", frozen=True)

    cache: Path | None = Field(
        None,
        description="directory of the weights cache (RESNET_SERVE_CACHE; default: "
        "$XDG_CACHE_HOME/resnet-serve, or ~/.cache/resnet-serve)",
    )
    offline: bool = Field(
        False, description="never download official weights (RESNET_SERVE_OFFLINE=1)"
    )
    xdg_cache_home: Path | None = Field(
        None, validation_alias=AliasChoices("XDG_CACHE_HOME"), description="the XDG cache root"
    )

    @property
    def weights_cache(self) -> Path:
        """Where official weights are downloaded to, and looked for first."""
        root = self.cache or (self.xdg_cache_home or Path.home() / ".cache") / "resnet-serve"
        return root / "weights"
