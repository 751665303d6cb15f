//! Encoding replies. A [`RingReply`] fills a buffer lent by its ring entry with the reply's
//! out-args, packed one after another as the kernel reads them from the payload buffer, and
//! hands it back to the entry's queue thread, which writes `fuse_out_header` into `in_out`,
//! the length into `ring_ent_in_out.payload_sz`, and commits the entry. A reply may be sent
//! from any thread, later than `handle` returns; one dropped unanswered answers EIO.
//!
//! The reply is built in its own (reused) buffer rather than in the payload buffer because
//! the request it answers may still borrow names from the payload buffer while `handle`
//! runs; the queue thread copies it over once `handle` has returned.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::Duration;

use super::abi::{self, Out};
use super::queue::{Commit, QueueLink};

/// File attributes as the kernel caches them (`struct fuse_attr`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: i64,
    pub atime_nsec: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    pub ctime: i64,
    pub ctime_nsec: u32,
    /// File type and permission bits, as `st_mode`.
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
}

impl Attr {
    /// The attributes of a `stat` result (what the filesystem core has).
    pub(crate) fn from_stat(st: &libc::stat) -> Attr {
        Attr {
            ino: st.st_ino,
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: st.st_atime,
            atime_nsec: st.st_atime_nsec as u32,
            mtime: st.st_mtime,
            mtime_nsec: st.st_mtime_nsec as u32,
            ctime: st.st_ctime,
            ctime_nsec: st.st_ctime_nsec as u32,
            mode: st.st_mode,
            nlink: st.st_nlink as u32,
            uid: st.st_uid,
            gid: st.st_gid,
            // The kernel decodes a 32-bit rdev with new_decode_dev.
            rdev: st.st_rdev as u32,
            blksize: st.st_blksize as u32,
        }
    }

    fn encode(&self, out: &mut Out<'_>) {
        out.u64(self.ino)
            .u64(self.size)
            .u64(self.blocks)
            .u64(self.atime as u64)
            .u64(self.mtime as u64)
            .u64(self.ctime as u64)
            .u32(self.atime_nsec)
            .u32(self.mtime_nsec)
            .u32(self.ctime_nsec)
            .u32(self.mode)
            .u32(self.nlink)
            .u32(self.uid)
            .u32(self.gid)
            .u32(self.rdev)
            .u32(self.blksize)
            .u32(0); // flags
    }
}

/// A looked-up or created entry (`struct fuse_entry_out`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct EntryOut {
    pub nodeid: u64,
    pub generation: u64,
    /// How long the kernel may cache the name.
    pub entry_valid: Duration,
    /// How long the kernel may cache the attributes.
    pub attr_valid: Duration,
    pub attr: Attr,
}

impl EntryOut {
    fn encode(&self, out: &mut Out<'_>) {
        out.u64(self.nodeid)
            .u64(self.generation)
            .u64(self.entry_valid.as_secs())
            .u64(self.attr_valid.as_secs())
            .u32(self.entry_valid.subsec_nanos())
            .u32(self.attr_valid.subsec_nanos());
        self.attr.encode(out);
    }
}

/// Filesystem statistics (`struct fuse_kstatfs`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Statfs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

impl Statfs {
    pub(crate) fn from_statvfs(st: &libc::statvfs) -> Statfs {
        Statfs {
            blocks: st.f_blocks,
            bfree: st.f_bfree,
            bavail: st.f_bavail,
            files: st.f_files,
            ffree: st.f_ffree,
            bsize: st.f_bsize as u32,
            namelen: st.f_namemax as u32,
            frsize: st.f_frsize as u32,
        }
    }
}

/// The `DT_*` type of a dirent for a `st_mode`.
pub(crate) fn dirent_type(mode: u32) -> u32 {
    (mode & libc::S_IFMT) >> 12
}

/// What a reply owns until it is sent: the way back to its entry and the entry's buffer.
pub(super) struct Pending {
    pub(super) link: Arc<QueueLink>,
    pub(super) entry: usize,
    pub(super) buf: Vec<u8>,
    /// The entry's payload buffer size: no reply may be longer.
    pub(super) capacity: usize,
}

/// The answer to one ring request. Exactly one method sends it; dropping it unsent
/// answers EIO, so a request is never left waiting.
pub(crate) struct RingReply {
    pending: Option<Pending>,
}

impl std::fmt::Debug for RingReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingReply")
            .field("entry", &self.pending.as_ref().map(|p| p.entry))
            .finish()
    }
}

impl RingReply {
    pub(super) fn new(pending: Pending) -> RingReply {
        RingReply {
            pending: Some(pending),
        }
    }

    /// Sends what `fill` appends to the (empty) reply buffer, with error 0; a reply longer
    /// than the payload buffer becomes EIO.
    fn send_with(mut self, fill: impl FnOnce(&mut Out<'_>)) {
        let Some(mut p) = self.pending.take() else {
            return;
        };
        p.buf.clear();
        fill(&mut Out(&mut p.buf));
        let error = if p.buf.len() > p.capacity {
            tracing::warn!(
                len = p.buf.len(),
                capacity = p.capacity,
                "ring reply longer than the payload buffer: answering EIO"
            );
            p.buf.clear();
            -libc::EIO
        } else {
            0
        };
        finish(p, error);
    }

    /// Answers with an error number (positive, like `libc::ENOENT`); one the kernel would
    /// refuse (0, negative, or from its internal range) becomes EIO.
    pub(crate) fn error(mut self, errno: i32) {
        if let Some(mut p) = self.pending.take() {
            p.buf.clear();
            let errno = if errno > 0 && errno < 512 {
                errno
            } else {
                libc::EIO
            };
            finish(p, -errno);
        }
    }

    /// Success without data: unlink, rmdir, rename, release, flush, fsync, setxattr, ...
    pub(crate) fn empty(self) {
        self.send_with(|_| {});
    }

    /// LOOKUP, MKNOD, MKDIR, SYMLINK, LINK.
    pub(crate) fn entry(self, entry: &EntryOut) {
        self.send_with(|o| entry.encode(o));
    }

    /// GETATTR, SETATTR (`struct fuse_attr_out`).
    pub(crate) fn attr(self, valid: Duration, attr: &Attr) {
        self.send_with(|o| {
            o.u64(valid.as_secs()).u32(valid.subsec_nanos()).u32(0);
            attr.encode(o);
        });
    }

    /// OPEN, OPENDIR. `backing_id` (from FUSE_DEV_IOC_BACKING_OPEN) turns on passthrough.
    pub(crate) fn open(self, fh: u64, open_flags: u32, backing_id: Option<u32>) {
        self.send_with(|o| encode_open(o, fh, open_flags, backing_id));
    }

    /// CREATE: the new entry, then the open file.
    pub(crate) fn create(
        self,
        entry: &EntryOut,
        fh: u64,
        open_flags: u32,
        backing_id: Option<u32>,
    ) {
        self.send_with(|o| {
            entry.encode(o);
            encode_open(o, fh, open_flags, backing_id);
        });
    }

    /// READ, READLINK, GETXATTR and LISTXATTR with a size: the bytes themselves.
    pub(crate) fn data(self, data: &[u8]) {
        self.send_with(|o| {
            o.bytes(data);
        });
    }

    /// GETXATTR and LISTXATTR asked with size 0: the size needed.
    pub(crate) fn xattr_size(self, size: u32) {
        self.send_with(|o| {
            o.u32(size).u32(0);
        });
    }

    /// WRITE and COPY_FILE_RANGE: bytes written.
    pub(crate) fn write(self, written: u32) {
        self.send_with(|o| {
            o.u32(written).u32(0);
        });
    }

    /// STATFS.
    pub(crate) fn statfs(self, st: &Statfs) {
        self.send_with(|o| {
            o.u64(st.blocks)
                .u64(st.bfree)
                .u64(st.bavail)
                .u64(st.files)
                .u64(st.ffree)
                .u32(st.bsize)
                .u32(st.namelen)
                .u32(st.frsize)
                .u32(0)
                .zeros(24);
        });
    }

    /// GETLK: the conflicting lock, or one of type F_UNLCK.
    pub(crate) fn lock(self, start: u64, end: u64, typ: u32, pid: u32) {
        self.send_with(|o| {
            o.u64(start).u64(end).u32(typ).u32(pid);
        });
    }

    /// LSEEK: the resulting offset.
    pub(crate) fn lseek(self, offset: u64) {
        self.send_with(|o| {
            o.u64(offset);
        });
    }

    /// BMAP: the device block.
    pub(crate) fn bmap(self, block: u64) {
        self.send_with(|o| {
            o.u64(block);
        });
    }

    /// POLL: the ready events.
    pub(crate) fn poll(self, revents: u32) {
        self.send_with(|o| {
            o.u32(revents).u32(0);
        });
    }

    /// IOCTL (restricted): the result and the output bytes.
    pub(crate) fn ioctl(self, result: i32, data: &[u8]) {
        self.send_with(|o| {
            o.i32(result).u32(0).u32(0).u32(0).bytes(data);
        });
    }

    /// A READDIR reply holding at most `size` bytes (the request's size).
    pub(crate) fn dir(mut self, size: u32) -> DirReply {
        if let Some(b) = self.buf() {
            b.clear();
        }
        let limit = self.limit(size);
        DirReply { reply: self, limit }
    }

    /// A READDIRPLUS reply holding at most `size` bytes (the request's size): entries go in
    /// with `DirReply::add_plus`.
    pub(crate) fn dirplus(self, size: u32) -> DirReply {
        self.dir(size)
    }

    fn limit(&self, size: u32) -> usize {
        let capacity = self.pending.as_ref().map_or(0, |p| p.capacity);
        (size as usize).min(capacity)
    }

    /// The reply buffer, for a directory builder.
    fn buf(&mut self) -> Option<&mut Vec<u8>> {
        self.pending.as_mut().map(|p| &mut p.buf)
    }
}

impl Drop for RingReply {
    fn drop(&mut self) {
        if let Some(mut p) = self.pending.take() {
            p.buf.clear();
            finish(p, -libc::EIO);
        }
    }
}

fn finish(p: Pending, error: i32) {
    let Pending {
        link, entry, buf, ..
    } = p;
    link.commit(Commit {
        entry,
        error,
        payload: buf,
    });
}

fn encode_open(o: &mut Out<'_>, fh: u64, open_flags: u32, backing_id: Option<u32>) {
    let (flags, id) = match backing_id {
        Some(id) => (open_flags | abi::FOPEN_PASSTHROUGH, id as i32),
        None => (open_flags & !abi::FOPEN_PASSTHROUGH, 0),
    };
    o.u64(fh).u32(flags).i32(id);
}

fn push_dirent(
    buf: &mut Vec<u8>,
    limit: usize,
    prefix: Option<&EntryOut>,
    ino: u64,
    off: u64,
    typ: u32,
    name: &OsStr,
) -> bool {
    let name = name.as_bytes();
    let head = prefix.map_or(0, |_| abi::ENTRY_OUT_SIZE) + abi::DIRENT_HEADER_SIZE;
    let len = abi::dirent_align(head + name.len());
    if buf.len() + len > limit {
        return true;
    }
    let start = buf.len();
    let mut o = Out(buf);
    if let Some(e) = prefix {
        e.encode(&mut o);
    }
    o.u64(ino)
        .u64(off)
        .u32(name.len() as u32)
        .u32(typ)
        .bytes(name);
    buf.resize(start + len, 0);
    false
}

/// Builds a READDIR reply (`struct fuse_dirent` records, each 8-byte aligned) or a
/// READDIRPLUS one (`struct fuse_direntplus`: the entry, then the dirent).
pub(crate) struct DirReply {
    reply: RingReply,
    limit: usize,
}

impl DirReply {
    /// Adds one entry; `off` is the offset of the entry after it. Returns true, without
    /// adding it, when it does not fit: send what is there.
    pub(crate) fn add(&mut self, ino: u64, off: u64, typ: u32, name: &OsStr) -> bool {
        let limit = self.limit;
        match self.reply.buf() {
            Some(buf) => push_dirent(buf, limit, None, ino, off, typ, name),
            None => true,
        }
    }

    /// Adds one entry with its attributes (each added entry counts as a lookup, as in
    /// LOOKUP, unless its nodeid is 0). Returns true, without adding it, when it does not fit.
    pub(crate) fn add_plus(&mut self, entry: &EntryOut, off: u64, typ: u32, name: &OsStr) -> bool {
        let limit = self.limit;
        match self.reply.buf() {
            Some(buf) => push_dirent(buf, limit, Some(entry), entry.attr.ino, off, typ, name),
            None => true,
        }
    }

    /// Sends the entries added so far (none means end of directory).
    pub(crate) fn send(mut self) {
        let bytes = self.reply.buf().map(std::mem::take).unwrap_or_default();
        send_built(self.reply, bytes);
    }

    /// Answers with an error instead of the entries.
    pub(crate) fn error(self, errno: i32) {
        self.reply.error(errno);
    }
}

/// Sends a reply whose bytes were built in place, returning the same buffer to the entry.
fn send_built(mut reply: RingReply, bytes: Vec<u8>) {
    if let Some(mut p) = reply.pending.take() {
        p.buf = bytes;
        // Built within `limit`, which never exceeds the capacity.
        finish(p, 0);
    }
}
