#!/usr/bin/env bash
# Fetch llama.cpp's own HF -> GGUF converter (convert_hf_to_gguf.py, its conversion/ package and
# the gguf-py it ships with) from the llama-cpp-python sdist on PyPI into a cache directory, for
# the tests that convert tiny transformers checkpoints (tests/reference/hf_convert.py).
# Idempotent: does nothing when the cache already holds this version.
#   DSD_CONVERTER_DIR  where to put it (default ~/.cache/dsd-converter)
set -euo pipefail
VERSION=0.3.36
DIR="${DSD_CONVERTER_DIR:-$HOME/.cache/dsd-converter}"
STAMP="$DIR/VERSION"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "llama-cpp-python $VERSION" && -f "$DIR/convert_hf_to_gguf.py" \
      && -d "$DIR/conversion" && -d "$DIR/gguf-py/gguf" ]]; then
    exit 0
fi
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$TMP"
SRC="llama_cpp_python-$VERSION/vendor/llama.cpp"
tar -xzf "$TMP/llama_cpp_python-$VERSION.tar.gz" -C "$TMP" \
    "$SRC/convert_hf_to_gguf.py" "$SRC/conversion" "$SRC/gguf-py" "$SRC/LICENSE"
mkdir -p "$DIR"
rm -rf "$DIR/conversion" "$DIR/gguf-py"
cp -r "$TMP/$SRC/convert_hf_to_gguf.py" "$TMP/$SRC/conversion" "$TMP/$SRC/gguf-py" "$TMP/$SRC/LICENSE" "$DIR/"
echo "llama-cpp-python $VERSION" > "$STAMP"
echo "llama.cpp converter (llama-cpp-python $VERSION) in $DIR"
