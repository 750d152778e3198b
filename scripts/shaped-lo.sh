#!/usr/bin/env bash
# A bandwidth-limited registry on loopback, for benchmarks whose clients cannot all move into a
# network namespace (containerd and its snapshotters pull themselves): a second docker-registry
# on 127.0.0.1:15010 serving the open registry's storage, and an htb qdisc on `lo` that shapes
# only the traffic from port 15010 (the registry's answers; requests are small). Everything else
# on loopback keeps its speed.
#   scripts/shaped-lo.sh up [RATE]   (default 100mbit)   |   scripts/shaped-lo.sh down
# Its log (bytes per request) is $HB_REGISTRY_DIR/shaped-lo/registry.log.
set -euo pipefail
RATE=${2:-100mbit}
PORT=15010
DIR=${HB_REGISTRY_DIR:-/var/tmp/hb-registry}
log() { printf 'shaped-lo: %s\n' "$*" >&2; }

up() {
  # htb (this kernel has no prio qdisc): everything goes to class 1:10, unlimited in practice,
  # except what the filter sends to 1:20, held to RATE.
  # Set up afresh each time (`tc filter replace` of a u32 filter already there fails: "Change
  # operation not supported"), so `up` twice, or with another rate, works.
  tc qdisc del dev lo root 2>/dev/null || true
  tc qdisc add dev lo root handle 1: htb default 10
  tc class add dev lo parent 1: classid 1:10 htb rate 100gbit
  tc class add dev lo parent 1: classid 1:20 htb rate "$RATE" ceil "$RATE" burst 256kb
  tc filter add dev lo parent 1: protocol ip prio 1 u32 match ip sport "$PORT" 0xffff flowid 1:20
  mkdir -p "$DIR/shaped-lo"
  cat > "$DIR/shaped-lo/config.yml" <<CFG
version: 0.1
log: {level: info, formatter: json, fields: {instance: shaped-lo}}
storage: {filesystem: {rootdirectory: $DIR/open/data}}
http: {addr: 127.0.0.1:$PORT, secret: hb-test-secret-shaped-lo}
CFG
  if ! curl -s -o /dev/null "http://127.0.0.1:$PORT/v2/"; then
    nohup docker-registry serve "$DIR/shaped-lo/config.yml" >> "$DIR/shaped-lo/registry.log" 2>&1 &
    echo $! > "$DIR/shaped-lo/pid"
    for _ in $(seq 1 50); do curl -s -o /dev/null "http://127.0.0.1:$PORT/v2/" && break; sleep 0.1; done
  fi
  log "registry 127.0.0.1:$PORT behind $RATE (answers shaped on lo)"
}

down() {
  [ -f "$DIR/shaped-lo/pid" ] && { kill "$(cat "$DIR/shaped-lo/pid")" 2>/dev/null || true; rm -f "$DIR/shaped-lo/pid"; }
  tc qdisc del dev lo root 2>/dev/null || true
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up [RATE]|down" >&2; exit 2 ;;
esac
