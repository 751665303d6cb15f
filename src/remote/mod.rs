//! Layers in OCI registries: push (upload what the registry lacks) and pull (download what
//! the object store lacks, verify, restore).
//!
//! - [`plan`]: how a layer is cut into chunks, and the tree index (the config blob).
//! - [`chunk`]: building a chunk (tar+zstd of whole entries, or zstd of a part of a big file)
//!   and taking one apart into verified blobs.
//! - [`push`] / [`pull`]: the transfers, over [`oci_client`] (async; run on a small tokio
//!   runtime of their own).
//!
//! The artifact: an OCI 1.1 image manifest with `artifactType` [`ARTIFACT_TYPE`], its config
//! the zstd of the tree index, its layers the chunks (docs/LAYER-FORMAT.md).

pub mod artifact;
pub mod chunk;
pub mod plan;
pub mod pull;
pub mod push;

use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use crate::layer::LayerError;
use crate::store::StoreError;

/// The manifest's `artifactType`.
pub const ARTIFACT_TYPE: &str = "application/vnd.cachefs.layer.v1";
/// The config blob: the zstd of the tree index ([`plan::Plan::encode_index`]).
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.cachefs.index.v1+zstd";
/// A chunk of whole files: a tar (the export's rules, no directories), zstd.
pub const FILES_MEDIA_TYPE: &str = "application/vnd.cachefs.chunk.v1.tar+zstd";
/// A chunk of a part of one big file: its bytes, zstd.
pub const PART_MEDIA_TYPE: &str = "application/vnd.cachefs.part.v1+zstd";
/// The OCI image manifest media type.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// Annotation: the layer's blake3 Merkle root (`blake3:<hex>`), on the manifest.
pub const ANN_ROOT: &str = "io.cachefs.layer.root";
/// Annotation: totals of the layer (files, bytes), on the manifest.
pub const ANN_FILES: &str = "io.cachefs.layer.files";
pub const ANN_BYTES: &str = "io.cachefs.layer.bytes";
/// Annotation on a chunk: the directory its files share (or the file it is a part of).
pub const ANN_PATH: &str = "io.cachefs.chunk.path";
/// Annotation on a chunk: `blake3:<hex>` of its record in the index (the paths and blake3
/// hashes of the files it carries: the hash of its subtree's contents).
pub const ANN_DIGEST: &str = "io.cachefs.chunk.digest";
/// Annotation on a part: `blake3:<hex>` of the whole file.
pub const ANN_BLOB: &str = "io.cachefs.chunk.blob";
/// Annotation on a part: `<offset>+<length>` of the file.
pub const ANN_RANGE: &str = "io.cachefs.chunk.range";

/// The zstd level of chunks. Part of a chunk's key: another level makes other bytes.
pub const CHUNK_ZSTD_LEVEL: i32 = 3;
/// How many blobs move at once.
pub const CONCURRENCY: usize = 3;
/// Attempts at one request before giving up on a transient error.
pub const ATTEMPTS: u32 = 5;
/// The largest config blob (tree index) accepted, compressed.
pub const MAX_INDEX_BYTES: u64 = 1 << 30;
/// The largest manifest accepted.
pub const MAX_MANIFEST_BYTES: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot reach registry {registry}: {detail}")]
    Unreachable { registry: String, detail: String },
    #[error(
        "registry {registry} refused access to {repository} ({detail}): set CACHEFS_REGISTRY_USER and CACHEFS_REGISTRY_PASSWORD, or log in with docker login"
    )]
    Denied {
        registry: String,
        repository: String,
        detail: String,
    },
    #[error("{reference} does not exist in the registry ({detail})")]
    NotFound { reference: String, detail: String },
    #[error("{reference} is not a cachefs layer: {detail}")]
    Foreign { reference: String, detail: String },
    #[error("the manifest of {reference} is corrupt: {detail}; nothing was restored")]
    CorruptManifest { reference: String, detail: String },
    #[error("blob {digest} of {reference} is corrupt: {detail}; nothing was restored")]
    Corrupt {
        reference: String,
        digest: String,
        detail: String,
    },
    #[error("registry {registry}: {detail}")]
    Registry { registry: String, detail: String },
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("interrupted")]
    Interrupted,
}

impl From<std::io::Error> for RemoteError {
    fn from(e: std::io::Error) -> RemoteError {
        RemoteError::Registry {
            registry: String::new(),
            detail: e.to_string(),
        }
    }
}

/// A parsed reference and how to talk to its registry.
pub struct Target {
    pub reference: Reference,
    /// As the user wrote it (for messages).
    pub shown: String,
    pub client: Client,
    pub auth: RegistryAuth,
    pub insecure: bool,
}

/// Options shared by push and pull.
#[derive(Debug, Clone, Default)]
pub struct Connect {
    /// Plain http (implied for 127.0.0.1, ::1 and localhost).
    pub insecure: bool,
}

/// Whether a registry host is this machine (plain http is then implied).
pub fn is_loopback(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        registry.split(':').next().unwrap_or("")
    };
    matches!(host, "127.0.0.1" | "localhost" | "::1")
}

/// Parses a registry reference (`host[:port]/repository[:tag|@sha256:…]`).
pub fn parse_reference(reference: &str) -> Result<Reference, RemoteError> {
    if reference.contains("://") {
        return Err(RemoteError::Usage(format!(
            "invalid registry reference {reference:?}: write it without a scheme (host[:port]/repository[:tag]); use --insecure for plain http"
        )));
    }
    let parsed: Reference = reference.parse().map_err(|e| {
        RemoteError::Usage(format!("invalid registry reference {reference:?}: {e}"))
    })?;
    // The distribution spec's repository names are lowercase; a registry would refuse it later,
    // after a DNS lookup of docker.io for a first component taken as a path.
    if parsed.repository().bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(RemoteError::Usage(format!(
            "invalid registry reference {reference:?}: repository names are lowercase"
        )));
    }
    Ok(parsed)
}

impl Target {
    pub fn new(reference: &str, connect: &Connect) -> Result<Target, RemoteError> {
        let parsed = parse_reference(reference)?;
        let registry = parsed.resolve_registry().to_string();
        let insecure = connect.insecure || is_loopback(&registry);
        let config = oci_client::client::ClientConfig {
            protocol: if insecure {
                oci_client::client::ClientProtocol::Http
            } else {
                oci_client::client::ClientProtocol::Https
            },
            use_monolithic_push: true,
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(120)),
            max_concurrent_upload: CONCURRENCY,
            max_concurrent_download: CONCURRENCY,
            platform_resolver: None,
            user_agent: concat!("cachefs/", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        };
        let auth = credentials(&registry);
        Ok(Target {
            reference: parsed,
            shown: reference.to_string(),
            client: Client::new(config),
            auth,
            insecure,
        })
    }

    pub fn registry(&self) -> &str {
        self.reference.resolve_registry()
    }

    pub fn repository(&self) -> &str {
        self.reference.repository()
    }

    /// Turns a client error into one line about this reference.
    pub fn error(&self, e: OciDistributionError) -> RemoteError {
        classify(self, e)
    }
}

/// Credentials for `registry`: CACHEFS_REGISTRY_USER / CACHEFS_REGISTRY_PASSWORD, else
/// ~/.docker/config.json (or $DOCKER_CONFIG): its auths and credential helpers; else none.
pub fn credentials(registry: &str) -> RegistryAuth {
    if let (Ok(user), Ok(pass)) = (
        std::env::var("CACHEFS_REGISTRY_USER"),
        std::env::var("CACHEFS_REGISTRY_PASSWORD"),
    ) {
        return RegistryAuth::Basic(user, pass);
    }
    let mut keys = vec![registry.to_string(), format!("https://{registry}")];
    if registry == "index.docker.io" || registry == "docker.io" {
        keys.push("https://index.docker.io/v1/".into());
    }
    for key in &keys {
        match docker_credential::get_credential(key) {
            Ok(docker_credential::DockerCredential::UsernamePassword(u, p)) => {
                return RegistryAuth::Basic(u, p);
            }
            Ok(docker_credential::DockerCredential::IdentityToken(t)) => {
                return RegistryAuth::Bearer(t);
            }
            Err(docker_credential::CredentialRetrievalError::HelperFailure {
                helper,
                stderr,
                ..
            }) => {
                tracing::warn!(
                    helper,
                    stderr = stderr.trim(),
                    "the docker credential helper failed; trying without credentials"
                );
                break;
            }
            Err(_) => {}
        }
    }
    RegistryAuth::Anonymous
}

fn classify(t: &Target, e: OciDistributionError) -> RemoteError {
    let registry = t.registry().to_string();
    let denied = |detail: String| RemoteError::Denied {
        registry: registry.clone(),
        repository: t.repository().to_string(),
        detail,
    };
    match e {
        OciDistributionError::RequestError(r) => {
            if let Some(s) = r.status() {
                if s.as_u16() == 401 || s.as_u16() == 403 {
                    return denied(format!("HTTP {}", s.as_u16()));
                }
                return RemoteError::Registry {
                    registry,
                    detail: format!("HTTP {s}"),
                };
            }
            RemoteError::Unreachable {
                registry,
                detail: innermost(&r),
            }
        }
        OciDistributionError::UnauthorizedError { .. } => denied("HTTP 401".into()),
        OciDistributionError::AuthenticationFailure(m) => denied(auth_detail(&m)),
        OciDistributionError::RegistryError { envelope, .. } => {
            let code = envelope.errors.first().map(|e| &e.code);
            let msg = envelope
                .errors
                .first()
                .map(|e| e.message.clone())
                .unwrap_or_default();
            match code {
                Some(OciErrorCode::Unauthorized | OciErrorCode::Denied) => denied(msg),
                Some(
                    OciErrorCode::ManifestUnknown
                    | OciErrorCode::NameUnknown
                    | OciErrorCode::NotFound,
                ) => RemoteError::NotFound {
                    reference: t.shown.clone(),
                    detail: if msg.is_empty() {
                        "unknown".into()
                    } else {
                        msg
                    },
                },
                _ => RemoteError::Registry {
                    registry,
                    detail: first_line(&msg),
                },
            }
        }
        OciDistributionError::ImageManifestNotFoundError(m) => RemoteError::NotFound {
            reference: t.shown.clone(),
            detail: first_line(&m),
        },
        OciDistributionError::ServerError { code, message, .. } => {
            if code == 401 || code == 403 {
                denied(format!("HTTP {code}"))
            } else if code == 404 {
                RemoteError::NotFound {
                    reference: t.shown.clone(),
                    detail: "HTTP 404".into(),
                }
            } else {
                RemoteError::Registry {
                    registry,
                    detail: format!("HTTP {code}: {}", first_line(&message)),
                }
            }
        }
        // Only manifests reach here with a digest error (blobs are checked where they are
        // fetched): the registry sent other bytes than the digest names.
        OciDistributionError::DigestError(d) => RemoteError::CorruptManifest {
            reference: t.shown.clone(),
            detail: first_line(&d.to_string()),
        },
        OciDistributionError::IoError(io) => RemoteError::Unreachable {
            registry,
            detail: io.to_string(),
        },
        other => RemoteError::Registry {
            registry,
            detail: first_line(&other.to_string()),
        },
    }
}

/// What a token server said, without its JSON: `{"errors":[{"message":"…"}]}` or
/// `{"details":"…"}` gives the message; an empty answer says so.
fn auth_detail(body: &str) -> String {
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(body) {
        let msg = v
            .pointer("/errors/0/message")
            .or_else(|| v.get("details"))
            .or_else(|| v.get("message"))
            .and_then(|m| m.as_str());
        if let Some(m) = msg {
            return first_line(m);
        }
    }
    match first_line(body) {
        s if s.is_empty() => "the token server refused the credentials".into(),
        s => s,
    }
}

fn first_line(s: &str) -> String {
    let s = s.lines().next().unwrap_or("").trim();
    match s.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// The innermost cause of an error chain: "connection refused", not "error sending request".
fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur: &(dyn std::error::Error + 'static) = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    let s = first_line(&cur.to_string());
    // The OS error's text is enough; drop its "(os error 111)".
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Whether an error is worth another attempt: the network failed or the registry was busy.
pub fn transient(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::RequestError(r) => {
            r.is_timeout()
                || r.is_connect() && r.status().is_none()
                || r.is_body()
                || r.status()
                    .is_some_and(|s| s.is_server_error() || s.as_u16() == 429)
        }
        OciDistributionError::ServerError { code, .. } => *code >= 500 || *code == 429,
        OciDistributionError::IoError(_) => true,
        _ => false,
    }
}

/// Runs `op` until it succeeds, fails for good, or [`ATTEMPTS`] tries failed transiently,
/// waiting 0.2 s, 0.4 s, 0.8 s, ... between tries. A refused connection is not retried: the
/// registry is not there, and waiting will not bring it.
pub async fn with_retries<T, F, Fut>(what: &str, mut op: F) -> Result<T, OciDistributionError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, OciDistributionError>>,
{
    let mut delay = Duration::from_millis(200);
    let mut attempt = 1;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if attempt < ATTEMPTS && transient(&e) && !refused(&e) => {
                tracing::warn!(what, attempt, error = %e, "retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

fn refused(e: &OciDistributionError) -> bool {
    if let OciDistributionError::RequestError(r) = e
        && r.is_connect()
    {
        let s = innermost(r);
        return s.contains("refused") || s.contains("dns error") || s.contains("resolve");
    }
    false
}

/// Runs `work` on every item, [`CONCURRENCY`] threads taking them in order, and hands each
/// result to `done`. The first error raises `stop` (the other threads finish the item in hand
/// and take no more: `work` should check `stop` too) and is returned; an interruption only
/// when nothing else failed.
pub(crate) fn for_each_parallel<W: Send, R>(
    items: Vec<W>,
    stop: &AtomicBool,
    work: impl Fn(W) -> Result<R, RemoteError> + Sync,
    done: impl Fn(R) + Sync,
) -> Result<(), RemoteError> {
    let queue = Mutex::new(items.into_iter());
    let first_error: Mutex<Option<RemoteError>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..CONCURRENCY {
            s.spawn(|| {
                loop {
                    let next = queue.lock().ok().and_then(|mut q| q.next());
                    let Some(w) = next else { break };
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    match work(w) {
                        Ok(r) => done(r),
                        Err(e) => {
                            stop.store(true, Ordering::Relaxed);
                            if let Ok(mut f) = first_error.lock()
                                && (f.is_none() || matches!(*f, Some(RemoteError::Interrupted)))
                            {
                                *f = Some(e);
                            }
                            break;
                        }
                    }
                }
            });
        }
    });
    match first_error.into_inner().ok().flatten() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// A small runtime for one transfer.
pub fn runtime() -> Result<tokio::runtime::Runtime, RemoteError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("cachefs-remote")
        .build()
        .map_err(|e| RemoteError::Registry {
            registry: String::new(),
            detail: format!("cannot start the network runtime: {e}"),
        })
}

/// `sha256:<hex>` of bytes.
pub fn sha256_digest(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    crate::layer::tarball::sha256_name(sha2::Sha256::new_with_prefix(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_server_answers_become_plain_words() {
        assert_eq!(
            auth_detail(
                r#"{"errors":[{"code":"UNAUTHORIZED","message":"invalid username or password"}]}"#
            ),
            "invalid username or password"
        );
        assert_eq!(auth_detail(r#"{"details":"no such user"}"#), "no such user");
        assert_eq!(auth_detail(""), "the token server refused the credentials");
        assert_eq!(auth_detail("denied\nmore"), "denied");
    }

    fn server_error(code: u16) -> OciDistributionError {
        OciDistributionError::ServerError {
            code,
            url: "http://r/v2/".into(),
            message: String::new(),
        }
    }

    #[test]
    fn transient_errors_are_retried_with_backoff_and_others_are_not() {
        let rt = runtime().unwrap();
        // 503, 429 and 502, then success: four attempts, waiting 0.2 + 0.4 + 0.8 s.
        let calls = std::sync::atomic::AtomicU32::new(0);
        let started = std::time::Instant::now();
        let r = rt.block_on(with_retries("test", || {
            let n = calls.fetch_add(1, Ordering::Relaxed);
            async move {
                match n {
                    0 => Err(server_error(503)),
                    1 => Err(server_error(429)),
                    2 => Err(server_error(502)),
                    _ => Ok(n),
                }
            }
        }));
        assert_eq!(r.unwrap(), 3);
        assert!(started.elapsed() >= Duration::from_millis(1400));
        // A 404 or 401 is final at once.
        for code in [404, 401] {
            let calls = std::sync::atomic::AtomicU32::new(0);
            let r: Result<(), _> = rt.block_on(with_retries("test", || {
                calls.fetch_add(1, Ordering::Relaxed);
                async { Err(server_error(code)) }
            }));
            assert!(r.is_err());
            assert_eq!(calls.load(Ordering::Relaxed), 1);
        }
        // A registry that stays down: ATTEMPTS tries, then the error.
        let calls = std::sync::atomic::AtomicU32::new(0);
        let r: Result<(), _> = rt.block_on(with_retries("test", || {
            calls.fetch_add(1, Ordering::Relaxed);
            async { Err(server_error(500)) }
        }));
        assert!(r.is_err());
        assert_eq!(calls.load(Ordering::Relaxed), ATTEMPTS);
    }

    #[test]
    fn loopback_hosts_imply_plain_http() {
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("localhost"));
        assert!(is_loopback("localhost:5000"));
        assert!(is_loopback("[::1]:5000"));
        assert!(!is_loopback("127.0.0.2:5000"));
        assert!(!is_loopback("ghcr.io"));
        assert!(!is_loopback("localhost.example.com"));
    }

    #[test]
    fn references_parse_or_fail_in_one_line() {
        let t = Target::new("127.0.0.1:5000/team/caches:apt", &Connect::default()).unwrap();
        assert_eq!(t.registry(), "127.0.0.1:5000");
        assert_eq!(t.repository(), "team/caches");
        assert!(t.insecure);
        let t = Target::new("ghcr.io/o/c:t", &Connect::default()).unwrap();
        assert!(!t.insecure);
        for bad in ["", "http://127.0.0.1:5000/a:b", "a:b:c:d", "UPPER/x:t"] {
            let e = Target::new(bad, &Connect::default())
                .err()
                .unwrap()
                .to_string();
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
