"""What a conversion did, in numbers a user can check against the machine (bytes, seconds, peak memory)."""
from __future__ import annotations

import resource
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class ConversionSummary:
    out_dir: Path
    tensors: int
    bytes: int
    seconds: float
    peak_rss: int = field(default_factory=peak_rss_bytes)
    largest_tensor: int = 0
    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        rate = self.bytes / max(self.seconds, 1e-9) / 1e9
        lines = [f"wrote {self.out_dir}: {self.tensors} tensors, {self.bytes / 1e9:.3f} GB in {self.seconds:.1f} s "
                 f"({rate:.2f} GB/s); peak RSS {self.peak_rss / 2**30:.2f} GiB, largest tensor "
                 f"{self.largest_tensor / 2**30:.2f} GiB"]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def run_converter(convert: Callable[[], Any], user_errors: Callable[[], tuple[type[BaseException], ...]]) -> int:
    """The converter CLIs' main (tools/convert_*.py): keep the conversion on the CPU, install the platform shims
    before anything imports megatron-core, run `convert()` (it imports what it needs) and print its summary; an
    error of `user_errors()` (imported after the shims) is one `error:` line and exit code 1."""
    import os
    import sys

    os.environ.setdefault("VAPO_FORCE_CPU", "1")  # conversion is I/O: keep it off the GPU and NCCL
    from vapo_megatron import platform

    platform.install_shims()
    errors = user_errors()
    try:
        summary = convert()
    except errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summary.format(), file=sys.stderr)
    return 0
