#!/usr/bin/env bash
# The main job, at this stage of HyperBox: a local registry with a 3-layer Debian image (python3,
# gcc, perl), pulled into the chunk store, a command run from its rootfs, then v2 of the image
# pulled: only its new chunks are stored. (Lazy mounts and `hb run` come next on the same store.)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
[ "$(id -u)" = 0 ] || { echo "scripts/demo.sh: run as root (it starts a registry and runs a chroot)" >&2; exit 1; }
scripts/setup.sh
scripts/images.sh
cargo build --quiet -p hb-cli
HB="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/debug/hb"
REG=127.0.0.1:${HB_REGISTRY_PORT:-15000}
WORK=${HB_DEMO_DIR:-/dev/shm/hb-demo}
[ -d /dev/shm ] || WORK=/var/tmp/hb-demo
rm -rf "$WORK" && mkdir -p "$WORK"
export HB_ROOT="$WORK/store"

step() { printf '\n== %s\n' "$*" >&2; }
timed() { local t0; t0=$(date +%s%N); "$@"; local ms=$(( ($(date +%s%N) - t0) / 1000000 )); printf '   (%d.%03d s)\n' $((ms / 1000)) $((ms % 1000)) >&2; }

step "hb pull $REG/debian-app:v1"
timed "$HB" pull "$REG/debian-app:v1" >/dev/null
step "hb export, then run the image's command from its rootfs"
timed "$HB" export "$REG/debian-app:v1" "$WORK/rootfs"
timed chroot "$WORK/rootfs" /usr/bin/python3 /app/main.py
step "hb pull $REG/debian-app:v2 (one more package, small edits)"
timed "$HB" pull "$REG/debian-app:v2" >/dev/null
step "hb pull $REG/debian-app:v1-zstd (the same layers recompressed: nothing to download)"
timed "$HB" pull "$REG/debian-app:v1-zstd" >/dev/null
step "hb images"
"$HB" images
step "hb diff v1 v2 (first lines)"
"$HB" diff "$REG/debian-app:v1" "$REG/debian-app:v2" | grep -E '^[AD] ' | head -n 5 || true
step "hb du"
"$HB" du
step "hb fsck"
timed "$HB" fsck
printf '\nDemo store left in %s (HB_ROOT=%s); remove it with: rm -rf %s\n' "$WORK" "$HB_ROOT" "$WORK" >&2
