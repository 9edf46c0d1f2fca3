#!/usr/bin/env bash
# `make sim-real`: the default model on the simulated BM1684X, end to end, on demand (not CI):
#  1. SmolLM2-135M-Instruct's GGUF made into a Hugging Face checkpoint (float16, the GGUF's
#     vocabulary as tokenizer.json, Q/K rows un-permuted) and an F16 GGUF of the same numbers
#     (sim/real_model.py);
#  2. the checkpoint compiled by the vendor's llm_convert.py: -q f16 -s 32 --do_sample (the
#     chat prompt is 16 tokens and the answer 8: SEQLEN 32 holds both; static prefill);
#  3. the same checkpoint quantized by the compiler (-q w4f16 --q_group_size 64 --debug, what
#     users run), and a GGUF of the compiler's own int4 weights, dequantized (sim/real_model.py
#     --w4);
#  4. tests/sim_real.rs: each bmodel's logits against the CPU backend's on its GGUF for the
#     prompt and 9 decoded tokens, greedy tokens equal at every step;
#  5. `llama-tpu run --backend sophon ... --chat "What is the capital of France?"` answers,
#     on each bmodel.
# Prints each stage's time. Needs what `make sim` needs; about 15 minutes here.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=.cache/real
BMODEL=$OUT/smollm2-135m-f16-seq32.bmodel
W4=$OUT/smollm2-135m-w4f16-seq32.bmodel
stage() { echo "== $1: $(( $(date +%s) - t )) s"; t=$(date +%s); }
t=$(date +%s)
make --no-print-directory model >&2
cargo build --profile test-opt --bin llama-tpu --quiet
BIN=target/test-opt/llama-tpu
PY=$(sim/venv.sh)
LIB=$(sim/install.sh)
stage "prerequisites"
if [ ! -e "$BMODEL" ]; then
    "$PY" sim/real_model.py models/SmolLM2-135M-Instruct.Q4_1.gguf "$OUT" >/dev/null
    $BIN tokenize --write-json "$OUT/hf/tokenizer.json"
    stage "checkpoint and F16 GGUF from the GGUF"
    rm -rf "$OUT/convert"
    sim/bmodel.sh "$OUT/hf" 32 f16 "$OUT/convert" --do_sample > "$OUT/convert.log" 2>&1 \
        || { tail -30 "$OUT/convert.log"; exit 1; }
    mv "$OUT"/convert/*.bmodel "$BMODEL"
    stage "llm_convert.py -q f16 -s 32 --do_sample"
fi
if [ ! -e "$W4" ] || [ ! -e "$OUT/smollm2-135m-w4f16-dequantized.gguf" ]; then
    rm -rf "$OUT/convert-w4"
    sim/bmodel.sh "$OUT/hf" 32 w4f16 "$OUT/convert-w4" --do_sample --q_group_size 64 --debug > "$OUT/convert-w4.log" 2>&1 \
        || { tail -30 "$OUT/convert-w4.log"; exit 1; }
    work=$(find "$OUT/convert-w4" -mindepth 1 -maxdepth 1 -type d ! -name config | head -1)
    "$PY" sim/real_model.py models/SmolLM2-135M-Instruct.Q4_1.gguf "$OUT" \
        --w4 "$work" w4f16 "$OUT/smollm2-135m-w4f16-dequantized.gguf" >/dev/null
    mv "$OUT"/convert-w4/*.bmodel "$W4"
    rm -rf "$OUT/convert-w4"
    stage "llm_convert.py -q w4f16 --q_group_size 64 -s 32 --do_sample, and its weights dequantized"
fi
status=0
# Each comparison takes minutes on the simulator: past the tests' usual limit for holding it.
LLAMA_TPU_SIM_TEST_LIMIT_S=3600 LLAMA_TPU_PYTHON=.cache/venv/bin/python cargo test --profile test-opt --test sim_real -- --ignored --nocapture \
    > "$OUT/compare.log" 2>&1 || status=$?
grep -aE "^(load|prompt of|step|logits compared)|panicked|left:|right:|test result" "$OUT/compare.log" || true
[ $status -eq 0 ] || { echo "sim-real: the comparison with the CPU backend failed (log $OUT/compare.log)"; exit 1; }
stage "the chip against the CPU backend"
# The simulator prints its own lines to stdout too: line-buffered (stdbuf), they arrive whole,
# after whatever part of the answer came before them, and are cut out below.
for model in "$BMODEL" "$W4"; do
    stdbuf -oL $BIN run --backend sophon --model "$model" --tokenizer "$OUT/hf/tokenizer.json" --sophon-lib "$LIB" \
        --temperature 0 --chat "What is the capital of France?" > "$OUT/run.out" 2> "$OUT/run.log"
    answer=$(python3 -c '
import re, sys
noise = re.compile(r"(\[\d+\]|begin to cmodel|mult engine|bmcpu init|Cannot open libusercpu|BMLIB Send|cmodel_deinit|_allreduce).*")
print("".join(noise.sub("", line) for line in open(sys.argv[1], errors="replace").read().split("\n")))
' "$OUT/run.out")
    echo "llama-tpu run --backend sophon --model $(basename "$model") ... --chat \"What is the capital of France?\": $answer"
    grep -a "^\[sophon\]" "$OUT/run.log" || true
    stage "llama-tpu run on the simulated chip ($(basename "$model"))"
    case "$answer" in
        *Paris*) ;;
        *) echo "sim-real: the answer does not name Paris"; exit 1 ;;
    esac
done
echo "sim-real: ok"
