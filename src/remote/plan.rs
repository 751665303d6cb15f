//! How a layer is cut into registry chunks, and the tree index (the artifact's config blob).
//!
//! A chunk carries file contents only; the index carries everything else (every tree object,
//! so every name, mode, symlink and directory) and says which chunk carries which file. Rules
//! (docs/LAYER-FORMAT.md, "Registry artifacts"):
//!
//! - **Reuse.** When the reference already holds an artifact (the base), each of its chunks is
//!   kept as it is, byte for byte, if at least [`KEEP_LIVE`] of its bytes are files the new
//!   layer still has. So a re-push after a few changed files uploads one new chunk (those
//!   files) and the index, wherever the files are, and the registry never holds more than
//!   about a third more than the layer needs.
//! - **New chunks.** The files no kept chunk carries, depth first in name order, are grouped:
//!   a file heavier than [`CHUNK_MAX`] becomes parts of [`CHUNK_MAX`] bytes; a group closes
//!   before a file that would take it past [`CHUNK_MAX`], and after a file whose cut hash (a
//!   blake3 of its path) falls under its weight's share of [`CHUNK_TARGET`]. Cuts depend on
//!   paths, not on what came before, so a first push of two trees that differ in one subtree
//!   gives the same chunks, byte for byte, outside the chunk or two around the change: the
//!   registry already has them.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::layer::format::{Digest, Kind, Tree};
use crate::layer::{LayerError, ObjectStore};

/// The most file bytes (plus per-file weight) one chunk holds.
pub const CHUNK_MAX: u64 = 64 << 20;
/// The average size of a group of files.
pub const CHUNK_TARGET: u64 = 32 << 20;
/// What a file weighs besides its contents: about a tar header.
pub const ENTRY_WEIGHT: u64 = 512;
/// The share of a base chunk's bytes that must still be live for it to be kept (3/4).
pub const KEEP_LIVE: (u64, u64) = (3, 4);

/// The first 16 bytes of a (decompressed) tree index.
pub const INDEX_MAGIC: &[u8; 16] = b"cachefs-index\0\0\x01";

/// One file a chunk carries: where the tar has it, and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRef {
    pub path: Vec<u8>,
    pub blob: Digest,
    pub size: u64,
    pub mode: u32,
}

/// One chunk: what it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkSpec {
    /// Whole files, as a tar in this order.
    Files(Vec<FileRef>),
    /// `len` bytes from `offset` of the blob `blob` (a file bigger than a chunk) at `path`.
    Part {
        path: Vec<u8>,
        blob: Digest,
        offset: u64,
        len: u64,
    },
}

impl ChunkSpec {
    /// The directory this chunk's files share (or the file a part is of), for messages and
    /// annotations.
    pub fn path(&self) -> Vec<u8> {
        match self {
            ChunkSpec::Files(files) => {
                let mut common: Option<&[u8]> = None;
                for f in files {
                    let dir = match f.path.iter().rposition(|b| *b == b'/') {
                        Some(i) => &f.path[..i],
                        None => &f.path[..0],
                    };
                    common = Some(match common {
                        None => dir,
                        Some(c) => common_dir(c, dir),
                    });
                }
                common.unwrap_or_default().to_vec()
            }
            ChunkSpec::Part { path, .. } => path.clone(),
        }
    }

    /// The file bytes this chunk carries.
    pub fn bytes(&self) -> u64 {
        match self {
            ChunkSpec::Files(files) => files.iter().map(|f| f.size).sum(),
            ChunkSpec::Part { len, .. } => *len,
        }
    }

    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            ChunkSpec::Files(files) => {
                out.push(1);
                out.extend_from_slice(&(files.len() as u32).to_le_bytes());
                for f in files {
                    out.push(1);
                    put_bytes(out, &f.path);
                    out.extend_from_slice(&f.blob.0);
                    out.extend_from_slice(&f.size.to_le_bytes());
                    out.extend_from_slice(&f.mode.to_le_bytes());
                }
            }
            ChunkSpec::Part {
                path,
                blob,
                offset,
                len,
            } => {
                out.push(2);
                put_bytes(out, path);
                out.extend_from_slice(&blob.0);
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&len.to_le_bytes());
            }
        }
    }

    /// The blake3 of this chunk's record with every file spelled out (the `0x01` form): it
    /// names exactly the bytes of the chunk's tar (or part) before compression. The
    /// `io.cachefs.chunk.digest` annotation.
    pub fn content_digest(&self) -> Digest {
        let mut b = Vec::new();
        self.encode_into(&mut b);
        Digest::of(&b)
    }
}

/// The longest common leading run of whole path components.
fn common_dir<'a>(a: &'a [u8], b: &[u8]) -> &'a [u8] {
    let mut end = 0;
    let mut i = 0;
    while i < a.len() && i < b.len() && a[i] == b[i] {
        i += 1;
        if (i == a.len() || a[i] == b'/') && (i == b.len() || b[i] == b'/') {
            end = i;
        }
    }
    &a[..end]
}

/// Tree objects by digest, encoded.
pub type Encoded = BTreeMap<Digest, Vec<u8>>;

/// A layer ready to be shipped: its root, every tree object, and its chunks in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub root: Digest,
    /// Tree objects by digest (their canonical encodings).
    pub trees: BTreeMap<Digest, Vec<u8>>,
    pub chunks: Vec<ChunkSpec>,
}

/// The artifact a reference holds now: its index and its chunks' descriptors (sha256 digest
/// and size, in order).
pub struct Base {
    pub plan: Plan,
    pub layers: Vec<(String, u64)>,
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(dir.len() + name.len() + 1);
    if !dir.is_empty() {
        p.extend_from_slice(dir);
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// Whether a group should close after a file of weight `weight` at `path`.
fn cut_after(path: &[u8], weight: u64) -> bool {
    let mut h = blake3::Hasher::new();
    h.update(b"cachefs chunk cut v1\0");
    h.update(path);
    let mut first = [0u8; 8];
    first.copy_from_slice(&h.finalize().as_bytes()[..8]);
    // Cut with probability weight / TARGET: h / 2^64 < weight / TARGET.
    (u64::from_le_bytes(first) as u128) * (CHUNK_TARGET as u128) < (weight as u128) << 64
}

/// Every file of the tree `root`, depth first in name order, with its path.
pub fn files_of(root: Digest, decoded: &HashMap<Digest, Tree>) -> Vec<FileRef> {
    let mut out = Vec::new();
    let mut stack: Vec<(Vec<u8>, Digest)> = vec![(Vec::new(), root)];
    while let Some((dir, d)) = stack.pop() {
        let Some(t) = decoded.get(&d) else { continue };
        // Files and subdirectories in one name order: push subdirectories in reverse so
        // they pop in order, after the files of this directory that sort before them.
        let mut pending: Vec<(Vec<u8>, Digest)> = Vec::new();
        let mut here = Vec::new();
        for e in &t.entries {
            match e.kind {
                Kind::File => here.push(FileRef {
                    path: join(&dir, &e.name),
                    blob: e.hash,
                    size: e.size,
                    mode: e.mode,
                }),
                Kind::Dir => pending.push((join(&dir, &e.name), e.hash)),
                _ => {}
            }
        }
        out.extend(here);
        for p in pending.into_iter().rev() {
            stack.push(p);
        }
    }
    out
}

impl Plan {
    /// Reads every tree of the layer `root` from the store.
    pub fn read_trees(
        objects: &ObjectStore,
        root: Digest,
    ) -> Result<(Encoded, HashMap<Digest, Tree>), LayerError> {
        let mut trees = BTreeMap::new();
        let mut decoded = HashMap::new();
        let mut stack = vec![root];
        while let Some(d) = stack.pop() {
            if decoded.contains_key(&d) {
                continue;
            }
            let t = objects.read_tree(d)?;
            for e in &t.entries {
                if e.kind == Kind::Dir && !decoded.contains_key(&e.hash) {
                    stack.push(e.hash);
                }
            }
            trees.insert(d, t.encode());
            decoded.insert(d, t);
        }
        Ok((trees, decoded))
    }

    /// Plans the artifact of `root`: kept chunks of `base` first, then new ones. Returns the
    /// plan and, per chunk, the base descriptor it reuses (`None`: a new chunk).
    pub fn build(
        root: Digest,
        trees: BTreeMap<Digest, Vec<u8>>,
        decoded: &HashMap<Digest, Tree>,
        base: Option<&Base>,
    ) -> (Plan, Vec<Option<(String, u64)>>) {
        let files = files_of(root, decoded);
        let needed: HashMap<Digest, u64> = files.iter().map(|f| (f.blob, f.size)).collect();
        let mut covered: HashSet<Digest> = HashSet::new();
        let mut chunks = Vec::new();
        let mut reuse = Vec::new();
        if let Some(base) = base {
            keep_from_base(base, &needed, &mut covered, &mut chunks, &mut reuse);
        }
        let mut group: Vec<FileRef> = Vec::new();
        let mut group_weight = 0u64;
        let flush = |group: &mut Vec<FileRef>,
                     w: &mut u64,
                     chunks: &mut Vec<ChunkSpec>,
                     reuse: &mut Vec<Option<(String, u64)>>| {
            if !group.is_empty() {
                chunks.push(ChunkSpec::Files(std::mem::take(group)));
                reuse.push(None);
            }
            *w = 0;
        };
        for f in files {
            if !covered.insert(f.blob) {
                continue;
            }
            let w = f.size + ENTRY_WEIGHT;
            if w > CHUNK_MAX {
                flush(&mut group, &mut group_weight, &mut chunks, &mut reuse);
                let mut offset = 0;
                while offset < f.size {
                    let len = CHUNK_MAX.min(f.size - offset);
                    chunks.push(ChunkSpec::Part {
                        path: f.path.clone(),
                        blob: f.blob,
                        offset,
                        len,
                    });
                    reuse.push(None);
                    offset += len;
                }
                continue;
            }
            if group_weight + w > CHUNK_MAX {
                flush(&mut group, &mut group_weight, &mut chunks, &mut reuse);
            }
            let cut = cut_after(&f.path, w);
            group.push(f);
            group_weight += w;
            if cut {
                flush(&mut group, &mut group_weight, &mut chunks, &mut reuse);
            }
        }
        flush(&mut group, &mut group_weight, &mut chunks, &mut reuse);
        (
            Plan {
                root,
                trees,
                chunks,
            },
            reuse,
        )
    }

    /// The index: what the artifact's config blob holds (before zstd).
    pub fn encode_index(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(INDEX_MAGIC);
        out.extend_from_slice(&self.root.0);
        out.extend_from_slice(&(self.trees.len() as u32).to_le_bytes());
        for bytes in self.trees.values() {
            put_bytes(&mut out, bytes);
        }
        out.extend_from_slice(&(self.chunks.len() as u32).to_le_bytes());
        // A file of the tree is written as its number in tree order: a chunk's record then
        // costs a few bytes a file instead of its path and blake3 again.
        let decoded = self.decoded();
        let tree_files = files_of(self.root, &decoded);
        let numbers: HashMap<&[u8], (u32, &FileRef)> = tree_files
            .iter()
            .enumerate()
            .map(|(i, f)| (f.path.as_slice(), (i as u32, f)))
            .collect();
        for c in &self.chunks {
            let ChunkSpec::Files(files) = c else {
                c.encode_into(&mut out);
                continue;
            };
            out.push(1);
            out.extend_from_slice(&(files.len() as u32).to_le_bytes());
            for f in files {
                match numbers.get(f.path.as_slice()) {
                    Some((i, t)) if *t == f => {
                        out.push(0);
                        out.extend_from_slice(&i.to_le_bytes());
                    }
                    _ => {
                        out.push(1);
                        put_bytes(&mut out, &f.path);
                        out.extend_from_slice(&f.blob.0);
                        out.extend_from_slice(&f.size.to_le_bytes());
                        out.extend_from_slice(&f.mode.to_le_bytes());
                    }
                }
            }
        }
        out
    }

    /// Decodes and checks an index: every tree object hashes to its name and they are
    /// exactly the trees under the root; chunk paths are relative and clean; every file of
    /// the tree is carried by a chunk (whole, or by parts covering it in order).
    pub fn decode_index(bytes: &[u8]) -> Result<Plan, String> {
        let mut r = Cursor { b: bytes, at: 0 };
        if r.take(16)? != INDEX_MAGIC {
            return Err("it is not a cachefs tree index (wrong magic bytes)".into());
        }
        let root = Digest(r.array()?);
        let n = r.u32()? as usize;
        let mut trees = BTreeMap::new();
        let mut decoded = HashMap::new();
        let mut last: Option<Digest> = None;
        for _ in 0..n {
            let b = r.bytes()?;
            let tree = Tree::decode(b).map_err(|e| format!("a tree object is invalid: {e}"))?;
            let d = Digest::of(b);
            if last.is_some_and(|l| l >= d) {
                return Err("its tree objects are not in digest order".into());
            }
            last = Some(d);
            trees.insert(d, b.to_vec());
            decoded.insert(d, tree);
        }
        let mut reached = HashSet::new();
        let mut stack = vec![root];
        while let Some(d) = stack.pop() {
            if !reached.insert(d) {
                continue;
            }
            let t = decoded
                .get(&d)
                .ok_or_else(|| format!("it lacks the tree object {d}"))?;
            stack.extend(
                t.entries
                    .iter()
                    .filter(|e| e.kind == Kind::Dir)
                    .map(|e| e.hash),
            );
        }
        if reached.len() != decoded.len() {
            return Err("it holds tree objects its root does not reach".into());
        }
        let tree_files = files_of(root, &decoded);
        let by_path: HashMap<&[u8], &FileRef> =
            tree_files.iter().map(|f| (f.path.as_slice(), f)).collect();
        let n = r.u32()? as usize;
        let mut chunks = Vec::with_capacity(n.min(1 << 16));
        for _ in 0..n {
            let c = match r.u8()? {
                1 => {
                    let k = r.u32()? as usize;
                    let mut files = Vec::with_capacity(k.min(1 << 16));
                    let mut paths = HashSet::new();
                    for _ in 0..k {
                        let f = match r.u8()? {
                            0 => {
                                let i = r.u32()? as usize;
                                tree_files.get(i).cloned().ok_or_else(|| {
                                    format!("a chunk names file number {i} of {}", tree_files.len())
                                })?
                            }
                            1 => {
                                let f = FileRef {
                                    path: clean_path(r.bytes()?)?,
                                    blob: Digest(r.array()?),
                                    size: r.u64()?,
                                    mode: r.u32()?,
                                };
                                if by_path.get(f.path.as_slice()) == Some(&&f) {
                                    return Err(
                                        "a chunk spells out a file of the tree (not canonical)"
                                            .into(),
                                    );
                                }
                                f
                            }
                            t => return Err(format!("unknown file record {t}")),
                        };
                        if !paths.insert(f.path.clone()) {
                            return Err("a chunk lists one path twice".into());
                        }
                        files.push(f);
                    }
                    ChunkSpec::Files(files)
                }
                2 => ChunkSpec::Part {
                    path: clean_path(r.bytes()?)?,
                    blob: Digest(r.array()?),
                    offset: r.u64()?,
                    len: r.u64()?,
                },
                k => return Err(format!("unknown chunk kind {k}")),
            };
            chunks.push(c);
        }
        if r.at != bytes.len() {
            return Err("it has bytes after its last chunk".into());
        }
        let plan = Plan {
            root,
            trees,
            chunks,
        };
        plan.check_coverage(&decoded)?;
        Ok(plan)
    }

    /// Every file of the tree is carried whole by a chunk, or by parts that cover it from 0 to
    /// its size in order.
    fn check_coverage(&self, decoded: &HashMap<Digest, Tree>) -> Result<(), String> {
        let needed: HashMap<Digest, u64> = files_of(self.root, decoded)
            .into_iter()
            .map(|f| (f.blob, f.size))
            .collect();
        let mut covered = HashSet::new();
        let mut parts: HashMap<Digest, u64> = HashMap::new();
        for c in &self.chunks {
            match c {
                ChunkSpec::Files(files) => {
                    for f in files {
                        if needed.get(&f.blob) == Some(&f.size) {
                            covered.insert(f.blob);
                        }
                    }
                }
                ChunkSpec::Part {
                    blob, offset, len, ..
                } => {
                    let next = parts.entry(*blob).or_default();
                    if *offset != *next || *len == 0 {
                        return Err(format!("the parts of blob {blob} are not in order"));
                    }
                    *next += len;
                }
            }
        }
        for (blob, end) in parts {
            if needed.get(&blob) == Some(&end) {
                covered.insert(blob);
            }
        }
        match needed.keys().find(|b| !covered.contains(*b)) {
            Some(b) => Err(format!("no chunk carries the file contents {b}")),
            None => Ok(()),
        }
    }

    /// The decoded trees (for callers that walk them).
    pub fn decoded(&self) -> HashMap<Digest, Tree> {
        self.trees
            .iter()
            .filter_map(|(d, b)| Tree::decode(b).ok().map(|t| (*d, t)))
            .collect()
    }

    /// A key for what a new chunk's bytes depend on: its record and the encoding.
    pub fn chunk_key(c: &ChunkSpec, encoding: &str) -> String {
        let mut h = blake3::Hasher::new();
        h.update(b"cachefs chunk key v1\0");
        h.update(encoding.as_bytes());
        h.update(b"\0");
        let mut spec = Vec::new();
        c.encode_into(&mut spec);
        h.update(&spec);
        h.finalize().to_hex().to_string()
    }
}

/// Keeps the base's chunks that are mostly still live, marking what they carry as covered.
fn keep_from_base(
    base: &Base,
    needed: &HashMap<Digest, u64>,
    covered: &mut HashSet<Digest>,
    chunks: &mut Vec<ChunkSpec>,
    reuse: &mut Vec<Option<(String, u64)>>,
) {
    let mut i = 0;
    let n = base.plan.chunks.len().min(base.layers.len());
    while i < n {
        match &base.plan.chunks[i] {
            ChunkSpec::Files(files) => {
                let total: u64 = files.iter().map(|f| f.size + ENTRY_WEIGHT).sum();
                let mut seen = HashSet::new();
                let live: u64 = files
                    .iter()
                    .filter(|f| {
                        needed.get(&f.blob) == Some(&f.size)
                            && !covered.contains(&f.blob)
                            && seen.insert(f.blob)
                    })
                    .map(|f| f.size + ENTRY_WEIGHT)
                    .sum();
                if live > 0 && live * KEEP_LIVE.1 >= total * KEEP_LIVE.0 {
                    covered.extend(seen);
                    chunks.push(base.plan.chunks[i].clone());
                    reuse.push(Some(base.layers[i].clone()));
                }
                i += 1;
            }
            ChunkSpec::Part { blob, offset, .. } => {
                // The parts of one blob, in order from 0.
                let blob = *blob;
                let start = i;
                let mut end_offset = 0;
                let mut ok = *offset == 0;
                while i < n {
                    match &base.plan.chunks[i] {
                        ChunkSpec::Part {
                            blob: b,
                            offset,
                            len,
                            ..
                        } if *b == blob && (i == start || *offset > 0) => {
                            ok &= *offset == end_offset;
                            end_offset += len;
                            i += 1;
                        }
                        _ => break,
                    }
                }
                if ok && needed.get(&blob) == Some(&end_offset) && covered.insert(blob) {
                    for k in start..i {
                        chunks.push(base.plan.chunks[k].clone());
                        reuse.push(Some(base.layers[k].clone()));
                    }
                }
            }
        }
    }
}

/// A chunk path: relative, no empty, `.` or `..` components (it is only ever matched
/// against tar member names, but a clean one is the only kind cachefs writes).
fn clean_path(p: &[u8]) -> Result<Vec<u8>, String> {
    let ok = !p.is_empty()
        && !p.starts_with(b"/")
        && p.split(|b| *b == b'/')
            .all(|c| !c.is_empty() && c != b"." && c != b".." && !c.contains(&0));
    if ok {
        Ok(p.to_vec())
    } else {
        Err(format!(
            "a chunk names the path {:?}",
            String::from_utf8_lossy(p)
        ))
    }
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.b.len());
        let end = end.ok_or("it is truncated")?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::format::Entry;

    type Layer = (Digest, BTreeMap<Digest, Vec<u8>>, HashMap<Digest, Tree>);

    /// Builds trees in memory: `files` are (path, size, version); contents are named by all
    /// three.
    fn layer(files: &[(String, u64, u32)]) -> Layer {
        #[derive(Default)]
        struct Node {
            files: BTreeMap<Vec<u8>, (u64, u32)>,
            dirs: BTreeMap<Vec<u8>, Node>,
        }
        let mut top = Node::default();
        for (p, size, v) in files {
            let parts: Vec<&str> = p.split('/').collect();
            let mut n = &mut top;
            for d in &parts[..parts.len() - 1] {
                n = n.dirs.entry(d.as_bytes().to_vec()).or_default();
            }
            n.files
                .insert(parts[parts.len() - 1].as_bytes().to_vec(), (*size, *v));
        }
        fn build(
            n: &Node,
            path: &str,
            trees: &mut BTreeMap<Digest, Vec<u8>>,
            dec: &mut HashMap<Digest, Tree>,
        ) -> Digest {
            let mut t = Tree::default();
            for (name, (size, v)) in &n.files {
                let name_s = String::from_utf8_lossy(name);
                let h = Digest::of(format!("{path}/{name_s}:{size}:{v}").as_bytes());
                t.entries.push(Entry::file(name, 0o644, *size, h));
            }
            for (name, sub) in &n.dirs {
                let d = build(
                    sub,
                    &format!("{path}/{}", String::from_utf8_lossy(name)),
                    trees,
                    dec,
                );
                t.entries.push(Entry::dir(name, 0o755, d));
            }
            t.sort();
            let (b, d) = t.encode_with_digest();
            trees.insert(d, b);
            dec.insert(d, t);
            d
        }
        let mut trees = BTreeMap::new();
        let mut dec = HashMap::new();
        let root = build(&top, "", &mut trees, &mut dec);
        (root, trees, dec)
    }

    /// 40 directories of 50 files (about 2 MiB each) and one 200 MiB file.
    fn sample() -> Vec<(String, u64, u32)> {
        let mut v = Vec::new();
        for d in 0..40 {
            for f in 0..50 {
                v.push((format!("d{d:02}/f{f:03}"), 40_000 + (d * 50 + f) as u64, 0));
            }
        }
        v.push(("big.bin".into(), 200 << 20, 0));
        v
    }

    fn change(files: &mut [(String, u64, u32)], which: &[&str]) {
        for e in files.iter_mut() {
            if which.contains(&e.0.as_str()) {
                e.2 += 1;
            }
        }
    }

    fn plan_of(
        files: &[(String, u64, u32)],
        base: Option<&Base>,
    ) -> (Plan, Vec<Option<(String, u64)>>) {
        let (root, trees, dec) = layer(files);
        Plan::build(root, trees, &dec, base)
    }

    /// The base a registry would hold after pushing `plan`: fake sha256 digests, one per
    /// distinct chunk record.
    fn as_base(plan: &Plan) -> Base {
        let layers = plan
            .chunks
            .iter()
            .map(|c| (format!("sha256:{}", c.content_digest()), c.bytes()))
            .collect();
        Base {
            plan: plan.clone(),
            layers,
        }
    }

    fn keys(plan: &Plan) -> HashSet<String> {
        plan.chunks
            .iter()
            .map(|c| Plan::chunk_key(c, "t"))
            .collect()
    }

    #[test]
    fn chunks_are_bounded_and_carry_every_file_once() {
        let (plan, reuse) = plan_of(&sample(), None);
        assert!(reuse.iter().all(|r| r.is_none()));
        let mut seen = BTreeMap::<Vec<u8>, u64>::new();
        for c in &plan.chunks {
            match c {
                ChunkSpec::Files(files) => {
                    let w: u64 = files.iter().map(|f| f.size + ENTRY_WEIGHT).sum();
                    assert!(w <= CHUNK_MAX, "chunk of {w} bytes");
                    for f in files {
                        assert!(
                            seen.insert(f.path.clone(), f.size).is_none(),
                            "a file in two chunks"
                        );
                    }
                }
                ChunkSpec::Part { path, len, .. } => {
                    assert!(*len <= CHUNK_MAX);
                    *seen.entry(path.clone()).or_default() += len;
                }
            }
        }
        assert_eq!(seen.len(), 2001);
        assert_eq!(seen[&b"big.bin".to_vec()], 200 << 20);
        let groups = plan
            .chunks
            .iter()
            .filter(|c| matches!(c, ChunkSpec::Files(_)))
            .count();
        // About 80 MiB of small files in groups of about 32 MiB.
        assert!((2..=12).contains(&groups), "{groups} groups");
    }

    #[test]
    fn without_a_base_one_changed_file_changes_at_most_two_chunks() {
        let (base, _) = plan_of(&sample(), None);
        let before = keys(&base);
        for changed in ["d00/f000", "d17/f020", "d39/f049"] {
            let mut files = sample();
            // A changed size moves the cut weight too.
            for e in files.iter_mut() {
                if e.0 == changed {
                    e.1 += 1000;
                }
            }
            let (plan, _) = plan_of(&files, None);
            let new = keys(&plan).difference(&before).count();
            assert!((1..=2).contains(&new), "{changed}: {new} new chunks");
        }
    }

    #[test]
    fn with_a_base_scattered_changes_make_one_new_chunk() {
        let (first, _) = plan_of(&sample(), None);
        let base = as_base(&first);
        let mut files = sample();
        let scattered = [
            "d00/f000", "d04/f011", "d09/f022", "d13/f033", "d18/f044", "d22/f005", "d27/f016",
            "d31/f027", "d35/f038", "d39/f049",
        ];
        change(&mut files, &scattered);
        let (plan, reuse) = plan_of(&files, Some(&base));
        let new: Vec<&ChunkSpec> = plan
            .chunks
            .iter()
            .zip(&reuse)
            .filter(|(_, r)| r.is_none())
            .map(|(c, _)| c)
            .collect();
        assert_eq!(new.len(), 1, "{new:?}");
        let ChunkSpec::Files(f) = new[0] else {
            panic!()
        };
        assert_eq!(f.len(), 10);
        // The plan is a valid index.
        assert!(Plan::decode_index(&plan.encode_index()).is_ok());
        // And nothing changed: everything reused, no new chunk.
        let (again, reuse) = plan_of(&sample(), Some(&base));
        assert!(reuse.iter().all(|r| r.is_some()));
        assert_eq!(again.chunks, first.chunks);
    }

    #[test]
    fn mostly_dead_base_chunks_are_dropped() {
        let (first, _) = plan_of(&sample(), None);
        let base = as_base(&first);
        // Rewrite every file: nothing of the base is live.
        let mut files = sample();
        let all: Vec<String> = files.iter().map(|f| f.0.clone()).collect();
        let all: Vec<&str> = all.iter().map(|s| s.as_str()).collect();
        change(&mut files, &all);
        let (_, reuse) = plan_of(&files, Some(&base));
        assert!(reuse.iter().all(|r| r.is_none()));
    }

    #[test]
    fn index_round_trips_and_rejects_damage() {
        let (plan, _) = plan_of(&sample(), None);
        let bytes = plan.encode_index();
        assert_eq!(Plan::decode_index(&bytes).unwrap(), plan);
        assert!(Plan::decode_index(&bytes[..bytes.len() - 1]).is_err());
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(Plan::decode_index(&extra).is_err());
        let mut wrong = bytes.clone();
        wrong[0] ^= 1;
        assert!(Plan::decode_index(&wrong).unwrap_err().contains("magic"));
        let mut flipped = bytes.clone();
        flipped[16 + 32 + 4 + 4 + 20] ^= 0x40;
        assert!(Plan::decode_index(&flipped).is_err());
        // A chunk dropped: a file is carried by nothing.
        let mut short = plan.clone();
        short.chunks.pop();
        assert!(
            Plan::decode_index(&short.encode_index())
                .unwrap_err()
                .contains("no chunk carries")
        );
        // A path that climbs out.
        let mut bad = plan.clone();
        for c in bad.chunks.iter_mut() {
            if let ChunkSpec::Files(f) = c {
                f[0].path = b"../x".to_vec();
                break;
            }
        }
        assert!(Plan::decode_index(&bad.encode_index()).is_err());
    }

    #[test]
    fn files_of_the_tree_are_numbered_and_stale_ones_spelled_out() {
        let (first, _) = plan_of(&sample(), None);
        let mut files = sample();
        change(&mut files, &["d03/f007"]);
        let (plan, reuse) = plan_of(&files, Some(&as_base(&first)));
        assert!(reuse.iter().any(|r| r.is_some()));
        let bytes = plan.encode_index();
        // The kept chunk carrying the old d03/f007 spells it out; it decodes back the same.
        assert_eq!(Plan::decode_index(&bytes).unwrap(), plan);
        // About 5 bytes per file in chunk records, on top of the trees.
        let trees: usize = plan.trees.values().map(|t| t.len() + 4).sum();
        let records = bytes.len() - 16 - 32 - 4 - trees;
        assert!(
            records < 2001 * 5 + 2 * 80 + plan.chunks.len() * 64,
            "{records} bytes of records"
        );
    }

    #[test]
    fn an_empty_tree_has_no_chunks() {
        let (plan, _) = plan_of(&[], None);
        assert!(plan.chunks.is_empty());
        assert_eq!(Plan::decode_index(&plan.encode_index()).unwrap(), plan);
    }

    #[test]
    fn common_directories() {
        assert_eq!(common_dir(b"a/b/c", b"a/b/d"), b"a/b");
        assert_eq!(common_dir(b"a/bc", b"a/bd"), b"a");
        assert_eq!(common_dir(b"ab", b"ab"), b"ab");
        assert_eq!(common_dir(b"a", b"b"), b"");
        let c = ChunkSpec::Files(vec![
            FileRef {
                path: b"x/y/1".to_vec(),
                blob: Digest::ZERO,
                size: 1,
                mode: 0o644,
            },
            FileRef {
                path: b"x/y/z/2".to_vec(),
                blob: Digest::ZERO,
                size: 1,
                mode: 0o644,
            },
        ]);
        assert_eq!(c.path(), b"x/y");
    }
}
