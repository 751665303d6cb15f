//! Push: a stored layer -> chunks the registry lacks, the index, the manifest and its tag.
//!
//! Per chunk: the store remembers the sha256 of chunks built before (by a key of what they
//! hold), so an unchanged chunk costs one HEAD and no compression. A chunk the registry lacks
//! is built into an unnamed temp file and streamed from it (never held in memory), or mounted
//! from another repository of the same registry known to hold it.

use std::collections::BTreeMap;
use std::io::Seek;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};

use futures_util::TryStreamExt;
use oci_client::errors::OciDistributionError;
use oci_client::{Client, Reference, RegistryOperation};

use super::chunk::{self, Built};
use super::plan::{Base, ChunkSpec, Plan};
use super::{
    ANN_BLOB, ANN_BYTES, ANN_DIGEST, ANN_FILES, ANN_PATH, ANN_RANGE, ANN_ROOT, ARTIFACT_TYPE,
    CHUNK_ZSTD_LEVEL, FILES_MEDIA_TYPE, INDEX_MEDIA_TYPE, MANIFEST_MEDIA_TYPE, PART_MEDIA_TYPE,
    RemoteError, Target, sha256_digest, with_retries,
};
use crate::layer::progress::Progress;
use crate::layer::{Digest, LayerError, ObjectStore, tree_stats};
use crate::store::Store;

/// What a push did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PushReport {
    pub reference: String,
    /// `sha256:<hex>` of the manifest pushed.
    pub manifest_digest: String,
    /// The layer's blake3 root.
    pub layer: String,
    pub chunks: usize,
    /// Blobs (chunks and the index) uploaded, mounted from another repository, and found in
    /// the registry already.
    pub blobs_uploaded: u64,
    pub blobs_mounted: u64,
    pub blobs_reused: u64,
    pub bytes_uploaded: u64,
    /// Chunks compressed in this push (the others were known by their key).
    pub chunks_built: u64,
    /// Compressed size of the whole artifact (index and chunks).
    pub artifact_bytes: u64,
}

/// How a push runs.
pub struct PushOptions<'a> {
    pub show_progress: bool,
    pub cancel: Option<&'a AtomicI32>,
}

#[derive(Debug, Clone)]
struct Desc {
    media_type: &'static str,
    digest: String,
    size: u64,
    annotations: BTreeMap<String, String>,
}

/// Outcome of one blob.
#[derive(Clone, Copy)]
enum Moved {
    Reused,
    Mounted,
    Uploaded(u64),
}

struct Shared<'a> {
    store: &'a Store,
    objects: &'a ObjectStore,
    target: &'a Target,
    handle: tokio::runtime::Handle,
    tmp: std::path::PathBuf,
    progress: Progress,
    abort: AtomicBool,
    cancel: Option<&'a AtomicI32>,
    uploaded: AtomicU64,
    mounted: AtomicU64,
    reused: AtomicU64,
    bytes_uploaded: AtomicU64,
    built: AtomicU64,
}

impl Shared<'_> {
    fn check(&self) -> Result<(), RemoteError> {
        if self.cancel.is_some_and(|c| c.load(Ordering::Relaxed) != 0) {
            return Err(RemoteError::Interrupted);
        }
        if self.abort.load(Ordering::Relaxed) {
            // Another worker failed; its error is the one reported.
            return Err(RemoteError::Interrupted);
        }
        Ok(())
    }

    fn client(&self) -> &Client {
        &self.target.client
    }

    fn reference(&self) -> &Reference {
        &self.target.reference
    }

    fn exists(&self, digest: &str) -> Result<bool, RemoteError> {
        self.handle
            .block_on(with_retries("HEAD blob", || {
                self.client().blob_exists(self.reference(), digest)
            }))
            .map_err(|e| self.target.error(e))
    }

    /// Mounts `digest` from another repository of the registry known to hold it.
    fn try_mount(&self, digest: &str) -> bool {
        let sources = self
            .store
            .remote_blob_sources(self.target.registry(), digest, self.target.repository())
            .unwrap_or_default();
        for repo in sources {
            let Ok(from) = format!("{}/{}", self.target.registry(), repo).parse::<Reference>()
            else {
                continue;
            };
            let res =
                self.handle
                    .block_on(self.client().mount_blob(self.reference(), &from, digest));
            match res {
                Ok(()) => return true,
                Err(e) => {
                    tracing::debug!(digest, from = repo, error = %e, "cross-repository mount refused")
                }
            }
        }
        false
    }

    /// Uploads a built blob, streaming it from its file.
    fn upload(&self, built: &Built) -> Result<(), RemoteError> {
        self.handle
            .block_on(with_retries("upload blob", || {
                let file = built.file.try_clone().and_then(|mut f| {
                    f.rewind()?;
                    Ok(f)
                });
                let size = built.size;
                let digest = built.digest.clone();
                async move {
                    let file = tokio::fs::File::from_std(file?);
                    let stream = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20)
                        .map_err(OciDistributionError::IoError);
                    self.client()
                        .push_blob_stream(self.reference(), stream, &digest, Some(size))
                        .await
                }
            }))
            .map_err(|e| self.target.error(e))?;
        Ok(())
    }

    /// Puts a built blob in the registry unless it is there: HEAD, mount, else upload.
    fn place(&self, built: &Built) -> Result<Moved, RemoteError> {
        if self.exists(&built.digest)? {
            return Ok(Moved::Reused);
        }
        if self.try_mount(&built.digest) {
            return Ok(Moved::Mounted);
        }
        self.upload(built)?;
        Ok(Moved::Uploaded(built.size))
    }

    fn count(&self, m: Moved) {
        match m {
            Moved::Reused => self.reused.fetch_add(1, Ordering::Relaxed),
            Moved::Mounted => self.mounted.fetch_add(1, Ordering::Relaxed),
            Moved::Uploaded(n) => {
                self.bytes_uploaded.fetch_add(n, Ordering::Relaxed);
                self.uploaded.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

/// One unit of work: a chunk kept from the base artifact (its digest and size), a new files
/// chunk, or the new parts of one big file (read in order).
enum Work {
    Reused(usize, String, u64),
    Files(usize),
    Parts(Vec<usize>),
}

/// The artifact the reference holds now, to keep its chunks; `None` when there is none (or
/// it cannot be read: the push then cuts afresh).
fn fetch_base(rt: &tokio::runtime::Runtime, target: &Target) -> Option<Base> {
    if target.reference.tag().is_none() && target.reference.digest().is_some() {
        return None;
    }
    match super::artifact::fetch(rt, target) {
        Ok(a) => Some(Base {
            plan: a.plan,
            layers: a.layers.into_iter().map(|(_, d, s)| (d, s)).collect(),
        }),
        Err(RemoteError::NotFound { .. }) => None,
        Err(e) => {
            tracing::info!(error = %e, "the reference's artifact cannot be used as a base");
            None
        }
    }
}

/// The first kept chunk the registry no longer has, if any (HEADs, a few at a time).
fn missing_reused(
    rt: &tokio::runtime::Runtime,
    target: &Target,
    reuse: &[Option<(String, u64)>],
) -> Result<Option<String>, RemoteError> {
    use futures_util::StreamExt;
    let digests: Vec<&String> = reuse.iter().flatten().map(|(d, _)| d).collect();
    let results: Vec<(String, Result<bool, OciDistributionError>)> = rt.block_on(
        futures_util::stream::iter(digests)
            .map(|d| async move {
                let r = with_retries("HEAD blob", || {
                    target.client.blob_exists(&target.reference, d)
                })
                .await;
                (d.clone(), r)
            })
            .buffer_unordered(8)
            .collect(),
    );
    for (d, r) in results {
        if !r.map_err(|e| target.error(e))? {
            return Ok(Some(d));
        }
    }
    Ok(None)
}

/// A chunk's descriptor.
fn describe(c: &ChunkSpec, digest: String, size: u64) -> Desc {
    let mut annotations = BTreeMap::new();
    annotations.insert(ANN_PATH.to_string(), show_path(&c.path()));
    annotations.insert(
        ANN_DIGEST.to_string(),
        format!("blake3:{}", c.content_digest().to_hex()),
    );
    let media_type = match c {
        ChunkSpec::Files(_) => FILES_MEDIA_TYPE,
        ChunkSpec::Part {
            blob, offset, len, ..
        } => {
            annotations.insert(ANN_BLOB.to_string(), format!("blake3:{}", blob.to_hex()));
            annotations.insert(ANN_RANGE.to_string(), format!("{offset}+{len}"));
            PART_MEDIA_TYPE
        }
    };
    Desc {
        media_type,
        digest,
        size,
        annotations,
    }
}

/// Pushes the stored layer `root` to `target`. The caller holds the objects' shared lock.
pub fn push(
    store: &Store,
    objects: &ObjectStore,
    root: Digest,
    target: &Target,
    opts: &PushOptions<'_>,
) -> Result<PushReport, RemoteError> {
    let rt = super::runtime()?;
    // Credentials and reachability first: one clear error before any work.
    rt.block_on(with_retries("authenticate", || {
        target
            .client
            .auth(&target.reference, &target.auth, RegistryOperation::Push)
    }))
    .map_err(|e| target.error(e))?;

    let (trees, decoded) = Plan::read_trees(objects, root)?;
    let stats = tree_stats(objects, root)?;
    let base = fetch_base(&rt, target);
    let (mut plan, mut reuse) = Plan::build(root, trees.clone(), &decoded, base.as_ref());
    // A kept chunk must still be in the registry (its files are not all in this store, so it
    // could not be built again): if one is gone, plan afresh.
    if let Some(gone) = missing_reused(&rt, target, &reuse)? {
        tracing::info!(
            digest = gone,
            "a chunk of the reference's artifact is gone; cutting afresh"
        );
        (plan, reuse) = Plan::build(root, trees, &decoded, None);
    }
    let encoding = format!("zstd-{CHUNK_ZSTD_LEVEL}");
    let keys: Vec<String> = plan
        .chunks
        .iter()
        .map(|c| Plan::chunk_key(c, &encoding))
        .collect();

    let mut work = Vec::new();
    let mut i = 0;
    while i < plan.chunks.len() {
        if let Some((digest, size)) = &reuse[i] {
            work.push(Work::Reused(i, digest.clone(), *size));
            i += 1;
            continue;
        }
        match &plan.chunks[i] {
            ChunkSpec::Files(_) => {
                work.push(Work::Files(i));
                i += 1;
            }
            ChunkSpec::Part { blob, .. } => {
                let mut parts = vec![i];
                i += 1;
                while let Some(ChunkSpec::Part {
                    blob: b, offset, ..
                }) = plan.chunks.get(i)
                {
                    if b != blob || *offset == 0 || reuse[i].is_some() {
                        break;
                    }
                    parts.push(i);
                    i += 1;
                }
                work.push(Work::Parts(parts));
            }
        }
    }

    let shared = Shared {
        store,
        objects,
        target,
        handle: rt.handle().clone(),
        tmp: store.root().join("tmp"),
        progress: Progress::bytes("pushing", stats.size_bytes, opts.show_progress),
        abort: AtomicBool::new(false),
        cancel: opts.cancel,
        uploaded: AtomicU64::new(0),
        mounted: AtomicU64::new(0),
        reused: AtomicU64::new(0),
        bytes_uploaded: AtomicU64::new(0),
        built: AtomicU64::new(0),
    };
    let descs: Mutex<Vec<Option<Desc>>> = Mutex::new(vec![None; plan.chunks.len()]);
    let result = super::for_each_parallel(
        work,
        &shared.abort,
        |w| {
            shared.check()?;
            match w {
                Work::Reused(i, digest, size) => {
                    shared.count(Moved::Reused);
                    shared.progress.inc(plan.chunks[i].bytes());
                    Ok(vec![(i, describe(&plan.chunks[i], digest, size))])
                }
                Work::Files(i) => push_files(&shared, &plan, i, &keys[i]),
                Work::Parts(idx) => push_parts(&shared, &plan, &idx, &keys),
            }
        },
        |done| {
            if let Ok(mut d) = descs.lock() {
                for (i, desc) in done {
                    d[i] = Some(desc);
                }
            }
        },
    );
    shared.progress.finish();
    result?;
    let descs: Vec<Desc> = descs
        .into_inner()
        .unwrap_or_default()
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| {
            RemoteError::Layer(LayerError::Invalid(
                "internal: a chunk was not pushed".into(),
            ))
        })?;

    // The index, then the manifest.
    let index = zstd::bulk::compress(&plan.encode_index(), CHUNK_ZSTD_LEVEL).map_err(|e| {
        RemoteError::Layer(LayerError::Invalid(format!(
            "cannot compress the index: {e}"
        )))
    })?;
    let index_digest = sha256_digest(&index);
    let index_size = index.len() as u64;
    if shared.exists(&index_digest)? {
        shared.count(Moved::Reused);
    } else if shared.try_mount(&index_digest) {
        shared.count(Moved::Mounted);
    } else {
        rt.block_on(with_retries("upload index", || {
            target
                .client
                .push_blob(&target.reference, index.clone(), &index_digest)
        }))
        .map_err(|e| target.error(e))?;
        shared.count(Moved::Uploaded(index_size));
    }

    let mut layers: Vec<serde_json::Value> = descs.iter().map(desc_json).collect();
    if layers.is_empty() {
        // OCI 1.1: an artifact without layers carries the empty descriptor.
        let empty = b"{}".to_vec();
        let d = sha256_digest(&empty);
        if !shared.exists(&d)? {
            rt.block_on(with_retries("upload empty blob", || {
                target
                    .client
                    .push_blob(&target.reference, empty.clone(), &d)
            }))
            .map_err(|e| target.error(e))?;
        }
        layers.push(serde_json::json!({
            "mediaType": "application/vnd.oci.empty.v1+json",
            "digest": d,
            "size": 2,
        }));
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": {
            "mediaType": INDEX_MEDIA_TYPE,
            "digest": index_digest,
            "size": index_size,
        },
        "layers": layers,
        "annotations": {
            ANN_ROOT: format!("blake3:{}", root.to_hex()),
            ANN_FILES: stats.files.to_string(),
            ANN_BYTES: stats.size_bytes.to_string(),
        },
    });
    let body = serde_json::to_vec(&manifest).map_err(|e| {
        RemoteError::Layer(LayerError::Invalid(format!(
            "cannot encode the manifest: {e}"
        )))
    })?;
    let manifest_digest = sha256_digest(&body);
    let content_type = http::HeaderValue::from_static(MANIFEST_MEDIA_TYPE);
    rt.block_on(with_retries("push manifest", || {
        target
            .client
            .push_manifest_raw(&target.reference, body.clone(), content_type.clone())
    }))
    .map_err(|e| target.error(e))?;

    let mut digests: Vec<String> = descs.iter().map(|d| d.digest.clone()).collect();
    digests.push(index_digest);
    if let Err(e) = store.note_remote_blobs(target.registry(), target.repository(), &digests) {
        tracing::warn!(error = %e, "cannot remember where the blobs were pushed");
    }
    let artifact_bytes = index_size + descs.iter().map(|d| d.size).sum::<u64>();
    Ok(PushReport {
        reference: target.shown.clone(),
        manifest_digest,
        layer: root.to_hex(),
        chunks: descs.len(),
        blobs_uploaded: shared.uploaded.load(Ordering::Relaxed),
        blobs_mounted: shared.mounted.load(Ordering::Relaxed),
        blobs_reused: shared.reused.load(Ordering::Relaxed),
        bytes_uploaded: shared.bytes_uploaded.load(Ordering::Relaxed),
        chunks_built: shared.built.load(Ordering::Relaxed),
        artifact_bytes,
    })
}

fn desc_json(d: &Desc) -> serde_json::Value {
    serde_json::json!({
        "mediaType": d.media_type,
        "digest": d.digest,
        "size": d.size,
        "annotations": d.annotations,
    })
}

fn show_path(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

fn push_files(
    sh: &Shared<'_>,
    plan: &Plan,
    i: usize,
    key: &str,
) -> Result<Vec<(usize, Desc)>, RemoteError> {
    let spec = &plan.chunks[i];
    let ChunkSpec::Files(files) = spec else {
        return Err(RemoteError::Layer(LayerError::Invalid(
            "internal: not a files chunk".into(),
        )));
    };
    if let Some((digest, size)) = sh.store.remote_chunk(key)?
        && sh.exists(&digest)?
    {
        sh.count(Moved::Reused);
        sh.progress.inc(spec.bytes());
        return Ok(vec![(i, describe(spec, digest, size))]);
    }
    let built = chunk::build_files(sh.objects, files, &sh.tmp)?;
    sh.built.fetch_add(1, Ordering::Relaxed);
    sh.store.set_remote_chunk(key, &built.digest, built.size)?;
    sh.check()?;
    let moved = sh.place(&built)?;
    sh.count(moved);
    sh.progress.inc(spec.bytes());
    Ok(vec![(i, describe(spec, built.digest.clone(), built.size))])
}

fn push_parts(
    sh: &Shared<'_>,
    plan: &Plan,
    idx: &[usize],
    keys: &[String],
) -> Result<Vec<(usize, Desc)>, RemoteError> {
    let specs: Vec<(&[u8], Digest, u64, u64)> = idx
        .iter()
        .filter_map(|i| match &plan.chunks[*i] {
            ChunkSpec::Part {
                path,
                blob,
                offset,
                len,
            } => Some((path.as_slice(), *blob, *offset, *len)),
            _ => None,
        })
        .collect();
    let Some(&(_, blob, _, _)) = specs.first() else {
        return Ok(Vec::new());
    };
    let desc = |k: usize, digest: String, size: u64| describe(&plan.chunks[idx[k]], digest, size);
    // Parts known by their key and present in the registry need nothing.
    let mut out: Vec<Option<Desc>> = vec![None; idx.len()];
    for (k, i) in idx.iter().enumerate() {
        if let Some((digest, size)) = sh.store.remote_chunk(&keys[*i])?
            && sh.exists(&digest)?
        {
            sh.count(Moved::Reused);
            sh.progress.inc(specs[k].3);
            out[k] = Some(desc(k, digest, size));
        }
    }
    if out.iter().any(|d| d.is_none()) {
        let ranges: Vec<(u64, u64)> = specs.iter().map(|s| (s.2, s.3)).collect();
        let missing: Vec<bool> = out.iter().map(|d| d.is_none()).collect();
        let mut result: Result<(), RemoteError> = Ok(());
        let r = chunk::build_parts(
            sh.objects,
            blob,
            &ranges,
            &sh.tmp,
            &|k| missing[k],
            &mut |k, built| {
                sh.built.fetch_add(1, Ordering::Relaxed);
                let step = (|| {
                    sh.store
                        .set_remote_chunk(&keys[idx[k]], &built.digest, built.size)?;
                    sh.check()?;
                    let moved = sh.place(&built)?;
                    sh.count(moved);
                    sh.progress.inc(specs[k].3);
                    out[k] = Some(desc(k, built.digest.clone(), built.size));
                    Ok::<(), RemoteError>(())
                })();
                if let Err(e) = step {
                    result = Err(e);
                    return Err(LayerError::Interrupted);
                }
                Ok(())
            },
        );
        result?;
        r?;
    }
    Ok(idx
        .iter()
        .zip(out)
        .filter_map(|(i, d)| d.map(|d| (*i, d)))
        .collect())
}
