"""Checkpoint -> parity-proven ONNX graph -> versioned model repository entry.

Nothing is written to the repository before parity passed; the graph is traced and checked in a
private temporary directory first.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch

from contract import defaults, repository
from contract.cpu import host_facts
from contract.hashing import sha256_file
from contract.repository import (
    GateReport,
    ModelMetadata,
    OutputSpecs,
    PrecisionChoice,
    TensorSpec,
    Weights,
)
from models.registry import ArchSpec, complexity, get_spec
from runtime.engines import Engine

from . import triton
from .onnx_export import EXPORTER, INPUT_NAME, OPSET, OUTPUT_NAMES, export_onnx
from .parity import Tolerances, check_parity
from .precision import (
    CANDIDATES,
    PRECISIONS,
    Candidate,
    GateData,
    GateThresholds,
    choose,
    images_per_second,
    load_gate_data,
    measure_batch_sizes,
    open_engine,
    reduced_graph,
    run_gate,
    score,
    unavailable,
)
from .weights import load_model

# What `--precision` accepts: a precision, or `auto` (the fastest that passes the gate here).
PRECISION_CHOICES: tuple[str, ...] = (*PRECISIONS, "auto")

# The largest batch the service forms by default: what the parity gate verifies by default.
DEFAULT_MAX_BATCH_SIZE: int = defaults.MAX_BATCH_SIZE


class ExportError(RuntimeError):
    """An export that must not produce a model (parity failed, version exists, bad input)."""


@dataclass
class ExportRequest:
    arch: str
    weights: str
    out: Path
    name: str | None = None
    version: int | None = None
    labels: list[str] | None = None
    num_classes: int | None = None
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    calibration_images: np.ndarray | None = None  # preprocessed, float32 NCHW
    calibration_source: str = ""
    tolerances: Tolerances = field(default_factory=Tolerances)
    seed: int = 0
    skip_if_same_weights: bool = False
    precision: str = "fp32"  # or "auto"
    gate_images: Path | None = None  # real photos: top-1 agreement with fp32
    gate_labeled: Path | None = None  # labeled .npz: top-1 drop against fp32
    gate_thresholds: GateThresholds = field(default_factory=GateThresholds)
    pretrained_mirror: str | None = None  # replaces the official weights' download directory


@dataclass
class ExportResult:
    name: str
    version: int
    path: Path
    skipped: bool
    metadata: dict[str, Any]  # metadata.json as written


def parity_batch_sizes(max_batch_size: int) -> list[int]:
    """1, an odd size, and the largest batch the service will form."""
    return sorted({1, min(7, max_batch_size), max_batch_size})


def resolve_spec(arch: str, num_classes: int | None) -> ArchSpec:
    spec = get_spec(arch)
    if num_classes is not None and num_classes != spec.num_classes:
        if num_classes < 1:
            raise ExportError(f"num_classes must be positive, got {num_classes}")
        spec = dataclasses.replace(spec, num_classes=num_classes, pretrained={})
    return spec


def resolve_labels(spec: ArchSpec, labels: list[str] | None) -> list[str]:
    if labels is None:
        if spec.num_classes == len(spec.labels):
            return list(spec.labels)
        return [f"class_{i}" for i in range(spec.num_classes)]
    if len(labels) != spec.num_classes:
        raise ExportError(f"{len(labels)} labels given for {spec.num_classes} classes")
    try:
        triton.render_labels(labels)  # refused before anything is written, not after
    except triton.TritonConfigError as exc:
        raise ExportError(f"labels must not contain line breaks: {exc}") from None
    return labels


def _skip_key(
    request: ExportRequest, spec: ArchSpec, labels: list[str], weights_sha256: str
) -> dict[str, Any]:
    """What a kept version must share with this request, as dotted metadata paths: the same
    weights are not enough when the batch limit, labels, tolerances or exporter differ."""
    key: dict[str, Any] = {
        "weights.sha256": weights_sha256,
        "arch": spec.name,
        "precision": request.precision,
        "max_batch_size": request.max_batch_size,
        "labels": labels,
        "parity.tolerances": dataclasses.asdict(request.tolerances),
        "export.exporter": EXPORTER,
        "export.opset": OPSET,
    }
    if request.precision == "auto":  # whatever it chose, it was chosen the same way
        del key["precision"]
        key["precision_choice.mode"] = "auto"
    if request.precision != "fp32":
        key["precision_gate.thresholds"] = dataclasses.asdict(request.gate_thresholds)
    return key


def _differences(metadata: dict[str, Any], key: dict[str, Any]) -> list[str]:
    """The dotted paths of `key` whose value in `metadata` differs (precision defaults to fp32,
    as in metadata written before precisions existed)."""
    differences = []
    for path, wanted in key.items():
        value: Any = metadata
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None and path == "precision":
            value = "fp32"
        if value != wanted:
            differences.append(path)
    return differences


@dataclass(frozen=True)
class Plan:
    """An export decided before any work: the request checked, and what it will be called."""

    request: ExportRequest
    spec: ArchSpec
    name: str
    labels: list[str]
    out: Path
    existing: list[int]  # versions of `name` already in `out`


@dataclass(frozen=True)
class Verified:
    """What parity and the precision gate (or `auto`'s comparison) proved, in a temporary
    directory: the graph to serve and the reports that go into metadata.json."""

    served: Path
    candidate: Candidate
    parity: GateReport
    gate: dict[str, Any] | None
    choice: PrecisionChoice | None


def export_model(request: ExportRequest) -> ExportResult:
    """plan (check the request) -> load the weights -> keep an equal latest version, or verify
    (trace, parity, precision) in a temporary directory -> write the version atomically."""
    plan = make_plan(request)
    model, weights = load_model(plan.spec, request.weights, mirror=request.pretrained_mirror)
    kept = _kept_version(plan, weights.sha256)
    if kept is not None:
        return kept
    version = request.version or (plan.existing[-1] + 1 if plan.existing else 1)
    with tempfile.TemporaryDirectory(prefix="resnet-export-") as tmp:
        verified = verify(plan, model, Path(tmp))
        metadata = build_metadata(plan, version, Weights(**weights.to_dict()), verified)
        target = repository.write_version(plan.out, metadata, verified.served)
    triton.write_model_config(plan.out, plan.name)
    return ExportResult(plan.name, version, target, False, metadata.model_dump(mode="json"))


def make_plan(request: ExportRequest) -> Plan:
    """Every check that needs no weights, so a bad request fails before anything is loaded."""
    try:
        spec = resolve_spec(request.arch, request.num_classes)
    except KeyError as exc:
        raise ExportError(exc.args[0]) from None
    if request.precision not in PRECISION_CHOICES:
        raise ExportError(
            f"unknown precision {request.precision!r}; choose one of {PRECISION_CHOICES}"
        )
    reduced = request.precision != "fp32"
    if reduced and request.gate_images is None:
        raise ExportError(f"{request.precision} needs gate images (--gate-images DIR)")
    if request.precision == "int8" and request.calibration_images is None:
        raise ExportError("int8 needs calibration images (--calibration-images)")
    default_name = spec.name if not reduced else f"{spec.name}_{request.precision}"
    name = repository.validate_name(request.name or default_name)
    labels = resolve_labels(spec, request.labels)
    if request.max_batch_size < 1:
        raise ExportError(f"max_batch_size must be positive, got {request.max_batch_size}")
    out = Path(request.out)
    existing = repository.versions(out, name)
    if request.version is not None and request.version in existing:
        raise ExportError(f"{out / name / str(request.version)} already exists")
    return Plan(request, spec, name, labels, out, existing)


def _kept_version(plan: Plan, weights_sha256: str) -> ExportResult | None:
    """The latest version, when asked to skip and it was made from the same weights and
    settings (`_skip_key`)."""
    if not (plan.request.skip_if_same_weights and plan.existing):
        return None
    path = plan.out / plan.name / str(plan.existing[-1])
    latest = repository.read_metadata(path).model_dump(mode="json")
    key = _skip_key(plan.request, plan.spec, plan.labels, weights_sha256)
    if _differences(latest, key):
        return None
    triton.write_model_config(plan.out, plan.name)  # repositories exported before it existed
    return ExportResult(plan.name, plan.existing[-1], path, True, latest)


def verify(plan: Plan, model: torch.nn.Module, tmp: Path) -> Verified:
    """Trace into `tmp`, prove parity with PyTorch on the engine the service will run, then make
    and gate the requested precision (or choose one); raises ExportError when a gate fails."""
    request, spec = plan.request, plan.spec
    graph = tmp / "model.onnx"
    export_onnx(model, spec.input_size, graph)
    fp32 = open_engine(graph, "fp32", spec.input_size)  # what the service will run
    report = check_parity(
        model,
        fp32,
        spec.input_size,
        batch_sizes=parity_batch_sizes(request.max_batch_size),
        tolerances=request.tolerances,
        seed=request.seed,
        images=request.calibration_images,
        images_source=request.calibration_source,
        max_batch=request.max_batch_size,
    )
    if not report.passed:
        raise ExportError("parity failed: " + "; ".join(report.failures()))
    parity = GateReport(**report.to_dict(), device=fp32.provider)
    if request.precision == "auto":
        served, candidate, gate, choice = _choose_precision(
            request, spec, plan.labels, graph, fp32, tmp
        )
        return Verified(served, candidate, parity, gate, choice)
    if request.precision == "fp32":
        return Verified(graph, Candidate.of("fp32"), parity, None, None)
    served, gate = _reduce_precision(request, spec, plan.labels, graph, fp32, tmp)
    return Verified(served, Candidate.of(request.precision), parity, gate, None)


def build_metadata(plan: Plan, version: int, weights: Weights, verified: Verified) -> ModelMetadata:
    """metadata.json for the verified graph."""
    spec = plan.spec
    params, macs = complexity(spec)
    gate = verified.gate
    return ModelMetadata(
        name=plan.name,
        version=version,
        arch=spec.name,
        family=spec.family,
        depth=spec.depth,
        block=spec.block,
        preact=spec.preact,
        plain=spec.plain,
        shortcut=spec.shortcut.value,
        created_at=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        model_sha256=sha256_file(verified.served),
        precision=verified.candidate.precision,
        engine=verified.candidate.engine,
        input=TensorSpec(name=INPUT_NAME, shape=[None, *spec.input_size]),
        outputs=OutputSpecs(
            logits=TensorSpec(name=OUTPUT_NAMES[0], shape=[None, spec.num_classes]),
            embedding=TensorSpec(name=OUTPUT_NAMES[1], shape=[None, spec.embedding_dim]),
        ),
        num_classes=spec.num_classes,
        embedding_dim=spec.embedding_dim,
        labels=plan.labels,
        preprocessing=spec.preprocessing,
        weights=weights,
        params=params,
        macs=macs,
        max_batch_size=plan.request.max_batch_size,
        parity=verified.parity,
        precision_gate=GateReport(**gate) if gate is not None else None,
        precision_choice=verified.choice,
        export={
            "exporter": EXPORTER,
            "opset": OPSET,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
    )


def _reduce_precision(
    request: ExportRequest,
    spec: ArchSpec,
    labels: list[str],
    graph: Path,
    fp32: Engine,
    tmp: Path,
) -> tuple[Path, dict[str, Any]]:
    """The graph to serve at `request.precision` and its gate report; raises if the gate fails."""
    assert request.gate_images is not None
    data = load_gate_data(spec.preprocessing, request.gate_images, request.gate_labeled)
    candidate = Candidate.of(request.precision)
    served = reduced_graph(candidate, graph, tmp, request.calibration_images)
    _, gate = _gate(request, spec, labels, candidate, served, fp32, data)
    if not gate["passed"]:
        raise ExportError(f"{request.precision} gate failed: {gate_failure(gate)}")
    return served, gate


def _gate(
    request: ExportRequest,
    spec: ArchSpec,
    labels: list[str],
    candidate: Candidate,
    served: Path,
    fp32: Engine,
    data: GateData,
) -> tuple[Engine, dict[str, Any]]:
    """The reduced graph opened in its engine, and its gate report against fp32."""
    reduced = open_engine(served, candidate.precision, spec.input_size, candidate.engine)
    gate = run_gate(
        fp32,
        reduced,
        candidate.precision,
        labels,
        data,
        request.gate_thresholds,
        request.max_batch_size,
        engine=candidate.engine,
    )
    gate["device"] = reduced.provider  # where the reduced graph's arithmetic was judged
    kernels = reduced.kernel_precisions
    if kernels:  # OpenVINO: the precision its compute layers were compiled to on this CPU
        gate["kernel_precisions"] = kernels
    return reduced, gate


def gate_failure(gate: dict[str, Any]) -> str:
    agreement = gate["agreement"]
    parts = [f"agreement {agreement['top1_agreement']:.2%} on {agreement['images']} images"]
    if "drop_points" in gate.get("labeled", {}):
        parts.append(f"top-1 drop {gate['labeled']['drop_points']:.2f} points")
    return ", ".join(parts)


def _choose_precision(
    request: ExportRequest,
    spec: ArchSpec,
    labels: list[str],
    graph: Path,
    fp32: Engine,
    tmp: Path,
) -> tuple[Path, Candidate, dict[str, Any] | None, PrecisionChoice]:
    """`--precision auto`: every candidate this host can run is built, gated and measured at the
    batch sizes the service forms; the fastest that passed is served. A candidate that fails to
    build or run is recorded as an error, not fatal (fp32, the reference, always runs)."""
    assert request.gate_images is not None
    data = load_gate_data(spec.preprocessing, request.gate_images, request.gate_labeled)
    batch_sizes = measure_batch_sizes(request.max_batch_size)
    has_calibration = request.calibration_images is not None
    rows: list[dict[str, Any]] = []
    built: list[tuple[Path, dict[str, Any] | None]] = []
    engines: dict[str, Engine] = {}
    for candidate in CANDIDATES:  # build and gate every candidate first
        row: dict[str, Any] = {"precision": candidate.precision, "engine": candidate.engine}
        rows.append(row)
        built.append((graph, None))
        reason = unavailable(candidate, calibration=has_calibration)
        if reason is not None:
            row.update(status="unavailable", reason=reason)
            continue
        if candidate.precision == "fp32":
            engines[candidate.key] = fp32
            row.update(status="passed", reason=None, gate=None)
            continue
        try:
            served = reduced_graph(candidate, graph, tmp, request.calibration_images)
            engine, gate = _gate(request, spec, labels, candidate, served, fp32, data)
        except Exception as exc:  # recorded in the comparison; the other candidates go on
            text = str(exc).strip().splitlines()
            row.update(status="error", reason=text[0] if text else type(exc).__name__)
            continue
        engines[candidate.key] = engine
        built[-1] = (served, gate)
        passed = bool(gate["passed"])
        row.update(
            status="passed" if passed else "failed_gate",
            reason=None if passed else gate_failure(gate),
            gate=gate,
        )
    # Then measure them, taking turns, on the same real images.
    speeds = images_per_second(engines, data.agreement_images, batch_sizes)
    for candidate, row in zip(CANDIDATES, rows, strict=True):
        if candidate.key in speeds:
            row.update(images_per_s=speeds[candidate.key], score=score(speeds[candidate.key]))
    best = choose(rows)
    rows[best]["status"] = "chosen"
    chosen = CANDIDATES[best]
    choice = PrecisionChoice(
        host=host_facts(),  # type: ignore[arg-type]
        batch_sizes=batch_sizes,
        chosen=chosen.key,
        candidates=rows,  # type: ignore[arg-type]
    )
    served, gate = built[best]
    return served, chosen, gate, choice
