"""The Open Inference Protocol's repository extension over HTTP, mounted only with
`model_control_mode=explicit` and behind the management token: the routes of
`ModelControl` (service/core/model_control.py), or, in a front-end worker, the same calls run by
the engine process (`RemoteControl`)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from ..core.model_control import ModelControl
from ..core.remote import RemoteControl
from .http_errors import OIP_PREFIX
from .responses import JSONResponse

router = APIRouter(prefix=OIP_PREFIX + "/repository", tags=["Model repository (management)"])


def _control(request: Request) -> ModelControl | RemoteControl:
    control: ModelControl | RemoteControl = request.app.state.model_control
    return control


@router.post("/index", summary="Every model in the repository and its state")
async def repository_index(request: Request) -> Response:
    return JSONResponse(await _control(request).index())


@router.post("/models/{name}/load", summary="Load (or swap in) the newest version of a model")
async def repository_load(name: str, request: Request) -> Response:
    model = await _control(request).load(name)
    return JSONResponse({"name": model.entry.name, "version": str(model.entry.version)})


@router.post("/models/{name}/unload", summary="Stop serving a model")
async def repository_unload(name: str, request: Request) -> Response:
    await _control(request).unload(name)
    return JSONResponse({})
