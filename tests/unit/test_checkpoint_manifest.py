"""engine/manifest.py on a directory shaped like a checkpoint: a clean one verifies; every kind of damage is named
with its file (bytes overwritten at the same size, truncated, grown, missing, an unlisted file, no or a broken
manifest). Each check first shows the damage is real (the file changed), so the test can fail. A failure
pinpoints engine/manifest.py."""
from __future__ import annotations

import json
import os

import pytest

from vapo_megatron.engine import manifest as mf


@pytest.fixture
def ckpt(tmp_path):
    d = tmp_path / "step_00000002"
    (d / "policy").mkdir(parents=True)
    (d / "policy" / "__0_0.distcp").write_bytes(os.urandom(200_000))
    (d / "policy" / ".metadata").write_bytes(os.urandom(3_000))
    (d / "rng").mkdir()
    (d / "rng" / "rank_00000.pt").write_bytes(b"")  # an empty file hashes too
    (d / "meta.json").write_text("{}\n")
    mf.write_manifest(d)
    (d / "DONE").write_text("2\n")
    return d


def test_clean_checkpoint_verifies_and_lists_every_file(ckpt):
    doc = json.loads((ckpt / mf.MANIFEST_FILE).read_text())
    assert sorted(doc["files"]) == ["meta.json", "policy/.metadata", "policy/__0_0.distcp", "rng/rank_00000.pt"]
    assert doc["algorithm"] == mf.default_algorithm()
    assert mf.verify_local(ckpt) == []


@pytest.mark.parametrize("algorithm", ["blake3", "blake2b"])
def test_overwritten_bytes_same_size_are_named(ckpt, algorithm):
    if algorithm == "blake3":
        pytest.importorskip("blake3")
    mf.write_manifest(ckpt, algorithm)
    path = ckpt / "policy" / "__0_0.distcp"
    before = path.read_bytes()
    with open(path, "r+b") as f:
        f.seek(100_000)
        f.write(bytes(b ^ 0xFF for b in before[100_000:100_001]))  # one byte: the weakest damage
    assert path.stat().st_size == len(before) and path.read_bytes() != before
    (problem,) = mf.verify_local(ckpt)
    assert problem.startswith("policy/__0_0.distcp: its bytes differ from its checksum"), problem


def test_truncated_grown_missing_and_unlisted_files_are_named(ckpt):
    os.truncate(ckpt / "policy" / "__0_0.distcp", 100_000)
    with open(ckpt / "policy" / ".metadata", "ab") as f:
        f.write(b"x")
    (ckpt / "meta.json").unlink()
    (ckpt / "policy" / "common.pt").write_bytes(b"planted")
    problems = mf.verify_local(ckpt)
    assert problems == [
        f"meta.json: missing (listed in {mf.MANIFEST_FILE})",
        f"policy/common.pt: not written by the save (not in {mf.MANIFEST_FILE}); refused, nothing of it was read",
        "policy/.metadata: 3001 bytes, 3000 when saved (grown)",
        "policy/__0_0.distcp: 100000 bytes, 200000 when saved (truncated)",
    ], problems


def test_missing_or_broken_manifest_is_refused(ckpt):
    text = (ckpt / mf.MANIFEST_FILE).read_text()
    (ckpt / mf.MANIFEST_FILE).write_text(text[: len(text) // 2])
    assert mf.verify_local(ckpt) == [f"its {mf.MANIFEST_FILE} is damaged (not a {mf.MANIFEST_FORMAT} JSON file)"]
    (ckpt / mf.MANIFEST_FILE).unlink()
    (problem,) = mf.verify_local(ckpt)
    assert "no manifest.json" in problem and "checkpoint_manifest.py --write" in problem


def test_hashing_is_shared_by_size_over_ranks():
    names, sizes = ["a", "b", "c", "d", "e"], [1, 50, 10, 40, 0]
    shares = [mf.share(names, sizes, r, 2) for r in range(2)]
    assert sorted(i for s in shares for i in s) == list(range(5))
    assert shares == [[1, 2, 4], [3, 0]]
