//! Naming the processes that keep a mount busy, for the warning `cachefs run` prints when a
//! cache cannot be unmounted because something the command started (a daemon, a background
//! job) still has files open in it.
//!
//! Only /proc is read: fdinfo files (their `mnt_id:` line) for open files, and the mount id
//! of each process's working and root directory (statx with AT_STATX_DONT_SYNC, which does
//! not ask the FUSE server). Stat-ing the open files themselves could send requests to the
//! very filesystem that is stuck.

use std::fs;
use std::path::Path;

/// The kernel's id of the mount `path` is on, as /proc/PID/fdinfo shows it.
///
/// `AT_STATX_DONT_SYNC` keeps this from asking the FUSE server for attributes.
pub fn mount_id(path: &Path) -> Option<u64> {
    let stx = rustix::fs::statx(
        rustix::fs::CWD,
        path,
        rustix::fs::AtFlags::STATX_DONT_SYNC,
        rustix::fs::StatxFlags::MNT_ID,
    )
    .ok()?;
    (stx.stx_mask & rustix::fs::StatxFlags::MNT_ID.bits() != 0).then_some(stx.stx_mnt_id)
}

/// Up to `limit` processes with a file open on mount `mnt_id`, or their working or root
/// directory in it, as "pid PID (COMM)".
pub fn users_of(mnt_id: u64, limit: usize) -> Vec<String> {
    let me = std::process::id();
    let Ok(procs) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // cachefs's own fds are its FUSE device and store, never files in the mount.
        if pid == me {
            continue;
        }
        let dir = entry.path();
        let in_it = |link: &str| mount_id(&dir.join(link)) == Some(mnt_id);
        if in_it("cwd") || in_it("root") || holds_mount(&dir.join("fdinfo"), mnt_id) {
            let comm = fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            found.push(format!("pid {pid} ({})", comm.trim_end()));
            if found.len() >= limit {
                break;
            }
        }
    }
    found
}

fn holds_mount(fdinfo_dir: &Path, mnt_id: u64) -> bool {
    // Processes come and go, and others' fds may be unreadable: skip what cannot be read.
    let Ok(fds) = fs::read_dir(fdinfo_dir) else {
        return false;
    };
    fds.flatten().any(|fd| {
        fs::read_to_string(fd.path())
            .ok()
            .and_then(|info| parse_mnt_id(&info))
            == Some(mnt_id)
    })
}

/// The `mnt_id:` field of a /proc/PID/fdinfo/FD file.
fn parse_mnt_id(fdinfo: &str) -> Option<u64> {
    fdinfo
        .lines()
        .find_map(|line| line.strip_prefix("mnt_id:"))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fdinfo() {
        let info = "pos:\t0\nflags:\t0100002\nmnt_id:\t43\nino:\t1234\n";
        assert_eq!(parse_mnt_id(info), Some(43));
        assert_eq!(parse_mnt_id("pos:\t0\n"), None);
    }

    #[test]
    fn finds_an_open_file_by_mount() {
        // A child with a file of the temp dir's filesystem open (as its stdin) must be found
        // through that mount's id.
        let dir = std::env::temp_dir();
        let Some(id) = mount_id(&dir) else {
            return; // statx without STATX_MNT_ID (Linux < 5.8): nothing to test
        };
        let path = dir.join(format!("cachefs-busy-test-{}", std::process::id()));
        let Ok(file) = fs::File::create(&path) else {
            return;
        };
        let child = std::process::Command::new("sleep")
            .arg("5")
            .stdin(file)
            .spawn();
        let _ = fs::remove_file(&path);
        let Ok(mut child) = child else {
            return; // no `sleep` on this machine
        };
        let pid = child.id().to_string();
        let users = users_of(id, usize::MAX);
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            users.iter().any(|u| u.starts_with(&format!("pid {pid} "))),
            "pid {pid} not among {users:?}"
        );
    }
}
