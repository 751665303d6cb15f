//! The FUSE passthrough filesystem that serves one cache instance at a target path.
//!
//! API used by the CLI and the tests:
//! - [`check_fuse_device`] and [`check_target`]: preflight, before anything is created.
//! - [`mount`]: mount an instance directory at a target; returns a live [`MountedFs`].
//! - [`MountedFs::unmount`] (also on drop).

mod backing;
mod classic;
mod evict;
mod inode;
mod locks;
mod ops;
pub(crate) mod peers;
mod reserve;
mod ring;
mod sys;

pub use evict::{EvictOutcome, Evicted, Evictor};

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fuser::{MountOption, SessionACL};
use tracing::{debug, warn};

/// Errors from mounting and serving a filesystem.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error(
        "/dev/fuse is missing: load the fuse module (modprobe fuse) or run in a container with --device /dev/fuse"
    )]
    NoFuseDevice,
    #[error("/dev/fuse is not usable ({0}): run as root or install fuse3 for fusermount3")]
    FuseDeviceUnusable(std::io::Error),
    #[error("target {0} exists and is not a directory: choose a directory path")]
    TargetNotDirectory(PathBuf),
    #[error("target {0} is already a mount point: unmount it first (umount {0})")]
    TargetMounted(PathBuf),
    #[error("target path {0} is not valid: {1}")]
    TargetInvalid(PathBuf, String),
    #[error(
        "target {0} is in {1}, a kernel pseudo-filesystem: a cache cannot be mounted there; choose a directory on a real filesystem"
    )]
    TargetPseudo(PathBuf, String),
    #[error("cannot open the instance directory {0}: {1}")]
    Source(PathBuf, std::io::Error),
    #[error("mounting {0} failed: {1}")]
    Mount(PathBuf, std::io::Error),
    #[error("unmounting {0} failed: {1}")]
    Unmount(PathBuf, std::io::Error),
    #[error("cannot join the other mounts of the instance in {0}: {1}")]
    Peers(PathBuf, std::io::Error),
    #[error("FUSE over io_uring: {0}")]
    IoUring(String),
}

/// Whether requests travel over io_uring (`--io-uring`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum IoUring {
    /// When the kernel allows it (`enable_uring` is Y), else /dev/fuse.
    #[default]
    Auto,
    /// Always: a mount that cannot have it fails.
    On,
    /// Never: /dev/fuse.
    Off,
}

/// How a mount's requests travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// read(2) and write(2) on /dev/fuse (fuser's session threads).
    DevFuse,
    /// FUSE over io_uring (one queue per CPU, see `ring`).
    IoUring,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::DevFuse => "/dev/fuse",
            Transport::IoUring => "io_uring",
        }
    }
}

/// The module parameter that lets FUSE connections use io_uring.
pub const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// The largest write a ring mount takes in one request: each ring entry holds a payload buffer
/// this large (the kernel sends at most `max_pages_limit` pages, 1 MiB by default, anyway).
pub(crate) const RING_MAX_WRITE: u32 = 1 << 20;

/// Requests in flight per ring queue (one queue per CPU).
const RING_DEPTH: usize = 32;

/// How a filesystem is served.
#[derive(Debug, Clone)]
pub struct FsOptions {
    /// Use kernel FUSE passthrough for regular-file I/O when the kernel offers it.
    pub passthrough: bool,
    /// Mount read-only.
    pub read_only: bool,
    /// How long the kernel may cache entries (names) and attributes.
    pub entry_ttl: Duration,
    pub attr_ttl: Duration,
    /// Worker threads serving requests.
    pub threads: usize,
    /// Shown as the mount's source in /proc/mounts.
    pub fsname: String,
    /// Reach cold inodes through kernel file handles when the process may (root). `false`
    /// forces the by-name fallback that mounts without CAP_DAC_READ_SEARCH use.
    pub file_handles: bool,
    /// Where the mount reports sizes and uses (None: it does not count).
    pub accounting: Option<Arc<crate::accounting::Accountant>>,
    /// No other mount serves the instance meanwhile (an exclusive lease): accounting needs
    /// no cross-mount lock, and the kernel keeps the mount's file locks itself.
    pub exclusive: bool,
    /// As root, have fusermount3 unmount the filesystem if this process dies. Off for mounts
    /// in a private mount namespace (`cachefs run`): there a mount whose server died must
    /// stay dead (ENOTCONN) rather than reveal the directory it hides.
    pub auto_unmount: bool,
    /// Serve extended attributes and POSIX ACLs. Off, the first xattr request of each kind is
    /// answered ENOSYS, which the kernel remembers for the connection: no more round trips
    /// for the `security.capability` lookups it makes before every write, chown and truncate,
    /// and callers get EOPNOTSUPP.
    pub xattrs: bool,
    /// The rendezvous directory of the instance's mounts (see `peers`): this mount tells the
    /// others what it changes and invalidates what they tell it, so long timeouts stay
    /// coherent on a shared instance. `None`: it neither tells nor listens.
    pub peers: Option<PathBuf>,
    /// Whether requests travel over io_uring.
    pub io_uring: IoUring,
}

/// The timeouts of a shared mount while a bind mount of its instance (which tells nobody what
/// it changes) is live, and the default.
pub const SHORT_TTL: Duration = Duration::from_secs(1);

/// The timeouts of a mount whose every change the kernel sees: one alone on its instance, or
/// one of a shared instance's mounts, which tell each other (`FsOptions::peers`).
pub const LONG_TTL: Duration = Duration::from_secs(60);

impl Default for FsOptions {
    fn default() -> Self {
        FsOptions {
            passthrough: true,
            read_only: false,
            entry_ttl: SHORT_TTL,
            attr_ttl: SHORT_TTL,
            threads: 4,
            fsname: "cachefs".to_string(),
            file_handles: true,
            accounting: None,
            exclusive: false,
            auto_unmount: true,
            xattrs: false,
            peers: None,
            io_uring: IoUring::Auto,
        }
    }
}

/// A live mount. Dropping it unmounts (best effort); call [`MountedFs::unmount`] to see errors.
pub struct MountedFs {
    target: PathBuf,
    session: Option<fuser::BackgroundSession>,
    /// The io_uring queues serving the connection, if it uses them (dropped after the
    /// session ended: their threads end with the connection).
    ring: Option<ring::Ring>,
    passthrough: Arc<AtomicBool>,
    /// The FUSE connection number (minor of st_dev), to abort a mount that cannot be
    /// unmounted cleanly.
    connection: Option<u32>,
    ended: Arc<SessionEnd>,
    evictor: Evictor,
}

/// How long an unmounted filesystem's session may take to end before it is taken to be held
/// by another mount namespace.
const PINNED_GRACE: Duration = Duration::from_secs(2);

/// Set when a session's filesystem is dropped, i.e. its serving threads are done.
#[derive(Default)]
struct SessionEnd {
    ended: parking_lot::Mutex<bool>,
    cv: parking_lot::Condvar,
}

/// Waits for a session to end (e.g. an unmount from outside).
#[derive(Clone)]
pub struct EndWatch(Arc<SessionEnd>);

impl EndWatch {
    /// Waits up to `timeout`; returns whether the session has ended.
    pub fn wait(&self, timeout: Duration) -> bool {
        let mut ended = self.0.ended.lock();
        if !*ended {
            self.0.cv.wait_for(&mut ended, timeout);
        }
        *ended
    }
}

/// Held by the filesystem; dropping it marks the session ended.
pub(crate) struct EndGuard(Arc<SessionEnd>);

impl Drop for EndGuard {
    fn drop(&mut self) {
        *self.0.ended.lock() = true;
        self.0.cv.notify_all();
    }
}

impl std::fmt::Debug for MountedFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MountedFs")
            .field("target", &self.target)
            .field("passthrough", &self.passthrough_active())
            .finish()
    }
}

impl MountedFs {
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Whether the FUSE session still serves requests (false once the filesystem was
    /// unmounted from outside, e.g. by `umount` or `cachefs umount`).
    pub fn is_serving(&self) -> bool {
        self.session.is_some() && !*self.ended.ended.lock()
    }

    /// A handle another thread can evict files of this mount with.
    pub fn evictor(&self) -> Evictor {
        self.evictor.clone()
    }

    /// A handle another thread can wait on for the session to end.
    pub fn end_watch(&self) -> EndWatch {
        EndWatch(self.ended.clone())
    }

    /// Whether regular files are served through kernel passthrough.
    pub fn passthrough_active(&self) -> bool {
        self.passthrough.load(Ordering::Relaxed)
    }

    /// How requests travel to this mount.
    pub fn transport(&self) -> Transport {
        if self.ring.is_some() {
            Transport::IoUring
        } else {
            Transport::DevFuse
        }
    }

    /// Unmounts and waits for the serving threads to end. A mount still busy (a process left
    /// behind holds a file open in it) is detached and its connection aborted, so this never
    /// hangs and never leaves a dead mount behind.
    pub fn unmount(mut self) -> Result<(), FsError> {
        self.do_unmount()
    }

    fn do_unmount(&mut self) -> Result<(), FsError> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let target = self.target.clone();
        let ctarget = CString::new(target.as_os_str().as_bytes())
            .map_err(|e| FsError::Unmount(target.clone(), io::Error::other(e)))?;
        let mut result = Ok(());
        // As root, unmount directly so a busy mount can be told apart; otherwise fuser goes
        // through fusermount3.
        if rustix::process::geteuid().is_root() {
            let r = unsafe { libc::umount2(ctarget.as_ptr(), 0) };
            if r != 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINVAL) | Some(libc::ENOENT) => {} // already gone
                    Some(libc::EBUSY) => {
                        debug!("{} is busy; detaching it", target.display());
                        unsafe { libc::umount2(ctarget.as_ptr(), libc::MNT_DETACH) };
                        if !self.abort_connection() {
                            // The threads serve until the last file closes; never hang here.
                            drop(session);
                            return Ok(());
                        }
                    }
                    _ => result = Err(FsError::Unmount(target.clone(), e)),
                }
            } else if !self.end_watch().wait(PINNED_GRACE)
                && self.connection.is_some_and(connection_exists)
            {
                // Gone from our namespace, but the connection lives on: a copy of the mount
                // in another mount namespace (one made while it was mounted) keeps it, and
                // would for as long as that namespace lives. We were asked to stop serving:
                // end the connection (the copies answer ENOTCONN) rather than hang. (A
                // connection already gone only has its threads finishing: join them.)
                debug!(
                    "{} is held in another mount namespace; aborting its connection",
                    target.display()
                );
                if !self.abort_connection() {
                    drop(session);
                    return Ok(());
                }
            }
        }
        match session.umount_and_join() {
            Ok(()) => {}
            Err(e) => {
                debug!("session end: {e}");
                if result.is_ok() && is_mount_point(&target).unwrap_or(false) {
                    result = Err(FsError::Unmount(target, e));
                }
            }
        }
        // The connection is gone, and with it the ring's requests: its threads have ended.
        drop(self.ring.take());
        result
    }

    /// Aborts the FUSE connection so the serving threads end even while a process still holds
    /// a file open in the detached mount (it then gets ENOTCONN). Returns false if that was not
    /// possible; the caller must then not wait for the threads.
    fn abort_connection(&self) -> bool {
        let Some(n) = self.connection else {
            return false;
        };
        match abort_connection(n) {
            Ok(()) => true,
            Err(e) => {
                debug!("cannot abort FUSE connection {n}: {e}");
                false
            }
        }
    }
}

/// The FUSE connection number of a mount: the minor of its st_dev (fusectl names its
/// directories by it).
pub fn connection_of(dev: u64) -> u32 {
    (((dev >> 12) & 0xfff00) | (dev & 0xff)) as u32
}

/// Aborts FUSE connection `n` through fusectl (`/sys/fs/fuse/connections/N/abort`), mounting
/// fusectl there first if it is not (as root; harmless and idempotent). The server then sees
/// its session end, and every mount of the connection, in any namespace, answers ENOTCONN.
pub fn abort_connection(n: u32) -> io::Result<()> {
    mount_fusectl();
    std::fs::write(Path::new(FUSECTL).join(n.to_string()).join("abort"), b"1")
}

/// Where the kernel's fusectl filesystem lists FUSE connections.
const FUSECTL: &str = "/sys/fs/fuse/connections";

/// Whether fusectl is mounted at [`FUSECTL`].
fn fusectl_mounted() -> bool {
    const FUSECTL_MAGIC: i64 = 0x6573_5543;
    rustix::fs::statfs(FUSECTL).is_ok_and(|st| st.f_type == FUSECTL_MAGIC)
}

/// Mounts fusectl at [`FUSECTL`] unless it is there (it often is not).
fn mount_fusectl() {
    if !fusectl_mounted() {
        let _ = std::process::Command::new("mount")
            .args(["-t", "fusectl", "fusectl", FUSECTL])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Whether FUSE connection `n` still exists (its last mount, in any namespace, keeps it).
/// When fusectl cannot be mounted, assumes it does.
fn connection_exists(n: u32) -> bool {
    mount_fusectl();
    !fusectl_mounted() || Path::new(FUSECTL).join(n.to_string()).exists()
}

impl Drop for MountedFs {
    fn drop(&mut self) {
        if let Err(e) = self.do_unmount() {
            warn!("{e}");
        }
    }
}

/// Checks that /dev/fuse exists and can be opened.
pub fn check_fuse_device() -> Result<(), FsError> {
    let path = std::env::var_os("CACHEFS_FUSE_DEVICE").unwrap_or_else(|| "/dev/fuse".into());
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(FsError::NoFuseDevice),
        Err(e) => return Err(FsError::FuseDeviceUnusable(e)),
    };
    if !meta.file_type().is_char_device() {
        return Err(FsError::NoFuseDevice);
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map(drop)
        .map_err(FsError::FuseDeviceUnusable)
}

/// Checks a mount target's path without changing anything: it must be a directory (a dead
/// FUSE mount counts as one) or not exist yet. Returns the absolute path.
pub fn check_target_path(target: &Path) -> Result<PathBuf, FsError> {
    let abs = if target.is_absolute() {
        target.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| FsError::TargetInvalid(target.to_path_buf(), e.to_string()))?
            .join(target)
    };
    let abs = normalize(&abs);
    if abs.as_os_str().as_bytes().contains(&0) {
        return Err(FsError::TargetInvalid(abs, "contains a NUL byte".into()));
    }
    if let Some(fs) = pseudo_filesystem_of(&abs) {
        return Err(FsError::TargetPseudo(abs, fs));
    }
    match std::fs::symlink_metadata(&abs) {
        Ok(m) if m.is_dir() => {}
        Ok(m) if m.file_type().is_symlink() => match std::fs::metadata(&abs) {
            Ok(t) if t.is_dir() => {}
            Ok(_) => return Err(FsError::TargetNotDirectory(abs)),
            Err(e) => return Err(FsError::TargetInvalid(abs, e.to_string())),
        },
        Ok(_) => return Err(FsError::TargetNotDirectory(abs)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(abs),
        // A dead FUSE mount: whether it may be cleared is for the caller to decide.
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => return Ok(abs),
        Err(e) => return Err(FsError::TargetInvalid(abs, e.to_string())),
    }
    Ok(abs)
}

/// Directories whose trees are the kernel's: a cache mounted there would hide the kernel's
/// interfaces (or land in a tmpfs of device nodes).
const PSEUDO_ROOTS: [&str; 3] = ["/proc", "/sys", "/dev"];

/// statfs magic numbers of the kernel's pseudo-filesystems, with their names.
const PSEUDO_MAGICS: [(i64, &str); 12] = [
    (0x9fa0, "proc"),
    (0x6265_6572, "sysfs"),
    (0x1cd1, "devpts"),
    (0x0027_e0eb, "cgroup"),
    (0x6367_7270, "cgroup2"),
    (0x6462_6720, "debugfs"),
    (0x7472_6163, "tracefs"),
    (0x7363_6673, "securityfs"),
    (0xcafe_4a11, "bpf"),
    (0x6265_6570, "configfs"),
    (0x6573_5543, "fusectl"),
    (0x4249_4e4d, "binfmt_misc"),
];

/// Whether the absolute, normalised `abs` is in one of the kernel's pseudo-filesystems: under
/// /proc, /sys or /dev as written, or once the symlinks of its longest existing prefix are
/// resolved, or on a filesystem of such a type mounted elsewhere. Returns where, for the
/// message.
fn pseudo_filesystem_of(abs: &Path) -> Option<String> {
    let under = |p: &Path| {
        PSEUDO_ROOTS
            .iter()
            .find(|r| p.starts_with(r))
            .map(|r| (*r).to_owned())
    };
    if let Some(r) = under(abs) {
        return Some(r);
    }
    // The longest prefix that exists (a target may be created later, below it).
    let mut existing = abs;
    let canon = loop {
        match std::fs::canonicalize(existing) {
            Ok(c) => break Some(c),
            Err(_) => match existing.parent() {
                Some(p) => existing = p,
                None => break None,
            },
        }
    };
    let canon = canon?;
    if let Some(r) = under(&canon) {
        return Some(format!("{r} (through {})", existing.display()));
    }
    let magic = rustix::fs::statfs(&canon).ok()?.f_type as i64;
    PSEUDO_MAGICS
        .iter()
        .find(|(m, _)| *m == magic)
        .map(|(_, name)| format!("a {name} filesystem ({})", canon.display()))
}

/// [`check_target_path`], and the target must not be a mount point (dead or alive).
pub fn check_target(target: &Path) -> Result<PathBuf, FsError> {
    let abs = check_target_path(target)?;
    if is_dead_mount(&abs)
        || is_mount_point(&abs).map_err(|e| FsError::TargetInvalid(abs.clone(), e.to_string()))?
    {
        return Err(FsError::TargetMounted(abs));
    }
    Ok(abs)
}

/// Lexically removes "." and ".." so the same directory is always spelled the same way.
pub fn normalize(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// The filesystem type cachefs mounts show in /proc/self/mountinfo.
pub const FSTYPE: &str = "fuse.cachefs";

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_id: u64,
    /// The filesystem's device (`major:minor` in mountinfo); for FUSE, the minor is the
    /// connection number. Copies of one mount in other namespaces share it.
    pub dev: (u32, u32),
    pub mount_point: PathBuf,
    /// e.g. `fuse.cachefs`, `ext4`.
    pub fstype: String,
    /// The mount's source (for cachefs, `cachefs:<id>`).
    pub source: String,
}

impl MountEntry {
    /// A cachefs mount: `fuse.cachefs` when fusermount3 made it; a plain `fuse` mount (made
    /// with mount(2) directly, which drops the subtype) is recognised by its source name.
    pub fn is_cachefs(&self) -> bool {
        self.fstype == FSTYPE || (self.fstype == "fuse" && self.source.starts_with("cachefs"))
    }
}

/// The topmost mount at exactly `path` (compared lexically after normalisation, so a dead
/// FUSE mount, which cannot be resolved, is still found), if any.
pub fn mount_at(path: &Path) -> io::Result<Option<MountEntry>> {
    let wanted = std::fs::canonicalize(path).unwrap_or_else(|_| normalize(path));
    let info = std::fs::read("/proc/self/mountinfo")?;
    Ok(parse_mountinfo(&info)
        .into_iter()
        .rev()
        .find(|e| e.mount_point == wanted))
}

/// Parses a mountinfo file (/proc/PID/mountinfo).
pub fn parse_mountinfo(info: &[u8]) -> Vec<MountEntry> {
    let mut out = Vec::new();
    for line in info.split(|&b| b == b'\n') {
        let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
        // id parent major:minor root mount-point options [optional...] - fstype source opts
        let Some(dash) = fields.iter().position(|f| *f == b"-") else {
            continue;
        };
        if fields.len() < 5 || dash + 2 >= fields.len() {
            continue;
        }
        let Some(mount_id) = std::str::from_utf8(fields[0])
            .ok()
            .and_then(|s| s.parse().ok())
        else {
            continue;
        };
        let dev = std::str::from_utf8(fields[2])
            .ok()
            .and_then(|d| d.split_once(':'))
            .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
            .unwrap_or((0, 0));
        out.push(MountEntry {
            mount_id,
            dev,
            mount_point: PathBuf::from(std::ffi::OsString::from_vec(unescape_mountinfo(fields[4]))),
            fstype: String::from_utf8_lossy(&unescape_mountinfo(fields[dash + 1])).into_owned(),
            source: String::from_utf8_lossy(&unescape_mountinfo(fields[dash + 2])).into_owned(),
        });
    }
    out
}

/// Whether `path` is a mount whose FUSE server is gone ("Transport endpoint is not
/// connected"). Asked with statfs, which the kernel never answers from its caches (a stat
/// can be answered from cached attributes for a while after the server died).
pub fn is_dead_mount(path: &Path) -> bool {
    match rustix::fs::statfs(path) {
        Err(e) => e == rustix::io::Errno::NOTCONN,
        Ok(_) => false,
    }
}

/// Removes a cachefs mount at `target` whose server died. Returns whether there was one.
/// Live mounts and other filesystems are left alone.
pub fn clear_dead_mount(target: &Path) -> Result<bool, FsError> {
    let entry = mount_at(target)
        .map_err(|e| FsError::TargetInvalid(target.to_path_buf(), e.to_string()))?;
    match entry {
        Some(e) if e.is_cachefs() && is_dead_mount(target) => {
            detach(&e.mount_point).map_err(|err| FsError::Unmount(e.mount_point.clone(), err))?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Unmounts `target` from outside its server: `umount2` as root, `fusermount3 -u` otherwise.
/// A busy mount fails with EBUSY unless `lazy`, which detaches it (processes using it keep
/// what they have open; it disappears from the tree at once).
pub fn unmount_path(target: &Path, lazy: bool) -> io::Result<()> {
    if rustix::process::geteuid().is_root() {
        let c = CString::new(target.as_os_str().as_bytes()).map_err(io::Error::other)?;
        let flags = if lazy { libc::MNT_DETACH } else { 0 };
        // SAFETY: a valid C string.
        if unsafe { libc::umount2(c.as_ptr(), flags) } != 0 {
            return Err(io::Error::last_os_error());
        }
        return Ok(());
    }
    let mut cmd = std::process::Command::new("fusermount3");
    cmd.arg("-u");
    if lazy {
        cmd.arg("-z");
    }
    let out = cmd
        .arg("--")
        .arg(target)
        .stdin(std::process::Stdio::null())
        .output()?;
    if out.status.success() {
        return Ok(());
    }
    let msg = String::from_utf8_lossy(&out.stderr);
    if msg.contains("busy") {
        return Err(io::Error::from_raw_os_error(libc::EBUSY));
    }
    Err(io::Error::other(msg.trim().replace('\n', "; ")))
}

fn detach(target: &Path) -> io::Result<()> {
    unmount_path(target, true)
}

/// Whether `path` is a mount point, from /proc/self/mountinfo (stat-based checks miss bind
/// mounts of the same filesystem).
pub fn is_mount_point(path: &Path) -> io::Result<bool> {
    let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let info = std::fs::read("/proc/self/mountinfo")?;
    for line in info.split(|&b| b == b'\n') {
        let mut fields = line.split(|&b| b == b' ');
        if let Some(mp) = fields.nth(4)
            && unescape_mountinfo(mp) == canon.as_os_str().as_bytes()
        {
            return Ok(true);
        }
    }
    Ok(false)
}

fn unescape_mountinfo(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'\\'
            && i + 3 < s.len()
            && s[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (s[i + 1] - b'0') * 64 + (s[i + 2] - b'0') * 8 + (s[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    out
}

/// Raises the soft open-file limit to the hard one: the fd budget is a share of it.
fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return lim.rlim_max;
        }
    }
    lim.rlim_cur
}

fn fusermount3_available() -> bool {
    find_fusermount3().is_some()
}

fn find_fusermount3() -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|d| d.join("fusermount3"))
        .find(|p| p.is_file())
}

/// Whether [`remember_fusermount3`] set FUSERMOUNT_PATH (so children should not inherit it).
static SET_FUSERMOUNT_PATH: AtomicBool = AtomicBool::new(false);

/// Tells fuser where fusermount3 is, so each mount does not first run `fusermount3 -h` to
/// find out (a fork and exec per mount). Sets FUSERMOUNT_PATH, so call it while the process
/// is still single-threaded.
///
/// # Safety
/// No other thread may exist (it modifies the environment).
pub unsafe fn remember_fusermount3() {
    if std::env::var_os("FUSERMOUNT_PATH").is_some() {
        return;
    }
    if let Some(p) = find_fusermount3().and_then(|p| p.to_str().map(str::to_owned)) {
        // SAFETY: the caller guarantees no other thread exists.
        unsafe { std::env::set_var("FUSERMOUNT_PATH", p) };
        SET_FUSERMOUNT_PATH.store(true, Ordering::Relaxed);
    }
}

/// Environment variables cachefs set for itself, to be removed from commands it starts.
pub fn own_env_vars() -> &'static [&'static str] {
    if SET_FUSERMOUNT_PATH.load(Ordering::Relaxed) {
        &["FUSERMOUNT_PATH"]
    } else {
        &[]
    }
}

/// Mounts `source` (an instance directory) at `target` (an existing directory).
pub fn mount(source: &Path, target: &Path, opts: &FsOptions) -> Result<MountedFs, FsError> {
    let nofile = raise_nofile_limit();
    let csource = CString::new(source.as_os_str().as_bytes())
        .map_err(|e| FsError::Source(source.to_path_buf(), io::Error::other(e)))?;
    // The instance path comes from the store, not from the build step; from here on only fds.
    let raw = unsafe {
        libc::open(
            csource.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if raw < 0 {
        return Err(FsError::Source(
            source.to_path_buf(),
            io::Error::last_os_error(),
        ));
    }
    let root_fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // A quarter of the fd limit for cached O_PATH fds leaves room for open files and the
    // rest of the process.
    let budget = (nofile / 4).clamp(64, 16384) as usize;
    reserve::configure(nofile, budget);
    let table = Arc::new(
        inode::InodeTable::new(root_fd, budget, opts.file_handles)
            .map_err(|e| FsError::Source(source.to_path_buf(), e))?,
    );
    debug!(
        "serving {} (file handles: {})",
        source.display(),
        table.uses_handles()
    );
    // Ours must not apply to what we create: a create applies the caller's umask (ops.rs,
    // CallerUmask), or the kernel has already applied it.
    unsafe { libc::umask(0) };
    let passthrough = Arc::new(AtomicBool::new(false));
    let ended = Arc::new(SessionEnd::default());
    // Joined before the mount exists, so every member knows this one before the kernel
    // caches anything here.
    let peers = match &opts.peers {
        Some(dir) => Some(Arc::new(
            peers::Peers::join(dir, peers::Role::Fuse)
                .map_err(|e| FsError::Peers(dir.clone(), e))?,
        )),
        None => None,
    };
    let want_ring = wants_ring(opts.io_uring)?;
    let fs = Arc::new(ops::CacheFs::new(
        table.clone(),
        opts,
        passthrough.clone(),
        peers.clone(),
    ));
    let ring_asked = Arc::new(AtomicBool::new(false));
    let classic = classic::Classic::new(
        fs.clone(),
        want_ring,
        ring_asked.clone(),
        EndGuard(ended.clone()),
    );

    let as_root = rustix::process::geteuid().is_root();
    let fsname: String = opts
        .fsname
        .chars()
        .map(|c| {
            if c == ',' || c.is_whitespace() || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect();
    let mut options = vec![
        MountOption::FSName(fsname),
        MountOption::Subtype("cachefs".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    if opts.read_only {
        options.push(MountOption::RO);
    }
    let mut config = fuser::Config::default();
    if as_root {
        // Build users other than root can use a cache root mounted for them.
        config.acl = SessionACL::All;
        if opts.auto_unmount && fusermount3_available() {
            // fusermount3 unmounts for us if this process dies, even by SIGKILL.
            options.push(MountOption::AutoUnmount);
        }
    }
    config.mount_options = options;
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = true;
    // INIT is answered inside Session::new; nothing is served before `spawn`.
    let session = fuser::Session::new(classic, target, &config)
        .map_err(|e| FsError::Mount(target.to_path_buf(), e))?;
    let dev = |what| {
        rustix::io::fcntl_dupfd_cloexec(session.as_fd(), 3).map_err(|e| {
            FsError::Mount(
                target.to_path_buf(),
                io::Error::other(format!("{what}: {e}")),
            )
        })
    };
    fs.set_device(dev("dup /dev/fuse")?);
    let ring = if ring_asked.load(Ordering::Relaxed) {
        match start_ring(dev("dup /dev/fuse")?, &fs) {
            Ok(r) => Some(r),
            // The kernel serves the connection through /dev/fuse again (ring::start).
            Err(e) if opts.io_uring == IoUring::Auto => {
                debug!("FUSE over io_uring unavailable, serving through /dev/fuse: {e}");
                None
            }
            // Dropping the session unmounts.
            Err(e) => return Err(FsError::IoUring(format!("cannot start the queues: {e}"))),
        }
    } else if opts.io_uring == IoUring::On {
        return Err(FsError::IoUring(
            "the kernel did not offer it (Linux 6.14 or later with CONFIG_FUSE_IO_URING)".into(),
        ));
    } else {
        None
    };
    // Before the first request is served: from then on the kernel caches what it is told.
    if let Some(p) = &peers {
        p.set_apply(apply_changes(session.notifier(), Arc::downgrade(&table)));
    }
    let session = session
        .spawn()
        .map_err(|e| FsError::Mount(target.to_path_buf(), e))?;
    let connection = std::fs::metadata(target).ok().map(|m| {
        use std::os::unix::fs::MetadataExt;
        connection_of(m.dev())
    });
    let evictor = Evictor {
        root: table.root_fd().clone(),
        table: Some(table),
        notifier: Some(session.notifier()),
        peers: peers.clone(),
    };
    Ok(MountedFs {
        target: target.to_path_buf(),
        session: Some(session),
        ring,
        passthrough,
        connection,
        ended,
        evictor,
    })
}

/// Whether to ask for FUSE over io_uring at INIT: with `on`, a kernel that does not allow it is
/// an error; with `auto`, /dev/fuse (saying once, at -v, how to allow it).
fn wants_ring(mode: IoUring) -> Result<bool, FsError> {
    static SAID: AtomicBool = AtomicBool::new(false);
    let enabled = ring::uring_enabled();
    match mode {
        IoUring::Off => Ok(false),
        IoUring::On if !enabled => Err(FsError::IoUring(if Path::new(ENABLE_URING).exists() {
            format!("off in the kernel: as root, echo Y > {ENABLE_URING}")
        } else {
            "not in this kernel (Linux 6.14 or later with CONFIG_FUSE_IO_URING)".into()
        })),
        IoUring::On => Ok(true),
        IoUring::Auto => {
            if !enabled && Path::new(ENABLE_URING).exists() && !SAID.swap(true, Ordering::Relaxed) {
                tracing::info!(
                    "FUSE over io_uring is off in the kernel; as root, `echo Y > {ENABLE_URING}` lets cachefs use it"
                );
            }
            Ok(enabled)
        }
    }
}

/// Starts the io_uring queues of a connection whose INIT asked for them.
fn start_ring(dev: OwnedFd, fs: &Arc<ops::CacheFs>) -> io::Result<ring::Ring> {
    // The kernel caps max_pages at fs.fuse.max_pages_limit (256 pages by default).
    let limit_pages = std::fs::read_to_string("/proc/sys/fs/fuse/max_pages_limit")
        .ok()
        .and_then(|s| s.trim().parse::<u16>().ok())
        .unwrap_or(256);
    let config = ring::RingConfig {
        queues: ring::possible_queues()?,
        depth: RING_DEPTH,
        payload_size: ring::payload_size(RING_MAX_WRITE, limit_pages),
    };
    ring::start(dev, config, Arc::new(ring::serve::Serve(fs.clone())))
}

/// How a mount applies what the other mounts of its instance changed: by telling its kernel
/// to forget the names and attributes concerned (ENOENT: the kernel did not have them).
fn apply_changes(
    notifier: fuser::Notifier,
    table: std::sync::Weak<inode::InodeTable>,
) -> peers::Apply {
    use fuser::INodeNo;
    Box::new(move |change| match change {
        peers::Change::Entry { parent, name } => {
            let _ = notifier.inval_entry(INodeNo(*parent), std::ffi::OsStr::from_bytes(name));
        }
        peers::Change::Inode { node, data } => {
            // Offset -1: attributes only; 0 with length 0: the cached pages too.
            let _ = notifier.inval_inode(INodeNo(*node), if *data { 0 } else { -1 }, 0);
        }
        peers::Change::Reset => {
            let Some(table) = table.upgrade() else {
                return;
            };
            for (node, parent, name) in table.known_names() {
                let _ = notifier.inval_inode(INodeNo(node), 0, 0);
                if node != inode::ROOT {
                    let _ = notifier.inval_entry(INodeNo(parent), &name);
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_in_pseudo_filesystems() {
        for t in ["/proc", "/proc/self", "/sys/kernel", "/dev/shm/x", "/dev"] {
            assert!(
                matches!(
                    check_target_path(Path::new(t)),
                    Err(FsError::TargetPseudo(..))
                ),
                "{t}"
            );
        }
        // `..` is resolved before the check.
        assert!(matches!(
            check_target_path(Path::new("/tmp/../proc/1")),
            Err(FsError::TargetPseudo(..))
        ));
        // Through a symlink to /sys, also for a path below it that does not exist yet.
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("sys");
        std::os::unix::fs::symlink("/sys", &link).unwrap();
        let err = check_target_path(&link.join("kernel/not-there")).unwrap_err();
        assert!(err.to_string().contains("/sys (through"), "{err}");
        // Names that merely start alike are fine.
        assert_eq!(pseudo_filesystem_of(Path::new("/procs/x")), None);
        assert_eq!(pseudo_filesystem_of(dir.path()), None);
    }
}
