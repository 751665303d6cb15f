//! Decoding one ring request: the `fuse_in_header` in the header buffer's `in_out`, the
//! opcode's own struct (the kernel's `in_args[0]`) in `op_in`, and the remaining arguments
//! (names, link targets, xattr values, write data, extensions) packed in the payload buffer.
//! Every length the kernel gives is checked before it is used to slice.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use super::abi::{self, Bytes};

/// Why a request could not be decoded; the queue answers EIO.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum DecodeError {
    #[error("ring request header too short")]
    ShortHeader,
    #[error("ring request opcode {opcode}: argument struct has {got} bytes, needs {need}")]
    ShortArg {
        opcode: u32,
        need: usize,
        got: usize,
    },
    #[error("ring request opcode {opcode}: payload has {got} bytes, needs {need}")]
    ShortPayload {
        opcode: u32,
        need: usize,
        got: usize,
    },
    #[error("ring request opcode {0}: a name is not NUL-terminated")]
    Unterminated(u32),
    #[error(
        "ring request lengths disagree: header says {len}, payload {payload}, extensions {ext}"
    )]
    BadLength {
        len: u32,
        payload: usize,
        ext: usize,
    },
}

/// `struct fuse_file_lock`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileLock {
    pub start: u64,
    pub end: u64,
    pub typ: u32,
    pub pid: u32,
}

/// `struct fuse_setattr_in`: which fields are set is in `valid` (FATTR_*).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SetattrIn {
    pub valid: u32,
    pub fh: u64,
    pub size: u64,
    pub lock_owner: u64,
    pub atime: u64,
    pub mtime: u64,
    pub ctime: u64,
    pub atimensec: u32,
    pub mtimensec: u32,
    pub ctimensec: u32,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// One decoded operation; borrowed fields point into the entry's buffers.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Op<'a> {
    Lookup {
        name: &'a OsStr,
    },
    Getattr {
        /// Set when the kernel names an open file (FUSE_GETATTR_FH).
        fh: Option<u64>,
    },
    Setattr(SetattrIn),
    Readlink,
    Symlink {
        name: &'a OsStr,
        target: &'a OsStr,
    },
    Mknod {
        name: &'a OsStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    },
    Mkdir {
        name: &'a OsStr,
        mode: u32,
        umask: u32,
    },
    Unlink {
        name: &'a OsStr,
    },
    Rmdir {
        name: &'a OsStr,
    },
    /// RENAME (flags 0) and RENAME2.
    Rename {
        newdir: u64,
        name: &'a OsStr,
        newname: &'a OsStr,
        flags: u32,
    },
    Link {
        oldnodeid: u64,
        name: &'a OsStr,
    },
    Open {
        flags: u32,
        open_flags: u32,
    },
    Read {
        fh: u64,
        offset: u64,
        size: u32,
        read_flags: u32,
        lock_owner: Option<u64>,
        flags: u32,
    },
    Write {
        fh: u64,
        offset: u64,
        data: &'a [u8],
        write_flags: u32,
        lock_owner: Option<u64>,
        flags: u32,
    },
    Statfs,
    Release {
        fh: u64,
        flags: u32,
        release_flags: u32,
        lock_owner: u64,
        flush: bool,
    },
    Fsync {
        fh: u64,
        datasync: bool,
    },
    Setxattr {
        name: &'a OsStr,
        value: &'a [u8],
        flags: u32,
        setxattr_flags: u32,
    },
    Getxattr {
        name: &'a OsStr,
        size: u32,
    },
    Listxattr {
        size: u32,
    },
    Removexattr {
        name: &'a OsStr,
    },
    Flush {
        fh: u64,
        lock_owner: u64,
    },
    Opendir {
        flags: u32,
        open_flags: u32,
    },
    Readdir {
        fh: u64,
        offset: u64,
        size: u32,
    },
    Releasedir {
        fh: u64,
        flags: u32,
    },
    Fsyncdir {
        fh: u64,
        datasync: bool,
    },
    Getlk {
        fh: u64,
        owner: u64,
        lock: FileLock,
        lk_flags: u32,
    },
    /// SETLK (`sleep` false) and SETLKW (`sleep` true).
    Setlk {
        fh: u64,
        owner: u64,
        lock: FileLock,
        lk_flags: u32,
        sleep: bool,
    },
    Access {
        mask: u32,
    },
    Create {
        name: &'a OsStr,
        flags: u32,
        mode: u32,
        umask: u32,
        open_flags: u32,
    },
    Fallocate {
        fh: u64,
        offset: u64,
        length: u64,
        mode: u32,
    },
    Readdirplus {
        fh: u64,
        offset: u64,
        size: u32,
    },
    Lseek {
        fh: u64,
        offset: u64,
        whence: u32,
    },
    CopyFileRange {
        fh_in: u64,
        off_in: u64,
        nodeid_out: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
        flags: u64,
    },
    Ioctl {
        fh: u64,
        flags: u32,
        cmd: u32,
        arg: u64,
        in_data: &'a [u8],
        out_size: u32,
    },
    Poll {
        fh: u64,
        kh: u64,
        flags: u32,
        events: u32,
    },
    Bmap {
        block: u64,
        blocksize: u32,
    },
    Statx {
        getattr_flags: u32,
        fh: u64,
        sx_flags: u32,
        sx_mask: u32,
    },
    /// Sent at unmount of a connection that asked for it; answered with `empty()`.
    Destroy,
    /// Anything else: answer ENOSYS.
    Unknown(u32),
}

/// A request taken off the ring: the `fuse_in_header` fields and the decoded operation.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct RingRequest<'a> {
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    pub op: Op<'a>,
}

/// `fuse_in_header` as read from `in_out`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    pub total_extlen: u16,
}

impl InHeader {
    pub(crate) fn parse(in_out: &[u8]) -> Result<InHeader, DecodeError> {
        let b = Bytes(in_out);
        let f = || -> Option<InHeader> {
            Some(InHeader {
                len: b.u32(0)?,
                opcode: b.u32(4)?,
                unique: b.u64(8)?,
                nodeid: b.u64(16)?,
                uid: b.u32(24)?,
                gid: b.u32(28)?,
                pid: b.u32(32)?,
                total_extlen: b.u16(36)?,
            })
        };
        f().ok_or(DecodeError::ShortHeader)
    }
}

/// Decodes a request from the header buffer's `in_out` and `op_in` areas and the first
/// `payload_sz` bytes of the payload buffer (`payload`).
///
/// The kernel copies `in_args[0]` to `op_in` without saying how long it was; it is what
/// `fuse_in_header.len` counts beyond the header and the payload (the kernel sets `len` to
/// the header plus all in-args before queueing, ring or not).
pub(crate) fn decode<'a>(
    in_out: &'a [u8],
    op_in: &'a [u8],
    payload: &'a [u8],
) -> Result<RingRequest<'a>, DecodeError> {
    let h = InHeader::parse(in_out)?;
    let ext = usize::from(h.total_extlen) * 8;
    let bad = || DecodeError::BadLength {
        len: h.len,
        payload: payload.len(),
        ext,
    };
    let op_len = (h.len as usize)
        .checked_sub(abi::IN_HEADER_SIZE + payload.len())
        .ok_or_else(bad)?;
    if op_len > op_in.len() || ext > payload.len() {
        return Err(bad());
    }
    // Extensions (security context, supplementary groups) are the last in-arg.
    let args = &payload[..payload.len() - ext];
    let op = decode_op(h.opcode, Bytes(&op_in[..op_len]), args)?;
    Ok(RingRequest {
        opcode: h.opcode,
        unique: h.unique,
        nodeid: h.nodeid,
        uid: h.uid,
        gid: h.gid,
        pid: h.pid,
        op,
    })
}

/// Reads NUL-terminated strings off the front of the payload.
struct Names<'a> {
    opcode: u32,
    rest: &'a [u8],
}

impl<'a> Names<'a> {
    fn next(&mut self) -> Result<&'a OsStr, DecodeError> {
        let nul = self
            .rest
            .iter()
            .position(|&c| c == 0)
            .ok_or(DecodeError::Unterminated(self.opcode))?;
        let (name, rest) = self.rest.split_at(nul);
        self.rest = &rest[1..];
        Ok(OsStr::from_bytes(name))
    }
}

fn decode_op<'a>(opcode: u32, a: Bytes<'a>, payload: &'a [u8]) -> Result<Op<'a>, DecodeError> {
    use abi::*;
    // The struct needs `need` bytes; older protocol minors send shorter ones (compat sizes),
    // which callers ask for explicitly.
    let need = |need: usize| -> Result<(), DecodeError> {
        if a.len() < need {
            Err(DecodeError::ShortArg {
                opcode,
                need,
                got: a.len(),
            })
        } else {
            Ok(())
        }
    };
    // Reads that `need` already proved in bounds; a failure would be a bug here, answered EIO.
    let short = || DecodeError::ShortArg {
        opcode,
        need: a.len() + 1,
        got: a.len(),
    };
    let u32_at = |off: usize| a.u32(off).ok_or_else(short);
    let u64_at = |off: usize| a.u64(off).ok_or_else(short);
    let mut names = Names {
        opcode,
        rest: payload,
    };
    let op = match opcode {
        FUSE_LOOKUP => Op::Lookup {
            name: names.next()?,
        },
        FUSE_GETATTR => {
            // fuse_getattr_in { u32 getattr_flags; u32 dummy; u64 fh }
            need(16)?;
            let flags = u32_at(0)?;
            Op::Getattr {
                fh: (flags & FUSE_GETATTR_FH != 0)
                    .then(|| u64_at(8))
                    .transpose()?,
            }
        }
        FUSE_SETATTR => {
            need(88)?;
            Op::Setattr(SetattrIn {
                valid: u32_at(0)?,
                fh: u64_at(8)?,
                size: u64_at(16)?,
                lock_owner: u64_at(24)?,
                atime: u64_at(32)?,
                mtime: u64_at(40)?,
                ctime: u64_at(48)?,
                atimensec: u32_at(56)?,
                mtimensec: u32_at(60)?,
                ctimensec: u32_at(64)?,
                mode: u32_at(68)?,
                uid: u32_at(76)?,
                gid: u32_at(80)?,
            })
        }
        FUSE_READLINK => Op::Readlink,
        FUSE_SYMLINK => Op::Symlink {
            name: names.next()?,
            target: names.next()?,
        },
        FUSE_MKNOD => {
            // fuse_mknod_in { mode, rdev, umask, padding }; 8 bytes before 7.12.
            need(8)?;
            Op::Mknod {
                mode: u32_at(0)?,
                rdev: u32_at(4)?,
                umask: a.u32(8).unwrap_or(0),
                name: names.next()?,
            }
        }
        FUSE_MKDIR => {
            need(8)?;
            Op::Mkdir {
                mode: u32_at(0)?,
                umask: u32_at(4)?,
                name: names.next()?,
            }
        }
        FUSE_UNLINK => Op::Unlink {
            name: names.next()?,
        },
        FUSE_RMDIR => Op::Rmdir {
            name: names.next()?,
        },
        FUSE_RENAME | FUSE_RENAME2 => {
            let flags = if opcode == FUSE_RENAME2 {
                need(16)?;
                u32_at(8)?
            } else {
                need(8)?;
                0
            };
            Op::Rename {
                newdir: u64_at(0)?,
                flags,
                name: names.next()?,
                newname: names.next()?,
            }
        }
        FUSE_LINK => {
            need(8)?;
            Op::Link {
                oldnodeid: u64_at(0)?,
                name: names.next()?,
            }
        }
        FUSE_OPEN | FUSE_OPENDIR => {
            need(8)?;
            let (flags, open_flags) = (u32_at(0)?, u32_at(4)?);
            if opcode == FUSE_OPEN {
                Op::Open { flags, open_flags }
            } else {
                Op::Opendir { flags, open_flags }
            }
        }
        FUSE_READ | FUSE_READDIR | FUSE_READDIRPLUS => {
            // fuse_read_in { fh, offset, u32 size, u32 read_flags, lock_owner, u32 flags, pad }
            need(24)?;
            let (fh, offset, size) = (u64_at(0)?, u64_at(8)?, u32_at(16)?);
            match opcode {
                FUSE_READ => {
                    let read_flags = u32_at(20)?;
                    Op::Read {
                        fh,
                        offset,
                        size,
                        read_flags,
                        lock_owner: (read_flags & FUSE_READ_LOCKOWNER != 0)
                            .then(|| a.u64(24))
                            .flatten(),
                        flags: a.u32(32).unwrap_or(0),
                    }
                }
                FUSE_READDIR => Op::Readdir { fh, offset, size },
                _ => Op::Readdirplus { fh, offset, size },
            }
        }
        FUSE_WRITE => {
            // fuse_write_in mirrors fuse_read_in; 24 bytes before 7.9. The data follows in
            // the payload.
            need(24)?;
            let size = u32_at(16)? as usize;
            if payload.len() < size {
                return Err(DecodeError::ShortPayload {
                    opcode,
                    need: size,
                    got: payload.len(),
                });
            }
            let write_flags = u32_at(20)?;
            Op::Write {
                fh: u64_at(0)?,
                offset: u64_at(8)?,
                data: &payload[..size],
                write_flags,
                lock_owner: (write_flags & FUSE_WRITE_LOCKOWNER != 0)
                    .then(|| a.u64(24))
                    .flatten(),
                flags: a.u32(32).unwrap_or(0),
            }
        }
        FUSE_STATFS => Op::Statfs,
        FUSE_RELEASE | FUSE_RELEASEDIR => {
            // fuse_release_in { fh, u32 flags, u32 release_flags, lock_owner }
            need(16)?;
            let (fh, flags) = (u64_at(0)?, u32_at(8)?);
            if opcode == FUSE_RELEASEDIR {
                Op::Releasedir { fh, flags }
            } else {
                let release_flags = u32_at(12)?;
                Op::Release {
                    fh,
                    flags,
                    release_flags,
                    lock_owner: a.u64(16).unwrap_or(0),
                    flush: release_flags & FUSE_RELEASE_FLUSH != 0,
                }
            }
        }
        FUSE_FSYNC | FUSE_FSYNCDIR => {
            need(12)?;
            let fh = u64_at(0)?;
            let datasync = u32_at(8)? & FUSE_FSYNC_FDATASYNC != 0;
            if opcode == FUSE_FSYNC {
                Op::Fsync { fh, datasync }
            } else {
                Op::Fsyncdir { fh, datasync }
            }
        }
        FUSE_SETXATTR => {
            // fuse_setxattr_in { size, flags, setxattr_flags, padding }; 8 bytes unless
            // FUSE_SETXATTR_EXT was negotiated (the queue zeroes op_in, so a missing
            // setxattr_flags reads 0 either way).
            need(8)?;
            let size = u32_at(0)? as usize;
            let name = names.next()?;
            let rest = names.rest;
            if rest.len() < size {
                return Err(DecodeError::ShortPayload {
                    opcode,
                    need: size,
                    got: rest.len(),
                });
            }
            Op::Setxattr {
                name,
                value: &rest[..size],
                flags: u32_at(4)?,
                setxattr_flags: a.u32(8).unwrap_or(0),
            }
        }
        FUSE_GETXATTR => {
            need(4)?;
            Op::Getxattr {
                size: u32_at(0)?,
                name: names.next()?,
            }
        }
        FUSE_LISTXATTR => {
            need(4)?;
            Op::Listxattr { size: u32_at(0)? }
        }
        FUSE_REMOVEXATTR => Op::Removexattr {
            name: names.next()?,
        },
        FUSE_FLUSH => {
            // fuse_flush_in { fh, u32 unused, u32 padding, lock_owner }
            need(24)?;
            Op::Flush {
                fh: u64_at(0)?,
                lock_owner: u64_at(16)?,
            }
        }
        FUSE_GETLK | FUSE_SETLK | FUSE_SETLKW => {
            // fuse_lk_in { fh, owner, fuse_file_lock { start, end, type, pid }, lk_flags, pad }
            need(44)?;
            let (fh, owner) = (u64_at(0)?, u64_at(8)?);
            let lock = FileLock {
                start: u64_at(16)?,
                end: u64_at(24)?,
                typ: u32_at(32)?,
                pid: u32_at(36)?,
            };
            let lk_flags = u32_at(40)?;
            if opcode == FUSE_GETLK {
                Op::Getlk {
                    fh,
                    owner,
                    lock,
                    lk_flags,
                }
            } else {
                Op::Setlk {
                    fh,
                    owner,
                    lock,
                    lk_flags,
                    sleep: opcode == FUSE_SETLKW,
                }
            }
        }
        FUSE_ACCESS => {
            need(4)?;
            Op::Access { mask: u32_at(0)? }
        }
        FUSE_CREATE => {
            // fuse_create_in { flags, mode, umask, open_flags }
            need(12)?;
            Op::Create {
                flags: u32_at(0)?,
                mode: u32_at(4)?,
                umask: u32_at(8)?,
                open_flags: a.u32(12).unwrap_or(0),
                name: names.next()?,
            }
        }
        FUSE_FALLOCATE => {
            need(28)?;
            Op::Fallocate {
                fh: u64_at(0)?,
                offset: u64_at(8)?,
                length: u64_at(16)?,
                mode: u32_at(24)?,
            }
        }
        FUSE_LSEEK => {
            need(20)?;
            Op::Lseek {
                fh: u64_at(0)?,
                offset: u64_at(8)?,
                whence: u32_at(16)?,
            }
        }
        FUSE_COPY_FILE_RANGE => {
            need(56)?;
            Op::CopyFileRange {
                fh_in: u64_at(0)?,
                off_in: u64_at(8)?,
                nodeid_out: u64_at(16)?,
                fh_out: u64_at(24)?,
                off_out: u64_at(32)?,
                len: u64_at(40)?,
                flags: u64_at(48)?,
            }
        }
        FUSE_IOCTL => {
            // fuse_ioctl_in { fh, u32 flags, u32 cmd, u64 arg, u32 in_size, u32 out_size }
            need(32)?;
            let in_size = u32_at(24)? as usize;
            if payload.len() < in_size {
                return Err(DecodeError::ShortPayload {
                    opcode,
                    need: in_size,
                    got: payload.len(),
                });
            }
            Op::Ioctl {
                fh: u64_at(0)?,
                flags: u32_at(8)?,
                cmd: u32_at(12)?,
                arg: u64_at(16)?,
                in_data: &payload[..in_size],
                out_size: u32_at(28)?,
            }
        }
        FUSE_POLL => {
            need(20)?;
            Op::Poll {
                fh: u64_at(0)?,
                kh: u64_at(8)?,
                flags: u32_at(16)?,
                events: a.u32(20).unwrap_or(0),
            }
        }
        FUSE_BMAP => {
            need(12)?;
            Op::Bmap {
                block: u64_at(0)?,
                blocksize: u32_at(8)?,
            }
        }
        FUSE_STATX => {
            need(24)?;
            Op::Statx {
                getattr_flags: u32_at(0)?,
                fh: u64_at(8)?,
                sx_flags: u32_at(16)?,
                sx_mask: u32_at(20)?,
            }
        }
        FUSE_DESTROY => Op::Destroy,
        other => Op::Unknown(other),
    };
    Ok(op)
}
