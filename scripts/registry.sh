#!/usr/bin/env bash
# Real registries for tests and benchmarks: Debian's docker-registry (CNCF distribution 2.8) on
# loopback. Idempotent: `start` keeps instances that already answer.
#   scripts/registry.sh start|stop|status
# Instances (ports from HB_REGISTRY_PORT, default 15000):
#   open   127.0.0.1:15000   anonymous pull and push
#   basic  127.0.0.1:15001   htpasswd basic auth, user hb / password hb-secret
# State lives in $HB_REGISTRY_DIR (default /var/tmp/hb-registry): data, configs, logs (JSON lines,
# one "response completed" per request with http.response.written, to count bytes served).
set -euo pipefail
DIR=${HB_REGISTRY_DIR:-/var/tmp/hb-registry}
BASE=${HB_REGISTRY_PORT:-15000}
USER_NAME=hb
USER_PASS=hb-secret
mkdir -p "$DIR"
log() { printf 'registry: %s\n' "$*" >&2; }

port_of() { case "$1" in open) echo "$BASE" ;; basic) echo $((BASE + 1)) ;; esac; }

answers() { curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$1/v2/" 2>/dev/null | grep -qE '^(200|401)$'; }

write_config() {
  local name=$1 port=$2 cfg="$DIR/$1/config.yml"
  mkdir -p "$DIR/$name/data"
  {
    echo "version: 0.1"
    echo "log: {level: info, formatter: json, fields: {instance: $name}}"
    echo "storage: {filesystem: {rootdirectory: $DIR/$name/data}, delete: {enabled: true}}"
    echo "http: {addr: 127.0.0.1:$port, secret: hb-test-secret-$name}"
    if [ "$name" = basic ]; then
      echo "auth: {htpasswd: {realm: hb-test, path: $DIR/basic/htpasswd}}"
    fi
  } > "$cfg"
  if [ "$name" = basic ] && [ ! -s "$DIR/basic/htpasswd" ]; then
    htpasswd -Bbn "$USER_NAME" "$USER_PASS" > "$DIR/basic/htpasswd"
  fi
}

start_one() {
  local name=$1 port; port=$(port_of "$1")
  if answers "$port"; then return; fi
  write_config "$name" "$port"
  nohup docker-registry serve "$DIR/$name/config.yml" >> "$DIR/$name/registry.log" 2>&1 &
  echo $! > "$DIR/$name/pid"
  for _ in $(seq 1 100); do answers "$port" && { log "$name on 127.0.0.1:$port"; return; }; sleep 0.1; done
  tail -n 5 "$DIR/$name/registry.log" >&2
  log "$name did not start"; exit 1
}

stop_one() {
  local pidf="$DIR/$1/pid"
  if [ -f "$pidf" ]; then kill "$(cat "$pidf")" 2>/dev/null || true; rm -f "$pidf"; fi
}

case "${1:-start}" in
  start) for n in open basic; do start_one "$n"; done ;;
  stop) for n in open basic; do stop_one "$n"; done ;;
  status) for n in open basic; do p=$(port_of $n); if answers "$p"; then echo "$n 127.0.0.1:$p up"; else echo "$n 127.0.0.1:$p down"; fi; done ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
