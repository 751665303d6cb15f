//! `cachefs export LAYER -o FILE`: a layer as a reproducible tar (optionally zstd).

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, IsTerminal, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use anyhow::{Context, anyhow};

use super::ls::{open_existing_store, path_line, print_json, print_stdout};
use super::signals::Supervisor;
use super::{Global, print_error, print_warning, usage};
use crate::layer::tarball::{self, DEFAULT_ZSTD_LEVEL, ExportReport, Options};
use crate::layer::{Digest, LayerError, ObjectStore};
use crate::units::format_size;

const AFTER_HELP: &str = "\
The tar is reproducible: the same layer gives the same bytes on every run and machine
(entries depth first in name order, mtime 0, uid/gid 0, no user or group names, the layer's
modes; regular files, directories, symlinks and fifos). Its first member is a pax global
header whose comment names the layer (`cachefs-layer v1 blake3:<digest>`), which `cachefs
import` checks; other tools ignore it. See docs/LAYER-FORMAT.md.

Every file's contents are checked against their hash while they are written: a corrupt
object fails the export, naming it, and no output file is left behind (the tar is written
to a temporary file next to FILE and renamed when complete).

--since PARENT writes only the changes from PARENT as an OCI layer changeset: changed and
added entries, the directories above them, and whiteouts (`.wh.<name>`) for deleted
entries. Importing PARENT and then this tar gives LAYER.

Output (stdout; on stderr when the tar goes to stdout): the layer digest and the DiffID
(`sha256:` of the uncompressed tar, as OCI defines it; recorded with the layer for full
exports). --quiet prints only the digest. JSON (--json): layer, parent, diff_id, tar_bytes,
compressed_bytes (null for a plain tar), file.

Compression: zstd when FILE ends in .zst or .zstd (or with --zstd), single-threaded so the
output is reproducible too; --level 1..22 (default 3).

Examples:
  cachefs export apt-2026-11 -o apt.tar.zst
  cachefs export 3f2a9c1e -o - | tar -tvf -
  cachefs export apt-2026-12 --since apt-2026-11 -o apt-delta.tar.zst
  cachefs export --quiet apt -o apt.tar";

/// `cachefs export` arguments.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct Args {
    /// Layer digest (or a unique prefix of at least 8 digits) or tag
    #[arg(value_name = "LAYER")]
    pub layer: String,

    /// Where to write the tar (`-`: stdout)
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,

    /// Write only the changes from this layer (an OCI changeset with whiteouts)
    #[arg(long, value_name = "LAYER")]
    pub since: Option<String>,

    /// Compress with zstd [default: when FILE ends in .zst or .zstd]
    #[arg(long, overrides_with = "no_zstd")]
    pub zstd: bool,

    /// Write a plain tar, whatever FILE's name
    #[arg(long, overrides_with = "zstd")]
    pub no_zstd: bool,

    /// zstd compression level, 1 to 22
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..=22))]
    pub level: Option<i32>,

    /// Print the result as JSON
    #[arg(long, conflicts_with = "quiet")]
    pub json: bool,

    /// Print only the layer digest (no summary, no progress bar)
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(serde::Serialize)]
struct Output<'a> {
    layer: String,
    diff_id: &'a str,
    parent: Option<String>,
    tar_bytes: u64,
    compressed_bytes: Option<u64>,
    file: String,
}

/// Counts the bytes that reach the file.
struct Counting<W> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A temp file next to the destination, removed unless it was renamed into place.
struct TempOut {
    tmp: PathBuf,
    dest: PathBuf,
    done: bool,
}

impl TempOut {
    fn create(dest: &Path) -> anyhow::Result<(TempOut, File)> {
        let name = dest
            .file_name()
            .ok_or_else(|| usage(anyhow!("{} is not a file name", path_line(dest))))?;
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mut tmp_name = b".".to_vec();
        tmp_name.extend_from_slice(name.as_bytes());
        tmp_name.extend_from_slice(format!(".cachefs-tmp-{}", std::process::id()).as_bytes());
        let tmp = dir.join(std::ffi::OsStr::from_bytes(&tmp_name));
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o666)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&tmp)
            .with_context(|| format!("cannot create {}", path_line(&tmp)))?;
        Ok((
            TempOut {
                tmp,
                dest: dest.to_path_buf(),
                done: false,
            },
            file,
        ))
    }

    fn commit(mut self) -> anyhow::Result<()> {
        fs::rename(&self.tmp, &self.dest).with_context(|| {
            format!(
                "cannot rename {} to {}",
                path_line(&self.tmp),
                path_line(&self.dest)
            )
        })?;
        self.done = true;
        Ok(())
    }
}

impl Drop for TempOut {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

fn wants_zstd(args: &Args, to_stdout: bool) -> bool {
    if args.zstd {
        return true;
    }
    if args.no_zstd || to_stdout {
        return false;
    }
    args.output
        .extension()
        .is_some_and(|e| e == "zst" || e == "zstd")
}

pub fn run(global: &Global, args: Args) -> anyhow::Result<i32> {
    let to_stdout = args.output.as_os_str() == "-";
    let compress = wants_zstd(&args, to_stdout);
    if args.level.is_some() && !compress {
        return Err(usage(anyhow!(
            "--level applies to zstd output: add --zstd or name the file .zst"
        )));
    }
    if to_stdout && io::stdout().is_terminal() {
        return Err(usage(anyhow!(
            "refusing to write a tar to a terminal: redirect stdout or give -o FILE"
        )));
    }
    let supervisor = Supervisor::start().context("cannot set up signal handling")?;
    let (root, store) = open_existing_store(global)?;
    let Some(store) = store else {
        return Err(usage(anyhow!(
            "no layer or tag {:?}: the store {} holds no layers",
            args.layer,
            path_line(&root)
        )));
    };
    let find = |reference: &str| -> anyhow::Result<Digest> {
        let rec = store
            .find_layer(reference)?
            .map_err(|m| usage(anyhow!(m)))?;
        Digest::from_hex(&rec.digest)
            .ok_or_else(|| anyhow!("layer record {:?} is not a digest", rec.digest))
    };
    let digest = find(&args.layer)?;
    let since = args.since.as_deref().map(find).transpose()?;
    let objects = ObjectStore::open(&root)?;
    let _lock = objects.lock_shared()?;

    let cancel = supervisor.cancel_flag();
    let label: &Path = if to_stdout {
        Path::new("stdout")
    } else {
        &args.output
    };
    let opts = Options {
        label,
        show_progress: !args.quiet && !args.json,
        cancel: Some(cancel),
        size_hint: None,
    };
    let level = args.level.unwrap_or(DEFAULT_ZSTD_LEVEL);
    let result = if to_stdout {
        write_tar(
            &objects,
            digest,
            since,
            // A stalled reader must not keep a signal from ending the export.
            super::import::Polled {
                inner: io::stdout().lock(),
                cancel,
            },
            compress,
            level,
            &opts,
        )
        .map(|(report, written, _)| (report, written))
    } else {
        let (temp, file) = TempOut::create(&args.output)?;
        match write_tar(&objects, digest, since, file, compress, level, &opts) {
            Ok((report, written, file)) => {
                file.sync_all()
                    .with_context(|| format!("cannot write {}", path_line(&temp.tmp)))?;
                drop(file);
                temp.commit()?;
                Ok((report, written))
            }
            Err(e) => Err(e),
        }
    };
    let (report, written) = match result {
        Ok(r) => r,
        // A signal can also surface as a failed write of the output.
        Err(e) if matches!(e, LayerError::Interrupted) || cancel.load(Ordering::Relaxed) != 0 => {
            print_error(if to_stdout {
                "interrupted; the tar on stdout is incomplete"
            } else {
                "interrupted; nothing was written"
            });
            return Ok(128 + cancel.load(Ordering::Relaxed));
        }
        Err(e @ LayerError::Invalid(_)) => {
            return Err(usage(anyhow::Error::new(e)));
        }
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!(
                "cannot export layer {}{}",
                digest,
                if to_stdout {
                    ""
                } else {
                    "; no file was written"
                }
            )));
        }
    };
    if since.is_none()
        && let Err(e) = store.set_diff_id(&digest.to_hex(), &report.diff_id)
    {
        print_warning(format_args!("the DiffID was not recorded: {e}"));
    }
    print_result(&args, &report, to_stdout, compress.then_some(written))?;
    Ok(0)
}

/// Writes the tar (compressed or not) to `out`; returns the report, the bytes written and
/// `out`.
fn write_tar<W: Write>(
    objects: &ObjectStore,
    digest: Digest,
    since: Option<Digest>,
    out: W,
    compress: bool,
    level: i32,
    opts: &Options<'_>,
) -> Result<(ExportReport, u64, W), LayerError> {
    let io_err = |e: io::Error| LayerError::io("write", opts.label, e);
    let mut counted = Counting {
        inner: BufWriter::with_capacity(1 << 20, out),
        bytes: 0,
    };
    let report = if compress {
        let mut enc = tarball::zstd_writer(&mut counted, level).map_err(io_err)?;
        let report = tarball::export(objects, digest, since, &mut enc, opts)?;
        enc.finish().map_err(io_err)?;
        report
    } else {
        tarball::export(objects, digest, since, &mut counted, opts)?
    };
    counted.flush().map_err(io_err)?;
    let written = counted.bytes;
    let out = counted
        .inner
        .into_inner()
        .map_err(|e| io_err(e.into_error()))?;
    Ok((report, written, out))
}

fn print_result(
    args: &Args,
    report: &ExportReport,
    to_stdout: bool,
    compressed: Option<u64>,
) -> anyhow::Result<()> {
    let file = if to_stdout {
        "-".to_string()
    } else {
        args.output.to_string_lossy().into_owned()
    };
    let emit = |text: &str| -> anyhow::Result<()> {
        if to_stdout {
            eprint!("{text}");
            Ok(())
        } else {
            print_stdout(text)
        }
    };
    if args.json {
        let out = Output {
            layer: report.digest.to_hex(),
            diff_id: &report.diff_id,
            parent: report.parent.map(|p| p.to_hex()),
            tar_bytes: report.tar_bytes,
            compressed_bytes: compressed,
            file,
        };
        if to_stdout {
            let mut text = serde_json::to_string_pretty(&out)?;
            text.push('\n');
            return emit(&text);
        }
        return print_json(&out);
    }
    if args.quiet {
        return emit(&format!("{}\n", report.digest));
    }
    let mut text = format!("layer {}\ndiff_id {}\n", report.digest, report.diff_id);
    if let Some(p) = report.parent {
        text.push_str(&format!("parent {p}\n"));
    }
    emit(&text)?;
    let what = match report.parent {
        Some(_) => format!(
            "changes: {} files, {} dirs, {} symlinks, {} fifos, {} whiteouts",
            report.files, report.dirs, report.symlinks, report.fifos, report.whiteouts
        ),
        None => format!(
            "{} files, {} dirs, {} symlinks, {} fifos",
            report.files, report.dirs, report.symlinks, report.fifos
        ),
    };
    let size = match compressed {
        Some(c) => format!(
            "{} tar, {} zstd",
            format_size(report.tar_bytes),
            format_size(c)
        ),
        None => format!("{} tar", format_size(report.tar_bytes)),
    };
    eprintln!(
        "cachefs: exported {what} to {} ({size})",
        path_line(Path::new(&file))
    );
    Ok(())
}
