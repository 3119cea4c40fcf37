"""Access control against the real service: bearer tokens for inference and management, open
probes, protected metrics and docs, management off unless enabled, and secrets kept out of the
log, /models and --help; a refused request never reaches decoding (the metrics show it)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.launcher import Service

from .support.graphs import write_tiny
from .support.images import solid
from .support.service import service_cli

INFERENCE = "inference-token-0123456789abcdef"
MANAGEMENT = "management-token-fedcba9876543210"


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("auth")
    write_tiny(root / "repo", "tiny")
    token_file = root / "management.token"
    token_file.write_text(MANAGEMENT + "\n")
    flags = (
        "--model-control-mode=explicit",
        f"--management-token-file={token_file}",
        "--log-level=debug",
    )
    env = {"RESNET_SERVE_INFERENCE_TOKEN": INFERENCE}
    with Service(root / "repo", root / "server.log", *flags, env=env) as svc:
        svc.wait_ready()
        yield svc
        assert svc.terminate() == 0, svc.log()
    log = svc.log()
    assert INFERENCE not in log and MANAGEMENT not in log, "a token was logged"
    assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def client(service: Service) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, timeout=30) as client:
        yield client


def classify(client: httpx.Client, headers: dict[str, str]) -> httpx.Response:
    headers = {**headers, "content-type": "image/png"}
    return client.post("/classify?model=tiny", content=solid(80), headers=headers)


def test_probes_stay_open(client: httpx.Client) -> None:
    for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"):
        assert client.get(path).status_code == 200, path


def test_inference_needs_the_inference_token(client: httpx.Client) -> None:
    missing = classify(client, {})
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == 'Bearer realm="resnet-serve"'
    assert missing.json()["error"]["code"] == "unauthorized"
    wrong = classify(client, bearer(INFERENCE[:-1] + "X"))
    assert wrong.status_code == 401
    assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
    assert classify(client, {"authorization": f"Basic {INFERENCE}"}).status_code == 401
    assert classify(client, bearer(MANAGEMENT)).status_code == 401  # tokens do not mix
    assert classify(client, bearer(INFERENCE)).status_code == 200
    assert classify(client, {"authorization": f"bearer   {INFERENCE}"}).status_code == 200
    # The Open Inference Protocol answers in its own error shape.
    v2 = client.post("/v2/models/tiny/infer", json={"inputs": []})
    assert v2.status_code == 401 and isinstance(v2.json()["error"], str)
    assert client.get("/models").status_code == 401


def test_metrics_and_docs_are_protected_by_default(client: httpx.Client) -> None:
    for path in ("/metrics", "/docs", "/openapi.json"):
        assert client.get(path).status_code == 401, path
        assert client.get(path, headers=bearer(INFERENCE)).status_code == 200, path
        assert client.get(path, headers=bearer(MANAGEMENT)).status_code == 200, path


def test_management_needs_the_management_token(client: httpx.Client) -> None:
    assert client.post("/v2/repository/index").status_code == 401
    assert client.post("/v2/repository/index", headers=bearer(INFERENCE)).status_code == 401
    index = client.post("/v2/repository/index", headers=bearer(MANAGEMENT))
    assert index.status_code == 200
    assert index.json() == [{"name": "tiny", "version": "1", "state": "READY"}]


def test_tokens_never_show_in_models_or_help(client: httpx.Client) -> None:
    models = client.get("/models", headers=bearer(INFERENCE))
    assert models.status_code == 200
    assert INFERENCE not in models.text and MANAGEMENT not in models.text
    help_text = service_cli("--help").stdout
    assert "--inference-token-file" in help_text and "RESNET_SERVE_INFERENCE_TOKEN" in help_text
    assert "--inference-token " not in help_text  # no flag holding the secret itself


def test_refused_requests_never_reach_decoding(service: Service, client: httpx.Client) -> None:
    token = bearer(INFERENCE)
    metrics = httpx.get(f"{service.url}/metrics", headers=token).text
    decoded_before = _sample(metrics, "resnet_serve_preprocess_duration_seconds_count")
    requests_before = _sample(metrics, "resnet_serve_requests_total")
    for _ in range(20):
        assert classify(client, bearer("nope")).status_code == 401
        body = solid(90)
        response = client.post("/embed?model=tiny", content=body, headers={"content-type": "a/b"})
        assert response.status_code == 401
    metrics = httpx.get(f"{service.url}/metrics", headers=token).text
    assert _sample(metrics, "resnet_serve_preprocess_duration_seconds_count") == decoded_before
    assert _sample(metrics, "resnet_serve_requests_total") == requests_before
    assert _sample(metrics, "resnet_serve_unauthorized_total") >= 40


def _sample(text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


def test_open_metrics_and_docs_when_configured(tmp_path: Path) -> None:
    write_tiny(tmp_path / "repo", "tiny")
    env = {"RESNET_SERVE_INFERENCE_TOKEN": INFERENCE}
    flags = ("--no-protect-metrics", "--no-protect-docs")
    with Service(tmp_path / "repo", tmp_path / "log", *flags, env=env) as svc:
        svc.wait_ready()
        assert httpx.get(f"{svc.url}/metrics").status_code == 200
        assert httpx.get(f"{svc.url}/openapi.json").status_code == 200
        # Management endpoints are off unless enabled: not even a route.
        refused = httpx.post(f"{svc.url}/v2/repository/index", headers=bearer(INFERENCE))
        assert refused.status_code in (401, 404)
        assert svc.terminate() == 0


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--model-control-mode", "explicit"], {}, "give them a management token"),
        (["--inference-token-file", "EMPTY"], {}, "must be non-empty"),
        (["--inference-token-file", "MISSING"], {}, "cannot read"),
        (
            ["--inference-token-file", "GOOD"],
            {"RESNET_SERVE_INFERENCE_TOKEN": "x" * 20},
            "give one",
        ),
    ],
)
def test_unsafe_access_settings_refuse_to_start(
    tmp_path: Path, args: list[str], env: dict[str, str], message: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    write_tiny(tmp_path / "repo", "tiny")
    (tmp_path / "EMPTY").write_text("\n")
    (tmp_path / "GOOD").write_text("a-good-token-of-some-length\n")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = [str(tmp_path / a) if a in {"EMPTY", "MISSING", "GOOD"} else a for a in args]
    result = service_cli("--model-repository", str(tmp_path / "repo"), *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "a-good-token" not in result.stderr and "x" * 20 not in result.stderr
