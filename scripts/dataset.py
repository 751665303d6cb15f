#!/usr/bin/env python3
"""Benchmark datasets (scripts/bench-layers.sh, scripts/bench-remote.sh). Deterministic datasets: python's Mersenne Twister from a fixed seed (same bytes everywhere)."""
import json, os, random, sys

KiB, MiB = 1 << 10, 1 << 20


def write(path, n, rng):
    with open(path, "wb") as f:
        while n > 0:
            k = min(n, 4 * MiB)
            f.write(rng.randbytes(k))
            n -= k


def tree(root, files, total, seed, small_list, stats_path):
    rng = random.Random(seed)
    # A quarter of the bytes in a few large files (8-64 MiB).
    large, budget = [], total // 4
    while budget - sum(large) >= 8 * MiB:
        large.append(min(rng.randint(8 * MiB, 64 * MiB), budget - sum(large)))
    # Most files small (1-16 KiB); medium ones (64 KiB-1 MiB) take the bytes left over, as
    # many as it takes at their mean size; their sizes are then scaled to sum exactly.
    est_small = (files - len(large)) * (17 * KiB // 2)
    n_medium = max(1, round((total - sum(large) - est_small) / (544 * KiB)))
    n_small = files - len(large) - n_medium
    if n_small < files // 2:
        sys.exit(f"bench-layers: {files} files do not fit in {total // MiB} MiB this way; use more SIZE_MB or fewer FILES")
    small = [rng.randint(1 * KiB, 16 * KiB) for _ in range(n_small)]
    rest = total - sum(large) - sum(small)
    medium = [rng.randint(64 * KiB, 1 * MiB) for _ in range(n_medium)]
    if rest < 64 * KiB * n_medium // 2:
        sys.exit(f"bench-layers: {files} files do not fit in {total // MiB} MiB this way; use more SIZE_MB or fewer FILES")
    scale = rest / sum(medium)
    medium = [max(1, int(m * scale)) for m in medium]
    medium[-1] += rest - sum(medium)
    sizes = [("large", s) for s in large] + [("medium", s) for s in medium] + [("small", s) for s in small]
    rng.shuffle(sizes)
    dirs = set()
    with open(small_list, "w") as sl:
        for i, (kind, size) in enumerate(sizes):
            leaf = i // 100
            d = os.path.join(root, f"d{leaf // 10:03d}", f"e{leaf % 10:02d}")
            if d not in dirs:
                os.makedirs(d, exist_ok=True)
                dirs.add(d)
            rel = f"d{leaf // 10:03d}/e{leaf % 10:02d}/f{i:06d}"
            write(os.path.join(root, rel), size, rng)
            if kind == "small":
                sl.write(rel + "\n")
    tops = {os.path.dirname(d) for d in dirs}
    json.dump({
        "files": len(sizes), "bytes": sum(s for _, s in sizes), "dirs": len(dirs) + len(tops),
        "small": len(small), "medium": len(medium), "large": len(large),
        "small_bytes": sum(small), "medium_bytes": sum(medium), "large_bytes": sum(large),
        "medium_min": min(medium), "medium_max": max(medium),
    }, open(stats_path, "w"))


def rewrite(root, small_list, n, seed):
    """New contents, same sizes, for n files picked from small_list."""
    rng = random.Random(seed)
    paths = [l.strip() for l in open(small_list) if l.strip()]
    for rel in rng.sample(paths, n):
        p = os.path.join(root, rel)
        size = os.path.getsize(p)
        with open(p, "r+b") as f:
            f.write(rng.randbytes(size))


cmd = sys.argv[1]
if cmd == "tree":
    tree(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6], sys.argv[7])
elif cmd == "file":
    os.makedirs(os.path.dirname(sys.argv[2]), exist_ok=True)
    write(sys.argv[2], int(sys.argv[3]), random.Random(int(sys.argv[4])))
elif cmd == "rewrite":
    rewrite(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
else:
    sys.exit(f"gen.py: unknown command {cmd}")
