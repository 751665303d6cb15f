#!/usr/bin/env bash
# Filesystem benchmark: a native directory vs cachefs (kernel passthrough) vs cachefs
# --no-passthrough vs bindfs, same disk, same run, medians of several rounds, as ratios to
# native. Also the fixed cost of `cachefs run --mount ... -- true` against plain `true`.
#
# Usage (as root: it mounts, and drops the page cache for the cold read):
#   scripts/bench-fs.sh                    # everything, 5 rounds
#   ROUNDS=3 FILES=5000 BIG_MIB=256 scripts/bench-fs.sh     # a quicker look
#   CONFIGS="native passthrough" scripts/bench-fs.sh
#
# Environment:
#   ROUNDS    rounds per configuration (default 5); each figure is the median
#   FILES     files in the small-file tree (default 20000, sizes 1-64 KiB)
#   BIG_MIB   size of the sequential file in MiB (default 1024)
#   WORK      scratch directory on the disk under test (default /var/tmp/cachefs-bench)
#   CONFIGS   subset of: native passthrough userspace locked bindfs nocount, and
#             base-passthrough base-userspace base-locked (the same with $CACHEFS_BASE)
#             (nocount: passthrough with size accounting off, CACHEFS_NO_ACCOUNTING=1, to
#             measure what accounting costs: CONFIGS="native passthrough nocount";
#             locked: passthrough under a sharing=locked lease, i.e. an exclusive mount)
#   CACHEFS   the cachefs binary (default: cargo build --release, target/release/cachefs)
#   CACHEFS_BASE  a second cachefs binary for the base-* configurations: before and after a
#             change in one run, e.g. CACHEFS_BASE=/tmp/cachefs-before
#             CONFIGS="native base-passthrough passthrough base-userspace userspace"
#   RUN_OVERHEAD_RUNS  hyperfine runs for the `cachefs run` overhead (default 30)
#
# Workloads, each timed on its own (setup and `sync` between them are not timed):
#   write     dd 1 GiB from /dev/zero, bs=1M, conv=fsync
#   read      dd it back after `echo 3 > /proc/sys/vm/drop_caches` (cold page cache)
#   untar     tar -xf of FILES small files (mixed 1-64 KiB, 200 directories)
#   cat       find -type f -print0 | xargs -0 cat > /dev/null (warm page cache)
#   du        du -s of the tree, after 1.1 s so 1-second FUSE entry/attr TTLs have expired
#   rm        rm -rf of the tree
set -euo pipefail

ROUNDS=${ROUNDS:-5}
FILES=${FILES:-20000}
BIG_MIB=${BIG_MIB:-1024}
WORK=${WORK:-/var/tmp/cachefs-bench}
CONFIGS=${CONFIGS:-"native passthrough userspace bindfs"}
RUN_OVERHEAD_RUNS=${RUN_OVERHEAD_RUNS:-30}
WORKLOADS="write read untar cat du rm"

ROOT=$(cd "$(dirname "$0")/.." && pwd)

die() { echo "bench-fs: $*" >&2; exit 1; }
log() { echo "bench-fs: $*" >&2; }

[ "$(id -u)" = 0 ] || die "run as root (mounts, drop_caches)"
for tool in tar dd find xargs du perl mountpoint; do
    command -v "$tool" >/dev/null || die "$tool is missing"
done
case " $CONFIGS " in *" bindfs "*)
    command -v bindfs >/dev/null || die "bindfs is missing (apt-get install bindfs), or set CONFIGS without it";;
esac

if [ -z "${CACHEFS:-}" ]; then
    log "building cachefs (release)"
    (cd "$ROOT" && cargo build --release --quiet)
    target_dir=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps 2>/dev/null \
        | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
    CACHEFS=${target_dir:-$ROOT/target}/release/cachefs
fi
[ -x "$CACHEFS" ] || die "no cachefs binary at $CACHEFS"
case " $CONFIGS " in *" base-"*)
    [ -x "${CACHEFS_BASE:-}" ] || die "the base-* configurations need CACHEFS_BASE=/path/to/cachefs";;
esac

# The binary and store of a configuration: base-* run $CACHEFS_BASE on a store of its own.
bin_of() { case "$1" in base-*) echo "$CACHEFS_BASE";; *) echo "$CACHEFS";; esac; }
store_of() { case "$1" in base-*) echo "$WORK/store-base";; *) echo "$WORK/store";; esac; }

can_drop_caches=1
sync
if ! echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then
    can_drop_caches=0
    log "cannot write /proc/sys/vm/drop_caches: the 'read' figures are WARM page cache reads"
fi
drop_caches() {
    sync
    if [ "$can_drop_caches" = 1 ]; then echo 3 > /proc/sys/vm/drop_caches; fi
}

# --- scratch space and cleanup -----------------------------------------------------------

declare -A MOUNTED    # configuration -> target of its `cachefs mount`
declare -A DIRS    # configuration -> directory the workloads run in
BINDFS_MNT=""
cleanup() {
    set +e
    for c in "${!MOUNTED[@]}"; do
        "$(bin_of "$c")" --store "$(store_of "$c")" umount "${MOUNTED[$c]}" 2>/dev/null \
            || umount -l "${MOUNTED[$c]}" 2>/dev/null
    done
    if [ -n "$BINDFS_MNT" ] && mountpoint -q "$BINDFS_MNT"; then
        fusermount3 -u "$BINDFS_MNT" 2>/dev/null || umount -l "$BINDFS_MNT"
    fi
    if [ -z "${KEEP:-}" ]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

rm -rf "$WORK"
mkdir -p "$WORK"
df -P "$WORK" | tail -1 | awk '{print "bench-fs: scratch " $6 " on " $1}' >&2

# --- the small-file tarball --------------------------------------------------------------

log "generating $FILES files (1-64 KiB) and their tarball"
mkdir -p "$WORK/gen"
perl -e '
    use strict;
    my ($dir, $n) = @ARGV;
    srand(42);
    open(my $r, "<", "/dev/urandom") or die;
    read($r, my $pool, 1 << 20) == 1 << 20 or die;
    for my $i (0 .. $n - 1) {
        my $d = sprintf("%s/d%03d", $dir, $i % 200);
        mkdir $d unless -d $d;
        my $size = 1024 + int(rand(63 * 1024 + 1));
        my $off = int(rand((1 << 20) - $size));
        open(my $f, ">", sprintf("%s/f%06d", $d, $i)) or die;
        print $f substr($pool, $off, $size);
        close $f;
    }
' "$WORK/gen" "$FILES"
TARBALL="$WORK/tree.tar"
tar -C "$WORK/gen" -cf "$TARBALL" .
TREE_BYTES=$(du -sb "$WORK/gen" | cut -f1)
rm -rf "$WORK/gen"

# --- mounting each configuration ---------------------------------------------------------

wait_mounted() {
    local t=$1
    for _ in $(seq 1 200); do
        if mountpoint -q "$t"; then return 0; fi
        sleep 0.05
    done
    die "$t did not get mounted"
}

# Mounts a configuration; records where its workloads run in DIRS.
setup() {
    local config=$1 dir
    case "$config" in
        native)
            dir=$WORK/native
            mkdir -p "$dir"
            ;;
        passthrough|userspace|nocount|locked|base-passthrough|base-userspace|base-locked)
            dir=$WORK/mnt-$config
            mkdir -p "$dir"
            local extra=() env=()
            case "$config" in
                *userspace) extra=(--no-passthrough);;
                *locked) extra=(--sharing locked);;
            esac
            if [ "$config" = nocount ]; then env=(CACHEFS_NO_ACCOUNTING=1); fi
            # `cachefs mount`, not `cachefs run -- sleep`: a run's mount exists only in its
            # command's mount namespace, and the workloads run from here. The same filesystem
            # serves both. (The server inherits the environment, CACHEFS_NO_ACCOUNTING too.)
            env "${env[@]}" "$(bin_of "$config")" --store "$(store_of "$config")" mount "${extra[@]}" \
                --id "bench-$config" "$dir" || die "cachefs mount $dir failed"
            MOUNTED[$config]=$dir
            wait_mounted "$dir"
            ;;
        bindfs)
            mkdir -p "$WORK/bindfs-src" "$WORK/mnt-bindfs"
            dir=$WORK/mnt-bindfs
            bindfs "$WORK/bindfs-src" "$dir"
            BINDFS_MNT=$dir
            wait_mounted "$dir"
            ;;
        *) die "unknown configuration $config";;
    esac
    DIRS[$config]=$dir
}

teardown() {
    local config=$1 dir=${DIRS[$1]}
    case "$config" in
        passthrough|userspace|nocount|locked|base-passthrough|base-userspace|base-locked)
            "$(bin_of "$config")" --store "$(store_of "$config")" umount "${MOUNTED[$config]}" \
                || die "cachefs umount $dir failed"
            unset "MOUNTED[$config]"
            ! mountpoint -q "$dir" || die "cachefs left $dir mounted"
            ;;
        bindfs)
            fusermount3 -u "$dir" 2>/dev/null || umount "$dir"
            BINDFS_MNT=""
            ;;
    esac
}

# --- timing ------------------------------------------------------------------------------

declare -A RESULTS

now_ns() { date +%s%N; }

# timed CONFIG WORKLOAD CMD...: runs CMD, appends its wall time (seconds) to the results.
timed() {
    local config=$1 workload=$2
    shift 2
    local t0 t1
    t0=$(now_ns)
    "$@"
    t1=$(now_ns)
    RESULTS[$config,$workload]+="$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.4f", (b - a) / 1e9 }') "
}

median() {
    tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "nan"; exit }
        if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

w_write() { dd if=/dev/zero of="$DIR/big" bs=1M count="$BIG_MIB" conv=fsync status=none; }
w_read() { dd if="$DIR/big" of=/dev/null bs=1M status=none; }
w_untar() { tar -C "$DIR/tree" -xf "$TARBALL"; }
w_cat() { find "$DIR/tree" -type f -print0 | xargs -0 cat > /dev/null; }
w_du() { du -s "$DIR/tree" > /dev/null; }
w_rm() { rm -rf "$DIR/tree"; }

one_round() {
    local config=$1
    timed "$config" write w_write
    drop_caches
    timed "$config" read w_read
    rm -f "$DIR/big"
    mkdir -p "$DIR/tree"
    sync
    timed "$config" untar w_untar
    sync
    timed "$config" cat w_cat
    sleep 1.1
    timed "$config" du w_du
    timed "$config" rm w_rm
    sync
}

verify_tree() {
    local n bytes
    n=$(find "$DIR/tree" -type f | wc -l)
    bytes=$(du -sb "$DIR/tree" | cut -f1)
    [ "$n" = "$FILES" ] || die "$1: $n files in the tree, expected $FILES"
    # Directory sizes differ between filesystems views; only the file bytes must be there.
    [ "$bytes" -ge $(( TREE_BYTES * 9 / 10 )) ] || die "$1: tree has $bytes bytes, expected ~$TREE_BYTES"
}

# All configurations stay mounted for the whole run, and every round runs each of them in
# turn, so slow phases of the (shared, virtual) disk spread over all of them alike.
for config in $CONFIGS; do
    setup "$config"
    DIR=${DIRS[$config]}
    # A first, untimed extract checks that the configuration works at all.
    mkdir -p "$DIR/tree"
    tar -C "$DIR/tree" -xf "$TARBALL"
    verify_tree "$config"
    rm -rf "$DIR/tree"
    sync
done
for r in $(seq 1 "$ROUNDS"); do
    for config in $CONFIGS; do
        DIR=${DIRS[$config]}
        one_round "$config"
    done
    log "round $r of $ROUNDS done"
done
for config in $CONFIGS; do
    teardown "$config"
done

# --- `cachefs run` overhead --------------------------------------------------------------

RUN_TRUE="" RUN_CACHEFS="" RUN_BASE=""
mkdir -p "$WORK/ovh-target"
ovh_cmd=("$CACHEFS" --store "$WORK/ovh-store" run --mount "type=cache,id=ovh,target=$WORK/ovh-target" -- true)
"${ovh_cmd[@]}" || die "cachefs run ... -- true failed"
ovh_base=()
if [ -n "${CACHEFS_BASE:-}" ]; then
    ovh_base=("$CACHEFS_BASE" --store "$WORK/ovh-store-base" run --mount "type=cache,id=ovh,target=$WORK/ovh-target" -- true)
    "${ovh_base[@]}" || die "$CACHEFS_BASE run ... -- true failed"
fi
if command -v hyperfine >/dev/null; then
    log "run overhead: hyperfine, $RUN_OVERHEAD_RUNS runs each"
    base_arg=()
    if [ "${#ovh_base[@]}" -gt 0 ]; then base_arg=("${ovh_base[*]}"); fi
    hyperfine -N --warmup 3 --runs "$RUN_OVERHEAD_RUNS" --style none \
        --export-csv "$WORK/ovh.csv" true "${ovh_cmd[*]}" "${base_arg[@]}" >/dev/null
    # columns: command,mean,stddev,median,user,system,min,max
    RUN_TRUE=$(awk -F, 'NR == 2 { print $4 }' "$WORK/ovh.csv")
    RUN_CACHEFS=$(awk -F, 'NR == 3 { print $4 }' "$WORK/ovh.csv")
    RUN_BASE=$(awk -F, 'NR == 4 { print $4 }' "$WORK/ovh.csv")
else
    log "run overhead: no hyperfine, timing $RUN_OVERHEAD_RUNS runs with date"
    for _ in $(seq 1 "$RUN_OVERHEAD_RUNS"); do
        timed ovh true true
        timed ovh cachefs "${ovh_cmd[@]}"
        if [ "${#ovh_base[@]}" -gt 0 ]; then timed ovh base "${ovh_base[@]}"; fi
    done
    RUN_TRUE=$(echo "${RESULTS[ovh,true]}" | median)
    RUN_CACHEFS=$(echo "${RESULTS[ovh,cachefs]}" | median)
    if [ "${#ovh_base[@]}" -gt 0 ]; then RUN_BASE=$(echo "${RESULTS[ovh,base]}" | median); fi
fi

# --- report ------------------------------------------------------------------------------

label() {
    case "$1" in
        write) echo "seq write ${BIG_MIB} MiB (fsync)";;
        read)
            if [ "$can_drop_caches" = 1 ]; then echo "seq read ${BIG_MIB} MiB, cold cache"
            else echo "seq read ${BIG_MIB} MiB, warm cache"; fi;;
        untar) echo "untar $FILES files";;
        cat) echo "find, xargs cat (warm)";;
        du) echo "du -s";;
        rm) echo "rm -rf tree";;
    esac
}

echo
echo "cachefs filesystem benchmark, $(date -u +%Y-%m-%d), $(uname -r), $(nproc) CPUs"
echo "median of $ROUNDS rounds, seconds (ratio to native); tree: $FILES files, $((TREE_BYTES / 1048576)) MiB"
echo
header="| workload |"
sep="|---|"
for config in $CONFIGS; do header+=" $config |"; sep+="---:|"; done
echo "$header"
echo "$sep"
for w in $WORKLOADS; do
    row="| $(label "$w") |"
    base=""
    case " $CONFIGS " in *" native "*) base=$(echo "${RESULTS[native,$w]}" | median);; esac
    for config in $CONFIGS; do
        m=$(echo "${RESULTS[$config,$w]}" | median)
        if [ -n "$base" ] && [ "$config" != native ]; then
            row+=" $(awk -v m="$m" -v b="$base" 'BEGIN { printf "%.3f (%.2fx)", m, m / b }') |"
        else
            row+=" $(awk -v m="$m" 'BEGIN { printf "%.3f", m }') |"
        fi
    done
    echo "$row"
done
echo
echo "all rounds, seconds:"
for w in $WORKLOADS; do
    for config in $CONFIGS; do
        echo "  $w $config: ${RESULTS[$config,$w]}"
    done
done
echo
awk -v t="$RUN_TRUE" -v c="$RUN_CACHEFS" 'BEGIN {
    printf "cachefs run --mount ... -- true: median %.1f ms; plain true: %.1f ms; overhead %.1f ms\n",
        c * 1000, t * 1000, (c - t) * 1000 }'
if [ -n "$RUN_BASE" ]; then
    awk -v t="$RUN_TRUE" -v c="$RUN_BASE" 'BEGIN {
        printf "CACHEFS_BASE run --mount ... -- true: median %.1f ms; overhead %.1f ms\n",
            c * 1000, (c - t) * 1000 }'
fi
