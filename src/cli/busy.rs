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

/// The kernel's id of the mount `path` is on, as /proc/PID/fdinfo shows it (statx with
/// `AT_STATX_DONT_SYNC`, which does not ask a FUSE server for attributes).
pub use crate::bind::mount_id;

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

/// A mount namespace other than ours in which a copy of a mount lives.
#[derive(Debug, Clone)]
pub struct Holder {
    /// Where the copy is mounted, as that namespace sees it.
    pub mount_point: std::path::PathBuf,
    /// Processes in that namespace (at most the limit given), as "pid PID (COMM)".
    pub pids: Vec<String>,
    /// One of those processes' pid, to enter the namespace by.
    pub any_pid: u32,
    /// Whether a `cachefs run` lives in it (its namespace, made for its command).
    pub cachefs_run: bool,
}

/// The mount namespaces other than ours that hold a mount of the filesystem `dev`
/// (`major:minor`; copies of one mount in several namespaces share it), found through
/// /proc/PID/ns/mnt and /proc/PID/mountinfo. A namespace made after a mount holds a copy of
/// it, and a FUSE connection lives as long as any copy does.
pub fn holders_elsewhere(dev: (u32, u32), limit: usize) -> Vec<Holder> {
    use std::collections::HashMap;
    use std::os::unix::fs::MetadataExt;
    let ns_of = |pid: &str| {
        fs::metadata(format!("/proc/{pid}/ns/mnt"))
            .ok()
            .map(|m| m.ino())
    };
    let Some(ours) = ns_of("self") else {
        return Vec::new();
    };
    let Ok(procs) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    // Per namespace: the copy's mount point if it holds one (read once per namespace).
    let mut seen: HashMap<u64, Option<usize>> = HashMap::new();
    let mut found: Vec<Holder> = Vec::new();
    for entry in procs.flatten() {
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let Ok(pid) = name.parse::<u32>() else {
            continue;
        };
        let Some(ns) = ns_of(&name) else { continue };
        if ns == ours {
            continue;
        }
        let slot = *seen.entry(ns).or_insert_with(|| {
            let info = fs::read(format!("/proc/{pid}/mountinfo")).ok()?;
            let mp = crate::fs::parse_mountinfo(&info)
                .into_iter()
                .find(|e| e.dev == dev)?
                .mount_point;
            found.push(Holder {
                mount_point: mp,
                pids: Vec::new(),
                any_pid: pid,
                cachefs_run: false,
            });
            Some(found.len() - 1)
        });
        let Some(i) = slot else { continue };
        let h = &mut found[i];
        if is_cachefs_run(pid) {
            h.cachefs_run = true;
        }
        if h.pids.len() < limit {
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            h.pids.push(format!("pid {pid} ({})", comm.trim_end()));
        }
    }
    found
}

/// Whether process `pid` is a `cachefs run` (by its command line: a cachefs executable whose
/// arguments name the `run` command before any `--`).
fn is_cachefs_run(pid: u32) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let mut args = cmdline.split(|&b| b == 0);
    let is_cachefs = args
        .next()
        .and_then(|a| a.rsplit(|&b| b == b'/').next())
        .is_some_and(|name| name == b"cachefs");
    is_cachefs && args.take_while(|a| *a != b"--").any(|a| a == b"run")
}

/// Unmounts `mount_point` in the mount namespace of process `pid` (not lazily: a copy in use
/// there stays, EBUSY). Done in a forked child, which alone enters the namespace.
pub fn unmount_in_namespace_of(pid: u32, mount_point: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let ns = CString::new(format!("/proc/{pid}/ns/mnt")).map_err(std::io::Error::other)?;
    let mp = CString::new(mount_point.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: the child makes only open(2), setns(2), umount2(2) and _exit(2) calls, on C
    // strings made before the fork: async-signal-safe, no locks, no allocation. The parent
    // only waits for it.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        0 => unsafe {
            let fd = libc::open(ns.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 || libc::setns(fd, libc::CLONE_NEWNS) != 0 {
                libc::_exit(255);
            }
            if libc::umount2(mp.as_ptr(), 0) != 0 {
                libc::_exit(*libc::__errno_location());
            }
            libc::_exit(0);
        },
        child => {
            let mut status = 0;
            // SAFETY: waiting for our own child with a valid status pointer.
            while unsafe { libc::waitpid(child, &mut status, 0) } < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            match libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)) {
                Some(0) => Ok(()),
                Some(255) | None => Err(std::io::Error::other("cannot enter the mount namespace")),
                Some(errno) => Err(std::io::Error::from_raw_os_error(errno)),
            }
        }
    }
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
