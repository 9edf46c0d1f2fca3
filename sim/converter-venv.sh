#!/usr/bin/env bash
# The converter's venv (.cache/bmodel-venv, ignored): the compile tools' venv (sim/venv.sh, a
# hard-linked copy) plus torch as tpu-mlir 1.30.2 pins it, which llm_convert.py's model code
# and llama.cpp's convert_hf_to_gguf.py need. Made once, under a lock: `make sim` (through
# sim/bmodel.sh) and `make toy-gguf` may ask for it at the same time. Prints its python.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.cache/bmodel-venv
PY=$(SIM_VENV=$VENV sim/venv.sh)
exec 9>"$VENV.torch.lock"
flock 9
"$PY" -c "import torch" 2>/dev/null \
    || "$(dirname "$PY")/pip" install --quiet --no-cache-dir torch==2.11.0 sentencepiece accelerate >&2 \
    || { echo "cannot install torch into $VENV from PyPI (network?)" >&2; exit 1; }
echo "$PY"
