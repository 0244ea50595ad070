#!/usr/bin/env bash
# Rebuild the shipped profiles from models built locally (no downloads). The tiny Qwen3
# model is the one tests/test_calibrate.py builds (tangram_sglang.models.tiny defaults, seed 0).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${TANGRAM_VENV:-.venv}/bin/python
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
"$PY" -m tangram_sglang.models.tiny --out "$TMP/tiny-qwen3" --arch qwen3 --seed 0 --dtype float32
"$PY" -m tangram_sglang calibrate --model-path "$TMP/tiny-qwen3" --method ada-snapkv \
    --samples 50 --ratio 0.25 --seq-len 1024 --seed 0 \
    --out profiles/tiny-qwen3.ada-snapkv.yaml

# SmolLM2-135M-Instruct (the reference model): calibration text is the calibration split
# of essays the model wrote itself (tangram_sglang/accuracy/data/essays.jsonl), 50 samples
# plus 10 held out for coverage and rank stability. HeadKV scores retrieval heads, so its
# copy hides two synthetic statements per prompt (templates unlike the benchmark's).
SMOL=$("$PY" -m tangram_sglang.models.smollm2 | tail -n 1)
ESSAYS="SmolLM2-135M-Instruct self-written essays (tangram_sglang/accuracy/data/essays.jsonl, model output under the model's Apache-2.0 license)"
"$PY" -m tangram_sglang.accuracy.corpus calibration --samples 60 --words 1000 --out "$TMP/essays.jsonl"
"$PY" -m tangram_sglang.accuracy.corpus calibration --samples 60 --words 1000 --needles 2 \
    --out "$TMP/essays-needles.jsonl"
for method in ada-snapkv expected-attention; do
    "$PY" -m tangram_sglang calibrate --model-path "$SMOL" --method "$method" \
        --samples 50 --held-out 10 --ratio 0.25 --seq-len 2048 --seed 0 --dtype float32 \
        --data "$TMP/essays.jsonl" --data-name "$ESSAYS" \
        --out "profiles/smollm2-135m-instruct.$method.yaml"
done
"$PY" -m tangram_sglang calibrate --model-path "$SMOL" --method headkv --headkv-share 0.5 \
    --samples 50 --held-out 10 --ratio 0.25 --seq-len 2048 --seed 0 --dtype float32 \
    --data "$TMP/essays-needles.jsonl" --data-name "$ESSAYS, two synthetic statements hidden in each" \
    --out profiles/smollm2-135m-instruct.headkv.yaml
