"""Tiny models and a character-level tokenizer built locally, for CPU demos and tests (no hub needed).

The tokenizer is a real `PreTrainedTokenizerFast` (byte-level BPE without merges; saved as tokenizer.json +
tokenizer_config.json with a chat template), so the same files load in transformers, vLLM and the trainer
exactly as a hub tokenizer would.
"""
from __future__ import annotations

import string
from pathlib import Path

PAD, BOS, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS]
# Printable ASCII (letters, digits, punctuation, space) plus newline: enough for math and the synthetic task.
CHARACTERS = sorted(set(string.printable) - set("\t\r\x0b\x0c"))

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_char_tokenizer(vocab_pad_to: int = 128):
    """A character-level tokenizer; ids: specials first, then characters, then unused filler tokens up to
    `vocab_pad_to` (so the vocabulary divides by common tensor-parallel sizes).

    It is a byte-level BPE with no merges (characters stored in GPT-2's byte-to-unicode form, e.g. space as
    ``Ġ``): transformers 5 loads a ``qwen2`` checkpoint's tokenizer as ``Qwen2Tokenizer`` whatever
    tokenizer_config.json says, rebuilding it as byte-level BPE with Qwen's pre-tokenizer; a plain word-level
    vocabulary then silently loses every space and newline. Byte-level BPE without merges is character-level
    under either loader, so transformers, vLLM and this function give the same ids (tested)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    to_unicode = _bytes_to_unicode()
    tokens = SPECIAL_TOKENS + ["".join(to_unicode[b] for b in c.encode()) for c in CHARACTERS]
    tokens += [f"<|unused{i}|>" for i in range(max(0, vocab_pad_to - len(tokens)))]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, bos_token=None, unk_token=None,
        additional_special_tokens=[BOS], clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table (what byte-level BPE vocabularies use)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    extra = 0
    table = {}
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def tiny_hf_config(family: str = "qwen2", *, vocab_size: int = 128, hidden_size: int = 128,
                   num_layers: int = 4, num_heads: int = 4, num_kv_heads: int = 2,
                   intermediate_size: int = 256, max_position_embeddings: int = 1024,
                   tie_word_embeddings: bool | None = None, attention_bias: bool | None = None,
                   rope_theta: float = 10000.0, rms_norm_eps: float = 1e-6, head_dim: int | None = None,
                   num_experts: int = 4, num_experts_per_tok: int = 2, moe_intermediate_size: int = 64,
                   norm_topk_prob: bool = True, mlp_only_layers: list[int] | None = None,
                   decoder_sparse_step: int = 1, router_aux_loss_coef: float = 0.001):
    """A Hugging Face config of the given family ("qwen2", "llama", "qwen3", "qwen3_moe") with tiny sizes.
    head_dim (hidden/heads unless given: Qwen3 sets it independently) must be one of vLLM CPU attention's sizes
    (32, 64, 80, 96, 112, 128, ...) for vLLM tests; 128/4 = 32 is. The MoE arguments are used by "qwen3_moe"
    only."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    common = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings, rms_norm_eps=rms_norm_eps, hidden_act="silu",
        torch_dtype="float32", pad_token_id=0, eos_token_id=2, bos_token_id=1,
    )
    if family == "qwen2":
        cfg = Qwen2Config(tie_word_embeddings=bool(tie_word_embeddings), rope_theta=rope_theta, **common)
        if attention_bias is False:
            raise ValueError("Qwen2 always has QKV biases; use family='llama' for a bias-free model")
    elif family == "llama":
        cfg = LlamaConfig(tie_word_embeddings=True if tie_word_embeddings is None else tie_word_embeddings,
                          attention_bias=bool(attention_bias), mlp_bias=False, rope_theta=rope_theta,
                          **common)
    elif family in ("qwen3", "qwen3_moe"):
        qwen3 = dict(tie_word_embeddings=bool(tie_word_embeddings), attention_bias=bool(attention_bias),
                     head_dim=head_dim or hidden_size // num_heads, **common)
        if family == "qwen3":
            cfg = Qwen3Config(architectures=["Qwen3ForCausalLM"], **qwen3)
        else:
            cfg = Qwen3MoeConfig(architectures=["Qwen3MoeForCausalLM"], num_experts=num_experts,
                                 num_experts_per_tok=num_experts_per_tok, moe_intermediate_size=moe_intermediate_size,
                                 norm_topk_prob=norm_topk_prob, mlp_only_layers=list(mlp_only_layers or []),
                                 decoder_sparse_step=decoder_sparse_step, router_aux_loss_coef=router_aux_loss_coef,
                                 **qwen3)
    else:
        raise ValueError(f"unknown tiny family {family!r}; use 'qwen2', 'llama', 'qwen3' or 'qwen3_moe'")
    _set_rope_theta(cfg, rope_theta)
    return cfg


def _set_rope_theta(cfg, theta: float) -> None:
    # transformers 5 keeps rope settings in `rope_parameters`; older releases in `rope_theta`.
    params = getattr(cfg, "rope_parameters", None)
    if isinstance(params, dict):
        params["rope_theta"] = theta
    else:
        cfg.rope_theta = theta


def save_tiny_hf_model(out_dir: str | Path, family: str = "qwen2", seed: int = 0, dtype=None, **config_kwargs):
    """Write a randomly initialised HF causal LM of the family plus the char tokenizer to `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = tiny_hf_config(family, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype or torch.float32)
    _perturb_norms(model, seed)
    model.save_pretrained(out)
    build_char_tokenizer(cfg.vocab_size).save_pretrained(out)
    return out


def _perturb_norms(model, seed: int) -> None:
    """HF initialises norm weights to exactly 1 and biases to 0; randomise them so that layout bugs in
    conversion (a swapped norm, a dropped bias) change the logits and cannot pass unnoticed."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))


def _encode(tok, prompt: str, response: str) -> tuple[list[int], int]:
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  tokenize=True)
    ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return ids + tok.encode(response, add_special_tokens=False) + [tok.eos_token_id], len(ids)


def warm_start(model_dir: str | Path, sft_rows: list[dict], steps: int, batch: int, lr: float, seed: int) -> None:
    """Supervised warm start of the HF model in `model_dir` on `sft_rows` ({"prompt", "response"}): AdamW,
    warmup then cosine decay, loss on response tokens and EOS only; saves the model in place. Plain PyTorch on
    one process: a preparation step for demos, not the product."""
    import random
    import time

    import torch
    from transformers import AutoModelForCausalLM

    tok = build_char_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    encoded = [_encode(tok, r["prompt"], r["response"]) for r in sft_rows]
    model.train()
    t0 = time.time()
    for step in range(steps):
        rows = rng.sample(encoded, batch)
        width = max(len(ids) for ids, _ in rows)
        ids = torch.zeros(batch, width, dtype=torch.long)
        labels = torch.full((batch, width), -100, dtype=torch.long)
        for i, (seq, plen) in enumerate(rows):
            ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, plen: len(seq)] = torch.tensor(seq[plen:])
        for g in opt.param_groups:  # linear warmup then cosine decay
            g["lr"] = lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + torch.cos(torch.tensor(step / steps * 3.1416)).item())
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"[warm start] step {step:4d} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    model.save_pretrained(model_dir)


def add_prepare_arguments(ap, *, out: str, sft_steps: int) -> None:
    """The arguments every demo's prepare.py shares: the output folder and the warm start's settings."""
    ap.add_argument("--out", default=out)
    ap.add_argument("--sft-steps", type=int, default=sft_steps)
    ap.add_argument("--sft-batch", type=int, default=32)
    ap.add_argument("--sft-lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)


def prepare_demo_assets(args, write_data, model_kwargs: dict | None = None, done_note: str = "") -> None:
    """A demo's assets under `args.out` (from `add_prepare_arguments` plus the demo's own arguments):
    `write_data(data_dir)` writes the task (train / val prompts and `sft.jsonl` demonstrations), then a tiny
    Qwen2-shaped model (`model_kwargs` for `save_tiny_hf_model`) is warm-started on the demonstrations. A
    `READY` file (the arguments as JSON) is written last; when it exists nothing is rebuilt."""
    import json

    import torch

    out = Path(args.out)
    if (out / "READY").exists():
        print(f"[prepare] {out} is ready (delete it to rebuild)")
        return
    torch.manual_seed(args.seed)
    write_data(out / "data")
    model_dir = out / "model"
    save_tiny_hf_model(model_dir, "qwen2", seed=args.seed, **(model_kwargs or {}))
    sft = [json.loads(line) for line in (out / "data" / "sft.jsonl").read_text().splitlines()]
    warm_start(model_dir, sft, args.sft_steps, args.sft_batch, args.sft_lr, args.seed)
    (out / "READY").write_text(json.dumps(vars(args)))
    print(f"[prepare] done: {out}{done_note}")
