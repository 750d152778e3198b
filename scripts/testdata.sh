#!/usr/bin/env bash
# Builds the offline test material the tests and benchmarks use, cached between runs.
#   HB_TESTDATA        cache folder (default /var/tmp/hb-testdata)
#   HB_DEBIAN_MIRROR   Debian mirror for debootstrap (default: the first one apt is configured with)
# Produces:
#   minbase/            a debootstrap --variant=minbase bookworm rootfs (real files, links, xattrs)
#   minbase.tar.gz      that rootfs as a gzip'ed layer tar (numeric owners, xattrs, sorted)
#   busybox/            busybox-static plus its applet symlinks
#   busybox.tar         that rootfs as a reproducible layer tar (fixed mtimes, sorted entries)
# Idempotent: a finished artefact is kept; a half-built one is rebuilt.
set -euo pipefail

DATA=${HB_TESTDATA:-/var/tmp/hb-testdata}
# Bump when what this script produces changes, so caches are rebuilt.
VERSION=1
mkdir -p "$DATA"
cd "$DATA"
log() { printf 'testdata: %s\n' "$*" >&2; }

mirror() {
  if [ -n "${HB_DEBIAN_MIRROR:-}" ]; then echo "$HB_DEBIAN_MIRROR"; return; fi
  local m
  m=$(grep -hsE '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
      | grep -v security | head -n1 | awk '{print ($1=="deb") ? $2 : $2}')
  echo "${m:-http://deb.debian.org/debian}"
}

if [ "$(cat stamp 2>/dev/null)" != "$VERSION" ]; then
  log "cache version changed: rebuilding"
  rm -rf minbase minbase.tar.gz busybox busybox.tar ./*.tmp
  echo "$VERSION" > stamp
fi
# The busybox rootfs is cheap: rebuild it whenever its recipe changes.
BUSYBOX_RECIPE=2
if [ "$(cat busybox.stamp 2>/dev/null)" != "$BUSYBOX_RECIPE" ]; then
  rm -rf busybox busybox.tar
  echo "$BUSYBOX_RECIPE" > busybox.stamp
fi

if [ ! -f minbase/.hb-complete ]; then
  rm -rf minbase
  log "debootstrap --variant=minbase bookworm from $(mirror) (about a minute)"
  debootstrap --variant=minbase bookworm minbase "$(mirror)" > debootstrap.log 2>&1 \
    || { tail -n 20 debootstrap.log >&2; exit 1; }
  # A capability xattr and a user xattr, so the round trip covers xattrs on real files.
  if command -v setfattr >/dev/null; then
    setfattr -n user.hb.test -v "hello" minbase/etc/hostname || true
  fi
  touch minbase/.hb-complete
fi

if [ ! -f minbase.tar.gz ]; then
  log "packing minbase.tar.gz"
  tar --xattrs --xattrs-include='*' --numeric-owner --sort=name --exclude=./.hb-complete \
    -C minbase -cf - . | gzip -6 > minbase.tar.gz.tmp
  mv minbase.tar.gz.tmp minbase.tar.gz
fi

if [ ! -f busybox.tar ]; then
  log "building the busybox rootfs"
  rm -rf busybox && mkdir -p busybox/bin busybox/etc busybox/tmp busybox/root
  cp /bin/busybox busybox/bin/busybox
  for applet in $(busybox/bin/busybox --list-full); do
    [ "$applet" = bin/busybox ] && continue
    mkdir -p "busybox/$(dirname "$applet")"
    ln -sf /bin/busybox "busybox/$applet"
  done
  echo 'root:x:0:0:root:/root:/bin/sh' > busybox/etc/passwd
  echo 'root:x:0:' > busybox/etc/group
  chmod 1777 busybox/tmp
  # Fixed times on the tree itself, so the tree and its tar agree and the digest is stable.
  find busybox -exec touch -h -d '2024-01-01 00:00:00Z' {} +
  tar --numeric-owner --owner=0 --group=0 --sort=name -C busybox -cf busybox.tar.tmp .
  mv busybox.tar.tmp busybox.tar
fi
log "ready in $DATA"
