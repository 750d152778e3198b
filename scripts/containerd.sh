#!/usr/bin/env bash
# A private containerd for baselines and tests: its own root, state, socket and config, CRI off.
#   scripts/containerd.sh start|stop|reset      (reset: stop, wipe its root, start)
# Env: HB_CONTAINERD_DIR (default /dev/shm/hb-containerd: tmpfs, so wiping is instant),
#      HB_NETNS (run it inside that network namespace),
#      HB_SNAPSHOTTER_SOCK (register hb's snapshotter there as proxy plugin "hb"),
#      HB_STARGZ_SOCK (register stargz-snapshotter's daemon there as proxy plugin "stargz":
#      scripts/stargz.sh).
# Socket: $HB_CONTAINERD_DIR/containerd.sock
set -euo pipefail
DIR=${HB_CONTAINERD_DIR:-/dev/shm/hb-containerd}
SOCK="$DIR/containerd.sock"
log() { printf 'containerd: %s\n' "$*" >&2; }

start() {
  if [ -S "$SOCK" ] && ctr -a "$SOCK" version >/dev/null 2>&1; then return; fi
  mkdir -p "$DIR/root" "$DIR/state"
  cat > "$DIR/config.toml" <<CFG
version = 2
root = "$DIR/root"
state = "$DIR/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$SOCK"
[ttrpc]
  address = "$SOCK.ttrpc"
CFG
  if [ -n "${HB_SNAPSHOTTER_SOCK:-}${HB_STARGZ_SOCK:-}" ]; then
    echo "[proxy_plugins]" >> "$DIR/config.toml"
  fi
  if [ -n "${HB_SNAPSHOTTER_SOCK:-}" ]; then
    cat >> "$DIR/config.toml" <<CFG
  [proxy_plugins.hb]
    type = "snapshot"
    address = "$HB_SNAPSHOTTER_SOCK"
CFG
  fi
  if [ -n "${HB_STARGZ_SOCK:-}" ]; then
    cat >> "$DIR/config.toml" <<CFG
  [proxy_plugins.stargz]
    type = "snapshot"
    address = "$HB_STARGZ_SOCK"
CFG
  fi
  local prefix=()
  [ -n "${HB_NETNS:-}" ] && prefix=(nsenter --net=/run/netns/"$HB_NETNS")  # not `ip netns exec`: no mount namespace of its own
  nohup "${prefix[@]}" containerd --config "$DIR/config.toml" >> "$DIR/containerd.log" 2>&1 &
  echo $! > "$DIR/pid"
  for _ in $(seq 1 100); do
    ctr -a "$SOCK" version >/dev/null 2>&1 && { log "up on $SOCK"; return; }
    sleep 0.1
  done
  tail -n 20 "$DIR/containerd.log" >&2; log "did not start"; exit 1
}

stop() {
  if [ -f "$DIR/pid" ]; then
    kill "$(cat "$DIR/pid")" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$(cat "$DIR/pid")" 2>/dev/null || break; sleep 0.1; done
    rm -f "$DIR/pid"
  fi
  # Snapshot mounts left behind would keep the root busy.
  { grep -o " $DIR/[^ ]*" /proc/mounts || true; } | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  reset) stop; rm -rf "$DIR/root" "$DIR/state"; start ;;
  *) echo "usage: $0 start|stop|reset" >&2; exit 2 ;;
esac
