//! The bind driver: an instance directory bind-mounted at its target, every operation native.
//!
//! The mount is made with the new mount API, from fds only: `open_tree(OPEN_TREE_CLONE)` of
//! the instance directory (opened beneath the store root, never through a symlink) gives a
//! detached copy, `mount_setattr` makes it `nosuid,nodev,strictatime` (and `ro` when asked)
//! before anyone can reach it, and `move_mount` attaches it to the target directory, opened
//! `O_NOFOLLOW` once. Nothing is done by a name that a rename could redirect between a check
//! and the mount.
//!
//! `strictatime` makes every read move the file's atime: that is the LRU clock the
//! release-time rescan reads (`accounting::rescan_at_release`). The kernel keeps locks and
//! coherence between holders itself, as on any local directory.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::{Mode, OFlags};
use rustix::mount::{MoveMountFlags, OpenTreeFlags};

use crate::text::path_line;

/// Why a bind mount could not be made or removed. Each message is one line.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error(
        "driver=bind needs root (a bind mount needs CAP_SYS_ADMIN); use driver=fuse, which works without it"
    )]
    NotPermitted,
    #[error("cannot open the cache directory {}: {err}", path_line(path))]
    Instance { path: PathBuf, err: std::io::Error },
    #[error("cannot open the target {}: {err}", path_line(path))]
    Target { path: PathBuf, err: std::io::Error },
    #[error(
        "cannot bind-mount {} at {}: {err}",
        path_line(instance),
        path_line(target)
    )]
    Mount {
        instance: PathBuf,
        target: PathBuf,
        err: std::io::Error,
    },
    #[error("cannot unmount {}: {err}", path_line(target))]
    Unmount {
        target: PathBuf,
        err: std::io::Error,
    },
}

/// A live bind mount made by [`bind`].
#[derive(Debug)]
pub struct BindMount {
    target: PathBuf,
    /// The kernel's id of the mount (statx `STATX_MNT_ID`): names it in /proc/PID/fdinfo, and
    /// tells it from whatever is mounted at the target later.
    mnt_id: u64,
    /// Membership in the group of the instance's shared mounts, as a member that does not tell
    /// what it changes (FUSE members shorten their timeouts meanwhile): left after the unmount.
    peers: Option<crate::fs::peers::Peers>,
}

/// Bind-mounts the instance directory `instance` (open as `instance_fd`, a directory fd) at
/// the existing directory `target`: `nosuid,nodev,strictatime`, read-only if `read_only`.
pub fn bind(
    instance: &Path,
    instance_fd: &OwnedFd,
    target: &Path,
    read_only: bool,
) -> Result<BindMount, BindError> {
    let mount_err = |err: std::io::Error| {
        if err.raw_os_error() == Some(libc::EPERM) {
            BindError::NotPermitted
        } else {
            BindError::Mount {
                instance: instance.to_path_buf(),
                target: target.to_path_buf(),
                err,
            }
        }
    };
    let tree = rustix::mount::open_tree(
        instance_fd,
        c"",
        OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC
            | OpenTreeFlags::AT_EMPTY_PATH,
    )
    .map_err(|e| mount_err(e.into()))?;
    let mut set = libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV | libc::MOUNT_ATTR_STRICTATIME;
    if read_only {
        set |= libc::MOUNT_ATTR_RDONLY;
    }
    set_attributes(&tree, set, libc::MOUNT_ATTR__ATIME).map_err(mount_err)?;
    let target_fd = rustix::fs::open(
        target,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| BindError::Target {
        path: target.to_path_buf(),
        err: e.into(),
    })?;
    rustix::mount::move_mount(
        &tree,
        c"",
        &target_fd,
        c"",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )
    .map_err(|e| mount_err(e.into()))?;
    // The id of the mount just attached, from its own fd (not by the target's name).
    let stx = rustix::fs::statx(
        &tree,
        c"",
        rustix::fs::AtFlags::EMPTY_PATH,
        rustix::fs::StatxFlags::MNT_ID,
    );
    let mnt_id = match stx {
        Ok(stx) if stx.stx_mask & rustix::fs::StatxFlags::MNT_ID.bits() != 0 => stx.stx_mnt_id,
        other => {
            // Attached but not ours to track: never left behind.
            let _ = rustix::mount::unmount(
                target,
                rustix::mount::UnmountFlags::DETACH | rustix::mount::UnmountFlags::NOFOLLOW,
            );
            let err = match other {
                Err(e) => e.into(),
                Ok(_) => std::io::Error::other(
                    "the kernel does not report the new mount's id (statx STATX_MNT_ID)",
                ),
            };
            return Err(mount_err(err));
        }
    };
    Ok(BindMount {
        target: target.to_path_buf(),
        mnt_id,
        peers: None,
    })
}

/// `mount_setattr(fd, "", AT_EMPTY_PATH)` on a detached mount: sets `set`, clears `clear`.
fn set_attributes(tree: &OwnedFd, set: u64, clear: u64) -> std::io::Result<()> {
    let attr = libc::mount_attr {
        attr_set: set,
        attr_clr: clear,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: mount_setattr(2) reads `size_of::<mount_attr>()` bytes from `attr`, a live,
    // initialised local; the path is a NUL-terminated empty string and `tree` an fd we own.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_fd().as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The kernel's id of the mount `path` is on (statx `STATX_MNT_ID`), as /proc/PID/fdinfo
/// shows it. `AT_STATX_DONT_SYNC` keeps this from asking a FUSE server for attributes.
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

impl BindMount {
    /// Keeps a membership in the instance's group of shared mounts (joined before the mount
    /// went live) until this mount is gone.
    pub(crate) fn keep_peers(&mut self, peers: Option<crate::fs::peers::Peers>) {
        self.peers = peers;
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    pub fn mnt_id(&self) -> u64 {
        self.mnt_id
    }

    /// Whether this mount is still the one at its target in this namespace.
    pub fn is_mounted(&self) -> bool {
        self.watch().is_mounted()
    }

    /// A handle another thread can wait on for the mount to be unmounted from outside.
    pub fn watch(&self) -> MountWatch {
        MountWatch {
            target: self.target.clone(),
            mnt_id: self.mnt_id,
        }
    }

    /// Unmounts it. `lazy` detaches it even while processes use it (they keep what they
    /// hold; see [`BindMount::mnt_id`] to find them). Already gone (unmounted from outside) is
    /// not an error. EBUSY comes back as is, for the caller to name the users.
    pub fn unmount(&self, lazy: bool) -> Result<(), BindError> {
        if !self.is_mounted() {
            return Ok(());
        }
        let mut flags = rustix::mount::UnmountFlags::NOFOLLOW;
        if lazy {
            flags |= rustix::mount::UnmountFlags::DETACH;
        }
        match rustix::mount::unmount(&self.target, flags) {
            Ok(()) => Ok(()),
            // Unmounted from outside between the check and now.
            Err(rustix::io::Errno::INVAL) if !self.is_mounted() => Ok(()),
            Err(e) => Err(BindError::Unmount {
                target: self.target.clone(),
                err: e.into(),
            }),
        }
    }
}

/// Which mount is at a target, to notice it going away.
#[derive(Debug, Clone)]
pub struct MountWatch {
    target: PathBuf,
    mnt_id: u64,
}

impl MountWatch {
    /// Whether the mount is still the one at its target in this namespace.
    pub fn is_mounted(&self) -> bool {
        mount_id(&self.target) == Some(self.mnt_id)
    }

    /// Waits until the mount is no longer at its target (unmounted from outside), up to
    /// `timeout`; returns whether it is gone. Woken by the mount table's change events
    /// (poll on /proc/self/mountinfo), checked at least once a second.
    pub fn wait_unmounted(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let table = std::fs::File::open("/proc/self/mountinfo").ok();
        loop {
            if !self.is_mounted() {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let wait = left.min(Duration::from_secs(1));
            match &table {
                Some(f) => {
                    let mut fds = [rustix::event::PollFd::new(f, rustix::event::PollFlags::PRI)];
                    let ts = rustix::event::Timespec::try_from(wait).unwrap_or(
                        rustix::event::Timespec {
                            tv_sec: 1,
                            tv_nsec: 0,
                        },
                    );
                    let _ = rustix::event::poll(&mut fds, Some(&ts));
                }
                None => std::thread::sleep(wait),
            }
        }
    }
}

impl Drop for BindMount {
    /// A bind mount is never left behind by an error path: unmounted, or detached if busy.
    fn drop(&mut self) {
        if self.unmount(false).is_err() {
            let _ = self.unmount(true);
        }
    }
}

/// Opens an instance directory for a bind mount: beneath the store root, no symlink on the way.
pub fn open_instance(path: &Path) -> Result<OwnedFd, BindError> {
    crate::accounting::open_instance_root(path).map_err(|err| BindError::Instance {
        path: path.to_path_buf(),
        err,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As root: the bind mount is nosuid, nodev, strictatime (and ro when asked), shows the
    /// instance's files, and unmounts; without root it is refused with the one-line reason.
    #[test]
    fn binds_with_the_right_flags_and_unmounts() {
        let dir = tempfile::tempdir().unwrap();
        let inst = dir.path().join("inst");
        let target = dir.path().join("target");
        std::fs::create_dir(&inst).unwrap();
        std::fs::create_dir(&target).unwrap();
        std::fs::write(inst.join("f"), b"hello").unwrap();
        let fd = rustix::fs::open(
            &inst,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .unwrap();
        if !rustix::process::geteuid().is_root() {
            let err = bind(&inst, &fd, &target, false).unwrap_err();
            assert!(matches!(err, BindError::NotPermitted), "{err}");
            return;
        }
        for ro in [false, true] {
            let m = bind(&inst, &fd, &target, ro).unwrap();
            assert!(m.is_mounted());
            assert_eq!(std::fs::read(target.join("f")).unwrap(), b"hello");
            let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
            let line = info
                .lines()
                .find(|l| l.split(' ').nth(4) == Some(target.to_str().unwrap()))
                .unwrap();
            let opts = line.split(' ').nth(5).unwrap();
            for want in ["nosuid", "nodev"] {
                assert!(opts.split(',').any(|o| o == want), "{line}");
            }
            assert!(
                !opts.contains("relatime") && !opts.contains("noatime"),
                "{line}"
            );
            assert_eq!(opts.starts_with("ro"), ro, "{line}");
            m.unmount(false).unwrap();
            assert!(!m.is_mounted());
            assert!(!target.join("f").exists());
            // Unmounting again is fine: it is gone.
            m.unmount(false).unwrap();
        }
    }
}
