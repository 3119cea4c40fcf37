"""The serving tax (issue 26, item 4) on tiny inputs: `bench floor`, `bench free-model`, the tax
columns of `bench http` and `bench tax`, each end to end against real processes on 127.0.0.1.

Figures are never judged here (they depend on the machine): the tests check that they are
measured, positive where they must be, and that every ratio is computed from them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from bench.__main__ import main
from bench.cpu import batch_sizes_for, inference_ms_per_image, process_cpu_s
from bench.floor import FloorServer
from bench.free_model import reference, weights, write_free_model
from bench.http_mode import models_of
from bench.tax import TARGETS
from contract.repository import scan_repository
from tests.support.images import sample_images
from tests.support.launcher import Service
from tests.support.wire import multipart

from .conftest import SHARED_DATA, require

CIFAR_SAMPLES = SHARED_DATA / "cifar10-test" / "samples"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real CIFAR-10 test PNGs: the first six of the shared samples."""
    directory = tmp_path_factory.mktemp("tax-images")
    for path in sorted(require(CIFAR_SAMPLES).glob("*.png"))[:6]:
        (directory / path.name).write_bytes(path.read_bytes())
    return directory


@pytest.fixture(scope="module")
def free_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("free-repo")
    assert main(["free-model", "--out", str(repo)]) == 0
    return repo


def test_process_cpu_counts_the_process_and_its_children() -> None:
    burn = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"
    burn += "time.sleep(30)"
    before = process_cpu_s(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", burn])
    try:
        deadline = time.monotonic() + 20
        while process_cpu_s(os.getpid()) - before < 0.25 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process_cpu_s(os.getpid()) - before >= 0.25  # the child's CPU, counted live
    finally:
        child.kill()
        child.wait()
    assert process_cpu_s(2**22 + 1) == 0.0  # no such process


def test_inference_cpu_is_interpolated_at_the_mean_batch() -> None:
    cost = {"batches": {"1": {"cpu_ms_per_batch": 1.0}, "4": {"cpu_ms_per_batch": 2.0}}}
    cost["batches"]["5"] = {"cpu_ms_per_batch": 3.0}
    assert inference_ms_per_image(cost, 1.0) == pytest.approx(1.0)
    assert inference_ms_per_image(cost, 4.0) == pytest.approx(0.5)
    assert inference_ms_per_image(cost, 4.5) == pytest.approx(2.5 / 4.5)
    assert batch_sizes_for([1.0, 4.5]) == (1, 4, 5)
    assert batch_sizes_for([7.0], one_request=2) == (2, 7)


def test_the_floor_answers_as_bench_http_expects(tmp_path: Path) -> None:
    with FloorServer(tmp_path / "floor.log") as floor:
        floor.wait_ready()
        assert list(models_of(floor.url)) == ["floor"]
        assert httpx.get(f"{floor.url}/metrics").status_code == 404
        content_type, body = multipart(sample_images(3))
        answer = httpx.post(
            f"{floor.url}/classify", content=body, headers={"content-type": content_type}
        )
        assert answer.status_code == 200 and len(answer.json()["predictions"]) == 3
        embed = httpx.post(
            f"{floor.url}/embed", content=b"\x89PNG", headers={"content-type": "image/png"}
        )
        assert len(embed.json()["embeddings"]) == 1


def test_floor_mode_measures_each_level(images: Path, tmp_path: Path) -> None:
    argv = ["floor", "--images", str(images), "--concurrency", "1,4", "--requests", "300"]
    argv += ["--warmup-requests", "4", "--out", str(tmp_path)]
    assert main(argv) == 0
    floor = json.loads((tmp_path / "results.json").read_text())["floor"]
    assert "http=" in floor["server"]  # what the service's http_config builds
    assert [lv["concurrency"] for lv in floor["closed"]] == [1, 4]
    for level in floor["closed"]:
        assert level["statuses"] == {"200": 300}
        assert level["requests_per_s"] > 0 and level["latency"]["p99_ms"] > 0
        assert level["server_cpu_ms_per_request"] > 0
    assert "## The Python floor" in (tmp_path / "results.md").read_text()


def test_the_free_model_is_served_like_any_export(free_repo: Path, tmp_path: Path) -> None:
    entry = scan_repository(free_repo)["free_cifar"]
    parity = entry.metadata.parity.model_dump()
    assert parity["passed"] and parity["batch_sizes"] == [1, 7, 32]
    assert entry.input_shape == (3, 32, 32) and entry.labels[3] == "cat"
    assert entry.trained is False
    path, written = write_free_model(free_repo)  # the same graph: reused, not a new version
    assert (path, written) == (entry.path, False)
    weight, bias = weights()
    logits, embedding = reference(np.ones((2, 3, 32, 32), np.float32), weight, bias)
    assert np.allclose(embedding, 1.0) and np.allclose(logits, weight.sum(1) + bias)
    cat = require(CIFAR_SAMPLES / "cat_domestic_cat_s_000907.png").read_bytes()
    with Service(free_repo, tmp_path / "service.log") as service:
        service.wait_ready()
        answer = httpx.post(
            f"{service.url}/classify?top_k=10", files={"file": ("cat.png", cat, "image/png")}
        )
    assert answer.status_code == 200
    labels = {p["label"] for p in answer.json()["predictions"][0]}
    assert labels == set(entry.labels)


def test_http_mode_reports_the_tax_per_level(free_repo: Path, images: Path, tmp_path: Path) -> None:
    argv = ["http", "--start-service", "--repository", str(free_repo), "--images", str(images)]
    argv += ["--concurrency", "1,3", "--requests", "150", "--warmup-requests", "3"]
    argv += ["--out", str(tmp_path)]
    assert main(argv) == 0
    http = json.loads((tmp_path / "results.json").read_text())["http"]
    for level in http["closed"]:
        tax = level["tax"]
        assert tax["server_cpu_ms_per_request"] > 0 and tax["inference_cpu_ms_per_request"] > 0
        outside = tax["server_cpu_ms_per_request"] - tax["inference_cpu_ms_per_request"]
        assert tax["outside_inference_cpu_ms_per_request"] == pytest.approx(outside)
    engine = http["tax"]["engine"]
    assert engine["model_sha256"] == http["model_info"]["model_sha256"]
    assert "1" in engine["batches"] and engine["batches"]["1"]["cpu_ms_per_batch"] > 0
    c1 = http["closed"][0]["latency"]["p50_ms"]
    assert http["tax"]["c1_added_ms"] == pytest.approx(c1 - http["tax"]["engine_batch_p50_ms"])
    markdown = (tmp_path / "results.md").read_text()
    assert "outside inference ms/request" in markdown and "c=1 latency added" in markdown


def check_tax(tax: dict[str, Any]) -> None:
    engine = tax["engine"]
    assert engine["batch1_p50_ms"] > 0 and engine["best_images_per_s"] > 0
    rows = {(r["workload"], r["concurrency"]): r for r in tax["rows"]}
    floor, http = rows[("floor (minimal ASGI app)", 2)], rows[("CIFAR ResNet-20, HTTP", 2)]
    grpc = rows[("CIFAR ResNet-20, gRPC", 2)]
    assert ("free model, HTTP", 2) in rows and ("CIFAR ResNet-20, HTTP", 1) in rows
    for row in tax["rows"]:
        assert row["errors"] == 0 and row["requests_per_s"] > 0 and row["p50_ms"] > 0
        assert row["server_cpu_ms_per_request"] > 0
    figures = tax["figures"]
    c1 = rows[("CIFAR ResNet-20, HTTP", 1)]["p50_ms"]
    assert figures["c1_added_ms"] == pytest.approx(c1 - engine["batch1_p50_ms"])
    best = engine["best_images_per_s"]
    assert figures["http_vs_engine"] == pytest.approx(http["images_per_s"] / best)
    assert figures["grpc_vs_engine"] == pytest.approx(grpc["images_per_s"] / best)
    outside = http["outside_inference_ms_per_request"]
    assert figures["outside_vs_floor"] == pytest.approx(
        outside / floor["server_cpu_ms_per_request"]
    )
    one, two = (
        rows[("free model, HTTP, --workers 1", 2)],
        rows[("free model, HTTP, --workers 2", 2)],
    )
    assert figures["workers_2_vs_1"] == pytest.approx(two["requests_per_s"] / one["requests_per_s"])
    assert [t["key"] for t in tax["targets"]] == list(TARGETS)


def test_tax_mode_writes_every_figure_and_ratio(images: Path, tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    argv = ["tax", "--images", str(images), "--weights-dir", str(root / "weights")]
    argv += ["--cache-repository", str(tmp_path / "cache"), "--concurrency", "2"]
    argv += ["--requests", "150", "--duration-s", "10", "--engine-seconds-per-row", "0.2"]
    argv += ["--out", str(tmp_path / "out")]
    assert main(argv) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    check_tax(results["tax"])
    assert results["tax"]["machine"]["cpu_model"]
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "## The serving tax" in markdown and "| target | this run | target | met |" in markdown
