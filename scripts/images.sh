#!/usr/bin/env bash
# Builds HyperBox's offline test images as OCI layouts (cached in $HB_IMAGES, default
# /var/tmp/hb-images) and pushes them with skopeo to the local registries (scripts/registry.sh):
#   127.0.0.1:15000/busybox:latest         busybox-static + applets, one layer, reproducible
#   127.0.0.1:15000/busybox:zstd           the same, tar+zstd
#   127.0.0.1:15000/multi:latest           an OCI index: linux/amd64 (busybox), linux/arm64/v8
#   127.0.0.1:15000/busybox:v2s2, multi:v2s2  the same as Docker schema2 manifest / manifest list
#   127.0.0.1:15000/debian-app:v1          debootstrap minbase / python3+gcc+perl installed with
#                                          apt in an overlayfs chroot (real whiteouts and opaque
#                                          dirs) / a small app layer
#   127.0.0.1:15000/debian-app:v2          one more package and small edits
#   127.0.0.1:15000/debian-app:v1-zstd, :v2-zstd   the same images with tar+zstd layers
#   127.0.0.1:15001/private/busybox:latest on the basic-auth registry (hb / hb-secret)
#   127.0.0.1:15002/private/busybox:latest on the token-auth registry (hb / hb-secret)
#   127.0.0.1:15004/busybox:latest         on the TLS registry (private CA)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${HB_IMAGES:-/var/tmp/hb-images}
DATA=${HB_TESTDATA:-/var/tmp/hb-testdata}
OPEN=127.0.0.1:${HB_REGISTRY_PORT:-15000}
BASIC=127.0.0.1:$(( ${HB_REGISTRY_PORT:-15000} + 1 ))
TOKEN=127.0.0.1:$(( ${HB_REGISTRY_PORT:-15000} + 2 ))
TLS=127.0.0.1:$(( ${HB_REGISTRY_PORT:-15000} + 4 ))
RECIPE=2
log() { printf 'images: %s\n' "$*" >&2; }
scripts/testdata.sh
scripts/registry.sh start
mkdir -p "$OUT"
if [ "$(cat "$OUT/stamp" 2>/dev/null)" != "$RECIPE" ]; then rm -rf "${OUT:?}"/*; echo "$RECIPE" > "$OUT/stamp"; fi

# mklayout DIR TAG COMPRESSION CMD_JSON LAYER.tar... : an OCI image layout with one image.
mklayout() {
  local dir=$1 tag=$2 comp=$3 cmd=$4; shift 4
  rm -rf "$dir" && mkdir -p "$dir/blobs/sha256"
  echo '{"imageLayoutVersion":"1.0.0"}' > "$dir/oci-layout"
  local diffs="" layers="" t diff d size mt
  for t in "$@"; do
    diff=$(sha256sum "$t" | cut -d' ' -f1)
    case $comp in
      gzip) pigz -n -6 -c "$t" > "$dir/blob.tmp"; mt=application/vnd.oci.image.layer.v1.tar+gzip ;;
      zstd) zstd -q -3 -c "$t" > "$dir/blob.tmp"; mt=application/vnd.oci.image.layer.v1.tar+zstd ;;
    esac
    d=$(sha256sum "$dir/blob.tmp" | cut -d' ' -f1); size=$(stat -c %s "$dir/blob.tmp")
    mv "$dir/blob.tmp" "$dir/blobs/sha256/$d"
    diffs="$diffs${diffs:+,}\"sha256:$diff\""
    layers="$layers${layers:+,}{\"mediaType\":\"$mt\",\"digest\":\"sha256:$d\",\"size\":$size}"
  done
  blob() { local h; h=$(printf '%s' "$1" | sha256sum | cut -d' ' -f1); printf '%s' "$1" > "$dir/blobs/sha256/$h"; echo "$h $(printf '%s' "$1" | wc -c)"; }
  local config manifest c m
  config="{\"architecture\":\"amd64\",\"os\":\"linux\",\"created\":\"2024-01-01T00:00:00Z\",\"config\":{\"Env\":[\"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\"],\"Cmd\":$cmd},\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[$diffs]}}"
  read -r c csize < <(blob "$config")
  manifest="{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"config\":{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"sha256:$c\",\"size\":$csize},\"layers\":[$layers]}"
  read -r m msize < <(blob "$manifest")
  echo "{\"schemaVersion\":2,\"manifests\":[{\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"digest\":\"sha256:$m\",\"size\":$msize,\"annotations\":{\"org.opencontainers.image.ref.name\":\"$tag\"}}]}" > "$dir/index.json"
}

push() { # push LAYOUT TAG DEST [skopeo args]
  local layout=$1 tag=$2 dest=$3; shift 3
  skopeo copy --quiet --dest-tls-verify=false "$@" "oci:$layout:$tag" "docker://$dest"
  log "pushed $dest"
}

# --- busybox ---------------------------------------------------------------------------------
if [ ! -f "$OUT/busybox.done" ]; then
  mklayout "$OUT/busybox-gzip" latest gzip '["sh"]' "$DATA/busybox.tar"
  mklayout "$OUT/busybox-zstd" zstd zstd '["sh"]' "$DATA/busybox.tar"
  touch "$OUT/busybox.done"
fi

# --- multi: an OCI index with linux/amd64 (busybox) and linux/arm64/v8 (a one-file layer) ---
if [ ! -f "$OUT/multi.done" ]; then
  M="$OUT/multi"; rm -rf "$M" && cp -a "$OUT/busybox-gzip" "$M"
  amd=$(sed -n 's/.*"digest":"\(sha256:[0-9a-f]*\)".*/\1/p' "$M/index.json")
  amd_size=$(stat -c %s "$M/blobs/sha256/${amd#sha256:}")
  put() { local h; h=$(printf '%s' "$1" | sha256sum | cut -d' ' -f1); printf '%s' "$1" > "$M/blobs/sha256/$h"; echo "$h $(printf '%s' "$1" | wc -c)"; }
  tmp=$(mktemp -d); echo arm64 > "$tmp/arch"
  tar --numeric-owner --owner=0 --group=0 --mtime='2024-01-01 00:00:00Z' -C "$tmp" -cf "$tmp/l.tar" arch
  ldiff=$(sha256sum "$tmp/l.tar" | cut -d' ' -f1); pigz -n -c "$tmp/l.tar" > "$tmp/l.tgz"
  lhex=$(sha256sum "$tmp/l.tgz" | cut -d' ' -f1); lsize=$(stat -c %s "$tmp/l.tgz"); mv "$tmp/l.tgz" "$M/blobs/sha256/$lhex"; rm -rf "$tmp"
  read -r c csize < <(put "{\"architecture\":\"arm64\",\"variant\":\"v8\",\"os\":\"linux\",\"config\":{\"Cmd\":[\"cat\",\"/arch\"]},\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[\"sha256:$ldiff\"]}}")
  read -r arm arm_size < <(put "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"config\":{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"sha256:$c\",\"size\":$csize},\"layers\":[{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"sha256:$lhex\",\"size\":$lsize}]}")
  read -r idx idx_size < <(put "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.index.v1+json\",\"manifests\":[{\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"digest\":\"$amd\",\"size\":$amd_size,\"platform\":{\"architecture\":\"amd64\",\"os\":\"linux\"}},{\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"digest\":\"sha256:$arm\",\"size\":$arm_size,\"platform\":{\"architecture\":\"arm64\",\"os\":\"linux\",\"variant\":\"v8\"}}]}")
  echo "{\"schemaVersion\":2,\"manifests\":[{\"mediaType\":\"application/vnd.oci.image.index.v1+json\",\"digest\":\"sha256:$idx\",\"size\":$idx_size,\"annotations\":{\"org.opencontainers.image.ref.name\":\"multi\"}}]}" > "$M/index.json"
  touch "$OUT/multi.done"
fi

# --- debian-app ----------------------------------------------------------------------------
# Converts an overlayfs upper dir into an OCI layer tar: 0/0 char devices become .wh.NAME,
# trusted.overlay.opaque=y dirs get .wh..wh..opq, overlay's own xattrs are dropped.
upper_to_layer() {
  local upper=$1 out=$2 stage="$OUT/work/stage"
  rm -rf "$stage" && cp -a "$upper" "$stage"
  find "$stage" -type c -print0 | while IFS= read -r -d '' f; do
    if [ "$(stat -c '%t:%T' "$f")" = "0:0" ]; then
      rm "$f"; touch -r "$(dirname "$f")" "$(dirname "$f")/.wh.$(basename "$f")"
    fi
  done
  find "$stage" -type d -print0 | while IFS= read -r -d '' d; do
    if [ "$(getfattr --absolute-names --only-values -n trusted.overlay.opaque "$d" 2>/dev/null)" = "y" ]; then
      touch -r "$d" "$d/.wh..wh..opq"
    fi
  done
  tar --xattrs --xattrs-include='*' --xattrs-exclude='trusted.overlay.*' --numeric-owner --sort=name \
    -C "$stage" -cf "$out" .
  rm -rf "$stage"
}

if [ ! -f "$OUT/debian.done" ]; then
  W="$OUT/work"; rm -rf "$W"; mkdir -p "$W/upper" "$W/ovl" "$W/root"
  log "layer 1: debootstrap minbase"
  gzip -dc "$DATA/minbase.tar.gz" > "$W/l1.tar"
  log "layer 2: apt-get install python3 gcc perl in an overlayfs chroot (a few minutes)"
  mount -t overlay overlay -o "lowerdir=$DATA/minbase,upperdir=$W/upper,workdir=$W/ovl" "$W/root"
  cleanup() { for m in sys proc dev; do umount -l "$W/root/$m" 2>/dev/null || true; done; umount -l "$W/root" 2>/dev/null || true; }
  trap cleanup EXIT
  mount -t proc proc "$W/root/proc"; mount -t sysfs sys "$W/root/sys"; mount --rbind /dev "$W/root/dev"
  cp /etc/resolv.conf "$W/root/etc/resolv.conf"
  chroot "$W/root" /bin/sh -ec 'export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends python3 gcc libc6-dev perl >/dev/null
    apt-get clean; rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/log/apt/eipp.log.xz'
  cleanup; trap - EXIT
  upper_to_layer "$W/upper" "$W/l2.tar"
  log "layer 3: the app"
  mkdir -p "$W/app/app" && printf 'print("hello from the hb test app")\n' > "$W/app/app/main.py"
  printf 'name = "demo"\nworkers = 4\n' > "$W/app/app/config.toml"
  tar --numeric-owner --owner=0 --group=0 --sort=name -C "$W/app" -cf "$W/l3.tar" .
  log "v2: one more package (less) and small edits"
  rm -rf "$W/v2" && cp -a "$W/upper" "$W/v2"
  ( cd "$W" && apt-get download -q less >/dev/null 2>&1 ) && dpkg-deb -x "$W"/less_*.deb "$W/v2"
  echo "# v2" >> "$W/v2/etc/bash.bashrc"
  upper_to_layer "$W/v2" "$W/l2v2.tar"
  printf 'name = "demo"\nworkers = 8\n' > "$W/app/app/config.toml"
  tar --numeric-owner --owner=0 --group=0 --sort=name -C "$W/app" -cf "$W/l3v2.tar" .
  for comp in gzip zstd; do
    mklayout "$OUT/debian-v1-$comp" v1 $comp '["python3","/app/main.py"]' "$W/l1.tar" "$W/l2.tar" "$W/l3.tar"
    mklayout "$OUT/debian-v2-$comp" v2 $comp '["python3","/app/main.py"]' "$W/l1.tar" "$W/l2v2.tar" "$W/l3v2.tar"
  done
  rm -rf "$W"
  touch "$OUT/debian.done"
fi

push "$OUT/busybox-gzip" latest "$OPEN/busybox:latest"
push "$OUT/busybox-zstd" zstd "$OPEN/busybox:zstd"
push "$OUT/multi" multi "$OPEN/multi:latest" --all
push "$OUT/busybox-gzip" latest "$OPEN/busybox:v2s2" --format v2s2
push "$OUT/multi" multi "$OPEN/multi:v2s2" --all --format v2s2
push "$OUT/busybox-gzip" latest "$BASIC/private/busybox:latest" --dest-creds hb:hb-secret
push "$OUT/busybox-gzip" latest "$TOKEN/private/busybox:latest" --dest-creds hb:hb-secret
push "$OUT/busybox-gzip" latest "$TLS/busybox:latest"
push "$OUT/debian-v1-gzip" v1 "$OPEN/debian-app:v1"
push "$OUT/debian-v2-gzip" v2 "$OPEN/debian-app:v2"
push "$OUT/debian-v1-zstd" v1 "$OPEN/debian-app:v1-zstd"
push "$OUT/debian-v2-zstd" v2 "$OPEN/debian-app:v2-zstd"
log "ready"
