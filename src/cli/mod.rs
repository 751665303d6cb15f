//! The command-line edge: argument parsing, logging setup, error printing and exit codes.
//!
//! Each subcommand lives in its own module (`run` today; `mount`, `umount`, `ls`, `inspect`,
//! `du`, `gc`, `snapshot` later) and exposes `Args` (a clap `Args` struct) and
//! `fn run(&Global, Args) -> anyhow::Result<i32>`, returning the process exit code on success.
//! Errors travel as `anyhow::Error` up to [`main`], which prints them on one line and maps them
//! to an exit code with [`exit_code_for`].

use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;

mod busy;
pub mod diff;
pub mod du;
pub mod export;
pub mod gc;
pub mod import;
pub mod inspect;
pub mod layers;
pub mod ls;
pub mod mount;
mod mounts;
pub mod pull;
pub mod push;
mod reaper;
pub mod remote_cache;
pub mod restore;
pub mod rm;
pub mod run;
pub mod set;
mod signals;
pub mod snapshot;
pub mod umount;

/// Exit code for a failure that is not the caller's fault (I/O error, store problem, ...).
pub const EXIT_FAILURE: i32 = 1;
/// Exit code for bad input or an unusable environment: usage errors, bad mount specs, bad
/// targets, a missing /dev/fuse. Same as clap's own usage errors.
pub const EXIT_USAGE: i32 = 2;
/// The command could be found but not executed (as a shell reports it).
pub const EXIT_CANNOT_EXECUTE: i32 = 126;
/// The command was not found (as a shell reports it).
pub const EXIT_NOT_FOUND: i32 = 127;
/// A lease wait gave up (`--lock-timeout`): try again later (sysexits' EX_TEMPFAIL).
pub const EXIT_TEMPFAIL: i32 = 75;

const ABOUT: &str = "Persistent cache mounts for build steps, served through FUSE";

const AFTER_HELP: &str = "\
Examples:
  # Run a build step with a persistent apt archive cache (Dockerfile syntax)
  cachefs run --mount type=cache,id=apt,target=/var/cache/apt/archives -- \\
      apt-get install -y --download-only jq

  # Keep the store somewhere else
  cachefs --store /srv/cachefs run --mount type=cache,target=/root/.cargo/registry -- cargo fetch

  # Log what cachefs does (or set RUST_LOG=cachefs=debug)
  cachefs -vv run --mount type=cache,id=pip,target=/root/.cache/pip -- pip install .

Exit codes:
  0..255  from `run`: the command's own status (128+N when it was killed by signal N)
  1       cachefs failed (store, mount, I/O)
  2       bad usage or input: options, mount specs, targets, missing /dev/fuse
  75      a locked cache stayed busy past --lock-timeout (try again later)
  126/127 `run`: the command could not be executed / was not found";

/// The whole command line.
#[derive(Debug, Parser)]
#[command(
    name = "cachefs",
    version,
    about = ABOUT,
    after_help = AFTER_HELP,
    subcommand_required = true,
    arg_required_else_help = true
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,

    #[command(subcommand)]
    pub command: Command,
}

/// Options every subcommand accepts.
#[derive(Debug, Clone, Args)]
pub struct Global {
    /// Store directory [default: /var/lib/cachefs as root, else $XDG_DATA_HOME/cachefs]
    #[arg(long, global = true, value_name = "DIR", env = "CACHEFS_STORE")]
    pub store: Option<PathBuf>,

    /// More logging on stderr (-v info, -vv debug, -vvv trace); RUST_LOG overrides it
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a command with cache directories mounted
    Run(run::Args),
    /// Mount a cache in the background until `cachefs umount`
    Mount(Box<mount::Args>),
    /// Unmount a `cachefs mount`, or clear a dead cachefs mount
    Umount(umount::Args),
    /// List live mounts and waiting requests: id, instance, mode, target, pid, command
    #[command(visible_alias = "ps")]
    Ls(ls::Args),
    /// Show one cache: its instances, their leases, the waiting queue
    Inspect(inspect::Args),
    /// Sizes of caches: size, disk, files, instances, last used, in use
    Du(du::Args),
    /// Change a cache's settings: its budget (--max-size)
    Set(set::Args),
    /// Remove idle caches by age, store size or id (for cron)
    Gc(gc::Args),
    /// Remove caches (all their instances); --force waits for ones in use
    Rm(rm::RmArgs),
    /// Remove every idle cache, after a confirmation (gc --all)
    Prune(rm::PruneArgs),
    /// Snapshot a cache into a content-addressed layer; prints its digest
    Snapshot(snapshot::Args),
    /// List stored layers: digest, cache, tags, created, size, files, parent
    Layers(layers::Args),
    /// Seed a cache from a layer (atomically replacing its contents with --replace)
    Restore(restore::Args),
    /// Paths added, removed and modified between two layers
    Diff(diff::Args),
    /// Write a layer as a reproducible tar (zstd-compressed for .zst names)
    Export(export::Args),
    /// Read a tar (plain or zstd) into the layer store, checking its digest
    Import(import::Args),
    /// Snapshot a cache and upload what an OCI registry lacks of it
    Push(push::Args),
    /// Download a layer from an OCI registry, verify it, restore it (--into)
    Pull(pull::Args),
}

/// Marks an error as the caller's to fix (bad input, unusable environment): exit code 2.
///
/// It wraps the whole error so its message (and the chain below it) prints unchanged.
pub struct UsageError(anyhow::Error);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl fmt::Debug for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl std::error::Error for UsageError {}

/// Wraps `err` so that [`exit_code_for`] maps it to [`EXIT_USAGE`].
pub fn usage(err: impl Into<anyhow::Error>) -> anyhow::Error {
    anyhow::Error::new(UsageError(err.into()))
}

/// A command that could not be started: carries the shell-style exit code (126 or 127).
#[derive(Debug, thiserror::Error)]
#[error("{program}: {reason}")]
pub struct SpawnError {
    pub program: String,
    pub reason: String,
    pub code: i32,
}

impl SpawnError {
    pub fn new(program: &std::ffi::OsStr, err: &std::io::Error) -> SpawnError {
        let program = program.to_string_lossy().into_owned();
        if err.kind() == std::io::ErrorKind::NotFound {
            SpawnError {
                program,
                reason: "command not found".to_string(),
                code: EXIT_NOT_FOUND,
            }
        } else {
            SpawnError {
                program,
                reason: format!("cannot execute: {err}"),
                code: EXIT_CANNOT_EXECUTE,
            }
        }
    }
}

/// The exit code for an error that reached the top.
pub fn exit_code_for(err: &anyhow::Error) -> i32 {
    for cause in err.chain() {
        if cause.is::<UsageError>() {
            return EXIT_USAGE;
        }
        if let Some(spawn) = cause.downcast_ref::<SpawnError>() {
            return spawn.code;
        }
        if let Some(fs) = cause.downcast_ref::<crate::fs::FsError>() {
            // Preflight failures can also surface late (e.g. a target that became a mount
            // point between the check and the mount): they stay the caller's to fix.
            use crate::fs::FsError as E;
            if matches!(
                fs,
                E::NoFuseDevice
                    | E::FuseDeviceUnusable(_)
                    | E::TargetNotDirectory(_)
                    | E::TargetMounted(_)
                    | E::TargetInvalid(..)
            ) {
                return EXIT_USAGE;
            }
        }
        if let Some(crate::lease::LeaseError::TimedOut { .. }) = cause.downcast_ref() {
            return EXIT_TEMPFAIL;
        }
        if let Some(store) = cause.downcast_ref::<crate::store::StoreError>() {
            // No usable store location was given: the caller must pass one.
            use crate::store::StoreError as E;
            if matches!(store, E::NoDefaultRoot | E::EmptyRoot) {
                return EXIT_USAGE;
            }
        }
    }
    EXIT_FAILURE
}

/// The shell convention for a finished child: its exit code, or 128+N for signal N.
pub fn exit_code_of_status(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(sig)) => 128 + sig,
        // Neither exited nor signalled cannot come out of a blocking wait; say "failed".
        (None, None) => EXIT_FAILURE,
    }
}

/// Prints a one-line message on stderr, prefixed like every cachefs message.
pub fn print_error(msg: impl fmt::Display) {
    // Names in messages are escaped where they are formatted; this is the last guard, for
    // text from elsewhere (another crate's error, a server's reply): no control character
    // reaches the terminal.
    eprintln!(
        "cachefs: {}",
        crate::text::escape_controls(&msg.to_string())
    );
}

/// The error of a registry command in a build without the `registry` feature.
#[cfg(not(feature = "registry"))]
pub(crate) fn no_registry() -> anyhow::Error {
    usage(anyhow::anyhow!(
        "this cachefs was built without registry support (cargo feature \"registry\")"
    ))
}

/// Prints a one-line warning on stderr (cachefs goes on).
pub fn print_warning(msg: impl fmt::Display) {
    eprintln!(
        "cachefs: warning: {}",
        crate::text::escape_controls(&msg.to_string())
    );
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => LevelFilter::WARN,
        1 => LevelFilter::INFO,
        2 => LevelFilter::DEBUG,
        _ => LevelFilter::TRACE,
    };
    let builder = EnvFilter::builder().with_default_directive(default.into());
    // RUST_LOG wins when set; invalid directives in it are skipped rather than fatal so that
    // a stray environment variable never stops a build step.
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => builder.parse_lossy(directives),
        // fuser logs an error for every reply the kernel no longer wants (the request was
        // interrupted, e.g. its process was killed): normal, and noise in a build log.
        _ if verbose == 0 => builder.parse_lossy("fuser::reply=off"),
        _ => builder.parse_lossy(""),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// clap value parser for durations (`--lock-timeout`, `--timeout`): `units::parse_duration`.
pub(crate) fn parse_duration_arg(s: &str) -> Result<std::time::Duration, String> {
    crate::units::parse_duration(s).map_err(|e| e.to_string())
}

/// `--io-uring auto|on|off`.
pub(crate) fn parse_io_uring_arg(s: &str) -> Result<crate::fs::IoUring, String> {
    use crate::fs::IoUring;
    match s {
        "auto" => Ok(IoUring::Auto),
        "on" => Ok(IoUring::On),
        "off" => Ok(IoUring::Off),
        _ => Err(format!(
            "invalid io-uring '{}': expected auto, on or off",
            crate::units::Shown(s)
        )),
    }
}

/// How `--io-uring` is written back (for the background server `mount` starts).
pub(crate) fn io_uring_arg(mode: crate::fs::IoUring) -> &'static str {
    use crate::fs::IoUring;
    match mode {
        IoUring::Auto => "auto",
        IoUring::On => "on",
        IoUring::Off => "off",
    }
}

pub(crate) fn parse_driver_arg(s: &str) -> Result<crate::spec::Driver, String> {
    s.parse().map_err(|()| {
        format!(
            "invalid driver '{}': expected fuse or bind",
            crate::units::Shown(s)
        )
    })
}

/// clap's error as one line: its first line without the `error: ` prefix, plus where to
/// look.
fn clap_error_line(err: &clap::Error) -> String {
    let text = err.render().to_string();
    let mut lines = text.lines();
    let first = lines.next().unwrap_or("invalid arguments");
    let mut msg = first.strip_prefix("error: ").unwrap_or(first).to_string();
    // Lists (e.g. of missing arguments) follow on indented lines.
    for more in lines.take_while(|l| l.starts_with("  ")) {
        msg.push(' ');
        msg.push_str(more.trim());
    }
    format!("{msg} (see cachefs --help)")
}

/// Runs cachefs with the process's arguments; returns the exit code.
pub fn main() -> i32 {
    // SAFETY: called first thing in the binary's main, before any thread exists.
    unsafe { crate::fs::remember_fusermount3() };
    main_with_args(std::env::args_os())
}

/// Runs cachefs with the given arguments (the first is the program name).
pub fn main_with_args<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(err) => {
            use clap::error::ErrorKind as K;
            if matches!(
                err.kind(),
                K::DisplayHelp | K::DisplayVersion | K::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                // Help and version on stdout; a closed stdout is not worth a second error.
                let _ = err.print();
                return err.exit_code();
            }
            // Usage errors are one line like every other cachefs error.
            print_error(clap_error_line(&err));
            return EXIT_USAGE;
        }
    };
    init_logging(cli.global.verbose);
    let result = match cli.command {
        Command::Run(args) => run::run(&cli.global, args),
        Command::Mount(args) => mount::run(&cli.global, *args),
        Command::Umount(args) => umount::run(&cli.global, args),
        Command::Ls(args) => ls::run(&cli.global, args),
        Command::Inspect(args) => inspect::run(&cli.global, args),
        Command::Du(args) => du::run(&cli.global, args),
        Command::Set(args) => set::run(&cli.global, args),
        Command::Gc(args) => gc::run(&cli.global, args),
        Command::Rm(args) => rm::rm(&cli.global, args),
        Command::Prune(args) => rm::prune(&cli.global, args),
        Command::Snapshot(args) => snapshot::run(&cli.global, args),
        Command::Layers(args) => layers::run(&cli.global, args),
        Command::Restore(args) => restore::run(&cli.global, args),
        Command::Diff(args) => diff::run(&cli.global, args),
        Command::Export(args) => export::run(&cli.global, args),
        Command::Import(args) => import::run(&cli.global, args),
        Command::Push(args) => push::run(&cli.global, args),
        Command::Pull(args) => pull::run(&cli.global, args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            // `{:#}` keeps the whole context chain on one line: "a: b: c".
            print_error(format_args!("{err:#}"));
            exit_code_for(&err)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;

    #[test]
    fn status_codes_follow_the_shell() {
        // Raw wait statuses: exit code in bits 8..16, signal number in the low 7 bits.
        assert_eq!(exit_code_of_status(ExitStatus::from_raw(0)), 0);
        assert_eq!(exit_code_of_status(ExitStatus::from_raw(7 << 8)), 7);
        assert_eq!(exit_code_of_status(ExitStatus::from_raw(255 << 8)), 255);
        assert_eq!(
            exit_code_of_status(ExitStatus::from_raw(libc::SIGTERM)),
            143
        );
        assert_eq!(
            exit_code_of_status(ExitStatus::from_raw(libc::SIGKILL)),
            137
        );
        // Killed with a core dump: the core flag (0x80) must not leak into the code.
        assert_eq!(
            exit_code_of_status(ExitStatus::from_raw(libc::SIGSEGV | 0x80)),
            128 + libc::SIGSEGV
        );
    }

    #[test]
    fn usage_errors_exit_2_even_under_context() {
        let err = usage(anyhow::anyhow!("bad spec")).context("while parsing");
        assert_eq!(exit_code_for(&err), EXIT_USAGE);
        assert_eq!(format!("{err:#}"), "while parsing: bad spec");
    }

    #[test]
    fn usage_error_keeps_inner_chain_on_one_line() {
        let inner: anyhow::Result<()> = Err(anyhow::anyhow!("root cause"));
        let err = usage(inner.context("outer").unwrap_err());
        assert_eq!(format!("{err:#}"), "outer: root cause");
    }

    #[test]
    fn fs_preflight_errors_exit_2_other_errors_1() {
        let err = anyhow::Error::new(crate::fs::FsError::NoFuseDevice).context("mount x");
        assert_eq!(exit_code_for(&err), EXIT_USAGE);
        let err = anyhow::Error::new(crate::fs::FsError::Mount(
            "/t".into(),
            std::io::Error::from_raw_os_error(libc::EIO),
        ));
        assert_eq!(exit_code_for(&err), EXIT_FAILURE);
        assert_eq!(exit_code_for(&anyhow::anyhow!("disk full")), EXIT_FAILURE);
    }

    #[test]
    fn spawn_errors_map_like_a_shell() {
        let nf = std::io::Error::from_raw_os_error(libc::ENOENT);
        let e = SpawnError::new("nope".as_ref(), &nf);
        assert_eq!(e.code, EXIT_NOT_FOUND);
        assert_eq!(e.to_string(), "nope: command not found");
        let acc = std::io::Error::from_raw_os_error(libc::EACCES);
        let e = SpawnError::new("/etc/passwd".as_ref(), &acc);
        assert_eq!(e.code, EXIT_CANNOT_EXECUTE);
        assert_eq!(exit_code_for(&anyhow::Error::new(e)), EXIT_CANNOT_EXECUTE);
    }

    #[test]
    fn cli_parses_run() {
        let cli = Cli::try_parse_from([
            "cachefs",
            "--store",
            "/s",
            "run",
            "--mount",
            "type=cache,target=/a",
            "--mount=type=cache,target=/b",
            "--",
            "make",
            "-j4",
        ])
        .expect("valid command line");
        assert_eq!(cli.global.store.as_deref(), Some("/s".as_ref()));
        let Command::Run(args) = cli.command else {
            panic!("not run: {:?}", cli.command);
        };
        assert_eq!(
            args.mounts,
            ["type=cache,target=/a", "type=cache,target=/b"]
        );
        assert_eq!(
            args.command,
            [OsString::from("make"), OsString::from("-j4")]
        );
        assert!(!args.no_passthrough);
    }

    #[test]
    fn cli_command_keeps_its_own_flags() {
        // Everything after the first word of the command belongs to it, even without `--`,
        // including flags cachefs also has (-v, --mount).
        let cli = Cli::try_parse_from([
            "cachefs",
            "run",
            "--mount",
            "target=/a",
            "sh",
            "-c",
            "-v",
            "--mount",
            "x",
        ])
        .expect("valid command line");
        assert_eq!(cli.global.verbose, 0);
        let Command::Run(args) = cli.command else {
            panic!("not run: {:?}", cli.command);
        };
        assert_eq!(args.mounts, ["target=/a"]);
        assert_eq!(args.command, ["sh", "-c", "-v", "--mount", "x"]);
    }

    #[test]
    fn cli_global_flags_after_subcommand() {
        let cli = Cli::try_parse_from([
            "cachefs",
            "run",
            "-vv",
            "--no-passthrough",
            "--store",
            "/s",
            "--mount",
            "target=/a",
            "--",
            "true",
        ])
        .expect("valid command line");
        assert_eq!(cli.global.verbose, 2);
        assert_eq!(cli.global.store.as_deref(), Some("/s".as_ref()));
        let Command::Run(args) = cli.command else {
            panic!("not run: {:?}", cli.command);
        };
        assert!(args.no_passthrough);
    }

    #[test]
    fn cli_usage_errors_exit_2() {
        // No mount, no command, unknown option, no subcommand.
        for argv in [
            &["cachefs", "run", "--", "true"][..],
            &["cachefs", "run", "--mount", "target=/a"][..],
            &[
                "cachefs",
                "run",
                "--bogus",
                "--mount",
                "target=/a",
                "--",
                "true",
            ][..],
            &["cachefs"][..],
        ] {
            let err = Cli::try_parse_from(argv).expect_err("must be rejected");
            assert_eq!(err.exit_code(), EXIT_USAGE, "{argv:?}");
        }
        let help = Cli::try_parse_from(["cachefs", "run", "--help"]).expect_err("help");
        assert_eq!(help.exit_code(), 0);
    }

    #[test]
    fn help_has_examples_everywhere() {
        use clap::CommandFactory;
        let mut cmd = Cli::command();
        cmd.build();
        assert!(
            cmd.get_after_help()
                .is_some_and(|h| h.to_string().contains("Examples:"))
        );
        // clap's own `help` subcommand is the only one without examples.
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            assert!(
                sub.get_after_help()
                    .is_some_and(|h| h.to_string().contains("Examples:")),
                "{} --help lacks examples",
                sub.get_name()
            );
        }
        Cli::command().debug_assert();
    }
}
