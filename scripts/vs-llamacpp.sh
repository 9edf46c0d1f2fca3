#!/usr/bin/env bash
# llama-tpu's CPU backend against llama.cpp on this machine, in one run.
#
#   scripts/vs-llamacpp.sh [THREADS] [ROUNDS] [BUILDS]
#
# (defaults: 2 threads, 3 rounds, BUILDS "Q4_1 Q4_0 Q5_0 Q8_0 F16 Q4_K_M")
#
# Builds llama.cpp's llama-bench, llama-quantize and llama-server once (the tree
# llama-cpp-python 0.3.36 vendors, from its PyPI source package; native CPU flags, AMX off:
# VMs that advertise AMX without enabling it crash in its AMX kernel) into ~/.cache/llama-tpu
# (LLAMACPP_BUILD_ONLY=1: only that, for scripts/vs-llamacpp-parallel.sh), makes Q4_0, Q5_0,
# Q8_0, F16 and Q4_K_M builds of the default model with its llama-quantize (requantized from
# the Q4_1 file: the same network, for speed, not quality), then for each build alternates `llama-tpu bench` and
# `llama-bench` (pp512, tg128, one repetition each) for ROUNDS rounds and prints the medians
# and their ratios. Needs cmake and a C++ compiler; takes ~15 minutes cold on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${1:-2}
ROUNDS=${2:-3}
BUILDS=${3:-Q4_1 Q4_0 Q5_0 Q8_0 F16 Q4_K_M}
MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
SDIST=llama_cpp_python-0.3.36.tar.gz
SDIST_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/llama-tpu
CPP=$CACHE/llama.cpp-0.3.36
BIN=target/release/llama-tpu

stage() { echo "== $* ($(date +%T))" >&2; }

[ -f "$MODEL" ] || make --no-print-directory model >&2
[ -x "$BIN" ] || cargo build --release >&2
mkdir -p "$CACHE"
# llama.cpp's tools, built in place in $CPP/build; a target missing from an existing tree
# (llama-server, in caches made before vs-llamacpp-parallel.sh) is built into it.
missing=$(for t in llama-bench llama-quantize llama-server; do [ -x "$CPP/build/bin/$t" ] || echo "$t"; done)
if [ -n "$missing" ]; then
    stage "building $(echo $missing) of llama.cpp from $SDIST"
    if [ ! -f "$CPP/CMakeLists.txt" ]; then
        sdist=$(python3 scripts/pypi_fetch.py llama-cpp-python "$SDIST" "$SDIST_SHA256" .cache/pip)
        rm -rf "$CPP" "$CPP.tmp"
        mkdir -p "$CPP.tmp"
        tar -xzf "$sdist" -C "$CPP.tmp" --strip-components=3 llama_cpp_python-0.3.36/vendor/llama.cpp
        mv "$CPP.tmp" "$CPP"
    fi
    # Trees built by this script's earlier versions were configured in $CPP.tmp, then moved:
    # cmake will not reconfigure those in place.
    grep -qxF "CMAKE_CACHEFILE_DIR:INTERNAL=$CPP/build" "$CPP/build/CMakeCache.txt" 2>/dev/null || rm -rf "$CPP/build"
    # No web UI for llama-server: it would be fetched from Hugging Face or built with npm.
    no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    cmake -S "$CPP" -B "$CPP/build" -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF \
        -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_C_FLAGS="$no_amx" -DCMAKE_CXX_FLAGS="$no_amx" >&2
    cmake --build "$CPP/build" -j "$(nproc)" --target $missing >&2
fi
# vs-llamacpp-parallel.sh wants only the builds above.
[ -z "${LLAMACPP_BUILD_ONLY:-}" ] || exit 0

# The builds, made once per model file.
sum=$(sha256sum "$MODEL" | cut -c1-12)
declare -A FILE=([Q4_1]=$MODEL)
for q in Q4_0 Q5_0 Q8_0 F16 Q4_K_M; do
    out=$CACHE/smollm2-$sum-$q.gguf
    if [ ! -f "$out" ]; then
        stage "quantizing $q"
        "$CPP/build/bin/llama-quantize" --allow-requantize "$MODEL" "$out.tmp" "$q" "$THREADS" >/dev/null 2>&1
        mv "$out.tmp" "$out"
    fi
    FILE[$q]=$out
done

# One figure: tokens/s of test pp512 or tg128 by one tool, one repetition.
ours() { # file test
    local args=(-p 512 -n 0)
    [ "$2" = tg128 ] && args=(-p 0 -n 128)
    "$BIN" bench -m "$1" -t "$THREADS" -r 1 "${args[@]}" 2>/dev/null | awk -F'|' -v t="$2" '$6 ~ t { split($7, a, " "); print a[1] }'
}
theirs() {
    local args=(-p 512 -n 0)
    [ "$2" = tg128 ] && args=(-p 0 -n 128)
    "$CPP/build/bin/llama-bench" -m "$1" -t "$THREADS" -r 1 "${args[@]}" -o csv 2>/dev/null |
        python3 -c 'import csv,sys; print(list(csv.DictReader(sys.stdin))[-1]["avg_ts"])'
}
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

stage "$ROUNDS rounds, $THREADS threads, on $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
echo "| model | test | llama-tpu t/s | llama.cpp t/s | ratio |"
echo "| --- | --- | ---: | ---: | ---: |"
for q in $BUILDS; do
    for t in pp512 tg128; do
        a=() b=()
        for _ in $(seq "$ROUNDS"); do
            a+=("$(ours "${FILE[$q]}" $t)")
            b+=("$(theirs "${FILE[$q]}" $t)")
        done
        ma=$(median "${a[@]}") mb=$(median "${b[@]}")
        printf '| %s | %s | %.1f | %.1f | %.2fx |\n' "$q" "$t" "$ma" "$mb" "$(awk -v a="$ma" -v b="$mb" 'BEGIN { print a / b }')"
    done
done
