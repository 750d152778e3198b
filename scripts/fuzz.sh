#!/usr/bin/env bash
# Coverage-guided fuzzing of hb's parsers of outside input (fuzz/, libFuzzer via libfuzzer-sys),
# on stable Rust: sancov instrumentation through RUSTFLAGS, the way cargo-fuzz does it, without
# cargo-fuzz or nightly. Runs each target for SECONDS (default 60) one after another, then prints
# a table: executions, exec/s, coverage gained, new corpus units, crashes.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]      every target when none is named
#   HB_FUZZ_RUNS=N scripts/fuzz.sh ...         also stop a target after N executions
#
# Builds are cached in /var/tmp/hb-fuzz-target (HB_FUZZ_TARGET_DIR); the working corpus (seeds
# from fuzz/corpus/<target>/ plus what runs found), logs and crash files are kept under
# /var/tmp/hb-fuzz (HB_FUZZ_WORK), so runs never write into the tree. Exits non-zero when any
# target crashed, hung (-timeout=10), ran out of memory (-rss_limit_mb=2048) or did not run;
# the file libFuzzer wrote for it is named in the output (replay: `BINARY FILE`).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
export PATH="$HOME/.cargo/bin:$PATH"

# g++ builds libFuzzer (no clang needed); librocksdb-dev, libclang-dev and protoc build hb's crates.
scripts/setup.sh

target_dir=${HB_FUZZ_TARGET_DIR:-/var/tmp/hb-fuzz-target}
work=${HB_FUZZ_WORK:-/var/tmp/hb-fuzz}
triple=$(rustc -vV | sed -n 's/^host: //p')
# --target keeps these flags off build scripts and proc macros (as cargo-fuzz does).
export CARGO_TARGET_DIR=$target_dir
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing"
# A separate workspace does not inherit the main one's [patch.crates-io]: fuzz/Cargo.toml must
# name every patched crate too, or cargo resolves the unpatched one from crates.io.
patched() { sed -n '/^\[patch.crates-io\]/,/^\[/{/^[A-Za-z0-9_-]* *=/s/ *=.*//p}' "$1" | sort; }
if [ "$(patched Cargo.toml)" != "$(patched fuzz/Cargo.toml)" ]; then
  echo "fuzz: fuzz/Cargo.toml's [patch.crates-io] must name the crates Cargo.toml patches:" >&2
  echo "  Cargo.toml: $(patched Cargo.toml | tr '\n' ' ')  fuzz/Cargo.toml: $(patched fuzz/Cargo.toml | tr '\n' ' ')" >&2
  exit 1
fi
build_start=$(date +%s)
# hb's crates at exactly the versions the workspace locks; cargo adds libfuzzer-sys to the copy.
cp Cargo.lock fuzz/Cargo.lock
(cd fuzz && cargo build --release --target "$triple" --bins)
echo "fuzz: build took $(( $(date +%s) - build_start )) s"
bin_dir=$target_dir/$triple/release

if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(sed -n 's/^name = "\([a-z_]*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^hb-fuzz$')
fi

# Scratch for targets that need files (the ingest's store, config files): tmpfs when there is one.
if [ -d /dev/shm ] && [ -w /dev/shm ]; then scratch=/dev/shm/hb-fuzz.$$; else scratch=$work/scratch.$$; fi
mkdir -p "$scratch"
trap 'rm -rf "$scratch"' EXIT
export HB_FUZZ_TMP=$scratch

failed=0
rows=()
for t in "${targets[@]}"; do
  bin=$bin_dir/$t
  [ -x "$bin" ] || { echo "fuzz: no target $t" >&2; exit 2; }
  corpus=$work/corpus/$t
  artifacts=$work/artifacts/$t
  log=$work/logs/$t.log
  mkdir -p "$corpus" "$artifacts" "$(dirname "$log")"
  seeds=fuzz/corpus/$t
  runs=()
  [ -n "${HB_FUZZ_RUNS:-}" ] && runs=(-runs="$HB_FUZZ_RUNS")
  dict=()
  [ -f "fuzz/dict/$t.dict" ] && dict=(-dict="fuzz/dict/$t.dict")
  echo "fuzz: $t for ${secs} s (log $log)"
  start=$(date +%s.%N)
  rc=0
  # The working corpus first (new units go there), the checked-in seeds read only.
  "$bin" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 "${runs[@]}" \
    -artifact_prefix="$artifacts/" "${dict[@]}" "$corpus" "$seeds" >"$log" 2>&1 || rc=$?
  elapsed=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.0f", e - s }')
  stat() { sed -n "s/^stat::$1: *//p" "$log" | tail -1; }
  execs=$(stat number_of_executed_units)
  rate=$(stat average_exec_per_sec)
  units=$(stat new_units_added)
  cov0=$(grep -m1 -o 'INITED cov: [0-9]*' "$log" | grep -o '[0-9]*$' || true)
  cov1=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || true)
  crash=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
  if [ "$rc" -ne 0 ] || [ -n "$crash" ] || [ -z "$execs" ]; then
    failed=1
    result="FAILED (exit $rc)${crash:+: $crash}"
    grep -m1 -E "panicked at|ERROR: libFuzzer|==ERROR" "$log" | sed 's/^/fuzz:   /' || true
  else
    result=ok
  fi
  rows+=("$(printf '%-17s %12s %8s %6s %13s %6s  %s' "$t" "${execs:-?}" "${rate:-?}" "${elapsed}" \
    "${cov0:-?} -> ${cov1:-?}" "${units:-?}" "$result")")
done

printf '\n%-17s %12s %8s %6s %13s %6s  %s\n' target executions exec/s secs coverage new result
printf '%s\n' "${rows[@]}"
if [ "$failed" -ne 0 ]; then
  echo "fuzz: FAILED: a target crashed, hung or ran out of memory (crash files above; replay with the binary in $bin_dir)" >&2
  exit 1
fi
echo "fuzz: ${#targets[@]} targets, no crash, hang or out-of-memory"
