//! `cachefs push` / `cachefs pull` and `cache-from=` / `cache-to=` against a real OCI registry
//! (CNCF distribution from tests/common/registry.rs), through the real binary:
//!
//! - a round trip into an empty store is bit-exact (every kind of entry, odd modes and names,
//!   a file big enough to be cut into parts; also an empty cache), the pulled layer is the
//!   pushed one, and the artifact reads with zstd and tar;
//! - what moves: a second push of an unchanged cache uploads nothing and leaves the registry's
//!   blob set as it was; a one-file (or a few scattered files) change uploads one new chunk
//!   and the index; a pull skips chunks whose files the store holds; a push to another
//!   repository mounts blobs; a base artifact that lost a chunk or whose index is corrupt
//!   does not spoil the next push;
//! - failures are one line and change nothing: a corrupt chunk, part, index or manifest, an
//!   unreachable registry, an unknown tag, refused credentials, an artifact that is not a
//!   cachefs layer, a malformed reference or bad arguments (exit 2), a non-empty cache
//!   without --replace (exit 2, before any download);
//! - credentials from the environment and from $DOCKER_CONFIG/config.json; references without
//!   a tag, and localhost;
//! - `run` with --cache-from / --cache-to / --cache-to-when (and the spec keys), `mount` with
//!   --cache-from and --cache-to.
//!
//! Every command runs with DOCKER_CONFIG pointing at a directory of the test (empty unless the
//! test writes a config.json) and without CACHEFS_REGISTRY_*, so the machine's own
//! credentials never leak in; every command is bounded by a timeout.
#![cfg(feature = "registry")]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::registry::{Registry, free_port, sha256_digest};
use common::remote::{
    Meta, assert_fails, assert_nothing_restored, assert_same_tree, cfs, cfs_with, exec,
    instance_dir, json_of, layers, scan, try_instance_dir, write_docker_config,
};
use common::{CliEnv, code, content, hash_file, mkfifo, ok, spec, stderr_of, stdout_of};
use serde_json::{Value, json};

const ARTIFACT_TYPE: &str = "application/vnd.cachefs.layer.v1";
const INDEX_MEDIA_TYPE: &str = "application/vnd.cachefs.index.v1+zstd";
const FILES_MEDIA_TYPE: &str = "application/vnd.cachefs.chunk.v1.tar+zstd";
const PART_MEDIA_TYPE: &str = "application/vnd.cachefs.part.v1+zstd";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MIB: usize = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Running the binary with a clean registry environment
// ---------------------------------------------------------------------------------------------

/// `cachefs --store S run EXTRA... --mount SPEC... -- sh -c SCRIPT`
fn run_sh(env: &CliEnv, extra: &[&str], specs: &[String], script: &str) -> Output {
    exec(env, env.run_cmd(extra, specs, &["sh", "-c", script]), &[])
}

fn num(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} is not a number in {v}"))
}

fn text<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str()
        .unwrap_or_else(|| panic!("{k} is not a string in {v}"))
}

/// `push ID REF --json`, which must succeed.
#[track_caller]
fn push(env: &CliEnv, id: &str, reference: &str) -> Value {
    push_with(env, id, reference, &[])
}

#[track_caller]
fn push_with(env: &CliEnv, id: &str, reference: &str, vars: &[(&str, &str)]) -> Value {
    let v = json_of(
        &cfs_with(env, &["push", id, reference, "--json"], vars),
        &format!("push {id} {reference}"),
    );
    assert_eq!(text(&v, "reference"), reference, "{v}");
    assert_eq!(text(&v, "cache"), id, "{v}");
    assert_eq!(text(&v, "layer").len(), 64, "{v}");
    assert!(text(&v, "manifest_digest").starts_with("sha256:"), "{v}");
    v
}

/// `pull REF --json [--into ID]`, which must succeed.
#[track_caller]
fn pull(env: &CliEnv, reference: &str, into: Option<&str>) -> Value {
    pull_with(env, reference, into, &[])
}

#[track_caller]
fn pull_with(env: &CliEnv, reference: &str, into: Option<&str>, vars: &[(&str, &str)]) -> Value {
    let mut args = vec!["pull", reference, "--json"];
    if let Some(id) = into {
        args.extend(["--into", id]);
    }
    let v = json_of(&cfs_with(env, &args, vars), &format!("{args:?}"));
    assert_eq!(text(&v, "reference"), reference, "{v}");
    assert_eq!(text(&v, "layer").len(), 64, "{v}");
    v
}

fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("{prefix}{}", N.fetch_add(1, Ordering::Relaxed))
}

/// A new, empty cache made by a `cachefs run` that does nothing; returns its instance
/// directory, which the test then writes into directly (nothing mounts it).
#[track_caller]
fn new_cache(env: &CliEnv, id: &str) -> PathBuf {
    let t = env.path(&unique("t-"));
    ok(&run_sh(env, &[], &[spec(id, &t, "")], "true"), "create");
    instance_dir(env, id)
}

/// The manifest `repo:tag` (or `repo@digest`) holds, read with the harness's own client.
#[track_caller]
fn manifest(reg: &Registry, repo: &str, tag: &str) -> Value {
    let (status, body) = reg.get(&format!("/v2/{repo}/manifests/{tag}"));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).expect("manifest JSON")
}

/// How many chunks of manifest `new` are not in `old`, and their total size.
fn new_chunks(old: &Value, new: &Value) -> (u64, u64) {
    let old: BTreeSet<&str> = old["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| text(l, "digest"))
        .collect();
    let fresh: Vec<&Value> = new["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| !old.contains(text(l, "digest")))
        .collect();
    (
        fresh.len() as u64,
        fresh.iter().map(|l| num(l, "size")).sum(),
    )
}

/// (mediaType, digest) of a manifest's layers.
fn manifest_layers(m: &Value) -> Vec<(String, String)> {
    m["layers"]
        .as_array()
        .unwrap_or_else(|| panic!("no layers in {m}"))
        .iter()
        .map(|l| {
            (
                text(l, "mediaType").to_owned(),
                text(l, "digest").to_owned(),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Trees: writing them, reading them back
// ---------------------------------------------------------------------------------------------

fn set_mode(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
}

/// Writes `len` bytes seeded by `seed` to `p` with mode `mode`.
fn put_file(p: &Path, seed: &str, len: usize, mode: u32) {
    fs::write(p, content(seed, len)).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
    set_mode(p, mode);
}

fn mkdir(p: &Path, mode: u32) {
    fs::create_dir_all(p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
    set_mode(p, mode);
}

/// Size of the file that is cut into parts (more than one 64 MiB chunk).
const BIG: usize = 70 * MIB + 12345;

/// Every kind of entry: nested and empty directories, odd modes (0600, 0755, 01777, 0700;
/// 02755 and 04755, whose setgid/setuid bits a layer drops), files from empty to [`BIG`], symlinks (one dangling, one absolute), a fifo, a
/// non-UTF-8 name, whiteout-like names.
fn build_rich_tree(root: &Path) {
    mkdir(&root.join("a/b/c"), 0o755);
    put_file(&root.join("a/b/c/deep.txt"), "deep", 17, 0o644);
    mkdir(&root.join("a/empty"), 0o755);
    mkdir(&root.join("a/private"), 0o700);
    put_file(&root.join("a/private/secret"), "secret", 4096, 0o600);
    symlink("b/c/deep.txt", root.join("a/link")).unwrap();
    symlink(
        "/nonexistent/target/of/a/dangling/link",
        root.join("dangling"),
    )
    .unwrap();
    symlink("../../..", root.join("a/b/up")).unwrap();
    mkfifo(&root.join("a/fifo"), 0o600).unwrap();
    set_mode(&root.join("a/fifo"), 0o640);
    mkdir(&root.join("tmp"), 0o1777);
    mkdir(&root.join("setgid"), 0o2755);
    put_file(&root.join("setgid/x"), "setgid-x", 1, 0o644);
    mkdir(&root.join("files"), 0o755);
    put_file(&root.join("files/zero"), "zero", 0, 0o644);
    put_file(&root.join("files/small"), "small", 100, 0o600);
    put_file(&root.join("files/exec.sh"), "exec", 3000, 0o755);
    put_file(&root.join("files/suid"), "suid", 30, 0o4755);
    put_file(&root.join("files/mid"), "mid", 3 * MIB + 3, 0o644);
    put_file(&root.join("files/.wh.x"), "whiteout-like", 5, 0o644);
    put_file(&root.join(".wh..wh..opq"), "opaque-like", 6, 0o644);
    let odd = root.join(OsStr::from_bytes(b"caf\xe9 \x01name"));
    put_file(&odd, "non-utf8", 42, 0o644);
    // Names and targets past tar's 100-byte fields, a hard link (restored as a copy).
    let long = root.join("n".repeat(150)).join("m".repeat(200));
    mkdir(&long, 0o750);
    put_file(&long.join("x".repeat(255)), "long", 1000, 0o644);
    symlink("t".repeat(300), root.join("a/long-target")).unwrap();
    fs::hard_link(root.join("files/small"), root.join("a/hardlink")).unwrap();
    // The big file, in a directory with a non-UTF-8 name that is cut into its own chunks.
    let big_dir = root.join(OsStr::from_bytes(BIG_DIR));
    mkdir(&big_dir, 0o755);
    put_file(&big_dir.join("big.bin"), "big", BIG, 0o644);
    put_file(&big_dir.join("beside"), "beside", 2000, 0o644);
}

/// The directory holding the big file (not UTF-8).
const BIG_DIR: &[u8] = b"big\xff dir";

/// `n` directories `dNN`, each with a file `f.bin` of `size` bytes (seeded by `salt`) and a
/// file `same` whose contents are the same everywhere (so several chunks carry one blob).
fn build_many_dirs(root: &Path, n: usize, size: usize, salt: &str) {
    for i in 0..n {
        let d = root.join(format!("d{i:02}"));
        mkdir(&d, 0o755);
        put_file(&d.join("f.bin"), &format!("{salt}-{i}"), size, 0o644);
        put_file(&d.join("same"), &format!("{salt}-same"), 40_000, 0o644);
    }
}

/// Overwrites the first bytes of `rel` (keeping its size) through a real `cachefs run` mount.
#[track_caller]
fn change_through_mount(env: &CliEnv, id: &str, rel: &str, stamp: &str) {
    let t = env.path(&unique("t-"));
    let script = format!(
        "printf '%s' '{stamp}' | dd of='{}/{rel}' conv=notrunc status=none",
        t.display()
    );
    ok(&run_sh(env, &[], &[spec(id, &t, "")], &script), "change");
}

/// A store (`env`) with cache `id` holding a small tree (`some/file`, `top`); returns it.
fn small_cache(env: &CliEnv, id: &str) -> PathBuf {
    let root = new_cache(env, id);
    mkdir(&root.join("some"), 0o755);
    put_file(&root.join("some/file"), &format!("{id}-file"), 1000, 0o644);
    put_file(&root.join("top"), &format!("{id}-top"), 10, 0o600);
    root
}

// ---------------------------------------------------------------------------------------------
// Round trips and what moves
// ---------------------------------------------------------------------------------------------

/// The artifact `m` (in `repo`) of the tree at `src` reads with standard tools, as
/// docs/LAYER-FORMAT.md says: `zstd -d | tar -x` of every files chunk gives files of the tree
/// (regular files only, with the tree's contents), and the parts of a file, decompressed and
/// concatenated, give the file.
fn check_with_standard_tools(reg: &Registry, repo: &str, m: &Value, src: &Path) {
    let dir = common::tempdir();
    let out = dir.path().join("x");
    fs::create_dir(&out).unwrap();
    let mut parts: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    let mut extracted = 0;
    for (i, l) in m["layers"].as_array().unwrap().iter().enumerate() {
        let (status, body) = reg.get(&format!("/v2/{repo}/blobs/{}", text(l, "digest")));
        assert_eq!(status, 200);
        let blob = dir.path().join(format!("blob-{i}"));
        fs::write(&blob, body).unwrap();
        if l["mediaType"] == FILES_MEDIA_TYPE {
            common::sh(&format!(
                "zstd -q -d -c '{}' | tar -x -C '{}'",
                blob.display(),
                out.display()
            ));
            extracted += 1;
        } else {
            let path = text(&l["annotations"], "io.cachefs.chunk.path").to_owned();
            parts.entry(path).or_default().push(blob);
        }
    }
    assert!(extracted > 0);
    let mut files = 0;
    for (rel, m) in scan(&out) {
        let shown = rel.escape_ascii().to_string();
        let (hash, len) = match m {
            Meta::File { hash, len, .. } => (hash, len),
            // Made by tar -x for the files' paths.
            Meta::Dir { .. } => continue,
            m => panic!("{shown:?} in a chunk is not a regular file: {m:?}"),
        };
        let (want, want_len) = hash_file(&src.join(OsStr::from_bytes(&rel)));
        assert_eq!(
            (hash, len),
            (want.to_hex().to_string(), want_len),
            "{shown:?}"
        );
        files += 1;
    }
    assert!(files >= 10, "{files} files in the chunks");
    let big = dir.path().join("big");
    let blobs: Vec<String> = parts[&format!("{}/big.bin", String::from_utf8_lossy(BIG_DIR))]
        .iter()
        .map(|p| format!("'{}'", p.display()))
        .collect();
    common::sh(&format!(
        "zstd -q -d -c {} > '{}'",
        blobs.join(" "),
        big.display()
    ));
    assert_eq!(
        hash_file(&big),
        hash_file(&src.join(OsStr::from_bytes(BIG_DIR)).join("big.bin"))
    );
}

#[test]
fn round_trip_into_an_empty_store_is_bit_exact() {
    let reg = Registry::start();
    let a = CliEnv::new();
    let src = new_cache(&a, "src");
    build_rich_tree(&src);
    let reference = reg.reference("team/caches:rich");

    let pushed = push(&a, "src", &reference);
    assert_eq!(num(&pushed, "blobs_mounted"), 0, "{pushed}");
    assert_eq!(num(&pushed, "blobs_reused"), 0, "{pushed}");
    assert_eq!(
        num(&pushed, "blobs_uploaded"),
        num(&pushed, "chunks") + 1,
        "every chunk and the index: {pushed}"
    );
    assert_eq!(
        num(&pushed, "chunks_built"),
        num(&pushed, "chunks"),
        "{pushed}"
    );
    assert_eq!(
        num(&pushed, "bytes_uploaded"),
        num(&pushed, "artifact_bytes"),
        "{pushed}"
    );
    // The same layer a snapshot of the cache names.
    let snap = json_of(&cfs(&a, &["snapshot", "src", "--json"]), "snapshot");
    assert_eq!(text(&snap, "digest"), text(&pushed, "layer"));

    // The artifact as the registry holds it.
    let m = manifest(&reg, "team/caches", "rich");
    assert_eq!(m["artifactType"], ARTIFACT_TYPE, "{m}");
    assert_eq!(m["mediaType"], OCI_MANIFEST, "{m}");
    assert_eq!(m["config"]["mediaType"], INDEX_MEDIA_TYPE, "{m}");
    assert_eq!(
        m["annotations"]["io.cachefs.layer.root"],
        format!("blake3:{}", text(&pushed, "layer")),
        "{m}"
    );
    let (status, body) = reg.get(&format!(
        "/v2/team/caches/manifests/{}",
        text(&pushed, "manifest_digest")
    ));
    assert_eq!(status, 200);
    assert_eq!(sha256_digest(&body), text(&pushed, "manifest_digest"));
    let chunks = manifest_layers(&m);
    assert_eq!(chunks.len() as u64, num(&pushed, "chunks"), "{m}");
    let parts: Vec<&Value> = m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["mediaType"] == PART_MEDIA_TYPE)
        .collect();
    assert_eq!(parts.len(), 2, "a 70 MiB file is two parts: {m}");
    let big_path = format!("{}/big.bin", String::from_utf8_lossy(BIG_DIR));
    for p in &parts {
        assert_eq!(p["annotations"]["io.cachefs.chunk.path"], big_path, "{m}");
    }
    assert_eq!(
        parts[0]["annotations"]["io.cachefs.chunk.range"],
        format!("0+{}", 64 * MIB)
    );
    assert_eq!(
        parts[1]["annotations"]["io.cachefs.chunk.range"],
        format!("{}+{}", 64 * MIB, BIG - 64 * MIB)
    );
    assert!(chunks.iter().any(|(t, _)| t == FILES_MEDIA_TYPE), "{m}");
    check_with_standard_tools(&reg, "team/caches", &m, &src);
    // Every blob the manifest names is in the registry, and nothing else besides the manifest.
    let mut want: BTreeSet<String> = chunks.iter().map(|(_, d)| d.clone()).collect();
    want.insert(text(&m["config"], "digest").to_owned());
    want.insert(text(&pushed, "manifest_digest").to_owned());
    assert_eq!(reg.blob_digests(), want);

    // Into a fresh store.
    let b = CliEnv::new();
    let pulled = pull(&b, &reference, Some("dst"));
    assert_eq!(text(&pulled, "layer"), text(&pushed, "layer"), "{pulled}");
    assert_eq!(
        text(&pulled, "manifest_digest"),
        text(&pushed, "manifest_digest")
    );
    assert_eq!(text(&pulled, "cache"), "dst");
    assert_eq!(num(&pulled, "chunks"), num(&pushed, "chunks"));
    assert_eq!(num(&pulled, "chunks_downloaded"), num(&pushed, "chunks"));
    assert_eq!(num(&pulled, "chunks_skipped"), 0);
    assert_eq!(
        num(&pulled, "bytes_downloaded"),
        num(&pushed, "artifact_bytes")
    );
    assert_eq!(num(&pulled, "fifos"), 1, "{pulled}");
    assert_eq!(num(&pulled, "symlinks"), 4, "{pulled}");
    assert_eq!(num(&pulled, "files"), 15, "{pulled}");
    assert_eq!(num(&pulled, "dirs"), 11, "{pulled}");
    assert!(num(&pulled, "size_bytes") > BIG as u64, "{pulled}");
    assert_same_tree(&instance_dir(&b, "dst"), &src);

    // The layer is recorded (an import) and snapshots of the restored cache name it.
    let recs = layers(&b);
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0]["digest"], pushed["layer"]);
    let snap = json_of(&cfs(&b, &["snapshot", "dst", "--json"]), "snapshot dst");
    assert_eq!(text(&snap, "digest"), text(&pushed, "layer"));
}

#[test]
fn a_second_push_of_an_unchanged_cache_uploads_nothing() {
    let reg = Registry::start();
    let a = CliEnv::new();
    let src = new_cache(&a, "c");
    build_many_dirs(&src, 4, MIB, "unchanged");
    put_file(&src.join("big"), "unchanged-big", 65 * MIB, 0o644);
    let reference = reg.reference("r:t");

    let first = push(&a, "c", &reference);
    assert!(num(&first, "blobs_uploaded") >= 3, "{first}");
    let before = reg.blob_digests();

    let out = cfs(&a, &["push", "c", &reference]);
    let line = ok(&out, "second push");
    assert_eq!(
        line,
        format!("{reference}@{}\n", text(&first, "manifest_digest")),
        "stdout is REF@manifest-digest"
    );
    let err = stderr_of(&out);
    assert!(
        err.contains("uploaded 0 blobs"),
        "a summary on stderr: {err}"
    );

    let second = push(&a, "c", &reference);
    assert_eq!(num(&second, "blobs_uploaded"), 0, "{second}");
    assert_eq!(num(&second, "bytes_uploaded"), 0, "{second}");
    assert_eq!(num(&second, "blobs_mounted"), 0, "{second}");
    assert_eq!(num(&second, "chunks_built"), 0, "{second}");
    assert_eq!(
        num(&second, "blobs_reused"),
        num(&first, "blobs_uploaded"),
        "{second}"
    );
    assert_eq!(second["manifest_digest"], first["manifest_digest"]);
    assert_eq!(second["layer"], first["layer"]);
    // The manifest is byte-identical, so not even a new manifest blob.
    assert_eq!(reg.blob_digests(), before);

    // A push of the stored layer (by tag) is the same artifact.
    ok(
        &cfs(&a, &["snapshot", "c", "--tag", "kept", "-q"]),
        "snapshot --tag",
    );
    let out = cfs(
        &a,
        &["push", "--layer", "kept", &reg.reference("r:t2"), "-q"],
    );
    let line = ok(&out, "push --layer");
    assert_eq!(
        line,
        format!(
            "{}@{}\n",
            reg.reference("r:t2"),
            text(&first, "manifest_digest")
        )
    );
    assert_eq!(stderr_of(&out), "", "-q prints nothing else");
    assert_eq!(reg.blob_digests(), before);

    // Pull by digest, -q: the layer digest alone.
    let b = CliEnv::new();
    let by_digest = reg.reference(&format!("r@{}", text(&first, "manifest_digest")));
    let out = cfs(&b, &["pull", &by_digest, "-q"]);
    assert_eq!(ok(&out, "pull -q"), format!("{}\n", text(&first, "layer")));
    assert_eq!(stderr_of(&out), "");
}

#[test]
fn an_empty_cache_round_trips() {
    let reg = Registry::start();
    let a = CliEnv::new();
    new_cache(&a, "empty");
    let reference = reg.reference("r:empty");
    let pushed = push(&a, "empty", &reference);
    assert_eq!(num(&pushed, "chunks"), 0, "{pushed}");
    let m = manifest(&reg, "r", "empty");
    assert_eq!(m["artifactType"], ARTIFACT_TYPE, "{m}");
    let again = push(&a, "empty", &reference);
    assert_eq!(num(&again, "blobs_uploaded"), 0, "{again}");
    assert_eq!(again["manifest_digest"], pushed["manifest_digest"]);

    let b = CliEnv::new();
    let pulled = pull(&b, &reference, Some("e"));
    assert_eq!(pulled["layer"], pushed["layer"]);
    assert_eq!(num(&pulled, "files"), 0, "{pulled}");
    assert_eq!(num(&pulled, "chunks"), 0, "{pulled}");
    assert_eq!(scan(&instance_dir(&b, "e")), BTreeMap::new());
}

#[test]
fn a_reference_without_a_tag_is_latest_and_localhost_is_plain_http() {
    let reg = Registry::start();
    let a = CliEnv::new();
    let src = small_cache(&a, "c");
    let untagged = reg.reference("r");
    let out = cfs(&a, &["push", "c", &untagged, "-q"]);
    let line = ok(&out, "push without a tag");
    assert!(line.starts_with(&format!("{untagged}@sha256:")), "{line}");
    let (status, body) = reg.get("/v2/r/manifests/latest");
    assert_eq!(status, 200);
    assert_eq!(line, format!("{untagged}@{}\n", sha256_digest(&body)));

    let b = CliEnv::new();
    let localhost = format!("localhost:{}/r:latest", reg.port());
    let pulled = pull(&b, &localhost, Some("c"));
    assert_same_tree(&instance_dir(&b, "c"), &src);
    let pushed = push(&b, "c", &format!("localhost:{}/r:again", reg.port()));
    assert_eq!(pushed["layer"], pulled["layer"]);
    assert_eq!(num(&pushed, "blobs_uploaded"), 0, "{pushed}");
}

#[test]
fn a_changed_file_re_uploads_only_its_chunk() {
    let reg = Registry::start();
    let a = CliEnv::new();
    let src = new_cache(&a, "c");
    build_many_dirs(&src, 40, 2 * MIB, "many");
    let reference = reg.reference("r:t");

    let first = push(&a, "c", &reference);
    let chunks = num(&first, "chunks");
    assert!(chunks >= 2, "80 MiB is several chunks: {first}");
    let before = reg.blob_digests();

    change_through_mount(&a, "c", "d17/f.bin", "changed!");
    let second = push(&a, "c", &reference);
    assert_ne!(second["layer"], first["layer"]);
    let uploaded = num(&second, "blobs_uploaded");
    assert!(
        (2..=3).contains(&uploaded),
        "the changed chunk and the index (one more if a cut moved): {second}"
    );
    assert!(
        num(&second, "chunks_built") <= 2,
        "only the changed chunk is compressed again: {second}"
    );
    assert_eq!(
        num(&second, "blobs_reused") + uploaded,
        num(&second, "chunks") + 1,
        "{second}"
    );
    let after = reg.blob_digests();
    assert!(before.is_subset(&after));
    let new: Vec<_> = after.difference(&before).collect();
    assert!(
        new.len() <= 4 && new.len() >= 3,
        "new blobs: chunk(s), index, manifest: {new:?}"
    );
    // The new manifest shares all chunks but the changed one(s) with the old, and exactly
    // those (and the index) were uploaded.
    let old_m = manifest(&reg, "r", text(&first, "manifest_digest"));
    let new_m = manifest(&reg, "r", "t");
    let (changed, changed_bytes) = new_chunks(&old_m, &new_m);
    assert!((1..=2).contains(&changed), "{old_m} vs {new_m}");
    assert_eq!(uploaded, changed + 1, "{second}");
    assert_eq!(
        num(&second, "bytes_uploaded"),
        changed_bytes + num(&new_m["config"], "size"),
        "{second}"
    );

    // Changes scattered over the tree: still one new chunk (at most two, should a cut fall
    // among the changed files) and the index.
    for d in ["d03", "d21", "d38"] {
        change_through_mount(&a, "c", &format!("{d}/f.bin"), "scattered");
    }
    let third = push(&a, "c", &reference);
    assert!((2..=3).contains(&num(&third, "blobs_uploaded")), "{third}");
    assert!(num(&third, "chunks_built") <= 2, "{third}");
    assert!(
        num(&third, "bytes_uploaded") < 10 * MIB as u64,
        "about the three changed files: {third}"
    );

    // Kept chunks carry stale files now; a pull into a fresh store reads past them and
    // restores exactly the current tree.
    let b = CliEnv::new();
    let pulled = pull(&b, &reference, Some("c"));
    assert_eq!(pulled["layer"], third["layer"]);
    assert_same_tree(&instance_dir(&b, "c"), &src);
    assert_eq!(
        num(&pulled, "blobs_stored"),
        41,
        "every f.bin and one `same`: {pulled}"
    );
}

#[test]
fn a_push_over_a_damaged_base_artifact_still_gives_a_whole_layer() {
    let reg = Registry::start();
    let a = CliEnv::new();
    let src = new_cache(&a, "c");
    build_many_dirs(&src, 30, 2 * MIB, "damaged-base");
    let reference = reg.reference("r:t");
    let first = push(&a, "c", &reference);
    assert!(num(&first, "chunks") >= 2, "{first}");

    // The registry lost a chunk (its own gc, say): the next push must not keep it.
    let m = manifest(&reg, "r", "t");
    let lost = manifest_layers(&m)[0].1.clone();
    fs::remove_file(reg.blob_path(&lost)).unwrap();
    change_through_mount(&a, "c", "d29/f.bin", "lost");
    push(&a, "c", &reference);
    let now = manifest(&reg, "r", "t");
    let stored = reg.blob_digests();
    for (_, d) in manifest_layers(&now) {
        assert!(
            stored.contains(&d),
            "the manifest names {d}, which the registry lacks"
        );
    }
    let b = CliEnv::new();
    pull(&b, &reference, Some("c"));
    assert_same_tree(&instance_dir(&b, "c"), &src);

    // The base's index is corrupt: the push still succeeds, and what it pushed pulls whole.
    let index = text(&manifest(&reg, "r", "t")["config"], "digest").to_owned();
    reg.tamper_blob(&index);
    change_through_mount(&a, "c", "d28/f.bin", "corrupt-base");
    let pushed = push(&a, "c", &reference);
    let c = CliEnv::new();
    let pulled = pull(&c, &reference, Some("c"));
    assert_eq!(pulled["layer"], pushed["layer"]);
    assert_same_tree(&instance_dir(&c, "c"), &src);
}

#[test]
fn a_pull_downloads_only_what_the_store_lacks() {
    let reg = Registry::start();
    let a = CliEnv::new();
    let src = new_cache(&a, "c");
    build_many_dirs(&src, 40, 2 * MIB, "pull-missing");
    let v1 = reg.reference("r:v1");
    let pushed = push(&a, "c", &v1);
    let chunks = num(&pushed, "chunks");
    assert!(chunks >= 2, "{pushed}");

    let b = CliEnv::new();
    let first = pull(&b, &v1, Some("one"));
    assert_eq!(num(&first, "chunks_downloaded"), chunks, "{first}");
    let second = pull(&b, &v1, Some("two"));
    assert_eq!(num(&second, "chunks_downloaded"), 0, "{second}");
    assert_eq!(num(&second, "chunks_skipped"), chunks, "{second}");
    assert_eq!(num(&second, "blobs_stored"), 0, "{second}");
    assert!(
        num(&second, "bytes_downloaded") < 64 * 1024,
        "only the index: {second}"
    );
    assert_same_tree(&instance_dir(&b, "two"), &src);
    assert_same_tree(&instance_dir(&b, "one"), &src);

    // One file changes, pushed as a new tag; the store with v1 fetches only its chunk.
    change_through_mount(&a, "c", "d05/f.bin", "v2");
    let v2 = reg.reference("r:v2");
    let pushed2 = push(&a, "c", &v2);
    let third = json_of(
        &cfs(&b, &["pull", &v2, "--tag", "v2", "--json"]),
        "pull --tag",
    );
    assert_eq!(third["layer"], pushed2["layer"]);
    let downloaded = num(&third, "chunks_downloaded");
    assert!((1..=2).contains(&downloaded), "{third}");
    assert_eq!(
        downloaded + num(&third, "chunks_skipped"),
        num(&pushed2, "chunks"),
        "{third}"
    );
    assert_eq!(num(&third, "blobs_stored"), 1, "one new file: {third}");
    // Only chunks that are new in v2 (and the index) were fetched.
    let old_m = manifest(&reg, "r", "v1");
    let new_m = manifest(&reg, "r", "v2");
    let (changed, changed_bytes) = new_chunks(&old_m, &new_m);
    assert!(downloaded <= changed, "{third}");
    assert!(
        num(&third, "bytes_downloaded") <= changed_bytes + num(&new_m["config"], "size"),
        "{third}"
    );
    // Without --into nothing is restored; the tag names the layer.
    assert!(try_instance_dir(&b, "three").is_none());
    let recs = layers(&b);
    let tagged: Vec<&Value> = recs
        .iter()
        .filter(|l| {
            l["tags"]
                .as_array()
                .is_some_and(|t| t.contains(&json!("v2")))
        })
        .collect();
    assert_eq!(tagged.len(), 1);
    assert_eq!(tagged[0]["digest"], pushed2["layer"]);
    ok(
        &cfs(&b, &["restore", "v2", "--into", "three", "-q"]),
        "restore",
    );
    assert_same_tree(&instance_dir(&b, "three"), &src);
}

#[test]
fn a_push_to_another_repository_mounts_the_blobs() {
    let reg = Registry::start();
    let a = CliEnv::new();
    let src = new_cache(&a, "c");
    build_many_dirs(&src, 3, 300_000, "mount");
    let first = push(&a, "c", &reg.reference("repo-a:t"));
    let blobs = num(&first, "blobs_uploaded");
    assert_eq!(blobs, num(&first, "chunks") + 1, "{first}");
    let before = reg.blob_digests();

    let second = push(&a, "c", &reg.reference("repo-b:t"));
    assert_eq!(num(&second, "blobs_uploaded"), 0, "{second}");
    assert_eq!(num(&second, "bytes_uploaded"), 0, "{second}");
    assert!(num(&second, "blobs_mounted") >= 1, "{second}");
    assert_eq!(
        num(&second, "blobs_mounted") + num(&second, "blobs_reused"),
        blobs,
        "{second}"
    );
    assert_eq!(second["manifest_digest"], first["manifest_digest"]);
    // Mounted, not copied: the registry holds no new blob.
    assert_eq!(reg.blob_digests(), before);

    let b = CliEnv::new();
    let pulled = pull(&b, &reg.reference("repo-b:t"), Some("c"));
    assert_eq!(pulled["layer"], first["layer"]);
    assert_same_tree(&instance_dir(&b, "c"), &src);

    // Another store that pulled from repo-b mounts from there: it builds the same chunks
    // (same bytes, so same digests) and learned from its pull where they are.
    let third = push(&b, "c", &reg.reference("repo-c:t"));
    assert_eq!(num(&third, "blobs_uploaded"), 0, "{third}");
    assert_eq!(num(&third, "blobs_mounted"), blobs, "{third}");
    assert_eq!(third["manifest_digest"], first["manifest_digest"]);
    assert_eq!(reg.blob_digests(), before);
}

// ---------------------------------------------------------------------------------------------
// Failures: one line, nothing restored
// ---------------------------------------------------------------------------------------------

/// Changes a stored manifest so that it is still valid JSON the registry serves (the
/// registry parses a manifest before serving it) but no longer has its digest: the first
/// digit of its layer-bytes annotation changes.
fn tamper_manifest(reg: &Registry, digest: &str) {
    let path = reg.blob_path(digest);
    let mut data = fs::read(&path).unwrap();
    let key = b"\"io.cachefs.layer.bytes\":\"";
    let at = data
        .windows(key.len())
        .position(|w| w == key)
        .unwrap_or_else(|| panic!("no bytes annotation in {}", String::from_utf8_lossy(&data)))
        + key.len();
    data[at] = if data[at] == b'9' { b'8' } else { b'9' };
    fs::write(&path, data).unwrap();
}

/// Every blob in the store's objects is named by its blake3: a failed pull stored nothing
/// damaged. Returns how many there are.
#[track_caller]
fn assert_objects_valid(env: &CliEnv) -> usize {
    let mut n = 0;
    let Ok(prefixes) = fs::read_dir(env.store.join("objects/blobs")) else {
        return 0;
    };
    for prefix in prefixes {
        for blob in fs::read_dir(prefix.unwrap().path()).unwrap() {
            let p = blob.unwrap().path();
            let (hash, _) = hash_file(&p);
            assert_eq!(
                p.file_name().unwrap().to_string_lossy(),
                hash.to_hex().as_str(),
                "{} does not hold what its name says",
                p.display()
            );
            n += 1;
        }
    }
    n
}

/// Pulls `reference --into c` into a fresh store, twice (the second time with whatever the
/// first left in the store): each must fail with exit 1 in one line mentioning every one of
/// `mentions`, restore nothing, record nothing, and store nothing damaged.
#[track_caller]
fn assert_failed_pull(reference: &str, mentions: &[&str]) {
    let env = CliEnv::new();
    for _ in 0..2 {
        let out = cfs(&env, &["pull", reference, "--into", "c", "--tag", "x"]);
        assert_fails(&out, 1, mentions);
        assert_nothing_restored(&env, "c");
        assert_objects_valid(&env);
    }
}

/// [`assert_failed_pull`], the line naming `digest` as corrupt.
#[track_caller]
fn assert_corrupt_pull(reference: &str, digest: &str) {
    assert_failed_pull(reference, &["corrupt", digest, "nothing was restored"]);
}

#[test]
fn a_corrupt_blob_index_or_manifest_fails_the_pull_and_restores_nothing() {
    let reg = Registry::start();
    let a = CliEnv::new();
    let small = new_cache(&a, "small");
    build_many_dirs(&small, 3, 200_000, "corrupt");
    let small_ref = reg.reference("r:small");
    push(&a, "small", &small_ref);
    let big = new_cache(&a, "big");
    put_file(&big.join("big"), "corrupt-big", 65 * MIB, 0o644);
    let big_ref = reg.reference("r:big");
    let pushed_big = push(&a, "big", &big_ref);

    // A chunk of entries.
    let m = manifest(&reg, "r", "small");
    let chunks = manifest_layers(&m);
    assert_eq!(chunks.len(), 1, "{m}");
    assert_eq!(chunks[0].0, FILES_MEDIA_TYPE);
    reg.tamper_blob(&chunks[0].1);
    assert_corrupt_pull(&small_ref, &chunks[0].1);

    // The second part of a big file.
    let parts = manifest_layers(&manifest(&reg, "r", "big"));
    assert_eq!(parts.len(), 2, "{parts:?}");
    assert!(parts.iter().all(|(t, _)| t == PART_MEDIA_TYPE), "{parts:?}");
    reg.tamper_blob(&parts[1].1);
    assert_corrupt_pull(&big_ref, &parts[1].1);

    // The index (the config blob).
    let index = text(&m["config"], "digest").to_owned();
    reg.tamper_blob(&index);
    assert_corrupt_pull(&small_ref, &index);

    // The manifest, by tag or by digest. (The line does not say "corrupt": see
    // a_corrupt_manifest_is_called_corrupt.)
    let digest = text(&pushed_big, "manifest_digest");
    tamper_manifest(&reg, digest);
    assert_failed_pull(&big_ref, &[digest]);
    assert_failed_pull(&reg.reference(&format!("r@{digest}")), &[digest]);
}

#[test]
fn a_corrupt_manifest_is_called_corrupt() {
    let reg = Registry::start();
    let a = CliEnv::new();
    small_cache(&a, "c");
    let reference = reg.reference("r:t");
    let pushed = push(&a, "c", &reference);
    let digest = text(&pushed, "manifest_digest");
    tamper_manifest(&reg, digest);
    assert_corrupt_pull(&reference, digest);
    assert_corrupt_pull(&reg.reference(&format!("r@{digest}")), digest);
}

#[test]
fn an_unreachable_registry_fails_fast_in_one_line() {
    let env = CliEnv::new();
    small_cache(&env, "c");
    let host = format!("127.0.0.1:{}", free_port());
    let reference = format!("{host}/r:t");
    for args in [
        vec!["push", "c", reference.as_str()],
        vec!["pull", reference.as_str(), "--into", "d"],
    ] {
        let started = Instant::now();
        let out = cfs(&env, &args);
        let took = started.elapsed();
        assert_fails(&out, 1, &["cannot reach registry", &host]);
        assert!(took < Duration::from_secs(10), "{args:?} took {took:?}");
    }
    assert!(try_instance_dir(&env, "d").is_none());
    assert!(layers(&env).len() <= 1, "at most the snapshot push took");
}

#[test]
fn an_unknown_tag_or_repository_does_not_exist() {
    let reg = Registry::start();
    let env = CliEnv::new();
    small_cache(&env, "c");
    push(&env, "c", &reg.reference("r:t"));
    let zeros = format!("r@sha256:{}", "0".repeat(64));
    for r in ["r:nope", "nope/nope:t", zeros.as_str()] {
        let reference = reg.reference(r);
        let out = cfs(&env, &["pull", &reference, "--into", "d"]);
        assert_fails(&out, 1, &["does not exist", &reference]);
    }
    assert!(try_instance_dir(&env, "d").is_none());
}

#[test]
fn credentials_come_from_the_environment_or_docker_config() {
    let reg = Registry::start_with_htpasswd();
    let a = CliEnv::new();
    let src = small_cache(&a, "c");
    let reference = reg.reference("private/c:t");
    let good = [
        ("CACHEFS_REGISTRY_USER", Registry::USER),
        ("CACHEFS_REGISTRY_PASSWORD", Registry::PASSWORD),
    ];
    let wrong = [
        ("CACHEFS_REGISTRY_USER", Registry::USER),
        ("CACHEFS_REGISTRY_PASSWORD", "not-the-password"),
    ];

    // Push: anonymous and a wrong password are refused; nothing lands.
    let push_args = ["push", "c", reference.as_str()];
    assert_fails(
        &cfs(&a, &push_args),
        1,
        &["refused access", "CACHEFS_REGISTRY_USER"],
    );
    assert_fails(&cfs_with(&a, &push_args, &wrong), 1, &["refused access"]);
    assert_eq!(reg.blob_count(), 0);
    let pushed = push_with(&a, "c", &reference, &good);

    // Pull: the same.
    let b = CliEnv::new();
    let pull_args = ["pull", reference.as_str(), "--into", "c"];
    assert_fails(&cfs(&b, &pull_args), 1, &["refused access"]);
    assert_fails(&cfs_with(&b, &pull_args, &wrong), 1, &["refused access"]);
    assert_nothing_restored(&b, "c");
    let pulled = pull_with(&b, &reference, Some("c"), &good);
    assert_eq!(pulled["layer"], pushed["layer"]);
    assert_same_tree(&instance_dir(&b, "c"), &src);

    // From $DOCKER_CONFIG/config.json (auths), both ways.
    let c = CliEnv::new();
    write_docker_config(&c, &reg.host(), Registry::USER, Registry::PASSWORD);
    let pulled = pull(&c, &reference, Some("c"));
    assert_eq!(pulled["layer"], pushed["layer"]);
    assert_same_tree(&instance_dir(&c, "c"), &src);
    small_cache(&c, "mine");
    push(&c, "mine", &reg.reference("private/mine:t"));

    // A wrong password in config.json is refused like any other.
    let d = CliEnv::new();
    write_docker_config(&d, &reg.host(), Registry::USER, "nope");
    assert_fails(&cfs(&d, &pull_args), 1, &["refused access"]);
}

#[test]
fn an_artifact_that_is_not_a_cachefs_layer_is_refused() {
    let reg = Registry::start();
    let repo = "other/things";
    let layer_bytes = b"not a cachefs chunk".to_vec();
    let layer = reg.put_blob(repo, &layer_bytes);
    let empty = reg.put_blob(repo, b"{}");
    let image_config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config = reg.put_blob(repo, image_config);
    let put = |tag: &str, media_type: &str, body: Value| -> String {
        let bytes = serde_json::to_vec(&body).unwrap();
        reg.put_manifest(repo, tag, media_type, &bytes);
        sha256_digest(&bytes)
    };
    let layers_of =
        |media: &str| json!([{ "mediaType": media, "digest": layer, "size": layer_bytes.len() }]);

    put(
        "other-artifact",
        OCI_MANIFEST,
        json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": "application/vnd.example.other",
            "config": { "mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2 },
            "layers": layers_of("application/octet-stream"),
        }),
    );
    let image = put(
        "image",
        OCI_MANIFEST,
        json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config,
                "size": image_config.len(),
            },
            "layers": layers_of("application/vnd.oci.image.layer.v1.tar"),
        }),
    );
    // Our artifactType on something that is not our artifact.
    put(
        "impostor",
        OCI_MANIFEST,
        json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": ARTIFACT_TYPE,
            "config": { "mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2 },
            "layers": layers_of(FILES_MEDIA_TYPE),
        }),
    );
    let docker = "application/vnd.docker.distribution.manifest.v2+json";
    put(
        "docker-image",
        docker,
        json!({
            "schemaVersion": 2,
            "mediaType": docker,
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json",
                "digest": config,
                "size": image_config.len(),
            },
            "layers": layers_of("application/vnd.docker.image.rootfs.diff.tar.gzip"),
        }),
    );
    let index = "application/vnd.oci.image.index.v1+json";
    let image_size = manifest_size(&reg, repo, &image);
    put(
        "index",
        index,
        json!({
            "schemaVersion": 2,
            "mediaType": index,
            "manifests": [{ "mediaType": OCI_MANIFEST, "digest": image, "size": image_size }],
        }),
    );

    let env = CliEnv::new();
    for tag in [
        "other-artifact",
        "image",
        "impostor",
        "docker-image",
        "index",
    ] {
        let reference = reg.reference(&format!("{repo}:{tag}"));
        let out = cfs(&env, &["pull", &reference, "--into", "c"]);
        assert_fails(&out, 1, &["is not a cachefs layer", &reference]);
    }
    assert_nothing_restored(&env, "c");

    // A push may take over a tag that holds something else.
    let src = small_cache(&env, "mine");
    let reference = reg.reference(&format!("{repo}:image"));
    push(&env, "mine", &reference);
    let b = CliEnv::new();
    pull(&b, &reference, Some("mine"));
    assert_same_tree(&instance_dir(&b, "mine"), &src);
}

/// Size in bytes of a stored manifest.
fn manifest_size(reg: &Registry, repo: &str, digest: &str) -> usize {
    let (status, body) = reg.get(&format!("/v2/{repo}/manifests/{digest}"));
    assert_eq!(status, 200);
    body.len()
}

#[test]
fn pull_into_a_cache_with_contents_needs_replace() {
    let reg = Registry::start();
    let a = CliEnv::new();
    let src = small_cache(&a, "c");
    let reference = reg.reference("r:t");
    let pushed = push(&a, "c", &reference);

    let b = CliEnv::new();
    let mine = new_cache(&b, "c");
    put_file(&mine.join("mine"), "mine", 10, 0o644);
    let out = cfs(&b, &["pull", &reference, "--into", "c"]);
    assert_fails(&out, 2, &["--replace"]);
    // Refused before anything was downloaded.
    assert_eq!(layers(&b), Vec::<Value>::new());
    assert_eq!(assert_objects_valid(&b), 0);
    assert_eq!(
        scan(&instance_dir(&b, "c"))
            .keys()
            .cloned()
            .collect::<Vec<_>>(),
        vec![b"mine".to_vec()],
        "left as it was"
    );
    let pulled = json_of(
        &cfs(
            &b,
            &["pull", &reference, "--into", "c", "--replace", "--json"],
        ),
        "pull --replace",
    );
    assert_eq!(pulled["layer"], pushed["layer"]);
    assert_same_tree(&instance_dir(&b, "c"), &src);
}

#[test]
fn malformed_references_and_bad_arguments_are_usage_errors() {
    let env = CliEnv::new();
    small_cache(&env, "c");
    let t = env.path("t");
    for bad in [
        "http://127.0.0.1:5000/a:b",
        "a:b:c:d",
        "127.0.0.1:5000/r@sha256:abc",
        "",
    ] {
        assert_fails(&cfs(&env, &["push", "c", bad]), 2, &[]);
        assert_fails(&cfs(&env, &["pull", bad]), 2, &[]);
        for (extra, key) in [
            (vec!["--cache-from", bad], ""),
            (vec!["--cache-to", bad], ""),
            (vec![], "cache-from"),
            (vec![], "cache-to"),
        ] {
            let spec_extra = if key.is_empty() {
                String::new()
            } else {
                format!("{key}={bad}")
            };
            let out = run_sh(&env, &extra, &[spec("c", &t, &spec_extra)], "echo ran");
            assert_eq!(
                code(&out),
                2,
                "{bad:?} {extra:?} {key}: {}",
                stderr_of(&out)
            );
            assert_eq!(stdout_of(&out), "", "nothing ran");
            assert_eq!(stderr_of(&out).lines().count(), 1, "{}", stderr_of(&out));
        }
    }
    // Bad arguments around a good reference: exit 2 before anything moves.
    let good = format!("127.0.0.1:{}/r:t", free_port());
    for args in [
        vec!["push", "no-such-cache", good.as_str()],
        vec!["push", "--layer", "no-such-layer", good.as_str()],
        vec!["push", "c", "--layer", "x", good.as_str()],
        vec!["pull", good.as_str(), "--into", "c", "--instance", "0"],
        vec!["pull", good.as_str(), "--tag", "bad tag"],
    ] {
        assert_fails(&cfs(&env, &args), 2, &[]);
    }
    assert_eq!(layers(&env), Vec::<Value>::new(), "nothing was snapshotted");
}

// ---------------------------------------------------------------------------------------------
// run / mount: cache-from, cache-to, cache-to-when
// ---------------------------------------------------------------------------------------------

/// Lines of `out`'s stderr containing `needle`.
fn stderr_lines_with(out: &Output, needle: &str) -> Vec<String> {
    stderr_of(out)
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}

#[test]
fn run_seeds_from_and_pushes_to_a_registry() {
    let reg = Registry::start();
    let a = CliEnv::new();
    small_cache(&a, "seed");
    let seed_ref = reg.reference("caches/run:seed");
    push(&a, "seed", &seed_ref);
    let b = CliEnv::new();

    // An empty cache is seeded before the command.
    let t = b.path("x");
    let check = format!(
        "test -f '{0}/some/file' && test \"$(stat -c %a '{0}/top')\" = 600",
        t.display()
    );
    let out = run_sh(
        &b,
        &["--cache-from", &seed_ref],
        &[spec("x", &t, "")],
        &check,
    );
    ok(&out, "seeded run");
    // A cache with contents is left alone.
    let out = run_sh(
        &b,
        &["--cache-from", &seed_ref],
        &[spec("x", &t, "")],
        &format!("rm '{0}/top' && ls '{0}'", t.display()),
    );
    assert_eq!(ok(&out, "rm"), "some\n");
    let out = run_sh(
        &b,
        &["--cache-from", &seed_ref],
        &[spec("x", &t, "")],
        &format!("ls '{}'", t.display()),
    );
    assert_eq!(ok(&out, "not seeded again"), "some\n");

    // A missing reference or an unreachable registry: a warning, the cache starts empty, and
    // the exit code is the command's.
    let nowhere = format!("127.0.0.1:{}/caches/run:seed", free_port());
    for (i, from) in [reg.reference("caches/run:missing"), nowhere]
        .iter()
        .enumerate()
    {
        let t = b.path(&format!("y{i}"));
        let out = run_sh(
            &b,
            &["--cache-from", from],
            &[spec(&format!("y{i}"), &t, "")],
            &format!("test -z \"$(ls -A '{}')\" && exit 3", t.display()),
        );
        assert_eq!(code(&out), 3, "{}", stderr_of(&out));
        let warned = stderr_lines_with(&out, "starts empty");
        assert_eq!(warned.len(), 1, "{}", stderr_of(&out));
        assert!(warned[0].starts_with("cachefs: warning: "), "{warned:?}");
    }

    // cache-to after a command that succeeded.
    let t = b.path("w");
    let out_ref = reg.reference("caches/run:out");
    let out = run_sh(
        &b,
        &["--cache-to", &out_ref],
        &[spec("w", &t, "")],
        &format!("echo made > '{}/made'", t.display()),
    );
    ok(&out, "cache-to run");
    let c = CliEnv::new();
    pull(&c, &out_ref, Some("w"));
    assert_eq!(
        fs::read_to_string(instance_dir(&c, "w").join("made")).unwrap(),
        "made\n"
    );

    // Not after a command that failed.
    let never = reg.reference("caches/run:never");
    let out = run_sh(
        &b,
        &["--cache-to", &never],
        &[spec("w", &t, "")],
        &format!("echo more > '{}/more'; false", t.display()),
    );
    assert_eq!(code(&out), 1, "{}", stderr_of(&out));
    assert_eq!(reg.get("/v2/caches/run/manifests/never").0, 404);

    // changed: the cache differs from what out_ref holds (the failed run wrote `more`), so it
    // is pushed; a second no-op run is not.
    let changed = ["--cache-to", out_ref.as_str(), "--cache-to-when", "changed"];
    let before = manifest(&reg, "caches/run", "out");
    let out = run_sh(&b, &changed, &[spec("w", &t, "")], "true");
    ok(&out, "changed run");
    assert!(
        stderr_lines_with(&out, "not pushed").is_empty(),
        "{}",
        stderr_of(&out)
    );
    let after = manifest(&reg, "caches/run", "out");
    assert_ne!(before, after, "pushed");
    let blobs = reg.blob_digests();
    let out = run_sh(&b, &changed, &[spec("w", &t, "")], "true");
    ok(&out, "unchanged run");
    assert_eq!(
        stderr_lines_with(&out, "is unchanged").len(),
        1,
        "{}",
        stderr_of(&out)
    );
    assert_eq!(stderr_lines_with(&out, "not pushed").len(), 1);
    assert_eq!(reg.blob_digests(), blobs);
    assert_eq!(manifest(&reg, "caches/run", "out"), after);

    // The spec-key form.
    let t = b.path("s");
    let spec_ref = reg.reference("caches/run:spec");
    let keys = format!("cache-from={seed_ref},cache-to={spec_ref},cache-to-when=changed");
    let out = run_sh(
        &b,
        &[],
        &[spec("s", &t, &keys)],
        &format!(
            "test -f '{0}/some/file' && echo more > '{0}/more'",
            t.display()
        ),
    );
    ok(&out, "spec keys");
    let d = CliEnv::new();
    pull(&d, &spec_ref, Some("s"));
    let got = scan(&instance_dir(&d, "s"));
    let names: Vec<&[u8]> = got.keys().map(|k| k.as_slice()).collect();
    assert_eq!(names, [&b"more"[..], b"some", b"some/file", b"top"]);

    // The flags with several mounts are a usage error; nothing runs.
    let out = run_sh(
        &b,
        &["--cache-to", &out_ref],
        &[spec("w", &t, ""), spec("x", &b.path("x2"), "")],
        "echo ran",
    );
    assert_eq!(code(&out), 2, "{}", stderr_of(&out));
    assert_eq!(stdout_of(&out), "");
    assert_eq!(stderr_of(&out).lines().count(), 1, "{}", stderr_of(&out));
}

/// `cachefs mount --id m [EXTRA...] TARGET` in `env` (background server logging to
/// `m.log`); returns the target.
#[track_caller]
fn mount_m(env: &CliEnv, extra: &[&str]) -> PathBuf {
    let target = env.path("m");
    fs::create_dir_all(&target).unwrap();
    let log = env.path("m.log");
    let mut args = vec!["mount", "--id", "m", "--log-file", log.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.push(target.to_str().unwrap());
    ok(&cfs(env, &args), "mount");
    target
}

/// `cachefs umount TARGET`; returns what the server logged.
#[track_caller]
fn umount_m(env: &CliEnv, target: &Path) -> String {
    ok(&cfs(env, &["umount", target.to_str().unwrap()]), "umount");
    fs::read_to_string(env.path("m.log")).unwrap_or_default()
}

#[test]
fn mount_seeds_from_a_registry() {
    let reg = Registry::start();
    let a = CliEnv::new();
    small_cache(&a, "seed");
    let seed_ref = reg.reference("caches/mount:seed");
    push(&a, "seed", &seed_ref);

    let b = CliEnv::new();
    let target = mount_m(&b, &["--cache-from", &seed_ref]);
    let seeded = fs::read(target.join("some/file"));
    umount_m(&b, &target);
    assert_eq!(seeded.unwrap(), content("seed-file", 1000));
    // A missing reference: a warning, the cache is mounted empty.
    let c = CliEnv::new();
    let missing = reg.reference("caches/mount:missing");
    let target = c.path("m");
    fs::create_dir_all(&target).unwrap();
    let out = cfs(
        &c,
        &[
            "mount",
            "--id",
            "m",
            "--cache-from",
            &missing,
            target.to_str().unwrap(),
        ],
    );
    ok(&out, "mount");
    let names = fs::read_dir(&target).map(|rd| rd.count());
    umount_m(&c, &target);
    assert_eq!(names.unwrap(), 0);
    assert_eq!(
        stderr_lines_with(&out, "starts empty").len(),
        1,
        "{}",
        stderr_of(&out)
    );
}

#[test]
fn mount_pushes_when_unmounted() {
    let reg = Registry::start();
    let b = CliEnv::new();
    let to = reg.reference("caches/mount:out");
    let target = mount_m(&b, &["--cache-to", &to]);
    fs::write(target.join("added"), b"added\n").unwrap();
    let log = umount_m(&b, &target);
    // umount waited for the push.
    let (status, _) = reg.get("/v2/caches/mount/manifests/out");
    assert_eq!(status, 200, "not pushed; the server logged: {log}");

    let c = CliEnv::new();
    pull(&c, &to, Some("m"));
    let dir = instance_dir(&c, "m");
    assert_eq!(fs::read_to_string(dir.join("added")).unwrap(), "added\n");
}
