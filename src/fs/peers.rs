//! Coherence between the mounts of one shared instance, so they may let the kernel keep names
//! and attributes for long (`LONG_TTL`) instead of asking again every second.
//!
//! Each member (a FUSE mount of the instance, or a cachefs process holding a bind mount of it)
//! listens on a SOCK_SEQPACKET socket in the instance's rendezvous directory (in the store,
//! which only its owner can enter) and keeps one connection to every other member. A change a
//! FUSE mount makes (a name added, removed or moved, attributes or contents changed) is queued
//! without blocking the request, and a sender thread passes it to every member; each member's
//! receiver thread turns it into notify_inval_entry / notify_inval_inode on its own mount. So a
//! change is seen by the other mounts microseconds after the call that made it returned.
//!
//! Joining: a new member binds its socket under a temporary name, listens, renames it into
//! place (so a socket found in the directory always has a listener, and one that refuses a
//! connection belongs to a dead process and is removed), connects to every member and says
//! hello. Each answers by connecting back with a welcome; the newcomer mounts once every member
//! has welcomed it (or after `JOIN_WAIT`), so no change made after its mount can miss it.
//!
//! A bind mount changes the tree without telling anyone. While a bind member is present, FUSE
//! members answer with short timeouts again, and when one arrives or leaves they invalidate
//! everything they know (`Change::Reset`). A member whose queue overflows (a peer stopped
//! reading) drops it and sends a reset instead.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLock};
use rustix::event::{PollFd, PollFlags};
use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::net::{
    AddressFamily, RecvFlags, SendFlags, SocketAddrUnix, SocketFlags, SocketType, sockopt,
};
use tracing::debug;

/// How long a new member waits for the others to welcome it before mounting anyway.
const JOIN_WAIT: Duration = Duration::from_secs(2);
/// Changes queued for the sender at most; past it they are dropped for one reset.
const OUTBOX_CAP: usize = 1 << 16;
/// Longest message: a kind, a node id and a name of at most 255 bytes.
const MAX_MESSAGE: usize = 1 + 8 + 256;

/// What a member is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// A FUSE mount: it tells the others what it changes.
    Fuse,
    /// A bind mount: its users change the tree directly, unseen.
    Bind,
}

/// A change one mount made, to invalidate in the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    /// The name `name` in directory `parent` (node ids) was removed, replaced or moved away.
    Entry { parent: u64, name: Vec<u8> },
    /// The attributes of `node` changed; with `data`, its contents too.
    Inode { node: u64, data: bool },
    /// Anything may have changed.
    Reset,
}

/// How a member applies the changes it is told about (set once its mount is up).
pub(crate) type Apply = Box<dyn Fn(&Change) + Send + Sync>;

enum Message {
    Hello { role: Role, name: Vec<u8> },
    Welcome { role: Role },
    Change(Change),
}

const HELLO: u8 = 1;
const WELCOME: u8 = 2;
const ENTRY: u8 = 3;
const INODE: u8 = 4;
const RESET: u8 = 5;

fn role_byte(role: Role) -> u8 {
    match role {
        Role::Fuse => 0,
        Role::Bind => 1,
    }
}

fn role_of(b: u8) -> Option<Role> {
    match b {
        0 => Some(Role::Fuse),
        1 => Some(Role::Bind),
        _ => None,
    }
}

impl Message {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16);
        match self {
            Message::Hello { role, name } => {
                out.extend([HELLO, role_byte(*role)]);
                out.extend_from_slice(name);
            }
            Message::Welcome { role } => out.extend([WELCOME, role_byte(*role)]),
            Message::Change(Change::Entry { parent, name }) => {
                out.push(ENTRY);
                out.extend(parent.to_le_bytes());
                out.extend_from_slice(name);
            }
            Message::Change(Change::Inode { node, data }) => {
                out.extend([INODE, u8::from(*data)]);
                out.extend(node.to_le_bytes());
            }
            Message::Change(Change::Reset) => out.push(RESET),
        }
        out
    }

    /// `None` for anything malformed (members are this store's own cachefs processes, but a
    /// message is still checked before use).
    fn decode(b: &[u8]) -> Option<Message> {
        let (&kind, rest) = b.split_first()?;
        let u64_at = |s: &[u8]| s.get(..8)?.try_into().ok().map(u64::from_le_bytes);
        Some(match kind {
            HELLO => Message::Hello {
                role: role_of(*rest.first()?)?,
                name: rest.get(1..)?.to_vec(),
            },
            WELCOME => Message::Welcome {
                role: role_of(*rest.first()?)?,
            },
            ENTRY => {
                let name = rest.get(8..)?;
                if name.is_empty() || name.len() > 255 || name.contains(&b'/') || name.contains(&0)
                {
                    return None;
                }
                Message::Change(Change::Entry {
                    parent: u64_at(rest)?,
                    name: name.to_vec(),
                })
            }
            INODE => Message::Change(Change::Inode {
                data: *rest.first()? != 0,
                node: u64_at(rest.get(1..)?)?,
            }),
            RESET => Message::Change(Change::Reset),
            _ => return None,
        })
    }
}

enum Command {
    Send(Change),
    /// Connect to a member that said hello (if not yet connected) and welcome it.
    Welcome(Vec<u8>),
}

#[derive(Default)]
struct Outbox {
    queue: VecDeque<Command>,
    /// Changes were dropped: send a reset before anything else.
    overflowed: bool,
}

struct Inner {
    /// The rendezvous directory (O_PATH).
    dir: OwnedFd,
    name: Vec<u8>,
    role: Role,
    listener: OwnedFd,
    /// Written when the group ends, to wake the receiver.
    wakeup: OwnedFd,
    outbox: Mutex<Outbox>,
    wake: Condvar,
    /// Members this one sends to (or is about to: counted when their hello arrives, before
    /// the sender connects, so no change queued after it is lost).
    members: AtomicUsize,
    /// Bind members connected to this one.
    bind_members: AtomicUsize,
    /// Welcomes received (the join waits for them).
    welcomed: Mutex<usize>,
    welcome_cv: Condvar,
    apply: RwLock<Option<Apply>>,
    stop: AtomicBool,
}

/// This process's membership in an instance's group (one per mount). Dropping it leaves.
pub(crate) struct Peers {
    inner: Arc<Inner>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers")
            .field("name", &String::from_utf8_lossy(&self.inner.name))
            .field("role", &self.inner.role)
            .finish_non_exhaustive()
    }
}

/// `/proc/self/fd/N/NAME`: a socket path of bounded length however deep the store is, resolved
/// through the directory's fd (and so never through a renamed path).
fn socket_addr(dir: &OwnedFd, name: &[u8]) -> io::Result<SocketAddrUnix> {
    let mut path = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    path.extend_from_slice(name);
    SocketAddrUnix::new(OsStr::from_bytes(&path)).map_err(io::Error::from)
}

fn seqpacket() -> io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

impl Peers {
    /// Joins the group of the instance whose rendezvous directory is `dir` (created, mode
    /// 0700, if missing): returns once every member has welcomed this one, or after
    /// `JOIN_WAIT`.
    pub(crate) fn join(dir: &Path, role: Role) -> io::Result<Peers> {
        match std::fs::DirBuilder::new().mode(0o700).create(dir) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        let dir = rustix::fs::open(
            dir,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let name = format!("m-{}-{nonce:x}", std::process::id()).into_bytes();
        let mut temp = b".".to_vec();
        temp.extend_from_slice(&name);
        let listener = seqpacket()?;
        rustix::net::bind(&listener, &socket_addr(&dir, &temp)?)?;
        rustix::net::listen(&listener, 64)?;
        // Readable directory fd for renameat and the listing (O_PATH cannot be read).
        let dir_rd = rustix::fs::openat(
            &dir,
            c".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        rustix::fs::renameat(
            &dir_rd,
            OsStr::from_bytes(&temp),
            &dir_rd,
            OsStr::from_bytes(&name),
        )?;

        let inner = Arc::new(Inner {
            dir,
            name,
            role,
            listener,
            wakeup: rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC)?,
            outbox: Mutex::new(Outbox::default()),
            wake: Condvar::new(),
            members: AtomicUsize::new(0),
            bind_members: AtomicUsize::new(0),
            welcomed: Mutex::new(0),
            welcome_cv: Condvar::new(),
            apply: RwLock::new(None),
            stop: AtomicBool::new(false),
        });
        // Connect to everyone already here, before the threads start, so the sender owns
        // these connections from the start.
        let mut out: Vec<(Vec<u8>, OwnedFd)> = Vec::new();
        for entry in rustix::fs::Dir::read_from(&dir_rd)? {
            let entry = entry?;
            let other = entry.file_name().to_bytes().to_vec();
            if other.starts_with(b".") || other == inner.name {
                continue;
            }
            match connect_to(&inner.dir, &other) {
                Ok(fd) => {
                    let hello = Message::Hello {
                        role,
                        name: inner.name.clone(),
                    };
                    if send_message(&fd, &hello).is_ok() {
                        out.push((other, fd));
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                    // Nobody listens: its process died. Remove the leftover (ENOENT: another
                    // member did).
                    let _ =
                        rustix::fs::unlinkat(&dir_rd, OsStr::from_bytes(&other), AtFlags::empty());
                }
                Err(e) => debug!("peer {}: {e}", String::from_utf8_lossy(&other)),
            }
        }
        let expected = out.len();
        inner.members.store(out.len(), Ordering::Relaxed);

        let mut threads = Vec::new();
        let rx = inner.clone();
        threads.push(
            std::thread::Builder::new()
                .name("cachefs-peers-rx".into())
                .spawn(move || receive_loop(&rx))?,
        );
        let tx = inner.clone();
        threads.push(
            std::thread::Builder::new()
                .name("cachefs-peers-tx".into())
                .spawn(move || send_loop(&tx, out))?,
        );
        let peers = Peers { inner, threads };
        if role == Role::Fuse && expected > 0 {
            // A bind member never needs to wait: it caches nothing.
            let deadline = Instant::now() + JOIN_WAIT;
            let mut welcomed = peers.inner.welcomed.lock();
            while *welcomed < expected {
                if peers
                    .inner
                    .welcome_cv
                    .wait_until(&mut welcomed, deadline)
                    .timed_out()
                {
                    debug!(
                        "{} of {expected} members of the instance welcomed this mount in time",
                        *welcomed
                    );
                    break;
                }
            }
        }
        Ok(peers)
    }

    /// How this member applies the changes others tell it about; until set, they are dropped
    /// (nothing is cached before the mount exists).
    pub(crate) fn set_apply(&self, apply: Apply) {
        *self.inner.apply.write() = Some(apply);
    }

    /// Whether anyone may be told: a mount alone on its instance skips the work of a change.
    pub(crate) fn has_members(&self) -> bool {
        self.inner.members.load(Ordering::Relaxed) > 0
    }

    /// Tells every other member about a change (queued: never blocks).
    pub(crate) fn tell(&self, change: Change) {
        if !self.has_members() {
            return;
        }
        let mut outbox = self.inner.outbox.lock();
        if outbox.queue.len() >= OUTBOX_CAP {
            outbox.queue.retain(|c| matches!(c, Command::Welcome(_)));
            outbox.overflowed = true;
        } else {
            outbox.queue.push_back(Command::Send(change));
        }
        drop(outbox);
        self.inner.wake.notify_one();
    }

    /// Whether a bind mount of the instance is live: its changes are not told.
    pub(crate) fn bind_present(&self) -> bool {
        self.inner.bind_members.load(Ordering::Relaxed) > 0
    }
}

impl Drop for Peers {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Relaxed);
        self.inner.wake.notify_all();
        // The socket file goes first so nobody connects anew; then the receiver is woken.
        if let Ok(dir) = rustix::fs::openat(
            &self.inner.dir,
            c".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            let _ =
                rustix::fs::unlinkat(&dir, OsStr::from_bytes(&self.inner.name), AtFlags::empty());
        }
        let _ = rustix::io::write(&self.inner.wakeup, &1u64.to_ne_bytes());
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn connect_to(dir: &OwnedFd, name: &[u8]) -> io::Result<OwnedFd> {
    let fd = seqpacket()?;
    rustix::net::connect(&fd, &socket_addr(dir, name)?)?;
    // A member that stopped reading must not hold the sender forever: it retries while the
    // group lives (see send_loop).
    sockopt::set_socket_timeout(
        &fd,
        sockopt::Timeout::Send,
        Some(Duration::from_millis(500)),
    )?;
    Ok(fd)
}

fn send_message(fd: &OwnedFd, m: &Message) -> io::Result<()> {
    rustix::net::send(fd, &m.encode(), SendFlags::NOSIGNAL)?;
    Ok(())
}

/// Sends one message, retrying after a send timeout while the group lives. Err: the member
/// is gone.
fn send_patiently(inner: &Inner, fd: &OwnedFd, bytes: &[u8]) -> io::Result<()> {
    loop {
        match rustix::net::send(fd, bytes, SendFlags::NOSIGNAL) {
            Ok(_) => return Ok(()),
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR)
                if !inner.stop.load(Ordering::Relaxed) =>
            {
                continue;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn send_loop(inner: &Inner, mut out: Vec<(Vec<u8>, OwnedFd)>) {
    loop {
        let (command, reset) = {
            let mut outbox = inner.outbox.lock();
            loop {
                if inner.stop.load(Ordering::Relaxed) {
                    return;
                }
                if outbox.overflowed {
                    outbox.overflowed = false;
                    break (None, true);
                }
                if let Some(c) = outbox.queue.pop_front() {
                    break (Some(c), false);
                }
                inner.wake.wait(&mut outbox);
            }
        };
        let change = match command {
            None if reset => Change::Reset,
            None => continue,
            Some(Command::Welcome(name)) => {
                if !out.iter().any(|(n, _)| *n == name) {
                    match connect_to(&inner.dir, &name) {
                        Ok(fd) => out.push((name.clone(), fd)),
                        Err(e) => {
                            debug!("cannot reach peer {}: {e}", String::from_utf8_lossy(&name));
                            leave_one(inner);
                            continue;
                        }
                    }
                } else {
                    // Connected already (each found the other when joining): counted twice.
                    leave_one(inner);
                }
                let welcome = Message::Welcome { role: inner.role }.encode();
                if let Some(pos) = out.iter().position(|(n, _)| *n == name)
                    && send_patiently(inner, &out[pos].1, &welcome).is_err()
                {
                    out.swap_remove(pos);
                    leave_one(inner);
                }
                continue;
            }
            Some(Command::Send(change)) => change,
        };
        let bytes = Message::Change(change).encode();
        out.retain(|(_, fd)| {
            let kept = send_patiently(inner, fd, &bytes).is_ok();
            if !kept {
                leave_one(inner);
            }
            kept
        });
    }
}

/// One member fewer to send to (never below zero).
fn leave_one(inner: &Inner) {
    let _ = inner
        .members
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
}

fn apply(inner: &Inner, change: &Change) {
    if let Some(apply) = &*inner.apply.read() {
        apply(change);
    }
}

fn receive_loop(inner: &Inner) {
    // Incoming connections and the role their member announced.
    let mut conns: Vec<(OwnedFd, Option<Role>)> = Vec::new();
    let mut buf = [0u8; MAX_MESSAGE + 1];
    while !inner.stop.load(Ordering::Relaxed) {
        let mut fds = Vec::with_capacity(conns.len() + 2);
        fds.push(PollFd::new(&inner.wakeup, PollFlags::IN));
        fds.push(PollFd::new(&inner.listener, PollFlags::IN));
        for (fd, _) in &conns {
            fds.push(PollFd::new(fd, PollFlags::IN));
        }
        match rustix::event::poll(&mut fds, None) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                debug!("peer poll: {e}");
                return;
            }
        }
        let ready: Vec<bool> = fds.iter().map(|p| !p.revents().is_empty()).collect();
        drop(fds);
        if inner.stop.load(Ordering::Relaxed) {
            return;
        }
        // Accepted after the ready ones are read: `ready` indexes the connections polled.
        let accepted = if ready[1] {
            match rustix::net::accept_with(&inner.listener, SocketFlags::CLOEXEC) {
                Ok(fd) => Some(fd),
                Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => None,
                Err(_) => return,
            }
        } else {
            None
        };
        let mut gone = Vec::new();
        for (i, (fd, role)) in conns.iter_mut().enumerate() {
            if !ready[i + 2] {
                continue;
            }
            let n = match rustix::net::recv(fd.as_fd(), &mut buf[..], RecvFlags::DONTWAIT) {
                Ok((n, _)) if n > 0 => n,
                Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => continue,
                _ => {
                    gone.push(i);
                    continue;
                }
            };
            match Message::decode(&buf[..n.min(buf.len())]) {
                Some(Message::Hello { role: r, name }) => {
                    *role = Some(r);
                    if r == Role::Bind {
                        inner.bind_members.fetch_add(1, Ordering::Relaxed);
                        apply(inner, &Change::Reset);
                    }
                    // Counted now, so a change queued from here on waits for the connection.
                    inner.members.fetch_add(1, Ordering::Relaxed);
                    inner.outbox.lock().queue.push_back(Command::Welcome(name));
                    inner.wake.notify_one();
                }
                Some(Message::Welcome { role: r }) => {
                    *role = Some(r);
                    if r == Role::Bind {
                        inner.bind_members.fetch_add(1, Ordering::Relaxed);
                        apply(inner, &Change::Reset);
                    }
                    *inner.welcomed.lock() += 1;
                    inner.welcome_cv.notify_all();
                }
                Some(Message::Change(c)) => apply(inner, &c),
                None => debug!("malformed message from a peer ignored"),
            }
        }
        conns.extend(accepted.map(|fd| (fd, None)));
        for i in gone.into_iter().rev() {
            let (_, role) = conns.swap_remove(i);
            if role == Some(Role::Bind) {
                // What its users changed was never told: forget everything once more.
                inner.bind_members.fetch_sub(1, Ordering::Relaxed);
                apply(inner, &Change::Reset);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn member(dir: &Path, role: Role) -> (Peers, mpsc::Receiver<Change>) {
        let p = Peers::join(dir, role).unwrap();
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        p.set_apply(Box::new(move |c| {
            let _ = tx.lock().send(c.clone());
        }));
        (p, rx)
    }

    fn next(rx: &mpsc::Receiver<Change>) -> Change {
        rx.recv_timeout(Duration::from_secs(5)).expect("a change")
    }

    #[test]
    fn messages_round_trip() {
        for m in [
            Message::Hello {
                role: Role::Bind,
                name: b"m-1-2".to_vec(),
            },
            Message::Welcome { role: Role::Fuse },
            Message::Change(Change::Entry {
                parent: 7,
                name: b"a b".to_vec(),
            }),
            Message::Change(Change::Inode {
                node: u64::MAX,
                data: true,
            }),
            Message::Change(Change::Reset),
        ] {
            let bytes = m.encode();
            assert_eq!(Message::decode(&bytes).map(|d| d.encode()), Some(bytes));
        }
        for bad in [
            &b""[..],
            b"\x09",
            b"\x03\x01\x02",
            b"\x03\0\0\0\0\0\0\0\0a/b",
            b"\x04\x01",
        ] {
            assert!(Message::decode(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn changes_reach_every_other_member() {
        let dir = tempfile::tempdir().unwrap();
        let rendezvous = dir.path().join("peers");
        let (a, a_rx) = member(&rendezvous, Role::Fuse);
        let (b, b_rx) = member(&rendezvous, Role::Fuse);
        let (c, c_rx) = member(&rendezvous, Role::Fuse);
        let e = Change::Entry {
            parent: 1,
            name: b"x".to_vec(),
        };
        a.tell(e.clone());
        assert_eq!(next(&b_rx), e);
        assert_eq!(next(&c_rx), e);
        let i = Change::Inode {
            node: 9,
            data: false,
        };
        c.tell(i.clone());
        assert_eq!(next(&a_rx), i);
        assert_eq!(next(&b_rx), i);
        // A member that leaves is dropped; the others go on.
        drop(b);
        a.tell(e.clone());
        assert_eq!(next(&c_rx), e);
        assert!(a_rx.try_recv().is_err(), "nothing told to itself");
        // Its socket is gone with it; only the live members' remain.
        let left: Vec<_> = std::fs::read_dir(&rendezvous).unwrap().collect();
        assert_eq!(left.len(), 2);
    }

    #[test]
    fn a_bind_member_resets_and_shortens() {
        let dir = tempfile::tempdir().unwrap();
        let rendezvous = dir.path().join("peers");
        let (a, a_rx) = member(&rendezvous, Role::Fuse);
        assert!(!a.bind_present());
        let bind = Peers::join(&rendezvous, Role::Bind).unwrap();
        assert_eq!(next(&a_rx), Change::Reset, "bind arrived");
        assert!(a.bind_present());
        // A FUSE member joining later learns of it from its welcome.
        let (b, b_rx) = member(&rendezvous, Role::Fuse);
        assert!(b.bind_present());
        assert!(
            b_rx.try_recv().is_err(),
            "nothing to reset before its mount"
        );
        drop(bind);
        assert_eq!(next(&a_rx), Change::Reset, "bind left");
        assert_eq!(next(&b_rx), Change::Reset);
        assert!(!a.bind_present() && !b.bind_present());
    }

    #[test]
    fn a_dead_members_socket_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let rendezvous = dir.path().join("peers");
        std::fs::create_dir(&rendezvous).unwrap();
        // A socket nobody listens on, as a killed member leaves it.
        let stale = std::os::unix::net::UnixListener::bind(rendezvous.join("m-1-dead")).unwrap();
        drop(stale);
        let (_a, _rx) = member(&rendezvous, Role::Fuse);
        assert!(!rendezvous.join("m-1-dead").exists());
    }
}
