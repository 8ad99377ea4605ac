"""Planning without GPUs: model shapes by name, per-rank parameter counts, per-GPU memory estimates and the
parallel plan of a run (`vapo-train --dry-run`, `tools/plan_memory.py`). Pure Python over `ModelArch`; nothing
here builds a model or a process group."""
