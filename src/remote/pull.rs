//! Pull: a reference -> a stored layer. The manifest and the index say what the layer holds;
//! only chunks with files the object store lacks are downloaded, each streamed through zstd and
//! tar straight into verified blobs (no temp copy, never whole in memory). The layer is recorded
//! only when every blob is in the store; restoring it into a cache is the caller's next step.

use std::collections::HashSet;
use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};

use futures_util::StreamExt;
use oci_client::Reference;
use oci_client::errors::{DigestError, OciDistributionError};
use sha2::{Digest as _, Sha256};

use super::artifact::{Artifact, fetch};
use super::chunk::{self, IngestError, PartAssembly};
use super::plan::{ChunkSpec, Plan};
use super::{RemoteError, Target, transient};
use crate::layer::progress::Progress;
use crate::layer::tarball::sha256_name;
use crate::layer::{Digest, LayerError, ObjectKind, ObjectStore, TreeStats, tree_stats};

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
    /// The artifact's blobs (index and chunks), for later cross-repository mounts.
    #[serde(skip)]
    pub blobs: Vec<String>,
}

pub struct PullOptions<'a> {
    pub show_progress: bool,
    pub cancel: Option<&'a AtomicI32>,
}

struct Shared<'a> {
    objects: &'a ObjectStore,
    target: &'a Target,
    handle: tokio::runtime::Handle,
    plan: &'a Plan,
    /// The file contents the layer has.
    needed: &'a HashSet<Digest>,
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

/// Reads what the download task sends (on the thread that takes the chunk apart).
struct ChannelReader<'a> {
    rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    cur: bytes::Bytes,
    cancel: Option<&'a AtomicI32>,
}

impl Read for ChannelReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            if self.cancel.is_some_and(|c| c.load(Ordering::Relaxed) != 0) {
                // Not ErrorKind::Interrupted: readers retry on that.
                return Err(io::Error::other("interrupted"));
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
                                return Fetched::Mismatch(sha256_name(sha));
                            }
                            return Fetched::Failed(OciDistributionError::IoError(e));
                        }
                    }
                }
                Fetched::Done(sha256_name(sha), n)
            });
            let mut reader = ChannelReader {
                rx,
                cur: bytes::Bytes::new(),
                cancel: self.cancel,
            };
            let parsed = consume(&mut reader);
            drop(reader);
            if self.cancel.is_some_and(|c| c.load(Ordering::Relaxed) != 0) {
                task.abort();
                return Err(RemoteError::Interrupted);
            }
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

    /// Whether the store has every needed file a chunk carries.
    fn all_present(&self, files: &[super::plan::FileRef]) -> bool {
        files
            .iter()
            .filter(|f| self.needed.contains(&f.blob))
            .all(|f| self.objects.has(ObjectKind::Blob, f.blob))
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
    let Artifact {
        manifest_digest,
        manifest,
        plan,
        layers,
        index_size,
    } = fetch(&rt, target)?;
    let mut blobs: Vec<String> = layers.iter().map(|(_, d, _)| d.clone()).collect();
    blobs.push(manifest.index.0.clone());
    let decoded = plan.decoded();
    // Trees are small: store them all now (each is named by its own hash).
    for t in decoded.values() {
        objects.put_tree(t)?;
    }
    let files = super::plan::files_of(plan.root, &decoded);
    let total: u64 = files.iter().map(|f| f.size).sum();
    let needed: HashSet<Digest> = files.iter().map(|f| f.blob).collect();

    let shared = Shared {
        objects,
        target,
        handle: rt.handle().clone(),
        plan: &plan,
        needed: &needed,
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

    // Work: files chunks one by one; the parts of a file together, in order.
    let mut work: Vec<Vec<usize>> = Vec::new();
    for (i, c) in plan.chunks.iter().enumerate() {
        let continues = matches!(c, ChunkSpec::Part { offset, .. } if *offset > 0);
        match work.last_mut() {
            Some(w) if continues => w.push(i),
            _ => work.push(vec![i]),
        }
    }
    let result = super::for_each_parallel(
        work,
        &shared.abort,
        |w| shared.check().and_then(|_| pull_unit(&shared, &w)),
        |_| {},
    );
    shared.progress.finish();
    result?;
    // Every file of the layer must now be in the store (the index said which chunk carries
    // it; this is the check that they all did).
    if let Some(f) = files
        .iter()
        .find(|f| !objects.has(ObjectKind::Blob, f.blob))
    {
        return Err(RemoteError::Corrupt {
            reference: target.shown.clone(),
            digest: manifest_digest.clone(),
            detail: format!("no chunk delivered {}", String::from_utf8_lossy(&f.path)),
        });
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
        blobs,
    })
}

fn pull_unit(sh: &Shared<'_>, unit: &[usize]) -> Result<(), RemoteError> {
    let Some(&first) = unit.first() else {
        return Ok(());
    };
    let progress = |n: u64| sh.progress.inc(n);
    match &sh.plan.chunks[first] {
        ChunkSpec::Files(files) => {
            if sh.all_present(files) {
                sh.skipped.fetch_add(1, Ordering::Relaxed);
                sh.progress.inc(
                    files
                        .iter()
                        .filter(|f| sh.needed.contains(&f.blob))
                        .map(|f| f.size)
                        .sum(),
                );
                return Ok(());
            }
            let (_, digest, size) = &sh.layers[first];
            let got = sh.fetch(digest, *size, &mut |r| {
                chunk::ingest_files(sh.objects, files, sh.needed, r, &progress)
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
