"""Live model updates (Triton's `--model-control-mode`), off by default.

- `none`: the versions found at start are served until exit.
- `poll`: every `repository_poll_secs`, the repository is scanned; a model whose highest version
  is newer than the one served (or a model not served yet) is loaded.
- `explicit`: the repository extension of the Open Inference Protocol does it on request:
  `POST /v2/repository/index`, `POST /v2/repository/models/NAME/load|unload` (management token).

Loading a version builds its session and warms it beside the version being served, with its own
batcher; only then is it switched in, in one assignment on the event loop: a request that
resolves its model after that instant gets the new version, one that resolved it before keeps
the old version to its answer. The old version is released once its last request has finished
(its queued images run on it). `/readyz` is not affected: the served set stays ready throughout.
A version whose graph fails to load or warm is refused and logged; the old one keeps serving,
and the poller does not try that version again (a newer one, or an explicit load, does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from .dataplane import DataPlane
from .errors import OIP_PREFIX, ModelNotFoundError, ServiceError
from .lifecycle import ServedModel
from .repository import ModelEntry, RepositoryError, load_entry, version_numbers
from .schemas import JSONResponse
from .settings import Settings

log = logging.getLogger(__name__)


class ModelLoadError(ServiceError):
    """A version was refused: its metadata, graph or warm-up failed (Triton answers 400)."""

    status, code = 400, "load_failed"


class ModelControl:
    """Loads, swaps and unloads model versions of one DataPlane while it serves."""

    def __init__(self, server: DataPlane, settings: Settings) -> None:
        self.server, self.settings = server, settings
        self.mode = settings.model_control_mode
        self.root: Path = settings.model_repository
        self.refused: dict[tuple[str, int], str] = {}  # versions not to try again, and why
        self.swaps: list[dict[str, Any]] = []  # what was switched, when (for /v2/repository)
        self._locks: dict[str, asyncio.Lock] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._poller: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.mode == "poll":
            self._poller = asyncio.create_task(self._poll(), name="repository-poll")

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        await asyncio.gather(*self._retiring, return_exceptions=True)

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
            served = self.server.models.get(name)
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
        # The versions found at start load first (ModelLifecycle.start); then watch for new ones.
        while not self.server.ready and self.server.fatal is None:
            await asyncio.sleep(0.05)
        while True:
            await asyncio.sleep(self.settings.repository_poll_secs)
            for name, directory in self._model_dirs().items():
                versions = version_numbers(directory)
                if not versions:
                    continue
                newest, served = max(versions), self.server.models.get(name)
                if (served is not None and served.entry.version >= newest) or (
                    name,
                    newest,
                ) in self.refused:
                    continue
                with contextlib.suppress(ServiceError):  # refused: logged, old keeps serving
                    await self.load(name)

    # -- loading and unloading --------------------------------------------------------------

    async def load(self, name: str) -> ServedModel:
        """Load the newest version of `name`, warm it, switch it in; the served one when it is
        already that version. Raises ModelNotFoundError or ModelLoadError (old keeps serving)."""
        directory = self._model_dirs().get(name)
        versions = version_numbers(directory) if directory is not None else []
        if directory is None or not versions:
            raise ModelNotFoundError(f"no model named {name!r} in the repository")
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            version = max(versions)
            current = self.server.models.get(name)
            if current is not None and current.entry.version == version:
                return current
            try:
                entry = await asyncio.to_thread(load_entry, directory / str(version))
                candidate = await self._warm(entry)
            except Exception as exc:  # whatever fails (metadata, graph, warm-up) refuses it
                reason = f"version {version} refused: {exc}"
                # A directory still being written (no metadata yet) is tried again next time.
                if not (isinstance(exc, RepositoryError) and "cannot read" in str(exc)):
                    self.refused[(name, version)] = reason
                log.error("model %s: %s; %s", name, reason, _still_serving(current))
                raise ModelLoadError(f"model {name}: {reason}") from None
            self._switch(name, current, candidate)
            return candidate

    async def _warm(self, entry: ModelEntry) -> ServedModel:
        candidate = ServedModel(entry, self.settings)
        try:
            await self.server.load_model(candidate)  # session, warm-up of every batch size, batcher
        except BaseException:
            if candidate.batcher is not None:
                await candidate.batcher.stop()
            candidate.engine = None
            raise
        return candidate

    def _switch(self, name: str, old: ServedModel | None, new: ServedModel) -> None:
        # One assignment, no await: every request resolving `name` from here on gets `new`.
        self.server.models[name] = new
        started = time.monotonic()
        record = {
            "model": name,
            "from": old.entry.version if old else None,
            "to": new.entry.version,
            "at": time.time(),
        }
        self.swaps.append(record)
        log.info(
            "model %s: now serving version %d%s",
            name,
            new.entry.version,
            f" (version {old.entry.version} finishes its requests, then is released)"
            if old
            else "",
        )
        if old is not None:
            self._retire(old, started)

    def _retire(self, old: ServedModel, since: float) -> None:
        async def release() -> None:
            await old.idle()
            if old.batcher is not None:
                await old.batcher.stop()  # finishes queued images (none should be left)
            old.state = "unloaded"
            old.engine, old.batcher = None, None
            log.info(
                "model %s: version %d released after %.2f s",
                old.entry.name,
                old.entry.version,
                time.monotonic() - since,
            )

        task = asyncio.create_task(release(), name=f"release-{old.entry.name}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def unload(self, name: str) -> None:
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            current = self.server.models.pop(name, None)
            if current is None:
                raise ModelNotFoundError(f"no model named {name!r} is loaded")
            log.info("model %s: unloading version %d", name, current.entry.version)
            self._retire(current, time.monotonic())


def _still_serving(current: ServedModel | None) -> str:
    if current is None:
        return "the model stays unavailable"
    return f"version {current.entry.version} keeps serving"


# -- the repository extension (HTTP), mounted only with model_control_mode=explicit ----------

router = APIRouter(prefix=OIP_PREFIX + "/repository", tags=["Model repository (management)"])


def _control(request: Request) -> ModelControl:
    control: ModelControl = request.app.state.model_control
    return control


@router.post("/index", summary="Every model in the repository and its state")
async def repository_index(request: Request) -> Response:
    return JSONResponse(_control(request).index())


@router.post("/models/{name}/load", summary="Load (or swap in) the newest version of a model")
async def repository_load(name: str, request: Request) -> Response:
    model = await _control(request).load(name)
    return JSONResponse({"name": model.entry.name, "version": str(model.entry.version)})


@router.post("/models/{name}/unload", summary="Stop serving a model")
async def repository_unload(name: str, request: Request) -> Response:
    await _control(request).unload(name)
    return JSONResponse({})
