#!/usr/bin/env bash
# A bandwidth-limited link for benchmarks: network namespace `hbnet` joined to the host by a veth
# pair, with a tbf qdisc shaping both directions, and a registry serving the open registry's
# storage on the host end.
#   scripts/netns.sh up [RATE]   (default 100mbit)   |   scripts/netns.sh down
# Host end 10.231.0.1, namespace end 10.231.0.2 (addresses of this project's own test hosts);
# the registry is 10.231.0.1:15010. Clients run with `nsenter --net=/run/netns/hbnet ...`.
set -euo pipefail
# Commands go into a namespace with `nsenter --net`, never `ip netns exec`: that one also makes
# a new mount namespace, a copy of every mount there is, and a registry left running in it kept
# other tests' FUSE mounts alive after they were unmounted (the host's / is private here).
NS=hbnet
HOST_IF=hb-veth0
NS_IF=hb-veth1
RATE=${2:-100mbit}
DIR=${HB_REGISTRY_DIR:-/var/tmp/hb-registry}
log() { printf 'netns: %s\n' "$*" >&2; }

up() {
  if ! ip netns list | grep -qw "$NS"; then
    ip netns add "$NS"
    ip link add "$HOST_IF" type veth peer name "$NS_IF"
    ip link set "$NS_IF" netns "$NS"
    ip addr add 10.231.0.1/24 dev "$HOST_IF"
    ip link set "$HOST_IF" up
    nsenter --net=/run/netns/"$NS" ip addr add 10.231.0.2/24 dev "$NS_IF"
    nsenter --net=/run/netns/"$NS" ip link set "$NS_IF" up
    nsenter --net=/run/netns/"$NS" ip link set lo up
  fi
  tc qdisc replace dev "$HOST_IF" root tbf rate "$RATE" burst 256kb latency 50ms
  nsenter --net=/run/netns/"$NS" tc qdisc replace dev "$NS_IF" root tbf rate "$RATE" burst 256kb latency 50ms
  mkdir -p "$DIR/shaped"
  cat > "$DIR/shaped/config.yml" <<CFG
version: 0.1
log: {level: warn, formatter: json}
storage: {filesystem: {rootdirectory: $DIR/open/data}}
http: {addr: 10.231.0.1:15010, secret: hb-test-secret-shaped}
CFG
  if ! curl -s -o /dev/null http://10.231.0.1:15010/v2/; then
    nohup docker-registry serve "$DIR/shaped/config.yml" >> "$DIR/shaped/registry.log" 2>&1 &
    echo $! > "$DIR/shaped/pid"
    for _ in $(seq 1 50); do curl -s -o /dev/null http://10.231.0.1:15010/v2/ && break; sleep 0.1; done
  fi
  log "hbnet up: registry 10.231.0.1:15010 behind $RATE"
}

down() {
  [ -f "$DIR/shaped/pid" ] && { kill "$(cat "$DIR/shaped/pid")" 2>/dev/null || true; rm -f "$DIR/shaped/pid"; }
  ip link del "$HOST_IF" 2>/dev/null || true
  ip netns del "$NS" 2>/dev/null || true
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up [RATE]|down" >&2; exit 2 ;;
esac
