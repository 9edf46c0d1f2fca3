#!/bin/sh
# Checks built .deb packages: their metadata and contents (dpkg-deb --info/--contents), an
# install into a scratch root with the maintainer scripts run (dpkg --root, chrootless: the
# system user and the enabled units appear inside the root), removal and purge, and lintian.
# Usage: check.sh DEB...
set -eu
top=$(cd "$(dirname "$0")/../.." && pwd)
fail() { echo "deb check: $*" >&2; exit 1; }
host_arch=$(dpkg --print-architecture)
for deb in "$@"; do
    echo "== $deb"
    dpkg-deb --info "$deb"
    contents=$(dpkg-deb --contents "$deb")
    echo "$contents"
    for path in ./usr/bin/llama-tpu ./lib/systemd/system/llama-tpu.service ./lib/systemd/system/llama-tpu.socket \
        ./etc/llama-tpu/llama-tpu.toml ./usr/lib/sysusers.d/llama-tpu.conf ./usr/share/doc/llama-tpu/copyright \
        ./usr/share/doc/llama-tpu/README.md ./usr/share/llama-tpu/llama-tpu-http.conf; do
        echo "$contents" | grep -q " $path\$" || fail "$path missing from $deb"
    done
    # Every page of docs/ (and its images), where the units' Documentation= expects them.
    docs=0
    for doc in "$top"/docs/*.md "$top"/docs/*.png; do
        [ -e "$doc" ] || continue
        path=./usr/share/doc/llama-tpu/$(basename "$doc")
        echo "$contents" | grep -q " $path\$" || fail "$path missing from $deb"
        docs=$((docs + 1))
    done
    echo "README.md and $docs files of docs/ in /usr/share/doc/llama-tpu: ok"
    echo "$contents" | grep -q "root/root" || fail "files not owned by root"
    dpkg-deb --field "$deb" Depends | grep -q 'libc6 (>= 2.3[01])' || fail "libc6 dependency is not the 2.31 floor"
    [ "$(dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles)" = /etc/llama-tpu/llama-tpu.toml ] || fail "conffile"

    root=$(mktemp -d)
    mkdir -p "$root/var/lib/dpkg/info" "$root/var/lib/dpkg/updates" "$root/etc"
    touch "$root/var/lib/dpkg/status"
    echo "dialout:x:20:" > "$root/etc/group"
    : > "$root/etc/passwd"
    dpkg="dpkg --root=$root --force-script-chrootless --force-not-root --force-depends --force-architecture"
    $dpkg -i "$deb"
    grep -q '^llama-tpu:' "$root/etc/passwd" || fail "postinst did not create the llama-tpu user"
    grep -q '^dialout:.*llama-tpu' "$root/etc/group" || fail "llama-tpu is not in dialout"
    [ -L "$root/etc/systemd/system/multi-user.target.wants/llama-tpu.service" ] || fail "service not enabled"
    [ -L "$root/etc/systemd/system/sockets.target.wants/llama-tpu.socket" ] || fail "socket not enabled"
    if [ "$(dpkg-deb --field "$deb" Architecture)" = "$host_arch" ]; then
        "$root/usr/bin/llama-tpu" --version
        # Enabled, but not started until a model is configured: the unit's ExecCondition.
        status=0
        "$root/usr/bin/llama-tpu" serve --check --config "$root/etc/llama-tpu/llama-tpu.toml" 2>/dev/null || status=$?
        [ "$status" = 1 ] || fail "serve --check should exit 1 without a model, got $status"
    fi
    echo "# edited" >> "$root/etc/llama-tpu/llama-tpu.toml"
    $dpkg -r llama-tpu
    [ ! -e "$root/usr/bin/llama-tpu" ] || fail "remove left the binary"
    grep -q "# edited" "$root/etc/llama-tpu/llama-tpu.toml" || fail "remove did not keep the edited conffile"
    $dpkg --purge llama-tpu
    [ ! -e "$root/etc/llama-tpu/llama-tpu.toml" ] || fail "purge left the conffile"
    [ ! -e "$root/etc/systemd/system/multi-user.target.wants/llama-tpu.service" ] || fail "purge left the unit enabled"
    rm -rf "$root"
    echo "installed, enabled, removed and purged in a scratch root: ok"
done
if command -v lintian >/dev/null; then
    # Errors fail the check; warnings are shown. Tags the project accepts, with reasons:
    #  no-manual-page: `llama-tpu --help`, the README and docs/ document everything.
    lintian --fail-on error --suppress-tags no-manual-page "$@"
    echo "lintian: no errors"
else
    fail "lintian not found (apt-get install lintian)"
fi
