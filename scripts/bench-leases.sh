#!/usr/bin/env bash
# Lease benchmark (issue 3), two figures, each against a baseline measured in the same run:
#
# 1. Hand-over: the time from a sharing=locked holder's command exiting to the next waiter's
#    command running. Each round starts a holder `cachefs run ... sharing=locked -- sh -c
#    'sleep 0.3; date +%s%N >> exits'` and, once it holds the lease, a waiter `cachefs run ...
#    sharing=locked -- sh -c 'date +%s%N >> starts'`; the figure is starts - exits (it includes
#    the holder's unmount, the lease release, the waiter's wake-up, its mount and the start of
#    its sh). Baseline: the same two shells handed over by flock(1) on a lock file, which is
#    the least any lock hand-over between two processes costs (no mounts). BuildKit polls
#    every 100 ms, i.e. 50 ms on average.
# 2. Private under load: `cachefs run --mount ...,sharing=private -- true` while 3 instances
#    of the cache are held by background `cachefs mount --sharing private`; baselines: the same
#    command with nothing held, and `true` itself. hyperfine, medians.
#
# Usage (as root): scripts/bench-leases.sh      ROUNDS=50 RUNS=50 scripts/bench-leases.sh
set -euo pipefail

ROUNDS=${ROUNDS:-30}
RUNS=${RUNS:-40}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
log() { echo "bench-leases: $*" >&2; }
die() { log "$*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (it mounts)"
command -v hyperfine >/dev/null || die "hyperfine is missing (apt-get install hyperfine)"
command -v flock >/dev/null || die "flock (util-linux) is missing"

if [ -z "${CACHEFS:-}" ]; then
    (cd "$ROOT" && cargo build --release --quiet)
    CACHEFS="$ROOT/target/release/cachefs"
fi
WORK=$(mktemp -d /var/tmp/cachefs-bench-leases.XXXXXX)
STORE="$WORK/store"
held=()
cleanup() {
    for t in "${held[@]}"; do "$CACHEFS" --store "$STORE" umount "$t" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

# Waits until `cachefs ls` shows n held leases of id $1.
wait_held() {
    local id=$1 n=$2 i
    for i in $(seq 1 500); do
        if [ "$("$CACHEFS" --store "$STORE" ls --json 2>/dev/null |
            python3 -c "import json,sys; print(sum(1 for r in json.load(sys.stdin) if r['id']=='$id' and r['state']=='held'))")" -ge "$n" ]; then
            return 0
        fi
        sleep 0.01
    done
    die "lease of $id never held"
}

median_ms() {
    python3 -c "
import statistics, sys
a = [int(l) for l in open('$1')]
b = [int(l) for l in open('$2')]
d = sorted((y - x) / 1e6 for x, y in zip(a, b))
print(f'{statistics.median(d):.1f} {d[0]:.1f} {d[-1]:.1f} {len(d)}')"
}

log "hand-over: $ROUNDS rounds, cachefs vs flock(1)"
: > "$WORK/exits"; : > "$WORK/starts"
: > "$WORK/f_exits"; : > "$WORK/f_starts"
for r in $(seq 1 "$ROUNDS"); do
    "$CACHEFS" --store "$STORE" run --mount "type=cache,id=ho,target=$WORK/t1,sharing=locked" -- \
        sh -c "sleep 0.3; date +%s%N >> '$WORK/exits'" &
    h=$!
    wait_held ho 1
    "$CACHEFS" --store "$STORE" run --mount "type=cache,id=ho,target=$WORK/t2,sharing=locked" -- \
        sh -c "date +%s%N >> '$WORK/starts'" 2>/dev/null
    wait "$h"

    flock "$WORK/lock" sh -c "sleep 0.3; date +%s%N >> '$WORK/f_exits'" &
    h=$!
    sleep 0.1
    flock "$WORK/lock" sh -c "date +%s%N >> '$WORK/f_starts'"
    wait "$h"
done
read -r c_med c_min c_max c_n < <(median_ms "$WORK/exits" "$WORK/starts")
read -r f_med f_min f_max f_n < <(median_ms "$WORK/f_exits" "$WORK/f_starts")

log "private run with 3 instances held: hyperfine, $RUNS runs"
for i in 1 2 3; do
    "$CACHEFS" --store "$STORE" mount --id pv --sharing private "$WORK/held$i"
    held+=("$WORK/held$i")
done
"$CACHEFS" --store "$STORE" run --mount "type=cache,id=free,target=$WORK/f,sharing=private" -- true
hyperfine -N --warmup 3 --runs "$RUNS" --export-json "$WORK/h.json" \
    -n held3 "$CACHEFS --store $STORE run --mount type=cache,id=pv,target=$WORK/p,sharing=private -- true" \
    -n free "$CACHEFS --store $STORE run --mount type=cache,id=free,target=$WORK/f,sharing=private -- true" \
    -n true "true" >&2
instances=$(ls "$STORE/caches/"pv-*/ | wc -l)
read -r p_held p_free p_true < <(python3 -c "
import json
r = {x['command']: x['median'] * 1000 for x in json.load(open('$WORK/h.json'))['results']}
print(f\"{r['held3']:.1f} {r['free']:.1f} {r['true']:.2f}\")")

cat <<EOF

| figure | cachefs | baseline | ratio |
|---|---:|---:|---:|
| lock hand-over, median of $c_n (min / max) | $c_med ms ($c_min / $c_max) | flock(1): $f_med ms ($f_min / $f_max) | $(python3 -c "print(f'{$c_med/$f_med:.1f}x')") |
| \`run\` sharing=private, 3 instances held, median of $RUNS | $p_held ms | same, nothing held: $p_free ms | $(python3 -c "print(f'{$p_held/$p_free:.2f}x')") |
| \`true\` alone | | $p_true ms | |

instances of the private cache after the run: $instances (3 held + 1 reused)
EOF
