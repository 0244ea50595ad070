"""Write a model folder for `--load-format dummy`: a config.json of a given shape, and
optionally the local tiny tokenizer (for servers that take text, e.g. SGLang frontend
programs). No weights: SGLang initializes them randomly.

    python bench/device/model_config.py OUT_DIR [--shape qwen3-4b|qwen3-8b|tiny] [--vocab N]
        [--dtype bfloat16|float32] [--tokenizer]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

QWEN3_4B = {  # Qwen3-4B's shape; weights are random (--load-format dummy)
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rope_theta": 1000000,
    "rope_scaling": None,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "sliding_window": None,
    "max_window_layers": 36,
    "initializer_range": 0.02,
    "use_cache": True,
    "torch_dtype": "bfloat16",
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}
QWEN3_8B = {  # Qwen3-8B's shape over Qwen3-4B's (tensor-parallel runs)
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "tie_word_embeddings": False,
}
TINY = {  # CPU dry runs of the device scripts only
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 1024,
    "max_window_layers": 2,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def model_config(shape: str, vocab: int | None, dtype: str | None) -> dict:
    config = dict(QWEN3_4B)
    shapes = {"qwen3-4b": {}, "qwen3-8b": QWEN3_8B, "tiny": TINY}
    if shape not in shapes:
        raise ValueError(f"--shape {shape!r}: one of {', '.join(shapes)}")
    config.update(shapes[shape])
    if vocab:
        config["vocab_size"] = vocab
    if dtype:
        config["torch_dtype"] = dtype
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", default="qwen3-4b")
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--dtype")
    parser.add_argument("--tokenizer", action="store_true", help="add the tiny local tokenizer")
    args = parser.parse_args()
    config = model_config(args.shape, args.vocab, args.dtype)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tokenizer:
        from tangram_sglang.models.tiny_tokenizer import (
            BOS,
            EOS,
            PAD,
            SPECIAL_TOKENS,
            save_tokenizer,
        )

        save_tokenizer(args.out, vocab_size=config["vocab_size"])
        # Its special tokens, so generation stops at the end of an assistant turn.
        ids = {
            name: SPECIAL_TOKENS.index(token)
            for name, token in (("bos", BOS), ("eos", EOS), ("pad", PAD))
        }
        config.update({f"{name}_token_id": i for name, i in ids.items()})
    (args.out / "config.json").write_text(json.dumps(config, indent=1))
    print(
        f"{args.out}: {config['architectures'][0]} {config['num_hidden_layers']} layers, "
        f"vocab {config['vocab_size']}, {config['torch_dtype']}"
        f"{', tiny tokenizer' if args.tokenizer else ''}"
    )


if __name__ == "__main__":
    main()
