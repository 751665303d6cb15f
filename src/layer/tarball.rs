//! Layers as tar streams: a reproducible export (optionally zstd) and a checked import.
//!
//! Export (see docs/LAYER-FORMAT.md, "Tar export"):
//!
//! - The first member is a pax global header (`pax_global_header`, type `g`) whose only
//!   record is `comment=cachefs-layer v1 blake3:<root>` (plus ` parent blake3:<parent>` for a
//!   changeset). Standard tools ignore `comment` silently; import uses it to check the digest.
//! - Then the tree, depth first: a directory's entry (`dir/`), then its contents, every
//!   directory's entries in name-byte order. No entry for the root. GNU headers with mtime 0,
//!   uid/gid 0, empty user and group names and the layer's recorded mode; regular files,
//!   directories, symlinks and fifos (never hard links: a layer has none). A path or link
//!   target of 100 bytes or more goes in a GNU long-name (`L`) / long-link (`K`) member
//!   named `././@LongLink`, as GNU tar writes them; sizes of 8 GiB and more use GNU's base-256
//!   numbers. Two zero blocks end the archive (no padding to a record size).
//! - Blobs are streamed from the object store and verified as they are read; the last chunk of
//!   a file is held back until its hash has been checked, so a corrupt blob ends the export
//!   with an error before the entry is complete: the output is never a well-formed but wrong
//!   tar.
//! - `since`: only the difference from a parent layer, as an OCI changeset (image-spec
//!   layer.md): changed and added entries, the directories on the path to them, and whiteouts
//!   `.wh.<name>` (empty regular files, mode 0) for entries of the parent that are gone. An
//!   entry whose kind changed gets a whiteout and then its new entry. A directory's whiteouts
//!   come before its other entries, so that applying the tar in order never removes what it
//!   just wrote.
//!
//! The DiffID is the sha256 of the uncompressed tar, as OCI defines it.
//!
//! Import reads plain or zstd tars (by their magic bytes), any tar that uses the features
//! above (also pax `path`/`linkpath`/`size` records, ustar prefixes and hard links to earlier
//! files, which become copies), builds the tree in memory while storing blobs as they stream
//! past, applies it over the parent layer for a changeset, and checks the digest the tar names.
//! It writes only objects into the object store, never anything else: a symlink's target is
//! data, stored as it is (even an absolute one), and never followed.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{self, Cursor, IsTerminal, Read, Write};
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicI32, Ordering};

use sha2::{Digest as _, Sha256};

use super::format::{Digest, Entry, Kind, Tree, valid_name};
use super::objects::{CHUNK, ObjectKind, ObjectStore};
use super::progress::Progress;
use super::{LayerError, TreeStats, tree_stats};

/// The first word of the pax `comment` record that names a layer.
pub const COMMENT_TAG: &str = "cachefs-layer";
/// The version of the tar rules this module writes.
pub const COMMENT_VERSION: &str = "v1";
/// OCI whiteout prefix: `.wh.<name>` deletes `<name>` of the layers below.
pub const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// OCI opaque whiteout: the directory holding it hides everything below it.
pub const OPAQUE_WHITEOUT: &[u8] = b".wh..wh..opq";
/// The first four bytes of a zstd frame.
pub const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];
/// The zstd level used unless the caller chooses one.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;
/// The name of the pax global header member.
pub const GLOBAL_HEADER_NAME: &[u8] = b"pax_global_header";

const BLOCK: u64 = 512;
const ZEROS: [u8; 1024] = [0; 1024];
/// Paths and link targets this long or longer go in a GNU long-name member.
const NAME_FIELD: usize = 100;
/// The largest pax global header import reads.
const MAX_GLOBAL_HEADER: u64 = 1 << 20;
/// The longest path (or hard link target) a tar may name: four times PATH_MAX, so a tree
/// deeper than one syscall path can name (which a mount can hold: made one level at a time)
/// still round-trips, while what the import holds per member stays small. GNU long-name
/// members and pax `path`/`linkpath` records beyond it are refused from their header.
pub const MAX_TAR_PATH: usize = 16 << 10;
/// The largest pax extended header import reads (it holds at most a path, a link target and
/// a few small records).
const MAX_PAX_HEADER: u64 = 64 << 10;
/// The longest name of one entry: NAME_MAX, what any Linux filesystem allows.
pub const NAME_MAX: usize = 255;
/// The longest symlink target: PATH_MAX - 1, what symlink(2) accepts.
pub const SYMLINK_MAX: usize = 4095;
/// What may follow the end-of-archive blocks (padding to a record size: GNU tar's largest
/// blocking factor is 1 MiB); more is refused rather than read forever.
const MAX_TRAILER: u64 = 1 << 20;

/// How an export or import runs.
#[derive(Clone, Copy)]
pub struct Options<'a> {
    /// The output (export) or input (import), for messages.
    pub label: &'a Path,
    /// A progress bar on stderr (when it is a terminal and the work is large).
    pub show_progress: bool,
    /// A signal number once the work should stop (0 until then), polled between entries.
    pub cancel: Option<&'a AtomicI32>,
    /// Import: the input's size, for the progress bar.
    pub size_hint: Option<u64>,
}

impl<'a> Options<'a> {
    pub fn new(label: &'a Path) -> Options<'a> {
        Options {
            label,
            show_progress: false,
            cancel: None,
            size_hint: None,
        }
    }

    fn check_cancel(&self) -> Result<(), LayerError> {
        match self.cancel {
            Some(c) if c.load(Ordering::Relaxed) != 0 => Err(LayerError::Interrupted),
            _ => Ok(()),
        }
    }
}

/// `sha256:<hex>` of the bytes a hasher saw: an OCI digest (a DiffID, a registry blob's name).
pub fn sha256_name(sha: Sha256) -> String {
    let out = sha.finalize();
    let mut s = String::with_capacity(7 + 64);
    s.push_str("sha256:");
    for b in out.iter() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// The pax `comment` that names a layer (and the parent of a changeset).
pub fn layer_comment(digest: Digest, parent: Option<Digest>) -> String {
    match parent {
        Some(p) => format!("{COMMENT_TAG} {COMMENT_VERSION} blake3:{digest} parent blake3:{p}"),
        None => format!("{COMMENT_TAG} {COMMENT_VERSION} blake3:{digest}"),
    }
}

/// Parses a pax `comment` value: `Ok(None)` for a comment that is not ours.
pub fn parse_layer_comment(value: &[u8]) -> Result<Option<(Digest, Option<Digest>)>, LayerError> {
    let Ok(s) = std::str::from_utf8(value) else {
        return Ok(None);
    };
    let mut words = s.split(' ');
    if words.next() != Some(COMMENT_TAG) {
        return Ok(None);
    }
    let bad = || LayerError::Invalid(format!("malformed {COMMENT_TAG} header in the tar: {s:?}"));
    match words.next() {
        Some(COMMENT_VERSION) => {}
        Some(v) if v.starts_with('v') => {
            return Err(LayerError::Invalid(format!(
                "the tar was written by a newer cachefs ({COMMENT_TAG} {v}); this one reads {COMMENT_VERSION}"
            )));
        }
        _ => return Err(bad()),
    }
    let digest = |w: Option<&str>| {
        w.and_then(|w| w.strip_prefix("blake3:"))
            .and_then(Digest::from_hex)
    };
    let d = digest(words.next()).ok_or_else(bad)?;
    let parent = match words.next() {
        None => None,
        Some("parent") => Some(digest(words.next()).ok_or_else(bad)?),
        Some(_) => return Err(bad()),
    };
    if words.next().is_some() {
        return Err(bad());
    }
    Ok(Some((d, parent)))
}

/// One pax record: `"<len> <key>=<value>\n"`, where len counts the whole record.
fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let rest = 1 + key.len() + 1 + value.len() + 1;
    let mut len = rest + 1;
    while len.to_string().len() + rest != len {
        len = len.to_string().len() + rest;
    }
    let mut out = format!("{len} {key}=").into_bytes();
    out.extend_from_slice(value);
    out.push(b'\n');
    out
}

/// Parses pax records (lengths are honoured, so values may hold newlines).
fn parse_pax_records(mut data: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let sp = data.iter().position(|&b| b == b' ')?;
        let len: usize = std::str::from_utf8(&data[..sp]).ok()?.parse().ok()?;
        if len <= sp + 1 || len > data.len() || data[len - 1] != b'\n' {
            return None;
        }
        let rec = &data[sp + 1..len - 1];
        let eq = rec.iter().position(|&b| b == b'=')?;
        out.push((&rec[..eq], &rec[eq + 1..]));
        data = &data[len..];
    }
    Some(out)
}

// ---------------------------------------------------------------------------------------------
// Export
// ---------------------------------------------------------------------------------------------

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub digest: Digest,
    pub parent: Option<Digest>,
    /// `sha256:<hex>` of the uncompressed tar.
    pub diff_id: String,
    /// Bytes of the uncompressed tar.
    pub tar_bytes: u64,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub fifos: u64,
    pub whiteouts: u64,
    /// Bytes of file contents written.
    pub file_bytes: u64,
}

/// The tar being written: counts and hashes every byte.
struct TarOut<'a> {
    out: &'a mut dyn Write,
    sha: Sha256,
    bytes: u64,
    label: &'a Path,
}

impl TarOut<'_> {
    fn put(&mut self, b: &[u8]) -> Result<(), LayerError> {
        self.out
            .write_all(b)
            .map_err(|e| LayerError::io("write", self.label, e))?;
        self.sha.update(b);
        self.bytes += b.len() as u64;
        Ok(())
    }

    /// Zeros up to the next block boundary after `len` bytes of data.
    fn pad(&mut self, len: u64) -> Result<(), LayerError> {
        let r = (len % BLOCK) as usize;
        if r != 0 {
            self.put(&ZEROS[..BLOCK as usize - r])?;
        }
        Ok(())
    }

    /// A GNU long-name (`L`) or long-link (`K`) member holding `name` and a NUL.
    fn long_name(&mut self, kind: u8, name: &[u8]) -> Result<(), LayerError> {
        if name.len() > MAX_TAR_PATH {
            // Import would refuse it: say so now rather than write a tar nothing reads back.
            return Err(LayerError::Invalid(format!(
                "cannot export {}: a path of {} bytes (a layer tar holds paths of at most {MAX_TAR_PATH})",
                show(name),
                name.len()
            )));
        }
        let mut h = tar::Header::new_gnu();
        let field = b"././@LongLink";
        h.as_old_mut().name[..field.len()].copy_from_slice(field);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(name.len() as u64 + 1);
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_cksum();
        self.put(h.as_bytes())?;
        self.put(name)?;
        self.put(&[0])?;
        self.pad(name.len() as u64 + 1)
    }

    /// One member's header (and the long-name members it needs).
    fn header(
        &mut self,
        path: &[u8],
        kind: tar::EntryType,
        mode: u32,
        size: u64,
        link: &[u8],
    ) -> Result<(), LayerError> {
        if path.len() >= NAME_FIELD {
            self.long_name(b'L', path)?;
        }
        if link.len() >= NAME_FIELD {
            self.long_name(b'K', link)?;
        }
        let mut h = tar::Header::new_gnu();
        {
            let old = h.as_old_mut();
            let n = path.len().min(NAME_FIELD);
            old.name[..n].copy_from_slice(&path[..n]);
            let n = link.len().min(NAME_FIELD);
            old.linkname[..n].copy_from_slice(&link[..n]);
        }
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(size);
        h.set_entry_type(kind);
        h.set_cksum();
        self.put(h.as_bytes())
    }

    /// The pax global header naming the layer.
    fn global_header(&mut self, comment: &str) -> Result<(), LayerError> {
        let data = pax_record("comment", comment.as_bytes());
        let mut h = tar::Header::new_ustar();
        h.as_old_mut().name[..GLOBAL_HEADER_NAME.len()].copy_from_slice(GLOBAL_HEADER_NAME);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(data.len() as u64);
        h.set_entry_type(tar::EntryType::XGlobalHeader);
        h.set_cksum();
        self.put(h.as_bytes())?;
        self.put(&data)?;
        self.pad(data.len() as u64)
    }
}

/// One member to write, in order.
enum Item {
    /// `.wh.<name>`: the full path of the whiteout file.
    Whiteout(Vec<u8>),
    /// A file, symlink or fifo at this path.
    Leaf(Vec<u8>, Entry),
    /// A directory (path with its trailing `/`); `lower` is the parent layer's directory at
    /// the same path (a changeset writes only the differences below it), `None` when the
    /// whole directory is new.
    Dir {
        path: Vec<u8>,
        entry: Entry,
        lower: Option<Digest>,
    },
}

fn child_path(prefix: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(prefix.len() + name.len() + 5);
    p.extend_from_slice(prefix);
    p.extend_from_slice(name);
    p
}

/// A tar path or name for a message: quoted, escaped, its middle cut when long.
fn show(path: &[u8]) -> String {
    crate::text::quoted_short(path)
}

/// The members for one directory's entries: whiteouts first, then the entries in name
/// order. `lower` is the parent layer's directory (`None`: write everything).
fn dir_items(prefix: &[u8], lower: Option<&Tree>, upper: &Tree) -> Result<Vec<Item>, LayerError> {
    let mut whiteouts = Vec::new();
    let mut items = Vec::new();
    let new_item = |e: &Entry, lower: Option<Digest>| -> Result<Item, LayerError> {
        let path = child_path(prefix, &e.name);
        if e.name.starts_with(WHITEOUT_PREFIX) {
            return Err(LayerError::Invalid(format!(
                "cannot export {}: names starting with .wh. mean whiteouts in a layer tar (OCI), so this layer has no tar form",
                show(&path)
            )));
        }
        Ok(match e.kind {
            Kind::Dir => {
                let mut path = path;
                path.push(b'/');
                Item::Dir {
                    path,
                    entry: e.clone(),
                    lower,
                }
            }
            _ => Item::Leaf(path, e.clone()),
        })
    };
    let whiteout = |name: &[u8]| {
        let mut p = child_path(prefix, WHITEOUT_PREFIX);
        p.extend_from_slice(name);
        Item::Whiteout(p)
    };
    let empty = Tree::default();
    let lower_entries = &lower.unwrap_or(&empty).entries;
    let (mut i, mut j) = (0, 0);
    let up = &upper.entries;
    while i < lower_entries.len() || j < up.len() {
        let order = match (lower_entries.get(i), up.get(j)) {
            (Some(l), Some(u)) => l.name.cmp(&u.name),
            (Some(_), None) => std::cmp::Ordering::Less,
            _ => std::cmp::Ordering::Greater,
        };
        match order {
            std::cmp::Ordering::Less => {
                whiteouts.push(whiteout(&lower_entries[i].name));
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                items.push(new_item(&up[j], None)?);
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                let (l, u) = (&lower_entries[i], &up[j]);
                if l.kind != u.kind {
                    whiteouts.push(whiteout(&l.name));
                    items.push(new_item(u, None)?);
                } else if u.kind == Kind::Dir {
                    if l.hash != u.hash || l.mode != u.mode {
                        items.push(new_item(u, Some(l.hash))?);
                    }
                } else if l != u {
                    items.push(new_item(u, None)?);
                }
                i += 1;
                j += 1;
            }
        }
    }
    whiteouts.extend(items);
    Ok(whiteouts)
}

/// Walks the members of the export of `root` (over `since`) in order.
fn walk(
    objects: &ObjectStore,
    root: Digest,
    since: Option<Digest>,
    opts: &Options<'_>,
    visit: &mut dyn FnMut(&Item) -> Result<(), LayerError>,
) -> Result<(), LayerError> {
    let upper = objects.read_tree(root)?;
    let lower = match since {
        Some(d) => Some(objects.read_tree(d)?),
        None => None,
    };
    let mut stack = dir_items(b"", lower.as_ref(), &upper)?;
    stack.reverse();
    while let Some(item) = stack.pop() {
        opts.check_cancel()?;
        visit(&item)?;
        if let Item::Dir { path, entry, lower } = item {
            if lower == Some(entry.hash) {
                continue;
            }
            let upper = objects.read_tree(entry.hash)?;
            let lower = match lower {
                Some(d) => Some(objects.read_tree(d)?),
                None => None,
            };
            let mut kids = dir_items(&path, lower.as_ref(), &upper)?;
            kids.reverse();
            stack.extend(kids);
        }
    }
    Ok(())
}

/// Reads until `buf` is full or the blob ends (which verifies it).
fn fill_blob(r: &mut super::objects::BlobReader, buf: &mut [u8]) -> Result<usize, LayerError> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(r.error(e)),
        }
    }
    Ok(n)
}

/// Writes one file member from its blob. The last chunk is written only after the blob's hash
/// was checked, so a corrupt blob never makes a complete member.
fn write_file(
    objects: &ObjectStore,
    tar: &mut TarOut<'_>,
    path: &[u8],
    e: &Entry,
    bufs: &mut [Vec<u8>; 2],
    progress: &Progress,
) -> Result<(), LayerError> {
    let mut blob = objects.open_blob(e.hash)?;
    let blob_path = objects.path(ObjectKind::Blob, e.hash);
    let len = blob
        .len()
        .map_err(|err| LayerError::io("stat", &blob_path, err))?;
    let wrong_length = |got: u64| {
        LayerError::corrupt(
            "blob",
            e.hash,
            &blob_path,
            &format!("it holds {got} bytes where the layer records {}", e.size),
        )
    };
    if len != e.size {
        return Err(wrong_length(len));
    }
    tar.header(path, tar::EntryType::Regular, e.mode, e.size, b"")?;
    let [a, b] = bufs;
    let mut held = fill_blob(&mut blob, a)?;
    let mut total = held as u64;
    loop {
        if held < a.len() {
            // The blob ended in this chunk: it was verified when the read hit its end.
            if total != e.size {
                return Err(wrong_length(total));
            }
            tar.put(&a[..held])?;
            progress.inc(held as u64);
            break;
        }
        let n = fill_blob(&mut blob, b)?;
        total += n as u64;
        if total > e.size {
            return Err(wrong_length(total));
        }
        tar.put(&a[..held])?;
        progress.inc(held as u64);
        std::mem::swap(a, b);
        held = n;
    }
    tar.pad(e.size)
}

/// Writes whole files (path, mode, size, blob) as a tar in the given order, by the export's
/// rules but with no global header and no directories: the registry chunks of `remote`.
/// Returns the number of tar bytes written.
pub fn export_files<'a>(
    objects: &ObjectStore,
    files: impl Iterator<Item = (&'a [u8], u32, u64, Digest)>,
    out: &mut dyn Write,
    opts: &Options<'_>,
) -> Result<u64, LayerError> {
    let mut tar = TarOut {
        out,
        sha: Sha256::new(),
        bytes: 0,
        label: opts.label,
    };
    let mut bufs = [vec![0u8; CHUNK], vec![0u8; CHUNK]];
    let progress = Progress::none();
    for (path, mode, size, blob) in files {
        opts.check_cancel()?;
        let e = Entry::file(b"", mode, size, blob);
        write_file(objects, &mut tar, path, &e, &mut bufs, &progress)?;
    }
    tar.put(&ZEROS)?;
    tar.out
        .flush()
        .map_err(|e| LayerError::io("write", opts.label, e))?;
    Ok(tar.bytes)
}

/// Writes the layer `root` as a tar to `out` (the whole tree, or with `since` only the
/// changes from that parent layer, as an OCI changeset). The caller holds the objects' shared
/// lock. On error, what was written is incomplete and must be thrown away (a corrupt blob is
/// found before its member is complete).
pub fn export(
    objects: &ObjectStore,
    root: Digest,
    since: Option<Digest>,
    out: &mut dyn Write,
    opts: &Options<'_>,
) -> Result<ExportReport, LayerError> {
    let total = if opts.show_progress && io::stderr().is_terminal() {
        let mut sum = 0u64;
        walk(objects, root, since, opts, &mut |item| {
            if let Item::Leaf(_, e) = item
                && e.kind == Kind::File
            {
                sum += e.size;
            }
            Ok(())
        })?;
        sum
    } else {
        0
    };
    let progress = Progress::bytes("exporting", total, opts.show_progress);
    let mut tar = TarOut {
        out,
        sha: Sha256::new(),
        bytes: 0,
        label: opts.label,
    };
    let mut report = ExportReport {
        digest: root,
        parent: since,
        diff_id: String::new(),
        tar_bytes: 0,
        files: 0,
        dirs: 0,
        symlinks: 0,
        fifos: 0,
        whiteouts: 0,
        file_bytes: 0,
    };
    tar.global_header(&layer_comment(root, since))?;
    let mut bufs = [vec![0u8; CHUNK], vec![0u8; CHUNK]];
    walk(objects, root, since, opts, &mut |item| match item {
        Item::Whiteout(path) => {
            report.whiteouts += 1;
            tar.header(path, tar::EntryType::Regular, 0, 0, b"")
        }
        Item::Dir { path, entry, .. } => {
            report.dirs += 1;
            tar.header(path, tar::EntryType::Directory, entry.mode, 0, b"")
        }
        Item::Leaf(path, e) => match e.kind {
            Kind::File => {
                report.files += 1;
                report.file_bytes += e.size;
                write_file(objects, &mut tar, path, e, &mut bufs, &progress)
            }
            Kind::Symlink => {
                report.symlinks += 1;
                tar.header(path, tar::EntryType::Symlink, 0o777, 0, &e.target)
            }
            Kind::Fifo => {
                report.fifos += 1;
                tar.header(path, tar::EntryType::Fifo, e.mode, 0, b"")
            }
            Kind::Dir => Err(LayerError::Invalid(
                "internal: a directory listed as a leaf".into(),
            )),
        },
    })?;
    progress.finish();
    tar.put(&ZEROS)?;
    tar.out
        .flush()
        .map_err(|e| LayerError::io("write", opts.label, e))?;
    report.tar_bytes = tar.bytes;
    report.diff_id = sha256_name(tar.sha);
    Ok(report)
}

/// A zstd writer for an export: single-threaded (so the output is the same on every run),
/// with a content checksum. Call `finish` on it when the export is done.
pub fn zstd_writer<W: Write>(
    out: W,
    level: i32,
) -> io::Result<zstd::stream::write::Encoder<'static, W>> {
    let mut enc = zstd::stream::write::Encoder::new(out, level)?;
    enc.include_checksum(true)?;
    Ok(enc)
}

// ---------------------------------------------------------------------------------------------
// Import
// ---------------------------------------------------------------------------------------------

/// What an import read and stored.
#[derive(Debug, Clone)]
pub struct ImportReport {
    /// The layer's digest (over the parent's tree for a changeset).
    pub digest: Digest,
    /// The parent layer named by a changeset.
    pub parent: Option<Digest>,
    /// Whether the tar named its digest (a cachefs export), which then matched.
    pub verified: bool,
    pub stats: TreeStats,
    /// `sha256:<hex>` of the uncompressed tar as read.
    pub diff_id: String,
    /// Bytes of the uncompressed tar.
    pub tar_bytes: u64,
    /// Bytes read from the input (compressed, for a zstd input).
    pub input_bytes: u64,
    pub compressed: bool,
    /// Bytes of blobs the store did not hold yet.
    pub stored_bytes: u64,
}

/// What the readers of one import saw, shared between them.
#[derive(Default)]
struct InputState {
    /// An error reading the input itself (not its contents).
    raw_error: RefCell<Option<(io::ErrorKind, String)>>,
    /// The zstd decoder failed.
    decode_error: Cell<bool>,
    raw_bytes: Cell<u64>,
    tar_bytes: Cell<u64>,
    /// The uncompressed stream ended.
    eof: Cell<bool>,
    /// The guard refused the tar (why).
    refused: RefCell<Option<String>>,
    /// The cancel flag was seen set while reading.
    interrupted: Cell<bool>,
    sha: RefCell<Sha256>,
}

/// The input as given.
struct RawReader<R> {
    inner: R,
    state: Rc<InputState>,
    progress: Progress,
}

impl<R: Read> Read for RawReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                let s = &self.state;
                s.raw_bytes.set(s.raw_bytes.get() + n as u64);
                self.progress.inc(n as u64);
                Ok(n)
            }
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    *self.state.raw_error.borrow_mut() = Some((e.kind(), e.to_string()));
                }
                Err(e)
            }
        }
    }
}

/// The input, read only while the work is not cancelled: an endless or stalled stream must not
/// keep an import from ending on a signal.
struct Cancellable<'c, R> {
    inner: R,
    cancel: Option<&'c AtomicI32>,
    state: Rc<InputState>,
}

impl<R: Read> Read for Cancellable<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.cancel.is_some_and(|c| c.load(Ordering::Relaxed) != 0) {
            self.state.interrupted.set(true);
            return Err(io::Error::other("interrupted"));
        }
        let res = self.inner.read(buf);
        if res.is_err() && self.cancel.is_some_and(|c| c.load(Ordering::Relaxed) != 0) {
            // The input gave up because of the signal (it polls the flag while it waits).
            self.state.interrupted.set(true);
        }
        res
    }
}

type Peeked<R> = io::Chain<Cursor<Vec<u8>>, RawReader<R>>;

/// The input, decompressed when it is zstd.
enum Decoded<R: Read> {
    Plain(Peeked<R>),
    Zstd(Box<zstd::stream::read::Decoder<'static, io::BufReader<Peeked<R>>>>),
}

/// The uncompressed tar stream: hashed (DiffID), counted, and watched for its end.
struct TarInput<R: Read> {
    inner: Decoded<R>,
    state: Rc<InputState>,
    guard: Guard,
}

/// Watches the headers of the uncompressed tar as they pass, before the tar crate sees them.
/// The crate reads GNU long-name members and pax extended headers whole into memory, sized
/// by their headers: those sizes are checked here first, so a hostile header is refused
/// before a byte of it is held. It also bounds what follows the end of the archive.
struct Guard {
    header: Box<[u8; 512]>,
    fill: usize,
    /// Bytes of the current member's data and padding still to pass.
    skip: u64,
    /// The data of a pax extended header, kept (it is bounded) to learn its `size` record.
    pax: Option<Vec<u8>>,
    pax_len: usize,
    /// A pax `size` record for the next member, which the crate honours over the header's.
    pending_size: Option<u64>,
    /// Bytes seen after the first zero block (where the crate stops), or `None` before.
    trailing: Option<u64>,
    /// A header this guard does not follow (unparsable, or GNU sparse with its extra
    /// headers): the import refuses that member itself, so nothing after it is read.
    blind: bool,
}

impl Guard {
    fn new() -> Guard {
        Guard {
            header: Box::new([0; 512]),
            fill: 0,
            skip: 0,
            pax: None,
            pax_len: 0,
            pending_size: None,
            trailing: None,
            blind: false,
        }
    }

    /// Follows `data`, the next bytes of the tar; refuses what must not reach the crate.
    fn scan(&mut self, mut data: &[u8]) -> Result<(), String> {
        while !data.is_empty() && !self.blind {
            if let Some(t) = &mut self.trailing {
                *t += data.len() as u64;
                if *t > MAX_TRAILER {
                    return Err(format!(
                        "refusing the tar: more than {} follow its end-of-archive blocks",
                        crate::units::format_size(MAX_TRAILER)
                    ));
                }
                return Ok(());
            }
            if self.skip > 0 {
                let k = data
                    .len()
                    .min(usize::try_from(self.skip).unwrap_or(usize::MAX));
                if let Some(p) = &mut self.pax {
                    let want = self.pax_len.saturating_sub(p.len()).min(k);
                    p.extend_from_slice(&data[..want]);
                }
                self.skip -= k as u64;
                data = &data[k..];
                if self.skip == 0 {
                    self.end_pax()?;
                }
                continue;
            }
            let k = data.len().min(512 - self.fill);
            self.header[self.fill..self.fill + k].copy_from_slice(&data[..k]);
            self.fill += k;
            data = &data[k..];
            if self.fill == 512 {
                self.fill = 0;
                self.next_header()?;
            }
        }
        Ok(())
    }

    fn next_header(&mut self) -> Result<(), String> {
        if self.header.iter().all(|&b| b == 0) {
            self.trailing = Some(0);
            return Ok(());
        }
        let h = tar::Header::from_byte_slice(&self.header[..]);
        let Ok(mut size) = h.entry_size() else {
            self.blind = true;
            return Ok(());
        };
        let kind = self.header[156];
        match kind {
            // The name and its NUL.
            b'L' | b'K' if size > MAX_TAR_PATH as u64 + 1 => {
                return Err(format!(
                    "refusing the tar: a GNU long {} of {size} bytes (at most {MAX_TAR_PATH})",
                    if kind == b'L' { "name" } else { "link target" },
                ));
            }
            b'L' | b'K' => {}
            b'x' if size > MAX_PAX_HEADER => {
                return Err(format!(
                    "refusing the tar: a pax extended header of {size} bytes (at most {MAX_PAX_HEADER})"
                ));
            }
            b'x' => {
                self.pax_len = size as usize;
                self.pax = Some(Vec::with_capacity(self.pax_len));
            }
            b'g' if size > MAX_GLOBAL_HEADER => {
                return Err(format!(
                    "refusing the tar: a pax global header of {size} bytes (at most {MAX_GLOBAL_HEADER})"
                ));
            }
            b'g' => self.pending_size = None,
            b'S' => {
                self.blind = true;
                return Ok(());
            }
            _ => {
                if let Some(s) = self.pending_size.take() {
                    size = s;
                }
            }
        }
        let Some(padded) = size.checked_add(511) else {
            self.blind = true;
            return Ok(());
        };
        self.skip = padded & !511;
        if self.skip == 0 {
            self.end_pax()?;
        }
        Ok(())
    }

    /// A pax extended header was read whole: its `size` record sizes the next member; a path
    /// in it is held to the same bound as a GNU long name.
    fn end_pax(&mut self) -> Result<(), String> {
        let Some(data) = self.pax.take() else {
            return Ok(());
        };
        let mut size = None;
        for rec in tar::PaxExtensions::new(&data) {
            let Ok(rec) = rec else { break };
            let key = rec.key_bytes();
            if (key == b"path" || key == b"linkpath") && rec.value_bytes().len() > MAX_TAR_PATH {
                return Err(format!(
                    "refusing the tar: a pax {} of {} bytes (at most {MAX_TAR_PATH})",
                    String::from_utf8_lossy(key),
                    rec.value_bytes().len()
                ));
            }
            if key == b"size" && size.is_none() {
                size = Some(
                    std::str::from_utf8(rec.value_bytes())
                        .ok()
                        .and_then(|v| v.parse::<u64>().ok()),
                );
            }
        }
        // As the crate does: the first `size` record counts, and one it cannot parse is
        // ignored.
        self.pending_size = size.flatten();
        Ok(())
    }
}

/// A tar stream from elsewhere (a registry chunk) read through the same header `Guard` as an
/// import: a hostile GNU long name or pax header is refused from its header, before the tar
/// crate reads it into memory.
#[cfg(feature = "registry")]
pub(crate) struct GuardedTar<R> {
    inner: R,
    guard: Guard,
}

#[cfg(feature = "registry")]
impl<R: Read> GuardedTar<R> {
    pub(crate) fn new(inner: R) -> GuardedTar<R> {
        GuardedTar {
            inner,
            guard: Guard::new(),
        }
    }
}

#[cfg(feature = "registry")]
impl<R: Read> Read for GuardedTar<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.guard
            .scan(&buf[..n])
            .map_err(|why| io::Error::new(io::ErrorKind::InvalidData, why))?;
        Ok(n)
    }
}

impl<R: Read> Read for TarInput<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let res = match &mut self.inner {
            Decoded::Plain(r) => r.read(buf),
            Decoded::Zstd(r) => r.read(buf),
        };
        let s = &self.state;
        match res {
            Ok(0) if !buf.is_empty() => {
                s.eof.set(true);
                Ok(0)
            }
            Ok(n) => {
                s.sha.borrow_mut().update(&buf[..n]);
                s.tar_bytes.set(s.tar_bytes.get() + n as u64);
                if let Err(why) = self.guard.scan(&buf[..n]) {
                    *s.refused.borrow_mut() = Some(why.clone());
                    return Err(io::Error::other(why));
                }
                Ok(n)
            }
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted && s.raw_error.borrow().is_none() {
                    s.decode_error.set(true);
                }
                Err(e)
            }
        }
    }
}

/// A directory of the tar's own tree (the upper layer of a changeset).
struct UDir {
    /// Its parent's index and its name (the root: 0 and empty). Paths are built only for
    /// messages: a deep tree must not cost its depth squared in memory.
    parent: usize,
    name: Vec<u8>,
    /// `None` when the tar has no entry for it (it only holds other entries).
    mode: Option<u32>,
    children: BTreeMap<Vec<u8>, UNode>,
    /// Names of the layer below that this directory's whiteouts delete.
    whiteouts: BTreeSet<Vec<u8>>,
    /// An opaque whiteout: nothing of the layer below shows through.
    opaque: bool,
}

enum UNode {
    Dir(usize),
    Leaf(Entry),
}

impl UDir {
    fn new(parent: usize, name: &[u8], mode: Option<u32>) -> UDir {
        UDir {
            parent,
            name: name.to_vec(),
            mode,
            children: BTreeMap::new(),
            whiteouts: BTreeSet::new(),
            opaque: false,
        }
    }
}

fn refuse(path: &[u8], why: &str) -> LayerError {
    LayerError::Invalid(format!("refusing tar entry {}: {why}", show(path)))
}

/// The components of a tar path: `./` prefixes and empty or `.` components are dropped;
/// absolute paths, `..` and NUL bytes are refused.
fn components(raw: &[u8]) -> Result<Vec<&[u8]>, LayerError> {
    if raw.contains(&0) {
        return Err(refuse(raw, "its name holds a NUL byte"));
    }
    if raw.starts_with(b"/") {
        return Err(refuse(raw, "absolute paths would write outside the layer"));
    }
    let mut out = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                return Err(refuse(raw, "a .. component would write outside the layer"));
            }
            c if c.len() > NAME_MAX => {
                return Err(refuse(
                    raw,
                    &format!(
                        "a name of {} bytes (no filesystem holds a name over {NAME_MAX})",
                        c.len()
                    ),
                ));
            }
            c => out.push(c),
        }
    }
    if raw.len() > MAX_TAR_PATH {
        return Err(refuse(
            raw,
            &format!("a path of {} bytes (at most {MAX_TAR_PATH})", raw.len()),
        ));
    }
    Ok(out)
}

/// The tar's tree as it is read.
struct Upper {
    /// Arena of directories; 0 is the root. A directory's index is larger than its parent's.
    dirs: Vec<UDir>,
    /// Regular files read so far, by directory and name: what a hard link may point to.
    files: HashMap<(usize, Vec<u8>), Entry>,
}

impl Upper {
    fn new() -> Upper {
        Upper {
            dirs: vec![UDir::new(0, b"", None)],
            files: HashMap::new(),
        }
    }

    /// The path of directory `i` (with a trailing `/`, empty for the root), for messages.
    fn path(&self, mut i: usize) -> Vec<u8> {
        let mut names = Vec::new();
        while i != 0 {
            names.push(&self.dirs[i].name[..]);
            i = self.dirs[i].parent;
        }
        let mut p = Vec::new();
        for n in names.iter().rev() {
            p.extend_from_slice(n);
            p.push(b'/');
        }
        p
    }

    /// The directory `comps` names, if the tar made it (nothing is created).
    fn find_dir(&self, comps: &[&[u8]]) -> Option<usize> {
        let mut at = 0;
        for c in comps {
            match self.dirs[at].children.get(*c) {
                Some(UNode::Dir(j)) => at = *j,
                _ => return None,
            }
        }
        Some(at)
    }

    /// The directory that holds the last component of `comps`, creating the ones the tar
    /// did not list; refuses a path through something that is not a directory.
    fn parent_of(&mut self, comps: &[&[u8]], raw: &[u8]) -> Result<usize, LayerError> {
        let mut at = 0;
        for c in &comps[..comps.len().saturating_sub(1)] {
            if c.starts_with(WHITEOUT_PREFIX) {
                return Err(refuse(raw, "a whiteout (.wh.) cannot be a directory"));
            }
            at = match self.dirs[at].children.get(*c) {
                Some(UNode::Dir(j)) => *j,
                Some(UNode::Leaf(e)) => {
                    let mut p = self.path(at);
                    p.extend_from_slice(c);
                    return Err(refuse(
                        raw,
                        &format!(
                            "it goes through {} {}, which is not a directory",
                            e.kind.name(),
                            show(&p)
                        ),
                    ));
                }
                None => {
                    self.dirs.push(UDir::new(at, c, None));
                    let j = self.dirs.len() - 1;
                    self.dirs[at].children.insert(c.to_vec(), UNode::Dir(j));
                    j
                }
            };
        }
        Ok(at)
    }

    fn add_dir(&mut self, comps: &[&[u8]], raw: &[u8], mode: u32) -> Result<(), LayerError> {
        let Some(name) = comps.last() else {
            // The root (`./`): a layer records no mode for it.
            return Ok(());
        };
        if name.starts_with(WHITEOUT_PREFIX) {
            return Err(refuse(raw, "a whiteout (.wh.) cannot be a directory"));
        }
        let at = self.parent_of(comps, raw)?;
        match self.dirs[at].children.get(*name) {
            Some(UNode::Dir(j)) if self.dirs[*j].mode.is_none() => {
                let j = *j;
                self.dirs[j].mode = Some(mode & super::format::MODE_MASK);
                Ok(())
            }
            Some(_) => Err(refuse(raw, "the tar holds this path twice")),
            None => {
                self.dirs
                    .push(UDir::new(at, name, Some(mode & super::format::MODE_MASK)));
                let j = self.dirs.len() - 1;
                self.dirs[at].children.insert(name.to_vec(), UNode::Dir(j));
                Ok(())
            }
        }
    }

    /// Adds a file, symlink or fifo (`entry` named after the last component).
    fn add_leaf(&mut self, comps: &[&[u8]], raw: &[u8], entry: Entry) -> Result<(), LayerError> {
        if comps.is_empty() {
            return Err(refuse(raw, "the archive's root must be a directory"));
        }
        let at = self.parent_of(comps, raw)?;
        let name = entry.name.clone();
        if self.dirs[at].children.contains_key(&name) {
            return Err(refuse(raw, "the tar holds this path twice"));
        }
        if entry.kind == Kind::File {
            self.files.insert((at, name.clone()), entry.clone());
        }
        self.dirs[at].children.insert(name, UNode::Leaf(entry));
        Ok(())
    }

    /// Records a whiteout (`.wh.<name>` or the opaque `.wh..wh..opq`).
    fn add_whiteout(&mut self, comps: &[&[u8]], raw: &[u8]) -> Result<(), LayerError> {
        let at = self.parent_of(comps, raw)?;
        let name = comps.last().copied().unwrap_or_default();
        let dir = &mut self.dirs[at];
        if name == OPAQUE_WHITEOUT {
            if dir.opaque {
                return Err(refuse(raw, "the tar holds this path twice"));
            }
            dir.opaque = true;
            return Ok(());
        }
        if name.starts_with(b".wh..wh.") {
            // Other `.wh..wh.` names are aufs bookkeeping, not whiteouts: ignored, as the
            // OCI tools do.
            return Ok(());
        }
        let target = &name[WHITEOUT_PREFIX.len()..];
        if !valid_name(target) {
            return Err(refuse(raw, "a whiteout of an impossible name"));
        }
        if !dir.whiteouts.insert(target.to_vec()) {
            return Err(refuse(raw, "the tar holds this path twice"));
        }
        Ok(())
    }
}

/// Reads one import.
struct Importer<'a> {
    objects: &'a ObjectStore,
    state: Rc<InputState>,
    opts: &'a Options<'a>,
    buf: Vec<u8>,
    stored_bytes: u64,
}

impl Importer<'_> {
    /// What an error from the readers means: the input could not be read (I/O), or it is
    /// not a whole, valid tar (bad input).
    fn input_error(&self, e: io::Error) -> LayerError {
        if self.state.interrupted.get() {
            return LayerError::Interrupted;
        }
        if let Some(why) = self.state.refused.borrow().clone() {
            return LayerError::Invalid(why);
        }
        if let Some((kind, msg)) = self.state.raw_error.borrow().clone() {
            return LayerError::io("read", self.opts.label, io::Error::new(kind, msg));
        }
        if self.state.decode_error.get() {
            return LayerError::Invalid(format!("truncated or corrupt tar: zstd: {e}"));
        }
        // The tar crate's messages can quote a member's name as it is: escape them.
        LayerError::Invalid(format!(
            "truncated or corrupt tar: {}",
            crate::text::cut_middle(&crate::text::escape_controls(&e.to_string()), 400)
        ))
    }

    /// Stores a file's contents as a blob (hashing as they stream past); returns its hash.
    fn store_blob(
        &mut self,
        r: &mut dyn Read,
        size: u64,
        raw: &[u8],
    ) -> Result<Digest, LayerError> {
        let mut hasher = blake3::Hasher::new();
        let mut writer = None;
        let mut total = 0u64;
        loop {
            // Fill the buffer (or reach the member's end).
            let mut n = 0;
            while n < self.buf.len() {
                match r.read(&mut self.buf[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(self.input_error(e)),
                }
            }
            total += n as u64;
            let chunk = &self.buf[..n];
            if chunk.len() >= 256 * 1024 {
                hasher.update_rayon(chunk);
            } else {
                hasher.update(chunk);
            }
            let last = n < self.buf.len();
            if last && writer.is_none() {
                // All of it fit one buffer: store it only if the store lacks it.
                let d = Digest(*hasher.finalize().as_bytes());
                if total != size {
                    return Err(self.short_member(raw, total, size));
                }
                if !self.objects.has(ObjectKind::Blob, d) {
                    let mut w = self.objects.writer()?;
                    w.write_all(chunk)?;
                    w.commit(ObjectKind::Blob, d)?;
                    self.stored_bytes += total;
                }
                return Ok(d);
            }
            let w = match &mut writer {
                Some(w) => w,
                None => writer.insert(self.objects.writer()?),
            };
            w.write_all(&self.buf[..n])?;
            if last {
                break;
            }
        }
        if total != size {
            return Err(self.short_member(raw, total, size));
        }
        let d = Digest(*hasher.finalize().as_bytes());
        let existed = self.objects.has(ObjectKind::Blob, d);
        if let Some(w) = writer {
            w.commit(ObjectKind::Blob, d)?;
        }
        if !existed {
            self.stored_bytes += total;
        }
        Ok(d)
    }

    fn short_member(&self, raw: &[u8], got: u64, size: u64) -> LayerError {
        LayerError::Invalid(format!(
            "truncated or corrupt tar: {} ends after {got} of its {size} bytes",
            show(raw)
        ))
    }
}

/// Reads a tar (plain or zstd, detected by its magic bytes) into the object store and
/// returns the layer it holds.
///
/// A tar naming a parent (`--since` export) is applied over that layer's tree, which must be
/// in the store: `parent_known` says whether a digest is a recorded layer. A tar naming its
/// digest must hash to it. Hostile or broken tars are refused with [`LayerError::Invalid`]:
/// absolute paths, `..`, paths through a non-directory, hard links to anything but an
/// earlier file of the same tar, devices and other types a layer cannot hold, duplicate
/// paths, truncated or corrupt input. Objects already stored by a refused import are
/// unreferenced and go with the next gc. The caller holds the objects' shared lock until the
/// layer is recorded.
pub fn import<R: Read>(
    objects: &ObjectStore,
    input: R,
    parent_known: &mut dyn FnMut(Digest) -> Result<bool, LayerError>,
    opts: &Options<'_>,
) -> Result<ImportReport, LayerError> {
    let state = Rc::new(InputState::default());
    let progress = match opts.size_hint {
        Some(total) => Progress::bytes("importing", total, opts.show_progress),
        None => Progress::none(),
    };
    let input = Cancellable {
        inner: input,
        cancel: opts.cancel,
        state: Rc::clone(&state),
    };
    let mut raw = RawReader {
        inner: input,
        state: Rc::clone(&state),
        progress: progress.clone(),
    };
    // Peek at the magic bytes.
    let mut head = [0u8; 4];
    let mut got = 0;
    while got < head.len() {
        match raw.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) if state.interrupted.get() => return Err(LayerError::Interrupted),
            Err(e) => return Err(LayerError::io("read", opts.label, e)),
        }
    }
    let compressed = got == 4 && head == ZSTD_MAGIC;
    let peeked = Cursor::new(head[..got].to_vec()).chain(raw);
    let decoded = if compressed {
        let dec = zstd::stream::read::Decoder::new(peeked)
            .map_err(|e| LayerError::io("read", opts.label, e))?;
        Decoded::Zstd(Box::new(dec))
    } else {
        Decoded::Plain(peeked)
    };
    let mut input = TarInput {
        inner: decoded,
        state: Rc::clone(&state),
        guard: Guard::new(),
    };
    let mut imp = Importer {
        objects,
        state: Rc::clone(&state),
        opts,
        buf: vec![0u8; CHUNK],
        stored_bytes: 0,
    };
    let mut upper = Upper::new();
    let mut named: Option<(Digest, Option<Digest>)> = None;
    {
        let mut archive = tar::Archive::new(&mut input);
        let entries = archive.entries().map_err(|e| imp.input_error(e))?;
        for entry in entries {
            opts.check_cancel()?;
            let mut entry = entry.map_err(|e| imp.input_error(e))?;
            let type_byte = entry.header().as_bytes()[156];
            let kind = entry.header().entry_type();
            if kind == tar::EntryType::XGlobalHeader {
                let size = entry.size();
                if size > MAX_GLOBAL_HEADER {
                    return Err(LayerError::Invalid(format!(
                        "refusing the tar: a pax global header of {size} bytes"
                    )));
                }
                let mut data = Vec::new();
                entry
                    .read_to_end(&mut data)
                    .map_err(|e| imp.input_error(e))?;
                if data.len() as u64 != size {
                    return Err(LayerError::Invalid(
                        "truncated or corrupt tar: a pax global header is cut short".into(),
                    ));
                }
                let records = parse_pax_records(&data).ok_or_else(|| {
                    LayerError::Invalid(
                        "truncated or corrupt tar: malformed pax global header".into(),
                    )
                })?;
                for (key, value) in records {
                    if key != b"comment" {
                        continue;
                    }
                    if let Some((d, parent)) = parse_layer_comment(value)? {
                        if named.is_some() {
                            return Err(LayerError::Invalid(format!(
                                "refusing the tar: it has two {COMMENT_TAG} headers"
                            )));
                        }
                        if let Some(p) = parent
                            && !parent_known(p)?
                        {
                            return Err(LayerError::Invalid(format!(
                                "the tar is a changeset over layer blake3:{p}, which is not in this store: import that layer first"
                            )));
                        }
                        named = Some((d, parent));
                    }
                }
                continue;
            }
            let raw_path = entry.path_bytes().into_owned();
            let comps = components(&raw_path)?;
            // Only files, directories and fifos need a mode (a hard link takes its file's).
            let mode =
                |entry: &tar::Entry<'_, _>| entry.header().mode().map_err(|e| imp.input_error(e));
            let name = comps.last().copied().unwrap_or_default();
            let is_whiteout = name.starts_with(WHITEOUT_PREFIX);
            // Old tars mark directories with a trailing `/` on a regular entry.
            let old_dir = type_byte == 0 && raw_path.ends_with(b"/");
            match kind {
                tar::EntryType::Directory => upper.add_dir(&comps, &raw_path, mode(&entry)?)?,
                tar::EntryType::Regular if old_dir => {
                    upper.add_dir(&comps, &raw_path, mode(&entry)?)?
                }
                tar::EntryType::Regular | tar::EntryType::Continuous if is_whiteout => {
                    upper.add_whiteout(&comps, &raw_path)?
                }
                _ if is_whiteout => {
                    return Err(refuse(
                        &raw_path,
                        "a whiteout (.wh.) must be a regular file",
                    ));
                }
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    if comps.is_empty() {
                        return Err(refuse(&raw_path, "the archive's root must be a directory"));
                    }
                    let mode = mode(&entry)?;
                    let size = entry.size();
                    let hash = imp.store_blob(&mut entry, size, &raw_path)?;
                    upper.add_leaf(&comps, &raw_path, Entry::file(name, mode, size, hash))?;
                }
                tar::EntryType::Symlink => {
                    // The target is data: kept as it is (absolute or not), never followed.
                    let target = entry.link_name_bytes().map(|t| t.into_owned());
                    let target = match target {
                        Some(t) if t.len() > SYMLINK_MAX => {
                            return Err(refuse(
                                &raw_path,
                                &format!(
                                    "a symlink target of {} bytes (symlink(2) takes at most {SYMLINK_MAX})",
                                    t.len()
                                ),
                            ));
                        }
                        Some(t) if !t.is_empty() && !t.contains(&0) => t,
                        _ => {
                            return Err(refuse(
                                &raw_path,
                                "a symlink with an empty or invalid target",
                            ));
                        }
                    };
                    upper.add_leaf(&comps, &raw_path, Entry::symlink(name, &target))?;
                }
                tar::EntryType::Fifo => {
                    upper.add_leaf(&comps, &raw_path, Entry::fifo(name, mode(&entry)?))?;
                }
                tar::EntryType::Link => {
                    let target = entry
                        .link_name_bytes()
                        .map(|t| t.into_owned())
                        .unwrap_or_default();
                    let outside = || {
                        refuse(
                            &raw_path,
                            &format!(
                                "a hard link to {}, which is not an earlier file of this tar",
                                show(&target)
                            ),
                        )
                    };
                    let tcomps = components(&target).map_err(|_| outside())?;
                    let linked = tcomps.split_last().and_then(|(last, dirs)| {
                        let at = upper.find_dir(dirs)?;
                        upper.files.get(&(at, last.to_vec()))
                    });
                    let Some(linked) = linked else {
                        return Err(outside());
                    };
                    // A hard link is the same file: a copy of it, with its mode.
                    let e = Entry::file(name, linked.mode, linked.size, linked.hash);
                    upper.add_leaf(&comps, &raw_path, e)?;
                }
                tar::EntryType::Char | tar::EntryType::Block => {
                    return Err(refuse(&raw_path, "a layer cannot hold device nodes"));
                }
                tar::EntryType::GNUSparse => {
                    return Err(refuse(
                        &raw_path,
                        "sparse files (GNU tar --sparse) are not supported",
                    ));
                }
                other => {
                    return Err(refuse(
                        &raw_path,
                        &format!(
                            "entries of type {:?} are not supported",
                            char::from(other.as_byte())
                        ),
                    ));
                }
            }
        }
    }
    if state.eof.get() {
        return Err(LayerError::Invalid(
            "truncated or corrupt tar: it ends without the end-of-archive blocks".into(),
        ));
    }
    // Read to the end, so that a zstd stream is checked whole and the DiffID covers all.
    io::copy(&mut input, &mut io::sink()).map_err(|e| imp.input_error(e))?;
    progress.finish();
    let stored_before = imp.stored_bytes;
    let parent = named.and_then(|(_, p)| p);
    let digest = build(objects, &upper, parent)?;
    if let Some((claimed, _)) = named
        && claimed != digest
    {
        return Err(LayerError::Invalid(format!(
            "digest mismatch: the tar says blake3:{claimed}, its contents hash to blake3:{digest}"
        )));
    }
    let stats = tree_stats(objects, digest)?;
    let sha = state.sha.replace(Sha256::new());
    Ok(ImportReport {
        digest,
        parent,
        verified: named.is_some(),
        stats,
        diff_id: sha256_name(sha),
        tar_bytes: state.tar_bytes.get(),
        input_bytes: state.raw_bytes.get(),
        compressed,
        stored_bytes: stored_before,
    })
}

/// Stores the tree objects of the tar's tree applied over `parent` (whiteouts and opaque
/// directories hide the parent's entries; the tar's entries replace them, directories
/// merging with the parent's directories); returns the root digest.
fn build(
    objects: &ObjectStore,
    upper: &Upper,
    parent: Option<Digest>,
) -> Result<Digest, LayerError> {
    let n = upper.dirs.len();
    // Top-down: which directory of the parent each of the tar's directories lies over, and
    // what of it shows through.
    let mut lower: Vec<Option<(Digest, u32)>> = vec![None; n];
    let mut base: Vec<Vec<Entry>> = vec![Vec::new(); n];
    lower[0] = parent.map(|p| (p, 0));
    for i in 0..n {
        let dir = &upper.dirs[i];
        if let Some((d, _)) = lower[i]
            && !dir.opaque
        {
            let tree = objects.read_tree(d)?;
            base[i] = tree
                .entries
                .into_iter()
                .filter(|e| !dir.whiteouts.contains(&e.name))
                .collect();
        }
        for (name, node) in &dir.children {
            let UNode::Dir(j) = node else { continue };
            let below = base[i]
                .binary_search_by(|e| e.name.as_slice().cmp(name))
                .ok()
                .map(|k| &base[i][k]);
            lower[*j] = match below {
                Some(e) if e.kind == Kind::Dir => Some((e.hash, e.mode)),
                Some(e) if upper.dirs[*j].mode.is_none() => {
                    let path = upper.path(*j);
                    return Err(LayerError::Invalid(format!(
                        "refusing the tar: its entries under {} go through {} {} of the parent layer, which is not a directory",
                        show(&path),
                        e.kind.name(),
                        show(&path[..path.len() - 1]),
                    )));
                }
                // The tar's directory replaces what the parent had there.
                _ => None,
            };
        }
    }
    // Bottom-up: a directory's index is larger than its parent's.
    let mut digests = vec![Digest::ZERO; n];
    for i in (0..n).rev() {
        let mut merged: BTreeMap<Vec<u8>, Entry> = std::mem::take(&mut base[i])
            .into_iter()
            .map(|e| (e.name.clone(), e))
            .collect();
        for (name, node) in &upper.dirs[i].children {
            let e = match node {
                UNode::Leaf(e) => e.clone(),
                UNode::Dir(j) => {
                    let mode = upper.dirs[*j]
                        .mode
                        .or(lower[*j].map(|(_, m)| m))
                        .unwrap_or(0o755);
                    Entry::dir(name, mode, digests[*j])
                }
            };
            merged.insert(name.clone(), e);
        }
        let tree = Tree {
            entries: merged.into_values().collect(),
        };
        digests[i] = objects.put_tree(&tree)?;
    }
    Ok(digests[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tree to build in a store: path -> node, parents implied.
    enum N {
        F(&'static [u8], u32),
        D(u32),
        L(&'static [u8]),
        P(u32),
    }

    fn store() -> (tempfile::TempDir, ObjectStore) {
        let dir = tempfile::tempdir().unwrap();
        let objects = ObjectStore::open(dir.path()).unwrap();
        (dir, objects)
    }

    fn put_blob(objects: &ObjectStore, data: &[u8]) -> Digest {
        let d = Digest::of(data);
        let mut w = objects.writer().unwrap();
        w.write_all(data).unwrap();
        w.commit(ObjectKind::Blob, d).unwrap();
        d
    }

    /// Builds a layer from `(path, node)` pairs (directories named before their contents).
    fn layer(objects: &ObjectStore, spec: &[(&str, N)]) -> Digest {
        #[derive(Default)]
        struct D {
            mode: u32,
            kids: BTreeMap<Vec<u8>, Result<Entry, Box<D>>>,
        }
        fn at<'a>(root: &'a mut D, comps: &[&str]) -> &'a mut D {
            let mut d = root;
            for c in comps {
                let slot = d.kids.entry(c.as_bytes().to_vec()).or_insert_with(|| {
                    Err(Box::new(D {
                        mode: 0o755,
                        ..D::default()
                    }))
                });
                d = match slot {
                    Err(b) => b,
                    Ok(_) => panic!("{c} is not a dir"),
                };
            }
            d
        }
        fn store_dir(objects: &ObjectStore, d: &D) -> Digest {
            let mut t = Tree::default();
            for (name, k) in &d.kids {
                t.entries.push(match k {
                    Ok(e) => e.clone(),
                    Err(sub) => Entry::dir(name, sub.mode, store_dir(objects, sub)),
                });
            }
            objects.put_tree(&t).unwrap()
        }
        let mut root = D::default();
        for (path, node) in spec {
            let comps: Vec<&str> = path.split('/').collect();
            let (name, parents) = comps.split_last().unwrap();
            let d = at(&mut root, parents);
            let nb = name.as_bytes();
            match node {
                N::D(mode) => {
                    let sub = at(d, &[*name]);
                    sub.mode = *mode;
                }
                N::F(data, mode) => {
                    let h = put_blob(objects, data);
                    d.kids.insert(
                        nb.to_vec(),
                        Ok(Entry::file(nb, *mode, data.len() as u64, h)),
                    );
                }
                N::L(t) => {
                    d.kids.insert(nb.to_vec(), Ok(Entry::symlink(nb, t)));
                }
                N::P(mode) => {
                    d.kids.insert(nb.to_vec(), Ok(Entry::fifo(nb, *mode)));
                }
            }
        }
        store_dir(objects, &root)
    }

    fn leak(v: Vec<u8>) -> &'static [u8] {
        Box::leak(v.into_boxed_slice())
    }

    fn sample(objects: &ObjectStore) -> Digest {
        let long = "d/".to_string() + &"x".repeat(150);
        let long: &'static str = Box::leak(long.into_boxed_str());
        layer(
            objects,
            &[
                ("a.txt", N::F(b"hello\n", 0o644)),
                ("bin", N::D(0o755)),
                ("bin/run", N::F(b"#!/bin/sh\n", 0o755)),
                ("empty", N::D(0o700)),
                ("tmp", N::D(0o1777)),
                ("link", N::L(b"a.txt")),
                ("abs", N::L(b"/etc/passwd")),
                ("p", N::P(0o600)),
                ("d", N::D(0o755)),
                (long, N::F(b"long name", 0o600)),
                ("big", N::F(leak(vec![7u8; 3 * 1024 * 1024 + 5]), 0o644)),
            ],
        )
    }

    fn export_vec(
        objects: &ObjectStore,
        root: Digest,
        since: Option<Digest>,
    ) -> (Vec<u8>, ExportReport) {
        let mut out = Vec::new();
        let r = export(
            objects,
            root,
            since,
            &mut out,
            &Options::new(Path::new("mem")),
        )
        .unwrap();
        (out, r)
    }

    fn import_bytes(objects: &ObjectStore, data: &[u8]) -> Result<ImportReport, LayerError> {
        import(
            objects,
            data,
            &mut |_| Ok(true),
            &Options::new(Path::new("mem")),
        )
    }

    fn invalid(r: Result<ImportReport, LayerError>) -> String {
        match r {
            Err(LayerError::Invalid(m)) => m,
            Err(e) => panic!("not Invalid: {e}"),
            Ok(r) => panic!("imported {}", r.digest),
        }
    }

    #[test]
    fn round_trip_into_a_fresh_store() {
        let (_d1, a) = store();
        let root = sample(&a);
        let (tar, report) = export_vec(&a, root, None);
        assert_eq!(report.tar_bytes, tar.len() as u64);
        assert_eq!(report.files, 4);
        assert_eq!(report.symlinks, 2);
        assert_eq!(report.fifos, 1);
        let (_d2, b) = store();
        let imp = import_bytes(&b, &tar).unwrap();
        assert_eq!(imp.digest, root);
        assert!(imp.verified);
        assert_eq!(imp.diff_id, report.diff_id);
        assert_eq!(imp.stats, tree_stats(&a, root).unwrap());
        // And it exports to the same bytes from there.
        assert_eq!(export_vec(&b, root, None).0, tar);
    }

    #[test]
    fn deep_paths_round_trip_up_to_the_bound_and_no_further() {
        // `depth` directories `dd`, a file `f` at the bottom (built bottom-up: the `layer`
        // helper recurses).
        fn chain(objects: &ObjectStore, depth: usize) -> Digest {
            let h = put_blob(objects, b"deep");
            let mut d = objects
                .put_tree(&Tree {
                    entries: vec![Entry::file(b"f", 0o644, 4, h)],
                })
                .unwrap();
            for _ in 0..depth {
                d = objects
                    .put_tree(&Tree {
                        entries: vec![Entry::dir(b"dd", 0o755, d)],
                    })
                    .unwrap();
            }
            d
        }
        // 2,000 levels: a 6,001-byte path, deeper than PATH_MAX, within MAX_TAR_PATH.
        let (_d1, a) = store();
        let root = chain(&a, 2000);
        let (tar, _) = export_vec(&a, root, None);
        let (_d2, b) = store();
        assert_eq!(import_bytes(&b, &tar).unwrap().digest, root);
        // Past the bound the export fails (import would refuse the tar), on a short line.
        let root = chain(&a, 5500);
        let mut out = Vec::new();
        let err = export(&a, root, None, &mut out, &Options::new(Path::new("mem")))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot export") && err.contains("a path of 16386 bytes"),
            "{err}"
        );
        assert!(err.len() < 400, "{err}");
    }

    #[test]
    fn exports_are_byte_identical_and_deterministic() {
        let (_d, a) = store();
        let root = sample(&a);
        let (t1, r1) = export_vec(&a, root, None);
        let (t2, r2) = export_vec(&a, root, None);
        assert_eq!(t1, t2);
        assert_eq!(r1.diff_id, r2.diff_id);
        // The global header comes first and names the layer.
        assert_eq!(&t1[..GLOBAL_HEADER_NAME.len()], GLOBAL_HEADER_NAME);
        assert_eq!(t1[156], b'g');
        let comment = layer_comment(root, None);
        assert!(
            t1.windows(comment.len()).any(|w| w == comment.as_bytes()),
            "comment missing"
        );
        // Every member: mtime 0, uid/gid 0; the order is depth first by name.
        let mut ar = tar::Archive::new(&t1[..]);
        let mut names = Vec::new();
        for e in ar.entries().unwrap() {
            let e = e.unwrap();
            let h = e.header();
            assert_eq!(h.mtime().unwrap(), 0);
            assert_eq!(h.uid().unwrap(), 0);
            assert_eq!(h.gid().unwrap(), 0);
            names.push(String::from_utf8_lossy(&e.path_bytes()).into_owned());
        }
        let long = "d/".to_string() + &"x".repeat(150);
        assert_eq!(
            names,
            [
                "pax_global_header",
                "a.txt",
                "abs",
                "big",
                "bin/",
                "bin/run",
                "d/",
                long.as_str(),
                "empty/",
                "link",
                "p",
                "tmp/",
            ]
        );
    }

    #[test]
    fn corrupt_and_wrong_length_blobs_fail_the_export() {
        for data in [&b"small contents"[..], leak(vec![9u8; 2 * CHUNK + 17])] {
            let (_d, a) = store();
            let root = layer(&a, &[("f", N::F(data, 0o644))]);
            let p = a.path(ObjectKind::Blob, Digest::of(data));
            let mut bad = data.to_vec();
            bad[3] ^= 1;
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o644))
                .unwrap();
            std::fs::write(&p, &bad).unwrap();
            let mut out = Vec::new();
            let err =
                export(&a, root, None, &mut out, &Options::new(Path::new("mem"))).unwrap_err();
            assert!(matches!(err, LayerError::Corrupt { .. }), "{err}");
            // The member never got its full contents: no tar reader accepts it.
            assert!(out.len() < 3 * 512 + data.len());
            // Shorter: a length mismatch is corrupt too.
            std::fs::write(&p, &data[..data.len() - 1]).unwrap();
            let err = export(
                &a,
                root,
                None,
                &mut Vec::new(),
                &Options::new(Path::new("mem")),
            )
            .unwrap_err();
            assert!(
                matches!(&err, LayerError::Corrupt { reason, .. } if reason.contains("bytes")),
                "{err}"
            );
        }
    }

    #[test]
    fn since_round_trip_with_deletions_and_kind_changes() {
        let (_d1, a) = store();
        let parent = layer(
            &a,
            &[
                ("keep", N::F(b"same", 0o644)),
                ("gone", N::F(b"bye", 0o644)),
                ("gonedir", N::D(0o755)),
                ("gonedir/x", N::F(b"x", 0o644)),
                ("f2d", N::F(b"file", 0o644)),
                ("d2f", N::D(0o755)),
                ("d2f/inner", N::F(b"inner", 0o644)),
                ("mod", N::F(b"old", 0o644)),
                ("chmod", N::F(b"c", 0o644)),
                ("sub", N::D(0o755)),
                ("sub/deep", N::D(0o755)),
                ("sub/deep/a", N::F(b"a", 0o644)),
                ("sub/deep/b", N::F(b"b", 0o644)),
                ("sub/untouched", N::D(0o755)),
                ("sub/untouched/u", N::F(b"u", 0o644)),
                ("s2l", N::F(b"s", 0o644)),
                ("-x", N::F(b"dash", 0o644)),
            ],
        );
        let child = layer(
            &a,
            &[
                ("keep", N::F(b"same", 0o644)),
                ("f2d", N::D(0o750)),
                ("f2d/new", N::F(b"new", 0o600)),
                ("d2f", N::F(b"now a file", 0o644)),
                ("mod", N::F(b"new contents", 0o644)),
                ("chmod", N::F(b"c", 0o600)),
                ("sub", N::D(0o755)),
                ("sub/deep", N::D(0o755)),
                ("sub/deep/a", N::F(b"a2", 0o644)),
                ("sub/untouched", N::D(0o755)),
                ("sub/untouched/u", N::F(b"u", 0o644)),
                ("s2l", N::L(b"keep")),
                ("-x", N::P(0o644)),
                ("added", N::D(0o755)),
                ("added/f", N::F(b"f", 0o644)),
            ],
        );
        let (full_parent, _) = export_vec(&a, parent, None);
        let (delta, report) = export_vec(&a, child, Some(parent));
        assert_eq!(report.parent, Some(parent));
        let mut names = Vec::new();
        for e in tar::Archive::new(&delta[..]).entries().unwrap() {
            names.push(String::from_utf8_lossy(&e.unwrap().path_bytes()).into_owned());
        }
        assert_eq!(
            names,
            [
                "pax_global_header",
                ".wh.-x",
                ".wh.d2f",
                ".wh.f2d",
                ".wh.gone",
                ".wh.gonedir",
                ".wh.s2l",
                "-x",
                "added/",
                "added/f",
                "chmod",
                "d2f",
                "f2d/",
                "f2d/new",
                "mod",
                "s2l",
                "sub/",
                "sub/deep/",
                ".wh.b",
                "sub/deep/a",
            ]
            .map(|n| if n == ".wh.b" { "sub/deep/.wh.b" } else { n })
        );
        // Into a fresh store: the parent, then the changeset.
        let (_d2, b) = store();
        assert_eq!(import_bytes(&b, &full_parent).unwrap().digest, parent);
        let imp = import_bytes(&b, &delta).unwrap();
        assert_eq!(imp.digest, child);
        assert_eq!(imp.parent, Some(parent));
        // Without the parent, the changeset is refused.
        let (_d3, c) = store();
        let err = import(
            &c,
            &delta[..],
            &mut |_| Ok(false),
            &Options::new(Path::new("m")),
        );
        assert!(invalid(err).contains("import that layer first"));
    }

    #[test]
    fn zstd_round_trip_and_truncation() {
        let (_d, a) = store();
        let root = sample(&a);
        let (tar, _) = export_vec(&a, root, None);
        let mut enc = zstd_writer(Vec::new(), DEFAULT_ZSTD_LEVEL).unwrap();
        export(&a, root, None, &mut enc, &Options::new(Path::new("m"))).unwrap();
        let zst = enc.finish().unwrap();
        assert_eq!(&zst[..4], &ZSTD_MAGIC);
        assert_eq!(zstd::decode_all(&zst[..]).unwrap(), tar);
        let (_d2, b) = store();
        let imp = import_bytes(&b, &zst).unwrap();
        assert_eq!(imp.digest, root);
        assert!(imp.compressed);
        for cut in [zst.len() - 1, zst.len() - 20, zst.len() / 2, 10] {
            let m = invalid(import_bytes(&b, &zst[..cut]));
            assert!(m.starts_with("truncated or corrupt tar"), "{cut}: {m}");
        }
    }

    #[test]
    fn truncated_tars_are_refused() {
        let (_d, a) = store();
        let (_d2, b) = store();
        let long: &'static str = Box::leak(format!("d/{}", "y".repeat(120)).into_boxed_str());
        let small = layer(
            &a,
            &[
                ("a", N::F(b"hello", 0o644)),
                ("d", N::D(0o755)),
                (long, N::F(leak(vec![1u8; 1500]), 0o644)),
                (
                    "s",
                    N::L(leak(format!("/{}", "t".repeat(130)).into_bytes())),
                ),
            ],
        );
        let (tar, _) = export_vec(&a, small, None);
        // Every block boundary and some points inside blocks.
        let mut cuts: Vec<usize> = (0..tar.len() - 1024).step_by(512).collect();
        cuts.extend([1, 100, 700, tar.len() - 1024 + 3, tar.len() - 600]);
        for cut in cuts {
            let m = invalid(import_bytes(&b, &tar[..cut]));
            assert!(m.starts_with("truncated or corrupt tar"), "{cut}: {m}");
        }
        // One end block is enough (as for other readers).
        assert_eq!(
            import_bytes(&b, &tar[..tar.len() - 512]).unwrap().digest,
            small
        );
        // Cut inside a large file.
        let root = sample(&a);
        let (tar, _) = export_vec(&a, root, None);
        for cut in [tar.len() / 2, tar.len() / 2 + 1] {
            let m = invalid(import_bytes(&b, &tar[..cut]));
            assert!(m.starts_with("truncated or corrupt tar"), "{cut}: {m}");
        }
        // A flipped byte in a header breaks its checksum.
        let mut bad = tar.clone();
        bad[512 + 512 + 10] ^= 0x20;
        assert!(invalid(import_bytes(&b, &bad)).starts_with("truncated or corrupt tar"));
    }

    #[test]
    fn a_wrong_digest_is_refused() {
        let (_d, a) = store();
        let root = layer(&a, &[("f", N::F(b"data", 0o644))]);
        let (mut tar, _) = export_vec(&a, root, None);
        // Change the file's contents (same length), fix nothing else.
        let at = tar.windows(4).position(|w| w == b"data").unwrap();
        tar[at] = b'D';
        let m = invalid(import_bytes(&a, &tar));
        assert!(
            m.starts_with("digest mismatch: the tar says blake3:"),
            "{m}"
        );
        assert!(m.contains(&root.to_hex()));
    }

    /// A raw header (bypassing the tar crate's path checks).
    fn raw_member(path: &[u8], kind: u8, link: &[u8], data: &[u8]) -> Vec<u8> {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..path.len()].copy_from_slice(path);
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(data.len() as u64);
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_cksum();
        let mut out = h.as_bytes().to_vec();
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
        out
    }

    fn archive(members: &[Vec<u8>]) -> Vec<u8> {
        let mut out: Vec<u8> = members.concat();
        out.extend_from_slice(&[0; 1024]);
        out
    }

    #[test]
    fn hostile_tars_are_refused() {
        let (_d, a) = store();
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "dotdot",
                archive(&[raw_member(b"../x", b'0', b"", b"evil")]),
                "..",
            ),
            (
                "inner dotdot",
                archive(&[raw_member(b"a/../../x", b'0', b"", b"")]),
                "..",
            ),
            (
                "absolute",
                archive(&[raw_member(b"/etc/x", b'0', b"", b"evil")]),
                "absolute",
            ),
            (
                "through symlink",
                archive(&[
                    raw_member(b"a", b'2', b"/etc", b""),
                    raw_member(b"a/passwd", b'0', b"", b"root::0:0"),
                ]),
                "symlink",
            ),
            (
                "through file",
                archive(&[
                    raw_member(b"f", b'0', b"", b"x"),
                    raw_member(b"f/g", b'5', b"", b""),
                ]),
                "not a directory",
            ),
            (
                "char device",
                archive(&[raw_member(b"null", b'3', b"", b"")]),
                "device",
            ),
            (
                "block device",
                archive(&[raw_member(b"sda", b'4', b"", b"")]),
                "device",
            ),
            (
                "hard link outside",
                archive(&[raw_member(b"h", b'1', b"/etc/shadow", b"")]),
                "hard link",
            ),
            (
                "hard link dotdot",
                archive(&[raw_member(b"h", b'1', b"../x", b"")]),
                "hard link",
            ),
            (
                "hard link forward",
                archive(&[
                    raw_member(b"h", b'1', b"later", b""),
                    raw_member(b"later", b'0', b"", b"x"),
                ]),
                "hard link",
            ),
            (
                "hard link to a dir",
                archive(&[
                    raw_member(b"d/", b'5', b"", b""),
                    raw_member(b"h", b'1', b"d", b""),
                ]),
                "hard link",
            ),
            (
                "duplicate",
                archive(&[
                    raw_member(b"x", b'0', b"", b"1"),
                    raw_member(b"./x", b'0', b"", b"2"),
                ]),
                "twice",
            ),
            (
                "dir after file",
                archive(&[
                    raw_member(b"x", b'0', b"", b"1"),
                    raw_member(b"x/", b'5', b"", b""),
                ]),
                "twice",
            ),
            (
                "unknown type",
                archive(&[raw_member(b"v", b'V', b"", b"")]),
                "not supported",
            ),
            (
                "root file",
                archive(&[raw_member(b"./", b'0', b"", b"x")]),
                "root",
            ),
            (
                "empty symlink",
                archive(&[raw_member(b"s", b'2', b"", b"")]),
                "symlink",
            ),
            (
                "whiteout dir",
                archive(&[raw_member(b".wh.x/", b'5', b"", b"")]),
                "whiteout",
            ),
        ];
        for (what, tar, expect) in cases {
            let m = invalid(import_bytes(&a, &tar));
            assert!(m.contains(expect), "{what}: {m}");
        }
        // A NUL in a pax path.
        let mut pax = tar::Header::new_ustar();
        let rec = pax_record("path", b"a\0b");
        pax.set_size(rec.len() as u64);
        pax.set_entry_type(tar::EntryType::XHeader);
        pax.set_cksum();
        let mut m = pax.as_bytes().to_vec();
        m.extend_from_slice(&rec);
        m.resize(1024, 0);
        let t = archive(&[m, raw_member(b"x", b'0', b"", b"")]);
        assert!(invalid(import_bytes(&a, &t)).contains("NUL"));
        // Nothing but objects was written: the store holds objects/ only.
        let top: Vec<_> = std::fs::read_dir(a.root().parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(top, ["objects"]);
    }

    #[test]
    fn foreign_tars_import() {
        let (_d, a) = store();
        // Built with the tar crate: ./ prefixes, a root entry, implied parents, a hard link,
        // setuid bits, a long path through GNU long names, an absolute symlink.
        let mut b = tar::Builder::new(Vec::new());
        b.get_mut()
            .extend_from_slice(&raw_member(b"./", b'5', b"", b""));
        let mut f = tar::Header::new_ustar();
        f.set_mode(0o4755);
        f.set_size(3);
        b.append_data(&mut f.clone(), "./x/y/z", &b"abc"[..])
            .unwrap();
        let mut l = tar::Header::new_ustar();
        l.set_entry_type(tar::EntryType::Link);
        l.set_size(0);
        b.append_link(&mut l, "./x/hard", "x/y/z").unwrap();
        let mut s = tar::Header::new_ustar();
        s.set_entry_type(tar::EntryType::Symlink);
        s.set_size(0);
        b.append_link(&mut s, "abs", "/etc/passwd").unwrap();
        let long = format!("x/{}", "q".repeat(200));
        b.append_data(&mut f, &long, &b"abc"[..]).unwrap();
        let tar = b.into_inner().unwrap();
        let imp = import_bytes(&a, &tar).unwrap();
        assert!(!imp.verified);
        let expect = layer(
            &a,
            &[
                ("x", N::D(0o755)),
                ("x/y", N::D(0o755)),
                ("x/y/z", N::F(b"abc", 0o755)),
                ("x/hard", N::F(b"abc", 0o755)),
                (Box::leak(long.into_boxed_str()), N::F(b"abc", 0o755)),
                ("abs", N::L(b"/etc/passwd")),
            ],
        );
        assert_eq!(imp.digest, expect);
        assert_eq!(imp.stats.files, 3);
    }

    #[test]
    fn opaque_and_same_layer_whiteouts() {
        let (_d, a) = store();
        let parent = layer(
            &a,
            &[
                ("d", N::D(0o755)),
                ("d/old", N::F(b"old", 0o644)),
                ("e", N::D(0o755)),
                ("e/keep", N::F(b"k", 0o644)),
                ("e/del", N::F(b"d", 0o644)),
                ("s", N::L(b"/etc")),
            ],
        );
        let comment = layer_comment(Digest::ZERO, Some(parent));
        let mut g = tar::Header::new_ustar();
        let rec = pax_record("comment", comment.as_bytes());
        g.set_size(rec.len() as u64);
        g.set_entry_type(tar::EntryType::XGlobalHeader);
        g.set_cksum();
        let mut gm = g.as_bytes().to_vec();
        gm.extend_from_slice(&rec);
        gm.resize(gm.len().div_ceil(512) * 512, 0);
        // A new file first, then the whiteout of the same name: the whiteout only hides the
        // parent's entry.
        let t = archive(&[
            gm.clone(),
            raw_member(b"d/new", b'0', b"", b"n"),
            raw_member(b"d/.wh..wh..opq", b'0', b"", b""),
            raw_member(b"e/del", b'0', b"", b"again"),
            raw_member(b"e/.wh.del", b'0', b"", b""),
        ]);
        let m = invalid(import_bytes(&a, &t));
        assert!(m.starts_with("digest mismatch"), "{m}");
        let computed = m.rsplit("blake3:").next().unwrap();
        let expect = layer(
            &a,
            &[
                ("d", N::D(0o755)),
                ("d/new", N::F(b"n", 0o644)),
                ("e", N::D(0o755)),
                ("e/keep", N::F(b"k", 0o644)),
                ("e/del", N::F(b"again", 0o644)),
                ("s", N::L(b"/etc")),
            ],
        );
        assert_eq!(computed, expect.to_hex());
        // Through the parent's symlink: refused.
        let t = archive(&[gm, raw_member(b"s/passwd", b'0', b"", b"x")]);
        assert!(invalid(import_bytes(&a, &t)).contains("symlink"));
    }

    #[test]
    fn whiteout_names_cannot_be_exported() {
        let (_d, a) = store();
        let root = layer(&a, &[("d", N::D(0o755)), ("d/.wh.x", N::F(b"", 0o644))]);
        let err = export(
            &a,
            root,
            None,
            &mut Vec::new(),
            &Options::new(Path::new("m")),
        )
        .unwrap_err();
        assert!(
            matches!(&err, LayerError::Invalid(m) if m.contains("\"d/.wh.x\"")),
            "{err}"
        );
    }

    #[test]
    fn comments_parse() {
        let d = Digest::of(b"x");
        let p = Digest::of(b"p");
        assert_eq!(
            parse_layer_comment(layer_comment(d, None).as_bytes()).unwrap(),
            Some((d, None))
        );
        assert_eq!(
            parse_layer_comment(layer_comment(d, Some(p)).as_bytes()).unwrap(),
            Some((d, Some(p)))
        );
        assert_eq!(parse_layer_comment(b"made by someone").unwrap(), None);
        assert!(parse_layer_comment(b"cachefs-layer v2 blake3:00").is_err());
        assert!(parse_layer_comment(b"cachefs-layer v1 blake3:zz").is_err());
        for len_test in ["", "x", &"y".repeat(200)] {
            let r = pax_record("comment", len_test.as_bytes());
            let parsed = parse_pax_records(&r).unwrap();
            assert_eq!(parsed, [(&b"comment"[..], len_test.as_bytes())]);
        }
        // Lengths around a digit boundary.
        for n in 0..120 {
            let v = "v".repeat(n);
            let r = pax_record("k", v.as_bytes());
            let len: usize = std::str::from_utf8(&r[..r.iter().position(|&b| b == b' ').unwrap()])
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(len, r.len());
        }
    }

    /// A random tree for the property tests.
    #[derive(Debug, Clone)]
    enum G {
        File(Vec<u8>, u32),
        Link(Vec<u8>),
        Fifo(u32),
        Dir(u32, BTreeMap<Vec<u8>, G>),
    }

    fn store_g(objects: &ObjectStore, kids: &BTreeMap<Vec<u8>, G>) -> Digest {
        let mut t = Tree::default();
        for (name, g) in kids {
            t.entries.push(match g {
                G::File(data, mode) => {
                    Entry::file(name, *mode, data.len() as u64, put_blob(objects, data))
                }
                G::Link(target) => Entry::symlink(name, target),
                G::Fifo(mode) => Entry::fifo(name, *mode),
                G::Dir(mode, sub) => Entry::dir(name, *mode, store_g(objects, sub)),
            });
        }
        objects.put_tree(&t).unwrap()
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn name() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                Just(b"a".to_vec()),
                Just(b"b".to_vec()),
                Just(b"c".to_vec()),
                Just(b"-x".to_vec()),
                Just(b"dir".to_vec()),
                Just(b"new\nline".to_vec()),
                Just(b"\xff\xfe".to_vec()),
                Just(vec![b'l'; 150]),
            ]
        }

        fn mode() -> impl Strategy<Value = u32> {
            prop_oneof![
                Just(0o644),
                Just(0o755),
                Just(0o600),
                Just(0o1777),
                Just(0o4755)
            ]
        }

        fn tree() -> impl Strategy<Value = BTreeMap<Vec<u8>, G>> {
            let leaf = prop_oneof![
                (
                    prop_oneof![
                        Just(Vec::new()),
                        Just(b"same".to_vec()),
                        proptest::collection::vec(any::<u8>(), 0..2000)
                    ],
                    mode()
                )
                    .prop_map(|(d, m)| G::File(d, m)),
                prop_oneof![
                    Just(b"a".to_vec()),
                    Just(b"/etc/passwd".to_vec()),
                    Just(vec![b't'; 120])
                ]
                .prop_map(G::Link),
                mode().prop_map(G::Fifo),
            ];
            let node = leaf.prop_recursive(3, 40, 5, |inner| {
                (mode(), proptest::collection::btree_map(name(), inner, 0..5))
                    .prop_map(|(m, kids)| G::Dir(m, kids))
            });
            proptest::collection::btree_map(name(), node, 0..6)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(48))]

            /// Export then import into a fresh store gives the layer back, and it exports to
            /// the same bytes there.
            #[test]
            fn export_import_round_trips(t in tree()) {
                let (_d1, a) = store();
                let root = store_g(&a, &t);
                let (tar, r) = export_vec(&a, root, None);
                let (_d2, b) = store();
                let imp = import_bytes(&b, &tar).unwrap();
                prop_assert_eq!(imp.digest, root);
                prop_assert_eq!(&imp.diff_id, &r.diff_id);
                prop_assert_eq!(export_vec(&b, root, None).0, tar);
            }

            /// A changeset applied on its parent gives the child, whatever the two trees.
            #[test]
            fn changesets_apply_to_the_child(p in tree(), c in tree()) {
                let (_d1, a) = store();
                let parent = store_g(&a, &p);
                let child = store_g(&a, &c);
                let (full, _) = export_vec(&a, parent, None);
                let (delta, _) = export_vec(&a, child, Some(parent));
                let (_d2, b) = store();
                prop_assert_eq!(import_bytes(&b, &full).unwrap().digest, parent);
                let imp = import_bytes(&b, &delta).unwrap();
                prop_assert_eq!(imp.digest, child);
                prop_assert_eq!(imp.parent, Some(parent));
            }
        }
    }
}
