//! `cachefs inspect ID`: one cache, its instances, who holds them, and who waits.

use std::path::PathBuf;

use anyhow::anyhow;
use serde::Serialize;

use super::du::is_exact;
use super::ls::{
    Entry, LeaseJson, age_ms, one_line, open_existing_store, path_line, print_json, print_stdout,
    render_table, rfc3339_utc, terminal_width, with_positions,
};
use super::{Global, usage};
use crate::accounting::Usage;
use crate::lease;
use crate::store::{
    CACHES_DIR, CacheId, CacheInfo, Driver, InstanceInfo, InstanceUsage, LeaseState,
};
use crate::units::{format_age, format_local_time, format_size};

const AFTER_HELP: &str = "\
Shows when the cache was created and last used, its directory in the store, each instance
(the backing directory of a mount; private mounts of a busy cache get more than one) with the
leases that hold it, and the requests waiting for it in arrival order. Records of processes
that died are dropped on the way. When stdout is a terminal, commands are cut to its width.

Each instance shows what it holds (files, apparent size, size on disk in 4 KiB blocks; \"not
counted exactly\" until `cachefs du --verify` counts it), and, once there are any, its
FUSE hits / misses (lookups through FUSE mounts that found / did not find a file: a bind
mount's lookups are native and not seen) and evictions. A cache with a budget shows it with
the share used. A driver=bind cache says so and when its figures were last counted (at the
release of its last holder); an instance a bind mount holds now shows the figures of then.

JSON (--json): an object with id, key, directory, created and last_used (unix seconds) and
created_at / last_used_at (RFC 3339 UTC), instances (number, path, the same times, and
leases: the held leases) and queue (the waiting requests in arrival order). Leases have the
fields of `cachefs ls --json`. Usage: the cache's size_bytes, disk_bytes and files (sums over
its instances), exact, and max_size (its budget in disk bytes, or null); each instance's
usage (null when not recorded): size_bytes, disk_bytes, files, counted, dirty, exact,
evictions, evicted_bytes, hits, misses (FUSE mounts only), rescan_pending (a bind mount
changed it since the last count), rescanned_ms (when that count was, unix ms, or null). The
cache's driver: driver (fuse or bind).

Exit status: 0; 1 when the store has no cache with that id; 2 for an invalid id.

Examples:
  # The apt cache: instances, holders, waiters
  cachefs inspect apt

  # A cache whose id defaulted to its target path
  cachefs inspect /root/.cache/pip

  # The pid holding the cache \"cargo\", if any
  cachefs inspect --json cargo | jq '.instances[].leases[].pid'";

/// `cachefs inspect` arguments.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct Args {
    /// The cache id (as in --mount id=ID; the target path when the mount gave no id)
    #[arg(value_name = "ID")]
    pub id: String,

    /// Print a JSON object instead of text
    #[arg(long)]
    pub json: bool,
}

pub fn run(global: &Global, args: Args) -> anyhow::Result<i32> {
    let id = CacheId::new(&args.id).map_err(usage)?;
    let (root, store) = open_existing_store(global)?;
    let not_found = || {
        anyhow!(
            "no cache with id {:?} in store {} (see cachefs ls / cachefs du)",
            id.as_str(),
            path_line(&root)
        )
    };
    let Some(store) = store else {
        return Err(not_found());
    };
    let Some(cache) = store.get_cache(&id)? else {
        return Err(not_found());
    };
    let entries = with_positions(lease::list(&store, Some(&id))?);
    let dir = store.root().join(CACHES_DIR).join(&cache.key);
    let usages = store.instance_usages(Some(&id))?;
    let layers: Vec<crate::store::LayerRecord> = store
        .list_layers()?
        .into_iter()
        .filter(|l| l.cache.as_deref() == Some(id.as_str()))
        .collect();
    let mut last_layers = Vec::new();
    for i in &cache.instances {
        if let Some(l) = store.instance_layer(&id, i.number)? {
            last_layers.push((i.number, l));
        }
    }
    let view = View::new(&cache, dir, &entries)
        .with_usage(&usages)
        .with_layers(&layers, &last_layers);
    if args.json {
        print_json(&view.json())?;
    } else {
        let text = view.render(lease::now_ms(), &lease::this_host(), terminal_width());
        print_stdout(&text)?;
    }
    Ok(0)
}

/// A cache with its leases sorted out by instance.
struct View<'a> {
    cache: &'a CacheInfo,
    /// `STORE/caches/<key>`
    dir: PathBuf,
    instances: Vec<InstanceView<'a>>,
    /// Waiting requests, in arrival order.
    queue: Vec<&'a Entry>,
    /// Usage records were attached ([`View::with_usage`]): show them.
    show_usage: bool,
    /// The cache's budget, in disk bytes.
    budget: Option<u64>,
    /// The cache's stored driver.
    driver: Driver,
    /// Layers snapshotted from this cache, newest first.
    layers: &'a [crate::store::LayerRecord],
}

struct InstanceView<'a> {
    number: u32,
    path: PathBuf,
    /// `None` for an instance that is held but has no record (it was lost or not yet made).
    info: Option<&'a InstanceInfo>,
    /// Held leases, in arrival order.
    holders: Vec<&'a Entry>,
    /// Its accounting record, if any.
    usage: Option<&'a InstanceUsage>,
    /// The layer it was last snapshotted as or restored from.
    layer: Option<&'a str>,
}

impl InstanceView<'_> {
    fn exact(&self) -> bool {
        self.usage
            .is_none_or(|u| is_exact(u.counted, u.dirty, self.holders.len()))
    }
}

impl<'a> View<'a> {
    fn new(cache: &'a CacheInfo, dir: PathBuf, entries: &'a [Entry]) -> View<'a> {
        let mut instances: Vec<InstanceView<'a>> = cache
            .instances
            .iter()
            .map(|info| InstanceView {
                number: info.number,
                path: info.path.clone(),
                info: Some(info),
                holders: Vec::new(),
                usage: None,
                layer: None,
            })
            .collect();
        let mut sorted: Vec<&Entry> = entries.iter().collect();
        sorted.sort_by_key(|e| e.row.seq);
        let mut queue = Vec::new();
        for e in sorted {
            if e.row.state == LeaseState::Waiting {
                queue.push(e);
                continue;
            }
            let number = e.row.instance;
            match instances.iter_mut().find(|i| i.number == number) {
                Some(i) => i.holders.push(e),
                None => instances.push(InstanceView {
                    number,
                    path: dir.join(number.to_string()),
                    info: None,
                    holders: vec![e],
                    usage: None,
                    layer: None,
                }),
            }
        }
        instances.sort_by_key(|i| i.number);
        View {
            cache,
            dir,
            instances,
            queue,
            show_usage: false,
            budget: None,
            driver: Driver::Fuse,
            layers: &[],
        }
    }

    /// Attaches the cache's layers (newest first) and each instance's last layer.
    fn with_layers(
        mut self,
        layers: &'a [crate::store::LayerRecord],
        last: &'a [(u32, String)],
    ) -> View<'a> {
        self.layers = layers;
        for (n, l) in last {
            if let Some(i) = self.instances.iter_mut().find(|i| i.number == *n) {
                i.layer = Some(l);
            }
        }
        self
    }

    /// Attaches the cache's accounting records (`Store::instance_usages`), to be shown.
    fn with_usage(mut self, usages: &'a [InstanceUsage]) -> View<'a> {
        self.show_usage = true;
        for u in usages.iter().filter(|u| u.id == self.cache.id) {
            self.budget = self.budget.or(u.max_size);
            self.driver = u.driver;
            if let Some(i) = self.instances.iter_mut().find(|i| i.number == u.number) {
                i.usage = Some(u);
            }
        }
        self
    }

    /// The sums over the instances' records.
    fn total(&self) -> Usage {
        let mut total = Usage::default();
        for u in self.instances.iter().filter_map(|i| i.usage) {
            total.add(u.usage);
        }
        total
    }

    /// The cells an instance's line gets for its usage: what it holds, then hits / misses
    /// and evictions when any instance has some (empty cells keep the columns aligned).
    fn usage_cells(&self, i: &InstanceView<'_>) -> Vec<String> {
        if !self.show_usage {
            return Vec::new();
        }
        let any =
            |f: fn(&InstanceUsage) -> bool| self.instances.iter().any(|i| i.usage.is_some_and(f));
        let lookups = any(|u| u.hits > 0 || u.misses > 0);
        let evictions = any(|u| u.evictions > 0);
        let Some(u) = i.usage else {
            return vec![String::new(); 1 + usize::from(lookups) + usize::from(evictions)];
        };
        let files = if u.usage.files == 1 { "file" } else { "files" };
        let mut held = format!(
            "{} {files}, {} ({} on disk)",
            u.usage.files,
            format_size(u.usage.size_bytes),
            format_size(u.usage.disk_bytes)
        );
        if !i.exact() {
            held.push_str(", not counted exactly");
        } else if u.rescan_pending {
            held.push_str(", as of the last release");
        }
        let mut cells = vec![held];
        if lookups {
            cells.push(format!("FUSE hits {}, misses {}", u.hits, u.misses));
        }
        if evictions {
            cells.push(format!(
                "evicted {} ({})",
                u.evictions,
                format_size(u.evicted_bytes)
            ));
        }
        cells
    }

    fn render(&self, now_ms: i64, host: &str, width: Option<usize>) -> String {
        let now = now_ms.div_euclid(1000);
        let when = |secs: i64| format!("{} ({})", format_local_time(secs), format_age(secs, now));
        let c = self.cache;
        let mut out = String::new();
        let mut field = |label: &str, value: &str| {
            out.push_str(format!("{label:<9}  {value}").trim_end());
            out.push('\n');
        };
        field("cache", &one_line(&c.id));
        field("created", &when(c.created));
        field("last used", &when(c.last_used));
        field("directory", &path_line(&self.dir));
        if let Some(budget) = self.budget {
            let used = self.total().disk_bytes;
            let percent = u128::from(used) * 100 / u128::from(budget.max(1));
            field(
                "budget",
                &format!(
                    "{} ({} used on disk, {percent}%)",
                    format_size(budget),
                    format_size(used)
                ),
            );
        }
        if self.show_usage {
            let last_count = self
                .instances
                .iter()
                .filter_map(|i| i.usage.and_then(|u| u.rescanned_ms))
                .max();
            let driver = match (self.driver, last_count) {
                (Driver::Fuse, _) => "fuse (counted live)".to_owned(),
                (Driver::Bind, None) => "bind (counted at each release; not yet)".to_owned(),
                (Driver::Bind, Some(ms)) => format!(
                    "bind (counted at each release; last {})",
                    when(ms.div_euclid(1000))
                ),
            };
            field("driver", &driver);
        }
        if let Some(newest) = self.layers.first() {
            let tags: Vec<&str> = self
                .layers
                .iter()
                .flat_map(|l| l.tags.iter().map(String::as_str))
                .collect();
            field(
                "layers",
                &format!(
                    "{} (newest {}, {}){}",
                    self.layers.len(),
                    &newest.digest[..newest.digest.len().min(12)],
                    format_age(newest.created, now),
                    if tags.is_empty() {
                        String::new()
                    } else {
                        format!("; tags {}", tags.join(", "))
                    }
                ),
            );
        }
        field("instances", &self.instances.len().to_string());

        let headers: Vec<Vec<String>> = self
            .instances
            .iter()
            .map(|i| {
                let holders = match i.holders.len() {
                    0 => "free".to_owned(),
                    1 => "1 holder".to_owned(),
                    n => format!("{n} holders"),
                };
                let (used, created) = match i.info {
                    Some(info) => (
                        format!("last used {}", format_age(info.last_used, now)),
                        format!("created {}", format_age(info.created, now)),
                    ),
                    None => ("not recorded".to_owned(), String::new()),
                };
                let mut cells = vec![format!("#{}", i.number), holders, used, created];
                cells.extend(self.usage_cells(i));
                if let Some(l) = i.layer {
                    cells.push(format!("layer {}", &l[..l.len().min(12)]));
                }
                cells.push(path_line(&i.path));
                cells
            })
            .collect();
        let headers = render_table(&headers, "  ", None);
        // One table for every holder line, so they align across instances.
        let holder_rows: Vec<Vec<String>> = self
            .instances
            .iter()
            .flat_map(|i| i.holders.iter().map(|e| lease_cells(e, now_ms, host, None)))
            .collect();
        let mut holder_lines = render_table(&holder_rows, "      ", width).into_iter();
        for (i, header) in self.instances.iter().zip(headers) {
            out.push_str(&header);
            out.push('\n');
            for line in holder_lines.by_ref().take(i.holders.len()) {
                out.push_str(&line);
                out.push('\n');
            }
        }

        if self.queue.is_empty() {
            out.push_str("queue      empty\n");
        } else {
            out.push_str(&format!("queue      {} waiting\n", self.queue.len()));
            let rows: Vec<Vec<String>> = self
                .queue
                .iter()
                .map(|e| {
                    let mut cells = vec![format!("{}.", e.position.unwrap_or(0))];
                    cells.extend(lease_cells(e, now_ms, host, Some(e.row.instance)));
                    cells
                })
                .collect();
            for line in render_table(&rows, "  ", width) {
                out.push_str(&line);
                out.push('\n');
            }
        }
        out
    }

    fn json(&self) -> CacheJson<'_> {
        let c = self.cache;
        let total = self.total();
        CacheJson {
            id: &c.id,
            key: &c.key,
            directory: self.dir.to_string_lossy().into_owned(),
            created: c.created,
            created_at: rfc3339_utc(c.created),
            last_used: c.last_used,
            last_used_at: rfc3339_utc(c.last_used),
            size_bytes: total.size_bytes,
            disk_bytes: total.disk_bytes,
            files: total.files,
            exact: self.instances.iter().all(InstanceView::exact),
            max_size: self.budget,
            driver: self.driver.as_str(),
            instances: self
                .instances
                .iter()
                .map(|i| InstanceJson {
                    number: i.number,
                    path: i.path.to_string_lossy().into_owned(),
                    created: i.info.map(|info| info.created),
                    created_at: i.info.map(|info| rfc3339_utc(info.created)),
                    last_used: i.info.map(|info| info.last_used),
                    last_used_at: i.info.map(|info| rfc3339_utc(info.last_used)),
                    leases: i.holders.iter().map(|e| LeaseJson::new(e)).collect(),
                    usage: i.usage.map(|u| UsageJson {
                        size_bytes: u.usage.size_bytes,
                        disk_bytes: u.usage.disk_bytes,
                        files: u.usage.files,
                        counted: u.counted,
                        dirty: u.dirty,
                        exact: i.exact(),
                        evictions: u.evictions,
                        evicted_bytes: u.evicted_bytes,
                        hits: u.hits,
                        misses: u.misses,
                        rescan_pending: u.rescan_pending,
                        rescanned_ms: u.rescanned_ms,
                    }),
                    layer: i.layer,
                })
                .collect(),
            queue: self.queue.iter().map(|e| LeaseJson::new(e)).collect(),
            layers: self.layers.iter().map(|l| l.digest.as_str()).collect(),
        }
    }
}

/// `locked  pid 1234  since 12s ago  [instance #1]  target /t  COMMAND`
fn lease_cells(e: &Entry, now_ms: i64, host: &str, instance: Option<u32>) -> Vec<String> {
    let r = &e.row;
    let pid = if r.host != host && !r.host.is_empty() {
        format!("pid {} on {}", r.pid, one_line(&r.host))
    } else {
        format!("pid {}", r.pid)
    };
    let mut cells = vec![
        r.sharing.as_str().to_owned(),
        pid,
        format!("since {}", age_ms(e.started_ms(), now_ms)),
    ];
    if let Some(n) = instance {
        cells.push(format!("instance #{n}"));
    }
    cells.push(format!(
        "target {}",
        r.target.as_deref().map_or("-".into(), one_line)
    ));
    cells.push(one_line(&r.command).into_owned());
    cells
}

/// `inspect --json`. Times are unix seconds, with RFC 3339 UTC twins (`*_at`).
#[derive(Debug, Serialize)]
struct CacheJson<'a> {
    id: &'a str,
    /// The cache's directory name under `caches/` and `leases/`.
    key: &'a str,
    directory: String,
    created: i64,
    created_at: String,
    last_used: i64,
    last_used_at: String,
    /// Sums over the instances' records.
    size_bytes: u64,
    disk_bytes: u64,
    files: u64,
    /// Every instance is counted exactly.
    exact: bool,
    /// The budget, in disk bytes.
    max_size: Option<u64>,
    /// `fuse` or `bind`: the cache's stored driver.
    driver: &'static str,
    instances: Vec<InstanceJson<'a>>,
    /// Waiting requests, in arrival order.
    queue: Vec<LeaseJson<'a>>,
    /// Digests of the layers snapshotted from this cache, newest first.
    layers: Vec<&'a str>,
}

/// The times are `null` for an instance that is held but not recorded.
#[derive(Debug, Serialize)]
struct InstanceJson<'a> {
    number: u32,
    path: String,
    created: Option<i64>,
    created_at: Option<String>,
    last_used: Option<i64>,
    last_used_at: Option<String>,
    /// Held leases, in arrival order.
    leases: Vec<LeaseJson<'a>>,
    /// `null` when the instance has no accounting record.
    usage: Option<UsageJson>,
    /// The layer it was last snapshotted as or restored from.
    layer: Option<&'a str>,
}

/// An instance's accounting, as `inspect --json` prints it.
#[derive(Debug, Serialize)]
struct UsageJson {
    size_bytes: u64,
    disk_bytes: u64,
    files: u64,
    /// Counted by a scan or by live accounting since.
    counted: bool,
    /// A mount is counting into it, or one stopped uncleanly.
    dirty: bool,
    /// The figures can be taken as exact (counted, and not left dirty by an unclean stop).
    exact: bool,
    evictions: u64,
    evicted_bytes: u64,
    /// Lookups that found a file.
    hits: u64,
    /// Lookups that did not.
    misses: u64,
    /// A bind mount changed it since its last release-time rescan.
    rescan_pending: bool,
    /// When that rescan was, unix ms.
    rescanned_ms: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::ls::tests::row;
    use crate::spec::Sharing;

    const NOW_MS: i64 = 1_795_645_903_000;
    const NOW: i64 = NOW_MS / 1000;

    fn cache() -> CacheInfo {
        let dir = PathBuf::from("/s/caches/apt-0123456789abcdef");
        CacheInfo {
            id: "apt".to_owned(),
            key: "apt-0123456789abcdef".to_owned(),
            created: NOW - 3 * 3600,
            last_used: NOW - 300,
            instances: vec![
                InstanceInfo {
                    number: 1,
                    path: dir.join("1"),
                    created: NOW - 3 * 3600,
                    last_used: NOW - 300,
                },
                InstanceInfo {
                    number: 2,
                    path: dir.join("2"),
                    created: NOW - 2 * 3600,
                    last_used: NOW - 3600,
                },
            ],
        }
    }

    fn at(mut r: crate::store::LeaseRow, since_ago_s: i64) -> crate::store::LeaseRow {
        r.since_ms = NOW_MS - since_ago_s * 1000;
        if r.acquired_ms.is_some() {
            r.acquired_ms = Some(r.since_ms);
        }
        r
    }

    fn entries() -> Vec<Entry> {
        let mut held = at(row(7, "apt", 1, Sharing::Locked, true), 12);
        held.command = "apt-get install -y jq".to_owned();
        held.target = Some("/var/cache/apt".to_owned());
        let mut waiting = at(row(9, "apt", 1, Sharing::Locked, false), 10);
        waiting.command = "sleep\n30".to_owned();
        let mut lost = at(row(8, "apt", 3, Sharing::Private, true), 65);
        lost.host = "ci-7".to_owned();
        lost.target = None;
        with_positions(vec![held, lost, waiting])
    }

    #[test]
    fn human_layout() {
        let c = cache();
        let e = entries();
        let view = View::new(&c, PathBuf::from("/s/caches/apt-0123456789abcdef"), &e);
        let text = view.render(NOW_MS, "here", None);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "cache      apt");
        assert!(lines[1].starts_with("created    2026-11-2"), "{}", lines[1]);
        assert!(lines[1].ends_with(" (3h ago)"), "{}", lines[1]);
        assert!(lines[2].starts_with("last used  "), "{}", lines[2]);
        assert!(lines[2].ends_with(" (5m ago)"), "{}", lines[2]);
        assert_eq!(
            &lines[3..],
            [
                "directory  /s/caches/apt-0123456789abcdef",
                "instances  3",
                "  #1  1 holder  last used 5m ago  created 3h ago  /s/caches/apt-0123456789abcdef/1",
                "      locked   pid 1007          since 12s ago  target /var/cache/apt  apt-get install -y jq",
                "  #2  free      last used 1h ago  created 2h ago  /s/caches/apt-0123456789abcdef/2",
                "  #3  1 holder  not recorded                      /s/caches/apt-0123456789abcdef/3",
                "      private  pid 1008 on ci-7  since 1m ago   target -               make -j8",
                "queue      1 waiting",
                "  1.  locked  pid 1009  since 10s ago  instance #1  target /t/9  \"sleep\\n30\"",
            ]
        );
        // Cut to the terminal's width.
        let text = view.render(NOW_MS, "here", Some(90));
        let cut: Vec<&str> = text.lines().filter(|l| l.ends_with('…')).collect();
        assert_eq!(cut.len(), 1, "{text}");
        assert!(
            cut[0].ends_with("target /var/cache/apt  apt-get install -y…"),
            "{text}"
        );
        assert_eq!(cut[0].chars().count(), 90, "{text}");
    }

    #[test]
    fn human_empty_queue_and_no_instances() {
        let mut c = cache();
        c.instances.clear();
        let view = View::new(&c, PathBuf::from("/s/c"), &[]);
        let text = view.render(NOW_MS, "here", None);
        assert!(text.ends_with("instances  0\nqueue      empty\n"), "{text}");
    }

    #[test]
    fn json_shape() {
        let c = cache();
        let e = entries();
        let view = View::new(&c, PathBuf::from("/s/caches/apt-0123456789abcdef"), &e);
        let v = serde_json::to_value(view.json()).expect("serialisable");
        assert_eq!(v["id"], "apt");
        assert_eq!(v["key"], "apt-0123456789abcdef");
        assert_eq!(v["directory"], "/s/caches/apt-0123456789abcdef");
        assert_eq!(v["created"], NOW - 3 * 3600);
        assert_eq!(v["created_at"], "2026-11-25T19:31:43Z");
        assert_eq!(v["last_used"], NOW - 300);
        assert_eq!(v["last_used_at"], "2026-11-25T22:26:43Z");
        let instances = v["instances"].as_array().expect("array");
        assert_eq!(instances.len(), 3);
        assert_eq!(instances[0]["number"], 1);
        assert_eq!(instances[0]["path"], "/s/caches/apt-0123456789abcdef/1");
        assert_eq!(instances[0]["last_used"], NOW - 300);
        assert_eq!(instances[0]["last_used_at"], "2026-11-25T22:26:43Z");
        assert_eq!(instances[0]["leases"][0]["pid"], 1007);
        assert_eq!(instances[0]["leases"][0]["state"], "held");
        assert_eq!(instances[1]["leases"], serde_json::json!([]));
        assert_eq!(instances[2]["number"], 3);
        assert_eq!(instances[2]["created"], serde_json::Value::Null);
        assert_eq!(instances[2]["leases"][0]["host"], "ci-7");
        let queue = v["queue"].as_array().expect("array");
        assert_eq!(queue.len(), 1);
        assert_eq!(queue[0]["pid"], 1009);
        assert_eq!(queue[0]["position"], 1);
        assert_eq!(queue[0]["command"], "sleep\n30");
        assert_eq!(queue[0]["acquired_ms"], serde_json::Value::Null);
    }

    fn usage_of(number: u32, size: u64, counted: bool, dirty: bool) -> InstanceUsage {
        let mut usage = Usage::default();
        usage.add_file(size);
        InstanceUsage {
            id: "apt".to_owned(),
            number,
            usage,
            counted,
            dirty,
            created: NOW - 3600,
            last_used: NOW - 300,
            evictions: 0,
            evicted_bytes: 0,
            hits: 0,
            misses: 0,
            max_size: Some(1 << 20),
            driver: crate::store::Driver::Fuse,
            rescan_pending: false,
            rescanned_ms: None,
        }
    }

    #[test]
    fn usage_in_human_layout() {
        let c = cache();
        let e = entries();
        let mut first = usage_of(1, 10_001, true, true);
        first.hits = 12;
        first.misses = 3;
        let mut second = usage_of(2, 5000, true, true);
        second.evictions = 2;
        second.evicted_bytes = 8192;
        let usages = [first, second];
        let view = View::new(&c, PathBuf::from("/s/c"), &e).with_usage(&usages);
        let text = view.render(NOW_MS, "here", None);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            &lines[3..11],
            [
                "directory  /s/c",
                "budget     1.0 MiB (20.0 KiB used on disk, 1%)",
                "driver     fuse (counted live)",
                "instances  3",
                concat!(
                    "  #1  1 holder  last used 5m ago  created 3h ago  ",
                    "1 file, 9.8 KiB (12.0 KiB on disk)                      ",
                    "FUSE hits 12, misses 3  evicted 0 (0 B)      /s/caches/apt-0123456789abcdef/1"
                ),
                "      locked   pid 1007          since 12s ago  target /var/cache/apt  apt-get install -y jq",
                // Dirty and nobody holds it: a mount stopped uncleanly.
                concat!(
                    "  #2  free      last used 1h ago  created 2h ago  ",
                    "1 file, 4.9 KiB (8.0 KiB on disk), not counted exactly  ",
                    "FUSE hits 0, misses 0   evicted 2 (8.0 KiB)  /s/caches/apt-0123456789abcdef/2"
                ),
                // Held but not recorded: empty cells keep the path in its column.
                concat!(
                    "  #3  1 holder  not recorded                      ",
                    "                                                        ",
                    "                                             /s/c/3"
                ),
            ],
            "{text}"
        );
    }

    #[test]
    fn a_bind_cache_says_when_it_was_counted() {
        let c = cache();
        let e = entries();
        let mut first = usage_of(1, 10_001, true, true);
        first.driver = Driver::Bind;
        first.rescan_pending = true;
        first.rescanned_ms = Some(NOW_MS - 600_000);
        let mut second = usage_of(2, 5000, true, false);
        second.driver = Driver::Bind;
        let usages = [first, second];
        let view = View::new(&c, PathBuf::from("/s/c"), &e).with_usage(&usages);
        let text = view.render(NOW_MS, "here", None);
        let driver = text.lines().find(|l| l.starts_with("driver")).unwrap();
        assert!(
            driver.starts_with("driver     bind (counted at each release; last ")
                && driver.ends_with("(10m ago))"),
            "{text}"
        );
        let one = text.lines().find(|l| l.starts_with("  #1")).unwrap();
        assert!(
            one.contains("(12.0 KiB on disk), as of the last release"),
            "{text}"
        );
        let v = serde_json::to_value(view.json()).unwrap();
        assert_eq!(v["driver"], "bind");
        assert_eq!(v["instances"][0]["usage"]["rescan_pending"], true);
        assert_eq!(v["instances"][0]["usage"]["rescanned_ms"], NOW_MS - 600_000);
    }

    #[test]
    fn usage_in_json() {
        let c = cache();
        let e = entries();
        let usages = [
            usage_of(1, 10_001, true, false),
            usage_of(2, 1, false, false),
        ];
        let view = View::new(&c, PathBuf::from("/s/c"), &e).with_usage(&usages);
        let v = serde_json::to_value(view.json()).expect("serialisable");
        assert_eq!(v["size_bytes"], 10_002);
        assert_eq!(v["disk_bytes"], 16_384);
        assert_eq!(v["files"], 2);
        assert_eq!(v["exact"], false);
        assert_eq!(v["max_size"], 1 << 20);
        let u = &v["instances"][0]["usage"];
        assert_eq!(u["size_bytes"], 10_001);
        assert_eq!(u["disk_bytes"], 12_288);
        assert_eq!(u["files"], 1);
        assert_eq!(u["counted"], true);
        assert_eq!(u["dirty"], false);
        assert_eq!(u["exact"], true);
        for k in ["evictions", "evicted_bytes", "hits", "misses"] {
            assert_eq!(u[k], 0, "{k}");
        }
        assert_eq!(v["instances"][1]["usage"]["exact"], false);
        assert_eq!(v["instances"][2]["usage"], serde_json::Value::Null);
        // Without records (as before accounting), no budget and no usage.
        let view = View::new(&c, PathBuf::from("/s/c"), &e);
        let v = serde_json::to_value(view.json()).expect("serialisable");
        assert_eq!(v["max_size"], serde_json::Value::Null);
        assert_eq!(v["instances"][0]["usage"], serde_json::Value::Null);
    }
}
