#!/usr/bin/env bash
# Filesystem benchmark: a native directory vs cachefs (kernel passthrough) vs cachefs
# --no-passthrough vs its bind driver vs the FUSE peers (bindfs, bindfs --multithreaded,
# libfuse's passthrough_hp over /dev/fuse and over io_uring), same disk, same run, medians of
# several rounds, as ratios to native. Also the fixed cost of `cachefs run --mount ... -- true`
# against plain `true`.
#
# Usage (as root: it mounts, and drops the page cache for the cold read):
#   scripts/bench-fs.sh                    # everything available (CONFIGS=DEFAULT), 5 rounds
#   ROUNDS=3 FILES=5000 BIG_MIB=256 SETTLE=0 scripts/bench-fs.sh     # a quicker look
#   CONFIGS="native passthrough" scripts/bench-fs.sh
#   CONFIGS="native passthrough hp hp-uring bindfs-mt" scripts/bench-fs.sh
#
# Environment:
#   ROUNDS    rounds per configuration (default 5); each figure is the median
#   FILES     files in the small-file tree (default 20000, sizes 1-64 KiB; 18000 when hp or
#             hp-uring run, see below)
#   BIG_MIB   size of the sequential file in MiB (default 1024)
#   N4K       files of 4 KiB the create workload makes (default 15000, in 150 directories)
#   SMALL     files in the crate-source-like tree of untar-small (default 15000, 1-16 KiB
#             mostly, 15 in each of SMALL/15 directories: ~16,000 entries)
#   SETTLE    seconds to wait (after `sync`) between a large removal and the next timed create
#             (default 35): ext4 slows inode allocation for ~30 s after many inodes were freed,
#             which would be measured instead of the filesystem. SETTLE=0 for quick looks
#             (then the create, untar and untar-small figures include that slowdown).
#   WORK      scratch directory on the disk under test (default /var/tmp/cachefs-bench)
#   CONFIGS   subset of the configurations below, in table order (default DEFAULT):
#               native       the scratch directory itself
#               passthrough  `cachefs mount --io-uring off` (kernel FUSE passthrough, the default
#                            shared mount, requests over /dev/fuse)
#               uring        `cachefs mount --io-uring on`: the same over io_uring (the script
#                            sets enable_uring as for hp-uring)
#               userspace    `cachefs mount --no-passthrough --io-uring off`
#               locked       passthrough under a sharing=locked lease, i.e. an exclusive mount
#                            (/dev/fuse); locked-uring: the same over io_uring
#               nocount      passthrough with size accounting off, CACHEFS_NO_ACCOUNTING=1, to
#                            measure what accounting costs: CONFIGS="native passthrough nocount"
#               bind         `cachefs mount --mount type=cache,...,sharing=locked,driver=bind`
#                            (the bind driver; a binary without it fails with "unknown key")
#               bindfs       bindfs SRC MNT (Debian package bindfs)
#               bindfs-mt    bindfs --multithreaded SRC MNT
#               hp           $PEERS/bin/passthrough_hp SRC MNT (libfuse 3.19, /dev/fuse)
#               hp-uring     $PEERS/bin/passthrough_hp -o io_uring SRC MNT (FUSE over io_uring;
#                            the script sets /sys/module/fuse/parameters/enable_uring to Y for
#                            the run when it is not, and restores it on exit; while it is Y,
#                            any FUSE server mounted in the run that asks for io_uring gets it)
#               base-passthrough base-userspace base-locked
#                            the same with $CACHEFS_BASE
#               DEFAULT      native passthrough uring userspace bindfs bindfs-mt hp hp-uring bind,
#                            leaving out (with a note) the peers that are not installed and
#                            bind when the binary has no bind driver; may be combined, e.g.
#                            CONFIGS="DEFAULT locked"
#             A configuration named explicitly that cannot run stops the script.
#   PEERS     directory of the peer binaries (default $ROOT/../shared/peers, with
#             bin/passthrough_hp). passthrough_hp keeps one fd per inode the kernel knows and
#             fails past RLIMIT_NOFILE (20,000 here): with hp or hp-uring, FILES, N4K and the
#             untar-small tree must each stay below `ulimit -Hn` - 100 entries (checked), and
#             dentries and inodes are dropped (`echo 2 > drop_caches`) between phases.
#   CACHEFS   the cachefs binary (default: cargo build --release, target/release/cachefs)
#   CACHEFS_BASE  a second cachefs binary for the base-* configurations: before and after a
#             change in one run, e.g. CACHEFS_BASE=/tmp/cachefs-before
#             CONFIGS="native base-passthrough passthrough base-userspace userspace"
#   RUN_OVERHEAD_RUNS  hyperfine runs for the `cachefs run` overhead (default 30)
#   KEEP      set: leave WORK in place afterwards
#
# Workloads, each timed on its own (setup and `sync` between them are not timed):
#   write     dd 1 GiB from /dev/zero, bs=1M, conv=fsync
#   read      dd it back after `echo 3 > /proc/sys/vm/drop_caches` (cold page cache)
#   untar     tar -xf of FILES small files (mixed 1-64 KiB, 200 directories)
#   cat       find -type f -print0 | xargs -0 cat > /dev/null (warm page cache)
#   du        du -s of the tree, after 1.1 s so 1-second FUSE entry/attr TTLs have expired
#   rm        rm -rf of the tree
#   create    N4K files of 4 KiB in 150 new directories (perl: open, write, close per file,
#             POSIX calls so each file costs 3 syscalls; perl's start is ~10 ms of the figure)
#   stat      lstat of each of them by name, right after (perl, no readdir)
#   stat-later  the same again 1.1 s later, past a 1-second entry/attribute timeout
#   untar-small  tar -xf of the SMALL-file tree (crate-source-like: SMALL/150 crates, 100 by
#             default, each of 10 directories: the crate's own, src, src/m0-m5, tests,
#             examples; sizes 5% < 1 KiB, 87% 1-16 KiB log-uniform, 8% 16-64 KiB)
#   rm-small  rm -rf of that tree
#
# A round runs, each phase for every configuration in turn, in an order rotated by one each
# round (all configurations stay mounted for the whole run, so slow phases of the shared
# virtual disk hit all of them alike):
#   write, read | untar, cat, du | rm | sync, SETTLE | create, stat | drop dentries |
#   untar-small | rm-small | sync, SETTLE (not after the last round)
# Every round works in fresh directories (tree.R, create.R, small.R); the create.R trees stay
# until after the last round, then go untimed. Removals are grouped so no timed create follows
# a large removal without SETTLE (the untimed check extract before round 1 is followed by it
# too). The rm and rm-small figures are dentry-warm: no cache is dropped between a tree's
# making and its removal (the cold read's drop comes before any tree of the round).
set -euo pipefail

ROUNDS=${ROUNDS:-5}
BIG_MIB=${BIG_MIB:-1024}
N4K=${N4K:-15000}
SMALL=${SMALL:-15000}
SETTLE=${SETTLE:-35}
WORK=${WORK:-/var/tmp/cachefs-bench}
CONFIGS=${CONFIGS:-DEFAULT}
RUN_OVERHEAD_RUNS=${RUN_OVERHEAD_RUNS:-30}
WORKLOADS="write read untar cat du rm create stat stat-later untar-small rm-small"
N4K_DIRS=150

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEERS=${PEERS:-$ROOT/../shared/peers}
HP=$PEERS/bin/passthrough_hp
URING_PARAM=/sys/module/fuse/parameters/enable_uring

die() { echo "bench-fs: $*" >&2; exit 1; }
log() { echo "bench-fs: $*" >&2; }

[ "$(id -u)" = 0 ] || die "run as root (mounts, drop_caches)"
for tool in tar dd find xargs du perl mountpoint; do
    command -v "$tool" >/dev/null || die "$tool is missing"
done

# --- configurations ----------------------------------------------------------------------

hp_runs() { [ -x "$HP" ] && "$HP" --help >/dev/null 2>&1; }
declare -A OPTIONAL    # configuration -> 1 when only DEFAULT asked for it (may be left out)
given=$CONFIGS expanded=""
for c in $given; do
    if [ "$c" != DEFAULT ]; then expanded+=" $c"; continue; fi
    expanded+=" native passthrough"
    if [ -w "$URING_PARAM" ]; then
        expanded+=" uring"
    else
        log "DEFAULT: no writable $URING_PARAM (FUSE over io_uring): no uring"
    fi
    expanded+=" userspace"
    if command -v bindfs >/dev/null; then
        expanded+=" bindfs bindfs-mt"
    else
        log "DEFAULT: bindfs is not installed (apt-get install bindfs): no bindfs, bindfs-mt"
    fi
    if hp_runs; then
        expanded+=" hp"
        if [ -w "$URING_PARAM" ]; then
            expanded+=" hp-uring"
        else
            log "DEFAULT: no writable $URING_PARAM (FUSE over io_uring): no hp-uring"
        fi
    else
        log "DEFAULT: no runnable $HP (PEERS=$PEERS): no hp, hp-uring"
    fi
    expanded+=" bind"
    OPTIONAL[bind]=1
done
CONFIGS=""
for c in $expanded; do
    case " $CONFIGS " in *" $c "*) continue;; esac    # once each, first place
    CONFIGS+="${CONFIGS:+ }$c"
done
for c in $given; do    # a configuration also named explicitly is not optional
    if [ "$c" != DEFAULT ]; then unset "OPTIONAL[$c]"; fi
done
has() { case " $CONFIGS " in *" $1 "*) return 0;; esac; return 1; }
has_hp() { has hp || has hp-uring; }

case " $CONFIGS " in *" bindfs "*|*" bindfs-mt "*)
    command -v bindfs >/dev/null || die "bindfs is missing (apt-get install bindfs), or set CONFIGS without bindfs and bindfs-mt";;
esac
if has_hp; then
    [ -x "$HP" ] || die "hp, hp-uring: no passthrough_hp at $HP (set PEERS), or set CONFIGS without them"
    hp_runs || die "hp, hp-uring: $HP does not run (\`$HP --help\` fails: liburing2 missing?)"
fi
if has uring || has locked-uring; then
    [ -w "$URING_PARAM" ] || die "uring: no writable $URING_PARAM (FUSE over io_uring needs Linux 6.14+, as root)"
fi
if has hp-uring; then
    [ -w "$URING_PARAM" ] || die "hp-uring: no writable $URING_PARAM (FUSE over io_uring needs Linux 6.14+, as root)"
fi

FILES=${FILES:-$(if has_hp; then echo 18000; else echo 20000; fi)}
if has_hp; then
    nofile=$(ulimit -Hn)
    if [ "$nofile" != unlimited ]; then
        hp_max=$((nofile - 100))
        small_entries=$((SMALL + SMALL / 15 + 1))
        [ $((FILES + 201)) -le "$hp_max" ] || die "hp, hp-uring: FILES=$FILES is too many: passthrough_hp holds an fd per inode (RLIMIT_NOFILE $nofile); at most FILES=$((hp_max - 201))"
        [ $((N4K + N4K_DIRS + 1)) -le "$hp_max" ] || die "hp, hp-uring: N4K=$N4K is too many for passthrough_hp (RLIMIT_NOFILE $nofile); at most N4K=$((hp_max - N4K_DIRS - 1))"
        [ "$small_entries" -le "$hp_max" ] || die "hp, hp-uring: SMALL=$SMALL is too many for passthrough_hp (RLIMIT_NOFILE $nofile)"
    fi
fi

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
    if has_hp; then die "hp, hp-uring: passthrough_hp needs dentries dropped between phases (drop_caches)"; fi
fi
drop_caches() {
    sync
    if [ "$can_drop_caches" = 1 ]; then echo 3 > /proc/sys/vm/drop_caches; fi
}
# Drops dentries and inodes (not the page cache of files still in use): the kernel then
# forgets them, and passthrough_hp closes the fd it held for each.
drop_dentries() {
    sync
    if [ "$can_drop_caches" = 1 ]; then echo 2 > /proc/sys/vm/drop_caches; fi
}
settle() {
    sync
    if [ "$SETTLE" != 0 ]; then
        log "waiting ${SETTLE}s after the removal (SETTLE)"
        sleep "$SETTLE"
    fi
}

# --- scratch space and cleanup -----------------------------------------------------------

declare -A MOUNTED    # configuration -> target of its `cachefs mount`
declare -A FUSE_MNTS    # configuration -> mount point of a peer (bindfs, passthrough_hp)
declare -A DIRS    # configuration -> directory the workloads run in
URING_PREV=""    # enable_uring before the run, when the run changed it
cleanup() {
    set +e
    for c in "${!MOUNTED[@]}"; do
        "$(bin_of "$c")" --store "$(store_of "$c")" umount "${MOUNTED[$c]}" 2>/dev/null \
            || umount -l "${MOUNTED[$c]}" 2>/dev/null
    done
    for c in "${!FUSE_MNTS[@]}"; do
        if mountpoint -q "${FUSE_MNTS[$c]}"; then
            fusermount3 -u "${FUSE_MNTS[$c]}" 2>/dev/null || umount -l "${FUSE_MNTS[$c]}"
        fi
    done
    if [ -n "$URING_PREV" ]; then
        echo "$URING_PREV" > "$URING_PARAM" && log "restored $URING_PARAM to $URING_PREV"
    fi
    if [ -z "${KEEP:-}" ]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if has hp-uring || has uring || has locked-uring; then
    prev=$(cat "$URING_PARAM")
    if [ "$prev" != Y ]; then
        URING_PREV=$prev
        echo Y > "$URING_PARAM" || die "cannot enable FUSE over io_uring ($URING_PARAM)"
        log "enabled FUSE over io_uring for the run ($URING_PARAM was $prev)"
    fi
fi

rm -rf "$WORK"
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)    # absolute: passthrough_hp resolves its paths after daemonizing
df -P "$WORK" | tail -1 | awk '{print "bench-fs: scratch " $6 " on " $1}' >&2

# --- the small-file tarballs -------------------------------------------------------------

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

log "generating the untar-small tree ($SMALL files, crate-source-like) and its tarball"
mkdir -p "$WORK/gen-small"
perl -e '
    use strict;
    my ($dir, $n) = @ARGV;
    srand(4242);
    open(my $r, "<", "/dev/urandom") or die;
    read($r, my $pool, 1 << 20) == 1 << 20 or die;
    my $crates = int(($n + 149) / 150);    # 15 files in each of 10 directories per crate
    my @sub = ("", "/src", (map { "/src/m$_" } 0 .. 5), "/tests", "/examples");
    for my $c (0 .. $crates - 1) {
        for my $s (@sub) { mkdir sprintf("%s/crate%03d%s", $dir, $c, $s) or die "$!" }
    }
    for my $i (0 .. $n - 1) {
        my $d = sprintf("%s/crate%03d%s", $dir, $i % $crates, $sub[int($i / $crates) % 10]);
        my $u = rand();
        my $size = $u < 0.05 ? 64 + int(rand(960))          # 5%: under 1 KiB
                 : $u < 0.92 ? int(1024 * 16 ** rand())     # 87%: 1-16 KiB, log-uniform
                 : 16384 + int(rand(48 * 1024));            # 8%: 16-64 KiB
        my $off = int(rand((1 << 20) - $size));
        open(my $f, ">", sprintf("%s/f%05d.rs", $d, $i)) or die;
        print $f substr($pool, $off, $size);
        close $f;
    }
' "$WORK/gen-small" "$SMALL"
SMALL_TARBALL="$WORK/small.tar"
tar -C "$WORK/gen-small" -cf "$SMALL_TARBALL" .
SMALL_BYTES=$(du -sb "$WORK/gen-small" | cut -f1)
SMALL_ENTRIES=$(tar -tf "$SMALL_TARBALL" | grep -vc '^\./$')
rm -rf "$WORK/gen-small"

# --- mounting each configuration ---------------------------------------------------------

wait_mounted() {
    local t=$1
    for _ in $(seq 1 200); do
        if mountpoint -q "$t"; then return 0; fi
        sleep 0.05
    done
    die "$t did not get mounted"
}

# The pid of the passthrough_hp that serves mount point $1 (empty if none).
hp_pid() {
    local p cmd
    for p in /proc/[0-9]*; do
        cmd=$(tr '\0' ' ' < "$p/cmdline" 2>/dev/null) || continue
        if [[ $cmd == *passthrough_hp*" $1 " ]]; then echo "${p#/proc/}"; return; fi
    done
}

# Mounts a configuration; records where its workloads run in DIRS. A configuration that
# DEFAULT asked for and that cannot run here is taken out of CONFIGS instead (no DIRS entry).
setup() {
    local config=$1 dir
    case "$config" in
        native)
            dir=$WORK/native
            mkdir -p "$dir"
            ;;
        passthrough|uring|userspace|nocount|locked|locked-uring|base-passthrough|base-userspace|base-locked)
            dir=$WORK/mnt-$config
            mkdir -p "$dir"
            local extra=() env=()
            case "$config" in
                *userspace) extra=(--no-passthrough);;
                *locked*) extra=(--sharing locked);;
            esac
            # The transport is explicit (the run sets enable_uring when a ring configuration
            # is in it); a base binary may predate --io-uring and serves /dev/fuse anyway.
            case "$config" in
                base-*) ;;
                *uring) extra+=(--io-uring on);;
                *) extra+=(--io-uring off);;
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
        bind)
            dir=$WORK/mnt-$config
            mkdir -p "$dir"
            # Errors to a file, not $(...): the background server may keep a pipe open.
            if ! "$(bin_of "$config")" --store "$(store_of "$config")" mount \
                --mount "type=cache,id=bench-bind,target=$dir,sharing=locked,driver=bind" \
                2> "$WORK/mount-$config.err"; then
                cat "$WORK/mount-$config.err" >&2
                if grep -q "unknown key" "$WORK/mount-$config.err"; then
                    if [ -n "${OPTIONAL[$config]:-}" ]; then
                        log "bind: $CACHEFS has no bind driver (driver=bind is an unknown key): leaving bind out"
                        CONFIGS=$(echo " $CONFIGS " | sed "s/ $config / /; s/^ *//; s/ *$//")
                        return 0
                    fi
                    die "bind: $CACHEFS has no bind driver (driver=bind is an unknown key to it); build one that has, or set CONFIGS without bind"
                fi
                die "cachefs mount ...,driver=bind $dir failed"
            fi
            cat "$WORK/mount-$config.err" >&2
            MOUNTED[$config]=$dir
            wait_mounted "$dir"
            ;;
        bindfs|bindfs-mt)
            mkdir -p "$WORK/$config-src" "$WORK/mnt-$config"
            dir=$WORK/mnt-$config
            local extra=()
            if [ "$config" = bindfs-mt ]; then extra=(--multithreaded); fi
            bindfs "${extra[@]}" "$WORK/$config-src" "$dir" || die "bindfs ${extra[*]} failed"
            FUSE_MNTS[$config]=$dir
            wait_mounted "$dir"
            ;;
        hp|hp-uring)
            mkdir -p "$WORK/$config-src" "$WORK/mnt-$config"
            dir=$WORK/mnt-$config
            local extra=()
            if [ "$config" = hp-uring ]; then extra=(-o io_uring); fi
            # It daemonizes once mounted (absolute paths: it changes to / first).
            "$HP" "${extra[@]}" "$WORK/$config-src" "$dir" || die "passthrough_hp ${extra[*]} failed"
            FUSE_MNTS[$config]=$dir
            wait_mounted "$dir"
            if [ "$config" = hp-uring ]; then
                # Without enable_uring, -o io_uring quietly falls back to /dev/fuse: make sure
                # the server holds its rings.
                local pid ring=0 fd
                pid=$(hp_pid "$dir")
                [ -n "$pid" ] || die "hp-uring: cannot find the passthrough_hp serving $dir"
                for fd in /proc/"$pid"/fd/*; do
                    if [ "$(readlink "$fd")" = "anon_inode:[io_uring]" ]; then ring=$((ring + 1)); fi
                done
                [ "$ring" -gt 0 ] || die "hp-uring: passthrough_hp -o io_uring (pid $pid) has no io_uring: it fell back to /dev/fuse"
                log "hp-uring: passthrough_hp (pid $pid) serves over $ring io_uring queue(s)"
            fi
            ;;
        *) die "unknown configuration $config";;
    esac
    DIRS[$config]=$dir
}

teardown() {
    local config=$1 dir=${DIRS[$1]}
    case "$config" in
        passthrough|uring|userspace|nocount|locked|locked-uring|bind|base-passthrough|base-userspace|base-locked)
            "$(bin_of "$config")" --store "$(store_of "$config")" umount "${MOUNTED[$config]}" \
                || die "cachefs umount $dir failed"
            unset "MOUNTED[$config]"
            ! mountpoint -q "$dir" || die "cachefs left $dir mounted"
            ;;
        bindfs|bindfs-mt|hp|hp-uring)
            fusermount3 -u "$dir" 2>/dev/null || umount "$dir"
            unset "FUSE_MNTS[$config]"
            ! mountpoint -q "$dir" || die "$config: $dir is still mounted"
            ;;
    esac
}

# --- timing ------------------------------------------------------------------------------

declare -A RESULTS

# timed CONFIG WORKLOAD CMD...: runs CMD, appends its wall time (seconds) to the results.
# $EPOCHREALTIME (microseconds, no fork), so the figures of short workloads carry no `date`.
timed() {
    local config=$1 workload=$2
    shift 2
    local t0 t1 us
    t0=${EPOCHREALTIME/[^0-9]/}
    "$@"
    t1=${EPOCHREALTIME/[^0-9]/}
    us=$((t1 - t0))
    RESULTS[$config,$workload]+="$(printf '%d.%04d' $((us / 1000000)) $((us % 1000000 / 100))) "
}

median() {
    tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "nan"; exit }
        if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# DIR: the configuration's directory; R: the round.
w_write() { dd if=/dev/zero of="$DIR/big" bs=1M count="$BIG_MIB" conv=fsync status=none; }
w_read() { dd if="$DIR/big" of=/dev/null bs=1M status=none; }
w_untar() { tar -C "$DIR/tree.$R" -xf "$TARBALL"; }
w_cat() { find "$DIR/tree.$R" -type f -print0 | xargs -0 cat > /dev/null; }
w_du() { du -s "$DIR/tree.$R" > /dev/null; }
w_rm() { rm -rf "$DIR/tree.$R"; }
w_create() {
    perl -e '
        use POSIX ();
        my ($dir, $n, $nd) = @ARGV;
        my $buf = "x" x 4096;
        mkdir $dir or die "mkdir $dir: $!";
        for my $j (0 .. $nd - 1) { mkdir sprintf("%s/d%03d", $dir, $j) or die "mkdir: $!" }
        my $flags = POSIX::O_WRONLY() | POSIX::O_CREAT() | POSIX::O_EXCL();
        for my $i (0 .. $n - 1) {
            my $p = sprintf("%s/d%03d/f%05d", $dir, $i % $nd, $i);
            my $fd = POSIX::open($p, $flags, 0644) // die "$p: $!";
            (POSIX::write($fd, $buf, 4096) // -1) == 4096 or die "$p: $!";
            POSIX::close($fd) // die "$p: $!";
        }
    ' "$DIR/create.$R" "$N4K" "$N4K_DIRS"
}
w_stat() {
    perl -e '
        my ($dir, $n, $nd) = @ARGV;
        for my $i (0 .. $n - 1) {
            my $p = sprintf("%s/d%03d/f%05d", $dir, $i % $nd, $i);
            my @s = lstat($p) or die "$p: $!";
            $s[7] == 4096 or die "$p: size $s[7], not 4096";
        }
    ' "$DIR/create.$R" "$N4K" "$N4K_DIRS"
}
w_untar_small() { tar -C "$DIR/small.$R" -xf "$SMALL_TARBALL"; }
w_rm_small() { rm -rf "$DIR/small.$R"; }

# The first phase of a round: the big file (its cold read drops every cache).
big_file() {
    local config=$1
    timed "$config" write w_write
    drop_caches
    timed "$config" read w_read
    rm -f "$DIR/big"
}
# The second: the FILES tree, kept for the rm phase.
files_tree() {
    local config=$1
    mkdir -p "$DIR/tree.$R"
    sync
    timed "$config" untar w_untar
    sync
    timed "$config" cat w_cat
    sleep 1.1
    timed "$config" du w_du
}

verify_tree() {
    local n bytes
    n=$(find "$DIR/tree" -type f | wc -l)
    bytes=$(du -sb "$DIR/tree" | cut -f1)
    [ "$n" = "$FILES" ] || die "$1: $n files in the tree, expected $FILES"
    # Directory sizes differ between filesystems views; only the file bytes must be there.
    [ "$bytes" -ge $(( TREE_BYTES * 9 / 10 )) ] || die "$1: tree has $bytes bytes, expected ~$TREE_BYTES"
}
verify_small() {
    local n
    n=$(find "$DIR/small" -mindepth 1 | wc -l)
    [ "$n" = "$SMALL_ENTRIES" ] || die "$1: $n entries in the untar-small tree, expected $SMALL_ENTRIES"
}

for config in $CONFIGS; do
    setup "$config"
    [ -n "${DIRS[$config]:-}" ] || continue    # left out (see setup)
    DIR=${DIRS[$config]}
    # A first, untimed extract checks that the configuration works at all (one tree at a
    # time: passthrough_hp could not hold both).
    mkdir -p "$DIR/tree" "$DIR/small"
    tar -C "$DIR/tree" -xf "$TARBALL" || die "$config: tar -xf of the tree failed"
    verify_tree "$config"
    rm -rf "$DIR/tree"
    tar -C "$DIR/small" -xf "$SMALL_TARBALL" || die "$config: tar -xf of the small tree failed"
    verify_small "$config"
    rm -rf "$DIR/small"
    sync
done
[ -n "$CONFIGS" ] || die "no configuration left to measure"
settle
# The configurations in round R's order: rotated by R-1, so that over the rounds each runs at
# several places in a phase (a phase's later configurations find more of the disk's and the
# page cache's work from the earlier ones pending).
rotated() {
    local -a all
    read -r -a all <<< "$CONFIGS"
    local n=${#all[@]} k=$(( ($1 - 1) % ${#all[@]} )) i
    for (( i = 0; i < n; i++ )); do
        printf '%s ' "${all[$(( (i + k) % n ))]}"
    done
}
for R in $(seq 1 "$ROUNDS"); do
    ORDER=$(rotated "$R")
    for config in $ORDER; do
        DIR=${DIRS[$config]}
        big_file "$config"
    done
    for config in $ORDER; do
        DIR=${DIRS[$config]}
        files_tree "$config"
    done
    # Removals together, then SETTLE: no timed create right after a large removal.
    for config in $ORDER; do
        DIR=${DIRS[$config]}
        timed "$config" rm w_rm
        sync
    done
    settle
    for config in $ORDER; do
        DIR=${DIRS[$config]}
        timed "$config" create w_create
        timed "$config" stat w_stat
        # Past a one-second entry and attribute timeout: what a mount keeps for long shows.
        sleep 1.1
        timed "$config" stat-later w_stat
        sync
    done
    # passthrough_hp would hold N4K fds more into the next phase (dropped for every config).
    drop_dentries
    for config in $ORDER; do
        DIR=${DIRS[$config]}
        mkdir -p "$DIR/small.$R"
        sync
        timed "$config" untar-small w_untar_small
        sync
    done
    for config in $ORDER; do
        DIR=${DIRS[$config]}
        timed "$config" rm-small w_rm_small
        sync
    done
    if [ "$R" -lt "$ROUNDS" ]; then settle; fi
    log "round $R of $ROUNDS done"
done
for config in $CONFIGS; do
    DIR=${DIRS[$config]}
    # The create trees of every round, untimed; in batches of one round, hp's fds in mind.
    for R in $(seq 1 "$ROUNDS"); do
        rm -rf "$DIR/create.$R"
    done
    drop_dentries
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
    log "run overhead: no hyperfine, timing $RUN_OVERHEAD_RUNS runs"
    for _ in $(seq 1 "$RUN_OVERHEAD_RUNS"); do
        timed ovh true "$(type -P true)"    # the program, as hyperfine -N runs it
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
        create) echo "create $N4K files of 4 KiB";;
        stat) echo "lstat them, right after";;
        stat-later) echo "lstat them again, 1.1 s later";;
        untar-small) echo "untar $SMALL_ENTRIES-entry small tree";;
        rm-small) echo "rm -rf small tree";;
    esac
}

echo
echo "cachefs filesystem benchmark, $(date -u +%Y-%m-%d), $(uname -r), $(nproc) CPUs"
echo "median of $ROUNDS rounds, seconds (ratio to native); tree: $FILES files, $((TREE_BYTES / 1048576)) MiB;"
echo "small tree: $SMALL files in $((SMALL_ENTRIES - SMALL)) directories, $((SMALL_BYTES / 1048576)) MiB; SETTLE=${SETTLE}s"
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
