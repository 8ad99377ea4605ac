"""Drawing the credit picture: response tokens as coloured cells, one panel coloured by advantage (diverging,
centred on 0: red = blamed, blue = credited) and one by the critic's value V(s_t) (the value before the token);
the tokens of a reward's first wrong step are framed. PNG with matplotlib (Agg), and a self-contained HTML."""
from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

LINE_CHARS = 72
"""Cells per drawn line (one cell per character of a token's text)."""


@dataclass(frozen=True)
class CreditRow:
    """One response of the picture."""

    index: int
    tokens: list[str]
    advantages: list[float]
    values: list[float] | None
    score: float
    correct: bool
    error_span: tuple[int, int] | None


def _shown(piece: str) -> str:
    return piece.replace("\n", "⏎").replace(" ", "·") or "∅"


def layout(tokens: list[str], width: int = LINE_CHARS) -> list[tuple[int, int, int, str]]:
    """``(token, line, column, shown text)`` of every token: left to right, wrapping at ``width`` cells and
    after a token that ends with a newline."""
    cells, line, col = [], 0, 0
    for k, piece in enumerate(tokens):
        shown = _shown(piece)
        if col and col + len(shown) > width:
            line, col = line + 1, 0
        cells.append((k, line, col, shown))
        col += len(shown)
        if piece.endswith("\n"):
            line, col = line + 1, 0
    return cells


def _title(row: CreditRow) -> str:
    verdict = "correct" if row.correct else "wrong"
    return f"response {row.index}: {verdict}, reward {row.score:g}, {len(row.tokens)} tokens shown"


def render_png(rows: list[CreditRow], path: Path, step: int) -> Path:
    """Two panels per response (advantage, value), stacked; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize, TwoSlopeNorm
    from matplotlib.patches import Rectangle

    panels = [(r, kind) for r in rows for kind in ("advantage", "value") if kind == "advantage" or r.values]
    heights = [max(line for _, line, _, _ in layout(r.tokens)) + 2 if r.tokens else 2 for r, _ in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(14, 0.28 * sum(heights) + 0.6 * len(panels)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    adv_lim = max((abs(a) for r in rows for a in r.advantages), default=1.0) or 1.0
    vals = [v for r in rows for v in (r.values or [])]
    norms = {"advantage": TwoSlopeNorm(0.0, -adv_lim, adv_lim),
             "value": Normalize(min(vals, default=0.0), max(vals, default=1.0) + 1e-9)}
    cmaps = {"advantage": plt.get_cmap("RdBu"), "value": plt.get_cmap("viridis")}
    for ax, (row, kind), height in zip(axes[:, 0], panels, heights):
        numbers = row.advantages if kind == "advantage" else row.values
        for k, line, col, shown in layout(row.tokens):
            colour = cmaps[kind](norms[kind](numbers[k]))
            framed = row.error_span is not None and row.error_span[0] <= k < row.error_span[1]
            ax.add_patch(Rectangle((col, line), len(shown), 1, facecolor=colour, lw=1.5 if framed else 0,
                                   edgecolor="black" if framed else colour))
            dark = sum(colour[:3]) < 1.2
            ax.text(col + len(shown) / 2, line + 0.5, shown, ha="center", va="center", family="monospace",
                    fontsize=7, color="white" if dark else "black")
        ax.set_xlim(0, LINE_CHARS)
        ax.set_ylim(height - 1, 0)
        ax.axis("off")
        ax.set_title(f"{_title(row)}: coloured by {kind}", fontsize=8, loc="left")
        fig.colorbar(plt.cm.ScalarMappable(norm=norms[kind], cmap=cmaps[kind]), ax=ax, fraction=0.02, pad=0.01)
    fig.suptitle(f"step {step}: token-level credit (framed: the reward's first wrong step)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _css_colour(x: float, lim: float) -> str:
    """Red for negative, blue for positive, white at 0 (alpha by magnitude)."""
    a = min(1.0, abs(x) / lim) if lim > 0 else 0.0
    return f"rgba(214,39,40,{a:.2f})" if x < 0 else f"rgba(31,119,180,{a:.2f})"


def render_html(rows: list[CreditRow], path: Path, step: int) -> Path:
    """The same responses as HTML: one line per panel, hover shows each token's numbers; returns ``path``."""
    adv_lim = max((abs(a) for r in rows for a in r.advantages), default=1.0) or 1.0
    vals = [v for r in rows for v in (r.values or [])]
    lo, hi = min(vals, default=0.0), max(vals, default=1.0)
    parts = [f"<!doctype html><meta charset='utf-8'><title>credit step {step}</title>",
             "<style>body{font-family:sans-serif} .t{font-family:monospace;white-space:pre-wrap;line-height:1.7}"
             " .e{outline:2px solid black}</style>",
             f"<h2>Step {step}: token-level credit</h2><p>Advantage: red = blamed, blue = credited. Value: darker "
             f"= higher (range {lo:.3f} .. {hi:.3f}). Framed: the reward's first wrong step.</p>"]
    for row in rows:
        parts.append(f"<h3>{html.escape(_title(row))}</h3>")
        for kind in ("advantage", "value") if row.values else ("advantage",):
            cells = []
            for k, piece in enumerate(row.tokens):
                x = row.advantages[k] if kind == "advantage" else row.values[k]
                colour = _css_colour(x, adv_lim) if kind == "advantage" else \
                    f"rgba(68,1,84,{(x - lo) / (hi - lo + 1e-9) * 0.8:.2f})"
                framed = " e" if row.error_span and row.error_span[0] <= k < row.error_span[1] else ""
                tip = f"token {k}: advantage {row.advantages[k]:.4f}" + (
                    f", value {row.values[k]:.4f}" if row.values else "")
                cells.append(f"<span class='{framed.strip()}' style='background:{colour}' title='{tip}'>"
                             f"{html.escape(piece)}</span>")
            parts.append(f"<p><b>{kind}</b></p><div class='t'>{''.join(cells)}</div>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
