#!/usr/bin/env bash
# Two builds of hb side by side on cold `hb run`s (a change measured against the code before it):
#   bench/ab-cold-run.sh DIR_A DIR_B [IMAGE [TAG [ROUNDS]]]
# DIR_A and DIR_B each hold an `hb` and its `hb-engine` (copies of /var/tmp/hb-target/release/ from
# scripts/build-release.sh at the two commits). Each round starts the image once with each build,
# in a random order, each on a fresh store in /var/tmp after dropping the page cache, with the
# registry started by scripts/registry.sh (`scripts/images.sh` and `hb-bench coldstart` push the
# bench/* images). Prints each start's phases (ms from the start: resolved, indexes fetched,
# mounted, runtime started) and first output, then the medians per build.
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,9p' "$0" >&2; exit 2; }
A=$1 B=$2 IMAGE=${3:-py-app} TAG=${4:-hb} ROUNDS=${5:-8}
REG=${HB_BENCH_REGISTRY:-127.0.0.1:15000}
out=$(mktemp)
trap 'rm -f "$out"' EXIT

one() { # $1: build dir; prints "resolved indexes mounted runtime first"
  local d t0 t1 line=""
  d=$(mktemp -d /var/tmp/hb-ab-XXXX)
  sync; echo 3 > /proc/sys/vm/drop_caches
  t0=$(date +%s%N)
  HB_LOG=hb::phase=debug "$1/hb" --root "$d/store" -q run --rm --plain-http "$REG/bench/$IMAGE:$TAG" \
    2>"$d/err" | head -c 1 >/dev/null
  t1=$(date +%s%N)
  for p in resolved "indexes fetched" mounted "runtime started"; do
    at=$(grep -m1 "$p" "$d/err" | cut -c1-26 || true)
    if [ -n "$at" ]; then line="$line $(( ($(date -d "$at" +%s%N) - t0) / 1000000 ))"; else line="$line -"; fi
  done
  echo "$line $(( (t1 - t0) / 1000000 ))"
  sleep 1; rm -rf "$d"
}

for _ in $(seq "$ROUNDS"); do
  for side in $(printf 'A\nB\n' | shuf); do
    dir=$A; [ "$side" = B ] && dir=$B
    r=$(one "$dir")
    echo "$side$r" | tee -a "$out"
  done
done
python3 - "$out" "$A" "$B" <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    side, *v = line.split()
    rows.setdefault(side, []).append(v)
print("build | resolved | indexes fetched | mounted | runtime started | first output (median ms)")
for side, name in (("A", sys.argv[2]), ("B", sys.argv[3])):
    cols = list(zip(*rows.get(side, [])))
    med = [statistics.median(int(x) for x in c if x != "-") if any(x != "-" for x in c) else "-" for c in cols]
    print(name, "|", " | ".join(str(m) for m in med))
EOF
