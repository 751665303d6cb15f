//! gc and layers: referenced objects stay, unreferenced ones go; --keep-layers per cache with
//! tags pinned; a dry run removes nothing; a busy object store is not swept.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use common::{CliEnv, ok, spec};
use serde_json::Value;

/// Every object file name (kind/hex) in the store.
fn objects(store: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for kind in ["blobs", "trees"] {
        let Ok(fans) = fs::read_dir(store.join("objects").join(kind)) else {
            continue;
        };
        for fan in fans.flatten() {
            for o in fs::read_dir(fan.path()).unwrap().flatten() {
                out.insert(format!("{kind}/{}", o.file_name().to_string_lossy()));
            }
        }
    }
    out
}

fn blob_name(contents: &[u8]) -> String {
    format!("blobs/{}", blake3::hash(contents).to_hex())
}

fn fill(env: &CliEnv, id: &str, script: &str) {
    let target = env.path(&format!("t-{id}"));
    fs::create_dir_all(&target).unwrap();
    let out = env.run_sh(
        &[spec(id, &target, "sharing=locked")],
        &format!("cd '{}' && {script}", target.display()),
    );
    ok(&out, "run");
}

fn snapshot(env: &CliEnv, id: &str, tag: Option<&str>) -> String {
    let mut args = vec!["snapshot", id, "--quiet"];
    if let Some(t) = tag {
        args.extend(["--tag", t]);
    }
    ok(&env.cachefs(&args), "snapshot").trim().to_string()
}

fn gc(env: &CliEnv, args: &[&str]) -> Value {
    let mut a = vec!["gc", "--json"];
    a.extend_from_slice(args);
    serde_json::from_str(&ok(&env.cachefs(&a), "gc")).unwrap()
}

#[test]
fn gc_keeps_referenced_objects_and_removes_unreferenced_ones() {
    let env = CliEnv::new();
    fill(&env, "c", "echo shared > s && echo one > only1");
    let l1 = snapshot(&env, "c", None);
    fill(&env, "c", "rm only1 && echo two > only2");
    let l2 = snapshot(&env, "c", None);
    let all = objects(&env.store);
    for b in [b"shared\n".as_slice(), b"one\n", b"two\n"] {
        assert!(all.contains(&blob_name(b)), "{all:?}");
    }

    // Nothing unreferenced yet: gc removes nothing.
    let r = gc(&env, &["--keep-layers", "10"]);
    assert_eq!(r["objects"]["objects_removed"], 0, "{r}");
    assert_eq!(objects(&env.store), all);

    // Forget layer 1: its own blob and tree go, the shared blob stays.
    ok(&env.cachefs(&["layers", "rm", &l1]), "layers rm");
    let dry = gc(&env, &["--keep-layers", "10", "--dry-run"]);
    assert!(
        dry["objects"]["objects_removed"].as_u64().unwrap() >= 2,
        "{dry}"
    );
    assert_eq!(objects(&env.store), all, "a dry run removes nothing");
    let r = gc(&env, &["--keep-layers", "10"]);
    assert_eq!(
        r["objects"]["objects_removed"],
        dry["objects"]["objects_removed"]
    );
    let left = objects(&env.store);
    assert!(!left.contains(&blob_name(b"one\n")), "{left:?}");
    assert!(left.contains(&blob_name(b"shared\n")));
    assert!(left.contains(&blob_name(b"two\n")));
    assert!(left.contains(&format!("trees/{l2}")));
    assert!(!left.contains(&format!("trees/{l1}")));

    // Layer 2 still restores whole.
    ok(
        &env.cachefs(&["restore", &l2, "--into", "again", "--quiet"]),
        "restore",
    );
    let out = env.run_sh(
        &[spec("again", &env.path("t-again"), "")],
        &format!(
            "cat '{}/s' '{}/only2'",
            env.path("t-again").display(),
            env.path("t-again").display()
        ),
    );
    assert_eq!(ok(&out, "cat"), "shared\ntwo\n");
}

#[test]
fn keep_layers_is_per_cache_and_tags_pin() {
    let env = CliEnv::new();
    let mut a = Vec::new();
    for i in 0..4 {
        fill(&env, "a", &format!("echo a{i} > f"));
        a.push(snapshot(
            &env,
            "a",
            if i == 0 { Some("pinned") } else { None },
        ));
    }
    let mut b = Vec::new();
    for i in 0..2 {
        fill(&env, "b", &format!("echo b{i} > f"));
        b.push(snapshot(&env, "b", None));
    }
    let r = gc(&env, &["--keep-layers", "1", "--filter", "id=a"]);
    let removed: BTreeSet<String> = r["layers_removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    // Cache a: the newest (a[3]) is kept, a[0] is tagged: a[1] and a[2] go. Cache b is
    // outside the filter.
    assert_eq!(removed, BTreeSet::from([a[1].clone(), a[2].clone()]), "{r}");
    let layers: Value =
        serde_json::from_str(&ok(&env.cachefs(&["layers", "--json"]), "layers")).unwrap();
    let listed: BTreeSet<String> = layers
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        listed,
        BTreeSet::from([a[0].clone(), a[3].clone(), b[0].clone(), b[1].clone()])
    );
    assert!(!objects(&env.store).contains(&blob_name(b"a1\n")));
    assert!(
        objects(&env.store).contains(&blob_name(b"a0\n")),
        "pinned by its tag"
    );

    // Without a filter, b keeps one too.
    let r = gc(&env, &["--keep-layers", "1"]);
    assert_eq!(
        r["layers_removed"],
        serde_json::json!([b[0].clone()]),
        "{r}"
    );
}

#[test]
fn a_busy_object_store_is_not_swept_and_a_damaged_layer_stops_the_sweep() {
    let env = CliEnv::new();
    fill(&env, "c", "echo x > f");
    let l1 = snapshot(&env, "c", None);
    ok(&env.cachefs(&["layers", "rm", &l1]), "layers rm");
    // Hold the object lock as a snapshot or restore would.
    let lock = fs::File::open(env.store.join("objects/lock")).unwrap();
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockShared).unwrap();
    let r = gc(&env, &["--keep-layers", "5"]);
    assert_eq!(r["objects"]["skipped_busy"], true, "{r}");
    assert!(objects(&env.store).contains(&blob_name(b"x\n")));
    drop(lock);

    // A layer whose tree is missing: nothing is swept, and the report names it.
    fill(&env, "c", "echo y > g");
    let l2 = snapshot(&env, "c", None);
    let tree = env.store.join("objects/trees").join(&l2[..2]).join(&l2);
    fs::remove_file(tree).unwrap();
    let r = gc(&env, &["--keep-layers", "5"]);
    assert_eq!(r["objects"]["damaged_layer"], l2.as_str(), "{r}");
    assert!(
        objects(&env.store).contains(&blob_name(b"x\n")),
        "nothing swept"
    );
    let human = ok(&env.cachefs(&["gc", "--keep-layers", "5"]), "gc");
    assert!(human.contains("is damaged"), "{human}");
}
