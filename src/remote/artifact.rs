//! The artifact a reference names: its manifest and its tree index, checked.

use std::io::Read;

use oci_client::RegistryOperation;
use oci_client::errors::OciDistributionError;

use super::plan::{ChunkSpec, Plan};
use super::{
    ANN_ROOT, ARTIFACT_TYPE, FILES_MEDIA_TYPE, INDEX_MEDIA_TYPE, MANIFEST_MEDIA_TYPE,
    MAX_INDEX_BYTES, MAX_MANIFEST_BYTES, PART_MEDIA_TYPE, RemoteError, Target, sha256_digest,
    with_retries,
};
use crate::layer::Digest;

/// The parsed manifest: the index's descriptor and the chunks'.
pub struct Manifest {
    pub root: Digest,
    /// The index blob: sha256 digest and size.
    pub index: (String, u64),
    /// The chunks: media type, sha256 digest, size.
    pub layers: Vec<(String, String, u64)>,
}

fn foreign(t: &Target, detail: String) -> RemoteError {
    RemoteError::Foreign {
        reference: t.shown.clone(),
        detail,
    }
}

pub fn parse_manifest(t: &Target, body: &[u8]) -> Result<Manifest, RemoteError> {
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

/// A reference's artifact, fetched and checked.
pub struct Artifact {
    pub manifest_digest: String,
    pub manifest: Manifest,
    pub plan: Plan,
    /// The chunks' descriptors (media type, sha256 digest, size), one per chunk of the plan.
    pub layers: Vec<(String, String, u64)>,
    pub index_size: u64,
}

/// Fetches the manifest `target` names and its index, and checks that they agree.
pub fn fetch(rt: &tokio::runtime::Runtime, target: &Target) -> Result<Artifact, RemoteError> {
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
        return Err(RemoteError::CorruptManifest {
            reference: target.shown.clone(),
            detail: format!("the registry sent one with digest {manifest_digest}"),
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
            ChunkSpec::Files(_) => FILES_MEDIA_TYPE,
            ChunkSpec::Part { .. } => PART_MEDIA_TYPE,
        };
        if l.0 != want {
            return Err(foreign(
                target,
                format!("a chunk is {}, where its index says {want}", l.0),
            ));
        }
    }
    Ok(Artifact {
        manifest_digest,
        manifest,
        plan,
        layers,
        index_size,
    })
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
