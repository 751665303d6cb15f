//! Thin safe wrappers over the `*at()` system calls the filesystem uses.
//!
//! Every call here takes a directory fd and a single path component (or no path at all), and
//! never follows a symlink in the last component, so a backing path is never resolved from a
//! string that a build step could redirect.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

pub(crate) fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// A single path component as a C string. The kernel never sends '/' in a name; "." and ".."
/// are refused too, so a name can only ever designate a child of the directory fd it is used
/// with.
pub(crate) fn component(name: &OsStr) -> io::Result<CString> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    CString::new(bytes).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

const EMPTY: &CStr = c"";

pub(crate) fn openat(
    dir: BorrowedFd<'_>,
    name: &CStr,
    flags: i32,
    mode: u32,
) -> io::Result<OwnedFd> {
    // SAFETY: valid C string and fd; the returned fd is owned by us.
    let fd = cvt(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            mode as libc::c_uint,
        )
    })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens `name` beneath `dir` as an O_PATH fd without following a symlink in it.
pub(crate) fn open_path_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    openat(dir, name, libc::O_PATH, 0)
}

/// Reopens the file an O_PATH fd designates with real access flags, through the
/// /proc/self/fd magic link: it designates exactly that inode, whatever happened to its name.
pub(crate) fn reopen(fd: BorrowedFd<'_>, flags: i32) -> io::Result<OwnedFd> {
    let path = proc_fd_path(fd);
    // O_NOFOLLOW must not be set: the magic link is what we follow. O_CREAT/O_EXCL never apply.
    let flags = (flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW)) | libc::O_CLOEXEC;
    let raw = cvt(unsafe { libc::open(path.as_ptr(), flags, 0) })?;
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

pub(crate) fn proc_fd_path(fd: BorrowedFd<'_>) -> CString {
    // A decimal fd never contains NUL.
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default()
}

pub(crate) fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    cvt(unsafe {
        libc::fstatat(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(unsafe { st.assume_init() })
}

pub(crate) fn fstatat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    cvt(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(unsafe { st.assume_init() })
}

pub(crate) fn mkdirat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode as libc::mode_t) }).map(drop)
}

pub(crate) fn mknodat(dir: BorrowedFd<'_>, name: &CStr, mode: u32, rdev: u64) -> io::Result<()> {
    cvt(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode as libc::mode_t, rdev) })
        .map(drop)
}

pub(crate) fn symlinkat(target: &OsStr, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    let target =
        CString::new(target.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }).map(drop)
}

pub(crate) fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, flags: i32) -> io::Result<()> {
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
}

pub(crate) fn renameat2(
    olddir: BorrowedFd<'_>,
    oldname: &CStr,
    newdir: BorrowedFd<'_>,
    newname: &CStr,
    flags: u32,
) -> io::Result<()> {
    cvt(unsafe {
        libc::renameat2(
            olddir.as_raw_fd(),
            oldname.as_ptr(),
            newdir.as_raw_fd(),
            newname.as_ptr(),
            flags,
        )
    })
    .map(drop)
}

/// Hard-links the inode an O_PATH fd designates as `name` in `newdir`.
pub(crate) fn linkat_fd(fd: BorrowedFd<'_>, newdir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH; the /proc magic link works for everyone and
    // designates the same inode.
    let r = unsafe {
        libc::linkat(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            newdir.as_raw_fd(),
            name.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::ENOENT) && err.raw_os_error() != Some(libc::EPERM) {
        return Err(err);
    }
    if fstat(fd)?.st_mode & libc::S_IFMT == libc::S_IFLNK {
        // Following the magic link of a symlink could follow the symlink itself.
        return Err(err);
    }
    let path = proc_fd_path(fd);
    cvt(unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            path.as_ptr(),
            newdir.as_raw_fd(),
            name.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    })
    .map(drop)
}

pub(crate) fn readlink_fd(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    let n = cvt_size(unsafe {
        libc::readlinkat(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })?;
    buf.truncate(n);
    Ok(buf)
}

pub(crate) fn fchmod_path(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    // fchmod() refuses O_PATH fds; chmod through the magic link reaches the same inode.
    let path = proc_fd_path(fd);
    cvt(unsafe { libc::chmod(path.as_ptr(), mode as libc::mode_t) }).map(drop)
}

pub(crate) fn fchown_path(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
    cvt(unsafe {
        libc::fchownat(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            uid,
            gid,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

pub(crate) fn utimens_path(
    fd: BorrowedFd<'_>,
    times: &[libc::timespec; 2],
    symlink: bool,
) -> io::Result<()> {
    if symlink {
        // A symlink's own times: AT_EMPTY_PATH on the O_PATH fd (Linux 5.8+), never following.
        return cvt(unsafe {
            libc::utimensat(
                fd.as_raw_fd(),
                EMPTY.as_ptr(),
                times.as_ptr(),
                libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            )
        })
        .map(drop);
    }
    let path = proc_fd_path(fd);
    cvt(unsafe { libc::utimensat(libc::AT_FDCWD, path.as_ptr(), times.as_ptr(), 0) }).map(drop)
}

pub(crate) fn statvfs(fd: BorrowedFd<'_>) -> io::Result<libc::statvfs> {
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    cvt(unsafe { libc::fstatvfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    Ok(unsafe { st.assume_init() })
}

/// fsync, or fdatasync with `datasync`.
pub(crate) fn sync_fd(fd: BorrowedFd<'_>, datasync: bool) -> io::Result<()> {
    // SAFETY: plain syscalls on an fd the caller holds open.
    cvt(unsafe {
        if datasync {
            libc::fdatasync(fd.as_raw_fd())
        } else {
            libc::fsync(fd.as_raw_fd())
        }
    })
    .map(drop)
}

pub(crate) fn fchmod(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    // SAFETY: a plain syscall on an fd the caller holds open.
    cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode) }).map(drop)
}

pub(crate) fn ftruncate(fd: BorrowedFd<'_>, size: u64) -> io::Result<()> {
    let size =
        libc::off_t::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: a plain syscall on an fd the caller holds open.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), size) }).map(drop)
}

pub(crate) fn futimens(fd: BorrowedFd<'_>, times: &[libc::timespec; 2]) -> io::Result<()> {
    // SAFETY: `times` points to the two timespecs futimens reads.
    cvt(unsafe { libc::futimens(fd.as_raw_fd(), times.as_ptr()) }).map(drop)
}

pub(crate) fn fallocate(fd: BorrowedFd<'_>, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let einval = || io::Error::from_raw_os_error(libc::EINVAL);
    let offset = libc::off_t::try_from(offset).map_err(|_| einval())?;
    let len = libc::off_t::try_from(len).map_err(|_| einval())?;
    // SAFETY: a plain syscall on an fd the caller holds open.
    cvt(unsafe { libc::fallocate(fd.as_raw_fd(), mode, offset, len) }).map(drop)
}

pub(crate) fn lseek(fd: BorrowedFd<'_>, offset: i64, whence: i32) -> io::Result<i64> {
    // SAFETY: a plain syscall on an fd the caller holds open.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), offset as libc::off_t, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as i64)
    }
}

pub(crate) fn copy_file_range(
    fd_in: BorrowedFd<'_>,
    off_in: u64,
    fd_out: BorrowedFd<'_>,
    off_out: u64,
    len: u64,
    flags: u32,
) -> io::Result<usize> {
    let einval = || io::Error::from_raw_os_error(libc::EINVAL);
    let mut off_in = libc::off64_t::try_from(off_in).map_err(|_| einval())?;
    let mut off_out = libc::off64_t::try_from(off_out).map_err(|_| einval())?;
    let len = usize::try_from(len).map_err(|_| einval())?;
    // SAFETY: the offsets are ours for the call; both fds are held open by the caller.
    cvt_size(unsafe {
        libc::copy_file_range(
            fd_in.as_raw_fd(),
            &mut off_in,
            fd_out.as_raw_fd(),
            &mut off_out,
            len,
            flags,
        )
    })
}

pub(crate) fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let n = cvt_size(unsafe {
            libc::pread(
                fd.as_raw_fd(),
                buf[done..].as_mut_ptr().cast(),
                buf.len() - done,
                (offset + done as u64) as libc::off_t,
            )
        });
        match n {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

pub(crate) fn pwrite(fd: BorrowedFd<'_>, buf: &[u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let n = cvt_size(unsafe {
            libc::pwrite(
                fd.as_raw_fd(),
                buf[done..].as_ptr().cast(),
                buf.len() - done,
                (offset + done as u64) as libc::off_t,
            )
        });
        match n {
            Ok(n) => done += n,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Xattr calls go through the /proc magic link: the f*xattr calls refuse O_PATH fds.
/// Callers never pass a symlink's fd (following the magic link could then follow the link).
pub(crate) fn getxattr(fd: BorrowedFd<'_>, name: &CStr, buf: &mut [u8]) -> io::Result<usize> {
    let path = proc_fd_path(fd);
    cvt_size(unsafe {
        libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })
}

pub(crate) fn listxattr(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    let path = proc_fd_path(fd);
    cvt_size(unsafe { libc::listxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })
}

pub(crate) fn setxattr(
    fd: BorrowedFd<'_>,
    name: &CStr,
    value: &[u8],
    flags: i32,
) -> io::Result<()> {
    let path = proc_fd_path(fd);
    cvt(unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

pub(crate) fn removexattr(fd: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    let path = proc_fd_path(fd);
    cvt(unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) }).map(drop)
}

/// A kernel file handle: a stable name for an inode that survives renames and needs no open fd.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct FileHandle {
    handle_type: i32,
    bytes: Box<[u8]>,
}

const MAX_HANDLE_SZ: usize = 128;

#[repr(C)]
struct RawHandle {
    handle_bytes: u32,
    handle_type: i32,
    f_handle: [u8; MAX_HANDLE_SZ],
}

pub(crate) fn name_to_handle(fd: BorrowedFd<'_>) -> io::Result<FileHandle> {
    name_to_handle_at(fd, EMPTY, libc::AT_EMPTY_PATH)
}

/// The handle of `name` in `dir` (a symlink's own handle: the last component is not followed).
pub(crate) fn name_to_handle_at(
    dir: BorrowedFd<'_>,
    name: &CStr,
    flags: i32,
) -> io::Result<FileHandle> {
    let mut raw = RawHandle {
        handle_bytes: MAX_HANDLE_SZ as u32,
        handle_type: 0,
        f_handle: [0; MAX_HANDLE_SZ],
    };
    let mut mount_id: libc::c_int = 0;
    cvt(unsafe {
        libc::name_to_handle_at(
            dir.as_raw_fd(),
            name.as_ptr(),
            (&mut raw as *mut RawHandle).cast(),
            &mut mount_id,
            flags,
        )
    })?;
    let len = (raw.handle_bytes as usize).min(MAX_HANDLE_SZ);
    Ok(FileHandle {
        handle_type: raw.handle_type,
        bytes: raw.f_handle[..len].into(),
    })
}

/// A readable directory fd for the directory `fd` refers to (which may be O_PATH).
pub(crate) fn reopen_dir(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let fd = cvt(unsafe {
        libc::openat(
            fd.as_raw_fd(),
            c".".as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
        )
    })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens an inode by handle. `mount_fd` is any fd on the same filesystem (the instance root).
pub(crate) fn open_by_handle(
    mount_fd: RawFd,
    handle: &FileHandle,
    flags: i32,
) -> io::Result<OwnedFd> {
    let mut raw = RawHandle {
        handle_bytes: handle.bytes.len() as u32,
        handle_type: handle.handle_type,
        f_handle: [0; MAX_HANDLE_SZ],
    };
    raw.f_handle[..handle.bytes.len()].copy_from_slice(&handle.bytes);
    let fd = cvt(unsafe {
        libc::open_by_handle_at(
            mount_fd,
            (&mut raw as *mut RawHandle).cast(),
            flags | libc::O_CLOEXEC,
        )
    })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads every entry of a directory (except "." and "..") from a fresh fd.
pub(crate) fn read_dir_all(dir: BorrowedFd<'_>) -> io::Result<Vec<(Vec<u8>, u64, u8)>> {
    let fd = openat(dir, c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = cvt_size(unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                fd.as_raw_fd(),
                buf.as_mut_ptr(),
                buf.len(),
            ) as libc::ssize_t
        })?;
        if n == 0 {
            break;
        }
        let mut pos = 0;
        while pos < n {
            // struct linux_dirent64 { u64 d_ino; i64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
            let rec = &buf[pos..n];
            if rec.len() < 19 {
                break;
            }
            let ino = u64::from_ne_bytes(rec[0..8].try_into().unwrap_or([0; 8]));
            let reclen = u16::from_ne_bytes([rec[16], rec[17]]) as usize;
            let dtype = rec[18];
            if reclen == 0 || reclen > rec.len() {
                break;
            }
            let name_area = &rec[19..reclen];
            let name_len = name_area
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(name_area.len());
            let name = &name_area[..name_len];
            if name != b"." && name != b".." {
                out.push((name.to_vec(), ino, dtype));
            }
            pos += reclen;
        }
    }
    Ok(out)
}

/// Open file description locks: owned by the backing open file, so each FUSE open (its own
/// backing fd) excludes the others, across processes and across mounts of one instance.
pub(crate) fn ofd_lock(
    fd: BorrowedFd<'_>,
    typ: i32,
    start: u64,
    end: u64,
    wait: bool,
) -> io::Result<()> {
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = typ as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start.min(i64::MAX as u64) as libc::off_t;
    // FUSE sends end = OFFSET_MAX for "to the end of file"; l_len 0 means the same.
    fl.l_len = if end >= i64::MAX as u64 {
        0
    } else {
        (end - start.min(end) + 1) as libc::off_t
    };
    let cmd = if wait {
        libc::F_OFD_SETLKW
    } else {
        libc::F_OFD_SETLK
    };
    loop {
        let r = unsafe { libc::fcntl(fd.as_raw_fd(), cmd, &fl) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINTR) && wait {
            continue;
        }
        return Err(e);
    }
}

/// Tests for a conflicting lock; returns (type, start, end, pid) of the conflict or F_UNLCK.
pub(crate) fn ofd_getlk(
    fd: BorrowedFd<'_>,
    typ: i32,
    start: u64,
    end: u64,
) -> io::Result<(i32, u64, u64, u32)> {
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = typ as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start.min(i64::MAX as u64) as libc::off_t;
    fl.l_len = if end >= i64::MAX as u64 {
        0
    } else {
        (end - start.min(end) + 1) as libc::off_t
    };
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) })?;
    let lstart = fl.l_start.max(0) as u64;
    let lend = if fl.l_len == 0 {
        i64::MAX as u64
    } else {
        lstart + fl.l_len as u64 - 1
    };
    Ok((fl.l_type as i32, lstart, lend, fl.l_pid.max(0) as u32))
}

// ---------------------------------------------------------------------------------------------
// Per-thread credentials: creating entries with the caller's identity
// ---------------------------------------------------------------------------------------------

/// `struct __user_cap_header_struct` (linux/capability.h).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`; version 3 takes two of them (capabilities 0-31, 32-63).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// The calling thread's capability sets.
fn thread_caps() -> io::Result<[CapData; 2]> {
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes two `CapData` (version 3) into `data`, which has room for them;
    // pid 0 is the calling thread. It only reads credentials.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut hdr as *mut CapHeader,
            data.as_mut_ptr(),
        ) as libc::c_int
    })?;
    Ok(data)
}

/// Sets the calling thread's capability sets (and only its own: credentials are per thread
/// in Linux; this is the raw syscall, which libc does not broadcast to other threads).
fn set_thread_caps(data: &[CapData; 2]) -> io::Result<()> {
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    // SAFETY: capset reads two `CapData` (version 3) from `data`; pid 0 is the calling
    // thread. Raising effective capabilities within the permitted set is all it can do here.
    cvt(unsafe {
        libc::syscall(libc::SYS_capset, &mut hdr as *mut CapHeader, data.as_ptr()) as libc::c_int
    })
    .map(drop)
}

/// setfsuid(2) on the calling thread; returns the previous fsuid. The raw syscall: it changes
/// only this thread (glibc's setfsuid is the raw syscall too, unlike setuid/setresuid, which
/// glibc broadcasts to every thread of the process).
fn setfsuid(uid: u32) -> u32 {
    // SAFETY: no memory is involved; an id that cannot be set leaves the fsuid unchanged
    // (callers check the result by reading it back).
    unsafe { libc::syscall(libc::SYS_setfsuid, uid) as u32 }
}

fn setfsgid(gid: u32) -> u32 {
    // SAFETY: as for setfsuid.
    unsafe { libc::syscall(libc::SYS_setfsgid, gid) as u32 }
}

/// The calling thread's supplementary groups.
fn thread_groups() -> io::Result<Vec<libc::gid_t>> {
    // SAFETY: size 0 only asks for the count.
    let n = cvt(unsafe { libc::getgroups(0, std::ptr::null_mut()) })?;
    let mut groups = vec![0 as libc::gid_t; n as usize];
    // SAFETY: `groups` has room for `n` entries.
    let n = cvt(unsafe { libc::getgroups(n, groups.as_mut_ptr()) })?;
    groups.truncate(n as usize);
    Ok(groups)
}

/// setgroups(2) on the calling thread only: the raw syscall (glibc's setgroups broadcasts
/// the change to every thread of the process).
fn set_thread_groups(groups: &[libc::gid_t]) -> io::Result<()> {
    // SAFETY: the kernel reads `groups.len()` entries from the slice.
    cvt(unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) as libc::c_int })
        .map(drop)
}

/// The calling thread acts with a request's uid/gid for filesystem access, until dropped.
///
/// Used by a root server for the syscall that creates an entry, so the entry is the caller's
/// from the start (no chown afterwards, which by name would be raceable). Setting a non-zero
/// fsuid clears the filesystem capabilities from the effective set (CAP_DAC_OVERRIDE,
/// CAP_FOWNER, CAP_FSETID, CAP_MKNOD, ...); `privileged` raises them again from the permitted
/// set: the kernel has already checked the request against the attributes we return
/// (default_permissions), and FUSE does not carry the caller's supplementary groups, so our
/// own check would refuse what the kernel allowed. Unprivileged, the thread has the caller's
/// uid and gid and no supplementary group and no filesystem capability: to open an existing
/// file the kernel did not check for the caller.
///
/// Dropping restores the thread's fsuid, fsgid, groups and capabilities, also on error paths.
/// A thread that cannot get its own identity back must not serve anyone else: that aborts.
pub(crate) struct CallerCreds {
    fsuid: u32,
    fsgid: u32,
    caps: [CapData; 2],
    groups: Option<Vec<libc::gid_t>>,
}

impl CallerCreds {
    pub(crate) fn enter(uid: u32, gid: u32, privileged: bool) -> io::Result<CallerCreds> {
        let caps = thread_caps()?;
        let groups = if privileged {
            None
        } else {
            let saved = thread_groups()?;
            set_thread_groups(&[])?;
            Some(saved)
        };
        let mut guard = CallerCreds {
            // Filled in below; until then Drop restores to what these say (root's ids are
            // what a root server runs with).
            fsuid: 0,
            fsgid: 0,
            caps,
            groups,
        };
        guard.fsgid = setfsgid(gid);
        guard.fsuid = setfsuid(uid);
        // setfsuid/setfsgid report no error: read back (an invalid id sets nothing and
        // returns the current one).
        if setfsgid(u32::MAX) != gid || setfsuid(u32::MAX) != uid {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        if privileged {
            set_thread_caps(&guard.caps)?;
        }
        Ok(guard)
    }
}

impl Drop for CallerCreds {
    fn drop(&mut self) {
        // fsuid back to 0 raises the filesystem capabilities again; capset then restores the
        // sets exactly as they were.
        setfsuid(self.fsuid);
        setfsgid(self.fsgid);
        let mut ok = setfsuid(u32::MAX) == self.fsuid && setfsgid(u32::MAX) == self.fsgid;
        ok &= set_thread_caps(&self.caps).is_ok();
        if let Some(groups) = &self.groups {
            ok &= set_thread_groups(groups).is_ok();
        }
        if !ok {
            tracing::error!("cannot restore a worker thread's credentials: aborting");
            std::process::abort();
        }
    }
}

/// Sets or clears O_APPEND on an open fd (its other status flags kept).
pub(crate) fn set_append(fd: BorrowedFd<'_>, append: bool) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on an fd we hold; no memory is passed.
    let fl = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    let fl = if append {
        fl | libc::O_APPEND
    } else {
        fl & !libc::O_APPEND
    };
    // SAFETY: as above; F_SETFL takes an int.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl) }).map(drop)
}

thread_local! {
    /// Whether this thread has a filesystem context (umask) of its own: None until tried.
    static OWN_UMASK: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// The caller's umask, applied by the backing filesystem to what this thread creates while the
/// guard lives (with FUSE_DONT_MASK the kernel leaves it to us). The backing filesystem then
/// does what a local one does for the caller: the umask applies, unless the parent directory
/// has a default ACL, which then decides the new entry's permissions instead.
pub(crate) struct CallerUmask {
    set: bool,
}

impl CallerUmask {
    /// Returns the guard and the mode to create with: `mode` itself, or `mode & !umask` when
    /// this thread cannot have a umask of its own (the default ACL rule is then lost: the
    /// umask also applies under a default ACL).
    pub(crate) fn set(umask: u32, mode: u32) -> (CallerUmask, u32) {
        let umask = umask & 0o777;
        let own = OWN_UMASK.with(|c| match c.get() {
            Some(own) => own,
            None => {
                // The umask belongs to the process's fs context, shared by all threads; a
                // worker gets a copy of its own once, so one request's umask never applies to
                // another thread's work. SAFETY: unshare(CLONE_FS) touches no memory of ours.
                let own = unsafe { libc::unshare(libc::CLONE_FS) } == 0;
                if !own {
                    tracing::debug!(
                        "no per-thread umask: {}; default ACLs then lose to the umask",
                        io::Error::last_os_error()
                    );
                }
                c.set(Some(own));
                own
            }
        });
        if !own {
            return (CallerUmask { set: false }, mode & !umask);
        }
        // SAFETY: umask cannot fail and touches no memory; this thread's context is its own.
        unsafe { libc::umask(umask as libc::mode_t) };
        (CallerUmask { set: true }, mode)
    }
}

impl Drop for CallerUmask {
    fn drop(&mut self) {
        if self.set {
            // Back to the server's own umask (0: see fs::mount). SAFETY: as above.
            unsafe { libc::umask(0) };
        }
    }
}
