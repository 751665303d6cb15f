//! Pull: a reference -> a stored layer. The manifest and the index say what the layer holds;
//! only chunks with files the object store lacks are downloaded, each streamed through zstd and
//! tar straight into verified blobs (no temp copy, never whole in memory). The layer is recorded
//! only when every blob is in the store; restoring it into a cache is the caller's next step.

use std::collections::HashMap;
use std::io::{self, Read};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};

use futures_util::StreamExt;
use oci_client::errors::{DigestError, OciDistributionError};
use oci_client::{Reference, RegistryOperation};
use sha2::{Digest as _, Sha256};

use super::chunk::{self, IngestError, PartAssembly};
use super::plan::{ChunkSpec, Plan};
use super::{
    ANN_ROOT, ARTIFACT_TYPE, CONCURRENCY, ENTRIES_MEDIA_TYPE, INDEX_MEDIA_TYPE,
    MANIFEST_MEDIA_TYPE, MAX_INDEX_BYTES, MAX_MANIFEST_BYTES, PART_MEDIA_TYPE, RemoteError, Target,
    sha256_digest, sha256_hex, transient, with_retries,
};
use crate::layer::progress::Progress;
use crate::layer::{
    Digest, Kind, LayerError, ObjectKind, ObjectStore, Tree, TreeStats, tree_stats,
};

/// What a pull did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PullReport {
    pub reference: String,
    pub manifest_digest: String,
    /// The layer's blake3 root.
    pub layer: String,
    pub chunks: usize,
    /// Chunks downloaded, and chunks skipped because the store had all their files.
    pub chunks_downloaded: u64,
    pub chunks_skipped: u64,
    /// Compressed bytes downloaded (chunks and index).
    pub bytes_downloaded: u64,
    pub blobs_stored: u64,
    pub bytes_stored: u64,
    #[serde(flatten)]
    pub stats: TreeStats,
}

pub struct PullOptions<'a> {
    pub show_progress: bool,
    pub cancel: Option<&'a AtomicI32>,
}

/// The parsed manifest: the index's descriptor and the chunks'.
struct Manifest {
    root: Digest,
    index: (String, u64),
    layers: Vec<(String, String, u64)>,
}

fn foreign(t: &Target, detail: String) -> RemoteError {
    RemoteError::Foreign {
        reference: t.shown.clone(),
        detail,
    }
}

fn parse_manifest(t: &Target, body: &[u8]) -> Result<Manifest, RemoteError> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| foreign(t, format!("its manifest is not JSON ({e})")))?;
    let s = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
    let media = s(&v, "mediaType").unwrap_or_default();
    if !media.is_empty() && media != MANIFEST_MEDIA_TYPE {
        return Err(foreign(
            t,
            format!("it is a {media}, not an OCI image manifest"),
        ));
    }
    match s(&v, "artifactType") {
        Some(a) if a == ARTIFACT_TYPE => {}
        Some(a) => {
            return Err(foreign(
                t,
                format!("its artifactType is {a}, not {ARTIFACT_TYPE}"),
            ));
        }
        None => {
            return Err(foreign(
                t,
                format!(
                    "its manifest has no artifactType (an image?); cachefs pushes {ARTIFACT_TYPE}"
                ),
            ));
        }
    }
    let desc = |d: &serde_json::Value| -> Result<(String, String, u64), RemoteError> {
        let media = s(d, "mediaType").unwrap_or_default();
        let digest = s(d, "digest").filter(|x| x.starts_with("sha256:") && x.len() == 71);
        let size = d.get("size").and_then(|x| x.as_u64());
        match (digest, size) {
            (Some(digest), Some(size)) => Ok((media, digest, size)),
            _ => Err(foreign(
                t,
                "a descriptor in its manifest has no sha256 digest or size".into(),
            )),
        }
    };
    let config = desc(v.get("config").unwrap_or(&serde_json::Value::Null))?;
    if config.0 != INDEX_MEDIA_TYPE {
        return Err(foreign(
            t,
            format!("its config is {}, not {INDEX_MEDIA_TYPE}", config.0),
        ));
    }
    let layers = v
        .get("layers")
        .and_then(|l| l.as_array())
        .ok_or_else(|| foreign(t, "its manifest has no layers".into()))?
        .iter()
        .map(desc)
        .collect::<Result<Vec<_>, _>>()?;
    let root = v
        .get("annotations")
        .and_then(|a| a.get(ANN_ROOT))
        .and_then(|r| r.as_str())
        .and_then(|r| r.strip_prefix("blake3:"))
        .and_then(Digest::from_hex)
        .ok_or_else(|| foreign(t, format!("its manifest has no {ANN_ROOT} annotation")))?;
    Ok(Manifest {
        root,
        index: (config.1, config.2),
        layers,
    })
}

struct Shared<'a> {
    objects: &'a ObjectStore,
    target: &'a Target,
    handle: tokio::runtime::Handle,
    plan: &'a Plan,
    decoded: &'a HashMap<Digest, Tree>,
    layers: &'a [(String, String, u64)],
    progress: Progress,
    abort: AtomicBool,
    cancel: Option<&'a AtomicI32>,
    downloaded: AtomicU64,
    skipped: AtomicU64,
    bytes_downloaded: AtomicU64,
    blobs_stored: AtomicU64,
    bytes_stored: AtomicU64,
}

/// Reads what the download task sends.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    cur: bytes::Bytes,
    cancel: Option<*const AtomicI32>,
}

// The raw pointer is only a borrowed flag that outlives the reader (scoped threads).
unsafe impl Send for ChannelReader {}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            if let Some(c) = self.cancel
                // SAFETY: the flag outlives every reader (see `Shared`).
                && unsafe { (*c).load(Ordering::Relaxed) } != 0
            {
                return Err(io::Error::new(io::ErrorKind::Interrupted, "interrupted"));
            }
            match self.rx.blocking_recv() {
                Some(b) => self.cur = b,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur.split_to(n));
        Ok(n)
    }
}

/// How a download ended.
enum Fetched {
    /// All bytes arrived; their sha256 and count.
    Done(String, u64),
    /// The registry sent bytes whose sha256 is not the descriptor's.
    Mismatch(String),
    Failed(OciDistributionError),
}

impl Shared<'_> {
    fn check(&self) -> Result<(), RemoteError> {
        if self.cancel.is_some_and(|c| c.load(Ordering::Relaxed) != 0)
            || self.abort.load(Ordering::Relaxed)
        {
            return Err(RemoteError::Interrupted);
        }
        Ok(())
    }

    fn corrupt(&self, digest: &str, detail: String) -> RemoteError {
        RemoteError::Corrupt {
            reference: self.target.shown.clone(),
            digest: digest.to_string(),
            detail,
        }
    }

    /// Downloads blob `digest` (`size` bytes), handing its bytes to `consume` on this thread as
    /// they arrive. Transient failures start again from the beginning, up to the attempt limit.
    fn fetch<T>(
        &self,
        digest: &str,
        size: u64,
        consume: &mut dyn FnMut(&mut dyn Read) -> Result<T, IngestError>,
    ) -> Result<T, RemoteError> {
        let mut attempt = 1;
        let mut delay = std::time::Duration::from_millis(200);
        loop {
            self.check()?;
            let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(16);
            let client = self.target.client.clone();
            let reference: Reference = self.target.reference.clone();
            let d = digest.to_string();
            let task = self.handle.spawn(async move {
                let mut stream = match client.pull_blob_stream(&reference, d.as_str()).await {
                    Ok(s) => s,
                    Err(e) => return Fetched::Failed(e),
                };
                let mut sha = Sha256::new();
                let mut n = 0u64;
                let mut tx = Some(tx);
                while let Some(item) = stream.next().await {
                    match item {
                        Ok(b) => {
                            sha.update(&b);
                            n += b.len() as u64;
                            // A reader that stopped early (it has what it needs) still lets
                            // the hash see every byte.
                            if let Some(t) = &tx
                                && t.send(b).await.is_err()
                            {
                                tx = None;
                            }
                        }
                        Err(e) => {
                            if e.get_ref().is_some_and(|i| i.is::<DigestError>()) {
                                return Fetched::Mismatch(sha256_hex(sha.finalize().as_slice()));
                            }
                            return Fetched::Failed(OciDistributionError::IoError(e));
                        }
                    }
                }
                Fetched::Done(sha256_hex(sha.finalize().as_slice()), n)
            });
            let mut reader = ChannelReader {
                rx,
                cur: bytes::Bytes::new(),
                cancel: self.cancel.map(|c| c as *const AtomicI32),
            };
            let parsed = consume(&mut reader);
            drop(reader);
            let fetched = self.handle.block_on(task).unwrap_or_else(|e| {
                Fetched::Failed(OciDistributionError::GenericError(Some(e.to_string())))
            });
            match fetched {
                Fetched::Done(got, n) => {
                    self.bytes_downloaded.fetch_add(n, Ordering::Relaxed);
                    if got != digest || n != size {
                        return Err(self.corrupt(
                            digest,
                            format!("the registry sent {n} bytes with digest {got}"),
                        ));
                    }
                    return parsed.map_err(|e| match e {
                        IngestError::Bad(m) => self.corrupt(digest, m),
                        IngestError::Layer(LayerError::Interrupted) => RemoteError::Interrupted,
                        IngestError::Layer(l) => RemoteError::Layer(l),
                    });
                }
                Fetched::Mismatch(got) => {
                    return Err(
                        self.corrupt(digest, format!("the registry sent bytes with digest {got}"))
                    );
                }
                Fetched::Failed(e) => {
                    self.check()?;
                    if attempt < super::ATTEMPTS && transient(&e) {
                        tracing::warn!(digest, attempt, error = %e, "download failed; retrying");
                        std::thread::sleep(delay);
                        delay *= 2;
                        attempt += 1;
                        continue;
                    }
                    return Err(self.target.error(e));
                }
            }
        }
    }

    fn all_present(&self, spec: &ChunkSpec) -> (bool, u64) {
        let files = self.plan.chunk_files(spec, self.decoded);
        let bytes = match spec {
            ChunkSpec::Part { len, .. } => *len,
            _ => files.iter().map(|(_, e)| e.size).sum(),
        };
        (
            files
                .iter()
                .all(|(_, e)| self.objects.has(ObjectKind::Blob, e.hash)),
            bytes,
        )
    }
}

/// Downloads the layer `target` names into the object store and returns what it did. The
/// caller holds the objects' shared lock and records the layer.
pub fn pull(
    objects: &ObjectStore,
    target: &Target,
    opts: &PullOptions<'_>,
) -> Result<PullReport, RemoteError> {
    let rt = super::runtime()?;
    rt.block_on(with_retries("authenticate", || {
        target
            .client
            .auth(&target.reference, &target.auth, RegistryOperation::Pull)
    }))
    .map_err(|e| target.error(e))?;
    let accepted = [
        MANIFEST_MEDIA_TYPE,
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ];
    let (body, _) = rt
        .block_on(with_retries("fetch manifest", || {
            target
                .client
                .pull_manifest_raw(&target.reference, &target.auth, &accepted)
        }))
        .map_err(|e| target.error(e))?;
    if body.len() > MAX_MANIFEST_BYTES {
        return Err(foreign(
            target,
            format!("its manifest is {} bytes", body.len()),
        ));
    }
    let manifest_digest = sha256_digest(&body);
    if let Some(want) = target.reference.digest()
        && want != manifest_digest
    {
        return Err(RemoteError::Corrupt {
            reference: target.shown.clone(),
            digest: want.to_string(),
            detail: format!("the registry sent a manifest with digest {manifest_digest}"),
        });
    }
    let manifest = parse_manifest(target, &body)?;

    // The index.
    let (index_digest, index_size) = manifest.index.clone();
    if index_size > MAX_INDEX_BYTES {
        return Err(foreign(target, format!("its index is {index_size} bytes")));
    }
    let index = rt
        .block_on(with_retries("fetch index", || async {
            let mut buf = Vec::new();
            target
                .client
                .pull_blob(&target.reference, index_digest.as_str(), &mut buf)
                .await
                .map(|_| buf)
        }))
        .map_err(|e| match e {
            OciDistributionError::DigestError(d) => RemoteError::Corrupt {
                reference: target.shown.clone(),
                digest: index_digest.clone(),
                detail: d.to_string(),
            },
            e => target.error(e),
        })?;
    let mut raw = Vec::new();
    zstd::stream::read::Decoder::new(index.as_slice())
        .and_then(|d| d.take(16 * MAX_INDEX_BYTES).read_to_end(&mut raw))
        .map_err(|e| RemoteError::Corrupt {
            reference: target.shown.clone(),
            digest: index_digest.clone(),
            detail: format!("its index is not zstd ({e})"),
        })?;
    let plan = Plan::decode_index(&raw).map_err(|m| RemoteError::Corrupt {
        reference: target.shown.clone(),
        digest: index_digest.clone(),
        detail: format!("its index is invalid: {m}"),
    })?;
    if plan.root != manifest.root {
        return Err(RemoteError::Corrupt {
            reference: target.shown.clone(),
            digest: index_digest.clone(),
            detail: format!(
                "its index is of layer {}, the manifest names {}",
                plan.root, manifest.root
            ),
        });
    }
    let layers: Vec<(String, String, u64)> = if plan.chunks.is_empty() {
        Vec::new()
    } else {
        manifest.layers.clone()
    };
    if layers.len() != plan.chunks.len() {
        return Err(foreign(
            target,
            format!(
                "its manifest lists {} chunks where its index has {}",
                layers.len(),
                plan.chunks.len()
            ),
        ));
    }
    for (l, c) in layers.iter().zip(&plan.chunks) {
        let want = match c {
            ChunkSpec::Entries { .. } => ENTRIES_MEDIA_TYPE,
            ChunkSpec::Part { .. } => PART_MEDIA_TYPE,
        };
        if l.0 != want {
            return Err(foreign(
                target,
                format!("a chunk is {}, where its index says {want}", l.0),
            ));
        }
    }
    let decoded = plan.decoded();
    // Trees are small: store them all now (each is named by its own hash).
    for t in decoded.values() {
        objects.put_tree(t)?;
    }
    let total: u64 = decoded
        .values()
        .flat_map(|t| t.entries.iter())
        .filter(|e| e.kind == Kind::File)
        .map(|e| e.size)
        .sum();

    let shared = Shared {
        objects,
        target,
        handle: rt.handle().clone(),
        plan: &plan,
        decoded: &decoded,
        layers: &layers,
        progress: Progress::bytes("pulling", total, opts.show_progress),
        abort: AtomicBool::new(false),
        cancel: opts.cancel,
        downloaded: AtomicU64::new(0),
        skipped: AtomicU64::new(0),
        bytes_downloaded: AtomicU64::new(index_size),
        blobs_stored: AtomicU64::new(0),
        bytes_stored: AtomicU64::new(0),
    };

    // Work: entries chunks one by one; the parts of a file together, in order.
    let mut work: Vec<Vec<usize>> = Vec::new();
    for (i, c) in plan.chunks.iter().enumerate() {
        let continues = matches!(c, ChunkSpec::Part { offset, .. } if *offset > 0);
        match work.last_mut() {
            Some(w) if continues => w.push(i),
            _ => work.push(vec![i]),
        }
    }
    let queue = Mutex::new(work.into_iter());
    let first_error: Mutex<Option<RemoteError>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..CONCURRENCY {
            s.spawn(|| {
                loop {
                    let next = queue.lock().ok().and_then(|mut q| q.next());
                    let Some(w) = next else { break };
                    if let Err(e) = shared.check().and_then(|_| pull_unit(&shared, &w)) {
                        shared.abort.store(true, Ordering::Relaxed);
                        if let Ok(mut f) = first_error.lock()
                            && (f.is_none() || matches!(*f, Some(RemoteError::Interrupted)))
                        {
                            *f = Some(e);
                        }
                        break;
                    }
                }
            });
        }
    });
    shared.progress.finish();
    if let Some(e) = first_error.into_inner().ok().flatten() {
        return Err(e);
    }
    // Every file of the layer must now be in the store.
    for t in decoded.values() {
        for e in &t.entries {
            if e.kind == Kind::File && !objects.has(ObjectKind::Blob, e.hash) {
                return Err(RemoteError::Corrupt {
                    reference: target.shown.clone(),
                    digest: index_digest.clone(),
                    detail: format!("no chunk carries blob {}", e.hash),
                });
            }
        }
    }
    let stats = tree_stats(objects, plan.root)?;
    Ok(PullReport {
        reference: target.shown.clone(),
        manifest_digest,
        layer: plan.root.to_hex(),
        chunks: plan.chunks.len(),
        chunks_downloaded: shared.downloaded.load(Ordering::Relaxed),
        chunks_skipped: shared.skipped.load(Ordering::Relaxed),
        bytes_downloaded: shared.bytes_downloaded.load(Ordering::Relaxed),
        blobs_stored: shared.blobs_stored.load(Ordering::Relaxed),
        bytes_stored: shared.bytes_stored.load(Ordering::Relaxed),
        stats,
    })
}

fn pull_unit(sh: &Shared<'_>, unit: &[usize]) -> Result<(), RemoteError> {
    let Some(&first) = unit.first() else {
        return Ok(());
    };
    let progress = |n: u64| sh.progress.inc(n);
    match &sh.plan.chunks[first] {
        ChunkSpec::Entries { .. } => {
            let spec = &sh.plan.chunks[first];
            let (present, bytes) = sh.all_present(spec);
            if present {
                sh.skipped.fetch_add(1, Ordering::Relaxed);
                sh.progress.inc(bytes);
                return Ok(());
            }
            let (_, digest, size) = &sh.layers[first];
            let got = sh.fetch(digest, *size, &mut |r| {
                chunk::ingest_entries(sh.objects, sh.plan, spec, sh.decoded, r, &progress)
            })?;
            sh.downloaded.fetch_add(1, Ordering::Relaxed);
            sh.blobs_stored
                .fetch_add(got.blobs_stored, Ordering::Relaxed);
            sh.bytes_stored
                .fetch_add(got.bytes_stored, Ordering::Relaxed);
        }
        ChunkSpec::Part { blob, .. } => {
            let blob = *blob;
            let size: u64 = unit
                .iter()
                .map(|i| match &sh.plan.chunks[*i] {
                    ChunkSpec::Part { len, .. } => *len,
                    _ => 0,
                })
                .sum();
            if sh.objects.has(ObjectKind::Blob, blob) {
                sh.skipped.fetch_add(unit.len() as u64, Ordering::Relaxed);
                sh.progress.inc(size);
                return Ok(());
            }
            let mut assembly = PartAssembly::new(sh.objects, blob)?;
            for i in unit {
                let ChunkSpec::Part { offset, len, .. } = &sh.plan.chunks[*i] else {
                    continue;
                };
                let (_, digest, csize) = &sh.layers[*i];
                // A failed part restarts only that part: the assembly rewinds to its start.
                sh.fetch(digest, *csize, &mut |r| {
                    assembly.add(*offset, *len, r, &progress)
                })?;
                sh.downloaded.fetch_add(1, Ordering::Relaxed);
            }
            let path = sh.objects.path(ObjectKind::Blob, blob);
            assembly.commit(size).map_err(|e| match e {
                IngestError::Bad(m) => {
                    RemoteError::Layer(LayerError::corrupt("blob", blob, &path, &m))
                }
                IngestError::Layer(l) => RemoteError::Layer(l),
            })?;
            sh.blobs_stored.fetch_add(1, Ordering::Relaxed);
            sh.bytes_stored.fetch_add(size, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// The layer root `target` names now, or `None` when the reference does not exist.
pub fn current_root(target: &Target) -> Result<Option<Digest>, RemoteError> {
    let rt = super::runtime()?;
    let res = rt.block_on(with_retries("fetch manifest", || {
        target
            .client
            .pull_manifest_raw(&target.reference, &target.auth, &[MANIFEST_MEDIA_TYPE])
    }));
    match res.map_err(|e| target.error(e)) {
        Ok((body, _)) => Ok(Some(parse_manifest(target, &body)?.root)),
        Err(RemoteError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}
