#!/usr/bin/env bash
# Test hosts for LAN peers: N network namespaces (hbp1..hbpN, 10.232.0.11..) on a bridge that
# lives in its own namespace (hbp-hub), and a registry in namespace hbp-reg (10.232.0.2:5000)
# behind a tbf-shaped link (the team's uplink), serving the open registry's storage. Nothing of
# it touches the host's own interfaces: peers' mDNS stays on the hub's bridge.
#   scripts/peers-net.sh up [N] [RATE]   (default 4 peers, 100mbit)   |   scripts/peers-net.sh down
# Run a command on peer i with `nsenter --net=/run/netns/hbp<i> ...`.
set -euo pipefail
# Commands go into a namespace with `nsenter --net`, never `ip netns exec`: that one also makes
# a new mount namespace, a copy of every mount there is, and a registry left running in it kept
# other tests' FUSE mounts alive after they were unmounted (the host's / is private here).
N=${2:-4}
RATE=${3:-100mbit}
DIR=${HB_REGISTRY_DIR:-/var/tmp/hb-registry}
HUB=hbp-hub
REG=hbp-reg
log() { printf 'peers-net: %s\n' "$*" >&2; }

# Joins namespace $1 to the hub's bridge with address $2.
join() {
  local ns=$1 addr=$2 i=$3
  ip netns list | grep -qw "$ns" || ip netns add "$ns"
  nsenter --net=/run/netns/"$ns" ip link set lo up
  if ! nsenter --net=/run/netns/"$ns" ip link show eth0 >/dev/null 2>&1; then
    ip link add "hbp-$i" type veth peer name "hbp-$i-in"
    ip link set "hbp-$i" netns "$HUB"
    ip link set "hbp-$i-in" netns "$ns"
    nsenter --net=/run/netns/"$ns" ip link set "hbp-$i-in" name eth0
    nsenter --net=/run/netns/"$ns" ip addr add "$addr/24" dev eth0
    nsenter --net=/run/netns/"$ns" ip link set eth0 up
    nsenter --net=/run/netns/"$HUB" ip link set "hbp-$i" master br0
    nsenter --net=/run/netns/"$HUB" ip link set "hbp-$i" up
  fi
}

up() {
  ip netns list | grep -qw "$HUB" || ip netns add "$HUB"
  if ! nsenter --net=/run/netns/"$HUB" ip link show br0 >/dev/null 2>&1; then
    nsenter --net=/run/netns/"$HUB" ip link add br0 type bridge
    nsenter --net=/run/netns/"$HUB" ip link set br0 up
  fi
  join "$REG" 10.232.0.2 reg
  for i in $(seq 1 "$N"); do join "hbp$i" "10.232.0.$((10 + i))" "$i"; done
  # The uplink: what the registry sends, at RATE.
  nsenter --net=/run/netns/"$REG" tc qdisc replace dev eth0 root tbf rate "$RATE" burst 256kb latency 50ms
  mkdir -p "$DIR/peers"
  cat > "$DIR/peers/config.yml" <<CFG
version: 0.1
log: {level: info, formatter: json}
storage: {filesystem: {rootdirectory: $DIR/open/data}}
http: {addr: 10.232.0.2:5000, secret: hb-test-secret-peers}
CFG
  if ! nsenter --net=/run/netns/"$REG" curl -s -o /dev/null http://10.232.0.2:5000/v2/; then
    nohup nsenter --net=/run/netns/"$REG" docker-registry serve "$DIR/peers/config.yml" >> "$DIR/peers/registry.log" 2>&1 &
    echo $! > "$DIR/peers/pid"
    for _ in $(seq 1 50); do nsenter --net=/run/netns/"$REG" curl -s -o /dev/null http://10.232.0.2:5000/v2/ && break; sleep 0.1; done
  fi
  log "up: $N peers (hbp1..hbp$N, 10.232.0.11..), registry 10.232.0.2:5000 behind $RATE; log $DIR/peers/registry.log"
}

down() {
  [ -f "$DIR/peers/pid" ] && { kill "$(cat "$DIR/peers/pid")" 2>/dev/null || true; rm -f "$DIR/peers/pid"; }
  pkill -f "docker-registry serve $DIR/peers/config.yml" 2>/dev/null || true
  for ns in $(ip netns list | awk '{print $1}' | grep -E '^hbp'); do ip netns del "$ns" 2>/dev/null || true; done
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up [N] [RATE]|down" >&2; exit 2 ;;
esac
