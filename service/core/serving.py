"""What the data plane and the protocol adapters need of "the models", wherever they run.

With one process (`--workers 1`) the models are a `registry.ModelRegistry` of `ServedModel`s,
with their engines and batchers in the same process. With `--workers N`, each front-end worker
sees a `remote.RemoteRegistry` of `RemoteModel`s, mirrors of the engine process's registry
whose batchers hand images over shared memory (service/core/ipc.py). Both satisfy these
protocols, so the request path (`dataplane.DataPlane`) and every adapter are the same code in
either process model.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import Any, Literal, Protocol

import numpy as np

from contract.repository import ModelEntry

from .errors import InvalidParameterError, ModelNotFoundError
from .metrics import Metrics
from .settings import Settings

ModelState = Literal["loading", "ready", "failed", "unloaded"]
Status = Literal["ready", "loading", "draining", "failed"]
OutputArrays = tuple[np.ndarray, ...]  # one array per model output, rows in request order


class Admission(Protocol):
    """Room for a request's images in its model's queue (batcher.Ticket, remote.RemoteTicket)."""

    def inputs(self, shape: tuple[int, ...]) -> np.ndarray: ...

    async def run(self, images: np.ndarray) -> OutputArrays: ...


class Queue(Protocol):
    """A model's batcher as requests see it (batcher.Batcher, remote.RemoteBatcher)."""

    def ensure_room(self, count: int) -> None: ...

    def admit(self, count: int) -> AbstractAsyncContextManager[Any]: ...


class Model(Protocol):
    """One served version (registry.ServedModel, remote.RemoteModel)."""

    entry: ModelEntry
    state: ModelState
    max_batch_size: int

    @property
    def batcher(self) -> Queue | None: ...

    def use(self) -> AbstractContextManager[Any]: ...

    def view(self, settings: Settings) -> dict[str, Any]: ...


class Models(Protocol):
    """Every served model and the service's readiness (registry.ModelRegistry,
    remote.RemoteRegistry)."""

    settings: Settings
    metrics: Metrics
    draining: bool
    fatal: str | None

    @property
    def models(self) -> Mapping[str, Model]: ...

    @property
    def ready(self) -> bool: ...

    @property
    def status(self) -> Status: ...

    @property
    def loaded(self) -> bool: ...

    def resolve(self, name: str | None) -> Model: ...

    def begin_draining(self) -> None: ...


def resolve(models: Mapping[str, Any], default: str | None, name: str | None) -> Any:
    """The model a request names, or the default one when it names none."""
    if name is None:
        name = default
        if name is None:
            raise InvalidParameterError(
                f"several models are served; name one with ?model= (choices: {sorted(models)})"
            )
    model = models.get(name)
    if model is None:
        raise ModelNotFoundError(f"no model named {name!r} (served: {sorted(models)})")
    return model
