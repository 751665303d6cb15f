//! Supervising the child of `cachefs run`: signal forwarding and a race-free wait.
//!
//! The FUSE filesystems are served by threads of this same process, so a signal must never
//! kill cachefs before its child: the child could then be left using a dead mount. Instead
//! the forwarded signals are blocked in every thread (the mask is set before any thread
//! starts, and threads inherit it) and one thread takes them with `sigwaitinfo` and passes
//! them on to the child. cachefs itself then ends the normal way: the child exits, the mounts
//! are unmounted, and cachefs exits with the child's status.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, pthread_sigmask};
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::Pid;

/// The signals cachefs forwards to its child.
const FORWARDED: [Signal; 4] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
];

fn forwarded_set() -> SigSet {
    let mut set = SigSet::empty();
    for sig in FORWARDED {
        set.add(sig);
    }
    set
}

/// Process state that mounting changes for the FUSE server's sake and the command must get
/// back as its caller set it. Capture it while cachefs is still single-threaded.
#[derive(Clone, Copy)]
pub struct Inherited {
    umask: libc::mode_t,
    nofile: Option<libc::rlimit>,
}

impl Inherited {
    pub fn capture() -> Inherited {
        // SAFETY: umask cannot fail and touches no memory. It can only be read by setting it,
        // so it is set back at once; no other thread exists yet to see the interim value.
        let umask = unsafe {
            let old = libc::umask(0o022);
            libc::umask(old);
            old
        };
        let mut nofile = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `nofile` is a valid out-pointer.
        let nofile =
            (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut nofile) } == 0).then_some(nofile);
        Inherited { umask, nofile }
    }

    /// The mode `mkdir` gives a new directory under the caller's umask.
    pub fn dir_mode(&self) -> libc::mode_t {
        0o777 & !self.umask
    }
}

/// What the signal thread and the main thread share.
#[derive(Default)]
struct State {
    /// The running child, until it has exited (it is cleared before the child is reaped, so a
    /// late signal can never hit a recycled pid).
    child: Option<Pid>,
    /// A signal that arrived before the child started: the command must not start at all.
    pending: Option<Signal>,
    /// Signals taken while no child ran (the first is `pending`).
    received: u32,
    /// The command has been started (or failed to start): signals no longer stop it from
    /// starting.
    started: bool,
    /// A SIGINT or SIGTERM has been forwarded; the next one escalates to SIGKILL.
    terminating: bool,
    /// Shown in the escalation message.
    program: String,
}

/// What the signal thread tells the main thread before a child runs.
#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// The first signal that arrived while no child ran (0: none), for code that waits on
    /// something else (a lease) and must stop.
    cancel: AtomicI32,
    /// Notified when `cancel` is set.
    wake: Condvar,
}

/// Forwards SIGINT, SIGTERM, SIGHUP and SIGQUIT to the child once it runs; before that (or
/// when there is no child at all, as for `cachefs mount`), records them for the main thread.
pub struct Supervisor {
    shared: Arc<Shared>,
}

/// How starting the command went.
pub enum Started {
    Running(Child),
    /// A forwarded signal arrived before the command could start; it was not started.
    Interrupted(Signal),
    /// The command could not be executed.
    Failed(io::Error),
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic in the other thread must not take signal forwarding down with it: the state is
    // plain data and stays consistent between statements.
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Supervisor {
    /// Blocks the forwarded signals in the calling thread and starts the forwarding thread.
    ///
    /// Call it before any other thread exists (before mounting): threads inherit the mask of
    /// the thread that creates them, and a thread without the block would let the default
    /// action (terminate) kill the whole process, mounts and all.
    pub fn start() -> io::Result<Supervisor> {
        pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&forwarded_set()), None)
            .map_err(io::Error::from)?;
        let shared = Arc::new(Shared::default());
        let thread_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("cachefs-signals".into())
            .spawn(move || forward_loop(&thread_shared))?;
        Ok(Supervisor { shared })
    }

    /// Becomes the number of the first signal that arrives while no child runs. A lease
    /// wait watches it.
    pub fn cancel_flag(&self) -> &AtomicI32 {
        &self.shared.cancel
    }

    /// Waits up to `timeout` for a signal to arrive while no child runs; returns it (also
    /// when it arrived earlier).
    pub fn wait_signal(&self, timeout: Duration) -> Option<Signal> {
        let state = lock(&self.shared.state);
        let (state, _) = self
            .shared
            .wake
            .wait_timeout_while(state, timeout, |s| s.pending.is_none())
            .unwrap_or_else(|p| p.into_inner());
        state.pending
    }

    /// How many signals arrived while no child ran: a wait that goes on after the first one
    /// ends at the next.
    pub fn signals_received(&self) -> u32 {
        lock(&self.shared.state).received
    }

    /// Starts `cmd` with the process state captured in `inherited` and an empty signal mask,
    /// unless a signal already asked cachefs to stop.
    ///
    /// With `tied`, the command gets SIGKILL when cachefs dies (PR_SET_PDEATHSIG): a command
    /// must never outlive the mounts it runs with. The kernel sends it when the *thread* that
    /// forked exits, so call this from the main thread, which lives as long as cachefs.
    pub fn spawn(&self, cmd: &mut Command, inherited: &Inherited, tied: bool) -> Started {
        let inherited = *inherited;
        // SAFETY: getpid(2) cannot fail and touches no memory.
        let parent = unsafe { libc::getpid() };
        // SAFETY: the closure runs in the forked child before exec and only makes the
        // umask(2), setrlimit(2), sigprocmask(2), prctl(2), getppid(2) and _exit(2) system
        // calls, which take no locks and allocate nothing; the signal set is built before the
        // fork.
        unsafe {
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            cmd.pre_exec(move || {
                if tied {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    // cachefs died between the fork and the prctl: the signal will never
                    // come, so end here.
                    if libc::getppid() != parent {
                        libc::_exit(128 + libc::SIGKILL);
                    }
                }
                // The FUSE threads run with umask 0 (they apply each caller's umask
                // themselves), so the child would otherwise inherit 0.
                libc::umask(inherited.umask);
                // Mounting raises the soft open-file limit for the server; the command
                // gets the limit its caller gave cachefs.
                if let Some(nofile) = inherited.nofile {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &nofile) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                // The parent blocks the forwarded signals; the command must not start with
                // them blocked or Ctrl-C would not reach it.
                if libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        // Hold the lock across the spawn so a signal is either seen here as pending (and the
        // command never starts) or forwarded to the started child: never lost in between.
        let mut state = lock(&self.shared.state);
        if let Some(sig) = state.pending {
            return Started::Interrupted(sig);
        }
        state.program = cmd.get_program().to_string_lossy().into_owned();
        state.started = true;
        match cmd.spawn() {
            Ok(child) => {
                // Pids fit in i32 on Linux; `Child::id` is u32 only for portability.
                state.child = Some(Pid::from_raw(child.id() as libc::pid_t));
                Started::Running(child)
            }
            Err(err) => Started::Failed(err),
        }
    }

    /// Waits for the child to end and reaps it, without ever letting a forwarded signal
    /// reach a recycled pid.
    pub fn wait(&self, mut child: Child) -> io::Result<std::process::ExitStatus> {
        let pid = Pid::from_raw(child.id() as libc::pid_t);
        // WNOWAIT leaves the child a zombie: its pid stays reserved while we stop forwarding.
        loop {
            match waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
                Ok(_) => break,
                Err(Errno::EINTR) => continue,
                Err(err) => return Err(err.into()),
            }
        }
        lock(&self.shared.state).child = None;
        child.wait()
    }
}

fn forward_loop(shared: &Shared) {
    let set = forwarded_set();
    loop {
        // SAFETY: siginfo_t is plain data that sigwaitinfo fills in.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: both pointers are valid for the call.
        let rc = unsafe { libc::sigwaitinfo(set.as_ref(), &mut info) };
        if rc < 0 {
            if Errno::last() == Errno::EINTR {
                continue;
            }
            tracing::error!(error = %Errno::last(), "sigwaitinfo failed; signals are no longer forwarded");
            return;
        }
        let Ok(sig) = Signal::try_from(info.si_signo) else {
            continue;
        };
        handle(shared, sig, info.si_code);
    }
}

/// What to do with one received signal.
#[derive(Debug, PartialEq, Eq)]
enum Action {
    /// No child yet: remember it, the command will not be started.
    Pending,
    /// No child any more (cleanup is running): nothing to do.
    Ignore,
    /// The kernel already delivered it to the whole foreground process group, child
    /// included (typed at the terminal).
    AlreadyDelivered,
    Forward,
    /// A second SIGINT/SIGTERM: the child did not stop on the first one.
    Kill,
}

fn decide(state: &State, sig: Signal, si_code: i32) -> Action {
    let stop = matches!(sig, Signal::SIGINT | Signal::SIGTERM);
    match state.child {
        None if state.started => Action::Ignore,
        None => Action::Pending,
        Some(_) if stop && state.terminating => Action::Kill,
        Some(_)
            if si_code == libc::SI_KERNEL && matches!(sig, Signal::SIGINT | Signal::SIGQUIT) =>
        {
            Action::AlreadyDelivered
        }
        Some(_) => Action::Forward,
    }
}

fn handle(shared: &Shared, sig: Signal, si_code: i32) {
    let mut state = lock(&shared.state);
    let action = decide(&state, sig, si_code);
    tracing::debug!(signal = %sig, si_code, ?action, "signal received");
    match action {
        Action::Pending => {
            state.received = state.received.saturating_add(1);
            shared.wake.notify_all();
            if state.pending.is_none() {
                state.pending = Some(sig);
                shared.cancel.store(sig as i32, Ordering::Release);
                shared.wake.notify_all();
            }
        }
        Action::Ignore | Action::AlreadyDelivered => {}
        Action::Forward => {
            if let Some(pid) = state.child {
                if let Err(err) = kill(pid, sig) {
                    tracing::warn!(%pid, signal = %sig, %err, "forwarding a signal failed");
                }
                if matches!(sig, Signal::SIGINT | Signal::SIGTERM) {
                    state.terminating = true;
                }
            }
        }
        Action::Kill => {
            if let Some(pid) = state.child {
                super::print_error(format_args!(
                    "second {sig}: killing {} (pid {pid}) with SIGKILL",
                    state.program
                ));
                if let Err(err) = kill(pid, Signal::SIGKILL) {
                    tracing::warn!(%pid, %err, "SIGKILL failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const USER: i32 = libc::SI_USER;
    const KERNEL: i32 = libc::SI_KERNEL;

    fn running() -> State {
        State {
            child: Some(Pid::from_raw(4242)),
            started: true,
            program: "make".into(),
            ..State::default()
        }
    }

    #[test]
    fn before_the_child_starts_signals_are_kept() {
        assert_eq!(
            decide(&State::default(), Signal::SIGTERM, USER),
            Action::Pending
        );
        assert_eq!(
            decide(&State::default(), Signal::SIGINT, KERNEL),
            Action::Pending
        );
    }

    #[test]
    fn after_the_child_is_gone_signals_are_ignored() {
        let done = State {
            started: true,
            program: "make".into(),
            ..State::default()
        };
        assert_eq!(decide(&done, Signal::SIGTERM, USER), Action::Ignore);
    }

    #[test]
    fn terminal_signals_are_not_sent_twice() {
        let st = running();
        assert_eq!(
            decide(&st, Signal::SIGINT, KERNEL),
            Action::AlreadyDelivered
        );
        assert_eq!(
            decide(&st, Signal::SIGQUIT, KERNEL),
            Action::AlreadyDelivered
        );
        assert_eq!(decide(&st, Signal::SIGINT, USER), Action::Forward);
        // A hangup is forwarded whatever its origin.
        assert_eq!(decide(&st, Signal::SIGHUP, KERNEL), Action::Forward);
    }

    #[test]
    fn second_stop_signal_escalates() {
        let mut st = running();
        assert_eq!(decide(&st, Signal::SIGTERM, USER), Action::Forward);
        st.terminating = true;
        assert_eq!(decide(&st, Signal::SIGTERM, USER), Action::Kill);
        assert_eq!(decide(&st, Signal::SIGINT, KERNEL), Action::Kill);
        assert_eq!(decide(&st, Signal::SIGHUP, USER), Action::Forward);
    }
}
