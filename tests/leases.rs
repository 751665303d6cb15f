//! Sharing modes and background mounts end to end (issue 3): real `cachefs run` and
//! `cachefs mount` processes on real FUSE mounts, commands through `sh -c`.
//!
//! - locked: holders never overlap and waiters are served in arrival order; `--lock-timeout`
//!   and `lock-timeout=` give up with exit 75 naming the holder; a holder killed with SIGKILL
//!   lets the next one in at once.
//! - shared: concurrent mounts of one instance, concurrent writers, nothing lost.
//! - private: one instance per concurrent job, the most recently used free one reused, the
//!   `--max-instances` cap (a request past it waits).
//! - `cachefs mount` / `umount`: live when it returns, the lease freed when umount returns,
//!   busy mounts, `--lazy`, mounts of a `cachefs run` refused, dead mounts cleared.
//! - bad input: exit 2, one line on stderr, nothing left behind.
//!
//! Every wait is bounded. Background processes are stopped by guards when a test fails.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Bound on every wait for something to happen (a lease, a file, a process to end).
const T: Duration = Duration::from_secs(30);

/// Bound on one foreground cachefs command.
const CMD_T: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn code(out: &Output) -> i32 {
    out.status
        .code()
        .unwrap_or_else(|| panic!("cachefs itself died: {:?}\n{}", out.status, stderr_of(out)))
}

#[track_caller]
fn assert_code(out: &Output, expect: i32, what: &str) {
    assert_eq!(
        code(out),
        expect,
        "{what}\nstdout: {}\nstderr: {}",
        stdout_of(out),
        stderr_of(out)
    );
}

/// `cachefs --store STORE ARGS...`, collected with a timeout.
fn cachefs(env: &CliEnv, args: &[&str]) -> Output {
    let mut c = env.cmd();
    c.args(args);
    output_with_timeout(c, CMD_T)
}

/// `cachefs run [extra...] --mount SPEC... -- argv...`, collected with a timeout.
fn run(env: &CliEnv, extra: &[&str], specs: &[String], argv: &[&str]) -> Output {
    output_with_timeout(env.run_cmd(extra, specs, argv), CMD_T)
}

fn p(path: &Path) -> &str {
    path.to_str().expect("UTF-8 test path")
}

fn last_line(s: &str) -> &str {
    s.lines().last().unwrap_or("")
}

fn signal(pid: i32, sig: i32) {
    unsafe { libc::kill(pid, sig) };
}

/// Whether `pid` runs (a zombie has exited).
fn process_alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with(['Z', 'X']),
        Err(_) => false,
    }
}

fn cmdline(pid: i32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

fn comm(pid: i32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end().to_owned())
        .unwrap_or_default()
}

/// Every descendant of `pid`, children first.
fn descendants(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let Ok(tasks) = fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let Ok(text) = fs::read_to_string(t.path().join("children")) else {
                continue;
            };
            for c in text
                .split_whitespace()
                .filter_map(|s| s.parse::<i32>().ok())
            {
                out.push(c);
                todo.push(c);
            }
        }
    }
    out
}

/// Live processes of this test's store running `mount --foreground` (mount servers).
fn mount_servers(env: &CliEnv) -> Vec<i32> {
    let store = env.store.to_string_lossy().into_owned();
    let Ok(procs) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            let c = cmdline(pid);
            c.contains(&store) && c.contains("--foreground") && process_alive(pid)
        })
        .collect()
}

/// Bounded wait for a process that is not our child to end.
fn wait_gone(pid: i32, what: &str) {
    assert!(
        wait_until(T, || !process_alive(pid)),
        "{what} (pid {pid}) still runs"
    );
}

#[track_caller]
fn wait_for_file(path: &Path) {
    assert!(
        wait_until(T, || path.exists()),
        "{} did not appear",
        path.display()
    );
}

fn read_trim(path: &Path) -> String {
    fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .trim()
        .to_owned()
}

/// The clock job scripts and the test read: CLOCK_MONOTONIC through perl's Time::HiRes
/// where it exists (it does wherever git is installed), else the wall clock through `date`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Clock {
    Monotonic,
    Realtime,
}

impl Clock {
    fn get() -> Clock {
        static CLOCK: OnceLock<Clock> = OnceLock::new();
        *CLOCK.get_or_init(|| {
            let perl = Command::new("perl")
                .args(["-MTime::HiRes=clock_gettime,CLOCK_MONOTONIC", "-e", "1"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if perl {
                Clock::Monotonic
            } else {
                eprintln!("perl with Time::HiRes not found: job timestamps use the wall clock");
                Clock::Realtime
            }
        })
    }

    /// Defines `now` (nanoseconds) for a job script.
    fn shell_fn(self) -> &'static str {
        match self {
            Clock::Monotonic => {
                r#"now() { perl -MTime::HiRes=clock_gettime,CLOCK_MONOTONIC -e 'printf("%.0f\n", clock_gettime(CLOCK_MONOTONIC) * 1e9)'; }"#
            }
            Clock::Realtime => "now() { date +%s%N; }",
        }
    }

    fn now_ns(self) -> i128 {
        let id = match self {
            Clock::Monotonic => libc::CLOCK_MONOTONIC,
            Clock::Realtime => libc::CLOCK_REALTIME,
        };
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        cvt(unsafe { libc::clock_gettime(id, &mut ts) }).unwrap();
        i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
    }
}

/// Shell functions for job scripts: `now`, and bounded waits that exit 90/91 when the test
/// never gives the go (so a failed test cannot leave a job waiting forever).
fn prelude() -> String {
    format!(
        r#"{}
wait_for() {{ i=0; while [ ! -e "$1" ]; do i=$((i+1)); if [ "$i" -gt 1200 ]; then echo "gave up waiting for $1" >&2; exit 90; fi; sleep 0.05; done; }}
wait_count() {{ i=0; while [ "$(ls -A "$1" | grep -c "$2")" -lt "$3" ]; do i=$((i+1)); if [ "$i" -gt 1200 ]; then echo "gave up waiting for $3 of $2 in $1" >&2; exit 91; fi; sleep 0.05; done; }}
"#,
        Clock::get().shell_fn()
    )
}

/// A background process (a `cachefs` command or a plain one). Dropping it (also when a test
/// fails) sends SIGTERM, which ends a run's command and unmounts, or ends a mount server;
/// SIGKILL if that does not work; then kills what was left of a process killed on purpose.
struct Bg {
    child: Child,
    name: String,
    stdout: PathBuf,
    stderr: PathBuf,
    /// Descendants of a cachefs killed with SIGKILL (its command): killed on drop.
    orphans: Vec<i32>,
}

impl Bg {
    fn spawn(env: &CliEnv, name: &str, mut cmd: Command) -> Bg {
        let stdout = env.path(&format!("{name}.stdout"));
        let stderr = env.path(&format!("{name}.stderr"));
        cmd.stdin(Stdio::null())
            .stdout(fs::File::create(&stdout).unwrap())
            .stderr(fs::File::create(&stderr).unwrap());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Bg {
            child,
            name: name.to_owned(),
            stdout,
            stderr,
            orphans: Vec::new(),
        }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn stdout(&self) -> String {
        fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits (bounded) for the exit code; panics if it does not end or dies of a signal.
    fn exit_code(&mut self) -> i32 {
        let mut status = None;
        let done = wait_until(T, || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        assert!(done, "{} did not end; stderr: {}", self.name, self.stderr());
        let status = status.unwrap();
        status
            .code()
            .unwrap_or_else(|| panic!("{} died: {status:?}; stderr: {}", self.name, self.stderr()))
    }

    /// Waits for exit 0.
    #[track_caller]
    fn assert_success(&mut self) {
        let c = self.exit_code();
        assert_eq!(
            c,
            0,
            "{} exited {c}\nstdout: {}\nstderr: {}",
            self.name,
            self.stdout(),
            self.stderr()
        );
    }

    /// Waits (bounded) until stderr contains `needle`; returns stderr.
    #[track_caller]
    fn wait_stderr(&mut self, needle: &str) -> String {
        let mut text = String::new();
        let ok = wait_until(T, || {
            text = self.stderr();
            text.contains(needle)
        });
        if !ok {
            let running = self.running();
            panic!(
                "{}: no {needle:?} on stderr (running: {running}): {text}",
                self.name
            );
        }
        text
    }

    /// SIGKILL, as a crash would. Its descendants (the command of a run) are remembered, to
    /// be killed later; not fusermount3's auto-unmount helper, whose job starts now.
    fn sigkill(&mut self) {
        self.orphans.extend(
            descendants(self.pid())
                .into_iter()
                .filter(|&p| process_alive(p) && comm(p) != "fusermount3"),
        );
        signal(self.pid(), libc::SIGKILL);
        let _ = self.child.wait();
    }

    fn kill_orphans(&mut self) {
        for pid in self.orphans.drain(..) {
            signal(pid, libc::SIGKILL);
        }
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if self.running() {
            signal(self.pid(), libc::SIGTERM);
            if !wait_until(Duration::from_secs(15), || {
                matches!(self.child.try_wait(), Ok(Some(_)))
            }) {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        self.kill_orphans();
    }
}

/// `cachefs run [extra] --mount SPEC... -- argv...` in the background.
fn spawn_run(env: &CliEnv, name: &str, extra: &[&str], specs: &[String], argv: &[&str]) -> Bg {
    Bg::spawn(env, name, env.run_cmd(extra, specs, argv))
}

/// `cachefs run [extra] --mount SPEC... -- sh -c PRELUDE+BODY` in the background.
fn spawn_sh(env: &CliEnv, name: &str, extra: &[&str], specs: &[String], body: &str) -> Bg {
    let script = format!("{}{body}", prelude());
    spawn_run(env, name, extra, specs, &["sh", "-c", &script])
}

/// A mount server (started by `cachefs mount`, not our child): SIGTERM on drop (it unmounts
/// and releases its lease), SIGKILL if it does not end.
struct ServerGuard {
    pid: i32,
    store: String,
}

impl ServerGuard {
    fn ours(&self) -> bool {
        process_alive(self.pid) && cmdline(self.pid).contains(&self.store)
    }
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        if self.ours() {
            signal(self.pid, libc::SIGTERM);
            if !wait_until(Duration::from_secs(15), || !process_alive(self.pid)) && self.ours() {
                signal(self.pid, libc::SIGKILL);
            }
        }
    }
}

fn server_guard(env: &CliEnv, pid: i32) -> ServerGuard {
    ServerGuard {
        pid,
        store: env.store.to_string_lossy().into_owned(),
    }
}

/// `cachefs ls --json ID`: the live leases of one cache.
#[track_caller]
fn leases(env: &CliEnv, id: &str) -> Vec<Value> {
    let out = cachefs(env, &["ls", "--json", id]);
    assert_code(&out, 0, "ls --json");
    match serde_json::from_str(&stdout_of(&out)) {
        Ok(Value::Array(rows)) => rows,
        other => panic!("ls --json: {other:?}: {}", stdout_of(&out)),
    }
}

fn field_i64(v: &Value, key: &str) -> i64 {
    v[key]
        .as_i64()
        .unwrap_or_else(|| panic!("no number {key} in {v}"))
}

/// Waits (bounded) until the cache `id` has a lease of cachefs process `pid` in `state`
/// (held or waiting); returns its row.
///
/// Call it only once the request has joined its queue (it mounted, or printed its waiting
/// line): an `ls` that runs while a request is still joining can drop the request's record
/// (see `ls_while_a_request_joins_keeps_its_record`).
#[track_caller]
fn wait_lease(env: &CliEnv, id: &str, job: &mut Bg, state: &str) -> Value {
    let deadline = Instant::now() + T;
    loop {
        let rows = leases(env, id);
        if let Some(r) = rows
            .iter()
            .find(|r| field_i64(r, "pid") == i64::from(job.pid()) && r["state"] == state)
        {
            return r.clone();
        }
        assert!(
            job.running(),
            "{} ended before its lease was {state}: {}",
            job.name,
            job.stderr()
        );
        assert!(
            Instant::now() < deadline,
            "{}: no {state} lease on {id:?} within {T:?}: {rows:?}\nstderr: {}",
            job.name,
            job.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (bounded) until `job` (a run or a mount server) has mounted `target`: its lease is
/// granted.
#[track_caller]
fn wait_mounted(job: &mut Bg, target: &Path) {
    let pid = job.pid() as u32;
    let ok = wait_until(T, || cachefs_mounted_for(pid, target));
    if !ok {
        let running = job.running();
        panic!(
            "{}: {} not mounted (running: {running}): {}",
            job.name,
            target.display(),
            job.stderr()
        );
    }
}

/// The pid of the mount server serving `target`, from `ls --json`.
#[track_caller]
fn server_of(env: &CliEnv, id: &str, target: &Path) -> i32 {
    let rows = leases(env, id);
    let row = rows
        .iter()
        .find(|r| r["target"] == p(target))
        .unwrap_or_else(|| panic!("no lease for {} in {rows:?}", target.display()));
    assert_eq!(row["kind"], "mount", "{row}");
    assert_eq!(row["state"], "held", "{row}");
    field_i64(row, "pid") as i32
}

/// Instance directories of one cache: STORE/caches/<key>/<n>.
fn instances_of(env: &CliEnv, id: &str) -> Vec<PathBuf> {
    env.instance_dirs()
        .into_iter()
        .filter(|d| {
            d.parent()
                .and_then(|k| k.file_name())
                .and_then(|k| k.to_str())
                .is_some_and(|k| k.starts_with(&format!("{id}-")))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// locked
// ---------------------------------------------------------------------------------------------

/// Four locked jobs queued one after another: they run one at a time, in arrival order, on
/// one instance, each finding what the one before it left. Job 0 holds the cache until all
/// four are queued, so jobs 1–3 really wait in line.
#[test]
fn locked_jobs_run_one_at_a_time_in_arrival_order() {
    let env = CliEnv::new();
    let go = env.path("go");
    let mut jobs: Vec<Bg> = Vec::new();
    for k in 0..4 {
        let t = env.path(&format!("t{k}"));
        let t = p(&t);
        let gate = if k == 0 {
            format!("wait_for '{}'\n", p(&go))
        } else {
            String::new()
        };
        let saw = if k == 0 {
            "saw=first".to_string()
        } else {
            format!(
                "if [ \"$(cat '{t}/job{prev}' 2>/dev/null)\" = {prev} ]; then saw=yes; else saw=no; fi",
                prev = k - 1
            )
        };
        let body = format!(
            "{gate}echo \"start {k} $(now)\" >> '{t}/log'\n{saw}\nsleep 0.2\n\
             echo {k} > '{t}/job{k}'\necho \"end {k} $(now) $saw\" >> '{t}/log'\n"
        );
        let mut job = spawn_sh(
            &env,
            &format!("job{k}"),
            &[],
            &[spec("L", Path::new(t), "sharing=locked")],
            &body,
        );
        // The next job starts only once this one is in the queue: arrival order is known.
        let state = if k == 0 {
            wait_mounted(&mut job, Path::new(t));
            "held"
        } else {
            job.wait_stderr("waiting for cache");
            "waiting"
        };
        let row = wait_lease(&env, "L", &mut job, state);
        assert_eq!(row["sharing"], "locked");
        assert_eq!(row["kind"], "run");
        assert_eq!(row["instance"], 1);
        if k > 0 {
            assert_eq!(row["position"], k, "job{k}'s place in the queue: {row}");
        }
        jobs.push(job);
    }
    // Each waiter said who holds the cache and how many wait ahead of it.
    let holder = jobs[0].pid();
    for (k, job) in jobs.iter_mut().enumerate().skip(1) {
        let err = job.wait_stderr("waiting for cache");
        let line = err.lines().next().unwrap();
        assert!(
            line.starts_with(&format!(
                "cachefs: waiting for cache \"L\" (sharing=locked, instance 1): held by pid {holder} ("
            )),
            "job{k}: {line}"
        );
        let ahead = match k {
            1 => None,
            2 => Some("; 1 request waits ahead"),
            _ => Some("; 2 requests wait ahead"),
        };
        match ahead {
            Some(a) => assert!(line.contains(a), "job{k}: {line}"),
            None => assert!(!line.contains("wait ahead"), "job{k}: {line}"),
        }
    }
    // Nobody has started but job 0 (which waits for the go).
    assert_eq!(env.find_in_caches("log").len(), 0, "a waiter ran early");
    fs::write(&go, b"").unwrap();
    for job in &mut jobs {
        job.assert_success();
        let err = job.stderr();
        assert!(
            err.lines()
                .all(|l| l.starts_with("cachefs: waiting for cache \"L\"")),
            "{}: {err}",
            job.name
        );
    }
    assert_no_mounts_under(env.dir.path());

    let inst = instances_of(&env, "L");
    assert_eq!(inst.len(), 1, "locked uses one instance: {inst:?}");
    let log = fs::read_to_string(inst[0].join("log")).unwrap();
    let events: Vec<(String, u32, i128, String)> = log
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (
                f[0].to_owned(),
                f[1].parse().unwrap(),
                f[2].parse()
                    .unwrap_or_else(|e| panic!("timestamp in {l:?}: {e}")),
                f.get(3).map(|s| (*s).to_owned()).unwrap_or_default(),
            )
        })
        .collect();
    let order: Vec<(&str, u32)> = events.iter().map(|e| (e.0.as_str(), e.1)).collect();
    let expected: Vec<(&str, u32)> = (0..4).flat_map(|k| [("start", k), ("end", k)]).collect();
    assert_eq!(order, expected, "one at a time, in arrival order:\n{log}");
    for w in events.windows(2) {
        assert!(
            w[0].2 <= w[1].2,
            "intervals overlap or time ran backwards:\n{log}"
        );
    }
    for k in 1..4 {
        assert_eq!(
            events[2 * k + 1].3,
            "yes",
            "job{k} must see job{}'s file in the one instance:\n{log}",
            k - 1
        );
    }
    assert!(leases(&env, "L").is_empty(), "leases left behind");
}

/// `--lock-timeout` and `lock-timeout=` give up with exit 75 and one line naming the holder;
/// `--lock-timeout 0` fails at once when busy and succeeds at once when free.
#[test]
fn lock_timeout_gives_up_with_75_naming_the_holder() {
    let env = CliEnv::new();
    let (t0, t1) = (env.path("held"), env.path("refused"));
    let mut holder = spawn_run(
        &env,
        "holder",
        &[],
        &[spec("W", &t0, "sharing=locked")],
        &["sleep", "30"],
    );
    wait_mounted(&mut holder, &t0);
    wait_lease(&env, "W", &mut holder, "held");
    let hp = holder.pid();

    let gave_up = |out: &Output, what: &str| {
        assert_code(out, 75, what);
        let err = stderr_of(out);
        assert_eq!(stdout_of(out), "", "{what}: the command must not run");
        let last = last_line(&err);
        assert!(
            last.starts_with("cachefs: gave up waiting for cache \"W\" (sharing=locked)"),
            "{what}: {err}"
        );
        assert!(
            last.contains(&format!("pid {hp} (sleep 30, locked)")),
            "{what}: the holder's pid and command: {last}"
        );
        assert!(
            err.lines().all(|l| l.starts_with("cachefs: ")),
            "{what}: {err}"
        );
        err
    };

    let out = run(
        &env,
        &["--lock-timeout", "1s"],
        &[spec("W", &t1, "sharing=locked")],
        &["echo", "ran"],
    );
    gave_up(&out, "--lock-timeout 1s");

    let out = run(
        &env,
        &[],
        &[spec("W", &t1, "sharing=locked,lock-timeout=1s")],
        &["echo", "ran"],
    );
    gave_up(&out, "lock-timeout=1s in the spec");

    // The spec's own timeout wins over the option.
    let out = run(
        &env,
        &["--lock-timeout", "1h"],
        &[spec("W", &t1, "sharing=locked,lock-timeout=1s")],
        &["echo", "ran"],
    );
    gave_up(&out, "lock-timeout=1s with --lock-timeout 1h");

    // 0: no wait at all, so no waiting line either.
    let out = run(
        &env,
        &["--lock-timeout", "0"],
        &[spec("W", &t1, "sharing=locked")],
        &["echo", "ran"],
    );
    let err = gave_up(&out, "--lock-timeout 0 while busy");
    assert_eq!(err.lines().count(), 1, "{err}");

    assert!(!t1.exists(), "a refused run must not create its target");
    assert!(!is_mounted(&t1));
    let rows = leases(&env, "W");
    assert_eq!(rows.len(), 1, "the refused requests left rows: {rows:?}");

    signal(hp, libc::SIGTERM);
    assert_eq!(holder.exit_code(), 143, "{}", holder.stderr());
    let out = run(
        &env,
        &["--lock-timeout", "0"],
        &[spec("W", &t1, "sharing=locked")],
        &["echo", "ran"],
    );
    assert_code(&out, 0, "--lock-timeout 0 while free");
    assert_eq!(stdout_of(&out), "ran\n");
    assert_eq!(stderr_of(&out), "");
    assert_no_mounts_under(env.dir.path());
}

/// A locked holder killed with SIGKILL lets the waiter in at once (the kernel drops the
/// dead process's flock), and its mount does not stay behind.
#[test]
fn sigkilled_locked_holder_lets_the_waiter_in_at_once() {
    let env = CliEnv::new();
    let clock = Clock::get();
    let (t0, t1) = (env.path("t0"), env.path("t1"));
    let (ready, started) = (env.path("ready"), env.path("started"));
    let mut holder = spawn_sh(
        &env,
        "holder",
        &[],
        &[spec("K", &t0, "sharing=locked")],
        &format!(
            "echo from-holder > '{}/h'; touch '{}'; exec sleep 600",
            p(&t0),
            p(&ready)
        ),
    );
    wait_for_file(&ready);
    wait_lease(&env, "K", &mut holder, "held");
    let mut waiter = spawn_sh(
        &env,
        "waiter",
        &[],
        &[spec("K", &t1, "sharing=locked")],
        &format!(
            "t=$(now); cat '{t}/h' > '{t}/seen'; echo \"$t\" > '{s}'",
            t = p(&t1),
            s = p(&started)
        ),
    );
    waiter.wait_stderr(&format!("held by pid {}", holder.pid()));
    wait_lease(&env, "K", &mut waiter, "waiting");

    let killed_at = clock.now_ns();
    holder.sigkill();
    wait_for_file(&started);
    // The shell writes the number in two steps: wait until it is whole.
    let mut text = String::new();
    assert!(
        wait_until(T, || {
            text = fs::read_to_string(&started).unwrap_or_default();
            text.ends_with('\n')
        }),
        "{text:?}"
    );
    let start: i128 = text.trim().parse().unwrap();
    let delay = Duration::from_nanos(u64::try_from(start - killed_at).unwrap_or(0));
    assert!(
        start >= killed_at,
        "the waiter started before the holder was killed"
    );
    assert!(
        delay < Duration::from_secs(1),
        "the waiter started {delay:?} after the holder was killed with SIGKILL"
    );
    waiter.assert_success();
    // Before the orphaned `sleep` ends: the lease must not depend on it.
    holder.kill_orphans();
    let seen = env.find_in_caches("seen");
    assert_eq!(seen.len(), 1);
    assert_eq!(read_trim(&seen[0]), "from-holder");
    assert!(
        wait_until(Duration::from_secs(15), || !is_mounted(&t0)),
        "the killed holder's mount is still there"
    );
    assert!(
        fs::read_dir(&t0).is_ok(),
        "no dead mount at {}",
        t0.display()
    );
    assert_no_mounts_under(env.dir.path());
    assert!(leases(&env, "K").is_empty());
}

/// A `cachefs mount` server killed with SIGKILL frees the lease and leaves no dead mount once
/// a cachefs command has been used on its target.
#[test]
fn sigkilled_mount_server_frees_the_lease_and_its_target() {
    let env = CliEnv::new();
    let (t, t2) = (env.path("m"), env.path("other"));
    let out = cachefs(&env, &["mount", "--id", "M", "--sharing", "locked", p(&t)]);
    assert_code(&out, 0, "mount");
    let server = server_of(&env, "M", &t);
    let _guard = server_guard(&env, server);
    assert!(
        cmdline(server).contains("--foreground"),
        "{}",
        cmdline(server)
    );
    fs::write(t.join("f"), b"mounted").unwrap();

    signal(server, libc::SIGKILL);
    wait_gone(server, "the killed mount server");

    let out = run(
        &env,
        &[],
        &[spec("M", &t2, "sharing=locked,lock-timeout=2s")],
        &["cat", p(&t2.join("f"))],
    );
    assert_code(&out, 0, "a locked run after the server was killed");
    assert_eq!(stdout_of(&out), "mounted");

    let out = cachefs(&env, &["mount", "--id", "M", "--sharing", "locked", p(&t)]);
    assert_code(&out, 0, "mount again at the same target");
    assert_eq!(fs::read(t.join("f")).unwrap(), b"mounted");
    let out = cachefs(&env, &["umount", p(&t)]);
    assert_code(&out, 0, "umount");
    assert!(!is_mounted(&t), "{} still in mountinfo", t.display());
    stat(&t).unwrap_or_else(|e| panic!("stat {}: {e}", t.display()));
    assert_no_mounts_under(env.dir.path());
    assert!(mount_servers(&env).is_empty());
}

/// Whether strace can run a traced child here with a syscall delay injected.
fn strace_injects() -> bool {
    Command::new("strace")
        .args(["-f", "-qq", "-o", "/dev/null"])
        .args([
            "-e",
            "inject=rename,renameat,renameat2:delay_enter=1",
            "true",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether some request of this store has a ticket under its temporary name: it has written
/// its lease row and not yet renamed its ticket into the queue.
fn ticket_being_made(env: &CliEnv) -> bool {
    let Ok(caches) = fs::read_dir(env.store.join("leases")) else {
        return false;
    };
    caches.flatten().any(|c| {
        fs::read_dir(c.path()).is_ok_and(|queues| {
            queues.flatten().any(|q| {
                fs::read_dir(q.path()).is_ok_and(|tickets| {
                    tickets
                        .flatten()
                        .any(|t| t.file_name().to_string_lossy().starts_with(".new-"))
                })
            })
        })
    })
}

/// `cachefs ls` run while a request is joining a queue must not drop the request's record.
/// Joining writes the lease row first and renames the locked ticket into the queue second;
/// strace delays that rename by a second, so the `ls` lands between the two every time.
/// (Without the delay the window is tiny, but a test that polls `ls` on a loaded machine hits
/// it now and then.)
#[test]
fn ls_while_a_request_joins_keeps_its_record() {
    if skip_unless_root("ls_while_a_request_joins_keeps_its_record") {
        return;
    }
    if !strace_injects() {
        eprintln!(
            "ls_while_a_request_joins_keeps_its_record: skipped, strace cannot inject delays"
        );
        return;
    }
    let env = CliEnv::new();
    let (t0, t1) = (env.path("held"), env.path("joining"));
    let mut holder = spawn_run(
        &env,
        "holder",
        &[],
        &[spec("J", &t0, "sharing=locked")],
        &["sleep", "30"],
    );
    wait_mounted(&mut holder, &t0);
    let mut c = Command::new("strace");
    c.args(["-f", "-qq", "-o", "/dev/null"])
        .args(["-e", "inject=rename,renameat,renameat2:delay_enter=1000000"])
        .arg(cachefs_bin())
        .args(["--store", p(&env.store), "run", "--mount"])
        .arg(spec("J", &t1, "sharing=locked"))
        .args(["--", "true"])
        .env_remove("CACHEFS_STORE")
        .env_remove("RUST_LOG");
    let mut waiter = Bg::spawn(&env, "waiter", c);
    assert!(
        wait_until(T, || ticket_being_made(&env)),
        "the request never started to join: {}",
        waiter.stderr()
    );
    let during = leases(&env, "J");
    waiter.wait_stderr("waiting for cache");
    let after = leases(&env, "J");

    signal(holder.pid(), libc::SIGTERM);
    assert_eq!(holder.exit_code(), 143, "{}", holder.stderr());
    waiter.assert_success();
    let states: Vec<&Value> = after.iter().map(|r| &r["state"]).collect();
    assert_eq!(
        states,
        ["held", "waiting"],
        "the waiting request's record is gone after an ls ran while it joined\n\
         ls during the join: {during:?}\nls after: {after:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// shared
// ---------------------------------------------------------------------------------------------

/// Four shared jobs overlap: each waits, through its own mount, until all four have left
/// their marker, then writes; each sees everyone's files.
#[test]
fn shared_jobs_overlap_and_see_each_other() {
    let env = CliEnv::new();
    let mut jobs = Vec::new();
    for k in 0..4 {
        let t = env.path(&format!("t{k}"));
        let t = p(&t);
        let body = format!(
            "touch '{t}/marker{k}'\nwait_count '{t}' '^marker' 4\n\
             echo {k} > '{t}/after{k}'\nwait_count '{t}' '^after' 4\n\
             ls '{t}' | tr '\\n' ' '; cat '{t}'/after* | tr -d '\\n'\n"
        );
        jobs.push(spawn_sh(
            &env,
            &format!("job{k}"),
            &[],
            &[spec("S", Path::new(t), "sharing=shared")],
            &body,
        ));
    }
    for job in &mut jobs {
        job.assert_success();
        assert_eq!(
            job.stdout(),
            "after0 after1 after2 after3 marker0 marker1 marker2 marker3 0123",
            "{}: {}",
            job.name,
            job.stderr()
        );
        assert_eq!(job.stderr(), "", "{}", job.name);
    }
    assert_eq!(instances_of(&env, "S").len(), 1);
    assert_no_mounts_under(env.dir.path());
}

/// Four shared jobs write 50 random files each into one directory at once; a later run reads
/// every file back through a new mount and checks it against the writers' manifests.
#[test]
fn shared_concurrent_writers_lose_nothing() {
    let env = CliEnv::new();
    let mut jobs = Vec::new();
    for k in 0..4 {
        let t = env.path(&format!("t{k}"));
        let t = p(&t);
        let manifest = env.path(&format!("manifest{k}"));
        // The hash is of the bytes written (tee), not of a re-read through the mount.
        let body = format!(
            "mkdir -p '{t}/data'\ntouch '{t}/ready{k}'\nwait_count '{t}' '^ready' 4\n\
             i=0\nwhile [ $i -lt 50 ]; do\n\
               f='{t}/data/f_{k}_'$i\n\
               h=$(head -c 100000 /dev/urandom | tee \"$f\" | sha256sum | cut -d' ' -f1) || exit 3\n\
               [ \"$(stat -c %s \"$f\")\" = 100000 ] || exit 4\n\
               echo \"$h  data/f_{k}_$i\" >> '{m}'\n\
               i=$((i+1))\n\
             done\n",
            m = p(&manifest)
        );
        jobs.push(spawn_sh(
            &env,
            &format!("writer{k}"),
            &[],
            &[spec("W", Path::new(t), "sharing=shared")],
            &body,
        ));
    }
    for job in &mut jobs {
        job.assert_success();
    }
    let tv = env.path("verify");
    let manifests: Vec<String> = (0..4)
        .map(|k| p(&env.path(&format!("manifest{k}"))).to_owned())
        .collect();
    for m in &manifests {
        assert_eq!(fs::read_to_string(m).unwrap().lines().count(), 50, "{m}");
    }
    let out = run(
        &env,
        &[],
        &[spec("W", &tv, "sharing=shared")],
        &[
            "sh",
            "-c",
            &format!(
                "cd '{}' && ls data | wc -l && cat {} | sha256sum -c --quiet",
                p(&tv),
                manifests
                    .iter()
                    .map(|m| format!("'{m}'"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        ],
    );
    assert_code(&out, 0, "every file matches its manifest");
    assert_eq!(stdout_of(&out).trim(), "200");
    assert_eq!(instances_of(&env, "W").len(), 1);
    assert_no_mounts_under(env.dir.path());
}

// ---------------------------------------------------------------------------------------------
// private
// ---------------------------------------------------------------------------------------------

/// A private job that writes `marker<name>` into its cache, says it is ready and holds the
/// cache until `release<name>` exists; prints what it found in the cache first.
fn private_job(env: &CliEnv, id: &str, name: &str, extra: &[&str]) -> Bg {
    let t = env.path(&format!("t-{name}"));
    let body = format!(
        "ls -A '{t}' | tr '\\n' ' '\necho {name} > '{t}/marker-{name}'\ntouch '{r}'\nwait_for '{rel}'\n",
        t = p(&t),
        r = p(&env.path(&format!("ready-{name}"))),
        rel = p(&env.path(&format!("release-{name}"))),
    );
    spawn_sh(env, name, extra, &[spec(id, &t, "sharing=private")], &body)
}

fn release(env: &CliEnv, name: &str) {
    fs::write(env.path(&format!("release-{name}")), b"").unwrap();
}

/// The instance number each job's lease is on, from `ls --json`.
fn instance_of(env: &CliEnv, id: &str, job: &Bg) -> i64 {
    let rows = leases(env, id);
    let row = rows
        .iter()
        .find(|r| field_i64(r, "pid") == i64::from(job.pid()))
        .unwrap_or_else(|| panic!("{} has no lease: {rows:?}", job.name));
    field_i64(row, "instance")
}

/// Three concurrent private jobs get three instances; a later one gets the instance used
/// most recently (released last).
#[test]
fn private_jobs_get_their_own_instances_and_reuse_the_latest() {
    let env = CliEnv::new();
    let names = ["a", "b", "c"];
    let mut jobs = Vec::new();
    for name in names {
        let mut job = private_job(&env, "P", name, &[]);
        wait_for_file(&env.path(&format!("ready-{name}")));
        wait_lease(&env, "P", &mut job, "held");
        jobs.push(job);
    }
    let inst: Vec<i64> = jobs.iter().map(|j| instance_of(&env, "P", j)).collect();
    assert_eq!(inst, [1, 2, 3], "one instance per concurrent private job");
    for job in &jobs {
        assert_eq!(job.stdout(), "", "{}: a new instance is empty", job.name);
    }
    let dirs = instances_of(&env, "P");
    assert_eq!(dirs.len(), 3, "{dirs:?}");
    let mut markers: Vec<Vec<String>> = dirs.iter().map(|d| dir_names(d)).collect();
    markers.sort();
    assert_eq!(
        markers,
        [["marker-a"], ["marker-b"], ["marker-c"]],
        "each instance holds its own job's marker"
    );
    // `inspect` agrees.
    let out = cachefs(&env, &["inspect", "--json", "P"]);
    assert_code(&out, 0, "inspect");
    let v: Value = serde_json::from_str(&stdout_of(&out)).unwrap();
    let numbers: Vec<i64> = v["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| field_i64(i, "number"))
        .collect();
    assert_eq!(numbers, [1, 2, 3], "{v}");

    // Release c, a, b in that order, more than a second apart (last use has 1 s resolution):
    // b's instance is then the most recently used.
    for (n, name) in ["c", "a", "b"].into_iter().enumerate() {
        if n > 0 {
            std::thread::sleep(Duration::from_millis(1300));
        }
        release(&env, name);
        let job = &mut jobs[names.iter().position(|x| *x == name).unwrap()];
        job.assert_success();
    }
    let mut later = private_job(&env, "P", "later", &[]);
    wait_for_file(&env.path("ready-later"));
    assert_eq!(
        instance_of(&env, "P", &later),
        2,
        "the later job gets b's instance"
    );
    assert_eq!(later.stdout(), "marker-b ", "what the later job found");
    release(&env, "later");
    later.assert_success();
    assert_eq!(instances_of(&env, "P").len(), 3, "no new instance");
    assert_no_mounts_under(env.dir.path());
}

/// With `--max-instances 2`, a third concurrent private job waits (saying so) on one of the
/// two instances and proceeds when that instance's job ends; no third instance appears.
#[test]
fn private_cap_makes_the_third_job_wait() {
    let env = CliEnv::new();
    let cap = ["--max-instances", "2"];
    let mut a = private_job(&env, "C", "a", &cap);
    wait_for_file(&env.path("ready-a"));
    let mut b = private_job(&env, "C", "b", &cap);
    wait_for_file(&env.path("ready-b"));
    wait_lease(&env, "C", &mut a, "held");
    wait_lease(&env, "C", &mut b, "held");

    let mut c = private_job(&env, "C", "c", &cap);
    let err = c.wait_stderr("waiting for cache");
    let row = wait_lease(&env, "C", &mut c, "waiting");
    let on = field_i64(&row, "instance");
    assert!(
        err.starts_with(&format!(
            "cachefs: waiting for cache \"C\" (sharing=private, instance {on}): held by pid "
        )),
        "{err}"
    );
    assert!(!env.path("ready-c").exists(), "c must wait");
    assert_eq!(instances_of(&env, "C").len(), 2);

    // Release the job holding the instance c waits for; the other one keeps its own.
    let (first, second) = if instance_of(&env, "C", &a) == on {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    assert!(
        err.contains(&format!("held by pid {} (", first.pid())),
        "{err}"
    );
    release(&env, &first.name.clone());
    first.assert_success();
    wait_for_file(&env.path("ready-c"));
    assert_eq!(
        c.stdout(),
        format!("marker-{} ", first.name),
        "c got the instance {} used",
        first.name
    );
    assert_eq!(instance_of(&env, "C", &c), on);
    assert_eq!(instances_of(&env, "C").len(), 2, "no third instance");
    release(&env, &second.name.clone());
    second.assert_success();
    release(&env, "c");
    c.assert_success();
    assert_eq!(instances_of(&env, "C").len(), 2, "no third instance");
    assert_no_mounts_under(env.dir.path());
}

// ---------------------------------------------------------------------------------------------
// mount / umount
// ---------------------------------------------------------------------------------------------

/// `cachefs mount` returns once the mount is live; `cachefs umount` returns once the server
/// is gone and the lease free.
#[test]
fn mount_is_live_on_return_and_umount_frees_the_lease() {
    let env = CliEnv::new();
    let t = env.path("m");
    let out = cachefs(&env, &["mount", "--id", "X", p(&t)]);
    assert_code(&out, 0, "mount");
    assert_eq!(stdout_of(&out), "");
    assert_eq!(stderr_of(&out), "");
    assert_eq!(
        mount_fstype(&t).as_deref(),
        Some("fuse.cachefs"),
        "live when mount returns"
    );
    let server = server_of(&env, "X", &t);
    let _guard = server_guard(&env, server);
    fs::write(t.join("hello"), b"through the mount").unwrap();
    let found = env.find_in_caches("hello");
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(fs::read(&found[0]).unwrap(), b"through the mount");
    assert_eq!(instances_of(&env, "X").len(), 1);

    let out = cachefs(&env, &["umount", p(&t)]);
    assert_code(&out, 0, "umount");
    assert_eq!(stderr_of(&out), "");
    assert!(!is_mounted(&t));
    assert!(
        !process_alive(server),
        "umount returned while the server still runs"
    );
    // The lease is free right away.
    let t2 = env.path("after");
    let out = run(
        &env,
        &["--lock-timeout", "0"],
        &[spec("X", &t2, "sharing=locked")],
        &["cat", p(&t2.join("hello"))],
    );
    assert_code(&out, 0, "a locked run right after umount");
    assert_eq!(stdout_of(&out), "through the mount");
    assert_no_mounts_under(env.dir.path());
}

/// `cachefs mount --mount SPEC`: the Dockerfile form.
#[test]
fn mount_with_a_spec() {
    let env = CliEnv::new();
    let t = env.path("spec-target");
    let out = cachefs(
        &env,
        &["mount", "--mount", &spec("Y", &t, "sharing=locked")],
    );
    assert_code(&out, 0, "mount --mount");
    assert_eq!(mount_fstype(&t).as_deref(), Some("fuse.cachefs"));
    let server = server_of(&env, "Y", &t);
    let _guard = server_guard(&env, server);
    let rows = leases(&env, "Y");
    assert_eq!(rows[0]["sharing"], "locked", "{rows:?}");
    fs::write(t.join("y"), b"y").unwrap();
    assert_eq!(env.find_in_caches("y").len(), 1);
    let out = cachefs(&env, &["umount", p(&t)]);
    assert_code(&out, 0, "umount");
    assert!(!is_mounted(&t));
    assert!(leases(&env, "Y").is_empty());
}

/// A locked `cachefs mount` that times out exits 75 and leaves no mount, no target, no server
/// and no lease request behind.
#[test]
fn mount_lock_timeout_exits_75_and_leaves_nothing() {
    let env = CliEnv::new();
    let (t0, t) = (env.path("held"), env.path("m"));
    let mut holder = spawn_run(
        &env,
        "holder",
        &[],
        &[spec("X", &t0, "sharing=locked")],
        &["sleep", "30"],
    );
    wait_mounted(&mut holder, &t0);
    wait_lease(&env, "X", &mut holder, "held");
    let out = cachefs(
        &env,
        &[
            "mount",
            "--id",
            "X",
            "--sharing",
            "locked",
            "--lock-timeout",
            "1s",
            p(&t),
        ],
    );
    assert_code(&out, 75, "mount past its lock timeout");
    let err = stderr_of(&out);
    let last = last_line(&err);
    assert!(
        last.starts_with("cachefs: gave up waiting for cache \"X\" (sharing=locked)"),
        "{err}"
    );
    assert!(
        last.contains(&format!("pid {} (sleep 30, locked)", holder.pid())),
        "{err}"
    );
    assert!(!is_mounted(&t));
    assert!(!t.exists(), "the target must not be created");
    assert!(mount_servers(&env).is_empty(), "a mount server still runs");
    let rows = leases(&env, "X");
    assert_eq!(rows.len(), 1, "only the holder: {rows:?}");
    signal(holder.pid(), libc::SIGTERM);
    assert_eq!(holder.exit_code(), 143);
    assert_no_mounts_under(env.dir.path());
}

/// A busy mount (a process has a file open in it) is refused with exit 1 and a line naming
/// that process; `--lazy` detaches it at once, and the server ends (freeing the lease) when
/// the last user lets go.
#[test]
fn umount_of_a_busy_mount_names_the_user_then_lazy_detaches() {
    let env = CliEnv::new();
    let t = env.path("m");
    let out = cachefs(&env, &["mount", "--id", "B", p(&t)]);
    assert_code(&out, 0, "mount");
    let server = server_of(&env, "B", &t);
    let _guard = server_guard(&env, server);
    fs::write(t.join("f"), b"open me").unwrap();
    let ready = env.path("ready");
    let mut c = Command::new("sh");
    c.arg("-c").arg(format!(
        "exec 3< '{}'; touch '{}'; exec sleep 600",
        p(&t.join("f")),
        p(&ready)
    ));
    let mut user = Bg::spawn(&env, "user", c);
    wait_for_file(&ready);

    let out = cachefs(&env, &["umount", p(&t)]);
    assert_code(&out, 1, "umount of a busy mount");
    let err = stderr_of(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("cachefs: "), "{err}");
    assert!(err.contains("busy"), "{err}");
    assert!(
        err.contains(&format!("pid {} (sleep)", user.pid())),
        "the user is named: {err}"
    );
    assert!(err.contains("--lazy"), "{err}");
    assert_eq!(
        mount_fstype(&t).as_deref(),
        Some("fuse.cachefs"),
        "still mounted"
    );
    assert_eq!(fs::read(t.join("f")).unwrap(), b"open me");

    let mut c = env.cmd();
    c.args(["umount", "--lazy", p(&t)]);
    let mut lazy = Bg::spawn(&env, "lazy", c);
    assert!(
        wait_until(T, || !is_mounted(&t)),
        "--lazy did not detach: {}",
        lazy.stderr()
    );
    // The last user lets go: the server ends, umount returns, the lease is free.
    signal(user.pid(), libc::SIGKILL);
    let _ = user.child.wait();
    assert_eq!(lazy.exit_code(), 0, "{}", lazy.stderr());
    wait_gone(server, "the lazily unmounted server");
    assert!(leases(&env, "B").is_empty());
    let t2 = env.path("after");
    let out = run(
        &env,
        &["--lock-timeout", "0"],
        &[spec("B", &t2, "sharing=locked")],
        &["true"],
    );
    assert_code(&out, 0, "a locked run after the lazy umount");
    assert_no_mounts_under(env.dir.path());
}

/// A process whose working directory is inside the mount keeps it busy too, and is named.
#[test]
fn umount_of_a_mount_busy_by_a_cwd_names_the_user() {
    let env = CliEnv::new();
    let t = env.path("m");
    let out = cachefs(&env, &["mount", "--id", "B", p(&t)]);
    assert_code(&out, 0, "mount");
    let server = server_of(&env, "B", &t);
    let _guard = server_guard(&env, server);
    let mut c = Command::new("sleep");
    c.arg("600").current_dir(&t);
    let mut user = Bg::spawn(&env, "user", c);
    assert!(wait_until(T, || fs::read_link(format!(
        "/proc/{}/cwd",
        user.pid()
    ))
    .is_ok_and(|d| d == t)));

    let out = cachefs(&env, &["umount", p(&t)]);
    assert_code(&out, 1, "umount of a busy mount");
    let err = stderr_of(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("busy"), "{err}");
    let named = err.contains(&format!("pid {} (sleep)", user.pid()));
    signal(user.pid(), libc::SIGKILL);
    let _ = user.child.wait();
    assert_code(&cachefs(&env, &["umount", p(&t)]), 0, "umount once idle");
    assert!(
        named,
        "the process with its cwd in the mount is not named: {err}"
    );
}

/// `cachefs umount` of a mount that belongs to a `cachefs run` running `sh -c SCRIPT`: exit 2
/// with one line naming the run, and the mount is left alone.
fn umount_refuses_a_run_mount_of(multi_line: bool) {
    let env = CliEnv::new();
    let t = env.path("r");
    let ready = env.path("ready");
    // The run's mount exists only in its command's namespace: the command itself writes and,
    // after the umount attempt, checks that its mount is still there.
    let script = format!(
        "echo still mounted > '{t}/x'; touch '{}'; i=0; while [ ! -e '{}' ] && [ $i -lt 1200 ]; do i=$((i+1)); sleep 0.05; done; mountpoint -q '{t}' && cat '{t}/x'",
        p(&ready),
        p(&env.path("go")),
        t = p(&t)
    );
    let script = if multi_line {
        script.replace("; ", "\n")
    } else {
        script
    };
    let mut job = spawn_run(
        &env,
        "run",
        &[],
        &[spec("R", &t, "")],
        &["sh", "-c", &script],
    );
    wait_for_file(&ready);
    let out = cachefs(&env, &["umount", p(&t)]);
    let err = stderr_of(&out);
    // Let the run end normally before asserting anything.
    let outside = is_mounted(&t);
    fs::write(env.path("go"), b"").unwrap();
    job.assert_success();
    assert_eq!(
        job.stdout(),
        "still mounted\n",
        "the run's mount was not left alone"
    );
    assert_no_mounts_under(env.dir.path());

    assert_code(&out, 2, "umount of a run's mount");
    assert!(!outside, "the run's mount is in the caller's namespace");
    assert!(
        err.starts_with(&format!(
            "cachefs: {} belongs to `cachefs run` (pid {}",
            p(&t),
            job.pid()
        )),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
}

#[test]
fn umount_refuses_a_run_mount() {
    umount_refuses_a_run_mount_of(false);
}

/// Build steps are often multi-line scripts: the refusal still fits on one line.
#[test]
fn umount_refuses_a_run_mount_of_a_multi_line_script_in_one_line() {
    umount_refuses_a_run_mount_of(true);
}

// ---------------------------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------------------------

/// Exit 2, one line on stderr starting "cachefs: " and mentioning `mention`, nothing on
/// stdout, no cache, no mount.
#[track_caller]
fn assert_refused(env: &CliEnv, out: &Output, what: &str, mention: &str) {
    let err = stderr_of(out);
    assert_eq!(code(out), 2, "{what}: exit code; stderr: {err}");
    assert_eq!(err.lines().count(), 1, "{what}: one line: {err:?}");
    assert!(err.starts_with("cachefs: "), "{what}: {err:?}");
    assert!(
        err.contains(mention),
        "{what}: {err:?} does not mention {mention:?}"
    );
    assert_eq!(stdout_of(out), "", "{what}: stdout");
    assert_eq!(env.cache_count(), 0, "{what}: a cache was created");
    assert_no_mounts_under(env.dir.path());
}

/// Bad specs and targets that cachefs itself checks.
#[test]
fn bad_specs_and_targets_exit_2() {
    let env = CliEnv::new();
    let t = env.path("never");
    let t2 = env.path("never2");
    let echo = ["echo", "ran"];

    let out = run(&env, &[], &[spec("a", &t, "sharing=bogus")], &echo);
    assert_refused(&env, &out, "run sharing=bogus", "sharing");
    let out = cachefs(&env, &["mount", "--mount", &spec("a", &t, "sharing=bogus")]);
    assert_refused(&env, &out, "mount --mount sharing=bogus", "sharing");
    let out = cachefs(&env, &["mount", "--id", "a", "--sharing", "bogus", p(&t)]);
    assert_refused(&env, &out, "mount --sharing bogus", "sharing");
    let out = run(&env, &[], &[spec("a", &t, "lock-timeout=-5s")], &echo);
    assert_refused(&env, &out, "lock-timeout=-5s", "lock-timeout");
    let out = cachefs(
        &env,
        &["mount", "--mount", &spec("a", &t, "lock-timeout=-5s")],
    );
    assert_refused(&env, &out, "mount lock-timeout=-5s", "lock-timeout");
    let out = run(
        &env,
        &[],
        &[
            spec("a", &t, "sharing=locked"),
            spec("a", &t2, "sharing=shared"),
        ],
        &echo,
    );
    assert_refused(&env, &out, "one id twice, once locked", "wait for itself");
    assert!(!t.exists() && !t2.exists(), "refused targets were created");

    let out = cachefs(&env, &["umount", "/tmp"]);
    assert_refused(&env, &out, "umount /tmp", "/tmp");
    let out = cachefs(&env, &["umount", "/proc"]);
    assert_refused(&env, &out, "umount /proc", "not a cachefs mount");
    let plain = env.path("plain");
    fs::create_dir(&plain).unwrap();
    let out = cachefs(&env, &["umount", p(&plain)]);
    assert_refused(&env, &out, "umount of a plain directory", "not mounted");
    let out = cachefs(&env, &["umount", p(&env.path("missing"))]);
    assert_refused(&env, &out, "umount of a missing path", "not mounted");
    assert!(!env.store.exists(), "umount must not create the store");
}

/// Bad options that the argument parser checks: exit 2, nothing created, and, like every
/// cachefs error, one line on stderr.
#[test]
fn bad_options_exit_2_with_one_line() {
    let env = CliEnv::new();
    let t = env.path("never");
    let s = spec("a", &t, "");
    let cases: Vec<(&str, Vec<&str>)> = vec![
        (
            "run --lock-timeout -1s",
            vec![
                "run",
                "--lock-timeout",
                "-1s",
                "--mount",
                &s,
                "--",
                "echo",
                "ran",
            ],
        ),
        (
            "run --lock-timeout=-1s",
            vec![
                "run",
                "--lock-timeout=-1s",
                "--mount",
                &s,
                "--",
                "echo",
                "ran",
            ],
        ),
        (
            "run --lock-timeout abc",
            vec![
                "run",
                "--lock-timeout",
                "abc",
                "--mount",
                &s,
                "--",
                "echo",
                "ran",
            ],
        ),
        (
            "mount --lock-timeout abc",
            vec!["mount", "--lock-timeout", "abc", "--id", "a", p(&t)],
        ),
        (
            "run --max-instances 0",
            vec![
                "run",
                "--max-instances",
                "0",
                "--mount",
                &s,
                "--",
                "echo",
                "ran",
            ],
        ),
        (
            "mount --max-instances 0",
            vec!["mount", "--max-instances", "0", "--id", "a", p(&t)],
        ),
        (
            "mount TARGET --mount SPEC",
            vec!["mount", "--mount", &s, p(&t)],
        ),
    ];
    let mut not_one_line = Vec::new();
    for (what, args) in &cases {
        let out = cachefs(&env, args);
        let err = stderr_of(&out);
        assert_eq!(code(&out), 2, "{what}: {err}");
        assert_eq!(stdout_of(&out), "", "{what}");
        assert!(!err.trim().is_empty(), "{what}: silent");
        assert_eq!(env.cache_count(), 0, "{what}: a cache was created");
        assert!(!t.exists(), "{what}: the target was created");
        if err.lines().count() != 1 || !err.starts_with("cachefs: ") {
            not_one_line.push(format!("{what}: {err:?}"));
        }
    }
    assert_no_mounts_under(env.dir.path());
    assert!(
        not_one_line.is_empty(),
        "usage errors are not one line starting \"cachefs: \":\n{}",
        not_one_line.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Dead mounts
// ---------------------------------------------------------------------------------------------

/// Makes a dead cachefs mount at `target`: a `mount --foreground` server whose fusermount3
/// auto-unmount helper is killed first, then the server itself, with SIGKILL. Returns `None`
/// when the server has no such helper (no fusermount3).
fn dead_mount(env: &CliEnv, id: &str, target: &Path, name: &str) -> Option<Bg> {
    let mut c = env.cmd();
    c.args(["mount", "--foreground", "--id", id, p(target)]);
    let mut server = Bg::spawn(env, name, c);
    wait_mounted(&mut server, target);
    wait_lease(env, id, &mut server, "held");
    let helpers: Vec<i32> = descendants(server.pid())
        .into_iter()
        .filter(|&pid| comm(pid) == "fusermount3")
        .collect();
    if helpers.is_empty() {
        return None;
    }
    // Warm the kernel's attribute cache of the mount's root, as any user of it would.
    stat(target).unwrap();
    for pid in helpers {
        signal(pid, libc::SIGKILL);
    }
    server.sigkill();
    assert!(is_mounted(target), "{name}: the mount went with its server");
    Some(server)
}

/// Waits (bounded) until the dead mount answers ENOTCONN. Asked with statfs, which always
/// reaches the filesystem (as cachefs's own check does): a stat may be answered from the
/// attributes the kernel keeps, for up to a minute on a mount whose changes it all sees.
fn wait_enotconn(target: &Path) {
    let statfs = || {
        let c = cpath(target);
        let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
        // SAFETY: a valid C string and a buffer statfs fills.
        cvt(unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) })
    };
    assert!(
        wait_until(T, || errno_of(statfs()) == libc::ENOTCONN),
        "{}: {:?}",
        target.display(),
        statfs().map(|_| ())
    );
}

/// A dead mount (its server died without anyone unmounting it) is cleared by `cachefs run`,
/// `cachefs mount` and `cachefs umount` on its target.
#[test]
fn dead_mounts_are_cleared() {
    if skip_unless_root("dead_mounts_are_cleared") {
        return;
    }
    let env = CliEnv::new();
    let t = env.path("d");
    let Some(_dead) = dead_mount(&env, "D", &t, "server1") else {
        eprintln!("dead_mounts_are_cleared: skipped, no fusermount3 auto-unmount helper");
        return;
    };
    wait_enotconn(&t);

    let out = run(
        &env,
        &[],
        &[spec("D", &t, "")],
        &["sh", "-c", &format!("echo after > '{}/after'", p(&t))],
    );
    assert_code(&out, 0, "run on a dead mount");
    let err = stderr_of(&out);
    assert_eq!(
        err,
        format!(
            "cachefs: warning: cleared a dead cachefs mount at {} (its process had died)\n",
            p(&t)
        )
    );
    assert!(!is_mounted(&t));
    stat(&t).unwrap();
    assert_eq!(env.find_in_caches("after").len(), 1);

    let _dead2 = dead_mount(&env, "D", &t, "server2").unwrap();
    wait_enotconn(&t);
    let out = cachefs(&env, &["umount", p(&t)]);
    assert_code(&out, 0, "umount of a dead mount");
    let err = stderr_of(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("dead cachefs mount"), "{err}");
    assert!(!is_mounted(&t));
    stat(&t).unwrap();

    let _dead3 = dead_mount(&env, "D", &t, "server3").unwrap();
    wait_enotconn(&t);
    let out = cachefs(&env, &["mount", "--id", "D", p(&t)]);
    assert_code(&out, 0, "mount on a dead mount");
    assert!(
        stderr_of(&out).contains("cleared a dead cachefs mount"),
        "{}",
        stderr_of(&out)
    );
    let server = server_of(&env, "D", &t);
    let _guard = server_guard(&env, server);
    assert_eq!(fs::read(t.join("after")).unwrap(), b"after\n");
    assert_code(&cachefs(&env, &["umount", p(&t)]), 0, "umount");
    assert!(!is_mounted(&t));
    stat(&t).unwrap();
    assert!(leases(&env, "D").is_empty());
}

/// Right after its server died, the kernel still answers `stat` on a dead mount's root from
/// its attribute cache; cachefs must still see that the mount is dead and clear it.
#[test]
fn dead_mount_is_cleared_right_after_its_server_died() {
    if skip_unless_root("dead_mount_is_cleared_right_after_its_server_died") {
        return;
    }
    let env = CliEnv::new();
    let t = env.path("d");
    let Some(_dead) = dead_mount(&env, "D", &t, "server") else {
        eprintln!("skipped: no fusermount3 auto-unmount helper");
        return;
    };
    let out = run(&env, &[], &[spec("D", &t, "")], &["true"]);
    let err = stderr_of(&out);
    assert_code(&out, 0, "run at once on a mount whose server just died");
    assert!(err.contains("cleared a dead cachefs mount"), "{err}");
    assert!(!is_mounted(&t));
    stat(&t).unwrap();
}

/// Without fusermount3 (not on PATH), a root server mounts with mount(2) and has no
/// auto-unmount; when it dies, its dead mount must still be recognised as cachefs's own and
/// cleared.
#[test]
fn dead_mount_made_without_fusermount3_is_cleared() {
    if skip_unless_root("dead_mount_made_without_fusermount3_is_cleared") {
        return;
    }
    let env = CliEnv::new();
    let t = env.path("d");
    // A server without fusermount3, SIGKILLed: its mount stays behind, dead.
    let make_dead = || {
        let mut c = env.cmd();
        c.args(["mount", "--foreground", "--id", "N", p(&t)])
            .env("PATH", "/nonexistent");
        let mut server = Bg::spawn(&env, "server", c);
        assert!(
            wait_until(T, || is_mounted(&t)),
            "not mounted: {}",
            server.stderr()
        );
        wait_lease(&env, "N", &mut server, "held");
        server.sigkill();
        wait_enotconn(&t);
        mount_fstype(&t)
    };

    // The next run on the target clears it.
    let fstype = make_dead();
    let out = run(&env, &[], &[spec("N", &t, "")], &["true"]);
    let run_err = stderr_of(&out);
    assert!(
        code(&out) == 0 && run_err.contains("cleared a dead cachefs mount"),
        "run on the dead mount (fstype {fstype:?}): exit {}: {run_err}",
        code(&out)
    );
    assert!(!is_mounted(&t));

    // So does umount.
    make_dead();
    let out = cachefs(&env, &["umount", p(&t)]);
    assert_eq!(code(&out), 0, "umount: {}", stderr_of(&out));
    assert!(!is_mounted(&t));
    stat(&t).unwrap();
}

/// The command never inherits a lease: the ticket fds are close-on-exec, so a command (or
/// anything it leaves behind) cannot keep a cache locked after cachefs is gone.
#[test]
fn the_command_holds_no_lease_fd() {
    let env = CliEnv::new();
    for sharing in ["locked", "shared", "private"] {
        let t = env.path(&format!("fd-{sharing}"));
        let out = run(
            &env,
            &[],
            &[spec("F", &t, &format!("sharing={sharing}"))],
            &[
                "sh",
                "-c",
                "for f in /proc/$$/fd/*; do readlink \"$f\"; done; true",
            ],
        );
        assert_code(&out, 0, "run");
        let fds = stdout_of(&out);
        assert!(!fds.is_empty(), "no fds listed");
        let store = env.store.display().to_string();
        assert!(
            !fds.lines().any(|l| l.starts_with(&store)),
            "{sharing}: the command holds store files open:\n{fds}"
        );
    }
}
