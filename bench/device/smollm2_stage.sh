#!/usr/bin/env bash
# GPU side: gathers the carried parts of the SmolLM2 GGUF (bench/device/smollm2_parts.sh)
# into STAGE (/tmp/smollm2-parts, kept between calls on a warm machine); once both are
# there, builds the checkpoint (python -m tangram_sglang.models.smollm2 --gguf, the sha256
# checked) into /tmp/smollm2-model and prints that path on stdout. Exit 3: a part is still
# missing (carry the other one in the next call).
set -uo pipefail
cd "$(dirname "$0")/../.."
STAGE=${STAGE:-/tmp/smollm2-parts}
MODEL_OUT=${SMOLLM2_MODEL:-/tmp/smollm2-model}
PY=${PYTHON:-python3}
mkdir -p "$STAGE"
for f in .device-model/part*/smollm2.gguf.*; do
  [ -e "$f" ] && cp "$f" "$STAGE/" && echo "staged $(basename "$f")" >&2
done
if [ ! -e "$STAGE/smollm2.gguf.1" ] || [ ! -e "$STAGE/smollm2.gguf.2" ]; then
  echo "smollm2: parts here: $(ls "$STAGE" | tr '\n' ' '); carry the missing one next" >&2
  exit 3
fi
gguf=$STAGE/SmolLM2-135M-Instruct.Q4_1.gguf
[ -e "$gguf" ] || cat "$STAGE/smollm2.gguf.1" "$STAGE/smollm2.gguf.2" > "$gguf"
"$PY" -m tangram_sglang.models.smollm2 --gguf "$gguf" --out "$MODEL_OUT"
