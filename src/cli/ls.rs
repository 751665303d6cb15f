//! `cachefs ls` (alias `ps`): every live mount and every waiting lease request, one line each.
//!
//! This module also holds the rendering helpers `inspect` shares, so each is written once:
//! user text made safe for one line ([`one_line`]), aligned tables ([`render_table`]), RFC 3339
//! times ([`rfc3339_utc`]), queue positions ([`with_positions`]), the JSON form of a lease
//! row ([`LeaseJson`]), and opening a store without creating it ([`open_existing_store`]).

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;

use serde::Serialize;

use super::{Global, usage};
use crate::lease;
use crate::store::{self, CacheId, LeaseRow, LeaseState, Store};
use crate::units::format_age;

const AFTER_HELP: &str = "\
Shows every cache mount that is live and every request waiting for one, from all cachefs
processes using the store: cache id, instance, sharing mode, driver (fuse, or bind: a native
bind mount, counted when its last holder leaves), state (held, or waiting and its place in the
queue), pid, since when, target and command. Records of processes that died are
dropped on the way. When stdout is a terminal, COMMAND is cut to the terminal's width.

JSON (--json): an array of objects, sorted by id then arrival, with the fields id, seq,
instance, sharing, state (held|waiting), position (place in the instance's queue, 1 = next;
null when held), kind (run|mount), pid, host, command, target, since_ms and since (when the
lease was asked for: unix milliseconds and RFC 3339 UTC), acquired_ms and acquired (when it
was granted; null while waiting), driver (fuse|bind; null when not a mount, e.g. a snapshot).

Examples:
  # Who is using which cache right now
  cachefs ls

  # Only the apt cache, as JSON
  cachefs ls --json apt

  # The pids of the processes holding or waiting for the cache \"cargo\"
  cachefs ps --json cargo | jq '.[].pid'";

/// `cachefs ls` arguments.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct Args {
    /// Print a JSON array instead of a table
    #[arg(long)]
    pub json: bool,

    /// Only these cache ids (exact match)
    #[arg(value_name = "ID")]
    pub ids: Vec<String>,
}

/// Table header; COMMAND is last because it is the longest and is cut to fit a terminal.
const HEADER: [&str; 9] = [
    "ID", "INST", "MODE", "DRIVER", "STATE", "PID", "SINCE", "TARGET", "COMMAND",
];

/// The one line printed when nothing is listed.
pub(crate) const NOTHING_LISTED: &str = "no live mounts or waiters";

pub fn run(global: &Global, args: Args) -> anyhow::Result<i32> {
    let only = args
        .ids
        .iter()
        .map(|s| CacheId::new(s).map_err(usage))
        .collect::<anyhow::Result<Vec<CacheId>>>()?;
    let (_, store) = open_existing_store(global)?;
    let rows = match &store {
        Some(store) => lease::list(store, None)?,
        None => Vec::new(),
    };
    let mut entries = with_positions(rows);
    if !only.is_empty() {
        entries.retain(|e| only.iter().any(|id| id.as_str() == e.row.id));
    }
    entries.sort_by(|a, b| a.row.id.cmp(&b.row.id).then(a.row.seq.cmp(&b.row.seq)));

    if args.json {
        let json: Vec<LeaseJson<'_>> = entries.iter().map(LeaseJson::new).collect();
        print_json(&json)?;
    } else if entries.is_empty() {
        print_stdout(&format!("{NOTHING_LISTED}\n"))?;
    } else {
        let rows = table_rows(&entries, lease::now_ms(), &lease::this_host());
        let mut out = String::new();
        for line in render_table(&rows, "", terminal_width()) {
            out.push_str(&line);
            out.push('\n');
        }
        print_stdout(&out)?;
    }
    Ok(0)
}

/// The header and one row per lease.
fn table_rows(entries: &[Entry], now_ms: i64, host: &str) -> Vec<Vec<String>> {
    let mut rows = vec![HEADER.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>()];
    for e in entries {
        let r = &e.row;
        let pid = if r.host != host && !r.host.is_empty() {
            format!("{}@{}", r.pid, one_line(&r.host))
        } else {
            r.pid.to_string()
        };
        rows.push(vec![
            one_line(&r.id).into_owned(),
            r.instance.to_string(),
            r.sharing.as_str().to_owned(),
            r.driver.map_or("-", |d| d.as_str()).to_owned(),
            e.state_text(),
            pid,
            age_ms(e.started_ms(), now_ms),
            r.target
                .as_deref()
                .map_or(Cow::Borrowed("-"), one_line)
                .into_owned(),
            one_line(&r.command).into_owned(),
        ]);
    }
    rows
}

// ---------------------------------------------------------------------------------------------
// Shared with `inspect`
// ---------------------------------------------------------------------------------------------

/// A lease row with its place in the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub row: LeaseRow,
    /// For a waiting request: its place among the requests waiting for the same instance of
    /// the same cache (1 = next). `None` when held.
    pub position: Option<usize>,
}

impl Entry {
    /// When the lease was granted (held) or asked for (waiting), unix milliseconds.
    pub fn started_ms(&self) -> i64 {
        match self.row.state {
            LeaseState::Held => self.row.acquired_ms.unwrap_or(self.row.since_ms),
            LeaseState::Waiting => self.row.since_ms,
        }
    }

    /// `held`, or `waiting (2nd)`.
    pub fn state_text(&self) -> String {
        match (self.row.state, self.position) {
            (LeaseState::Waiting, Some(n)) => format!("waiting ({})", ordinal(n)),
            (state, _) => state.as_str().to_owned(),
        }
    }
}

/// Numbers the waiting rows of each (cache, instance) queue in arrival order; keeps the order
/// of `rows`.
pub(crate) fn with_positions(rows: Vec<LeaseRow>) -> Vec<Entry> {
    let mut by_arrival: Vec<usize> = (0..rows.len()).collect();
    by_arrival.sort_by_key(|&i| rows[i].seq);
    let mut counts: HashMap<(&str, u32), usize> = HashMap::new();
    let mut positions = vec![None; rows.len()];
    for i in by_arrival {
        let r = &rows[i];
        if r.state == LeaseState::Waiting {
            let n = counts.entry((r.id.as_str(), r.instance)).or_insert(0);
            *n += 1;
            positions[i] = Some(*n);
        }
    }
    rows.into_iter()
        .zip(positions)
        .map(|(row, position)| Entry { row, position })
        .collect()
}

/// `1st`, `2nd`, `3rd`, `4th`, `11th`, `21st`, ...
pub(crate) fn ordinal(n: usize) -> String {
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

/// `12s ago`, from unix milliseconds.
pub(crate) fn age_ms(then_ms: i64, now_ms: i64) -> String {
    format_age(then_ms.div_euclid(1000), now_ms.div_euclid(1000))
}

// The one escaping of names for every command lives in crate::text.
pub(crate) use crate::text::{one_line, path_line};

/// `s` cut to at most `max` characters, the last one `…` when something was cut.
pub(crate) fn truncate(s: &str, max: usize) -> Cow<'_, str> {
    if s.chars().count() <= max {
        return Cow::Borrowed(s);
    }
    let mut cut: String = s.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    Cow::Owned(cut)
}

/// The last column keeps at least this many characters, however narrow the terminal.
const MIN_LAST_COLUMN: usize = 12;

/// Lines of an aligned table: columns separated by two spaces, each padded to its widest
/// cell, except the last, which is never padded and, with `max_width`, is cut so that the line
/// fits (keeping at least a few characters). Cells must already be one line
/// (see [`one_line`]). Widths count characters.
pub(crate) fn render_table(
    rows: &[Vec<String>],
    indent: &str,
    max_width: Option<usize>,
) -> Vec<String> {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0usize; columns];
    for row in rows {
        for (i, cell) in row.iter().enumerate().take(row.len().saturating_sub(1)) {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    rows.iter()
        .map(|row| {
            let mut line = String::from(indent);
            let mut used = indent.chars().count();
            let last = row.len().saturating_sub(1);
            for (i, cell) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                    used += 2;
                }
                if i < last {
                    line.push_str(cell);
                    let len = cell.chars().count();
                    line.extend(std::iter::repeat_n(' ', widths[i] - len));
                    used += widths[i];
                } else {
                    let room = max_width.map(|w| w.saturating_sub(used).max(MIN_LAST_COLUMN));
                    match room {
                        Some(room) => line.push_str(&truncate(cell, room)),
                        None => line.push_str(cell),
                    }
                }
            }
            line.truncate(line.trim_end().len());
            line
        })
        .collect()
}

/// The terminal's width when stdout is a terminal (else `None`: nothing is cut).
pub(crate) fn terminal_width() -> Option<usize> {
    let stdout = io::stdout();
    if !stdout.is_terminal() {
        return None;
    }
    // SAFETY: winsize is plain data; TIOCGWINSZ writes one through the pointer on success.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    if r == 0 && ws.ws_col > 0 {
        return Some(usize::from(ws.ws_col));
    }
    let columns = std::env::var("COLUMNS").ok()?;
    columns.trim().parse().ok().filter(|&n: &usize| n > 0)
}

/// A Unix time in RFC 3339 UTC: `2026-11-25T22:31:43Z`. Pure arithmetic (the proleptic
/// Gregorian calendar), so it works for any `i64` and needs no C library.
pub(crate) fn rfc3339_utc(unix_secs: i64) -> String {
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days, in i128 so no input can overflow.
    let z = i128::from(days) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i128::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// [`rfc3339_utc`] of unix milliseconds (the seconds; the milliseconds are in `*_ms` fields).
pub(crate) fn rfc3339_utc_ms(unix_ms: i64) -> String {
    rfc3339_utc(unix_ms.div_euclid(1000))
}

/// A lease row as `ls --json` and `inspect --json` print it.
#[derive(Debug, Serialize)]
pub(crate) struct LeaseJson<'a> {
    pub id: &'a str,
    /// Arrival order across the store: a smaller seq asked first.
    pub seq: i64,
    pub instance: u32,
    pub sharing: &'static str,
    pub state: &'static str,
    /// Place in the instance's queue (1 = next); `null` when held.
    pub position: Option<usize>,
    /// The cachefs command holding it: `run` or `mount`.
    pub kind: &'a str,
    pub pid: u32,
    pub host: &'a str,
    pub command: &'a str,
    pub target: Option<&'a str>,
    /// When the lease was asked for.
    pub since_ms: i64,
    pub since: String,
    /// When it was granted; `null` while waiting.
    pub acquired_ms: Option<i64>,
    pub acquired: Option<String>,
    /// `fuse` or `bind`; `null` when not a mount (e.g. a snapshot).
    pub driver: Option<&'static str>,
}

impl<'a> LeaseJson<'a> {
    pub fn new(e: &'a Entry) -> LeaseJson<'a> {
        let r = &e.row;
        LeaseJson {
            id: &r.id,
            seq: r.seq,
            instance: r.instance,
            sharing: r.sharing.as_str(),
            state: r.state.as_str(),
            position: e.position,
            kind: &r.kind,
            pid: r.pid,
            host: &r.host,
            command: &r.command,
            target: r.target.as_deref(),
            since_ms: r.since_ms,
            since: rfc3339_utc_ms(r.since_ms),
            acquired_ms: r.acquired_ms,
            acquired: r.acquired_ms.map(rfc3339_utc_ms),
            driver: r.driver.map(|d| d.as_str()),
        }
    }
}

/// Writes `text` to stdout. A reader that went away (`cachefs ls | head -1`) is not an error.
pub(crate) fn print_stdout(text: &str) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(anyhow::Error::new(e).context("cannot write to stdout")),
    }
}

/// Prints `value` as pretty JSON and a newline.
pub(crate) fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    print_stdout(&text)
}

/// Resolves the store (`--store` etc.) and opens it, or returns `None` with its path when it
/// has no database yet: nothing was ever mounted there, and a command that only looks must
/// not create a store.
pub(crate) fn open_existing_store(global: &Global) -> anyhow::Result<(PathBuf, Option<Store>)> {
    let root = Store::resolve_root(global.store.as_deref())?;
    if let Err(e) = std::fs::metadata(root.join(store::DB_FILE))
        && e.kind() == io::ErrorKind::NotFound
    {
        return Ok((root, None));
    }
    // Store errors name the store and the fix themselves. A store that cannot be written is
    // still read: listing must work on a read-only mount of it.
    let store = match Store::open_for_reading(&root) {
        Ok(store) => store,
        Err(store::StoreError::ReadOnly { .. } | store::StoreError::PermissionDenied { .. }) => {
            Store::open_read_only(&root)?
        }
        Err(e) => return Err(e.into()),
    };
    Ok((root, Some(store)))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::spec::Sharing;
    use crate::text::needs_escape;
    use std::path::Path;

    /// A lease row for tests.
    pub(crate) fn row(seq: i64, id: &str, instance: u32, sharing: Sharing, held: bool) -> LeaseRow {
        LeaseRow {
            seq,
            id: id.to_owned(),
            instance,
            sharing,
            state: if held {
                LeaseState::Held
            } else {
                LeaseState::Waiting
            },
            kind: "run".to_owned(),
            pid: 1000 + seq as u32,
            host: "here".to_owned(),
            command: format!("make -j{seq}"),
            target: Some(format!("/t/{seq}")),
            since_ms: 1_000_000 + seq * 1000,
            acquired_ms: held.then_some(1_000_500 + seq * 1000),
            key: "k".to_owned(),
            driver: None,
        }
    }

    #[test]
    fn one_line_escapes_only_when_needed() {
        assert!(matches!(one_line("apt"), Cow::Borrowed("apt")));
        assert!(matches!(
            one_line("/var/cache/apt x\\y \"q\" é 日本"),
            Cow::Borrowed(_)
        ));
        assert_eq!(one_line("a\nb"), r#""a\nb""#);
        assert_eq!(one_line("tab\there"), r#""tab\there""#);
        assert_eq!(one_line("esc\u{1b}[31m"), r#""esc\u{1b}[31m""#);
        // Once escaped, backslashes and quotes are escaped too: the form is unambiguous.
        assert_eq!(one_line("a\\n\n\""), r#""a\\n\n\"""#);
        for s in [
            "x\u{202E}gnp.exe",
            "zero\u{200B}width",
            "line\u{2028}sep",
            "bom\u{FEFF}",
            "del\u{7f}",
            "c1\u{9b}",
        ] {
            let shown = one_line(s);
            assert!(shown.starts_with('"'), "{shown}");
            assert!(!shown.chars().any(needs_escape), "{s:?} -> {shown}");
        }
        assert_eq!(path_line(Path::new("/a\nb")), r#""/a\nb""#);
    }

    #[test]
    fn ordinals() {
        for (n, s) in [
            (1, "1st"),
            (2, "2nd"),
            (3, "3rd"),
            (4, "4th"),
            (10, "10th"),
            (11, "11th"),
            (12, "12th"),
            (13, "13th"),
            (21, "21st"),
            (22, "22nd"),
            (101, "101st"),
            (111, "111th"),
            (112, "112th"),
        ] {
            assert_eq!(ordinal(n), s);
        }
    }

    #[test]
    fn rfc3339_known_values() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(-1), "1969-12-31T23:59:59Z");
        assert_eq!(rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(1_795_645_903), "2026-11-25T22:31:43Z");
        assert_eq!(rfc3339_utc(4_102_444_799), "2099-12-31T23:59:59Z");
        assert_eq!(rfc3339_utc_ms(1_795_645_903_999), "2026-11-25T22:31:43Z");
        assert_eq!(rfc3339_utc_ms(-1), "1969-12-31T23:59:59Z");
        // Extremes do not panic.
        assert!(rfc3339_utc(i64::MAX).ends_with('Z'));
        assert!(rfc3339_utc(i64::MIN).ends_with('Z'));
    }

    /// The C library's gmtime_r, for comparison.
    fn gmtime(secs: i64) -> String {
        let t = secs as libc::time_t;
        let mut tm: libc::tm = unsafe { std::mem::zeroed() };
        assert!(!unsafe { libc::gmtime_r(&t, &mut tm) }.is_null());
        format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            i64::from(tm.tm_year) + 1900,
            tm.tm_mon + 1,
            tm.tm_mday,
            tm.tm_hour,
            tm.tm_min,
            tm.tm_sec
        )
    }

    proptest::proptest! {
        #[test]
        fn rfc3339_matches_gmtime(secs in -62_135_596_800i64..253_402_300_799i64) {
            proptest::prop_assert_eq!(rfc3339_utc(secs), gmtime(secs));
        }
    }

    #[test]
    fn positions_count_per_cache_and_instance() {
        let rows = vec![
            row(5, "b", 1, Sharing::Locked, false),
            row(1, "a", 1, Sharing::Locked, true),
            row(2, "a", 1, Sharing::Locked, false),
            row(3, "a", 2, Sharing::Private, false),
            row(4, "a", 1, Sharing::Shared, false),
            row(6, "b", 1, Sharing::Locked, false),
        ];
        let got: Vec<(i64, Option<usize>)> = with_positions(rows)
            .iter()
            .map(|e| (e.row.seq, e.position))
            .collect();
        assert_eq!(
            got,
            [
                (5, Some(1)),
                (1, None),
                (2, Some(1)),
                (3, Some(1)),
                (4, Some(2)),
                (6, Some(2))
            ]
        );
    }

    #[test]
    fn table_is_aligned_and_the_last_column_cut_to_fit() {
        let rows = vec![
            vec!["ID".to_owned(), "PID".to_owned(), "COMMAND".to_owned()],
            vec![
                "apt".to_owned(),
                "1".to_owned(),
                "apt-get install -y jq".to_owned(),
            ],
            vec!["a".to_owned(), "12345".to_owned(), String::new()],
        ];
        let lines = render_table(&rows, "", None);
        assert_eq!(
            lines,
            [
                "ID   PID    COMMAND",
                "apt  1      apt-get install -y jq",
                "a    12345",
            ]
        );
        let lines = render_table(&rows, "  ", Some(30));
        assert_eq!(lines[1], "  apt  1      apt-get install…");
        assert_eq!(lines[1].chars().count(), 30);
        // However narrow, the last column keeps a few characters.
        let lines = render_table(&rows, "", Some(5));
        assert_eq!(lines[1], "apt  1      apt-get ins…");
        // Widths count characters, not bytes.
        let rows = vec![
            vec!["é".to_owned(), "x".to_owned()],
            vec!["ab".to_owned(), "y".to_owned()],
        ];
        assert_eq!(render_table(&rows, "", None), ["é   x", "ab  y"]);
        assert!(render_table(&[], "", None).is_empty());
    }

    #[test]
    fn ls_table() {
        let mut odd = row(3, "weird\nid", 1, Sharing::Shared, true);
        odd.host = "elsewhere".to_owned();
        odd.target = None;
        odd.driver = Some(crate::store::Driver::Bind);
        let entries = with_positions(vec![
            row(1, "apt", 1, Sharing::Locked, true),
            row(2, "apt", 1, Sharing::Locked, false),
            odd,
        ]);
        let now = 1_000_000 + 60_000;
        let lines = render_table(&table_rows(&entries, now, "here"), "", None);
        assert_eq!(
            lines,
            [
                "ID           INST  MODE    DRIVER  STATE          PID             SINCE    TARGET  COMMAND",
                "apt          1     locked  -       held           1001            59s ago  /t/1    make -j1",
                "apt          1     locked  -       waiting (1st)  1002            58s ago  /t/2    make -j2",
                "\"weird\\nid\"  1     shared  bind    held           1003@elsewhere  57s ago  -       make -j3",
            ]
        );
    }

    #[test]
    fn json_shape() {
        let entries = with_positions(vec![
            row(1, "apt", 1, Sharing::Locked, true),
            row(2, "apt", 1, Sharing::Locked, false),
        ]);
        let v = serde_json::to_value(entries.iter().map(LeaseJson::new).collect::<Vec<_>>())
            .expect("serialisable");
        let held = &v[0];
        let mut keys: Vec<&str> = held
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "acquired",
                "acquired_ms",
                "command",
                "driver",
                "host",
                "id",
                "instance",
                "kind",
                "pid",
                "position",
                "seq",
                "sharing",
                "since",
                "since_ms",
                "state",
                "target"
            ]
        );
        assert_eq!(held["id"], "apt");
        assert_eq!(held["instance"], 1);
        assert_eq!(held["sharing"], "locked");
        assert_eq!(held["state"], "held");
        assert_eq!(held["position"], serde_json::Value::Null);
        assert_eq!(held["kind"], "run");
        assert_eq!(held["pid"], 1001);
        assert_eq!(held["command"], "make -j1");
        assert_eq!(held["target"], "/t/1");
        assert_eq!(held["since_ms"], 1_001_000);
        assert_eq!(held["since"], "1970-01-01T00:16:41Z");
        assert_eq!(held["acquired_ms"], 1_001_500);
        assert_eq!(held["acquired"], "1970-01-01T00:16:41Z");
        let waiting = &v[1];
        assert_eq!(waiting["state"], "waiting");
        assert_eq!(waiting["position"], 1);
        assert_eq!(waiting["acquired_ms"], serde_json::Value::Null);
        assert_eq!(waiting["acquired"], serde_json::Value::Null);
    }

    #[test]
    fn missing_store_is_not_created() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("nope");
        let global = Global {
            store: Some(root.clone()),
            verbose: 0,
        };
        let (resolved, store) = open_existing_store(&global).expect("no error");
        assert!(store.is_none());
        assert_eq!(resolved, root);
        assert!(!root.exists());
        // An existing directory without a database is not made a store either.
        std::fs::create_dir(&root).expect("mkdir");
        assert!(open_existing_store(&global).expect("no error").1.is_none());
        assert!(!root.join(store::DB_FILE).exists());
        Store::open(&root).expect("open");
        assert!(open_existing_store(&global).expect("no error").1.is_some());
    }
}
