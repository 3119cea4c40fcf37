"""The checkpoints the product ships: exactly the manifest's files, byte for byte the published
ones (../shared/data/cifar10-resnet), with their license beside them."""

from __future__ import annotations

import hashlib
import json

from models.registry import get_spec

from .conftest import ROOT

WEIGHTS = ROOT / "weights"
PUBLISHED = ROOT.parent / "shared" / "data" / "cifar10-resnet"


def manifest() -> dict:
    return json.loads((WEIGHTS / "MANIFEST.json").read_text("utf-8"))


def test_manifest_lists_the_four_published_checkpoints_with_their_hashes() -> None:
    entries = manifest()["checkpoints"]
    assert [e["arch"] for e in entries] == [f"cifar_resnet{d}" for d in (20, 32, 44, 56)]
    for entry in entries:
        data = (WEIGHTS / entry["file"]).read_bytes()
        assert len(data) == entry["bytes"]
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        # the published name carries the start of the hash, as the registry's download does
        spec = get_spec(entry["arch"])
        assert entry["sha256"].startswith(spec.pretrained["akamaster"].sha256_prefix)
        assert spec.pretrained["akamaster"].url.endswith("/" + entry["file"])
        assert data == (PUBLISHED / entry["file"]).read_bytes()


def test_license_and_credit_ship_beside_them() -> None:
    meta = manifest()
    assert meta["license"] == "BSD-2-Clause"
    license_text = (WEIGHTS / meta["license_file"]).read_text("utf-8")
    assert license_text == (PUBLISHED / "LICENSE").read_text("utf-8")
    assert "Idelbayev" in license_text and "Idelbayev" in meta["citation"]


def test_only_the_manifest_files_are_large() -> None:
    """The 2 MiB-per-file habit holds for everything the repository tracks but these four."""
    import subprocess

    tracked = (
        subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
        .stdout.decode()
        .split("\0")
    )
    shipped = {f"weights/{e['file']}" for e in manifest()["checkpoints"]}
    large = {
        name
        for name in tracked
        if name and (ROOT / name).is_file() and (ROOT / name).stat().st_size > 2 * 1024 * 1024
    }
    assert large <= shipped
