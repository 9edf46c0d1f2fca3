#!/usr/bin/env bash
# `make sim-real`: real models on the simulated BM1684X, end to end, on demand (not CI): the
# default SmolLM2-135M-Instruct (a Llama) and Qwen2.5-Coder-0.5B-Instruct (a Qwen2, `make
# qwen-model`; SIM_REAL_MODELS=smollm2 or qwen25 runs one). For each:
#  1. its GGUF made into a Hugging Face checkpoint (float16, the GGUF's vocabulary as
#     tokenizer.json, a Llama's Q/K rows un-permuted, Qwen's biases) and an F16 GGUF of the
#     same numbers (sim/real_model.py);
#  2. the checkpoint compiled by the vendor's llm_convert.py: -q f16 --do_sample, SEQLEN 32 for
#     SmolLM2 (a 16-token chat prompt and an 8-token answer), 64 for Qwen2.5 (its template's
#     own system message makes the prompt 36 tokens); static prefill;
#  3. the same checkpoint quantized by the compiler (-q w4f16 --q_group_size 64 --debug, what
#     users run), and a GGUF of the compiler's own int4 weights, dequantized (sim/real_model.py
#     --w4);
#  4. tests/sim_real.rs: each bmodel's logits against the CPU backend's on its GGUF for the
#     prompt and 9 decoded tokens, greedy tokens equal at every step;
#  5. `llama-tpu run --backend sophon ... --chat "What is the capital of France?"` answers,
#     on each bmodel, naming Paris.
# Prints each stage's time. Needs what `make sim` needs; about 15 minutes here for SmolLM2.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=.cache/real
MODELS=${SIM_REAL_MODELS:-smollm2 qwen25}
stage() { echo "== $1: $(( $(date +%s) - t )) s"; t=$(date +%s); }
t=$(date +%s)
cargo build --profile test-opt --bin llama-tpu --quiet
BIN=target/test-opt/llama-tpu
PY=$(sim/venv.sh)
LIB=$(sim/install.sh)
stage "prerequisites"

# NAME GGUF SEQ TEST_FILTER: one model through steps 1-5, into $OUT/NAME.
real_model() {
    local name=$1 gguf=$2 seq=$3 filter=$4
    local dir=$OUT/$name
    local f16=$dir/$name-f16-seq$seq.bmodel w4=$dir/$name-w4f16-seq$seq.bmodel
    mkdir -p "$dir"
    if [ ! -e "$f16" ]; then
        "$PY" sim/real_model.py "$gguf" "$dir" "$name" >/dev/null
        $BIN tokenize --model "$gguf" --write-json "$dir/hf/tokenizer.json"
        stage "$name: checkpoint and F16 GGUF from the GGUF"
        rm -rf "$dir/convert"
        sim/bmodel.sh "$dir/hf" "$seq" f16 "$dir/convert" --do_sample > "$dir/convert.log" 2>&1 \
            || { tail -30 "$dir/convert.log"; exit 1; }
        mv "$dir"/convert/*.bmodel "$f16"
        rm -rf "$dir/convert"
        stage "$name: llm_convert.py -q f16 -s $seq --do_sample"
    fi
    if [ ! -e "$w4" ] || [ ! -e "$dir/$name-w4f16-dequantized.gguf" ]; then
        rm -rf "$dir/convert-w4"
        sim/bmodel.sh "$dir/hf" "$seq" w4f16 "$dir/convert-w4" --do_sample --q_group_size 64 --debug > "$dir/convert-w4.log" 2>&1 \
            || { tail -30 "$dir/convert-w4.log"; exit 1; }
        local work
        work=$(find "$dir/convert-w4" -mindepth 1 -maxdepth 1 -type d ! -name config | head -1)
        "$PY" sim/real_model.py "$gguf" "$dir" "$name" \
            --w4 "$work" w4f16 "$dir/$name-w4f16-dequantized.gguf" >/dev/null
        mv "$dir"/convert-w4/*.bmodel "$w4"
        rm -rf "$dir/convert-w4"
        stage "$name: llm_convert.py -q w4f16 --q_group_size 64 -s $seq --do_sample, and its weights dequantized"
    fi
    local status=0
    # Each comparison takes minutes on the simulator: past the tests' usual limit for holding it.
    LLAMA_TPU_SIM_TEST_LIMIT_S=7200 LLAMA_TPU_PYTHON=.cache/venv/bin/python cargo test --profile test-opt --test sim_real -- --ignored --nocapture "$filter" \
        > "$dir/compare.log" 2>&1 || status=$?
    grep -aE "^(load|prompt of|step|logits compared)|panicked|left:|right:|test result" "$dir/compare.log" || true
    [ $status -eq 0 ] || { echo "sim-real: $name: the comparison with the CPU backend failed (log $dir/compare.log)"; exit 1; }
    grep -q "test result: ok. [1-9]" "$dir/compare.log" || { echo "sim-real: $name: no comparison ran (filter $filter)"; exit 1; }
    stage "$name: the chip against the CPU backend"
    # The simulator prints its own lines to stdout too: line-buffered (stdbuf), they arrive whole,
    # after whatever part of the answer came before them, and are cut out below.
    for model in "$f16" "$w4"; do
        stdbuf -oL $BIN run --backend sophon --model "$model" --tokenizer "$dir/hf/tokenizer.json" --sophon-lib "$LIB" \
            --temperature 0 --chat "What is the capital of France?" > "$dir/run.out" 2> "$dir/run.log"
        answer=$(python3 -c '
import re, sys
noise = re.compile(r"(\[\d+\]|begin to cmodel|mult engine|bmcpu init|Cannot open libusercpu|BMLIB Send|cmodel_deinit|_allreduce).*")
print("".join(noise.sub("", line) for line in open(sys.argv[1], errors="replace").read().split("\n")))
' "$dir/run.out")
        echo "llama-tpu run --backend sophon --model $(basename "$model") ... --chat \"What is the capital of France?\": $answer"
        grep -a "^\[sophon\]" "$dir/run.log" || true
        stage "llama-tpu run on the simulated chip ($(basename "$model"))"
        case "$answer" in
            *Paris*) ;;
            *) echo "sim-real: $name: the answer does not name Paris"; exit 1 ;;
        esac
    done
}

for m in $MODELS; do
    case $m in
        smollm2)
            make --no-print-directory model >&2
            real_model smollm2-135m models/SmolLM2-135M-Instruct.Q4_1.gguf 32 smollm2 ;;
        qwen25)
            make --no-print-directory qwen-model >&2
            real_model qwen25-coder-0.5b models/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf 64 qwen25 ;;
        *) echo "SIM_REAL_MODELS: $m is not one of smollm2, qwen25" >&2; exit 2 ;;
    esac
done
echo "sim-real: ok"
