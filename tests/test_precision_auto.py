"""`--precision auto`: every candidate this host can run is built, gated and measured, and the
fastest that passed is written, with the whole comparison in metadata.json."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient

from contract.cpu import choice_mismatch, cpu_flags, cpu_model
from contract.hashing import sha256_file
from contract.preprocessing import CIFAR
from export.__main__ import main as export_main
from export.calibration import load_calibration
from export.exporter import ExportRequest, ExportResult, export_model
from export.precision import CANDIDATES, GateThresholds, PrecisionError, choose
from service.core.settings import Settings
from service.protocols.app import create_app

from .conftest import CIFAR_CHECKPOINT_FILES, CIFAR_CHECKPOINTS, CIFAR_TEST, PHOTOS, require
from .support.service import wait_ready
from .test_precision import _served_accuracy


def _auto(out: Path, **kw: Any) -> ExportResult:
    checkpoint = require(CIFAR_CHECKPOINTS / CIFAR_CHECKPOINT_FILES[20][0])
    return export_model(
        ExportRequest(
            arch="cifar_resnet20",
            weights=str(checkpoint),
            out=out,
            max_batch_size=32,
            precision="auto",
            calibration_images=load_calibration(require(CIFAR_TEST), CIFAR, 128),
            **kw,
        )
    )


@pytest.fixture(scope="module")
def auto_export(tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    """The real CIFAR ResNet-20, gated on the 2000 labeled CIFAR-10 test images."""
    out = tmp_path_factory.mktemp("auto")
    return _auto(out, gate_images=require(CIFAR_TEST), gate_labeled=require(CIFAR_TEST))


def test_auto_serves_the_fastest_candidate_that_passed(
    auto_export: ExportResult, cifar_test_set: tuple[np.ndarray, np.ndarray]
) -> None:
    meta = auto_export.metadata
    assert auto_export.name == "cifar_resnet20_auto"
    choice = meta["precision_choice"]
    assert choice["host"] == {"cpu_model": cpu_model(), "cpu_flags": cpu_flags()} | {
        "cores": choice["host"]["cores"]
    }
    assert choice["batch_sizes"] == [1, 8, 32]
    rows = {f"{r['precision']}-{r['engine']}": r for r in choice["candidates"]}
    assert list(rows) == [c.key for c in CANDIDATES]  # every candidate is accounted for
    ran = {k: r for k, r in rows.items() if r["status"] in ("chosen", "passed", "failed_gate")}
    # fp32 and both int8 engines run on every x86 host with the dev extras (NNCF, OpenVINO).
    assert {"fp32-onnxruntime", "int8-onnxruntime", "int8-openvino"} <= set(ran)
    for key, row in rows.items():
        if key not in ran:
            assert row["status"] == "unavailable" and row["reason"]
            continue
        assert set(row["images_per_s"]) == {"1", "8", "32"}
        assert all(v > 0 for v in row["images_per_s"].values())
        if key != "fp32-onnxruntime":
            gate = row["gate"]
            assert gate["labeled"]["images"] == 2000 and gate["agreement"]["images"] == 2000
            assert gate["passed"] == (row["status"] != "failed_gate")
    # What OpenVINO really runs: its compiled convolutions are int8, none fell back to f32/bf16.
    kernels = rows["int8-openvino"]["gate"]["kernel_precisions"]
    assert set(kernels) <= {"u8", "i8"} and sum(kernels.values()) == 20  # 19 convs + the FC
    chosen = [k for k, r in rows.items() if r["status"] == "chosen"]
    assert chosen == [choice["chosen"]]
    best = rows[choice["chosen"]]
    passed = [r for r in ran.values() if r["status"] in ("chosen", "passed")]
    assert best["score"] == max(r["score"] for r in passed)
    assert (meta["precision"], meta["engine"]) == (best["precision"], best["engine"])
    assert meta["precision_gate"] == best["gate"]  # None when fp32 won
    # What was measured is what was written, and it keeps the accuracy.
    ops = {n.op_type for n in onnx.load(str(auto_export.path / "model.onnx")).graph.node}
    assert ("QuantizeLinear" in ops) == (meta["precision"] == "int8")
    assert meta["model_sha256"] == sha256_file(auto_export.path / "model.onnx")
    images = load_calibration(CIFAR_TEST, CIFAR, 2000)
    correct = _served_accuracy(auto_export.path, images, cifar_test_set[1])
    assert correct >= 1813 - 6, "at most 0.3 points below the published 1813/2000"


def test_auto_never_serves_a_candidate_that_failed_its_gate(tmp_path: Path) -> None:
    impossible = GateThresholds(min_agreement=1.01)  # no reduced precision can pass
    result = _auto(tmp_path, gate_images=require(PHOTOS), gate_thresholds=impossible)
    rows = result.metadata["precision_choice"]["candidates"]
    failed = [r for r in rows if r["status"] == "failed_gate"]
    assert len(failed) >= 2 and all(r["reason"].startswith("agreement") for r in failed)
    assert all(r["score"] for r in failed), "failed candidates are measured all the same"
    assert result.metadata["precision_choice"]["chosen"] == "fp32-onnxruntime"
    assert (result.metadata["precision"], result.metadata["precision_gate"]) == ("fp32", None)


def test_choose_takes_the_fastest_passed_candidate_only() -> None:
    rows = [
        {"status": "passed", "score": 10.0},
        {"status": "failed_gate", "score": 90.0},
        {"status": "error", "reason": "NNCF failed"},
        {"status": "passed", "score": 30.0},
        {"status": "unavailable", "reason": "no CUDA"},
        {"status": "passed", "score": 30.0},  # a tie goes to the earlier candidate
    ]
    assert choose(rows) == 3
    with pytest.raises(PrecisionError, match="no candidate"):
        choose([{"status": "failed_gate", "score": 90.0}])


def test_an_auto_export_is_skipped_when_asked_the_same(auto_export: ExportResult) -> None:
    again = _auto(
        auto_export.path.parent.parent,
        gate_images=require(CIFAR_TEST),
        gate_labeled=require(CIFAR_TEST),
        skip_if_same_weights=True,
    )
    assert again.skipped and again.version == auto_export.version


def test_the_service_warns_when_the_cpu_differs_from_the_exporting_one(
    auto_export: ExportResult, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The other CPU differs from this one by AMX, whichever of the two has it (CI's CPU changes).
    here = cpu_flags()
    if "amx_tile" in here:
        other, difference = [f for f in here if f != "amx_tile"], "adds amx_tile"
    else:
        other, difference = [*here, "amx_tile"], "lacks amx_tile"
    recorded = {"cpu_model": "Other CPU", "cpu_flags": other}
    assert choice_mismatch({"cpu_model": "x", "cpu_flags": here}) is None
    assert difference in (choice_mismatch(recorded) or "")
    # The same export, as if measured on that other host: the service serves it, with one warning.
    repo = tmp_path / "repo"
    shutil.copytree(auto_export.path.parent.parent, repo)
    path = repo / auto_export.name / str(auto_export.version) / "metadata.json"
    meta = json.loads(path.read_text())
    meta["precision_choice"]["host"].update(recorded)
    path.write_text(json.dumps(meta))
    app = create_app(Settings(model_repository=repo))
    with caplog.at_level(logging.WARNING, logger="service"), TestClient(app) as client:
        wait_ready(client)
    warnings = [r.getMessage() for r in caplog.records if "precision auto" in r.getMessage()]
    assert len(warnings) == 1
    assert "chosen by measurement on Other CPU" in warnings[0] and difference in warnings[0]


def test_the_cli_prints_the_comparison(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "cifar_resnet20",
        "--weights",
        "random:0",
        "--precision",
        "auto",
        "--max-batch-size",
        "8",
        "--gate-images",
        str(require(PHOTOS)),
        "--out",
        str(tmp_path),
        "--name",
        "picked",
    ]
    assert export_main(args) == 0
    out = capsys.readouterr().out
    assert "precision auto on" in out and "images/s at batch 1/8" in out
    assert "int8-onnxruntime  unavailable" in out  # no calibration images given
    assert "int8 needs calibration images" in out
    # Which candidate wins is this host's measurement (bf16 passes and wins on a BF16 CPU, fp32
    # on an AVX2-only one): the table must show what the export recorded, whatever that was.
    meta = json.loads((tmp_path / "picked" / "1" / "metadata.json").read_text())
    choice = meta["precision_choice"]
    printed = {}
    for line in out.splitlines():
        fields = line.split()
        if line.startswith("  ") and len(fields) >= 2:
            printed[fields[0]] = fields[1]
    recorded = {f"{r['precision']}-{r['engine']}": r["status"] for r in choice["candidates"]}
    assert printed == recorded
    assert [k for k, status in printed.items() if status == "chosen"] == [choice["chosen"]]
    assert (meta["precision"], meta["engine"]) == tuple(choice["chosen"].split("-"))
    assert (tmp_path / "picked" / "1" / "model.onnx").is_file()


def test_bench_precision_tabulates_the_comparison(
    auto_export: ExportResult, tmp_path: Path
) -> None:
    from bench.plots import precision_vs_depth
    from bench.precision import summary_row, table

    row = summary_row(auto_export.metadata, export_s=1.0, reused=False)
    choice = auto_export.metadata["precision_choice"]
    assert row["chosen"] == choice["chosen"] and row["depth"] == 20
    fp32 = row["fp32_images_per_s"]
    assert row["speedup"] == {b: row["chosen_images_per_s"][b] / fp32[b] for b in fp32}
    text = table([row])
    assert f"| cifar_resnet20_auto | 20 | {choice['chosen']} |" in text
    assert "bf16-openvino" in text and "fp32-onnxruntime" in text
    png = precision_vs_depth([row], tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
