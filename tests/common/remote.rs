//! Helpers shared by the registry tests (tests/remote.rs, tests/remote_bearer.rs): running the
//! binary with a registry environment of the test's own, and comparing a pulled tree with its
//! source.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{Value, json};

use super::registry;
use super::{CliEnv, assert_failure, code, hash_file, ok, output_with_timeout};

/// Bound on one cachefs command.
pub const CMD_T: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------------
// Running the binary with a clean registry environment
// ---------------------------------------------------------------------------------------------

/// The DOCKER_CONFIG directory of `env`'s commands (created empty; a test may put a
/// config.json in it).
pub fn docker_config(env: &CliEnv) -> PathBuf {
    let d = env.path("docker-config");
    fs::create_dir_all(&d).unwrap();
    d
}

/// Makes `$DOCKER_CONFIG/config.json` of `env` hold `user:password` for `host`.
pub fn write_docker_config(env: &CliEnv, host: &str, user: &str, password: &str) {
    let auth = registry::base64(format!("{user}:{password}").as_bytes());
    let config = json!({ "auths": { host: { "auth": auth } } });
    fs::write(
        docker_config(env).join("config.json"),
        serde_json::to_vec(&config).unwrap(),
    )
    .unwrap();
}

/// Runs `c` (a command from `env.cmd()` or `env.run_cmd()`) with DOCKER_CONFIG set to the
/// test's own directory, no CACHEFS_REGISTRY_*, then `vars`, so the machine's own credentials
/// never leak in; bounded by [`CMD_T`].
pub fn exec(env: &CliEnv, mut c: Command, vars: &[(&str, &str)]) -> Output {
    c.env("DOCKER_CONFIG", docker_config(env))
        .env_remove("CACHEFS_REGISTRY_USER")
        .env_remove("CACHEFS_REGISTRY_PASSWORD");
    for (k, v) in vars {
        c.env(k, v);
    }
    output_with_timeout(c, CMD_T)
}

/// `cachefs --store S ARGS...`
pub fn cfs(env: &CliEnv, args: &[&str]) -> Output {
    cfs_with(env, args, &[])
}

/// `cachefs --store S ARGS...` with extra environment variables.
pub fn cfs_with(env: &CliEnv, args: &[&str], vars: &[(&str, &str)]) -> Output {
    let mut c = env.cmd();
    c.args(args);
    exec(env, c, vars)
}

#[track_caller]
pub fn json_of(out: &Output, what: &str) -> Value {
    let text = ok(out, what);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {text}"))
}

/// [`assert_failure`] with exit code `expect`.
#[track_caller]
pub fn assert_fails(out: &Output, expect: i32, mentions: &[&str]) -> String {
    assert_failure(out, Some(expect), mentions)
}

/// The directory of instance 1 of cache `id`, or `None` when the cache does not exist.
pub fn try_instance_dir(env: &CliEnv, id: &str) -> Option<PathBuf> {
    let out = cfs(env, &["inspect", "--json", id]);
    if code(&out) != 0 {
        return None;
    }
    let v: Value = serde_json::from_slice(&out.stdout).expect("inspect --json");
    v["instances"][0]["path"].as_str().map(PathBuf::from)
}

#[track_caller]
pub fn instance_dir(env: &CliEnv, id: &str) -> PathBuf {
    try_instance_dir(env, id).unwrap_or_else(|| panic!("cache {id} has no instance"))
}

/// `cachefs layers --json` as a list.
pub fn layers(env: &CliEnv) -> Vec<Value> {
    match json_of(&cfs(env, &["layers", "--json"]), "layers") {
        Value::Array(v) => v,
        v => panic!("layers --json is not a list: {v}"),
    }
}

/// Cache `id` does not exist or is empty, and no layer is recorded.
#[track_caller]
pub fn assert_nothing_restored(env: &CliEnv, id: &str) {
    if let Some(dir) = try_instance_dir(env, id) {
        let left: Vec<_> = fs::read_dir(&dir)
            .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "cache {id} holds {left:?}");
    }
    assert_eq!(layers(env), Vec::<Value>::new(), "no layer is recorded");
}

// ---------------------------------------------------------------------------------------------
// Trees: reading them back
// ---------------------------------------------------------------------------------------------

/// A name or path as raw bytes.
pub type Name = Vec<u8>;

/// What a tree holds at one path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Meta {
    File { mode: u32, len: u64, hash: String },
    Dir { mode: u32 },
    Link(Name),
    Fifo { mode: u32 },
    Other { mode: u32 },
}

/// Every path below `root` (not following symlinks) with its kind, permission bits (with
/// setuid/setgid/sticky), contents and symlink target.
pub fn scan(root: &Path) -> BTreeMap<Name, Meta> {
    fn walk(dir: &Path, prefix: &[u8], out: &mut BTreeMap<Name, Meta>) {
        for e in fs::read_dir(dir).unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display())) {
            let e = e.unwrap();
            let mut rel = prefix.to_vec();
            if !rel.is_empty() {
                rel.push(b'/');
            }
            rel.extend_from_slice(e.file_name().as_bytes());
            let p = e.path();
            let md = fs::symlink_metadata(&p).unwrap();
            let mode = md.mode() & 0o7777;
            let ft = md.file_type();
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
                Meta::Link(fs::read_link(&p).unwrap().as_os_str().as_bytes().to_vec())
            } else if ft.is_fifo() {
                Meta::Fifo { mode }
            } else {
                Meta::Other { mode }
            };
            out.insert(rel, m);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, b"", &mut out);
    out
}

/// What a layer keeps of `m`: setuid and setgid are not recorded (docs/LAYER-FORMAT.md).
pub fn as_layered(m: Meta) -> Meta {
    match m {
        Meta::File { mode, len, hash } => Meta::File {
            mode: mode & 0o1777,
            len,
            hash,
        },
        Meta::Dir { mode } => Meta::Dir {
            mode: mode & 0o1777,
        },
        Meta::Fifo { mode } => Meta::Fifo {
            mode: mode & 0o1777,
        },
        m => m,
    }
}

/// Asserts the tree at `got` is what a layer of the tree at `want` restores: the same
/// entries, kinds, modes (less setuid/setgid), contents and symlink targets. Names the
/// first paths that differ. An empty `want` fails too: it would prove nothing.
#[track_caller]
pub fn assert_same_tree(got: &Path, want: &Path) {
    let g = scan(got);
    let w: BTreeMap<Name, Meta> = scan(want)
        .into_iter()
        .map(|(p, m)| (p, as_layered(m)))
        .collect();
    assert!(!w.is_empty(), "{} is empty", want.display());
    if g == w {
        return;
    }
    let mut diffs = Vec::new();
    for (p, m) in &w {
        match g.get(p) {
            None => diffs.push(format!(
                "missing {:?} ({m:?})",
                p.escape_ascii().to_string()
            )),
            Some(x) if x != m => diffs.push(format!(
                "{:?}: got {x:?}, want {m:?}",
                p.escape_ascii().to_string()
            )),
            _ => {}
        }
    }
    for (p, x) in &g {
        if !w.contains_key(p) {
            diffs.push(format!("extra {:?} ({x:?})", p.escape_ascii().to_string()));
        }
    }
    diffs.truncate(20);
    panic!(
        "{} differs from {}:\n  {}",
        got.display(),
        want.display(),
        diffs.join("\n  ")
    );
}
