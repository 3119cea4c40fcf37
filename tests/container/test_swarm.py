"""Docker Swarm: the stack of docker-compose.swarm.yml on a single-node swarm, driven from the host
through the balancer's ports on 127.0.0.1 (HAProxy, docker/balancer/haproxy.cfg).

Run by `make test-docker` after the compose tests (tests/container/run.sh), with the images
they built: this module builds only the balancer (Debian's HAProxy) and two models images
(docker/models-image.sh: the shipped ResNet-20 exported once and baked in; the second adds a
version 2 for the rolling update). It initialises the swarm, and leaves it (and removes what
Swarm created) at the end; it fails, and never skips, when a swarm it did not make is there.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest

from ..conftest import CIFAR_TEST, ROOT, require
from .test_stack import MODEL, classify, docker, free_port, phase, png, sample_blobs, wait_until

pytestmark = pytest.mark.container

STACK = "resnet-ci"
API = f"{STACK}_api"
REPLICAS = 2
HEALTHY_DEADLINE_S = 180.0


def run(*args: str, env: dict[str, str] | None = None, timeout_s: float = 300) -> str:
    result = subprocess.run(
        list(args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s
    )
    assert result.returncode == 0, f"{' '.join(args)}: {result.stdout}{result.stderr}"
    return result.stdout


def snapshot() -> dict[str, set[str]]:
    """Every network, volume and container (stopped ones too) by name."""
    return {
        "network": set(run(docker(), "network", "ls", "--format", "{{.Name}}").split()),
        "volume": set(run(docker(), "volume", "ls", "--format", "{{.Name}}").split()),
        "container": set(run(docker(), "ps", "-a", "--format", "{{.Names}}").split()),
    }


@dataclass
class Swarm:
    env: dict[str, str]
    port: int
    grpc_port: int
    stats_port: int
    before: dict[str, set[str]]
    joined: bool = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stack(self, action: str, **variables: str) -> None:
        env = {**self.env, **variables}
        run(str(ROOT / "docker" / "stack.sh"), action, STACK, env=env, timeout_s=180)
        if variables:
            self.env = env

    def replicas(self) -> str:
        listing = ["service", "ls", "--filter", f"name={API}", "--format", "{{.Replicas}}"]
        return run(docker(), *listing)

    def servers(self) -> dict[str, str]:
        """The balancer's `api` servers that are UP (health checks passing): name -> address."""
        try:
            text = httpx.get(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=2).text
        except httpx.HTTPError:
            return {}
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return {
            r["svname"]: r["addr"]
            for r in rows
            if r["pxname"] == "api" and r["svname"] not in ("FRONTEND", "BACKEND")
            if r["status"].startswith("UP")
        }

    def healthy(self, n: int) -> bool:
        """n replicas running and healthy in Swarm's view, n servers UP in the balancer's."""
        return self.replicas().strip() == f"{n}/{n}" and len(self.servers()) == n

    def tasks(self) -> list[str]:
        label = f"label=com.docker.swarm.service.name={API}"
        return run(docker(), "ps", "-q", "--filter", label).split()


@pytest.fixture(scope="module")
def swarm() -> Iterator[Swarm]:
    state = run(docker(), "info", "--format", "{{.Swarm.LocalNodeState}}").strip()
    assert state == "inactive", f"this engine is already in a swarm ({state}): not ours to leave"
    before = snapshot()
    env = image_env()
    port, grpc_port, stats_port = free_port(), free_port(), free_port()
    env.update(
        MODELS_TAG="ci-1",
        API_REPLICAS=str(REPLICAS),
        BALANCER_PORT=str(port),
        BALANCER_GRPC_PORT=str(grpc_port),
        BALANCER_STATS_PORT=str(stats_port),
        RESNET_SERVE_MAX_QUEUE_IMAGES="4096",
    )
    swarm = Swarm(env, port, grpc_port, stats_port, before)
    start = time.monotonic()
    run(docker(), "swarm", "init", "--advertise-addr", "127.0.0.1")
    try:
        build_images(env)
        built = time.monotonic()
        phase("swarm init, balancer image, models images ci-1 and ci-2", built - start)
        swarm.stack("deploy")
        wait_until(lambda: swarm.healthy(REPLICAS), HEALTHY_DEADLINE_S)
        ready = time.monotonic()
        phase(f"`docker stack deploy` -> {REPLICAS} healthy replicas behind HAProxy", ready - built)
        phase("nothing -> healthy stack (swarm init, images, deploy)", ready - start)
        yield swarm
    finally:
        if swarm.joined:
            subprocess.run([str(ROOT / "docker" / "stack.sh"), "rm", STACK], cwd=ROOT, timeout=120)
            subprocess.run([docker(), "swarm", "leave", "--force"], timeout=60)
            if "docker_gwbridge" not in before["network"]:  # made by `swarm init`
                subprocess.run([docker(), "network", "rm", "docker_gwbridge"], timeout=60)


def build_images(env: dict[str, str]) -> None:
    """The balancer (Debian's HAProxy) and two models images: ResNet-20 at version 1 (ci-1),
    then versions 1 and 2 (ci-2, exported with another batch limit) for the rolling update."""
    files = ["-f", "docker-compose.yml", "-f", "docker-compose.cpu.yml"]
    files += ["-f", "docker-compose.swarm.yml"]
    run(docker(), "compose", *files, "build", "balancer", env=env)
    models = str(ROOT / "docker" / "models-image.sh")
    run(models, "--tag", "ci-1", env=env)
    run(models, "--tag", "ci-2", "--from", "resnet-serve-models:ci-1", "--",
        "--max-batch-size", "16", env=env)  # fmt: skip


def image_env() -> dict[str, str]:
    """What building the swarm images needs: the air-gapped base, the host network, and the
    shipped ResNet-20 only, with no calibration images and no download."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RESNET_SERVE_", "EXPORT_"))}
    state = os.environ.get("STATE_DIR", str(ROOT / ".docker-ci"))
    empty = os.path.join(state, "calibration-empty")
    os.makedirs(empty, exist_ok=True)
    env.update(
        DEBIAN_IMAGE=os.environ.get("PYTHON_IMAGE", "resnet-serve-base:bookworm"),
        BUILD_NETWORK="host",
        EXPORT_ARCHS=MODEL,
        EXPORT_PRETRAINED="never",
        CALIBRATION_DIR=empty,
    )
    return env


@dataclass
class Load:
    """Closed-loop clients through the balancer, one connection per request; each outcome with
    the replica that answered (X-Served-By) and the model version."""

    url: str
    clients: int = 6
    outcomes: list[tuple[float, str, str, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._blob = sample_blobs()[0][0]
        self._lock = threading.Lock()

    def _one(self) -> tuple[str, str, int]:
        files = [("file", ("0.png", self._blob, "image/png"))]
        timeout = httpx.Timeout(60.0, connect=2.0)
        try:
            with httpx.Client(timeout=timeout, headers={"Connection": "close"}) as client:
                response = client.post(f"{self.url}/classify", params={"model": MODEL}, files=files)
        except httpx.HTTPError as exc:
            return type(exc).__name__, "", 0
        if response.status_code != 200:
            return f"http_{response.status_code}", response.headers.get("x-served-by", ""), 0
        return "ok", response.headers.get("x-served-by", ""), int(response.json()["version"])

    def _loop(self) -> None:
        while not self._stop.is_set():
            outcome, replica, version = self._one()
            with self._lock:
                self.outcomes.append((time.monotonic(), outcome, replica, version))

    def __enter__(self) -> Load:
        self._threads = [threading.Thread(target=self._loop) for _ in range(self.clients)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=90)

    def wait_for(self, count: int, deadline_s: float = 60) -> None:
        end = time.monotonic() + deadline_s
        while len(self.outcomes) < count:
            assert time.monotonic() < end, f"load made no progress: {self.counts()}"
            time.sleep(0.05)

    def counts(self) -> Counter[str]:
        with self._lock:
            return Counter(outcome for _, outcome, _, _ in self.outcomes)

    def replicas(self) -> Counter[str]:
        with self._lock:
            return Counter(replica for _, outcome, replica, _ in self.outcomes if outcome == "ok")

    def report(self, what: str, seconds: float) -> None:
        counts = self.counts()
        failed = sum(n for outcome, n in counts.items() if outcome != "ok")
        print(
            f"\n[swarm] {what} under load: {seconds:.1f} s; {sum(counts.values())} requests "
            f"sent, {failed} failed ({dict(counts)}); answered by {dict(self.replicas())}",
            flush=True,
        )


def test_accuracy_through_the_swarm(swarm: Swarm) -> None:
    with np.load(require(CIFAR_TEST)) as data:
        images, labels = data["images"], data["labels"]
    blobs = [png(image) for image in images]
    chunks = [list(range(i, i + 25)) for i in range(0, len(blobs), 25)]
    predicted = np.full(len(blobs), -1)

    def one(chunk: list[int]) -> None:
        with httpx.Client(timeout=120) as client:
            predictions = classify(client, swarm.url, [blobs[i] for i in chunk])
        for i, top in zip(chunk, predictions, strict=True):
            predicted[i] = top[0]["index"]

    with ThreadPoolExecutor(8) as pool:
        for future in [pool.submit(one, chunk) for chunk in chunks]:
            future.result()
    correct = int((predicted == labels).sum())
    print(f"\naccuracy through the swarm: {correct}/{len(labels)}", flush=True)
    assert correct == 1813


def test_answers_come_from_every_replica(swarm: Swarm) -> None:
    with Load(swarm.url) as load:
        load.wait_for(120)
    load.report(f"{REPLICAS} replicas", 0.0)
    split = load.replicas()
    assert set(load.counts()) == {"ok"}
    assert len(split) == REPLICAS
    assert min(split.values()) >= 0.25 * sum(split.values()), split


def test_grpc_is_balanced_per_call(swarm: Swarm) -> None:
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(url=f"127.0.0.1:{swarm.grpc_port}")
    blob, label = sample_blobs()[0]
    for _ in range(8):  # one channel, one connection: HAProxy still balances each call
        image = triton.InferInput("image_bytes", [1], "BYTES")
        image.set_data_from_numpy(np.array([blob], dtype=np.object_))
        result = client.infer(MODEL, [image], outputs=[triton.InferRequestedOutput("logits")])
        assert int(result.as_numpy("logits")[0].argmax()) == label
    text = httpx.get(f"http://127.0.0.1:{swarm.stats_port}/stats;csv", timeout=5).text
    rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
    calls = {r["svname"]: int(r["stot"]) for r in rows if r["pxname"] == "api_grpc"}
    served = [n for name, n in calls.items() if name not in ("FRONTEND", "BACKEND") and n]
    print(f"\n[swarm] 8 gRPC calls on one channel, per replica: {served}", flush=True)
    assert len(served) == REPLICAS and sum(served) == 8


def test_a_replica_killed_under_load_loses_nothing_and_is_replaced(swarm: Swarm) -> None:
    """SIGKILL to one replica's service process, from the host, as a crash would."""
    container = swarm.tasks()[0]
    top = run(docker(), "top", container, "-eo", "pid,args").splitlines()[1:]
    (pid,) = [int(line.split()[0]) for line in top if "-m service" in line]
    with Load(swarm.url) as load:
        load.wait_for(20)
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: container not in swarm.tasks(), 30)
        wait_until(lambda: swarm.healthy(REPLICAS), HEALTHY_DEADLINE_S)
        replaced = time.monotonic() - killed
        load.wait_for(len(load.outcomes) + 20)
    load.report(f"one replica killed, replaced and healthy again after {replaced:.1f} s", replaced)
    assert set(load.counts()) == {"ok"}, load.counts()
    assert len(swarm.tasks()) == REPLICAS


def test_a_rolling_update_to_a_new_model_version_loses_nothing(swarm: Swarm) -> None:
    """The stack deployed again with the models image that holds version 2 (start-first)."""
    with Load(swarm.url) as load:
        load.wait_for(20)
        start = time.monotonic()
        swarm.stack("deploy", MODELS_TAG="ci-2")

        def updated() -> bool:
            status = run(docker(), "service", "inspect", "--format", "{{json .UpdateStatus}}", API)
            state = (json.loads(status) or {}).get("State")
            assert state not in ("rollback_started", "rollback_completed", "paused"), status
            return state == "completed" and swarm.healthy(REPLICAS)

        wait_until(updated, HEALTHY_DEADLINE_S)
        seconds = time.monotonic() - start
        done = len(load.outcomes)
        load.wait_for(done + 20)
    load.report("rolling update ci-1 -> ci-2 (model version 1 -> 2)", seconds)
    assert set(load.counts()) == {"ok"}, load.counts()
    assert {version for _, _, _, version in load.outcomes[done:]} == {2}


def test_scaling_2_to_4_to_2_under_load_loses_nothing(swarm: Swarm) -> None:
    with Load(swarm.url) as load:
        load.wait_for(20)
        start = time.monotonic()
        for n in (4, REPLICAS):
            run(docker(), "service", "scale", "--detach", f"{API}={n}")
            wait_until(lambda n=n: swarm.healthy(n), HEALTHY_DEADLINE_S)
            phase(f"scaled to {n} (healthy)", time.monotonic() - start)
            load.wait_for(len(load.outcomes) + 30)
        seconds = time.monotonic() - start
    load.report("scale 2 -> 4 -> 2", seconds)
    assert set(load.counts()) == {"ok"}, load.counts()
    assert len(load.replicas()) >= 4  # the two added replicas answered too


def test_stack_rm_and_swarm_leave_leave_nothing_behind(swarm: Swarm) -> None:
    assert run(docker(), "secret", "ls", "-q").split() == []
    assert run(docker(), "config", "ls", "-q").split() == []
    swarm.stack("rm")
    run(docker(), "swarm", "leave", "--force")
    if "docker_gwbridge" not in swarm.before["network"]:
        run(docker(), "network", "rm", "docker_gwbridge")  # made by `swarm init`
    swarm.joined = False
    after = snapshot()
    assert {kind: after[kind] - swarm.before[kind] for kind in after} == {
        "network": set(),
        "volume": set(),
        "container": set(),
    }
    assert run(docker(), "info", "--format", "{{.Swarm.LocalNodeState}}").strip() == "inactive"
