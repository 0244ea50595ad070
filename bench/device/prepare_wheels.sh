#!/usr/bin/env bash
# Runs HERE (the CPU machine, with PyPI). Prepares what the GPU machine needs to run
# stock sglang 0.5.17 (cp312, manylinux x86_64) into .whl/ (git-ignored):
#   .whl/dl/        the downloaded wheels (cache; never carried)
#   .whl/slim/      sglang_kernel 0.4.5 re-packed as a wheel without the libraries the
#                   flashinfer and triton attention backends never load
#   .whl/part1/     archive(s) to carry to the GPU machine (always)
#   .whl/part2/     archive(s) to carry in a second, immediate call (only if needed)
# Each part is one site-<n>.tar.xz: the wheels installed here with
# `pip install --no-deps --target` for cp312/manylinux, then xz-packed (49 MiB against 84 MiB
# of wheels). bench/device/install.sh unpacks them on the GPU machine.
# Idempotent: downloads are cached, archives are rebuilt only when inputs change.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
W=$ROOT/.whl
PY=${PYTHON:-python3}
LIMIT_MIB=${LIMIT_MIB:-58}   # per carried part; the working tree is ~0.1 MiB
mkdir -p "$W/dl" "$W/slim"

PLAT=(--python-version 3.12 --implementation cp --only-binary=:all:)
for n in 17 24 27 28 31 34 35; do PLAT+=(--platform "manylinux_2_${n}_x86_64"); done
PLAT+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)

# The server itself and its compiled kernels.
CORE=(
  sglang==0.5.17
  sglang-kernel==0.4.5
  flashinfer_python==0.6.15.post1
  apache-tvm-ffi==0.1.15.post2   # sglang pins 0.1.11; 0.1.15.post2 is what flashinfer ran with
  xgrammar==0.2.8                # sglang pins 0.2.1; 0.2.8 is what the server ran with
  transformers==5.12.1           # the image's 5.17 does not satisfy sglang's pin
  tokenizers==0.22.2             # transformers 5.12.1 needs <=0.23.0; the image has 0.23.2
)
# Runtime dependencies the GPU image lacks (versions from shared/cpu-deps-sglang-0.5.17.txt).
DEPS=(
  annotated-types==0.8.0 cffi==2.1.1 compressed-tensors==0.20.0 dill==0.4.1
  fastapi==0.165.0 gguf==0.19.0 httpcore2==2.16.2 httpx2==2.16.2
  ipython==9.18.1 asttokens==3.0.2 executing==2.3.0 ipython_pygments_lexers==1.1.1
  jedi==0.20.1 matplotlib-inline==0.2.2 parso==0.8.7 pexpect==4.9.0
  prompt_toolkit==3.0.53 ptyprocess==0.7.0 pure_eval==0.2.4 stack-data==0.6.3
  traitlets==5.16.1 wcwidth==0.9.4
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
  loguru==0.7.3 msgspec==0.22.0 openai==3.54.0 opentelemetry-api==1.45.2 orjson==3.13.0
  partial-json-parser==0.2.1.1.post7 pybase64==1.5.1 pycparser==3.12
  pydantic==2.14.3 pydantic_core==2.50.4 typing-inspection==0.4.5
  python-multipart==0.0.34 pyzmq==27.3.0 setproctitle==1.3.8 sniffio==1.3.1
  soundfile==0.14.0 starlette==1.10.0 truststore==0.10.5 uvicorn==0.54.0
)

echo "== download (cached in .whl/dl)"
"$PY" -m pip download -q --disable-pip-version-check --no-deps "${PLAT[@]}" -d "$W/dl" \
  "${CORE[@]}" "${DEPS[@]}" 2>&1 | grep -v -E "^WARNING: Location 'file:" || true
# pip keeps any other version already in dl/: keep exactly one of each name.
"$PY" - "$W/dl" <<'EOF'
import os, re, sys
d = sys.argv[1]
seen = {}
for f in sorted(os.listdir(d), key=lambda f: os.path.getmtime(os.path.join(d, f))):
    if not f.endswith(".whl"): continue
    name = re.sub(r"[-_.]+", "_", f.split("-")[0]).lower()
    if name in seen:
        print("dropping older duplicate", seen[name]); os.remove(os.path.join(d, seen[name]))
    seen[name] = f
EOF

echo "== slim sglang_kernel"
SK=$(ls "$W"/dl/sglang_kernel-0.4.5-*.whl)
SLIM=$W/slim/$(basename "$SK")
if [ ! -s "$SLIM" ] || [ "$SLIM" -ot "$0" ]; then
  "$PY" - "$SK" "$SLIM" <<'EOF'
import sys, zipfile
# Dropped: flash_ops (FA3, 1.1 GB, only --attention-backend fa3 and sgl_kernel.flash_attn),
# sm100/ (Blackwell build of common_ops; sm90/ is loaded on an H100/H200),
# flashmla_ops (FlashMLA, MLA models only), infllm_ops (CPython 3.10 only; lazily loaded).
DROP = ("sgl_kernel/flash_ops.abi3.so", "sgl_kernel/sm100/", "sgl_kernel/flashmla_ops.abi3.so",
        "sgl_kernel/infllm_ops.")
src, dst = sys.argv[1:]
with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst + ".tmp", "w", zipfile.ZIP_DEFLATED) as zo:
    for info in zi.infolist():
        n = info.filename
        if n.startswith(DROP):
            continue
        data = zi.read(n)
        if n.endswith(".dist-info/RECORD"):
            data = b"".join(l for l in data.splitlines(True) if not l.decode().startswith(DROP))
        zo.writestr(info, data)
import os; os.replace(dst + ".tmp", dst)
EOF
fi
ls -l "$SLIM"

echo "== install for cp312 into .whl/build/site-<part> and pack"
# Part 1: the server and everything it imports at start. Part 2 exists only if part 1
# would exceed LIMIT_MIB; then the heavy-but-separable flashinfer goes there.
whl() { ls "$W"/dl/"$1"-*.whl; }
PART1=(); PART2=()
for f in "$W"/dl/*.whl; do
  case $(basename "$f") in sglang_kernel-*) continue ;; esac
  PART1+=("$f")
done
PART1+=("$SLIM")

pack() {  # pack NAME WHEEL...
  local name=$1; shift
  local out=$W/$name/site-$name.tar.xz
  local stamp=$W/build/$name.list
  mkdir -p "$W/$name" "$W/build"
  local want; want=$(for f in "$@"; do echo "$(basename "$f") $(stat -c %s "$f")"; done | sort)
  if [ -s "$out" ] && [ -f "$stamp" ] && [ "$want" = "$(cat "$stamp")" ]; then
    echo "$name: up to date"; return
  fi
  rm -rf "${W:?}/build/site-$name" "${W:?}/$name"/*
  "$PY" -m pip install -q --disable-pip-version-check --no-deps --no-compile --no-index \
    "${PLAT[@]}" --target "$W/build/site-$name" "$@" 2>&1 | grep -v -E "^WARNING: Location 'file:" || true
  # console scripts carry this machine's interpreter path; the GPU side runs python -m.
  rm -rf "$W/build/site-$name/bin"
  find "$W/build/site-$name" -name __pycache__ -prune -exec rm -rf {} +
  tar -C "$W/build/site-$name" -cf - . | xz -T0 -6 > "$out.tmp"
  mv "$out.tmp" "$out"
  echo "$want" > "$stamp"
}

pack part1 "${PART1[@]}"
size1=$(stat -c %s "$W/part1/site-part1.tar.xz")
if [ "$size1" -gt $((LIMIT_MIB * 1048576)) ]; then
  echo "part1 is $((size1 / 1048576)) MiB > ${LIMIT_MIB} MiB: moving flashinfer + transformers to part2"
  PART1=(); PART2=()
  for f in "$W"/dl/*.whl "$SLIM"; do
    case $(basename "$f") in
      sglang_kernel-*) [ "$f" = "$SLIM" ] && PART1+=("$f") ;;
      flashinfer_python-*|transformers-*|tokenizers-*) PART2+=("$f") ;;
      *) PART1+=("$f") ;;
    esac
  done
  pack part1 "${PART1[@]}"
  pack part2 "${PART2[@]}"
else
  rm -rf "$W/part2" "$W/build/part2.list"
fi

echo "== sizes"
du -b "$W"/dl/*.whl "$SLIM" | sort -n | awk '{printf "%8.1f MiB  %s\n", $1/1048576, $2}' | sed "s|$ROOT/||" | tail -12
echo "wheels: $(ls "$W"/dl/*.whl | wc -l) files"
for p in part1 part2; do
  [ -d "$W/$p" ] || continue
  du -b "$W/$p"/* | awk '{printf "%8.1f MiB  %s  (carry)\n", $1/1048576, $2}' | sed "s|$ROOT/||"
done
tree_kib=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
echo "working tree that travels anyway: $((tree_kib / 1024)) KiB"
