//! Thin, no-follow syscall wrappers used by the replay (src and dst access).
//!
//! Invariants:
//! - Every path is resolved one component at a time from a root directory fd with
//!   `O_PATH | O_DIRECTORY | O_NOFOLLOW`, so a symlink swapped into src or dst can never
//!   redirect a read or a write outside the two trees.
//! - The last component is always handled with `*at` calls and `AT_SYMLINK_NOFOLLOW` /
//!   `O_NOFOLLOW`; xattrs go through `/proc/self/fd/<parent>/<name>` with the `l*xattr`
//!   calls, which resolve exactly that entry without following it.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

pub(crate) type Stat = libc::stat;

fn cstr(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn own(fd: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: `fd` was just returned by a successful open and is owned by nobody else.
    cvt(fd).map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Identity of a dst object: inode number and, where the filesystem keeps it, birth
/// time (so a reused inode number is not mistaken for the old object).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Id {
    pub ino: u64,
    pub btime: Option<(i64, u32)>,
}

fn statx_id(dir: RawFd, c: &CString) -> io::Result<Option<Id>> {
    // SAFETY: zeroed statx is a valid out-buffer.
    let mut sx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: plain syscall with valid pointers.
    let r = unsafe {
        libc::statx(
            dir,
            c.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_INO | libc::STATX_BTIME,
            &mut sx,
        )
    };
    match cvt(r) {
        Ok(_) => Ok(Some(Id {
            ino: sx.stx_ino,
            btime: (sx.stx_mask & libc::STATX_BTIME != 0)
                .then_some((sx.stx_btime.tv_sec, sx.stx_btime.tv_nsec)),
        })),
        Err(e) if is_gone(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Identity of `name` under `dir` (not following a symlink); `None` if absent.
pub(crate) fn identity_at(dir: RawFd, name: &OsStr) -> io::Result<Option<Id>> {
    statx_id(dir, &cstr(name.as_bytes())?)
}

/// Identity of the object at an absolute dst path (metadata only, so the plain path
/// walk is harmless); `None` if absent or unreadable.
pub(crate) fn identity_path(p: &Path) -> Option<Id> {
    statx_id(libc::AT_FDCWD, &cstr(p.as_os_str().as_bytes()).ok()?)
        .ok()
        .flatten()
}

/// True if the error is "no such entry" (also a non-directory in the middle of the path).
pub(crate) fn is_gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR))
}

/// True if the error means "this filesystem does not do that" (rclone, some FUSE fs).
pub(crate) fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOTSUP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

/// Open a configured root directory (the admin-given path may itself contain symlinks).
pub(crate) fn open_root(p: &Path) -> io::Result<OwnedFd> {
    let c = cstr(p.as_os_str().as_bytes())?;
    // SAFETY: plain syscall on a valid C string.
    own(unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    })
}

/// Open the directory `name` under `dir` without following a symlink.
pub(crate) fn open_dir_at(dir: RawFd, name: &OsStr) -> io::Result<OwnedFd> {
    let c = cstr(name.as_bytes())?;
    // SAFETY: plain syscall.
    own(unsafe {
        libc::openat(
            dir,
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })
}

/// Duplicate a directory fd (for the root, which is its own parent walk result).
pub(crate) fn dup(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall.
    own(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) })
}

/// Walk `comps` (directories) from `root` without following symlinks.
pub(crate) fn walk(root: &OwnedFd, comps: &[&OsStr]) -> io::Result<OwnedFd> {
    let mut cur = dup(root.as_raw_fd())?;
    for c in comps {
        cur = open_dir_at(cur.as_raw_fd(), c)?;
    }
    Ok(cur)
}

/// lstat of `name` under `dir`; `None` if it does not exist.
pub(crate) fn lstat_at(dir: RawFd, name: &OsStr) -> io::Result<Option<Stat>> {
    let c = cstr(name.as_bytes())?;
    // SAFETY: zeroed stat is a valid out-buffer.
    let mut st: Stat = unsafe { std::mem::zeroed() };
    // SAFETY: plain syscall with valid pointers.
    let r = unsafe { libc::fstatat(dir, c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) };
    match cvt(r) {
        Ok(_) => Ok(Some(st)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

pub(crate) fn fstat(fd: RawFd) -> io::Result<Stat> {
    // SAFETY: zeroed stat is a valid out-buffer.
    let mut st: Stat = unsafe { std::mem::zeroed() };
    // SAFETY: plain syscall.
    cvt(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st)
}

pub(crate) fn file_type(st: &Stat) -> libc::mode_t {
    st.st_mode & libc::S_IFMT
}

fn open_at(dir: RawFd, name: &OsStr, flags: libc::c_int, mode: libc::mode_t) -> io::Result<File> {
    let c = cstr(name.as_bytes())?;
    // SAFETY: plain syscall.
    let fd = own(unsafe {
        libc::openat(
            dir,
            c.as_ptr(),
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    })?;
    Ok(File::from(fd))
}

/// Open a regular file for reading (non-blocking, so a fifo swapped in never hangs us),
/// without touching its atime where allowed: reading dst to upload it must not change
/// what the mount shows (relatime would set atime when it is older than mtime).
pub(crate) fn open_read_at(dir: RawFd, name: &OsStr) -> io::Result<File> {
    match open_at(
        dir,
        name,
        libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOATIME,
        0,
    ) {
        // O_NOATIME needs ownership or CAP_FOWNER.
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            open_at(dir, name, libc::O_RDONLY | libc::O_NONBLOCK, 0)
        }
        r => r,
    }
}

/// Create a new file (fails if anything exists there).
pub(crate) fn create_excl_at(dir: RawFd, name: &OsStr, mode: libc::mode_t) -> io::Result<File> {
    open_at(
        dir,
        name,
        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
        mode,
    )
}

/// Open an existing regular file for writing in place.
pub(crate) fn open_write_at(dir: RawFd, name: &OsStr) -> io::Result<File> {
    open_at(dir, name, libc::O_WRONLY | libc::O_NONBLOCK, 0)
}

/// Names in the directory `name` under `dir` (`name` = "." for `dir` itself), no `.`/`..`.
pub(crate) fn list_dir(dir: RawFd, name: &OsStr) -> io::Result<Vec<OsString>> {
    let d = if name == "." {
        dup(dir)?
    } else {
        open_dir_at(dir, name)?
    };
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/self/fd/{}", d.as_raw_fd()))? {
        out.push(e?.file_name());
    }
    Ok(out)
}

pub(crate) fn mkdir_at(dir: RawFd, name: &OsStr, mode: libc::mode_t) -> io::Result<()> {
    let c = cstr(name.as_bytes())?;
    // SAFETY: plain syscall.
    cvt(unsafe { libc::mkdirat(dir, c.as_ptr(), mode) }).map(drop)
}

pub(crate) fn unlink_at(dir: RawFd, name: &OsStr, is_dir: bool) -> io::Result<()> {
    let c = cstr(name.as_bytes())?;
    let flags = if is_dir { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: plain syscall.
    cvt(unsafe { libc::unlinkat(dir, c.as_ptr(), flags) }).map(drop)
}

pub(crate) fn rename_at(
    fdir: RawFd,
    fname: &OsStr,
    tdir: RawFd,
    tname: &OsStr,
    exchange: bool,
) -> io::Result<()> {
    let f = cstr(fname.as_bytes())?;
    let t = cstr(tname.as_bytes())?;
    let flags = if exchange { libc::RENAME_EXCHANGE } else { 0 };
    // SAFETY: plain syscall.
    cvt(unsafe { libc::renameat2(fdir, f.as_ptr(), tdir, t.as_ptr(), flags) }).map(drop)
}

pub(crate) fn link_at(fdir: RawFd, fname: &OsStr, tdir: RawFd, tname: &OsStr) -> io::Result<()> {
    let f = cstr(fname.as_bytes())?;
    let t = cstr(tname.as_bytes())?;
    // SAFETY: plain syscall; flags 0 = do not follow a symlink `fname`.
    cvt(unsafe { libc::linkat(fdir, f.as_ptr(), tdir, t.as_ptr(), 0) }).map(drop)
}

pub(crate) fn symlink_at(target: &OsStr, dir: RawFd, name: &OsStr) -> io::Result<()> {
    let t = cstr(target.as_bytes())?;
    let n = cstr(name.as_bytes())?;
    // SAFETY: plain syscall.
    cvt(unsafe { libc::symlinkat(t.as_ptr(), dir, n.as_ptr()) }).map(drop)
}

pub(crate) fn readlink_at(dir: RawFd, name: &OsStr) -> io::Result<OsString> {
    let c = cstr(name.as_bytes())?;
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: buffer is valid for its length.
    let n = unsafe { libc::readlinkat(dir, c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(OsString::from_vec(buf))
}

/// readlink of a dst symlink that leaves its atime as it was: reading it to replay it
/// must not change what the mount shows (readlink always touches atime, and relatime
/// updates it when it is older than mtime; symlinks have no O_NOATIME).
pub(crate) fn readlink_keeping_atime(dir: RawFd, name: &OsStr) -> io::Result<OsString> {
    let before = lstat_at(dir, name)?;
    let target = readlink_at(dir, name)?;
    if let (Some(b), Some(a)) = (before, lstat_at(dir, name)?)
        && (a.st_atime, a.st_atime_nsec) != (b.st_atime, b.st_atime_nsec)
    {
        let c = cstr(name.as_bytes())?;
        let t = [
            libc::timespec {
                tv_sec: b.st_atime,
                tv_nsec: b.st_atime_nsec,
            },
            libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
        ];
        // SAFETY: plain syscall on a valid dirfd, name and 2-element array.
        unsafe { libc::utimensat(dir, c.as_ptr(), t.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
    }
    Ok(target)
}

pub(crate) fn mknod_at(
    dir: RawFd,
    name: &OsStr,
    mode: libc::mode_t,
    rdev: libc::dev_t,
) -> io::Result<()> {
    let c = cstr(name.as_bytes())?;
    // SAFETY: plain syscall.
    cvt(unsafe { libc::mknodat(dir, c.as_ptr(), mode, rdev) }).map(drop)
}

pub(crate) fn chown_at(dir: RawFd, name: &OsStr, uid: u32, gid: u32) -> io::Result<()> {
    let c = cstr(name.as_bytes())?;
    // SAFETY: plain syscall.
    cvt(unsafe { libc::fchownat(dir, c.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) }).map(drop)
}

/// chmod without following a final symlink (glibc implements the flag via O_PATH).
pub(crate) fn chmod_at(dir: RawFd, name: &OsStr, mode: libc::mode_t) -> io::Result<()> {
    let c = cstr(name.as_bytes())?;
    // SAFETY: plain syscall.
    cvt(unsafe { libc::fchmodat(dir, c.as_ptr(), mode, libc::AT_SYMLINK_NOFOLLOW) }).map(drop)
}

fn times_of(st: &Stat) -> [libc::timespec; 2] {
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

/// Set atime/mtime of `name` under `dir` to those of `st`, not following a symlink.
pub(crate) fn utimes_at(dir: RawFd, name: &OsStr, st: &Stat) -> io::Result<()> {
    let c = cstr(name.as_bytes())?;
    let t = times_of(st);
    // SAFETY: plain syscall with a valid 2-element array.
    cvt(unsafe { libc::utimensat(dir, c.as_ptr(), t.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) })
        .map(drop)
}

pub(crate) fn futimes(fd: RawFd, st: &Stat) -> io::Result<()> {
    let t = times_of(st);
    // SAFETY: plain syscall with a valid 2-element array.
    cvt(unsafe { libc::futimens(fd, t.as_ptr()) }).map(drop)
}

pub(crate) fn fchown(fd: RawFd, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: plain syscall.
    cvt(unsafe { libc::fchown(fd, uid, gid) }).map(drop)
}

pub(crate) fn fchmod(fd: RawFd, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: plain syscall.
    cvt(unsafe { libc::fchmod(fd, mode) }).map(drop)
}

/// fsync a directory (best effort callers ignore the error on filesystems without it).
pub(crate) fn fsync_dir(dir: RawFd) -> io::Result<()> {
    let dot = cstr(b".")?;
    // SAFETY: plain syscall.
    let fd = own(unsafe {
        libc::openat(
            dir,
            dot.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: plain syscall.
    cvt(unsafe { libc::fsync(fd.as_raw_fd()) }).map(drop)
}

/// `/proc/self/fd/<dir>/<name>`. For the directory itself (`name` "."), the trailing
/// `/.` matters: `l*xattr` on the bare `/proc/self/fd/<dir>` would act on the magic
/// link, not on the directory it stands for.
fn proc_path(dir: RawFd, name: &OsStr) -> io::Result<CString> {
    let mut v = format!("/proc/self/fd/{dir}/").into_bytes();
    v.extend_from_slice(name.as_bytes());
    cstr(&v)
}

/// Whether `attr` is a POSIX ACL (`system.posix_acl_access` or `_default`).
pub(crate) fn is_acl(attr: &[u8]) -> bool {
    attr == b"system.posix_acl_access" || attr == b"system.posix_acl_default"
}

/// Names of the xattrs of `name` under `dir` that replay copies to src: `user.*` and
/// the POSIX ACLs (not following a symlink).
pub(crate) fn list_synced_xattrs(dir: RawFd, name: &OsStr) -> io::Result<Vec<Vec<u8>>> {
    let p = proc_path(dir, name)?;
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: buffer valid for its length.
        let n = unsafe { libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            buf.truncate(n as usize);
            break;
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ERANGE) && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        return Err(e);
    }
    Ok(buf
        .split(|b| *b == 0)
        // Not cachefs's own (`user.cachefs.origin`, left on dst files by versions
        // before the origin record store): never uploaded.
        .filter(|n| {
            (n.starts_with(b"user.") || is_acl(n))
                && !crate::fs::origin::is_reserved_xattr(OsStr::from_bytes(n))
        })
        .map(<[u8]>::to_vec)
        .collect())
}

pub(crate) fn get_xattr(dir: RawFd, name: &OsStr, attr: &[u8]) -> io::Result<Vec<u8>> {
    let p = proc_path(dir, name)?;
    let a = cstr(attr)?;
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: buffer valid for its length.
        let n =
            unsafe { libc::lgetxattr(p.as_ptr(), a.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(buf);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ERANGE) && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        return Err(e);
    }
}

pub(crate) fn set_xattr(dir: RawFd, name: &OsStr, attr: &[u8], value: &[u8]) -> io::Result<()> {
    let p = proc_path(dir, name)?;
    let a = cstr(attr)?;
    // SAFETY: pointers valid for the given lengths.
    cvt(unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            a.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })
    .map(drop)
}

pub(crate) fn remove_xattr(dir: RawFd, name: &OsStr, attr: &[u8]) -> io::Result<()> {
    let p = proc_path(dir, name)?;
    let a = cstr(attr)?;
    // SAFETY: plain syscall.
    cvt(unsafe { libc::lremovexattr(p.as_ptr(), a.as_ptr()) }).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walk_refuses_symlinked_directories() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("real")).unwrap();
        std::os::unix::fs::symlink("/etc", t.path().join("link")).unwrap();
        let root = open_root(t.path()).unwrap();
        assert!(walk(&root, &[OsStr::new("real")]).is_ok());
        let e = walk(&root, &[OsStr::new("link")]).unwrap_err();
        assert!(is_gone(&e), "{e}");
        let st = lstat_at(root.as_raw_fd(), OsStr::new("link"))
            .unwrap()
            .unwrap();
        assert_eq!(file_type(&st), libc::S_IFLNK);
        assert!(open_read_at(root.as_raw_fd(), OsStr::new("link")).is_err());
    }

    #[test]
    fn xattrs_round_trip_through_proc_paths() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("f"), b"x").unwrap();
        let root = open_root(t.path()).unwrap();
        let fd = root.as_raw_fd();
        let n = OsStr::new("f");
        match set_xattr(fd, n, b"user.k", b"v") {
            Ok(()) => {}
            Err(e) if is_unsupported(&e) => return,
            Err(e) => panic!("{e}"),
        }
        assert_eq!(list_synced_xattrs(fd, n).unwrap(), vec![b"user.k".to_vec()]);
        assert_eq!(get_xattr(fd, n, b"user.k").unwrap(), b"v");
        remove_xattr(fd, n, b"user.k").unwrap();
        assert!(list_synced_xattrs(fd, n).unwrap().is_empty());
    }
}
