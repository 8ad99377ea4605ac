"""Megatron actor/critic engines: forward, train step through megatron-core's schedules, checkpoints."""
