#!/usr/bin/env bash
# GPU side, one command (carry .whl/part1 and .device-cache; see README.md):
#   SGLang 0.5.17 end to end with --kv-compression tangram on a Qwen3-4B-shaped model
#   (--load-format dummy, token ids only), against stock SGLang, in one run:
#   (1) greedy: stock and tangram at --tangram-ratio 1.0 give identical greedy outputs
#       (fp32 both, TRITON_F32_DEFAULT=ieee so no tf32 dot anywhere);
#   (2) sessions: at 0.25, N sessions x T turns run without error, every follow-up turn
#       hits the radix cache, the pools return to their start after /flush_cache; every
#       session starts with the same SYSTEM_TOKENS, reused from inside other sessions'
#       compressed first turns;
#   (3) frontend: a multi-turn sgl.function program (a text server: the same shape with the
#       local tiny tokenizer and its vocabulary) reuses its earlier turns.
#   A phase "gputests" (first, if named) runs the compiled backend/CUDA-graph tests.
#   Each phase starts its servers one after the other (one GPU), logs go to $OUT.
# Phases "sessions-stock" and "sessions-uniform" (not in the default list) run the same
# sessions on stock SGLang (full KV) and with --kv-compression uniform at the same ratio;
# "parity" runs them on PARITY_CONFIGS (stock with and without overlap scheduling, tangram 1.0
# and 0.25; also stock-eager-prefill, uniform-R); "fusion" compares --kv-compression
# fastfusion at 1.0 with stock in fp32 on a batch sending one prompt 3 times; "fp8" on
# tangram 0.25, tangram 0.25 + FP8 KV and stock + FP8 KV; "profile" runs the parity load on
# PROFILE_CONFIGS with the first PROFILE_STEPS (10) prefill and decode steps of each server
# profiled, summarized in profile.md (bench/device/profile_summary.py); "serve" runs bench/serve.py
# (SERVE_CONFIGS, SERVE_WORKLOAD, SERVE_SESSIONS, SERVE_SCALE, SERVE_CONCURRENCY,
# SERVE_MAX_TOTAL_TOKENS); "accuracy" (MODEL_SHAPE=smollm2 only) runs bench/accuracy.py
# --device cuda: quality vs KV memory on the reference model at 4-6K-token contexts, the
# reference path (transformers, fp32) beside the fp32 servers (full, uniform and tangram at
# ACC_SERVER_RATIOS), into $OUT/accuracy-gpu.{json,md,png} (ACC_WORDS 4000, ACC_SAMPLES 12
# multi-turn, ACC_OTHER_SAMPLES 0 of each single-turn task, ACC_SERVER_SAMPLES 8,
# ACC_RATIOS "0.5 0.25 0.1", ACC_SERVER_RATIOS 0.25, ACC_ARGS: more flags; ~190 s on an H100).
# Knobs: PHASES ("gputests greedy sessions frontend"), BUDGET_S (570), SESSIONS (200), TURNS (4),
# FIRST_TOKENS (1024), SYSTEM_TOKENS (256), USER_TOKENS (128), ANSWER_TOKENS (64), CONTEXT (8192), GRAPH_BS (256),
# ROUNDS (1: the sessions load repeated on each server from an empty cache, median reported),
# STOCK_BACKEND (triton), EXTRA_TANGRAM_ARGS, SKIP_INSTALL=1, PYTHON (python3), TP_SIZE (1;
# with MODEL_SHAPE=qwen3-8b on nvidia-h200-x2: PHASES="greedy serve"),
# ALLOW_MISSES=1 (a load beyond the KV pool: radix misses are reported, not a failure),
# PACK_CACHE=1 (return the JIT caches as \$OUT/jit-cache*.tar.xz, see pack_cache.sh).
# CPU dry runs of this script: DEVICE=cpu MODEL_SHAPE=tiny STOCK_BACKEND=torch_native
# (adds --device cpu and the tests' CPU stand-ins).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
START=$(date +%s)
REPO=$PWD
OUT=${OUT:-/tmp/e2e-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/e2e.log") 2>&1
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-570}
DEVICE=${DEVICE:-cuda}
SHAPE=${MODEL_SHAPE:-qwen3-4b}
CONTEXT=${CONTEXT:-8192}
say() { echo "[e2e +$(($(date +%s) - START))s] $*"; }

say "== device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
say "date: $(date -u +%FT%TZ)  cores: $(nproc)"
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  envs=$(bash bench/device/install.sh) || { say "install failed"; exit 1; }
  eval "$envs"
fi
eval "$(bash bench/device/link_source.sh)"
if [ "$DEVICE" = cpu ]; then
  export PYTHONPATH="$REPO/tangram_sglang/cpu/shims:$PYTHONPATH"
  unset SGLANG_USE_CPU_ENGINE
fi
# A neutral folder: the repository root would put its own kernels/ on sys.path.
WORK=${WORKDIR:-/tmp/e2e-work}
mkdir -p "$WORK" && cd "$WORK" || exit 1

if [ "$SHAPE" = smollm2 ]; then  # the reference model itself: its weights, tokenizer and
  # shipped HeadKV profile (the GGUF carried in two parts, smollm2_stage.sh; here on CPU
  # the pip package's)
  MODEL=$(bash "$REPO/bench/device/smollm2_stage.sh") || MODEL=$("$PY" -m tangram_sglang.models.smollm2) \
    || { say "no SmolLM2 checkpoint (bench/device/README.md: carry .device-model/part1, then part2)"; exit 1; }
  TEXT_MODEL=$MODEL
  cp "$REPO/profiles/smollm2-135m-instruct.headkv.yaml" "$WORK/profile.yaml"
  cp "$WORK/profile.yaml" "$WORK/profile-text.yaml"
  weights=()
else
  MODEL=$WORK/model-$SHAPE
  TEXT_MODEL=$WORK/model-$SHAPE-text
  "$PY" "$REPO/bench/device/model_config.py" "$MODEL" --shape "$SHAPE" || exit 1
  "$PY" "$REPO/bench/device/model_config.py" "$TEXT_MODEL" --shape "$SHAPE" --vocab 1024 --tokenizer || exit 1
  "$PY" -m tangram_sglang synthetic --model-path "$MODEL" --ratio 0.25 --out "$WORK/profile.yaml" || exit 1
  "$PY" -m tangram_sglang synthetic --model-path "$TEXT_MODEL" --ratio 0.25 --out "$WORK/profile-text.yaml" || exit 1
  weights=(--load-format dummy)
fi
VOCAB=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['vocab_size'])" "$MODEL/config.json")

common=("${weights[@]}" --host 127.0.0.1 --context-length "$CONTEXT" --random-seed 0)
if [ "$DEVICE" = cpu ]; then
  common+=(--device cpu --mem-fraction-static 0.3 --max-total-tokens 200000)
else
  common+=(--mem-fraction-static "${MEM_FRACTION:-0.8}" --cuda-graph-max-bs-decode "${GRAPH_BS:-256}")
fi
if [ "${TP_SIZE:-1}" != 1 ]; then  # every server, stock and ours, over TP_SIZE GPUs (or CPU ranks)
  common+=(--tp-size "$TP_SIZE")
  [ "$DEVICE" = cpu ] && export SGLANG_CPU_OMP_THREADS_BIND=${SGLANG_CPU_OMP_THREADS_BIND:-0|1}
fi
tangram=(--kv-compression tangram --tangram-profile "$WORK/profile.yaml")
# shellcheck disable=SC2206
tangram+=(${EXTRA_TANGRAM_ARGS:-})

port=31000
PID=
URL=
alive() { [ -e "/proc/$1" ] && ! grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null; }
budget_left() { echo $((START + BUDGET_S - 30 - $(date +%s))); }  # seconds, 30 kept for packing
serve() {  # serve NAME MODEL ARGS...: start, wait for /health_generate; sets PID and URL
  local name=$1 model=$2; shift 2
  port=$((port + 1))
  URL=http://127.0.0.1:$port
  local left; left=$(budget_left)
  [ "$left" -gt 60 ] || { say "$name: not started, ${left}s of the budget left"; return 1; }
  echo "${SERVER_ENV[*]} $PY -m sglang.launch_server --model-path $model --port $port ${common[*]} $*" \
    > "$OUT/server-$name.log"
  local t0
  t0=$(date +%s)
  setsid env "${SERVER_ENV[@]}" "$PY" -m sglang.launch_server --model-path "$model" --port "$port" \
    "${common[@]}" "$@" >> "$OUT/server-$name.log" 2>&1 &
  PID=$!
  local limit=$((left < 300 ? left : 300))
  while [ $(($(date +%s) - t0)) -lt "$limit" ]; do
    if ! alive "$PID"; then
      say "$name: server exited during start-up"; tail -25 "$OUT/server-$name.log"; return 1
    fi
    if curl -sf -m 20 "$URL/health_generate" > /dev/null 2>&1; then
      say "$name: ready after $(($(date +%s) - t0)) s"
      grep -E "tangram|Capture cuda graph end|Capture .* end" "$OUT/server-$name.log" | cut -c1-300 | head -10
      return 0
    fi
    sleep 2
  done
  say "$name: not healthy after ${limit}s"; tail -25 "$OUT/server-$name.log"; return 1
}
halt() {  # stop the server started last (its whole process group)
  [ -n "$PID" ] || return 0
  kill -TERM -- "-$PID" 2>/dev/null
  for _ in $(seq 1 "${HALT_WAIT_S:-30}"); do alive "$PID" || break; sleep 1; done
  pgrep -g "$PID" > /dev/null && { say "$1: still running, SIGKILL"; kill -KILL -- "-$PID" 2>/dev/null; }
  wait "$PID" 2>/dev/null
  PID=
  grep -E "Traceback|Error" "$OUT/server-$1.log" | grep -v -E "Warning|openai_harmony" | head -5
}
check() { "$PY" "$REPO/bench/device/e2e_check.py" "$@"; }
start_profile() {  # start_profile DIR: the torch profiler over the next PROFILE_STEPS
  # prefill and decode steps each (SGLang's /start_profile, one trace per stage)
  curl -sf -m 30 -X POST "$URL/start_profile" -H 'Content-Type: application/json' -d \
    "{\"output_dir\": \"$1\", \"num_steps\": ${PROFILE_STEPS:-10}, \"activities\": [\"CPU\", \"GPU\"], \"profile_by_stage\": true}" \
    > /dev/null || say "start_profile failed"
}
wait_traces() {  # wait_traces DIR: both stages' traces written (at most 60 s)
  for _ in $(seq 1 30); do
    [ "$(ls "$1"/*.trace.json.gz 2>/dev/null | wc -l)" -ge 2 ] && return 0; sleep 2
  done
  say "traces in $1: $(ls "$1" 2>/dev/null | tr '\n' ' ')"
}
sessions() {  # sessions NAME JSON SERVER-ARGS...: serve, run the sessions check, halt; sets rc
  # (with PROFILE_DIR set: profiled, bench/device/profile_summary.py reads the traces)
  local name=$1 json=$2; shift 2
  rc=1
  serve "$name" "$MODEL" --skip-tokenizer-init "$@" \
    --max-running-requests "$((${SESSIONS:-200} + 56))" || return
  [ -n "${PROFILE_DIR:-}" ] && start_profile "$PROFILE_DIR/$name"
  check sessions --url "$URL" --out "$OUT/$json" --vocab "$VOCAB" \
    --sessions "${SESSIONS:-200}" --turns "${TURNS:-4}" --first-tokens "${FIRST_TOKENS:-1024}" \
    --user-tokens "${USER_TOKENS:-128}" --answer-tokens "${ANSWER_TOKENS:-64}" \
    --system-tokens "${SYSTEM_TOKENS:-256}" --rounds "${ROUNDS:-1}" \
    $([ "${ALLOW_MISSES:-0}" = 1 ] && echo --allow-misses)
  rc=$?
  [ -n "${PROFILE_DIR:-}" ] && wait_traces "$PROFILE_DIR/$name"
  grep -E "tangram: (sessions|[0-9,]+ KV bytes)|max_total_num_tokens|KV Cache is allocated" \
    "$OUT/server-$name.log" | cut -c1-300 | head -4
  # The most requests SGLang ran at once (its decode log lines), the sessions it held.
  echo "$name: most running requests $(grep -oE '#running-req: [0-9]+' "$OUT/server-$name.log" \
    | awk '{print $2}' | sort -n | tail -1)"
  halt "$name"
}
greedy_pair() {  # greedy_pair TAG STOCK-ARGS... -- PLUGIN-ARGS...: stock, then our plugin
  # with PLUGIN-ARGS (both with SERVER_ENV), the same greedy prompts (GREEDY_EXTRA adds to
  # them), compared; PLUGIN_CHECK adds to the plugin server's check; sets rc
  local tag=$1 stock_args=() env=("${SERVER_ENV[@]}"); shift
  while [ "$1" != -- ]; do stock_args+=("$1"); shift; done; shift
  local g=(greedy --vocab "$VOCAB" --seed 7 --prompts 8 --max-prompt 1024 --new-tokens 48
    ${GREEDY_EXTRA[@]+"${GREEDY_EXTRA[@]}"})
  local pc=(${PLUGIN_CHECK[@]+"${PLUGIN_CHECK[@]}"}) prc
  rc=1
  SERVER_ENV=("${env[@]}" SGLANG_PLUGINS=none-stock-sglang)  # stock: our plugin not loaded
  if serve "stock-$tag" "$MODEL" --skip-tokenizer-init "${stock_args[@]}"; then
    check "${g[@]}" --url "$URL" --out "$OUT/greedy-stock-$tag.json"
    halt "stock-$tag"
    SERVER_ENV=("${env[@]}")
    if serve "plugin-$tag" "$MODEL" --skip-tokenizer-init "$@"; then
      check "${g[@]}" ${pc[@]+"${pc[@]}"} --url "$URL" --out "$OUT/greedy-tangram-$tag.json"
      prc=$?
      halt "plugin-$tag"
      check compare "$OUT/greedy-stock-$tag.json" "$OUT/greedy-tangram-$tag.json" \
        --out "$OUT/greedy-compare-$tag.json"
      rc=$(worst "$prc" "$?")
    fi
  fi
  halt "stock-$tag"; SERVER_ENV=()
}
worst() { for r in "$@"; do [ "$r" = 0 ] || { echo "$r"; return; }; done; echo 0; }

# The fp32 greedy comparisons' servers. No graphs for stock: its prefill graphs capture 58
# sizes, slow with native fp32 ops.
fp32_stock=(--dtype float32 --attention-backend "${STOCK_BACKEND:-triton}"
  --disable-decode-cuda-graph --disable-prefill-cuda-graph)
fp32_plugin=(--dtype float32 --max-running-requests 64 --cuda-graph-max-bs-decode 8)
declare -A RC
for phase in ${PHASES:-gputests greedy sessions frontend}; do
  say "== phase $phase"
  case $phase in
    gputests)  # compiled: real CUDA-graph capture/replay of the backend, kernels vs reference
      left=$(budget_left)
      lim=${GPUTEST_TIMEOUT_S:-200}; [ "$left" -lt "$lim" ] && lim=$left
      timeout "$((lim > 1 ? lim : 1))" "$PY" -m pytest -q -p no:cacheprovider -rfEs \
        "$REPO/tests/test_cuda_graph_decode.py" "$REPO/tests/test_backend_kernels.py" \
        "$REPO/tests/test_kernels.py::test_kernels_read_fp8_storage_with_the_layers_scales" \
        > "$OUT/gputests.log" 2>&1
      rc=$?
      tail -15 "$OUT/gputests.log" ;;
    greedy)  # fp32: kernels' reduction orders differ, but nothing rounds to bf16 or tf32
      SERVER_ENV=(TRITON_F32_DEFAULT=ieee)
      # SGLang's CUDA custom ops have no fp32 kernels: native torch forwards in both servers.
      [ "$DEVICE" = cpu ] || SERVER_ENV+=("PYTHONPATH=$REPO/bench/device/fp32_shim:$PYTHONPATH")
      greedy_pair fp32 "${fp32_stock[@]}" \
        -- "${tangram[@]}" --tangram-ratio 1.0 "${fp32_plugin[@]}" ;;
    greedy-flashinfer)  # --tangram-kernels flashinfer at 1.0 against stock's FlashInfer
      # backend, bf16, decode graphs on (FlashInfer has no fp32 decode: tokens may part where
      # two logits tie within bf16 rounding; the comparison reports where)
      SERVER_ENV=()
      greedy_pair flashinfer --attention-backend flashinfer \
        -- "${tangram[@]}" --tangram-ratio 1.0 --tangram-kernels flashinfer \
        --max-running-requests 64 ;;
    fusion)  # --kv-compression fastfusion at 1.0 against stock, fp32 as the greedy phase, with
      # one prompt sent 3 times in one batch: stored once (slots given back), stock's tokens
      SERVER_ENV=(TRITON_F32_DEFAULT=ieee)
      [ "$DEVICE" = cpu ] || SERVER_ENV+=("PYTHONPATH=$REPO/bench/device/fp32_shim:$PYTHONPATH")
      GREEDY_EXTRA=(--duplicates); PLUGIN_CHECK=(--expect-fusion)
      greedy_pair fusion "${fp32_stock[@]}" \
        -- --kv-compression fastfusion --tangram-fusion 1.0 "${fp32_plugin[@]}"
      GREEDY_EXTRA=(); PLUGIN_CHECK=() ;;
    sessions)
      sessions tangram-r0.25 sessions.json "${tangram[@]}" --tangram-ratio 0.25 ;;
    sessions-uniform)  # the same sessions, one ratio for every head (the fair baseline)
      sessions uniform-r0.25 sessions-uniform.json --kv-compression uniform --tangram-ratio 0.25 ;;
    sessions-stock)  # the same sessions on stock SGLang (full KV), for a side-by-side
      SERVER_ENV=(SGLANG_PLUGINS=none-stock-sglang)
      sessions stock-sessions sessions-stock.json --attention-backend "${STOCK_BACKEND:-triton}"
      SERVER_ENV=() ;;
    parity)  # the load that fits stock's pool, overlap on unless named: each of PARITY_CONFIGS
      # (stock; stock-eager-prefill: no prefill graphs, what they buy stock; tangram-R;
      # uniform-R; any of them + "-no-overlap": what overlap scheduling buys it, e.g.
      # stock-no-overlap, the ceiling of a host path that stalls it)
      prc=0
      for cfg in ${PARITY_CONFIGS:-stock stock-no-overlap tangram-1.0 tangram-0.25}; do
        SERVER_ENV=(SGLANG_PLUGINS=none-stock-sglang)
        base=${cfg%-no-overlap}  # any configuration + "-no-overlap": overlap scheduling off
        case $base in
          stock) args=() ;;
          stock-eager-prefill) args=(--disable-prefill-cuda-graph) ;;
          tangram-*) SERVER_ENV=(); args=("${tangram[@]}" --tangram-ratio "${base#tangram-}") ;;
          uniform-*) SERVER_ENV=(); args=(--kv-compression uniform --tangram-ratio "${base#uniform-}") ;;
          *) say "unknown parity configuration $cfg"; prc=2; continue ;;
        esac
        [ "$base" != "$cfg" ] && args+=(--disable-overlap-schedule)
        case $cfg in stock*) args+=(--attention-backend "${STOCK_BACKEND:-triton}") ;; esac
        sessions "$cfg" "sessions-parity-$cfg.json" "${args[@]}"; [ "$rc" = 0 ] || prc=$rc
      done
      SERVER_ENV=(); rc=$prc ;;
    profile)  # the parity load on each of PROFILE_CONFIGS (stock, tangram-R, uniform-R),
      # each server's first PROFILE_STEPS prefill and decode steps under the torch profiler
      PROFILE_DIR=$WORK/profiles; rm -rf "$PROFILE_DIR"; prc=0
      for cfg in ${PROFILE_CONFIGS:-stock tangram-1.0 tangram-0.25 uniform-0.25}; do
        case $cfg in
          stock) SERVER_ENV=(SGLANG_PLUGINS=none-stock-sglang)
            args=(--attention-backend "${STOCK_BACKEND:-triton}") ;;
          tangram-*) SERVER_ENV=(); args=("${tangram[@]}" --tangram-ratio "${cfg#tangram-}") ;;
          uniform-*) SERVER_ENV=(); args=(--kv-compression uniform --tangram-ratio "${cfg#uniform-}") ;;
          *) say "unknown profile configuration $cfg"; prc=2; continue ;;
        esac
        sessions "$cfg" "profile-$cfg.json" "${args[@]}"; [ "$rc" = 0 ] || prc=$rc
      done
      SERVER_ENV=(); rc=$prc
      "$PY" "$REPO/bench/device/profile_summary.py" "$PROFILE_DIR"/* > "$OUT/profile.md" || rc=1
      head -80 "$OUT/profile.md"
      PROFILE_DIR= ;;
    fp8)  # --kv-cache-dtype fp8_e4m3: tangram 0.25 alone and + FP8 KV (the target pair,
      # first), then stock + FP8 (size the load beyond the pools with MEM_FRACTION,
      # FIRST_TOKENS and ALLOW_MISSES=1; FP8_STOCK=0 runs only the pair)
      sessions tangram-r0.25-bf16 sessions-fp8-tangram-0.25.json "${tangram[@]}" --tangram-ratio 0.25; r1=$rc
      sessions tangram-r0.25-fp8 sessions-fp8-tangram-0.25-fp8.json "${tangram[@]}" \
        --tangram-ratio 0.25 --kv-cache-dtype fp8_e4m3; r2=$rc
      rc=0
      if [ "${FP8_STOCK:-1}" = 1 ]; then
        SERVER_ENV=(SGLANG_PLUGINS=none-stock-sglang)
        sessions stock-fp8 sessions-fp8-stock.json --attention-backend "${STOCK_BACKEND:-triton}" \
          --kv-cache-dtype fp8_e4m3
        SERVER_ENV=()
      fi
      rc=$(worst "$r1" "$r2" "$rc") ;;
    serve)  # bench/serve.py against each of SERVE_CONFIGS in turn, then one merged record
      rc=0; parts=()
      devname=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
      devname=${devname:-$DEVICE}
      for cfg in ${SERVE_CONFIGS:-stock tangram-0.25}; do
        # (tangram's pools split for the workload's own session shape, as serve.py does)
        flags=$("$PY" "$REPO/bench/serve.py" --flags "$cfg" --profile "$WORK/profile.yaml" \
          --model "$MODEL" --workload "${SERVE_WORKLOAD:-shared-context}" \
          --sessions "${SERVE_SESSIONS:-64}" --scale "${SERVE_SCALE:-0.1}" \
          --split-for "${SERVE_SPLIT_FOR:-workload}") || { rc=1; continue; }
        # shellcheck disable=SC2206
        flags=($flags)
        # A pool small enough that stock must evict (every configuration the same bytes)
        # (FP8 pools the same bytes: twice the tokens of the bf16 model's, as serve.py's pool_tokens)
        if [ -n "${SERVE_MAX_TOTAL_TOKENS:-}" ]; then
          case $cfg in *-fp8) flags+=(--max-total-tokens "$((SERVE_MAX_TOTAL_TOKENS * 2))") ;;
            *) flags+=(--max-total-tokens "$SERVE_MAX_TOTAL_TOKENS") ;; esac
        fi
        case $cfg in
          stock*) SERVER_ENV=(SGLANG_PLUGINS=none-stock-sglang); flags+=(--attention-backend "${STOCK_BACKEND:-triton}") ;;
          *) SERVER_ENV=() ;;
        esac
        if serve "serve-$cfg" "$MODEL" --skip-tokenizer-init "${flags[@]}" \
            --max-running-requests "${SERVE_MAX_RUNNING:-256}"; then
          "$PY" "$REPO/bench/serve.py" --url "$URL" --name "$cfg" --model "$MODEL" \
            --workload "${SERVE_WORKLOAD:-shared-context}" --sessions "${SERVE_SESSIONS:-64}" \
            --scale "${SERVE_SCALE:-0.1}" --concurrency "${SERVE_CONCURRENCY:-16,64}" \
            --split-for "${SERVE_SPLIT_FOR:-workload}" \
            --device "$devname" \
            --out "$OUT/serve-$cfg" > "$OUT/serve-$cfg.log" 2>&1 || rc=1
          tail -12 "$OUT/serve-$cfg.log"
          [ -e "$OUT/serve-$cfg.json" ] && parts+=("$OUT/serve-$cfg.json")
        else
          rc=1
        fi
        halt "serve-$cfg"
      done
      SERVER_ENV=()
      [ ${#parts[@]} -gt 0 ] && "$PY" "$REPO/bench/serve.py" --merge "${parts[@]}" --model "$SHAPE" \
        --workload "${SERVE_WORKLOAD:-shared-context}" --device "$devname" --out "$OUT/serve" > /dev/null ;;
    accuracy)  # quality vs KV memory at length on the reference model (bench/accuracy.py):
      # no new sample in the budget's last 80 s, stopped (servers too) in its last 20 s
      rc=2
      if [ "$SHAPE" != smollm2 ]; then
        say "accuracy: needs MODEL_SHAPE=smollm2 (the reference model, its weights and profiles)"
      else
        tag=$([ "$DEVICE" = cpu ] && echo cpu || echo gpu)
        left=$(budget_left)
        # shellcheck disable=SC2086
        timeout -k 25 "$((left > 21 ? left - 20 : 1))" "$PY" "$REPO/bench/accuracy.py" \
          --device "$DEVICE" --model-path "$MODEL" --out "$OUT/accuracy-$tag" \
          --words "${ACC_WORDS:-4000}" --samples "${ACC_SAMPLES:-12}" \
          --other-samples "${ACC_OTHER_SAMPLES:-0}" --server-samples "${ACC_SERVER_SAMPLES:-8}" \
          --ratios ${ACC_RATIOS:-0.5 0.25 0.1} --server-ratios ${ACC_SERVER_RATIOS:-0.25} \
          --extra-profiles --time-limit "$((left > 80 ? left - 80 : 1))" ${ACC_ARGS:-} \
          > "$OUT/accuracy-$tag.log" 2>&1
        rc=$?
        if [ -e "$OUT/accuracy-$tag.md" ]; then cat "$OUT/accuracy-$tag.md"
        else tr '\r' '\n' < "$OUT/accuracy-$tag.log" | grep -v -E "it/s|s/it|sample/s" | tail -25; fi
      fi ;;
    frontend)
      rc=1
      if serve tangram-text "$TEXT_MODEL" --kv-compression tangram \
          --tangram-profile "$WORK/profile-text.yaml" --tangram-ratio 0.25 --max-running-requests 64; then
        check frontend --url "$URL" --out "$OUT/frontend.json" --answer-tokens 24
        rc=$?
        halt tangram-text
      fi ;;
    *) say "unknown phase $phase"; rc=2 ;;
  esac
  RC[$phase]=$rc
  say "== phase $phase: $([ "$rc" = 0 ] && echo PASS || echo "FAIL ($rc)")"
done

# PACK_CACHE=1: this machine's JIT caches come back for .device-cache/ (next fresh machine)
[ "${PACK_CACHE:-0}" = 1 ] && [ "$DEVICE" != cpu ] && bash "$REPO/bench/device/pack_cache.sh" "$OUT"

# The device tool returns a few files of 16 MiB at most: the server logs go in one archive
# (each cut to its last 15 MiB), so the phases' JSON results always come back.
for f in "$OUT"/server-*.log; do
  [ -e "$f" ] || continue
  [ "$(stat -c %s "$f")" -gt $((15 * 1048576)) ] && { tail -c 15M "$f" > "$f.t"; mv "$f.t" "$f"; }
done
if compgen -G "$OUT/server-*.log" > /dev/null; then
  tar -czf "$OUT/server-logs.tgz" -C "$OUT" $(cd "$OUT" && ls server-*.log) && rm -f "$OUT"/server-*.log
fi
# Only a few files come back: every result goes in one archive beside e2e.log.
# (Written beside, then moved in: tar stops with an error when its own output grows inside
# the folder it reads, and the files were then left in place.)
packed=$(mktemp /tmp/e2e-results.XXXX.tgz)
tar -czf "$packed" -C "$OUT" --exclude=e2e.log --exclude='jit-cache*' --exclude=results.tgz . \
  && (cd "$OUT" && find . -mindepth 1 -maxdepth 1 ! -name e2e.log ! -name 'jit-cache*' -exec rm -rf {} +) \
  && mv "$packed" "$OUT/results.tgz"
status=0
for phase in "${!RC[@]}"; do
  echo "phase $phase: rc ${RC[$phase]}"
  [ "${RC[$phase]}" = 0 ] || status=1
done
say "done rc=$status"
exit $status
