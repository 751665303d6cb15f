#!/usr/bin/env bash
# Registry benchmark (issue 6, "Performance"): `cachefs push` and `cachefs pull` through a real
# registry on loopback (Debian's docker-registry, the CNCF distribution registry), against
# baselines measured in the same run on the same tree:
#
#   tree  FILES files summing to SIZE_MB MiB (scripts/dataset.py: mixed sizes, ~100 files per
#         directory, two levels; random bytes, so zstd does not shrink them, as with .debs,
#         .crate files and wheels, which are compressed already)
#
# Figures, each the median of ROUNDS rounds (every round runs every variant in turn):
#   1. Push of the stored layer into an empty registry, nothing known of earlier pushes
#      (`push --layer`; the store's remote tables are emptied and the registry restarted on
#      fresh storage before each run), so every chunk is built and uploaded, against
#        - tar -C INST -cf - . | zstd -3 -T0 -q -o FILE      (pack the same tree)
#        - curl -T BLOB (one PUT of a blob of SIZE_MB MiB into the same registry)
#   2. Re-push of the unchanged cache to the same tag (`cachefs push ID REF`: snapshot
#      included): time; blobs uploaded (must be 0).
#   3. Re-push after rewriting 10 random small files through a `cachefs run` mount (scattered
#      over the tree, like new package versions): `cachefs push ID REF` (snapshot included):
#      time, chunks uploaded (blobs uploaded less the index), bytes uploaded.
#   4. Pull into an empty store (`pull --into`, restore included), against
#        - zstd -dc FILE | tar -x -C DIR                      (unpack the same tree)
#        - curl -o FILE (one GET of the SIZE_MB MiB blob)
#   5. Pull of the changed tag (3) into the store of 4, which has the previous layer: chunks
#      downloaded, time.
#   6. Peak memory (max RSS, /usr/bin/time -v) of every push and pull.
#
# Page cache warm (the tree is read once before each round); the registry's storage is on the
# same filesystem as the work directory. `sync` (untimed) before every timed command.
#
# Usage (as root: cachefs run mounts):
#   scripts/bench-remote.sh                                   # 1 GiB, 50,000 files, 3 rounds
#   SIZE_MB=64 FILES=2000 ROUNDS=1 scripts/bench-remote.sh     # a quick look
#
# Environment: SIZE_MB (1024), FILES (50000), ROUNDS (3), SEED (42), WORK
# (/var/tmp/cachefs-bench-remote, removed at exit unless KEEP is set), CACHEFS (the binary;
# default: cargo build --release).
#
# Needs docker-registry, curl, zstd, GNU time, python3, fuse3.
set -euo pipefail
export LC_ALL=C

SIZE_MB=${SIZE_MB:-1024}
FILES=${FILES:-50000}
ROUNDS=${ROUNDS:-3}
SEED=${SEED:-42}
WORK=${WORK:-/var/tmp/cachefs-bench-remote}
CHANGED=10

ROOT=$(cd "$(dirname "$0")/.." && pwd)
die() { echo "bench-remote: $*" >&2; exit 1; }
log() { echo "bench-remote: $*" >&2; }

COMMAND_LINE="SIZE_MB=$SIZE_MB FILES=$FILES ROUNDS=$ROUNDS"
[ "$SEED" = 42 ] || COMMAND_LINE+=" SEED=$SEED"
COMMAND_LINE+=" scripts/bench-remote.sh"

[ "$(id -u)" = 0 ] || die "run as root (cachefs run mounts)"
for v in SIZE_MB FILES ROUNDS SEED; do
    if ! [[ ${!v} =~ ^[0-9]+$ ]] || [ "${!v}" -eq 0 ]; then die "$v must be a positive integer"; fi
done
for c in docker-registry curl zstd python3; do
    command -v "$c" >/dev/null || die "$c is missing (apt-get install docker-registry curl zstd python3)"
done
[ -x /usr/bin/time ] || die "GNU time is missing (apt-get install time)"

if [ -z "${CACHEFS:-}" ]; then
    log "building cachefs (release)"
    (cd "$ROOT" && cargo build --release --quiet)
    target_dir=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps 2>/dev/null \
        | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
    CACHEFS=${target_dir:-$ROOT/target}/release/cachefs
fi
[ -x "$CACHEFS" ] || die "no cachefs binary at $CACHEFS"

MARK=.cachefs-bench-remote
if [ -e "$WORK" ] && [ -n "$(ls -A "$WORK" 2>/dev/null)" ] && [ ! -e "$WORK/$MARK" ]; then
    die "$WORK exists and is not this benchmark's scratch directory; set WORK"
fi
MNT=$WORK/mnt
STORE=$WORK/store
REG_PID=
stop_registry() {
    if [ -n "$REG_PID" ]; then
        kill "$REG_PID" 2>/dev/null || true
        wait "$REG_PID" 2>/dev/null || true
        REG_PID=
    fi
}
cleanup() {
    set +e
    stop_registry
    if mountpoint -q "$MNT" 2>/dev/null; then umount -l "$MNT"; fi
    if [ -z "${KEEP:-}" ]; then rm -rf "$WORK"; else log "kept $WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

rm -rf "$WORK"
mkdir -p "$WORK" "$MNT"
touch "$WORK/$MARK"
export CACHEFS_STORE=$STORE
export DOCKER_CONFIG=$WORK/docker-config   # no credentials of this machine's user
unset CACHEFS_REGISTRY_USER CACHEFS_REGISTRY_PASSWORD
RES=$WORK/results.txt
: > "$RES"
LOAD_START=$(cut -d' ' -f1 /proc/loadavg)

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
REG=127.0.0.1:$PORT
# start_registry: fresh storage each time (an empty registry).
start_registry() {
    stop_registry
    rm -rf "$WORK/reg"
    mkdir -p "$WORK/reg/data"
    cat > "$WORK/reg/config.yml" <<EOF
version: 0.1
log: { level: error, accesslog: { disabled: true } }
storage:
  filesystem: { rootdirectory: $WORK/reg/data }
  delete: { enabled: true }
http:
  addr: $REG
EOF
    docker-registry serve "$WORK/reg/config.yml" > "$WORK/reg/log" 2>&1 &
    REG_PID=$!
    local i
    for i in $(seq 1 250); do
        if curl -sf -o /dev/null "http://$REG/v2/"; then return 0; fi
        sleep 0.02
    done
    cat "$WORK/reg/log" >&2
    die "the registry did not start"
}

# timed NAME CMD...: runs CMD under /usr/bin/time -v, appends wall time and peak RSS.
timed() {
    local name=$1 t0 t1
    shift
    sync
    t0=$EPOCHREALTIME
    /usr/bin/time -v -o "$WORK/time.out" "$@"
    t1=$EPOCHREALTIME
    echo "$name time $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.4f", b - a }')" >> "$RES"
    echo "$name rss $(awk -F': ' '/Maximum resident set size/ { print $2 }' "$WORK/time.out")" >> "$RES"
}
json_field() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }
record_json() { echo "$1 json $(tr -d ' \n' < "$2")" >> "$RES"; }
read_all() { find "$@" -type f -print0 | xargs -0 cat > /dev/null; }
forget_pushes() {
    python3 - "$1/cachefs.db" <<'PY'
import sqlite3, sys
c = sqlite3.connect(sys.argv[1])
c.execute("DELETE FROM remote_chunks")
c.execute("DELETE FROM remote_blobs")
c.commit()
PY
}
instance_of() {
    "$CACHEFS" inspect "$1" --json | python3 -c \
        'import json, sys; print(json.load(sys.stdin)["instances"][0]["path"])'
}
# curl_put FILE DIGEST: one monolithic upload (POST, then PUT of the whole file).
curl_put() {
    local loc
    loc=$(curl -sf -D - -o /dev/null -X POST "http://$REG/v2/bench/curl/blobs/uploads/" \
        | tr -d '\r' | awk -F': ' 'tolower($1) == "location" { print $2 }')
    case "$loc" in http*) ;; *) loc="http://$REG$loc" ;; esac
    case "$loc" in *\?*) loc="$loc&digest=$2" ;; *) loc="$loc?digest=$2" ;; esac
    curl -sf -o /dev/null -T "$1" -H 'Content-Type: application/octet-stream' "$loc"
}
export -f curl_put
export REG

# --- the tree ----------------------------------------------------------------------------

"$CACHEFS" run --mount "type=cache,id=bench,target=$MNT" -- true
INST=$(instance_of bench)
BYTES=$((SIZE_MB * 1024 * 1024))
log "generating the tree: $FILES files, $SIZE_MB MiB (seed $SEED), in $INST"
python3 "$ROOT/scripts/dataset.py" tree "$INST" "$FILES" "$BYTES" "$SEED" "$WORK/small.list" "$WORK/tree.json"
python3 "$ROOT/scripts/dataset.py" file "$WORK/blob.bin" "$BYTES" "$((SEED + 7))"
BLOB_DIGEST="sha256:$(sha256sum "$WORK/blob.bin" | cut -d' ' -f1)"
LAYER=$("$CACHEFS" snapshot bench --quiet)
log "layer $LAYER"

for r in $(seq 1 "$ROUNDS"); do
    log "round $r of $ROUNDS"
    rm -rf "$WORK/pulled" "$WORK/x" "$WORK/base.tar.zst" "$WORK/dl.bin"
    forget_pushes "$STORE"    # nothing known of earlier pushes: every chunk is compressed
    read_all "$INST"
    start_registry

    # 1. pack / upload baselines, then the cold push.
    timed tar-zstd sh -c "tar -C '$INST' -cf - . | zstd -3 -T0 -q -o '$WORK/base.tar.zst'"
    timed curl-put bash -c 'curl_put "$@"' curl_put "$WORK/blob.bin" "$BLOB_DIGEST"
    timed push-cold "$CACHEFS" push --layer "$LAYER" "$REG/bench/caches:r$r" --json > "$WORK/push.json"
    record_json push-cold "$WORK/push.json"

    # 2. re-push, nothing changed.
    timed push-again "$CACHEFS" push bench "$REG/bench/caches:r$r" --json > "$WORK/push.json"
    record_json push-again "$WORK/push.json"

    # 4. pull into an empty store, and its baselines.
    mkdir -p "$WORK/x"
    timed unzstd-untar sh -c "zstd -dc '$WORK/base.tar.zst' | tar -x -C '$WORK/x'"
    timed curl-get curl -sf -o "$WORK/dl.bin" "http://$REG/v2/bench/curl/blobs/$BLOB_DIGEST"
    timed pull-cold "$CACHEFS" --store "$WORK/pulled" pull "$REG/bench/caches:r$r" --into bench --json > "$WORK/pull.json"
    record_json pull-cold "$WORK/pull.json"
    if [ "$r" = 1 ]; then
        # The pulled tree is the original (names, kinds, modes, sizes, contents).
        got=$(CACHEFS_STORE=$WORK/pulled instance_of bench)
        if ! diff -r --no-dereference "$INST" "$got" > "$WORK/diff.out" 2>&1; then
            echo "check: pulled tree differs: $(head -3 "$WORK/diff.out")" >> "$RES"
        fi
        if [ "$(find "$INST" -printf '%m %y %s %P\n' | sort | sha256sum)" != "$(find "$got" -printf '%m %y %s %P\n' | sort | sha256sum)" ]; then
            echo "check: pulled tree has other modes, kinds or sizes" >> "$RES"
        fi
    fi

    # 3. ten scattered files rewritten through a mount, then push (snapshot included).
    "$CACHEFS" run --mount "type=cache,id=bench,target=$MNT" -- \
        python3 "$ROOT/scripts/dataset.py" rewrite "$MNT" "$WORK/small.list" "$CHANGED" "$((SEED * 1000 + r))"
    timed push-changed "$CACHEFS" push bench "$REG/bench/caches:r$r" --json > "$WORK/push.json"
    record_json push-changed "$WORK/push.json"

    # 5. pull the changed tag into the store that has the previous layer.
    timed pull-changed "$CACHEFS" --store "$WORK/pulled" pull "$REG/bench/caches:r$r" --into bench --replace --json > "$WORK/pull.json"
    record_json pull-changed "$WORK/pull.json"

    # Back to the original tree for the next round (the changed files restored).
    "$CACHEFS" restore "$LAYER" --into bench --replace --quiet
done
stop_registry
LOAD_END=$(cut -d' ' -f1 /proc/loadavg)

# --- report ------------------------------------------------------------------------------

python3 - "$RES" "$SIZE_MB" "$FILES" "$ROUNDS" "$LOAD_START" "$LOAD_END" "$COMMAND_LINE" <<'PY'
import json, statistics, sys
res, size_mb, files, rounds, load0, load1, cmdline = sys.argv[1:]
size_mb = int(size_mb)
times, rss, js, checks = {}, {}, {}, []
for line in open(res):
    parts = line.rstrip("\n").split(" ", 2)
    if parts[0] == "check:":
        checks.append(line.strip())
        continue
    name, kind, value = parts
    if kind == "time":
        times.setdefault(name, []).append(float(value))
    elif kind == "rss":
        rss.setdefault(name, []).append(int(value))
    elif kind == "json":
        js.setdefault(name, []).append(json.loads(value))
med = {k: statistics.median(v) for k, v in times.items()}
mibs = lambda k: size_mb / med[k]
print(f"cachefs registry benchmark: {files} files, {size_mb} MiB, {rounds} rounds (median), load {load0} -> {load1}")
print(f"reproduce: {cmdline}")
print()
print("| what | time | MiB/s | ratio (baseline time / cachefs time) |")
print("|---|---|---|---|")
rows = [
    ("tar \\| zstd -3 -T0 to a file", "tar-zstd", None),
    ("curl PUT of one blob of the same size", "curl-put", None),
    ("push into an empty registry", "push-cold", ["tar-zstd", "curl-put"]),
    ("zstd -d \\| tar -x", "unzstd-untar", None),
    ("curl GET of the blob", "curl-get", None),
    ("pull into an empty store (restore included)", "pull-cold", ["unzstd-untar", "curl-get"]),
]
for label, k, base in rows:
    ratio = ", ".join(f"{med[b] / med[k]:.2f}x vs {b}" for b in base) if base else ""
    print(f"| {label} | {med[k]:.2f} s | {mibs(k):.0f} | {ratio} |")
print()
def summary(name, keys):
    out = []
    for j in js.get(name, []):
        out.append(", ".join(f"{k}={j.get(k)}" for k in keys))
    return out
print(f"re-push, unchanged: {med['push-again']:.3f} s; " + " | ".join(summary("push-again", ["blobs_uploaded", "bytes_uploaded", "blobs_reused"])))
print(f"re-push after {10} scattered files changed (snapshot included): {med['push-changed']:.3f} s")
for j in js.get("push-changed", []):
    print(f"  chunks uploaded {j['blobs_uploaded'] - 1} (+ the index) of {j['chunks']}, {j['bytes_uploaded']} bytes, chunks built {j['chunks_built']}")
print(f"pull of the changed tag into the store holding the previous layer: {med['pull-changed']:.3f} s")
for j in js.get("pull-changed", []):
    print(f"  chunks downloaded {j['chunks_downloaded']} of {j['chunks']}, {j['bytes_downloaded']} bytes")
for j in js.get("push-cold", [])[:1]:
    print(f"artifact: {j['chunks']} chunks, {j['artifact_bytes']} bytes compressed")
print("rounds (s): " + "; ".join(f"{k} " + " ".join(f"{t:.2f}" for t in v) for k, v in times.items()))
print("peak RSS (MiB): " + ", ".join(f"{k} {max(v) / 1024:.0f}" for k, v in sorted(rss.items()) if k.startswith(("push", "pull"))))
checks += [f"check: push-again uploaded {j['blobs_uploaded']} blobs" for j in js.get("push-again", []) if j["blobs_uploaded"] != 0]
print("checks: " + ("all passed" if not checks else "; ".join(checks)))
PY
