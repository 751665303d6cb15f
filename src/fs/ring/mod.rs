//! FUSE over io-uring: cachefs's own transport for the requests of a FUSE connection.
//!
//! Why it exists: since Linux 6.14 a FUSE server can take its requests through io-uring
//! instead of read(2)/write(2) on /dev/fuse. Each queue (one per possible CPU; the kernel
//! sends a request to the queue of the CPU its caller runs on) keeps entries in the kernel;
//! a request is copied straight into a waiting entry's buffers and the answer is committed
//! in the same system call that fetches the next request. fuser, which mounts cachefs and
//! negotiates INIT, can ask for the capability (`InitFlags::FUSE_OVER_IO_URING`) but has no
//! ring transport and keeps its protocol code private, hence this module.
//!
//! How a connection moves to the ring (fs/fuse/dev_uring.c, Linux 6.14 to 6.18):
//! - `/sys/module/fuse/parameters/enable_uring` must be Y ([`uring_enabled`]) when INIT is
//!   answered with FUSE_OVER_IO_URING; from then on the kernel holds every new request back
//!   until the ring is ready, so [`start`] must follow INIT (or the mount hangs).
//! - The ring is ready once every queue (`/sys/devices/system/cpu/possible`, see
//!   [`possible_queues`]) has at least one entry registered; from then on all requests come
//!   through it except FORGET, BATCH_FORGET and INTERRUPT, which stay on /dev/fuse (the
//!   fuser session keeps serving those), as do requests queued before the switch.
//! - A refused REGISTER turns the ring off for the connection and requests flow through
//!   /dev/fuse again; [`start`] provokes that itself when it fails.
//! - The payload buffer of every entry must hold [`payload_size`] bytes.
//! - Notifications (fuser's `Notifier`) are still written to /dev/fuse: a commit with
//!   unique 0 is refused by the ring.
//! - A request's own struct (`in_args[0]`) arrives in `op_in`, everything else (names, write
//!   data, extensions) in the payload; all out-args of the reply go to the payload, the
//!   `fuse_out_header` to `in_out` (see `request` and `reply`).
//!
//! API: [`start`] with a [`RingConfig`] and a [`RingHandler`] gives a [`Ring`]; the handler
//! gets each [`RingRequest`] (header fields and a decoded [`Op`]) with a [`RingReply`],
//! which may be answered later from any thread. The [`Ring`] must live as long as the
//! connection: its threads end by themselves when the connection ends (unmount or abort);
//! dropping it earlier stops them, and the kernel then has no entries to send requests to.

#![allow(dead_code)]

mod abi;
mod queue;
mod reply;
mod request;
pub(crate) mod serve;
#[cfg(test)]
mod tests;

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;

// Re-exported for the filesystem core, which is not wired to the ring yet.
#[allow(unused_imports)]
pub(crate) use reply::{Attr, DirReply, EntryOut, RingReply, Statfs, dirent_type};
#[allow(unused_imports)]
pub(crate) use request::{DecodeError, FileLock, Op, RingRequest, SetattrIn};

use queue::{QueueLink, QueueParams, Status};

/// The kernel's switch for FUSE over io-uring.
const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// Most entries a queue may have (each holds a payload buffer).
pub(crate) const MAX_DEPTH: usize = 1024;

/// Serves ring requests. `handle` runs on the queue thread of the request's CPU and that
/// queue takes no other request meanwhile: a request that may wait long (a blocking
/// SETLKW) should be answered from another thread. A handler must not drop the [`Ring`]
/// (its queue thread would wait for itself).
pub(crate) trait RingHandler: Send + Sync + 'static {
    fn handle(&self, req: &RingRequest<'_>, reply: RingReply);
}

// A reply travels to whichever thread answers it.
const _: () = {
    const fn send<T: Send>() {}
    send::<RingReply>();
};

/// The shape of a ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RingConfig {
    /// Number of queues: the kernel's possible CPUs ([`possible_queues`]), no fewer.
    pub queues: usize,
    /// Entries (requests in flight) per queue.
    pub depth: usize,
    /// Bytes of each entry's payload buffer: at least [`payload_size`] of the INIT reply.
    pub payload_size: usize,
}

/// Whether the fuse module lets connections use io-uring (`enable_uring` is Y).
pub(crate) fn uring_enabled() -> bool {
    std::fs::read_to_string(ENABLE_URING).is_ok_and(|s| s.trim() == "Y")
}

/// The number of queues the kernel makes: one per possible CPU (`num_possible_cpus()`).
pub(crate) fn possible_queues() -> io::Result<usize> {
    let list = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    count_cpus(&list).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("cannot parse the possible CPUs {:?}", list.trim()),
        )
    })
}

/// Counts the CPUs in a kernel CPU list such as "0-3,8,10-11".
fn count_cpus(list: &str) -> Option<usize> {
    let mut n = 0usize;
    for part in list.trim().split(',') {
        let (lo, hi) = match part.split_once('-') {
            Some((lo, hi)) => (lo.parse::<usize>().ok()?, hi.parse::<usize>().ok()?),
            None => {
                let c = part.parse::<usize>().ok()?;
                (c, c)
            }
        };
        n += hi.checked_sub(lo)? + 1;
    }
    (n > 0).then_some(n)
}

/// The payload buffer size the kernel requires of each entry (`fuse_uring_create`):
/// `max(FUSE_MIN_READ_BUFFER (8 KiB), max_write, max_pages * PAGE_SIZE)`, with the
/// `max_write` and `max_pages` of the INIT reply (the kernel may lower `max_pages` to
/// `fs.fuse.max_pages_limit`, never raise it; without FUSE_MAX_PAGES it is 32). fuser
/// answers `max_pages = ceil(max(max_write, max_readahead) / PAGE_SIZE)`.
///
/// fuser's default `max_write` is 16 MiB while the kernel never sends more than
/// `max_pages_limit` pages (256: 1 MiB) in one request, so a filesystem using the ring
/// should lower `max_write` in `init` (the buffers are mapped lazily, but each entry's
/// address space is this size).
pub(crate) fn payload_size(max_write: u32, max_pages: u16) -> usize {
    let page = page_size();
    abi::FUSE_MIN_READ_BUFFER
        .max(max_write as usize)
        .max(usize::from(max_pages) * page)
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
}

/// The running ring: one thread per queue (`cachefs-ring-<qid>`).
pub(crate) struct Ring {
    queues: Vec<(Arc<QueueLink>, Option<JoinHandle<()>>)>,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("queues", &self.queues.len())
            .finish()
    }
}

impl Ring {
    /// Whether every queue thread has ended (the connection is gone).
    pub(crate) fn is_finished(&self) -> bool {
        self.queues
            .iter()
            .all(|(_, t)| t.as_ref().is_none_or(|t| t.is_finished()))
    }

    /// Waits until the queues end by themselves, when the connection ends.
    pub(crate) fn join(mut self) {
        for (_, t) in &mut self.queues {
            if let Some(t) = t.take() {
                let _ = t.join();
            }
        }
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for (link, _) in &self.queues {
            link.wake();
        }
        for (_, t) in &mut self.queues {
            if let Some(t) = t.take() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Starts serving the connection of `dev` (a /dev/fuse fd of the session, such as a dup of
/// fuser's `Session::as_fd()`, taken after INIT) over io-uring.
///
/// All queues first allocate their rings and buffers; only then are the entries
/// registered. On failure nothing keeps running, the kernel is told to use /dev/fuse
/// again, and the error is returned.
pub(crate) fn start(
    dev: OwnedFd,
    cfg: RingConfig,
    handler: Arc<dyn RingHandler>,
) -> io::Result<Ring> {
    let dev = Arc::new(dev);
    let res = start_queues(&dev, cfg, handler);
    if res.is_err() {
        queue::abandon(&dev);
    }
    res
}

fn start_queues(
    dev: &Arc<OwnedFd>,
    cfg: RingConfig,
    handler: Arc<dyn RingHandler>,
) -> io::Result<Ring> {
    let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
    if cfg.queues == 0 || cfg.queues > usize::from(u16::MAX) {
        return Err(invalid(format!("ring queues {} out of range", cfg.queues)));
    }
    if cfg.depth == 0 || cfg.depth > MAX_DEPTH {
        return Err(invalid(format!(
            "ring depth {} out of 1..={MAX_DEPTH}",
            cfg.depth
        )));
    }
    if cfg.payload_size < abi::FUSE_MIN_READ_BUFFER || cfg.payload_size > (1 << 30) {
        return Err(invalid(format!(
            "ring payload size {} out of range",
            cfg.payload_size
        )));
    }
    // With fewer queues the ring never becomes ready and every request waits forever;
    // with more, the surplus queue is refused.
    let possible = possible_queues()?;
    if cfg.queues != possible {
        return Err(invalid(format!(
            "ring queues {} but the kernel makes one per possible CPU: {possible}",
            cfg.queues
        )));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (status_tx, status_rx) = mpsc::channel();
    let mut ring = Ring {
        queues: Vec::new(),
        stop: stop.clone(),
    };
    let mut gos = Vec::new();
    let mut threads = Vec::new();
    for qid in 0..cfg.queues {
        let (go_tx, go_rx) = mpsc::channel();
        let params = QueueParams {
            qid: qid as u16,
            depth: cfg.depth,
            payload_size: cfg.payload_size,
            dev: dev.clone(),
            handler: handler.clone(),
            stop: stop.clone(),
        };
        let status = status_tx.clone();
        let t = std::thread::Builder::new()
            .name(format!("cachefs-ring-{qid}"))
            .spawn(move || queue::run(params, status, go_rx));
        match t {
            Ok(t) => {
                threads.push(Some(t));
                gos.push(go_tx);
            }
            Err(e) => {
                // Dropping the go senders makes the started threads return.
                drop(gos);
                for t in threads.into_iter().flatten() {
                    let _ = t.join();
                }
                return Err(e);
            }
        }
    }
    drop(status_tx);
    // Phase 1: every queue allocated.
    let mut links: Vec<Option<Arc<QueueLink>>> = vec![None; cfg.queues];
    let mut failure = None;
    for _ in 0..cfg.queues {
        match status_rx.recv() {
            Ok((qid, Status::Prepared(Ok(link)))) => links[usize::from(qid)] = Some(link),
            Ok((_, Status::Prepared(Err(e)))) => {
                failure.get_or_insert(e);
            }
            Ok((_, Status::Registered { .. })) => {}
            Err(_) => {
                failure.get_or_insert(io::Error::other("ring queue thread ended early"));
                break;
            }
        }
    }
    if let Some(e) = failure {
        drop(gos);
        for t in threads.into_iter().flatten() {
            let _ = t.join();
        }
        return Err(e);
    }
    for (link, t) in links.into_iter().zip(threads) {
        if let Some(link) = link {
            ring.queues.push((link, t));
        }
    }
    // Phase 2: register every entry.
    for go in &gos {
        let _ = go.send(true);
    }
    let mut failure = None;
    for _ in 0..cfg.queues {
        match status_rx.recv() {
            Ok((qid, Status::Registered { ok, error })) => {
                if let Some(e) = error {
                    if ok == 0 {
                        failure.get_or_insert(e);
                    } else {
                        tracing::warn!(qid, ok, "some ring entries were refused: {e}");
                    }
                } else if ok == 0 {
                    failure.get_or_insert(io::Error::other(format!(
                        "ring queue {qid} registered no entry"
                    )));
                }
            }
            Ok(_) => {}
            Err(_) => {
                failure.get_or_insert(io::Error::other("ring queue thread ended early"));
                break;
            }
        }
    }
    match failure {
        // Dropping `ring` stops the queues that did register.
        Some(e) => Err(e),
        None => Ok(ring),
    }
}
