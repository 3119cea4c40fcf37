"""results.json -> results.md: the figures table and the list of checks."""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    model = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in ("onnxruntime", "uvicorn", "fastapi", "hypothesis", "schemathesis"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": model,
        "cores": len(os.sched_getaffinity(0)),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        **versions,
    }


def _ms(stats: dict[str, float] | None, key: str) -> str:
    return "-" if not stats else f"{stats[key] * 1000:.0f} ms"


def _row(name: str, s: dict[str, Any], notes: str) -> str:
    cells = [s["sent"], s["ok"], s["rejected"], s["failed"], s["lost"]]
    return f"| {name} | " + " | ".join(str(c) for c in cells) + f" | {notes} |"


def _outcome(outcome: Any) -> str:
    if isinstance(outcome, dict):
        if "code" in outcome:
            return str(outcome["code"])
        if "status" in outcome:
            return str(outcome["status"])
        if "closed_by_service" in outcome:
            return (
                f"{outcome['closed_by_service']} of {outcome['opened']} closed ({outcome['s']} s)"
            )
    return str(outcome)


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| scenario | sent | accepted | rejected (503) | failed | lost | figures |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    if "overload" in results:
        o = results["overload"]
        b, base = o["burst"], o["baseline"]
        lines += [
            _row(f"overload: baseline, {o['concurrency']} clients", base,
                 f"{base['ok_per_s']} req/s, p99 {_ms(base['ok_latency_s'], 'p99')}"),
            _row(f"overload: burst of {b['sent']} at once", b,
                 f"accepted p99 {_ms(b['ok_latency_s'], 'p99')}, max "
                 f"{_ms(b['ok_latency_s'], 'max')} (bound {o['accepted_latency_bound_s']} s); "
                 f"503 p50 {_ms(b['rejected_latency_s'], 'p50')}, all with Retry-After: "
                 f"{'yes' if b['rejected_without_retry_after'] == 0 else 'no'}; images decoded "
                 f"{o['decoded_in_burst']}"),
            _row("overload: recovery", o["recovery"],
                 f"{o['recovery']['ok_per_s']} req/s = {o['recovered_ratio']:.0%} of baseline"),
        ]  # fmt: skip
    if "soak" in results:
        s, m = results["soak"], results["soak"]["memory"]
        lines.append(
            _row(f"soak: {s['duration_s']:.0f} s mix, {s['concurrency']} clients", s,
                 f"RSS start {m['rss_start_mb']} MB, after warm-up {m['rss_after_warmup_mb']} MB, "
                 f"end {m['rss_end_mb']} MB (growth {m['growth_after_warmup_mb']:+} MB, slope "
                 f"{m['slope_mb_per_min']:+} MB/min); {s['abandoned']} clients disconnected; "
                 f"fds {s['idle_before']['fds']} -> {s['idle_after']['fds']}")
        )  # fmt: skip
    faults = results.get("faults", {})
    sigterms = {
        "sigterm": "SIGTERM under load (balancer, drain delay)",
        "sigterm_no_drain": "SIGTERM, no balancer, no drain delay (informative)",
    }
    for key, label in sigterms.items():
        if key in faults:
            t = faults[key]
            lines.append(
                _row(label, t, f"exit {t['exit_code']}, last answer "
                     f"{t['last_answer_after_signal_s']} s after the signal, "
                     f"{t['refused']} connections refused")
            )  # fmt: skip
    if "disconnects" in faults:
        d = faults["disconnects"]
        lines.append(
            f"| client disconnects | {d['disconnected_requests']} | - | - | - | - | "
            f"{d['answered_499']:.0f} ended as 499, {d['images_run_for_disconnected']:.0f} of "
            f"their images run; queue depth {d['queue_depth']:.0f}, in flight "
            f"{d['in_flight']:.0f}, fds {d['fds'][0]} -> {d['fds'][1]} |"
        )
    if "failing_batch" in faults:
        f = faults["failing_batch"]
        statuses = ", ".join(str(r["status"]) for r in f["same_batch"])
        codes = [r["status"] for r in [*f["same_batch"], f["next_request"], f["other_model"]]]
        counts = (
            sum(c == 200 for c in codes),
            sum(c == 503 for c in codes),
            sum(bool(c) and c not in (200, 503) for c in codes),
            sum(not c for c in codes),  # no answer at all
        )
        lines.append(
            f"| model whose inference raises | {len(codes)} | "
            + " | ".join(str(n) for n in counts)
            + f" | same batch: {statuses} "
            f"({f['same_batch'][0]['code']}); next batch {f['next_request']['status']}; "
            f"other model {f['other_model']['status']} |"
        )
    if "startup" in faults:
        cases = faults["startup"]
        codes = ", ".join(f"{c['case']}: exit {c['exit_code']}" for c in cases)
        lines.append(f"| broken model at start-up | {len(cases)} | - | - | - | - | {codes} |")
    fuzz = results.get("fuzz", {})
    if "images" in fuzz:
        i = fuzz["images"]
        lines.append(
            f"| fuzz: image bodies (Hypothesis) | {i.get('cases', '-')} | - | - | "
            f"{1 if 'failure' in i else 0} | 0 | statuses {i.get('statuses')} |"
        )
    if "openapi" in fuzz:
        a = fuzz["openapi"]
        lines.append(
            f"| fuzz: OpenAPI surface (Schemathesis) | {a['cases']} | - | - | "
            f"{len(a['failures'])} | 0 | {a['operations']} operations, {a['duration_s']} s |"
        )
    if "protocol" in fuzz:
        p = fuzz["protocol"]
        lines.append(
            f"| fuzz: HTTP protocol abuse | {p['cases']} | - | - | {len(p['failed'])} | 0 | "
            "huge headers, lying lengths, slow bodies, absurd query values |"
        )
    for how, r in results.get("swap", {}).items():
        lines.append(
            f"| live model update ({how}) under load | {r['requests']} | "
            f"{r['requests'] - r['failures']} | 0 | {r['failures']} | 0 | versions "
            f"{r['versions']}; {r['requests_during_swap']} requests during the swap; first new "
            f"answer {r['time_to_switch_s']} s after the trigger; old answers after it: "
            f"{r['old_version_after_switch']}; /readyz {r['readyz']} |"
        )
    if results.get("abuse"):
        lines += [
            "",
            "| attack (tokens) | answer | attack took | /healthz max (p50) | legitimate answers "
            "| peak RSS growth |",
            "|---|---|---:|---:|---|---:|",
        ]
        for name, r in results["abuse"].items():
            lines.append(
                f"| {name} | {_outcome(r['outcome'])} | {r['seconds']} s | "
                f"{r['healthz_max_ms']} ms ({r['healthz_p50_ms']} ms) | {r['legit']} | "
                f"{r['peak_growth_mb']} MB |"
            )
    checks = results.get("checks", [])
    passed = sum(c["passed"] for c in checks)
    lines += ["", f"Checks: {passed} of {len(checks)} passed.", ""]
    lines += [f"- {'PASS' if c['passed'] else 'FAIL'} {c['name']} ({c['detail']})" for c in checks]
    m = results.get("machine", {})
    if m:
        lines += [
            "",
            f"{m['date']}, {m['cores']} cores ({m['cpu']}), load average at start "
            f"{m['load_average']}; Python {m['python']}, onnxruntime {m['onnxruntime']}, "
            f"uvicorn {m['uvicorn']}, hypothesis {m['hypothesis']}, "
            f"schemathesis {m['schemathesis']}.",
        ]
    return "\n".join(lines) + "\n"
