#!/usr/bin/env bash
# Builds a ten-version image series for the dedup benchmark, cached under $HB_BENCH_DATA
# (default /var/tmp/hb-bench). Each version is the Debian minbase rootfs (scripts/testdata.sh)
# plus a growing set of real Debian packages (unpacked with dpkg-deb) and small edits, written
# as one full-rootfs tar+gzip layer, as a rebuilt single-layer image would be.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${HB_TESTDATA:-/var/tmp/hb-testdata}
OUT=${HB_BENCH_DATA:-/var/tmp/hb-bench}/series
RECIPE=1
[ -f "$DATA/minbase/.hb-complete" ] || scripts/testdata.sh
mkdir -p "$OUT/debs"
if [ "$(cat "$OUT/stamp" 2>/dev/null)" = "$RECIPE" ] && [ -f "$OUT/v10.tar.gz" ]; then
  echo "series: cached in $OUT" >&2
else
rm -f "$OUT"/v*.tar.gz
# Packages added version by version (each version keeps the earlier ones).
STEPS=(
  ""
  "libcurl4 curl libnghttp2-14 librtmp1 libssh2-1 libpsl5 libbrotli1"
  "libpython3.11-minimal python3.11-minimal libexpat1"
  ""
  "libpython3.11-stdlib python3.11 libsqlite3-0 libreadline8"
  "perl-modules-5.36 libperl5.36 perl"
  ""
  "vim-tiny vim-common xxd"
  "git git-man liberror-perl"
  "zstd xz-utils bzip2 less"
)
( cd "$OUT/debs" && apt-get download -q $(echo "${STEPS[@]}") >/dev/null ) || {
  echo "series: apt-get download failed (needs Debian's package mirror)" >&2; exit 1; }
work=$(mktemp -d /dev/shm/hb-series.XXXXXX 2>/dev/null || mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -a "$DATA/minbase" "$work/root" && rm -f "$work/root/.hb-complete"
for i in $(seq 1 10); do
  for p in ${STEPS[$((i-1))]}; do dpkg-deb -x "$OUT"/debs/"${p}"_*.deb "$work/root"; done
  # Small edits every version: a config value, a log line, a rebuilt "app" file.
  echo "build $i" >> "$work/root/etc/motd"
  printf 'VERSION=%s\n' "$i" > "$work/root/etc/app-release"
  head -c $((200000 + i * 1000)) /dev/urandom > "$work/root/usr/local/bin/app"
  find "$work/root/var/log" -type f -exec sh -c 'echo "v$0" >> "$1"' "$i" {} \;
  # Every rebuild touches mtimes, as image builds do.
  touch "$work/root/etc" "$work/root/usr/local/bin"
  tar --xattrs --numeric-owner --sort=name -C "$work/root" -cf - . | pigz -6 > "$OUT/v$i.tar.gz"
  echo "series: v$i $(stat -c %s "$OUT/v$i.tar.gz") bytes" >&2
done
echo "$RECIPE" > "$OUT/stamp"
fi

# `bench/series.sh push REGISTRY`: each version as a one-layer image REGISTRY/hb-series:vN (the
# gzip'ed tar above as its layer blob, unchanged), for the update benchmark.
if [ "${1:-}" = push ]; then
  reg=${2:?usage: bench/series.sh push REGISTRY}
  for i in $(seq 1 10); do
    dir=$(mktemp -d) && mkdir -p "$dir/blobs/sha256"
    echo '{"imageLayoutVersion":"1.0.0"}' > "$dir/oci-layout"
    blob="$OUT/v$i.tar.gz"
    d=$(sha256sum "$blob" | cut -d' ' -f1); size=$(stat -c %s "$blob")
    diff=$(pigz -dc "$blob" | sha256sum | cut -d' ' -f1)
    cp "$blob" "$dir/blobs/sha256/$d"
    put() { local h; h=$(printf '%s' "$1" | sha256sum | cut -d' ' -f1); printf '%s' "$1" > "$dir/blobs/sha256/$h"; echo "$h $(printf '%s' "$1" | wc -c)"; }
    read -r c csize < <(put "{\"architecture\":\"amd64\",\"os\":\"linux\",\"created\":\"2024-01-01T00:00:00Z\",\"config\":{\"Cmd\":[\"/bin/sh\"]},\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[\"sha256:$diff\"]}}")
    read -r m msize < <(put "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"config\":{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"sha256:$c\",\"size\":$csize},\"layers\":[{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"sha256:$d\",\"size\":$size}]}")
    echo "{\"schemaVersion\":2,\"manifests\":[{\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"digest\":\"sha256:$m\",\"size\":$msize,\"annotations\":{\"org.opencontainers.image.ref.name\":\"v$i\"}}]}" > "$dir/index.json"
    skopeo copy --quiet --dest-tls-verify=false "oci:$dir:v$i" "docker://$reg/hb-series:v$i"
    rm -rf "$dir"
    echo "series: pushed $reg/hb-series:v$i" >&2
  done
fi
