"""Checksums of a training checkpoint: `manifest.json` lists every file of the checkpoint with its size and a hash,
written by the save's commit step (before `DONE`), verified before anything of it is loaded.

What verification refuses, naming the file: a file whose bytes differ from its hash (e.g. overwritten inside, size
unchanged), a file of another size (truncated or grown), a missing file, and a file the manifest does not list
(e.g. a planted megatron `common.pt`: nothing the save did not write is ever read). A checkpoint without a manifest
is refused too (it cannot be told from a damaged one); `tools/checkpoint_manifest.py` writes one for a checkpoint
the user has checked by other means.

The hash is BLAKE3 (multi-threaded, memory-mapped) when the `blake3` package is importable, else BLAKE2b from
hashlib; the manifest names the one it used. Hashing is split over the ranks, file by file, both when writing and
when verifying (`benchmarks/bench_checksum.py` measures its cost against the save and the load).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "vapo-megatron-checkpoint-manifest"
UNLISTED = ("DONE", MANIFEST_FILE)
"""Files of a checkpoint directory the manifest does not list: itself and the marker written after it."""
_CHUNK = 8 << 20

try:
    import blake3 as _blake3
except ImportError:  # pragma: no cover - blake3 is a dependency where available
    _blake3 = None


def default_algorithm() -> str:
    return "blake3" if _blake3 is not None else "blake2b"


def file_hash(path: str | Path, algorithm: str | None = None) -> str:
    """Hex digest of the file's bytes."""
    algorithm = algorithm or default_algorithm()
    if algorithm == "blake3":
        if _blake3 is None:
            raise ValueError("this checkpoint's manifest uses blake3, which is not installed here (pip install blake3)")
        h = _blake3.blake3(max_threads=_blake3.blake3.AUTO)
        if os.path.getsize(path):
            h.update_mmap(str(path))
        return h.hexdigest()
    if algorithm == "blake2b":
        h2 = hashlib.blake2b()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h2.update(chunk)
        return h2.hexdigest()
    raise ValueError(f"unknown checksum algorithm {algorithm!r} in a checkpoint manifest")


def checkpoint_files(ckpt: str | Path) -> list[str]:
    """Every file under `ckpt` (relative POSIX paths, sorted), links included, except the UNLISTED ones."""
    ckpt = Path(ckpt)
    out = []
    for root, dirs, files in os.walk(ckpt):
        dirs.sort()
        for name in files:
            rel = (Path(root) / name).relative_to(ckpt).as_posix()
            if rel not in UNLISTED:
                out.append(rel)
    return sorted(out)


def share(names: Sequence[str], sizes: Sequence[int], rank: int, world: int) -> list[int]:
    """Indices of the files rank `rank` of `world` hashes: largest first, dealt round-robin (balanced bytes)."""
    order = sorted(range(len(names)), key=lambda i: (-sizes[i], names[i]))
    return order[rank::world]


def hash_entries(ckpt: str | Path, names: Sequence[str], algorithm: str | None = None) -> dict[str, dict]:
    """{name: {"size", "hash"}} of the given files of `ckpt`."""
    ckpt, algorithm = Path(ckpt), algorithm or default_algorithm()
    return {n: {"size": (ckpt / n).stat().st_size, "hash": file_hash(ckpt / n, algorithm)} for n in names}


def manifest_document(entries: dict[str, dict], algorithm: str) -> dict:
    return {"format": MANIFEST_FORMAT, "version": 1, "algorithm": algorithm,
            "files": {k: entries[k] for k in sorted(entries)}}


def write_manifest_file(ckpt: str | Path, entries: dict[str, dict], algorithm: str) -> Path:
    """Write `manifest.json` (fsync'd) from already computed entries."""
    path = Path(ckpt) / MANIFEST_FILE
    tmp = path.with_name(f".{MANIFEST_FILE}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(json.dumps(manifest_document(entries, algorithm), indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_manifest(ckpt: str | Path, algorithm: str | None = None) -> Path:
    """Hash every file of `ckpt` in this process and write its manifest (the tool's and the tests' path)."""
    algorithm = algorithm or default_algorithm()
    return write_manifest_file(ckpt, hash_entries(ckpt, checkpoint_files(ckpt), algorithm), algorithm)


def read_manifest(ckpt: str | Path) -> tuple[dict | None, str | None]:
    """(manifest, None), or (None, the problem) when it is missing or unreadable."""
    path = Path(ckpt) / MANIFEST_FILE
    if not path.is_file():
        return None, (f"it has no {MANIFEST_FILE}, so its bytes cannot be verified (saved before checkpoints had "
                      f"checksums, or the file was deleted); if you have checked it by other means, write one with "
                      f"`python tools/checkpoint_manifest.py --write {Path(ckpt)}`")
    try:
        doc = json.loads(path.read_text())
        files = doc["files"]
        ok = doc.get("format") == MANIFEST_FORMAT and isinstance(files, dict) and all(
            isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("hash"), str)
            for v in files.values())
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        return None, f"its {MANIFEST_FILE} is damaged (not a {MANIFEST_FORMAT} JSON file)"
    return doc, None


def structural_problems(ckpt: str | Path, manifest: dict) -> list[str]:
    """What can be seen without reading file contents: missing, unlisted and resized files (cheap: stat only)."""
    ckpt, listed = Path(ckpt), manifest["files"]
    present = set(checkpoint_files(ckpt))
    problems = [f"{name}: missing (listed in {MANIFEST_FILE})" for name in sorted(set(listed) - present)]
    problems += [f"{name}: not written by the save (not in {MANIFEST_FILE}); refused, nothing of it was read"
                 for name in sorted(present - set(listed))]
    for name in sorted(set(listed) & present):
        size, want = (ckpt / name).stat().st_size, listed[name]["size"]
        if size != want:
            problems.append(f"{name}: {size} bytes, {want} when saved ({'truncated' if size < want else 'grown'})")
    return problems


def content_problems(ckpt: str | Path, manifest: dict, names: Sequence[str]) -> list[str]:
    """Hash the given (present, right-sized) files and name those whose bytes differ from the manifest."""
    ckpt, listed, algorithm = Path(ckpt), manifest["files"], manifest.get("algorithm", "blake3")
    problems = []
    for name in names:
        try:
            got = file_hash(ckpt / name, algorithm)
        except OSError as e:
            problems.append(f"{name}: unreadable ({e})")
            continue
        if got != listed[name]["hash"]:
            problems.append(f"{name}: its bytes differ from its checksum in {MANIFEST_FILE} (size unchanged: "
                            f"{listed[name]['size']} bytes): damaged after it was saved")
    return problems


def verify_local(ckpt: str | Path) -> list[str]:
    """Every problem of `ckpt` found in this process (manifest, structure, then every file's hash)."""
    manifest, problem = read_manifest(ckpt)
    if manifest is None:
        return [problem]
    problems = structural_problems(ckpt, manifest)
    if problems:
        return problems
    return content_problems(ckpt, manifest, sorted(manifest["files"]))
