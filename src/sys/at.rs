//! Opens, stats and the `*at` calls, by directory fd and name.

use super::{Stat, cstr, cvt, cvt_ssize, own, proc_fd_path};
use std::ffi::{CStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::path::Path;

/// The soft limit on open descriptors (`RLIMIT_NOFILE`), if the kernel says.
pub(crate) fn nofile_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    Some(lim.rlim_cur)
}

/// Opens a configured root directory by its path (`O_PATH | O_DIRECTORY`). The
/// admin-given path may itself contain symlinks; nothing below it is reached this way.
pub(crate) fn open_dir_path(path: &Path) -> io::Result<OwnedFd> {
    let c = cstr(path.as_os_str())?;
    // SAFETY: NUL-terminated path.
    own(unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    })
}

/// Whether the directory behind `fd` is the root of a mount (statx
/// `STATX_ATTR_MOUNT_ROOT`, Linux 5.8+; `false` where the kernel does not say).
pub(crate) fn is_mount_root(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: a zeroed statx is a valid out-buffer.
    let mut sx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd, empty name with AT_EMPTY_PATH, and buffer.
    let r = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_BASIC_STATS,
            &mut sx,
        )
    };
    let bit = libc::STATX_ATTR_MOUNT_ROOT as u64;
    r == 0 && sx.stx_attributes_mask & bit != 0 && sx.stx_attributes & bit != 0
}

#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}
const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_NO_SYMLINKS: u64 = 0x04;
const RESOLVE_BENEATH: u64 = 0x08;

/// `openat2(dir, path, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`
/// with `O_NOFOLLOW`: `path` (relative, any depth) never leaves `dir` and follows no
/// symlink. ENOSYS where the kernel lacks openat2 (the caller walks by components).
pub(crate) fn openat2_beneath(
    dir: BorrowedFd<'_>,
    path: &CStr,
    flags: libc::c_int,
) -> io::Result<OwnedFd> {
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64,
        mode: 0,
        resolve: RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
    };
    loop {
        // SAFETY: valid dirfd, NUL-terminated path and a properly sized open_how.
        let r = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                path.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if r >= 0 {
            // SAFETY: the kernel returned a fresh fd we now own.
            return Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) });
        }
        let e = io::Error::last_os_error();
        // RESOLVE_* may spuriously fail with EAGAIN under concurrent renames: retry.
        if e.raw_os_error() != Some(libc::EAGAIN) {
            return Err(e);
        }
    }
}

/// `openat` of one name relative to a directory, never following a final symlink.
pub(crate) fn openat(
    dir: BorrowedFd<'_>,
    name: &CStr,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    // SAFETY: valid dirfd and NUL-terminated name.
    own(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            mode as libc::c_uint,
        )
    })
}

/// A new fd (`F_DUPFD_CLOEXEC`) of the same open file.
pub(crate) fn dup(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall on a valid fd.
    own(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) })
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`.
pub(crate) fn statat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Stat> {
    let mut st = std::mem::MaybeUninit::<Stat>::uninit();
    // SAFETY: valid pointers; the kernel fills st on success.
    cvt(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    // SAFETY: initialised by a successful fstatat.
    Ok(unsafe { st.assume_init() })
}

/// `fstat` of an open (or O_PATH) fd.
pub(crate) fn fstat(fd: BorrowedFd<'_>) -> io::Result<Stat> {
    let mut st = std::mem::MaybeUninit::<Stat>::uninit();
    // SAFETY: valid fd and pointer.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: initialised by a successful fstat.
    Ok(unsafe { st.assume_init() })
}

/// `fstatvfs` of the filesystem holding `fd`.
pub(crate) fn fstatvfs(fd: BorrowedFd<'_>) -> io::Result<libc::statvfs> {
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: valid fd and pointer.
    cvt(unsafe { libc::fstatvfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: initialised on success.
    Ok(unsafe { st.assume_init() })
}

/// What identifies a dst object across renames (inode number, and birth time where the
/// filesystem keeps one, so that a reused inode number is not taken for the old
/// object), with its link count and type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ident {
    pub(crate) ino: u64,
    pub(crate) btime: Option<(i64, u32)>,
    pub(crate) nlink: u32,
    /// `S_IFMT` bits.
    pub(crate) kind: u32,
}

/// statx of (`dir`, `name`) with `flags` (plus `AT_SYMLINK_NOFOLLOW`).
fn statx_ident(dir: RawFd, name: &CStr, flags: libc::c_int) -> io::Result<Ident> {
    // SAFETY: a zeroed statx is a valid out-buffer.
    let mut sx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd (or AT_FDCWD), NUL-terminated name and buffer.
    cvt(unsafe {
        libc::statx(
            dir,
            name.as_ptr(),
            flags | libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_INO | libc::STATX_BTIME | libc::STATX_NLINK | libc::STATX_TYPE,
            &mut sx,
        )
    })?;
    Ok(Ident {
        ino: sx.stx_ino,
        btime: (sx.stx_mask & libc::STATX_BTIME != 0)
            .then_some((sx.stx_btime.tv_sec, sx.stx_btime.tv_nsec)),
        nlink: sx.stx_nlink,
        kind: u32::from(sx.stx_mode) & libc::S_IFMT,
    })
}

/// statx of `name` under `dir` (`AT_EMPTY_PATH` with an empty name: `dir` itself),
/// never following a final symlink.
pub(crate) fn identity_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Ident> {
    let flags = if name.is_empty() {
        libc::AT_EMPTY_PATH
    } else {
        0
    };
    statx_ident(dir.as_raw_fd(), name, flags)
}

/// The identity of the object at a whole path (metadata only, so the plain path walk
/// is harmless), never following a final symlink.
pub(crate) fn identity_path(p: &Path) -> io::Result<Ident> {
    statx_ident(libc::AT_FDCWD, &cstr(p.as_os_str())?, 0)
}

pub(crate) fn mkdirat(dir: BorrowedFd<'_>, name: &CStr, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: valid dirfd and NUL-terminated name.
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) }).map(drop)
}

pub(crate) fn mknodat(
    dir: BorrowedFd<'_>,
    name: &CStr,
    mode: libc::mode_t,
    rdev: libc::dev_t,
) -> io::Result<()> {
    // SAFETY: valid dirfd and NUL-terminated name.
    cvt(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, rdev) }).map(drop)
}

pub(crate) fn symlinkat(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: valid dirfd and NUL-terminated names.
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }).map(drop)
}

pub(crate) fn readlinkat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<OsString> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: buffer of the given length.
    let len = cvt_ssize(unsafe {
        libc::readlinkat(
            dir.as_raw_fd(),
            name.as_ptr(),
            buf.as_mut_ptr() as *mut libc::c_char,
            buf.len(),
        )
    })?;
    buf.truncate(len);
    Ok(OsString::from_vec(buf))
}

/// `unlinkat`; `flags`: 0 or `AT_REMOVEDIR`.
pub(crate) fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: valid dirfd and NUL-terminated name.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
}

/// `renameat2`; `flags`: `RENAME_NOREPLACE` / `RENAME_EXCHANGE` or 0.
pub(crate) fn renameat2(
    from_dir: BorrowedFd<'_>,
    from: &CStr,
    to_dir: BorrowedFd<'_>,
    to: &CStr,
    flags: u32,
) -> io::Result<()> {
    // SAFETY: valid dirfds and NUL-terminated names.
    cvt(unsafe {
        libc::renameat2(
            from_dir.as_raw_fd(),
            from.as_ptr(),
            to_dir.as_raw_fd(),
            to.as_ptr(),
            flags,
        )
    })
    .map(drop)
}

/// `linkat` with flags 0: a symlink `existing` is linked itself, never followed.
pub(crate) fn linkat(
    existing_dir: BorrowedFd<'_>,
    existing: &CStr,
    new_dir: BorrowedFd<'_>,
    new: &CStr,
) -> io::Result<()> {
    // SAFETY: valid dirfds and NUL-terminated names.
    cvt(unsafe {
        libc::linkat(
            existing_dir.as_raw_fd(),
            existing.as_ptr(),
            new_dir.as_raw_fd(),
            new.as_ptr(),
            0,
        )
    })
    .map(drop)
}

/// `fchownat(…, flags | AT_SYMLINK_NOFOLLOW)`; `u32::MAX` leaves an id unchanged.
pub(crate) fn fchownat(
    dir: BorrowedFd<'_>,
    name: &CStr,
    uid: u32,
    gid: u32,
    flags: libc::c_int,
) -> io::Result<()> {
    // SAFETY: valid dirfd and NUL-terminated name.
    cvt(unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            name.as_ptr(),
            uid,
            gid,
            flags | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// chmod without following a final symlink (glibc implements the flag via O_PATH).
pub(crate) fn fchmodat_nofollow(
    dir: BorrowedFd<'_>,
    name: &CStr,
    mode: libc::mode_t,
) -> io::Result<()> {
    // SAFETY: valid dirfd and NUL-terminated name.
    cvt(unsafe {
        libc::fchmodat(
            dir.as_raw_fd(),
            name.as_ptr(),
            mode,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// chmod of the object behind an (`O_PATH`) fd, through its `/proc/self/fd` path.
pub(crate) fn chmod_fd(fd: BorrowedFd<'_>, mode: libc::mode_t) -> io::Result<()> {
    let p = proc_fd_path(fd.as_raw_fd());
    // SAFETY: NUL-terminated path; /proc/self/fd/N names exactly the opened object.
    cvt(unsafe { libc::chmod(p.as_ptr(), mode) }).map(drop)
}

pub(crate) fn fchown(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    cvt(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) }).map(drop)
}

pub(crate) fn fchmod(fd: BorrowedFd<'_>, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode) }).map(drop)
}

/// Timestamps for `utimensat`: `None` leaves a time unchanged.
#[derive(Debug, Clone, Copy)]
pub enum SetTime {
    Now,
    At(libc::timespec),
}

impl SetTime {
    /// The `timespec` `utimensat` takes for `t` (`UTIME_OMIT` for `None`).
    pub(crate) fn timespec(t: Option<SetTime>) -> libc::timespec {
        match t {
            None => libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
            Some(SetTime::Now) => libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_NOW,
            },
            Some(SetTime::At(ts)) => ts,
        }
    }
}

/// `utimensat(…, flags | AT_SYMLINK_NOFOLLOW)` with (atime, mtime).
pub(crate) fn utimensat(
    dir: BorrowedFd<'_>,
    name: &CStr,
    times: &[libc::timespec; 2],
    flags: libc::c_int,
) -> io::Result<()> {
    // SAFETY: valid dirfd, NUL-terminated name and a 2-element timespec array.
    cvt(unsafe {
        libc::utimensat(
            dir.as_raw_fd(),
            name.as_ptr(),
            times.as_ptr(),
            flags | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// (atime, mtime) of `st`, as `utimensat` and `futimens` take them.
pub(crate) fn stat_times(st: &Stat) -> [libc::timespec; 2] {
    [
        libc::timespec {
            tv_sec: st.st_atime,
            tv_nsec: st.st_atime_nsec,
        },
        libc::timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec,
        },
    ]
}

/// `futimens` with (atime, mtime).
pub(crate) fn futimens(fd: BorrowedFd<'_>, times: &[libc::timespec; 2]) -> io::Result<()> {
    // SAFETY: valid fd and a 2-element timespec array.
    cvt(unsafe { libc::futimens(fd.as_raw_fd(), times.as_ptr()) }).map(drop)
}

/// fsync of the directory behind `dir` (an `O_PATH` fd is reopened as `.` to read).
pub(crate) fn fsync_dir(dir: BorrowedFd<'_>) -> io::Result<()> {
    let fd = openat(dir, c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    // SAFETY: plain syscall on a valid fd.
    cvt(unsafe { libc::fsync(fd.as_raw_fd()) }).map(drop)
}

/// An entry read from a directory listing.
#[derive(Debug, Clone)]
pub(crate) struct DirEntry {
    pub(crate) name: OsString,
    /// `S_IFMT` bits of the entry's type (0 when the filesystem did not say).
    pub(crate) kind: u32,
    /// The entry's inode number in its filesystem (`d_ino`).
    pub(crate) ino: u64,
}

/// Reads every entry of an open directory fd (consumes it), without "." and "..".
pub(crate) fn read_dir_fd(fd: OwnedFd) -> io::Result<Vec<DirEntry>> {
    let raw = fd.as_raw_fd();
    // SAFETY: fdopendir takes ownership of the fd on success.
    let dirp = unsafe { libc::fdopendir(raw) };
    if dirp.is_null() {
        return Err(io::Error::last_os_error());
    }
    std::mem::forget(fd);
    let mut out = Vec::new();
    loop {
        // SAFETY: errno is thread-local; reset to tell end-of-stream from error.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: dirp is a valid DIR*.
        let ent = unsafe { libc::readdir64(dirp) };
        if ent.is_null() {
            let e = io::Error::last_os_error();
            // SAFETY: dirp valid; closes the fd too.
            unsafe { libc::closedir(dirp) };
            return match e.raw_os_error() {
                Some(0) | None => Ok(out),
                _ => Err(e),
            };
        }
        // SAFETY: d_name is NUL-terminated within the entry.
        let (name, dtype, d_ino) = unsafe {
            (
                CStr::from_ptr((*ent).d_name.as_ptr()).to_bytes().to_vec(),
                (*ent).d_type,
                (*ent).d_ino,
            )
        };
        if name == b"." || name == b".." {
            continue;
        }
        let kind = match dtype {
            libc::DT_DIR => libc::S_IFDIR,
            libc::DT_REG => libc::S_IFREG,
            libc::DT_LNK => libc::S_IFLNK,
            libc::DT_FIFO => libc::S_IFIFO,
            libc::DT_SOCK => libc::S_IFSOCK,
            libc::DT_CHR => libc::S_IFCHR,
            libc::DT_BLK => libc::S_IFBLK,
            _ => 0,
        };
        out.push(DirEntry {
            name: OsString::from_vec(name),
            kind,
            ino: d_ino,
        });
    }
}
