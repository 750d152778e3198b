#!/usr/bin/env bash
# Builds the Debian package: hb and hb-engine, shell completions, man pages, hb.service and
# hb-proxy.service, a commented /etc/hb/hb.toml (a conffile), the docs. Its library dependencies
# are read off the executables by dpkg-shlibdeps (RocksDB as this release of Debian names it), the
# programs hb runs are declared by name. Prints the .deb's path on stdout.
#
#   scripts/package.sh                      release build (scripts/build-release.sh), xz
#   scripts/package.sh --bin-dir DIR        package DIR/hb and DIR/hb-engine as they are built
#   scripts/package.sh --fast               gzip -1 instead of xz (tests)
#   scripts/package.sh --out DIR            where the .deb goes [default: the target folder]
#
# Installing it: `apt install ./hb_<version>_<arch>.deb` (apt fetches the dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

bin_dir="" out="" compress=(-Zxz -z9)
while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) bin_dir="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --fast) compress=(-Zgzip -z1); shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "package: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
for tool in dpkg-deb dpkg-shlibdeps objcopy; do
  command -v "$tool" >/dev/null || { echo "package: $tool is missing (scripts/setup.sh installs it)" >&2; exit 1; }
done

if [ -z "$bin_dir" ]; then
  bin_dir="$(dirname "$(scripts/build-release.sh | head -n1)")"
fi
for b in hb hb-engine; do
  [ -x "$bin_dir/$b" ] || { echo "package: $bin_dir/$b is missing (build it first)" >&2; exit 1; }
done
target="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
out="${out:-$target}"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)"
arch="$(dpkg --print-architecture)"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
root="$work/root"
mkdir -p "$root/DEBIAN" "$root/usr/bin" "$root/usr/lib/systemd/system" "$root/etc/hb" \
  "$root/usr/share/doc/hb" "$root/usr/share/man/man1" "$root/usr/share/bash-completion/completions" \
  "$root/usr/share/zsh/vendor-completions" "$root/usr/share/fish/vendor_completions.d"

# The executables, without debug sections (a distribution ships those apart).
for b in hb hb-engine; do
  objcopy --strip-debug "$bin_dir/$b" "$root/usr/bin/$b"
  chmod 0755 "$root/usr/bin/$b"
done
engine="$root/usr/bin/hb-engine"
"$engine" completion bash > "$root/usr/share/bash-completion/completions/hb"
"$engine" completion zsh > "$root/usr/share/zsh/vendor-completions/_hb"
"$engine" completion fish > "$root/usr/share/fish/vendor_completions.d/hb.fish"
"$engine" man "$root/usr/share/man/man1"
gzip -9n "$root"/usr/share/man/man1/*.1

for unit in hb.service hb-proxy.service; do
  sed 's|/usr/local/bin/|/usr/bin/|g' "dist/systemd/$unit" > "$root/usr/lib/systemd/system/$unit"
done
install -m 0644 dist/hb.toml "$root/etc/hb/hb.toml"
echo /etc/hb/hb.toml > "$root/DEBIAN/conffiles"
for doc in README.md ARCHITECTURE.md docs/operators.md docs/proxy.md docs/p2p.md docs/api.md; do
  gzip -9nc "$doc" > "$root/usr/share/doc/hb/$(basename "$doc").gz"
done
cat > "$root/usr/share/doc/hb/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: hb
Source: https://github.com/hyperbox/hb

Files: *
Copyright: the HyperBox authors
License: Apache-2.0
 On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.
EOF

# Shared libraries as dpkg-shlibdeps finds them (it wants a debian/control to read).
mkdir -p "$work/src/debian"
printf 'Source: hb\n\nPackage: hb\nArchitecture: any\n' > "$work/src/debian/control"
shlibs="$(cd "$work/src" && dpkg-shlibdeps -O -e"$root/usr/bin/hb-engine" -e"$root/usr/bin/hb" 2>/dev/null \
  | sed -n 's/^shlibs:Depends=//p')"
[ -n "$shlibs" ] || { echo "package: dpkg-shlibdeps found no library dependencies" >&2; exit 1; }

cat > "$root/DEBIAN/control" <<EOF
Package: hb
Version: $version
Architecture: $arch
Maintainer: HyperBox maintainers <hb@hyperbox.invalid>
Installed-Size: $(du -sk --exclude=DEBIAN "$root" | cut -f1)
Depends: $shlibs, fuse3, runc | crun, ca-certificates
Recommends: erofs-utils, tini
Suggests: containerd
Section: admin
Priority: optional
Homepage: https://github.com/hyperbox/hb
Description: container images that start before they are downloaded
 HyperBox stores container images as content-defined chunks (stored once across
 every image and version), starts them lazily from FUSE mounts while their data
 arrives chunk by chunk (each verified by its BLAKE3 id), serves containerd as a
 remote snapshotter, runs a pull-through registry mirror (hb proxy) and shares
 chunks with LAN peers.
EOF

cat > "$root/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = configure ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload || true
  if [ -z "$2" ]; then
    # First install: the daemon starts now and at boot; the mirror waits for its [proxy] settings.
    systemctl enable --now hb.service || echo "hb: could not start hb.service: see journalctl -u hb" >&2
  else
    # Upgrade: running image mounts and containers outlive the daemon's restart.
    systemctl try-restart hb.service hb-proxy.service || true
  fi
fi
exit 0
EOF
cat > "$root/DEBIAN/prerm" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
  systemctl disable --now hb.service hb-proxy.service || true
fi
exit 0
EOF
cat > "$root/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
# The stores (/var/lib/hb, /var/lib/hb-proxy) hold images and are kept, even on purge, as docker's
# package keeps /var/lib/docker: remove them by hand when they are no longer wanted.
exit 0
EOF
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"

mkdir -p "$out"
deb="$out/hb_${version}_${arch}.deb"
dpkg-deb --root-owner-group "${compress[@]}" --build "$root" "$deb" >/dev/null
echo "package: $deb ($(du -h "$deb" | cut -f1))" >&2
echo "$deb"
