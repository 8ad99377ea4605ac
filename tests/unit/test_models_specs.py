"""megatron-core 0.19's GPTModel deprecation warning is dropped (the decision to stay on GPTModel is recorded in
docs/architecture.md), and nothing else that megatron's gpt_model logger says is. A failure means the filter
swallows real warnings or megatron changed the message (then check docs/architecture.md's migration note)."""
from __future__ import annotations

import logging

from vapo_megatron.models.specs import quiet_gpt_model_deprecation


def test_only_the_gpt_model_deprecation_is_dropped(caplog):
    logger = logging.getLogger("megatron.core.models.gpt.gpt_model")
    quiet_gpt_model_deprecation()
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("GPTModel IS DEPRECATED. GPTModel is only accepting critical bug fixes, no new features.")
        logger.warning("some other warning")
    assert [r.getMessage() for r in caplog.records] == ["some other warning"]


def test_megatron_still_prints_the_message_we_drop():
    """If megatron-core rewords or drops the warning, the filter is dead code: this test says so."""
    import inspect

    from megatron.core.models.gpt import gpt_model

    assert "GPTModel IS DEPRECATED" in inspect.getsource(gpt_model.GPTModel.__init__)
