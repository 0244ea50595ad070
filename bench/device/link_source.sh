#!/usr/bin/env bash
# Makes this checkout importable as the installed package on the GPU machine, without pip:
# SRC/tangram_sglang mirrors pyproject's package-dir mapping (kernels/, patches/,
# profiles/ become tangram_sglang.kernels, .patches, .profiles) with symlinks, and a
# dist-info beside it carries the version and the `sglang.srt.plugins` entry point, so
# SGLang loads our plugin in every process it spawns. Prints the `export` line to eval:
#     eval "$(bash bench/device/link_source.sh)"
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
SRC=${TANGRAM_SRC:-/tmp/tangram-src}
rm -rf "$SRC" && mkdir -p "$SRC/tangram_sglang"
for f in "$REPO"/tangram_sglang/*; do ln -s "$f" "$SRC/tangram_sglang/"; done
for d in kernels patches profiles; do ln -s "$REPO/$d" "$SRC/tangram_sglang/$d"; done
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$REPO/pyproject.toml" | head -1)
info="$SRC/tangram_sglang-$version.dist-info"
mkdir -p "$info"
printf 'Metadata-Version: 2.1\nName: tangram-sglang\nVersion: %s\n' "$version" > "$info/METADATA"
# The entry points, as pyproject declares them.
{
  echo "[sglang.srt.plugins]"
  sed -n '/^\[project.entry-points."sglang.srt.plugins"\]/,/^\[/p' "$REPO/pyproject.toml" |
    grep -E '^[a-z_]+ *=' | tr -d '"'
} > "$info/entry_points.txt"
echo "linked $REPO -> $SRC (tangram-sglang $version)" >&2
echo "export PYTHONPATH=$SRC\${PYTHONPATH:+:\$PYTHONPATH}"
