//! The canonical tree encoding (version 1): what a layer digest is the hash of.
//!
//! A directory is encoded as a tree object; its digest is the blake3 hash of those bytes, and a
//! layer's digest is the digest of its root directory. Every integer is little-endian. See
//! docs/LAYER-FORMAT.md, which carries a test vector (checked by `test_vector` below).
//!
//! ```text
//! tree  := MAGIC (16 bytes "cachefs-tree\0\0\0\x01") count:u64 entry*   (entries sorted by name bytes)
//! entry := kind:u8 mode:u32 name_len:u32 name size:u64 hash:[32] [target_len:u32 target]
//! ```
//!
//! kind: 1 file, 2 directory, 3 symlink, 4 fifo. mode: the permission bits and the sticky bit
//! (`mode & 0o1777`; setuid/setgid are never recorded, symlinks are always 0o777). size: a
//! file's length, a symlink target's length, 0 otherwise. hash: a file's blake3 content hash (what
//! `b3sum` prints), a directory's tree digest, zeros otherwise. Only symlinks carry a target.
//! Nothing else is recorded: no times, owners, inode numbers or link counts, so the same tree
//! gives the same digest on any machine, and a hard-linked file hashes like a copy.

use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;

/// The first 16 bytes of every tree object; the last byte is the format version.
pub const TREE_MAGIC: &[u8; 16] = b"cachefs-tree\0\0\0\x01";

/// The permission bits a layer records.
pub const MODE_MASK: u32 = 0o1777;

/// A blake3 hash: a file's content hash, or a tree's digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub const ZERO: Digest = Digest([0; 32]);

    pub fn of(bytes: &[u8]) -> Digest {
        Digest(*blake3::hash(bytes).as_bytes())
    }

    pub fn to_hex(self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 15)]));
        }
        s
    }

    /// Parses exactly 64 lowercase or uppercase hex digits.
    pub fn from_hex(s: &str) -> Option<Digest> {
        let b = s.as_bytes();
        if b.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in b.chunks_exact(2).enumerate() {
            out[i] = (hex_val(pair[0])? << 4) | hex_val(pair[1])?;
        }
        Some(Digest(out))
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", &self.to_hex()[..12])
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File = 1,
    Dir = 2,
    Symlink = 3,
    Fifo = 4,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::File),
            2 => Some(Kind::Dir),
            3 => Some(Kind::Symlink),
            4 => Some(Kind::Fifo),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Dir => "dir",
            Kind::Symlink => "symlink",
            Kind::Fifo => "fifo",
        }
    }
}

/// One entry of a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: Vec<u8>,
    pub kind: Kind,
    /// Already masked with [`MODE_MASK`] (see [`Entry::new`]).
    pub mode: u32,
    pub size: u64,
    pub hash: Digest,
    /// The symlink target; empty for other kinds.
    pub target: Vec<u8>,
}

impl Entry {
    pub fn file(name: &[u8], mode: u32, size: u64, hash: Digest) -> Entry {
        Entry::new(name, Kind::File, mode, size, hash, Vec::new())
    }

    pub fn dir(name: &[u8], mode: u32, digest: Digest) -> Entry {
        Entry::new(name, Kind::Dir, mode, 0, digest, Vec::new())
    }

    pub fn symlink(name: &[u8], target: &[u8]) -> Entry {
        Entry::new(
            name,
            Kind::Symlink,
            0o777,
            target.len() as u64,
            Digest::ZERO,
            target.to_vec(),
        )
    }

    pub fn fifo(name: &[u8], mode: u32) -> Entry {
        Entry::new(name, Kind::Fifo, mode, 0, Digest::ZERO, Vec::new())
    }

    fn new(name: &[u8], kind: Kind, mode: u32, size: u64, hash: Digest, target: Vec<u8>) -> Entry {
        let mode = if kind == Kind::Symlink {
            0o777
        } else {
            mode & MODE_MASK
        };
        Entry {
            name: name.to_vec(),
            kind,
            mode,
            size,
            hash,
            target,
        }
    }

    pub fn name_os(&self) -> &OsStr {
        OsStr::from_bytes(&self.name)
    }
}

/// A directory's entries, sorted by name bytes, with unique names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tree {
    pub entries: Vec<Entry>,
}

/// Why a tree object could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("not a cachefs tree object (bad magic)")]
    BadMagic,
    #[error("tree format version {0} is newer than this cachefs reads (1)")]
    Version(u8),
    #[error("truncated tree object")]
    Truncated,
    #[error("unknown entry kind {0}")]
    Kind(u8),
    #[error("entry name {0:?} is not allowed")]
    BadName(String),
    #[error("entries are not sorted by name or repeat a name")]
    Unsorted,
    #[error("{0} trailing bytes after the last entry")]
    Trailing(usize),
    #[error("a non-canonical field (mode, size, hash or target) in entry {0:?}")]
    NotCanonical(String),
}

/// Whether `name` can be a directory entry: not empty, not `.` or `..`, no `/` or NUL.
pub fn valid_name(name: &[u8]) -> bool {
    !name.is_empty() && name != b"." && name != b".." && !name.iter().any(|&b| b == b'/' || b == 0)
}

impl Tree {
    /// Sorts the entries into canonical order. Names must already be unique.
    pub fn sort(&mut self) {
        self.entries.sort_by(|a, b| a.name.cmp(&b.name));
    }

    /// The canonical bytes of this tree. Entries must be sorted ([`Tree::sort`]).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(24 + self.entries.len() * 64);
        out.extend_from_slice(TREE_MAGIC);
        out.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for e in &self.entries {
            out.push(e.kind as u8);
            out.extend_from_slice(&e.mode.to_le_bytes());
            out.extend_from_slice(&(e.name.len() as u32).to_le_bytes());
            out.extend_from_slice(&e.name);
            out.extend_from_slice(&e.size.to_le_bytes());
            out.extend_from_slice(&e.hash.0);
            if e.kind == Kind::Symlink {
                out.extend_from_slice(&(e.target.len() as u32).to_le_bytes());
                out.extend_from_slice(&e.target);
            }
        }
        out
    }

    /// The encoding and its digest.
    pub fn encode_with_digest(&self) -> (Vec<u8>, Digest) {
        let bytes = self.encode();
        let d = Digest::of(&bytes);
        (bytes, d)
    }

    /// Decodes a tree object, accepting only the canonical encoding, so that decoding and
    /// re-encoding gives the same bytes (and the same digest).
    pub fn decode(bytes: &[u8]) -> Result<Tree, DecodeError> {
        let mut r = Reader { b: bytes, at: 0 };
        let magic = r.take(16)?;
        if magic[..15] != TREE_MAGIC[..15] {
            return Err(DecodeError::BadMagic);
        }
        if magic[15] != TREE_MAGIC[15] {
            return Err(DecodeError::Version(magic[15]));
        }
        let count = r.u64()?;
        // Each entry takes at least 49 bytes: a count larger than that is a lie, and must not
        // make us reserve memory for it.
        if count > (bytes.len() as u64) / 49 {
            return Err(DecodeError::Truncated);
        }
        let mut entries: Vec<Entry> = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let kind_byte = r.u8()?;
            let kind = Kind::from_u8(kind_byte).ok_or(DecodeError::Kind(kind_byte))?;
            let mode = r.u32()?;
            let name_len = r.u32()? as usize;
            let name = r.take(name_len)?.to_vec();
            if !valid_name(&name) {
                return Err(DecodeError::BadName(
                    String::from_utf8_lossy(&name).into_owned(),
                ));
            }
            let size = r.u64()?;
            let mut hash = [0u8; 32];
            hash.copy_from_slice(r.take(32)?);
            let hash = Digest(hash);
            let target = if kind == Kind::Symlink {
                let len = r.u32()? as usize;
                r.take(len)?.to_vec()
            } else {
                Vec::new()
            };
            let canonical = match kind {
                Kind::File => mode & !MODE_MASK == 0,
                Kind::Dir => mode & !MODE_MASK == 0 && size == 0,
                Kind::Symlink => {
                    mode == 0o777
                        && hash == Digest::ZERO
                        && size == target.len() as u64
                        && !target.is_empty()
                        && !target.contains(&0)
                }
                Kind::Fifo => mode & !MODE_MASK == 0 && size == 0 && hash == Digest::ZERO,
            };
            if !canonical {
                return Err(DecodeError::NotCanonical(
                    String::from_utf8_lossy(&name).into_owned(),
                ));
            }
            if let Some(prev) = entries.last()
                && prev.name >= name
            {
                return Err(DecodeError::Unsorted);
            }
            entries.push(Entry {
                name,
                kind,
                mode,
                size,
                hash,
                target,
            });
        }
        if r.at != bytes.len() {
            return Err(DecodeError::Trailing(bytes.len() - r.at));
        }
        Ok(Tree { entries })
    }

    pub fn get(&self, name: &[u8]) -> Option<&Entry> {
        self.entries
            .binary_search_by(|e| e.name.as_slice().cmp(name))
            .ok()
            .map(|i| &self.entries[i])
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.at.checked_add(n).ok_or(DecodeError::Truncated)?;
        let s = self.b.get(self.at..end).ok_or(DecodeError::Truncated)?;
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
}

/// The digest of an empty directory.
pub fn empty_tree_digest() -> Digest {
    Tree::default().encode_with_digest().1
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test vector of docs/LAYER-FORMAT.md: a root holding `a.txt` ("hello\n", 0644),
    /// `bin/` (0755) holding `run` (empty, 0755), `link` -> `a.txt`, and a fifo `p` (0600).
    pub(crate) fn vector() -> (Tree, Tree) {
        let run = Entry::file(b"run", 0o100755, 0, Digest::of(b""));
        let bin = Tree { entries: vec![run] };
        let (_, bin_digest) = bin.encode_with_digest();
        let mut root = Tree {
            entries: vec![
                Entry::symlink(b"link", b"a.txt"),
                Entry::file(b"a.txt", 0o644, 6, Digest::of(b"hello\n")),
                Entry::fifo(b"p", 0o600),
                Entry::dir(b"bin", 0o755, bin_digest),
            ],
        };
        root.sort();
        (bin, root)
    }

    #[test]
    fn test_vector() {
        let (bin, root) = vector();
        assert_eq!(
            bin.encode_with_digest().1.to_hex(),
            "af907f6fa25369ee3cb239339069ea7116eab96a07f59127673aad692b85d1e2",
            "bin/ tree digest changed: the format changed, bump the version"
        );
        assert_eq!(
            root.encode_with_digest().1.to_hex(),
            "1e93d7ba78c5cbc409fb78ba3c92bdd4420eaea8312f43e69277b8330f572392",
            "root tree digest changed: the format changed, bump the version"
        );
    }

    #[test]
    fn round_trip_and_canonical_only() {
        let (_, root) = vector();
        let bytes = root.encode();
        assert_eq!(Tree::decode(&bytes).unwrap(), root);
        // Any truncation is refused.
        for n in 0..bytes.len() {
            assert!(Tree::decode(&bytes[..n]).is_err(), "prefix {n} decoded");
        }
        let mut extra = bytes.clone();
        extra.push(0);
        assert_eq!(Tree::decode(&extra), Err(DecodeError::Trailing(1)));
        let mut newer = bytes.clone();
        newer[15] = 2;
        assert_eq!(Tree::decode(&newer), Err(DecodeError::Version(2)));
        // Unsorted entries are refused.
        let mut unsorted = root.clone();
        unsorted.entries.swap(0, 1);
        assert_eq!(Tree::decode(&unsorted.encode()), Err(DecodeError::Unsorted));
    }

    #[test]
    fn bad_names_are_refused() {
        for bad in [&b".."[..], b".", b"a/b", b"", b"a\0"] {
            let t = Tree {
                entries: vec![Entry::file(bad, 0o644, 0, Digest::of(b""))],
            };
            assert!(
                matches!(Tree::decode(&t.encode()), Err(DecodeError::BadName(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn modes_are_masked() {
        let e = Entry::file(b"x", 0o104755, 1, Digest::ZERO);
        assert_eq!(e.mode, 0o755, "setuid and file type bits are dropped");
        let d = Entry::dir(b"d", 0o41777, Digest::ZERO);
        assert_eq!(d.mode, 0o1777, "the sticky bit stays");
    }

    #[test]
    fn hex_round_trip() {
        let d = Digest::of(b"x");
        assert_eq!(Digest::from_hex(&d.to_hex()), Some(d));
        assert_eq!(Digest::from_hex(&d.to_hex().to_uppercase()), Some(d));
        assert_eq!(Digest::from_hex("abc"), None);
        assert_eq!(Digest::from_hex(&"g".repeat(64)), None);
    }
}
