//! One ring queue: a thread that owns an SQE128 io_uring, `depth` entries (each a
//! page-aligned header buffer and payload buffer registered with the kernel), and an
//! eventfd through which replies sent from other threads wake it.
//!
//! An entry cycles through: REGISTER (or COMMIT_AND_FETCH) in the kernel → completion with
//! a request in its buffers → the handler has it → its reply comes back on the queue's
//! channel → the queue writes the reply into the buffers and submits COMMIT_AND_FETCH,
//! which answers this request and waits for the next one in the same step.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::panic::AssertUnwindSafe;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::ThreadId;
use std::time::Duration;

use io_uring::{IoUring, cqueue, opcode, squeue, types};
use tracing::{debug, warn};

use super::RingHandler;
use super::abi::{self, Bytes};
use super::reply::{Pending, RingReply};
use super::request::{self, InHeader};

/// `user_data` of the eventfd poll; entries use their index.
const WAKE_TAG: u64 = u64::MAX;

/// How long a REGISTER refused with EAGAIN (INIT not finished yet) is retried.
const REGISTER_RETRY: Duration = Duration::from_millis(10);
const REGISTER_RETRIES: u32 = 500;

/// Queues that stopped while the kernel still held some of their entries, whose buffers
/// were therefore kept (see `Queue::finish`).
pub(super) static LEAKED_QUEUES: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

/// A reply on its way back to its entry's queue thread.
pub(super) struct Commit {
    pub(super) entry: usize,
    /// 0 or a negative errno.
    pub(super) error: i32,
    /// The out-args, packed; also the entry's reply buffer, returned for reuse.
    pub(super) payload: Vec<u8>,
}

/// How replies reach a queue thread: its channel, and its eventfd to wake it.
pub(super) struct QueueLink {
    tx: mpsc::Sender<Commit>,
    wake: OwnedFd,
    owner: ThreadId,
}

impl QueueLink {
    pub(super) fn commit(&self, c: Commit) {
        let sent = self.tx.send(c).is_ok();
        // A reply made on the queue thread itself is picked up after `handle` returns.
        if sent && std::thread::current().id() != self.owner {
            self.wake();
        }
    }

    pub(super) fn wake(&self) {
        // An eventfd write only fails when the counter would overflow, and then it is
        // already readable: the queue wakes either way.
        let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
    }
}

/// What a queue reports to `start` after each phase.
pub(super) enum Status {
    Prepared(io::Result<Arc<QueueLink>>),
    /// Registration submitted: how many entries the kernel took and the first refusal.
    Registered {
        ok: usize,
        error: Option<io::Error>,
    },
}

pub(super) struct QueueParams {
    pub(super) qid: u16,
    pub(super) depth: usize,
    pub(super) payload_size: usize,
    pub(super) dev: Arc<OwnedFd>,
    pub(super) handler: Arc<dyn RingHandler>,
    pub(super) stop: Arc<AtomicBool>,
}

/// The body of a queue thread: prepare, report, wait for `go`, register, report, serve.
pub(super) fn run(p: QueueParams, status: mpsc::Sender<(u16, Status)>, go: mpsc::Receiver<bool>) {
    let qid = p.qid;
    pin_to_cpu(qid);
    let mut q = match Queue::new(p) {
        Ok(q) => q,
        Err(e) => {
            let _ = status.send((qid, Status::Prepared(Err(e))));
            return;
        }
    };
    if status
        .send((qid, Status::Prepared(Ok(q.link.clone()))))
        .is_err()
    {
        return;
    }
    if go.recv() != Ok(true) {
        return;
    }
    let (ok, error) = q.register();
    if status
        .send((qid, Status::Registered { ok, error }))
        .is_err()
    {
        q.stop.store(true, Ordering::Relaxed);
    }
    q.serve();
    q.finish();
}

/// Runs this thread on CPU `qid`: the kernel queues a request on the queue of the CPU its
/// caller runs on, so the queue's thread answers on that CPU, without waking a thread
/// elsewhere (GETATTR round trips took 1.5x as long unpinned, 1.7x pinned to the other CPU,
/// on this 2-CPU machine). Where the CPU is not ours to use
/// (a cpuset), the thread stays unpinned.
fn pin_to_cpu(qid: u16) {
    let mut set = rustix::thread::CpuSet::new();
    set.set(usize::from(qid));
    if let Err(e) = rustix::thread::sched_setaffinity(None, &set) {
        debug!(qid, "ring queue thread not pinned to its CPU: {e}");
    }
}

/// An anonymous, page-aligned mapping that the kernel reads and writes while the entry's
/// command is in flight.
struct Region {
    ptr: NonNull<u8>,
    len: usize,
}

impl Region {
    fn new(len: usize) -> io::Result<Region> {
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave NULL"))?;
        Ok(Region { ptr, len })
    }

    /// # Safety
    /// The kernel must not be writing the region: the entry's command is not in flight.
    unsafe fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` maps `len` readable bytes for the Region's life; the caller rules out
        // concurrent kernel writes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// # Safety
    /// As for [`Region::bytes`].
    unsafe fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`; `&mut self` makes this the only slice from here.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; no slice of it outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// A REGISTER or COMMIT_AND_FETCH is in the kernel: it owns the buffers.
    InKernel,
    /// A request is with the handler; its reply has not come back yet.
    WithHandler,
    /// Refused or torn down by the kernel; never submitted again.
    Dead,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cmd {
    Register,
    CommitAndFetch,
}

struct Entry {
    header: Region,
    payload: Region,
    /// The two iovecs a REGISTER points at; the kernel may read them after submission
    /// (when the command is issued asynchronously), so they live as long as the buffers.
    iov: Box<[libc::iovec; 2]>,
    state: State,
    last: Cmd,
    retries: u32,
    commit_id: u64,
    unique: u64,
    /// The reply buffer, lent to the request's RingReply while it is out.
    buf: Option<Vec<u8>>,
}

struct Queue {
    qid: u16,
    dev: Arc<OwnedFd>,
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    entries: Vec<Entry>,
    link: Arc<QueueLink>,
    rx: mpsc::Receiver<Commit>,
    handler: Arc<dyn RingHandler>,
    stop: Arc<AtomicBool>,
    /// Completions seen while registering, served first.
    backlog: VecDeque<(u64, i32)>,
    /// The kernel tore the connection down: end once no entry is in the kernel.
    conn_gone: bool,
    wake_armed: bool,
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
}

fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

impl Queue {
    fn new(p: QueueParams) -> io::Result<Queue> {
        let page = page_size();
        // One SQE per entry at most, plus the eventfd poll; the CQ (twice as large) then
        // never overflows.
        let sq =
            u32::try_from(p.depth + 1).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // A plain ring. IORING_SETUP_DEFER_TASKRUN (task work run only when this thread waits)
        // measured no faster here, and with it a server killed while the kernel was handing it
        // a request (task work not yet run) left that request unended: the unmount then waited
        // for it forever in fuse_wait_aborted (Linux 6.18, tests/evict.rs,
        // sigkill_mid_write_is_reconciled_by_the_next_mount).
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder().build(sq)?;
        let wake = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )?;
        let (tx, rx) = mpsc::channel();
        let link = Arc::new(QueueLink {
            tx,
            wake,
            owner: std::thread::current().id(),
        });
        let header_len = round_up(abi::REQ_HEADER_SIZE, page);
        let payload_len = round_up(p.payload_size, page);
        let mut entries = Vec::with_capacity(p.depth);
        for _ in 0..p.depth {
            let header = Region::new(header_len)?;
            let payload = Region::new(payload_len)?;
            let iov = Box::new([
                libc::iovec {
                    iov_base: header.ptr.as_ptr().cast(),
                    iov_len: header.len,
                },
                libc::iovec {
                    iov_base: payload.ptr.as_ptr().cast(),
                    iov_len: payload.len,
                },
            ]);
            entries.push(Entry {
                header,
                payload,
                iov,
                state: State::Dead,
                last: Cmd::Register,
                retries: 0,
                commit_id: 0,
                unique: 0,
                buf: Some(Vec::new()),
            });
        }
        Ok(Queue {
            qid: p.qid,
            dev: p.dev,
            ring,
            entries,
            link,
            rx,
            handler: p.handler,
            stop: p.stop,
            backlog: VecDeque::new(),
            conn_gone: false,
            wake_armed: false,
        })
    }

    fn push(&mut self, sqe: &squeue::Entry128) {
        for _ in 0..2 {
            // SAFETY: the only pointer an entry carries is a REGISTER's iovec array, which
            // with the buffers it names lives until `finish`, after the ring is gone (or is
            // leaked when the kernel may still hold it).
            if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                return;
            }
            // Full: cannot happen with one SQE per entry, but submitting makes room.
            let _ = self.ring.submit();
        }
        warn!(qid = self.qid, "ring submission queue stuck full");
    }

    fn submit_cmd(&mut self, idx: usize, cmd: Cmd) {
        let e = &mut self.entries[idx];
        let sqe = match cmd {
            Cmd::Register => abi::uring_cmd_sqe(
                self.dev.as_raw_fd(),
                abi::FUSE_IO_URING_CMD_REGISTER,
                self.qid,
                0,
                Some(e.iov.as_ptr() as u64),
                idx as u64,
            ),
            Cmd::CommitAndFetch => abi::uring_cmd_sqe(
                self.dev.as_raw_fd(),
                abi::FUSE_IO_URING_CMD_COMMIT_AND_FETCH,
                self.qid,
                e.commit_id,
                None,
                idx as u64,
            ),
        };
        e.state = State::InKernel;
        e.last = cmd;
        self.push(&sqe);
    }

    fn arm_wake(&mut self) {
        let sqe = opcode::PollAdd::new(types::Fd(self.link.wake.as_raw_fd()), libc::POLLIN as u32)
            .build()
            .user_data(WAKE_TAG);
        self.push(&sqe.into());
        self.wake_armed = true;
    }

    /// Submits a REGISTER for every entry and collects the refusals the kernel gave at once.
    fn register(&mut self) -> (usize, Option<io::Error>) {
        for idx in 0..self.entries.len() {
            self.submit_cmd(idx, Cmd::Register);
        }
        self.arm_wake();
        if let Err(e) = self.ring.submit() {
            for e in &mut self.entries {
                e.state = State::Dead;
            }
            return (0, Some(e));
        }
        // A refused command completes during submission; a taken one stays in the kernel
        // until a request arrives (those completions are served first).
        let mut first = None;
        let cqes: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (ud, res) in cqes {
            let refused = res < 0 && -res != libc::EAGAIN && -res != libc::EINTR;
            match self.entries.get_mut(ud as usize) {
                Some(e) if refused && e.last == Cmd::Register => {
                    e.state = State::Dead;
                    first.get_or_insert(io::Error::from_raw_os_error(-res));
                }
                _ => self.backlog.push_back((ud, res)),
            }
        }
        let ok = self
            .entries
            .iter()
            .filter(|e| e.state != State::Dead)
            .count();
        (ok, first)
    }

    fn serve(&mut self) {
        let mut cqes = Vec::new();
        while let Some((ud, res)) = self.backlog.pop_front() {
            self.complete(ud, res);
        }
        self.drain_commits();
        loop {
            if self.stop.load(Ordering::Relaxed) {
                break;
            }
            let in_kernel = self.entries.iter().any(|e| e.state == State::InKernel);
            let with_handler = self.entries.iter().any(|e| e.state == State::WithHandler);
            if !in_kernel && (self.conn_gone || !with_handler) {
                debug!(qid = self.qid, "ring queue: connection ended");
                break;
            }
            if !self.wake_armed {
                self.arm_wake();
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
                    ) => {}
                Err(e) => {
                    warn!(qid = self.qid, "ring queue: io_uring_enter failed: {e}");
                    break;
                }
            }
            cqes.clear();
            cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            for &(ud, res) in &cqes {
                self.complete(ud, res);
            }
            self.drain_commits();
        }
    }

    /// One completion: the eventfd poll, or an entry whose command finished.
    fn complete(&mut self, ud: u64, res: i32) {
        if ud == WAKE_TAG {
            self.wake_armed = false;
            let mut b = [0u8; 8];
            // Resets the counter; EAGAIN when already reset is fine.
            let _ = rustix::io::read(&self.link.wake, &mut b);
            return;
        }
        let idx = ud as usize;
        let Some(e) = self.entries.get_mut(idx) else {
            warn!(qid = self.qid, ud, "ring completion for no entry");
            return;
        };
        if res >= 0 {
            self.dispatch(idx);
            return;
        }
        let errno = -res;
        match errno {
            libc::EAGAIN | libc::EINTR if e.retries < REGISTER_RETRIES => {
                // REGISTER before the INIT reply was processed: try again shortly.
                e.retries += 1;
                let cmd = e.last;
                std::thread::sleep(REGISTER_RETRY);
                self.submit_cmd(idx, cmd);
            }
            libc::ENOTCONN | libc::ENODEV | libc::ECONNABORTED | libc::ECANCELED => {
                e.state = State::Dead;
                self.conn_gone = true;
            }
            _ => {
                warn!(
                    qid = self.qid,
                    entry = idx,
                    cmd = ?e.last,
                    "ring entry refused by the kernel: {}",
                    io::Error::from_raw_os_error(errno)
                );
                e.state = State::Dead;
            }
        }
    }

    /// Hands the request now in entry `idx` to the handler.
    fn dispatch(&mut self, idx: usize) {
        let capacity;
        let reply;
        {
            let e = &mut self.entries[idx];
            e.state = State::WithHandler;
            e.retries = 0;
            capacity = e.payload.len;
            reply = RingReply::new(Pending {
                link: self.link.clone(),
                entry: idx,
                buf: e.buf.take().unwrap_or_default(),
                capacity,
            });
        }
        let e = &self.entries[idx];
        // SAFETY: the kernel completed this entry's command, so it leaves the buffers alone
        // until the next command for the entry is submitted, which happens only after the
        // handler returned and this borrow ended (replies go through the channel).
        let (header, payload) = unsafe { (e.header.bytes(), e.payload.bytes()) };
        let ent = Bytes(&header[abi::HDR_ENT_IN_OUT..abi::HDR_ENT_IN_OUT + abi::ENT_IN_OUT_SIZE]);
        let commit_id = ent.u64(abi::ENT_COMMIT_ID).unwrap_or(0);
        let payload_sz = ent.u32(abi::ENT_PAYLOAD_SZ).unwrap_or(u32::MAX) as usize;
        let in_out = &header[abi::HDR_IN_OUT..abi::HDR_IN_OUT + abi::HDR_IN_OUT_SIZE];
        let op_in = &header[abi::HDR_OP_IN..abi::HDR_OP_IN + abi::HDR_OP_IN_SIZE];
        // The commit id is the request's unique; fall back to it if the header is unreadable.
        let unique = InHeader::parse(in_out).map_or(commit_id, |h| h.unique);
        let decoded = match payload.get(..payload_sz) {
            Some(payload) => request::decode(in_out, op_in, payload),
            None => Err(request::DecodeError::ShortPayload {
                opcode: InHeader::parse(in_out).map_or(0, |h| h.opcode),
                need: payload_sz,
                got: capacity,
            }),
        };
        match decoded {
            Ok(req) => {
                let handler = &self.handler;
                // A panicking handler drops the reply, which answers EIO; the queue goes on.
                if std::panic::catch_unwind(AssertUnwindSafe(|| handler.handle(&req, reply)))
                    .is_err()
                {
                    warn!(qid = self.qid, opcode = req.opcode, "ring handler panicked");
                }
            }
            Err(err) => {
                debug!(qid = self.qid, "ring request not decoded: {err}");
                reply.error(libc::EIO);
            }
        }
        let e = &mut self.entries[idx];
        e.commit_id = commit_id;
        e.unique = unique;
    }

    /// Writes every reply that came back into its entry and submits its COMMIT_AND_FETCH.
    fn drain_commits(&mut self) {
        while let Ok(c) = self.rx.try_recv() {
            let Some(e) = self.entries.get_mut(c.entry) else {
                continue;
            };
            let mut payload = c.payload;
            if e.state != State::WithHandler {
                continue;
            }
            if self.conn_gone {
                // The kernel has no request to commit to any more.
                e.state = State::Dead;
                continue;
            }
            let mut error = c.error;
            if payload.len() > e.payload.len {
                payload.clear();
                error = -libc::EIO;
            }
            {
                // SAFETY: the entry is with us (WithHandler): the kernel does not touch its
                // buffers until the COMMIT_AND_FETCH below is submitted.
                let (header, body) = unsafe { (e.header.bytes_mut(), e.payload.bytes_mut()) };
                let len = (abi::OUT_HEADER_SIZE + payload.len()) as u32;
                let mut out = [0u8; abi::OUT_HEADER_SIZE];
                out[0..4].copy_from_slice(&len.to_ne_bytes());
                out[4..8].copy_from_slice(&error.to_ne_bytes());
                out[8..16].copy_from_slice(&e.unique.to_ne_bytes());
                header[abi::HDR_IN_OUT..abi::HDR_IN_OUT + abi::OUT_HEADER_SIZE]
                    .copy_from_slice(&out);
                let sz = abi::HDR_ENT_IN_OUT + abi::ENT_PAYLOAD_SZ;
                header[sz..sz + 4].copy_from_slice(&(payload.len() as u32).to_ne_bytes());
                // The kernel copies only in_args[0] into op_in: zero it so that fields a
                // shorter (older) struct lacks read as 0 in the next request.
                header[abi::HDR_OP_IN..abi::HDR_OP_IN + abi::HDR_OP_IN_SIZE].fill(0);
                body[..payload.len()].copy_from_slice(&payload);
            }
            payload.clear();
            e.buf = Some(payload);
            self.submit_cmd(c.entry, Cmd::CommitAndFetch);
        }
    }

    /// Closes the ring; frees the buffers unless the kernel may still write them.
    fn finish(self) {
        let Queue { ring, entries, .. } = self;
        let in_kernel = entries
            .iter()
            .filter(|e| e.state == State::InKernel)
            .count();
        drop(ring);
        if in_kernel > 0 {
            // Closing the ring cancels those commands asynchronously; until then the kernel
            // keeps their buffer addresses, so they must never be unmapped and reused.
            debug!(
                in_kernel,
                "ring queue stopped with entries in the kernel: their buffers are kept"
            );
            std::mem::forget(entries);
            LEAKED_QUEUES.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Makes the kernel give up on the ring for this connection, after `start` failed: a
/// REGISTER for a queue that cannot exist is refused, and any refused REGISTER clears the
/// connection's io-uring flag and wakes the requests waiting for the ring, which then go
/// through /dev/fuse again.
pub(super) fn abandon(dev: &OwnedFd) {
    let res = (|| -> io::Result<i32> {
        let mut ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder().build(2)?;
        let sqe = abi::uring_cmd_sqe(
            dev.as_raw_fd(),
            abi::FUSE_IO_URING_CMD_REGISTER,
            u16::MAX,
            0,
            None,
            0,
        );
        // SAFETY: the entry carries no pointer.
        unsafe { ring.submission().push(&sqe) }
            .map_err(|_| io::Error::other("submission queue full"))?;
        // The refusal completes during submission; the timeout only guards against a
        // kernel that took the command after all.
        let ts = types::Timespec::new().sec(1);
        let args = types::SubmitArgs::new().timespec(&ts);
        match ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
            Err(e) => return Err(e),
        }
        let res = ring.completion().next().map_or(0, |c| c.result());
        Ok(res)
    })();
    match res {
        Ok(r) if r < 0 => debug!("fuse ring abandoned: {}", io::Error::from_raw_os_error(-r)),
        Ok(r) => warn!("fuse ring abandon: unexpected result {r}"),
        Err(e) => warn!("fuse ring abandon failed: {e}"),
    }
}

#[cfg(test)]
impl QueueLink {
    /// A link whose commits land in the returned receiver, for encoding tests.
    pub(super) fn for_test() -> (Arc<QueueLink>, mpsc::Receiver<Commit>) {
        let (tx, rx) = mpsc::channel();
        let wake =
            rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).expect("eventfd");
        let link = QueueLink {
            tx,
            wake,
            owner: std::thread::current().id(),
        };
        (Arc::new(link), rx)
    }
}
