"""`python -m tests.reliability overload|soak|fuzz|faults|swap|abuse|all --out DIR [--quick]`

Starts `python -m service` on free 127.0.0.1 ports (one fresh process per scenario), drives it
with bounded request counts and time, writes DIR/results.json, DIR/results.md and the servers'
logs under DIR/logs, and exits 1 when a check fails. Load scenarios serve an exported ResNet-18
(random weights: latency, not accuracy, matters here; `--repository REPO --model NAME` serves
your own instead); hostile-input and fault scenarios serve small synthetic graphs. `--quick`
shortens everything to about a minute and serves a synthetic graph for load too.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from tests.support.launcher import Service
from tests.support.load import Target

from ..support.graphs import write_conv, write_poison, write_slow, write_tiny
from ..support.images import ROOT, sample_images
from . import abuse as abuse_attacks
from . import faults as fault_scenarios
from . import judge
from .capacity import overload, soak
from .fuzz import fuzz_images, fuzz_openapi, fuzz_protocol
from .report import machine, markdown
from .swap import swap_under_load, write_version_atomically


@dataclass(frozen=True)
class Plan:
    phase_s: float
    burst: int
    soak_s: float
    warmup_s: float
    sigterm_load_s: float
    image_examples: int
    openapi_examples: int
    synthetic_load: bool  # a synthetic graph instead of an exported ResNet-18


LONG = Plan(10.0, 2000, 120.0, 30.0, 5.0, 2000, 100, synthetic_load=False)
QUICK = Plan(3.0, 400, 20.0, 5.0, 2.0, 150, 10, synthetic_load=True)
MAX_QUEUE_IMAGES = 64
MAX_BATCH_SIZE = 16
FUZZ_MAX_REQUEST_BYTES = 8 * 2**20
ABUSE_TOKEN = "abuse-token-0123456789abcdef"


class Run:
    def __init__(self, out: Path, plan: Plan, repository: Path | None, model: str | None) -> None:
        self.out, self.plan = out, plan
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, Any] = {"machine": machine(), "plan": plan.__dict__}
        self.checks: list[judge.Check] = []
        self._repository, self._model = repository, model

    def load_model(self) -> tuple[Path, str]:
        """The repository and model the load scenarios serve (built once)."""
        if self._repository is None:
            repo = self.out / "load-repo"
            if not repo.is_dir():
                if self.plan.synthetic_load:
                    write_conv(repo, "synthetic", layers=4)
                else:
                    export_resnet18(repo)
            self._repository = repo
            self._model = "synthetic" if self.plan.synthetic_load else "resnet18"
        assert self._model is not None
        return self._repository, self._model

    def service(
        self, name: str, repo: Path, *flags: str, env: dict[str, str] | None = None
    ) -> Service:
        service = Service(repo, self.logs / f"{name}.log", *flags, env=env)
        service.wait_ready()
        return service

    def load_flags(self, *extra: str) -> tuple[str, ...]:
        return (
            f"--max-queue-images={MAX_QUEUE_IMAGES}",
            f"--max-batch-size={MAX_BATCH_SIZE}",
            f"--max-images-per-request={MAX_QUEUE_IMAGES}",
            *extra,
        )

    def overload(self) -> None:
        repo, model = self.load_model()
        with self.service("overload", repo, *self.load_flags()) as service:
            result = overload(
                Target(service, model, sample_images(32)),
                burst_requests=self.plan.burst,
                phase_s=self.plan.phase_s,
                max_queue_images=MAX_QUEUE_IMAGES,
                max_batch_size=MAX_BATCH_SIZE,
            )
        self.results["overload"] = result
        self.checks += judge.overload(result)

    def soak(self) -> None:
        repo, model = self.load_model()
        with self.service("soak", repo, *self.load_flags()) as service:
            result = soak(
                Target(service, model, sample_images(32)),
                duration_s=self.plan.soak_s,
                warmup_s=self.plan.warmup_s,
            )
        self.results["soak"] = result
        self.checks += judge.soak(result)

    def fuzz(self) -> None:
        repo = self.out / "fuzz-repo"
        if not repo.is_dir():
            write_tiny(repo, "tiny")
        flags = ("--request-timeout-ms=2000", f"--max-request-bytes={FUZZ_MAX_REQUEST_BYTES}")
        result: dict[str, Any] = {}
        with self.service("fuzz", repo, *flags) as service:
            try:
                result["images"] = fuzz_images(service.url, "tiny", self.plan.image_examples)
            except AssertionError as exc:  # Hypothesis's shrunk counterexample
                result["images"] = {"failure": str(exc)[:4000]}
            report = self.out / "schemathesis.json"
            result["openapi"] = fuzz_openapi(service.url, self.plan.openapi_examples, report)

            def healthy() -> bool:
                return httpx.get(f"{service.url}/healthz", timeout=5).status_code == 200

            result["protocol"] = fuzz_protocol(
                service,
                "tiny",
                request_timeout_s=2.0,
                max_request_bytes=FUZZ_MAX_REQUEST_BYTES,
                healthy=healthy,
            )
            result["exit_code"] = service.terminate()
        result["server_log"] = [
            line for line in service.log().splitlines() if " ERROR " in line or "Traceback" in line
        ]
        self.results["fuzz"] = result
        self.checks += judge.fuzz(result)

    def faults(self) -> None:
        results: dict[str, Any] = {"startup": []}
        shutil.rmtree(self.out / "startup", ignore_errors=True)  # a rerun starts clean
        for index, case in enumerate(fault_scenarios.BROKEN_MODELS):
            workdir = self.out / "startup" / str(index)
            outcome = fault_scenarios.broken_model_at_startup(workdir, case)
            results["startup"].append(outcome)
            self.checks += judge.startup(outcome)
        repo = self.out / "faults-repo"
        if not repo.is_dir():
            write_slow(repo, "tiny", max_batch_size=64)
            write_poison(repo, "poison")
        with self.service("failing-batch", repo) as service:
            results["failing_batch"] = fault_scenarios.failing_batch(service, "poison", "tiny")
        self.checks += judge.failing_batch(results["failing_batch"])
        with self.service("disconnects", repo, "--max-batch-size=64") as service:
            target = Target(service, "tiny", sample_images(8))
            results["disconnects"] = fault_scenarios.disconnects(target)
        self.checks += judge.disconnects(results["disconnects"])
        load_repo, model = self.load_model()
        for key, drain, balancer in (("sigterm", 1000, True), ("sigterm_no_drain", 0, False)):
            service = self.service(key, load_repo, *self.load_flags(f"--drain-delay-ms={drain}"))
            results[key] = fault_scenarios.sigterm_under_load(
                Target(service, model, sample_images(32)),
                concurrency=16,
                load_s=self.plan.sigterm_load_s,
                balancer=balancer,
            )
        self.checks += judge.sigterm(results["sigterm"])
        self.results["faults"] = results

    def swap(self) -> None:
        """A new version swapped in under steady load, by the poller and by an explicit load."""
        results: dict[str, Any] = {}
        for how in ("poll", "explicit"):
            repo = self.out / f"swap-{how}-repo"
            shutil.rmtree(repo, ignore_errors=True)  # a rerun starts from version 1
            write_tiny(repo, "tiny")
            token = self.out / "swap-management.token"
            token.write_text("swap-" + "0123456789abcdef" * 2)
            flags = [f"--model-control-mode={how}", "--repository-poll-secs=0.5"]
            flags += [f"--management-token-file={token}", "--no-protect-metrics"]
            with self.service(f"swap-{how}", repo, *flags) as service:
                if how == "poll":
                    trigger = partial(write_version_atomically, repo, "tiny", 2, seed=1)
                else:
                    write_version_atomically(repo, "tiny", 2, seed=1)
                    url = f"{service.url}/v2/repository/models/tiny/load"
                    auth = {"authorization": f"Bearer {token.read_text()}"}
                    trigger = partial(_status_of, url, auth)
                results[how] = swap_under_load(
                    service, "tiny", trigger, new_version=2, answers_after=300
                )
                results[how]["trigger_result"] = str(results[how]["trigger_result"])
        self.results["swap"] = results
        self.checks += judge.swap(results)

    def abuse(self) -> None:
        """One client against everyone else (tests/reliability/abuse.py), with tokens off and
        on: /healthz latency, legitimate requests and peak memory during each attack."""
        results: dict[str, Any] = {}
        for mode in ("open", "tokens"):
            repo = self.out / "abuse-repo"
            if not repo.is_dir():
                write_tiny(repo, "tiny")
            env = {"RESNET_SERVE_INFERENCE_TOKEN": ABUSE_TOKEN} if mode == "tokens" else {}
            headers = {"authorization": f"Bearer {ABUSE_TOKEN}"} if mode == "tokens" else {}
            metadata = [[k, v] for k, v in headers.items()]
            flags = ("--no-protect-metrics", "--request-head-timeout-ms=1000")
            with self.service(f"abuse-{mode}", repo, *flags, env=env) as service:
                url, target = service.url, f"{service.host}:{service.grpc_port}"
                legit = abuse_attacks.classify_png("tiny", headers)
                attacks: dict[str, tuple[Any, ...]] = {
                    "multipart near-boundary, 60 MB": ("multipart_near_boundary", url, 60, headers),
                    "gRPC 60 MB of empty outputs, no token": ("grpc_amplified", target, 60),
                    "gRPC 30 MB of empty outputs, no token": ("grpc_amplified", target, 30),
                    "gRPC 30 MB of empty outputs, token": (
                        "grpc_amplified", target, 30, metadata,
                    ),
                    "gRPC 200 MB gzip-compressed": ("grpc_compressed", target, 200, metadata),
                    "OIP input name of 3 MB": ("json_echo", url, 3),
                    "8 PNGs of 20 MP (a few KB each)": ("pixel_flood", url, 8, 4500),
                    "progressive JPEG, last scan x3000": ("progressive_scans", url, 3000),
                    "500 request heads never finished": (
                        "slow_heads", service.host, service.port, 500, 60.0,
                    ),
                }  # fmt: skip
                if mode == "tokens":  # needs the token: measured where it is open
                    for name in list(attacks):
                        if attacks[name][0] in ("json_echo", "pixel_flood", "progressive_scans"):
                            del attacks[name]
                for name, (attack, *args) in attacks.items():
                    print(f"  {mode}: {name}", flush=True)
                    results[f"{name} ({mode})"] = abuse_attacks.watched(
                        service, legit, attack, *args
                    )
        self.results["abuse"] = results
        self.checks += judge.abuse(results)

    def write(self) -> bool:
        self.results["checks"] = judge.as_dicts(self.checks)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1) + "\n")
        (self.out / "results.md").write_text(markdown(self.results))
        return all(c.passed for c in self.checks)


def _status_of(url: str, headers: dict[str, str]) -> int:
    return httpx.post(url, headers=headers, timeout=120).status_code


def export_resnet18(repo: Path) -> None:
    command = [sys.executable, "-m", "export", "resnet18", "--weights", "random:0"]
    command += ["--out", str(repo), "--max-batch-size", str(MAX_BATCH_SIZE)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=900)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.reliability", description=__doc__)
    parser.add_argument(
        "scenario", choices=["overload", "soak", "fuzz", "faults", "swap", "abuse", "all"]
    )
    parser.add_argument("--out", type=Path, required=True, help="directory for the results")
    parser.add_argument("--quick", action="store_true", help="about a minute, synthetic models")
    parser.add_argument("--repository", type=Path, help="serve this repository for load")
    parser.add_argument("--model", help="the model of --repository to load")
    args = parser.parse_args(argv)
    if (args.repository is None) != (args.model is None):
        parser.error("--repository and --model go together")
    run = Run(args.out, QUICK if args.quick else LONG, args.repository, args.model)
    started = time.monotonic()
    steps = ["overload", "soak", "faults", "fuzz", "swap", "abuse"]
    steps = steps if args.scenario == "all" else [args.scenario]
    for step in steps:
        print(f"{step} ...", flush=True)
        getattr(run, step)()
    run.results["duration_s"] = round(time.monotonic() - started, 1)
    passed = run.write()
    print((args.out / "results.md").read_text())
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
