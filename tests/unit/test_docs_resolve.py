"""Docs that resolve (issue 14): every `docs/*.md` a tracked file cites exists, every README section the code
points to (`README "Section"`) is a heading of README.md, and no tracked file holds a path of one machine
(a directory under /work, /root or /home/<user>). Reads the tracked files through `git grep` (fast); skipped outside a
git checkout."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                                reason="needs a git checkout")


def _git_grep(pattern: str) -> list[tuple[str, int, str]]:
    """(file, line, text) of every tracked text file's line matching the extended regex `pattern`."""
    this_file = f":(exclude){Path(__file__).relative_to(ROOT)}"  # its patterns would match themselves
    out = subprocess.run(["git", "grep", "-nI", "-E", pattern, "--", ".", this_file], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode in (0, 1), out.stderr
    hits = []
    for row in out.stdout.splitlines():
        file, line, text = row.split(":", 2)
        hits.append((file, int(line), text))
    return hits


def test_no_tracked_file_holds_a_machine_path():
    hits = _git_grep(r"(^|[^A-Za-z0-9_.])/(work|root|Users)/|/home/[a-z_][a-z0-9_-]*/")
    assert hits == [], "machine-specific paths: " + "; ".join(f"{f}:{n}: {t.strip()[:120]}" for f, n, t in hits)


def test_every_cited_docs_file_exists():
    missing = []
    for file, line, text in _git_grep(r"docs/[A-Za-z0-9_.-]+\.md"):
        for cited in re.findall(r"docs/[A-Za-z0-9_.-]+\.md", text):
            if not (ROOT / cited).is_file():
                missing.append(f"{file}:{line} cites {cited}")
    assert missing == []


def test_every_cited_readme_section_exists():
    headings = [h.lstrip("#").strip() for h in (ROOT / "README.md").read_text().splitlines() if h.startswith("#")]
    missing = []
    for file, line, text in _git_grep(r'README "[^"]+"'):
        for section in re.findall(r'README "([^"]+)"', text):
            if section not in headings:
                missing.append(f"{file}:{line} points to README section {section!r}")
    assert missing == [], f"{missing}; README headings: {headings}"
