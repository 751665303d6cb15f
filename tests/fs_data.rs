//! File data through a real mount, in both data paths (kernel passthrough and userspace):
//! what is written through the mount is what lands in the backing directory and what is read
//! back, byte for byte, with the sizes the daemon reports matching the backing files.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

fn round_trip(pt: bool) {
    let mut tm = TestMount::mode(pt);
    let sizes = [
        0usize,
        1,
        4095,
        4096,
        4097,
        128 * 1024 + 3,
        MIB as usize + 7,
    ];
    for &n in &sizes {
        let name = format!("f{n}");
        let data = content(&name, n);
        let mut f = File::create(tm.m(&name)).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap(); // fsync through the mount
        drop(f);
        assert_eq!(fs::read(tm.m(&name)).unwrap(), data, "{name} via mount");
        assert_eq!(fs::read(tm.b(&name)).unwrap(), data, "{name} in backing");
        assert_same(&tm.m(&name), &tm.b(&name));
    }
    // fsyncdir through the mount.
    File::open(tm.mnt()).unwrap().sync_all().unwrap();

    // Overwrite in the middle with pwrite, read back with pread.
    let name = format!("f{}", 128 * 1024 + 3);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(tm.m(&name))
        .unwrap();
    f.write_all_at(b"MIDDLE", 70_000).unwrap();
    let mut buf = [0u8; 6];
    f.read_exact_at(&mut buf, 70_000).unwrap();
    assert_eq!(&buf, b"MIDDLE");
    drop(f);
    let mut expect = content(&name, 128 * 1024 + 3);
    expect[70_000..70_006].copy_from_slice(b"MIDDLE");
    assert_eq!(fs::read(tm.b(&name)).unwrap(), expect);

    // Files written straight into the backing directory are served as they are.
    let direct = content("direct", 300_000);
    fs::write(tm.b("direct"), &direct).unwrap();
    assert_eq!(fs::read(tm.m("direct")).unwrap(), direct);
    assert_same(&tm.m("direct"), &tm.b("direct"));

    // And everything is still there after a remount.
    tm.remount();
    assert_eq!(fs::read(tm.m(&name)).unwrap(), expect);
    assert_same_tree(tm.mnt(), tm.backing());
}

fn sizes_and_truncate(pt: bool) {
    let tm = TestMount::mode(pt);
    let p = tm.m("s");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&p)
        .unwrap();
    f.write_all(&content("s", 10_000)).unwrap();
    // The size is visible while the file is still open, by path and by fd.
    assert_eq!(
        fs::metadata(&p).unwrap().len(),
        10_000,
        "stat by path while open"
    );
    assert_eq!(f.metadata().unwrap().len(), 10_000, "fstat while open");
    assert_eq!(fs::metadata(tm.b("s")).unwrap().len(), 10_000, "backing");

    // Shrink through the fd (ftruncate).
    f.set_len(100).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().len(), 100);
    assert_eq!(fs::metadata(tm.b("s")).unwrap().len(), 100);
    drop(f);

    // Grow through the path (truncate(2)): the tail reads as zeros.
    let c = cpath(&p);
    cvt(unsafe { libc::truncate(c.as_ptr(), 50_000) }).unwrap();
    let data = fs::read(&p).unwrap();
    assert_eq!(data.len(), 50_000);
    assert_eq!(&data[..100], &content("s", 100)[..]);
    assert!(
        data[100..].iter().all(|&b| b == 0),
        "grown tail must be zeros"
    );
    assert_same(&p, &tm.b("s"));

    // O_TRUNC empties it.
    drop(
        OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&p)
            .unwrap(),
    );
    assert_eq!(fs::metadata(&p).unwrap().len(), 0);
    assert_eq!(fs::metadata(tm.b("s")).unwrap().len(), 0);

    // O_APPEND appends, from two separate opens.
    for part in [&b"first,"[..], b"second"] {
        let mut a = OpenOptions::new().append(true).open(&p).unwrap();
        a.write_all(part).unwrap();
    }
    assert_eq!(fs::read(&p).unwrap(), b"first,second");
    assert_eq!(fs::read(tm.b("s")).unwrap(), b"first,second");

    // pwrite past the end leaves a zero gap and sets the size.
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(b"END", 1_000_000).unwrap();
    drop(f);
    assert_eq!(fs::metadata(&p).unwrap().len(), 1_000_003);
    let data = fs::read(&p).unwrap();
    assert_eq!(&data[..12], b"first,second");
    assert!(data[12..1_000_000].iter().all(|&b| b == 0));
    assert_eq!(&data[1_000_000..], b"END");
    assert_same(&p, &tm.b("s"));

    // A file created directly in the backing directory is served with its size.
    fs::write(tm.b("s2"), b"0123456789").unwrap();
    assert_eq!(fs::metadata(tm.m("s2")).unwrap().len(), 10);
}

fn large_file(pt: bool) {
    let mut tm = TestMount::mode(pt);
    let len = 256 * MIB + 12_345;
    let written = write_stream(&tm.m("big"), "large-file", len);
    assert_eq!(fs::metadata(tm.m("big")).unwrap().len(), len);
    assert_eq!(hash_file(&tm.b("big")), (written, len), "backing content");
    assert_eq!(
        hash_file(&tm.m("big")),
        (written, len),
        "read back via mount"
    );
    // Read again on a fresh mount, so nothing comes from the old mount's page cache.
    tm.remount();
    assert_eq!(hash_file(&tm.m("big")), (written, len), "after remount");
    // Random reads at unaligned offsets agree with the backing file.
    let (fm, fb) = (
        File::open(tm.m("big")).unwrap(),
        File::open(tm.b("big")).unwrap(),
    );
    for off in [0u64, 4095, 1 << 20, 100 * MIB + 17, len - 5000] {
        let (mut a, mut b) = (vec![0u8; 5000], vec![0u8; 5000]);
        fm.read_exact_at(&mut a, off).unwrap();
        fb.read_exact_at(&mut b, off).unwrap();
        assert_eq!(a, b, "offset {off}");
    }
}

fn lseek_data(f: &File, off: i64, whence: i32) -> std::io::Result<i64> {
    cvt(unsafe { libc::lseek(f.as_raw_fd(), off, whence) })
}

fn sparse(pt: bool) {
    let tm = TestMount::mode(pt);
    let p = tm.m("sparse");
    let far = 1i64 << 30;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&p)
        .unwrap();
    let data = content("sparse", 4096);
    f.write_all_at(&data, far as u64).unwrap();
    f.sync_all().unwrap();

    let (m, b) = (stat(&p).unwrap(), stat(&tm.b("sparse")).unwrap());
    assert_eq!(m.st_size, far + 4096);
    assert_eq!(b.st_size, far + 4096);
    assert!(
        b.st_blocks <= 64,
        "backing must stay sparse: {} blocks",
        b.st_blocks
    );
    assert_eq!(m.st_blocks, b.st_blocks, "st_blocks via mount");

    assert_eq!(
        lseek_data(&f, 0, libc::SEEK_DATA).unwrap(),
        far,
        "SEEK_DATA from 0"
    );
    assert_eq!(
        lseek_data(&f, 0, libc::SEEK_HOLE).unwrap(),
        0,
        "SEEK_HOLE from 0"
    );
    assert_eq!(
        lseek_data(&f, far, libc::SEEK_HOLE).unwrap(),
        far + 4096,
        "SEEK_HOLE in data"
    );
    assert_errno(
        lseek_data(&f, far + 8192, libc::SEEK_DATA),
        libc::ENXIO,
        "SEEK_DATA past EOF",
    );

    let mut buf = vec![1u8; 4096];
    f.read_exact_at(&mut buf, (far / 2) as u64).unwrap();
    assert!(buf.iter().all(|&x| x == 0), "hole reads as zeros");
    f.read_exact_at(&mut buf, far as u64).unwrap();
    assert_eq!(buf, data);

    // Plain seek + write, as the brief's "seek far, write" tools do.
    let mut g = File::create(tm.m("sparse2")).unwrap();
    g.seek(SeekFrom::Start(64 * MIB)).unwrap();
    g.write_all(b"tail").unwrap();
    drop(g);
    assert_eq!(fs::metadata(tm.m("sparse2")).unwrap().len(), 64 * MIB + 4);
    assert!(stat(&tm.b("sparse2")).unwrap().st_blocks <= 64);
    assert_same(&tm.m("sparse2"), &tm.b("sparse2"));
}

fn fallocate(pt: bool) {
    let tm = TestMount::mode(pt);
    let p = tm.m("fa");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&p)
        .unwrap();
    let fd = f.as_raw_fd();
    cvt(unsafe { libc::fallocate(fd, 0, 0, MIB as i64) }).unwrap();
    let (m, b) = (stat(&p).unwrap(), stat(&tm.b("fa")).unwrap());
    assert_eq!((m.st_size, b.st_size), (MIB as i64, MIB as i64));
    assert!(b.st_blocks >= 2048, "allocated: {} blocks", b.st_blocks);
    assert_eq!(m.st_blocks, b.st_blocks);

    // KEEP_SIZE allocates beyond EOF without changing the size.
    cvt(unsafe { libc::fallocate(fd, libc::FALLOC_FL_KEEP_SIZE, MIB as i64, MIB as i64) }).unwrap();
    let (m, b) = (stat(&p).unwrap(), stat(&tm.b("fa")).unwrap());
    assert_eq!((m.st_size, b.st_size), (MIB as i64, MIB as i64));
    assert!(
        b.st_blocks >= 4096,
        "allocated past EOF: {} blocks",
        b.st_blocks
    );
    assert_eq!(m.st_blocks, b.st_blocks);

    // Punch a hole in written data: those bytes read back as zeros, the rest survives.
    let data = content("fa", MIB as usize);
    f.write_all_at(&data, 0).unwrap();
    cvt(unsafe {
        libc::fallocate(
            fd,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            65536,
            131072,
        )
    })
    .unwrap();
    let mut expect = data.clone();
    expect[65536..65536 + 131072].fill(0);
    let mut got = vec![0u8; MIB as usize];
    f.read_exact_at(&mut got, 0).unwrap();
    assert!(
        got == expect,
        "punched range must read as zeros via the mount"
    );
    drop(f);
    assert!(
        fs::read(tm.b("fa")).unwrap() == expect,
        "backing after punch"
    );
    assert_same(&p, &tm.b("fa"));
}

fn copy_file_range(pt: bool) {
    let tm = TestMount::mode(pt);
    let src_data = content("cfr", 3 * MIB as usize + 5);
    fs::write(tm.m("src"), &src_data).unwrap();
    let src = File::open(tm.m("src")).unwrap();
    let dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tm.m("dst"))
        .unwrap();
    let (mut off_in, mut off_out): (i64, i64) = (4096, 100);
    let mut left = 2 * MIB as usize;
    while left > 0 {
        let n = cvt(unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                left,
                0,
            )
        })
        .unwrap();
        assert!(n > 0, "copy_file_range returned 0 with {left} bytes left");
        left -= n as usize;
    }
    drop(dst);
    let mut expect = vec![0u8; 100];
    expect.extend_from_slice(&src_data[4096..4096 + 2 * MIB as usize]);
    assert!(fs::read(tm.m("dst")).unwrap() == expect, "dst via mount");
    assert!(fs::read(tm.b("dst")).unwrap() == expect, "dst in backing");
    assert_same(&tm.m("dst"), &tm.b("dst"));
    // std::fs::copy uses copy_file_range too.
    fs::copy(tm.m("src"), tm.m("copy")).unwrap();
    assert!(fs::read(tm.b("copy")).unwrap() == src_data);
}

fn unlink_open_file(pt: bool) {
    let tm = TestMount::mode(pt);
    fs::write(tm.m("gone"), b"keep me").unwrap();
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(tm.m("gone"))
        .unwrap();
    fs::remove_file(tm.m("gone")).unwrap();
    assert_errno(
        lstat(&tm.m("gone")),
        libc::ENOENT,
        "unlinked name via mount",
    );
    assert_errno(
        lstat(&tm.b("gone")),
        libc::ENOENT,
        "unlinked name in backing",
    );
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "keep me", "open file stays readable after unlink");
    f.write_all(b", and more").unwrap();
    let mut all = vec![0u8; 17];
    f.read_exact_at(&mut all, 0).unwrap();
    assert_eq!(&all, b"keep me, and more");
    let st = fstat(f.as_raw_fd()).unwrap();
    assert_eq!(st.st_nlink, 0, "nlink of an unlinked open file");
    assert_eq!(st.st_size, 17);
    drop(f);
    assert!(
        dir_names(tm.backing()).is_empty(),
        "nothing left in backing"
    );

    // Renaming over an open file: the old fd keeps the old content.
    fs::write(tm.m("a"), b"new content").unwrap();
    fs::write(tm.m("b"), b"old content").unwrap();
    let old = File::open(tm.m("b")).unwrap();
    fs::rename(tm.m("a"), tm.m("b")).unwrap();
    let mut s = String::new();
    (&old).read_to_string(&mut s).unwrap();
    assert_eq!(s, "old content");
    assert_eq!(fs::read(tm.m("b")).unwrap(), b"new content");
    assert_eq!(fs::read(tm.b("b")).unwrap(), b"new content");
}

fn mmap_shared(pt: bool) {
    let tm = TestMount::mode(pt);
    let len = 64 * 1024;
    let data = content("mmap", len);
    fs::write(tm.m("map"), &data).unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(tm.m("map"))
        .unwrap();
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(
            p,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        let s = std::slice::from_raw_parts_mut(p.cast::<u8>(), len);
        assert!(s == &data[..], "mapped content");
        s[10_000..10_005].copy_from_slice(b"MAPPD");
        cvt(libc::msync(p, len, libc::MS_SYNC)).unwrap();
        cvt(libc::munmap(p, len)).unwrap();
    }
    drop(f);
    let mut expect = data;
    expect[10_000..10_005].copy_from_slice(b"MAPPD");
    assert!(
        fs::read(tm.b("map")).unwrap() == expect,
        "mmap write reached backing"
    );
    assert!(fs::read(tm.m("map")).unwrap() == expect);
}

fn parallel_writers(pt: bool) {
    let tm = TestMount::mode(pt);
    std::thread::scope(|s| {
        for t in 0..8 {
            let dir = tm.m(&format!("t{t}"));
            s.spawn(move || {
                fs::create_dir(&dir).unwrap();
                for i in 0..150 {
                    let name = format!("t{t}-{i}");
                    let data = content(&name, (i * 997) % 20_000);
                    fs::write(dir.join(&name), &data).unwrap();
                    assert_eq!(fs::read(dir.join(&name)).unwrap(), data);
                }
            });
        }
    });
    for t in 0..8 {
        let names = dir_names(&tm.b(&format!("t{t}")));
        assert_eq!(names.len(), 150);
        for i in 0..150 {
            let name = format!("t{t}-{i}");
            assert_eq!(
                fs::read(tm.b(&format!("t{t}/{name}"))).unwrap(),
                content(&name, (i * 997) % 20_000)
            );
        }
    }
    assert_same_tree(tm.mnt(), tm.backing());
}

/// Two mounts of one backing directory with zero TTLs (what a shared cache needs): each sees
/// the other's changes at once.
fn two_mounts_coherent(pt: bool) {
    let zero = cachefs::fs::FsOptions {
        entry_ttl: std::time::Duration::ZERO,
        attr_ttl: std::time::Duration::ZERO,
        ..opts(pt)
    };
    let a = TestMount::with_options(zero.clone());
    let b = a.second_mount(zero);
    fs::write(a.m("f"), b"12345").unwrap();
    assert_eq!(fs::read(b.m("f")).unwrap(), b"12345");
    assert_eq!(fs::metadata(b.m("f")).unwrap().len(), 5);
    // Rewrite through A: B sees the new size and content.
    fs::write(a.m("f"), b"abcdefghij").unwrap();
    assert_eq!(fs::metadata(b.m("f")).unwrap().len(), 10, "size via B");
    assert_eq!(fs::read(b.m("f")).unwrap(), b"abcdefghij", "content via B");
    // Append through B while A has it open.
    let fa = File::open(a.m("f")).unwrap();
    OpenOptions::new()
        .append(true)
        .open(b.m("f"))
        .unwrap()
        .write_all(b"XY")
        .unwrap();
    assert_eq!(fa.metadata().unwrap().len(), 12, "fstat via A");
    let mut s = String::new();
    (&fa).read_to_string(&mut s).unwrap();
    assert_eq!(s, "abcdefghijXY");
    // Names: created and removed through one, seen through the other.
    fs::write(a.m("g"), b"g").unwrap();
    assert_eq!(fs::read(b.m("g")).unwrap(), b"g");
    fs::remove_file(b.m("g")).unwrap();
    assert_errno(lstat(&a.m("g")), libc::ENOENT, "g via A after unlink via B");
    fs::create_dir(b.m("d")).unwrap();
    fs::write(b.m("d/x"), b"x").unwrap();
    assert_eq!(dir_names(&a.m("d")), ["x"]);
}

/// Two mounts of one instance with long timeouts that tell each other what they change (a
/// shared cache's mounts) stay coherent; a third that is not told keeps what its kernel
/// cached, which shows the timeouts are long and the telling is what keeps the others right.
fn shared_mounts_tell_each_other(pt: bool) {
    let rendezvous = tempdir();
    let long = cachefs::fs::FsOptions {
        entry_ttl: cachefs::fs::LONG_TTL,
        attr_ttl: cachefs::fs::LONG_TTL,
        peers: Some(rendezvous.path().join("peers")),
        ..opts(pt)
    };
    let a = TestMount::with_options(long.clone());
    let b = a.second_mount(long.clone());
    let untold = a.second_mount(cachefs::fs::FsOptions {
        peers: None,
        ..long
    });
    let told = |what: &str, cond: &dyn Fn() -> bool| {
        assert!(wait_until(Duration::from_secs(3), cond), "{what}");
    };
    fs::write(a.m("f"), b"12345").unwrap();
    fs::create_dir(a.m("d")).unwrap();
    for m in [&b, &untold] {
        assert_eq!(fs::metadata(m.m("f")).unwrap().len(), 5);
        assert!(m.m("d").is_dir());
    }
    // Contents and size, written through A and closed.
    fs::write(a.m("f"), b"abcdefghij").unwrap();
    told("size via B", &|| {
        fs::metadata(b.m("f")).unwrap().len() == 10
    });
    assert_eq!(fs::read(b.m("f")).unwrap(), b"abcdefghij");
    assert_eq!(
        fs::metadata(untold.m("f")).unwrap().len(),
        5,
        "cached for long"
    );
    // Mode.
    fs::set_permissions(a.m("f"), fs::Permissions::from_mode(0o600)).unwrap();
    told("mode via B", &|| {
        fs::metadata(b.m("f")).unwrap().permissions().mode() & 0o777 == 0o600
    });
    // A rename: the old name goes, the new one comes, in B at once.
    fs::rename(a.m("f"), a.m("d/g")).unwrap();
    told("rename via B", &|| {
        !b.m("f").exists() && b.m("d/g").exists()
    });
    assert!(untold.m("f").exists(), "cached for long");
    // Removals and a new directory through B, seen in A.
    fs::remove_file(b.m("d/g")).unwrap();
    told("unlink via A", &|| !a.m("d/g").exists());
    fs::create_dir(b.m("d/e")).unwrap();
    told("directory link count via A", &|| {
        fs::metadata(a.m("d")).unwrap().nlink() == 3
    });
    fs::remove_dir(b.m("d/e")).unwrap();
    fs::remove_dir(b.m("d")).unwrap();
    told("rmdir via A", &|| !a.m("d").exists());
    // A truncate through B.
    fs::write(b.m("t"), vec![7u8; 4096]).unwrap();
    assert_eq!(fs::metadata(a.m("t")).unwrap().len(), 4096);
    OpenOptions::new()
        .write(true)
        .open(b.m("t"))
        .unwrap()
        .set_len(10)
        .unwrap();
    told("truncate via A", &|| {
        fs::metadata(a.m("t")).unwrap().len() == 10
    });
}

both_modes!(
    round_trip,
    sizes_and_truncate,
    large_file,
    sparse,
    fallocate,
    copy_file_range,
    unlink_open_file,
    mmap_shared,
    parallel_writers,
    two_mounts_coherent,
    shared_mounts_tell_each_other,
);

/// A mount takes its requests over io_uring when the kernel allows it (`auto`, the default,
/// and `on`), through /dev/fuse otherwise; `on` where the kernel does not allow it fails with
/// a one-line reason naming the switch. Both transports serve the same files.
#[test]
fn the_transport_follows_io_uring_and_the_kernel_switch() {
    use cachefs::fs::{FsOptions, IoUring, Transport};
    if skip_unless_root("the_transport_follows_io_uring_and_the_kernel_switch") {
        return;
    }
    let with = |mode| FsOptions {
        io_uring: mode,
        ..opts(true)
    };
    let Some(_switch) = UringSwitch::set(false) else {
        eprintln!("skipped: this kernel has no {}", cachefs::fs::ENABLE_URING);
        return;
    };
    let tm = TestMount::with_options(with(IoUring::Auto));
    assert_eq!(tm.fs().transport(), Transport::DevFuse);
    drop(tm);
    let dir = tempdir();
    let (backing, mnt) = (dir.path().join("b"), dir.path().join("m"));
    fs::create_dir(&backing).unwrap();
    fs::create_dir(&mnt).unwrap();
    let err = cachefs::fs::mount(&backing, &mnt, &with(IoUring::On)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "FUSE over io_uring: off in the kernel: as root, echo Y > /sys/module/fuse/parameters/enable_uring"
    );
    assert!(!is_mounted(&mnt), "nothing left mounted");

    let _on = UringSwitch::set(true).unwrap();
    for (mode, want) in [
        (IoUring::Auto, Transport::IoUring),
        (IoUring::On, Transport::IoUring),
        (IoUring::Off, Transport::DevFuse),
    ] {
        let tm = TestMount::with_options(with(mode));
        assert_eq!(tm.fs().transport(), want, "{mode:?}");
        fs::create_dir(tm.m("d")).unwrap();
        fs::write(tm.m("d/f"), b"through the ring").unwrap();
        assert_eq!(fs::read(tm.m("d/f")).unwrap(), b"through the ring");
        assert_eq!(fs::read(tm.b("d/f")).unwrap(), b"through the ring");
        let names: Vec<_> = fs::read_dir(tm.m("d"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["f"]);
        fs::rename(tm.m("d/f"), tm.m("g")).unwrap();
        fs::remove_dir(tm.m("d")).unwrap();
        assert_same_tree(tm.mnt(), tm.backing());
    }
}
