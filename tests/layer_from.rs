//! `from=LAYER` in a mount spec (and `cachefs mount --from`): an empty cache is seeded from
//! the layer before the command runs; a cache with contents is left alone; a layer that is
//! not in the store is a warning; every sharing mode.

mod common;

use std::fs;

use common::{CliEnv, ok, spec};

/// A store with a layer tagged `seed` holding `a/x` ("seeded\n") and `y` (mode 0600).
fn env_with_layer() -> CliEnv {
    let env = CliEnv::new();
    let t = env.path("src");
    fs::create_dir_all(&t).unwrap();
    ok(
        &env.run_sh(
            &[spec("src", &t, "")],
            &format!(
                "mkdir -p '{0}/a' && echo seeded > '{0}/a/x' && echo y > '{0}/y' && chmod 600 '{0}/y'",
                t.display()
            ),
        ),
        "fill",
    );
    ok(
        &env.cachefs(&["snapshot", "src", "--tag", "seed", "-q"]),
        "snapshot",
    );
    env
}

#[test]
fn an_empty_cache_is_seeded_in_every_sharing_mode() {
    let env = env_with_layer();
    for sharing in ["shared", "locked", "private"] {
        let id = format!("c-{sharing}");
        let t = env.path(&id);
        fs::create_dir_all(&t).unwrap();
        let out = env.run_sh(
            &[spec(&id, &t, &format!("sharing={sharing},from=seed"))],
            &format!("cat '{0}/a/x' && stat -c %a '{0}/y'", t.display()),
        );
        assert_eq!(ok(&out, sharing), "seeded\n600\n", "{sharing}");
        // The seeded cache snapshots to the layer itself.
        let d = ok(&env.cachefs(&["snapshot", &id, "-q"]), "snapshot");
        let seed = ok(&env.cachefs(&["snapshot", "src", "-q"]), "snapshot src");
        assert_eq!(d, seed, "{sharing}");
    }
}

#[test]
fn a_cache_with_contents_is_left_alone() {
    let env = env_with_layer();
    let t = env.path("c");
    fs::create_dir_all(&t).unwrap();
    ok(
        &env.run_sh(
            &[spec("c", &t, "")],
            &format!("echo mine > '{}/mine'", t.display()),
        ),
        "fill",
    );
    let out = env.run_sh(
        &[spec("c", &t, "from=seed")],
        &format!("ls '{}'", t.display()),
    );
    assert_eq!(ok(&out, "run"), "mine\n", "from= seeds only empty caches");
}

#[test]
fn a_missing_layer_is_a_warning_and_the_cache_starts_empty() {
    let env = env_with_layer();
    let t = env.path("c");
    fs::create_dir_all(&t).unwrap();
    let out = env.run_sh(
        &[spec("c", &t, "from=no-such-tag")],
        &format!("ls -A '{}' | wc -l", t.display()),
    );
    assert_eq!(ok(&out, "run").trim(), "0");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning") && err.contains("no-such-tag"),
        "one warning line naming the layer: {err}"
    );
    // A malformed reference is a spec error (exit 2), and nothing runs.
    let out = env.run_sh(&[spec("c", &t, "from=../x")], "echo ran");
    assert_eq!(out.status.code(), Some(2));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("ran"));
}

#[test]
fn a_corrupt_layer_fails_the_run_before_the_command() {
    let env = env_with_layer();
    let blob = blake3::hash(b"seeded\n").to_hex().to_string();
    let p = env.store.join("objects/blobs").join(&blob[..2]).join(&blob);
    let mut perms = fs::metadata(&p).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o644);
    fs::set_permissions(&p, perms).unwrap();
    fs::write(&p, b"tampered\n").unwrap();
    let t = env.path("c");
    fs::create_dir_all(&t).unwrap();
    let out = env.run_sh(&[spec("c", &t, "from=seed")], "echo ran");
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("ran"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&blob) && err.lines().count() == 1, "{err}");
}

#[test]
fn cachefs_mount_from_seeds_too() {
    let env = env_with_layer();
    let t = env.path("m");
    fs::create_dir_all(&t).unwrap();
    let t_s = t.to_string_lossy().into_owned();
    ok(
        &env.cachefs(&["mount", "--id", "m", "--from", "seed", &t_s]),
        "mount",
    );
    let x = fs::read_to_string(t.join("a/x"));
    ok(&env.cachefs(&["umount", &t_s]), "umount");
    assert_eq!(x.unwrap(), "seeded\n");
}
