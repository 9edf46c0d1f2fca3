#!/usr/bin/env bash
# The vendor's compile tools (model_transform.py, model_deploy.py, model_tool) need Python 3.10:
# makes .cache/sim-venv (ignored) from pyenv's 3.10.13 (or $PYTHON310), once, with the
# tpu-mlir wheel that sim/install.sh fetched and the versions seen working together (see
# ../shared design notes: onnxruntime_extensions imports transformers, which works without
# torch; protobuf is re-pinned after it). Prints the venv's python. Fails loudly.
#
# SIM_VENV names another venv to make (sim/bmodel.sh's, which adds torch): it starts as a copy of
# this one made of hard links, so the 1.7 GB of compile tools are on disk once. Nothing edits a
# venv's files in place (pip and Python replace files), so the copies cannot change each other;
# the scripts in bin/ name their venv's python and are rewritten.
# pip keeps no cache (--no-cache-dir): torch's CUDA wheels alone would leave 3 GB behind.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=.cache/sim-venv
VENV=${SIM_VENV:-$BASE}
sim/install.sh >/dev/null
if [ "$VENV" != "$BASE" ] && [ ! -e "$VENV/.done" ]; then
    SIM_VENV=$BASE "$0" >/dev/null
    exec 9>"$VENV.lock"
    flock 9
    if [ ! -e "$VENV/.done" ]; then
        rm -rf "$VENV" "$VENV.part"
        # A filesystem without hard links gets a plain copy (1.7 GB more).
        cp -al "$BASE" "$VENV.part" 2>/dev/null || { rm -rf "$VENV.part"; cp -a "$BASE" "$VENV.part"; }
        rm -f "$VENV.part/.done"
        from=$(cd "$BASE" && pwd) to=$(pwd)/$VENV
        { grep -lIF "$from" "$VENV.part"/bin/* || true; } | while read -r script; do
            sed -i "s#$from#$to#g" "$script"
        done
        mv "$VENV.part" "$VENV"
        touch "$VENV/.done"
    fi
    echo "$VENV/bin/python"
    exit 0
fi
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
    pip() { "$VENV/bin/pip" --quiet --disable-pip-version-check --no-cache-dir "$@"; }
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
