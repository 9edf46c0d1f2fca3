#!/usr/bin/env bash
# Builds the toy Llama bmodels the simulator tests use into .cache/toy (ignored), once per
# version of the generators, each with the producer users get theirs from (sim/toy_model.py
# says net by net which vendor file each layout reproduces):
#   toy_llmtpu_f16.bmodel   LLM-TPU's Llama2 export_onnx.py + compile.sh (f16, MHA, greedy_head
#                           and penalty_sample_head, every net in the default address mode)
#   toy_l2t_f16.bmodel      the original Llama2-TPU export (f32 hidden states, f16 K/V, 1-D ids,
#                           lm_head returning the token)
#   toy_sd_bf16.bmodel      the same built as sophon-demo does (bf16 K/V, one two-stage embedding)
#   toy_conv_*.bmodel       tpu-mlir 1.30.2's llm_convert.py (what `make bmodel` runs) on the Hugging
#                           Face checkpoints hf_kv2 (float16) and hf_kv4_bf16 (bfloat16):
#     conv_f16_sample  -q f16 --do_sample                       (GQA; greedy_head, sample_head)
#     conv_bf16        -q bf16                                  (MHA; lm_head returns the token)
#     conv_f16_dyn     -q f16 --do_sample --dynamic             (prefill of the prompt's real length)
#     conv_f16_hist    -q f16 --do_sample --use_block_with_kv   (chunked prefill after history)
#     conv_qwen2_f16_sample  -q f16 --do_sample on hf_qwen2 (Q/K/V biases)
#     conv_qwen3_f16         -q f16 on hf_qwen3 (per-head Q/K norms, 8 query heads of 16 on hidden 64)
# with toy_kv2.gguf / toy_kv4.gguf (GQA / MHA: the same weights), toy_qwen2.gguf, toy_qwen3.gguf for the CPU backend; and in
# the shapes real models have (sim/w4_model.py: SEQLEN 512, head_dim 128, GQA), quantized to
# int4 by the compiler as sophon-demo and LLM-TPU users run them, each in a folder of its own
# with what the converter wrote beside it and the CPU's GGUF of the compiler's own int4 weights
# (dequantized from what --debug keeps; also two wrong readings of them, for the tests):
#   w4f16/   -q w4f16 --q_group_size 64 --do_sample --use_block_with_kv
#   w4bf16/  -q w4bf16 --q_group_size 64 --do_sample --use_block_with_kv --embedding_disk
#            (no embedding nets: config/embedding.bin beside the bmodel)
#   qwen2_w4f16/  -q w4f16 --q_group_size 64 on hf_w4_qwen2, SEQLEN 128
#   qwen3_w4f16/  -q w4f16 --q_group_size 64 --do_sample --use_block_with_kv on hf_w4_qwen3 (4 query heads of 128 on hidden 256)
# Prints the folder. Fails loudly.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
PY=$(sim/venv.sh)
OUT=.cache/toy
mkdir -p "$OUT"
exec 9>.cache/toy.lock
flock 9
STAMP=$(cat sim/toy.sh sim/toy_model.py sim/w4_model.py sim/run_tool.py sim/bmodel.sh sim/stand-in/torch/__init__.py | sha256sum | cut -c1-16)
if [ "$(cat "$OUT/.stamp" 2>/dev/null)" != "$STAMP" ]; then
    rm -rf "$OUT/.stamp" "$OUT"/*.bmodel "$OUT/w4f16" "$OUT/w4bf16" "$OUT/qwen2_w4f16" "$OUT/qwen3_w4f16"
    # A failed attention-kernel build is remembered by the compiler (~/.ppl/cache/flag.txt)
    # and makes later builds fail too: start clean after one.
    if ! "$PY" sim/toy_model.py "$OUT" llmtpu_f16:llmtpu:f16:4 l2t_f16:l2t:f16:4 sd_bf16:sd:bf16:4 >&2; then
        rm -f "$HOME/.ppl/cache/flag.txt" /tmp/ppl_*.lock
        echo "the toy bmodels did not compile (logs under $OUT/work); the compiler's failure flag was cleared, try again" >&2
        exit 1
    fi
    convert() {
        local name=$1 checkpoint=$2 quant=$3
        shift 3
        local dir=$OUT/work/$name
        rm -rf "$dir"
        if ! sim/bmodel.sh "$OUT/$checkpoint" 32 "$quant" "$dir" "$@" > "$OUT/work/$name.log" 2>&1; then
            tail -40 "$OUT/work/$name.log" >&2
            echo "llm_convert.py failed for $name (log $OUT/work/$name.log)" >&2
            exit 1
        fi
        mv "$dir"/*.bmodel "$OUT/toy_$name.bmodel"
    }
    convert conv_f16_sample hf_kv2 f16 --do_sample
    convert conv_bf16 hf_kv4_bf16 bf16
    convert conv_f16_dyn hf_kv2 f16 --do_sample --dynamic
    convert conv_f16_hist hf_kv2 f16 --do_sample --use_block_with_kv
    convert conv_qwen2_f16_sample hf_qwen2 f16 --do_sample
    convert conv_qwen3_f16 hf_qwen3 f16
    "$PY" sim/w4_model.py checkpoints "$OUT" >&2
    w4() {
        local name=$1 checkpoint=$2 quant=$3
        shift 3
        local dir=$OUT/work/$name
        rm -rf "$dir"
        if ! sim/bmodel.sh "$OUT/$checkpoint" "$seq" "$quant" "$dir" --q_group_size 64 --debug "$@" > "$OUT/work/$name.log" 2>&1; then
            tail -40 "$OUT/work/$name.log" >&2
            echo "llm_convert.py failed for $name (log $OUT/work/$name.log)" >&2
            exit 1
        fi
        mkdir -p "$OUT/$name"
        mv "$dir"/*.bmodel "$OUT/$name/toy_$name.bmodel"
        cp "$OUT/tokenizer.json" "$OUT/$name/"
        if [ -e "$dir/config/embedding.bin" ]; then
            mkdir -p "$OUT/$name/config"
            mv "$dir/config/embedding.bin" "$OUT/$name/config/"
        fi
        # The converter's work folder (its name says the build: model_quant_seq..._dynamic).
        local work
        work=$(find "$dir" -mindepth 1 -maxdepth 1 -type d ! -name config | head -1)
        "$PY" sim/w4_model.py dequantize "$work" "$quant" "$OUT/$name/toy_$name.gguf" --arch "$arch"
        if [ "$arch" = llama ]; then
            "$PY" sim/w4_model.py dequantize "$work" "$quant" "$OUT/$name/wrong_group.gguf" --group 128
            "$PY" sim/w4_model.py dequantize "$work" "$quant" "$OUT/$name/wrong_zero_point.gguf" --swap-zero-point
        fi
    }
    arch=llama seq=512
    w4 w4f16 hf_w4 w4f16 --do_sample --use_block_with_kv
    w4 w4bf16 hf_w4_bf16 w4bf16 --do_sample --use_block_with_kv --embedding_disk
    # Qwen2 and Qwen3 (issue 25): each architecture, quantization and head kind once (f16 with
    # --do_sample and without, W4F16 the other way round): --do_sample changes only the head
    # nets after lm_head, the architecture only what is inside the block nets. The static
    # Qwen2 one at SEQLEN 128: the simulator prefills every position of a static build.
    arch=qwen2 seq=128
    w4 qwen2_w4f16 hf_w4_qwen2 w4f16
    arch=qwen3 seq=512
    w4 qwen3_w4f16 hf_w4_qwen3 w4f16 --do_sample --use_block_with_kv
    rm -rf "$OUT/work"
    echo "$STAMP" > "$OUT/.stamp"
    echo "toy bmodels built in $(( $(date +%s) - start )) s" >&2
fi
echo "$OUT"
