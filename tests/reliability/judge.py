"""The pass/fail rules, in one place: the long command and the tests judge results alike."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# Memory after warm-up may move by allocator noise, not by a trend.
RSS_GROWTH_TOLERANCE_MB = 8.0
RSS_SLOPE_TOLERANCE_MB_PER_MIN = 4.0
SLOPE_MIN_WINDOW_S = 30.0  # below this, a slope is noise
RECOVERED_RATIO = 0.7  # shared 2-core machines are noisy
PROTOCOL_RSS_GROWTH_MB = 32.0  # oversized heads and bodies must be refused, not buffered


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


def _check(name: str, passed: bool, detail: object) -> Check:
    return Check(name, bool(passed), str(detail))


def _nothing_lost(prefix: str, summary: dict[str, Any]) -> list[Check]:
    return [
        _check(f"{prefix}: lost = 0", summary["lost"] == 0, summary["errors"] or 0),
        _check(f"{prefix}: refused = 0", summary["refused"] == 0, summary["refused"]),
        _check(f"{prefix}: failed = 0", summary["failed"] == 0, summary["errors"] or 0),
    ]


def overload(result: dict[str, Any]) -> list[Check]:
    burst, base, recovery = result["burst"], result["baseline"], result["recovery"]
    ok, rejected = burst["ok_latency_s"], burst["rejected_latency_s"]
    checks = [
        *_nothing_lost("overload baseline", base),
        *_nothing_lost("overload burst", burst),
        *_nothing_lost("overload recovery", recovery),
        _check("burst: some requests accepted", burst["ok"] > 0, burst["ok"]),
        _check("burst: overflow rejected with 503", burst["rejected"] > 0, burst["rejected"]),
        _check(
            "burst: every 503 has Retry-After",
            burst["rejected_without_retry_after"] == 0,
            burst["rejected_without_retry_after"],
        ),
        _check(
            "burst: no image decoded for a rejected request",
            result["decoded_in_burst"] == burst["ok"],
            f"{result['decoded_in_burst']} decoded, {burst['ok']} accepted",
        ),
        _check(
            "burst: accepted latency within the queue's bound",
            ok is not None and ok["max"] <= result["accepted_latency_bound_s"],
            f"max {ok and ok['max']} s, bound {result['accepted_latency_bound_s']} s",
        ),
        _check(
            "burst: 503s no slower than accepted answers (median)",
            ok is not None and rejected is not None and rejected["p50"] <= ok["p50"],
            f"503 p50 {rejected and rejected['p50']} s, 200 p50 {ok and ok['p50']} s",
        ),
        _check(
            f"throughput recovers to >= {RECOVERED_RATIO:.0%} of baseline",
            result["recovered_ratio"] >= RECOVERED_RATIO,
            f"{result['recovered_ratio']:.0%}",
        ),
    ]
    return checks


def soak(result: dict[str, Any]) -> list[Check]:
    memory = result["memory"]
    checks = [
        *_nothing_lost("soak", result),
        _check("soak: no 503 below capacity", result["rejected"] == 0, result["rejected"]),
        _check(
            f"soak: RSS growth after warm-up <= {RSS_GROWTH_TOLERANCE_MB} MB",
            memory["growth_after_warmup_mb"] <= RSS_GROWTH_TOLERANCE_MB,
            f"{memory['growth_after_warmup_mb']} MB",
        ),
        _check(
            "soak: open files back to idle",
            result["idle_after"]["fds"] <= result["idle_before"]["fds"] + 2,
            f"{result['idle_before']['fds']} -> {result['idle_after']['fds']}",
        ),
    ]
    if memory["window_s"] >= SLOPE_MIN_WINDOW_S:
        checks.append(
            _check(
                f"soak: RSS slope after warm-up <= {RSS_SLOPE_TOLERANCE_MB_PER_MIN} MB/min",
                memory["slope_mb_per_min"] <= RSS_SLOPE_TOLERANCE_MB_PER_MIN,
                f"{memory['slope_mb_per_min']} MB/min",
            )
        )
    return checks


def startup(result: dict[str, Any]) -> list[Check]:
    name = f"broken model at start-up ({result['case']})"
    critical = result["critical"]
    clear = bool(critical) and "broken" in critical[0] and not result["traceback"]
    return [
        _check(
            f"{name}: exits {result['expected_exit_code']}",
            result["exit_code"] == result["expected_exit_code"],
            result["exit_code"],
        ),
        _check(f"{name}: never ready", not result["ever_ready"], result["ever_ready"]),
        _check(f"{name}: one clear line, no traceback", clear, critical[:1]),
        _check(f"{name}: nothing unpickled", not result["unpickled"], result["unpickled"]),
    ]


def failing_batch(result: dict[str, Any]) -> list[Check]:
    failed = [(r["status"], r["content_type"], r["code"]) for r in result["same_batch"]]
    return [
        _check(
            "failing batch: its requests get 500 JSON",
            failed == [(500, "application/json", "inference_failed")] * 2,
            failed,
        ),
        _check("failing batch: one batch", result["batches"] == 1, result["batches"]),
        _check(
            "failing batch: the next batch works",
            result["next_request"]["status"] == 200,
            result["next_request"],
        ),
        _check(
            "failing batch: other models unaffected",
            result["other_model"]["status"] == 200 and result["ready_after"] == 200,
            result["other_model"],
        ),
    ]


def disconnects(result: dict[str, Any]) -> list[Check]:
    return [
        _check(
            "disconnects: each ends as 499",
            result["answered_499"] == result["disconnected_requests"],
            f"{result['answered_499']} of {result['disconnected_requests']}",
        ),
        _check(
            "disconnects: their queued images never run",
            result["images_run_for_disconnected"] == 0,
            result["images_run_for_disconnected"],
        ),
        _check(
            "disconnects: a waiting client is served",
            result["waiting_client_status"] == 200 and result["images_run_for_waiting_client"] == 2,
            result["waiting_client_status"],
        ),
        _check(
            "disconnects: queue depth and in-flight back to 0",
            result["queue_depth"] == 0 and result["in_flight"] == 0,
            f"{result['queue_depth']}, {result['in_flight']}",
        ),
        _check(
            "disconnects: no open file leaked", result["fds"][1] <= result["fds"][0], result["fds"]
        ),
    ]


def sigterm(result: dict[str, Any]) -> list[Check]:
    return [
        *_nothing_lost("SIGTERM under load", result),
        _check("SIGTERM under load: exit 0", result["exit_code"] == 0, result["exit_code"]),
        _check("SIGTERM under load: no traceback", not result["traceback"], result["traceback"]),
    ]


def fuzz(result: dict[str, Any]) -> list[Check]:
    checks = []
    if "images" in result:
        images = result["images"]
        checks.append(_check("fuzz images: property holds", "failure" not in images, images))
    if "openapi" in result:
        api = result["openapi"]
        passed = not api["failures"] and not api["errors"] and api["exit_code"] == 0
        checks.append(_check("fuzz OpenAPI: every check passes", passed, api["failures"] or 0))
    if "protocol" in result:
        failed = result["protocol"]["failed"]
        checks.append(_check("fuzz protocol: every case answered as allowed", not failed, failed))
        before, peak = result["protocol"]["rss_mb"]
        checks.append(
            _check(
                f"fuzz protocol: peak RSS <= {PROTOCOL_RSS_GROWTH_MB} MB above idle "
                "(128 MiB header line sent)",
                peak - before <= PROTOCOL_RSS_GROWTH_MB,
                f"{before} -> peak {peak} MB",
            )
        )
    if "exit_code" in result:
        code = result["exit_code"]
        checks.append(_check("fuzz: the service exits 0 on SIGTERM afterwards", code == 0, code))
    if "server_log" in result:
        log = result["server_log"]
        checks.append(_check("fuzz: no traceback, no ERROR in the log", not log, log[:3]))
    return checks


def swap(result: dict[str, Any]) -> list[Check]:
    """A live model update under load (tests/reliability/swap.py), per trigger (poll, explicit)."""
    checks = []
    for how, r in result.items():
        checks += [
            _check(f"swap ({how}): switched", r["switched"], r["versions"]),
            _check(f"swap ({how}): failed = 0", r["failures"] == 0, r["failure_statuses"]),
            _check(
                f"swap ({how}): one switch point (no old answer after the first new one)",
                r["old_version_after_switch"] == 0,
                r["old_version_after_switch"],
            ),
            _check(f"swap ({how}): /readyz 200 throughout", set(r["readyz"]) == {"200"},
                   r["readyz"]),
        ]  # fmt: skip
    return checks


# While one client attacks, /healthz must answer within this (a liveness probe allows seconds;
# the target is that nobody notices).
HEALTHZ_DURING_ATTACK_S = 0.1


def abuse(result: dict[str, Any]) -> list[Check]:
    """One client against everyone else (tests/reliability/abuse.py)."""
    checks = []
    for name, r in result.items():
        checks += [
            _check(f"abuse {name}: legitimate requests answered 200",
                   bool(r["legit"]) and set(map(str, r["legit"])) == {"200"}, r["legit"]),
            _check(f"abuse {name}: /healthz within {HEALTHZ_DURING_ATTACK_S * 1000:.0f} ms",
                   r["healthz_max_ms"] <= HEALTHZ_DURING_ATTACK_S * 1000,
                   f"max {r['healthz_max_ms']} ms over {r['healthz_probes']} probes"),
        ]  # fmt: skip
    return checks


def as_dicts(checks: list[Check]) -> list[dict[str, Any]]:
    return [asdict(c) for c in checks]


def failures(checks: list[Check]) -> list[str]:
    return [f"{c.name}: {c.detail}" for c in checks if not c.passed]
