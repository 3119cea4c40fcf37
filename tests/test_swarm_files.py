"""The Swarm stack's files, checked without an engine: what `docker/stack.sh` hands to
`docker stack deploy` (the compose files rendered by Compose v2), the balancer's HAProxy
configuration, the Dockerfiles (hadolint). The stack itself runs in tests/container/test_swarm.py
(`make test-docker`)."""

from __future__ import annotations

import os
import subprocess
from typing import Any

import pytest
import yaml

from .conftest import ROOT
from .test_docker import compose_binary, tool

FILES = ["docker-compose.yml", "docker-compose.cpu.yml", "docker-compose.swarm.yml"]
HAPROXY = ROOT / "docker" / "balancer" / "haproxy.cfg"


@pytest.fixture(scope="module")
def rendered() -> dict[str, Any]:
    """What stack.sh renders: the three files through `compose config`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RESNET_", "API_", "EXPORT_"))}
    env["COMPOSE_PROJECT_NAME"] = "resnet"
    command = [compose_binary(), *(a for f in FILES for a in ("-f", f)), "config"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", "compose warnings"
    return yaml.safe_load(result.stdout)


def test_swarm_runs_no_export_job_and_no_compose_only_options(rendered: dict[str, Any]) -> None:
    services = rendered["services"]
    assert set(services) == {"api", "balancer"}
    api = services["api"]
    for option in ("depends_on", "ports", "volumes"):
        assert option not in api, f"api.{option} is not for Swarm"
    assert "resources" not in api["deploy"], "no GPU reservation (docker stack rejects it)"
    assert "volumes" not in rendered, "the models travel in the image"


def test_api_replicas_are_found_by_dns_and_updated_start_first(rendered: dict[str, Any]) -> None:
    api = rendered["services"]["api"]
    assert api["image"] == "resnet-serve-models:1"
    deploy = api["deploy"]
    assert deploy["endpoint_mode"] == "dnsrr" and deploy["replicas"] == 2
    assert deploy["update_config"]["order"] == "start-first"
    assert deploy["update_config"]["failure_action"] == "rollback"
    assert deploy["restart_policy"]["condition"] == "any"
    assert api["healthcheck"]["test"][-1] == "/readyz"  # Swarm waits for it before the next task
    drain = int(api["environment"]["RESNET_SERVE_DRAIN_DELAY_MS"])
    assert drain >= 2000, "keep serving while the balancer's checks (1 s x 2) take it out"
    assert rendered["networks"]["backend"]["driver"] == "overlay"
    assert list(api["networks"]) == ["backend"]


def test_the_balancer_publishes_in_host_mode_on_the_overlay_network(
    rendered: dict[str, Any],
) -> None:
    balancer = rendered["services"]["balancer"]
    assert balancer["build"]["context"].endswith("docker/balancer")
    ports = {int(p["target"]): p for p in balancer["ports"]}
    assert set(ports) == {8000, 8001, 8404}
    assert {p["mode"] for p in ports.values()} == {"host"}, "the routing mesh needs IPVS"
    assert list(balancer["networks"]) == ["backend"]
    assert balancer["deploy"]["placement"]["constraints"] == ["node.role == manager"]


def haproxy() -> dict[str, list[str]]:
    """Each section of haproxy.cfg (e.g. `backend api`) -> its directives, comments dropped."""
    sections: dict[str, list[str]] = {}
    current = ""
    for raw in HAPROXY.read_text("utf-8").splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not line.startswith(" "):
            current = line.strip()
            sections[current] = []
        else:
            sections[current].append(" ".join(line.split()))
    return sections


def test_haproxy_finds_replicas_in_swarm_dns_checks_readiness_and_retries() -> None:
    config = haproxy()
    assert "nameserver docker 127.0.0.11:53" in config["resolvers swarm"]
    defaults = config["defaults"]
    assert "retries 3" in defaults and "option redispatch 1" in defaults
    assert "retry-on conn-failure empty-response response-timeout 503" in defaults
    assert "option http-buffer-request" in defaults  # a retry resends the buffered request
    for backend, port in (("backend api", 8000), ("backend api_grpc", 8001)):
        lines = config[backend]
        assert "http-check send meth GET uri /readyz" in lines
        assert "http-check expect status 200" in lines
        (template,) = [line for line in lines if line.startswith("server-template")]
        assert f"tasks.api:{port}" in template
        (default,) = [line for line in lines if line.startswith("default-server")]
        assert "resolvers swarm" in default and "check" in default.split()
    assert any("proto h2" in line for line in config["backend api_grpc"])
    assert "bind :8001 proto h2" in config["frontend grpc"]


@pytest.mark.parametrize("dockerfile", ["docker/balancer/Dockerfile", "docker/models.Dockerfile"])
def test_hadolint_finds_nothing_in_the_swarm_dockerfiles(dockerfile: str) -> None:
    result = subprocess.run(
        [tool("hadolint"), "--config", ".hadolint.yaml", dockerfile],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
