#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 60) with AFL++ through cargo-afl, two at a
# time (CI has two cores), from the seed corpus in fuzz/corpus; findings go to
# .cache/fuzz/<target>/ (ignored). Fails, naming the target and the crashing input, if any
# target found a crash or a hang, and prints each finding with its panic. Prints each target's
# executions and paths found.
#   fuzz/run.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")"
SECONDS_EACH=${1:-60}
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(framing protocol serial_editor gguf tokenizer_files contract http_head openai tool_calls ollama schema)
command -v cargo-afl >/dev/null || cargo install --quiet --locked cargo-afl@0.18.2
# AFL++ itself, built once per machine by cargo-afl (under ~/.local/share/afl.rs).
cargo afl config --build >/dev/null 2>&1 || true
start=$(date +%s)
cargo afl build --release --quiet
echo "== fuzz targets built in $(( $(date +%s) - start )) s"
OUT=../.cache/fuzz
mkdir -p "$OUT"
# No UI; do not insist on the machine's core_pattern and CPU governor settings.
export AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_AFFINITY=1
run() {
    local t=$1
    rm -rf "$OUT/$t"
    cargo afl fuzz -i "corpus/$t" -o "$OUT/$t" -V "$SECONDS_EACH" -- "target/release/$t" \
        > "$OUT/$t.log" 2>&1 || { tail -20 "$OUT/$t.log"; echo "fuzz $t: afl-fuzz failed"; return 1; }
}
pids=()
for t in "${TARGETS[@]}"; do
    run "$t" &
    pids+=($!)
    if [ ${#pids[@]} -ge 2 ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
done
for p in "${pids[@]}"; do wait "$p"; done
status=0
for t in "${TARGETS[@]}"; do
    stats=$OUT/$t/default/fuzzer_stats
    execs=$(awk -F': *' '/^execs_done/ {print $2}' "$stats")
    paths=$(awk -F': *' '/^corpus_count/ {print $2}' "$stats")
    crashes=$(awk -F': *' '/^saved_crashes/ {print $2}' "$stats")
    hangs=$(awk -F': *' '/^saved_hangs/ {print $2}' "$stats")
    echo "fuzz $t: ${SECONDS_EACH} s, $execs executions, $paths inputs in the corpus, $crashes crashes, $hangs hangs"
    if [ "$crashes" != 0 ] || [ "$hangs" != 0 ]; then
        # The findings themselves, so that a CI log alone says what to mend: the first inputs
        # (cat -v, cut at 600 bytes) and, for a crash, the target's panic replayed.
        shown=0
        for f in "$OUT/$t/default/crashes"/id* "$OUT/$t/default/hangs"/id*; do
            [ -e "$f" ] || continue
            # Findings are mostly one fault mutated: the first three are enough to read.
            if [ $((shown += 1)) -gt 3 ]; then
                echo "-- and $((crashes + hangs - 3)) more in $OUT/$t/default"
                break
            fi
            echo "-- $f ($(wc -c < "$f") bytes):"
            head -c 600 "$f" | cat -v; echo
            case $f in
            */crashes/*)
                replay=$(timeout 10 "target/release/$t" < "$f" 2>&1 >/dev/null) || true
                grep -a -A4 -m1 panicked <<< "$replay" || true ;;
            esac
        done
        status=1
    fi
done
exit $status
