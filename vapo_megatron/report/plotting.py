"""PNG of training curves from metrics rows (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

PANELS = (("accuracy", "val_accuracy"), ("reward_mean",), ("critic/value_loss",),
          ("ev_mc", "explained_variance", "ev_oracle", "ev_ceiling"), ("response_length_mean",), ("policy/entropy",))
SPARSE = ("val_accuracy", "ev_oracle", "ev_ceiling")
"""Keys logged only at some steps (validation, the critic probe): drawn with markers."""


def plot_curves(rows: list[dict], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, keys in zip(axes.flat, PANELS):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), float)]
            if pts:
                ax.plot(*zip(*pts), marker="o" if key in SPARSE else None, ms=3, label=key)
        ax.set_title(" / ".join(keys))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)
