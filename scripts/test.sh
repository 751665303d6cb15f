#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests and the integration tests that mount
# real FUSE filesystems. This is what CI runs (.ci/run).
#
# Needs /dev/fuse and root (or fusermount3 for a user); installs fuse3 when fusermount3 is
# missing. Usage: bash scripts/test.sh   (extra arguments go to `cargo nextest run`)
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }
die() { printf 'test.sh: %s\n' "$*" >&2; exit 1; }

SUDO=()
[ "$(id -u)" -eq 0 ] || SUDO=(sudo)
export DEBIAN_FRONTEND=noninteractive

missing=()
command -v fusermount3 >/dev/null || missing+=(fuse3)
# The registry tests (tests/remote.rs) run Debian's CNCF distribution registry on 127.0.0.1.
command -v docker-registry >/dev/null || missing+=(docker-registry)
command -v cc >/dev/null || missing+=(gcc libc6-dev)
# tests/fs_meta.rs runs setfattr/getfattr through a mount.
command -v setfattr >/dev/null || missing+=(attr)
# The attack suite (tests/attacks/fs.rs) runs its racers as an unprivileged user in Python.
[ -x /usr/bin/python3 ] || missing+=(python3)
# The POSIX ACL attack tests (tests/attacks/posix.rs) set and read ACLs with setfacl/getfacl.
command -v setfacl >/dev/null || missing+=(acl)
if [ "${#missing[@]}" -gt 0 ]; then
    step "installing ${missing[*]} (apt-get)"
    "${SUDO[@]}" apt-get update -q
    "${SUDO[@]}" apt-get install -y -q "${missing[@]}"
fi
[ -e /dev/fuse ] || die "/dev/fuse is missing: load the fuse module (modprobe fuse) or run the container with --device /dev/fuse"
if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH" # installed by rustup (scripts/demo.sh) in another shell
fi
command -v cargo >/dev/null || die "cargo is missing: install Rust (https://rustup.rs), or run scripts/demo.sh once"

step "toolchain: $(cargo --version), kernel $(uname -r), $(nproc) cores"

if cargo fmt --version >/dev/null 2>&1; then
    step "cargo fmt --all --check"
    cargo fmt --all --check
else
    step "skipping cargo fmt (rustfmt is not installed: rustup component add rustfmt)"
fi

if cargo clippy --version >/dev/null 2>&1; then
    step "cargo clippy --all-targets -- -D warnings"
    cargo clippy --all-targets -- -D warnings
    step "cargo clippy --no-default-features --all-targets -- -D warnings (no registry support)"
    cargo clippy --no-default-features --all-targets -- -D warnings
else
    step "skipping cargo clippy (not installed: rustup component add clippy)"
fi

# Release mode: the integration tests push hundreds of thousands of requests and hundreds
# of MiB through the filesystem, several times faster optimised; it shares its build with
# scripts/demo.sh.
# cargo-nextest runs each test in its own process and kills one that hangs
# (.config/nextest.toml), so a stuck FUSE request fails the run instead of stalling it.
# Without nextest, cargo test runs under an overall time limit instead.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
if cargo nextest --version >/dev/null 2>&1; then
    step "cargo nextest run --release --no-fail-fast $*"
    cargo nextest run --release --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
    step "cargo test --release --doc"
    cargo test --release --doc 2>&1 | tee -a "$log" || status=$?
else
    step "cargo test --release --no-fail-fast $* (cargo-nextest is not installed: cargo install cargo-nextest)"
    timeout --kill-after=30 1500 cargo test --release --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
fi

# The filesystem suites once more with the requests over io_uring (Linux 6.14+): the kernel's
# enable_uring is set for the pass and restored after it, and mounts then take the ring
# (--io-uring auto, the default). Skipped where the kernel has no such switch or we are not
# root.
URING=/sys/module/fuse/parameters/enable_uring
FS_SUITES=(--test fs_data --test fs_meta --test fs_locks --test safety --test attacks --test accounting --test evict)
if [ -w "$URING" ] && [ "$(id -u)" -eq 0 ]; then
    was=$(cat "$URING")
    trap 'rm -f "$log"; echo "$was" > "$URING"' EXIT
    echo Y > "$URING"
    if cargo nextest --version >/dev/null 2>&1; then
        step "the filesystem suites over io_uring: cargo nextest run --release ${FS_SUITES[*]}"
        cargo nextest run --release --no-fail-fast "${FS_SUITES[@]}" 2>&1 | tee -a "$log" || status=$?
    else
        step "the filesystem suites over io_uring: cargo test --release ${FS_SUITES[*]}"
        timeout --kill-after=30 900 cargo test --release --no-fail-fast "${FS_SUITES[@]}" 2>&1 | tee -a "$log" || status=$?
    fi
    echo "$was" > "$URING"
    trap 'rm -f "$log"' EXIT
else
    step "skipping the io_uring pass ($URING is missing or not writable)"
fi

# One closing line for the whole run, counted from nextest's summary or cargo's per-binary
# result lines.
summary=$(awk '
    /^ *Summary \[/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed,?$/) p += $(i-1); if ($(i) ~ /^failed,?$/) f += $(i-1); if ($(i) ~ /^timed$/) f += $(i-1) } }
    /^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1) } }
    END { printf "%d passed, %d failed", p, f }' "$log")
echo
echo "tests: $summary"
exit "$status"
