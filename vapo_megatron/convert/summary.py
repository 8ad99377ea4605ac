"""What a conversion did, in numbers a user can check against the machine (bytes, seconds, peak memory)."""
from __future__ import annotations

import resource
from dataclasses import dataclass, field
from pathlib import Path


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
