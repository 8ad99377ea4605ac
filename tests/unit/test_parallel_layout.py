"""Impossible parallel layouts fail before any process group or model is built, with the numbers named."""
import pytest

from vapo_megatron.parallel.layout import ParallelConfig, ParallelConfigError


def test_valid_layouts_pass():
    ParallelConfig(tp=2, pp=2, sequence_parallel=True).validate(8, num_layers=4, num_heads=4, num_kv_heads=2)
    ParallelConfig().validate(1)
    assert ParallelConfig(tp=2, pp=2).data_parallel_size(8) == 2


@pytest.mark.parametrize("cfg,world,shape,expected", [
    (ParallelConfig(tp=4), 6, {}, "world size 6 is not divisible by tp(4) x pp(1) x cp(1) = 4"),
    (ParallelConfig(tp=3), 3, dict(num_heads=4), "num_attention_heads 4 is not divisible by tp 3"),
    (ParallelConfig(tp=4), 4, dict(num_heads=8, num_kv_heads=2), "num_key_value_heads 2 is not divisible by tp 4"),
    (ParallelConfig(pp=3), 3, dict(num_layers=4), "num_layers 4 is not divisible by pp 3"),
    (ParallelConfig(sequence_parallel=True), 1, {}, "sequence_parallel needs tp > 1"),
    (ParallelConfig(tp=0), 1, {}, "tp=0 must be >= 1"),
])
def test_invalid_layout_message_quotes_numbers(cfg, world, shape, expected):
    with pytest.raises(ParallelConfigError) as err:
        cfg.validate(world, **shape)
    assert expected in str(err.value)


def test_all_problems_reported_at_once():
    with pytest.raises(ParallelConfigError) as err:
        ParallelConfig(tp=3, pp=3).validate(8, num_layers=4, num_heads=4)
    msg = str(err.value)
    assert "world size 8" in msg and "num_layers 4" in msg and "num_attention_heads 4" in msg
