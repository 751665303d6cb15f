//! What `run` and `mount` share: checking mount plans, taking leases (with the waiting
//! message), mounting, and unmounting within a time limit.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::AtomicI32;
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};

use super::signals::Inherited;
use super::{busy, print_warning, usage};
use crate::accounting::{Accountant, Counted, Flusher};
use crate::bind::BindMount;
use crate::fs::{self, FsOptions, MountedFs};
use crate::lease::{self, Lease, LeaseError, LeaseRequest, WaitControl, WaitReport};
use crate::spec::{Driver, MountSpec, Sharing};
use crate::store::{CacheId, Instance, InstanceInit, Store};

/// How long cachefs waits for its mounts to go away after the command ended.
pub(crate) const UNMOUNT_GRACE: Duration = Duration::from_secs(5);

/// One mount to make, after validation.
#[derive(Debug)]
pub(crate) struct Planned {
    pub spec: MountSpec,
    /// Absolute, as returned by `fs::check_target_path`.
    pub target: PathBuf,
    /// The spec's driver, else the cache's stored one (see [`resolve_drivers`]), else fuse.
    pub driver: Driver,
}

/// Lease settings that apply to every mount of one command.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LeaseDefaults {
    /// `--lock-timeout`; a mount's own `lock-timeout=` wins.
    pub lock_timeout: Option<Duration>,
    /// `--max-instances`.
    pub max_instances: u32,
}

/// How a live mount is served.
pub(crate) enum Served {
    Fuse(MountedFs),
    Bind(BindMount),
}

/// A mount that is up, with the instance it serves.
pub(crate) struct Live {
    pub served: Served,
    pub instance: Instance,
    pub target: PathBuf,
    /// The kernel's id of the mount, to name the processes that keep it busy.
    pub mount_id: Option<u64>,
}

/// Parses every `--mount` and makes the targets absolute against `cwd`.
pub(crate) fn parse_specs(raw: &[String], cwd: &Path) -> anyhow::Result<Vec<(MountSpec, PathBuf)>> {
    raw.iter()
        .map(|s| {
            let spec = MountSpec::parse(s).map_err(|e| usage(anyhow!("--mount {s:?}: {e}")))?;
            let target = absolute(&spec.target, cwd);
            Ok((spec, target))
        })
        .collect()
}

/// Checks targets and combinations; nothing is created. Returns the plan in mount order
/// (parents before children, so a cache mounted inside another cache's target lands on top).
pub(crate) fn plan(specs: Vec<(MountSpec, PathBuf)>) -> anyhow::Result<Vec<Planned>> {
    let mut plan = Vec::with_capacity(specs.len());
    for (spec, target) in specs {
        let target = fs::check_target_path(&target).map_err(usage)?;
        let driver = spec.driver.unwrap_or_default();
        plan.push(Planned {
            spec,
            target,
            driver,
        });
    }
    reject_duplicates(&plan)?;
    reject_self_deadlock(&plan)?;
    plan.sort_by_key(|p| p.target.components().count());
    Ok(plan)
}

/// Checks /dev/fuse when a planned mount is served by FUSE. Before the drivers are resolved
/// (`resolved` false), only when no store exists yet at `root`: then no cache has a stored
/// driver, every mount's is its spec's, and nothing is created before a refusal.
pub(crate) fn check_fuse_if_needed(
    plan: &[Planned],
    root: &Path,
    resolved: bool,
) -> anyhow::Result<()> {
    let known = resolved || !root.join(crate::store::DB_FILE).exists();
    if known && plan.iter().any(|p| p.driver == Driver::Fuse) {
        fs::check_fuse_device().map_err(usage)?;
    }
    Ok(())
}

/// Refuses driver=bind without root, before anything is touched.
pub(crate) fn check_bind_allowed(plan: &[Planned]) -> anyhow::Result<()> {
    if let Some(p) = plan.iter().find(|p| p.driver == Driver::Bind)
        && !rustix::process::geteuid().is_root()
    {
        return Err(usage(anyhow!(
            "cache {:?}: {}",
            p.spec.id.as_str(),
            crate::bind::BindError::NotPermitted
        )));
    }
    Ok(())
}

/// Gives each mount whose spec names no driver the one stored with its cache (fuse when
/// none is), and refuses driver=bind without root.
pub(crate) fn resolve_drivers(store: &Store, plan: &mut [Planned]) -> anyhow::Result<()> {
    for p in plan.iter_mut() {
        if p.spec.driver.is_none() {
            p.driver = store
                .cache_driver(&p.spec.id)
                .with_context(|| format!("cannot read cache {:?}", p.spec.id.as_str()))?
                .unwrap_or_default();
        }
    }
    check_bind_allowed(plan)
}

/// `path` made absolute against `cwd`, with `.` components and repeated slashes dropped.
/// `..` is kept: resolving it lexically could disagree with the kernel across symlinks.
pub(crate) fn absolute(path: &Path, cwd: &Path) -> PathBuf {
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        cwd.join(path)
    };
    joined
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect()
}

/// Two mounts on one target would hide each other: reject them.
/// Existing targets are compared by their real path, so `/run/x` and `/var/run/x` (a symlink)
/// are one target.
fn reject_duplicates(plan: &[Planned]) -> anyhow::Result<()> {
    let keys: Vec<PathBuf> = plan
        .iter()
        .map(|p| std::fs::canonicalize(&p.target).unwrap_or_else(|_| p.target.clone()))
        .collect();
    for (i, a) in plan.iter().enumerate() {
        if let Some(b) = (0..i).find(|&j| keys[j] == keys[i]).map(|j| &plan[j]) {
            let same = if a.target == b.target {
                String::new()
            } else {
                format!(" (the same directory as {})", b.target.display())
            };
            return Err(usage(anyhow!(
                "two mounts on one target {}{same}: caches {:?} and {:?}; give each its own target",
                a.target.display(),
                b.spec.id.as_str(),
                a.spec.id.as_str()
            )));
        }
    }
    Ok(())
}

/// One command mounting the same cache twice, once locked, would wait for itself.
fn reject_self_deadlock(plan: &[Planned]) -> anyhow::Result<()> {
    let mut seen: HashMap<&str, Sharing> = HashMap::new();
    for p in plan {
        if let Some(&first) = seen.get(p.spec.id.as_str())
            && (first == Sharing::Locked || p.spec.sharing == Sharing::Locked)
        {
            return Err(usage(anyhow!(
                "cache {:?} is mounted twice and one mount is sharing=locked: the command would wait for itself; mount it once",
                p.spec.id.as_str()
            )));
        }
        seen.insert(p.spec.id.as_str(), p.spec.sharing);
    }
    Ok(())
}

/// Targets that are already mount points, before any lease is taken: a dead cachefs mount
/// (or a bind mount left by a killed holder) is cleared; a live one is refused at once unless
/// it is this cache's own mount held under a lease this request will wait for (locked or
/// private), which ends before ours begins.
pub(crate) fn precheck_targets(store: &Store, plan: &[Planned]) -> anyhow::Result<()> {
    for p in plan {
        let Some(entry) = fs::mount_at(&p.target).ok().flatten() else {
            continue;
        };
        if clear_if_dead(&p.target)? || clear_stale_bind(store, &p.target)? {
            continue;
        }
        let waits_for_it = p.spec.sharing != Sharing::Shared
            && (entry.is_cachefs() || bound_instance(store, &p.target).is_some())
            && held_at(store, &p.spec.id, &p.target);
        if !waits_for_it {
            return Err(usage(fs::FsError::TargetMounted(p.target.clone())));
        }
    }
    Ok(())
}

/// Whether a live lease of cache `id` serves `target`.
fn held_at(store: &Store, id: &CacheId, target: &Path) -> bool {
    lease::list(store, Some(id))
        .map(|rows| {
            let t = target.to_string_lossy();
            rows.iter().any(|r| r.target.as_deref() == Some(&*t))
        })
        .unwrap_or(false)
}

/// The cache instance whose directory is mounted at `target` (a bind mount of it), if any.
pub(crate) fn bound_instance(store: &Store, target: &Path) -> Option<(CacheId, u32)> {
    let key = |p: &Path| {
        rustix::fs::statx(
            rustix::fs::CWD,
            p,
            rustix::fs::AtFlags::STATX_DONT_SYNC | rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            rustix::fs::StatxFlags::INO,
        )
        .ok()
        .map(|s| (s.stx_dev_major, s.stx_dev_minor, s.stx_ino))
    };
    let at = key(target)?;
    let caches = store.list_caches().ok()?;
    caches.iter().find_map(|c| {
        let i = c.instances.iter().find(|i| key(&i.path) == Some(at))?;
        Some((CacheId::new(&c.id).ok()?, i.number))
    })
}

/// Clears a bind mount of a cache instance at `target` that no live lease serves (its holder
/// was killed: a bind mount, unlike a FUSE mount, stays usable after its server died), saying
/// so. Returns whether there was one.
pub(crate) fn clear_stale_bind(store: &Store, target: &Path) -> anyhow::Result<bool> {
    let Some(entry) = fs::mount_at(target).ok().flatten() else {
        return Ok(false);
    };
    if entry.is_cachefs() {
        return Ok(false);
    }
    let Some((id, _)) = bound_instance(store, target) else {
        return Ok(false);
    };
    if held_at(store, &id, &entry.mount_point) {
        return Ok(false);
    }
    // Detached without following a symlink put in its place since the check.
    rustix::mount::unmount(
        &entry.mount_point,
        rustix::mount::UnmountFlags::DETACH | rustix::mount::UnmountFlags::NOFOLLOW,
    )
    .map_err(std::io::Error::from)
    .with_context(|| {
        format!(
            "cannot clear the stale bind mount of cache {:?} at {}",
            id.as_str(),
            crate::text::path_line(&entry.mount_point)
        )
    })?;
    print_warning(format_args!(
        "cleared a bind mount of cache {:?} at {} (its holder had died)",
        id.as_str(),
        crate::text::path_line(&entry.mount_point)
    ));
    Ok(true)
}

/// Clears a dead cachefs mount at `target`, saying so. Returns whether there was one.
pub(crate) fn clear_if_dead(target: &Path) -> anyhow::Result<bool> {
    let cleared = fs::clear_dead_mount(target)
        .with_context(|| format!("cannot clear the dead mount at {}", target.display()))?;
    if cleared {
        print_warning(format_args!(
            "cleared a dead cachefs mount at {} (its process had died)",
            target.display()
        ));
    }
    Ok(cleared)
}

/// Takes the leases of every planned mount (in id order, see `lease::acquire_all`), saying
/// on stderr who holds a cache while the wait lasts.
pub(crate) fn take_leases<'s>(
    store: &'s Store,
    plan: &[Planned],
    defaults: LeaseDefaults,
    kind: &'static str,
    command: &str,
    cancel: &AtomicI32,
) -> Result<Vec<Lease<'s>>, LeaseError> {
    let reqs: Vec<LeaseRequest> = plan
        .iter()
        .map(|p| LeaseRequest {
            id: p.spec.id.clone(),
            sharing: p.spec.sharing,
            init: InstanceInit {
                uid: p.spec.uid,
                gid: p.spec.gid,
                mode: p.spec.mode,
            },
            max_instances: defaults.max_instances,
            kind,
            command: command.to_owned(),
            timeout: p.spec.lock_timeout.or(defaults.lock_timeout),
            instance: None,
            target: Some(p.target.clone()),
            driver: Some(p.driver),
        })
        .collect();
    let printer = WaitPrinter::new();
    let report = |r: &WaitReport| printer.report(r);
    let ctl = WaitControl {
        deadline: None,
        cancel: Some(cancel),
        report: &report,
    };
    lease::acquire_all(store, &reqs, &ctl)
}

/// [`take_leases`] for a command: an interrupted wait becomes the exit code 128+N, with a line
/// saying what was not done (`Ok(Err(code))`); other failures are errors.
pub(crate) fn take_leases_or_exit<'s>(
    store: &'s Store,
    plan: &[Planned],
    defaults: LeaseDefaults,
    kind: &'static str,
    command: &str,
    cancel: &AtomicI32,
    not_done: &str,
) -> anyhow::Result<Result<Vec<Lease<'s>>, i32>> {
    match take_leases(store, plan, defaults, kind, command, cancel) {
        Ok(leases) => Ok(Ok(leases)),
        Err(LeaseError::Interrupted { id, signal }) => Ok(Err(interrupted(&id, signal, not_done))),
        Err(err) => Err(err.into()),
    }
}

/// Prints the "waiting for cache" line: rewritten in place every second on a terminal; in a
/// log, a new line only when the holder changes (at most every 5 s) or once a minute.
struct WaitPrinter {
    tty: bool,
    last: Mutex<Option<(Instant, Vec<i64>)>>,
}

const LOG_MIN_GAP: Duration = Duration::from_secs(5);
const LOG_REMIND: Duration = Duration::from_secs(60);

impl WaitPrinter {
    fn new() -> WaitPrinter {
        WaitPrinter {
            tty: std::io::stderr().is_terminal(),
            last: Mutex::new(None),
        }
    }

    fn report(&self, r: &WaitReport) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let mut err = std::io::stderr().lock();
        if r.done {
            if self.tty && last.is_some() {
                let _ = write!(err, "\r\x1b[K");
            }
            *last = None;
            return;
        }
        let holders: Vec<i64> = r.holders.iter().map(|h| h.seq).collect();
        let now = Instant::now();
        let line = wait_line(r);
        if self.tty {
            let _ = write!(err, "\r\x1b[Kcachefs: {line}");
        } else {
            let due = match &*last {
                None => true,
                Some((at, seen)) => {
                    let gap = now.duration_since(*at);
                    (seen != &holders && gap >= LOG_MIN_GAP) || gap >= LOG_REMIND
                }
            };
            if !due {
                return;
            }
            let _ = writeln!(err, "cachefs: {line}");
        }
        let _ = err.flush();
        *last = Some((now, holders));
    }
}

fn wait_line(r: &WaitReport) -> String {
    let held = if r.holders.is_empty() {
        "its holder is letting go".to_string()
    } else {
        format!(
            "held by {}",
            lease::describe_holders(&r.holders, lease::now_ms())
        )
    };
    let ahead = match r.waiting_ahead {
        0 => String::new(),
        1 => "; 1 request waits ahead".to_string(),
        n => format!("; {n} requests wait ahead"),
    };
    format!(
        "waiting for cache {:?} (sharing={}, instance {}): {held}{ahead}; waited {}",
        r.id,
        r.sharing,
        r.instance,
        crate::units::format_duration(Duration::from_secs(r.waited.as_secs()))
    )
}

/// Whether a live lease other than `ours` holds instance `number` of `id`.
fn held_by_others(store: &Store, id: &CacheId, number: u32, ours: &[i64]) -> bool {
    lease::list(store, Some(id))
        .map(|rows| {
            rows.iter().any(|r| {
                r.state == crate::store::LeaseState::Held
                    && r.instance == number
                    && !ours.contains(&r.seq)
            })
        })
        // Cannot tell: assume someone else, so nothing is rescanned or marked clean wrongly.
        .unwrap_or(true)
}

/// Gets every leased instance's counters right before it is mounted (a rescan after an
/// unclean stop, when nobody else holds it) and marks it as being counted into (and, for the
/// bind driver, as needing its release-time rescan). A `max-size=` or `driver=` in a spec
/// becomes the cache's stored setting.
pub(crate) fn prepare_counting(
    store: &Store,
    plan: &[Planned],
    leases: &[Lease<'_>],
) -> anyhow::Result<()> {
    let ours: Vec<i64> = leases.iter().map(Lease::seq).collect();
    for (planned, lease) in plan.iter().zip(leases) {
        let inst = lease.instance();
        if let Some(max) = planned.spec.max_size {
            store.set_max_size(&inst.id, Some(max)).with_context(|| {
                format!("cannot set the budget of cache {:?}", inst.id.as_str())
            })?;
        }
        if let Some(driver) = planned.spec.driver {
            store.set_driver(&inst.id, driver).with_context(|| {
                format!("cannot set the driver of cache {:?}", inst.id.as_str())
            })?;
        }
        let alone = !held_by_others(store, &inst.id, inst.number, &ours);
        crate::accounting::prepare(
            store,
            &inst.id,
            inst.number,
            &inst.path,
            alone,
            planned.driver == Driver::Bind,
        )
        .with_context(|| format!("cannot count cache {:?}", inst.id.as_str()))?;
    }
    Ok(())
}

/// Stops counting after the mounts are gone: the last flush of the FUSE mounts, the
/// release-time rescan of instances a bind mount changed, and a clean mark, on instances
/// nobody else holds.
pub(crate) fn finish_counting(store: &Store, flusher: Flusher, leases: &[Lease<'_>]) {
    let ours: Vec<i64> = leases.iter().map(Lease::seq).collect();
    // Decided once, for the flush and the rescan alike.
    let held: Vec<(&CacheId, u32, bool)> = leases
        .iter()
        .map(|l| {
            let inst = l.instance();
            (
                &inst.id,
                inst.number,
                held_by_others(store, &inst.id, inst.number, &ours),
            )
        })
        .collect();
    let still_held = |id: &CacheId, n: u32| {
        held.iter()
            .find(|(i, m, _)| *i == id && *m == n)
            // Not one of ours: cannot tell, so nothing is rescanned or marked clean wrongly.
            .is_none_or(|(_, _, h)| *h)
    };
    if let Err(e) = flusher.finish(store, still_held) {
        print_warning(format_args!(
            "cannot record the sizes of the caches: {e} (the next exclusive mount recounts them)"
        ));
    }
    let mut done: Vec<(&CacheId, u32)> = Vec::new();
    for lease in leases {
        let inst = lease.instance();
        if done.contains(&(&inst.id, inst.number)) || still_held(&inst.id, inst.number) {
            continue;
        }
        done.push((&inst.id, inst.number));
        if let Err(e) =
            crate::accounting::settle_bind_changes(store, &inst.id, inst.number, &inst.path)
        {
            print_warning(format_args!(
                "cannot count cache {:?} after its bind mount: {e} (the next mount recounts it)",
                inst.id.as_str()
            ));
        }
    }
}

/// How FUSE mounts are served (`run` and `mount` options).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Serving {
    /// Kernel passthrough for file I/O (`--no-passthrough` turns it off).
    pub passthrough: bool,
    /// `--io-uring`.
    pub io_uring: crate::fs::IoUring,
    /// fusermount3 unmounts if the server dies (never for `run`'s private namespace).
    pub auto_unmount: bool,
}

/// Mounts each planned cache on the instance its lease grants, undoing the mounts done so
/// far if one fails. FUSE mounts count sizes and uses; the returned flusher writes them to
/// the store until [`finish_counting`]. Bind mounts are counted by the rescan there.
pub(crate) fn mount_all(
    store: &Store,
    plan: &[Planned],
    leases: &[Lease<'_>],
    serving: Serving,
    inherited: &Inherited,
) -> anyhow::Result<(Vec<Live>, Flusher)> {
    let mut live: Vec<Live> = Vec::with_capacity(plan.len());
    let mut counted = Vec::with_capacity(plan.len());
    // For measuring what accounting costs (scripts/bench-fs.sh): the same build without it.
    let counting = std::env::var_os("CACHEFS_NO_ACCOUNTING").is_none_or(|v| v.is_empty());
    for (planned, lease) in plan.iter().zip(leases) {
        let accountant =
            (counting && planned.driver == Driver::Fuse).then(|| Arc::new(Accountant::new()));
        match mount_one(
            store,
            planned,
            lease.instance().clone(),
            serving,
            inherited,
            accountant.clone(),
        ) {
            Ok(l) => {
                if let (Some(accountant), Served::Fuse(fs)) = (accountant, &l.served) {
                    counted.push(Counted {
                        id: lease.instance().id.clone(),
                        number: lease.instance().number,
                        accountant,
                        evictor: Some(fs.evictor()),
                    });
                }
                live.push(l);
            }
            Err(err) => {
                unmount_all(live);
                return Err(err);
            }
        }
    }
    Ok((live, Flusher::start(store.root(), counted)))
}

fn mount_one(
    store: &Store,
    planned: &Planned,
    instance: Instance,
    serving: Serving,
    inherited: &Inherited,
    accountant: Option<Arc<Accountant>>,
) -> anyhow::Result<Live> {
    let spec = &planned.spec;
    let target = &planned.target;
    // The lease is ours now: a mount still here is dead (its holder was killed) or someone
    // else's.
    clear_if_dead(target)?;
    clear_stale_bind(store, target)?;
    fs::check_target(target).map_err(usage)?;
    // A missing target is created, as Docker does; an existing one (checked above) is used
    // as is, its contents hidden while the cache is mounted over it. The mode is explicit
    // because the process umask is 0 once a filesystem is being served; a target inside an
    // earlier mount is created in that cache, and must get what `mkdir -p` would give.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(inherited.dir_mode())
        .create(target)
        .with_context(|| format!("cannot create the target directory {}", target.display()))?;
    // The shared mounts of an instance tell each other what they change (fs::peers).
    let peers_dir = (spec.sharing == Sharing::Shared)
        .then(|| store.peers_dir(&instance))
        .flatten();
    let (served, mount_id) = if planned.driver == Driver::Bind {
        let dir = crate::bind::open_instance(&instance.path)?;
        // Joined first: the FUSE mounts shorten their timeouts before anything changes unseen.
        let peers = match &peers_dir {
            Some(d) => Some(
                crate::fs::peers::Peers::join(d, crate::fs::peers::Role::Bind)
                    .with_context(|| format!("cannot mount cache {:?}", spec.id.as_str()))?,
            ),
            None => None,
        };
        let mut bound = crate::bind::bind(&instance.path, &dir, target, spec.read_only)
            .with_context(|| format!("cannot mount cache {:?}", spec.id.as_str()))?;
        bound.keep_peers(peers);
        let id = bound.mnt_id();
        (Served::Bind(bound), Some(id))
    } else {
        let mut opts = FsOptions {
            passthrough: serving.passthrough,
            read_only: spec.read_only,
            fsname: fsname_for(spec.id.as_str()),
            accounting: accountant,
            auto_unmount: serving.auto_unmount,
            xattrs: spec.xattrs,
            io_uring: serving.io_uring,
            ..FsOptions::default()
        };
        if spec.sharing != Sharing::Shared {
            opts.exclusive = true;
        }
        // Nobody else mounts this instance while we hold a locked or private lease, and the
        // mounts of a shared one tell each other what they change: either way the kernel may
        // keep names and attributes for long, since it learns of every change.
        if opts.exclusive || peers_dir.is_some() {
            opts.entry_ttl = fs::LONG_TTL;
            opts.attr_ttl = fs::LONG_TTL;
        }
        opts.peers = peers_dir;
        let fs = fs::mount(&instance.path, target, &opts)
            .with_context(|| format!("cannot mount cache {:?}", spec.id.as_str()))?;
        tracing::info!(
            target = %target.display(),
            transport = fs.transport().as_str(),
            passthrough = fs.passthrough_active(),
            "serving"
        );
        (Served::Fuse(fs), busy::mount_id(target))
    };
    tracing::info!(
        id = spec.id.as_str(),
        instance = instance.number,
        created = instance.created,
        target = %target.display(),
        read_only = spec.read_only,
        driver = planned.driver.as_str(),
        "mounted"
    );
    Ok(Live {
        served,
        instance,
        target: target.clone(),
        mount_id,
    })
}

/// Unmounts in reverse mount order (children before parents). A failure is reported and the
/// rest go on. Returns the instances.
///
/// Unmounting waits for the filesystem's server to stop, and a process left running with
/// files open in a cache keeps it serving. So the unmounts run on a thread and cachefs waits
/// at most [`UNMOUNT_GRACE`]: then it names the processes and goes on to exit, and its exit
/// closes the FUSE connection, which those processes see as I/O errors.
pub(crate) fn unmount_all(live: Vec<Live>) -> Vec<Instance> {
    let mut instances = Vec::with_capacity(live.len());
    let mut mounts = Vec::with_capacity(live.len());
    // (target, mount id) in unmount order, for the messages.
    let mut order = Vec::with_capacity(live.len());
    for l in live.into_iter().rev() {
        instances.push(l.instance);
        order.push((l.target.clone(), l.mount_id));
        mounts.push((l.served, l.target));
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let unmounter = move || {
        for (served, target) in mounts {
            let result = match served {
                Served::Fuse(fs) => fs.unmount().map_err(|e| e.to_string()),
                Served::Bind(b) => unmount_bind(&b, BIND_USERS_GRACE),
            };
            // The receiver is gone only when cachefs stopped waiting: nothing left to tell.
            let _ = tx.send((target, result));
        }
    };
    if let Err(err) = std::thread::Builder::new()
        .name("cachefs-unmount".into())
        .spawn(unmounter)
    {
        // No thread: the closure (and with it every mount) was dropped, which unmounts them
        // here; drop reports failures through the log.
        print_warning(format_args!("unmounting without a time limit: {err}"));
        return instances;
    }
    let deadline = Instant::now() + UNMOUNT_GRACE;
    let mut done = 0;
    while done < order.len() {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok((target, Ok(()))) => {
                tracing::info!(target = %target.display(), "unmounted");
                done += 1;
            }
            Ok((_, Err(err))) => {
                print_warning(format_args!("{err}"));
                done += 1;
            }
            Err(RecvTimeoutError::Timeout) => {
                for (target, mnt_id) in &order[done..] {
                    let users = mnt_id.map(|id| busy::users_of(id, 5)).unwrap_or_default();
                    let by = if users.is_empty() {
                        String::new()
                    } else {
                        format!(" by {}", users.join(", "))
                    };
                    print_warning(format_args!(
                        "{} is still in use{by} {}s after the command ended; \
                         exiting anyway, which disconnects it",
                        target.display(),
                        UNMOUNT_GRACE.as_secs()
                    ));
                }
                break;
            }
            // The unmount thread panicked; what it held was dropped (and so unmounted).
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    instances
}

/// How long the unmount of a busy bind mount waits for its users to let go (less than
/// [`UNMOUNT_GRACE`], within which every unmount must report).
const BIND_USERS_GRACE: Duration = Duration::from_secs(3);

/// Unmounts a bind mount. A busy one is detached (a bind mount cannot be cut like a FUSE
/// connection) and its users get `grace` to let go; one still using it then is named, since
/// it keeps access to the instance after the lease ends.
fn unmount_bind(b: &BindMount, grace: Duration) -> Result<(), String> {
    match b.unmount(false) {
        Ok(()) => return Ok(()),
        Err(crate::bind::BindError::Unmount { err, .. })
            if err.raw_os_error() == Some(libc::EBUSY) => {}
        Err(e) => return Err(e.to_string()),
    }
    b.unmount(true).map_err(|e| e.to_string())?;
    if wait_until_unused(b.mnt_id(), grace, &|| false) {
        return Ok(());
    }
    let users = busy::users_of(b.mnt_id(), 5);
    Err(format!(
        "{} was detached while in use by {}: they can still reach the cache after its lease ends",
        crate::text::path_line(b.target()),
        if users.is_empty() {
            "processes".to_string()
        } else {
            users.join(", ")
        }
    ))
}

/// Waits until no process has a file, working directory or root on mount `mnt_id` (a bind
/// mount detached while in use), up to `timeout` or until `stop()`; returns whether none has.
pub(crate) fn wait_until_unused(mnt_id: u64, timeout: Duration, stop: &dyn Fn() -> bool) -> bool {
    // No deadline for a timeout too long to add.
    let deadline = Instant::now().checked_add(timeout);
    loop {
        if busy::users_of(mnt_id, 1).is_empty() {
            return true;
        }
        if stop() || deadline.is_some_and(|d| Instant::now() >= d) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The mount's source name shown in /proc/mounts: `cachefs:<id>`, reduced to characters that
/// are safe inside a mount option string (no commas, whitespace, control characters, quotes or
/// backslashes) and bounded in length; ids are free-form, this is only a label.
pub(crate) fn fsname_for(id: &str) -> String {
    const MAX: usize = 128;
    let mut name = String::from("cachefs:");
    for c in id.chars() {
        if name.len() >= MAX {
            break;
        }
        let safe = c.is_ascii_graphic() && !matches!(c, ',' | '\\' | '"' | '\'');
        name.push(if safe { c } else { '_' });
    }
    name
}

/// A command line as a shell would read it back: words of safe characters bare, others in
/// single quotes. For display (lease records), not for execution.
pub(crate) fn shell_join(words: &[OsString]) -> String {
    words
        .iter()
        .map(|w| {
            let w = w.to_string_lossy();
            let safe = !w.is_empty()
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%^".contains(c));
            if safe {
                w.into_owned()
            } else {
                format!("'{}'", w.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Says that a lease wait was interrupted by `signal`, and what was not done; returns the exit
/// code (128+N).
fn interrupted(id: &str, signal: i32, not_done: &str) -> i32 {
    let name = nix::sys::signal::Signal::try_from(signal)
        .map(|s| s.as_str().to_owned())
        .unwrap_or_else(|_| format!("signal {signal}"));
    super::print_error(format_args!(
        "interrupted by {name} while waiting for cache {id:?}; {not_done}"
    ));
    128 + signal
}

/// Takes instance `number` of `id` exclusively (snapshot, restore), saying on stderr who
/// holds it while the wait lasts. An interrupted wait becomes the exit code 128+N with a line
/// saying what was not done (`Ok(Err(code))`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn take_instance_or_exit<'s>(
    store: &'s Store,
    id: &crate::store::CacheId,
    number: u32,
    init: InstanceInit,
    kind: &'static str,
    command: &str,
    timeout: Option<std::time::Duration>,
    cancel: &AtomicI32,
    not_done: &str,
) -> anyhow::Result<Result<Lease<'s>, i32>> {
    let req = LeaseRequest {
        id: id.clone(),
        sharing: crate::spec::Sharing::Locked,
        init,
        max_instances: number.max(1),
        kind,
        command: command.to_owned(),
        timeout,
        instance: Some(number),
        target: None,
        driver: None,
    };
    let printer = WaitPrinter::new();
    let report = |r: &WaitReport| printer.report(r);
    let ctl = WaitControl {
        deadline: None,
        cancel: Some(cancel),
        report: &report,
    };
    match lease::acquire(store, &req, &ctl) {
        Ok(l) => Ok(Ok(l)),
        Err(LeaseError::Interrupted { id, signal }) => Ok(Err(interrupted(&id, signal, not_done))),
        Err(err) => Err(err.into()),
    }
}

/// The cache and instance each lease holds, in plan order.
pub(crate) fn instances_of(leases: &[Lease<'_>]) -> Vec<(crate::store::CacheId, u32)> {
    leases
        .iter()
        .map(|l| (l.instance().id.clone(), l.instance().number))
        .collect()
}

/// `from=`: seeds each empty cache of a planned mount from its layer, before it is mounted.
///
/// Locked and private leases are exclusive, so the granted instance is seeded under the lease
/// just taken. A shared lease is not: there, the seed happens before the leases are taken
/// ([`pre_seed_shared`]). A layer that is not in the store is a warning (the cache starts
/// empty, as BuildKit's cache-from does when a cache is missing); a corrupt one is an error.
/// An interrupted restore becomes `Ok(Err(128+N))`.
pub(crate) fn seed_from_layers(
    store: &Store,
    plan: &[Planned],
    leases: &[Lease<'_>],
    cancel: &AtomicI32,
) -> anyhow::Result<Result<(), i32>> {
    for (p, lease) in plan.iter().zip(leases) {
        if p.spec.from.is_none() || lease.sharing() == Sharing::Shared {
            continue;
        }
        let inst = lease.instance();
        if let Err(code) = seed_instance(store, &p.spec, &inst.path, inst.number, cancel)? {
            return Ok(Err(code));
        }
    }
    Ok(Ok(()))
}

/// `from=` on shared mounts: takes instance 1 exclusively without waiting and seeds it if it
/// is empty. If someone is using the cache it is left as it is (it is being filled already).
pub(crate) fn pre_seed_shared(
    store: &Store,
    plan: &[Planned],
    cancel: &AtomicI32,
) -> anyhow::Result<Result<(), i32>> {
    for p in plan {
        if p.spec.from.is_none() || p.spec.sharing != Sharing::Shared {
            continue;
        }
        let req = LeaseRequest {
            id: p.spec.id.clone(),
            sharing: Sharing::Locked,
            init: p.spec.instance_init(),
            max_instances: 1,
            kind: "seed",
            command: format!("seed from layer {}", p.spec.from.as_deref().unwrap_or("")),
            timeout: Some(Duration::ZERO),
            instance: Some(1),
            target: Some(p.target.clone()),
            driver: None,
        };
        let lease = match lease::acquire(store, &req, &WaitControl::quiet()) {
            Ok(l) => l,
            Err(LeaseError::TimedOut { .. }) => {
                tracing::info!(id = %p.spec.id, "cache in use: not seeded from its layer");
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let inst = lease.instance().clone();
        let res = seed_instance(store, &p.spec, &inst.path, inst.number, cancel)?;
        lease.release()?;
        if let Err(code) = res {
            return Ok(Err(code));
        }
    }
    Ok(Ok(()))
}

fn seed_instance(
    store: &Store,
    spec: &MountSpec,
    path: &Path,
    number: u32,
    cancel: &AtomicI32,
) -> anyhow::Result<Result<(), i32>> {
    use crate::layer::{Digest, LayerError, ObjectStore, restore};
    let Some(reference) = spec.from.as_deref() else {
        return Ok(Ok(()));
    };
    if !restore::is_empty_dir(path).unwrap_or(false) {
        tracing::debug!(id = %spec.id, "cache is not empty: from= does not apply");
        return Ok(Ok(()));
    }
    let layer = match store.find_layer(reference)? {
        Ok(l) => l,
        Err(msg) => {
            print_warning(format_args!(
                "cache {:?} starts empty: {msg}",
                spec.id.as_str()
            ));
            return Ok(Ok(()));
        }
    };
    let digest = Digest::from_hex(&layer.digest)
        .ok_or_else(|| anyhow!("layer record {:?} is not a digest", layer.digest))?;
    let objects = ObjectStore::open(store.root())?;
    let _lock = objects.lock_shared()?;
    match restore::restore_instance(
        store,
        &objects,
        digest,
        &spec.id,
        number,
        path,
        &spec.instance_init(),
        true,
        cancel,
    ) {
        Ok(r) => {
            tracing::info!(id = %spec.id, layer = %layer.digest, files = r.stats.files, "seeded cache from layer");
            Ok(Ok(()))
        }
        Err(LayerError::Interrupted) => {
            super::print_error(format_args!(
                "interrupted while seeding cache {:?}; it was left empty",
                spec.id.as_str()
            ));
            Ok(Err(128 + cancel.load(std::sync::atomic::Ordering::Relaxed)))
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!(
            "cannot seed cache {:?} from layer {}",
            spec.id.as_str(),
            &layer.digest[..12]
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsname_is_safe_in_mount_options() {
        assert_eq!(fsname_for("apt"), "cachefs:apt");
        assert_eq!(fsname_for("/var/cache/apt"), "cachefs:/var/cache/apt");
        assert_eq!(fsname_for("a,b c\td\n"), "cachefs:a_b_c_d_");
        assert_eq!(fsname_for("x\\y\"z'"), "cachefs:x_y_z_");
        assert_eq!(fsname_for("café"), "cachefs:caf_");
        let long = fsname_for(&"é".repeat(255));
        assert_eq!(long.len(), 128);
        assert!(long.chars().all(|c| c.is_ascii_graphic()));
    }

    #[test]
    fn targets_become_absolute() {
        let cwd = Path::new("/work/proj");
        assert_eq!(
            absolute(Path::new("target"), cwd),
            Path::new("/work/proj/target")
        );
        assert_eq!(
            absolute(Path::new("./a/./b/"), cwd),
            Path::new("/work/proj/a/b")
        );
        assert_eq!(absolute(Path::new("/x//y/"), cwd), Path::new("/x/y"));
        assert_eq!(
            absolute(Path::new("../c"), cwd),
            Path::new("/work/proj/../c")
        );
    }

    #[test]
    fn command_lines_are_shown_quoted() {
        let words: Vec<OsString> = ["apt-get", "install", "-y", "jq", "a b", "it's", ""]
            .iter()
            .map(OsString::from)
            .collect();
        assert_eq!(
            shell_join(&words),
            r"apt-get install -y jq 'a b' 'it'\''s' ''"
        );
    }

    #[test]
    fn one_mount_locked_twice_is_refused() {
        let spec = |s: &str| MountSpec::parse(s).unwrap();
        let p = |s: &str, t: &str| Planned {
            spec: spec(s),
            target: PathBuf::from(t),
            driver: Driver::Fuse,
        };
        assert!(
            reject_self_deadlock(&[
                p("id=a,target=/x,sharing=shared", "/x"),
                p("id=a,target=/y,sharing=shared", "/y")
            ])
            .is_ok()
        );
        let err = reject_self_deadlock(&[
            p("id=a,target=/x,sharing=shared", "/x"),
            p("id=a,target=/y,sharing=locked", "/y"),
        ])
        .unwrap_err();
        assert!(format!("{err:#}").contains("wait for itself"));
        assert!(
            reject_self_deadlock(&[
                p("id=a,target=/x,sharing=locked", "/x"),
                p("id=b,target=/y,sharing=locked", "/y")
            ])
            .is_ok()
        );
    }
}
