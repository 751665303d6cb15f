#!/usr/bin/env bash
# Layer-snapshot benchmark (issue 5, "Performance"): `cachefs snapshot` and `cachefs restore`
# against baselines measured in the same run on the same files, on two datasets:
#
#   tree  FILES files summing to SIZE_MB MiB, mixed sizes (most 1-16 KiB, some 64 KiB-1 MiB,
#         a few 8-64 MiB, about a quarter of the bytes in those), ~100 files per directory,
#         two levels of directories (dNNN/eNN/fNNNNNN)
#   file  one file of SIZE_MB MiB
#
# Both are generated from a fixed seed (python3's random.Random: the same bytes on every run
# and machine), every file with its own contents (nothing deduplicates).
#
# Figures, each the median of ROUNDS rounds, every round running every variant in turn:
#   1. Full snapshot against b3sum over the same files
#        find INST -type f -print0 | xargs -0 b3sum --num-threads 2 > /dev/null
#      (and b3sum with its default threads), warm page cache and cold (`sync; echo 3 >
#      /proc/sys/vm/drop_caches` before each run), in two flavours:
#        (a) into an empty object store: STORE/objects moved aside before the run, `snapshot
#            --rescan`, so every blob is written (and synced: snapshot ends with a syncfs)
#        (b) blobs already stored, `snapshot --rescan`: every file read and hashed again
#      Ratio = b3sum time / snapshot time (issue 5: at least 0.8).
#   2. Re-snapshot (no --rescan) after rewriting 10 random small files (same sizes, new
#      contents) of the tree; for the single-file dataset a re-snapshot with nothing changed.
#      As a share of the full snapshot time (issue 5: at most 2%).
#   3. `cachefs restore LAYER --into ID --quiet` (the cache removed with `cachefs rm` between
#      runs) against `cp -a INST DIR` and `cp -a INST DIR; sync -f DIR` (restore syncfs()s its
#      tree before switching it in) into a fresh directory on the store's filesystem; warm
#      (objects and instance read once beforehand) and cold (drop_caches before each run).
#      (issue 5: restore within 1.5x of cp -a.)
#   4. Peak memory (max RSS, `/usr/bin/time -v`) of every snapshot and restore run; the
#      largest is reported (issue 5: a full snapshot under 256 MiB).
#
# The datasets are written straight into the caches' instance directories
# (STORE/caches/<key>/1) while nothing is mounted: much faster than through FUSE, and what a
# snapshot reads is the same. The 10 changed files of figure 2 are rewritten through a
# `cachefs run` mount of the cache by default (CHANGE_VIA=mount), as a build step would change
# them, so a change log kept by the filesystem gets exercised; CHANGE_VIA=direct rewrites them
# in the instance directory (then only the stat-keyed hash cache can find them).
#
# Times are wall clock ($EPOCHREALTIME around each command; snapshot and restore run under
# /usr/bin/time -v, which adds about a millisecond). Not hyperfine: every round runs all the
# variants in turn, with untimed preparation between them (objects removed, files rewritten,
# page cache dropped), so slow phases of a shared disk hit all of them alike; `sync` (untimed)
# before every timed command.
#
# Every snapshot's --json report is checked (files, hashed_files, stored_bytes, digest) and
# the first restored tree is compared with the original (names, modes, sizes, contents);
# anything unexpected is listed under the results.
#
# Usage (as root: drop_caches, and `cachefs run` mounts):
#   scripts/bench-layers.sh                               # 1 GiB, 50,000 files, 5 rounds
#   SIZE_MB=64 FILES=2000 ROUNDS=3 scripts/bench-layers.sh   # a quick look (about a minute)
#
# Environment:
#   SIZE_MB     size of each dataset in MiB (default 1024)
#   FILES       files in the tree (default 50000)
#   ROUNDS      rounds; each figure is the median (default 5)
#   WORK        scratch directory (default /var/tmp/cachefs-bench-layers); removed at exit
#   STORE_DIR   the cachefs store (default $WORK/store); must not exist yet unless it is
#               under WORK; removed at exit. The cp -a copies go to $WORK/cp, which should be
#               on the same filesystem (a warning says when it is not).
#   CHANGE_VIA  mount (default) or direct, see above
#   SEED        dataset seed (default 42)
#   CACHEFS     the cachefs binary (default: cargo build --release, target/release/cachefs)
#   KEEP        set to keep WORK and STORE_DIR at exit
#
# Needs b3sum, GNU time (/usr/bin/time) (Debian packages b3sum, time), python3, fuse3.
set -euo pipefail
export LC_ALL=C

SIZE_MB=${SIZE_MB:-1024}
FILES=${FILES:-50000}
ROUNDS=${ROUNDS:-5}
WORK=${WORK:-/var/tmp/cachefs-bench-layers}
STORE_DIR=${STORE_DIR:-$WORK/store}
CHANGE_VIA=${CHANGE_VIA:-mount}
SEED=${SEED:-42}
CHANGED=10

ROOT=$(cd "$(dirname "$0")/.." && pwd)
die() { echo "bench-layers: $*" >&2; exit 1; }
log() { echo "bench-layers: $*" >&2; }

COMMAND_LINE="SIZE_MB=$SIZE_MB FILES=$FILES ROUNDS=$ROUNDS"
[ "$CHANGE_VIA" = mount ] || COMMAND_LINE+=" CHANGE_VIA=$CHANGE_VIA"
[ "$SEED" = 42 ] || COMMAND_LINE+=" SEED=$SEED"
[ -z "${CACHEFS:-}" ] || COMMAND_LINE+=" CACHEFS=$CACHEFS"
COMMAND_LINE+=" scripts/bench-layers.sh"

[ "$(id -u)" = 0 ] || die "run as root (drop_caches, and cachefs run mounts)"
case "$CHANGE_VIA" in mount|direct) ;; *) die "CHANGE_VIA is mount or direct, not $CHANGE_VIA";; esac
for v in SIZE_MB FILES ROUNDS SEED; do
    if ! [[ ${!v} =~ ^[0-9]+$ ]] || [ "${!v}" -eq 0 ]; then die "$v must be a positive integer"; fi
done
[ "$SIZE_MB" -ge 16 ] || die "SIZE_MB must be at least 16"
[ "$FILES" -ge $((CHANGED * 2)) ] || die "FILES must be at least $((CHANGED * 2))"
command -v b3sum >/dev/null || die "b3sum is missing (apt-get install b3sum)"
[ -x /usr/bin/time ] || die "GNU time is missing (apt-get install time)"
command -v python3 >/dev/null || die "python3 is missing"

CACHEFS_GIVEN=${CACHEFS:-}
if [ -z "${CACHEFS:-}" ]; then
    log "building cachefs (release)"
    (cd "$ROOT" && cargo build --release --quiet)
    target_dir=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps 2>/dev/null \
        | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
    CACHEFS=${target_dir:-$ROOT/target}/release/cachefs
fi
[ -x "$CACHEFS" ] || die "no cachefs binary at $CACHEFS"

# --- scratch space and cleanup -----------------------------------------------------------

# WORK is removed at exit, so refuse a directory this script did not make.
MARK=.cachefs-bench-layers
if [ -e "$WORK" ] && [ -n "$(ls -A "$WORK" 2>/dev/null)" ] && [ ! -e "$WORK/$MARK" ]; then
    die "$WORK exists and is not this benchmark's scratch directory; set WORK"
fi
case "$STORE_DIR/" in
    "$WORK"/*) ;;
    *) [ ! -e "$STORE_DIR" ] || die "STORE_DIR $STORE_DIR exists; give a new directory";;
esac
MNT=$WORK/mnt
cleanup() {
    set +e
    if mountpoint -q "$MNT" 2>/dev/null; then umount -l "$MNT"; fi
    if [ -z "${KEEP:-}" ]; then
        rm -rf "$STORE_DIR" "$WORK"
    else
        log "kept $WORK and $STORE_DIR"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

rm -rf "$WORK"
mkdir -p "$WORK" "$MNT"
touch "$WORK/$MARK"
export CACHEFS_STORE=$STORE_DIR
RES=$WORK/results.txt
: > "$RES"
LOAD_START=$(cut -d' ' -f1 /proc/loadavg)

can_drop_caches=1
sync
if ! echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then
    can_drop_caches=0
    log "cannot write /proc/sys/vm/drop_caches: the 'cold' figures are WARM page cache"
fi
drop_caches() {
    sync
    if [ "$can_drop_caches" = 1 ]; then echo 3 > /proc/sys/vm/drop_caches; fi
}

# Dataset generation and rewrites: scripts/dataset.py.

# --- timing ------------------------------------------------------------------------------

# timed DATASET NAME CMD...: runs CMD, appends its wall time (seconds) to the results.
timed() {
    local ds=$1 name=$2 t0 t1
    shift 2
    t0=$EPOCHREALTIME
    "$@"
    t1=$EPOCHREALTIME
    echo "$ds $name time $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.4f", b - a }')" >> "$RES"
}

# Peak RSS (KiB) of the last /usr/bin/time -v run.
record_rss() {
    echo "$1 $2 rss $(awk -F': ' '/Maximum resident set size/ { print $2 }' "$WORK/time.out")" >> "$RES"
}

b3sum_tree() { find "$INST" -type f -print0 | xargs -0 b3sum "$@" > /dev/null; }
read_all() { find "$@" -type f -print0 | xargs -0 cat > /dev/null; }

# snapshot DATASET NAME [ARGS...]: a timed `cachefs snapshot ID --json ARGS`, report kept.
snapshot() {
    local ds=$1 name=$2
    shift 2
    timed "$ds" "$name" /usr/bin/time -v -o "$WORK/time.out" \
        "$CACHEFS" snapshot "$ID" --json "$@" > "$WORK/snap.json"
    record_rss "$ds" "$name"
    echo "$ds $name json $(tr -d ' \n' < "$WORK/snap.json")" >> "$RES"
}

full_snapshots() {
    local ds=$1 cache prep
    for cache in warm cold; do
        if [ "$cache" = warm ]; then
            prep=sync
            read_all "$INST"
        else
            prep=drop_caches
        fi
        $prep; timed "$ds" "b3sum2-$cache" b3sum_tree --num-threads 2
        $prep; timed "$ds" "b3sum-$cache" b3sum_tree
        # Moved aside, not removed: freeing 50,000 inodes right before makes ext4's inode
        # allocator skip them one by one for a while (recently_deleted), which would be
        # measured as part of the snapshot. They are removed after the snapshot rounds.
        OLD_OBJECTS=$((OLD_OBJECTS + 1))
        if [ -e "$STORE_DIR/objects" ]; then
            mv "$STORE_DIR/objects" "$WORK/old-objects.$OLD_OBJECTS"
        fi
        $prep; snapshot "$ds" "empty-$cache" --rescan
        $prep; snapshot "$ds" "stored-$cache" --rescan
    done
}

OLD_OBJECTS=0

cp_sync() { cp -a "$INST" "$WORK/cp" && sync -f "$WORK/cp"; }

restores() {
    local ds=$1 round=$2 cache prep
    for cache in warm cold; do
        if [ "$cache" = warm ]; then
            prep=sync
            read_all "$INST" "$STORE_DIR/objects"
        else
            prep=drop_caches
        fi
        $prep
        timed "$ds" "restore-$cache" /usr/bin/time -v -o "$WORK/time.out" \
            "$CACHEFS" restore "$LAYER" --into bench-restore --quiet
        record_rss "$ds" "restore-$cache"
        if [ "$round" = 1 ] && [ "$cache" = warm ]; then check_restored "$ds"; fi
        "$CACHEFS" rm bench-restore > /dev/null
        $prep; timed "$ds" "cp-$cache" cp -a "$INST" "$WORK/cp"
        rm -rf "$WORK/cp"
        $prep; timed "$ds" "cpsync-$cache" cp_sync
        rm -rf "$WORK/cp"
    done
}

instance_of() {
    "$CACHEFS" inspect "$1" --json | python3 -c \
        'import json, sys; print(json.load(sys.stdin)["instances"][0]["path"])'
}

listing() {
    (cd "$1" && find . -mindepth 1 \( -type f -printf '%P f %m %s\n' \) -o -printf '%P %y %m\n' | sort)
}

# The first restored tree must be the original: names, types, modes, sizes, contents.
check_restored() {
    local r
    r=$(instance_of bench-restore)
    if ! cmp -s <(listing "$INST") <(listing "$r"); then
        echo "$1 check restored tree differs from the original (names, types, modes or sizes)" >> "$RES"
    elif ! diff -rq "$INST" "$r" > /dev/null; then
        echo "$1 check restored tree differs from the original (contents)" >> "$RES"
    fi
}

# --- the datasets ------------------------------------------------------------------------

BYTES=$((SIZE_MB * 1048576))
for ds in tree file; do
    "$CACHEFS" run --mount "type=cache,id=bench-$ds,target=$MNT" -- true
done
TREE_INST=$(instance_of bench-tree)
FILE_INST=$(instance_of bench-file)
[ "$(stat -c %d "$WORK")" = "$(stat -c %d "$STORE_DIR")" ] ||
    log "warning: $WORK (cp -a target) and $STORE_DIR (restore target) are on different filesystems"
df -P "$STORE_DIR" | tail -1 | awk '{print "bench-layers: store on " $6 " (" $1 ")"}' >&2

log "generating the tree: $FILES files, $SIZE_MB MiB (seed $SEED), in $TREE_INST"
t0=$EPOCHREALTIME
python3 "$ROOT/scripts/dataset.py" tree "$TREE_INST" "$FILES" "$BYTES" "$SEED" "$WORK/small.list" "$WORK/tree.json"
log "generating the single file: $SIZE_MB MiB, in $FILE_INST"
python3 "$ROOT/scripts/dataset.py" file "$FILE_INST/big.bin" "$BYTES" "$((SEED + 1))"
sync
log "generated in $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }') s"

# --- the runs ----------------------------------------------------------------------------

for ds in tree file; do
    ID=bench-$ds
    if [ "$ds" = tree ]; then INST=$TREE_INST; else INST=$FILE_INST; fi
    log "$ds: $ROUNDS rounds of full snapshots and b3sum (warm, then cold)"
    for r in $(seq 1 "$ROUNDS"); do
        full_snapshots "$ds"
        log "$ds: round $r of $ROUNDS done"
    done
    rm -rf "$WORK"/old-objects.*

    log "$ds: $ROUNDS re-snapshots"
    "$CACHEFS" snapshot "$ID" --quiet > /dev/null    # the hash cache as a plain snapshot leaves it
    for r in $(seq 1 "$ROUNDS"); do
        if [ "$ds" = tree ]; then
            if [ "$CHANGE_VIA" = mount ]; then
                "$CACHEFS" run --mount "type=cache,id=$ID,target=$MNT" -- \
                    python3 "$ROOT/scripts/dataset.py" rewrite "$MNT" "$WORK/small.list" "$CHANGED" "$((SEED * 1000 + r))"
            else
                python3 "$ROOT/scripts/dataset.py" rewrite "$INST" "$WORK/small.list" "$CHANGED" "$((SEED * 1000 + r))"
            fi
        fi
        sync
        snapshot "$ds" resnap
    done
    LAYER=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["digest"])' "$WORK/snap.json")

    log "$ds: $ROUNDS rounds of restore and cp -a (warm, then cold)"
    for r in $(seq 1 "$ROUNDS"); do
        restores "$ds" "$r"
        log "$ds: round $r of $ROUNDS done"
    done
done

# --- report ------------------------------------------------------------------------------

CPU=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
MEM_GIB=$(awk '/^MemTotal/ { printf "%.0f", $2 / 1048576 }' /proc/meminfo)
FS=$(df -PT "$STORE_DIR" | awk 'NR == 2 { print $2 " on " $1 }')
# shellcheck disable=SC1091
OS=$( (. /etc/os-release 2>/dev/null && echo "$PRETTY_NAME") || echo "?")
COMMIT=$(git -C "$ROOT" log -1 --format='%h "%s"' 2>/dev/null || echo "?")
if [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    COMMIT+=" with uncommitted changes"
fi
if [ -n "$CACHEFS_GIVEN" ]; then
    COMMIT="the binary $CACHEFS_GIVEN (the repository is at $COMMIT)"
else
    COMMIT="release build of $COMMIT"
fi

LOAD_END=$(cut -d' ' -f1 /proc/loadavg)
KERNEL=$(uname -r)
NPROC=$(nproc)
B3SUM=$(b3sum --version)
DATE=$(date -u +%Y-%m-%d)
export COMMAND_LINE SIZE_MB FILES ROUNDS CHANGE_VIA CHANGED SEED CPU MEM_GIB FS OS COMMIT \
    can_drop_caches LOAD_START LOAD_END KERNEL NPROC B3SUM DATE
python3 - "$RES" "$WORK/tree.json" <<'PY'
import json, os, statistics, sys
from collections import defaultdict

env = os.environ
times, rss, reports, checks = defaultdict(list), defaultdict(list), defaultdict(list), []
for line in open(sys.argv[1]):
    ds, name, kind, value = line.rstrip("\n").split(" ", 3)
    if kind == "time":
        times[ds, name].append(float(value))
    elif kind == "rss":
        rss[ds, name].append(int(value))
    elif kind == "json":
        reports[ds, name].append(json.loads(value))
    else:
        checks.append(f"{ds}: {name} {kind} {value}")
tree = json.load(open(sys.argv[2]))
size_mb, rounds, changed = int(env["SIZE_MB"]), int(env["ROUNDS"]), int(env["CHANGED"])
MiB = 1 << 20
DS = ["tree", "file"]
expect_files = {"tree": tree["files"], "file": 1}
expect_bytes = {"tree": tree["bytes"], "file": size_mb * MiB}


def med(ds, name):
    return statistics.median(times[ds, name])


# Checks on what cachefs reported.
for ds in DS:
    digests = set()
    for name in ["empty-warm", "stored-warm", "empty-cold", "stored-cold", "resnap"]:
        for i, r in enumerate(reports[ds, name]):
            where = f"{ds}: {name} round {i + 1}:"
            if r["files"] != expect_files[ds] or r["size_bytes"] != expect_bytes[ds]:
                checks.append(f"{where} {r['files']} files, {r['size_bytes']} bytes; expected {expect_files[ds]}, {expect_bytes[ds]}")
            if name != "resnap":
                digests.add(r["digest"])
                if r["hashed_files"] != expect_files[ds]:
                    checks.append(f"{where} hashed {r['hashed_files']} files, expected all {expect_files[ds]}")
                if name.startswith("empty") and r["stored_bytes"] != expect_bytes[ds]:
                    checks.append(f"{where} stored {r['stored_bytes']} bytes into an empty store, expected {expect_bytes[ds]}")
                if name.startswith("stored") and r["stored_bytes"] != 0:
                    checks.append(f"{where} stored {r['stored_bytes']} bytes with every blob present, expected 0")
            else:
                want = changed if ds == "tree" else 0
                if r["hashed_files"] != want:
                    checks.append(f"{where} re-snapshot hashed {r['hashed_files']} files ({r['hashed_bytes']} bytes), expected {want}")
    if len(digests) != 1:
        checks.append(f"{ds}: full snapshots of one tree gave {len(digests)} different digests")

cold = "cold" if env["can_drop_caches"] == "1" else "cold (NOT: drop_caches failed)"


def secs(ds, name):
    m = med(ds, name)
    return f"{m:.3f}"


def thr(ds, name):
    return f"{expect_bytes[ds] / MiB / med(ds, name):.0f} MiB/s"


def row(label, cells):
    print(f"| {label} | " + " | ".join(cells) + " |")


print(f"`{env['COMMAND_LINE']}` (as root), {env['DATE']}.")
print()
print(f"Machine: {env['NPROC']} CPUs ({env['CPU']}), {env['MEM_GIB']} GiB RAM, {env['OS']}, "
      f"Linux {env['KERNEL']}; store on {env['FS']}; load average {env['LOAD_START']} at the start, "
      f"{env['LOAD_END']} at the end. {env['B3SUM']}. cachefs: {env['COMMIT']}.")
print()
print(f"Datasets (seed {env['SEED']}): **tree**, {tree['files']} files, {tree['bytes'] / MiB:.0f} MiB in "
      f"{tree['dirs']} directories: {tree['small']} of 1–16 KiB ({tree['small_bytes'] / MiB:.0f} MiB), "
      f"{tree['medium']} of {tree['medium_min'] // 1024}–{tree['medium_max'] // 1024} KiB ({tree['medium_bytes'] / MiB:.0f} MiB), "
      f"{tree['large']} of 8–64 MiB ({tree['large_bytes'] / MiB:.0f} MiB); **file**, one file of {size_mb} MiB.")
print()
print(f"Median of {rounds} rounds, seconds. Snapshot ratios are b3sum time / snapshot time "
      "(higher is better; b3sum over `find … -print0 | xargs -0`); restore ratios are restore time / cp time.")
print()
print("| figure | tree | file |")
print("|---|---:|---:|")
for c in ["warm", cold]:
    k = c.split()[0]
    row(f"b3sum --num-threads 2, {c}", [f"{secs(d, 'b3sum2-' + k)} ({thr(d, 'b3sum2-' + k)})" for d in DS])
    row(f"b3sum (default threads), {c}", [f"{secs(d, 'b3sum-' + k)} ({thr(d, 'b3sum-' + k)})" for d in DS])
    for flavour, label in [("empty", "snapshot --rescan into an empty object store (blobs written, synced)"),
                           ("stored", "snapshot --rescan, blobs already stored")]:
        cells = []
        for d in DS:
            s = med(d, f"{flavour}-{k}")
            cells.append(f"{s:.3f} ({thr(d, f'{flavour}-{k}')}): {med(d, 'b3sum2-' + k) / s:.2f}x b3sum -2, "
                         f"{med(d, 'b3sum-' + k) / s:.2f}x b3sum")
        row(f"{label}, {c}", cells)
cells = []
for d in DS:
    s = med(d, "resnap")
    own = statistics.median(r["seconds"] for r in reports[d, "resnap"])
    cells.append(f"{s:.3f}: {100 * s / med(d, 'empty-warm'):.1f}% of (a) warm, {100 * s / med(d, 'stored-warm'):.1f}% of (b) warm "
                 f"(cachefs's own `seconds`: {own:.3f})")
row(f"re-snapshot: {changed} small files rewritten (tree), nothing changed (file)", cells)
for c in ["warm", cold]:
    k = c.split()[0]
    row(f"cp -a, {c}", [secs(d, "cp-" + k) for d in DS])
    row(f"cp -a; sync -f, {c}", [secs(d, "cpsync-" + k) for d in DS])
    row(f"restore, {c}", [f"{secs(d, 'restore-' + k)}: {med(d, 'restore-' + k) / med(d, 'cp-' + k):.2f}x cp -a, "
                          f"{med(d, 'restore-' + k) / med(d, 'cpsync-' + k):.2f}x cp -a; sync" for d in DS])


def peak(ds, names):
    return max(max(rss[ds, n]) for n in names) / 1024


snap_names = ["empty-warm", "empty-cold", "stored-warm", "stored-cold"]
row("peak RSS, full snapshot (largest of all runs)", [f"{peak(d, snap_names):.0f} MiB" for d in DS])
row("peak RSS, re-snapshot", [f"{peak(d, ['resnap']):.0f} MiB" for d in DS])
row("peak RSS, restore", [f"{peak(d, ['restore-warm', 'restore-cold']):.0f} MiB" for d in DS])
print()
print("(a): into an empty object store; (b): blobs already stored. The re-snapshot's own `seconds` (its --json "
      "report) leaves out process start, opening the store and taking the instance's lease. "
      f"Re-snapshot changes are made {'through a cachefs mount' if env['CHANGE_VIA'] == 'mount' else 'directly in the instance directory'}.")

print()
print("Against the targets (issue 5):")
print()
print("| target | tree | file | |")
print("|---|---:|---:|---|")


def verdict(values, ok):
    bad = [d for d, v in zip(DS, values) if not ok(v)]
    return "met" if not bad else "not met (" + ", ".join(bad) + ")"


for flavour, fl in [("empty", "(a) empty store"), ("stored", "(b) blobs stored")]:
    for c in ["warm", cold]:
        k = c.split()[0]
        v = [med(d, f"b3sum2-{k}") / med(d, f"{flavour}-{k}") for d in DS]
        row(f"snapshot ≥ 0.8x b3sum --num-threads 2: {fl}, {c}", [f"{x:.2f}x" for x in v] + [verdict(v, lambda x: x >= 0.8)])
for flavour, fl in [("empty", "(a)"), ("stored", "(b)")]:
    v = [100 * med(d, "resnap") / med(d, f"{flavour}-warm") for d in DS]
    row(f"re-snapshot ≤ 2% of full snapshot {fl}, warm", [f"{x:.1f}%" for x in v] + [verdict(v, lambda x: x <= 2)])
for c in ["warm", cold]:
    k = c.split()[0]
    v = [med(d, f"restore-{k}") / med(d, f"cp-{k}") for d in DS]
    row(f"restore ≤ 1.5x cp -a, {c}", [f"{x:.2f}x" for x in v] + [verdict(v, lambda x: x <= 1.5)])
v = [peak(d, snap_names) for d in DS]
row("full snapshot peak RSS < 256 MiB", [f"{x:.0f} MiB" for x in v] + [verdict(v, lambda x: x < 256)])

print()
if checks:
    print("Checks that FAILED (the figures above may not mean what they say):")
    print()
    for c in checks:
        print(f"- {c}")
else:
    print("Checks: every snapshot read, stored and hashed what it should (per its --json report), "
          "all full snapshots of a dataset gave one digest, and the restored trees equal the originals.")
print()
print("All rounds, seconds:")
print()
for d in DS:
    for name in ["b3sum2-warm", "b3sum-warm", "empty-warm", "stored-warm",
                 "b3sum2-cold", "b3sum-cold", "empty-cold", "stored-cold", "resnap",
                 "restore-warm", "cp-warm", "cpsync-warm", "restore-cold", "cp-cold", "cpsync-cold"]:
        print(f"    {d} {name}: " + " ".join(f"{t:.3f}" for t in times[d, name]))
PY
