"""Write a directory so that it appears complete or not at all.

Everything is written into a hidden sibling `.<name>.partial` and renamed into place at the end (a rename
within one filesystem is atomic). A failed run removes its partial directory; a killed run leaves only a
hidden `.partial` directory, which the next run replaces, never a directory under the final name that
looks complete. Collective savers (every rank writes part of one checkpoint) call the three steps
themselves: rank 0 prepares, everybody writes, rank 0 commits after a barrier.
"""
from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path


def partial_dir(final: str | Path) -> Path:
    """The temporary directory used for `final` (deterministic, so that every rank agrees on it)."""
    final = Path(final)
    return final.parent / f".{final.name}.partial"


def prepare(final: str | Path, *, overwrite: bool = False) -> Path:
    """Create an empty partial directory for `final`; refuse early when `final` exists and not `overwrite`."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists (pass overwrite=True / --overwrite to replace it)")
    tmp = partial_dir(final)
    if tmp.exists():  # left behind by a killed run
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: str | Path, final: str | Path) -> Path:
    """Move the finished `tmp` into place as `final`, replacing an existing `final` only at this point."""
    tmp, final = Path(tmp), Path(final)
    old = final.parent / f".{final.name}.old"
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)
    return final


def discard(tmp: str | Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(final: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty directory to write into; on success it becomes `final`, on error it is removed."""
    tmp = prepare(final, overwrite=overwrite)
    try:
        yield tmp
    except BaseException:
        discard(tmp)
        raise
    commit(tmp, final)
