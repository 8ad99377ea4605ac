"""Figure-2-style curves and the first-wrong-step credit table of a grid (vapo_megatron/ablation/figure.py),
against numbers computed by hand from fake finished runs."""
import json
import math

import pytest

from vapo_megatron.ablation.figure import append_figure_section, credit_summary, curve_band, smooth, variant_runs
from vapo_megatron.ablation.runner import DONE


def _run(out, variant, seed, rows, done=True):
    d = out / variant / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if done:
        (d / DONE).write_text("{}")


def test_curves_and_credit_from_finished_runs(tmp_path):
    """Failure: value-pretraining rows or unfinished seeds are counted, the smoothing or the band is wrong, a NaN
    poisons a mean, or the credit ratio is not first / rest."""
    pre = {"phase": "value_pretrain", "reward_mean": 9.0, "ev_mc": 0.9}
    _run(tmp_path, "vapo", 0, [pre, {"phase": "ppo", "reward_mean": 0.1, "ev_mc": 0.2, "credit_first_error_adv": -2.0,
                                     "credit_rest_wrong_adv": -0.5, "credit_first_error_gap": -1.5},
                               {"phase": "ppo", "reward_mean": 0.3, "ev_mc": float("nan")}])
    _run(tmp_path, "vapo", 1, [{"phase": "ppo", "reward_mean": 0.2, "ev_mc": 0.4, "credit_first_error_adv": -1.0,
                                "credit_rest_wrong_adv": -0.5, "credit_first_error_gap": -0.5},
                               {"phase": "ppo", "reward_mean": 0.6}])
    _run(tmp_path, "vapo", 2, [{"phase": "ppo", "reward_mean": 5.0}], done=False)
    runs = variant_runs(tmp_path, "vapo")
    assert len(runs) == 2
    assert smooth([1.0, 3.0, 5.0], 2) == [1.0, 2.0, 4.0]
    steps, mean, lo, hi = curve_band(runs, "reward_mean", window=2)
    assert steps == [1, 2]
    assert mean == pytest.approx([0.15, 0.3]) and lo == [0.1, 0.2] and hi == [0.2, 0.4]
    assert curve_band(runs, "ev_mc", window=1)[0] == [1]          # step 2 lacks a finite ev_mc in both seeds
    s = credit_summary(runs)
    assert s["credit_first_error_adv"] == -1.5 and s["credit_rest_wrong_adv"] == -0.5 and s["ratio"] == 3.0
    assert s["credit_first_error_gap"] == -1.0 and s["steps"] == 2
    assert credit_summary(variant_runs(tmp_path, "dapo")) is None
    md = tmp_path / "report.md"
    md.write_text("# report\n")
    png = append_figure_section(tmp_path, md, ["vapo"], ["vapo", "dapo"])
    text = md.read_text()
    assert png.stat().st_size > 0 and f"![curves]({png.name})" in text
    assert "| vapo | -1.500 | -0.500 | 3.00 | -1.000 | 2 |" in text and "| dapo | — |" in text
    assert not math.isnan(mean[0])
