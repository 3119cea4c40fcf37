"""Live model updates (Triton's `--model-control-mode`), off by default.

- `none`: the versions found at start are served until exit.
- `poll`: every `repository_poll_secs`, the repository is scanned; a model whose highest version
  is newer than the one served (or a model not served yet) is loaded.
- `explicit`: the repository extension of the Open Inference Protocol does it on request
  (service/protocols/repository_http.py: `POST /v2/repository/index`,
  `POST /v2/repository/models/NAME/load|unload`, behind the management token).

Loading a version builds its engine and warms it beside the version being served, with its own
batcher (`ModelRegistry.load`); only then is it swapped in (`ModelRegistry.swap`, one assignment
on the event loop): a request that resolves its model after that instant gets the new version,
one that resolved it before keeps the old version to its answer. The old version is released
once its last request has finished (its queued images run on it). `/readyz` is not affected: the
served set stays ready throughout. A version whose graph fails to load or warm is refused and
logged; the old one keeps serving, and the poller does not try that version again (a newer one,
or an explicit load, does). A version whose files are not all there yet is tried again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

from contract.repository import IncompleteVersionError, load_entry, version_numbers

from .errors import ModelLoadError, ModelNotFoundError, ServiceError
from .registry import ModelRegistry, ServedModel
from .settings import Settings

log = logging.getLogger(__name__)


class ModelControl:
    """Loads, swaps and unloads model versions of one registry while it serves."""

    def __init__(self, registry: ModelRegistry, settings: Settings) -> None:
        self.registry, self.settings = registry, settings
        self.mode = settings.model_control_mode
        self.root: Path = settings.model_repository
        self.refused: dict[tuple[str, int], str] = {}  # versions not to try again, and why
        self._locks: dict[str, asyncio.Lock] = {}
        self._poller: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.mode == "poll":
            self._poller = asyncio.create_task(self._poll(), name="repository-poll")

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)

    # -- the repository ---------------------------------------------------------------------

    def _model_dirs(self) -> dict[str, Path]:
        """{name: directory}: names from a request are looked up here, never joined to paths."""
        return {d.name: d for d in self.root.iterdir() if d.is_dir() and not d.name.startswith(".")}

    def index(self) -> list[dict[str, Any]]:
        """Triton's repository index: every model in the repository and its state."""
        rows = []
        for name, directory in sorted(self._model_dirs().items()):
            versions = version_numbers(directory)
            if not versions:
                continue
            served = self.registry.models.get(name)
            for version in versions:
                row: dict[str, Any] = {"name": name, "version": str(version)}
                if served is not None and served.entry.version == version:
                    row["state"] = "READY" if served.state == "ready" else served.state.upper()
                else:
                    row["state"] = "UNAVAILABLE"
                    row["reason"] = self.refused.get((name, version)) or (
                        "not loaded" if served is None else f"version {served.entry.version} serves"
                    )
                rows.append(row)
        return rows

    async def _poll(self) -> None:
        await self.registry.started()  # the versions found at start load first
        while True:
            await asyncio.sleep(self.settings.repository_poll_secs)
            for name, directory in self._model_dirs().items():
                versions = version_numbers(directory)
                if not versions:
                    continue
                newest, served = max(versions), self.registry.models.get(name)
                if served is not None and served.entry.version >= newest:
                    continue
                if (name, newest) in self.refused:
                    continue
                with contextlib.suppress(ServiceError):  # refused: logged, old keeps serving
                    await self.load(name)

    # -- loading and unloading --------------------------------------------------------------

    async def load(self, name: str) -> ServedModel:
        """Load the newest version of `name`, warm it, swap it in; the served one when it is
        already that version. Raises ModelNotFoundError or ModelLoadError (old keeps serving)."""
        directory = self._model_dirs().get(name)
        versions = version_numbers(directory) if directory is not None else []
        if directory is None or not versions:
            raise ModelNotFoundError(f"no model named {name!r} in the repository")
        async with self._locks.setdefault(name, asyncio.Lock()):
            version = max(versions)
            current = self.registry.models.get(name)
            if current is not None and current.entry.version == version:
                return current
            try:
                entry = await asyncio.to_thread(load_entry, directory / str(version))
                candidate = ServedModel(entry, self.settings)
                await self._warm(candidate)
            except Exception as exc:  # whatever fails (metadata, graph, warm-up) refuses it
                reason = f"version {version} refused: {exc}"
                if not isinstance(exc, IncompleteVersionError):  # else: tried again next time
                    self.refused[(name, version)] = reason
                log.error("model %s: %s; %s", name, reason, _still_serving(current))
                raise ModelLoadError(f"model {name}: {reason}") from None
            self.registry.swap(candidate)
            log.info(
                "model %s: now serving version %d%s",
                name,
                version,
                f" (version {current.entry.version} finishes its requests, then is released)"
                if current
                else "",
            )
            return candidate

    async def _warm(self, candidate: ServedModel) -> None:
        try:
            await self.registry.load(candidate)  # engine, warm-up of every batch size, batcher
        except BaseException:
            await candidate.stop()
            raise

    async def unload(self, name: str) -> None:
        if name not in self.registry.models:  # checked before a lock is made for the name
            raise ModelNotFoundError(f"no model named {name!r} is loaded")
        async with self._locks.setdefault(name, asyncio.Lock()):
            model = self.registry.remove(name)
            log.info("model %s: unloading version %d", name, model.entry.version)


def _still_serving(current: ServedModel | None) -> str:
    if current is None:
        return "the model stays unavailable"
    return f"version {current.entry.version} keeps serving"
