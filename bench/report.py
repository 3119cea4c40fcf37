"""results.json (merged across modes) and results.md (markdown tables) in the output directory.

Each mode replaces only its own section of results.json, so `bench engine` and `bench http` can
write to one directory and the markdown shows both, side by side with the machine they ran on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .machine import busy_note

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


def load_results(path: Path) -> dict[str, Any]:
    """The results in `path` (a results.json, or a directory holding one); {} if none."""
    if path.is_dir():
        path = path / RESULTS_JSON
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text("utf-8"))
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def save_results(out: Path, section: str, value: dict[str, Any], machine: dict[str, Any]) -> Path:
    """Merge `value` as `section` into out/results.json (atomically) and rewrite results.md."""
    out.mkdir(parents=True, exist_ok=True)
    results = load_results(out)
    results[section] = {**value, "machine": machine}
    tmp = out / f".{RESULTS_JSON}.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n", "utf-8")
    os.replace(tmp, out / RESULTS_JSON)
    (out / RESULTS_MD).write_text(render_markdown(results), "utf-8")
    return out / RESULTS_JSON


def _num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def machine_line(machine: dict[str, Any]) -> str:
    gpus = ", ".join(g.get("name", "?") for g in machine.get("gpus", [])) or "no GPU"
    libs = ", ".join(f"{k} {v}" for k, v in machine.get("libraries", {}).items())
    return (
        f"{machine.get('cpu_model', '?')}, {machine.get('cores', '?')} cores "
        f"({' '.join(machine.get('cpu_flags', []))}), {gpus}; {libs}; "
        f"1-minute load {machine.get('load_average_1m_at_start', '?')} at the start; "
        f"{machine.get('measured_at', '?')}"
    )


def _warning(machine: dict[str, Any]) -> list[str]:
    note = busy_note(machine)
    return [f"**Warning: {note}.**", ""] if note else []


def engine_table(engine: dict[str, Any]) -> str:
    rows = engine.get("rows", [])
    torch = any("torch" in r for r in rows)
    pre = any("with_preprocessing" in r for r in rows)
    head = ["model", "depth", "params (M)", "GMACs", "batch", "n", "p50 ms", "p90 ms", "p99 ms"]
    head += ["images/s", "GFLOP/s"]
    if torch:
        head += ["torch p50 ms", "torch images/s", "ORT speed-up"]
    if pre:
        head += ["with preprocessing p50 ms", "with preprocessing images/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ort = r["onnxruntime"]
        precision = r.get("precision", "fp32")
        cells = [
            r["model"] + ("" if precision == "fp32" else f" ({precision})"),
            _num(r.get("depth")),
            _num(r["params"] / 1e6, 2) if r.get("params") else "-",
            _num(r["macs"] / 1e9, 3) if r.get("macs") else "-",
            str(r["batch_size"]),
            _num(ort.get("n")),
            _num(ort.get("p50_ms")),
            _num(ort.get("p90_ms")),
            _num(ort.get("p99_ms")),
            _num(ort.get("images_per_s")),
            _num(ort.get("gflops")),
        ]
        if torch:
            t = r.get("torch", {})
            speedup = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
            cells += [_num(t.get("p50_ms")), _num(t.get("images_per_s")), speedup]
        if pre:
            p = r.get("with_preprocessing", {})
            cells += [_num(p.get("p50_ms")), _num(p.get("images_per_s"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def http_table(levels: list[dict[str, Any]], key: str, label: str) -> str:
    head = [label, "requests", "images/request", "images/s", "p50 ms", "p90 ms", "p99 ms"]
    head += ["errors", "statuses", "wall s", "client CPU s", "mean batch", "inference ms/image"]
    taxed = any("tax" in lv for lv in levels)
    if taxed:
        head += [
            "server CPU ms/request",
            "inference CPU ms/request",
            "outside inference ms/request",
        ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for lv in levels:
        lat, service = lv["latency"], lv.get("service") or {}
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(lv["statuses"].items()))
        cells = [
            _num(lv[key]),
            str(lv["requests"]),
            str(lv["images_per_request"]),
            _num(lv["images_per_s"]),
            _num(lat.get("p50_ms")),
            _num(lat.get("p90_ms")),
            _num(lat.get("p99_ms")),
            str(lv["errors"]),
            statuses or "-",
            _num(lv["wall_s"]),
            _num(lv.get("client_cpu_s"), 2),
            _num(service.get("mean_batch")),
            _num(service.get("inference_ms_per_image")),
        ]
        if taxed:
            tax = lv.get("tax") or {}
            cells += [
                _num(tax.get("server_cpu_ms_per_request"), 3),
                _num(tax.get("inference_cpu_ms_per_request"), 3),
                _num(tax.get("outside_inference_cpu_ms_per_request"), 3),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(results: dict[str, Any]) -> str:
    parts = ["# resnet-serve benchmark results", ""]
    engine = results.get("engine")
    if engine:
        parts += ["## Engine: onnxruntime in process", ""]
        parts += [f"Machine: {machine_line(engine['machine'])}.", ""]
        parts += _warning(engine["machine"])
        parts += [f"Command: `{engine.get('command', '')}`", ""]
        cfg = engine.get("engine_config", {})
        in_use = sorted({r["providers"][0] for r in engine.get("rows", []) if r.get("providers")})
        parts += [
            f"Session: {', '.join(in_use) or cfg.get('providers')}, "
            f"{cfg.get('intra_op_threads_resolved')} "
            f"intra-op threads, spinning {cfg.get('allow_spinning')}, graph optimization "
            f"{cfg.get('graph_optimization')}. Latency per batch, {engine.get('timing')}; "
            "images/s from the mean; GFLOP/s = 2 x MACs x images/s.",
            "",
        ]
        if engine.get("torch"):
            parts += [
                f"PyTorch eager: same weights and device, {engine['torch']['threads']} threads, "
                "runs interleaved with onnxruntime; ORT speed-up = torch p50 / ORT p50.",
                "",
            ]
        rows = engine.get("rows", [])
        untrained = list(dict.fromkeys(r["model"] for r in rows if r.get("trained") is False))
        if untrained:
            parts += [
                f"Random (untrained) weights: {', '.join(untrained)}; latency does not depend on "
                "the weights' values.",
                "",
            ]
        parts += [engine_table(engine), ""]
        checks = engine.get("speedup_targets") or []
        if checks:
            missed = [c for c in checks if not c["met"]]
            verdict = (
                "all met"
                if not missed
                else "missed: "
                + ", ".join(
                    f"{c['model']} batch {c['batch_size']} ({c['speedup']:.2f}x < {c['target']}x)"
                    for c in missed
                )
            )
            parts += [
                f"Speed-up targets (ImageNet, >= 1.8x at batch 1, >= 1.4x at batch 8): "
                f"{len(checks) - len(missed)}/{len(checks)} met; {verdict}.",
                "",
            ]
    http = results.get("http")
    if http:
        parts += ["## HTTP: the service under load", ""]
        parts += [f"Machine: {machine_line(http['machine'])}.", ""]
        parts += _warning(http["machine"])
        parts += [f"Command: `{http.get('command', '')}`", ""]
        parts += [
            f"Target {http.get('url')}, model {http.get('model')}, endpoint "
            f"{http.get('endpoint')}, {http.get('images')} distinct images, load generator "
            f"{_generator(http)} on the same machine.",
            "",
        ]
        if http.get("closed"):
            parts += ["Closed loop:", "", http_table(http["closed"], "concurrency", "concurrency")]
            parts += [""]
        if http.get("open"):
            parts += ["Open loop (latency from each request's scheduled start):", ""]
            parts += [http_table(http["open"], "rate_per_s", "offered requests/s"), ""]
        parts += _tax_lines(http.get("tax"))
        vs = http.get("vs_engine")
        if vs:
            parts += [
                f"HTTP at concurrency {vs['concurrency']}: {vs['http_images_per_s']:.1f} images/s "
                f"= {100 * vs['ratio']:.0f}% of the engine's in-process "
                f"{vs['engine_images_per_s']:.1f} images/s with preprocessing (batch "
                f"{vs['engine_batch_size']}; target {vs.get('target', 0.95):.0%}).",
                "",
            ]
            if vs.get("ratio_engine_only"):
                parts += [
                    f"Against inference alone ({vs['engine_only_images_per_s']:.1f} images/s at "
                    f"batch {vs['engine_only_batch_size']}, no decoding): "
                    f"{100 * vs['ratio_engine_only']:.0f}%.",
                    "",
                ]
    floor = results.get("floor")
    if floor:
        parts += ["## The Python floor: a minimal ASGI app under the service's HTTP server", ""]
        parts += [f"Machine: {machine_line(floor['machine'])}.", ""]
        parts += _warning(floor["machine"])
        parts += [f"Command: `{floor.get('command', '')}`", ""]
        parts += [
            f"Server: {floor.get('server')}; {floor.get('images')} distinct images, "
            f"{floor.get('body')}, load generator {_generator(floor)} on the same machine.",
            "",
            http_table(floor["closed"], "concurrency", "concurrency"),
            "",
        ]
        parts += _tax_lines(floor.get("tax"))
    if results.get("tax"):
        parts += [tax_markdown(results["tax"]), ""]
    return "\n".join(parts)


def tax_markdown(tax: dict[str, Any]) -> str:
    """`bench tax`: the measured rows, then the issue's ratios against their targets."""
    parts = ["## The serving tax", ""]
    parts += [f"Machine: {machine_line(tax['machine'])}.", ""] if "machine" in tax else []
    parts += _warning(tax.get("machine", {}))
    parts += [f"Command: `{tax.get('command', '')}` ({tax.get('runtime_s')} s)", ""]
    engine = tax["engine"]
    parts += [
        f"CIFAR ResNet-20 alone (onnxruntime in process, the service's settings): batch 1 p50 "
        f"{engine['batch1_p50_ms']:.2f} ms; best batch {engine['best_batch']}: "
        f"{engine['best_images_per_s']:.0f} images/s.",
        "",
    ]
    head = ["workload", "c", "requests/s", "images/s", "p50 ms", "p99 ms", "errors", "mean batch"]
    head += ["server CPU ms/request", "outside inference ms/request"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in tax["rows"]:
        cells = [
            r["workload"],
            str(r["concurrency"]),
            _num(r["requests_per_s"]),
            _num(r["images_per_s"]),
            _num(r["p50_ms"], 2),
            _num(r["p99_ms"], 2),
            str(r["errors"]),
            _num(r["mean_batch"]),
            _num(r["server_cpu_ms_per_request"], 3),
            _num(r["outside_inference_ms_per_request"], 3),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    parts += ["\n".join(lines), ""]
    lines = ["| target | this run | target | met |", "|---|---|---|---|"]
    for check in tax["targets"]:
        met = {True: "yes", False: "no", None: "-"}[check["met"]]
        lines.append(f"| {check['what']} | {_num(check['value'], 2)} | {check['target']} | {met} |")
    parts += ["\n".join(lines), ""]
    return "\n".join(parts)


def _tax_lines(tax: dict[str, Any] | None) -> list[str]:
    """How the tax columns were measured, and the c=1 latency added over the engine."""
    if not tax:
        return []
    lines = [
        "Server CPU per request: utime + stime of the server process and its children (all "
        "threads, /proc/PID/stat) over the level, divided by its requests.",
        "",
    ]
    engine = tax.get("engine")
    if engine:
        lines += [f"Inference CPU per request: {engine['method']}.", ""]
    if tax.get("c1_added_ms") is not None:
        lines += [
            f"c=1 latency added over the engine: HTTP p50 minus the engine's batch-"
            f"{tax['engine_batch']} p50 ({tax['engine_batch_p50_ms']:.2f} ms, same run) = "
            f"{tax['c1_added_ms']:.2f} ms.",
            "",
        ]
    return lines


def _generator(http: dict[str, Any]) -> str:
    if http.get("protocol") == "grpc":
        return "gRPC (Open Inference Protocol ModelInfer, image_bytes)"
    return str(http.get("client", "httpx"))
