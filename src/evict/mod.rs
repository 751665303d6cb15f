//! `cachefs gc`: store-wide collection of idle caches (issue 4).
//!
//! Victims are whole instances nobody holds, least recently used first, chosen by the
//! policies (`--all`, `--max-age`, `--max-size` with `--keep-size`, `--filter`). Each victim
//! is removed crash-safely:
//!
//! 1. take its lease, exclusively and without waiting (a busy instance is skipped; while gc
//!    holds it, no mount can start on it);
//! 2. mark it `deleting` in the database;
//! 3. rename its directory into `STORE/tmp/gc-…` (atomic);
//! 4. release the lease and forget the instance (and the cache, with its last instance);
//! 5. remove the renamed tree.
//!
//! A gc killed anywhere leaves either an intact instance, or one marked `deleting` (whose
//! directory may already be in `tmp/`), or a tree in `tmp/` nothing refers to; the next gc
//! finishes all of those first. One gc runs at a time (`STORE/gc.lock`).

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::lease::{self, LeaseRequest, WaitControl};
use crate::spec::Sharing;
use crate::store::{CacheId, InstanceInit, InstanceUsage, LeaseState, Store, StoreError};

/// Prefix of trees gc moved aside in `STORE/tmp`.
const TRASH_PREFIX: &str = "gc-";

/// What to collect. Also the shape of the config file (`gc.toml`), e.g.
///
/// ```toml
/// max-size = "20G"
/// max-age = "14d"
/// keep-size = "5G"
/// filter = ["apt-*", "pip-*"]
/// keep-layers = 3
/// ```
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Every idle instance.
    pub all: bool,
    /// Idle instances not used for this long.
    pub max_age: Option<Duration>,
    /// Collect idle instances, least recently used first, until the store uses at most this
    /// many disk bytes.
    pub max_size: Option<u64>,
    /// Never take the store below this many disk bytes.
    pub keep_size: Option<u64>,
    /// Only caches whose id matches one of these shell globs (none: all caches).
    pub filters: Vec<String>,
    /// Keep only the newest N layers of each cache (tagged layers are pinned and not
    /// counted). `None`: layers are kept.
    pub keep_layers: Option<usize>,
}

impl Policy {
    /// Whether it chooses anything at all.
    pub fn is_empty(&self) -> bool {
        !self.all && self.max_age.is_none() && self.max_size.is_none() && self.keep_layers.is_none()
    }

    /// Reads a `gc.toml`. Unknown keys and bad values are errors naming the key.
    pub fn from_toml(text: &str) -> Result<Policy, String> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields, rename_all = "kebab-case")]
        struct File {
            all: Option<bool>,
            max_age: Option<String>,
            max_size: Option<String>,
            keep_size: Option<String>,
            filter: Option<Filters>,
            keep_layers: Option<usize>,
        }
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Filters {
            One(String),
            Many(Vec<String>),
        }
        let f: File = toml::from_str(text).map_err(|e| e.message().to_string())?;
        let size = |key: &str, v: Option<String>| {
            v.map(|v| crate::units::parse_size(&v).map_err(|e| format!("{key}: {e}")))
                .transpose()
        };
        let filters = match f.filter {
            None => Vec::new(),
            Some(Filters::One(s)) => vec![s],
            Some(Filters::Many(v)) => v,
        };
        for p in &filters {
            glob_match(p, "").map_err(|e| format!("filter: {e}"))?;
        }
        Ok(Policy {
            all: f.all.unwrap_or(false),
            max_age: f
                .max_age
                .map(|v| crate::units::parse_duration(&v).map_err(|e| format!("max-age: {e}")))
                .transpose()?,
            max_size: size("max-size", f.max_size)?,
            keep_size: size("keep-size", f.keep_size)?,
            filters,
            keep_layers: f.keep_layers,
        })
    }
}

/// Why an instance was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    All,
    MaxAge,
    MaxSize,
}

/// One instance gc removed (or, in a dry run, would remove).
#[derive(Debug, Clone, Serialize)]
pub struct Victim {
    pub id: String,
    pub instance: u32,
    pub disk_bytes: u64,
    pub size_bytes: u64,
    pub files: u64,
    /// Unix seconds.
    pub last_used: i64,
    pub reason: Reason,
    /// The whole cache went with its last instance.
    pub cache_removed: bool,
}

/// Files gc evicted from one idle instance (the file-level stage of `--max-size`).
#[derive(Debug, Clone, Serialize)]
pub struct FileVictims {
    pub id: String,
    pub instance: u32,
    pub files: u64,
    pub disk_bytes: u64,
}

/// What a gc did.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub dry_run: bool,
    pub removed: Vec<Victim>,
    /// When removing whole idle instances did not bring the store under `--max-size`: the
    /// least recently used files of idle instances that went next.
    pub evicted_files: Vec<FileVictims>,
    /// Chosen but in use when gc came to them.
    pub skipped_busy: Vec<String>,
    /// Removals left half-done by an earlier gc, finished first.
    pub completed_earlier: usize,
    pub freed_bytes: u64,
    pub store_disk_bytes_before: u64,
    pub store_disk_bytes_after: u64,
    pub interrupted: bool,
    /// Layers forgotten by `--keep-layers` (digests).
    pub layers_removed: Vec<String>,
    /// Objects no layer reaches any more, swept from the object store.
    pub objects: crate::layer::collect::SweepReport,
    pub seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error(transparent)]
    Store(#[from] StoreError),
    // `err`, not `source`: said once, not again as the next link of the error chain.
    #[error("cannot {action} {}: {err}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        err: io::Error,
    },
    #[error("invalid --filter pattern {0:?}: {1}")]
    Filter(String, &'static str),
    #[error("{0}")]
    Other(String),
}

/// Shell-glob match of `name` against `pattern` (`*`, `?`, `[...]`), as fnmatch(3) does.
pub fn glob_match(pattern: &str, name: &str) -> Result<bool, GcError> {
    let p = std::ffi::CString::new(pattern)
        .map_err(|_| GcError::Filter(pattern.into(), "contains a NUL byte"))?;
    let n = std::ffi::CString::new(name).unwrap_or_default();
    // SAFETY: two valid C strings.
    let r = unsafe { libc::fnmatch(p.as_ptr(), n.as_ptr(), 0) };
    match r {
        0 => Ok(true),
        libc::FNM_NOMATCH => Ok(false),
        _ => Err(GcError::Filter(pattern.into(), "not a valid pattern")),
    }
}

/// The one-gc-at-a-time lock.
pub struct GcLock(#[allow(dead_code)] fs::File);

/// Takes `STORE/gc.lock`: `Ok(None)` if another gc holds it and `wait` is false.
pub fn lock(store: &Store, wait: bool) -> Result<Option<GcLock>, GcError> {
    let path = store.root().join("gc.lock");
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(|err| GcError::Io {
            action: "open",
            path: path.clone(),
            err,
        })?;
    let op = if wait {
        rustix::fs::FlockOperation::LockExclusive
    } else {
        rustix::fs::FlockOperation::NonBlockingLockExclusive
    };
    loop {
        match rustix::fs::flock(&file, op) {
            Ok(()) => return Ok(Some(GcLock(file))),
            Err(rustix::io::Errno::WOULDBLOCK) => return Ok(None),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                return Err(GcError::Io {
                    action: "lock",
                    path,
                    err: e.into(),
                });
            }
        }
    }
}

/// Runs a gc with `policy` (the caller holds the [`lock`]). Stops between victims once
/// `stop` is non-zero (a signal number).
pub fn collect(
    store: &Store,
    policy: &Policy,
    dry_run: bool,
    stop: &AtomicI32,
) -> Result<Report, GcError> {
    collect_with_progress(store, policy, dry_run, stop, &|_| {})
}

/// [`collect`], calling `progress` with the report so far after each instance removed.
pub fn collect_with_progress(
    store: &Store,
    policy: &Policy,
    dry_run: bool,
    stop: &AtomicI32,
    progress: &dyn Fn(&Report),
) -> Result<Report, GcError> {
    let started = Instant::now();
    let mut report = Report {
        dry_run,
        ..Report::default()
    };
    for f in &policy.filters {
        glob_match(f, "")?;
    }
    if !dry_run {
        report.completed_earlier = finish_earlier(store)?;
    }
    let usages = store.instance_usages(None)?;
    let total: u64 = usages.iter().map(|u| u.usage.disk_bytes).sum();
    report.store_disk_bytes_before = total;
    let held: Vec<(String, u32)> = lease::list(store, None)?
        .into_iter()
        .map(|r| (r.id, r.instance))
        .collect();
    let now = crate::store::unix_now();
    let mut candidates: Vec<&InstanceUsage> = Vec::new();
    for u in &usages {
        if held.contains(&(u.id.clone(), u.number)) {
            continue;
        }
        let mut matched = policy.filters.is_empty();
        for f in &policy.filters {
            matched |= glob_match(f, &u.id)?;
        }
        if matched {
            candidates.push(u);
        }
    }
    // Least recently used first.
    candidates.sort_by_key(|u| (u.last_used, u.id.clone(), u.number));
    let mut projected = total;
    let keep = policy.keep_size.unwrap_or(0);
    for u in candidates {
        if stop.load(Ordering::Relaxed) != 0 {
            report.interrupted = true;
            break;
        }
        let old = policy
            .max_age
            .is_some_and(|age| now.saturating_sub(u.last_used) >= age.as_secs() as i64);
        let over = policy.max_size.is_some_and(|max| projected > max);
        let reason = if policy.all {
            Reason::All
        } else if old {
            Reason::MaxAge
        } else if over {
            Reason::MaxSize
        } else {
            continue;
        };
        if projected.saturating_sub(u.usage.disk_bytes) < keep {
            continue;
        }
        let mut victim = Victim {
            id: u.id.clone(),
            instance: u.number,
            disk_bytes: u.usage.disk_bytes,
            size_bytes: u.usage.size_bytes,
            files: u.usage.files,
            last_used: u.last_used,
            reason,
            cache_removed: false,
        };
        if !dry_run {
            match remove_instance(store, &u.id, u.number)? {
                Some(cache_removed) => victim.cache_removed = cache_removed,
                None => {
                    report.skipped_busy.push(format!("{} #{}", u.id, u.number));
                    continue;
                }
            }
        }
        projected = projected.saturating_sub(u.usage.disk_bytes);
        report.freed_bytes += u.usage.disk_bytes;
        report.removed.push(victim);
        if !dry_run {
            progress(&report);
        }
    }
    if let Some(max) = policy.max_size
        && projected > max
        && !report.interrupted
    {
        let removed: Vec<(String, u32)> = report
            .removed
            .iter()
            .map(|v| (v.id.clone(), v.instance))
            .collect();
        let eligible = |id: &str, n: u32| -> Result<bool, GcError> {
            if held.iter().any(|(h, hn)| h == id && *hn == n)
                || removed.iter().any(|(r, rn)| r == id && *rn == n)
            {
                return Ok(false);
            }
            let mut matched = policy.filters.is_empty();
            for f in &policy.filters {
                matched |= glob_match(f, id)?;
            }
            Ok(matched)
        };
        let target = max.max(keep);
        projected = evict_files(
            store,
            &mut report,
            projected,
            target,
            dry_run,
            stop,
            &eligible,
        )?;
    }
    report.store_disk_bytes_after = projected;
    if !report.interrupted && stop.load(Ordering::Relaxed) == 0 {
        collect_layers(store, policy, dry_run, &mut report)?;
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Forgets layers over `--keep-layers` (per cache, tags pinned, filters applied) and sweeps the
/// objects no remaining layer reaches.
fn collect_layers(
    store: &Store,
    policy: &Policy,
    dry_run: bool,
    report: &mut Report,
) -> Result<(), GcError> {
    use crate::layer::collect;
    let objects_dir = store.root().join(crate::layer::objects::OBJECTS_DIR);
    let layers = store.list_layers()?;
    if layers.is_empty() && !objects_dir.exists() {
        return Ok(());
    }
    let mut gone: Vec<String> = Vec::new();
    if let Some(keep) = policy.keep_layers {
        for l in collect::layers_over_keep(&layers, keep) {
            let mut matched = policy.filters.is_empty();
            for f in &policy.filters {
                matched |= l
                    .cache
                    .as_deref()
                    .is_some_and(|c| glob_match(f, c).unwrap_or(false));
            }
            if matched {
                gone.push(l.digest);
            }
        }
    }
    if !dry_run {
        for d in &gone {
            store.delete_layer(d)?;
        }
    }
    report.layers_removed = gone.clone();
    let objects = crate::layer::ObjectStore::open(store.root()).map_err(layer_err)?;
    let exclude: std::collections::HashSet<String> = gone.into_iter().collect();
    report.objects = collect::sweep(store, &objects, dry_run, &exclude).map_err(layer_err)?;
    Ok(())
}

fn layer_err(e: crate::layer::LayerError) -> GcError {
    match e {
        crate::layer::LayerError::Store(s) => GcError::Store(s),
        crate::layer::LayerError::Io { action, path, err } => GcError::Io { action, path, err },
        other => GcError::Other(other.to_string()),
    }
}

/// How many file records one round of the file-level stage reads.
const FILE_BATCH: usize = 4096;

/// The file-level stage: least recently used files across eligible idle instances until the
/// store is at `target`. Each instance is worked on under its lease (no wait: busy ones are
/// left alone). Returns the store's projected size after.
fn evict_files(
    store: &Store,
    report: &mut Report,
    mut projected: u64,
    target: u64,
    dry_run: bool,
    stop: &AtomicI32,
    eligible: &dyn Fn(&str, u32) -> Result<bool, GcError>,
) -> Result<u64, GcError> {
    use std::collections::{BTreeMap, HashSet};
    let mut offset = 0;
    let mut busy: HashSet<(String, u32)> = HashSet::new();
    while projected > target && stop.load(Ordering::Relaxed) == 0 {
        let batch = store.lru_files_all(offset, FILE_BATCH)?;
        if batch.is_empty() {
            break;
        }
        offset += batch.len();
        // Pick from this batch, oldest first, until the target would be met.
        let mut picked: BTreeMap<(String, u32), Vec<(u64, u64)>> = BTreeMap::new();
        let mut need = projected - target;
        for (id, n, ino, size, _) in batch {
            if need == 0 {
                break;
            }
            if busy.contains(&(id.clone(), n)) || !eligible(&id, n)? {
                continue;
            }
            need = need.saturating_sub(crate::accounting::disk_bytes(size));
            picked.entry((id, n)).or_default().push((ino, size));
        }
        for ((id, n), files) in picked {
            if dry_run {
                let disk: u64 = files
                    .iter()
                    .map(|f| crate::accounting::disk_bytes(f.1))
                    .sum();
                projected = projected.saturating_sub(disk);
                report.freed_bytes += disk;
                report.evicted_files.push(FileVictims {
                    id,
                    instance: n,
                    files: files.len() as u64,
                    disk_bytes: disk,
                });
                continue;
            }
            match evict_from_instance(store, &id, n, &files)? {
                Some(v) => {
                    projected = projected.saturating_sub(v.disk_bytes);
                    report.freed_bytes += v.disk_bytes;
                    // Evicted records are gone: the next batch starts earlier.
                    offset = offset.saturating_sub(files.len());
                    report.evicted_files.push(v);
                }
                None => {
                    busy.insert((id.clone(), n));
                    report.skipped_busy.push(format!("{id} #{n}"));
                }
            }
        }
    }
    Ok(projected)
}

/// Evicts `files` (ino, size) from an idle instance under its lease. `Ok(None)`: busy.
fn evict_from_instance(
    store: &Store,
    id: &str,
    number: u32,
    files: &[(u64, u64)],
) -> Result<Option<FileVictims>, GcError> {
    let Ok(cid) = CacheId::new(id) else {
        return Ok(None);
    };
    let Some(lease) = take_instance(store, &cid, number, None)? else {
        return Ok(None);
    };
    let path = lease.instance().path.clone();
    let victims: std::collections::HashSet<u64> = files.iter().map(|f| f.0).collect();
    let evictor = crate::fs::Evictor::for_directory(&path).map_err(|err| GcError::Io {
        action: "open",
        path: path.clone(),
        err,
    })?;
    let outcome = evictor.evict(&victims).map_err(|err| GcError::Io {
        action: "evict from",
        path: path.clone(),
        err,
    })?;
    let counters =
        crate::accounting::record_eviction(store, &cid, number, &victims, &outcome, true)?;
    drop(lease);
    Ok(Some(FileVictims {
        id: id.to_owned(),
        instance: number,
        files: counters.evictions,
        disk_bytes: counters.evicted_bytes,
    }))
}

/// Removes instance `number` of `id` if nobody holds it: `Ok(None)` if busy, else whether
/// the whole cache went with it.
pub fn remove_instance(store: &Store, id: &str, number: u32) -> Result<Option<bool>, GcError> {
    remove_instance_waiting(store, id, number, None)
}

/// [`remove_instance`], waiting up to `wait` (None: not at all) for its holders to finish.
pub fn remove_instance_waiting(
    store: &Store,
    id: &str,
    number: u32,
    wait: Option<&WaitControl<'_>>,
) -> Result<Option<bool>, GcError> {
    let Ok(cid) = CacheId::new(id) else {
        return Ok(None);
    };
    let Some(lease) = take_instance(store, &cid, number, wait)? else {
        return Ok(None);
    };
    // Someone may have queued behind us: then leave the instance to them.
    let queued = lease::list(store, Some(&cid))?
        .iter()
        .any(|r| r.instance == number && r.seq > lease.seq() && r.state == LeaseState::Waiting);
    if queued {
        return Ok(None);
    }
    let Some(key) = store.get_cache(&cid)?.map(|c| c.key) else {
        return Ok(None);
    };
    store.mark_deleting(&cid, number)?;
    let trash = move_aside(store, &key, number)?;
    drop(lease);
    let cache_removed = store.forget_instance(&cid, number)?;
    remove_trash(store, trash.as_deref());
    if cache_removed {
        lease::remove_cache_dirs(store, &cid, &key)?;
    }
    Ok(Some(cache_removed))
}

/// Takes instance `number` of `cid` exclusively (as gc does before touching it): without
/// waiting (`Ok(None)` if busy), or waiting under `wait`.
fn take_instance<'s>(
    store: &'s Store,
    cid: &CacheId,
    number: u32,
    wait: Option<&WaitControl<'_>>,
) -> Result<Option<lease::Lease<'s>>, GcError> {
    let req = LeaseRequest {
        id: cid.clone(),
        sharing: Sharing::Locked,
        init: InstanceInit::default(),
        max_instances: 1,
        kind: "gc",
        command: "cachefs gc".into(),
        timeout: if wait.is_some() {
            None
        } else {
            Some(Duration::ZERO)
        },
        instance: Some(number),
        target: None,
        driver: None,
    };
    let quiet = WaitControl::quiet();
    match lease::acquire(store, &req, wait.unwrap_or(&quiet)) {
        Ok(l) => Ok(Some(l)),
        Err(lease::LeaseError::TimedOut { .. }) => Ok(None),
        Err(lease::LeaseError::Store(e)) => Err(e.into()),
        Err(e) => Err(GcError::Other(e.to_string())),
    }
}

/// Finishes removals an interrupted gc left: instances marked `deleting`, and trees in
/// `tmp/` waiting to be removed. Returns how many instances it finished.
pub fn finish_earlier(store: &Store) -> Result<usize, GcError> {
    let mut n = 0;
    for (id, number) in store.deleting_instances()? {
        let Ok(cid) = CacheId::new(&id) else {
            continue;
        };
        let key = store.get_cache(&cid)?.map(|c| c.key);
        if let Some(key) = &key {
            let trash = move_aside(store, key, number)?;
            remove_trash(store, trash.as_deref());
        }
        if store.forget_instance(&cid, number)?
            && let Some(key) = &key
        {
            lease::remove_cache_dirs(store, &cid, key)?;
        }
        n += 1;
    }
    // Restores killed half-way leave their work directory (their cache is untouched).
    crate::layer::restore::sweep_dead_work_dirs(store)?;
    let tmp = store.open_dir(crate::store::TMP_DIR)?;
    let names = crate::store::walk::names(tmp.as_fd())
        .map_err(|e| store.io_error("read", &store.tmp_dir(), e))?;
    for name in names {
        if name.to_bytes().starts_with(TRASH_PREFIX.as_bytes()) {
            remove_trash(store, Some(&name));
        }
    }
    Ok(n)
}

/// Renames instance `number` of the cache with directory key `key` into `STORE/tmp` (same
/// filesystem: atomic), fd-relative from the store root: a `caches/<key>` that is a symlink is
/// refused, never followed. Returns the name in `tmp/`, `None` if it was already gone.
fn move_aside(store: &Store, key: &str, number: u32) -> Result<Option<CString>, GcError> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let name = format!("{TRASH_PREFIX}{}-{nanos}", std::process::id());
    let rel = format!("{}/{key}", crate::store::CACHES_DIR);
    let from = match store.open_dir(&rel) {
        Ok(fd) => fd,
        Err(StoreError::Io { err, .. }) if err.kind() == io::ErrorKind::NotFound => {
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    let tmp = store.open_dir(crate::store::TMP_DIR)?;
    let n = number.to_string();
    match rustix::fs::statat(&from, n.as_str(), rustix::fs::AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if rustix::fs::FileType::from_raw_mode(st.st_mode).is_dir() => {}
        Ok(st) => {
            // Not a directory (a symlink or a file put there): not an instance; leave it alone.
            let path = store.root().join(&rel).join(&n);
            return Err(
                if rustix::fs::FileType::from_raw_mode(st.st_mode).is_symlink() {
                    StoreError::Symlink { path }
                } else {
                    StoreError::NotADirectory { path }
                }
                .into(),
            );
        }
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(e) => {
            return Err(store
                .io_error("inspect", &store.root().join(&rel).join(&n), e.into())
                .into());
        }
    }
    match rustix::fs::renameat(&from, n.as_str(), &tmp, name.as_str()) {
        Ok(()) => Ok(CString::new(name).ok()),
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(e) => Err(GcError::Io {
            action: "move aside",
            path: store.root().join(&rel).join(&n),
            err: e.into(),
        }),
    }
}

/// Removes a tree gc moved aside into `tmp/` (fd-relative, never following symlinks).
/// Failures are logged: the next gc tries again.
fn remove_trash(store: &Store, name: Option<&std::ffi::CStr>) {
    let Some(name) = name else {
        return;
    };
    let result = store
        .open_dir(crate::store::TMP_DIR)
        .map_err(|e| e.to_string())
        .and_then(|tmp| {
            crate::store::walk::remove_tree_at(tmp.as_fd(), name).map_err(|e| e.to_string())
        });
    if let Err(e) = result {
        tracing::warn!(path = %store.tmp_dir().join(name.to_string_lossy().as_ref()).display(), error = %e, "cannot remove a collected tree; the next gc retries");
    }
}

#[cfg(test)]
mod tests;
