//! A real OCI registry for integration tests: CNCF distribution 2.8 (Debian's `docker-registry`)
//! serving a temporary directory on a free 127.0.0.1 port, stopped on drop.
//!
//! Besides starting and stopping it, [`Registry`] offers raw test helpers that bypass any client
//! under test: a tiny HTTP/1.1 client (push a blob or manifest, GET anything) and direct access
//! to the blob files on disk (list digests, corrupt one).

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use sha2::{Digest, Sha256};
use tempfile::TempDir;

/// The registry binary from Debian's `docker-registry` package.
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// User accepted by [`Registry::start_with_htpasswd`].
pub const USER: &str = "cachefs";
/// Password of [`USER`].
pub const PASSWORD: &str = "s3cret-pass";
/// `htpasswd -nbB cachefs s3cret-pass`, embedded because CI has no apache2-utils.
const HTPASSWD_LINE: &str = "cachefs:$2y$05$WBTXUMmpnSe6FWxjXRdSAOnAaEY9IyL0sWUvtLlny2idi4fQT3PzC";

/// Header every response of one registry carries, with a per-instance value: proves that the
/// readiness probe reached our process, not another test's registry that grabbed the port.
const INSTANCE_HEADER: &str = "x-cachefs-test-instance";

/// Manifest media types [`Registry::get`] accepts.
pub const MANIFEST_TYPES: [&str; 4] = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

const READY_TIMEOUT: Duration = Duration::from_secs(10);
const READY_POLL: Duration = Duration::from_millis(20);
/// Per probe; a refused connection returns at once, a wedged one must not eat the deadline.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(30);
const START_ATTEMPTS: usize = 5;

/// A running registry process; stopped (SIGTERM, then SIGKILL) and its storage deleted on drop.
pub struct Registry {
    child: Child,
    port: u16,
    auth: bool,
    /// Holds config, log and storage. Declared last: removed after `Drop` stopped the process.
    dir: TempDir,
}

impl Registry {
    /// User accepted by [`Registry::start_with_htpasswd`].
    pub const USER: &'static str = USER;
    /// Password of [`Registry::USER`].
    pub const PASSWORD: &'static str = PASSWORD;

    /// Starts a registry that allows anonymous push and pull.
    pub fn start() -> Registry {
        Self::start_inner(false)
    }

    /// Starts a registry that requires basic auth as [`USER`] / [`PASSWORD`] (over plain http).
    pub fn start_with_htpasswd() -> Registry {
        Self::start_inner(true)
    }

    fn start_inner(auth: bool) -> Registry {
        if !Path::new(REGISTRY_BIN).exists() {
            panic!(
                "{REGISTRY_BIN} not found: the registry tests need CNCF distribution; \
                 install it with `apt-get install docker-registry`"
            );
        }
        // The port is free when picked but may be taken before the registry binds it (another
        // test doing the same); only that failure is worth a retry.
        for attempt in 1..=START_ATTEMPTS {
            match Self::try_start(auth) {
                Ok(reg) => return reg,
                Err(log) if log.contains("address already in use") && attempt < START_ATTEMPTS => {
                    continue;
                }
                Err(log) => panic!("docker-registry failed to start:\n{log}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Starts one registry; `Err(log)` if it exits or does not answer in time.
    fn try_start(auth: bool) -> Result<Registry, String> {
        static INSTANCES: AtomicU64 = AtomicU64::new(0);
        let instance = format!(
            "{}-{}",
            std::process::id(),
            INSTANCES.fetch_add(1, Ordering::Relaxed)
        );

        let dir = tempfile::Builder::new()
            .prefix("cachefs-registry-")
            .tempdir()
            .expect("create registry tempdir");
        let root = dir.path().join("data");
        fs::create_dir(&root).expect("create registry storage dir");
        let port = free_port();

        let mut config = format!(
            "version: 0.1\n\
             log:\n  level: error\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {root}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\n  headers:\n    {INSTANCE_HEADER}: [{instance:?}]\n",
            root = yaml_str(&root),
        );
        if auth {
            let htpasswd = dir.path().join("htpasswd");
            fs::write(&htpasswd, format!("{HTPASSWD_LINE}\n")).expect("write htpasswd");
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: cachefs-test\n    path: {}\n",
                yaml_str(&htpasswd)
            ));
        }
        let config_path = dir.path().join("config.yml");
        fs::write(&config_path, config).expect("write registry config");

        let log_path = dir.path().join("registry.log");
        let log = fs::File::create(&log_path).expect("create registry log");
        let mut cmd = Command::new(REGISTRY_BIN);
        cmd.arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup registry log"))
            .stderr(log);
        // REGISTRY_* variables override the config file; keep the test config authoritative.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("REGISTRY_") {
                cmd.env_remove(key);
            }
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {REGISTRY_BIN}: {e}"));
        // Owned from here on, so a panic below still stops the process.
        let mut reg = Registry {
            child,
            port,
            auth,
            dir,
        };

        let ready_status = if auth { 401 } else { 200 };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = reg.child.try_wait() {
                return Err(format!("exited with {status}; log:\n{}", reg.log()));
            }
            // Unauthenticated on purpose: with htpasswd, 401 proves auth is enforced.
            if let Ok(resp) = request(port, None, "GET", "/v2/", &[], &[], PROBE_TIMEOUT) {
                if resp.status == ready_status
                    && resp.header(INSTANCE_HEADER) == Some(instance.as_str())
                {
                    return Ok(reg);
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "no {ready_status} from GET /v2/ on port {port} within {READY_TIMEOUT:?}; log:\n{}",
                    reg.log()
                ));
            }
            thread::sleep(READY_POLL);
        }
    }

    /// `127.0.0.1:PORT`, as an image reference's registry part.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The port the registry listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT/<repo_and_tag>`, e.g. `reference("test/img:v1")`.
    pub fn reference(&self, repo_and_tag: &str) -> String {
        format!("{}/{repo_and_tag}", self.host())
    }

    /// The storage driver's `rootdirectory`.
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// What the registry logged so far (errors only).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("registry.log"))
            .unwrap_or_else(|e| format!("<cannot read registry log: {e}>"))
    }

    fn blobs_dir(&self) -> PathBuf {
        self.storage_dir().join("docker/registry/v2/blobs/sha256")
    }

    /// `sha256:<hex>` of every blob stored on disk (layers, configs and manifests alike).
    pub fn blob_digests(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        // Absent until the first push.
        let Ok(prefixes) = fs::read_dir(self.blobs_dir()) else {
            return out;
        };
        for prefix in prefixes {
            let prefix = prefix.expect("read blobs dir").path();
            for blob in fs::read_dir(&prefix).expect("read blob prefix dir") {
                let blob = blob.expect("read blob prefix dir").path();
                // An upload in progress has its directory before its data file.
                if blob.join("data").is_file() {
                    let hex = blob.file_name().unwrap().to_string_lossy();
                    out.insert(format!("sha256:{hex}"));
                }
            }
        }
        out
    }

    /// Number of blobs stored on disk.
    pub fn blob_count(&self) -> usize {
        self.blob_digests().len()
    }

    /// The data file of a stored blob (`sha256:<hex>`).
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .unwrap_or_else(|| panic!("not a sha256 digest: {digest:?}"));
        self.blobs_dir().join(&hex[..2]).join(hex).join("data")
    }

    /// Corrupts a stored blob in place: flips every bit of its middle byte, keeping its length.
    /// The registry serves files as they are, so clients get content that fails verification.
    pub fn tamper_blob(&self, digest: &str) {
        let path = self.blob_path(digest);
        let mut data =
            fs::read(&path).unwrap_or_else(|e| panic!("read blob {}: {e}", path.display()));
        assert!(!data.is_empty(), "cannot tamper with empty blob {digest}");
        let mid = data.len() / 2;
        data[mid] ^= 0xff;
        fs::write(&path, data).unwrap_or_else(|e| panic!("write blob {}: {e}", path.display()));
    }

    /// Uploads `data` to `repo` in one piece (POST, then PUT with the digest); returns its digest.
    pub fn put_blob(&self, repo: &str, data: &[u8]) -> String {
        let digest = sha256_digest(data);
        let resp = self.request("POST", &format!("/v2/{repo}/blobs/uploads/"), &[], &[]);
        assert_eq!(
            resp.status,
            202,
            "POST upload to {repo}: {}",
            resp.body_text()
        );
        let location = resp
            .header("location")
            .unwrap_or_else(|| panic!("upload POST without Location: {resp:?}"));
        let path = local_path(location);
        let sep = if path.contains('?') { '&' } else { '?' };
        let resp = self.request(
            "PUT",
            &format!("{path}{sep}digest={digest}"),
            &[("Content-Type", "application/octet-stream")],
            data,
        );
        assert_eq!(
            resp.status,
            201,
            "PUT blob {digest} to {repo}: {}",
            resp.body_text()
        );
        digest
    }

    /// Stores a manifest under `repo:tag`; panics unless the registry answers 201.
    pub fn put_manifest(&self, repo: &str, tag: &str, media_type: &str, body: &[u8]) {
        let resp = self.request(
            "PUT",
            &format!("/v2/{repo}/manifests/{tag}"),
            &[("Content-Type", media_type)],
            body,
        );
        assert_eq!(
            resp.status,
            201,
            "PUT manifest {repo}:{tag}: {}",
            resp.body_text()
        );
    }

    /// GETs `path` (e.g. `/v2/repo/tags/list`), with credentials if the registry needs them and
    /// an `Accept` of [`MANIFEST_TYPES`] (without one, distribution 404s OCI manifests).
    pub fn get(&self, path: &str) -> (u16, Vec<u8>) {
        self.get_with_headers(path, &[("Accept", &MANIFEST_TYPES.join(", "))])
    }

    /// GETs `path` with exactly these extra headers (plus credentials if needed).
    pub fn get_with_headers(&self, path: &str, headers: &[(&str, &str)]) -> (u16, Vec<u8>) {
        let resp = self.request("GET", path, headers, &[]);
        (resp.status, resp.body)
    }

    /// GETs `path` without credentials, even on a registry that requires them.
    pub fn get_anonymous(&self, path: &str) -> (u16, Vec<u8>) {
        let resp = request(self.port, None, "GET", path, &[], &[], IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        (resp.status, resp.body)
    }

    fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
        let auth = self.auth.then_some((USER, PASSWORD));
        request(self.port, auth, method, path, headers, body, IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\nregistry log:\n{}", self.log()))
    }

    /// Stops the registry now (dropping it does the same).
    pub fn stop(self) {}

    fn shutdown(&mut self) {
        // Only signal a pid we have not reaped yet, so it cannot belong to another process.
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A port on 127.0.0.1 that nothing listened on a moment ago (bind port 0, read it, close).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// `sha256:<hex>` of `data`, the OCI digest.
pub fn sha256_digest(data: &[u8]) -> String {
    let hash = Sha256::digest(data);
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for b in hash.iter() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// A path as a double-quoted YAML scalar (tempdirs are plain, but be safe).
fn yaml_str(path: &Path) -> String {
    format!("{:?}", path.to_str().expect("utf-8 tempdir path"))
}

/// The path-and-query of an upload `Location`, which distribution makes absolute.
fn local_path(location: &str) -> &str {
    match location.strip_prefix("http://") {
        Some(rest) => {
            let (host, _) = rest.split_once('/').unwrap_or((rest, ""));
            assert!(
                host.starts_with("127.0.0.1:"),
                "registry redirected to {location}, not 127.0.0.1"
            );
            &rest[host.len()..]
        }
        None => location,
    }
}

// ---------------------------------------------------------------------------------------------
// Minimal HTTP/1.1 client: one request per connection, `Connection: close`, body read to EOF.
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct Response {
    status: u16,
    /// Names lowercased.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn body_text(&self) -> String {
        format!(
            "status {}, body {}",
            self.status,
            String::from_utf8_lossy(&self.body)
        )
    }
}

fn request(
    port: u16,
    auth: Option<(&str, &str)>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Result<Response, String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| e.to_string())?;

    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
         User-Agent: cachefs-tests\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some((user, password)) = auth {
        let token = base64(format!("{user}:{password}").as_bytes());
        head.push_str(&format!("Authorization: Basic {token}\r\n"));
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(body))
        .map_err(|e| format!("send: {e}"))?;
    let _ = stream.shutdown(Shutdown::Write);

    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .map_err(|e| format!("receive: {e}"))?;
    parse_response(&raw, method == "HEAD")
}

fn parse_response(raw: &[u8], head_only: bool) -> Result<Response, String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("incomplete response: {:?}", String::from_utf8_lossy(raw)))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|e| format!("response head: {e}"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut resp = Response {
        status,
        headers,
        body: Vec::new(),
    };
    if head_only {
        return Ok(resp);
    }
    let rest = &raw[end + 4..];
    resp.body = if resp
        .header("transfer-encoding")
        .is_some_and(|te| te.eq_ignore_ascii_case("chunked"))
    {
        dechunk(rest)?
    } else if let Some(len) = resp.header("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| format!("bad Content-Length {len:?}"))?;
        rest.get(..len)
            .ok_or_else(|| format!("body truncated: {} of {len} bytes", rest.len()))?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(resp)
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("chunk size line without CRLF")?;
        let line = String::from_utf8_lossy(&rest[..eol]);
        let size = line.split(';').next().unwrap_or_default().trim();
        let size =
            usize::from_str_radix(size, 16).map_err(|_| format!("bad chunk size {line:?}"))?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok(body); // trailers, if any, are of no interest
        }
        let chunk = rest.get(..size).ok_or("truncated chunk")?;
        body.extend_from_slice(chunk);
        rest = rest.get(size + 2..).ok_or("chunk without trailing CRLF")?;
    }
}

/// Standard base64 with padding (RFC 4648), for the Basic auth header.
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | ((b as u32) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
