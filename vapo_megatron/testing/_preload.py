"""Imported once by the fork server of `run_distributed` (testing/dist.py), so that every test rank forks with
torch, megatron-core, transformers and vLLM already imported instead of importing them again (several seconds a
rank on 2 cores). Only imports: no process group, no thread pool, no device is touched here, so each forked rank
starts as clean as a spawned one. The CPU shims go in first, as every entry point installs them
(platform/__init__.py)."""
from vapo_megatron import platform

platform.install_shims()

import megatron.core  # noqa: E402,F401
import megatron.core.models.gpt  # noqa: E402,F401
import megatron.core.optimizer  # noqa: E402,F401
import megatron.core.pipeline_parallel  # noqa: E402,F401
import transformers  # noqa: E402,F401
from vllm import LLM  # noqa: E402,F401  (vLLM reads its environment variables when used, not at import)
