#!/usr/bin/env bash
# stargz-snapshotter's daemon for the cold-start benchmark (the tool users would pick instead of hb).
#   scripts/stargz.sh build            build containerd-stargz-grpc once (GOPATH mode; cached)
#   scripts/stargz.sh start|stop|reset  run it privately (reset: stop, wipe its root, start)
#   scripts/stargz.sh socket            print its socket (for scripts/containerd.sh's HB_STARGZ_SOCK)
# Env: HB_STARGZ_DIR (binary, GOPATH, root, socket; default /var/tmp/hb-stargz: a disk-backed root
#      as users have it), HB_STARGZ_PLAIN_HTTP (a registry host:port served over plain HTTP,
#      default 127.0.0.1:15000), HB_STARGZ_NO_PREFETCH=1 (no landmark prefetch).
# Debian ships only `ctr-remote` of stargz-snapshotter; the daemon's library is in
# golang-github-containerd-stargz-snapshotter-dev (scripts/setup.sh installs it). There is no Go
# module proxy here: the build uses GOPATH mode on a private copy of that tree without the CRI and
# kubeconfig keychains (they need k8s packages Debian does not ship), and bench/stargz/main.go
# serves upstream's own service.NewStargzSnapshotterService on a socket.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
W=${HB_STARGZ_DIR:-/var/tmp/hb-stargz}
BIN="$W/containerd-stargz-grpc"
SOCK="$W/run/stargz.sock"
UPSTREAM=/usr/share/gocode/src/github.com/containerd/stargz-snapshotter
log() { printf 'stargz: %s\n' "$*" >&2; }

build() {
  if ! command -v go >/dev/null 2>&1 || [ ! -d "$UPSTREAM" ]; then "$repo/scripts/setup.sh"; fi
  mkdir -p "$W"
  exec 9>"$W/build.lock"
  flock 9
  if [ -x "$BIN" ] && [ ! "$repo/bench/stargz/main.go" -nt "$BIN" ] && [ ! "$0" -nt "$BIN" ]; then
    exec 9>&-; return
  fi
  local t0 gp
  t0=$(date +%s)
  gp="$W/gopath"
  rm -rf "$gp" && mkdir -p "$gp/src/github.com/containerd" "$gp/src/hb-stargz" "$W/cache"
  cp -a "$UPSTREAM" "$gp/src/github.com/containerd/stargz-snapshotter"
  rm -rf "$gp/src/github.com/containerd/stargz-snapshotter/service/plugin" \
    "$gp/src/github.com/containerd/stargz-snapshotter/service/keychain/cri" \
    "$gp/src/github.com/containerd/stargz-snapshotter/service/keychain/kubeconfig" \
    "$gp/src/github.com/containerd/stargz-snapshotter/service/resolver/cri.go"
  cp "$repo/bench/stargz/main.go" "$gp/src/hb-stargz/"
  log "building $BIN (GOPATH mode, $(go version | cut -d' ' -f3))"
  (cd "$gp/src/hb-stargz" &&
    env GO111MODULE=off GOPATH="$gp:/usr/share/gocode" GOCACHE="$W/cache" GOFLAGS= CGO_ENABLED=0 \
      go build -o "$BIN.new" .)
  mv "$BIN.new" "$BIN"
  log "built in $(( $(date +%s) - t0 )) s"
  exec 9>&-   # the lock goes with the descriptor (a daemon started later must not inherit it)
}

start() {
  build
  if [ -f "$W/pid" ] && kill -0 "$(cat "$W/pid")" 2>/dev/null && [ -S "$SOCK" ]; then return; fi
  mkdir -p "$W/root" "$(dirname "$SOCK")"
  local args=(--root "$W/root" --address "$SOCK" --plain-http "${HB_STARGZ_PLAIN_HTTP:-127.0.0.1:15000}")
  [ "${HB_STARGZ_NO_PREFETCH:-0}" = 1 ] && args+=(--no-prefetch)
  nohup "$BIN" "${args[@]}" >> "$W/stargz.log" 2>&1 9>&- &
  echo $! > "$W/pid"
  for _ in $(seq 1 100); do
    [ -S "$SOCK" ] && { log "up on $SOCK"; return; }
    sleep 0.1
  done
  tail -n 20 "$W/stargz.log" >&2; log "did not start"; exit 1
}

stop() {
  if [ -f "$W/pid" ]; then
    # SIGTERM, never SIGINT: on SIGINT it deletes snapshot dirs but keeps their metadata.
    kill -TERM "$(cat "$W/pid")" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$(cat "$W/pid")" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$(cat "$W/pid")" 2>/dev/null || true
    rm -f "$W/pid"
  fi
  { grep -o " $W/root[^ ]*" /proc/mounts || true; } | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
}

case "${1:-start}" in
  build) build ;;
  start) start ;;
  stop) stop ;;
  reset) stop; rm -rf "$W/root"; start ;;
  socket) echo "$SOCK" ;;
  *) echo "usage: $0 build|start|stop|reset|socket" >&2; exit 2 ;;
esac
