"""Tiny random Hugging Face causal LMs, built locally, for tests and the shipped tiny profile.

`python -m tangram_sglang.models.tiny --out DIR [--arch qwen3|llama] [--seed 0]` writes
`config.json` and `model.safetensors`; the same arguments give the same bytes.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

ARCHS = ("qwen3", "llama")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _config(arch: str, **shape: int):
    from transformers import LlamaConfig, Qwen3Config

    common = dict(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=2 * shape["hidden"],
        num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["q_heads"],
        num_key_value_heads=shape["kv_heads"],
        head_dim=shape["head_dim"],
        max_position_embeddings=32768,
        tie_word_embeddings=False,
    )
    if arch == "qwen3":
        return Qwen3Config(**common)
    if arch == "llama":
        return LlamaConfig(**common)
    raise ValueError(f"arch {arch!r} is not one of {', '.join(ARCHS)}")


@torch.no_grad()
def _diversify_heads(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Give each kv head its own attention style (see `build_tiny_model`)."""
    for layer in model.model.layers:
        attn = layer.self_attn
        d = attn.head_dim
        wq = attn.q_proj.weight.view(-1, d, attn.q_proj.weight.shape[1])
        wk = attn.k_proj.weight.view(-1, d, attn.k_proj.weight.shape[1])
        group = wq.shape[0] // wk.shape[0]
        for h in range(wk.shape[0]):
            align = float(torch.rand((), generator=gen))
            scale = math.exp(float(torch.empty(()).uniform_(0.0, math.log(6.0), generator=gen)))
            members = slice(h * group, (h + 1) * group)
            wq[members] = align * wk[h] + math.sqrt(1.0 - align**2) * wq[members]
            wq[members] *= scale
            wk[h] *= scale
        if hasattr(attn, "q_norm"):
            temperature = float(torch.empty(()).uniform_(1.0, 1.6, generator=gen))
            attn.q_norm.weight.fill_(temperature)
            attn.k_norm.weight.fill_(temperature)


def build_tiny_model(
    out_dir: str | Path,
    arch: str = "qwen3",
    num_layers: int = 4,
    hidden: int = 128,
    q_heads: int = 8,
    kv_heads: int = 4,
    head_dim: int = 32,
    vocab: int = 1024,
    dtype: str = "float32",
    seed: int = 0,
) -> Path:
    """Write a random `Qwen3ForCausalLM` / `LlamaForCausalLM` to `out_dir`; no downloads.

    A plain random init attends almost uniformly in every head, which would make per-head
    budgets meaningless. So, with factors drawn from `seed`, each kv head's query rows are
    mixed towards its key rows by `align` in [0, 1) (aligned heads attend sharply to earlier
    tokens like the current one: retrieval), and its q and k rows are scaled by a factor in
    [1, 6] (sharper logits; Qwen3's per-head q/k RMSNorm cancels this, so Qwen3 instead
    scales each layer's q_norm/k_norm weights by a temperature in [1, 1.6]). The same
    arguments give byte-identical files.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if q_heads % kv_heads:
        raise ValueError(f"q_heads {q_heads} is not a multiple of kv_heads {kv_heads}")
    from transformers import AutoModelForCausalLM

    config = _config(
        arch,
        num_layers=num_layers,
        hidden=hidden,
        q_heads=q_heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=vocab,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _diversify_heads(model, torch.Generator().manual_seed(seed))
    model = model.to(DTYPES[dtype]).eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    return out


def build_tiny_chat_model(out_dir: str | Path, seed: int = 0) -> Path:
    """The tiny fp32 Qwen3 (exact greedy comparisons need fp32) with its local tokenizer:
    the shipped tiny profile's model, which the server tests serve."""
    from tangram_sglang.models.tiny_tokenizer import save_tokenizer

    path = build_tiny_model(out_dir, arch="qwen3", dtype="float32", seed=seed)
    save_tokenizer(path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tangram_sglang.models.tiny", description=__doc__
    )
    parser.add_argument("--out", required=True, help="directory to write the model into")
    parser.add_argument("--arch", choices=ARCHS, default="qwen3")
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--q-heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        path = build_tiny_model(
            args.out,
            args.arch,
            args.num_layers,
            args.hidden,
            args.q_heads,
            args.kv_heads,
            args.head_dim,
            args.vocab,
            args.dtype,
            args.seed,
        )
    except ValueError as exc:
        parser.error(str(exc))
    print(path)


if __name__ == "__main__":
    main()
