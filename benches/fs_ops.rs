//! Per-operation latency through a cachefs mount against the same operation on the backing
//! directory, in one run: warm stat, and warm open+read+close of a 4 KiB file (the cost a
//! build tool pays per cached file). Needs root and /dev/fuse.
//!
//!     cargo bench --bench fs_ops

use std::path::Path;
use std::time::Duration;

use cachefs::fs::{FsOptions, MountedFs};
use criterion::{Criterion, criterion_group, criterion_main};

fn mount(backing: &Path, mnt: &Path, passthrough: bool) -> MountedFs {
    let opts = FsOptions {
        passthrough,
        // Long timeouts, as an exclusive lease would use: measures the daemon's own cost.
        entry_ttl: Duration::from_secs(60),
        attr_ttl: Duration::from_secs(60),
        ..FsOptions::default()
    };
    cachefs::fs::mount(backing, mnt, &opts).expect("mount (needs root and /dev/fuse)")
}

fn bench(c: &mut Criterion) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let backing = tmp.path().join("backing");
    let mnt_pt = tmp.path().join("mnt-pt");
    let mnt_us = tmp.path().join("mnt-us");
    for d in [&backing, &mnt_pt, &mnt_us] {
        std::fs::create_dir(d).expect("mkdir");
    }
    std::fs::write(backing.join("f"), vec![7u8; 4096]).expect("write");
    let pt = mount(&backing, &mnt_pt, true);
    let us = mount(&backing, &mnt_us, false);

    let mut g = c.benchmark_group("stat");
    for (name, dir) in [("native", &backing), ("cachefs", &mnt_pt)] {
        let p = dir.join("f");
        g.bench_function(name, |b| b.iter(|| std::fs::metadata(&p).expect("stat")));
    }
    g.finish();

    let mut g = c.benchmark_group("open_read_close_4k");
    for (name, dir) in [
        ("native", &backing),
        ("cachefs-passthrough", &mnt_pt),
        ("cachefs-userspace", &mnt_us),
    ] {
        let p = dir.join("f");
        g.bench_function(name, |b| b.iter(|| std::fs::read(&p).expect("read")));
    }
    g.finish();

    drop(pt);
    drop(us);
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
