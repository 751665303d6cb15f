//! Waiting for earlier tickets: a blocking flock that a deadline, a cancel request or a
//! progress report can interrupt.
//!
//! The wait itself is `flock(LOCK_SH)` in the calling thread, so the kernel wakes it the
//! moment the holder lets go. flock has no timeout, so a watchdog thread sends the waiting
//! thread a signal whose handler does nothing (installed without SA_RESTART): the flock
//! returns EINTR and the waiter looks at why. The watchdog also calls the progress callback
//! while the wait lasts.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicI32, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, Once};
use std::time::{Duration, Instant};

use super::ticket;

/// How often the progress callback runs while a wait lasts.
pub const REPORT_EVERY: Duration = Duration::from_secs(1);
/// How often the watchdog looks at the cancel flag.
const CANCEL_POLL: Duration = Duration::from_millis(50);
/// How often the watchdog re-sends the interrupt until the waiter notices it (a signal that
/// lands just before the waiter enters flock is otherwise lost).
const RESEND_EVERY: Duration = Duration::from_millis(5);

/// Why a wait ended early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    TimedOut,
    /// The cancel flag was set to this signal number.
    Cancelled(i32),
}

const RUNNING: u8 = 0;
const TIMED_OUT: u8 = 1;
const CANCELLED: u8 = 2;

/// The signal that interrupts a waiting flock.
fn interrupt_signal() -> libc::c_int {
    libc::SIGRTMIN() + 1
}

extern "C" fn on_interrupt(_: libc::c_int) {}

fn install_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a handler that does nothing is async-signal-safe; no SA_RESTART, so a
        // blocking flock returns EINTR.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_interrupt as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = 0;
            if libc::sigaction(interrupt_signal(), &sa, std::ptr::null_mut()) != 0 {
                tracing::warn!(error = %io::Error::last_os_error(), "cannot install the lease-wait interrupt handler");
            }
        }
    });
}

/// What the watchdog shares with the waiting thread.
struct Shared {
    done: Mutex<bool>,
    cv: Condvar,
    stop: AtomicU8,
}

/// Waits until every file in `blockers` has been let go by its owner. `report(waited)` is
/// called when the wait starts blocking and every [`REPORT_EVERY`] after, from another
/// thread. Returns early with [`Stop`] at `deadline` or when `cancel` becomes non-zero.
pub(crate) fn wait_all(
    blockers: Vec<File>,
    deadline: Option<Instant>,
    cancel: Option<&AtomicI32>,
    report: &(dyn Fn(Duration) + Sync),
) -> Result<Result<(), Stop>, io::Error> {
    let start = Instant::now();
    // Granted ones need no thread.
    let mut pending = Vec::with_capacity(blockers.len());
    for file in blockers {
        if !ticket::try_shared(&file)? {
            pending.push(file);
        }
    }
    if pending.is_empty() {
        return Ok(Ok(()));
    }
    if deadline.is_some_and(|d| d <= start) {
        return Ok(Err(Stop::TimedOut));
    }
    install_handler();
    let shared = Shared {
        done: Mutex::new(false),
        cv: Condvar::new(),
        stop: AtomicU8::new(RUNNING),
    };
    // SAFETY: pthread_self cannot fail.
    let me = unsafe { libc::pthread_self() };
    std::thread::scope(|s| {
        let watchdog = std::thread::Builder::new()
            .name("cachefs-lease-wait".into())
            .spawn_scoped(s, || watch(&shared, me, start, deadline, cancel, report));
        if let Err(e) = watchdog {
            // Without a watchdog there is no timeout or progress; waiting is still right.
            tracing::warn!(error = %e, "cannot start the lease-wait watchdog");
        }
        let result = wait_each(&pending, &shared, cancel);
        *shared.done.lock().unwrap_or_else(|p| p.into_inner()) = true;
        shared.cv.notify_all();
        result
    })
}

fn wait_each(
    pending: &[File],
    shared: &Shared,
    cancel: Option<&AtomicI32>,
) -> Result<Result<(), Stop>, io::Error> {
    for file in pending {
        loop {
            match shared.stop.load(Ordering::Acquire) {
                TIMED_OUT => return Ok(Err(Stop::TimedOut)),
                CANCELLED => {
                    let sig = cancel.map(|c| c.load(Ordering::Acquire)).unwrap_or(0);
                    return Ok(Err(Stop::Cancelled(sig)));
                }
                _ => {}
            }
            match ticket::wait_shared(file) {
                Ok(()) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }
    Ok(Ok(()))
}

fn watch(
    shared: &Shared,
    waiter: libc::pthread_t,
    start: Instant,
    deadline: Option<Instant>,
    cancel: Option<&AtomicI32>,
    report: &(dyn Fn(Duration) + Sync),
) {
    let mut next_report = start;
    let reason = loop {
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            break TIMED_OUT;
        }
        if cancel.is_some_and(|c| c.load(Ordering::Acquire) != 0) {
            break CANCELLED;
        }
        if now >= next_report {
            report(now - start);
            next_report = now + REPORT_EVERY;
        }
        let mut wake = next_report;
        if let Some(d) = deadline {
            wake = wake.min(d);
        }
        if cancel.is_some() {
            wake = wake.min(now + CANCEL_POLL);
        }
        let done = shared.done.lock().unwrap_or_else(|p| p.into_inner());
        if *done {
            return;
        }
        let timeout = wake.saturating_duration_since(Instant::now());
        let (done, _) = shared
            .cv
            .wait_timeout(done, timeout)
            .unwrap_or_else(|p| p.into_inner());
        if *done {
            return;
        }
    };
    shared.stop.store(reason, Ordering::Release);
    loop {
        let done = shared.done.lock().unwrap_or_else(|p| p.into_inner());
        if *done {
            return;
        }
        // SAFETY: the waiter thread is alive until it sets `done`, which we checked under
        // the lock it sets it with; the handler does nothing.
        unsafe { libc::pthread_kill(waiter, interrupt_signal()) };
        let _ = shared
            .cv
            .wait_timeout(done, RESEND_EVERY)
            .unwrap_or_else(|p| p.into_inner());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn held(dir: &std::path::Path, seq: i64) -> (ticket::Held, File) {
        let h = ticket::Held::create(dir, seq, true).unwrap();
        let f = ticket::open(h.path()).unwrap().unwrap();
        (h, f)
    }

    #[test]
    fn times_out_and_reports() {
        let dir = tempfile::tempdir().unwrap();
        let (_h, f) = held(dir.path(), 1);
        let reports = AtomicUsize::new(0);
        let t0 = Instant::now();
        let r = wait_all(
            vec![f],
            Some(t0 + Duration::from_millis(300)),
            None,
            &|_| {
                reports.fetch_add(1, Ordering::Relaxed);
            },
        )
        .unwrap();
        assert_eq!(r, Err(Stop::TimedOut));
        assert!(t0.elapsed() >= Duration::from_millis(300));
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert_eq!(
            reports.load(Ordering::Relaxed),
            1,
            "reported once at the start"
        );
    }

    #[test]
    fn cancel_flag_stops_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let (_h, f) = held(dir.path(), 1);
        let cancel = AtomicI32::new(0);
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(100));
                cancel.store(libc::SIGINT, Ordering::Release);
            });
            let r = wait_all(vec![f], None, Some(&cancel), &|_| {}).unwrap();
            assert_eq!(r, Err(Stop::Cancelled(libc::SIGINT)));
        });
    }

    #[test]
    fn wakes_when_every_blocker_is_released() {
        let dir = tempfile::tempdir().unwrap();
        let (mut h1, f1) = held(dir.path(), 1);
        let (mut h2, f2) = held(dir.path(), 2);
        std::thread::scope(|s| {
            let w = s.spawn(|| wait_all(vec![f1, f2], None, None, &|_| {}).unwrap());
            std::thread::sleep(Duration::from_millis(50));
            h2.release();
            std::thread::sleep(Duration::from_millis(50));
            assert!(!w.is_finished());
            h1.release();
            assert_eq!(w.join().unwrap(), Ok(()));
        });
    }

    #[test]
    fn free_blockers_need_no_wait() {
        let dir = tempfile::tempdir().unwrap();
        let (mut h, f) = held(dir.path(), 1);
        h.release();
        let r = wait_all(vec![f], Some(Instant::now()), None, &|_| {
            panic!("no report")
        })
        .unwrap();
        assert_eq!(r, Ok(()));
    }
}
