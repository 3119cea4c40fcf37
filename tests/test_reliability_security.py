"""Security facts the reliability suite relies on: serving loads ONNX graphs and nothing that
unpickles, exporting loads checkpoints with weights_only, and the container runs unprivileged
on a read-only model volume. (A pickle named model.onnx, or a model_file that is not .onnx,
stopping start-up is in test_reliability_faults.py; model names from URLs in _fuzz.py.)"""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT
from .reliability.faults import CodeOnUnpickle

UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "joblib", "cloudpickle", "marshal", "shelve"}


def _calls(package: str) -> list[tuple[Path, ast.Call]]:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                found.append((path, node))
    return found


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else "?"


def _keyword(call: ast.Call, name: str) -> object:
    for keyword in call.keywords:
        if keyword.arg == name and isinstance(keyword.value, ast.Constant):
            return keyword.value.value
    return None


def test_the_service_imports_nothing_that_unpickles() -> None:
    paths = [
        p for package in ("contract", "runtime", "service") for p in (ROOT / package).rglob("*.py")
    ]
    for path in sorted(paths):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {(node.module or "").split(".")[0]}
            else:
                continue
            assert not names & (UNPICKLERS | {"torch"}), (path, names)


@pytest.mark.parametrize("package", ["service", "models", "export", "bench"])
def test_every_load_refuses_pickles(package: str) -> None:
    for path, call in _calls(package):
        name = _dotted(call.func)
        if name == "torch.load":
            assert _keyword(call, "weights_only") is True, (path, call.lineno)
        if name in {"np.load", "numpy.load"}:
            assert _keyword(call, "allow_pickle") in {None, False}, (path, call.lineno)
        assert name.split(".")[0] not in UNPICKLERS, (path, call.lineno, name)


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_checkpoint_that_would_run_code_is_refused(tmp_path: Path, writer: str) -> None:
    torch = pytest.importorskip("torch")
    from models.checkpoint import CheckpointError, read_state_dict

    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "evil.pth"
    content = {"fc.weight": torch.zeros(2, 2), "payload": CodeOnUnpickle(marker)}
    if writer == "torch.save":
        torch.save(content, checkpoint)
    else:
        checkpoint.write_bytes(pickle.dumps({"state_dict": content}, protocol=2))
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_state_dict(checkpoint)
    assert not marker.exists()


def test_the_container_runs_unprivileged_on_a_read_only_model_volume() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text().split("FROM ")
    serve = next(stage for stage in dockerfile if " AS serve" in stage.splitlines()[0])
    user = [line.split()[1] for line in serve.splitlines() if line.startswith("USER ")][-1]
    assert user.split(":")[0] not in {"0", "root"}

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    api = compose["services"]["api"]
    model_volume = next(v for v in api["volumes"] if v.split(":")[1] == "/models")
    assert model_volume.endswith(":ro")

    deployment = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = [c for c in pod["containers"] if any(
        m["mountPath"] == "/models" for m in c.get("volumeMounts", []))]  # fmt: skip
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/models")
    assert mount["readOnly"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
