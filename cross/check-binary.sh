#!/usr/bin/env bash
# Checks that an aarch64 llama-tpu binary runs on the BM1684X SoC's Ubuntu 20.04: no glibc
# symbol newer than 2.31, and no shared library beyond glibc's own (everything else is linked
# in; the vendor runtime is loaded at run time with dlopen, never linked), and a size limit.
# Prints size and startup time under qemu.
set -euo pipefail
bin=${1:?usage: check-binary.sh BINARY}
floor=2.31
allowed="libc.so.6 libm.so.6 libpthread.so.0 libdl.so.2 librt.so.1 libutil.so.1 ld-linux-aarch64.so.1"

readelf -h "$bin" | grep -q 'Machine:.*AArch64' || { echo "FAIL: $bin is not an aarch64 binary"; exit 1; }
status=0
for lib in $(readelf -d "$bin" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p'); do
    case " $allowed " in
        *" $lib "*) echo "ok: needs $lib" ;;
        *) echo "FAIL: needs $lib, which is not part of glibc"; status=1 ;;
    esac
done
newest=$(readelf -V --wide "$bin" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -1)
if [ "$(printf '%s\n%s\n' "$newest" "$floor" | sort -V | tail -1)" != "$floor" ]; then
    echo "FAIL: needs GLIBC_$newest, newer than the boards' $floor"; status=1
else
    echo "ok: newest glibc symbol version GLIBC_$newest (floor $floor)"
fi
# The release binary's size, held under a limit (docs/performance.md, "Binary size": what it
# costs and why it is not 3 MiB). A change that grows it on purpose raises the limit and says
# by how much there.
limit=${LLAMA_TPU_SIZE_LIMIT:-5600000}
size=$(stat -c %s "$bin")
if [ "$size" -gt "$limit" ]; then
    echo "FAIL: $size bytes, above the limit of $limit"; status=1
else
    echo "ok: size $size bytes (limit $limit)"
fi
if command -v qemu-aarch64 >/dev/null; then
    start=$(date +%s%N)
    qemu-aarch64 -cpu cortex-a53 "$bin" --version
    echo "startup (--version) under qemu-aarch64 -cpu cortex-a53: $(( ($(date +%s%N) - start) / 1000000 )) ms"
fi
exit $status
