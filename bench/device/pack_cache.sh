#!/usr/bin/env bash
# GPU side: packs this machine's JIT caches (FlashInfer modules, sglang's tvm-ffi kernels,
# Triton) into OUT/jit-cache*.tar.xz, to be copied into .device-cache/ here so the next
# fresh machine starts its servers without compiling (install.sh restores them).
# Usage: bash bench/device/pack_cache.sh OUT   (after `eval "$(bash bench/device/install.sh)"`)
set -uo pipefail
OUT=$1
pk=$(mktemp -d /tmp/jit-pack.XXXX)
mkdir -p "$pk/flashinfer-aot"
site=${PYTHONPATH%%:*}
# Modules compiled this run (cached_ops/<name>/<name>.so) plus those restored earlier.
find "${FLASHINFER_WORKSPACE_BASE:-$HOME}/.cache/flashinfer" -path '*cached_ops/*/*.so' 2>/dev/null |
  while read -r so; do n=$(basename "$(dirname "$so")"); [ "$so" = "$(dirname "$so")/$n.so" ] &&
    mkdir -p "$pk/flashinfer-aot/$n" && cp "$so" "$pk/flashinfer-aot/$n/"; done
for d in "$site"/flashinfer/data/aot/*/; do
  [ -d "$d" ] && [ ! -e "$pk/flashinfer-aot/$(basename "$d")" ] && cp -a "$d" "$pk/flashinfer-aot/"
done
[ -d "${TVM_FFI_CACHE_DIR:-/nonexistent}" ] && cp -a "$TVM_FFI_CACHE_DIR" "$pk/tvm-ffi"
du -sh "$pk"/* 2>/dev/null
ls "$pk/flashinfer-aot"
parts=(flashinfer-aot); [ -d "$pk/tvm-ffi" ] && parts+=(tvm-ffi)
(cd "$pk" && tar -cf - "${parts[@]}") | xz -T0 -6 > "$OUT/jit-cache.tar.xz"
# The Triton cache goes in a second file, and only if it is small enough to come back.
if [ -d "${TRITON_CACHE_DIR:-/nonexistent}" ]; then
  cp -a "$TRITON_CACHE_DIR" "$pk/triton"
  (cd "$pk" && tar -cf - triton) | xz -T0 -6 > "$OUT/jit-cache-triton.tar.xz"
fi
for f in "$OUT"/jit-cache*.tar.xz; do
  sz=$(stat -c %s "$f"); echo "$(basename "$f"): $((sz / 1024)) KiB"
  [ "$sz" -gt $((15 * 1048576)) ] && { echo "  too large to come back: removed"; rm -f "$f"; }
done
rm -rf "$pk"
