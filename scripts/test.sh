#!/usr/bin/env bash
# The whole test suite: installs what it needs, builds offline test material (cached under
# /var/tmp/hb-testdata), then runs every unit and end-to-end test. Needs root (device nodes,
# ownership, trusted.* xattrs are part of what is tested).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "scripts/test.sh: run as root (the tests create device nodes and chown files)" >&2; exit 1; }
scripts/setup.sh
scripts/testdata.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --workspace --all-targets
cargo test --workspace "$@"
