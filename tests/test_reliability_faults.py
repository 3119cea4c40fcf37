"""Faults against the real service: broken models at start-up, a model whose inference really
raises inside onnxruntime, clients that disconnect mid-request, SIGTERM under load."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.launcher import Service
from tests.support.load import Target

from .reliability.faults import (
    BROKEN_MODELS,
    broken_model_at_startup,
    disconnects,
    failing_batch,
    sigterm_under_load,
)
from .support.graphs import write_conv, write_poison, write_slow
from .support.images import sample_images


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("repo")
    write_slow(path, "tiny", max_batch_size=64)
    write_poison(path, "poison")
    return path


@contextlib.contextmanager
def started(repo: Path, log: Path, *flags: str) -> Iterator[Service]:
    with Service(repo, log, *flags) as service:
        service.wait_ready()
        yield service
        assert service.terminate() == 0


@pytest.mark.parametrize("case", list(BROKEN_MODELS))
def test_a_broken_model_stops_start_up_with_one_clear_line(tmp_path: Path, case: str) -> None:
    result = broken_model_at_startup(tmp_path, case)
    assert result["exit_code"] == result["expected_exit_code"], result
    assert not result["ever_ready"] and not result["unpickled"], result
    critical = result["critical"]  # one clear line naming it, no traceback
    assert critical and "broken" in critical[0] and not result["traceback"], result
    assert result["seconds"] < 30


def test_a_batch_whose_inference_raises_fails_with_500_json_and_the_next_one_works(
    repo: Path, tmp_path: Path
) -> None:
    with started(repo, tmp_path / "server.log") as service:
        result = failing_batch(service, "poison", "tiny")
        failed = [(r["status"], r["content_type"], r["code"]) for r in result["same_batch"]]
        assert failed == [(500, "application/json", "inference_failed")] * 2, result
        assert result["batches"] == 1 and result["next_request"]["status"] == 200, result
        assert result["other_model"]["status"] == 200 and result["ready_after"] == 200, result
    # A 500 is a server error: logged with its traceback, once per failed request.
    assert service.log().count("-> 500 inference_failed: model poison: inference failed") == 2


def test_clients_that_disconnect_have_their_queued_images_dropped(
    repo: Path, tmp_path: Path
) -> None:
    with started(repo, tmp_path / "server.log", "--max-batch-size=64") as service:
        result = disconnects(Target(service, "tiny", sample_images(8)), clients=6)
        assert result["answered_499"] == result["disconnected_requests"], result
        assert result["images_run_for_disconnected"] == 0, result
        assert result["waiting_client_status"] == 200, result
        assert result["images_run_for_waiting_client"] == 2, result
        assert result["queue_depth"] == 0 and result["in_flight"] == 0, result
        assert result["fds"][1] <= result["fds"][0], result  # no open file leaked
    log = service.log()
    assert "client disconnected after" in log  # mid-upload: a 499 line, not a 500
    assert "Traceback" not in log, log


def test_sigterm_under_load_loses_no_accepted_request(tmp_path: Path) -> None:
    write_conv(tmp_path / "repo", "conv", layers=4)
    service = Service(tmp_path / "repo", tmp_path / "server.log", "--drain-delay-ms=500")
    with service:
        service.wait_ready()
        target = Target(service, "conv", sample_images(8))
        result = sigterm_under_load(target, concurrency=12, load_s=1.5)
    assert result["lost"] == result["refused"] == result["failed"] == 0, result
    assert result["exit_code"] == 0 and not result["traceback"], result
    assert result["sent"] > 50
