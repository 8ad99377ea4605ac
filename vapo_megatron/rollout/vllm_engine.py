"""`RolloutEngine`: a vLLM engine living in the trainer's own process (the "hybrid engine").

One `vllm.LLM` per process, engine core in-process, so that weights can be handed over as tensors and the
engine can be told to free its memory while the trainer runs.

Layout. Alone (no `torch.distributed`, or world size 1) the engine is a single-process vLLM, so
tensor_parallel_size must be 1. Under torchrun (the default process group initialised first, world size > 1)
every rank builds its engine with `distributed_executor_backend="external_launcher"`: each run of
`tensor_parallel_size` consecutive ranks is one engine (vLLM builds its TP groups on the world group), and the
engines are data-parallel replicas. vLLM's TP is independent of the trainer's. Engine construction is
collective over the world group (vLLM creates its groups and takes the minimum free memory), so every rank
must build its engine at the same time; `shutdown()` must come before the trainer destroys its group.

Environment set here (read by vLLM when its first engine starts, then cached by vLLM for the process):
- `VLLM_ENABLE_V1_MULTIPROCESSING=0`: the engine core runs in this process. Required by the external
  launcher, and by the in-process weight push (callables and tensors are passed by reference, not pickled).

On CPU, besides: `dtype="auto"` becomes float32 (the only precision validated on CPU here), the KV cache size
is `cpu_kv_cache_bytes` unless VLLM_CPU_KVCACHE_SPACE is set (vLLM's legacy variable, GiB, wins), there is no
sleep mode, and vLLM pins torch to one intra-op thread (unless OMP_NUM_THREADS is set) and turns
`torch.set_num_threads` into a no-op while the engine lives (`shutdown()` restores both).

Side effect everywhere: building the engine seeds this process's global `random`, numpy and torch generators
with `config.seed` (vLLM's worker does it, in-process); seed the trainer after the engine is built.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from vapo_megatron.rollout import weight_sync
from vapo_megatron.rollout.sampler import FINISH_REASONS, RolloutOutput, SamplingConfig, group_requests
from vapo_megatron.rollout.transports.colocated import ColocatedTransport

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RolloutEngineConfig:
    """How to build the vLLM engine."""

    tensor_parallel_size: int = 1
    """vLLM's tensor parallelism (ranks per engine), independent of the trainer's."""
    seed: int = 0
    """vLLM's global seed; identical on all ranks (TP peers must sample the same tokens)."""
    max_model_len: int = 2048
    """Longest prompt + response, in tokens."""
    dtype: str = "auto"
    """Weights and activations dtype; "auto" is the checkpoint's on GPU and float32 on CPU."""
    enforce_eager: bool | None = None
    """Skip CUDA graphs / compilation; None means True on CPU and False on GPU."""
    gpu_memory_utilization: float = 0.5
    """GPU: fraction of GPU memory vLLM may take (weights + KV cache); the trainer needs the rest."""
    cpu_kv_cache_bytes: int = 512 * 1024 * 1024
    """CPU: bytes of KV cache (ignored on GPU, and when VLLM_CPU_KVCACHE_SPACE is set)."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of shared prompt prefixes (reset after every weight push)."""
    load_format: str = "auto"
    """"auto" reads the checkpoint's weights; "dummy" skips it when a push follows at once."""
    logprobs_mode: str = "raw_logprobs"
    """What vLLM returns as log-probs: "raw_logprobs" is log_softmax of the model's logits before temperature,
    penalties, top-k/top-p, i.e. what the trainer computes. "processed_logprobs" would be the sampling
    distribution's."""
    max_num_seqs: int | None = None
    """Most sequences decoded together; None keeps vLLM's default."""
    max_num_batched_tokens: int | None = None
    """Token budget of one engine step. On CPU the default is large (65536) so prefills are never chunked:
    vLLM 0.32 rewinds a chunked request's seeded generator with `set_offset`, which CPU generators do not
    support ("CPU Generator does not use offset")."""
    enable_sleep_mode: bool | None = None
    """Allow `sleep()` to free GPU memory; None means on when the platform supports it (never on CPU)."""


def _is_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _sleep_mode_available() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_sleep_mode_available()


def _check_cpu_moe(model_dir: str) -> None:
    """Refuse, before vLLM starts, a MoE model whose weight pushes vLLM's CPU kernel cannot take
    (platform/cpu.py: VLLM_CPU_MOE_ALIGNMENT)."""
    import json

    from vapo_megatron import platform

    path = Path(model_dir) / "config.json"
    if platform.has_cuda() or not path.is_file():
        return
    from vapo_megatron.platform.cpu import vllm_moe_sync_problem

    problem = vllm_moe_sync_problem(json.loads(path.read_text()).get("moe_intermediate_size"))
    if problem:
        raise ValueError(f"{model_dir}: {problem}")


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


class RolloutEngine:
    """A vLLM engine for grouped sampling, with weight pushes from the trainer and sleep / wake-up.

        engine = RolloutEngine("path/to/hf_model", RolloutEngineConfig(dtype="float32"))
        out = engine.generate([[1, 5, 6]], SamplingConfig(n=4, max_tokens=32, seed=7))
        engine.sleep(); ...train...; engine.wake_up()
        engine.update_weights(trainer_hf_named_tensors(), version=step)   # lazily, in buckets
    """

    def __init__(self, model_dir: str | Path, config: RolloutEngineConfig | None = None, **overrides) -> None:
        """Build the engine from a Hugging Face model directory (config, tokenizer and, unless
        `load_format="dummy"`, weights). `overrides` replace fields of `config`."""
        self.config = dataclasses.replace(config or RolloutEngineConfig(), **overrides)
        self.model_dir = str(model_dir)
        _check_cpu_moe(self.model_dir)
        self.tensor_parallel_size = self.config.tensor_parallel_size
        self._sleep_notice_given = False
        self.weight_version = 0
        """Policy version of the weights served: 0 for the checkpoint's, then what the last complete push said."""
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self._owns_process_group = not torch.distributed.is_initialized()
        # vLLM's CPU worker pins torch to one thread and replaces torch.set_num_threads; undone in shutdown()
        self._torch_threads = (torch.set_num_threads, torch.get_num_threads())
        from vllm import LLM

        start = time.perf_counter()
        self.llm = LLM(model=self.model_dir, **self._engine_kwargs())
        self.startup_seconds = time.perf_counter() - start
        logger.info("vLLM engine for %s started in %.1f s", self.model_dir, self.startup_seconds)

    def _engine_kwargs(self) -> dict:
        cfg = self.config
        on_cpu = _is_cpu()
        world = _world_size()
        if world == 1 and cfg.tensor_parallel_size > 1:
            raise ValueError(f"tensor_parallel_size={cfg.tensor_parallel_size} needs torchrun ranks (one per TP "
                             f"rank, external launcher); this process is alone")
        if world % cfg.tensor_parallel_size:
            raise ValueError(f"world size {world} is not a multiple of tensor_parallel_size "
                             f"{cfg.tensor_parallel_size}")
        kwargs = dict(
            tensor_parallel_size=cfg.tensor_parallel_size, seed=cfg.seed, max_model_len=cfg.max_model_len,
            dtype="float32" if on_cpu and cfg.dtype == "auto" else cfg.dtype,
            enforce_eager=on_cpu if cfg.enforce_eager is None else cfg.enforce_eager,
            enable_prefix_caching=cfg.enable_prefix_caching, load_format=cfg.load_format,
            logprobs_mode=cfg.logprobs_mode,
            enable_sleep_mode=(_sleep_mode_available() if cfg.enable_sleep_mode is None
                               else cfg.enable_sleep_mode),
        )
        if on_cpu:
            if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
                kwargs["kv_cache_memory_bytes"] = cfg.cpu_kv_cache_bytes
        else:
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        if cfg.max_num_seqs is not None:
            kwargs["max_num_seqs"] = cfg.max_num_seqs
        if cfg.max_num_batched_tokens is not None or on_cpu:
            kwargs["max_num_batched_tokens"] = cfg.max_num_batched_tokens or max(65536, cfg.max_model_len)
        if world > 1:
            kwargs["distributed_executor_backend"] = "external_launcher"
        return kwargs

    @property
    def tokenizer(self):
        """The engine's Hugging Face tokenizer."""
        return self.llm.get_tokenizer()

    def generate(self, prompt_token_ids: list[list[int]], params: SamplingConfig, *,
                 prompt_offset: int = 0) -> RolloutOutput:
        """Sample `params.n` responses for each prompt (token ids, no padding).

        The output is prompt-major and its `prompt_index` counts from `prompt_offset`, which is also the global
        index used to derive every response's seed (see `sampler.sample_seed`)."""
        params.validate()
        requests = group_requests(len(prompt_token_ids), params, prompt_offset)
        if not requests:
            return RolloutOutput.empty()
        from vllm import SamplingParams, TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=list(prompt_token_ids[p])) for p, _, _ in requests]
        sampling = [SamplingParams(n=1, seed=seed, **self._sampling_kwargs(params)) for _, _, seed in requests]
        outputs = self.llm.generate(prompts, sampling, use_tqdm=False)
        return self._collate(requests, outputs, params, prompt_offset)

    @staticmethod
    def _sampling_kwargs(params: SamplingConfig) -> dict:
        return dict(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or 0,
                    max_tokens=params.max_tokens, stop_token_ids=list(params.stop_token_ids),
                    logprobs=0 if params.logprobs else None, detokenize=False)

    @staticmethod
    def _collate(requests: list[tuple[int, int, int]], outputs, params: SamplingConfig,
                 prompt_offset: int) -> RolloutOutput:
        response_ids, logprobs, finish = [], [], []
        for out in outputs:
            completion = out.outputs[0]
            tokens = list(completion.token_ids)
            response_ids.append(tokens)
            if params.logprobs:
                # logprobs=0 returns, at each position, a dict holding just the sampled token's entry
                logprobs.append([step[tok].logprob for step, tok in zip(completion.logprobs, tokens)])
            else:
                logprobs.append([])
            if completion.finish_reason not in FINISH_REASONS:
                raise RuntimeError(f"vLLM finished a response with {completion.finish_reason!r}; expected one "
                                   f"of {FINISH_REASONS}")
            finish.append(completion.finish_reason)
        return RolloutOutput(
            prompt_index=torch.tensor([prompt_offset + p for p, _, _ in requests], dtype=torch.long),
            sample_index=torch.tensor([s for _, s, _ in requests], dtype=torch.long),
            response_ids=response_ids, rollout_logprobs=logprobs, finish_reason=finish)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                       bucket_bytes: int = weight_sync.DEFAULT_BUCKET_BYTES, *, strict: bool = True,
                       version: int | None = None) -> weight_sync.WeightUpdateStats:
        """Load Hugging Face-named full tensors into the live engine, `bucket_bytes` at a time, then drop the
        prefix cache (its keys/values came from the old weights), through the colocated transport
        (rollout/transports/colocated.py).

        The iterator is consumed lazily, one bucket at a time. Under vLLM TP every rank of the engine pushes
        the same full tensors (each keeps its shard). With `strict`, a push that leaves any vLLM parameter
        unset raises (the engine's weights are then undefined). `version`: the policy version these weights
        are (default: the one held plus 1), recorded in `weight_version` once the push is complete."""
        version = self.weight_version + 1 if version is None else version
        return weight_sync.push_weights(ColocatedTransport(self, strict=strict), named_tensors, bucket_bytes,
                                        version=version)

    def _rpc(self, fn, *args):
        # in-process, one worker per engine object: the external launcher runs only this rank's worker
        return self.llm.collective_rpc(fn, args=args)[0]

    def sleep(self, level: int = 1) -> None:
        """Free the KV cache (level 1 also offloads the weights to host memory, level 2 drops them) while the
        trainer runs. On CPU vLLM has no sleep mode: a no-op, announced once."""
        if self._sleep_unavailable():
            return
        self.llm.sleep(level=level)

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Reallocate what `sleep` freed: all of it, or only `tags` ("weights", "kv_cache"), e.g. weights first,
        then a weight push, then the KV cache. A no-op on CPU."""
        if self._sleep_unavailable():
            return
        self.llm.wake_up(list(tags) if tags is not None else None)

    def _sleep_unavailable(self) -> bool:
        if self.llm.llm_engine.vllm_config.model_config.enable_sleep_mode:
            return False
        if not self._sleep_notice_given:
            logger.info("vLLM sleep mode is off on this platform: sleep()/wake_up() do nothing, the KV cache "
                        "stays allocated")
            self._sleep_notice_given = True
        return True

    def shutdown(self) -> None:
        """Stop the engine and release vLLM's process groups. Call it before destroying the trainer's process
        group (vLLM's groups hang off it); the default group is destroyed only if vLLM created it. Restores
        torch's intra-op thread count changed by vLLM on CPU."""
        if getattr(self, "llm", None) is None:
            return
        from vllm.distributed import parallel_state

        self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        parallel_state.destroy_model_parallel()
        if self._owns_process_group:
            parallel_state.destroy_distributed_environment()
        set_num_threads, num_threads = self._torch_threads
        torch.set_num_threads = set_num_threads
        set_num_threads(num_threads)
