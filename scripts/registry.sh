#!/usr/bin/env bash
# Real registries for tests and benchmarks: Debian's docker-registry (CNCF distribution 2.8) on
# loopback. Idempotent: `start` keeps instances that already answer.
#   scripts/registry.sh start|stop|status
# Instances (ports from HB_REGISTRY_PORT, default 15000):
#   open   127.0.0.1:15000   anonymous pull and push
#   basic  127.0.0.1:15001   htpasswd basic auth, user hb / password hb-secret
#   token  127.0.0.1:15002   Bearer token auth; tokens from scripts/token-issuer.py on
#                            127.0.0.1:15003 (user hb / password hb-secret gets pull and push)
#   tls    127.0.0.1:15004   HTTPS with a certificate from a private test CA ($DIR/tls/ca.pem)
# State lives in $HB_REGISTRY_DIR (default /var/tmp/hb-registry): data, configs, logs (JSON lines,
# one "response completed" per request with http.response.written, to count bytes served).
set -euo pipefail
DIR=${HB_REGISTRY_DIR:-/var/tmp/hb-registry}
BASE=${HB_REGISTRY_PORT:-15000}
USER_NAME=hb
USER_PASS=hb-secret
mkdir -p "$DIR"
log() { printf 'registry: %s\n' "$*" >&2; }

port_of() { case "$1" in open) echo "$BASE" ;; basic) echo $((BASE + 1)) ;; token) echo $((BASE + 2)) ;; tls) echo $((BASE + 4)) ;; esac; }
ISSUER_PORT=$((BASE + 3))
INSTANCES="open basic token tls"

answers() {
  local scheme=http; [ "$1" = "$((BASE + 4))" ] && scheme=https
  curl -sk -o /dev/null -w '%{http_code}' "$scheme://127.0.0.1:$1/v2/" 2>/dev/null | grep -qE '^(200|401)$'
}

# A private CA and a server certificate for 127.0.0.1 signed by it.
make_tls() {
  local d="$DIR/tls"; mkdir -p "$d"
  [ -s "$d/server.pem" ] && return
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj /CN=hb-test-ca -keyout "$d/ca.key" -out "$d/ca.pem" >/dev/null 2>&1
  openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout "$d/server.key" -out "$d/server.csr" >/dev/null 2>&1
  printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' > "$d/ext.cnf"
  openssl x509 -req -in "$d/server.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial -days 3650 \
    -extfile "$d/ext.cnf" -out "$d/server.pem" >/dev/null 2>&1
}

write_config() {
  local name=$1 port=$2 cfg="$DIR/$1/config.yml"
  mkdir -p "$DIR/$name/data"
  {
    echo "version: 0.1"
    echo "log: {level: info, formatter: json, fields: {instance: $name}}"
    echo "storage: {filesystem: {rootdirectory: $DIR/$name/data}, delete: {enabled: true}}"
    if [ "$name" = tls ]; then
      echo "http: {addr: 127.0.0.1:$port, secret: hb-test-secret-$name, tls: {certificate: $DIR/tls/server.pem, key: $DIR/tls/server.key}}"
    else
      echo "http: {addr: 127.0.0.1:$port, secret: hb-test-secret-$name}"
    fi
    if [ "$name" = basic ]; then
      echo "auth: {htpasswd: {realm: hb-test, path: $DIR/basic/htpasswd}}"
    fi
    if [ "$name" = token ]; then
      echo "auth: {token: {realm: \"http://127.0.0.1:$ISSUER_PORT/token\", service: hb-test-registry, issuer: hb-test-issuer, rootcertbundle: $DIR/token/cert.pem}}"
    fi
  } > "$cfg"
  if [ "$name" = basic ] && [ ! -s "$DIR/basic/htpasswd" ]; then
    htpasswd -Bbn "$USER_NAME" "$USER_PASS" > "$DIR/basic/htpasswd"
  fi
}

start_issuer() {
  mkdir -p "$DIR/token"
  if [ ! -s "$DIR/token/cert.pem" ]; then
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj /CN=hb-test-issuer \
      -keyout "$DIR/token/key.pem" -out "$DIR/token/cert.pem" >/dev/null 2>&1
  fi
  if curl -s -o /dev/null "http://127.0.0.1:$ISSUER_PORT/token"; then return; fi
  nohup python3 "$(dirname "$0")/token-issuer.py" --addr "127.0.0.1:$ISSUER_PORT" \
    --key "$DIR/token/key.pem" --cert "$DIR/token/cert.pem" --user "$USER_NAME" --password "$USER_PASS" \
    >> "$DIR/token/issuer.log" 2>&1 &
  echo $! > "$DIR/token/issuer.pid"
  for _ in $(seq 1 50); do curl -s -o /dev/null "http://127.0.0.1:$ISSUER_PORT/token" && return; sleep 0.1; done
  log "the token issuer did not start"; exit 1
}

start_one() {
  local name=$1 port; port=$(port_of "$1")
  [ "$name" = token ] && start_issuer
  [ "$name" = tls ] && make_tls
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
  start) for n in $INSTANCES; do start_one "$n"; done ;;
  stop) for n in $INSTANCES; do stop_one "$n"; done; [ -f "$DIR/token/issuer.pid" ] && kill "$(cat "$DIR/token/issuer.pid")" 2>/dev/null; rm -f "$DIR/token/issuer.pid" ;;
  status) for n in $INSTANCES; do p=$(port_of $n); if answers "$p"; then echo "$n 127.0.0.1:$p up"; else echo "$n 127.0.0.1:$p down"; fi; done ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
