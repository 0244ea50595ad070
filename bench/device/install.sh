#!/usr/bin/env bash
# Runs on the GPU machine, in the repository root of the carried working tree.
# Installs whatever was carried for stock sglang 0.5.17 into a private target directory
# and restores carried JIT caches. Exports nothing itself: progress goes to stderr, and
# stdout is only the `export` lines to use, so callers do
#     eval "$(bash bench/device/install.sh)"
# Quick and idempotent on a warm machine (stamp files per archive).
#
# Carried inputs (any that exist; carry the folders with the run tool's `carry`):
#   .whl/part*/site-*.tar.xz   made by bench/device/prepare_wheels.sh (unpacked into SITE)
#   .whl/part*/*.whl, .whl/*.whl   plain wheels (pip install --no-index --no-deps --target SITE)
#   .device-cache/jit-cache*.tar.xz   caches brought back by bringup.sh (see README.md):
#       flashinfer-aot/<module>/<module>.so -> SITE/flashinfer/data/aot (loaded, never rebuilt)
#       tvm-ffi/ -> TVM_FFI_CACHE_DIR,  triton/ -> TRITON_CACHE_DIR
set -euo pipefail
cd "$(dirname "$0")/../.."
SITE=${SITE:-/tmp/site}
CACHE=${CACHE_ROOT:-/tmp/jit-cache}
PY=${PYTHON:-python3}
t0=$(date +%s%N)
log() { local ms=$((($(date +%s%N) - t0) / 1000000)); echo "[install $((ms / 1000)).$((ms % 1000 / 100))s] $*" >&2; }
mkdir -p "$SITE" "$CACHE/flashinfer-ws" "$CACHE/tvm-ffi" "$CACHE/triton"

shopt -s nullglob
n=0
for a in .whl/part*/site-*.tar.xz; do
  stamp="$SITE/.installed-$(basename "$a")-$(stat -c %s "$a")"
  if [ -e "$stamp" ]; then log "$a: already installed"; n=$((n + 1)); continue; fi
  log "unpacking $a ($(du -m "$a" | cut -f1) MiB)"
  xz -T0 -dc "$a" | tar -C "$SITE" -xf -
  touch "$stamp"; n=$((n + 1))
done
wheels=(.whl/*.whl .whl/part*/*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
  key=$(for w in "${wheels[@]}"; do echo "$(basename "$w") $(stat -c %s "$w")"; done | md5sum | cut -c1-12)
  if [ -e "$SITE/.installed-wheels-$key" ]; then log "${#wheels[@]} wheels: already installed"
  else
    log "pip installing ${#wheels[@]} wheels"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "${wheels[@]}" >&2
    touch "$SITE/.installed-wheels-$key"
  fi
  n=$((n + ${#wheels[@]}))
fi
if [ "$n" -eq 0 ]; then  # a later call on a warm machine need not carry the wheels again
  compgen -G "$SITE/.installed-*" > /dev/null || {
    log "nothing carried: run bench/device/prepare_wheels.sh here and carry .whl/part1"; exit 1; }
  log "nothing carried; $SITE is installed from an earlier call"
fi

for c in .device-cache/jit-cache*.tar.xz; do
  stamp="$CACHE/.restored-$(basename "$c")-$(stat -c %s "$c")"
  [ -e "$stamp" ] && { log "$c: already restored"; continue; }
  log "restoring $c ($(du -m "$c" | cut -f1) MiB)"
  tmp=$(mktemp -d "$CACHE/unpack.XXXX")
  xz -T0 -dc "$c" | tar -C "$tmp" -xf -
  if [ -d "$tmp/flashinfer-aot" ] && [ -d "$SITE/flashinfer" ]; then
    mkdir -p "$SITE/flashinfer/data/aot"
    cp -a "$tmp/flashinfer-aot/." "$SITE/flashinfer/data/aot/"
    log "  flashinfer AOT modules: $(ls "$SITE/flashinfer/data/aot" | tr '\n' ' ')"
  fi
  [ -d "$tmp/tvm-ffi" ] && cp -a "$tmp/tvm-ffi/." "$CACHE/tvm-ffi/"
  [ -d "$tmp/triton" ] && cp -a "$tmp/triton/." "$CACHE/triton/"
  rm -rf "$tmp"; touch "$stamp"
done
log "done: SITE=$SITE ($(du -sm "$SITE" | cut -f1) MiB)"

# Consumers: sglang servers, flashinfer kernel benchmarks, sglang's Triton kernels.
echo "export PYTHONPATH=$SITE\${PYTHONPATH:+:\$PYTHONPATH}"
echo "export FLASHINFER_WORKSPACE_BASE=$CACHE/flashinfer-ws"
echo "export TVM_FFI_CACHE_DIR=$CACHE/tvm-ffi"
echo "export TRITON_CACHE_DIR=$CACHE/triton"
