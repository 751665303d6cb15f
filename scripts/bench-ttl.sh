#!/usr/bin/env bash
# Warm metadata under a shared mount (1 s entry/attr timeouts) against a locked one (60 s):
# `stat` of every file of a 5,000-file tree, 1.1 s after the previous pass (so 1 s timeouts
# have expired), ROUNDS times in each mode, in one run. Prints medians and the ratio.
#
# Usage (as root): scripts/bench-ttl.sh        ROUNDS=5 scripts/bench-ttl.sh
set -euo pipefail
ROUNDS=${ROUNDS:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
[ "$(id -u)" -eq 0 ] || { echo "bench-ttl: run as root (it mounts)" >&2; exit 1; }
if [ -z "${CACHEFS:-}" ]; then
    (cd "$ROOT" && cargo build --release --quiet)
    CACHEFS="$ROOT/target/release/cachefs"
fi
S=$(mktemp -d /var/tmp/cachefs-bench-ttl.XXXXXX)
trap 'rm -rf "$S"' EXIT
for mode in shared locked; do
    "$CACHEFS" --store "$S/store" run --mount "type=cache,id=$mode,target=$S/t-$mode,sharing=$mode" -- \
        sh -c "mkdir -p '$S/t-$mode/tree' && cd '$S/t-$mode/tree' && for d in \$(seq 1 50); do mkdir d\$d; for f in \$(seq 1 100); do echo x > d\$d/f\$f; done; done"
done
for mode in shared locked; do
    "$CACHEFS" --store "$S/store" run --mount "type=cache,id=$mode,target=$S/t-$mode,sharing=$mode" -- \
        sh -c "cd '$S/t-$mode/tree' && find . -type f > ../list && stat \$(cat ../list) > /dev/null &&
               for r in \$(seq 1 $ROUNDS); do sleep 1.1; s=\$(date +%s%N); stat \$(cat ../list) > /dev/null;
               e=\$(date +%s%N); echo \$(( (e - s) / 1000 )); done" > "$S/$mode.us"
done
python3 - "$S/shared.us" "$S/locked.us" <<'PY'
import statistics, sys
sh = statistics.median(int(l) for l in open(sys.argv[1])) / 1000
lo = statistics.median(int(l) for l in open(sys.argv[2])) / 1000
print(f"warm stat of 5000 files, median: shared (1 s timeouts) {sh:.0f} ms, locked (60 s) {lo:.0f} ms, {sh/lo:.1f}x")
PY
