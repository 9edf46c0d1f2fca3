#!/usr/bin/env bash
# llama-tpu's HTTP daemon against llama.cpp's llama-server, several streams at once.
#
#   scripts/vs-llamacpp-parallel.sh [THREADS] [ROUNDS] [CLIENTS]
#
# (defaults: 2 threads, 3 rounds, 4 clients)
#
# Builds what scripts/vs-llamacpp.sh builds (llama-tpu, llama.cpp's tools, in
# ~/.cache/llama-tpu; ~15 minutes cold on 2 cores), then for ROUNDS rounds starts each server
# in turn with CLIENTS slots of 1024 tokens and THREADS threads on the default model, waits for
# /health, runs scripts/parallel_client.py once to warm it up and once to measure, and stops
# it: only one server runs at a time. parallel_client.py streams 128 tokens to each of
# CLIENTS-1 clients from /v1/completions, and once each has its first token starts one more
# and times its first token. Prints the medians of the aggregate tokens/s (all streams) and of
# that late request's time to first token, and their ratios; each measurement's JSON line goes
# to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${1:-2}
ROUNDS=${2:-3}
CLIENTS=${3:-4}
CTX=1024    # tokens of KV cache per slot, both servers
TOKENS=128  # per answer
MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/llama-tpu
CPP=$CACHE/llama.cpp-0.3.36
BIN=target/release/llama-tpu

stage() { echo "== $* ($(date +%T))" >&2; }
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# The model, llama-tpu and llama.cpp's tools, exactly as vs-llamacpp.sh makes them.
LLAMACPP_BUILD_ONLY=1 scripts/vs-llamacpp.sh "$THREADS"

TMP=$(mktemp -d /tmp/vs-llamacpp-parallel.XXXXXX)
PID=
stop() {
    if [ -n "$PID" ]; then
        kill "$PID" 2>/dev/null || true
        wait "$PID" 2>/dev/null || true
        PID=
    fi
}
trap 'stop; rm -rf "$TMP"' EXIT
trap 'exit 130' INT TERM

# Starts one server in the background (PID), its log in $TMP/NAME.log, and waits until it is
# healthy at URL.
start() { # ours|theirs
    local port
    port=$(free_port)
    case $1 in
    ours)
        "$BIN" serve --http "127.0.0.1:$port" --model "$MODEL" --threads "$THREADS" --slots "$CLIENTS" \
            --ctx-size "$CTX" --socket "$TMP/llama-tpu.sock" >"$TMP/ours.log" 2>&1 &
        ;;
    theirs)
        # -np CLIENTS slots; -c is the whole KV cache, which llama-server splits evenly among
        # its slots when --kv-unified is off, as it is whenever -np is given (it turns it on
        # only for -np auto): one KV stream of 1024 tokens per slot, as ours. --kv-unified
        # would instead share one CLIENTS*1024 pool among them. -t also sets the prompt
        # threads (-tb defaults to it); everything else is llama-server's default.
        "$CPP/build/bin/llama-server" -m "$MODEL" -t "$THREADS" -np "$CLIENTS" -c $((CLIENTS * CTX)) \
            --host 127.0.0.1 --port "$port" >"$TMP/theirs.log" 2>&1 &
        ;;
    esac
    PID=$!
    URL=http://127.0.0.1:$port
    for _ in $(seq 600); do
        if curl -fs "$URL/health" >/dev/null 2>&1; then
            return
        fi
        if ! kill -0 "$PID" 2>/dev/null; then
            echo "$1's server exited; its log:" >&2
            cat "$TMP/$1.log" >&2
            exit 1
        fi
        sleep 0.1
    done
    echo "$1's server not healthy after 60 s; its log:" >&2
    cat "$TMP/$1.log" >&2
    exit 1
}

# One measurement of the server at URL (after one to warm it up), into TPS and TTFT; its
# JSON line to stderr.
measure() { # ours|theirs
    local line
    python3 scripts/parallel_client.py "$URL" --clients "$CLIENTS" --tokens "$TOKENS" >/dev/null || true
    line=$(python3 scripts/parallel_client.py "$URL" --clients "$CLIENTS" --tokens "$TOKENS") || {
        echo "parallel_client.py failed against $1: $line" >&2
        exit 1
    }
    echo "$line" >&2
    TPS[$1]+="$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["aggregate_tps"])' "$line") "
    TTFT[$1]+="$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["late_ttft_ms"])' "$line") "
}

stage "$ROUNDS rounds, $CLIENTS clients, $THREADS threads, on $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
declare -A TPS=([ours]= [theirs]=) TTFT=([ours]= [theirs]=)
URL=
for r in $(seq "$ROUNDS"); do
    for s in ours theirs; do
        stage "round $r: $s"
        start $s
        measure $s
        stop
    done
done

# shellcheck disable=SC2086 # word splitting of the lists is meant
{
    a_tps=$(median ${TPS[ours]}) b_tps=$(median ${TPS[theirs]})
    a_ttft=$(median ${TTFT[ours]}) b_ttft=$(median ${TTFT[theirs]})
}
stage done
echo "| server | clients | aggregate t/s (median) | TTFT of a request arriving while $((CLIENTS - 1)) stream, ms (median) |"
echo "| --- | ---: | ---: | ---: |"
printf '| llama-tpu | %s | %.1f | %.1f |\n' "$CLIENTS" "$a_tps" "$a_ttft"
printf '| llama.cpp llama-server | %s | %.1f | %.1f |\n' "$CLIENTS" "$b_tps" "$b_ttft"
# Ratios: above 1 is better for tokens/s, below 1 for the time to first token.
printf '| llama-tpu / llama.cpp | | %.2fx | %.2fx |\n' \
    "$(awk -v a="$a_tps" -v b="$b_tps" 'BEGIN { print a / b }')" "$(awk -v a="$a_ttft" -v b="$b_ttft" 'BEGIN { print a / b }')"
