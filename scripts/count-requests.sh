#!/usr/bin/env bash
# FUSE round trips per file: mounts a cache with request logging on, runs small-file workloads
# through it and counts the requests of each, by opcode, per file. The figures behind the "round
# trips" tables in docs/BENCHMARKS.md; they count requests, so they are exact and need no rounds.
#
# Usage (as root):
#   scripts/count-requests.sh                      # default mount (sharing=shared)
#   SPEC_EXTRA=sharing=locked scripts/count-requests.sh
#   MOUNT_ARGS=--no-passthrough scripts/count-requests.sh
#
# Environment:
#   N           files per workload (default 2000, in N/100 directories)
#   CACHEFS     the cachefs binary (default: cargo build --release, target/release/cachefs)
#   SPEC_EXTRA  extra keys for the mount spec, e.g. "sharing=locked" or "xattrs=on"
#   MOUNT_ARGS  extra arguments for `cachefs mount`
#   WORK        scratch directory (default /var/tmp/cachefs-count)
#
# Workloads (each preceded by a lookup of a marker name, which splits the log):
#   create      perl: open(O_CREAT|O_WRONLY), write 4 KiB, close, N times
#   stat        lstat of each, right after
#   stat-later  lstat of each again after 1.1 s (past a 1 s TTL)
#   cat         cat of each (find | xargs cat)
#   untar       tar -xf of the same tree (N files) into a new directory
#   ls          ls -lR of that tree
#   rm          rm -rf of both trees (counted per file removed)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
N=${N:-2000}
WORK=${WORK:-/var/tmp/cachefs-count}
SPEC_EXTRA=${SPEC_EXTRA:-}
# Requests are counted from fuser's log, so they must travel through /dev/fuse (the io_uring
# transport carries the same requests).
read -r -a MOUNT_ARGS <<<"--io-uring off ${MOUNT_ARGS:-}"

die() { echo "count-requests: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (it mounts)"
if [ -z "${CACHEFS:-}" ]; then
    (cd "$ROOT" && cargo build --release -q) || die "cargo build failed"
    CACHEFS=$ROOT/target/release/cachefs
fi

rm -rf "$WORK"
mkdir -p "$WORK/mnt" "$WORK/src"
LOG=$WORK/requests.log
STORE=$WORK/store
cleanup() {
    "$CACHEFS" --store "$STORE" umount "$WORK/mnt" 2>/dev/null || true
    [ -n "${SERVER:-}" ] && wait "$SERVER" 2>/dev/null || true
}
trap cleanup EXIT

# The tarball for untar: the same shape as the create workload, made natively.
perl -e '
    my ($dir, $n) = @ARGV; my $buf = "x" x 4096;
    for my $d (0 .. int(($n - 1) / 100)) { mkdir "$dir/d$d" or die }
    for my $i (0 .. $n - 1) {
        my $d = int($i / 100);
        open(my $f, ">", "$dir/d$d/f$i") or die; print $f $buf; close $f;
    }' "$WORK/src" "$N"
tar -C "$WORK/src" -cf "$WORK/tree.tar" .

spec="type=cache,id=count,target=$WORK/mnt"
[ -n "$SPEC_EXTRA" ] && spec="$spec,$SPEC_EXTRA"
RUST_LOG=fuser::request=debug "$CACHEFS" --store "$STORE" mount --foreground \
    "${MOUNT_ARGS[@]}" --mount "$spec" 2>"$LOG" &
SERVER=$!
for _ in $(seq 100); do mountpoint -q "$WORK/mnt" && break; sleep 0.1; done
mountpoint -q "$WORK/mnt" || die "the mount did not come up (see $LOG)"

M=$WORK/mnt
mark() { stat "$M/.mark-$1" >/dev/null 2>&1 || true; }

mark create
mkdir "$M/c"
perl -e '
    use Fcntl; my ($dir, $n) = @ARGV; my $buf = "x" x 4096;
    for my $d (0 .. int(($n - 1) / 100)) { mkdir "$dir/d$d" or die }
    for my $i (0 .. $n - 1) {
        my $d = int($i / 100);
        sysopen(my $f, "$dir/d$d/f$i", O_CREAT | O_WRONLY) or die; syswrite($f, $buf); close $f;
    }' "$M/c" "$N"
stat_all() {
    perl -e 'my ($dir, $n) = @ARGV;
        for my $i (0 .. $n - 1) { my $d = int($i / 100); lstat("$dir/d$d/f$i") or die "$!" }' "$M/c" "$N"
}
mark stat
stat_all
sleep 1.1
mark stat-later
stat_all
mark cat
find "$M/c" -type f -print0 | xargs -0 cat >/dev/null
mark untar
mkdir "$M/t"
tar -C "$M/t" -xf "$WORK/tree.tar"
mark ls
ls -lR "$M/t" >/dev/null
mark rm
rm -rf "$M/c" "$M/t"
mark end
sync

cleanup
trap - EXIT

echo "Round trips per file, N=$N, spec: $spec ${MOUNT_ARGS[*]}"
awk -v n="$N" '
    / LOOKUP name "\.mark-/ { match($0, /\.mark-[a-z-]+/); phase = substr($0, RSTART + 6, RLENGTH - 6); order[++np] = phase; next }
    phase == "" || phase == "end" { next }
    / FUSE\(/ {
        for (i = 1; i <= NF; i++) if ($i == "ino") { op = $(i + 2); break }
        if (op !~ /^[A-Z_0-9]+$/) next
        count[phase, op]++; total[phase]++; ops[op] = 1
    }
    END {
        for (p = 1; p <= np; p++) {
            ph = order[p]; if (ph == "end") continue
            # rm removes both trees: per file removed.
            d = (ph == "rm") ? 2 * n : n
            line = sprintf("%-11s %6.2f  ", ph, total[ph] / d)
            for (op in ops) if ((ph, op) in count) line = line sprintf(" %s %.2f", op, count[ph, op] / d)
            print line
        }
    }' "$LOG"
