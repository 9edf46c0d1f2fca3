#!/usr/bin/env bash
# make toy-gguf: toy checkpoints of Qwen2, Qwen3 and Llama-3.1 converted to GGUF by llama.cpp's
# own convert_hf_to_gguf.py, for tests/arch_llamacpp.rs, into .cache/hf-toys (ignored):
#   toy_qwen2.gguf toy_qwen3.gguf toy_llama3.gguf   (F32, about 40 MB each: real vocabularies)
#
#   scripts/toy_gguf.sh SDIST SDIST_SHA256
#
# The converter, its conversion/ package, its gguf-py and the two vocabularies come from
# llama-cpp-python's sdist (the one `make test-data` fetches, which vendors llama.cpp: the same
# llama.cpp that recorded the goldens); scripts/hf_toys.py writes the Hugging Face folders
# (numpy-seeded weights, the family's tokenizer rebuilt from llama.cpp's vocabulary). The
# converter runs in the venv of the vendor's converter (sim/converter-venv.sh: its torch, no
# second one).
#
# Each GGUF must have the sha256 its golden records (tests/data/*_toy_llamacpp.json,
# gguf_sha256): the goldens hold llama.cpp's logits for exactly those files. Nothing is
# rebuilt when the files already match and the generator is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 2 ] || { sed -n '5p' "$0" >&2; exit 2; }
SDIST=$1 SDIST_SHA256=$2
OUT=.cache/hf-toys
TOYS=(qwen2 qwen3 llama3)
mkdir -p .cache
exec 9>"$OUT.lock"
flock 9

golden_sha() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["gguf_sha256"])' "tests/data/$1_toy_llamacpp.json" 2>/dev/null || echo none; }
# Every toy's file has its golden's sha256 (prints what differs).
check() {
    local bad=0 t want got
    for t in "${TOYS[@]}"; do
        want=$(golden_sha "$t")
        got=$(sha256sum "$OUT/toy_$t.gguf" 2>/dev/null | cut -c1-64 || true)
        if [ "$want" != "$got" ]; then
            [ "${1:-}" = quiet ] || echo "toy-gguf: $OUT/toy_$t.gguf has sha256 ${got:-(missing)}, tests/data/${t}_toy_llamacpp.json records $want" >&2
            bad=1
        fi
    done
    return $bad
}
STAMP=$(cat scripts/toy_gguf.sh scripts/hf_toys.py | sha256sum | cut -c1-16)-$SDIST_SHA256
if [ "$(cat "$OUT/.stamp" 2>/dev/null)" = "$STAMP" ] && check quiet; then
    echo "toy-gguf: $OUT/toy_{$(IFS=,; echo "${TOYS[*]}")}.gguf are up to date"
    exit 0
fi

# The venv first (it may be `make sim` making it beside us): the time printed is the conversion's.
PY=$(sim/converter-venv.sh)
start=$(date +%s)
rm -rf "$OUT"
mkdir -p "$OUT/llama.cpp"
sdist=$(python3 scripts/pypi_fetch.py llama-cpp-python "$SDIST" "$SDIST_SHA256" .cache/pip)
tar -xzf "$sdist" -C "$OUT/llama.cpp" --strip-components=3 --wildcards \
    '*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/conversion/*' '*/vendor/llama.cpp/gguf-py/*' \
    '*/vendor/llama.cpp/models/ggml-vocab-qwen2.gguf' '*/vendor/llama.cpp/models/ggml-vocab-llama-bpe.gguf' \
    '*/vendor/llama.cpp/models/templates/Qwen-Qwen2.5-7B-Instruct.jinja' \
    '*/vendor/llama.cpp/models/templates/Qwen-Qwen3-0.6B.jinja' \
    '*/vendor/llama.cpp/models/templates/meta-llama-Llama-3.1-8B-Instruct.jinja'
# Offline: the tokenizer and the converter read only the folders given.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$PY" scripts/hf_toys.py "$OUT/llama.cpp" "$OUT/hf"
for t in "${TOYS[@]}"; do
    # The folder's name would become general.name: the converter is given one, so where the
    # folder lives changes nothing in the file.
    if ! "$PY" "$OUT/llama.cpp/convert_hf_to_gguf.py" "$OUT/hf/$t" --outtype f32 --model-name "toy-$t" \
        --outfile "$OUT/toy_$t.gguf.part" > "$OUT/convert_$t.log" 2>&1; then
        tail -30 "$OUT/convert_$t.log" >&2
        echo "toy-gguf: convert_hf_to_gguf.py failed on $OUT/hf/$t (log $OUT/convert_$t.log)" >&2
        exit 1
    fi
    mv "$OUT/toy_$t.gguf.part" "$OUT/toy_$t.gguf"
done
echo "toy-gguf: converted in $(( $(date +%s) - start )) s"
if ! check; then
    cat >&2 <<EOF
toy-gguf: the converted toys are not the files llama.cpp's logits were recorded for.
  If scripts/hf_toys.py, this script or the sdist changed on purpose, record llama.cpp's logits
  for the new files (they are kept in $OUT) and commit the goldens:
    scripts/llamacpp_golden.py ~/.cache/llama-tpu/llama.cpp-0.3.36 --toys
  (llama.cpp built as docs/development.md, "Regenerating tests/data", says). Otherwise the
  conversion is not deterministic here (another torch, numpy or safetensors in
  .cache/bmodel-venv than the goldens were made with?): compare the files' metadata with
  the gguf-py in $OUT/llama.cpp (gguf_dump.py).
EOF
    exit 1
fi
echo "$STAMP" > "$OUT/.stamp"
echo "toy-gguf: $OUT/toy_{$(IFS=,; echo "${TOYS[*]}")}.gguf have their goldens' sha256"
