#!/usr/bin/env bash
# Quick start: install what is missing, build cachefs, and run the main job twice.
#
# The job: `apt-get install --download-only` of a few packages (jq and the gcc-12 compiler,
# about 20-40 MB) with /var/cache/apt/archives mounted from a cachefs cache. The first run downloads the .deb files into the cache; the
# second run finds them there and downloads nothing. The store is a throwaway directory,
# removed at the end; the host's own /var/cache/apt/archives is hidden during each run and
# never touched.
#
# For Debian/Ubuntu, as root or as a user with sudo. Usage: bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# Override with DEMO_PACKAGES="pkg ..." (word-split on purpose).
read -r -a PACKAGES <<<"${DEMO_PACKAGES:-jq gcc-12}"
TARGET=/var/cache/apt/archives

if [ -t 1 ]; then BOLD=$'\033[1m' PLAIN=$'\033[0m'; else BOLD='' PLAIN=''; fi
say() { printf '\n%s==> %s%s\n' "$BOLD" "$*" "$PLAIN"; }
die() { printf 'demo.sh: %s\n' "$*" >&2; exit 1; }

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "run as root, or install sudo (mounting over $TARGET needs root)"
    SUDO=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive

# --- 1. what is missing ------------------------------------------------------------------
apt_updated=no
apt_update_once() {
    if [ "$apt_updated" = no ]; then
        say "apt-get update"
        "${SUDO[@]}" apt-get update -q
        apt_updated=yes
    fi
}

# cachefs is edition 2024: Rust 1.85 or newer (Debian's own cargo is older).
rust_ok() {
    local v
    v=$(cargo --version 2>/dev/null | awk '{print $2}') || return 1
    [ -n "$v" ] && [ "$(printf '%s\n' 1.85.0 "$v" | sort -V | head -n1)" = 1.85.0 ]
}

missing=()
command -v fusermount3 >/dev/null || missing+=(fuse3)
command -v cc >/dev/null || missing+=(gcc libc6-dev)
if ! rust_ok && [ ! -x "$HOME/.cargo/bin/cargo" ]; then
    command -v curl >/dev/null || missing+=(curl ca-certificates) # for rustup
fi
if [ "${#missing[@]}" -gt 0 ]; then
    apt_update_once
    say "installing ${missing[*]}"
    "${SUDO[@]}" apt-get install -y -q "${missing[@]}"
fi
[ -e /dev/fuse ] || die "/dev/fuse is missing: load the fuse module (modprobe fuse) or run the container with --device /dev/fuse"

if ! rust_ok; then
    export PATH="$HOME/.cargo/bin:$PATH"
    if ! rust_ok; then
        say "installing the Rust toolchain (rustup, stable) into ~/.cargo"
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
        rust_ok || die "Rust 1.85 or newer is needed; found: $(cargo --version 2>&1 || true)"
    fi
fi

# apt needs package lists to know where to download the packages from.
if ! apt-cache show "${PACKAGES[@]}" >/dev/null 2>&1; then
    apt_update_once
fi

# --- 2. build ---------------------------------------------------------------------------
say "cargo build --release"
cargo build --release
TARGET_DIR=${CARGO_TARGET_DIR:-target}
case $TARGET_DIR in /*) ;; *) TARGET_DIR=$PWD/$TARGET_DIR ;; esac
CACHEFS=$TARGET_DIR/release/cachefs
[ -x "$CACHEFS" ] || die "built binary not found at $CACHEFS"

# --- 3. the main job, twice ---------------------------------------------------------------
WORK=$(mktemp -d /tmp/cachefs-demo.XXXXXX)
STORE=$WORK/store
trap '"${SUDO[@]}" rm -rf "$WORK"' EXIT

MOUNT="type=cache,id=apt,target=$TARGET,sharing=locked"
# --reinstall makes apt download the packages even when the host has them installed already;
# Keep-Downloaded-Packages keeps the .debs even where apt.conf says otherwise (Docker images).
JOB=(apt-get install -y --download-only --reinstall -o APT::Keep-Downloaded-Packages=true "${PACKAGES[@]}")

now() { date +%s.%N; }
run_job() { # $1: log file; sets ELAPSED (seconds)
    local t0
    t0=$(now)
    "${SUDO[@]}" "$CACHEFS" --store "$STORE" run --mount "$MOUNT" -- "${JOB[@]}" 2>&1 | tee "$1"
    ELAPSED=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }')
}
# apt's own account of a run: "Need to get X/Y of archives" (X: what was not in the cache)
# and "Fetched X in Ns" (absent when nothing was downloaded).
need_to_get() { grep -m1 -o 'Need to get .* of archives' "$1" || echo "(no 'Need to get' line)"; }
fetched() { grep -m1 -o '^Fetched .*' "$1" || echo "nothing fetched"; }

say "run 1: cachefs --store $STORE run --mount $MOUNT -- ${JOB[*]}"
run_job "$WORK/run1.log"
T1=$ELAPSED

say "run 2: the same command, same cache id"
run_job "$WORK/run2.log"
T2=$ELAPSED

say "what the cache holds (mounted read-only this time)"
"${SUDO[@]}" "$CACHEFS" --store "$STORE" run --mount "$MOUNT,ro" -- \
    find "$TARGET" -maxdepth 1 -name '*.deb' -printf '%10s  %f\n'

say "result"
printf '  run 1: %6s s   %s; %s\n' "$T1" "$(need_to_get "$WORK/run1.log")" "$(fetched "$WORK/run1.log")"
printf '  run 2: %6s s   %s; %s   <- served from the cache\n' "$T2" "$(need_to_get "$WORK/run2.log")" "$(fetched "$WORK/run2.log")"
grep -q 'Need to get 0 B' "$WORK/run2.log" || die "run 2 downloaded again: the cache did not keep the packages"
