//! The registry harness itself (`common::registry`): start and readiness, raw push and pull,
//! blob bookkeeping on disk, tampering, htpasswd auth, and stopping.

mod common;

use std::io::ErrorKind;
use std::net::{TcpListener, TcpStream};

use common::registry::{self, PASSWORD, Registry, USER, sha256_digest};
use serde_json::{Value, json};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn json_of(body: &[u8]) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

/// An OCI image manifest referencing a config blob and one layer, as the registry requires
/// both to exist in the repository before it accepts the manifest.
fn image_manifest(config: (&str, usize), layer: (&str, usize)) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config.0,
            "size": config.1,
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer.0,
            "size": layer.1,
        }],
    }))
    .unwrap()
}

fn assert_refused(port: u16) {
    let err = TcpStream::connect(("127.0.0.1", port)).expect_err("registry port still open");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
}

#[test]
fn starts_and_answers_v2() {
    let reg = Registry::start();
    let (status, body) = reg.get("/v2/");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(json_of(&body), json!({}));

    assert_eq!(reg.host(), format!("127.0.0.1:{}", reg.port()));
    assert_eq!(
        reg.reference("a/b:c"),
        format!("127.0.0.1:{}/a/b:c", reg.port())
    );
    assert!(reg.storage_dir().is_dir());
    assert_eq!(reg.blob_count(), 0);
    assert_eq!(reg.get("/v2/nope/tags/list").0, 404);
}

#[test]
fn push_blobs_and_manifest() {
    let reg = Registry::start();
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    // Bigger than any socket buffer, so reading the body to EOF is exercised.
    let layer = common::content("registry-layer", 3 << 20);

    let config_digest = reg.put_blob("test/img", &config);
    let layer_digest = reg.put_blob("test/img", &layer);
    assert_eq!(config_digest, sha256_digest(&config));
    assert_eq!(layer_digest, sha256_digest(&layer));
    assert_eq!(reg.blob_count(), 2);

    let (status, body) = reg.get(&format!("/v2/test/img/blobs/{layer_digest}"));
    assert_eq!(status, 200);
    assert!(body == layer, "layer read back differs");

    // Pushing the same content again stores nothing new.
    assert_eq!(reg.put_blob("test/img", &config), config_digest);
    assert_eq!(reg.blob_count(), 2);

    let manifest = image_manifest((&config_digest, config.len()), (&layer_digest, layer.len()));
    reg.put_manifest("test/img", "v1", OCI_MANIFEST, &manifest);

    // Manifests are blobs on disk too.
    let manifest_digest = sha256_digest(&manifest);
    let want = [config_digest, layer_digest, manifest_digest.clone()]
        .into_iter()
        .collect();
    assert_eq!(reg.blob_digests(), want);
    assert_eq!(reg.blob_count(), 3);

    for reference in ["v1", manifest_digest.as_str()] {
        let (status, body) = reg.get(&format!("/v2/test/img/manifests/{reference}"));
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        assert_eq!(body, manifest, "manifest by {reference}");
    }
    // Distribution hides OCI manifests from clients that do not accept them.
    let (status, body) = reg.get_with_headers("/v2/test/img/manifests/v1", &[]);
    assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
    let (status, body) = reg.get("/v2/test/img/tags/list");
    assert_eq!(status, 200);
    assert_eq!(json_of(&body), json!({"name": "test/img", "tags": ["v1"]}));
}

#[test]
fn long_responses_are_read_whole() {
    // A tag list this long is sent without Content-Length (chunked), unlike the blobs above.
    let reg = Registry::start();
    let config = reg.put_blob("many/tags", b"{}");
    let layer = reg.put_blob("many/tags", b"layer");
    let manifest = image_manifest((&config, 2), (&layer, 5));
    let tags: Vec<String> = (0..48)
        .map(|i| format!("{i:03}-{}", "t".repeat(100)))
        .collect();
    for tag in &tags {
        reg.put_manifest("many/tags", tag, OCI_MANIFEST, &manifest);
    }
    let (status, body) = reg.get("/v2/many/tags/tags/list");
    assert_eq!(status, 200);
    assert!(body.len() > 4096, "only {} bytes", body.len());
    let mut listed = json_of(&body);
    // Listed in storage order, not sorted.
    listed["tags"]
        .as_array_mut()
        .unwrap()
        .sort_by(|a, b| a.as_str().cmp(&b.as_str()));
    assert_eq!(listed, json!({"name": "many/tags", "tags": tags}));
}

#[test]
fn tampered_blob_is_served_as_is() {
    let reg = Registry::start();
    let data = common::content("tamper", 10_000);
    let digest = reg.put_blob("test/tamper", &data);

    reg.tamper_blob(&digest);
    let (status, body) = reg.get(&format!("/v2/test/tamper/blobs/{digest}"));
    assert_eq!(status, 200);
    assert_eq!(body.len(), data.len());
    let differing: Vec<usize> = (0..data.len()).filter(|&i| body[i] != data[i]).collect();
    assert_eq!(differing, [data.len() / 2]);
    assert_ne!(sha256_digest(&body), digest);
    // Still listed under its original digest: the registry does not notice.
    assert!(reg.blob_digests().contains(&digest));
}

#[test]
fn htpasswd_requires_credentials() {
    let reg = Registry::start_with_htpasswd();
    assert_eq!((Registry::USER, Registry::PASSWORD), (USER, PASSWORD));

    let (status, body) = reg.get_anonymous("/v2/");
    assert_eq!(status, 401, "{}", String::from_utf8_lossy(&body));
    let (status, body) = reg.get("/v2/");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));

    let digest = reg.put_blob("test/auth", b"secret layer");
    let path = format!("/v2/test/auth/blobs/{digest}");
    assert_eq!(reg.get_anonymous(&path).0, 401);
    assert_eq!(reg.get(&path), (200, b"secret layer".to_vec()));
}

#[test]
fn drop_and_stop_close_the_port() {
    let reg = Registry::start();
    let (port, dir) = (reg.port(), reg.storage_dir());
    drop(reg);
    assert_refused(port);
    assert!(!dir.exists(), "storage dir left behind");

    let reg = Registry::start_with_htpasswd();
    let port = reg.port();
    reg.stop();
    assert_refused(port);
}

#[test]
fn free_port_is_bindable() {
    let port = registry::free_port();
    assert_ne!(port, 0);
    TcpListener::bind(("127.0.0.1", port)).expect("bind the free port");
}

#[test]
fn base64_matches_rfc4648() {
    for (input, want) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ] {
        assert_eq!(registry::base64(input.as_bytes()), want, "{input:?}");
    }
}
