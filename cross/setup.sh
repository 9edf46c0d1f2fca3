#!/usr/bin/env bash
# Installs what the aarch64 cross build and its emulated tests need, by package name.
# Idempotent: packages already present are left alone. Needs root (apt-get) on Debian 12.
#
#   Debian packages
#     rustc-web, libstd-rust-web-dev:arm64   a rustc (/usr/bin/rustc) with the aarch64 std
#     gcc-aarch64-linux-gnu                  links the test binaries
#     qemu-user, libc6:arm64                 runs them (multiarch glibc, no sysroot flag)
#     binutils                               readelf, for the glibc-floor check
#   PyPI, into the project venv (.cache/venv)
#     ziglang, cargo-zigbuild                link the release binary against glibc 2.31 symbols
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.cache/venv}

need=()
dpkg --print-foreign-architectures | grep -qx arm64 || { echo "adding the arm64 architecture to dpkg"; dpkg --add-architecture arm64; need_update=1; }
for p in rustc-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu qemu-user libc6:arm64 binutils; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ] || [ -n "${need_update:-}" ]; then
    echo "installing ${need[*]:-nothing new} (apt)"
    apt-get update -qq
    [ ${#need[@]} -gt 0 ] && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
if [ ! -x "$VENV/bin/cargo-zigbuild" ]; then
    echo "installing ziglang and cargo-zigbuild (pip, into $VENV)"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check ziglang cargo-zigbuild
fi
/usr/bin/rustc --version
"$VENV/bin/cargo-zigbuild" --version
echo "cross toolchain ready"
