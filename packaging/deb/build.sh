#!/bin/sh
# Builds llama-tpu_<version>_<arch>.deb from a built binary with dpkg-deb (no debhelper
# needed): the binary, the systemd units, the default configuration as a conffile, the
# sysusers file, the README and docs/, and maintainer scripts that create the system user and
# enable (not start) the units.
# Usage: build.sh ARCH BINARY VERSION OUTDIR
set -eu
arch=$1 binary=$2 version=$3 out=$4
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

install -Dm755 "$binary" "$stage/usr/bin/llama-tpu"
install -Dm644 "$top/systemd/llama-tpu.service" "$stage/lib/systemd/system/llama-tpu.service"
install -Dm644 "$top/systemd/llama-tpu.socket" "$stage/lib/systemd/system/llama-tpu.socket"
install -Dm644 "$top/systemd/llama-tpu.sysusers" "$stage/usr/lib/sysusers.d/llama-tpu.conf"
install -Dm644 "$top/systemd/llama-tpu-http.conf" "$stage/usr/share/llama-tpu/llama-tpu-http.conf"
install -Dm644 "$top/systemd/llama-tpu.toml" "$stage/etc/llama-tpu/llama-tpu.toml"
# The README and every page of docs/ (with the images they show), side by side.
install -Dm644 "$top/README.md" "$stage/usr/share/doc/llama-tpu/README.md"
for doc in "$top"/docs/*.md "$top"/docs/*.png; do
    if [ -e "$doc" ]; then install -m644 "$doc" "$stage/usr/share/doc/llama-tpu/"; fi
done
install -Dm644 "$here/copyright" "$stage/usr/share/doc/llama-tpu/copyright"
printf 'llama-tpu (%s) unstable; urgency=medium\n\n  * Release %s.\n\n -- llama-tpu developers <maintainers@llama-tpu.example.org>  %s\n' \
    "$version" "$version" "$(date -R -d @"${SOURCE_DATE_EPOCH:-$(git -C "$top" log -1 --format=%ct 2>/dev/null || date +%s)}")" \
    | gzip -9n > "$stage/usr/share/doc/llama-tpu/changelog.gz"
chmod 644 "$stage/usr/share/doc/llama-tpu/changelog.gz"

# The newest glibc symbol version the binary needs is its libc6 dependency.
glibc=$(readelf -V "$binary" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -1)
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
mkdir -p "$stage/DEBIAN"
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" -e "s/@GLIBC@/$glibc/" \
    "$here/control.in" > "$stage/DEBIAN/control"
echo /etc/llama-tpu/llama-tpu.toml > "$stage/DEBIAN/conffiles"
for s in postinst prerm postrm; do install -m755 "$here/$s" "$stage/DEBIAN/$s"; done

mkdir -p "$out"
deb="$out/llama-tpu_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
echo "$deb"
