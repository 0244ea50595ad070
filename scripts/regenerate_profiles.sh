#!/usr/bin/env bash
# Rebuild the shipped profiles from models built locally (no downloads). The tiny Qwen3
# model is the one tests/test_calibrate.py builds (tangram_sglang.tiny defaults, seed 0).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${TANGRAM_VENV:-.venv}/bin/python
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
"$PY" -m tangram_sglang.tiny --out "$TMP/tiny-qwen3" --arch qwen3 --seed 0 --dtype float32
"$PY" -m tangram_sglang.calibrate --model-path "$TMP/tiny-qwen3" --method ada-snapkv \
    --samples 50 --ratio 0.25 --seq-len 1024 --seed 0 \
    --out profiles/tiny-qwen3.ada-snapkv.yaml
