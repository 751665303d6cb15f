//! `cachefs push` / `cachefs pull` against a registry that uses the Docker/OCI bearer-token
//! flow, through the real binary:
//!
//! - with the right credentials (from CACHEFS_REGISTRY_USER / CACHEFS_REGISTRY_PASSWORD, or
//!   from $DOCKER_CONFIG/config.json) a push and a pull into an empty store succeed and the
//!   tree comes back; the token endpoint was asked, with Basic credentials, for a pull-and-push
//!   scope by the push and a pull scope by the pull;
//! - with a wrong password, or none, both fail in one line ("refused access") and nothing lands.
//!
//! The registry is the harness's anonymous one (tests/common/registry.rs) behind
//! [`TokenProxy`], a small proxy in this file that plays the token server too: it answers
//! every request without the right `Authorization: Bearer` with a 401 and a
//! `WWW-Authenticate: Bearer realm=…` challenge pointing at its own `/token` endpoint, grants
//! the token there for the right Basic credentials only, and pipes authorized connections to
//! the registry byte for byte.
//!
//! Every command runs with DOCKER_CONFIG pointing at a directory of the test (empty unless the
//! test writes a config.json) and without CACHEFS_REGISTRY_*, so the machine's own
//! credentials never leak in; every command is bounded by a timeout.
#![cfg(feature = "registry")]

mod common;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Output;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::registry::{self, Registry};
use common::remote::{
    assert_fails, assert_nothing_restored, assert_same_tree, cfs, cfs_with, exec, instance_dir,
    write_docker_config,
};
use common::{CliEnv, code, spec, stderr_of, stdout_of};
use serde_json::{Value, json};

/// The only credentials the proxy's token endpoint accepts.
const USER: &str = "bearer-user";
const PASSWORD: &str = "bearer-s3cret";
/// The `service` of the proxy's challenges.
const SERVICE: &str = "cachefs-test";
/// Longest request head the proxy reads.
const MAX_HEAD: usize = 64 * 1024;
/// Bound on every read and write of the proxy (cachefs's commands are bounded by
/// [`common::remote::CMD_T`]).
const PROXY_IO_T: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------------
// The token-enforcing proxy
// ---------------------------------------------------------------------------------------------

/// One request to the proxy's `/token` endpoint.
#[derive(Clone, Debug)]
struct TokenRequest {
    /// The `scope` query parameter, decoded.
    scope: Option<String>,
    /// The `service` query parameter, decoded.
    service: Option<String>,
    /// Whether the request carried `Authorization: Basic …` at all.
    basic: bool,
    /// Whether a token was issued (the Basic credentials were [`USER`] / [`PASSWORD`]).
    granted: bool,
}

impl TokenRequest {
    /// Whether the scope is `repository:<repo>:<actions>` with every one of `actions`.
    fn grants(&self, repo: &str, actions: &[&str]) -> bool {
        let Some(scope) = &self.scope else {
            return false;
        };
        scope.split(' ').any(|s| {
            let Some(list) = s
                .strip_prefix("repository:")
                .and_then(|rest| rest.strip_prefix(repo))
                .and_then(|rest| rest.strip_prefix(':'))
            else {
                return false;
            };
            let have: Vec<&str> = list.split(',').collect();
            actions.iter().all(|a| have.contains(a))
        })
    }
}

/// What the proxy saw.
#[derive(Debug, Default)]
struct ProxyLog {
    tokens: Vec<TokenRequest>,
    /// Request lines answered with a 401 challenge.
    challenged: Vec<String>,
    /// First request lines of the connections piped to the registry.
    forwarded: Vec<String>,
}

struct Shared {
    port: u16,
    upstream: SocketAddr,
    /// The one token the proxy issues and accepts.
    token: String,
    stop: AtomicBool,
    log: Mutex<ProxyLog>,
    /// A clone of every socket, so that drop can shut them all down.
    sockets: Mutex<Vec<TcpStream>>,
    /// Connection threads, joined on drop.
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// A bearer-token gate in front of an anonymous registry, and its token server.
///
/// Each accepted connection's first request decides what happens to it:
/// - `GET /token?scope=…&service=…` with `Authorization: Basic base64(USER:PASSWORD)` gets
///   `200 {"token": …}`, anything else at `/token` a 401; then the connection closes.
/// - any other request with `Authorization: Bearer <the token>` goes to the registry with its
///   `Connection` header replaced by `Connection: close`, and the connection is piped both ways
///   until either side closes. The registry closes it after its response, so the client opens
///   a new connection for its next request, whose first request is checked again: every
///   request is checked, although the proxy does not parse bodies or responses. (Without the
///   rewrite, reqwest sends a whole push over one or two keep-alive connections and only their
///   first request would be checked.)
/// - anything else gets a 401 with `WWW-Authenticate: Bearer realm="http://PROXY/token",
///   service="cachefs-test",scope="repository:<name>:…"` and an OCI error body; the
///   connection closes.
///
/// Upload `Location`s need no rewriting: distribution (without `http.host` in its config, as
/// the harness runs it) builds its absolute URLs from the request's `Host` header, which the
/// proxy forwards untouched, so they point back at the proxy
/// (see `upload_locations_point_back_at_the_proxy`).
///
/// Dropping it stops accepting, shuts every socket down and joins every thread.
struct TokenProxy {
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl TokenProxy {
    fn start(reg: &Registry) -> TokenProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let token = format!(
            "tok-{}-{}-{nanos:x}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let shared = Arc::new(Shared {
            port,
            upstream: SocketAddr::from(([127, 0, 0, 1], reg.port())),
            token,
            stop: AtomicBool::new(false),
            log: Mutex::default(),
            sockets: Mutex::default(),
            threads: Mutex::default(),
        });
        let s = Arc::clone(&shared);
        let accept = thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let s2 = Arc::clone(&s);
                let h = thread::spawn(move || s2.serve(conn));
                let mut threads = lock(&s.threads);
                threads.retain(|t| !t.is_finished());
                threads.push(h);
            }
        });
        TokenProxy {
            shared,
            accept: Some(accept),
        }
    }

    /// `127.0.0.1:PORT`, as an image reference's registry part.
    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.shared.port)
    }

    fn port(&self) -> u16 {
        self.shared.port
    }

    /// `127.0.0.1:PORT/<repo_and_tag>`.
    fn reference(&self, repo_and_tag: &str) -> String {
        format!("{}/{repo_and_tag}", self.host())
    }

    fn token(&self) -> &str {
        &self.shared.token
    }

    fn tokens(&self) -> Vec<TokenRequest> {
        lock(&self.shared.log).tokens.clone()
    }

    fn challenged(&self) -> usize {
        lock(&self.shared.log).challenged.len()
    }

    fn forwarded(&self) -> usize {
        lock(&self.shared.log).forwarded.len()
    }

    fn forwarded_lines(&self) -> Vec<String> {
        lock(&self.shared.log).forwarded.clone()
    }

    fn log(&self) -> String {
        format!("{:#?}", *lock(&self.shared.log))
    }
}

impl Drop for TokenProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which then sees the flag.
        let _ = TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], self.shared.port)),
            Duration::from_secs(5),
        );
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        // No new connection threads from here on; sockets registered later are shut down at
        // once (see `Shared::track`).
        for s in lock(&self.shared.sockets).drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        let threads = std::mem::take(&mut *lock(&self.shared.threads));
        for h in threads {
            let _ = h.join();
        }
    }
}

/// Locks, also after a panic elsewhere (the proxy's state stays usable for the report).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A request head: method, target, headers (names lowercased).
struct Head {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn line(&self) -> String {
        format!("{} {}", self.method, self.target)
    }

    /// The credentials of `Authorization: <scheme> <credentials>`.
    fn authorization(&self, scheme: &str) -> Option<&str> {
        let (s, cred) = self.header("authorization")?.split_once(' ')?;
        s.eq_ignore_ascii_case(scheme).then(|| cred.trim())
    }
}

impl Shared {
    /// Remembers a clone of `s` for drop; after drop started, shuts `s` down instead.
    fn track(&self, s: &TcpStream) -> bool {
        let mut sockets = lock(&self.sockets);
        if self.stop.load(Ordering::SeqCst) {
            let _ = s.shutdown(Shutdown::Both);
            return false;
        }
        if let Ok(c) = s.try_clone() {
            sockets.push(c);
        }
        true
    }

    fn serve(&self, mut client: TcpStream) {
        if client.set_read_timeout(Some(PROXY_IO_T)).is_err()
            || client.set_write_timeout(Some(PROXY_IO_T)).is_err()
            || !self.track(&client)
        {
            return;
        }
        // `None`: closed before a whole head (drop's wake-up connection, among others).
        let Some((head, buf, end)) = read_head(&mut client) else {
            return;
        };
        let path = head.target.split('?').next().unwrap_or_default();
        if path == "/token" {
            self.issue_token(&mut client, &head);
        } else if head.authorization("bearer") == Some(self.token.as_str()) {
            lock(&self.log).forwarded.push(head.line());
            let _ = self.pipe(client, &close_after_reply(&buf, end));
        } else {
            lock(&self.log).challenged.push(head.line());
            self.challenge(&mut client, &head, path);
        }
    }

    fn issue_token(&self, client: &mut TcpStream, head: &Head) {
        let query = head.target.split_once('?').map(|(_, q)| q).unwrap_or("");
        let param = |key: &str| {
            query.split('&').find_map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (percent_decode(k) == key).then(|| percent_decode(v))
            })
        };
        let basic = head.authorization("basic");
        let granted =
            basic == Some(registry::base64(format!("{USER}:{PASSWORD}").as_bytes()).as_str());
        lock(&self.log).tokens.push(TokenRequest {
            scope: param("scope"),
            service: param("service"),
            basic: basic.is_some(),
            granted,
        });
        if granted {
            let body = json!({ "token": self.token, "expires_in": 300 }).to_string();
            respond(client, "200 OK", &[], &body);
        } else {
            let body =
                r#"{"errors":[{"code":"UNAUTHORIZED","message":"invalid username or password"}]}"#;
            respond(client, "401 Unauthorized", &[], body);
        }
    }

    fn challenge(&self, client: &mut TcpStream, head: &Head, path: &str) {
        let mut challenge = format!(
            "Bearer realm=\"http://127.0.0.1:{}/token\",service=\"{SERVICE}\"",
            self.port
        );
        if let Some(name) = repository_of(path) {
            let actions = match head.method.as_str() {
                "GET" | "HEAD" => "pull",
                _ => "pull,push",
            };
            challenge.push_str(&format!(",scope=\"repository:{name}:{actions}\""));
        }
        let body = r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#;
        let body = if head.method == "HEAD" { "" } else { body };
        respond(
            client,
            "401 Unauthorized",
            &[("WWW-Authenticate", &challenge)],
            body,
        );
    }

    /// Sends what was read already to the registry, then copies both ways until both
    /// directions are closed.
    fn pipe(&self, client: TcpStream, already: &[u8]) -> io::Result<()> {
        let mut upstream = TcpStream::connect_timeout(&self.upstream, PROXY_IO_T)?;
        upstream.set_read_timeout(Some(PROXY_IO_T))?;
        upstream.set_write_timeout(Some(PROXY_IO_T))?;
        if !self.track(&upstream) {
            return Ok(());
        }
        upstream.write_all(already)?;
        let (client2, upstream2) = (client.try_clone()?, upstream.try_clone()?);
        let to_registry = thread::spawn(move || copy_then_close(client2, upstream2));
        copy_then_close(upstream, client);
        let _ = to_registry.join();
        Ok(())
    }
}

/// `buf` (a request head ending at `end`, then body bytes) with its `Connection` headers
/// replaced by `Connection: close`.
fn close_after_reply(buf: &[u8], end: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(buf.len() + 19);
    for line in buf[..end].split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let name = line.split(|&b| b == b':').next().unwrap_or_default();
        if !name.trim_ascii().eq_ignore_ascii_case(b"connection") {
            out.extend_from_slice(line);
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    out.extend_from_slice(&buf[end + 4..]);
    out
}

/// Copies `from` to `to` until EOF, then ends `to`'s write side; on an error, shuts both
/// sockets down so that the other direction ends too.
fn copy_then_close(mut from: TcpStream, mut to: TcpStream) {
    match io::copy(&mut from, &mut to) {
        Ok(_) => {
            let _ = to.shutdown(Shutdown::Write);
        }
        Err(_) => {
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
        }
    }
}

/// Reads until the end of the request head (`\r\n\r\n`). Returns the parsed head, every byte
/// read (the head and whatever part of a body came with it) and where the head's blank line
/// starts.
fn read_head(s: &mut TcpStream) -> Option<(Head, Vec<u8>, usize)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEAD {
            return None;
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let text = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = text.split("\r\n");
    let mut request = lines.next()?.split(' ');
    let (method, target) = (request.next()?.to_string(), request.next()?.to_string());
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Some((
        Head {
            method,
            target,
            headers,
        },
        buf,
        end,
    ))
}

/// Writes a whole response with `Connection: close` and closes the write side.
fn respond(s: &mut TcpStream, status: &str, headers: &[(&str, &str)], body: &str) {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n",
        body.len()
    );
    for (n, v) in headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(body);
    let _ = s.write_all(out.as_bytes());
    let _ = s.shutdown(Shutdown::Write);
}

/// `<name>` of `/v2/<name>/{manifests,blobs,tags}/…`; `None` for `/v2/` and anything else.
fn repository_of(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v2/")?;
    ["/manifests/", "/blobs/", "/tags/"]
        .iter()
        .filter_map(|m| rest.find(m))
        .min()
        .map(|i| &rest[..i])
        .filter(|name| !name.is_empty())
}

/// Decodes `%XX` and `+` (form encoding, as reqwest writes query parameters).
fn percent_decode(s: &str) -> String {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                out.push(hi << 4 | lo);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One raw request with `Connection: close`: (status, headers with lowercased names, body).
fn raw_request(
    port: u16,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to proxy");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!(
        "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
         Content-Length: 0\r\n"
    );
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).expect("send request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read response");
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head: {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, raw[end + 4..].to_vec())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

// ---------------------------------------------------------------------------------------------
// Running the binary with a clean registry environment
// ---------------------------------------------------------------------------------------------

fn good_env() -> [(&'static str, &'static str); 2] {
    [
        ("CACHEFS_REGISTRY_USER", USER),
        ("CACHEFS_REGISTRY_PASSWORD", PASSWORD),
    ]
}

/// Asserts exit 0 and parses stdout as JSON.
#[track_caller]
fn json_of(out: &Output, what: &str, proxy: &TokenProxy) -> Value {
    assert_eq!(
        code(out),
        0,
        "{what}\nstdout: {}\nstderr: {}\nproxy: {}",
        stdout_of(out),
        stderr_of(out),
        proxy.log()
    );
    let text = stdout_of(out);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {text}"))
}

/// [`assert_fails`] with exit 1.
#[track_caller]
fn assert_refused(out: &Output, mentions: &[&str]) -> String {
    let err = assert_fails(out, 1, mentions);
    // Shown with --nocapture, for whoever reads the wording.
    eprintln!("refused as expected: {}", err.trim_end());
    err
}

/// `push ID REF --json`, which must succeed.
#[track_caller]
fn push(
    env: &CliEnv,
    proxy: &TokenProxy,
    id: &str,
    reference: &str,
    vars: &[(&str, &str)],
) -> Value {
    let v = json_of(
        &cfs_with(env, &["push", id, reference, "--json"], vars),
        &format!("push {id} {reference}"),
        proxy,
    );
    assert_eq!(v["reference"], reference, "{v}");
    assert_eq!(v["layer"].as_str().map(str::len), Some(64), "{v}");
    v
}

/// `pull REF --into ID --json`, which must succeed.
#[track_caller]
fn pull(
    env: &CliEnv,
    proxy: &TokenProxy,
    reference: &str,
    id: &str,
    vars: &[(&str, &str)],
) -> Value {
    let v = json_of(
        &cfs_with(env, &["pull", reference, "--into", id, "--json"], vars),
        &format!("pull {reference} --into {id}"),
        proxy,
    );
    assert_eq!(v["reference"], reference, "{v}");
    v
}

/// Cache `id`, filled by a `cachefs run` through its mount: nested directories, files of a few
/// sizes and modes, a symlink, an empty directory. Returns its instance directory.
#[track_caller]
fn filled_cache(env: &CliEnv, id: &str) -> PathBuf {
    let t = env.path(&format!("target-{id}"));
    let script = format!(
        "set -e; cd {t}; mkdir -p some/deep/dir empty; \
         printf 'hello %s\\n' {id} > top; chmod 600 top; \
         seq 1 40000 > some/numbers; \
         head -c 300000 /dev/urandom > some/deep/dir/random.bin; chmod 755 some/deep/dir/random.bin; \
         ln -s deep/dir/random.bin some/link",
        t = t.display()
    );
    let out = exec(
        env,
        env.run_cmd(&[], &[spec(id, &t, "")], &["sh", "-c", &script]),
        &[],
    );
    assert_eq!(code(&out), 0, "fill {id}: {}", stderr_of(&out));
    instance_dir(env, id)
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// The proxy itself: challenges, token grants, and upload locations that lead back to it (so
/// cachefs's uploads cannot bypass the gate through an absolute `Location`).
#[test]
fn upload_locations_point_back_at_the_proxy() {
    let reg = Registry::start();
    let proxy = TokenProxy::start(&reg);

    let (status, headers, _) = raw_request(proxy.port(), "GET", "/v2/", &[]);
    assert_eq!(status, 401);
    let challenge = header(&headers, "www-authenticate").expect("a challenge");
    assert_eq!(
        challenge,
        format!(
            "Bearer realm=\"http://{}/token\",service=\"{SERVICE}\"",
            proxy.host()
        )
    );
    let (status, headers, _) =
        raw_request(proxy.port(), "POST", "/v2/team/caches/blobs/uploads/", &[]);
    assert_eq!(status, 401);
    assert!(
        header(&headers, "www-authenticate")
            .is_some_and(|c| c.ends_with(",scope=\"repository:team/caches:pull,push\"")),
        "{headers:?}"
    );

    let wrong = format!("Basic {}", registry::base64(b"bearer-user:nope"));
    let token_path = "/token?scope=repository%3Ateam%2Fcaches%3Apull%2Cpush&service=cachefs-test";
    let (status, _, _) = raw_request(
        proxy.port(),
        "GET",
        token_path,
        &[("Authorization", &wrong)],
    );
    assert_eq!(status, 401);
    let right = format!(
        "Basic {}",
        registry::base64(format!("{USER}:{PASSWORD}").as_bytes())
    );
    let (status, _, body) = raw_request(
        proxy.port(),
        "GET",
        token_path,
        &[("Authorization", &right)],
    );
    assert_eq!(status, 200);
    let body: Value = serde_json::from_slice(&body).expect("token JSON");
    assert_eq!(body["token"], proxy.token());
    let tokens = proxy.tokens();
    assert_eq!(tokens.len(), 2, "{tokens:?}");
    assert!(!tokens[0].granted && tokens[1].granted, "{tokens:?}");
    assert!(
        tokens[1].grants("team/caches", &["push", "pull"]),
        "{tokens:?}"
    );
    assert_eq!(tokens[1].service.as_deref(), Some(SERVICE));

    let (status, _, _) = raw_request(
        proxy.port(),
        "POST",
        "/v2/team/caches/blobs/uploads/",
        &[("Authorization", "Bearer not-the-token")],
    );
    assert_eq!(status, 401, "a wrong token passed the gate");
    let bearer = format!("Bearer {}", proxy.token());
    let (status, headers, _) = raw_request(
        proxy.port(),
        "POST",
        "/v2/team/caches/blobs/uploads/",
        &[("Authorization", &bearer)],
    );
    assert_eq!(status, 202, "{headers:?}");
    let location = header(&headers, "location").expect("upload Location");
    assert!(
        location.starts_with(&format!(
            "http://{}/v2/team/caches/blobs/uploads/",
            proxy.host()
        )),
        "upload Location {location:?} does not lead back to the proxy at {}",
        proxy.host()
    );
    assert_eq!(proxy.forwarded(), 1);
    assert_eq!(proxy.challenged(), 3);
}

#[test]
fn push_and_pull_with_credentials_from_the_environment() {
    let reg = Registry::start();
    let proxy = TokenProxy::start(&reg);
    let reference = proxy.reference("team/caches:t");

    let a = CliEnv::new();
    let src = filled_cache(&a, "c");
    let pushed = push(&a, &proxy, "c", &reference, &good_env());
    assert!(reg.blob_count() > 0, "nothing landed in the registry");

    let tokens = proxy.tokens();
    assert!(!tokens.is_empty(), "the push never asked for a token");
    for t in &tokens {
        assert!(t.basic && t.granted, "{t:?}");
        assert_eq!(t.service.as_deref(), Some(SERVICE), "{t:?}");
    }
    assert!(
        tokens
            .iter()
            .any(|t| t.grants("team/caches", &["push", "pull"])),
        "no push scope asked for: {tokens:?}"
    );
    // Each request was checked on its own (see `TokenProxy`): the uploads and the tag's
    // manifest came through the gate with the token.
    let forwarded = proxy.forwarded_lines();
    assert!(proxy.challenged() > 0, "{}", proxy.log());
    for want in [
        "POST /v2/team/caches/blobs/uploads/",
        "PUT /v2/team/caches/blobs/uploads/",
        "PUT /v2/team/caches/manifests/t",
    ] {
        assert!(
            forwarded.iter().any(|l| l.starts_with(want)),
            "no {want:?} through the proxy: {}",
            proxy.log()
        );
    }

    let asked_before = tokens.len();
    let b = CliEnv::new();
    let pulled = pull(&b, &proxy, &reference, "c", &good_env());
    assert_eq!(pulled["layer"], pushed["layer"]);
    assert_same_tree(&instance_dir(&b, "c"), &src);
    let tokens = proxy.tokens();
    let by_pull = &tokens[asked_before..];
    assert!(
        by_pull
            .iter()
            .any(|t| t.granted && t.grants("team/caches", &["pull"])),
        "the pull asked for no pull scope: {tokens:?}"
    );
}

#[test]
fn a_wrong_password_or_none_is_refused_in_one_line() {
    let reg = Registry::start();
    let proxy = TokenProxy::start(&reg);
    let reference = proxy.reference("team/caches:t");
    let wrong = [
        ("CACHEFS_REGISTRY_USER", USER),
        ("CACHEFS_REGISTRY_PASSWORD", "not-the-password"),
    ];

    let a = CliEnv::new();
    let src = filled_cache(&a, "c");
    let push_args = ["push", "c", reference.as_str()];
    let line = assert_refused(&cfs_with(&a, &push_args, &wrong), &["refused access"]);
    assert!(line.contains("team/caches"), "{line}");
    assert!(
        proxy.tokens().iter().any(|t| t.basic && !t.granted),
        "{}",
        proxy.log()
    );
    assert_refused(&cfs(&a, &push_args), &["refused access"]);
    assert_eq!(reg.blob_count(), 0, "a refused push left blobs");

    // Pulls of a tag that exists: the same.
    push(&a, &proxy, "c", &reference, &good_env());
    let b = CliEnv::new();
    let pull_args = ["pull", reference.as_str(), "--into", "c"];
    assert_refused(&cfs_with(&b, &pull_args, &wrong), &["refused access"]);
    assert_refused(&cfs(&b, &pull_args), &["refused access"]);
    assert_nothing_restored(&b, "c");
    pull(&b, &proxy, &reference, "c", &good_env());
    assert_same_tree(&instance_dir(&b, "c"), &src);
}

#[test]
fn credentials_from_docker_config_work() {
    let reg = Registry::start();
    let proxy = TokenProxy::start(&reg);
    let reference = proxy.reference("team/caches:t");

    let a = CliEnv::new();
    write_docker_config(&a, &proxy.host(), USER, PASSWORD);
    let src = filled_cache(&a, "c");
    let pushed = push(&a, &proxy, "c", &reference, &[]);
    let tokens = proxy.tokens();
    assert!(
        tokens
            .iter()
            .any(|t| t.basic && t.granted && t.grants("team/caches", &["push", "pull"])),
        "{tokens:?}"
    );

    let b = CliEnv::new();
    write_docker_config(&b, &proxy.host(), USER, PASSWORD);
    let pulled = pull(&b, &proxy, &reference, "c", &[]);
    assert_eq!(pulled["layer"], pushed["layer"]);
    assert_same_tree(&instance_dir(&b, "c"), &src);

    // A wrong password in config.json is refused like any other.
    let d = CliEnv::new();
    write_docker_config(&d, &proxy.host(), USER, "nope");
    assert_refused(
        &cfs(&d, &["pull", &reference, "--into", "c"]),
        &["refused access"],
    );
    assert_nothing_restored(&d, "c");
}
