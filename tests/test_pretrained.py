"""Official weights: downloaded by torch.hub with the hash prefix of the published name, from a
real HTTP server on 127.0.0.1 (never the network); `--pretrained auto|require|never`."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from contract.hashing import sha256_file
from models.checkpoint import (
    CheckpointError,
    WeightsUnavailableError,
    fetch_pretrained,
    load_checkpoint,
)
from models.registry import PretrainedWeights, get_spec

from .conftest import CIFAR_CHECKPOINTS, require
from .support.service import run_module

RESNET20 = "resnet20-12fca82f.th"
RESNET32 = "resnet32-d509ac18.th"


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on 127.0.0.1 serving the files of a directory: (base URL, directory)."""
    root = tmp_path / "mirror"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", root
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The weights cache of this test (also for the CLI's subprocesses)."""
    monkeypatch.setenv("RESNET_SERVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RESNET_SERVE_OFFLINE", raising=False)
    return tmp_path / "cache" / "weights"


def published(name: str) -> Path:
    return require(CIFAR_CHECKPOINTS) / name


def test_matching_hash_prefix_downloads_once_then_serves_from_the_cache(
    mirror: tuple[str, Path], cache: Path
) -> None:
    url, root = mirror
    shutil.copy(published(RESNET20), root / RESNET20)
    spec = get_spec("cifar_resnet20")
    path = fetch_pretrained(spec, "akamaster", mirror=url, cache_dir=cache)
    assert path == cache / RESNET20
    assert sha256_file(path) == sha256_file(published(RESNET20))
    assert [p.name for p in cache.iterdir()] == [RESNET20]  # no partial file left
    load_checkpoint(spec, path)
    (root / RESNET20).unlink()  # cached now: no download, even offline
    assert fetch_pretrained(spec, "akamaster", mirror=url, cache_dir=cache, offline=True) == path
    path.write_bytes(path.read_bytes()[:-1])  # a cache file damaged later is never used
    with pytest.raises(CheckpointError, match="expected a hash starting with 12fca82f"):
        fetch_pretrained(spec, "akamaster", mirror=url, cache_dir=cache)


def test_a_file_whose_hash_does_not_match_is_refused_and_nothing_is_written(
    mirror: tuple[str, Path], cache: Path
) -> None:
    url, root = mirror
    shutil.copy(published(RESNET32), root / RESNET20)  # another file under the published name
    with pytest.raises(CheckpointError, match=r'refused .*invalid hash value.*expected "12fca82f"'):
        fetch_pretrained(get_spec("cifar_resnet20"), "akamaster", mirror=url, cache_dir=cache)
    assert list(cache.iterdir()) == []


def test_unreachable_or_offline_is_unavailable_not_corrupt(
    mirror: tuple[str, Path], cache: Path
) -> None:
    url, _ = mirror  # serves nothing: 404
    spec = get_spec("cifar_resnet20")
    with pytest.raises(
        WeightsUnavailableError,
        match=r"cannot download http://127\.0\.0\.1:.*resnet20-12fca82f\.th: File not found",
    ):
        fetch_pretrained(spec, "akamaster", mirror=url, cache_dir=cache)
    with pytest.raises(WeightsUnavailableError, match="downloads are off"):
        fetch_pretrained(spec, "akamaster", cache_dir=cache, offline=True)
    bad = dataclasses.replace(
        spec, pretrained={"x": PretrainedWeights(url + "a.pth", "00000000", "test")}
    )
    with pytest.raises(CheckpointError, match="has no pretrained weights 'nope'"):
        fetch_pretrained(bad, "nope", cache_dir=cache)
    assert list(cache.iterdir()) == []


def export_cli(repo: Path, *args: str):
    return run_module(
        "export", "cifar_resnet20", "--out", str(repo), "--max-batch-size", "4", *args,
        timeout_s=300,
    )  # fmt: skip


def metadata(repo: Path) -> dict:
    return json.loads((repo / "cifar_resnet20" / "1" / "metadata.json").read_text())


def test_export_without_weights_takes_the_official_ones(
    mirror: tuple[str, Path], cache: Path, tmp_path: Path
) -> None:
    url, root = mirror
    shutil.copy(published(RESNET20), root / RESNET20)
    repo = tmp_path / "repo"
    result = export_cli(repo, "--weights-dir", str(tmp_path / "none"), "--pretrained-mirror", url)
    assert result.returncode == 0, result.stderr
    weights = metadata(repo)["weights"]
    assert weights["trained"] is True and weights["source"] == "akamaster"
    assert weights["sha256"] == sha256_file(published(RESNET20))


def test_auto_falls_back_to_random_weights_with_one_warning_line(
    mirror: tuple[str, Path], cache: Path, tmp_path: Path
) -> None:
    url, _ = mirror  # the file is missing there
    repo = tmp_path / "repo"
    result = export_cli(repo, "--weights-dir", str(tmp_path / "none"), "--pretrained-mirror", url)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "UNTRAINED" in warnings[0] and "random:0" in warnings[0]
    assert metadata(repo)["weights"]["trained"] is False


@pytest.mark.parametrize("served", [None, RESNET32], ids=["unavailable", "wrong-hash"])
def test_require_and_a_refused_file_fail_and_write_nothing(
    mirror: tuple[str, Path], cache: Path, tmp_path: Path, served: str | None
) -> None:
    url, root = mirror
    if served:
        shutil.copy(published(served), root / RESNET20)
    repo = tmp_path / "repo"
    result = export_cli(
        repo, "--weights-dir", str(tmp_path / "none"), "--pretrained-mirror", url,
        "--pretrained", "require" if served is None else "auto",
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.startswith("export failed: ")
    assert ("cannot download" if served is None else "refused") in result.stderr
    assert not repo.exists() or list(repo.iterdir()) == []
    assert not cache.exists() or list(cache.iterdir()) == []


def test_never_and_a_checkpoint_in_the_weights_dir_need_no_download(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    result = export_cli(repo, "--pretrained", "never", "--weights-dir", str(tmp_path / "none"))
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr
    assert metadata(repo)["weights"]["source"] == "random:0"
