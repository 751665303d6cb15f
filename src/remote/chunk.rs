//! Chunks: built from the object store into a temp file (hashed with sha256 on the way), and
//! taken apart again into blobs, each verified against the tree index before it is stored.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::path::Path;

use sha2::{Digest as _, Sha256};

use super::CHUNK_ZSTD_LEVEL;
use super::plan::FileRef;
use crate::layer::format::Digest;
use crate::layer::objects::{BlobReader, CHUNK};
use crate::layer::tarball::sha256_name;
use crate::layer::tarball::{self, Options};
use crate::layer::{LayerError, ObjectKind, ObjectStore};

/// A chunk built into an unnamed temp file, ready to upload.
pub struct Built {
    pub file: File,
    /// `sha256:<hex>` of the file's bytes.
    pub digest: String,
    pub size: u64,
}

/// Counts and hashes what passes through to the file.
struct Sha256File {
    file: File,
    sha: Sha256,
    bytes: u64,
}

impl Write for Sha256File {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.sha.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

fn temp_in(tmp: &Path) -> Result<Sha256File, LayerError> {
    let file =
        tempfile::tempfile_in(tmp).map_err(|e| LayerError::io("create a temp file in", tmp, e))?;
    Ok(Sha256File {
        file,
        sha: Sha256::new(),
        bytes: 0,
    })
}

fn finish(
    enc: zstd::stream::write::Encoder<'static, Sha256File>,
    tmp: &Path,
) -> Result<Built, LayerError> {
    let mut out = enc.finish().map_err(|e| LayerError::io("write", tmp, e))?;
    out.file
        .rewind()
        .map_err(|e| LayerError::io("seek", tmp, e))?;
    Ok(Built {
        file: out.file,
        digest: sha256_name(out.sha),
        size: out.bytes,
    })
}

/// Builds a files chunk: their tar (the export's rules, no directories), zstd at
/// [`CHUNK_ZSTD_LEVEL`], single-threaded so that the same files always give the same bytes.
pub fn build_files(
    objects: &ObjectStore,
    files: &[FileRef],
    tmp: &Path,
) -> Result<Built, LayerError> {
    let mut enc = tarball::zstd_writer(temp_in(tmp)?, CHUNK_ZSTD_LEVEL)
        .map_err(|e| LayerError::io("compress into", tmp, e))?;
    let opts = Options::new(tmp);
    tarball::export_files(
        objects,
        files
            .iter()
            .map(|f| (f.path.as_slice(), f.mode, f.size, f.blob)),
        &mut enc,
        &opts,
    )?;
    finish(enc, tmp)
}

/// Builds the parts of one big file, reading its blob once, in order; the blob is verified when
/// the read reaches its end, so a corrupt blob fails before its last part is complete.
/// `want(i)` says whether part `i` is needed (the others are read past, not compressed).
pub fn build_parts(
    objects: &ObjectStore,
    blob: Digest,
    parts: &[(u64, u64)],
    tmp: &Path,
    want: &dyn Fn(usize) -> bool,
    done: &mut dyn FnMut(usize, Built) -> Result<(), LayerError>,
) -> Result<(), LayerError> {
    let mut reader = objects.open_blob(blob)?;
    let mut buf = vec![0u8; CHUNK];
    for (i, (_, len)) in parts.iter().enumerate() {
        let mut enc = if want(i) {
            Some(
                tarball::zstd_writer(temp_in(tmp)?, CHUNK_ZSTD_LEVEL)
                    .map_err(|e| LayerError::io("compress into", tmp, e))?,
            )
        } else {
            None
        };
        let mut left = *len;
        while left > 0 {
            let n = read_some(&mut reader, &mut buf[..(left.min(CHUNK as u64)) as usize])?;
            if n == 0 {
                return Err(LayerError::corrupt(
                    "blob",
                    blob,
                    &objects.path(ObjectKind::Blob, blob),
                    "it is shorter than the layer records",
                ));
            }
            if let Some(e) = enc.as_mut() {
                e.write_all(&buf[..n])
                    .map_err(|e| LayerError::io("write", tmp, e))?;
            }
            left -= n as u64;
        }
        if i + 1 == parts.len() {
            // Reading to the end verifies the whole blob.
            if read_some(&mut reader, &mut buf[..1])? != 0 {
                return Err(LayerError::corrupt(
                    "blob",
                    blob,
                    &objects.path(ObjectKind::Blob, blob),
                    "it is longer than the layer records",
                ));
            }
        }
        if let Some(e) = enc {
            done(i, finish(e, tmp)?)?;
        }
    }
    Ok(())
}

fn read_some(r: &mut BlobReader, buf: &mut [u8]) -> Result<usize, LayerError> {
    loop {
        match r.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(r.error(e)),
        }
    }
}

/// What taking a chunk apart did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Ingested {
    pub blobs_stored: u64,
    pub bytes_stored: u64,
}

/// Why a chunk was refused.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The chunk's bytes are not what the index says it holds.
    #[error("{0}")]
    Bad(String),
    #[error(transparent)]
    Layer(#[from] LayerError),
}

fn bad(msg: String) -> IngestError {
    IngestError::Bad(msg)
}

fn shown(p: &[u8]) -> String {
    crate::text::quoted_short(p)
}

/// Takes a files chunk apart: every member must be a regular file the chunk's record lists,
/// with the size and contents it names. Contents the layer needs (`needed`) and the store lacks
/// are stored; the rest is read past (a kept chunk may carry files the layer no longer has).
pub fn ingest_files<R: Read>(
    objects: &ObjectStore,
    files: &[FileRef],
    needed: &HashSet<Digest>,
    input: R,
    progress: &dyn Fn(u64),
) -> Result<Ingested, IngestError> {
    let mut listed: HashMap<&[u8], &FileRef> =
        files.iter().map(|f| (f.path.as_slice(), f)).collect();
    let zin =
        zstd::stream::read::Decoder::new(input).map_err(|e| bad(format!("it is not zstd: {e}")))?;
    // Chunks come from a registry: their headers are bounded before the crate reads them.
    let mut archive = tar::Archive::new(tarball::GuardedTar::new(zin));
    let mut report = Ingested::default();
    let mut buf = vec![0u8; CHUNK];
    let entries = archive
        .entries()
        .map_err(|e| bad(format!("it is not a tar: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(format!("its tar is damaged: {e}")))?;
        let kind = entry.header().entry_type();
        let path = entry.path_bytes().into_owned();
        if !matches!(kind, tar::EntryType::Regular | tar::EntryType::Continuous) {
            return Err(bad(format!(
                "it holds {} of a kind cachefs never writes ({kind:?})",
                shown(&path)
            )));
        }
        let Some(f) = listed.remove(path.as_slice()) else {
            return Err(bad(format!(
                "it holds {}, which its record does not list (or lists once)",
                shown(&path)
            )));
        };
        let size = entry
            .header()
            .size()
            .map_err(|e| bad(format!("its tar is damaged: {e}")))?;
        if size != f.size {
            return Err(bad(format!(
                "{} holds {size} bytes where the index records {}",
                shown(&path),
                f.size
            )));
        }
        let store = needed.contains(&f.blob) && !objects.has(ObjectKind::Blob, f.blob);
        let mut w = if store { Some(objects.writer()?) } else { None };
        let mut h = blake3::Hasher::new();
        loop {
            let n = match entry.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(bad(format!("its tar is damaged: {err}"))),
            };
            h.update(&buf[..n]);
            if let Some(w) = w.as_mut() {
                w.write_all(&buf[..n])?;
            }
            progress(n as u64);
        }
        if Digest(*h.finalize().as_bytes()) != f.blob {
            return Err(bad(format!(
                "the contents of {} do not match the index",
                shown(&path)
            )));
        }
        if let Some(w) = w {
            w.commit(ObjectKind::Blob, f.blob)?;
            report.blobs_stored += 1;
            report.bytes_stored += f.size;
        }
    }
    if let Some(f) = listed.values().next() {
        return Err(bad(format!("it lacks {}", shown(&f.path))));
    }
    Ok(report)
}

/// One big file being put together from its parts, in order.
pub struct PartAssembly {
    writer: crate::layer::objects::ObjectWriter,
    hasher: blake3::Hasher,
    blob: Digest,
    written: u64,
    /// Where the part being added started, and the hash state there: a part whose download
    /// failed half-way is added again from its start.
    part_start: (u64, blake3::Hasher),
}

impl PartAssembly {
    pub fn new(objects: &ObjectStore, blob: Digest) -> Result<PartAssembly, LayerError> {
        Ok(PartAssembly {
            writer: objects.writer()?,
            hasher: blake3::Hasher::new(),
            blob,
            written: 0,
            part_start: (0, blake3::Hasher::new()),
        })
    }

    /// Appends one part: the zstd of exactly `len` bytes, starting at `offset`.
    pub fn add<R: Read>(
        &mut self,
        offset: u64,
        len: u64,
        input: R,
        progress: &dyn Fn(u64),
    ) -> Result<(), IngestError> {
        if offset == self.part_start.0 && self.written != offset {
            // A retry of a part that failed half-way.
            let f = self.writer.file();
            if let Some(mut f) = f {
                f.set_len(offset)
                    .and_then(|_| f.seek(io::SeekFrom::Start(offset)).map(|_| ()))
                    .map_err(|e| LayerError::io("rewind", Path::new("objects/tmp"), e))?;
            }
            self.hasher = self.part_start.1.clone();
            self.written = offset;
        }
        if offset != self.written {
            return Err(bad(format!(
                "a part starts at {offset} where {} bytes were written",
                self.written
            )));
        }
        self.part_start = (offset, self.hasher.clone());
        let mut zin = zstd::stream::read::Decoder::new(input)
            .map_err(|e| bad(format!("it is not zstd: {e}")))?;
        let mut buf = vec![0u8; CHUNK];
        let mut got = 0u64;
        loop {
            let want = ((len - got).min(CHUNK as u64) as usize).max(1);
            let n = match zin.read(&mut buf[..want]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(bad(format!("its zstd is damaged: {e}"))),
            };
            got += n as u64;
            self.written += n as u64;
            if got > len {
                return Err(bad(format!(
                    "it holds more than the {len} bytes the index records"
                )));
            }
            self.hasher.update(&buf[..n]);
            self.writer.write_all(&buf[..n])?;
            progress(n as u64);
        }
        if got != len {
            return Err(bad(format!(
                "it holds {got} bytes where the index records {len}"
            )));
        }
        Ok(())
    }

    /// Stores the file once all its parts are in, if they make the blob the index names.
    pub fn commit(self, size: u64) -> Result<(), IngestError> {
        if self.written != size {
            return Err(bad(format!(
                "its parts hold {} bytes of {size}",
                self.written
            )));
        }
        if Digest(*self.hasher.finalize().as_bytes()) != self.blob {
            return Err(bad("its parts do not make the file the index names".into()));
        }
        self.writer.commit(ObjectKind::Blob, self.blob)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, ObjectStore) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
        let objects = ObjectStore::open(dir.path()).unwrap();
        (dir, objects)
    }

    fn put(objects: &ObjectStore, data: &[u8]) -> Digest {
        let d = Digest::of(data);
        let mut w = objects.writer().unwrap();
        w.write_all(data).unwrap();
        w.commit(ObjectKind::Blob, d).unwrap();
        d
    }

    fn file(path: &str, data: &[u8], objects: &ObjectStore) -> FileRef {
        FileRef {
            path: path.as_bytes().to_vec(),
            blob: put(objects, data),
            size: data.len() as u64,
            mode: 0o644,
        }
    }

    fn bytes_of(mut b: Built) -> Vec<u8> {
        let mut v = Vec::new();
        b.file.read_to_end(&mut v).unwrap();
        assert_eq!(v.len() as u64, b.size);
        assert_eq!(super::super::sha256_digest(&v), b.digest);
        v
    }

    #[test]
    fn files_round_trip_through_a_chunk_and_only_needed_blobs_are_stored() {
        let (dir, src) = store();
        let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let files = vec![
            file("a/one", b"first", &src),
            file("a/b/two", &big, &src),
            file("three", b"", &src),
            file(&format!("deep/{}", "n".repeat(150)), b"long name", &src),
        ];
        let built = build_files(&src, &files, &dir.path().join("tmp")).unwrap();
        let bytes = bytes_of(built);
        // The same files give the same bytes.
        let again = bytes_of(build_files(&src, &files, &dir.path().join("tmp")).unwrap());
        assert_eq!(bytes, again);

        let (_d2, dst) = store();
        let needed: HashSet<Digest> = files[..3].iter().map(|f| f.blob).collect();
        let got = ingest_files(&dst, &files, &needed, bytes.as_slice(), &|_| {}).unwrap();
        assert_eq!(got.blobs_stored, 3);
        for f in &files[..3] {
            assert!(dst.has(ObjectKind::Blob, f.blob));
        }
        // Not needed: read past, not stored.
        assert!(!dst.has(ObjectKind::Blob, files[3].blob));
    }

    #[test]
    fn a_chunk_that_disagrees_with_its_record_is_refused() {
        let (dir, src) = store();
        let files = vec![file("x", b"hello", &src), file("y", b"world", &src)];
        let bytes = bytes_of(build_files(&src, &files, &dir.path().join("tmp")).unwrap());
        let needed: HashSet<Digest> = files.iter().map(|f| f.blob).collect();
        let refused = |record: &[FileRef], input: &[u8]| {
            let (_d, dst) = store();
            match ingest_files(&dst, record, &needed, input, &|_| {}) {
                Err(IngestError::Bad(m)) => m,
                other => panic!("accepted: {other:?}"),
            }
        };
        // A member the record does not list.
        assert!(refused(&files[..1], &bytes).contains("does not list"));
        // A member missing.
        let mut more = files.clone();
        more.push(FileRef {
            path: b"z".to_vec(),
            blob: Digest::of(b"z"),
            size: 1,
            mode: 0o644,
        });
        assert!(refused(&more, &bytes).contains("lacks"));
        // Other contents than recorded.
        let mut wrong = files.clone();
        wrong[1].blob = Digest::of(b"WORLD");
        assert!(refused(&wrong, &bytes).contains("do not match"));
        // Not zstd / truncated.
        assert!(!refused(&files, b"garbage").is_empty());
        assert!(!refused(&files, &bytes[..bytes.len() / 2]).is_empty());
    }

    /// A registry is not trusted: a chunk whose GNU long-name member claims 256 MiB is refused
    /// from its header (the tar crate would read the name into memory whole).
    #[test]
    fn a_chunk_with_a_long_name_bomb_is_refused_from_its_header() {
        let name_len: u64 = 256 << 20;
        let mut header = tar::Header::new_gnu();
        header.as_mut_bytes()[..13].copy_from_slice(b"././@LongLink");
        header.set_entry_type(tar::EntryType::GNULongName);
        header.set_size(name_len + 1);
        header.set_mode(0o644);
        header.set_cksum();
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
        enc.write_all(header.as_bytes()).unwrap();
        let piece = vec![b'a'; 1 << 20];
        for _ in 0..(name_len >> 20) {
            enc.write_all(&piece).unwrap();
        }
        enc.write_all(&[0u8; 1024]).unwrap();
        let bomb = enc.finish().unwrap();
        assert!(
            bomb.len() < 1 << 20,
            "the bomb is small: {} bytes",
            bomb.len()
        );

        let (_d, dst) = store();
        let files = vec![FileRef {
            path: b"x".to_vec(),
            blob: Digest::of(b"x"),
            size: 1,
            mode: 0o644,
        }];
        match ingest_files(&dst, &files, &HashSet::new(), bomb.as_slice(), &|_| {}) {
            Err(IngestError::Bad(m)) => assert!(m.contains("GNU long name"), "{m}"),
            other => panic!("accepted: {other:?}"),
        }
    }

    #[test]
    fn parts_assemble_a_file_and_a_failed_part_is_added_again() {
        let (dir, src) = store();
        let data: Vec<u8> = (0..(3 * CHUNK as u32 + 123))
            .map(|i| (i % 253) as u8)
            .collect();
        let blob = put(&src, &data);
        let third = data.len() as u64 / 3;
        let ranges = [
            (0, third),
            (third, third),
            (2 * third, data.len() as u64 - 2 * third),
        ];
        let mut parts = Vec::new();
        build_parts(
            &src,
            blob,
            &ranges,
            &dir.path().join("tmp"),
            &|_| true,
            &mut |_, b| {
                parts.push(bytes_of(b));
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(parts.len(), 3);

        let (_d, dst) = store();
        let mut a = PartAssembly::new(&dst, blob).unwrap();
        a.add(0, third, parts[0].as_slice(), &|_| {}).unwrap();
        // The second part breaks off half-way, then arrives whole.
        let half = &parts[1][..parts[1].len() / 2];
        assert!(a.add(third, third, half, &|_| {}).is_err());
        a.add(third, third, parts[1].as_slice(), &|_| {}).unwrap();
        // Out of order is refused.
        assert!(a.add(0, third, parts[0].as_slice(), &|_| {}).is_err());
        a.add(2 * third, ranges[2].1, parts[2].as_slice(), &|_| {})
            .unwrap();
        a.commit(data.len() as u64).unwrap();
        assert_eq!(dst.verify_blob(blob).unwrap(), data.len() as u64);
    }

    #[test]
    fn parts_of_a_corrupt_blob_fail_before_the_last_is_complete() {
        let (dir, src) = store();
        let data = vec![7u8; 200_000];
        let blob = put(&src, &data);
        let p = src.path(ObjectKind::Blob, blob);
        let mut perm = std::fs::metadata(&p).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o644);
        std::fs::set_permissions(&p, perm).unwrap();
        let mut bad = data.clone();
        bad[150_000] ^= 1;
        std::fs::write(&p, &bad).unwrap();
        let mut done = 0;
        let r = build_parts(
            &src,
            blob,
            &[(0, 100_000), (100_000, 100_000)],
            &dir.path().join("tmp"),
            &|_| true,
            &mut |_, _| {
                done += 1;
                Ok(())
            },
        );
        assert!(r.is_err());
        assert_eq!(done, 1, "the last part must not be handed out");
    }
}
