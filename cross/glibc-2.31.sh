#!/usr/bin/env bash
# Unpacks the glibc the boards run (Ubuntu 20.04 has 2.31; Debian bullseye's libc6:arm64
# 2.31-13 is the same release) into .cache/glibc-2.31-arm64, for `qemu-aarch64 -L`. The
# package is pinned by file name and SHA-256. Prints the folder.
set -euo pipefail
cd "$(dirname "$0")/.."
DEB=libc6_2.31-13+deb11u11_arm64.deb
URL=http://deb.debian.org/debian/pool/main/g/glibc/$DEB
SHA256=baaa9aa184e2f21738c5819055e6740cc5b22f198e3f416e33f82b40ff6933d8
DIR=.cache/glibc-2.31-arm64
if [ ! -e "$DIR/.done" ]; then
    mkdir -p .cache
    curl -sSf -o ".cache/$DEB" "$URL" || { echo "cannot download $URL" >&2; exit 1; }
    echo "$SHA256  .cache/$DEB" | sha256sum --check --quiet
    rm -rf "$DIR" && mkdir -p "$DIR"
    dpkg-deb -x ".cache/$DEB" "$DIR"
    touch "$DIR/.done"
fi
echo "$DIR"
