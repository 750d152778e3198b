#!/usr/bin/env bash
# The whole test suite: installs what it needs, builds offline test material and images (cached
# under /var/tmp), starts real registries on loopback, then runs every unit and end-to-end test. Needs root (device nodes,
# ownership, trusted.* xattrs are part of what is tested).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "scripts/test.sh: run as root (the tests create device nodes and chown files)" >&2; exit 1; }
scripts/setup.sh
scripts/testdata.sh
scripts/images.sh     # starts the loopback registries and pushes the test images
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --workspace --all-targets
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace "$@" 2>&1 | tee "$log" || status=$?
# One closing line with the totals of every test binary.
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit $status
