//! `cachefs import FILE`: a layer tar (plain or zstd) back into the layer store, checked.

use std::io::{self, IsTerminal, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::{Context, anyhow};

use super::ls::{path_line, print_json, print_stdout};
use super::signals::Supervisor;
use super::{Global, print_error, usage};
use crate::layer::tarball::{self, ImportReport, Options};
use crate::layer::{LayerError, ObjectStore};
use crate::store::{HashCacheDelta, NewLayer, Store, check_tag};
use crate::units::format_size;

const AFTER_HELP: &str = "\
Reads a tar written by `cachefs export` (or any tar of files, directories, symlinks and
fifos), plain or zstd-compressed (detected from its first bytes), stores its contents in the
object store and records the layer (source `import`). A tar from `cachefs export` names its
layer digest: the contents must hash to it, or nothing is recorded. A changeset (`export
--since`) names its parent layer, which must be in the store already; it is applied over the
parent following OCI layer rules (whiteouts delete, opaque directories hide the parent's
contents).

Refused as bad input (exit 2, no layer recorded, nothing written outside the store): absolute
paths, `..` components, paths through a symlink or file, hard links to anything but an
earlier file of the same tar (those become copies), device nodes and other special files,
duplicate paths, a digest mismatch, truncated or corrupt tar or zstd data, names over 255
bytes, symlink targets over 4095 bytes, paths over 16 KiB, pax headers over 64 KiB (checked
before they are read: memory stays small whatever the input), and more than 1 MiB after the
end-of-archive blocks. SIGINT/SIGTERM end an import (exit 130/143), recording nothing. Symlink
targets are stored as they are and never followed. setuid/setgid bits, owners and times are
not part of a layer and are dropped.

Output: the layer digest and the DiffID of the tar read (sha256 of the uncompressed tar);
--quiet prints only the digest. JSON (--json): layer, parent, diff_id, tag, verified (the
tar named its digest), files, dirs, symlinks, fifos, size_bytes, tar_bytes, input_bytes,
compressed, stored_bytes.

Examples:
  cachefs import apt.tar.zst --tag apt-2026-11
  curl -sf https://example.org/apt.tar.zst | cachefs import - --quiet
  cachefs import apt-delta.tar.zst       # after importing its parent";

/// `cachefs import` arguments.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct Args {
    /// Tar file to import (`-`: stdin), plain or zstd
    #[arg(value_name = "FILE")]
    pub file: PathBuf,

    /// Name the layer (a tag moves to this layer if it named another)
    #[arg(long, value_name = "TAG")]
    pub tag: Option<String>,

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
    parent: Option<String>,
    diff_id: &'a str,
    tag: Option<&'a str>,
    verified: bool,
    files: u64,
    dirs: u64,
    symlinks: u64,
    fifos: u64,
    size_bytes: u64,
    tar_bytes: u64,
    input_bytes: u64,
    compressed: bool,
    stored_bytes: u64,
}

pub fn run(global: &Global, args: Args) -> anyhow::Result<i32> {
    if let Some(t) = &args.tag {
        check_tag(t).map_err(|e| usage(anyhow!(e)))?;
    }
    let from_stdin = args.file.as_os_str() == "-";
    // Signals are taken from the start: reading an endless or stalled input must end on one.
    let supervisor = Supervisor::start().context("cannot set up signal handling")?;
    let cancel = supervisor.cancel_flag();
    let (input, size_hint, label): (Box<dyn Read>, Option<u64>, &Path) = if from_stdin {
        if io::stdin().is_terminal() {
            return Err(usage(anyhow!(
                "refusing to read a tar from a terminal: pipe one in or give FILE"
            )));
        }
        (
            Box::new(Polled {
                inner: io::stdin().lock(),
                cancel,
            }),
            None,
            Path::new("stdin"),
        )
    } else {
        // O_NONBLOCK: opening a FIFO must not wait for a writer (a signal could not end that
        // wait); reads of anything but a regular file go through `Polled`, which waits in
        // poll(2). It is this open file's own flag, shared with nobody.
        let f = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&args.file)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(usage(anyhow!("{}: no such file", path_line(&args.file))));
            }
            Err(e) => {
                return Err(
                    anyhow::Error::new(e).context(format!("cannot open {}", path_line(&args.file)))
                );
            }
        };
        let meta = f
            .metadata()
            .with_context(|| format!("cannot stat {}", path_line(&args.file)))?;
        if meta.is_dir() {
            return Err(usage(anyhow!(
                "{} is a directory, not a tar",
                path_line(&args.file)
            )));
        }
        if meta.is_file() {
            (Box::new(f), Some(meta.len()), args.file.as_path())
        } else {
            // A FIFO or a device: it may block for ever.
            (
                Box::new(Polled { inner: f, cancel }),
                None,
                args.file.as_path(),
            )
        }
    };
    let root = Store::resolve_root(global.store.as_deref())?;
    let store = Store::open(&root)?;
    let objects = ObjectStore::open(&root)?;
    // Held until the layer is recorded: gc must not sweep the new objects before that.
    let _lock = objects.lock_shared()?;
    let opts = Options {
        label,
        show_progress: !args.quiet && !args.json,
        cancel: Some(cancel),
        size_hint,
    };
    let mut parent_known = |d: crate::layer::Digest| -> Result<bool, LayerError> {
        Ok(store.find_layer(&d.to_hex())?.is_ok())
    };
    let report = match tarball::import(&objects, input, &mut parent_known, &opts) {
        Ok(r) => r,
        // A signal can also surface as a failed read of the input.
        Err(_) if cancel.load(Ordering::Relaxed) != 0 => {
            print_error("interrupted; no layer was imported");
            return Ok(128 + cancel.load(Ordering::Relaxed));
        }
        Err(LayerError::Interrupted) => {
            print_error("interrupted; no layer was imported");
            return Ok(128 + cancel.load(Ordering::Relaxed));
        }
        Err(e @ LayerError::Invalid(_)) => {
            return Err(usage(
                anyhow::Error::new(e).context(format!("cannot import {}", path_line(label))),
            ));
        }
        Err(e) => {
            return Err(
                anyhow::Error::new(e).context(format!("cannot import {}", path_line(label)))
            );
        }
    };
    // The objects must be on disk before a record points at them.
    objects.sync()?;
    let digest = report.digest.to_hex();
    let parent = report.parent.map(|p| p.to_hex());
    let stats = report.stats;
    store.record_layer(
        &NewLayer {
            digest: &digest,
            source: "import",
            of: None,
            parent: parent.as_deref(),
            size_bytes: stats.size_bytes,
            files: stats.files,
            dirs: stats.dirs,
            symlinks: stats.symlinks,
            fifos: stats.fifos,
        },
        args.tag.as_deref(),
        &HashCacheDelta::default(),
    )?;
    print_result(&args, &report, label)?;
    Ok(0)
}

/// A pipe, FIFO or terminal that may block for ever (a silent writer, a stalled reader), used
/// so that a signal ends the wait: the signals are taken by the supervisor's thread, so a
/// blocked read(2) or write(2) would never return. Each call waits in poll(2), 100 ms at a
/// time, checking the cancel flag.
pub(super) struct Polled<'a, F> {
    pub(super) inner: F,
    pub(super) cancel: &'a AtomicI32,
}

impl<F: AsFd> Polled<'_, F> {
    /// Waits until the fd is ready for `events` (or at its end, or in error: the next call
    /// says which), or the work is cancelled.
    fn ready(&self, events: libc::c_short) -> io::Result<()> {
        loop {
            if self.cancel.load(Ordering::Relaxed) != 0 {
                return Err(io::Error::other("interrupted"));
            }
            let mut pfd = libc::pollfd {
                fd: self.inner.as_fd().as_raw_fd(),
                events,
                revents: 0,
            };
            // SAFETY: one valid pollfd, for the length given; the fd is open (borrowed from
            // `inner`) for the whole call.
            let n = unsafe { libc::poll(&mut pfd, 1, 100) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n > 0 {
                return Ok(());
            }
        }
    }
}

impl<F: Read + AsFd> Read for Polled<'_, F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            self.ready(libc::POLLIN)?;
            match self.inner.read(buf) {
                // A FIFO opened O_NONBLOCK before its writer came.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return r,
            }
        }
    }
}

impl<F: Write + AsFd> Write for Polled<'_, F> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.ready(libc::POLLOUT)?;
        // A writable pipe has room for PIPE_BUF bytes: a write no larger cannot block.
        self.inner.write(&buf[..buf.len().min(libc::PIPE_BUF)])
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn print_result(args: &Args, report: &ImportReport, label: &Path) -> anyhow::Result<()> {
    let s = &report.stats;
    if args.json {
        return print_json(&Output {
            layer: report.digest.to_hex(),
            parent: report.parent.map(|p| p.to_hex()),
            diff_id: &report.diff_id,
            tag: args.tag.as_deref(),
            verified: report.verified,
            files: s.files,
            dirs: s.dirs,
            symlinks: s.symlinks,
            fifos: s.fifos,
            size_bytes: s.size_bytes,
            tar_bytes: report.tar_bytes,
            input_bytes: report.input_bytes,
            compressed: report.compressed,
            stored_bytes: report.stored_bytes,
        });
    }
    if args.quiet {
        return print_stdout(&format!("{}\n", report.digest));
    }
    let mut text = format!("layer {}\ndiff_id {}\n", report.digest, report.diff_id);
    if let Some(p) = report.parent {
        text.push_str(&format!("parent {p}\n"));
    }
    print_stdout(&text)?;
    eprintln!(
        "cachefs: imported {}{}: {} files, {} dirs, {} symlinks, {} fifos, {}; stored {} new{}{}",
        path_line(label),
        if report.compressed { " (zstd)" } else { "" },
        s.files,
        s.dirs,
        s.symlinks,
        s.fifos,
        format_size(s.size_bytes),
        format_size(report.stored_bytes),
        if report.verified {
            "; digest verified"
        } else {
            "; the tar named no digest (not from cachefs export)"
        },
        args.tag
            .as_deref()
            .map(|t| format!("; tagged {t}"))
            .unwrap_or_default(),
    );
    Ok(())
}
