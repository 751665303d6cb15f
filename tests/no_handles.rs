//! Mounts with kernel file handles off (`FsOptions::file_handles = false`): the path a mount
//! without CAP_DAC_READ_SEARCH takes. Cold inodes (whose O_PATH fd was closed to stay within
//! the fd budget) are then found again from their parent by name and checked against their
//! inode number. These tests push more inodes through than the budget holds, so re-resolution
//! really happens, and check renames made through the mount are followed.

mod common;

use std::fs;

use cachefs::fs::FsOptions;
use common::*;

fn no_handles(pt: bool) -> FsOptions {
    FsOptions {
        file_handles: false,
        ..opts(pt)
    }
}

/// More files than the process's O_PATH fd budget (a quarter of RLIMIT_NOFILE, 5,000 here),
/// written and then read back, so most reads reach cold inodes.
fn many_files_beyond_the_fd_budget(pt: bool) {
    let tm = TestMount::with_options(no_handles(pt));
    let dirs = 12;
    let per_dir = 1000;
    for d in 0..dirs {
        fs::create_dir(tm.m(&format!("d{d}"))).unwrap();
        for f in 0..per_dir {
            fs::write(tm.m(&format!("d{d}/f{f}")), format!("{d}/{f}")).unwrap();
        }
    }
    // The kernel still knows all 12,000 inodes; had each kept an fd, this process would hold
    // more than that. So most are cold now, and the reads below re-resolve them.
    let open_fds = fs::read_dir("/proc/self/fd").unwrap().count();
    assert!(
        open_fds < dirs * per_dir - 2000,
        "{open_fds} fds open: inodes are pinned, the budget did not apply"
    );
    // Renames through the mount move cold inodes too: they must still be found.
    fs::rename(tm.m("d0"), tm.m("moved")).unwrap();
    fs::create_dir(tm.m("d1/sub")).unwrap();
    fs::rename(tm.m("d1/f5"), tm.m("d1/sub/f5")).unwrap();
    for d in 0..dirs {
        let dir = if d == 0 {
            "moved".to_string()
        } else {
            format!("d{d}")
        };
        for f in 0..per_dir {
            let rel = if d == 1 && f == 5 {
                format!("{dir}/sub/f{f}")
            } else {
                format!("{dir}/f{f}")
            };
            assert_eq!(
                fs::read_to_string(tm.m(&rel)).unwrap(),
                format!("{d}/{f}"),
                "{rel} through the mount"
            );
            assert_eq!(
                fs::read_to_string(tm.b(&rel)).unwrap(),
                format!("{d}/{f}"),
                "{rel} in the backing directory"
            );
        }
    }
    assert!(!tm.b("d0").exists());
    assert_eq!(fs::read_dir(tm.m("moved")).unwrap().count(), per_dir);
}

/// A file renamed behind the mount's back (directly in the backing directory) is never
/// confused with another: through the old name it is gone, through the new one it is there.
fn external_rename_is_not_confused(pt: bool) {
    let tm = TestMount::with_options(no_handles(pt));
    fs::create_dir(tm.m("a")).unwrap();
    fs::write(tm.m("a/f"), b"first").unwrap();
    fs::write(tm.m("a/g"), b"second").unwrap();
    // Outside the mount: swap the two names.
    fs::rename(tm.b("a/f"), tm.b("a/tmp")).unwrap();
    fs::rename(tm.b("a/g"), tm.b("a/f")).unwrap();
    fs::rename(tm.b("a/tmp"), tm.b("a/g")).unwrap();
    // After the entry timeout the mount shows what the backing directory holds.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(fs::read(tm.m("a/f")).unwrap(), b"second");
    assert_eq!(fs::read(tm.m("a/g")).unwrap(), b"first");
}

both_modes!(
    many_files_beyond_the_fd_budget,
    external_rename_is_not_confused
);
