//! Layer snapshots through the real binary, on caches filled through real FUSE mounts (or
//! written straight into an instance directory while nothing mounts it):
//!
//! - determinism: one tree written two ways (order, hard link, times, owners) gives one digest,
//!   the digest the documented encoding gives for the tree, and the same after a restore (whose
//!   re-snapshot reads no file);
//! - proptest: random trees round-trip through snapshot -> restore bit-exactly, and `cachefs
//!   diff` between a tree and a mutated copy (re-snapshotted incrementally) matches a reference
//!   computed from the two trees;
//! - damaged objects (flipped, truncated, missing blobs and trees) stop a restore with one line
//!   naming the object, leave the target cache as it was and nothing in STORE/tmp;
//! - SIGKILL during a restore leaves the instance wholly old or wholly new;
//! - snapshots and mounts: a snapshot waits for a shared mount or a locked run to end
//!   (`--lock-timeout` gives 75 naming the holder) and then sees the final tree;
//! - bad input, and `layers` records (fields, parents, tags, rm, untag).

mod common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cachefs::layer::format::{Digest, Entry, Tree};
use cachefs::layer::objects::ObjectStore;
use common::*;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestRunner};
use serde_json::Value;

/// Bound on one cachefs command.
const CMD_T: Duration = Duration::from_secs(180);

// ---------------------------------------------------------------------------------------------
// Running the binary
// ---------------------------------------------------------------------------------------------

fn cfs(env: &CliEnv, args: &[&str]) -> Output {
    let mut c = env.cmd();
    c.args(args);
    output_with_timeout(c, CMD_T)
}

#[track_caller]
fn ok_json(env: &CliEnv, args: &[&str]) -> Value {
    let text = ok(&cfs(env, args), &format!("{args:?}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {text}"))
}

/// `snapshot ID --json EXTRA...`, which must succeed.
#[track_caller]
fn snapshot(env: &CliEnv, id: &str, extra: &[&str]) -> Value {
    let mut args = vec!["snapshot", id, "--json"];
    args.extend_from_slice(extra);
    ok_json(env, &args)
}

fn digest_of(v: &Value) -> String {
    let d = v["digest"]
        .as_str()
        .unwrap_or_else(|| panic!("no digest in {v}"))
        .to_owned();
    assert_eq!(d.len(), 64, "{d}");
    d
}

fn num(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} is not a number in {v}"))
}

/// `restore LAYER --into ID EXTRA...` (collected, not checked).
fn restore(env: &CliEnv, layer: &str, into: &str, extra: &[&str]) -> Output {
    let mut args = vec!["restore", layer, "--into", into];
    args.extend_from_slice(extra);
    cfs(env, &args)
}

#[track_caller]
fn restore_ok(env: &CliEnv, layer: &str, into: &str, extra: &[&str]) {
    let out = restore(env, layer, into, extra);
    ok(&out, &format!("restore {layer} --into {into} {extra:?}"));
}

/// The directory of instance 1 of cache `id` (from `inspect --json`).
#[track_caller]
fn instance_dir(env: &CliEnv, id: &str) -> PathBuf {
    let v = ok_json(env, &["inspect", "--json", id]);
    let path = v["instances"][0]["path"]
        .as_str()
        .unwrap_or_else(|| panic!("no instance path in {v}"));
    PathBuf::from(path)
}

fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("{prefix}{}", N.fetch_add(1, Ordering::Relaxed))
}

/// A new, empty cache made by a `cachefs run` that does nothing; returns its instance
/// directory, which the test then writes into directly (no mount runs).
#[track_caller]
fn new_cache(env: &CliEnv, id: &str) -> PathBuf {
    let t = env.path(&unique("t-"));
    let out = env.run(&[spec(id, &t, "")], &["true"]);
    ok(&out, &format!("run to create {id}"));
    instance_dir(env, id)
}

/// A `cachefs mount --id ID --sharing S TARGET`, unmounted with `cachefs umount`.
struct Mount<'a> {
    env: &'a CliEnv,
    target: PathBuf,
    live: bool,
}

impl<'a> Mount<'a> {
    #[track_caller]
    fn new(env: &'a CliEnv, id: &str, sharing: &str) -> Mount<'a> {
        let target = env.path(&unique("mnt-"));
        let t = target.to_str().expect("utf-8 target").to_owned();
        let out = cfs(env, &["mount", "--id", id, "--sharing", sharing, &t]);
        ok(&out, &format!("mount {id}"));
        assert!(is_mounted(&target), "{} not mounted", target.display());
        Mount {
            env,
            target,
            live: true,
        }
    }

    fn path(&self) -> &Path {
        &self.target
    }

    #[track_caller]
    fn umount(mut self) {
        let t = self.target.to_str().expect("utf-8").to_owned();
        ok(&cfs(self.env, &["umount", &t]), "umount");
        self.live = false;
    }
}

impl Drop for Mount<'_> {
    fn drop(&mut self) {
        if self.live {
            let _ = self
                .env
                .cmd()
                .args(["umount", "--lazy"])
                .arg(&self.target)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if is_mounted(&self.target) {
                force_unmount(&self.target);
            }
        }
    }
}

fn blob_path(env: &CliEnv, hex: &str) -> PathBuf {
    env.store.join("objects/blobs").join(&hex[..2]).join(hex)
}

fn tree_path(env: &CliEnv, hex: &str) -> PathBuf {
    env.store.join("objects/trees").join(&hex[..2]).join(hex)
}

/// Names in STORE/tmp starting with `prefix`.
fn tmp_entries(env: &CliEnv, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(env.store.join("tmp"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A spawned cachefs command with piped output.
fn spawn(env: &CliEnv, args: &[&str]) -> Child {
    env.cmd()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cachefs")
}

/// Waits for `child` at most `timeout`; kills it and panics past that.
#[track_caller]
fn wait_child(child: Child, timeout: Duration, what: &str) -> Output {
    common::wait_with_timeout(child, timeout, what)
}

// ---------------------------------------------------------------------------------------------
// Trees: a model, building it on disk, reading a tree back
// ---------------------------------------------------------------------------------------------

/// A name or path as raw bytes, shown escaped.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Name(Vec<u8>);

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", self.0.escape_ascii())
    }
}

impl Name {
    fn of(s: &str) -> Name {
        Name(s.as_bytes().to_vec())
    }
    fn os(&self) -> &OsStr {
        OsStr::from_bytes(&self.0)
    }
    fn child(&self, n: &Name) -> Name {
        if self.0.is_empty() {
            n.clone()
        } else {
            Name([&self.0[..], b"/", &n.0[..]].concat())
        }
    }
}

#[derive(Clone, Debug)]
enum Node {
    /// Contents: `size` bytes of the stream seeded by `seed`.
    File {
        mode: u32,
        size: usize,
        seed: u8,
    },
    Dir {
        mode: u32,
        kids: Kids,
    },
    Link(Name),
    Fifo(u32),
}

type Kids = BTreeMap<Name, Node>;

fn file_data(size: usize, seed: u8) -> Vec<u8> {
    content(&format!("layers-seed-{seed}"), size)
}

fn file(mode: u32, size: usize, seed: u8) -> Node {
    Node::File { mode, size, seed }
}

fn dir(mode: u32, kids: Vec<(&str, Node)>) -> Node {
    Node::Dir {
        mode,
        kids: kids_of(kids),
    }
}

fn link(target: &str) -> Node {
    Node::Link(Name::of(target))
}

fn kids_of(v: Vec<(&str, Node)>) -> Kids {
    v.into_iter().map(|(n, node)| (Name::of(n), node)).collect()
}

/// What a tree holds at one path, as a layer sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Meta {
    File { mode: u32, len: u64, hash: String },
    Dir { mode: u32 },
    Link(Name),
    Fifo { mode: u32 },
    Other { mode: u32 },
}

impl Meta {
    fn is_dir(&self) -> bool {
        matches!(self, Meta::Dir { .. })
    }
    fn kind(&self) -> u8 {
        match self {
            Meta::File { .. } => 1,
            Meta::Dir { .. } => 2,
            Meta::Link(_) => 3,
            Meta::Fifo { .. } => 4,
            Meta::Other { .. } => 5,
        }
    }
}

/// Every path below the root (files, dirs, symlinks, fifos) with what is there.
type Map = BTreeMap<Name, Meta>;

fn model_map(kids: &Kids) -> Map {
    fn walk(prefix: &Name, kids: &Kids, out: &mut Map) {
        for (name, node) in kids {
            let p = prefix.child(name);
            let m = match node {
                Node::File { mode, size, seed } => Meta::File {
                    mode: *mode,
                    len: *size as u64,
                    hash: blake3::hash(&file_data(*size, *seed)).to_hex().to_string(),
                },
                Node::Dir { mode, kids } => {
                    walk(&p, kids, out);
                    Meta::Dir { mode: *mode }
                }
                Node::Link(t) => Meta::Link(t.clone()),
                Node::Fifo(mode) => Meta::Fifo { mode: *mode },
            };
            out.insert(p, m);
        }
    }
    let mut out = Map::new();
    walk(&Name(Vec::new()), kids, &mut out);
    out
}

/// Reads a tree back with lstat (never following symlinks): kinds, permission bits (with
/// setuid/setgid/sticky), contents (blake3 and length), symlink targets, empty dirs.
fn scan(root: &Path) -> Map {
    fn walk(dir: &Path, prefix: &Name, out: &mut Map) {
        let rd = fs::read_dir(dir).unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()));
        for e in rd {
            let e = e.expect("dir entry");
            let name = Name(e.file_name().as_bytes().to_vec());
            let p = e.path();
            let md = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            let mode = md.mode() & 0o7777;
            let ft = md.file_type();
            let rel = prefix.child(&name);
            let m = if ft.is_file() {
                let (h, len) = hash_file(&p);
                Meta::File {
                    mode,
                    len,
                    hash: h.to_hex().to_string(),
                }
            } else if ft.is_dir() {
                walk(&p, &rel, out);
                Meta::Dir { mode }
            } else if ft.is_symlink() {
                Meta::Link(Name(
                    fs::read_link(&p)
                        .expect("readlink")
                        .as_os_str()
                        .as_bytes()
                        .to_vec(),
                ))
            } else if ft.is_fifo() {
                Meta::Fifo { mode }
            } else {
                Meta::Other { mode }
            };
            out.insert(rel, m);
        }
    }
    let mut out = Map::new();
    walk(root, &Name(Vec::new()), &mut out);
    out
}

/// Asserts two maps are equal, naming the first paths that differ.
#[track_caller]
fn assert_same_map(got: &Map, want: &Map, what: &str) {
    if got == want {
        return;
    }
    let mut diffs = Vec::new();
    for (p, m) in want {
        match got.get(p) {
            None => diffs.push(format!("missing {p:?} ({m:?})")),
            Some(g) if g != m => diffs.push(format!("{p:?}: got {g:?}, want {m:?}")),
            _ => {}
        }
    }
    for (p, g) in got {
        if !want.contains_key(p) {
            diffs.push(format!("extra {p:?} ({g:?})"));
        }
    }
    diffs.truncate(20);
    panic!("{what}: trees differ:\n  {}", diffs.join("\n  "));
}

/// The layer digest of a model tree, by the documented encoding (docs/LAYER-FORMAT.md).
fn model_digest(kids: &Kids) -> Digest {
    let mut t = Tree::default();
    for (name, node) in kids {
        t.entries.push(match node {
            Node::File { mode, size, seed } => Entry::file(
                &name.0,
                *mode,
                *size as u64,
                Digest(*blake3::hash(&file_data(*size, *seed)).as_bytes()),
            ),
            Node::Dir { mode, kids } => Entry::dir(&name.0, *mode, model_digest(kids)),
            Node::Link(t) => Entry::symlink(&name.0, &t.0),
            Node::Fifo(mode) => Entry::fifo(&name.0, *mode),
        });
    }
    t.sort();
    t.encode_with_digest().1
}

fn set_mode(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
}

fn remove_any(p: &Path) {
    let md = fs::symlink_metadata(p).expect("lstat");
    if md.is_dir() {
        fs::remove_dir_all(p)
    } else {
        fs::remove_file(p)
    }
    .unwrap_or_else(|e| panic!("remove {}: {e}", p.display()));
}

fn kind_matches(node: &Node, md: &fs::Metadata) -> bool {
    let ft = md.file_type();
    match node {
        Node::File { .. } => ft.is_file(),
        Node::Dir { .. } => ft.is_dir(),
        Node::Link(_) => ft.is_symlink(),
        Node::Fifo(_) => ft.is_fifo(),
    }
}

/// Makes directory `dir` hold exactly `want`, changing as little as it can: entries of the
/// wrong kind (or symlinks with another target) are replaced, files whose contents differ are
/// rewritten in place (same inode) with their old mtime put back (as `cp -p` or a tar
/// extraction leave them: only ctime tells), modes are set where they differ. On an empty
/// directory this builds the tree, in name order, directories' modes set after their contents.
fn reconcile(dir: &Path, want: &Kids) {
    for e in fs::read_dir(dir).unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display())) {
        let e = e.expect("entry");
        let name = Name(e.file_name().as_bytes().to_vec());
        let p = e.path();
        let md = fs::symlink_metadata(&p).expect("lstat");
        let keep = match want.get(&name) {
            None => false,
            Some(Node::Link(t)) => {
                md.file_type().is_symlink()
                    && fs::read_link(&p).expect("readlink").as_os_str().as_bytes() == t.0
            }
            Some(n) => kind_matches(n, &md),
        };
        if !keep {
            remove_any(&p);
        }
    }
    for (name, node) in want {
        let p = dir.join(name.os());
        let old = fs::symlink_metadata(&p).ok();
        let old_mode = old.as_ref().map(|m| m.mode() & 0o7777);
        match node {
            Node::File { mode, size, seed } => {
                let data = file_data(*size, *seed);
                match &old {
                    None => fs::write(&p, &data)
                        .unwrap_or_else(|e| panic!("write {}: {e}", p.display())),
                    Some(md) => {
                        if fs::read(&p).expect("read") != data {
                            let mut f = fs::OpenOptions::new()
                                .write(true)
                                .truncate(true)
                                .open(&p)
                                .unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
                            f.write_all(&data).expect("rewrite");
                            drop(f);
                            utimens(&p, None, Some((md.mtime(), md.mtime_nsec())), 0)
                                .expect("utimens");
                        }
                    }
                }
                if old_mode != Some(*mode) {
                    set_mode(&p, *mode);
                }
            }
            Node::Dir { mode, kids } => {
                if old.is_none() {
                    fs::create_dir(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
                }
                reconcile(&p, kids);
                if old_mode != Some(*mode) {
                    set_mode(&p, *mode);
                }
            }
            Node::Link(t) => {
                if old.is_none() {
                    std::os::unix::fs::symlink(t.os(), &p)
                        .unwrap_or_else(|e| panic!("symlink {}: {e}", p.display()));
                }
            }
            Node::Fifo(mode) => {
                if old.is_none() {
                    mkfifo(&p, 0o600).unwrap_or_else(|e| panic!("mkfifo {}: {e}", p.display()));
                }
                if old_mode != Some(*mode) {
                    set_mode(&p, *mode);
                }
            }
        }
    }
}

fn model_files(kids: &Kids, out: &mut Vec<(usize, u8)>) {
    for node in kids.values() {
        match node {
            Node::File { size, seed, .. } => out.push((*size, *seed)),
            Node::Dir { kids, .. } => model_files(kids, out),
            _ => {}
        }
    }
}

fn total_bytes(kids: &Kids) -> usize {
    let mut v = Vec::new();
    model_files(kids, &mut v);
    v.iter().map(|(s, _)| s).sum()
}

// ---------------------------------------------------------------------------------------------
// 1. Determinism
// ---------------------------------------------------------------------------------------------

const MIB: usize = 1 << 20;

fn det_tree() -> Kids {
    kids_of(vec![
        (
            "a",
            dir(
                0o755,
                vec![
                    ("f1", file(0o644, 5000, 1)),
                    (
                        "b",
                        dir(
                            0o750,
                            vec![
                                ("f2", file(0o755, 10, 2)),
                                ("c", dir(0o700, vec![("dup", file(0o644, 5000, 1))])),
                            ],
                        ),
                    ),
                ],
            ),
        ),
        ("big.bin", file(0o600, MIB + MIB / 2 + 3, 3)),
        ("e", file(0o600, 0, 0)),
        ("empty", dir(0o700, vec![])),
        ("ro", file(0o444, 7, 4)),
        ("s", dir(0o1777, vec![("sub", dir(0o755, vec![]))])),
        ("l1", link("a/f1")),
        ("l2", link("/abs/dangling")),
        ("p", Node::Fifo(0o640)),
    ])
}

/// The tree of [`det_tree`], written another way: reverse order, directories made deepest
/// first, `a/f1` a hard link to `a/b/c/dup`, files written in pieces or rewritten, a temp
/// file created and removed, other owners and mtimes, modes changed more than once.
fn write_det_tree_other_way(root: &Path) {
    let p = |s: &str| root.join(s);
    fs::create_dir(p("s")).unwrap();
    set_mode(&p("s"), 0o700);
    fs::create_dir(p("s/sub")).unwrap();
    mkfifo(&p("p"), 0o600).unwrap();
    set_mode(&p("p"), 0o640);
    std::os::unix::fs::symlink("/abs/dangling", p("l2")).unwrap();
    // Dangling until a/f1 exists.
    std::os::unix::fs::symlink("a/f1", p("l1")).unwrap();
    fs::write(p("ro"), b"a longer first version").unwrap();
    fs::write(p("ro"), file_data(7, 4)).unwrap();
    set_mode(&p("ro"), 0o444);
    // big.bin: second half first (at its offset), then the first half.
    let big = file_data(MIB + MIB / 2 + 3, 3);
    {
        let mut f = fs::File::create(p("big.bin")).unwrap();
        f.seek(SeekFrom::Start(MIB as u64)).unwrap();
        f.write_all(&big[MIB..]).unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.write_all(&big[..MIB]).unwrap();
    }
    set_mode(&p("big.bin"), 0o600);
    fs::write(p("e"), b"not empty for a while").unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(p("e"))
        .unwrap()
        .set_len(0)
        .unwrap();
    set_mode(&p("e"), 0o600);
    fs::create_dir(p("empty")).unwrap();
    set_mode(&p("empty"), 0o777);
    fs::write(p("empty/tmp"), b"gone soon").unwrap();
    fs::remove_file(p("empty/tmp")).unwrap();
    set_mode(&p("empty"), 0o700);
    fs::create_dir_all(p("a/b/c")).unwrap();
    fs::write(p("a/b/c/dup"), file_data(5000, 1)).unwrap();
    set_mode(&p("a/b/c/dup"), 0o644);
    fs::hard_link(p("a/b/c/dup"), p("a/f1")).unwrap();
    fs::write(p("a/b/f2"), file_data(10, 2)).unwrap();
    set_mode(&p("a/b/f2"), 0o755);
    set_mode(&p("a/b/c"), 0o700);
    set_mode(&p("a/b"), 0o750);
    set_mode(&p("a"), 0o755);
    set_mode(&p("s"), 0o1777);
    // Other owners and times everywhere.
    for (i, rel) in [
        "s",
        "s/sub",
        "p",
        "l2",
        "l1",
        "ro",
        "big.bin",
        "e",
        "empty",
        "a",
        "a/b",
        "a/b/c",
        "a/b/c/dup",
        "a/b/f2",
    ]
    .iter()
    .enumerate()
    {
        let path = p(rel);
        lchown(&path, 1234 + i as u32, 5678).unwrap();
        utimens(
            &path,
            Some((1_000_000_000 + i as i64, 7)),
            Some((978_307_200 + 3600 * i as i64, 123_456_789)),
            libc::AT_SYMLINK_NOFOLLOW,
        )
        .unwrap();
    }
}

#[test]
fn same_tree_same_digest_whatever_the_order_and_after_restore() {
    let env = CliEnv::new();
    let tree = det_tree();
    let want = model_map(&tree);
    let expect = model_digest(&tree).to_hex();

    // Cache 1: written through a mount in name order.
    let m1 = Mount::new(&env, "det-1", "shared");
    reconcile(m1.path(), &tree);
    assert_same_map(&scan(m1.path()), &want, "det-1 through its mount");
    m1.umount();
    // Cache 2: written through a mount the other way.
    let m2 = Mount::new(&env, "det-2", "shared");
    write_det_tree_other_way(m2.path());
    assert_same_map(&scan(m2.path()), &want, "det-2 through its mount");
    m2.umount();

    let s1 = snapshot(&env, "det-1", &[]);
    let s2 = snapshot(&env, "det-2", &[]);
    assert_eq!(digest_of(&s1), expect, "det-1 vs the documented encoding");
    assert_eq!(
        digest_of(&s2),
        expect,
        "det-2 (other order, hard link, owners, times)"
    );
    for s in [&s1, &s2] {
        assert_eq!(num(s, "files"), 6, "{s}");
        assert_eq!(num(s, "dirs"), 6, "{s}");
        assert_eq!(num(s, "symlinks"), 2, "{s}");
        assert_eq!(num(s, "fifos"), 1, "{s}");
        // A hard-linked file counts once per name.
        assert_eq!(
            num(s, "size_bytes"),
            (5000 + 10 + 5000 + MIB + MIB / 2 + 3 + 7) as u64,
            "{s}"
        );
    }
    // Re-snapshots read nothing and give the same digest.
    let again = snapshot(&env, "det-2", &[]);
    assert_eq!(digest_of(&again), expect);
    assert_eq!(num(&again, "hashed_files"), 0, "{again}");
    let rescan = snapshot(&env, "det-2", &["--rescan"]);
    assert_eq!(digest_of(&rescan), expect);
    assert_eq!(num(&rescan, "hashed_files"), 6, "{rescan}");

    // Cache 3: restored; its snapshot gives the digest again without reading a file.
    restore_ok(&env, &expect, "det-3", &["--quiet"]);
    let dir3 = instance_dir(&env, "det-3");
    assert_same_map(&scan(&dir3), &want, "det-3 after restore");
    let s3 = snapshot(&env, "det-3", &[]);
    assert_eq!(digest_of(&s3), expect, "restored tree");
    assert_eq!(
        num(&s3, "hashed_files"),
        0,
        "a restored tree's files are known: {s3}"
    );
    // And it reads the same through a mount of it.
    let m3 = Mount::new(&env, "det-3", "shared");
    assert_same_map(&scan(m3.path()), &want, "det-3 through its mount");
    m3.umount();
}

// ---------------------------------------------------------------------------------------------
// 2. proptest: snapshot -> restore round trip
// ---------------------------------------------------------------------------------------------

fn odd_names() -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = [
        "with space",
        " lead",
        "trail ",
        "-rf",
        "--help",
        "-",
        "ünïcödé",
        "日本語",
        ".hidden",
        "..dots",
        "...",
        "a\tb",
        "#x",
        "*",
        "'q'",
        "\"dq\"",
        "back\\slash",
        "~",
        "e\u{301}",
        "é",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    v.push(b"\xff\xfe-not-utf8".to_vec());
    v.push(vec![b'L'; 255]);
    v
}

fn name_strategy() -> BoxedStrategy<Name> {
    prop_oneof![
        2 => prop::sample::select(odd_names()).prop_map(Name),
        3 => "[a-z]{1,5}".prop_map(|s| Name(s.into_bytes())),
    ]
    .boxed()
}

fn file_mode() -> BoxedStrategy<u32> {
    prop::sample::select(vec![
        0o644, 0o600, 0o755, 0o700, 0o444, 0o400, 0o1755, 0o000,
    ])
    .boxed()
}

fn dir_mode() -> BoxedStrategy<u32> {
    prop::sample::select(vec![0o755, 0o700, 0o1777, 0o555, 0o750, 0o1755]).boxed()
}

fn fifo_mode() -> BoxedStrategy<u32> {
    prop::sample::select(vec![0o644, 0o600, 0o666, 0o640, 0o1644]).boxed()
}

fn size_strategy() -> BoxedStrategy<usize> {
    prop_oneof![
        3 => Just(0usize),
        8 => 1usize..4096,
        2 => 4096usize..300_000,
        1 => prop::sample::select(vec![MIB - 1, MIB, MIB + 1, 2 * MIB, 3 * MIB - 3]),
    ]
    .boxed()
}

fn target_strategy() -> BoxedStrategy<Name> {
    prop_oneof![
        prop::sample::select(vec![
            "/etc/passwd",
            "/nonexistent/abs/path",
            "dangling-target",
            "../../escape",
            "./a b/ü",
            ".",
            "..",
            "-rf",
            "/",
        ])
        .prop_map(Name::of),
        "[a-z/.]{1,20}".prop_map(|s| Name(s.into_bytes())),
    ]
    .boxed()
}

fn node_strategy() -> BoxedStrategy<Node> {
    let leaf = prop_oneof![
        6 => (file_mode(), size_strategy(), 0u8..4)
            .prop_map(|(mode, size, seed)| Node::File { mode, size, seed }),
        2 => target_strategy().prop_map(Node::Link),
        1 => fifo_mode().prop_map(Node::Fifo),
        1 => dir_mode().prop_map(|mode| Node::Dir { mode, kids: Kids::new() }),
    ];
    leaf.prop_recursive(3, 40, 6, |inner| {
        (
            dir_mode(),
            prop::collection::vec((name_strategy(), inner), 0..6),
        )
            .prop_map(|(mode, v)| Node::Dir {
                mode,
                kids: v.into_iter().collect(),
            })
    })
    .boxed()
}

fn tree_strategy() -> BoxedStrategy<Kids> {
    prop::collection::vec((name_strategy(), node_strategy()), 0..8)
        .prop_map(|v| v.into_iter().collect::<Kids>())
        .prop_filter("at most 24 MiB of file data", |t| {
            total_bytes(t) <= 24 * MIB
        })
        .boxed()
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        // Never write proptest-regressions/ files into the source tree.
        failure_persistence: None,
        max_shrink_iters: 200,
        ..Config::default()
    })
}

/// Writes `tree` into a new cache `id`: through a `cachefs mount` when `via_mount`, else
/// straight into the instance directory. Returns the instance directory.
fn fill_cache(env: &CliEnv, id: &str, tree: &Kids, via_mount: bool) -> PathBuf {
    if via_mount {
        let m = Mount::new(env, id, "shared");
        reconcile(m.path(), tree);
        m.umount();
        instance_dir(env, id)
    } else {
        let dir = new_cache(env, id);
        reconcile(&dir, tree);
        dir
    }
}

/// Makes cache `id` hold `tree` through a `cachefs mount` of it (so its change log sees
/// every change).
fn change_via_mount(env: &CliEnv, id: &str, tree: &Kids) {
    let m = Mount::new(env, id, "shared");
    reconcile(m.path(), tree);
    m.umount();
}

#[test]
fn proptest_snapshot_restore_round_trip() {
    let env = CliEnv::new();
    let mut runner = runner(20);
    let result = runner.run(&(tree_strategy(), any::<bool>()), |(tree, via_mount)| {
        let n = unique("");
        let (src, dst) = (format!("rt-src-{n}"), format!("rt-dst-{n}"));
        let want = model_map(&tree);
        let src_dir = fill_cache(&env, &src, &tree, via_mount);
        assert_same_map(&scan(&src_dir), &want, "source as written");

        let s = snapshot(&env, &src, &[]);
        let digest = digest_of(&s);
        assert_eq!(digest, model_digest(&tree).to_hex(), "digest vs model");
        let mut files = Vec::new();
        model_files(&tree, &mut files);
        assert_eq!(num(&s, "files"), files.len() as u64, "{s}");
        // Every file's contents are stored under their b3sum name.
        for (size, seed) in &files {
            let data = file_data(*size, *seed);
            let hex = blake3::hash(&data).to_hex().to_string();
            let b = blob_path(&env, &hex);
            let stored = fs::read(&b).unwrap_or_else(|e| panic!("blob {}: {e}", b.display()));
            assert!(stored == data, "blob {hex} holds other bytes");
        }

        restore_ok(&env, &digest, &dst, &["--quiet"]);
        let dst_dir = instance_dir(&env, &dst);
        assert_same_map(&scan(&dst_dir), &scan(&src_dir), "restored vs source");
        assert_same_map(&scan(&dst_dir), &want, "restored vs model");
        let again = snapshot(&env, &dst, &[]);
        assert_eq!(digest_of(&again), digest, "snapshot of the restored cache");
        assert_eq!(num(&again, "hashed_files"), 0, "{again}");
        assert!(tmp_entries(&env, "restore-").is_empty());
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

// ---------------------------------------------------------------------------------------------
// 3. diff against a reference
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Mutation {
    Remove,
    Rewrite { size: usize, seed: u8 },
    Chmod(u32),
    Replace(Node),
    Add(Name, Node),
}

fn mutation_strategy() -> BoxedStrategy<Mutation> {
    prop_oneof![
        2 => Just(Mutation::Remove),
        3 => (size_strategy(), 0u8..4).prop_map(|(size, seed)| Mutation::Rewrite { size, seed }),
        2 => prop::sample::select(vec![0o644, 0o600, 0o755, 0o700, 0o444, 0o1777, 0o555])
            .prop_map(Mutation::Chmod),
        2 => node_strategy().prop_map(Mutation::Replace),
        2 => (name_strategy(), node_strategy()).prop_map(|(n, node)| Mutation::Add(n, node)),
    ]
    .boxed()
}

/// Every path of a tree as components, parents before children.
fn all_paths(kids: &Kids) -> Vec<Vec<Name>> {
    fn walk(prefix: &[Name], kids: &Kids, out: &mut Vec<Vec<Name>>) {
        for (name, node) in kids {
            let mut p = prefix.to_vec();
            p.push(name.clone());
            out.push(p.clone());
            if let Node::Dir { kids, .. } = node {
                walk(&p, kids, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(&[], kids, &mut out);
    out
}

fn parent_kids_mut<'a>(mut kids: &'a mut Kids, path: &[Name]) -> &'a mut Kids {
    for comp in &path[..path.len() - 1] {
        kids = match kids.get_mut(comp) {
            Some(Node::Dir { kids, .. }) => kids,
            _ => unreachable!("path through a non-directory"),
        };
    }
    kids
}

fn apply(kids: &mut Kids, at: &Index, m: &Mutation) {
    let paths = all_paths(kids);
    if paths.is_empty() {
        match m {
            Mutation::Add(n, node) => {
                kids.insert(n.clone(), node.clone());
            }
            Mutation::Replace(node) => {
                kids.insert(Name::of("new"), node.clone());
            }
            _ => {}
        }
        return;
    }
    let path = &paths[at.index(paths.len())];
    let last = path.last().expect("non-empty path").clone();
    let parent = parent_kids_mut(kids, path);
    match m {
        Mutation::Remove => {
            parent.remove(&last);
        }
        Mutation::Rewrite { size, seed } => {
            if let Some(Node::File {
                size: s, seed: sd, ..
            }) = parent.get_mut(&last)
            {
                *s = *size;
                *sd = *seed;
            }
        }
        Mutation::Chmod(mode) => {
            if let Some(Node::File { mode: m, .. } | Node::Dir { mode: m, .. } | Node::Fifo(m)) =
                parent.get_mut(&last)
            {
                *m = *mode;
            }
        }
        Mutation::Replace(node) => {
            parent.insert(last, node.clone());
        }
        Mutation::Add(name, node) => match parent.get_mut(&last) {
            Some(Node::Dir { kids, .. }) => {
                kids.insert(name.clone(), node.clone());
            }
            _ => {
                parent.insert(name.clone(), node.clone());
            }
        },
    }
}

/// The lines `cachefs diff` should print from `a` to `b`, by its documented rules: every
/// added or removed path (directories with all their contents, ending in '/'); M for an
/// entry whose mode, contents or target changed (a directory only for its own mode); a kind
/// change is the old entry removed and the new one added. Sorted.
fn expected_diff(a: &Map, b: &Map) -> Vec<Vec<u8>> {
    // diff shows a path as ls does: escaped onto one line when it needs it.
    let line = |c: u8, p: &Name, m: &Meta| {
        let mut path = p.0.clone();
        if m.is_dir() {
            path.push(b'/');
        }
        let mut l = vec![c, b' '];
        l.extend_from_slice(cachefs::text::bytes_line(&path).as_bytes());
        l
    };
    let mut out = Vec::new();
    for (p, ma) in a {
        match b.get(p) {
            None => out.push(line(b'D', p, ma)),
            Some(mb) if ma.kind() != mb.kind() => {
                out.push(line(b'D', p, ma));
                out.push(line(b'A', p, mb));
            }
            Some(mb) if ma != mb => out.push(line(b'M', p, mb)),
            Some(_) => {}
        }
    }
    for (p, mb) in b {
        if !a.contains_key(p) {
            out.push(line(b'A', p, mb));
        }
    }
    out.sort();
    out
}

fn output_lines(out: &Output) -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = out
        .stdout
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    v.sort();
    v
}

fn show(lines: &[Vec<u8>]) -> String {
    lines
        .iter()
        .map(|l| l.escape_ascii().to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

#[track_caller]
fn check_diff(env: &CliEnv, a: &str, b: &str, want: &[Vec<u8>]) {
    let out = cfs(env, &["diff", a, b]);
    let expect_code = if want.is_empty() { 0 } else { 1 };
    assert_eq!(
        code(&out),
        expect_code,
        "diff exit code; stderr: {}",
        stderr_of(&out)
    );
    let got = output_lines(&out);
    assert!(
        got == want,
        "diff {a:.12} {b:.12}:\n--- got\n{}\n--- want\n{}",
        show(&got),
        show(want)
    );
    let count = |c: u8| want.iter().filter(|l| l[0] == c).count();
    let out = cfs(env, &["diff", "--stat", a, b]);
    assert_eq!(code(&out), expect_code, "diff --stat: {}", stderr_of(&out));
    let stat = stdout_of(&out).trim_end().to_owned();
    assert_eq!(
        stat,
        format!(
            "{} added, {} removed, {} modified",
            count(b'A'),
            count(b'D'),
            count(b'M')
        )
        .trim_end(),
    );
}

/// How the first tree of a diff case gets into its cache.
#[derive(Clone, Copy, Debug)]
enum MakeA {
    /// Written into the instance directory, then a first (full) snapshot.
    Direct,
    /// Written through a mount, then a first (full) snapshot.
    Mount,
    /// Restored from a layer taken elsewhere (the hash cache is the restore's).
    Restore,
}

fn mutated_pair() -> BoxedStrategy<(Kids, Kids, MakeA)> {
    (
        tree_strategy(),
        prop::collection::vec((any::<Index>(), mutation_strategy()), 1..7),
        prop::sample::select(vec![MakeA::Direct, MakeA::Mount, MakeA::Restore]),
    )
        .prop_map(|(a, muts, make)| {
            let mut b = a.clone();
            for (at, m) in &muts {
                apply(&mut b, at, m);
            }
            (a, b, make)
        })
        .prop_filter("at most 24 MiB of file data", |(_, b, _)| {
            total_bytes(b) <= 24 * MIB
        })
        .boxed()
}

#[test]
fn proptest_diff_matches_a_reference() {
    let env = CliEnv::new();
    let mut runner = runner(16);
    let result = runner.run(&mutated_pair(), |(a, b, make)| {
        let id = unique("diff-");
        let da = match make {
            MakeA::Direct | MakeA::Mount => {
                fill_cache(&env, &id, &a, matches!(make, MakeA::Mount));
                digest_of(&snapshot(&env, &id, &[]))
            }
            MakeA::Restore => {
                let src = format!("{id}-src");
                fill_cache(&env, &src, &a, false);
                let d = digest_of(&snapshot(&env, &src, &[]));
                restore_ok(&env, &d, &id, &["--quiet"]);
                d
            }
        };
        let dir = instance_dir(&env, &id);
        assert_eq!(da, model_digest(&a).to_hex(), "digest of A");
        // B: the same cache changed in place through a mount, re-snapshotted incrementally.
        change_via_mount(&env, &id, &b);
        let (ma, mb) = (model_map(&a), model_map(&b));
        assert_same_map(&scan(&dir), &mb, "B as written");
        let sb = snapshot(&env, &id, &[]);
        let db = digest_of(&sb);
        assert_eq!(
            db,
            model_digest(&b).to_hex(),
            "re-snapshot of B (change log, hash cache): {sb}"
        );
        let rescan = snapshot(&env, &id, &["--rescan"]);
        assert_eq!(digest_of(&rescan), db, "--rescan of B");

        check_diff(&env, &da, &db, &expected_diff(&ma, &mb));
        check_diff(&env, &db, &da, &expected_diff(&mb, &ma));
        check_diff(&env, &da, &da, &[]);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// A handcrafted pair covering each rule once, with the exact output order.
#[test]
fn diff_handcrafted() {
    let env = CliEnv::new();
    let a = kids_of(vec![
        ("same", file(0o644, 10, 1)),
        ("content", file(0o644, 10, 1)),
        ("mode", file(0o644, 10, 1)),
        ("dirmode", dir(0o755, vec![("x", file(0o644, 1, 1))])),
        (
            "gone",
            dir(
                0o755,
                vec![("in", dir(0o755, vec![("f", file(0o644, 1, 2))]))],
            ),
        ),
        ("kind", file(0o644, 3, 3)),
        ("l", link("old")),
        ("p", Node::Fifo(0o600)),
        (
            "deep",
            dir(
                0o755,
                vec![("er", dir(0o755, vec![("f", file(0o644, 5, 1))]))],
            ),
        ),
    ]);
    let b = kids_of(vec![
        ("same", file(0o644, 10, 1)),
        ("content", file(0o644, 10, 2)),
        ("mode", file(0o600, 10, 1)),
        ("dirmode", dir(0o700, vec![("x", file(0o644, 1, 1))])),
        ("kind", dir(0o755, vec![("k", file(0o644, 1, 1))])),
        ("l", link("new")),
        ("p", Node::Fifo(0o644)),
        ("new", dir(0o755, vec![("n", link("/x"))])),
        (
            "deep",
            dir(
                0o755,
                vec![("er", dir(0o755, vec![("f", file(0o644, 5, 2))]))],
            ),
        ),
    ]);
    let id = "hand";
    let dir = new_cache(&env, id);
    reconcile(&dir, &a);
    let da = digest_of(&snapshot(&env, id, &["--tag", "hand-a"]));
    change_via_mount(&env, id, &b);
    let db = digest_of(&snapshot(&env, id, &["--tag", "hand-b"]));
    assert_eq!(db, model_digest(&b).to_hex());
    let out = cfs(&env, &["diff", "hand-a", "hand-b"]);
    assert_eq!(code(&out), 1, "{}", stderr_of(&out));
    assert_eq!(
        stdout_of(&out),
        "M content\nM deep/er/f\nM dirmode/\nD gone/\nD gone/in/\nD gone/in/f\nD kind\nA kind/\n\
         A kind/k\nM l\nM mode\nA new/\nA new/n\nM p\n"
    );
    check_diff(
        &env,
        &da,
        &db,
        &expected_diff(&model_map(&a), &model_map(&b)),
    );
    let out = cfs(&env, &["diff", "--json", &db[..16], "hand-a"]);
    assert_eq!(code(&out), 1);
    let v: Value = serde_json::from_str(&stdout_of(&out)).expect("json");
    let rows = v.as_array().expect("array");
    assert_eq!(rows.len(), 14, "{v}");
    assert!(
        rows.iter()
            .any(|r| r["change"] == "added" && r["path"] == "gone/in/" && r["kind"] == "dir"),
        "{v}"
    );
    let same = cfs(&env, &["diff", "hand-a", &da]);
    assert_eq!(code(&same), 0);
    assert_eq!(stdout_of(&same), "");
}

// ---------------------------------------------------------------------------------------------
// 4. Damaged objects
// ---------------------------------------------------------------------------------------------

fn cor_src() -> Kids {
    kids_of(vec![
        ("small", file(0o644, 1000, 10)),
        ("big", file(0o644, 2 * MIB + 5, 11)),
        ("empty", file(0o644, 0, 0)),
        (
            "sub",
            dir(
                0o755,
                vec![
                    ("deep", dir(0o700, vec![("x", file(0o600, 100, 12))])),
                    ("y", file(0o644, 50, 13)),
                ],
            ),
        ),
        ("link", link("small")),
    ])
}

fn cor_old() -> Kids {
    kids_of(vec![
        ("old1", file(0o644, 300, 20)),
        ("small", file(0o600, 1000, 21)),
        ("olddir", dir(0o755, vec![("old2", file(0o600, 10, 21))])),
    ])
}

enum Damage {
    Flip(usize),
    FlipFromEnd(usize),
    Truncate(u64),
    Append,
    Remove,
    Symlink,
}

fn damage(path: &Path, how: &Damage) {
    match how {
        Damage::Flip(_) | Damage::FlipFromEnd(_) => {
            let mut b = fs::read(path).expect("read object");
            let at = match how {
                Damage::Flip(i) => *i,
                Damage::FlipFromEnd(i) => b.len() - i,
                _ => unreachable!(),
            };
            b[at] ^= 0x20;
            fs::write(path, b).expect("write object");
        }
        Damage::Truncate(n) => fs::OpenOptions::new()
            .write(true)
            .open(path)
            .expect("open object")
            .set_len(*n)
            .expect("truncate"),
        Damage::Append => fs::OpenOptions::new()
            .append(true)
            .open(path)
            .expect("open object")
            .write_all(b"x")
            .expect("append"),
        Damage::Remove => fs::remove_file(path).expect("remove object"),
        Damage::Symlink => {
            fs::remove_file(path).expect("remove object");
            std::os::unix::fs::symlink("/etc/passwd", path).expect("symlink");
        }
    }
}

fn put_back(path: &Path, bytes: &[u8]) {
    let _ = fs::remove_file(path);
    fs::write(path, bytes).expect("put object back");
    set_mode(path, 0o444);
}

/// Whether the fresh cache `id` is still empty: no instance, or an empty one.
fn fresh_is_empty(env: &CliEnv, id: &str) -> bool {
    let out = cfs(env, &["inspect", "--json", id]);
    if code(&out) != 0 {
        return true;
    }
    let v: Value = serde_json::from_str(&stdout_of(&out)).expect("json");
    match v["instances"][0]["path"].as_str() {
        None => true,
        Some(p) => !Path::new(p).exists() || scan(Path::new(p)).is_empty(),
    }
}

#[test]
fn damaged_objects_stop_a_restore_and_change_nothing() {
    let env = CliEnv::new();
    let src = cor_src();
    let src_dir = new_cache(&env, "cor-src");
    reconcile(&src_dir, &src);
    let layer = digest_of(&snapshot(&env, "cor-src", &["--tag", "cor"]));
    let full_dir = new_cache(&env, "cor-full");
    reconcile(&full_dir, &cor_old());
    let old_map = model_map(&cor_old());

    let objects = ObjectStore::open(&env.store).expect("objects");
    let root_tree = objects
        .read_tree(Digest::from_hex(&layer).unwrap())
        .expect("root tree");
    let sub = root_tree.get(b"sub").expect("sub").hash;
    let deep = objects.read_tree(sub).unwrap().get(b"deep").unwrap().hash;
    let hex = |size: usize, seed: u8| blake3::hash(&file_data(size, seed)).to_hex().to_string();
    let small = hex(1000, 10);
    let big = hex(2 * MIB + 5, 11);
    let empty = hex(0, 0);
    let x = hex(100, 12);

    let cases: Vec<(&str, PathBuf, String, Damage)> = vec![
        (
            "flipped small blob",
            blob_path(&env, &small),
            small.clone(),
            Damage::Flip(500),
        ),
        (
            "flipped big blob, past the first MiB",
            blob_path(&env, &big),
            big.clone(),
            Damage::FlipFromEnd(3),
        ),
        (
            "truncated big blob",
            blob_path(&env, &big),
            big.clone(),
            Damage::Truncate(MIB as u64),
        ),
        (
            "empty blob grown",
            blob_path(&env, &empty),
            empty.clone(),
            Damage::Append,
        ),
        (
            "missing blob in a subdirectory",
            blob_path(&env, &x),
            x.clone(),
            Damage::Remove,
        ),
        (
            "blob replaced by a symlink",
            blob_path(&env, &small),
            small.clone(),
            Damage::Symlink,
        ),
        (
            "missing tree",
            tree_path(&env, &deep.to_hex()),
            deep.to_hex(),
            Damage::Remove,
        ),
        (
            "truncated root tree",
            tree_path(&env, &layer),
            layer.clone(),
            Damage::Truncate(40),
        ),
        (
            "truncated subtree",
            tree_path(&env, &sub.to_hex()),
            sub.to_hex(),
            Damage::Truncate(20),
        ),
        (
            "flipped subtree",
            tree_path(&env, &sub.to_hex()),
            sub.to_hex(),
            Damage::Flip(30),
        ),
    ];
    for (what, path, name, how) in &cases {
        let backup = fs::read(path).unwrap_or_else(|e| panic!("{what}: {}: {e}", path.display()));
        damage(path, how);
        let fresh = format!("cor-fresh-{}", unique(""));
        let out = restore(&env, &layer, &fresh, &["--quiet"]);
        let line = assert_failure(&out, None, &[name]);
        assert!(
            fresh_is_empty(&env, &fresh),
            "{what}: the fresh cache holds something after a failed restore"
        );
        let out = restore(&env, "cor", "cor-full", &["--replace"]);
        assert_failure(&out, None, &[name]);
        assert_same_map(
            &scan(&full_dir),
            &old_map,
            &format!("{what}: cor-full after a failed --replace"),
        );
        assert_eq!(
            tmp_entries(&env, "restore-"),
            Vec::<String>::new(),
            "{what}"
        );
        assert_eq!(tmp_entries(&env, "gc-"), Vec::<String>::new(), "{what}");
        eprintln!("{what}: {}", line.trim_end());
        put_back(path, &backup);
        // Once repaired, the fresh cache (empty) takes the layer without --replace.
        restore_ok(&env, &layer, &fresh, &["--quiet"]);
        assert_same_map(
            &scan(&instance_dir(&env, &fresh)),
            &model_map(&src),
            &format!("{what}: after repair"),
        );
    }

    restore_ok(&env, &layer, "cor-full", &["--replace", "--quiet"]);
    assert_same_map(&scan(&full_dir), &model_map(&src), "cor-full replaced");
}

// ---------------------------------------------------------------------------------------------
// 5. SIGKILL during restore
// ---------------------------------------------------------------------------------------------

/// Restore-work directories whose process is gone.
fn dead_work_dirs(env: &CliEnv) -> Vec<String> {
    tmp_entries(env, "restore-")
        .into_iter()
        .filter(|n| {
            let pid: i32 = n["restore-".len()..]
                .split('-')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            let alive = unsafe { libc::kill(pid, 0) } == 0;
            !alive
        })
        .collect()
}

#[test]
fn sigkill_during_restore_leaves_old_or_new() {
    let env = CliEnv::new();
    // The layer: 300 files of 1 MiB in 3 directories (d0/f000 also exists in the old tree).
    let big_dir = new_cache(&env, "kill-src");
    let mut new_tree = Kids::new();
    for d in 0..3usize {
        // Distinct contents: 100 seeds per directory, a size per directory.
        let kids = (0..100u8)
            .map(|i| {
                (
                    Name(format!("f{i:03}").into_bytes()),
                    file(0o644, MIB - d, i),
                )
            })
            .collect();
        new_tree.insert(
            Name(format!("d{d}").into_bytes()),
            Node::Dir { mode: 0o755, kids },
        );
    }
    reconcile(&big_dir, &new_tree);
    let new_map = model_map(&new_tree);
    let layer = digest_of(&snapshot(&env, "kill-src", &[]));

    let old_tree = {
        let mut k = kids_of(vec![
            ("d0", dir(0o700, vec![("f000", file(0o600, 8192, 200))])),
            ("l", link("d0/f000")),
            ("p", Node::Fifo(0o600)),
        ]);
        let mut old = Kids::new();
        for i in 0..40 {
            old.insert(
                Name(format!("o{i:02}").into_bytes()),
                file(0o644, 8192 + i, 201),
            );
        }
        k.insert(
            Name::of("old"),
            Node::Dir {
                mode: 0o755,
                kids: old,
            },
        );
        k
    };
    let old_map = model_map(&old_tree);
    let k_dir = new_cache(&env, "kill-k");
    reconcile(&k_dir, &old_tree);
    let old_layer = digest_of(&snapshot(&env, "kill-k", &[]));

    // How long an uninterrupted restore of the layer over the old tree takes here (the
    // second run, with the blobs in the page cache as in the loop below).
    let mut full = Duration::ZERO;
    for _ in 0..2 {
        let t = Instant::now();
        restore_ok(&env, &layer, "kill-k", &["--replace", "--quiet"]);
        full = t.elapsed();
        assert_same_map(&scan(&k_dir), &new_map, "uninterrupted restore");
        restore_ok(&env, &old_layer, "kill-k", &["--replace", "--quiet"]);
        assert_same_map(&scan(&k_dir), &old_map, "back to the old tree");
    }
    eprintln!("restore of 300 x 1 MiB over the old tree: {full:?}");
    // Kill points step through the whole restore (whatever it takes on this machine, under
    // this load) until restores end before the kill three times in a row.
    let step = (full.as_millis() as u64 / 12).max(5);
    let mut delay = 0u64;
    let mut ended_in_a_row = 0;

    let (mut olds, mut news, mut kills) = (0, 0, 0);
    for _ in 0..60 {
        if ended_in_a_row >= 3 {
            break;
        }
        if scan(&k_dir) != old_map {
            restore_ok(
                &env,
                &old_layer,
                "kill-k",
                &["--replace", "--quiet", "--lock-timeout", "60s"],
            );
            assert_same_map(&scan(&k_dir), &old_map, "reset to the old tree");
            assert_eq!(
                dead_work_dirs(&env),
                Vec::<String>::new(),
                "a restore leaves no dead work dirs behind"
            );
        }
        let child = spawn(
            &env,
            &[
                "restore",
                &layer,
                "--into",
                "kill-k",
                "--replace",
                "--quiet",
                "--lock-timeout",
                "60s",
            ],
        );
        std::thread::sleep(Duration::from_millis(delay));
        signal(child.id(), libc::SIGKILL);
        let out = wait_child(child, Duration::from_secs(60), "killed restore");
        let killed = out.status.code().is_none();
        if killed {
            kills += 1;
            ended_in_a_row = 0;
        } else {
            assert_eq!(code(&out), 0, "{}", stderr_of(&out));
            ended_in_a_row += 1;
        }
        let now = scan(&k_dir);
        let state = if now == old_map {
            olds += 1;
            "old"
        } else if now == new_map {
            news += 1;
            "new"
        } else {
            assert_same_map(
                &now,
                &old_map,
                &format!("after SIGKILL at {delay} ms: neither old nor new"),
            );
            unreachable!()
        };
        // A full rescan sees the tree that is there (the incremental path after a kill at
        // the wrong moment is `bug_sigkill_right_after_the_switch_leaves_a_stale_change_log`).
        let d = digest_of(&snapshot(
            &env,
            "kill-k",
            &["--lock-timeout", "60s", "--rescan"],
        ));
        assert_eq!(
            d,
            *if state == "old" { &old_layer } else { &layer },
            "snapshot after SIGKILL at {delay} ms ({state})"
        );
        eprintln!(
            "SIGKILL at {delay} ms (killed: {killed}): {state}; tmp: restore-* {:?}, gc-* {:?}",
            tmp_entries(&env, "restore-"),
            tmp_entries(&env, "gc-")
        );
        delay += step;
    }
    eprintln!("{kills} kills; {olds} left the old tree, {news} the new one");
    assert!(
        kills >= 5,
        "only {kills} restores were killed before they ended"
    );
    // A later restore succeeds and sweeps what the killed ones left.
    restore_ok(
        &env,
        &layer,
        "kill-k",
        &["--replace", "--quiet", "--lock-timeout", "60s"],
    );
    assert_same_map(&scan(&k_dir), &new_map, "final restore");
    assert_eq!(
        tmp_entries(&env, "restore-"),
        Vec::<String>::new(),
        "work dirs of killed restores are removed by the next restore"
    );
    let s = snapshot(&env, "kill-k", &[]);
    assert_eq!(digest_of(&s), layer);
    assert_eq!(num(&s, "hashed_files"), 0, "{s}");
}

// ---------------------------------------------------------------------------------------------
// 6. Snapshots and mounts
// ---------------------------------------------------------------------------------------------

fn numbered_tree(n: usize) -> Kids {
    (0..n)
        .map(|i| {
            (
                Name(format!("w{i:04}").into_bytes()),
                file(0o644, 100 + i, (i % 4) as u8),
            )
        })
        .collect()
}

#[test]
fn snapshot_waits_for_a_shared_mount_with_a_writer() {
    let env = CliEnv::new();
    let m = Mount::new(&env, "busy", "shared");
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (dir, stop, written) = (m.path().to_path_buf(), stop.clone(), written.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let p = dir.join(format!("w{i:04}"));
                fs::write(&p, file_data(100 + i, (i % 4) as u8)).expect("write through mount");
                set_mode(&p, 0o644);
                i += 1;
                written.store(i, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    assert!(wait_until(Duration::from_secs(10), || written
        .load(Ordering::Relaxed)
        > 5));

    let t = Instant::now();
    let out = cfs(&env, &["snapshot", "busy", "--lock-timeout", "1s"]);
    let waited = t.elapsed();
    assert_eq!(code(&out), 75, "{}", stderr_of(&out));
    assert_eq!(stdout_of(&out), "");
    let err = stderr_of(&out);
    // The holder's command line is shortened to fit, so its "mount" word may be cut when the
    // binary's path is long: the pid and the mode name the holder.
    assert!(
        err.contains("held by pid ") && err.contains(", shared)"),
        "names the holder: {err}"
    );
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
    assert!(
        layers_json(&env).iter().all(|l| l["cache"] != "busy"),
        "no layer of busy was recorded"
    );
    // A restore into it is refused the same way (and the final tree below shows it changed
    // nothing).
    let other_dir = new_cache(&env, "busy-other");
    reconcile(&other_dir, &kids_of(vec![("x", file(0o644, 3, 1))]));
    let other = digest_of(&snapshot(&env, "busy-other", &[]));
    let out = cfs(
        &env,
        &[
            "restore",
            &other,
            "--into",
            "busy",
            "--replace",
            "--lock-timeout",
            "1s",
        ],
    );
    assert_eq!(code(&out), 75, "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains("held by pid"),
        "{}",
        stderr_of(&out)
    );

    // Without a timeout it waits for the mount to end.
    let mut child = spawn(&env, &["snapshot", "busy", "--json"]);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "snapshot finished while the mount was live"
    );
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
    let n = written.load(Ordering::Relaxed);
    let t = Instant::now();
    m.umount();
    let out = wait_child(child, Duration::from_secs(60), "waiting snapshot");
    let after = t.elapsed();
    let text = ok(&out, "waiting snapshot");
    assert!(after < Duration::from_secs(10), "{after:?} after umount");
    let v: Value = serde_json::from_str(&text).expect("json");
    let tree = numbered_tree(n);
    assert_eq!(num(&v, "files"), n as u64, "{v}");
    assert_eq!(digest_of(&v), model_digest(&tree).to_hex(), "final tree");
    // The same tree in another cache gives the same digest.
    let other = new_cache(&env, "busy-ref");
    reconcile(&other, &tree);
    assert_eq!(digest_of(&snapshot(&env, "busy-ref", &[])), digest_of(&v));
    eprintln!(
        "waiting snapshot: {n} files written, finished {after:?} after umount; stderr: {}",
        stderr_of(&out).trim_end()
    );
}

#[test]
fn snapshot_waits_for_a_locked_run() {
    let env = CliEnv::new();
    let target = env.path("run-target");
    let ready = env.path("ready");
    let done = env.path("done");
    let script = format!(
        "umask 022; touch '{r}'; i=0; while [ $i -lt 20 ]; do printf '%s\\n' $i > {t}/f$i; \
         i=$((i+1)); sleep 0.05; done; while [ ! -e '{d}' ]; do sleep 0.05; done",
        r = ready.display(),
        t = target.display(),
        d = done.display()
    );
    let errf = env.path("run.stderr");
    let mut run = env
        .run_cmd(
            &[],
            &[spec("lk", &target, "sharing=locked")],
            &["sh", "-c", &script],
        )
        .stdout(Stdio::null())
        .stderr(fs::File::create(&errf).unwrap())
        .spawn()
        .expect("run");
    assert!(
        wait_until(Duration::from_secs(20), || ready.exists()),
        "run did not start: {}",
        fs::read_to_string(&errf).unwrap_or_default()
    );
    let out = cfs(&env, &["snapshot", "lk", "--lock-timeout", "1s", "--quiet"]);
    assert_eq!(code(&out), 75, "{}", stderr_of(&out));
    let err = stderr_of(&out);
    assert!(
        err.contains(&format!("held by pid {}", run.id())),
        "names the run: {err}"
    );
    let mut child = spawn(&env, &["snapshot", "lk", "--json"]);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "snapshot finished while the run was live"
    );
    fs::write(&done, b"").unwrap();
    let t = Instant::now();
    let status = run.wait().expect("run");
    assert!(status.success(), "run: {status:?}");
    let out = wait_child(child, Duration::from_secs(60), "waiting snapshot");
    assert!(t.elapsed() < Duration::from_secs(10));
    let v: Value = serde_json::from_str(&ok(&out, "waiting snapshot")).expect("json");
    // The final tree: f0..f19 holding "i\n".
    let dir = new_cache(&env, "lk-ref");
    for i in 0..20 {
        let p = dir.join(format!("f{i}"));
        fs::write(&p, format!("{i}\n")).unwrap();
        set_mode(&p, 0o644);
    }
    let r = snapshot(&env, "lk-ref", &[]);
    assert_eq!(digest_of(&v), digest_of(&r), "{v}");
    assert_eq!(num(&v, "files"), 20);
}

// ---------------------------------------------------------------------------------------------
// 7. Bad input
// ---------------------------------------------------------------------------------------------

fn layers_json(env: &CliEnv) -> Vec<Value> {
    match ok_json(env, &["layers", "--json"]) {
        Value::Array(v) => v,
        other => panic!("layers --json: {other}"),
    }
}

/// What a failed command must not change: layers (with tags), objects, caches' contents.
fn fingerprint(env: &CliEnv) -> (String, Map, Map, Map) {
    let layers = serde_json::to_string(&layers_json(env)).unwrap();
    let sc = |p: &str| {
        let d = env.store.join(p);
        if d.exists() { scan(&d) } else { Map::new() }
    };
    (
        layers,
        sc("caches"),
        sc("objects/blobs"),
        sc("objects/trees"),
    )
}

#[test]
fn bad_input_is_one_line_and_changes_nothing() {
    let env = CliEnv::new();
    let tree = kids_of(vec![("f", file(0o644, 10, 1)), ("d", dir(0o755, vec![]))]);
    let dir = new_cache(&env, "bad");
    reconcile(&dir, &tree);
    let layer = digest_of(&snapshot(&env, "bad", &["--tag", "good"]));
    let before = fingerprint(&env);

    let check = |args: &[&str], expect: i32, mentions: &[&str]| {
        let out = cfs(&env, args);
        assert_failure(&out, Some(expect), mentions);
        assert!(fingerprint(&env) == before, "{args:?} changed the store");
    };
    check(&["snapshot", "nope"], 2, &["nope"]);
    check(&["snapshot", "bad", "--tag", "../x"], 2, &["../x"]);
    check(&["snapshot", "bad", "--tag", "a/b"], 2, &["a/b"]);
    check(
        &["snapshot", "bad", "--tag", &"ab".repeat(32)],
        2,
        &["digest"],
    );
    check(&["snapshot", "bad", "--tag", &"t".repeat(129)], 2, &["128"]);
    check(&["snapshot", "bad", "--instance", "7"], 2, &["instance 7"]);
    check(&["restore", "nope", "--into", "x"], 2, &["nope"]);
    check(&["restore", &layer[..7], "--into", "x"], 2, &[&layer[..7]]);
    check(&["restore", &"0".repeat(64), "--into", "x"], 2, &[]);
    check(
        &["restore", "good", "--into", "x", "--instance", "0"],
        2,
        &[],
    );
    check(&["restore", "good", "--into", "bad"], 2, &["--replace"]);
    check(&["diff", "good", "nope"], 2, &["nope"]);
    check(&["diff", "nope", &layer], 2, &["nope"]);
    check(&["layers", "rm", "nope"], 2, &["nope"]);
    check(&["layers", "rm", "good", "nope"], 2, &["nope"]);
    check(&["layers", "untag", "nope"], 2, &["nope"]);
    assert_same_map(&scan(&dir), &model_map(&tree), "contents kept");

    // An ambiguous prefix: two recorded layers (records made through the library) share
    // their first 8 digits.
    {
        let store = cachefs::store::Store::open(&env.store).expect("store");
        for last in ["1", "2"] {
            let d = format!("deadbeef{}{last}", "0".repeat(55));
            store
                .record_layer(
                    &cachefs::store::NewLayer {
                        digest: &d,
                        source: "import",
                        of: None,
                        parent: None,
                        size_bytes: 0,
                        files: 0,
                        dirs: 0,
                        symlinks: 0,
                        fifos: 0,
                    },
                    None,
                    &Default::default(),
                )
                .expect("record");
        }
    }
    let before = fingerprint(&env);
    let check = |args: &[&str], expect: i32, mentions: &[&str]| {
        let out = cfs(&env, args);
        assert_failure(&out, Some(expect), mentions);
        assert!(fingerprint(&env) == before, "{args:?} changed the store");
    };
    check(
        &["restore", "deadbeef", "--into", "bad", "--replace"],
        2,
        &["deadbeef", "2"],
    );
    check(&["diff", "deadbeef", "good"], 2, &["deadbeef"]);
    check(&["layers", "rm", "deadbeef"], 2, &["deadbeef"]);
    assert_same_map(&scan(&dir), &model_map(&tree), "contents kept");
    // A layer whose objects are missing is an error naming it, not a crash.
    let out = restore(&env, &format!("deadbeef{}1", "0".repeat(55)), "ghost", &[]);
    assert_failure(&out, None, &["deadbeef"]);
}

/// The ids of the design are text, never paths: `--into ../../etc` is a cache like any other,
/// whose instance lives inside the store (README "Cache ids").
#[test]
fn restore_into_a_path_like_id_stays_in_the_store() {
    let env = CliEnv::new();
    let tree = kids_of(vec![("f", file(0o644, 10, 1))]);
    let dir = new_cache(&env, "pl");
    reconcile(&dir, &tree);
    let layer = digest_of(&snapshot(&env, "pl", &[]));
    let out = restore(&env, &layer, "../../etc", &["--quiet"]);
    ok(&out, "restore --into ../../etc");
    let inst = instance_dir(&env, "../../etc");
    assert!(
        inst.starts_with(env.store.join("caches")),
        "{}",
        inst.display()
    );
    assert_same_map(&scan(&inst), &model_map(&tree), "restored");
    assert!(!Path::new("/etc/f").exists());
    assert!(!env.dir.path().join("etc").exists());
}

// ---------------------------------------------------------------------------------------------
// 8. Layer records
// ---------------------------------------------------------------------------------------------

fn layer_rec(env: &CliEnv, digest: &str) -> Option<Value> {
    layers_json(env).into_iter().find(|l| l["digest"] == digest)
}

fn tags(v: &Value) -> Vec<String> {
    v["tags"]
        .as_array()
        .unwrap_or_else(|| panic!("no tags in {v}"))
        .iter()
        .map(|t| t.as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn layer_records_parents_tags_and_rm() {
    let env = CliEnv::new();
    let v1 = kids_of(vec![
        ("a", file(0o644, 1000, 1)),
        (
            "d",
            dir(
                0o755,
                vec![("b", file(0o600, 2000, 2)), ("l", link("../a"))],
            ),
        ),
    ]);
    let dir = new_cache(&env, "rec");
    reconcile(&dir, &v1);
    let s1 = snapshot(&env, "rec", &["--tag", "t1"]);
    let d1 = digest_of(&s1);
    assert_eq!(s1["parent"], Value::Null, "{s1}");
    assert_eq!(s1["tag"], "t1");
    assert_eq!(s1["cache"], "rec");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let all = layers_json(&env);
    assert_eq!(all.len(), 1, "{all:?}");
    let r = &all[0];
    assert_eq!(r["digest"], d1.as_str());
    assert_eq!(r["cache"], "rec");
    assert_eq!(r["instance"], 1);
    assert_eq!(r["source"], "snapshot");
    assert_eq!(tags(r), ["t1"]);
    assert_eq!(r["parent"], Value::Null);
    assert_eq!(num(r, "size_bytes"), 3000);
    assert_eq!(num(r, "files"), 2);
    assert_eq!(num(r, "dirs"), 1);
    assert_eq!(num(r, "symlinks"), 1);
    let created = r["created"].as_i64().expect("created");
    assert!((now - created).abs() < 120, "created {created}, now {now}");

    // A change, the same tag: the new layer has the first as parent and takes the tag.
    let mut v2 = v1.clone();
    v2.insert(Name::of("new"), file(0o644, 5, 3));
    change_via_mount(&env, "rec", &v2);
    let s2 = snapshot(&env, "rec", &["--tag", "t1"]);
    let d2 = digest_of(&s2);
    assert_ne!(d1, d2);
    assert_eq!(s2["parent"], d1.as_str(), "{s2}");
    let r1 = layer_rec(&env, &d1).expect("layer 1 kept");
    let r2 = layer_rec(&env, &d2).expect("layer 2");
    assert_eq!(r2["parent"], d1.as_str());
    assert_eq!(tags(&r2), ["t1"], "the tag moved");
    assert!(tags(&r1).is_empty(), "{r1}");
    assert_eq!(num(&r2, "files"), 3);
    // Tags are how restore and diff find layers.
    let out = cfs(&env, &["diff", &d1, "t1"]);
    assert_eq!(code(&out), 1);
    assert_eq!(stdout_of(&out), "A new\n");
    // Text listings.
    let text = ok(&cfs(&env, &["layers"]), "layers");
    assert!(text.contains(&d2[..12]) && !text.contains(&d2), "{text}");
    assert!(text.contains("t1"), "{text}");
    let full = ok(&cfs(&env, &["layers", "--full"]), "layers --full");
    assert!(full.contains(&d2) && full.contains(&d1), "{full}");

    // An unchanged tree: same digest, no new layer; a new tag goes on it.
    let s3 = snapshot(&env, "rec", &["--tag", "keep"]);
    assert_eq!(digest_of(&s3), d2);
    assert_eq!(num(&s3, "hashed_files"), 0, "{s3}");
    assert_eq!(layers_json(&env).len(), 2);
    let mut t = tags(&layer_rec(&env, &d2).unwrap());
    t.sort();
    assert_eq!(t, ["keep", "t1"]);

    // untag: the layer stays.
    ok(&cfs(&env, &["layers", "untag", "t1"]), "untag");
    assert_eq!(tags(&layer_rec(&env, &d2).unwrap()), ["keep"]);
    assert_eq!(code(&cfs(&env, &["layers", "untag", "t1"])), 2);

    // rm by tag: the layer and its tags go; the other layer stays.
    let out = cfs(&env, &["layers", "rm", "keep"]);
    ok(&out, "layers rm keep");
    assert!(layer_rec(&env, &d2).is_none(), "layer 2 forgotten");
    assert!(layer_rec(&env, &d1).is_some(), "layer 1 kept");
    assert_failure(&restore(&env, "keep", "rec-x", &[]), Some(2), &["keep"]);
    assert_failure(&restore(&env, &d2, "rec-x", &[]), Some(2), &[&d2]);
    // Its parent is gone: the next snapshot has none.
    let mut v3 = v2.clone();
    v3.insert(Name::of("newer"), file(0o644, 6, 3));
    change_via_mount(&env, "rec", &v3);
    let s4 = snapshot(&env, "rec", &[]);
    assert_eq!(s4["parent"], Value::Null, "{s4}");
    assert_eq!(
        layer_rec(&env, &digest_of(&s4)).unwrap()["parent"],
        Value::Null
    );

    // A restored cache's next snapshot has the restored layer as parent.
    restore_ok(&env, &d1, "rec-2", &["--quiet"]);
    let mut v1x = v1.clone();
    v1x.insert(Name::of("x"), file(0o644, 1, 1));
    change_via_mount(&env, "rec-2", &v1x);
    let s5 = snapshot(&env, "rec-2", &[]);
    assert_eq!(digest_of(&s5), model_digest(&v1x).to_hex());
    assert_eq!(s5["parent"], d1.as_str(), "{s5}");
    assert_eq!(s5["cache"], "rec-2");
    // Two layers removed at once by digest prefix and tag.
    let d5 = digest_of(&s5);
    ok(
        &cfs(&env, &["snapshot", "rec", "--tag", "last", "--quiet"]),
        "tag",
    );
    ok(&cfs(&env, &["layers", "rm", &d5[..10], "last"]), "rm two");
    let left: Vec<String> = layers_json(&env)
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(left, std::slice::from_ref(&d1), "only layer 1 is left");
}

/// Restored entries take the owner of the instance root (the cache's uid=/gid=), which keeps
/// its owner and mode; a cache the restore creates is root's.
#[test]
fn restored_entries_get_the_instance_roots_owner() {
    let env = CliEnv::new();
    let tree = kids_of(vec![
        (
            "d",
            dir(0o750, vec![("f", file(0o640, 10, 1)), ("l", link("f"))]),
        ),
        ("p", Node::Fifo(0o600)),
    ]);
    let src = new_cache(&env, "own-src");
    reconcile(&src, &tree);
    let layer = digest_of(&snapshot(&env, "own-src", &[]));
    let t = env.path("own-t");
    let out = env.run_sh(
        &[spec("own", &t, "uid=1000,gid=1001,mode=0710")],
        &format!("echo old > '{}/old'", t.display()),
    );
    ok(&out, "run own");
    restore_ok(&env, &layer, "own", &["--replace", "--quiet"]);
    let inst = instance_dir(&env, "own");
    assert_same_map(&scan(&inst), &model_map(&tree), "restored");
    let root = lstat(&inst).unwrap();
    assert_eq!((root.st_uid, root.st_gid), (1000, 1001), "root owner kept");
    assert_eq!(root.st_mode & 0o7777, 0o710, "root mode kept");
    for rel in ["d", "d/f", "d/l", "p"] {
        let st = lstat(&inst.join(rel)).unwrap();
        assert_eq!((st.st_uid, st.st_gid), (1000, 1001), "{rel}");
    }
    restore_ok(&env, &layer, "own-fresh", &["--quiet"]);
    let fresh = instance_dir(&env, "own-fresh");
    for rel in ["", "d", "d/f", "d/l", "p"] {
        let st = lstat(&fresh.join(rel)).unwrap();
        assert_eq!((st.st_uid, st.st_gid), (0, 0), "{rel:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Regressions: bugs these tests found, since fixed
// ---------------------------------------------------------------------------------------------

// Was a bug: a snapshot after the instance directory was changed outside cachefs (no mount running:
// an admin, a script, a restore of a backup into STORE/caches/KEY/N) returns the previous
// layer's digest. The change log is "complete" (no mount recorded anything), so the
// incremental path takes the base layer's tree without looking at the directory, and records
// a layer whose digest does not describe the tree. Issue 5: "When the tree was changed outside
// cachefs or the change log is lost, a stat-keyed hash cache ... still avoids rehashing
// unchanged files" (i.e. the change is still seen). `--rescan` gives the right digest.
#[test]
fn snapshot_sees_changes_made_outside_cachefs() {
    let env = CliEnv::new();
    let v1 = kids_of(vec![
        ("a", file(0o644, 100, 1)),
        ("d", dir(0o755, vec![("b", file(0o644, 200, 2))])),
    ]);
    let inst = new_cache(&env, "outside");
    reconcile(&inst, &v1);
    let d1 = digest_of(&snapshot(&env, "outside", &[]));
    assert_eq!(d1, model_digest(&v1).to_hex());
    // Changed behind cachefs's back: a file added, one rewritten, one directory re-moded.
    let v2 = kids_of(vec![
        ("a", file(0o644, 100, 3)),
        ("new", file(0o600, 10, 1)),
        ("d", dir(0o700, vec![("b", file(0o644, 200, 2))])),
    ]);
    reconcile(&inst, &v2);
    let want = model_digest(&v2).to_hex();
    let rescan = digest_of(&snapshot(&env, "outside", &["--rescan"]));
    assert_eq!(rescan, want, "--rescan");
    // Again from the first state, without --rescan.
    change_via_mount(&env, "outside", &v1);
    assert_eq!(digest_of(&snapshot(&env, "outside", &[])), d1);
    reconcile(&inst, &v2);
    let s = snapshot(&env, "outside", &[]);
    assert_eq!(
        digest_of(&s),
        want,
        "snapshot after changes made outside cachefs gives the old digest: {s}"
    );
}

// Was a bug: the error a corrupt object gives says "remove the file and import or snapshot the layer
// again", but after removing the blob a `cachefs snapshot` of the source cache (unchanged
// since its last snapshot) takes the incremental path, returns the base layer without
// checking that its objects are still stored, and does not store the blob again; the restore
// keeps failing ("blob object … is missing from the store"). `snapshot --rescan` does store it.
#[test]
fn a_removed_blob_is_stored_again_by_the_next_snapshot() {
    let env = CliEnv::new();
    let src = cor_src();
    let src_dir = new_cache(&env, "fix-src");
    reconcile(&src_dir, &src);
    let layer = digest_of(&snapshot(&env, "fix-src", &[]));
    let small = blake3::hash(&file_data(1000, 10)).to_hex().to_string();
    let sb = blob_path(&env, &small);
    damage(&sb, &Damage::Flip(1));
    let out = restore(&env, &layer, "fix-dst", &[]);
    let line = assert_failure(&out, None, &[&small]);
    assert!(line.contains("remove that file"), "{line}");
    // Follow the advice.
    fs::remove_file(&sb).unwrap();
    let again = snapshot(&env, "fix-src", &[]);
    assert_eq!(digest_of(&again), layer);
    assert!(
        sb.exists(),
        "the re-snapshot did not store blob {small} again: {again}"
    );
    restore_ok(&env, &layer, "fix-dst", &["--quiet"]);
    assert_same_map(
        &scan(&instance_dir(&env, "fix-dst")),
        &model_map(&src),
        "restore after the fix",
    );
}

// Was a bug: `restore --replace` switches the new tree in (RENAME_EXCHANGE) before it records the
// instance's new layer, and it does not mark the instance's change log incomplete first. A
// SIGKILL (or crash, or power loss) after the switch and before `set_instance_layer` (while the
// old tree is removed: long for a big old tree) leaves the new tree in place with the old
// layer as the change log's base and no changes logged, so the next `cachefs snapshot` returns
// the OLD layer's digest for the NEW tree (the tree itself is whole; `--rescan` is right).
#[test]
fn sigkill_right_after_the_switch_leaves_no_stale_change_log() {
    let env = CliEnv::new();
    let new_tree = kids_of(vec![("marker", file(0o644, 10, 1))]);
    let src_dir = new_cache(&env, "sw-src");
    reconcile(&src_dir, &new_tree);
    let new_layer = digest_of(&snapshot(&env, "sw-src", &[]));
    let new_map = model_map(&new_tree);

    // The old tree: many empty files, so that removing it after the switch takes a while.
    let dir = new_cache(&env, "sw");
    fs::create_dir(dir.join("many")).unwrap();
    for i in 0..20_000 {
        fs::write(dir.join(format!("many/{i:05}")), b"").unwrap();
    }
    let old_layer = digest_of(&snapshot(&env, "sw", &[]));

    let mut stale = None;
    for attempt in 0..5 {
        let mut child = spawn(
            &env,
            &[
                "restore",
                &new_layer,
                "--into",
                "sw",
                "--replace",
                "--quiet",
            ],
        );
        // Kill as soon as the new tree is in place.
        let switched = wait_until(Duration::from_secs(60), || {
            dir.join("marker").exists() || !matches!(child.try_wait(), Ok(None))
        });
        signal(child.id(), libc::SIGKILL);
        let out = wait_child(child, Duration::from_secs(60), "restore");
        assert!(switched, "the restore never switched");
        let killed = out.status.code().is_none();
        assert_same_map(
            &scan(&dir),
            &new_map,
            "the tree after the kill is the new one",
        );
        let trash = tmp_entries(&env, "gc-");
        eprintln!("attempt {attempt}: killed {killed}, trash left {trash:?}");
        if killed && !trash.is_empty() {
            stale = Some(digest_of(&snapshot(&env, "sw", &[])));
            break;
        }
        // Put the old tree back for another try.
        restore_ok(&env, &old_layer, "sw", &["--replace", "--quiet"]);
    }
    let got = stale.expect("no kill landed between the switch and the records");
    let rescan = digest_of(&snapshot(&env, "sw", &["--rescan"]));
    assert_eq!(rescan, new_layer, "--rescan");
    assert_eq!(
        got, new_layer,
        "snapshot after a SIGKILL right after the switch: got the old layer {old_layer}? "
    );
}

// Was a bug (cosmetic): an I/O error inside a layer operation names the OS error twice on its one
// line, e.g. "cannot open …/objects/blobs/f5/f59f…: Too many levels of symbolic links (os error
// 40): Too many levels of symbolic links (os error 40)". `LayerError::Io` prints `{source}` in
// its message and also marks it `source`, so the `{:#}` chain the CLI prints repeats it.
#[test]
fn io_errors_name_the_os_error_once() {
    let env = CliEnv::new();
    let tree = kids_of(vec![("f", file(0o644, 10, 1))]);
    let inst = new_cache(&env, "io-src");
    reconcile(&inst, &tree);
    let layer = digest_of(&snapshot(&env, "io-src", &[]));
    let hex = blake3::hash(&file_data(10, 1)).to_hex().to_string();
    damage(&blob_path(&env, &hex), &Damage::Symlink);
    let out = restore(&env, &layer, "io-dst", &[]);
    let line = assert_failure(&out, None, &[&hex]);
    let os = "Too many levels of symbolic links (os error 40)";
    assert_eq!(line.matches(os).count(), 1, "{line}");
}
