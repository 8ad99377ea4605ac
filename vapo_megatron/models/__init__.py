"""Plain model definitions: HF config -> megatron-core config, policy (GPTModel) and critic (value head)."""
