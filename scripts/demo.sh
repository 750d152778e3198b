#!/usr/bin/env bash
# The main job, at this stage of HyperBox: store two versions of a real Debian rootfs as
# content-defined chunks, show what dedup and the Merkle diff buy, rebuild the rootfs from the
# store and run a command in it. (Lazy pulls from a registry and `hb run` build on this store.)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
scripts/setup.sh
scripts/testdata.sh
cargo build --quiet -p hb-cli
HB="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/debug/hb"
DATA=${HB_TESTDATA:-/var/tmp/hb-testdata}
WORK=${HB_DEMO_DIR:-/dev/shm/hb-demo}
[ -d /dev/shm ] || WORK=/var/tmp/hb-demo
rm -rf "$WORK" && mkdir -p "$WORK"
export HB_ROOT="$WORK/store"

step() { printf '\n== %s\n' "$*" >&2; }
timed() { local t0; t0=$(date +%s%N); "$@"; local ms=$(( ($(date +%s%N) - t0) / 1000000 )); printf '   (%d.%03d s)\n' $((ms / 1000)) $((ms % 1000)) >&2; }

step "v2 of the rootfs: one more config file and a small edit (made outside the store)"
cp -a "$DATA/minbase" "$WORK/v2" && rm -f "$WORK/v2/.hb-complete"
echo "HyperBox demo" >> "$WORK/v2/etc/motd"
printf '[hb]\nversion = 2\n' > "$WORK/v2/etc/hb-demo.conf"
tar --xattrs --xattrs-include='*' --numeric-owner --sort=name -C "$WORK/v2" -cf - . | gzip -6 > "$WORK/v2.tar.gz"
ls -l "$DATA/minbase.tar.gz" "$WORK/v2.tar.gz" | awk '{printf "   %s  %s bytes\n", $9, $5}' >&2

step "hb layer import: Debian bookworm minbase, v1"
V1=$(timed "$HB" layer import "$DATA/minbase.tar.gz")
step "hb layer import: v2 (only the changed chunks are new)"
V2=$(timed "$HB" layer import "$WORK/v2.tar.gz")

step "hb diff v1 v2: changed paths, and the bytes v2 needs beyond v1"
"$HB" diff "$V1" "$V2"

step "hb du: logical vs stored"
"$HB" du

step "hb layer export --dir: rebuild v2's rootfs from chunks (every read verified)"
timed "$HB" layer export "$V2" --dir "$WORK/rootfs"

if [ "$(id -u)" = 0 ]; then
  step "run a command in the rebuilt rootfs"
  chroot "$WORK/rootfs" /bin/sh -c 'echo "Debian $(cat /etc/debian_version), $(tail -n1 /etc/motd)"; grep version /etc/hb-demo.conf'
fi

step "hb fsck"
timed "$HB" fsck
printf '\nDemo store left in %s (HB_ROOT=%s); remove it with: rm -rf %s\n' "$WORK" "$HB_ROOT" "$WORK" >&2
