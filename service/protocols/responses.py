"""Response models (what the OpenAPI document promises) and the orjson response that renders them.

Handlers build plain dicts and numpy arrays and render them with orjson: `/embed` answers carry
thousands of floats, and validating them through pydantic on every request would cost more than
the inference. The models below document those bodies; tests check answers against them.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import BaseModel, Field
from starlette import responses

from contract.repository import ModelMetadata

from ..core.serving import ModelState


class JSONResponse(responses.JSONResponse):
    """JSON rendered by orjson, numpy arrays included."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


class ErrorDetail(BaseModel):
    code: str = Field(description="stable, machine-readable reason, e.g. invalid_image")
    message: str = Field(description="what went wrong, for humans")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Prediction(BaseModel):
    index: int = Field(description="class index in the model's output")
    label: str
    score: float = Field(description="softmax probability")


TRAINED = Field(
    description="whether the model's weights were trained; false for random weights, whose "
    "predictions mean nothing"
)


class ClassifyResponse(BaseModel):
    model: str
    version: int
    trained: bool = TRAINED
    predictions: list[list[Prediction]] = Field(
        description="one list per image, in request order, highest score first"
    )


class EmbedResponse(BaseModel):
    model: str
    version: int
    trained: bool = TRAINED
    dim: int = Field(description="embedding size")
    embeddings: list[list[float]] = Field(
        description="one pooled (GAP) embedding per image, in request order"
    )


class ModelInfo(BaseModel):
    """A served model: its name and version, what is true at run time, and its metadata."""

    name: str
    version: int
    state: ModelState
    provider: str | None = Field(
        description="execution provider the session really runs on (null while loading)"
    )
    providers: list[str] = Field(description="the session's provider list, in priority order")
    io_binding: bool = Field(description="inputs and outputs bound to the device (CUDA)")
    max_batch_size: int = Field(
        description="largest batch this service forms for the model (metadata.max_batch_size, "
        "the largest its export verified, or less)"
    )
    max_delay_ms: float
    max_queue_images: int
    warmed_batch_sizes: list[int]
    gpu: dict[str, Any] = Field(
        description="the settings that only matter on a GPU (io_binding, warm-up, TF32, CUDA "
        "graphs, TensorRT, JPEG decoder, fp16 on CPU) and what the engine made of them "
        "(cuda_graph_in_use, bound_batch_sizes)"
    )
    metadata: ModelMetadata = Field(
        description="the model's metadata.json as validated: arch, precision (what the export's "
        "gate accepted), engine, input, outputs, labels, preprocessing, weights (trained or not), "
        "the largest batch parity verified, ..."
    )


class ModelsResponse(BaseModel):
    models: list[ModelInfo]


class HealthResponse(BaseModel):
    status: Literal["ok"]


class ReadyResponse(BaseModel):
    status: Literal["ready", "loading", "draining", "failed"]
    models: dict[str, ModelState] = Field(
        default_factory=dict,
        description="each model's state; only with the inference token when tokens are on",
    )
