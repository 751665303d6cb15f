//! Kernel passthrough backing files: a backing file registered with the connection (the
//! FUSE_DEV_IOC_BACKING_OPEN ioctl on /dev/fuse) is named by an id in an OPEN or CREATE reply,
//! and the kernel then reads and writes the file itself. Owned here rather than by fuser's
//! reply objects so that both transports (/dev/fuse and io_uring) answer with the same ids.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

// `_IOW(229, 2, uint32_t)` in linux/fuse.h.
nix::ioctl_write_ptr!(fuse_dev_ioc_backing_close, 229, 2, u32);

/// One registered backing file; closed in the kernel when dropped.
pub(crate) struct Backing {
    id: u32,
    /// A /dev/fuse fd of the connection (the ioctls need one).
    dev: Arc<OwnedFd>,
}

impl Backing {
    /// Registers `file` with the connection of `dev`.
    pub(crate) fn open(dev: &Arc<OwnedFd>, file: BorrowedFd<'_>) -> io::Result<Backing> {
        let id = fuser::BackingId::create_raw(dev.as_ref(), file)?;
        Ok(Backing {
            id,
            dev: dev.clone(),
        })
    }

    /// The id an open reply names.
    pub(crate) fn id(&self) -> u32 {
        self.id
    }
}

impl Drop for Backing {
    fn drop(&mut self) {
        // SAFETY: the ioctl reads one u32 through a pointer to our own field, on an fd we
        // hold open; an id the connection no longer has is refused (EINVAL), nothing more.
        let r = unsafe { fuse_dev_ioc_backing_close(self.dev.as_raw_fd(), &self.id) };
        if let Err(e) = r {
            tracing::debug!("closing passthrough backing file {}: {e}", self.id);
        }
    }
}
