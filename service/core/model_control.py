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
or an explicit load, does). A version whose files are not all there yet (copied in by a writer
that is not atomic) is passed over for the newest complete one, and looked at again later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from contract.repository import IncompleteVersionError, ModelEntry, load_entry, version_numbers

from .errors import ModelLoadError, ModelNotFoundError, NotReadyError, ServiceError, clip
from .registry import ModelRegistry, ServedModel
from .settings import Settings

log = logging.getLogger(__name__)

SCAN_TIMEOUT_S = 30.0  # at least; a repository poll period longer than this is the timeout


class ModelControl:
    """Loads, swaps and unloads model versions of one registry while it serves.

    The repository is only ever read in threads (`asyncio.to_thread`), never on the event loop:
    a hung network mount delays the next version, not every request. The poller keeps polling
    whatever a scan raises, counts each failure (`resnet_serve_repository_poll_errors_total`)
    and records the last scan that worked
    (`resnet_serve_repository_poll_last_success_timestamp_seconds`)."""

    def __init__(self, registry: ModelRegistry, settings: Settings) -> None:
        self.registry, self.settings = registry, settings
        self.metrics = registry.metrics
        self.mode = settings.model_control_mode
        self.root: Path = settings.model_repository
        self.refused: dict[tuple[str, int], str] = {}  # versions not to try again, and why
        self._waiting: dict[tuple[str, int], str] = {}  # incomplete versions, as last logged
        self._locks: dict[str, asyncio.Lock] = {}
        self._poller: asyncio.Task[None] | None = None
        self._scan: asyncio.Future[dict[str, list[int]]] | None = None
        self._last_error: str | None = None

    def start(self) -> None:
        if self.mode == "poll":
            self._poller = asyncio.create_task(self._poll(), name="repository-poll")

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)

    # -- the repository (read in threads) ------------------------------------------------------

    def _model_dirs(self) -> dict[str, Path]:
        """{name: directory}: names from a request are looked up here, never joined to paths."""
        return {d.name: d for d in self.root.iterdir() if d.is_dir() and not d.name.startswith(".")}

    def _listing(self) -> dict[str, list[int]]:
        """{name: versions, ascending} of the whole repository."""
        return {name: version_numbers(path) for name, path in self._model_dirs().items()}

    async def _scan_repository(self) -> dict[str, list[int]]:
        """The listing, read in a thread under a timeout. A scan that hangs (a dead network
        mount) is not started again while it hangs, so threads do not pile up."""
        if self._scan is None or self._scan.done():
            self._scan = asyncio.ensure_future(asyncio.to_thread(self._listing))
        timeout = max(self.settings.repository_poll_secs, SCAN_TIMEOUT_S)
        try:
            return await asyncio.wait_for(asyncio.shield(self._scan), timeout)
        except TimeoutError:
            raise OSError(f"scanning {self.root} took longer than {timeout:.0f} s") from None

    async def index(self) -> list[dict[str, Any]]:
        """Triton's repository index: every model in the repository and its state."""
        rows = []
        for name, versions in sorted((await self._scan_repository()).items()):
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
            try:
                listing = await self._scan_repository()
            except Exception as exc:  # keep polling; say so once per distinct failure
                self.metrics.poll_errors.inc()
                if str(exc) != self._last_error:
                    log.error("repository poll failed (polling goes on): %s", exc)
                self._last_error = str(exc)
                continue
            if self._last_error is not None:
                log.info("repository poll works again")
                self._last_error = None
            self.metrics.poll_last_success.set(time.time())
            for name, versions in listing.items():
                served = self.registry.models.get(name)
                newer = [v for v in versions if served is None or v > served.entry.version]
                if newer and any((name, v) not in self.refused for v in newer):
                    with contextlib.suppress(ServiceError):  # refused: logged, old keeps serving
                        await self.load(name, skip_refused=True)

    # -- loading and unloading --------------------------------------------------------------

    async def load(self, name: str, *, skip_refused: bool = False) -> ServedModel:
        """Load the newest complete version of `name`, warm it, swap it in; the served one when
        it is already that version. Versions still being written are passed over (and looked at
        again later); with `skip_refused` (the poller), so are versions refused before. Raises
        ModelNotFoundError, NotReadyError (during start-up) or ModelLoadError (the old version
        keeps serving)."""
        if not self.registry.loaded:
            raise NotReadyError(
                "the models found at start are still loading; try again",
                retry_after_s=self.settings.retry_after_s,
            )
        listing = await self._scan_repository()
        if not listing.get(name):
            raise ModelNotFoundError(f"no model named {clip(name)} in the repository")
        async with self._locks.setdefault(name, asyncio.Lock()):
            current = self.registry.models.get(name)
            for version in sorted(listing[name], reverse=True):
                if current is not None and current.entry.version >= version:
                    return current
                if skip_refused and (name, version) in self.refused:
                    continue
                entry = await self._complete_entry(name, version, current)
                if entry is not None:
                    return await self._swap_in(name, entry, current)
            if current is not None:
                return current
            raise ModelLoadError(f"model {name}: no complete version in the repository")

    async def _complete_entry(
        self, name: str, version: int, current: ServedModel | None
    ) -> ModelEntry | None:
        """The version's entry, or None while it is incomplete (logged once per reason)."""
        try:
            return await asyncio.to_thread(load_entry, self.root / name / str(version))
        except IncompleteVersionError as exc:
            if self._waiting.get((name, version)) != str(exc):
                log.warning("model %s: version %d not complete yet: %s", name, version, exc)
            self._waiting[(name, version)] = str(exc)
            return None
        except Exception as exc:
            raise self._refuse(name, version, exc, current) from None

    async def _swap_in(
        self, name: str, entry: ModelEntry, current: ServedModel | None
    ) -> ServedModel:
        candidate = ServedModel(entry, self.settings)
        try:
            await self.registry.load(candidate)  # engine, warm-up of every batch size, batcher
        except Exception as exc:  # the graph or its warm-up failed: refused
            await candidate.stop()
            raise self._refuse(name, entry.version, exc, current) from None
        self._waiting.pop((name, entry.version), None)
        self.registry.swap(candidate)
        log.info(
            "model %s: now serving version %d%s",
            name,
            entry.version,
            f" (version {current.entry.version} finishes its requests, then is released)"
            if current
            else "",
        )
        return candidate

    def _refuse(
        self, name: str, version: int, exc: Exception, current: ServedModel | None
    ) -> ModelLoadError:
        reason = f"version {version} refused: {exc}"
        self.refused[(name, version)] = reason
        log.error("model %s: %s; %s", name, reason, _still_serving(current))
        return ModelLoadError(f"model {name}: {reason}")

    async def unload(self, name: str) -> None:
        if not self.registry.loaded:
            raise NotReadyError(
                "the models found at start are still loading; try again",
                retry_after_s=self.settings.retry_after_s,
            )
        if name not in self.registry.models:  # checked before a lock is made for the name
            raise ModelNotFoundError(f"no model named {clip(name)} is loaded")
        async with self._locks.setdefault(name, asyncio.Lock()):
            model = self.registry.remove(name)
            log.info("model %s: unloading version %d", name, model.entry.version)


def _still_serving(current: ServedModel | None) -> str:
    if current is None:
        return "the model stays unavailable"
    return f"version {current.entry.version} keeps serving"
