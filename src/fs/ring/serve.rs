//! The io_uring transport's adapter: decoded ring requests to the core (`ops`), and its
//! results to ring replies. What may wait long (a lock wait, fsync, fallocate, a copy) runs
//! on a thread of its own and answers from there: a queue serves all the requests of its
//! CPU one at a time.

use std::io;
use std::sync::Arc;

use tracing::debug;

use super::{Attr, EntryOut, Op, RingHandler, RingReply, RingRequest, SetattrIn, Statfs};
use crate::fs::ops::{Attrs, CacheFs, Ctx, Entry, Locking, Opened, SetAttr, WRITE_CACHE, Xattr};

// FATTR_* of `struct fuse_setattr_in` (linux/fuse.h).
const FATTR_MODE: u32 = 1 << 0;
const FATTR_UID: u32 = 1 << 1;
const FATTR_GID: u32 = 1 << 2;
const FATTR_SIZE: u32 = 1 << 3;
const FATTR_ATIME: u32 = 1 << 4;
const FATTR_MTIME: u32 = 1 << 5;
const FATTR_FH: u32 = 1 << 6;
const FATTR_ATIME_NOW: u32 = 1 << 7;
const FATTR_MTIME_NOW: u32 = 1 << 8;
/// RELEASE of a file that held a flock: its owner is to be unlocked.
const FUSE_RELEASE_FLOCK_UNLOCK: u32 = 1 << 1;

/// Serves the core over the ring.
pub(crate) struct Serve(pub(crate) Arc<CacheFs>);

fn err(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn attr(a: &Attrs) -> Attr {
    Attr {
        ino: a.node,
        ..Attr::from_stat(&a.st)
    }
}

fn entry_out(e: &Entry) -> EntryOut {
    EntryOut {
        nodeid: e.attrs.as_ref().map_or(0, |a| a.node),
        generation: 0,
        entry_valid: e.entry_ttl,
        attr_valid: e.attr_ttl,
        attr: e.attrs.as_ref().map(attr).unwrap_or_default(),
    }
}

fn reply_entry(res: io::Result<Entry>, reply: RingReply) {
    match res {
        Ok(e) => reply.entry(&entry_out(&e)),
        Err(e) => reply.error(err(&e)),
    }
}

fn reply_empty(res: io::Result<()>, reply: RingReply) {
    match res {
        Ok(()) => reply.empty(),
        Err(e) => reply.error(err(&e)),
    }
}

fn reply_xattr(res: io::Result<Xattr>, reply: RingReply) {
    match res {
        Ok(Xattr::Size(n)) => reply.xattr_size(n),
        Ok(Xattr::Data(d)) => reply.data(&d),
        Err(e) => reply.error(err(&e)),
    }
}

fn reply_open(res: io::Result<Opened>, reply: RingReply) {
    match res {
        Ok(o) => reply.open(o.fh, o.flags.bits(), o.backing),
        Err(e) => reply.error(err(&e)),
    }
}

/// A SETATTR time: `now` set, the given time, or none.
fn set_time(valid: u32, bit: u32, now_bit: u32, sec: u64, nsec: u32) -> Option<libc::timespec> {
    if valid & now_bit != 0 {
        Some(libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        })
    } else if valid & bit != 0 {
        Some(libc::timespec {
            tv_sec: sec as libc::time_t,
            tv_nsec: nsec as libc::c_long,
        })
    } else {
        None
    }
}

fn set_attr(s: &SetattrIn) -> SetAttr {
    let has = |bit: u32| s.valid & bit != 0;
    SetAttr {
        mode: has(FATTR_MODE).then_some(s.mode),
        uid: has(FATTR_UID).then_some(s.uid),
        gid: has(FATTR_GID).then_some(s.gid),
        size: has(FATTR_SIZE).then_some(s.size),
        atime: set_time(s.valid, FATTR_ATIME, FATTR_ATIME_NOW, s.atime, s.atimensec),
        mtime: set_time(s.valid, FATTR_MTIME, FATTR_MTIME_NOW, s.mtime, s.mtimensec),
        fh: has(FATTR_FH).then_some(s.fh),
    }
}

/// Runs `work` on a thread of its own (it may wait long), answering from there.
fn off_queue(reply: RingReply, work: impl FnOnce() -> io::Result<()> + Send + 'static) {
    let (tx, rx) = std::sync::mpsc::channel::<RingReply>();
    let spawned = std::thread::Builder::new()
        .name("cachefs-ring-wait".into())
        .spawn(move || {
            let res = work();
            if let Ok(reply) = rx.recv() {
                reply_empty(res, reply);
            }
        });
    match spawned {
        Ok(_) => {
            let _ = tx.send(reply);
        }
        Err(e) => {
            debug!("cannot start a waiting thread: {e}");
            reply.error(libc::EAGAIN);
        }
    }
}

impl RingHandler for Serve {
    fn handle(&self, req: &RingRequest<'_>, reply: RingReply) {
        let fs = &self.0;
        let node = req.nodeid;
        let ctx = Ctx {
            uid: req.uid,
            gid: req.gid,
        };
        match req.op {
            Op::Lookup { name } => reply_entry(fs.lookup(node, name), reply),
            Op::Getattr { fh } => match fs.getattr(node, fh) {
                Ok((a, ttl)) => reply.attr(ttl, &attr(&a)),
                Err(e) => reply.error(err(&e)),
            },
            Op::Setattr(ref s) => match fs.setattr(node, &set_attr(s)) {
                Ok((a, ttl)) => reply.attr(ttl, &attr(&a)),
                Err(e) => reply.error(err(&e)),
            },
            Op::Readlink => match fs.readlink(node) {
                Ok(t) => reply.data(&t),
                Err(e) => reply.error(err(&e)),
            },
            Op::Symlink { name, target } => {
                reply_entry(fs.symlink(&ctx, node, name, target), reply)
            }
            Op::Mknod {
                name,
                mode,
                rdev,
                umask,
            } => reply_entry(fs.mknod(&ctx, node, name, mode, umask, rdev), reply),
            Op::Mkdir { name, mode, umask } => {
                reply_entry(fs.mkdir(&ctx, node, name, mode, umask), reply)
            }
            Op::Unlink { name } => reply_empty(fs.unlink(node, name), reply),
            Op::Rmdir { name } => reply_empty(fs.rmdir(node, name), reply),
            Op::Rename {
                newdir,
                name,
                newname,
                flags,
            } => reply_empty(fs.rename(node, name, newdir, newname, flags), reply),
            Op::Link { oldnodeid, name } => reply_entry(fs.link(oldnodeid, node, name), reply),
            Op::Open { flags, .. } => reply_open(fs.open(&ctx, node, flags as i32), reply),
            Op::Read {
                fh, offset, size, ..
            } => match fs.read(node, fh, offset, size) {
                Ok(buf) => reply.data(&buf),
                Err(e) => reply.error(err(&e)),
            },
            Op::Write {
                fh,
                offset,
                data,
                write_flags,
                flags,
                ..
            } => match fs.write(fh, offset, data, write_flags & WRITE_CACHE, flags as i32) {
                Ok(n) => reply.write(n),
                Err(e) => reply.error(err(&e)),
            },
            Op::Statfs => match fs.statfs() {
                Ok(s) => reply.statfs(&Statfs::from_statvfs(&s)),
                Err(e) => reply.error(err(&e)),
            },
            Op::Release {
                fh,
                release_flags,
                lock_owner,
                ..
            } => {
                let owner = (release_flags & FUSE_RELEASE_FLOCK_UNLOCK != 0).then_some(lock_owner);
                fs.release(node, fh, owner);
                reply.empty();
            }
            Op::Fsync { fh, datasync } => {
                let fs = fs.clone();
                off_queue(reply, move || fs.fsync(fh, datasync));
            }
            Op::Setxattr {
                name, value, flags, ..
            } => reply_empty(fs.setxattr(node, name, value, flags as i32), reply),
            Op::Getxattr { name, size } => reply_xattr(fs.getxattr(node, name, size), reply),
            Op::Listxattr { size } => reply_xattr(fs.listxattr(node, size), reply),
            Op::Removexattr { name } => reply_empty(fs.removexattr(node, name), reply),
            Op::Flush { fh, lock_owner } => reply_empty(fs.flush(node, fh, lock_owner), reply),
            Op::Opendir { .. } => match fs.opendir(node) {
                Ok(fh) => reply.open(fh, 0, None),
                Err(e) => reply.error(err(&e)),
            },
            Op::Readdir { fh, offset, size } => {
                let mut dir = reply.dir(size);
                match fs.readdir(fh, offset, |e, off| {
                    dir.add(e.node, off, u32::from(e.dtype), &e.name)
                }) {
                    Ok(()) => dir.send(),
                    Err(e) => dir.error(err(&e)),
                }
            }
            Op::Readdirplus { fh, offset, size } => {
                let mut dir = reply.dirplus(size);
                match fs.readdirplus(fh, offset, |e, off, entry| {
                    dir.add_plus(&entry_out(entry), off, u32::from(e.dtype), &e.name)
                }) {
                    Ok(()) => dir.send(),
                    Err(e) => dir.error(err(&e)),
                }
            }
            Op::Releasedir { fh, .. } => {
                fs.releasedir(fh);
                reply.empty();
            }
            Op::Fsyncdir { datasync, .. } => {
                let fs = fs.clone();
                off_queue(reply, move || fs.fsyncdir(node, datasync));
            }
            Op::Getlk {
                fh, owner, lock, ..
            } => match fs.getlk(fh, owner, lock.start, lock.end, lock.typ as i32) {
                Ok((t, s, e, pid)) => reply.lock(s, e, t as u32, pid),
                Err(e) => reply.error(err(&e)),
            },
            Op::Setlk {
                fh,
                owner,
                lock,
                sleep,
                ..
            } => match fs.setlk(
                fh,
                owner,
                lock.start,
                lock.end,
                lock.typ as i32,
                lock.pid,
                sleep,
            ) {
                Ok(Locking::Done) => reply.empty(),
                Ok(Locking::Wait(wait)) => off_queue(reply, wait),
                Err(e) => reply.error(err(&e)),
            },
            // Mounted with default_permissions: the kernel checks access itself.
            Op::Access { .. } => reply.empty(),
            Op::Create {
                name,
                flags,
                mode,
                umask,
                ..
            } => match fs.create(&ctx, node, name, mode, umask, flags as i32) {
                Ok((entry, o)) => reply.create(&entry_out(&entry), o.fh, o.flags.bits(), o.backing),
                Err(e) => reply.error(err(&e)),
            },
            Op::Fallocate {
                fh,
                offset,
                length,
                mode,
            } => {
                let fs = fs.clone();
                off_queue(reply, move || fs.fallocate(fh, offset, length, mode as i32));
            }
            Op::Lseek { fh, offset, whence } => match fs.lseek(fh, offset as i64, whence as i32) {
                Ok(off) => reply.lseek(off as u64),
                Err(e) => reply.error(err(&e)),
            },
            Op::CopyFileRange {
                fh_in,
                off_in,
                fh_out,
                off_out,
                len,
                flags,
                ..
            } => match fs.copy_file_range(fh_in, off_in, fh_out, off_out, len, flags as u32) {
                Ok(n) => reply.write(n),
                Err(e) => reply.error(err(&e)),
            },
            // As the classic transport: isatty() probes get ENOTTY, poll and bmap ENOSYS, and
            // STATX ENOSYS, which makes the kernel use GETATTR.
            Op::Ioctl { .. } => reply.error(libc::ENOTTY),
            Op::Destroy => {
                fs.destroy();
                reply.empty();
            }
            Op::Poll { .. } | Op::Bmap { .. } | Op::Statx { .. } | Op::Unknown(_) => {
                reply.error(libc::ENOSYS)
            }
        }
    }
}
