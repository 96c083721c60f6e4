//! The replay's view of a tree: names under directory fds, never a path walked with
//! symlinks followed. No syscall is made here: every call goes through `crate::sys`
//! (the one module with the unsafe code); this module only gives the replay its
//! vocabulary (`OsStr` names, "absent" as `None`, the fallbacks it wants).
//!
//! Invariants:
//! - Every path is resolved one component at a time from a root directory fd with
//!   `O_PATH | O_DIRECTORY | O_NOFOLLOW` ([`walk`]), so a symlink swapped into src or
//!   dst can never redirect a read or a write outside the two trees.
//! - The last component is always handled with `*at` calls and `AT_SYMLINK_NOFOLLOW` /
//!   `O_NOFOLLOW`; xattrs go through `/proc/self/fd/<parent>/<name>` with the `l*xattr`
//!   calls, which resolve exactly that entry without following it.
//! - src's root fd comes only from the `fs::layer::Layer` the view uses
//!   (`Layer::root_fd_checked`: the mount-root rule); the one whole-path open here,
//!   [`open_dst`], is for dst.

use crate::fs::names;
use crate::sys::{self, cstr};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

pub(crate) type Stat = sys::Stat;

pub(crate) use crate::sys::{dup, fchmod, fchown, fstat, fsync_dir};

/// Identity of a dst object: inode number and, where the filesystem keeps it, birth
/// time (so a reused inode number is not mistaken for the old object).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Id {
    pub(crate) ino: u64,
    pub(crate) btime: Option<(i64, u32)>,
}

impl From<sys::Ident> for Id {
    fn from(i: sys::Ident) -> Id {
        Id {
            ino: i.ino,
            btime: i.btime,
        }
    }
}

/// Identity of `name` under `dir` (not following a symlink); `None` if absent.
pub(crate) fn identity_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Option<Id>> {
    match sys::identity_at(dir, &cstr(name)?) {
        Ok(i) => Ok(Some(i.into())),
        Err(e) if is_gone(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Identity of the object at an absolute dst path (metadata only, so the plain path
/// walk is harmless); `None` if absent or unreadable.
pub(crate) fn identity_path(p: &Path) -> Option<Id> {
    sys::identity_path(p).ok().map(Id::from)
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

/// Open dst's root directory (the admin-given path may itself contain symlinks). src's
/// root is never opened here: it comes from the view's `Layer`.
pub(crate) fn open_dst(p: &Path) -> io::Result<OwnedFd> {
    sys::open_dir_path(p)
}

/// Open the directory `name` under `dir` without following a symlink.
pub(crate) fn open_dir_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    sys::openat(dir, &cstr(name)?, libc::O_PATH | libc::O_DIRECTORY, 0)
}

/// Walk `comps` (directories) from `root` without following symlinks.
pub(crate) fn walk(root: &OwnedFd, comps: &[&OsStr]) -> io::Result<OwnedFd> {
    let mut cur = sys::dup(root.as_fd())?;
    for c in comps {
        cur = open_dir_at(cur.as_fd(), c)?;
    }
    Ok(cur)
}

/// lstat of `name` under `dir`; `None` if it does not exist.
pub(crate) fn lstat_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Option<Stat>> {
    match sys::statat(dir, &cstr(name)?) {
        Ok(st) => Ok(Some(st)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

pub(crate) fn file_type(st: &Stat) -> libc::mode_t {
    st.st_mode & libc::S_IFMT
}

fn open_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<File> {
    sys::openat(dir, &cstr(name)?, flags, mode).map(File::from)
}

/// Whether dst directory `dir` holds a whiteout hiding `name`, by the view's rule
/// ([`names::whiteout_hides`]: a hashed whiteout only if its content is `name`).
pub(crate) fn whited_out(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<bool> {
    let wh = names::whiteout_name(name);
    if lstat_at(dir, &wh)?.is_none() {
        return Ok(false);
    }
    names::whiteout_hides(name, || match open_read_at(dir, &wh) {
        Ok(mut f) => {
            let mut content = Vec::new();
            f.read_to_end(&mut content)?;
            Ok(Some(content))
        }
        Err(e) if is_gone(&e) => Ok(None),
        Err(e) => Err(e),
    })
}

/// Open a regular file for reading (non-blocking, so a fifo swapped in never hangs us),
/// without touching its atime where allowed: reading dst to upload it must not change
/// what the mount shows (relatime would set atime when it is older than mtime).
pub(crate) fn open_read_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<File> {
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
pub(crate) fn create_excl_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    mode: libc::mode_t,
) -> io::Result<File> {
    open_at(
        dir,
        name,
        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
        mode,
    )
}

/// Open an existing regular file for writing in place.
pub(crate) fn open_write_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<File> {
    open_at(dir, name, libc::O_WRONLY | libc::O_NONBLOCK, 0)
}

/// Names in the directory `name` under `dir` (`name` = "." for `dir` itself), no `.`/`..`.
pub(crate) fn list_dir(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Vec<OsString>> {
    let d = sys::openat(dir, &cstr(name)?, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    Ok(sys::read_dir_fd(d)?.into_iter().map(|e| e.name).collect())
}

pub(crate) fn mkdir_at(dir: BorrowedFd<'_>, name: &OsStr, mode: libc::mode_t) -> io::Result<()> {
    sys::mkdirat(dir, &cstr(name)?, mode)
}

pub(crate) fn unlink_at(dir: BorrowedFd<'_>, name: &OsStr, is_dir: bool) -> io::Result<()> {
    let flags = if is_dir { libc::AT_REMOVEDIR } else { 0 };
    sys::unlinkat(dir, &cstr(name)?, flags)
}

pub(crate) fn rename_at(
    fdir: BorrowedFd<'_>,
    fname: &OsStr,
    tdir: BorrowedFd<'_>,
    tname: &OsStr,
    exchange: bool,
) -> io::Result<()> {
    let flags = if exchange { libc::RENAME_EXCHANGE } else { 0 };
    sys::renameat2(fdir, &cstr(fname)?, tdir, &cstr(tname)?, flags)
}

pub(crate) fn link_at(
    fdir: BorrowedFd<'_>,
    fname: &OsStr,
    tdir: BorrowedFd<'_>,
    tname: &OsStr,
) -> io::Result<()> {
    sys::linkat(fdir, &cstr(fname)?, tdir, &cstr(tname)?)
}

pub(crate) fn symlink_at(target: &OsStr, dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    sys::symlinkat(&cstr(target)?, dir, &cstr(name)?)
}

pub(crate) fn readlink_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OsString> {
    sys::readlinkat(dir, &cstr(name)?)
}

/// readlink of a dst symlink that leaves its atime as it was: reading it to replay it
/// must not change what the mount shows (readlink always touches atime, and relatime
/// updates it when it is older than mtime; symlinks have no O_NOATIME).
pub(crate) fn readlink_keeping_atime(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OsString> {
    let before = lstat_at(dir, name)?;
    let target = readlink_at(dir, name)?;
    if let (Some(b), Some(a)) = (before, lstat_at(dir, name)?)
        && (a.st_atime, a.st_atime_nsec) != (b.st_atime, b.st_atime_nsec)
    {
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
        let _ = sys::utimensat(dir, &cstr(name)?, &t, 0);
    }
    Ok(target)
}

pub(crate) fn mknod_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    mode: libc::mode_t,
    rdev: libc::dev_t,
) -> io::Result<()> {
    sys::mknodat(dir, &cstr(name)?, mode, rdev)
}

pub(crate) fn chown_at(dir: BorrowedFd<'_>, name: &OsStr, uid: u32, gid: u32) -> io::Result<()> {
    sys::fchownat(dir, &cstr(name)?, uid, gid, 0)
}

/// chmod without following a final symlink.
pub(crate) fn chmod_at(dir: BorrowedFd<'_>, name: &OsStr, mode: libc::mode_t) -> io::Result<()> {
    sys::fchmodat_nofollow(dir, &cstr(name)?, mode)
}

/// Set atime/mtime of `name` under `dir` to those of `st`, not following a symlink.
pub(crate) fn utimes_at(dir: BorrowedFd<'_>, name: &OsStr, st: &Stat) -> io::Result<()> {
    sys::utimensat(dir, &cstr(name)?, &sys::stat_times(st), 0)
}

pub(crate) fn futimes(fd: BorrowedFd<'_>, st: &Stat) -> io::Result<()> {
    sys::futimens(fd, &sys::stat_times(st))
}

pub(crate) use crate::sys::is_acl;

/// Names of the xattrs of `name` under `dir` that replay copies to src: `user.*` and
/// the POSIX ACLs (not following a symlink).
pub(crate) fn list_synced_xattrs(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Vec<Vec<u8>>> {
    let buf = sys::llistxattr_at(dir, name)?;
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

pub(crate) fn get_xattr(dir: BorrowedFd<'_>, name: &OsStr, attr: &[u8]) -> io::Result<Vec<u8>> {
    sys::lgetxattr_at(dir, name, attr)
}

pub(crate) fn set_xattr(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    attr: &[u8],
    value: &[u8],
) -> io::Result<()> {
    sys::lsetxattr_at(dir, name, attr, value)
}

pub(crate) fn remove_xattr(dir: BorrowedFd<'_>, name: &OsStr, attr: &[u8]) -> io::Result<()> {
    sys::lremovexattr_at(dir, name, attr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walk_refuses_symlinked_directories() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("real")).unwrap();
        std::os::unix::fs::symlink("/etc", t.path().join("link")).unwrap();
        let root = open_dst(t.path()).unwrap();
        assert!(walk(&root, &[OsStr::new("real")]).is_ok());
        let e = walk(&root, &[OsStr::new("link")]).unwrap_err();
        assert!(is_gone(&e), "{e}");
        let st = lstat_at(root.as_fd(), OsStr::new("link")).unwrap().unwrap();
        assert_eq!(file_type(&st), libc::S_IFLNK);
        assert!(open_read_at(root.as_fd(), OsStr::new("link")).is_err());
    }

    #[test]
    fn xattrs_round_trip_through_proc_paths() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("f"), b"x").unwrap();
        let root = open_dst(t.path()).unwrap();
        let fd = root.as_fd();
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

    #[test]
    fn a_hashed_whiteout_hides_only_the_name_it_holds() {
        let t = tempfile::tempdir().unwrap();
        let root = open_dst(t.path()).unwrap();
        let long = "l".repeat(250);
        let long = OsStr::new(&long);
        assert!(!whited_out(root.as_fd(), long).unwrap());
        let wh = t.path().join(names::whiteout_name(long));
        assert!(names::is_hashed_whiteout(wh.file_name().unwrap()));
        std::fs::write(&wh, b"a colliding name").unwrap();
        assert!(!whited_out(root.as_fd(), long).unwrap());
        std::fs::write(&wh, long.as_bytes()).unwrap();
        assert!(whited_out(root.as_fd(), long).unwrap());
        std::fs::write(t.path().join(names::whiteout_name(OsStr::new("s"))), b"").unwrap();
        assert!(whited_out(root.as_fd(), OsStr::new("s")).unwrap());
    }
}
