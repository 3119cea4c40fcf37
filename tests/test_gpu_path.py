"""The CUDA path on CPU stand-ins: everything but the device itself runs here.

IO binding with CPU OrtValues (bound inputs, preallocated outputs, one buffer set per batch size,
reused), per-size warm-up, provider selection and the refusals of settings that need a GPU, the
fp16 export and the service's refusal to serve it on the CPU, and `make gpu-check` refusing a
host without CUDA.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import psutil
import pytest
from fastapi.testclient import TestClient

from bench.http_mode import HttpOptions, split_cpus, target
from contract.repository import scan_repository
from export.precision import convert_fp16
from runtime.engines import (
    CPU,
    CUDA,
    TENSORRT,
    EngineConfig,
    EngineError,
    resolve_providers,
    warm,
)
from runtime.engines.onnxruntime_engine import OrtEngine
from runtime.engines.providers import provider_options, tensorrt_cache_dir
from service.core.registry import ServedModel, check_fp16_device
from service.core.settings import Settings
from service.protocols.app import create_app

from .conftest import CIFAR_CHECKPOINT_FILES, CIFAR_CHECKPOINTS, PHOTOS, ROOT, require
from .support.graphs import conv_graph, tiny_graph, write_entry
from .support.images import sample_images
from .support.service import multipart, run_module, service_cli, wait_ready

CROP = 16
NAMES = ["logits", "embedding"]
# What a host without CUDA answers (CI's); on a GPU host these answers differ by design.
cpu_build = pytest.mark.skipif(
    CUDA in ort.get_available_providers(),
    reason="about an onnxruntime build without CUDA; this one has it",
)


@pytest.fixture
def conv_repo(tmp_path: Path) -> Path:
    """A 3-layer convolution graph (real arithmetic, dynamic batch) as a repository entry."""
    write_entry(
        tmp_path, "conv", conv_graph(CROP, 10, layers=3, channels=8), crop=CROP, classes=10, dim=8
    )
    return tmp_path


def _engine(repo: Path, **config: Any) -> OrtEngine:
    entry = scan_repository(repo)["conv"]
    return OrtEngine(
        entry.model_file,
        EngineConfig(providers=(CPU,), intra_op_threads=1, **config),
        input_name="images",
        output_names=NAMES,
        input_shape=(3, CROP, CROP),
    )


def test_io_binding_on_cpu_matches_the_plain_path_and_reuses_its_buffers(conv_repo: Path) -> None:
    plain = _engine(conv_repo)  # auto: no IO binding on the CPU provider
    bound = _engine(conv_repo, io_binding="on")
    assert (plain.io_binding, bound.io_binding) == (False, True)
    assert bound.bound_batch_sizes == []

    rng = np.random.default_rng(0)
    first = rng.standard_normal((5, 3, CROP, CROP), dtype=np.float32)
    expected_first = plain.run(first)
    got_first = bound.run(first)
    buffers = bound.bound_batch(5)
    input_address = buffers.input.data_ptr()
    output_addresses = [o.data_ptr() for o in buffers.outputs]
    for ours, theirs in zip(got_first, expected_first, strict=True):
        np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)

    for size in (5, 2, 5, 7, 2):
        batch = rng.standard_normal((size, 3, CROP, CROP), dtype=np.float32)
        for ours, theirs in zip(bound.run(batch), plain.run(batch), strict=True):
            assert ours.shape == theirs.shape and ours.dtype == np.float32
            np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)

    # Same objects and the same memory for every batch of a size: allocated and bound once.
    assert bound.bound_batch(5) is buffers
    assert buffers.input.data_ptr() == input_address
    assert [o.data_ptr() for o in buffers.outputs] == output_addresses
    assert bound.bound_batch_sizes == [2, 5, 7]
    assert buffers.input.shape() == [5, 3, CROP, CROP]
    assert [o.shape() for o in buffers.outputs] == [[5, 10], [5, 8]]
    # Answers handed out earlier are copies: later batches did not overwrite them.
    for ours, theirs in zip(got_first, expected_first, strict=True):
        np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


def test_warm_up_allocates_every_size_it_runs(conv_repo: Path) -> None:
    bound = _engine(conv_repo, io_binding="on")
    assert bound.warm_runs == 1 and not bound.cuda_graph  # CUDA graphs need a GPU session
    assert warm(bound, range(1, 5), (3, CROP, CROP)) == [1, 2, 3, 4]
    assert bound.bound_batch_sizes == [1, 2, 3, 4]


def test_io_binding_off_never_binds(conv_repo: Path) -> None:
    engine = _engine(conv_repo, io_binding="off")
    engine.run(np.zeros((3, 3, CROP, CROP), dtype=np.float32))
    assert not engine.io_binding and engine.bound_batch_sizes == []


@contextlib.contextmanager
def _client(repo: Path, **values: Any) -> Iterator[TestClient]:
    settings = Settings(
        model_repository=repo, max_delay_ms=1, intra_op_threads=1, max_batch_size=4, **values
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        wait_ready(client)
        yield client


def _embed(client: TestClient, blobs: list[bytes]) -> np.ndarray:
    response = client.post("/embed?model=conv", files=multipart(blobs))
    assert response.status_code == 200, response.text
    return np.asarray(response.json()["embeddings"], dtype=np.float32)


def test_service_serves_through_io_binding_with_every_size_warmed(conv_repo: Path) -> None:
    blobs = sample_images(3, size=24)
    with _client(conv_repo, io_binding="on", warmup_batch_sizes="all") as client:
        model = client.get("/models/conv").json()
        assert model["provider"] == CPU and model["io_binding"] is True
        assert model["warmed_batch_sizes"] == [1, 2, 3, 4]
        gpu = model["gpu"]
        assert gpu["bound_batch_sizes"] == [1, 2, 3, 4]
        assert gpu["io_binding_setting"] == "on" and gpu["warmup_batch_sizes_setting"] == "all"
        assert (gpu["cuda_tf32"], gpu["cuda_graph"], gpu["tensorrt"]) == (False, False, False)
        assert (gpu["jpeg_decoder"], gpu["allow_fp16_on_cpu"]) == ("pillow", False)
        bound = _embed(client, blobs)
    with _client(conv_repo) as client:  # defaults on CPU: no binding, extremes warmed
        model = client.get("/models/conv").json()
        assert model["io_binding"] is False and model["warmed_batch_sizes"] == [1, 4]
        assert model["gpu"]["bound_batch_sizes"] == []
        plain = _embed(client, blobs)
    np.testing.assert_allclose(bound, plain, atol=1e-5, rtol=0)


@cpu_build
def test_auto_providers_on_a_cpu_build_and_the_cuda_requirement() -> None:
    assert resolve_providers(EngineConfig()) == [CPU]
    with pytest.raises(EngineError, match=r"CUDA is required .* Install onnxruntime-gpu"):
        resolve_providers(EngineConfig(require_cuda=True))
    with pytest.raises(EngineError, match="not available in this onnxruntime build"):
        resolve_providers(EngineConfig(providers=(CUDA, CPU)))


@cpu_build
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--require-cuda"], "cannot start: CUDA is required (require_cuda) but"),
        (["--providers", "cuda"], "are not available in this onnxruntime build"),
        (["--cuda-graph"], "cannot start: cuda_graph needs the CUDA execution provider"),
        (["--tensorrt"], "cannot start: tensorrt needs ['TensorrtExecutionProvider'"),
        (["--jpeg-decoder", "nvimgcodec"], "cannot start: jpeg_decoder=nvimgcodec needs NVIDIA"),
        (["--cuda-graph", "--io-binding", "off"], "cuda_graph replays fixed device buffers"),
        (["--providers", "cpu", "--tensorrt"], "tensorrt is set but providers='cpu' omit CUDA"),
        (["--cuda-graph", "--tensorrt"], "drop it with tensorrt"),
        (["--io-binding", "always"], "io_binding: Input should be 'auto', 'on' or 'off'"),
    ],
)
def test_settings_that_need_a_gpu_are_refused_in_one_line(
    conv_repo: Path, flags: list[str], message: str
) -> None:
    result = service_cli("--model-repository", str(conv_repo), "--port", "0", *flags)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    lines = [ln for ln in result.stderr.splitlines() if message in ln]
    assert len(lines) == 1


def test_cuda_provider_options_follow_the_settings(tmp_path: Path) -> None:
    default = provider_options([CUDA, CPU], EngineConfig())
    assert default[0]["use_tf32"] == "0" and "enable_cuda_graph" not in default[0]
    assert default[0]["cudnn_conv_algo_search"] == "EXHAUSTIVE" and default[1] == {}
    tuned = provider_options([CUDA], EngineConfig(cuda_tf32=True, cuda_graph=True))
    assert tuned[0]["use_tf32"] == "1" and tuned[0]["enable_cuda_graph"] == "1"


def test_tensorrt_options_cache_under_the_repository_with_one_profile(tmp_path: Path) -> None:
    version_dir = write_entry(tmp_path, "tiny", tiny_graph(8, 4), crop=8, classes=4, dim=3)
    model = version_dir / "model.onnx"
    config = EngineConfig(tensorrt=True, max_batch_size=64)
    options = provider_options(
        [TENSORRT, CUDA, CPU], config, model_path=model, input_name="images", input_shape=(3, 8, 8)
    )[0]
    cache = tmp_path.resolve() / ".tensorrt-cache" / "tiny" / "1"
    assert tensorrt_cache_dir(config, model) == cache and cache.is_dir()
    assert options["trt_engine_cache_enable"] == "1"
    assert options["trt_engine_cache_path"] == str(cache)
    assert options["trt_profile_min_shapes"] == "images:1x3x8x8"
    assert options["trt_profile_max_shapes"] == "images:64x3x8x8"
    assert list(scan_repository(tmp_path)) == ["tiny"]  # the cache is not taken for a model
    elsewhere = EngineConfig(tensorrt=True, tensorrt_cache_dir=str(tmp_path / "trt"))
    assert tensorrt_cache_dir(elsewhere, model) == tmp_path / "trt" / "tiny" / "1"


def _fp16_repo(repo: Path) -> Path:
    """The tiny graph converted to fp16 by the exporter's converter, as an fp16 entry."""
    source = repo / "fp32.onnx"
    source.write_bytes(tiny_graph(CROP, 4))
    converted = repo / "fp16.onnx"
    convert_fp16(source, converted)
    gate = {"passed": True, "device": CPU, "precision": "fp16"}
    write_entry(
        repo / "repo",
        "tiny_fp16",
        converted.read_bytes(),
        crop=CROP,
        classes=4,
        dim=3,
        precision="fp16",
        precision_gate=gate,
    )
    return repo / "repo"


@cpu_build
def test_fp16_models_are_refused_on_cpu_unless_allowed(tmp_path: Path) -> None:
    repo = _fp16_repo(tmp_path)
    result = service_cli("--model-repository", str(repo), "--port", "0")
    assert result.returncode == 2
    refusal = [ln for ln in result.stderr.splitlines() if "cannot start" in ln]
    assert len(refusal) == 1, result.stderr
    assert "tiny_fp16 v1 is fp16 (gated on CPUExecutionProvider)" in refusal[0]
    assert "--allow-fp16-on-cpu" in refusal[0]

    with _client(repo, allow_fp16_on_cpu=True) as client:
        model = client.get("/models/tiny_fp16").json()
        assert model["metadata"]["precision"] == "fp16" and model["provider"] == CPU
        assert model["gpu"]["allow_fp16_on_cpu"] is True
        response = client.post("/classify", files=multipart(sample_images(2, size=24)))
        assert response.status_code == 200, response.text
        assert len(response.json()["predictions"]) == 2


@cpu_build
def test_fp16_export_keeps_float32_io_and_records_the_gate_device(tmp_path: Path) -> None:
    checkpoint = require(CIFAR_CHECKPOINTS / CIFAR_CHECKPOINT_FILES[20][0])
    result = run_module(
        "export",
        "cifar_resnet20",
        "--weights",
        str(checkpoint),
        "--out",
        str(tmp_path),
        "--precision",
        "fp16",
        "--gate-images",
        str(require(PHOTOS)),
        timeout_s=600,
    )
    assert result.returncode == 0, result.stderr
    notes = [ln for ln in result.stdout.splitlines() if ln.startswith("note:")]
    assert notes == [
        "note: the fp16 gate ran on CPUExecutionProvider (no CUDA on this host); the CPU "
        "computes fp16 differently from CUDA, so re-export on a GPU host to gate what a GPU "
        "will serve"
    ]
    version = tmp_path / "cifar_resnet20_fp16" / "1"
    meta = json.loads((version / "metadata.json").read_text())
    assert (meta["precision"], meta["engine"]) == ("fp16", "onnxruntime")
    gate = meta["precision_gate"]
    assert gate["passed"] is True and gate["device"] == CPU
    assert gate["agreement"]["top1_agreement"] >= 0.95
    assert meta["parity"]["device"] == CPU

    graph = onnx.load(str(version / "model.onnx"))
    float_type = onnx.TensorProto.FLOAT
    assert [i.type.tensor_type.elem_type for i in graph.graph.input] == [float_type]
    assert [o.type.tensor_type.elem_type for o in graph.graph.output] == [float_type] * 2
    weights = [t for t in graph.graph.initializer if t.dims and np.prod(t.dims) > 16]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)


@cpu_build
def test_gpu_check_refuses_a_host_without_cuda_at_once(tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    started = time.monotonic()
    result = run_module("bench", "gpu", "--out", str(out), "--images", str(PHOTOS), timeout_s=60)
    elapsed = time.monotonic() - started
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("bench gpu failed: no CUDA GPU here: onnxruntime")
    assert not out.exists()  # nothing measured, nothing written
    assert elapsed < 20  # no export, no model load: the import of onnxruntime and out


def test_make_gpu_check_runs_bench_gpu() -> None:
    result = subprocess.run(
        ["make", "-n", "gpu-check", "BIN=.venv/bin"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert "-m bench gpu --out bench-results/gpu" in result.stdout


def test_http_load_generator_and_service_on_disjoint_cores(tmp_path: Path) -> None:
    """What `bench gpu` does at c=64/256: the service started on its cores, the load generator
    kept to its own (`bench http --client-cores`)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip(f"needs 2 cores to split, this machine gives {len(cores)}")
    repo = tmp_path / "repo"
    write_entry(repo, "tiny", tiny_graph(8, 4), crop=8, classes=4, dim=3)
    service_cpus, client_cpus = split_cpus(1)
    assert (service_cpus, client_cpus) == (tuple(cores[:-1]), (cores[-1],))
    options = HttpOptions(
        url=None,
        model="tiny",
        endpoint="classify",
        images=(),
        images_per_request=1,
        concurrency=(1,),
        rates=(),
        requests=1,
        duration_s=10,
        timeout_s=10,
        warmup_requests=0,
        max_connections=1,
        raw_body=False,
        client="wire",
        start_service=repo,
        service_ready_timeout_s=60,
        service_cpus=service_cpus,
        client_cpus=client_cpus,
    )
    with target(options, tmp_path / "out"):
        children = [c for c in psutil.Process().children() if "service" in c.cmdline()]
        assert len(children) == 1
        assert children[0].cpu_affinity() == list(service_cpus)
        assert os.sched_getaffinity(0) == set(client_cpus)
    assert os.sched_getaffinity(0) == set(cores)


def test_io_binding_learns_output_shapes_the_graph_leaves_open(tmp_path: Path) -> None:
    """Outputs declared [N, classes] with `classes` symbolic: the shapes of a batch size come
    from one plain run at its first use (never captured as a CUDA graph: gpu_graph_id -1)."""
    model = onnx.load_from_string(tiny_graph(8, 4))
    for output in model.graph.output:
        output.type.tensor_type.shape.dim[1].dim_param = f"{output.name}_width"
    path = tmp_path / "open.onnx"
    onnx.save(model, str(path))
    config = EngineConfig(providers=(CPU,), intra_op_threads=1)
    io = {"input_name": "images", "output_names": NAMES, "input_shape": (3, 8, 8)}
    bound = OrtEngine(path, config, io_binding=True, **io)
    plain = OrtEngine(path, config, **io)
    batch = np.random.default_rng(1).standard_normal((3, 3, 8, 8), dtype=np.float32)
    for ours, theirs in zip(bound.run(batch), plain.run(batch), strict=True):
        np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    assert [o.shape() for o in bound.bound_batch(3).outputs] == [[3, 4], [3, 3]]


def test_gpu_sessions_warm_every_size_and_may_serve_fp16(tmp_path: Path) -> None:
    """The decisions taken on a GPU provider, asked directly (no GPU session here)."""
    repo = _fp16_repo(tmp_path)
    entry = scan_repository(repo)["tiny_fp16"]
    settings = Settings(model_repository=repo, max_batch_size=6)
    model = ServedModel(entry, settings)
    assert model.warmup_sizes(CUDA) == [1, 2, 3, 4, 5, 6]
    assert model.warmup_sizes(TENSORRT) == [1, 2, 3, 4, 5, 6]
    assert model.warmup_sizes(CUDA, "extremes") == [1, 6]
    assert model.warmup_sizes(CPU) == [1, 6]
    assert model.warmup_sizes(CPU, "all") == [1, 2, 3, 4, 5, 6]
    check_fp16_device(entry, CUDA, settings)  # served where it was made for: no refusal
    with pytest.raises(EngineError, match="--allow-fp16-on-cpu"):
        check_fp16_device(entry, CPU, settings)


@cpu_build
def test_gpu_check_steps_run_on_cpu_stand_ins(tmp_path: Path) -> None:
    """`bench gpu`'s steps with the CPU provider where the GPU would be: export and gate, engine
    rows, HTTP with split cores, the results files. On a GPU host the same functions get CUDA."""
    from bench.gpu import (
        GpuCheckOptions,
        engine_rows,
        export_all,
        http_levels,
        render_markdown,
        single_model_repository,
        write_results,
    )
    from bench.machine import machine_facts

    options = GpuCheckOptions(
        out=tmp_path,
        images=require(PHOTOS),
        weights_dir=tmp_path / "no-weights",
        archs=("cifar_resnet20",),
        batch_sizes=(1, 4),
        concurrency=(2,),
        client_cores=1,
        http_max_batch_size=4,
        http_model="cifar_resnet20",
        http_requests=6,
        devices=(CPU,),
    )
    repo = tmp_path / "repo"
    exported = {p: export_all(options, repo, p) for p in ("fp32", "fp16")}
    fp32_row, fp16_row = exported["fp32"]["models"][0], exported["fp16"]["models"][0]
    assert (fp32_row["model"], fp32_row["parity_device"], fp32_row["parity_passed"]) == (
        "cifar_resnet20",
        CPU,
        True,
    )
    assert (fp16_row["model"], fp16_row["gate_device"]) == ("cifar_resnet20_fp16", CPU)
    assert fp16_row["gate_top1_agreement"] >= 0.95

    cpu = {"providers": "cpu", "require_cuda": False}
    engine = engine_rows(repo, ["cifar_resnet20", "cifar_resnet20_fp16"], (1, 4), cpu, warmup=1)
    rows = [(r["model"], r["batch_size"], r["providers"][0]) for r in engine["rows"]]
    assert sorted(rows) == sorted(
        (m, b, CPU) for m in ("cifar_resnet20", "cifar_resnet20_fp16") for b in (1, 4)
    )

    env = {"RESNET_SERVE_REQUIRE_CUDA": "false", "RESNET_SERVE_PROVIDERS": "cpu"}
    http_repo = single_model_repository(repo, tmp_path / "http-repo", "cifar_resnet20")
    http = http_levels(options, http_repo, tmp_path / "http", (2,), env)
    (level,) = http["closed"]
    assert level["statuses"] == {"200": 6} and level["concurrency"] == 2
    assert set(http["cpus"]["service"]).isdisjoint(http["cpus"]["client"])
    assert http["service_env"]["RESNET_SERVE_MAX_BATCH_SIZE"] == "4"

    results: dict[str, Any] = {
        "steps": {"export_fp32": {"status": "ok", "seconds": 1.0}},
        "export_fp32": exported["fp32"],
        "export_fp16": exported["fp16"],
        "engine": engine,
        "http": http,
        "machine": machine_facts(),
        "command": "test",
    }
    written = write_results(tmp_path / "results", results, [])
    assert [p.name for p in written] == ["results.json", "results.md"]
    markdown = render_markdown(results, [])
    assert "Verdict: all required steps passed." in markdown
    assert f"| cifar_resnet20_fp16 | {CPU} |" in markdown
    assert "| cifar_resnet20 | 20 | 0.27 | 0.041 | 4 |" in markdown
    assert "| 2 | 6 | 1 |" in markdown  # the HTTP level: concurrency, requests, images/request
