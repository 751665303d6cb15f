#!/usr/bin/env bash
# Bind-driver rescan benchmark: what the release of a driver=bind mount costs when the server
# rescans its tree (FILES files, default 100,000 in 1,000 directories), warm, against a plain
# native walk of the same tree. The server logs the rescan as an info line containing
# "rescanned" with fields ms=<N> and files=<N>; this script reads it from the mount's log file.
#
# Steps:
#   1. cachefs mount --store S --log-file L -v --mount
#          type=cache,id=rescan,target=MNT,sharing=locked,driver=bind
#   2. create FILES files of FILE_BYTES bytes under MNT, in DIRS directories (perl), timed
#   3. cachefs umount MNT, timed: the first release ("after create"), rescanning the new tree
#   4. ROUNDS times: mount again (a log file of its own), touch TOUCH files and read TOUCH
#      others, cachefs umount MNT, timed: the warm rescan (the tree is in the dentry and inode
#      caches from the previous rescan)
#   5. untimed: mount once more, check that all FILES files are there, unmount
#   6. reference: the same tree made natively in WORK/twin, walked warm ROUNDS times with
#      `find -printf ''` (readdir only, no stat) and `find -printf '%s'` (an lstat per entry)
# Report: cachefs mount and umount wall times and the rescan's own ms= (min / median / max over
# the warm rounds, and the first release on its own), its files=, and the native walks.
#
# Usage (as root: it mounts):
#   scripts/bench-rescan.sh
#   ROUNDS=10 FILES=200000 DIRS=2000 scripts/bench-rescan.sh
#   CACHEFS=/tmp/cachefs FILES=10000 DIRS=100 ROUNDS=3 scripts/bench-rescan.sh    # a quick look
#
# Environment:
#   ROUNDS      warm rounds (default 5); the figures are min / median / max over them
#   FILES       files in the tree (default 100000)
#   DIRS        directories they are spread over (default 1000)
#   FILE_BYTES  bytes in each file (default 1024)
#   TOUCH       files touched (mtime) and files read in each warm round (default 10)
#   UMOUNT_TIMEOUT  `cachefs umount --timeout` (default 300s): the release rescans before the
#               server lets go of its lease, and the default 10 s may not cover a big tree
#   WORK        scratch directory on the disk under test (default /var/tmp/cachefs-bench-rescan);
#               the store is WORK/store, the mount point WORK/mnt, the logs WORK/log.*
#   CACHEFS     the cachefs binary (default: cargo build --release, target/release/cachefs);
#               it needs the bind driver (else `cachefs mount` says "unknown key")
#   KEEP        set: leave WORK (store, logs) in place afterwards
#   SNAPSHOT    set (default 1; empty: off): take a snapshot after the first release, so the
#               warm rescans also find the change list against the hash cache (the costlier case)
set -euo pipefail

ROUNDS=${ROUNDS:-5}
FILES=${FILES:-100000}
DIRS=${DIRS:-1000}
FILE_BYTES=${FILE_BYTES:-1024}
TOUCH=${TOUCH:-10}
UMOUNT_TIMEOUT=${UMOUNT_TIMEOUT:-300s}
SNAPSHOT=${SNAPSHOT-1}
WORK=${WORK:-/var/tmp/cachefs-bench-rescan}

ROOT=$(cd "$(dirname "$0")/.." && pwd)

die() { echo "bench-rescan: $*" >&2; exit 1; }
log() { echo "bench-rescan: $*" >&2; }

[ "$(id -u)" = 0 ] || die "run as root (it mounts)"
for tool in perl find mountpoint; do
    command -v "$tool" >/dev/null || die "$tool is missing"
done
if [ "$DIRS" -lt 1 ] || [ "$FILES" -lt "$DIRS" ]; then die "need FILES >= DIRS >= 1"; fi
[ "$TOUCH" -le $((FILES / 2)) ] || die "TOUCH must be at most FILES / 2"

if [ -z "${CACHEFS:-}" ]; then
    log "building cachefs (release)"
    (cd "$ROOT" && cargo build --release --quiet)
    target_dir=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps 2>/dev/null \
        | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
    CACHEFS=${target_dir:-$ROOT/target}/release/cachefs
fi
[ -x "$CACHEFS" ] || die "no cachefs binary at $CACHEFS"

MNT=$WORK/mnt
STORE=$WORK/store
cleanup() {
    set +e
    if mountpoint -q "$MNT" 2>/dev/null; then
        "$CACHEFS" umount --store "$STORE" --timeout "$UMOUNT_TIMEOUT" "$MNT" 2>/dev/null \
            || umount -l "$MNT"
    fi
    if [ -z "${KEEP:-}" ]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

rm -rf "$WORK"
mkdir -p "$WORK" "$MNT"
WORK=$(cd "$WORK" && pwd)
MNT=$WORK/mnt STORE=$WORK/store
df -P "$WORK" | tail -1 | awk '{print "bench-rescan: scratch " $6 " on " $1}' >&2

# --- helpers -----------------------------------------------------------------------------

declare -A RESULTS    # figure -> seconds (or ms), space-separated, one per round

# timed FIGURE CMD...: runs CMD, appends its wall time in seconds to RESULTS[FIGURE].
timed() {
    local figure=$1
    shift
    local t0 t1 us
    t0=${EPOCHREALTIME/[^0-9]/}
    "$@"
    t1=${EPOCHREALTIME/[^0-9]/}
    us=$((t1 - t0))
    RESULTS[$figure]+="$(printf '%d.%04d' $((us / 1000000)) $((us % 1000000 / 100))) "
}

# min / median / max of the space-separated numbers on stdin, with FORMAT for each.
spread() {
    tr ' ' '\n' | grep -v '^$' | sort -g | awk -v f="$1" '{ v[NR] = $1 } END {
        if (NR == 0) { print "-"; exit }
        med = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        printf f " / " f " / " f "\n", v[1], med, v[NR] }'
}

# Log file of mount number $1.
log_of() { echo "$WORK/log.$1"; }

mount_bind() {
    local n=$1
    # Errors to a file, not $(...): the background server may keep a pipe open.
    if ! "$CACHEFS" mount --store "$STORE" --log-file "$(log_of "$n")" -v \
        --mount "type=cache,id=rescan,target=$MNT,sharing=locked,driver=bind" \
        2> "$WORK/mount.err"; then
        cat "$WORK/mount.err" >&2
        if grep -q "unknown key" "$WORK/mount.err"; then
            die "$CACHEFS has no bind driver (driver=bind is an unknown key to it): build one that has"
        fi
        die "cachefs mount ...,driver=bind $MNT failed"
    fi
    cat "$WORK/mount.err" >&2
    mountpoint -q "$MNT" || die "cachefs mount returned but $MNT is not mounted"
}

umount_bind() {
    "$CACHEFS" umount --store "$STORE" --timeout "$UMOUNT_TIMEOUT" "$MNT" \
        || die "cachefs umount $MNT failed"
    ! mountpoint -q "$MNT" || die "cachefs left $MNT mounted"
}

# rescan_field LOG FIELD: the FIELD=<number> of the last line with "rescanned" in LOG, read
# loosely (colours stripped; FIELD as a word of its own, else as the end of one: elapsed_ms=);
# empty when there is none.
rescan_field() {
    local line
    line=$(sed 's/\x1b\[[0-9;]*m//g' "$1" 2>/dev/null | grep rescanned | tail -1) || true
    [ -n "$line" ] || return 0
    { grep -oE "(^|[^A-Za-z0-9_])$2=[0-9.]+" <<< "$line" \
        || grep -oE "_$2=[0-9.]+" <<< "$line" || true; } | tail -1 | sed 's/.*=//'
}

# Records the rescan of mount number $1 under figure $2 (ms) and the file count it logged.
record_rescan() {
    local ms files
    ms=$(rescan_field "$(log_of "$1")" ms)
    files=$(rescan_field "$(log_of "$1")" files)
    if [ -z "$ms" ]; then
        log "mount $1: no \"rescanned\" line with ms= in $(log_of "$1"); its last lines:"
        tail -5 "$(log_of "$1")" >&2 2>/dev/null || true
        return 0
    fi
    RESULTS[$2]+="$ms "
    RESCAN_FILES[$1]=${files:--}
}
declare -A RESCAN_FILES

# make_tree DIR: FILES files of FILE_BYTES bytes in DIRS directories d0000... (DIR exists).
make_tree() {
    perl -e '
        use POSIX ();
        my ($dir, $n, $nd, $size) = @ARGV;
        my $buf = "x" x $size;
        for my $j (0 .. $nd - 1) { mkdir sprintf("%s/d%04d", $dir, $j) or die "mkdir: $!" }
        my $flags = POSIX::O_WRONLY() | POSIX::O_CREAT() | POSIX::O_EXCL();
        for my $i (0 .. $n - 1) {
            my $p = sprintf("%s/d%04d/f%06d", $dir, $i % $nd, $i);
            my $fd = POSIX::open($p, $flags, 0644) // die "$p: $!";
            (POSIX::write($fd, $buf, $size) // -1) == $size or die "$p: $!";
            POSIX::close($fd) // die "$p: $!";
        }
    ' "$1" "$FILES" "$DIRS" "$FILE_BYTES"
}

# The i-th file of the tree under $1.
file_of() { printf '%s/d%04d/f%06d' "$1" $(($2 % DIRS)) "$2"; }

# Touches TOUCH files and reads TOUCH others, different ones each round ($1).
touch_some() {
    local k i
    for k in $(seq 0 $((TOUCH - 1))); do
        i=$(( (k * 7919 + $1 * 104729) % FILES ))
        touch "$(file_of "$MNT" "$i")"
        i=$(( (i + FILES / 2) % FILES ))
        cat "$(file_of "$MNT" "$i")" > /dev/null
    done
}

walk_names() { find "$1" -printf '' ; }
walk_stat() { find "$1" -printf '%s\n' > /dev/null; }

# --- the bind mount ----------------------------------------------------------------------

log "mount 0: creating $FILES files of $FILE_BYTES bytes in $DIRS directories under the bind mount"
timed mount0 mount_bind 0
timed create make_tree "$MNT"
sync
log "umount 0: the first release rescans the new tree"
timed umount0 umount_bind
record_rescan 0 rescan0
if [ -n "$SNAPSHOT" ]; then
    # With a layer taken, the instance keeps a change log: each rescan also compares every
    # file and directory with the hash cache (the change list of the next snapshot).
    log "snapshot: the warm rounds compare with the hash cache too"
    "$CACHEFS" --store "$STORE" snapshot -q rescan > /dev/null || die "cachefs snapshot failed"
fi

for r in $(seq 1 "$ROUNDS"); do
    timed mount mount_bind "$r"
    touch_some "$r"
    sync
    timed umount umount_bind
    record_rescan "$r" rescan
    log "round $r of $ROUNDS done"
done

# Untimed: the tree survived all of it.
mount_bind check
n=$(find "$MNT" -type f | wc -l)
umount_bind
[ "$n" = "$FILES" ] || die "the bind mount holds $n files after the rounds, expected $FILES"

# --- the native reference ----------------------------------------------------------------

log "native reference: the same tree in $WORK/twin"
mkdir -p "$WORK/twin"
make_tree "$WORK/twin"
sync
walk_stat "$WORK/twin"    # warm it, like the rescans after the first
for _ in $(seq 1 "$ROUNDS"); do
    timed walk_names walk_names "$WORK/twin"
    timed walk_stat walk_stat "$WORK/twin"
done

# --- report ------------------------------------------------------------------------------

ms_of() { tr ' ' '\n' | grep -v '^$' | awk '{ printf "%.1f ", $1 * 1000 }'; }
files0=${RESCAN_FILES[0]:--}
files_warm=$(for r in $(seq 1 "$ROUNDS"); do echo "${RESCAN_FILES[$r]:--}"; done | sort -u | paste -sd, -)

echo
echo "cachefs bind-driver rescan benchmark, $(date -u +%Y-%m-%d), $(uname -r), $(nproc) CPUs"
echo "$FILES files of $FILE_BYTES bytes in $DIRS directories; $ROUNDS warm rounds touching and reading $TOUCH files each"
echo "milliseconds, min / median / max"
echo
echo "| figure | ms |"
echo "|---|---:|"
echo "| create the tree through the mount | $(echo "${RESULTS[create]}" | ms_of | spread '%.0f') |"
echo "| first umount, after create (wall) | $(echo "${RESULTS[umount0]}" | ms_of | spread '%.1f') |"
echo "| first rescan, logged ms= (files=$files0) | $(echo "${RESULTS[rescan0]:-}" | spread '%.1f') |"
echo "| mount (wall) | $(echo "${RESULTS[mount]}" | ms_of | spread '%.1f') |"
echo "| warm umount (wall) | $(echo "${RESULTS[umount]}" | ms_of | spread '%.1f') |"
echo "| warm rescan, logged ms= (files=$files_warm) | $(echo "${RESULTS[rescan]:-}" | spread '%.1f') |"
echo "| native find -printf '' (warm) | $(echo "${RESULTS[walk_names]}" | ms_of | spread '%.1f') |"
echo "| native find -printf '%s' (warm, lstat each) | $(echo "${RESULTS[walk_stat]}" | ms_of | spread '%.1f') |"
echo
echo "all rounds:"
echo "  warm umount, ms: $(echo "${RESULTS[umount]}" | ms_of)"
echo "  warm rescan ms=: ${RESULTS[rescan]:-}"
