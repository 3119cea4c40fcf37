"""Settings: flags and RESNET_SERVE_* variables map one-to-one, and unsafe values are refused."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from runtime.engines import EngineConfig
from service.__main__ import build_parser, parse_settings
from service.core.settings import CPU, CUDA, Settings, is_env_only

from .conftest import ROOT
from .support.service import service_cli


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("RESNET_SERVE_"):
            monkeypatch.delenv(key)


def test_defaults(tmp_path: Path) -> None:
    settings = Settings(model_repository=tmp_path)
    assert (settings.host, settings.port, settings.max_batch_size) == ("127.0.0.1", 8000, 32)
    assert settings.provider_list == "auto"
    assert settings.default_model is None


def test_environment_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESNET_SERVE_MODEL_REPOSITORY", str(tmp_path))
    monkeypatch.setenv("RESNET_SERVE_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("RESNET_SERVE_PORT", "9000")
    monkeypatch.setenv("RESNET_SERVE_ACCESS_LOG", "false")
    settings = parse_settings(["--port", "9100", "--providers", "cpu"])
    assert settings.model_repository == tmp_path
    assert settings.max_batch_size == 8
    assert settings.port == 9100  # the flag wins
    assert settings.access_log is False
    assert settings.provider_list == (CPU,)


def test_every_setting_has_a_flag_and_a_variable() -> None:
    help_text = " ".join(build_parser().format_help().split())
    for name in Settings.model_fields:
        flag = re.escape("--" + name.replace("_", "-")) + r"(?![\w-])"
        # Secrets are variables only: a flag would show them in the process list.
        assert bool(re.search(flag, help_text)) is not is_env_only(name), name
        assert "RESNET_SERVE_" + name.upper() in help_text
    assert {n for n in Settings.model_fields if is_env_only(n)} == {
        "inference_token",
        "management_token",
    }


def test_cudnn_algorithm_search_reaches_the_cuda_provider_options(tmp_path: Path) -> None:
    from runtime.engines import CUDA as CUDA_PROVIDER
    from runtime.engines.providers import provider_options

    argv = ["--model-repository", str(tmp_path), "--cudnn-conv-algo-search", "HEURISTIC"]
    settings = parse_settings(argv)
    options = provider_options([CUDA_PROVIDER, CPU], settings.engine_config())
    assert options[0]["cudnn_conv_algo_search"] == "HEURISTIC" and options[1] == {}
    default = Settings(model_repository=tmp_path).engine_config()
    assert default.cudnn_conv_algo_search == "EXHAUSTIVE"
    with pytest.raises(SystemExit):
        parse_settings([*argv[:2], "--cudnn-conv-algo-search", "FASTEST"])


def test_boolean_flags(tmp_path: Path) -> None:
    settings = parse_settings(["--model-repository", str(tmp_path), "--no-access-log"])
    assert settings.access_log is False
    assert parse_settings(["--model-repository", str(tmp_path), "--require-cuda"]).require_cuda


def test_provider_names_and_aliases(tmp_path: Path) -> None:
    settings = Settings(model_repository=tmp_path, providers="cuda, CPUExecutionProvider")
    assert settings.provider_list == (CUDA, CPU)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"max_batch_size": 0}, "greater than or equal to 1"),
        ({"port": 70000}, "less than or equal to 65535"),
        ({"max_images_per_request": 100, "max_queue_images": 50}, "could never be queued"),
        ({"max_batch_size": 64, "max_queue_images": 32, "max_images_per_request": 8}, "never form"),
        ({"providers": "cpu", "require_cuda": True}, "omit CUDA"),
        ({"request_timeout_ms": 5, "max_delay_ms": 10}, "longer than max_delay_ms"),
        ({"log_level": "loud"}, "log_level"),
        ({"unknown_setting": 1}, "unknown_setting"),
    ],
)
def test_unsafe_values_are_refused(tmp_path: Path, values: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(model_repository=tmp_path, **values)  # type: ignore[arg-type]


def test_missing_repository_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="model_repository"):
        Settings(model_repository=tmp_path / "nope")


def test_cli_reports_bad_settings_in_one_line(tmp_path: Path) -> None:
    result = service_cli("--model-repository", str(tmp_path), "--port", "x")
    assert result.returncode == 2
    assert "port: Input should be a valid integer" in result.stderr


def test_cli_refuses_an_empty_repository(tmp_path: Path) -> None:
    result = service_cli("--model-repository", str(tmp_path))
    assert result.returncode == 2
    assert "holds no models" in result.stderr


def test_importing_the_service_does_not_import_torch() -> None:
    code = (
        "import sys, service.__main__, service.protocols.app, service.protocols.oip_grpc;"
        "import service.core.dataplane, service.core.registry, runtime.engines.onnxruntime_engine;"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_sessions_default_to_the_service_settings(tmp_path: Path) -> None:
    """One default per session setting: the exporter's gates (EngineConfig()) build sessions
    as the service does with its defaults."""
    assert EngineConfig() == Settings(model_repository=tmp_path).engine_config()
    assert EngineConfig().allow_spinning is False
