#!/usr/bin/env bash
# Release build of the two executables (and the benchmarks), with `hb` linked statically.
#
# `hb` is the command that starts containers, and it runs once per container: a static `hb`
# skips the dynamic loader's work (loading libc and libgcc_s, symbol binding, their CPU-feature
# probes: each CPUID traps to the hypervisor on a VM) and starts ~0.3 ms sooner (`perf stat -r 300
# hb ps -a`: 1.18-1.29 ms static-pie, 1.50-1.61 ms dynamic). It stays position-independent
# (static-pie): hb runs as root, and a fixed load address would hand an attacker the addresses of
# all its code (no ASLR for the executable's own image). That costs ~0.15 ms of self-relocation
# per start (`hb ps -q`: 1.01 ms static-pie against 0.83-0.86 at a fixed address), which we keep
# paying. The link is checked below: an executable that is not PIE fails the build. Cargo has no
# per-binary rustflags, so `hb` is linked again with `cargo rustc` after the ordinary build; a
# later `cargo build --release` links it dynamically again (both work). `hb-engine` stays dynamic
# (it links Debian's RocksDB).
#
# Prints the two paths on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
scripts/setup.sh
cargo build --quiet --release -p hb-cli -p hb-engine -p hb-bench
if ! cargo rustc --quiet --release -p hb-cli --bin hb -- -C target-feature=+crt-static -C relocation-model=pic; then
    echo "build-release: a static hb did not link (no static glibc? Debian's libc6-dev has it); hb stays dynamic" >&2
    cargo build --quiet --release -p hb-cli
fi
TARGET="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
# ASLR for the executable's own image: an ELF of type DYN (PIE), never EXEC.
if ! LC_ALL=C readelf -h "$TARGET/release/hb" | grep -q 'Type:.*DYN'; then
    echo "build-release: $TARGET/release/hb is not position-independent (no ASLR for a root-run binary)" >&2
    exit 1
fi
echo "$TARGET/release/hb"
echo "$TARGET/release/hb-engine"
