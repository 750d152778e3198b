#!/usr/bin/env bash
# Installs what hb's build and tests need on Debian/Ubuntu. Idempotent: does nothing when all is
# there. Run as root (or with sudo available).
set -euo pipefail

PACKAGES=(
  build-essential pkg-config   # C toolchain for -sys crates
  librocksdb-dev libclang-dev  # RocksDB linked from Debian (see ARCHITECTURE.md), bindgen
  zstd pigz                    # test material and benchmark baselines
  busybox-static debootstrap   # offline test images
  attr                         # setfattr: xattrs in test material
  util-linux curl openssl python3  # tests and scripts (the token issuer, test CAs)
  iproute2                     # ip, tc, bridges: network namespaces for shaped links and LAN peers
  docker-registry skopeo umoci runc apache2-utils  # real registries, a real client, an independent extractor
  crun                         # a second OCI runtime: hb run probes it (it refuses hybrid cgroups)
  protobuf-compiler libprotobuf-dev  # protoc + well-known types: the snapshotter's gRPC code is generated
  containerd                   # a private containerd for baselines and the snapshotter tests (scripts/containerd.sh)
  stargz-snapshotter           # ctr-remote: a real containerd client that asks for remote snapshots
  golang-go golang-github-containerd-containerd-dev  # containerd's snapshotter conformance suite (scripts/snapshotter-conformance.sh)
  golang-github-containerd-stargz-snapshotter-dev    # stargz-snapshotter's daemon, built by scripts/stargz.sh for the cold-start bench
  docker.io podman             # real Docker and podman clients of the mirror (tests start dockerd in a namespace)
  ca-certificates
  dpkg-dev binutils            # scripts/package.sh: dpkg-shlibdeps, objcopy
  tini                         # hb run --init: docker-init (tini-static), as docker ships it
  chromium                     # headless screenshots of the status pages (tests)
)

log() { printf 'setup: %s\n' "$*" >&2; }
sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  # Keep package scripts from starting services on the host while we install.
  cleanup() { sudo_ rm -f /usr/sbin/policy-rc.d; }
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | sudo_ tee /usr/sbin/policy-rc.d >/dev/null
    sudo_ chmod +x /usr/sbin/policy-rc.d
    trap cleanup EXIT
  fi
  sudo_ apt-get update -q >/dev/null
  sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  for c in "$HOME/.cargo/bin/cargo"; do [ -x "$c" ] && export PATH="$(dirname "$c"):$PATH"; done
fi
if ! command -v cargo >/dev/null 2>&1; then
  log "no Rust toolchain found: install one with rustup (https://rustup.rs), then run this again"
  exit 1
fi
# Where Debian keeps librocksdb.a on this architecture, for .cargo/config.toml.
here="$(cd "$(dirname "$0")/.." && pwd)"
multiarch="$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || gcc -print-multiarch)"
if [ "$(readlink "$here/.cargo/lib" 2>/dev/null)" != "/usr/lib/$multiarch" ]; then
  ln -sfn "/usr/lib/$multiarch" "$here/.cargo/lib"
fi
log "ready ($(cargo --version))"
