#!/usr/bin/env bash
# GPU side, one command (see bench/device/README.md):
#   install the carried wheel set, write a Qwen3-4B-shaped config.json, start stock
#   sglang 0.5.17 with each attention backend in turn (dummy weights, token ids only),
#   wait for health, run bench/device/serve_check.py, record which native libraries the
#   server processes loaded, stop the server, print a results table, and put logs,
#   results and the JIT caches (for .device-cache/) into $OUT.
# Environment knobs: BACKENDS ("triton flashinfer"), BUDGET_S (570: everything, packing
# included, ends this many seconds after start), NUM_REQUESTS/INPUT_LEN/OUTPUT_LEN/ROUNDS,
# CUDA_GRAPH_MAX_BS (32: decode graphs up to the 32-request batch), MEM_FRACTION (0.8), EXTRA_SERVER_ARGS, PYTHON (python3),
# SKIP_INSTALL=1 (use the current PYTHONPATH), PACK_CACHE (1); for CPU dry runs of this
# script only: MODEL_SHAPE=tiny, IMPORT_MODULES="sglang", VOCAB=1024.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
START=$(date +%s)
OUT=${OUT:-/tmp/bringup-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/bringup.log") 2>&1
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
BACKENDS=${BACKENDS:-triton flashinfer}
BUDGET_S=${BUDGET_S:-570}
MODEL_DIR=${MODEL_DIR:-/tmp/qwen3-4b-shape}
el() { echo $(($(date +%s) - START)); }
say() { echo "[bringup +$(el)s] $*"; }

say "== device"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader || true
say "date: $(date -u +%FT%TZ)  cores: $(nproc)  host: $(uname -r)"

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  say "== install"
  envs=$(bash bench/device/install.sh) || { say "install failed"; exit 1; }
  eval "$envs"
fi
echo "PYTHONPATH=${PYTHONPATH:-}"
# Python runs from a neutral folder: `python -m` puts the current folder on sys.path, and
# this repository's kernels/ would shadow the `kernels` package sglang's FA3 path imports.
REPO=$PWD
WORKDIR=${WORKDIR:-/tmp/bringup-work}
mkdir -p "$WORKDIR"
cd "$WORKDIR" || exit 1
say "== import check"
"$PY" - <<'EOF' || { say "import check failed"; exit 1; }
import importlib, sys, time
t = time.time()
import torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
import os
for m in os.environ.get("IMPORT_MODULES", "triton transformers tokenizers tvm_ffi flashinfer "
                        "sgl_kernel xgrammar sglang").split():
    t1 = time.time()
    mod = importlib.import_module(m)
    print(f"  {m:13s} {getattr(mod, '__version__', '?'):22s} {time.time() - t1:5.1f} s  "
          f"{getattr(mod, '__file__', '')}")
print(f"imports: {time.time() - t:.1f} s")
EOF

say "== model config -> $MODEL_DIR"
mkdir -p "$MODEL_DIR"
"$PY" "$REPO/bench/device/model_config.py" "$MODEL_DIR" --shape "${MODEL_SHAPE:-qwen3-4b}" \
  || { say "model config failed"; exit 1; }

RESULTS=$OUT/results.json
: > "$RESULTS"
: > "$OUT/loaded-libs.txt"
port=30000
for be in $BACKENDS; do
  port=$((port + 10))
  left=$((START + BUDGET_S - 40 - $(date +%s)))
  if [ "$left" -lt 60 ]; then
    say "== $be: skipped, only ${left}s of the budget left"
    echo "{\"backend\": \"$be\", \"ok\": false, \"error\": \"skipped: budget\"}" >> "$RESULTS"
    continue
  fi
  say "== $be: launching (budget ${left}s)"
  args=(--model-path "$MODEL_DIR" --load-format dummy --skip-tokenizer-init
        --attention-backend "$be" --host 127.0.0.1 --port "$port"
        --mem-fraction-static "${MEM_FRACTION:-0.8}" --cuda-graph-max-bs-decode "${CUDA_GRAPH_MAX_BS:-32}")
  # shellcheck disable=SC2206
  args+=(${EXTRA_SERVER_ARGS:-})
  echo "$PY -m sglang.launch_server ${args[*]}"
  t_launch=$(date +%s.%N)
  setsid "$PY" -m sglang.launch_server "${args[@]}" > "$OUT/server-$be.log" 2>&1 &
  pid=$!
  "$PY" "$REPO/bench/device/serve_check.py" --port "$port" --backend "$be" --pid "$pid" \
    --t-launch "$t_launch" --wait "$left" --deadline "$((START + BUDGET_S - 40))" \
    --num-requests "${NUM_REQUESTS:-32}" --input-len "${INPUT_LEN:-1024}" \
    --output-len "${OUTPUT_LEN:-128}" --rounds "${ROUNDS:-2}" --vocab "${VOCAB:-151936}" \
    --json-out "$RESULTS"
  rc=$?
  {
    echo "## $be (serve_check rc=$rc)"
    for p in $(pgrep -g "$pid" 2>/dev/null); do
      libs=$(grep -o -E '/[^ ]*(sgl_kernel|flashinfer|tvm_ffi|tvm-ffi|xgrammar|cached_ops|triton)[^ ]*\.so[^ ]*' \
             "/proc/$p/maps" 2>/dev/null | sort -u)
      [ -n "$libs" ] && { echo "# pid $p: $(tr '\0' ' ' < "/proc/$p/cmdline" | cut -c1-100)"; echo "$libs"; }
    done
  } >> "$OUT/loaded-libs.txt"
  say "== $be: stopping server (pgid $pid)"
  kill -TERM -- "-$pid" 2>/dev/null
  for _ in $(seq 1 20); do pgrep -g "$pid" > /dev/null || break; sleep 1; done
  pgrep -g "$pid" > /dev/null && { say "still running: SIGKILL"; kill -KILL -- "-$pid" 2>/dev/null; sleep 2; }
  wait "$pid" 2>/dev/null
  nvidia-smi --query-gpu=memory.used --format=csv,noheader || true
  grep -E 'Traceback|Error|error:' "$OUT/server-$be.log" | grep -v -E 'FutureWarning|UserWarning' | head -5
  grep -E 'Capture target .* end|Engine startup timings|ready to roll' "$OUT/server-$be.log" | cut -c1-240
done

[ "${PACK_CACHE:-1}" = 1 ] && { say "== pack JIT caches -> \$OUT/jit-cache.tar.xz"; bash "$REPO/bench/device/pack_cache.sh" "$OUT"; }

# Server logs: keep each under the 16 MiB a returned file may have.
for f in "$OUT"/server-*.log; do
  [ "$(stat -c %s "$f")" -gt $((15 * 1048576)) ] && { tail -c 15M "$f" > "$f.t"; mv "$f.t" "$f"; }
done

say "== results ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1))"
"$PY" - "$RESULTS" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"{'backend':11s} {'ok':3s} {'start s':>7s} {'1st req s':>9s} {'1x out tok/s':>12s} "
      f"{'batch out tok/s':>16s} {'batch tot tok/s':>15s} {'turn2 cached':>14s}")
for r in rows:
    b = r.get("batch") or [{}]
    bb = b[-1]
    mt = r.get("multi_turn") or {}
    print(f"{r['backend']:11s} {'yes' if r.get('ok') else 'NO':3s} {r.get('startup_s', '-')!s:>7s} "
          f"{r.get('first_request_s', '-')!s:>9s} {(r.get('single') or {}).get('output_tok_s', '-')!s:>12s} "
          f"{' / '.join(str(x.get('output_tok_s')) for x in b if x):>16s} {bb.get('total_tok_s', '-')!s:>15s} "
          f"{str(mt.get('turn2_cached', '-')) + '/' + str(mt.get('turn2_prompt', '-')):>14s}")
    if r.get("error"):
        print("   error:", r["error"])
cfg = rows[0].get("config", {}) if rows else {}
print(f"batch = {cfg.get('num_requests')} concurrent x {cfg.get('input_len')} in x "
      f"{cfg.get('output_len')} out, {cfg.get('rounds')} rounds (cache flushed between)")
sys.exit(0 if rows and all(r.get("ok") for r in rows) else 1)
EOF
rc=$?
say "done rc=$rc"
exit $rc
