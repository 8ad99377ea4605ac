"""The training loop and what it calls, one file per phase (docs/architecture.md)."""
