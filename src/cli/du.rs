//! `cachefs du [ID...]`: how much each cache holds, from the counters cachefs keeps (no tree
//! walk), and `--verify`, which walks the instances, reports drift and records what it found.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use serde::Serialize;

use super::ls::{
    one_line, open_existing_store, path_line, print_json, print_stdout, render_table, rfc3339_utc,
};
use super::{Global, usage};
use crate::accounting::{self, Scan, Usage};
use crate::lease;
use crate::store::{
    CacheId, CacheInfo, Driver, InstanceInfo, InstanceUsage, LeaseRow, LeaseState, Store,
};
use crate::units::{format_age, format_size};

const AFTER_HELP: &str = "\
Shows what each cache holds, from the counters cachefs keeps as mounts change it (no tree
walk, so it answers at once): SIZE (the apparent size of its files), DISK (each file rounded
up to whole 4 KiB blocks: the figure budgets are enforced on), FILES (regular files, a file
with several hard links once), INST (instances: private mounts of a busy cache get their
own), DRIVER (fuse: counted live as mounts change it; bind: counted by one rescan when the last
holder of a bind mount leaves), LAST USED, and IN USE (live mounts holding it, requests
waiting for it). A cache's figures are the sums over its instances. Largest on disk first,
then a TOTAL line.

Figures marked ~ are not counted exactly yet (the cache was filled before cachefs counted,
or a mount of it stopped uncleanly): `cachefs du --verify` counts them. Figures marked * are
as of the last release of a driver=bind cache that a bind mount holds now (or whose holder
was killed: the next mount rescans it).

--verify walks every instance of the given caches (default: all), compares what it finds
with the counters and prints one line per instance: ok, or the drift. What it found is
recorded, unless the instance is in use: a live mount keeps its own counters, so drift
there is reported, not corrected (verify again once it is free).

JSON (--json): an array sorted like the table, of objects with id, size_bytes, disk_bytes,
files, instances, last_used (unix seconds) and last_used_at (RFC 3339 UTC), in_use (held
leases), waiting (waiting requests), exact (false when marked ~ above), max_size (the
cache's budget in disk bytes, or null), driver (fuse or bind), as_of_release (true when
marked * above) and instances_detail (number, size_bytes, disk_bytes, files, counted, dirty,
in_use, last_used, rescan_pending, rescanned_ms: when the last release-time rescan was, unix
ms, or null). With --verify: an object with drift
(true when any instance drifted) and instances (id, number, path, recorded, found,
difference = found - recorded, drift, in_use, corrected, error).

Exit status: 0; 1 when an ID is not in the store, or with --verify when drift was found
or an instance could not be scanned (so a cron job can alert on it); 2 for an invalid id.

Examples:
  # Every cache, largest first, with totals
  cachefs du

  # Two caches, as JSON
  cachefs du --json apt cargo

  # The ids of caches over 10 GiB on disk
  cachefs du --json | jq -r '.[] | select(.disk_bytes > 10737418240) | .id'

  # Nightly: recount every cache and alert on drift
  cachefs du --verify || echo 'cachefs accounting drifted' | logger -t cachefs";

/// `cachefs du` arguments.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct Args {
    /// Print JSON instead of a table (with --verify: a JSON report)
    #[arg(long)]
    pub json: bool,

    /// Walk the instances, report drift from the counters, record what was found (exit 1 on
    /// drift)
    #[arg(long)]
    pub verify: bool,

    /// Only these caches (exact ids; default: all)
    #[arg(value_name = "ID")]
    pub ids: Vec<String>,
}

/// Table header. IN USE is last: its text varies most.
const HEADER: [&str; 8] = [
    "ID",
    "SIZE",
    "DISK",
    "FILES",
    "INST",
    "DRIVER",
    "LAST USED",
    "IN USE",
];

/// Columns shown right-aligned (numbers).
const NUMERIC: [usize; 4] = [1, 2, 3, 4];

/// Put before figures that are not exact.
const INEXACT: &str = "~";

/// The footnote under a table with inexact figures.
const INEXACT_NOTE: &str = "~ not yet counted exactly: run cachefs du --verify";

/// Marks figures of a bind-driver cache that a bind mount is changing (or changed, its holder
/// killed before the rescan): they are as of the last release.
const AS_OF_RELEASE: &str = "*";
const AS_OF_RELEASE_NOTE: &str = "* driver=bind: as of the last release; what its bind mounts change is counted when the last holder leaves";

/// The one line printed when the store holds no cache.
const NO_CACHES: &str = "no caches";

pub fn run(global: &Global, args: Args) -> anyhow::Result<i32> {
    let mut only = args
        .ids
        .iter()
        .map(|s| CacheId::new(s).map_err(usage))
        .collect::<anyhow::Result<Vec<CacheId>>>()?;
    only.sort();
    only.dedup();
    let (root, store) = open_existing_store(global)?;
    let caches = match &store {
        Some(store) => select_caches(store, &only)?,
        None => Vec::new(),
    };
    let missing: Vec<&CacheId> = only
        .iter()
        .filter(|id| !caches.iter().any(|c| c.id == id.as_str()))
        .collect();
    if !missing.is_empty() {
        return Err(unknown_ids(&missing, &root));
    }
    let Some(store) = store else {
        // Nothing was ever mounted: nothing to list, and a listing must not create a store.
        return print_empty(args.json, args.verify);
    };
    if caches.is_empty() {
        return print_empty(args.json, args.verify);
    }
    if args.verify {
        return verify(&store, &caches, args.json);
    }
    let usages = if only.is_empty() {
        store.instance_usages(None)?
    } else {
        let mut all = Vec::new();
        for id in &only {
            all.extend(store.instance_usages(Some(id))?);
        }
        all
    };
    let mut leases = lease::list(&store, None)?;
    if !only.is_empty() {
        leases.retain(|r| only.iter().any(|id| id.as_str() == r.id));
    }
    let rows = collect(&caches, &usages, &leases);
    if args.json {
        print_json(&json_rows(&rows))?;
    } else {
        print_stdout(&render(&rows, lease::now_ms().div_euclid(1000)))?;
    }
    Ok(0)
}

/// Every cache, or those of `only` that exist, by id.
fn select_caches(store: &Store, only: &[CacheId]) -> anyhow::Result<Vec<CacheInfo>> {
    if only.is_empty() {
        return Ok(store.list_caches()?);
    }
    let mut caches = Vec::new();
    for id in only {
        caches.extend(store.get_cache(id)?);
    }
    Ok(caches)
}

/// `no cache with id "x" in store S`, or `no caches with ids "x", "y" in store S`.
fn unknown_ids(missing: &[&CacheId], root: &Path) -> anyhow::Error {
    let ids: Vec<String> = missing
        .iter()
        .map(|id| format!("{:?}", id.as_str()))
        .collect();
    let what = if ids.len() == 1 {
        "no cache with id"
    } else {
        "no caches with ids"
    };
    anyhow!(
        "{what} {} in store {} (see cachefs du)",
        ids.join(", "),
        path_line(root)
    )
}

fn print_empty(json: bool, verify: bool) -> anyhow::Result<i32> {
    match (json, verify) {
        (true, false) => print_json(&Vec::<CacheJson<'_>>::new())?,
        (true, true) => print_json(&VerifyJson {
            drift: false,
            instances: Vec::new(),
        })?,
        (false, _) => print_stdout(&format!("{NO_CACHES}\n"))?,
    }
    Ok(0)
}

// ---------------------------------------------------------------------------------------------
// The listing
// ---------------------------------------------------------------------------------------------

/// One cache's figures: the sums over its instances.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CacheDu {
    id: String,
    usage: Usage,
    /// Unix seconds: the latest of the cache's and its instances' last use.
    last_used: i64,
    /// Held leases.
    held: usize,
    /// Waiting requests.
    waiting: usize,
    max_size: Option<u64>,
    driver: Driver,
    instances: Vec<InstanceDu>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct InstanceDu {
    number: u32,
    usage: Usage,
    counted: bool,
    dirty: bool,
    held: usize,
    last_used: i64,
    /// A bind mount changed it since its last release-time rescan: its figures are as of then.
    rescan_pending: bool,
    /// When that rescan was, unix ms.
    rescanned_ms: Option<i64>,
}

impl InstanceDu {
    fn exact(&self) -> bool {
        is_exact(self.counted, self.dirty, self.held)
    }
}

impl CacheDu {
    fn exact(&self) -> bool {
        self.instances.iter().all(InstanceDu::exact)
    }

    /// Some instance's figures are as of its last release (a bind mount holds it, or its
    /// holder died before the rescan).
    fn as_of_release(&self) -> bool {
        self.instances.iter().any(|i| i.rescan_pending)
    }
}

/// Whether an instance's counters can be taken as exact: it was counted (a scan, or live
/// accounting from empty), and no mount that stopped uncleanly left them behind. `dirty` on
/// an instance a live lease holds is the mark of the mount counting into it right now, not
/// of an unclean stop.
pub(crate) fn is_exact(counted: bool, dirty: bool, held: usize) -> bool {
    counted && (!dirty || held > 0)
}

/// The caches' figures from the store's records, largest on disk first.
fn collect(caches: &[CacheInfo], usages: &[InstanceUsage], leases: &[LeaseRow]) -> Vec<CacheDu> {
    let mut by_id: BTreeMap<&str, CacheDu> = BTreeMap::new();
    let new_cache = |id: &str, last_used: i64| CacheDu {
        id: id.to_owned(),
        usage: Usage::default(),
        last_used,
        held: 0,
        waiting: 0,
        max_size: None,
        driver: Driver::Fuse,
        instances: Vec::new(),
    };
    for c in caches {
        let entry = by_id
            .entry(c.id.as_str())
            .or_insert_with(|| new_cache(&c.id, c.last_used));
        for i in &c.instances {
            entry.instances.push(InstanceDu {
                number: i.number,
                usage: Usage::default(),
                // No usage record (it appeared between the two reads): not known to be exact.
                counted: false,
                dirty: false,
                held: 0,
                last_used: i.last_used,
                rescan_pending: false,
                rescanned_ms: None,
            });
        }
    }
    for u in usages {
        let entry = by_id
            .entry(u.id.as_str())
            .or_insert_with(|| new_cache(&u.id, u.last_used));
        entry.max_size = u.max_size;
        entry.driver = u.driver;
        let inst = match entry
            .instances
            .iter_mut()
            .position(|i| i.number == u.number)
        {
            Some(pos) => &mut entry.instances[pos],
            None => {
                entry.instances.push(InstanceDu {
                    number: u.number,
                    usage: Usage::default(),
                    counted: false,
                    dirty: false,
                    held: 0,
                    last_used: u.last_used,
                    rescan_pending: false,
                    rescanned_ms: None,
                });
                let last = entry.instances.len() - 1;
                &mut entry.instances[last]
            }
        };
        inst.usage = u.usage;
        inst.counted = u.counted;
        inst.dirty = u.dirty;
        inst.last_used = inst.last_used.max(u.last_used);
        inst.rescan_pending = u.rescan_pending;
        inst.rescanned_ms = u.rescanned_ms;
    }
    for r in leases {
        let Some(entry) = by_id.get_mut(r.id.as_str()) else {
            continue;
        };
        match r.state {
            LeaseState::Held => {
                entry.held += 1;
                if let Some(inst) = entry.instances.iter_mut().find(|i| i.number == r.instance) {
                    inst.held += 1;
                }
            }
            LeaseState::Waiting => entry.waiting += 1,
        }
    }
    let mut rows: Vec<CacheDu> = by_id
        .into_values()
        .map(|mut c| {
            c.instances.sort_by_key(|i| i.number);
            for i in &c.instances {
                c.usage.add(i.usage);
                c.last_used = c.last_used.max(i.last_used);
            }
            c
        })
        .collect();
    sort_rows(&mut rows);
    rows
}

/// Largest on disk first; then by apparent size, then by id.
fn sort_rows(rows: &mut [CacheDu]) {
    rows.sort_by(|a, b| {
        b.usage
            .disk_bytes
            .cmp(&a.usage.disk_bytes)
            .then(b.usage.size_bytes.cmp(&a.usage.size_bytes))
            .then_with(|| a.id.cmp(&b.id))
    });
}

/// `-`, `1 mount`, `2 mounts, 1 waiting`, `3 waiting`.
fn in_use_text(held: usize, waiting: usize) -> String {
    let mut parts = Vec::new();
    match held {
        0 => {}
        1 => parts.push("1 mount".to_owned()),
        n => parts.push(format!("{n} mounts")),
    }
    if waiting > 0 {
        parts.push(format!("{waiting} waiting"));
    }
    if parts.is_empty() {
        "-".to_owned()
    } else {
        parts.join(", ")
    }
}

/// SIZE, DISK and FILES cells, marked when not exact, or when as of the last release.
fn figure_cells(usage: &Usage, exact: bool, as_of_release: bool) -> [String; 3] {
    let mark = match (exact, as_of_release) {
        (false, _) => INEXACT,
        (true, true) => AS_OF_RELEASE,
        (true, false) => "",
    };
    [
        format!("{mark}{}", format_size(usage.size_bytes)),
        format!("{mark}{}", format_size(usage.disk_bytes)),
        format!("{mark}{}", usage.files),
    ]
}

/// The table, a TOTAL line and, when a figure is marked, the footnote.
fn render(rows: &[CacheDu], now: i64) -> String {
    if rows.is_empty() {
        return format!("{NO_CACHES}\n");
    }
    let mut cells: Vec<Vec<String>> = vec![HEADER.iter().map(|h| (*h).to_owned()).collect()];
    let mut total = Usage::default();
    let (mut instances, mut held, mut waiting) = (0usize, 0usize, 0usize);
    let mut last_used: Option<i64> = None;
    let mut all_exact = true;
    let mut any_as_of = false;
    for c in rows {
        let exact = c.exact();
        all_exact &= exact;
        any_as_of |= c.as_of_release();
        total.add(c.usage);
        instances += c.instances.len();
        held += c.held;
        waiting += c.waiting;
        last_used = Some(last_used.map_or(c.last_used, |t| t.max(c.last_used)));
        let [size, disk, files] = figure_cells(&c.usage, exact, c.as_of_release());
        cells.push(vec![
            one_line(&c.id).into_owned(),
            size,
            disk,
            files,
            c.instances.len().to_string(),
            c.driver.to_string(),
            format_age(c.last_used, now),
            in_use_text(c.held, c.waiting),
        ]);
    }
    let [size, disk, files] = figure_cells(&total, all_exact, any_as_of);
    cells.push(vec![
        "TOTAL".to_owned(),
        size,
        disk,
        files,
        instances.to_string(),
        String::new(),
        last_used.map_or_else(|| "-".to_owned(), |t| format_age(t, now)),
        in_use_text(held, waiting),
    ]);
    align_right(&mut cells, &NUMERIC);
    let mut out = String::new();
    for line in render_table(&cells, "", None) {
        out.push_str(&line);
        out.push('\n');
    }
    if !all_exact {
        out.push_str(INEXACT_NOTE);
        out.push('\n');
    }
    if any_as_of {
        out.push_str(AS_OF_RELEASE_NOTE);
        out.push('\n');
    }
    out
}

/// Pads the cells of `columns` on the left to the column's widest cell (in characters), so
/// [`render_table`] shows them right-aligned.
fn align_right(rows: &mut [Vec<String>], columns: &[usize]) {
    for &col in columns {
        let width = rows
            .iter()
            .filter_map(|r| r.get(col))
            .map(|c| c.chars().count())
            .max()
            .unwrap_or(0);
        for row in rows.iter_mut() {
            if let Some(cell) = row.get_mut(col) {
                let pad = width - cell.chars().count();
                if pad > 0 {
                    cell.insert_str(0, &" ".repeat(pad));
                }
            }
        }
    }
}

/// `du --json`: one object per cache.
#[derive(Debug, Serialize)]
struct CacheJson<'a> {
    id: &'a str,
    size_bytes: u64,
    disk_bytes: u64,
    files: u64,
    instances: usize,
    /// Unix seconds.
    last_used: i64,
    last_used_at: String,
    /// Held leases.
    in_use: usize,
    /// Waiting requests.
    waiting: usize,
    /// Every instance is counted exactly.
    exact: bool,
    /// The budget, in disk bytes.
    max_size: Option<u64>,
    /// `fuse` or `bind`: the cache's stored driver.
    driver: &'static str,
    /// Some instance's figures are as of its last release (driver=bind, changing now).
    as_of_release: bool,
    instances_detail: Vec<InstanceJson>,
}

#[derive(Debug, Serialize)]
struct InstanceJson {
    number: u32,
    size_bytes: u64,
    disk_bytes: u64,
    files: u64,
    counted: bool,
    dirty: bool,
    in_use: usize,
    last_used: i64,
    /// A bind mount changed it since its last release-time rescan.
    rescan_pending: bool,
    /// When the last release-time rescan was (unix ms; null: never).
    rescanned_ms: Option<i64>,
}

fn json_rows(rows: &[CacheDu]) -> Vec<CacheJson<'_>> {
    rows.iter()
        .map(|c| CacheJson {
            id: &c.id,
            size_bytes: c.usage.size_bytes,
            disk_bytes: c.usage.disk_bytes,
            files: c.usage.files,
            instances: c.instances.len(),
            last_used: c.last_used,
            last_used_at: rfc3339_utc(c.last_used),
            in_use: c.held,
            waiting: c.waiting,
            exact: c.exact(),
            max_size: c.max_size,
            driver: c.driver.as_str(),
            as_of_release: c.as_of_release(),
            instances_detail: c
                .instances
                .iter()
                .map(|i| InstanceJson {
                    number: i.number,
                    size_bytes: i.usage.size_bytes,
                    disk_bytes: i.usage.disk_bytes,
                    files: i.usage.files,
                    counted: i.counted,
                    dirty: i.dirty,
                    in_use: i.held,
                    last_used: i.last_used,
                    rescan_pending: i.rescan_pending,
                    rescanned_ms: i.rescanned_ms,
                })
                .collect(),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// --verify
// ---------------------------------------------------------------------------------------------

/// What happened to the record of a verified instance.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Record {
    /// The counters were exact and matched: nothing written.
    Unchanged,
    /// The scan was recorded (drift corrected, or the counters marked exact).
    Recorded,
    /// A live lease holds the instance: nothing written.
    InUse,
    /// Writing failed (e.g. a read-only store).
    Failed(String),
}

/// One verified instance.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Verified {
    id: String,
    number: u32,
    path: PathBuf,
    recorded: Usage,
    /// What the walk found, or why it could not walk.
    found: Result<Usage, String>,
    /// Held leases, when the walk started.
    held: usize,
    record: Record,
}

/// `found - recorded`, per figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
struct Difference {
    files: i64,
    size_bytes: i64,
    disk_bytes: i64,
}

fn signed_diff(found: u64, recorded: u64) -> i64 {
    let d = i128::from(found) - i128::from(recorded);
    i64::try_from(d).unwrap_or(if d < 0 { i64::MIN } else { i64::MAX })
}

impl Verified {
    fn difference(&self) -> Option<Difference> {
        let found = self.found.as_ref().ok()?;
        Some(Difference {
            files: signed_diff(found.files, self.recorded.files),
            size_bytes: signed_diff(found.size_bytes, self.recorded.size_bytes),
            disk_bytes: signed_diff(found.disk_bytes, self.recorded.disk_bytes),
        })
    }

    fn drift(&self) -> bool {
        self.found.as_ref().is_ok_and(|f| *f != self.recorded)
    }

    fn failed(&self) -> bool {
        self.found.is_err() || matches!(self.record, Record::Failed(_))
    }

    /// The human line: `apt #1: ok (2 files, 9.8 KiB)`, or the drift and what was done.
    fn line(&self) -> String {
        let who = format!("{} #{}", one_line(&self.id), self.number);
        let found = match &self.found {
            Ok(found) => found,
            Err(e) => return format!("{who}: {e}"),
        };
        let mut line = if self.drift() {
            let d = self.difference().unwrap_or(Difference {
                files: 0,
                size_bytes: 0,
                disk_bytes: 0,
            });
            let files = if d.files.unsigned_abs() == 1 {
                "file"
            } else {
                "files"
            };
            let mut drift = format!("drift {:+} {files}, {:+} bytes", d.files, d.size_bytes);
            if d.size_bytes == 0 && d.disk_bytes != 0 {
                drift.push_str(&format!(", {:+} disk bytes", d.disk_bytes));
            }
            format!(
                "{who}: recorded {}; found {} ({drift})",
                usage_text(&self.recorded),
                usage_text(found)
            )
        } else {
            format!("{who}: ok ({})", usage_text(found))
        };
        match (&self.record, self.drift()) {
            (Record::Recorded, true) => line.push_str(": corrected"),
            (Record::Recorded, false) => line.push_str(", now counted exactly"),
            (Record::InUse, true) => line.push_str(": in use: not corrected"),
            (Record::Failed(e), _) => line.push_str(&format!(": not recorded: {e}")),
            (Record::Unchanged | Record::InUse, _) => {}
        }
        line
    }
}

/// `2 files, 9.8 KiB`
fn usage_text(u: &Usage) -> String {
    let files = if u.files == 1 { "file" } else { "files" };
    format!("{} {files}, {}", u.files, format_size(u.size_bytes))
}

/// The last line of a human `--verify` report.
fn summary(results: &[Verified]) -> String {
    let n = results.len();
    let instances = if n == 1 { "instance" } else { "instances" };
    let drifted: Vec<&Verified> = results.iter().filter(|r| r.drift()).collect();
    let unscanned = results.iter().filter(|r| r.found.is_err()).count();
    let mut parts = Vec::new();
    if drifted.is_empty() {
        parts.push("no drift".to_owned());
    } else {
        let count = |want: fn(&Record) -> bool| drifted.iter().filter(|r| want(&r.record)).count();
        let corrected = count(|r| matches!(r, Record::Recorded));
        let in_use = count(|r| matches!(r, Record::InUse));
        let failed = count(|r| matches!(r, Record::Failed(_)));
        let mut how = Vec::new();
        if corrected > 0 {
            how.push(format!("{corrected} corrected"));
        }
        if in_use > 0 {
            how.push(format!("{in_use} in use, not corrected"));
        }
        if failed > 0 {
            how.push(format!("{failed} not recorded"));
        }
        parts.push(format!("drift in {} ({})", drifted.len(), how.join(", ")));
    }
    if unscanned > 0 {
        parts.push(format!("{unscanned} could not be scanned"));
    }
    format!("verified {n} {instances}: {}", parts.join("; "))
}

/// Held leases on instance `number` among `rows`.
fn held_on(rows: &[LeaseRow], number: u32) -> usize {
    rows.iter()
        .filter(|r| r.instance == number && r.state == LeaseState::Held)
        .count()
}

fn verify(store: &Store, caches: &[CacheInfo], json: bool) -> anyhow::Result<i32> {
    let mut results = Vec::new();
    for cache in caches {
        let id = CacheId::new(&cache.id)
            .with_context(|| format!("the store holds an invalid cache id {:?}", cache.id))?;
        let usages = store.instance_usages(Some(&id))?;
        for inst in &cache.instances {
            // Fresh for each instance: a walk can take a while, and leases come and go.
            let leases = lease::list(store, Some(&id))?;
            let recorded = usages.iter().find(|u| u.number == inst.number);
            let v = verify_instance(store, &id, inst, recorded, &leases);
            if !json {
                print_stdout(&format!("{}\n", v.line()))?;
            }
            results.push(v);
        }
    }
    let drift = results.iter().any(Verified::drift);
    let failed = results.iter().any(Verified::failed);
    if json {
        print_json(&verify_json(&results))?;
    } else {
        print_stdout(&format!("{}\n", summary(&results)))?;
    }
    Ok(if drift || failed { 1 } else { 0 })
}

/// Walks one instance, compares, and records the walk when nobody holds the instance.
fn verify_instance(
    store: &Store,
    id: &CacheId,
    inst: &InstanceInfo,
    recorded: Option<&InstanceUsage>,
    leases: &[LeaseRow],
) -> Verified {
    let held = held_on(leases, inst.number);
    let counted = recorded.is_some_and(|u| u.counted);
    let dirty = recorded.is_some_and(|u| u.dirty);
    let mut v = Verified {
        id: id.as_str().to_owned(),
        number: inst.number,
        path: inst.path.clone(),
        recorded: recorded.map(|u| u.usage).unwrap_or_default(),
        found: Err(String::new()),
        held,
        record: Record::Unchanged,
    };
    let scan = match accounting::scan(&inst.path) {
        Ok(scan) => scan,
        Err(e) => {
            v.found = Err(format!("cannot scan {}: {e}", path_line(&inst.path)));
            return v;
        }
    };
    v.found = Ok(scan.usage);
    let drift = v.drift();
    if !(drift || !counted || (dirty && held == 0)) {
        return v;
    }
    if held > 0 {
        v.record = Record::InUse;
        return v;
    }
    // Taken again after the walk: a mount may have started meanwhile.
    v.record = match lease::list(store, Some(id)) {
        Ok(rows) if held_on(&rows, inst.number) > 0 => Record::InUse,
        Ok(_) => match record_scan(store, id, inst.number, &scan, dirty) {
            Ok(()) => Record::Recorded,
            Err(e) => Record::Failed(format!("{e:#}")),
        },
        Err(e) => Record::Failed(format!("{e:#}")),
    };
    v
}

/// Records `scan` as the instance's exact counters, clearing a `dirty` mark left by an
/// unclean stop.
fn record_scan(
    store: &Store,
    id: &CacheId,
    number: u32,
    scan: &Scan,
    dirty: bool,
) -> anyhow::Result<()> {
    store.replace_with_scan(id, number, scan, lease::now_ms())?;
    if dirty {
        store.set_usage_dirty(id, number, false)?;
        // A mount that started in the meantime marked it before we cleared it: give its
        // mark back, so that if it stops uncleanly that is still seen.
        if held_on(&lease::list(store, Some(id))?, number) > 0 {
            store.set_usage_dirty(id, number, true)?;
        }
    }
    Ok(())
}

/// `du --verify --json`.
#[derive(Debug, Serialize)]
struct VerifyJson<'a> {
    /// Some instance's counters differed from what was found.
    drift: bool,
    instances: Vec<VerifiedJson<'a>>,
}

#[derive(Debug, Serialize)]
struct VerifiedJson<'a> {
    id: &'a str,
    number: u32,
    path: String,
    recorded: Usage,
    /// `null` when the instance could not be scanned.
    found: Option<Usage>,
    /// `found - recorded`; `null` when not scanned.
    difference: Option<Difference>,
    drift: bool,
    /// Held leases when the walk started.
    in_use: usize,
    /// The store now holds what was found.
    corrected: bool,
    /// Why it could not be scanned or recorded.
    error: Option<String>,
}

fn verify_json(results: &[Verified]) -> VerifyJson<'_> {
    VerifyJson {
        drift: results.iter().any(Verified::drift),
        instances: results
            .iter()
            .map(|v| VerifiedJson {
                id: &v.id,
                number: v.number,
                path: v.path.to_string_lossy().into_owned(),
                recorded: v.recorded,
                found: v.found.as_ref().ok().copied(),
                difference: v.difference(),
                drift: v.drift(),
                in_use: v.held,
                corrected: v.record == Record::Recorded,
                error: match (&v.found, &v.record) {
                    (Err(e), _) | (Ok(_), Record::Failed(e)) => Some(e.clone()),
                    _ => None,
                },
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::ls::tests::row;
    use crate::spec::Sharing;

    const NOW: i64 = 1_795_645_903;

    fn usage(size: u64, files: u64) -> Usage {
        let mut u = Usage::default();
        for i in 0..files {
            // All the bytes in the first file.
            u.add_file(if i == 0 { size } else { 0 });
        }
        u
    }

    fn cache(id: &str, instances: &[u32], last_used_ago: i64) -> CacheInfo {
        CacheInfo {
            id: id.to_owned(),
            key: format!("{id}-0123456789abcdef"),
            created: NOW - 86_400,
            last_used: NOW - last_used_ago,
            instances: instances
                .iter()
                .map(|&n| InstanceInfo {
                    number: n,
                    path: PathBuf::from(format!("/s/caches/{id}/{n}")),
                    created: NOW - 86_400,
                    last_used: NOW - last_used_ago,
                })
                .collect(),
        }
    }

    fn rec(id: &str, number: u32, u: Usage, counted: bool, dirty: bool) -> InstanceUsage {
        InstanceUsage {
            id: id.to_owned(),
            number,
            usage: u,
            counted,
            dirty,
            created: NOW - 86_400,
            last_used: NOW - 3600,
            evictions: 0,
            evicted_bytes: 0,
            hits: 0,
            misses: 0,
            max_size: None,
            driver: crate::store::Driver::Fuse,
            rescan_pending: false,
            rescanned_ms: None,
        }
    }

    /// apt: 1 instance, 10 MiB, exact, idle. cargo: 2 instances (one not counted), 50 MiB,
    /// held twice and waited for once. tiny: 1 file, driver=bind, held (dirty, and pending its
    /// release-time rescan: a bind mount holds it). empty: no instance.
    fn sample() -> Vec<CacheDu> {
        let caches = vec![
            cache("apt", &[1], 300),
            cache("cargo", &[1, 2], 7200),
            cache("empty", &[], 86_400 * 3),
            cache("tiny", &[1], 5),
        ];
        let mut usages = vec![
            rec("apt", 1, usage(10 << 20, 3), true, false),
            rec("cargo", 1, usage(30 << 20, 100), true, false),
            rec("cargo", 2, usage(20 << 20, 50), false, false),
            rec("tiny", 1, usage(1, 1), true, true),
        ];
        usages[0].max_size = Some(1 << 30);
        usages[3].driver = Driver::Bind;
        usages[3].rescan_pending = true;
        usages[3].rescanned_ms = Some((NOW - 600) * 1000);
        let leases = vec![
            row(1, "cargo", 1, Sharing::Shared, true),
            row(2, "cargo", 2, Sharing::Private, true),
            row(3, "cargo", 1, Sharing::Locked, false),
            row(4, "tiny", 1, Sharing::Shared, true),
            row(5, "unknown", 1, Sharing::Shared, true),
        ];
        collect(&caches, &usages, &leases)
    }

    #[test]
    fn sums_instances_and_sorts_by_disk() {
        let rows = sample();
        let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["cargo", "apt", "tiny", "empty"]);
        let cargo = &rows[0];
        assert_eq!(cargo.usage.size_bytes, 50 << 20);
        assert_eq!(cargo.usage.files, 150);
        assert_eq!(cargo.instances.len(), 2);
        assert_eq!((cargo.held, cargo.waiting), (2, 1));
        assert_eq!(
            (cargo.instances[0].held, cargo.instances[1].held),
            (1, 1),
            "{cargo:?}"
        );
        assert!(!cargo.exact(), "instance 2 was never counted");
        assert!(rows[1].exact());
        assert_eq!(rows[1].max_size, Some(1 << 30));
        assert!(rows[2].exact(), "dirty under a live lease is live counting");
        assert!(rows[3].exact() && rows[3].instances.is_empty());
        assert_eq!(rows[3].last_used, NOW - 3 * 86_400);
        // The instance's last use counts when it is later than the cache's.
        assert_eq!(rows[1].last_used, NOW - 300);
        assert_eq!(rows[0].last_used, NOW - 3600);
    }

    #[test]
    fn ties_break_by_apparent_size_then_id() {
        let caches = vec![
            cache("b", &[1], 0),
            cache("a", &[1], 0),
            cache("c", &[1], 0),
        ];
        let usages = vec![
            rec("a", 1, usage(10, 1), true, false),
            rec("b", 1, usage(10, 1), true, false),
            rec("c", 1, usage(20, 1), true, false),
        ];
        let rows = collect(&caches, &usages, &[]);
        let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(
            ids,
            ["c", "a", "b"],
            "same disk: larger size first, then id"
        );
    }

    #[test]
    fn dirty_without_a_holder_is_not_exact() {
        let rows = collect(
            &[cache("x", &[1], 0)],
            &[rec("x", 1, usage(1, 1), true, true)],
            &[],
        );
        assert!(!rows[0].exact());
        assert!(is_exact(true, false, 0));
        assert!(is_exact(true, true, 1));
        assert!(!is_exact(false, false, 3));
    }

    #[test]
    fn table_layout() {
        let text = render(&sample(), NOW);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "ID          SIZE       DISK  FILES  INST  DRIVER  LAST USED  IN USE",
                "cargo  ~50.0 MiB  ~50.0 MiB   ~150     2  fuse    1h ago     2 mounts, 1 waiting",
                "apt     10.0 MiB   10.0 MiB      3     1  fuse    5m ago     -",
                "tiny        *1 B   *4.0 KiB     *1     1  bind    5s ago     1 mount",
                "empty        0 B        0 B      0     0  fuse    3d ago     -",
                "TOTAL  ~60.0 MiB  ~60.0 MiB   ~154     4          5s ago     3 mounts, 1 waiting",
                "~ not yet counted exactly: run cachefs du --verify",
                "* driver=bind: as of the last release; what its bind mounts change is counted when the last holder leaves",
            ],
            "{text}"
        );
    }

    #[test]
    fn exact_table_has_no_marks_or_footnote() {
        let rows = collect(
            &[cache("odd\nid", &[1], 60)],
            &[rec("odd\nid", 1, usage(10001, 2), true, false)],
            &[],
        );
        let text = render(&rows, NOW);
        assert_eq!(
            text,
            "ID            SIZE      DISK  FILES  INST  DRIVER  LAST USED  IN USE\n\
             \"odd\\nid\"  9.8 KiB  12.0 KiB      2     1  fuse    1m ago     -\n\
             TOTAL      9.8 KiB  12.0 KiB      2     1          1m ago     -\n"
        );
        assert_eq!(render(&[], NOW), "no caches\n");
    }

    #[test]
    fn in_use_texts() {
        assert_eq!(in_use_text(0, 0), "-");
        assert_eq!(in_use_text(1, 0), "1 mount");
        assert_eq!(in_use_text(2, 0), "2 mounts");
        assert_eq!(in_use_text(0, 3), "3 waiting");
        assert_eq!(in_use_text(2, 1), "2 mounts, 1 waiting");
    }

    #[test]
    fn json_shape() {
        let rows = sample();
        let v = serde_json::to_value(json_rows(&rows)).expect("serialisable");
        let arr = v.as_array().expect("an array");
        assert_eq!(arr.len(), 4);
        let ids: Vec<&str> = arr.iter().filter_map(|c| c["id"].as_str()).collect();
        assert_eq!(ids, ["cargo", "apt", "tiny", "empty"]);
        let cargo = &arr[0];
        let mut keys: Vec<&str> = cargo
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "as_of_release",
                "disk_bytes",
                "driver",
                "exact",
                "files",
                "id",
                "in_use",
                "instances",
                "instances_detail",
                "last_used",
                "last_used_at",
                "max_size",
                "size_bytes",
                "waiting"
            ]
        );
        assert_eq!(cargo["size_bytes"], 50u64 << 20);
        assert_eq!(cargo["disk_bytes"], 50u64 << 20);
        assert_eq!(cargo["files"], 150);
        assert_eq!(cargo["instances"], 2);
        assert_eq!(cargo["last_used"], NOW - 3600);
        assert_eq!(cargo["last_used_at"], "2026-11-25T21:31:43Z");
        assert_eq!(cargo["in_use"], 2);
        assert_eq!(cargo["waiting"], 1);
        assert_eq!(cargo["exact"], false);
        assert_eq!(cargo["max_size"], serde_json::Value::Null);
        let d = &cargo["instances_detail"];
        assert_eq!(d[0]["number"], 1);
        assert_eq!(d[0]["files"], 100);
        assert_eq!(d[0]["counted"], true);
        assert_eq!(d[1]["number"], 2);
        assert_eq!(d[1]["counted"], false);
        assert_eq!(d[1]["dirty"], false);
        assert_eq!(d[1]["in_use"], 1);
        assert_eq!(d[1]["size_bytes"], 20u64 << 20);
        assert_eq!(arr[1]["max_size"], 1u64 << 30);
        assert_eq!(arr[1]["exact"], true);
        assert_eq!(arr[3]["instances_detail"], serde_json::json!([]));
    }

    fn verified(recorded: Usage, found: Result<Usage, String>, record: Record) -> Verified {
        Verified {
            id: "apt".to_owned(),
            number: 1,
            path: PathBuf::from("/s/caches/apt/1"),
            recorded,
            found,
            held: usize::from(record == Record::InUse),
            record,
        }
    }

    #[test]
    fn verify_lines() {
        let found = usage(10001, 2);
        let v = verified(found, Ok(found), Record::Unchanged);
        assert!(!v.drift());
        assert_eq!(v.line(), "apt #1: ok (2 files, 9.8 KiB)");
        let v = verified(found, Ok(found), Record::Recorded);
        assert_eq!(
            v.line(),
            "apt #1: ok (2 files, 9.8 KiB), now counted exactly"
        );
        let v = verified(Usage::default(), Ok(found), Record::Recorded);
        assert!(v.drift());
        assert_eq!(
            v.line(),
            "apt #1: recorded 0 files, 0 B; found 2 files, 9.8 KiB \
             (drift +2 files, +10001 bytes): corrected"
        );
        let v = verified(usage(20000, 3), Ok(found), Record::InUse);
        assert_eq!(
            v.line(),
            "apt #1: recorded 3 files, 19.5 KiB; found 2 files, 9.8 KiB \
             (drift -1 file, -9999 bytes): in use: not corrected"
        );
        let v = verified(
            Usage::default(),
            Ok(found),
            Record::Failed("read-only".to_owned()),
        );
        assert!(
            v.line().ends_with(": not recorded: read-only"),
            "{}",
            v.line()
        );
        let v = verified(
            found,
            Err("cannot scan /s/caches/apt/1: gone".to_owned()),
            Record::Unchanged,
        );
        assert!(!v.drift() && v.failed());
        assert_eq!(v.line(), "apt #1: cannot scan /s/caches/apt/1: gone");
        // Same apparent size, other blocks.
        let mut moved = found;
        moved.disk_bytes += 4096;
        let v = verified(found, Ok(moved), Record::Recorded);
        assert!(
            v.line()
                .contains("(drift +0 files, +0 bytes, +4096 disk bytes)")
        );
    }

    #[test]
    fn verify_summary() {
        let u = usage(1, 1);
        let ok = verified(u, Ok(u), Record::Unchanged);
        assert_eq!(
            summary(std::slice::from_ref(&ok)),
            "verified 1 instance: no drift"
        );
        let fixed = verified(Usage::default(), Ok(u), Record::Recorded);
        let busy = verified(Usage::default(), Ok(u), Record::InUse);
        let gone = verified(u, Err("x".to_owned()), Record::Unchanged);
        assert_eq!(
            summary(&[ok, fixed, busy, gone]),
            "verified 4 instances: drift in 2 (1 corrected, 1 in use, not corrected); \
             1 could not be scanned"
        );
    }

    #[test]
    fn verify_json_shape() {
        let u = usage(10001, 2);
        let results = [
            verified(Usage::default(), Ok(u), Record::Recorded),
            verified(u, Err("cannot scan".to_owned()), Record::Unchanged),
        ];
        let v = serde_json::to_value(verify_json(&results)).expect("serialisable");
        assert_eq!(v["drift"], true);
        let a = &v["instances"][0];
        assert_eq!(a["id"], "apt");
        assert_eq!(a["number"], 1);
        assert_eq!(a["path"], "/s/caches/apt/1");
        assert_eq!(a["recorded"]["files"], 0);
        assert_eq!(a["found"]["size_bytes"], 10001);
        assert_eq!(a["found"]["disk_bytes"], 12288);
        assert_eq!(a["difference"]["files"], 2);
        assert_eq!(a["difference"]["size_bytes"], 10001);
        assert_eq!(a["drift"], true);
        assert_eq!(a["corrected"], true);
        assert_eq!(a["in_use"], 0);
        assert_eq!(a["error"], serde_json::Value::Null);
        let b = &v["instances"][1];
        assert_eq!(b["found"], serde_json::Value::Null);
        assert_eq!(b["difference"], serde_json::Value::Null);
        assert_eq!(b["drift"], false);
        assert_eq!(b["error"], "cannot scan");
    }

    #[test]
    fn verify_records_a_free_instance_and_only_reports_a_held_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let id = CacheId::new("v").expect("id");
        let inst = store
            .open_instance(&id, 1, &crate::store::InstanceInit::default())
            .expect("instance");
        std::fs::write(inst.path.join("f"), vec![1u8; 5000]).expect("write");
        store.set_usage_dirty(&id, 1, true).expect("dirty");
        let cache = store.get_cache(&id).expect("read").expect("cache");
        let info = &cache.instances[0];
        let recorded = store.instance_usages(Some(&id)).expect("usages");

        // Held (a lease row the listing would show): reported, not written.
        let held = [row(1, "v", 1, Sharing::Shared, true)];
        let v = verify_instance(&store, &id, info, recorded.first(), &held);
        assert!(v.drift());
        assert_eq!(v.record, Record::InUse);
        let after = store.instance_usages(Some(&id)).expect("usages");
        assert_eq!(after[0].usage, Usage::default());
        assert!(!after[0].counted);

        // Free: recorded, marked exact and clean.
        let v = verify_instance(&store, &id, info, recorded.first(), &[]);
        assert_eq!(v.record, Record::Recorded);
        let after = store.instance_usages(Some(&id)).expect("usages");
        assert_eq!(after[0].usage, usage(5000, 1));
        assert!(after[0].counted && !after[0].dirty, "{:?}", after[0]);

        // Again: nothing to do.
        let v = verify_instance(&store, &id, info, after.first(), &[]);
        assert!(!v.drift());
        assert_eq!(v.record, Record::Unchanged);

        // A missing directory is an error, not drift.
        std::fs::remove_dir_all(&info.path).expect("remove");
        let v = verify_instance(&store, &id, info, after.first(), &[]);
        assert!(v.failed() && !v.drift());
        assert!(v.line().starts_with("v #1: cannot scan /"), "{}", v.line());
    }
}
