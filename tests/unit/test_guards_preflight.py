"""The divergence guard's checks (guards.py) and the pre-flight checks (preflight.py) through the real CLI entry
point, before any model or vLLM engine is built: each user error is one specific message, no traceback."""
from __future__ import annotations

import json
import shutil
import types

import pytest

from vapo_megatron.cli import train_main
from vapo_megatron.errors import DivergenceError
from vapo_megatron.train.guards import DivergenceGuard


class _Engine:
    def __init__(self, norm):
        self.norm = norm

    def param_norm(self):
        return self.norm


def _guard(**kw):
    cfg = dict(max_weight_norm_ratio=1.5, grad_norm_spike=100.0, max_approx_kl=1.0, max_rollout_logprob_diff=1.0)
    return DivergenceGuard(types.SimpleNamespace(**{**cfg, **kw}), "runs/x")


def test_guard_stops_on_each_out_of_range_signal():
    engine = _Engine(10.0)
    guard = _guard()
    for step in range(1, 7):  # healthy steps build the grad-norm history
        guard.before_update({"policy": engine})
        engine.norm *= 1.001
        guard.after_update(step, {"policy/grad_norm": 0.5, "policy/approx_kl": 1e-3}, {"policy": engine}, 1e-4)
    cases = [(1e6, {"policy/grad_norm": 0.5}, 0.0, "weight norm"),
             (1.0, {"policy/grad_norm": 500.0}, 0.0, "grad_norm_spike"),
             (1.0, {"policy/approx_kl": 5.0}, 0.0, "max_approx_kl"),
             (1.0, {}, 7.0, "max_rollout_logprob_diff")]
    for factor, metrics, diff, message in cases:
        guard.before_update({"policy": engine})
        engine.norm *= factor
        with pytest.raises(DivergenceError, match=message):
            guard.after_update(9, metrics, {"policy": engine}, diff)


def test_guard_thresholds_of_zero_disable_checks():
    engine, guard = _Engine(1.0), _guard(max_weight_norm_ratio=0, max_approx_kl=0, max_rollout_logprob_diff=0)
    guard.before_update({"policy": engine})
    engine.norm = 1e9
    guard.after_update(1, {"policy/approx_kl": 1e3}, {"policy": engine}, 1e3)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from vapo_megatron.models.tiny import save_tiny_hf_model

    out = tmp_path_factory.mktemp("m") / "model"
    save_tiny_hf_model(out, "llama", seed=0)
    return out


def _cli(model, data, run_dir, *extra):
    return ["--config", "/dev/null", f"model.hf_dir={model}", f"data.train_files=[{data}]",
            f"checkpoint.run_dir={run_dir}", "rollout.num_prompts=2", "rollout.n=2", "train.mini_batch_size=4",
            "rollout.max_prompt_length=40", "rollout.max_response_length=8", "reward.name=synthetic", *extra]


def _rows(path, prompts):
    path.write_text("".join(json.dumps({"prompt": p, "ground_truth": "1"}) + "\n" for p in prompts))
    return path


@pytest.mark.parametrize("case, expected", [
    ("empty", "is empty (no rows)"),
    ("missing", "prompt data file not found"),
    ("all_long", "all 2 prompts are longer than max_prompt_length=40"),
    ("no_tokenizer", "has no tokenizer files"),
    ("no_template", "has no chat template; a base model needs data.prompt_format=plain"),
    ("bad_reward", "reward file not found"),
])
def test_user_errors_are_one_message_before_any_model(case, expected, model_dir, tmp_path, capsys):
    """Issue 13: an empty file said "all 0 prompts are longer than max_prompt_length"; a model without tokenizer
    files failed after start-up with "chat_template is not set"; data was read after vLLM and both models."""
    data, model, extra = _rows(tmp_path / "train.jsonl", ["What is 1?"]), model_dir, []
    if case == "empty":
        data.write_text("")
    elif case == "missing":
        data = tmp_path / "typo.jsonl"
    elif case == "all_long":
        _rows(data, ["x" * 200, "y" * 300])
    elif case in ("no_tokenizer", "no_template"):
        model = tmp_path / "model"
        shutil.copytree(model_dir, model)
        for f in (["tokenizer.json", "tokenizer_config.json"] if case == "no_tokenizer" else ["chat_template.jinja"]):
            (model / f).unlink(missing_ok=True)
        cfg = json.loads((model / "tokenizer_config.json").read_text()) if case == "no_template" else {}
        if cfg.pop("chat_template", None) is not None:
            (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    else:
        extra = ["reward.name=/nonexistent/r.py:f"]
    assert train_main(_cli(model, data, tmp_path / "run", *extra)) == 1
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and err.count("error:") == 1, err


def test_dropped_prompts_are_reported_and_plain_mode_needs_no_template(model_dir, tmp_path, capsys):
    from vapo_megatron.config import load_config
    from vapo_megatron.train.preflight import check_data, load_tokenizer

    data = _rows(tmp_path / "train.jsonl", ["short", "z" * 300, "also short"])
    cfg = load_config(None, _cli(model_dir, data, tmp_path / "run")[2:])
    assert check_data(cfg, load_tokenizer(cfg)) == [""]
    assert "2 prompts, 1 of 3 dropped (longer than rollout.max_prompt_length=40 tokens)" in capsys.readouterr().out


def test_finished_run_dir_is_refused_without_resume_or_overwrite(tmp_path):
    from vapo_megatron.errors import RunDirError
    from vapo_megatron.train.preflight import check_run_dir

    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000005").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 5}\n')
    (run / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="already holds checkpoints .* and metrics"):
        check_run_dir(run, resume=False, overwrite=False)
    with pytest.raises(RunDirError, match="no complete checkpoint"):
        check_run_dir(run, resume=True, overwrite=False)  # step_00000005 has no DONE marker
    check_run_dir(run, resume=False, overwrite=True)
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
    assert (run / "notes.txt").read_text() == "mine"


def test_torn_metrics_line_is_dropped_with_a_warning(tmp_path, capsys):
    from vapo_megatron.train.metrics import read_metrics_rows

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "ph')
    assert read_metrics_rows(path) == [{"step": 1}, {"step": 2}]
    assert "metrics.jsonl: dropped a torn last line" in capsys.readouterr().err
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_metrics_rows(path)
