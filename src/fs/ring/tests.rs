//! Tests of the ring: decoding and encoding against hand-built buffers, and a real mount
//! whose requests the kernel sends through the ring (needs root and Linux 6.14+; skipped
//! with a note otherwise).

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::abi::{self, Bytes};
use super::queue::{Commit, QueueLink};
use super::reply::Pending;
use super::*;

// ---------------------------------------------------------------------------------------
// Hand-built requests.

/// A request as the kernel lays it out: `in_out`, `op_in`, payload.
struct Raw {
    in_out: Vec<u8>,
    op_in: Vec<u8>,
    payload: Vec<u8>,
}

fn raw(opcode: u32, arg0: &[u8], payload: &[u8], extlen: u16) -> Raw {
    let mut in_out = Vec::new();
    let len = (abi::IN_HEADER_SIZE + arg0.len() + payload.len()) as u32;
    abi::Out(&mut in_out)
        .u32(len)
        .u32(opcode)
        .u64(77) // unique
        .u64(1) // nodeid
        .u32(1000)
        .u32(100)
        .u32(4242);
    in_out.extend_from_slice(&extlen.to_ne_bytes());
    in_out.extend_from_slice(&[0, 0]);
    in_out.resize(abi::HDR_IN_OUT_SIZE, 0);
    let mut op_in = arg0.to_vec();
    op_in.resize(abi::HDR_OP_IN_SIZE, 0);
    Raw {
        in_out,
        op_in,
        payload: payload.to_vec(),
    }
}

impl Raw {
    fn decode(&self) -> Result<RingRequest<'_>, DecodeError> {
        request::decode(&self.in_out, &self.op_in, &self.payload)
    }
}

fn le(fields: &[u64], widths: &[usize]) -> Vec<u8> {
    let mut v = Vec::new();
    for (&f, &w) in fields.iter().zip(widths) {
        match w {
            4 => v.extend_from_slice(&(f as u32).to_ne_bytes()),
            8 => v.extend_from_slice(&f.to_ne_bytes()),
            _ => unreachable!(),
        }
    }
    v
}

#[test]
fn decodes_lookup_and_header() {
    let r = raw(abi::FUSE_LOOKUP, &[], b"hello\0", 0);
    let req = r.decode().expect("decodes");
    assert_eq!(req.opcode, abi::FUSE_LOOKUP);
    assert_eq!((req.unique, req.nodeid), (77, 1));
    assert_eq!((req.uid, req.gid, req.pid), (1000, 100, 4242));
    assert_eq!(
        req.op,
        Op::Lookup {
            name: OsStr::new("hello")
        }
    );
}

#[test]
fn decodes_ops_with_args_and_names() {
    // RENAME2: fuse_rename2_in, then both names.
    let r = raw(
        abi::FUSE_RENAME2,
        &le(&[9, 1, 0], &[8, 4, 4]),
        b"a\0bb\0",
        0,
    );
    assert_eq!(
        r.decode().expect("rename2").op,
        Op::Rename {
            newdir: 9,
            name: OsStr::new("a"),
            newname: OsStr::new("bb"),
            flags: 1
        }
    );
    // SETXATTR with the extended struct: name, then exactly `size` value bytes.
    let r = raw(
        abi::FUSE_SETXATTR,
        &le(&[3, 2, 1, 0], &[4, 4, 4, 4]),
        b"user.x\0abc",
        0,
    );
    assert_eq!(
        r.decode().expect("setxattr").op,
        Op::Setxattr {
            name: OsStr::new("user.x"),
            value: b"abc",
            flags: 2,
            setxattr_flags: 1
        }
    );
    // WRITE: the data is `size` bytes of the payload.
    let r = raw(
        abi::FUSE_WRITE,
        &le(&[5, 4096, 3, 0, 0, 0, 0], &[8, 8, 4, 4, 8, 4, 4]),
        b"xyz",
        0,
    );
    match r.decode().expect("write").op {
        Op::Write {
            fh, offset, data, ..
        } => assert_eq!((fh, offset, data), (5, 4096, &b"xyz"[..])),
        op => panic!("{op:?}"),
    }
    // MKDIR with an 8-byte extension after the name (e.g. supplementary groups).
    let r = raw(
        abi::FUSE_MKDIR,
        &le(&[0o755, 0o22], &[4, 4]),
        b"d\0\x08\0\0\0\x20\0\0\0",
        1,
    );
    assert_eq!(
        r.decode().expect("mkdir").op,
        Op::Mkdir {
            name: OsStr::new("d"),
            mode: 0o755,
            umask: 0o22
        }
    );
    // SETLKW.
    let r = raw(
        abi::FUSE_SETLKW,
        &le(&[1, 2, 0, 99, 1, 7, 0, 0], &[8, 8, 8, 8, 4, 4, 4, 4]),
        &[],
        0,
    );
    assert_eq!(
        r.decode().expect("setlkw").op,
        Op::Setlk {
            fh: 1,
            owner: 2,
            lock: FileLock {
                start: 0,
                end: 99,
                typ: 1,
                pid: 7
            },
            lk_flags: 0,
            sleep: true
        }
    );
    // GETATTR with and without a file handle.
    let r = raw(abi::FUSE_GETATTR, &le(&[1, 0, 12], &[4, 4, 8]), &[], 0);
    assert_eq!(
        r.decode().expect("getattr").op,
        Op::Getattr { fh: Some(12) }
    );
    let r = raw(abi::FUSE_GETATTR, &le(&[0, 0, 12], &[4, 4, 8]), &[], 0);
    assert_eq!(r.decode().expect("getattr").op, Op::Getattr { fh: None });
    // An opcode the ring does not know.
    let r = raw(4096, &[], &[], 0);
    assert_eq!(r.decode().expect("unknown").op, Op::Unknown(4096));
}

#[test]
fn short_or_inconsistent_requests_are_errors() {
    // WRITE claiming 10 bytes with 4 in the payload.
    let r = raw(
        abi::FUSE_WRITE,
        &le(&[5, 0, 10, 0, 0, 0, 0], &[8, 8, 4, 4, 8, 4, 4]),
        b"abcd",
        0,
    );
    assert!(matches!(
        r.decode(),
        Err(DecodeError::ShortPayload {
            need: 10,
            got: 4,
            ..
        })
    ));
    // GETATTR whose struct is 4 bytes.
    let r = raw(abi::FUSE_GETATTR, &[0; 4], &[], 0);
    assert!(matches!(
        r.decode(),
        Err(DecodeError::ShortArg {
            need: 16,
            got: 4,
            ..
        })
    ));
    // A name without its NUL.
    let r = raw(abi::FUSE_LOOKUP, &[], b"abc", 0);
    assert_eq!(
        r.decode().map(|_| ()),
        Err(DecodeError::Unterminated(abi::FUSE_LOOKUP))
    );
    // A header shorter than fuse_in_header.
    let r = raw(abi::FUSE_LOOKUP, &[], b"a\0", 0);
    assert_eq!(
        request::decode(&r.in_out[..20], &r.op_in, &r.payload).map(|_| ()),
        Err(DecodeError::ShortHeader)
    );
    // `len` smaller than header plus payload, or an arg bigger than op_in.
    let mut r = raw(abi::FUSE_LOOKUP, &[], b"a\0", 0);
    r.in_out[0..4].copy_from_slice(&41u32.to_ne_bytes());
    assert!(matches!(r.decode(), Err(DecodeError::BadLength { .. })));
    r.in_out[0..4].copy_from_slice(&(40u32 + 129 + 2).to_ne_bytes());
    assert!(matches!(r.decode(), Err(DecodeError::BadLength { .. })));
    // Extensions longer than the payload.
    let r = raw(abi::FUSE_MKDIR, &[0; 8], b"d\0", 1);
    assert!(matches!(r.decode(), Err(DecodeError::BadLength { .. })));
}

#[test]
fn no_opcode_panics_on_truncated_buffers() {
    let junk: Vec<u8> = (0..200u32).map(|i| (i * 37 % 251) as u8).collect();
    for opcode in 0..64 {
        for arg0 in [0usize, 4, 8, 12, 16, 24, 40, 56, 88, 128] {
            for pl in [0usize, 1, 3, 8, 64, 200] {
                let r = raw(opcode, &junk[..arg0], &junk[..pl], 0);
                let _ = r.decode();
                let r = raw(opcode, &junk[..arg0], &junk[..pl], 3);
                let _ = r.decode();
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Replies.

fn reply_pair(capacity: usize) -> (RingReply, std::sync::mpsc::Receiver<Commit>) {
    let (link, rx) = QueueLink::for_test();
    let reply = RingReply::new(Pending {
        link,
        entry: 3,
        buf: Vec::new(),
        capacity,
    });
    (reply, rx)
}

fn sent(rx: &std::sync::mpsc::Receiver<Commit>) -> (i32, Vec<u8>) {
    let c = rx.try_recv().expect("a commit");
    assert_eq!(c.entry, 3);
    assert!(rx.try_recv().is_err(), "exactly one commit");
    (c.error, c.payload)
}

fn sample_attr() -> Attr {
    Attr {
        ino: 2,
        size: 12,
        blocks: 1,
        atime: 10,
        atime_nsec: 11,
        mtime: 20,
        mtime_nsec: 21,
        ctime: 30,
        ctime_nsec: 31,
        mode: libc::S_IFREG | 0o644,
        nlink: 1,
        uid: 5,
        gid: 6,
        rdev: 0,
        blksize: 4096,
    }
}

fn sample_entry() -> EntryOut {
    EntryOut {
        nodeid: 2,
        generation: 9,
        entry_valid: Duration::new(1, 500),
        attr_valid: Duration::new(2, 600),
        attr: sample_attr(),
    }
}

#[test]
fn encodes_entry_attr_open_and_errors() {
    let (r, rx) = reply_pair(4096);
    r.entry(&sample_entry());
    let (err, p) = sent(&rx);
    assert_eq!((err, p.len()), (0, abi::ENTRY_OUT_SIZE));
    let b = Bytes(&p);
    assert_eq!(b.u64(0), Some(2));
    assert_eq!(b.u64(8), Some(9));
    assert_eq!((b.u64(16), b.u64(24)), (Some(1), Some(2)));
    assert_eq!((b.u32(32), b.u32(36)), (Some(500), Some(600)));
    // fuse_attr: ino at 40, size at 48, mode at 40 + 60, blksize at 40 + 80.
    assert_eq!((b.u64(40), b.u64(48)), (Some(2), Some(12)));
    assert_eq!(b.u32(100), Some(libc::S_IFREG | 0o644));
    assert_eq!(b.u32(120), Some(4096));

    let (r, rx) = reply_pair(4096);
    r.attr(Duration::new(3, 4), &sample_attr());
    let (err, p) = sent(&rx);
    assert_eq!((err, p.len()), (0, abi::ATTR_OUT_SIZE));
    assert_eq!((Bytes(&p).u64(0), Bytes(&p).u32(8)), (Some(3), Some(4)));

    let (r, rx) = reply_pair(4096);
    r.open(7, 0, Some(42));
    let (_, p) = sent(&rx);
    assert_eq!(p.len(), abi::OPEN_OUT_SIZE);
    assert_eq!(Bytes(&p).u32(8), Some(abi::FOPEN_PASSTHROUGH));
    assert_eq!(Bytes(&p).u32(12), Some(42));

    let (r, rx) = reply_pair(4096);
    r.create(&sample_entry(), 7, 0, None);
    let (_, p) = sent(&rx);
    assert_eq!(p.len(), abi::ENTRY_OUT_SIZE + abi::OPEN_OUT_SIZE);
    assert_eq!(Bytes(&p).u64(abi::ENTRY_OUT_SIZE), Some(7));

    let (r, rx) = reply_pair(4096);
    r.statfs(&Statfs::default());
    assert_eq!(sent(&rx).1.len(), abi::STATFS_OUT_SIZE);

    let (r, rx) = reply_pair(4096);
    r.error(libc::ENOENT);
    assert_eq!(sent(&rx), (-libc::ENOENT, vec![]));
    // Errors the kernel would refuse become EIO.
    for bad in [0, -3, 512, 100000] {
        let (r, rx) = reply_pair(4096);
        r.error(bad);
        assert_eq!(sent(&rx).0, -libc::EIO);
    }
    // Unanswered: EIO.
    let (r, rx) = reply_pair(4096);
    drop(r);
    assert_eq!(sent(&rx), (-libc::EIO, vec![]));
    // Longer than the payload buffer: EIO, nothing sent.
    let (r, rx) = reply_pair(16);
    r.data(&[1; 17]);
    assert_eq!(sent(&rx), (-libc::EIO, vec![]));
    let (r, rx) = reply_pair(16);
    r.data(&[1; 16]);
    assert_eq!(sent(&rx), (0, vec![1; 16]));
}

#[test]
fn dir_builders_respect_the_size() {
    let (r, rx) = reply_pair(4096);
    let mut d = r.dir(64);
    // 24 + 1 -> 32 bytes; 24 + 9 -> 40 bytes.
    assert!(!d.add(1, 1, libc::DT_DIR as u32, OsStr::new(".")));
    assert!(d.add(2, 2, libc::DT_REG as u32, OsStr::new("ninechars")));
    assert!(!d.add(2, 2, libc::DT_REG as u32, OsStr::new("short")));
    d.send();
    let (err, p) = sent(&rx);
    assert_eq!((err, p.len()), (0, 64));
    let b = Bytes(&p);
    assert_eq!(
        (b.u64(32), b.u64(40), b.u32(48)),
        (Some(2), Some(2), Some(5))
    );
    assert_eq!(b.u32(52), Some(libc::DT_REG as u32));
    assert_eq!(&p[56..61], b"short");

    let (r, rx) = reply_pair(4096);
    let mut d = r.dirplus(4096);
    assert!(!d.add_plus(&sample_entry(), 1, libc::DT_REG as u32, OsStr::new("f")));
    d.send();
    let (_, p) = sent(&rx);
    assert_eq!(p.len(), abi::dirent_align(abi::ENTRY_OUT_SIZE + 24 + 1));
    assert_eq!(Bytes(&p).u64(abi::ENTRY_OUT_SIZE), Some(2)); // dirent ino = attr.ino

    // A builder dropped unsent answers EIO.
    let (r, rx) = reply_pair(4096);
    let mut d = r.dir(4096);
    d.add(1, 1, 4, OsStr::new("x"));
    drop(d);
    assert_eq!(sent(&rx), (-libc::EIO, vec![]));
}

#[test]
fn sqe_matches_the_crates_uring_cmd() {
    let mut cmd = [0u8; 80];
    cmd[8..16].copy_from_slice(&99u64.to_ne_bytes());
    cmd[16..18].copy_from_slice(&1u16.to_ne_bytes());
    let theirs = io_uring::opcode::UringCmd80::new(io_uring::types::Fd(5), 2)
        .cmd(cmd)
        .addr(Some(0x1000))
        .build()
        .user_data(7);
    let ours = abi::uring_cmd_sqe(5, 2, 1, 99, Some(0x1000), 7);
    // SAFETY: both are 128 fully initialised bytes (built from zeroed entries).
    let (a, b): ([u8; 128], [u8; 128]) = unsafe {
        (
            std::mem::transmute::<io_uring::squeue::Entry128, [u8; 128]>(theirs),
            std::mem::transmute::<io_uring::squeue::Entry128, [u8; 128]>(ours),
        )
    };
    // Identical but for `len`, which only ours sets.
    assert_eq!(&a[..24], &b[..24]);
    assert_eq!(&b[24..28], &2u32.to_ne_bytes());
    assert_eq!(&a[28..], &b[28..]);
}

#[test]
fn cpu_lists_and_payload_rule() {
    assert_eq!(count_cpus("0-1\n"), Some(2));
    assert_eq!(count_cpus("0-3,8,10-11"), Some(7));
    assert_eq!(count_cpus("0"), Some(1));
    assert_eq!(count_cpus("x"), None);
    assert_eq!(count_cpus("3-1"), None);
    let page = page_size();
    assert_eq!(payload_size(4096, 1), 8192.max(page));
    assert_eq!(payload_size(1 << 20, 32), (1 << 20).max(32 * page));
    assert_eq!(payload_size(128 << 10, 256), (128 << 10).max(256 * page));
}

// ---------------------------------------------------------------------------------------
// A real mount served through the ring.

/// Kernel ring tests share the module parameter: one at a time.
static KERNEL: Mutex<()> = Mutex::new(());

/// Turns `enable_uring` on and restores what it was, even when the test fails.
struct UringSwitch {
    prev: String,
}

impl UringSwitch {
    fn on() -> io::Result<UringSwitch> {
        let prev = std::fs::read_to_string(ENABLE_URING)?;
        std::fs::write(ENABLE_URING, "Y")?;
        Ok(UringSwitch {
            prev: prev.trim().to_string(),
        })
    }
}

impl Drop for UringSwitch {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(ENABLE_URING, &self.prev) {
            eprintln!("cannot restore {ENABLE_URING} to {}: {e}", self.prev);
        }
    }
}

/// What the fuser side (the /dev/fuse loop) saw.
#[derive(Default)]
struct DevSide {
    init: AtomicU64,
    forget: AtomicU64,
    other: AtomicU64,
    uring_granted: AtomicBool,
    /// (max_write, max_readahead) answered in INIT.
    limits: Mutex<(u32, u32)>,
}

struct DevFs {
    side: Arc<DevSide>,
    readdirplus: bool,
}

impl fuser::Filesystem for DevFs {
    fn init(&mut self, _req: &fuser::Request, config: &mut fuser::KernelConfig) -> io::Result<()> {
        self.side.init.fetch_add(1, Ordering::Relaxed);
        let granted = config
            .add_capabilities(fuser::InitFlags::FUSE_OVER_IO_URING)
            .is_ok();
        self.side.uring_granted.store(granted, Ordering::Relaxed);
        if self.readdirplus {
            let _ = config.add_capabilities(fuser::InitFlags::FUSE_DO_READDIRPLUS);
        }
        // Small requests keep the payload buffers small (payload_size below).
        let max_write = 128 << 10;
        let _ = config.set_max_write(max_write);
        let ra = match config.set_max_readahead(128 << 10) {
            Ok(_) => 128 << 10,
            Err(n) => {
                let _ = config.set_max_readahead(n);
                n
            }
        };
        if let Ok(mut l) = self.side.limits.lock() {
            *l = (max_write, ra);
        }
        Ok(())
    }
    // BATCH_FORGET reaches this too (fuser's default batch_forget calls forget).
    fn forget(&self, _req: &fuser::Request, _ino: fuser::INodeNo, _nlookup: u64) {
        self.side.forget.fetch_add(1, Ordering::Relaxed);
    }
    fn lookup(
        &self,
        _req: &fuser::Request,
        _parent: fuser::INodeNo,
        _name: &OsStr,
        reply: fuser::ReplyEntry,
    ) {
        self.side.other.fetch_add(1, Ordering::Relaxed);
        reply.error(fuser::Errno::EIO);
    }
    fn getattr(
        &self,
        _req: &fuser::Request,
        _ino: fuser::INodeNo,
        _fh: Option<fuser::FileHandle>,
        reply: fuser::ReplyAttr,
    ) {
        self.side.other.fetch_add(1, Ordering::Relaxed);
        reply.error(fuser::Errno::EIO);
    }
    fn open(
        &self,
        _req: &fuser::Request,
        _ino: fuser::INodeNo,
        _flags: fuser::OpenFlags,
        reply: fuser::ReplyOpen,
    ) {
        self.side.other.fetch_add(1, Ordering::Relaxed);
        reply.error(fuser::Errno::EIO);
    }
    fn opendir(
        &self,
        _req: &fuser::Request,
        _ino: fuser::INodeNo,
        _flags: fuser::OpenFlags,
        reply: fuser::ReplyOpen,
    ) {
        self.side.other.fetch_add(1, Ordering::Relaxed);
        reply.error(fuser::Errno::EIO);
    }
    fn statfs(&self, _req: &fuser::Request, _ino: fuser::INodeNo, reply: fuser::ReplyStatfs) {
        self.side.other.fetch_add(1, Ordering::Relaxed);
        reply.error(fuser::Errno::EIO);
    }
}

const ROOT: u64 = 1;
const HELLO: u64 = 2;
const BIG: u64 = 3;
const LINK: u64 = 4;
/// "flip" answers every LOOKUP with the other of these, so the kernel's revalidation
/// finds a different inode and sends a FORGET for it (on /dev/fuse).
const FLIP: [u64; 2] = [5, 6];
const HELLO_TEXT: &[u8] = b"hello, ring\n";

fn big_content() -> Vec<u8> {
    (0..300_000u32).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// A read-only tree served by the ring: `/hello`, `/big` (300 kB), `/link` -> hello,
/// `/flip`.
struct TreeHandler {
    big: Arc<Vec<u8>>,
    flips: AtomicU64,
    seen: Mutex<BTreeMap<u32, u64>>,
}

impl TreeHandler {
    fn attr(&self, ino: u64) -> Option<Attr> {
        let (mode, size, nlink) = match ino {
            ROOT => (libc::S_IFDIR | 0o755, 0, 2),
            HELLO => (libc::S_IFREG | 0o644, HELLO_TEXT.len() as u64, 1),
            BIG => (libc::S_IFREG | 0o644, self.big.len() as u64, 1),
            LINK => (libc::S_IFLNK | 0o777, 5, 1),
            i if FLIP.contains(&i) => (libc::S_IFREG | 0o600, 0, 1),
            _ => return None,
        };
        Some(Attr {
            ino,
            size,
            blocks: size.div_ceil(512),
            mode,
            nlink,
            blksize: 4096,
            atime: 1_700_000_000,
            mtime: 1_700_000_000,
            ctime: 1_700_000_000,
            ..Attr::default()
        })
    }

    fn entry(&self, ino: u64, valid: Duration) -> Option<EntryOut> {
        Some(EntryOut {
            nodeid: ino,
            generation: 1,
            entry_valid: valid,
            attr_valid: valid,
            attr: self.attr(ino)?,
        })
    }

    fn children() -> [(&'static str, u64); 4] {
        [
            ("hello", HELLO),
            ("big", BIG),
            ("link", LINK),
            ("flip", FLIP[0]),
        ]
    }
}

impl RingHandler for TreeHandler {
    fn handle(&self, req: &RingRequest<'_>, reply: RingReply) {
        if let Ok(mut s) = self.seen.lock() {
            *s.entry(req.opcode).or_default() += 1;
        }
        let ino = req.nodeid;
        match &req.op {
            Op::Lookup { name } if ino == ROOT => {
                let found = match name.as_bytes() {
                    b"flip" => {
                        let n = self.flips.fetch_add(1, Ordering::Relaxed);
                        self.entry(FLIP[(n % 2) as usize], Duration::ZERO)
                    }
                    b"hello" => self.entry(HELLO, Duration::from_secs(60)),
                    b"big" => self.entry(BIG, Duration::from_secs(60)),
                    b"link" => self.entry(LINK, Duration::from_secs(60)),
                    _ => None,
                };
                match found {
                    Some(e) => reply.entry(&e),
                    None => reply.error(libc::ENOENT),
                }
            }
            Op::Lookup { .. } => reply.error(libc::ENOTDIR),
            Op::Getattr { .. } => match self.attr(ino) {
                Some(a) => {
                    let valid = if FLIP.contains(&ino) {
                        Duration::ZERO
                    } else {
                        Duration::from_secs(60)
                    };
                    reply.attr(valid, &a)
                }
                None => reply.error(libc::ENOENT),
            },
            Op::Opendir { .. } if ino == ROOT => reply.open(0, 0, None),
            Op::Opendir { .. } => reply.error(libc::ENOTDIR),
            Op::Readdir { offset, size, .. } => {
                let mut d = reply.dir(*size);
                let mut list = vec![(".", ROOT), ("..", ROOT)];
                list.extend(Self::children());
                for (i, (name, child)) in list.iter().enumerate().skip(*offset as usize) {
                    let typ = dirent_type(self.attr(*child).map_or(0, |a| a.mode));
                    if d.add(*child, i as u64 + 1, typ, OsStr::new(name)) {
                        break;
                    }
                }
                d.send();
            }
            Op::Readdirplus { offset, size, .. } => {
                let mut d = reply.dirplus(*size);
                let mut list = vec![(".", ROOT), ("..", ROOT)];
                list.extend(Self::children());
                for (i, (name, child)) in list.iter().enumerate().skip(*offset as usize) {
                    let Some(mut e) = self.entry(*child, Duration::from_secs(60)) else {
                        continue;
                    };
                    if name.starts_with('.') || *child == FLIP[0] {
                        // No lookup counted for these: the kernel ignores nodeid 0.
                        e.nodeid = 0;
                    }
                    if d.add_plus(&e, i as u64 + 1, dirent_type(e.attr.mode), OsStr::new(name)) {
                        break;
                    }
                }
                d.send();
            }
            Op::Releasedir { .. } | Op::Release { .. } | Op::Flush { .. } | Op::Destroy => {
                reply.empty()
            }
            Op::Open { flags, .. } => {
                if *flags & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32 {
                    reply.error(libc::EROFS)
                } else if matches!(ino, HELLO | BIG) {
                    reply.open(ino, 0, None)
                } else {
                    reply.error(libc::EISDIR)
                }
            }
            Op::Read { offset, size, .. } => {
                let content: Arc<Vec<u8>> = match ino {
                    HELLO => Arc::new(HELLO_TEXT.to_vec()),
                    _ => self.big.clone(),
                };
                let offset = *offset as usize;
                let size = *size as usize;
                // The big file is answered from another thread: the eventfd path.
                let answer = move || {
                    let start = offset.min(content.len());
                    let end = start.saturating_add(size).min(content.len());
                    reply.data(&content[start..end]);
                };
                if ino == BIG {
                    std::thread::spawn(answer);
                } else {
                    answer();
                }
            }
            Op::Readlink if ino == LINK => reply.data(b"hello"),
            Op::Statfs => reply.statfs(&Statfs {
                blocks: 100,
                bfree: 50,
                bavail: 50,
                files: 10,
                ffree: 5,
                bsize: 4096,
                namelen: 255,
                frsize: 4096,
            }),
            Op::Access { .. } => reply.empty(),
            Op::Getxattr { .. } => reply.error(libc::ENODATA),
            Op::Listxattr { size: 0 } => reply.xattr_size(0),
            Op::Listxattr { .. } => reply.data(&[]),
            _ => reply.error(libc::ENOSYS),
        }
    }
}

/// Unmounts even when the test fails: aborts the connection first so nothing waits on it.
struct MountGuard {
    path: PathBuf,
    conn: Option<u64>,
    session: Option<fuser::BackgroundSession>,
}

impl MountGuard {
    fn abort(&self) {
        if let Some(c) = self.conn {
            let _ = std::fs::write(format!("/sys/fs/fuse/connections/{c}/abort"), "1");
        }
    }

    fn unmount(&mut self) -> io::Result<()> {
        match self.session.take() {
            Some(s) => s.umount_and_join(),
            None => Ok(()),
        }
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            self.abort();
            let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
            drop(s);
        }
    }
}

/// The fuse connection number of the mount at `path`, from mountinfo (asking the
/// filesystem itself could wait on the ring).
fn connection_of(path: &Path) -> Option<u64> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path.to_str()?;
    info.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.get(4) == Some(&want)).then(|| f.get(2)?.split_once(':')?.1.parse().ok())?
    })
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Runs `f` on a thread; past `limit` the connection is aborted (so `f` fails instead of
/// hanging on a ring that never answers) and the test fails.
fn within<T: Send + 'static>(
    guard: &MountGuard,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => v,
        Err(_) => {
            guard.abort();
            panic!("filesystem calls did not finish within {limit:?}");
        }
    }
}

/// A DevFs mount whose INIT offered the ring, with a dup of its /dev/fuse fd.
struct Mounted {
    _dir: tempfile::TempDir,
    mnt: PathBuf,
    guard: MountGuard,
    side: Arc<DevSide>,
    dev: Option<std::os::fd::OwnedFd>,
}

impl Mounted {
    /// The ring shape the INIT reply calls for.
    fn config(&self) -> RingConfig {
        let (max_write, ra) = self.side.limits.lock().map_or((0, 0), |l| *l);
        let page = page_size() as u32;
        let max_pages = (max_write.max(ra).max(1) - 1) / page + 1;
        RingConfig {
            queues: possible_queues().expect("possible cpus"),
            depth: 4,
            payload_size: payload_size(max_write, max_pages as u16),
        }
    }
}

/// Why the kernel tests cannot run here, if they cannot.
fn kernel_test_skip() -> Option<String> {
    if !is_root() {
        return Some("not root".into());
    }
    if !Path::new(ENABLE_URING).exists() {
        return Some(format!("no {ENABLE_URING} (kernel < 6.14?)"));
    }
    None
}

/// Mounts a DevFs (INIT answered inside Session::new) and starts its /dev/fuse loop; None,
/// with a note, when the kernel did not offer FUSE_OVER_IO_URING.
fn mount_devfs(readdirplus: bool) -> Option<Mounted> {
    let dir = tempfile::tempdir().expect("tempdir");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    let side = Arc::new(DevSide::default());
    let fs = DevFs {
        side: side.clone(),
        readdirplus,
    };
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName("cachefs-ring-test".into()),
        fuser::MountOption::RO,
    ];
    let session = fuser::Session::new(fs, &mnt, &config).expect("mount");
    let dev = session.as_fd().try_clone_to_owned().expect("dup /dev/fuse");
    let mut guard = MountGuard {
        path: mnt.clone(),
        conn: connection_of(&mnt),
        session: None,
    };
    guard.session = Some(session.spawn().expect("spawn"));
    assert_eq!(side.init.load(Ordering::Relaxed), 1);
    if !side.uring_granted.load(Ordering::Relaxed) {
        eprintln!(
            "note: skipping the io-uring mount test: the kernel did not offer FUSE_OVER_IO_URING"
        );
        return None;
    }
    Some(Mounted {
        _dir: dir,
        mnt,
        guard,
        side,
        dev: Some(dev),
    })
}

fn serve_over_ring(readdirplus: bool) {
    let _one = KERNEL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(why) = kernel_test_skip() {
        eprintln!("note: skipping the io-uring mount test: {why}");
        return;
    }
    let _switch = UringSwitch::on().expect("enable_uring");
    assert!(uring_enabled());
    let Some(mut mounted) = mount_devfs(readdirplus) else {
        return;
    };
    let cfg = mounted.config();
    let (mnt, side) = (mounted.mnt.clone(), mounted.side.clone());
    let leaked = queue::LEAKED_QUEUES.load(Ordering::Relaxed);
    let big = Arc::new(big_content());
    let handler = Arc::new(TreeHandler {
        big: big.clone(),
        flips: AtomicU64::new(0),
        seen: Mutex::new(BTreeMap::new()),
    });
    let dev = mounted.dev.take().expect("dev");
    let ring = start(dev, cfg, handler.clone()).expect("ring starts");

    let m = mnt.clone();
    let expected_big = big.clone();
    within(&mounted.guard, Duration::from_secs(30), move || {
        let md = std::fs::metadata(m.join("hello")).expect("stat hello");
        assert!(md.is_file());
        assert_eq!(md.len(), HELLO_TEXT.len() as u64);
        assert_eq!(
            std::fs::read(m.join("hello")).expect("read hello"),
            HELLO_TEXT
        );
        let mut names: Vec<OsString> = std::fs::read_dir(&m)
            .expect("readdir")
            .map(|e| e.expect("dirent").file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["big", "flip", "hello", "link"]);
        let data = std::fs::read(m.join("big")).expect("read big");
        assert_eq!(data.len(), expected_big.len());
        assert!(data == *expected_big, "big file bytes differ");
        assert_eq!(
            std::fs::read_link(m.join("link")).expect("readlink"),
            Path::new("hello")
        );
        let err = std::fs::metadata(m.join("missing")).expect_err("missing");
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
        let err = std::fs::File::create(m.join("hello")).expect_err("read-only");
        assert!(matches!(
            err.raw_os_error(),
            Some(libc::EROFS) | Some(libc::EACCES)
        ));
        // Revalidating "flip" finds another inode: the kernel forgets the one it found.
        for _ in 0..3 {
            let _ = std::fs::metadata(m.join("flip")).expect("stat flip");
        }
        // Readers on both CPUs at once: several entries per queue in flight, replies from
        // other threads.
        let readers: Vec<_> = (0..6)
            .map(|_| {
                let (m, expected) = (m.clone(), expected_big.clone());
                std::thread::spawn(move || {
                    for _ in 0..5 {
                        let data = std::fs::read(m.join("big")).expect("read big");
                        assert!(data == *expected, "big file bytes differ");
                    }
                })
            })
            .collect();
        for r in readers {
            r.join().expect("reader");
        }
        let st = nix::sys::statvfs::statvfs(&m).expect("statfs");
        assert_eq!(st.blocks(), 100);
    });

    // FORGETs go to /dev/fuse even with the ring up.
    let t0 = Instant::now();
    while side.forget.load(Ordering::Relaxed) == 0 && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let seen = handler.seen.lock().map(|s| s.clone()).unwrap_or_default();
    eprintln!(
        "ring saw {seen:?}; /dev/fuse saw init {}, forget {}, other {}",
        side.init.load(Ordering::Relaxed),
        side.forget.load(Ordering::Relaxed),
        side.other.load(Ordering::Relaxed)
    );
    for op in [
        abi::FUSE_LOOKUP,
        abi::FUSE_GETATTR,
        abi::FUSE_OPEN,
        abi::FUSE_READ,
    ] {
        assert!(
            seen.get(&op).copied().unwrap_or(0) > 0,
            "opcode {op} not on the ring"
        );
    }
    let listing = if readdirplus {
        abi::FUSE_READDIRPLUS
    } else {
        abi::FUSE_READDIR
    };
    assert!(
        seen.get(&listing).copied().unwrap_or(0) > 0,
        "no directory listing on the ring"
    );
    assert!(seen.contains_key(&abi::FUSE_READLINK));
    assert!(seen.contains_key(&abi::FUSE_STATFS));
    assert!(!seen.contains_key(&abi::FUSE_FORGET) && !seen.contains_key(&abi::FUSE_BATCH_FORGET));
    assert_eq!(
        side.other.load(Ordering::Relaxed),
        0,
        "a request went to /dev/fuse"
    );
    assert!(
        side.forget.load(Ordering::Relaxed) > 0,
        "no FORGET reached /dev/fuse"
    );

    // Unmounting ends the connection: the queues see it and end by themselves.
    mounted.guard.unmount().expect("unmount");
    let t0 = Instant::now();
    while !ring.is_finished() && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        ring.is_finished(),
        "ring queues still running after unmount"
    );
    ring.join();
    // Every entry came back from the kernel (ENOTCONN), so every buffer was freed.
    assert_eq!(queue::LEAKED_QUEUES.load(Ordering::Relaxed), leaked);
}

/// A ring the kernel refuses, or one `start` gives up before registering, leaves the
/// connection on /dev/fuse instead of holding its requests forever.
#[test]
fn a_failed_start_falls_back_to_dev_fuse() {
    let _one = KERNEL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(why) = kernel_test_skip() {
        eprintln!("note: skipping the io-uring fallback test: {why}");
        return;
    }
    let _switch = UringSwitch::on().expect("enable_uring");
    let handler = Arc::new(TreeHandler {
        big: Arc::new(Vec::new()),
        flips: AtomicU64::new(0),
        seen: Mutex::new(BTreeMap::new()),
    });
    let bad_configs = [
        // Payload buffers smaller than max_write: every REGISTER is refused.
        |c: RingConfig| RingConfig {
            payload_size: abi::FUSE_MIN_READ_BUFFER,
            ..c
        },
        // One queue too many: refused by `start` itself, which then abandons the ring.
        |c: RingConfig| RingConfig {
            queues: c.queues + 1,
            ..c
        },
    ];
    for bad in bad_configs {
        let Some(mut mounted) = mount_devfs(false) else {
            return;
        };
        let cfg = bad(mounted.config());
        let dev = mounted.dev.take().expect("dev");
        let err = start(dev, cfg, handler.clone()).expect_err("a bad ring fails");
        eprintln!("start({cfg:?}) failed as expected: {err}");
        let p = mounted.mnt.join("hello");
        // DevFs answers EIO to everything but INIT and FORGET: that it answers at all shows
        // the request went to /dev/fuse.
        let res = within(&mounted.guard, Duration::from_secs(20), move || {
            std::fs::metadata(p)
                .map(|_| ())
                .map_err(|e| e.raw_os_error())
        });
        assert_eq!(res, Err(Some(libc::EIO)));
        assert!(mounted.side.other.load(Ordering::Relaxed) > 0);
        mounted.guard.unmount().expect("unmount");
    }
    assert!(handler.seen.lock().map_or(true, |s| s.is_empty()));
}

#[test]
fn kernel_serves_a_mount_over_the_ring() {
    serve_over_ring(false);
}

#[test]
fn kernel_serves_readdirplus_over_the_ring() {
    serve_over_ring(true);
}
