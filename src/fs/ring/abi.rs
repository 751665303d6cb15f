//! The kernel ABI that FUSE-over-io-uring speaks: opcodes, the byte layout of the structs in
//! `include/uapi/linux/fuse.h` that the ring carries, and the 128-byte `IORING_OP_URING_CMD`
//! submission entry. Layouts are written down as byte offsets and read or written with the
//! [`Bytes`] reader and [`Out`] writer, so that nothing here reinterprets memory.

use io_uring::squeue;

// Request opcodes (enum fuse_opcode).
pub(crate) const FUSE_LOOKUP: u32 = 1;
pub(crate) const FUSE_FORGET: u32 = 2;
pub(crate) const FUSE_GETATTR: u32 = 3;
pub(crate) const FUSE_SETATTR: u32 = 4;
pub(crate) const FUSE_READLINK: u32 = 5;
pub(crate) const FUSE_SYMLINK: u32 = 6;
pub(crate) const FUSE_MKNOD: u32 = 8;
pub(crate) const FUSE_MKDIR: u32 = 9;
pub(crate) const FUSE_UNLINK: u32 = 10;
pub(crate) const FUSE_RMDIR: u32 = 11;
pub(crate) const FUSE_RENAME: u32 = 12;
pub(crate) const FUSE_LINK: u32 = 13;
pub(crate) const FUSE_OPEN: u32 = 14;
pub(crate) const FUSE_READ: u32 = 15;
pub(crate) const FUSE_WRITE: u32 = 16;
pub(crate) const FUSE_STATFS: u32 = 17;
pub(crate) const FUSE_RELEASE: u32 = 18;
pub(crate) const FUSE_FSYNC: u32 = 20;
pub(crate) const FUSE_SETXATTR: u32 = 21;
pub(crate) const FUSE_GETXATTR: u32 = 22;
pub(crate) const FUSE_LISTXATTR: u32 = 23;
pub(crate) const FUSE_REMOVEXATTR: u32 = 24;
pub(crate) const FUSE_FLUSH: u32 = 25;
pub(crate) const FUSE_INIT: u32 = 26;
pub(crate) const FUSE_OPENDIR: u32 = 27;
pub(crate) const FUSE_READDIR: u32 = 28;
pub(crate) const FUSE_RELEASEDIR: u32 = 29;
pub(crate) const FUSE_FSYNCDIR: u32 = 30;
pub(crate) const FUSE_GETLK: u32 = 31;
pub(crate) const FUSE_SETLK: u32 = 32;
pub(crate) const FUSE_SETLKW: u32 = 33;
pub(crate) const FUSE_ACCESS: u32 = 34;
pub(crate) const FUSE_CREATE: u32 = 35;
pub(crate) const FUSE_INTERRUPT: u32 = 36;
pub(crate) const FUSE_BMAP: u32 = 37;
pub(crate) const FUSE_DESTROY: u32 = 38;
pub(crate) const FUSE_IOCTL: u32 = 39;
pub(crate) const FUSE_POLL: u32 = 40;
pub(crate) const FUSE_BATCH_FORGET: u32 = 42;
pub(crate) const FUSE_FALLOCATE: u32 = 43;
pub(crate) const FUSE_READDIRPLUS: u32 = 44;
pub(crate) const FUSE_RENAME2: u32 = 45;
pub(crate) const FUSE_LSEEK: u32 = 46;
pub(crate) const FUSE_COPY_FILE_RANGE: u32 = 47;
pub(crate) const FUSE_STATX: u32 = 52;

// Flags inside requests and replies.
pub(crate) const FUSE_GETATTR_FH: u32 = 1 << 0;
pub(crate) const FUSE_READ_LOCKOWNER: u32 = 1 << 1;
pub(crate) const FUSE_WRITE_LOCKOWNER: u32 = 1 << 1;
pub(crate) const FUSE_FSYNC_FDATASYNC: u32 = 1 << 0;
pub(crate) const FUSE_RELEASE_FLUSH: u32 = 1 << 0;
pub(crate) const FUSE_LK_FLOCK: u32 = 1 << 0;
pub(crate) const FOPEN_PASSTHROUGH: u32 = 1 << 7;

/// `FUSE_MIN_READ_BUFFER`: the smallest request buffer the kernel accepts.
pub(crate) const FUSE_MIN_READ_BUFFER: usize = 8192;

// io-uring commands on /dev/fuse (enum fuse_uring_cmd).
pub(crate) const FUSE_IO_URING_CMD_REGISTER: u32 = 1;
pub(crate) const FUSE_IO_URING_CMD_COMMIT_AND_FETCH: u32 = 2;

// struct fuse_uring_req_header: in_out[128], op_in[128], struct fuse_uring_ent_in_out.
pub(crate) const HDR_IN_OUT: usize = 0;
pub(crate) const HDR_IN_OUT_SIZE: usize = 128;
pub(crate) const HDR_OP_IN: usize = 128;
pub(crate) const HDR_OP_IN_SIZE: usize = 128;
pub(crate) const HDR_ENT_IN_OUT: usize = 256;
/// sizeof(struct fuse_uring_req_header): the least the header iovec may be.
pub(crate) const REQ_HEADER_SIZE: usize = 256 + ENT_IN_OUT_SIZE;

// struct fuse_uring_ent_in_out { u64 flags; u64 commit_id; u32 payload_sz; u32 padding; u64 reserved }
pub(crate) const ENT_COMMIT_ID: usize = 8;
pub(crate) const ENT_PAYLOAD_SZ: usize = 16;
pub(crate) const ENT_IN_OUT_SIZE: usize = 32;

/// sizeof(struct fuse_in_header).
pub(crate) const IN_HEADER_SIZE: usize = 40;
/// sizeof(struct fuse_out_header).
pub(crate) const OUT_HEADER_SIZE: usize = 16;

// Sizes of the reply structs.
pub(crate) const ATTR_SIZE: usize = 88;
pub(crate) const ENTRY_OUT_SIZE: usize = 40 + ATTR_SIZE;
pub(crate) const ATTR_OUT_SIZE: usize = 16 + ATTR_SIZE;
pub(crate) const OPEN_OUT_SIZE: usize = 16;
pub(crate) const STATFS_OUT_SIZE: usize = 80;
pub(crate) const DIRENT_HEADER_SIZE: usize = 24;

/// Rounds a dirent's length up to the 8-byte alignment the kernel walks them with.
pub(crate) const fn dirent_align(len: usize) -> usize {
    (len + 7) & !7
}

/// A bounds-checked little reader over a kernel-supplied byte slice: every read says how
/// many bytes it needs, so a short buffer becomes an error instead of a panic.
#[derive(Clone, Copy)]
pub(crate) struct Bytes<'a>(pub(crate) &'a [u8]);

impl<'a> Bytes<'a> {
    fn array<const N: usize>(self, off: usize) -> Option<[u8; N]> {
        let end = off.checked_add(N)?;
        self.0.get(off..end)?.try_into().ok()
    }
    pub(crate) fn u16(self, off: usize) -> Option<u16> {
        self.array(off).map(u16::from_ne_bytes)
    }
    pub(crate) fn u32(self, off: usize) -> Option<u32> {
        self.array(off).map(u32::from_ne_bytes)
    }
    pub(crate) fn u64(self, off: usize) -> Option<u64> {
        self.array(off).map(u64::from_ne_bytes)
    }
    pub(crate) fn len(self) -> usize {
        self.0.len()
    }
}

/// Appends kernel structs field by field in native byte order.
pub(crate) struct Out<'a>(pub(crate) &'a mut Vec<u8>);

impl Out<'_> {
    pub(crate) fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_ne_bytes());
        self
    }
    pub(crate) fn i32(&mut self, v: i32) -> &mut Self {
        self.0.extend_from_slice(&v.to_ne_bytes());
        self
    }
    pub(crate) fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_ne_bytes());
        self
    }
    pub(crate) fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
    pub(crate) fn zeros(&mut self, n: usize) -> &mut Self {
        self.0.resize(self.0.len() + n, 0);
        self
    }
}

// Offsets in the kernel's struct io_uring_sqe (include/uapi/linux/io_uring.h).
const SQE_OPCODE: usize = 0;
const SQE_FD: usize = 4;
const SQE_CMD_OP: usize = 8;
const SQE_ADDR: usize = 16;
const SQE_LEN: usize = 24;
const SQE_USER_DATA: usize = 32;
/// `sqe->cmd`: the 80 bytes from here to the end of a 128-byte entry.
const SQE_CMD: usize = 48;

// The entry is handed to the io-uring crate by value as its own 128-byte type.
const _: () = assert!(std::mem::size_of::<squeue::Entry128>() == 128);

/// Builds the `IORING_OP_URING_CMD` entry for one ring command on the /dev/fuse `fd`:
/// `cmd_op` is REGISTER or COMMIT_AND_FETCH, the command area holds
/// `struct fuse_uring_cmd_req { u64 flags; u64 commit_id; u16 qid; u8 padding[6] }`, and a
/// REGISTER also carries `addr` (the two iovecs: header, payload) with `len` 2.
///
/// The io-uring crate's `UringCmd80` sets `addr` but has no way to set `len`, which the
/// kernel requires to be 2 (`fuse_uring_get_iovec_from_sqe`), so the entry is written here
/// byte by byte in the kernel's layout.
pub(crate) fn uring_cmd_sqe(
    fd: i32,
    cmd_op: u32,
    qid: u16,
    commit_id: u64,
    iovecs: Option<u64>,
    user_data: u64,
) -> squeue::Entry128 {
    let mut raw = [0u8; 128];
    raw[SQE_OPCODE] = io_uring::opcode::UringCmd80::CODE;
    raw[SQE_FD..SQE_FD + 4].copy_from_slice(&fd.to_ne_bytes());
    raw[SQE_CMD_OP..SQE_CMD_OP + 4].copy_from_slice(&cmd_op.to_ne_bytes());
    if let Some(addr) = iovecs {
        raw[SQE_ADDR..SQE_ADDR + 8].copy_from_slice(&addr.to_ne_bytes());
        raw[SQE_LEN..SQE_LEN + 4].copy_from_slice(&2u32.to_ne_bytes());
    }
    raw[SQE_USER_DATA..SQE_USER_DATA + 8].copy_from_slice(&user_data.to_ne_bytes());
    // struct fuse_uring_cmd_req: flags stay 0.
    raw[SQE_CMD + 8..SQE_CMD + 16].copy_from_slice(&commit_id.to_ne_bytes());
    raw[SQE_CMD + 16..SQE_CMD + 18].copy_from_slice(&qid.to_ne_bytes());
    // SAFETY: `Entry128` is `#[repr(C)]` over the kernel's 64-byte `io_uring_sqe` followed by
    // `[u8; 64]` (checked to be 128 bytes above); its fields are integers, byte arrays and
    // unions of integers, so every fully initialised 128-byte pattern is a valid value, and
    // the kernel reads exactly these bytes as the SQE128 entry.
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(raw) }
}
