"""Several Swarm nodes on one host: this engine as the manager, two more Docker Engines as
workers, each in its own network namespace with its own data root (tests/container/nodes.sh),
joined over a bridge of their own (10.231.0.0/24). The stack spreads its replicas over the
nodes; one worker drained under load loses no request.

Not part of `make test-docker` (it would add about 2.5 minutes to CI): `make test-swarm-nodes`.
"""

from __future__ import annotations

import subprocess
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from ..conftest import ROOT
from .test_stack import docker, free_port, phase, wait_until
from .test_swarm import (
    API,
    HEALTHY_DEADLINE_S,
    STACK,
    Load,
    Swarm,
    build_images,
    image_env,
    run,
    snapshot,
)

pytestmark = pytest.mark.container

NODES = ROOT / "tests" / "container" / "nodes.sh"
WORKERS = 2
REPLICAS = 6
MANAGER_ADDRESS = "10.231.0.1"


def on(node: int, *args: str, timeout_s: float = 600) -> str:
    socket = run(str(NODES), "socket", str(node)).strip()
    return run(docker(), "-H", socket, *args, timeout_s=timeout_s)


def spread(swarm: Swarm) -> Counter[str]:
    """Running replicas per node."""
    listing = run(
        docker(), "service", "ps", API, "--filter", "desired-state=running",
        "--format", "{{.Node}} {{.CurrentState}}",
    )  # fmt: skip
    return Counter(line.split()[0] for line in listing.splitlines() if " Running " in f" {line}")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Swarm]:
    state = run(docker(), "info", "--format", "{{.Swarm.LocalNodeState}}").strip()
    assert state == "inactive", f"this engine is already in a swarm ({state})"
    before = snapshot()
    port, grpc_port, stats_port = free_port(), free_port(), free_port()
    env = image_env()
    start = time.monotonic()
    build_images(env)
    phase("balancer and models images", time.monotonic() - start)
    env.update(
        MODELS_TAG="ci-1",
        API_REPLICAS=str(REPLICAS),
        BALANCER_PORT=str(port),
        BALANCER_GRPC_PORT=str(grpc_port),
        BALANCER_STATS_PORT=str(stats_port),
    )
    swarm = Swarm(env, port, grpc_port, stats_port, before)
    start = time.monotonic()
    try:
        run(str(NODES), "start", str(WORKERS))
        run(docker(), "swarm", "init", "--advertise-addr", MANAGER_ADDRESS)
        token = run(docker(), "swarm", "join-token", "-q", "worker").strip()
        for node in range(1, WORKERS + 1):
            saved = subprocess.Popen(
                [docker(), "save", "resnet-serve-models:ci-1"], stdout=subprocess.PIPE
            )
            socket = run(str(NODES), "socket", str(node)).strip()
            subprocess.run(
                [docker(), "-H", socket, "load", "-q"], stdin=saved.stdout, check=True,
                capture_output=True, timeout=600,
            )  # fmt: skip
            assert saved.wait(timeout=60) == 0
            on(node, "swarm", "join", "--token", token,
               "--advertise-addr", f"10.231.0.1{node}", f"{MANAGER_ADDRESS}:2377")  # fmt: skip
        ready = run(docker(), "node", "ls", "--format", "{{.Status}} {{.Availability}}")
        assert ready.split().count("Ready") == WORKERS + 1, ready
        phase(f"{WORKERS} worker engines started, images loaded, joined", time.monotonic() - start)
        deployed = time.monotonic()
        swarm.stack("deploy")
        wait_until(lambda: swarm.healthy(REPLICAS), HEALTHY_DEADLINE_S)
        phase(
            f"deploy -> {REPLICAS} replicas healthy on {WORKERS + 1} nodes",
            time.monotonic() - deployed,
        )
        yield swarm
    finally:
        if swarm.joined:  # a test failed before the last one cleaned up
            subprocess.run([str(ROOT / "docker" / "stack.sh"), "rm", STACK], cwd=ROOT, timeout=120)
            for node in range(1, WORKERS + 1):
                socket = subprocess.run([str(NODES), "socket", str(node)], capture_output=True,
                                        text=True).stdout.strip()  # fmt: skip
                subprocess.run([docker(), "-H", socket, "swarm", "leave", "--force"], timeout=60)
            subprocess.run([docker(), "swarm", "leave", "--force"], timeout=60)
            subprocess.run([str(NODES), "stop"], timeout=120)
            if "docker_gwbridge" not in before["network"]:
                subprocess.run([docker(), "network", "rm", "docker_gwbridge"], timeout=60)


def test_replicas_spread_over_the_nodes_and_all_answer(cluster: Swarm) -> None:
    nodes = spread(cluster)
    print(f"\n[nodes] replicas per node: {dict(nodes)}", flush=True)
    assert len(nodes) == WORKERS + 1 and sum(nodes.values()) == REPLICAS
    with Load(cluster.url) as load:
        load.wait_for(120)
    load.report(f"{REPLICAS} replicas on {WORKERS + 1} nodes", 0.0)
    assert set(load.counts()) == {"ok"}
    assert len(load.replicas()) == REPLICAS


def test_draining_a_worker_under_load_loses_nothing(cluster: Swarm) -> None:
    manager = run(docker(), "info", "--format", "{{.Name}}").strip()
    worker = next(node for node in spread(cluster) if node != manager)

    def moved() -> bool:
        now = spread(cluster)
        return worker not in now and sum(now.values()) == REPLICAS and cluster.healthy(REPLICAS)

    with Load(cluster.url) as load:
        load.wait_for(20)
        start = time.monotonic()
        run(docker(), "node", "update", "--availability", "drain", worker)
        wait_until(moved, HEALTHY_DEADLINE_S)
        seconds = time.monotonic() - start
        load.wait_for(len(load.outcomes) + 30)
    load.report(f"node {worker} drained, its replicas started elsewhere", seconds)
    print(f"[nodes] replicas per node after the drain: {dict(spread(cluster))}", flush=True)
    assert set(load.counts()) == {"ok"}, load.counts()
    run(docker(), "node", "update", "--availability", "active", worker)


def test_stack_rm_leave_and_stop_leave_nothing_behind(cluster: Swarm) -> None:
    run(str(ROOT / "docker" / "stack.sh"), "rm", STACK)
    for node in range(1, WORKERS + 1):
        on(node, "swarm", "leave", "--force")
    run(docker(), "swarm", "leave", "--force")
    run(str(NODES), "stop")
    if "docker_gwbridge" not in cluster.before["network"]:
        run(docker(), "network", "rm", "docker_gwbridge")
    cluster.joined = False
    after = snapshot()
    assert {kind: after[kind] - cluster.before[kind] for kind in after} == {
        "network": set(),
        "volume": set(),
        "container": set(),
    }
    assert "rsw-n" not in run("ip", "netns", "list")
    assert subprocess.run(["ip", "link", "show", "rsw0"], capture_output=True).returncode != 0
