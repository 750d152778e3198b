#!/usr/bin/env bash
# The main job, at this stage of HyperBox: a local registry with a 3-layer Debian image (python3,
# gcc, perl); a lazy start (the image converted once to hb's accelerated form, then run in a
# container on a cold store: only indexes are pulled and the command's chunks come on first read);
# the daemon: containers on its shared image mount, detached, with logs, exec, stop; a lazy mount
# and chroot; then the eager path: the image pulled into the chunk store, v2 pulled: only its new
# chunks are stored.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
[ "$(id -u)" = 0 ] || { echo "scripts/demo.sh: run as root (it starts a registry and runs a chroot)" >&2; exit 1; }
scripts/setup.sh
scripts/images.sh
cargo build --quiet -p hb-cli -p hb-engine
HB="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/debug/hb"
REG=127.0.0.1:${HB_REGISTRY_PORT:-15000}
WORK=${HB_DEMO_DIR:-/dev/shm/hb-demo}
[ -d /dev/shm ] || WORK=/var/tmp/hb-demo
rm -rf "$WORK" && mkdir -p "$WORK"
export HB_ROOT="$WORK/store"

step() { printf '\n== %s\n' "$*" >&2; }
timed() { local t0; t0=$(date +%s%N); "$@"; local ms=$(( ($(date +%s%N) - t0) / 1000000 )); printf '   (%d.%03d s)\n' $((ms / 1000)) $((ms % 1000)) >&2; }

step "hb convert $REG/debian-app:v1 $REG/demo/debian-app:v1-lazy (once, by whoever publishes the image)"
timed "$HB" --root "$WORK/publisher" convert "$REG/debian-app:v1" "$REG/demo/debian-app:v1-lazy" >/dev/null
step "hb run on a cold store: pulls the indexes only, runs the image's command in a container (runc)"
timed "$HB" run --rm "$REG/demo/debian-app:v1-lazy"

step "hb daemon: owns the store, shares one mount per image between containers (API on $WORK/hb.sock)"
export HB_SOCKET="$WORK/hb.sock"
"$HB" daemon 2> "$WORK/daemon.log" &
DAEMON=$!
for _ in $(seq 100); do [ -S "$HB_SOCKET" ] && break; sleep 0.05; done
timed "$HB" run --rm "$REG/demo/debian-app:v1-lazy" python3 -c 'print("python in a container on the daemon'"'"'s mount")'
timed "$HB" run --rm "$REG/demo/debian-app:v1-lazy" true
"$HB" run -d --name ticker "$REG/demo/debian-app:v1-lazy" \
  python3 -c 'import time; [print("tick", i, flush=True) or time.sleep(0.2) for i in range(1000)]' >/dev/null
"$HB" ps
sleep 1
"$HB" logs --tail 2 ticker
"$HB" exec ticker python3 -c 'import os; print("exec in", os.uname().nodename)'
timed "$HB" stop -t 1 ticker >/dev/null
"$HB" rm ticker >/dev/null
curl -s --unix-socket "$HB_SOCKET" http://hb/metrics | grep -E '^hb_(chunk_lookups_total|image_mounts)' >&2 || true
kill -TERM "$DAEMON"; wait "$DAEMON" || true
for m in "$HB_ROOT"/images/*/; do [ -d "$m" ] && "$HB" umount "$m"; done
unset HB_SOCKET
step "hb mount -d: the same image's rootfs as a lazy mount"
mkdir -p "$WORK/mnt"
timed "$HB" mount -d "$REG/demo/debian-app:v1-lazy" "$WORK/mnt"
timed chroot "$WORK/mnt" /usr/bin/python3 -c 'import sys; print("python", sys.version.split()[0], "from the lazy mount")'
timed "$HB" umount "$WORK/mnt"
grep -h '^unmounted' "$HB_ROOT"/run/*.log >&2 || true
rm -rf "$HB_ROOT"

step "hb pull $REG/debian-app:v1 (eager: every layer into the chunk store)"
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
