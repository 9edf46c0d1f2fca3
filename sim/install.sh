#!/usr/bin/env bash
# Installs the BM1684X simulator rig into .cache/tpu-mlir (ignored), once:
# the tpu-mlir 1.30.2 wheel from PyPI (the vendor's compiler, and x86_64 builds of libbmrt,
# libbmlib and the chip's functional simulator, libcmodel), unpacked. Prints the folder of
# the runtime libraries. Fails loudly, with the reason, when it cannot.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=1.30.2
DIR=.cache/tpu-mlir
mkdir -p .cache
# Tests run in parallel and may all ask at once: one installs, the others wait for it.
exec 9>.cache/tpu-mlir.lock
flock 9
if [ ! -e "$DIR/.done" ]; then
    [ "$(uname -m)" = x86_64 ] || { echo "the simulator is x86_64-only (this is $(uname -m))" >&2; exit 1; }
    mkdir -p .cache/pip
    WHEEL=.cache/pip/tpu_mlir-$VERSION-py3-none-any.whl
    SHA256=542807361c9eeb0777a7bd35e501d8c71cce767e4bce021a3cb3a7c25c35f909
    # A wheel left half-written by an interrupted run is fetched again.
    if [ -e "$WHEEL" ] && ! echo "$SHA256  $WHEEL" | sha256sum --check --quiet 2>/dev/null; then
        rm -f "$WHEEL"
    fi
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --python-version 3.10 \
        --only-binary=:all: "tpu-mlir==$VERSION" -d .cache/pip >&2 \
        || { echo "cannot download tpu-mlir==$VERSION from PyPI (network?)" >&2; exit 1; }
    echo "$SHA256  $WHEEL" | sha256sum --check --quiet \
        || { echo "$WHEEL: checksum mismatch" >&2; rm -f "$WHEEL"; exit 1; }
    rm -rf "$DIR" && mkdir -p "$DIR"
    python3 -c "import zipfile,sys; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$WHEEL" "$DIR"
    touch "$DIR/.done"
fi
echo "$DIR/tpu_mlir/lib"
