#!/usr/bin/env bash
# `make bmodel`: compiles a Llama-2 checkpoint for the BM1684X with the vendor's one-step
# converter (tpu-mlir 1.30.2's llm_convert.py). `make bmodel` passes --do_sample: lm_head
# returns logits and the bmodel gets greedy_head and sample_head, so requests can sample on the
# chip. Every layout the converter makes runs (without --do_sample lm_head picks the token itself,
# greedy only; --dynamic prefills the prompt's real length; --use_block_with_kv prefills a
# new turn after the cached conversation); not --embedding_disk, one device.
#
# Usage: sim/bmodel.sh CHECKPOINT SEQ QUANT OUT_DIR [LLM_CONVERT_FLAGS...]
#   CHECKPOINT  a Hugging Face folder (config.json, *.safetensors, tokenizer.json)
#   SEQ         SEQLEN: prompt + answer tokens the bmodel holds (512 is the vendor's choice)
#   QUANT       w4f16 (7B: 3.9 GB), w4bf16, w8f16, w8bf16, f16, bf16 (a bf16 checkpoint needs a bf16 one)
#   FLAGS       further llm_convert.py flags (--do_sample, --dynamic, --use_block_with_kv)
# Needs: x86_64, Python 3.10 (pyenv's 3.10.13 or $PYTHON310), cmake, GNU parallel, network for PyPI (torch
# 2.11.0 and what tpu-mlir 1.30.2 pins, several GB with torch's CUDA wheels), and for a 7B
# model about 32 GB of RAM and an hour or more. Not run by CI (the toy bmodels of `make test`
# take the ONNX path with the same compiler instead).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 4 ] || { sed -n '9,14p' "$0" >&2; exit 2; }
CHECKPOINT=$1 SEQ=$2 QUANT=$3 OUT=$4
shift 4
FLAGS=("$@")
[ -e "$CHECKPOINT/config.json" ] || { echo "$CHECKPOINT: not a Hugging Face checkpoint folder (no config.json)" >&2; exit 2; }
command -v parallel >/dev/null || { echo "GNU parallel is missing (apt-get install parallel): llm_convert.py runs its compile jobs with it" >&2; exit 1; }
# A venv of its own with torch (the converter's model code is torch code): torch stays out of
# the one the tests use.
PY=$(sim/converter-venv.sh)
TPUC=$("$PY" -c "import os, tpu_mlir; print(os.path.dirname(tpu_mlir.__file__))")
# llm_convert.py starts model_deploy.py and tpuc-opt in jobs of its own, each of which puts the
# wheel's bundled glibc 2.35 first on LD_LIBRARY_PATH again (and crashes: "stack smashing
# detected"): in this venv the bundled copies go, so everything uses the system's glibc.
rm -f "$TPUC"/lib/third_party/{libc.so.6,libm.so.6,libpthread.so.0}
LIBC=$(pwd)/.cache/system-libc
mkdir -p "$LIBC"
for lib in libc.so.6 libm.so.6 libpthread.so.0; do
    ln -sf "$(ldconfig -p | awk -v l="$lib" '$1 == l && /x86-64/ { print $NF; exit }')" "$LIBC/$lib"
done
# The jobs start the tools by their #!/usr/bin/env python3 line: this venv's python first.
export PATH="$(cd "$(dirname "$PY")" && pwd):$PATH"
SYSTEM_LIBC_DIR=$LIBC "$PY" sim/run_tool.py "$TPUC/python/tools/llm_convert.py" \
    -m "$CHECKPOINT" -s "$SEQ" -q "$QUANT" -c bm1684x ${FLAGS[@]+"${FLAGS[@]}"} -o "$OUT"
# The bmodel holds no vocabulary: the tokenizer (and its chat template) go beside it.
for f in tokenizer.json tokenizer_config.json; do
    [ -e "$CHECKPOINT/$f" ] && cp "$CHECKPOINT/$f" "$OUT/"
done
echo "bmodel(s) in $OUT:" && ls "$OUT"/*.bmodel
echo "check one with: llama-tpu info $OUT/<name>.bmodel (on the BM1684X, or here with --sophon-lib $(pwd)/.cache/tpu-mlir/tpu_mlir/lib if it fits the simulator's memory)"
