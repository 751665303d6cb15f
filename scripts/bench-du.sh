#!/usr/bin/env bash
# `cachefs du` on a big store (issue 4): CACHES caches (default 1,000) of FILES_PER files
# each (default 1,000: 1,000,000 files in all), with their counters recorded. du reads
# counters and never walks a tree, so its time should not depend on the number of files:
# the baseline in the same run is `cachefs ls` (opens the same store, reads the lease table)
# and the same `du` on a store of one cache.
#
# Then `cachefs gc --max-size` set to 90% of the store, which removes the least recently used
# 10% of it (100 caches, 100,000 files by default): its time and peak memory (/usr/bin/time).
#
# Usage (as root): scripts/bench-du.sh          CACHES=200 FILES_PER=500 scripts/bench-du.sh
#
# Building the store takes a few minutes: each cache is created by `cachefs run -- true`,
# its files are extracted natively into the instance directory, and `cachefs du --verify`
# (timed, a full rescan of every file) records them.
set -euo pipefail
CACHES=${CACHES:-1000}
FILES_PER=${FILES_PER:-1000}
RUNS=${RUNS:-30}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
log() { echo "bench-du: $*" >&2; }
[ "$(id -u)" -eq 0 ] || { log "run as root (it mounts)"; exit 1; }
command -v hyperfine >/dev/null || { log "hyperfine is missing (apt-get install hyperfine)"; exit 1; }
if [ -z "${CACHEFS:-}" ]; then
    (cd "$ROOT" && cargo build --release --quiet)
    CACHEFS="$ROOT/target/release/cachefs"
fi
W=$(mktemp -d /var/tmp/cachefs-bench-du.XXXXXX)
trap 'rm -rf "$W"' EXIT
S=$W/store

log "a tarball of $FILES_PER small files"
mkdir -p "$W/gen"
for i in $(seq 1 "$FILES_PER"); do
    mkdir -p "$W/gen/d$((i % 20))"
    head -c $((100 + i % 4000)) /dev/zero > "$W/gen/d$((i % 20))/f$i"
done
tar -C "$W/gen" -cf "$W/tree.tar" .

log "creating $CACHES caches and extracting the files into them"
for c in $(seq 1 "$CACHES"); do
    "$CACHEFS" --store "$S" run --mount "type=cache,id=cache-$c,target=$W/t" -- true
done
for inst in "$S"/caches/*/1; do tar -C "$inst" -xf "$W/tree.tar"; done

log "recording them with du --verify (a rescan of every file)"
start=$(date +%s%N)
"$CACHEFS" --store "$S" du --verify > /dev/null || true
verify_ms=$(( ($(date +%s%N) - start) / 1000000 ))

mkdir -p "$W/small"
"$CACHEFS" --store "$W/small/store" run --mount "type=cache,id=one,target=$W/t" -- \
    sh -c "tar -C '$W/t' -xf '$W/tree.tar'"

hyperfine -N --warmup 3 --runs "$RUNS" --export-json "$W/h.json" \
    -n du "$CACHEFS --store $S du" \
    -n du-json "$CACHEFS --store $S du --json" \
    -n ls "$CACHEFS --store $S ls" \
    -n du-one-cache "$CACHEFS --store $W/small/store du" >&2
total=$("$CACHEFS" --store "$S" du --json | python3 -c "import json,sys; print(sum(r['disk_bytes'] for r in json.load(sys.stdin)))")
target=$((total / 10 * 9))
/usr/bin/time -f "%e %M" -o "$W/gc.time" "$CACHEFS" --store "$S" gc --max-size "$target" > "$W/gc.out"
read -r gc_s gc_kib < "$W/gc.time"
gc_line=$(tail -1 "$W/gc.out")

python3 - "$W/h.json" "$CACHES" "$FILES_PER" "$verify_ms" <<'PY'
import json, sys
r = {x["command"]: x["median"] * 1000 for x in json.load(open(sys.argv[1]))["results"]}
caches, per, verify = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
print(f"store: {caches} caches, {caches * per} files")
print(f"| command | median |")
print(f"|---|---:|")
for k in ["du", "du-json", "ls", "du-one-cache"]:
    print(f"| {k} | {r[k]:.1f} ms |")
print(f"du / ls: {r['du'] / r['ls']:.2f}x; du (big store) / du (one cache): {r['du'] / r['du-one-cache']:.2f}x")
print(f"du --verify (full rescan of every file): {verify} ms")
PY
echo "gc --max-size (90% of the store): ${gc_s} s, peak RSS $((gc_kib / 1024)) MiB"
echo "  $gc_line"
