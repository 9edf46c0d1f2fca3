#!/bin/sh
# Checks the units with `systemd-analyze verify` as installed in ROOT (`make install
# DESTDIR=ROOT PREFIX=/usr`). systemd-analyze needs the units it refers to (sysinit.target,
# ...) and the programs named by Exec*= lines inside the root, so the host's unit
# directory and kill(1) are copied in. Any message counts as a failure: systemd-analyze
# exits 0 on unknown keys and bad values, which it only reports.
set -eu
root=${1:?usage: verify.sh ROOT}
command -v systemd-analyze >/dev/null || { echo "systemd-analyze not found: apt-get install systemd" >&2; exit 1; }
mkdir -p "$root/usr/lib/systemd/system" "$root/bin"
for unit in /lib/systemd/system/*.target /lib/systemd/system/*.slice; do
    [ -e "$root/usr/lib/systemd/system/$(basename "$unit")" ] || cp -P "$unit" "$root/usr/lib/systemd/system/"
done
cp /bin/kill "$root/bin/kill"
out=$(systemd-analyze verify --root="$root" llama-tpu.service llama-tpu.socket 2>&1) || { echo "$out" >&2; exit 1; }
if [ -n "$out" ]; then
    echo "$out" >&2
    echo "systemd-analyze verify reported problems" >&2
    exit 1
fi
echo "systemd-analyze verify: llama-tpu.service and llama-tpu.socket are clean"
# The unit's own confinement: systemd-analyze security's exposure score (0 = fully confined,
# 10 = not at all) must stay at 2.0 or below; --threshold counts in tenths.
score=$(systemd-analyze security --offline=true --root="$root" --threshold=20 llama-tpu.service 2>&1) \
    || { echo "$score" >&2; echo "systemd-analyze security: llama-tpu.service is above 2.0" >&2; exit 1; }
echo "systemd-analyze security: $(echo "$score" | tail -1 | sed 's/^→ //')"
# With the HTTP drop-in (systemd/llama-tpu-http.conf) as an administrator installs it.
dropin="$root/etc/systemd/system/llama-tpu.service.d"
mkdir -p "$dropin"
cp "$root/usr/share/llama-tpu/llama-tpu-http.conf" "$dropin/http.conf"
out=$(systemd-analyze verify --root="$root" llama-tpu.service 2>&1) || { echo "$out" >&2; exit 1; }
[ -z "$out" ] || { echo "$out" >&2; echo "systemd-analyze verify reported problems with the HTTP drop-in" >&2; exit 1; }
score=$(systemd-analyze security --offline=true --root="$root" --threshold=20 llama-tpu.service 2>&1) \
    || { echo "$score" >&2; echo "systemd-analyze security: llama-tpu.service with the HTTP drop-in is above 2.0" >&2; exit 1; }
echo "systemd-analyze security, with the HTTP drop-in: $(echo "$score" | tail -1 | sed 's/^→ //')"
rm -r "$dropin"
