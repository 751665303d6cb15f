//! How a layer is cut into registry chunks, and the tree index (the artifact's config blob).
//!
//! Chunking (docs/LAYER-FORMAT.md, "Registry artifacts") works on the tree, not on bytes, so
//! that an unchanged subtree gives the same chunk, byte for byte, whatever changed elsewhere:
//!
//! - Every entry has a weight: [`ENTRY_WEIGHT`] plus, for a file, its size, for a directory,
//!   the weight of everything below it.
//! - The entries of a directory are visited in name order. One heavier than [`CHUNK_MAX`] is
//!   not put in a group: a directory is cut into its own chunks (recursively), a file into
//!   parts of [`CHUNK_MAX`] bytes. The others are grouped: a group closes before an entry
//!   that would take it past [`CHUNK_MAX`], and after an entry whose cut hash (a blake3 of
//!   the directory's path and the entry's name) falls under its weight's share of
//!   [`CHUNK_TARGET`]. So a group is about [`CHUNK_TARGET`] on average, where the group closes
//!   depends on names, not on what came before, and a change inside one entry moves at most
//!   the cut at that entry.

use std::collections::{BTreeMap, HashMap};

use crate::layer::format::{Digest, Entry, Kind, Tree};
use crate::layer::{LayerError, ObjectStore};

/// The most file bytes (plus per-entry weight) one chunk holds.
pub const CHUNK_MAX: u64 = 64 << 20;
/// The average size of a group of entries.
pub const CHUNK_TARGET: u64 = 32 << 20;
/// What an entry weighs besides its contents: about a tar header.
pub const ENTRY_WEIGHT: u64 = 512;

/// The first 16 bytes of a (decompressed) tree index.
pub const INDEX_MAGIC: &[u8; 16] = b"cachefs-index\0\0\x01";

/// One chunk: what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkSpec {
    /// Whole entries (with everything below them) of the directory at `dir` (a path from the
    /// layer's root, `/`-separated, empty for the root), in name order.
    Entries { dir: Vec<u8>, names: Vec<Vec<u8>> },
    /// `len` bytes from `offset` of the file at `path`, whose contents are the blob `blob`.
    Part {
        path: Vec<u8>,
        blob: Digest,
        offset: u64,
        len: u64,
    },
}

impl ChunkSpec {
    /// The path this chunk is about, for messages and annotations.
    pub fn path(&self) -> &[u8] {
        match self {
            ChunkSpec::Entries { dir, .. } => dir,
            ChunkSpec::Part { path, .. } => path,
        }
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            ChunkSpec::Entries { dir, names } => {
                out.push(1);
                put_bytes(out, dir);
                out.extend_from_slice(&(names.len() as u32).to_le_bytes());
                for n in names {
                    put_bytes(out, n);
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
}

/// A layer ready to be shipped: its root, every tree object, and its chunks in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub root: Digest,
    /// Tree objects by digest (their canonical encodings).
    pub trees: BTreeMap<Digest, Vec<u8>>,
    pub chunks: Vec<ChunkSpec>,
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

/// Whether the group should close after an entry of weight `weight` named `name` in `dir`.
fn cut_after(dir: &[u8], name: &[u8], weight: u64) -> bool {
    let mut h = blake3::Hasher::new();
    h.update(b"cachefs chunk cut v1\0");
    h.update(dir);
    h.update(b"\0");
    h.update(name);
    let mut first = [0u8; 8];
    first.copy_from_slice(&h.finalize().as_bytes()[..8]);
    // Cut with probability weight / TARGET: h / 2^64 < weight / TARGET.
    (u64::from_le_bytes(first) as u128) * (CHUNK_TARGET as u128) < (weight as u128) << 64
}

impl Plan {
    /// Reads every tree of the layer `root` from the store and cuts it into chunks.
    pub fn of_layer(objects: &ObjectStore, root: Digest) -> Result<Plan, LayerError> {
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
        Ok(Plan::cut(root, trees, &decoded))
    }

    /// Cuts the tree `root` (all of whose trees are in `decoded`) into chunks.
    pub fn cut(
        root: Digest,
        trees: BTreeMap<Digest, Vec<u8>>,
        decoded: &HashMap<Digest, Tree>,
    ) -> Plan {
        let mut weights = HashMap::new();
        let mut chunks = Vec::new();
        let mut cutter = Cutter {
            decoded,
            weights: &mut weights,
            chunks: &mut chunks,
        };
        cutter.dir(b"", root);
        Plan {
            root,
            trees,
            chunks,
        }
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
        for c in &self.chunks {
            c.encode_into(&mut out);
        }
        out
    }

    /// Decodes and checks an index: every tree object hashes to its name, they are exactly
    /// the trees under the root, and every chunk names entries that exist.
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
        // Exactly the trees under the root.
        let mut reached = std::collections::HashSet::new();
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
        let n = r.u32()? as usize;
        let mut chunks = Vec::with_capacity(n.min(1 << 16));
        for _ in 0..n {
            let c = match r.u8()? {
                1 => {
                    let dir = r.bytes()?.to_vec();
                    let k = r.u32()? as usize;
                    let mut names = Vec::with_capacity(k.min(1 << 16));
                    for _ in 0..k {
                        names.push(r.bytes()?.to_vec());
                    }
                    ChunkSpec::Entries { dir, names }
                }
                2 => ChunkSpec::Part {
                    path: r.bytes()?.to_vec(),
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
        for c in &plan.chunks {
            plan.check_chunk(c, &decoded)?;
        }
        Ok(plan)
    }

    fn check_chunk(&self, c: &ChunkSpec, decoded: &HashMap<Digest, Tree>) -> Result<(), String> {
        let shown = || String::from_utf8_lossy(c.path()).into_owned();
        match c {
            ChunkSpec::Entries { dir, names } => {
                let t = resolve_dir(self.root, dir, decoded).ok_or_else(|| {
                    format!(
                        "a chunk names directory {:?}, which is not in the tree",
                        shown()
                    )
                })?;
                if names.windows(2).any(|w| w[0] >= w[1]) {
                    return Err(format!("a chunk of {:?} lists names out of order", shown()));
                }
                for n in names {
                    if t.get(n).is_none() {
                        return Err(format!(
                            "a chunk of {:?} names an entry that is not there",
                            shown()
                        ));
                    }
                }
            }
            ChunkSpec::Part {
                path,
                blob,
                offset,
                len,
            } => {
                let e = resolve(self.root, path, decoded)
                    .filter(|e| e.kind == Kind::File && e.hash == *blob);
                let Some(e) = e else {
                    return Err(format!(
                        "a part names file {:?}, which is not in the tree",
                        shown()
                    ));
                };
                if offset.checked_add(*len).is_none_or(|end| end > e.size) || *len == 0 {
                    return Err(format!("a part of {:?} lies outside the file", shown()));
                }
            }
        }
        Ok(())
    }

    /// The decoded trees (for callers that walk them).
    pub fn decoded(&self) -> HashMap<Digest, Tree> {
        self.trees
            .iter()
            .filter_map(|(d, b)| Tree::decode(b).ok().map(|t| (*d, t)))
            .collect()
    }

    /// The files a chunk carries: path and entry, depth first (for an `Entries` chunk), or the
    /// one file a part belongs to.
    pub fn chunk_files(
        &self,
        c: &ChunkSpec,
        decoded: &HashMap<Digest, Tree>,
    ) -> Vec<(Vec<u8>, Entry)> {
        let mut out = Vec::new();
        match c {
            ChunkSpec::Entries { dir, names } => {
                let Some(t) = resolve_dir(self.root, dir, decoded) else {
                    return out;
                };
                let mut stack: Vec<(Vec<u8>, &Entry)> = names
                    .iter()
                    .rev()
                    .filter_map(|n| t.get(n).map(|e| (join(dir, n), e)))
                    .collect();
                while let Some((p, e)) = stack.pop() {
                    match e.kind {
                        Kind::File => out.push((p, e.clone())),
                        Kind::Dir => {
                            if let Some(sub) = decoded.get(&e.hash) {
                                for k in sub.entries.iter().rev() {
                                    stack.push((join(&p, &k.name), k));
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            ChunkSpec::Part { path, .. } => {
                if let Some(e) = resolve(self.root, path, decoded) {
                    out.push((path.clone(), e.clone()));
                }
            }
        }
        out
    }

    /// The entries an `Entries` chunk holds, as one tree (its digest names the chunk's
    /// contents: the `subtree` annotation).
    pub fn members(&self, dir: &[u8], names: &[Vec<u8>], decoded: &HashMap<Digest, Tree>) -> Tree {
        let entries = resolve_dir(self.root, dir, decoded)
            .map(|t| names.iter().filter_map(|n| t.get(n).cloned()).collect())
            .unwrap_or_default();
        Tree { entries }
    }

    /// A key for what the chunk's bytes depend on: its spec and the contents it names.
    pub fn chunk_key(
        &self,
        c: &ChunkSpec,
        decoded: &HashMap<Digest, Tree>,
        encoding: &str,
    ) -> String {
        let mut h = blake3::Hasher::new();
        h.update(b"cachefs chunk key v1\0");
        h.update(encoding.as_bytes());
        h.update(b"\0");
        let mut spec = Vec::new();
        c.encode_into(&mut spec);
        h.update(&spec);
        if let ChunkSpec::Entries { dir, names } = c {
            h.update(&self.members(dir, names, decoded).encode_with_digest().1.0);
        }
        h.finalize().to_hex().to_string()
    }
}

fn resolve<'a>(root: Digest, path: &[u8], decoded: &'a HashMap<Digest, Tree>) -> Option<&'a Entry> {
    let (dir, name) = match path.iter().rposition(|b| *b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&path[..0], path),
    };
    resolve_dir(root, dir, decoded)?.get(name)
}

fn resolve_dir<'a>(
    root: Digest,
    dir: &[u8],
    decoded: &'a HashMap<Digest, Tree>,
) -> Option<&'a Tree> {
    let mut t = decoded.get(&root)?;
    if dir.is_empty() {
        return Some(t);
    }
    for name in dir.split(|b| *b == b'/') {
        let e = t.get(name).filter(|e| e.kind == Kind::Dir)?;
        t = decoded.get(&e.hash)?;
    }
    Some(t)
}

struct Cutter<'a> {
    decoded: &'a HashMap<Digest, Tree>,
    weights: &'a mut HashMap<Digest, u64>,
    chunks: &'a mut Vec<ChunkSpec>,
}

impl Cutter<'_> {
    fn weight(&mut self, e: &Entry) -> u64 {
        ENTRY_WEIGHT
            + match e.kind {
                Kind::File => e.size,
                Kind::Dir => self.tree_weight(e.hash),
                _ => 0,
            }
    }

    fn tree_weight(&mut self, d: Digest) -> u64 {
        if let Some(w) = self.weights.get(&d) {
            return *w;
        }
        let decoded = self.decoded;
        let w = decoded
            .get(&d)
            .map(|t| {
                t.entries
                    .iter()
                    .map(|e| self.weight(e))
                    .fold(0u64, u64::saturating_add)
            })
            .unwrap_or(0);
        self.weights.insert(d, w);
        w
    }

    fn dir(&mut self, path: &[u8], d: Digest) {
        let decoded = self.decoded;
        let Some(tree) = decoded.get(&d) else {
            return;
        };
        let mut group: Vec<Vec<u8>> = Vec::new();
        let mut group_weight = 0u64;
        let flush = |group: &mut Vec<Vec<u8>>, w: &mut u64, chunks: &mut Vec<ChunkSpec>| {
            if !group.is_empty() {
                chunks.push(ChunkSpec::Entries {
                    dir: path.to_vec(),
                    names: std::mem::take(group),
                });
            }
            *w = 0;
        };
        for e in &tree.entries {
            let w = self.weight(e);
            if w > CHUNK_MAX {
                flush(&mut group, &mut group_weight, self.chunks);
                let p = join(path, &e.name);
                if e.kind == Kind::Dir {
                    self.dir(&p, e.hash);
                } else {
                    let mut offset = 0;
                    while offset < e.size {
                        let len = CHUNK_MAX.min(e.size - offset);
                        self.chunks.push(ChunkSpec::Part {
                            path: p.clone(),
                            blob: e.hash,
                            offset,
                            len,
                        });
                        offset += len;
                    }
                }
                continue;
            }
            if group_weight + w > CHUNK_MAX {
                flush(&mut group, &mut group_weight, self.chunks);
            }
            group.push(e.name.clone());
            group_weight += w;
            if cut_after(path, &e.name, w) {
                flush(&mut group, &mut group_weight, self.chunks);
            }
        }
        flush(&mut group, &mut group_weight, self.chunks);
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

    /// Builds trees in memory: `files` are (path, size) with contents named by path and size.
    fn layer(files: &[(&str, u64)]) -> (Digest, BTreeMap<Digest, Vec<u8>>, HashMap<Digest, Tree>) {
        #[derive(Default)]
        struct Node {
            files: BTreeMap<Vec<u8>, u64>,
            dirs: BTreeMap<Vec<u8>, Node>,
        }
        let mut top = Node::default();
        for (p, size) in files {
            let parts: Vec<&str> = p.split('/').collect();
            let mut n = &mut top;
            for d in &parts[..parts.len() - 1] {
                n = n.dirs.entry(d.as_bytes().to_vec()).or_default();
            }
            n.files
                .insert(parts[parts.len() - 1].as_bytes().to_vec(), *size);
        }
        fn build(
            n: &Node,
            path: &str,
            trees: &mut BTreeMap<Digest, Vec<u8>>,
            dec: &mut HashMap<Digest, Tree>,
        ) -> Digest {
            let mut t = Tree::default();
            for (name, size) in &n.files {
                let h = Digest::of(
                    format!("{path}/{}:{size}", String::from_utf8_lossy(name)).as_bytes(),
                );
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

    fn sample(changed: Option<&str>) -> Vec<(String, u64)> {
        let mut v = Vec::new();
        for d in 0..40 {
            for f in 0..50 {
                v.push((format!("d{d:02}/f{f:03}"), 40_000 + (d * 50 + f) as u64));
            }
        }
        v.push(("big.bin".into(), 200 << 20));
        if let Some(c) = changed {
            for e in v.iter_mut() {
                if e.0 == c {
                    e.1 += 1;
                }
            }
        }
        v
    }

    fn plan_of(files: &[(String, u64)]) -> Plan {
        let refs: Vec<(&str, u64)> = files.iter().map(|(p, s)| (p.as_str(), *s)).collect();
        let (root, trees, dec) = layer(&refs);
        Plan::cut(root, trees, &dec)
    }

    #[test]
    fn chunks_are_bounded_and_cover_every_file_once() {
        let plan = plan_of(&sample(None));
        let dec = plan.decoded();
        let mut seen = std::collections::BTreeMap::<Vec<u8>, u64>::new();
        for c in &plan.chunks {
            let files = plan.chunk_files(c, &dec);
            match c {
                ChunkSpec::Entries { .. } => {
                    let w: u64 = files.iter().map(|(_, e)| e.size + ENTRY_WEIGHT).sum();
                    assert!(w <= CHUNK_MAX, "chunk of {w} bytes");
                    for (p, e) in files {
                        assert!(seen.insert(p, e.size).is_none(), "a file in two chunks");
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
        // 80 MiB of small files in groups of about 32 MiB, and 4 parts.
        let groups = plan
            .chunks
            .iter()
            .filter(|c| matches!(c, ChunkSpec::Entries { .. }))
            .count();
        assert!((2..=12).contains(&groups), "{groups} groups");
    }

    #[test]
    fn a_changed_file_changes_at_most_two_chunks() {
        let base = plan_of(&sample(None));
        let bdec = base.decoded();
        let keys = |p: &Plan, d: &HashMap<Digest, Tree>| -> std::collections::HashSet<String> {
            p.chunks.iter().map(|c| p.chunk_key(c, d, "t")).collect()
        };
        let before = keys(&base, &bdec);
        for changed in ["d00/f000", "d17/f020", "d39/f049", "big.bin"] {
            let plan = plan_of(&sample(Some(changed)));
            let dec = plan.decoded();
            let after = keys(&plan, &dec);
            let new = after.difference(&before).count();
            let limit = if changed == "big.bin" { 4 } else { 2 };
            assert!(new >= 1 && new <= limit, "{changed}: {new} new chunks");
        }
    }

    #[test]
    fn index_round_trips_and_rejects_damage() {
        let plan = plan_of(&sample(None));
        let bytes = plan.encode_index();
        assert_eq!(Plan::decode_index(&bytes).unwrap(), plan);
        assert!(Plan::decode_index(&bytes[..bytes.len() - 1]).is_err());
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(Plan::decode_index(&extra).is_err());
        let mut wrong = bytes.clone();
        wrong[0] ^= 1;
        assert!(Plan::decode_index(&wrong).unwrap_err().contains("magic"));
        // A flipped byte in a tree object: its digest no longer matches what reaches it.
        let mut flipped = bytes.clone();
        flipped[16 + 32 + 4 + 4 + 20] ^= 0x40;
        assert!(Plan::decode_index(&flipped).is_err());
    }

    #[test]
    fn an_empty_tree_has_no_chunks() {
        let plan = plan_of(&[]);
        assert!(plan.chunks.is_empty());
        assert_eq!(Plan::decode_index(&plan.encode_index()).unwrap(), plan);
    }
}
