"""Typed service settings: one object, read from `RESNET_SERVE_*` variables and CLI flags, and
the only place the service reads its configuration from the environment.

Every field is one flag (`--max-batch-size`) and one variable (`RESNET_SERVE_MAX_BATCH_SIZE`);
flags win over variables. Values are checked across fields here, before anything loads, so a
bad configuration fails start-up with one clear message instead of misbehaving under load.
Token files are read here, once. Engine defaults come from `runtime.engines.EngineConfig`, and
batching defaults from `contract.defaults`, which the exporter verifies against.
"""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import (
    DirectoryPath,
    Field,
    PrivateAttr,
    SecretStr,
    model_validator,
)
from pydantic_settings import BaseSettings, CliSuppress, SettingsConfigDict

from contract import defaults
from runtime.engines import CPU, CUDA, EngineConfig, EngineError
from runtime.engines.base import CudnnSearch, IoBinding

ENV_PREFIX = "RESNET_SERVE_"
_PROVIDER_ALIASES = {"cuda": CUDA, "cpu": CPU}
_ENGINE_DEFAULTS = {f.name: f.default for f in fields(EngineConfig)}
TokenKind = Literal["inference", "management"]
OTEL_ENDPOINT_VARIABLE = "OTEL_EXPORTER_OTLP_ENDPOINT"
MIN_TOKEN_CHARS = 16


def is_env_only(name: str) -> bool:
    """Fields read from their RESNET_SERVE_* variable only, never from a flag (secrets)."""
    extra = Settings.model_fields[name].json_schema_extra
    return isinstance(extra, dict) and bool(extra.get("env_only"))


class Settings(BaseSettings):
    """How `python -m service` runs; `create_app(settings)` takes one of these."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    model_repository: DirectoryPath = Field(
        description="model repository: REPO/<name>/<version>/{model.onnx,metadata.json}"
    )
    host: str = Field("127.0.0.1", description="interface to listen on")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port)")
    providers: str = Field(
        "auto",
        description="onnxruntime execution providers in order, comma-separated (full names or "
        "cuda/cpu); auto: CUDA first when this onnxruntime build has it, else CPU",
    )
    require_cuda: bool = Field(
        _ENGINE_DEFAULTS["require_cuda"],
        description="refuse to start unless every session really runs on CUDA",
    )
    cudnn_conv_algo_search: CudnnSearch = Field(
        _ENGINE_DEFAULTS["cudnn_conv_algo_search"],
        description="CUDA: how cuDNN picks convolution algorithms; EXHAUSTIVE times them all on "
        "the first run of each shape, which the warm-up of every batch size pays before "
        "/readyz, so requests get the fastest ones",
    )
    io_binding: IoBinding = Field(
        _ENGINE_DEFAULTS["io_binding"],
        description="bind each batch size's input and output buffers once on the session's "
        "device and reuse them; auto: on for CUDA/TensorRT sessions only (on also works with "
        "CPU buffers, which is how CI runs this path)",
    )
    warmup_batch_sizes: Literal["auto", "all", "extremes"] = Field(
        "auto",
        description="batch sizes run once before /readyz: all (every size the batcher can form), "
        "extremes (1 and the largest); auto: all on a GPU, extremes on CPU",
    )
    cuda_tf32: bool = Field(
        False,
        description="CUDA: let fp32 convolutions and matrix products use TF32 tensor cores "
        "(faster, but outside the fp32 tolerances the export's parity gate proved)",
    )
    cuda_graph: bool = Field(
        False,
        description="CUDA: capture one CUDA graph per batch size at warm-up and replay it "
        "(needs io_binding and every node on CUDA); off until make gpu-check measured it",
    )
    tensorrt: bool = Field(
        False,
        description="run sessions on onnxruntime's TensorRT provider (then CUDA, then CPU), "
        "engines cached under the model repository; off until make gpu-check measured it",
    )
    tensorrt_cache_dir: Path | None = Field(
        None,
        description="TensorRT engine cache (default: MODEL_REPOSITORY/.tensorrt-cache, one "
        "directory per model version; it must be writable)",
    )
    jpeg_decoder: Literal["pillow", "nvimgcodec"] = Field(
        "pillow",
        description="JPEG decoding: pillow (CPU) or nvimgcodec (the GPU, NVIDIA nvImageCodec); "
        "off the GPU until make gpu-check measured it",
    )
    jpeg_dct_scaling: bool = Field(
        False,
        description="decode JPEGs much larger than the model needs at 1/2, 1/4 or 1/8 scale "
        "(far cheaper for large photos, but not torchvision's input: it moved CIFAR-10 accuracy "
        'by -3.8 to +6.2 points on upscaled JPEGs; README "Image decoding")',
    )
    allow_fp16_on_cpu: bool = Field(
        False,
        description="serve fp16 exports on the CPU provider, whose fp16 arithmetic differs from "
        "the CUDA kernels they are made for (refused otherwise)",
    )
    intra_op_threads: int = Field(
        _ENGINE_DEFAULTS["intra_op_threads"],
        ge=0,
        description="onnxruntime threads per session (0: cores)",
    )
    allow_spinning: bool = Field(
        _ENGINE_DEFAULTS["allow_spinning"],
        description="let idle onnxruntime threads spin: a little lower latency, but the spinning "
        "cores are lost to image decoding",
    )
    max_batch_size: int = Field(
        defaults.MAX_BATCH_SIZE,
        ge=1,
        description="largest batch, in images; clamped per model to the batch size its export "
        "verified (metadata max_batch_size)",
    )
    max_delay_ms: float = Field(
        defaults.MAX_DELAY_MS,
        ge=0,
        description="the longest a batch waits, after its first image, for images of admitted "
        "requests still being decoded (a batch starts at once when none are on their way)",
    )
    max_queue_images: int = Field(
        512,
        ge=1,
        description="images waiting for a batch, per model; past this, 503 with Retry-After",
    )
    request_timeout_ms: int = Field(
        30_000, gt=0, description="a request not answered within this gets 504"
    )
    max_request_bytes: int = Field(64 * 2**20, gt=0, description="largest request body (413)")
    max_json_bytes: int = Field(
        4 * 2**20,
        gt=0,
        description="largest JSON part of an Open Inference Protocol request (413): JSON is "
        "parsed in one piece that holds the interpreter, so larger tensors travel as binary data "
        "(the binary tensor data extension, what Triton's clients send by default)",
    )
    max_inflight_bytes: int = Field(
        256 * 2**20,
        gt=0,
        description="request bodies in memory at once, all requests together (HTTP and gRPC; a "
        "body without Content-Length counts as max_request_bytes); past it, 503 with "
        "Retry-After before the body is read",
    )
    max_image_pixels: int = Field(
        25_000_000,
        gt=0,
        description="largest image, width x height, checked before decoding (413); 25 MP takes a "
        "24 MP camera photo. Decoding costs about 4 bytes and a few ms of CPU per thousand "
        "pixels, per decode thread",
    )
    max_request_pixels: int = Field(
        100_000_000,
        gt=0,
        description="pixels of one request's images together, each checked before it is decoded "
        "(413): what one request may cost to decode",
    )
    max_images_per_request: int = Field(64, ge=1, description="most images in one request (413)")
    decode_workers: int = Field(
        0, ge=0, description="threads decoding and preprocessing images (0: one per core)"
    )
    request_head_timeout_ms: int = Field(
        10_000,
        gt=0,
        description="a connection whose request head is not complete this long after it opened "
        "(or after its last answer) is closed",
    )
    max_connections: int = Field(
        1024,
        ge=1,
        description="HTTP connections at once (per worker); past it, a new connection gets a JSON "
        "503 too_many_connections with Retry-After and is closed (behind a proxy, bound "
        "connections and slow clients there too: docs/reliability.md)",
    )
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="front-end processes. 1: everything in one process. N >= 2 (Linux): N worker "
        "processes accept connections on the same ports, parse, authenticate and decode, and "
        "hand tensors through shared memory to this process, which holds the one copy of each "
        "model and batches across all of them; max_connections, max_inflight_bytes, "
        "decode_workers and grpc_max_concurrent_rpcs then apply per worker",
    )
    default_model: str | None = Field(
        None, description="model used when a request names none (needed with several models)"
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After sent with 503 answers")
    drain_delay_ms: int = Field(
        0,
        ge=0,
        description="on SIGTERM, keep serving this long with /readyz at 503 (so load balancers "
        "stop routing here) before closing the listener and finishing accepted requests",
    )
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field(
        "info", description="log level of the service and uvicorn"
    )
    access_log: bool = Field(True, description="log one line per HTTP request")
    grpc_port: int = Field(
        8001,
        ge=0,
        le=65535,
        description="TCP port of the Open Inference Protocol over gRPC, on the same host and "
        "process (0: no gRPC)",
    )
    grpc_max_message_bytes: int = Field(
        48 * 2**20,
        gt=0,
        description="largest gRPC request message (RESOURCE_EXHAUSTED, refused from its length "
        "prefix, unread); below max_request_bytes because grpc holds about three copies of a "
        "message while receiving it. 48 MiB carries 64 ImageNet images as FP32 (38.5 MB)",
    )
    grpc_max_concurrent_rpcs: int = Field(
        256,
        ge=1,
        description="gRPC calls served at once; more are refused (RESOURCE_EXHAUSTED). grpc "
        "receives a call's whole message before it runs, so this times grpc_max_message_bytes "
        "bounds that memory: lower either where requests are small",
    )
    model_control_mode: Literal["none", "poll", "explicit"] = Field(
        "none",
        description="live model updates (Triton's names): none: the versions present at start "
        "are served until exit; poll: a new version appearing in the repository is loaded, "
        "warmed and swapped in; explicit: POST /v2/repository/models/NAME/load|unload do it on "
        "request (needs a management token)",
    )
    repository_poll_secs: float = Field(
        5.0, gt=0, description="with model_control_mode=poll: seconds between repository scans"
    )
    inference_token_file: Path | None = Field(
        None,
        description="file holding the bearer token that inference (and, when protected, "
        "metrics and docs) requires; or set RESNET_SERVE_INFERENCE_TOKEN; unset: open",
    )
    management_token_file: Path | None = Field(
        None,
        description="file holding the bearer token of the repository endpoints (load, unload, "
        "index); or set RESNET_SERVE_MANAGEMENT_TOKEN; required with model_control_mode=explicit",
    )
    inference_token: CliSuppress[SecretStr | None] = Field(
        None,
        description="the inference token itself (environment only, never a flag)",
        json_schema_extra={"env_only": True},
    )
    management_token: CliSuppress[SecretStr | None] = Field(
        None,
        description="the management token itself (environment only, never a flag)",
        json_schema_extra={"env_only": True},
    )
    protect_metrics: bool = Field(
        True, description="with an inference token: /metrics needs a token too"
    )
    protect_docs: bool = Field(
        True, description="with an inference token: /docs, /redoc and /openapi.json need one too"
    )
    otlp_endpoint: str | None = Field(
        None,
        description="send OpenTelemetry traces to this OTLP/gRPC collector (e.g. "
        "http://localhost:4317); also taken from OTEL_EXPORTER_OTLP_ENDPOINT; unset: tracing off, "
        "at no cost",
    )
    _tokens: dict[str, bytes | None] = PrivateAttr(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _standard_otlp_variable(cls, data: Any) -> Any:
        """OpenTelemetry's own variable, when ours is not set (ours wins)."""
        if isinstance(data, dict) and data.get("otlp_endpoint") is None:
            standard = os.environ.get(OTEL_ENDPOINT_VARIABLE)
            if standard:
                data = {**data, "otlp_endpoint": standard}
        return data

    @model_validator(mode="after")
    def _check_across_fields(self) -> Self:
        providers = self.provider_list
        if providers != "auto" and self.require_cuda and CUDA not in providers:
            raise ValueError(f"require_cuda is set but providers={self.providers!r} omit CUDA")
        if providers != "auto" and (self.cuda_graph or self.tensorrt) and CUDA not in providers:
            wanted = "cuda_graph" if self.cuda_graph else "tensorrt"
            raise ValueError(f"{wanted} is set but providers={self.providers!r} omit CUDA")
        try:
            self.engine_config()  # the engine's own checks (cuda_graph needs io_binding, ...)
        except EngineError as exc:
            raise ValueError(str(exc)) from None
        if self.max_images_per_request > self.max_queue_images:
            raise ValueError(
                f"max_images_per_request ({self.max_images_per_request}) exceeds "
                f"max_queue_images ({self.max_queue_images}): such a request could never be queued"
            )
        if self.max_batch_size > self.max_queue_images:
            raise ValueError(
                f"max_batch_size ({self.max_batch_size}) exceeds max_queue_images "
                f"({self.max_queue_images}): batches that size could never form"
            )
        if self.max_request_pixels < self.max_image_pixels:
            raise ValueError(
                f"max_request_pixels ({self.max_request_pixels}) is below max_image_pixels "
                f"({self.max_image_pixels}): the largest image could never be decoded"
            )
        if self.max_inflight_bytes < self.max_request_bytes:
            raise ValueError(
                f"max_inflight_bytes ({self.max_inflight_bytes}) is below max_request_bytes "
                f"({self.max_request_bytes}): the largest request could never be read"
            )
        if self.request_timeout_ms <= self.max_delay_ms:
            raise ValueError("request_timeout_ms must be longer than max_delay_ms")
        for kind in ("inference", "management"):
            if getattr(self, f"{kind}_token") is not None and getattr(self, f"{kind}_token_file"):
                raise ValueError(
                    f"both {kind}_token_file and RESNET_SERVE_{kind.upper()}_TOKEN are set: "
                    "give one"
                )
            # Read once, here: unreadable or empty is refused before anything loads.
            self._tokens[kind] = self._read_token(kind)
        if self.model_control_mode == "explicit" and self.token("management") is None:
            raise ValueError(
                "model_control_mode=explicit enables the repository endpoints, which change what "
                "is served: give them a management token (management_token_file or "
                "RESNET_SERVE_MANAGEMENT_TOKEN)"
            )
        return self

    def token(self, kind: TokenKind) -> bytes | None:
        """The bearer token of `kind` (from its file or its variable, as read at validation),
        or None when unset."""
        return self._tokens[kind]

    def _read_token(self, kind: TokenKind) -> bytes | None:
        """Raises ValueError when the file cannot be read or the token is empty."""
        secret: SecretStr | None = getattr(self, f"{kind}_token")
        path: Path | None = getattr(self, f"{kind}_token_file")
        if secret is not None:
            value = secret.get_secret_value()
        elif path is not None:
            try:
                value = path.read_text("utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"{kind}_token_file {path}: cannot read: {exc}") from None
        else:
            return None
        value = value.strip()  # files end in a newline; secrets mounted by Kubernetes may not
        if not value or any(c.isspace() for c in value) or not value.isascii():
            raise ValueError(
                f"the {kind} token must be non-empty printable ASCII without spaces "
                "(never shown here)"
            )
        if len(value) < MIN_TOKEN_CHARS:
            raise ValueError(
                f"the {kind} token is shorter than {MIN_TOKEN_CHARS} characters: use a random "
                "one, e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        return value.encode("ascii")

    def engine_config(self) -> EngineConfig:
        """How the service builds engines (the benchmark builds them the same way)."""
        return EngineConfig(
            providers=self.provider_list,
            require_cuda=self.require_cuda,
            intra_op_threads=self.intra_op_threads,
            allow_spinning=self.allow_spinning,
            cudnn_conv_algo_search=self.cudnn_conv_algo_search,
            io_binding=self.io_binding,
            cuda_tf32=self.cuda_tf32,
            cuda_graph=self.cuda_graph,
            tensorrt=self.tensorrt,
            tensorrt_cache_dir=str(self.tensorrt_cache_dir) if self.tensorrt_cache_dir else None,
            max_batch_size=self.max_batch_size,
        )

    @property
    def provider_list(self) -> tuple[str, ...] | Literal["auto"]:
        """`providers` parsed: "auto", or full onnxruntime provider names in order."""
        if self.providers.strip().lower() == "auto":
            return "auto"
        names = [p.strip() for p in self.providers.split(",") if p.strip()]
        if not names:
            raise ValueError("providers is empty; use auto or a comma-separated list")
        return tuple(_PROVIDER_ALIASES.get(n.lower(), n) for n in names)
