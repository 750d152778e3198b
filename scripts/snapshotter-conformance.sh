#!/usr/bin/env bash
# containerd 1.6's own snapshotter conformance suite (Go package snapshots/testsuite, from Debian's
# golang-github-containerd-containerd-dev) against `hb daemon`'s snapshotter socket, through
# containerd's snapshots/proxy client: tests/conformance/hb_snapshotter_test.go starts a fresh
# daemon for each suite test on the root the suite hands it and stops it with SIGTERM.
#   HB_BIN=/path/to/hb scripts/snapshotter-conformance.sh [extra test flags, e.g. -test.run X]
# Env: HB_BIN (the hb under test, hb-engine beside it; default: the workspace's debug build),
#      HB_CONFORMANCE_DIR (private GOPATH, build cache and test binary; default /var/tmp/hb-conformance).
# Builds in GOPATH mode (Debian has no Go module proxy), once: the test binary is reused while it
# is newer than its source and the Debian package. Needs root (the suite mounts overlayfs).
# Exits non-zero when any suite test failed; the last line is "conformance: N passed, N failed, N skipped".
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
W=${HB_CONFORMANCE_DIR:-/var/tmp/hb-conformance}
SRC="$repo/tests/conformance/hb_snapshotter_test.go"
GOCODE=/usr/share/gocode/src
SUITE="$GOCODE/github.com/containerd/containerd/snapshots/testsuite"
DEB_LIST=/var/lib/dpkg/info/golang-github-containerd-containerd-dev.list
BIN="$W/hb-conformance.test"
log() { printf 'conformance: %s\n' "$*" >&2; }

[ "$(id -u)" = 0 ] || { log "run as root (the suite mounts)"; exit 1; }
if [ -z "${HB_BIN:-}" ]; then
  target=${CARGO_TARGET_DIR:-$(cd "$repo" && cargo metadata --format-version 1 --no-deps 2>/dev/null |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])' || echo "$repo/target")}
  HB_BIN=$target/debug/hb
fi
[ -x "$HB_BIN" ] || { log "no hb binary at $HB_BIN: set HB_BIN"; exit 1; }
HB_BIN=$(readlink -f "$HB_BIN")
export HB_BIN

# Go and the suite's source come from scripts/setup.sh's package list (idempotent).
if ! command -v go >/dev/null 2>&1 || [ ! -d "$SUITE" ]; then
  "$repo/scripts/setup.sh"
fi

t0=$(date +%s%N)
mkdir -p "$W"
exec 9>"$W/build.lock"
flock 9   # two runs at once build once
if [ -x "$BIN" ] && [ ! "$SRC" -nt "$BIN" ] && [ ! "$DEB_LIST" -nt "$BIN" ] && [ ! "$0" -nt "$BIN" ]; then
  log "test binary up to date: $BIN"
else
  log "building $BIN (GOPATH mode, $(go version | cut -d' ' -f3))"
  mkdir -p "$W/gopath/src/hb-conformance" "$W/cache"
  # Debian ships gotest.tools v3 at src/gotest.tools; GOPATH mode looks for src/gotest.tools/v3.
  rm -rf "$W/gopath/src/gotest.tools"
  mkdir -p "$W/gopath/src/gotest.tools"
  cp -a "$GOCODE/gotest.tools" "$W/gopath/src/gotest.tools/v3"
  cp "$SRC" "$W/gopath/src/hb-conformance/"
  (
    cd "$W/gopath/src/hb-conformance"
    env GO111MODULE=off GOPATH="$W/gopath:/usr/share/gocode" GOCACHE="$W/cache" GOFLAGS= CGO_ENABLED=0 \
      go test -c -o "$BIN.new" .
  )
  mv "$BIN.new" "$BIN"
  log "built in $((($(date +%s%N) - t0) / 1000000)) ms"
fi
flock -u 9

# Each suite test's scratch folder (store, sockets, overlay layers) on tmpfs: removing trees on
# the root disk is slow here.
base=/dev/shm
[ -d "$base" ] || base=${TMPDIR:-/tmp}
scratch=$(mktemp -d "$base/hb-conformance.XXXXXX")
out="$scratch.log"
cleanup() {
  # A crashed test binary would leave its daemons and mounts: only ours name the scratch folder.
  local pids
  pids=$(pgrep -f -- "$scratch/" || true)
  [ -n "$pids" ] && kill -KILL $pids 2>/dev/null || true
  awk -v d="$scratch/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo | sort -r |
    while read -r m; do umount -l "$m" 2>/dev/null || true; done
  rm -rf "$scratch"
  [ -f "$out" ] && mv -f "$out" "$W/last-run.log"
}
trap cleanup EXIT

log "running the suite against $HB_BIN"
t1=$(date +%s)
status=0
# -test.v: every subtest's verdict; GOMAXPROCS=2 here, so two daemons at a time.
(cd "$scratch" && TMPDIR="$scratch" "$BIN" -test.v -test.timeout 20m "$@") 2>&1 | tee "$out" || status=$?
elapsed=$(($(date +%s) - t1))

passed=$(grep -cE '^\s+--- PASS: ' "$out" || true)
failed=$(grep -cE '^\s+--- FAIL: ' "$out" || true)
skipped=$(grep -cE '^\s+--- SKIP: ' "$out" || true)
grep -E '^\s+--- SKIP: ' "$out" | sed 's/^ */skipped: /' >&2 || true
grep -E '^\s+--- FAIL: ' "$out" | sed 's/^ */FAILED: /' >&2 || true
log "suite ran in ${elapsed} s; full output in $W/last-run.log"
if [ "$status" = 0 ] && [ "$failed" -gt 0 ]; then status=1; fi
if [ "$status" = 0 ] && [ "$passed" = 0 ]; then log "no suite test ran"; status=1; fi
echo "conformance: $passed passed, $failed failed, $skipped skipped"
exit "$status"
