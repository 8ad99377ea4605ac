"""Generation only: sample n responses per prompt of a JSONL file with the rollout engine, write JSONL.

    python -m vapo_megatron.rollout.generate --model HF_DIR --prompts prompts.jsonl --n 4 --out out.jsonl
    torchrun --nproc-per-node 2 -m vapo_megatron.rollout.generate ...   # data-parallel engines, rank 0 writes

Each input row has "prompt": a string (sent as one user turn through the tokenizer's chat template, unless
--no-chat-template) or a list of chat messages ({"role", "content"}). Each output row has the prompt and its n
responses: text, number of tokens, finish reason and mean rollout log-prob. Scoring with rewards comes later.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from vapo_megatron.rollout.sampler import RolloutOutput, SamplingConfig, generate_distributed


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vapo-generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face model directory (config, tokenizer, weights)")
    p.add_argument("--prompts", required=True, help="JSONL file; each row has a 'prompt' (string or messages)")
    p.add_argument("--out", required=True, help="output JSONL, one row per prompt")
    p.add_argument("--n", type=int, default=1, help="responses per prompt")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tp", type=int, default=1, help="vLLM tensor parallel size (ranks per engine)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + response token limit (default: the model's max_position_embeddings)")
    p.add_argument("--no-chat-template", action="store_true", help="tokenize string prompts as they are")
    return p


def resolve_model_dir(path: str) -> str:
    """The Hugging Face directory to serve. A Megatron checkpoint written by tools/convert_hf_to_megatron.py
    (torch_dist + vapo_checkpoint.json) is converted into a temporary HF directory first (single process).
    A trainer checkpoint (`checkpoints/step_*`) holds optimizer state too: use `<run_dir>/hf_policy`."""
    import tempfile

    root = Path(path)
    if (root / "config.json").is_file():
        return str(root)
    if (root / "vapo_checkpoint.json").is_file() and (root / "metadata.json").is_file():
        from vapo_megatron.convert.megatron_to_hf import convert_megatron_to_hf

        out = Path(tempfile.mkdtemp(prefix="vapo_generate_")) / "hf"
        convert_megatron_to_hf(root, out, progress=False)
        return str(out)
    if (root / "metadata.json").is_file():
        raise ValueError(f"{path} is a megatron-core checkpoint without vapo_checkpoint.json; convert it with "
                         f"tools/convert_megatron_to_hf.py --hf-assets HF_DIR first")
    raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")


def read_prompts(path: str) -> list[str | list[dict]]:
    """The 'prompt' field of every non-empty JSONL row."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "prompt" not in row:
                raise ValueError(f"{path}:{line_no}: row has no 'prompt' field (keys: {sorted(row)})")
            rows.append(row["prompt"])
    return rows


def tokenize_prompt(tokenizer, prompt: str | list[dict], use_chat_template: bool = True) -> list[int]:
    """Token ids of a prompt: chat messages (or a string as one user turn) through the chat template with the
    assistant turn opened; a plain string as is when the template is off or the tokenizer has none."""
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if isinstance(prompt, str) and not (use_chat_template and has_template):
        return list(tokenizer.encode(prompt, add_special_tokens=False))
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # some tokenizers return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def output_rows(prompts: list, output: RolloutOutput, tokenizer, n: int) -> list[dict]:
    """One row per prompt with its n responses, from the prompt-major output."""
    rows = []
    for p, prompt in enumerate(prompts):
        responses = []
        for i in range(p * n, (p + 1) * n):
            ids, lps = output.response_ids[i], output.rollout_logprobs[i]
            responses.append({
                "text": tokenizer.decode(ids, skip_special_tokens=True),
                "num_tokens": len(ids),
                "finish_reason": output.finish_reason[i],
                "mean_logprob": math.fsum(lps) / len(lps) if lps else None,
            })
        rows.append({"prompt_index": p, "prompt": prompt, "responses": responses})
    return rows


def _init_distributed() -> bool:
    """Under torchrun, create the gloo world group that vLLM's external launcher builds on."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.is_initialized()


def _model_max_len(model_dir: str) -> int:
    """The model's own context limit (config.json's max_position_embeddings; 2048 when it names none)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return int(config.get("max_position_embeddings") or 2048)


def generate_main(argv: list[str] | None = None) -> int:
    """Entry point: parse `argv`, generate, write `--out` (on rank 0). Returns the process exit code."""
    args = build_parser().parse_args(argv)
    from vapo_megatron.rollout.vllm_engine import RolloutEngine, RolloutEngineConfig

    params = SamplingConfig(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.seed)
    params.validate()
    distributed = _init_distributed()
    model_dir = resolve_model_dir(args.model)
    max_model_len = args.max_model_len or _model_max_len(model_dir)
    engine = RolloutEngine(model_dir, RolloutEngineConfig(
        tensor_parallel_size=args.tp, seed=args.seed, dtype=args.dtype, max_model_len=max_model_len))
    prompts = read_prompts(args.prompts)
    token_ids = [tokenize_prompt(engine.tokenizer, p, not args.no_chat_template) for p in prompts]
    output = generate_distributed(engine, token_ids, params)
    if not distributed or int(os.environ.get("RANK", "0")) == 0:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            for row in output_rows(prompts, output, engine.tokenizer, args.n):
                f.write(json.dumps(row) + "\n")
    engine.shutdown()
    if distributed:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(generate_main())
