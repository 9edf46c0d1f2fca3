#!/usr/bin/env bash
# The vendor's compile tools (model_transform.py, model_deploy.py, model_tool) need Python 3.10:
# makes .cache/sim-venv (ignored) from pyenv's 3.10.13 (or $PYTHON310), once, with the
# tpu-mlir wheel that sim/install.sh fetched and the versions seen working together (see
# ../shared design notes: onnxruntime_extensions imports transformers, which works without
# torch; protobuf is re-pinned after it). Prints the venv's python. Fails loudly.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SIM_VENV:-.cache/sim-venv}
sim/install.sh >/dev/null
exec 9>"$VENV.lock"
flock 9
if [ ! -e "$VENV/.done" ]; then
    PY=${PYTHON310:-}
    if [ -z "$PY" ]; then
        root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
        PY=$root/versions/3.10.13/bin/python3.10
    fi
    [ -x "$PY" ] || { echo "Python 3.10 not found at $PY (the vendor's tools need exactly 3.10; set PYTHON310)" >&2; exit 1; }
    command -v cmake >/dev/null || { echo "cmake is missing (apt-get install cmake): the compiler JIT-builds its attention kernel with it" >&2; exit 1; }
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    pip() { "$VENV/bin/pip" --quiet --disable-pip-version-check "$@"; }
    pip install --no-deps .cache/pip/tpu_mlir-1.30.2-py3-none-any.whl >&2
    # transformers brings tokenizers (the toy's tokenizer.json); gguf writes the toy's GGUF.
    pip install numpy==1.24.4 tqdm==4.70.1 filelock==4.1.0 psutil==7.2.2 pillow==12.3.0 \
        opencv-python-headless==4.8.1.78 flatbuffers==25.12.19 plotly==5.15.0 \
        onnx==1.14.1 onnxruntime==1.16.3 onnxsim==0.4.17 onnxruntime_extensions==0.14.0 \
        transformers==5.6.2 tokenizers==0.22.2 gguf==0.19.0 >&2 \
        || { echo "cannot install the compile tools' Python packages from PyPI (network?)" >&2; exit 1; }
    pip install protobuf==3.20.3 >&2
    touch "$VENV/.done"
fi
echo "$VENV/bin/python"
