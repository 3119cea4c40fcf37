"""`python -m bench` on a tiny model: both modes end to end in seconds, plus the pieces they share.

The figures themselves are never asserted (they depend on the machine); the tests check that
every row and level is measured, complete and written as JSON, markdown and a valid PNG.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bench.__main__ import main
from bench.engine import Budget, speedup_targets, time_interleaved
from bench.http_mode import vs_engine
from bench.machine import busy_note
from bench.preset import ensure_preset
from export.exporter import ExportRequest, export_model
from tests.support.load import build_payloads
from tests.support.stats import summarize

from .conftest import PHOTOS, require

ROOT = Path(__file__).resolve().parents[1]
MODEL = "cifar_resnet20"


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("bench-repo")
    export_model(ExportRequest(arch=MODEL, weights="random:0", out=repo, max_batch_size=4))
    return repo


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few encoded images of different formats, sizes and modes."""
    directory = tmp_path_factory.mktemp("bench-images")
    rng = np.random.default_rng(0)
    for i, (size, fmt) in enumerate([((64, 48), "JPEG"), ((40, 40), "PNG"), ((300, 200), "JPEG")]):
        pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(directory / f"{i}.{fmt.lower().replace('jpeg', 'jpg')}", fmt)
    return directory


@pytest.fixture(scope="module")
def engine_out(repository: Path, images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench-out")
    argv = ["engine", "--repository", str(repository), "--batch-sizes", "1,2"]
    argv += ["--iterations", "3", "--warmup", "1", "--max-seconds-per-row", "1"]
    argv += ["--compare-torch", "--with-preprocessing", "--images", str(images), "--out", str(out)]
    assert main(argv) == 0
    return out


def test_the_preset_is_exported_by_the_export_cli_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "cache"
    assert ensure_preset("paper", repo, weights_dir=ROOT / "weights", only=[MODEL]) == [MODEL]
    metadata = json.loads((repo / MODEL / "1" / "metadata.json").read_text())
    assert Path(metadata["weights"]["source"]).name == "resnet20-12fca82f.th"
    ensure_preset("paper", repo, weights_dir=ROOT / "weights", only=[MODEL])
    versions = [p.name for p in (repo / MODEL).iterdir() if p.is_dir()]
    assert versions == ["1"]  # reused, not re-exported
    out, err = capsys.readouterr()
    assert out == ""  # stdout carries bench's tables; export's lines go to stderr
    assert f"{MODEL}: checkpoint" in err and "already present with the same weights" in err
    with pytest.raises(ValueError, match="not in the paper preset"):
        ensure_preset("paper", repo, weights_dir=ROOT / "weights", only=["resnet999"])


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        assert image.size[0] > 200 and image.size[1] > 200
        image.verify()


def test_engine_mode_writes_complete_rows(engine_out: Path) -> None:
    results = json.loads((engine_out / "results.json").read_text())
    engine = results["engine"]
    assert [r["batch_size"] for r in engine["rows"]] == [1, 2]
    for row in engine["rows"]:
        assert row["model"] == MODEL and row["family"] == "cifar" and row["depth"] == 20
        assert row["params"] == 269_722 and row["macs"] > 40_000_000
        ort = row["onnxruntime"]
        assert ort["n"] == 3 and 0 < ort["p50_ms"] <= ort["p90_ms"] <= ort["p99_ms"]
        assert ort["images_per_s"] > 0 and ort["gflops"] > 0
        assert row["torch"]["n"] == 3 and row["speedup"] > 0
        assert row["max_abs_logit_diff"] < 1e-3  # the same weights on both sides
        assert row["with_preprocessing"]["preprocess"]["n"] == 3
    assert engine["torch"]["threads"] == engine["engine_config"]["intra_op_threads_resolved"]
    machine = engine["machine"]
    assert machine["cores"] >= 1 and machine["cpu_model"]
    assert {"onnxruntime", "numpy", "torch"} <= set(machine["libraries"])
    markdown = (engine_out / "results.md").read_text()
    assert "| model | depth | params (M) | GMACs | batch |" in markdown
    assert f"| {MODEL} | 20 | 0.27 | 0.041 | 1 |" in markdown
    assert_png(engine_out / "latency_vs_depth.png")


@pytest.mark.parametrize("client", ["wire", "httpx", "grpc"])
def test_http_mode_against_the_real_service(
    repository: Path, images: Path, engine_out: Path, client: str
) -> None:
    argv = ["http", "--start-service", "--repository", str(repository), "--images", str(images)]
    argv += ["--concurrency", "1,3", "--requests", "6", "--images-per-request", "2"]
    argv += ["--rate", "30", "--warmup-requests", "2", "--duration-s", "30", "--timeout-s", "30"]
    argv += ["--protocol", "grpc"] if client == "grpc" else ["--client", client]
    argv += ["--out", str(engine_out)]
    assert main(argv) == 0
    results = json.loads((engine_out / "results.json").read_text())
    assert "engine" in results  # each mode replaces only its own section
    http = results["http"]
    assert http["model"] == MODEL and http["model_info"]["params"] == 269_722
    assert http["protocol"] == ("grpc" if client == "grpc" else "http")
    assert client == "grpc" or http["client"] == client
    assert [lv["concurrency"] for lv in http["closed"]] == [1, 3]
    assert [lv["rate_per_s"] for lv in http["open"]] == [30.0]
    for level in http["closed"] + http["open"]:
        assert level["statuses"] == {"200": 6} and level["errors"] == 0
        assert level["latency"]["n"] == 6 and level["images_per_s"] > 0
        assert level["client_cpu_s"] > 0
        served = level["service"]  # from the service's /metrics, this level only
        assert served["images"] == 12 and 1 <= served["mean_batch"] <= 12
        assert served["inference_ms_per_image"] > 0
    assert http["vs_engine"]["concurrency"] == 3 and http["vs_engine"]["ratio"] > 0
    markdown = (engine_out / "results.md").read_text()
    assert "## Engine" in markdown and "## HTTP" in markdown and "Open loop" in markdown
    assert_png(engine_out / "throughput_vs_concurrency.png")


def test_http_mode_fails_cleanly_without_a_service(images: Path, tmp_path: Path) -> None:
    argv = ["http", "--url", "http://127.0.0.1:9", "--images", str(images), "--out", str(tmp_path)]
    assert main(argv) == 1
    assert not (tmp_path / "results.json").exists()


def test_bad_lists_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["engine", "--batch-sizes", "1,0"])
    assert exit_info.value.code == 2
    assert "positive integers" in capsys.readouterr().err


def test_summary_percentiles_are_ordered_milliseconds() -> None:
    summary = summarize([0.001 * i for i in range(1, 101)])
    assert summary["n"] == 100
    assert summary["p50_ms"] == pytest.approx(50.5)
    assert summary["p50_ms"] < summary["p90_ms"] < summary["p99_ms"] <= summary["max_ms"]
    assert summarize([]) == {"n": 0}


def test_interleaving_alternates_order_and_respects_the_budget() -> None:
    calls: list[str] = []

    def runner(name: str) -> Any:
        return lambda: calls.append(name) or name

    budget = Budget(iterations=50, warmup=1, min_iterations=4, max_seconds=1e-9)
    samples, first = time_interleaved({"a": runner("a"), "b": runner("b")}, budget)
    assert {len(s) for s in samples.values()} == {4}  # stopped by time, after the minimum
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]
    assert first == {"a": "a", "b": "b"}


def test_speedup_targets_judge_imagenet_rows_only() -> None:
    rows = [
        {"model": "resnet50", "family": "imagenet", "batch_size": 1, "speedup": 2.0},
        {"model": "resnet50", "family": "imagenet", "batch_size": 8, "speedup": 1.2},
        {"model": "resnet50", "family": "imagenet", "batch_size": 32, "speedup": 1.0},
        {"model": "cifar_resnet20", "family": "cifar", "batch_size": 1, "speedup": 1.0},
    ]
    checks = speedup_targets(rows)
    assert [(c["batch_size"], c["met"]) for c in checks] == [(1, True), (8, False)]


def test_payloads_cycle_images_into_multipart_bodies() -> None:
    blobs = [("a.jpg", b"A" * 10), ("b.png", b"B" * 10), ("c.jpg", b"C" * 10)]
    payloads = build_payloads(blobs, 2)
    assert len(payloads) == 3 and all(p.images == 2 for p in payloads)
    assert payloads[0].content_type.startswith("multipart/form-data; boundary=")
    assert payloads[0].body.count(b'name="file"') == 2
    assert b"A" * 10 in payloads[0].body and b"B" * 10 in payloads[0].body
    raw = build_payloads(blobs, 1, raw=True)
    assert raw[1].body == b"B" * 10 and raw[1].content_type == "image/png"
    with pytest.raises(ValueError, match="exactly one image"):
        build_payloads(blobs, 2, raw=True)


def test_vs_engine_compares_the_same_graph_only() -> None:
    http = {
        "model_info": {"model_sha256": "x"},
        "closed": [{"concurrency": 32, "images_per_s": 90.0}],
    }
    row = {
        "model": "m",
        "batch_size": 32,
        "with_preprocessing": {"images_per_s": 100.0},
        "onnxruntime": {"images_per_s": 112.5},
    }
    engine = {"rows": [{**row, "model_sha256": "x"}]}
    assert vs_engine(http, engine, "m")["ratio"] == pytest.approx(0.9)
    assert vs_engine(http, engine, "m")["ratio_engine_only"] == pytest.approx(0.8)
    assert vs_engine(http, {"rows": [{**row, "model_sha256": "y"}]}, "m") is None
    assert vs_engine(http, engine, "other") is None


def test_a_busy_start_is_flagged() -> None:
    assert busy_note({"cores": 2, "load_average_1m_at_start": 0.4}) is None
    assert "busy" in str(busy_note({"cores": 2, "load_average_1m_at_start": 1.6}))
    assert busy_note({"cores": 2, "load_average_1m_at_start": None}) is None


def test_decode_mode_times_every_path_and_judges_exactness(tmp_path: Path) -> None:
    argv = ["decode", "--images", str(require(PHOTOS)), "--runs", "2", "--out", str(tmp_path)]
    cores = os.sched_getaffinity(0)
    assert main(argv) == 0
    assert os.sched_getaffinity(0) == cores  # measured on one core, then given back
    section = json.loads((tmp_path / "decode.json").read_text())["sizes"]["500x375"]
    assert len(section["photos"]) >= 5  # the 500x375 (and 500x374) photos
    rows = {r["path"]: r for r in section["rows"]}
    reference = rows["torchvision's order: Pillow decode, resize all, crop"]
    assert reference["exact"] is True  # against itself
    service = rows["the service: Pillow decode, crop-box resize"]
    assert service["max_abs_diff"] <= 1 / 255 / 0.224 + 1e-6  # one 8-bit level at most
    # libjpeg-turbo behind both decoders: the same pixels, so the same model input.
    assert rows["simplejpeg decode, crop-box resize"]["max_abs_diff"] == service["max_abs_diff"]
    # 500x375 is too small for 1/2 scale: DCT scaling leaves it as it is.
    assert rows["the service with --jpeg-dct-scaling"]["max_abs_diff"] == service["max_abs_diff"]
    assert all(r["ms_per_image"] > 0 for r in rows.values())
    assert "| the service: Pillow decode, crop-box resize |" in (tmp_path / "decode.md").read_text()
