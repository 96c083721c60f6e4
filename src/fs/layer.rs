//! One directory tree (dst or src) accessed only *beneath* its root.
//!
//! Invariants:
//! - Every path given to a [`Layer`] is relative to its root and is resolved with
//!   `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)` for the
//!   parent directory and an `*at` call with `AT_SYMLINK_NOFOLLOW`/`O_NOFOLLOW` on the
//!   final component. A symlink or `..` swapped in behind the daemon's back therefore
//!   yields an error (ELOOP/EXDEV/ENOTDIR), never the target's contents, and never a
//!   write outside the root. On kernels without openat2 the walk is done one
//!   component at a time with `O_NOFOLLOW`.
//! - A `Layer` holds no unsafe code: the syscalls are `crate::sys`'s (re-exported
//!   here under the names the core uses); a `Layer` adds where they may reach. Its one cache, on dst only
//!   ([`Layer::open_caching_dirs`]), keeps `O_PATH` fds of recently used directories
//!   (at most an eighth of the descriptor limit, and at most [`DIR_FD_MAX`]: the
//!   descriptors the daemon holds do not grow with the entries it has shown)
//!   so that a burst of calls in one directory does not walk the path again for each
//!   (an openat2 per call). An entry is at most [`DIR_FD_TTL`] old, and this layer's
//!   own rename and rmdir drop the entries of every directory they move or remove
//!   (a generation counter keeps an fd opened before such a change from being cached
//!   after it). A cached fd always names a directory beneath the root. src never
//!   caches: other machines rename there behind our back. One leaf lock.
//! - The same table remembers, for at most [`DIR_FD_TTL`], which directories dst does
//!   *not* have (an open that failed with ENOENT/ENOTDIR/ELOOP): a listing of a
//!   directory only src has then costs no path walk per name in dst (its whiteout,
//!   opaque and entry probes all fail at once), and an absent directory also answers
//!   for everything below it. Only this layer's `mkdir` and `rename` can make a
//!   directory appear at a path (files made with `create_file`/`mknod`/`symlink`/
//!   `link` are no directories, and a parent that is a file answers the same as none):
//!   both forget every absent entry after their syscall, and bump the generation so
//!   that an absence seen before them is not recorded after them. Paths with a
//!   reserved component (the state folder, written with `std::fs` behind this layer's
//!   back) are never recorded absent.
//! - A root that was a mount root when opened is only ever replaced
//!   ([`Layer::reopen`]) by a mount root: an unmounted src leaves an empty
//!   directory at its path, and that must never be taken for an empty src. A src
//!   that was a mount root when cachefs last ran ([`Layer::open_src`]) but is a bare
//!   directory now starts with no root at all: every call fails with ENOTCONN (src is
//!   offline) until a reopen finds a mount there. The view and writeback replay share
//!   one src `Layer`, so both follow this rule: replay takes src's root only from
//!   [`Layer::root_fd_checked`], and has no other way to open src.

use std::collections::HashMap;
use std::ffi::{CStr, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::sys;
// The syscall wrappers the view and its callers use by these names (they live in
// `crate::sys`, the one module with the unsafe code).
use crate::sys::getxattrat;
pub use crate::sys::{
    DirEntry, Ident, SetTime, cstr, fstat, getxattr_fd, identity_at, is_not_found, listxattr_fd,
    openat, proc_fd_path, read_dir_fd, statat,
};

/// `struct stat` of an entry, never following a final symlink.
pub type Stat = sys::Stat;

/// Whether openat2 is known to be unavailable (ENOSYS): then walk component by component.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// How long a cached directory fd is used before the path is walked again: bounds
/// what a change made to dst behind the daemon's back (not through this layer) can
/// confuse.
pub const DIR_FD_TTL: Duration = Duration::from_secs(2);
/// Most directory fds kept open (the table is emptied when full), and most absent
/// directories remembered.
const DIR_FD_MAX: usize = 512;
/// Fewest directory fds kept open, however low the descriptor limit.
const DIR_FD_MIN: usize = 8;

/// How many directory fds the cache may hold: [`DIR_FD_MAX`], or an eighth of the
/// process's descriptor limit if that is less, so that the cache can never take the
/// descriptors that open files, src calls and FUSE itself need (a daemon started with
/// `ulimit -n 256` must list a directory of any size).
fn dir_fd_cap() -> usize {
    let Some(cur) = sys::nofile_limit() else {
        return DIR_FD_MIN;
    };
    usize::try_from(cur / 8)
        .unwrap_or(DIR_FD_MAX)
        .clamp(DIR_FD_MIN, DIR_FD_MAX)
}

/// Recently used directory fds by relative path (see the module docs).
#[derive(Debug, Default)]
struct DirFds {
    map: HashMap<PathBuf, (Arc<OwnedFd>, Instant)>,
    /// Most entries of `map` (see [`dir_fd_cap`]).
    cap: usize,
    /// Directories dst was seen not to have: the errno and when it was seen.
    absent: HashMap<PathBuf, (i32, Instant)>,
    /// Bumped by every invalidation: an fd opened before one is not cached.
    generation: u64,
}

impl DirFds {
    /// The errno of a recent failed open of `rel` or of one of its ancestors (which
    /// answers for everything below it), if any; expired entries are dropped.
    fn absent_at(&mut self, rel: &Path) -> Option<i32> {
        let mut expired = None;
        let mut found = None;
        for a in rel.ancestors() {
            if a.as_os_str().is_empty() {
                break;
            }
            if let Some((errno, at)) = self.absent.get(a) {
                if at.elapsed() < DIR_FD_TTL {
                    found = Some(*errno);
                    break;
                }
                expired = Some(a.to_path_buf());
            }
        }
        if let Some(a) = expired {
            self.absent.remove(&a);
        }
        found
    }
}

/// Whether any component of `rel` is a reserved name (cachefs's own files in dst).
fn has_reserved_component(rel: &Path) -> bool {
    rel.components().any(|c| match c {
        Component::Normal(n) => super::names::is_reserved(n),
        _ => true,
    })
}

/// A directory root; every operation stays beneath it.
#[derive(Debug)]
pub struct Layer {
    /// The root directory; replaced by [`Layer::reopen`] when a mount at `root_path`
    /// was restarted (e.g. rclone died and systemd started it again).
    /// `None`: src must be a mount root and is not one (yet): see the module docs.
    root: std::sync::RwLock<Option<std::sync::Arc<OwnedFd>>>,
    root_path: PathBuf,
    /// Cached directory fds (dst only).
    dirs: Option<Mutex<DirFds>>,
    /// The root was the root of a mount when first opened (an rclone mount, say):
    /// [`Layer::reopen`] then accepts only a mount root again, never the empty
    /// directory an unmounted mount leaves at that path.
    mount_root: bool,
}

/// What [`Layer::probe`] found.
#[derive(Debug, Clone, Copy)]
pub enum Probe {
    Found(Stat),
    /// The parent is there, the name is not.
    NoName,
    /// The parent is not there (or is no directory).
    NoParent,
}

/// Splits a relative path into (parent, final name). The root has no final name.
fn split(rel: &Path) -> Option<(&Path, &OsStr)> {
    let name = rel.file_name()?;
    Some((rel.parent().unwrap_or(Path::new("")), name))
}

impl Layer {
    /// Opens `root` (a directory) as the base of every later call.
    pub fn open(root: &Path) -> io::Result<Layer> {
        let fd = sys::open_dir_path(root)?;
        Ok(Layer {
            mount_root: sys::is_mount_root(fd.as_fd()),
            root: std::sync::RwLock::new(Some(std::sync::Arc::new(fd))),
            root_path: root.to_path_buf(),
            dirs: None,
        })
    }

    /// Opens src's root. `was_mount_root`: src was a mount root when cachefs last ran
    /// (an rclone mount, say). If it is not one now, the mount is not there (yet) and
    /// the directory at that path is not src: the layer starts with no root (every
    /// call fails with ENOTCONN) and only [`Layer::reopen`] of a mount root gives it one.
    pub fn open_src(root: &Path, was_mount_root: bool) -> io::Result<Layer> {
        let mut l = Layer::open(root)?;
        if was_mount_root && !l.mount_root {
            l.mount_root = true;
            *l.root.get_mut().unwrap() = None;
        }
        Ok(l)
    }

    /// Whether this layer's root must be (and, while it has one, is) a mount root.
    pub fn is_mount_root(&self) -> bool {
        self.mount_root
    }

    /// A new fd of the current root (`O_PATH`), for code that resolves paths itself
    /// beneath it (writeback replay). ENOTCONN while the layer has no root.
    pub fn root_fd(&self) -> io::Result<OwnedFd> {
        self.root()?.try_clone()
    }

    /// Like [`Layer::root_fd`], after checking that the root's path still leads to
    /// that root: a filesystem detached from src's path (`umount -l`) can go on
    /// answering through an fd opened before, but it is no longer src. If the path
    /// leads elsewhere, or the root fails (a dead mount), the root is reopened there (a
    /// mount root only, as [`Layer::reopen`]). Two stats: for writeback replay, not for
    /// every view call.
    pub fn root_fd_checked(&self) -> io::Result<OwnedFd> {
        use std::os::unix::fs::MetadataExt;
        let current = self.root().and_then(|fd| {
            let here = fstat(fd.as_fd())?;
            let there = std::fs::metadata(&self.root_path)?;
            if (there.dev(), there.ino()) != (here.st_dev, here.st_ino) {
                return Err(io::Error::from_raw_os_error(libc::ESTALE));
            }
            fd.try_clone()
        });
        current.or_else(|_| {
            self.reopen()?;
            self.root_fd()
        })
    }

    /// Like [`Layer::open`], keeping fds of recently used directories (see the module
    /// docs). Only for a tree that changes through this layer alone (dst).
    pub fn open_caching_dirs(root: &Path) -> io::Result<Layer> {
        let mut l = Layer::open(root)?;
        l.dirs = Some(Mutex::new(DirFds {
            cap: dir_fd_cap(),
            ..DirFds::default()
        }));
        Ok(l)
    }

    /// The directory `rel` (`""`: the root), from the cache when it has it.
    fn dir(&self, rel: &Path) -> io::Result<Arc<OwnedFd>> {
        if rel.as_os_str().is_empty() {
            return self.root();
        }
        let Some(dirs) = &self.dirs else {
            return self.open_dir(rel).map(Arc::new);
        };
        let generation = {
            let mut d = dirs.lock().unwrap();
            if let Some((fd, at)) = d.map.get(rel) {
                if at.elapsed() < DIR_FD_TTL {
                    return Ok(Arc::clone(fd));
                }
                d.map.remove(rel);
            }
            if !d.absent.is_empty()
                && let Some(errno) = d.absent_at(rel)
            {
                return Err(io::Error::from_raw_os_error(errno));
            }
            d.generation
        };
        let fd = match self.open_dir(rel) {
            Ok(fd) => Arc::new(fd),
            Err(e) => {
                if is_not_found(&e) && !has_reserved_component(rel) {
                    let mut d = dirs.lock().unwrap();
                    if d.generation == generation {
                        if d.absent.len() >= DIR_FD_MAX {
                            d.absent.clear();
                        }
                        let errno = e.raw_os_error().unwrap_or(libc::ENOENT);
                        d.absent.insert(rel.to_path_buf(), (errno, Instant::now()));
                    }
                }
                return Err(e);
            }
        };
        let mut d = dirs.lock().unwrap();
        if d.generation == generation {
            if d.map.len() >= d.cap {
                d.map.clear();
            }
            d.map
                .insert(rel.to_path_buf(), (Arc::clone(&fd), Instant::now()));
        }
        Ok(fd)
    }

    /// Whether this layer knows (from the last [`DIR_FD_TTL`]) that it has no directory
    /// at `rel`: then nothing below `rel` exists either, and no syscall is needed to
    /// say so. Always `false` on a layer that does not cache (src).
    pub fn known_absent_dir(&self, rel: &Path) -> bool {
        self.dirs.as_ref().is_some_and(|dirs| {
            let mut d = dirs.lock().unwrap();
            !d.absent.is_empty() && d.absent_at(rel).is_some()
        })
    }

    /// After a change that can make a directory appear (mkdir, rename): every
    /// remembered absence may be wrong now.
    fn forget_absent(&self) {
        if let Some(dirs) = &self.dirs {
            let mut d = dirs.lock().unwrap();
            d.generation += 1;
            d.absent.clear();
        }
    }

    /// Drops the cached fds of `rel` and every directory below it (after a change that
    /// moved or removed them).
    fn forget_dirs(&self, rel: &Path) {
        if let Some(dirs) = &self.dirs {
            let mut d = dirs.lock().unwrap();
            d.generation += 1;
            if !d.map.is_empty() {
                d.map.retain(|k, _| !k.starts_with(rel));
            }
        }
    }

    /// The current root fd (held for the duration of one operation); ENOTCONN while
    /// there is none (src's mount is not there: see [`Layer::open_src`]).
    fn root(&self) -> io::Result<std::sync::Arc<OwnedFd>> {
        self.root
            .read()
            .unwrap()
            .clone()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOTCONN))
    }

    /// Opens the root path again, so that a filesystem mounted anew there is used.
    /// Fails with ENOTCONN when the root was a mount root and the path no longer is
    /// one (the mount is gone and left its empty mountpoint: that is not src).
    pub fn reopen(&self) -> io::Result<()> {
        let fresh = Layer::open(&self.root_path)?;
        let fd = fresh.root()?;
        fstat(fd.as_fd())?;
        if self.mount_root && !fresh.mount_root {
            return Err(io::Error::from_raw_os_error(libc::ENOTCONN));
        }
        *self.root.write().unwrap() = Some(fd);
        self.forget_dirs(Path::new(""));
        self.forget_absent();
        Ok(())
    }

    /// The root directory's path (for log messages only; never used to reach files).
    pub fn root_path(&self) -> &Path {
        &self.root_path
    }

    /// Opens the directory `rel` (an `O_PATH` fd) without following any symlink.
    pub fn open_dir(&self, rel: &Path) -> io::Result<OwnedFd> {
        self.open_beneath(rel, libc::O_PATH | libc::O_DIRECTORY)
    }

    /// Opens `rel` beneath the root with `flags`, following no symlink anywhere.
    pub fn open_beneath(&self, rel: &Path, flags: libc::c_int) -> io::Result<OwnedFd> {
        if rel.as_os_str().is_empty() {
            return openat(self.root()?.as_fd(), c".", flags, 0);
        }
        if !NO_OPENAT2.load(Ordering::Relaxed) {
            match sys::openat2_beneath(self.root()?.as_fd(), &cstr(rel.as_os_str())?, flags) {
                Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                    NO_OPENAT2.store(true, Ordering::Relaxed)
                }
                r => return r,
            }
        }
        // Fallback: one component at a time, O_NOFOLLOW each.
        let root = self.root()?;
        let mut dir: Option<OwnedFd> = None;
        let comps: Vec<_> = rel.components().collect();
        for (i, comp) in comps.iter().enumerate() {
            let Component::Normal(name) = comp else {
                return Err(io::Error::from_raw_os_error(libc::EXDEV));
            };
            let last = i + 1 == comps.len();
            let f = if last {
                flags
            } else {
                libc::O_PATH | libc::O_DIRECTORY
            };
            let base = dir.as_ref().map_or(root.as_fd(), |d| d.as_fd());
            dir = Some(openat(base, &cstr(name)?, f, 0)?);
        }
        dir.ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))
    }

    /// Runs `f` with the parent directory of `rel` and its final name.
    pub fn at<R>(
        &self,
        rel: &Path,
        f: impl FnOnce(BorrowedFd<'_>, &CStr) -> io::Result<R>,
    ) -> io::Result<R> {
        let Some((parent, name)) = split(rel) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        let name = cstr(name)?;
        let dir = self.dir(parent)?;
        f(dir.as_fd(), &name)
    }

    /// lstat of `rel`; `Ok(None)` when nothing is there.
    pub fn stat(&self, rel: &Path) -> io::Result<Option<Stat>> {
        Ok(match self.probe(rel)? {
            Probe::Found(st) => Some(st),
            Probe::NoName | Probe::NoParent => None,
        })
    }

    /// lstat of `rel`, telling "no such name" from "no directory to hold it" (a
    /// missing parent, or one that is not a directory): nothing below that parent
    /// exists either.
    pub fn probe(&self, rel: &Path) -> io::Result<Probe> {
        let Some((parent, name)) = split(rel) else {
            return fstat(self.root()?.as_fd()).map(Probe::Found);
        };
        let name = cstr(name)?;
        let r = match self.dir(parent) {
            Ok(dir) => statat(dir.as_fd(), &name),
            Err(e) if is_not_found(&e) => return Ok(Probe::NoParent),
            Err(e) => return Err(e),
        };
        match r {
            Ok(st) => Ok(Probe::Found(st)),
            Err(e) if is_not_found(&e) => Ok(Probe::NoName),
            Err(e) => Err(e),
        }
    }

    /// The directory `rel` (from the cache where this layer keeps one), or `None` when
    /// there is no directory there. For callers that ask many names of one directory.
    pub fn dir_if_present(&self, rel: &Path) -> io::Result<Option<Arc<OwnedFd>>> {
        match self.dir(rel) {
            Ok(fd) => Ok(Some(fd)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// lstat of each of `names` in directory `rel`: one path walk to the directory,
    /// then one `fstatat` per name (a name that is not there: `Ok(None)`). `Ok(None)`
    /// as a whole when there is no directory at `rel`; an outage error (src
    /// unreachable) on any name fails the whole call. `progress` counts the names
    /// done, so that a caller can tell a slow src from a hung one.
    #[allow(clippy::type_complexity)]
    pub fn stat_names(
        &self,
        rel: &Path,
        names: &[OsString],
        progress: &std::sync::atomic::AtomicU64,
    ) -> io::Result<Option<Vec<io::Result<Option<Stat>>>>> {
        let Some(dir) = self.dir_if_present(rel)? else {
            return Ok(None);
        };
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let r = match statat(dir.as_fd(), &cstr(name)?) {
                Ok(st) => Ok(Some(st)),
                Err(e) if is_not_found(&e) => Ok(None),
                // src is unreachable, not saying no about this name: the whole call
                // fails, as a call about this name alone would (metrics, offline).
                Err(e) if super::is_outage(&e) => return Err(e),
                Err(e) => Err(e),
            };
            out.push(r);
            progress.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Some(out))
    }

    /// The identity of `rel` (see [`Ident`]); `None` if absent.
    pub fn identity(&self, rel: &Path) -> io::Result<Option<Ident>> {
        match self.at(rel, identity_at) {
            Ok(id) => Ok(Some(id)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Opens the file `rel` with open(2) flags (never following a symlink).
    pub fn open_file(&self, rel: &Path, flags: libc::c_int) -> io::Result<File> {
        if rel.as_os_str().is_empty() {
            return Ok(File::from(self.open_beneath(rel, flags)?));
        }
        // The parent beneath the root, then the name with O_NOFOLLOW.
        self.at(rel, |d, n| openat(d, n, flags, 0).map(File::from))
    }

    /// Creates and opens a regular file (O_CREAT|O_EXCL).
    pub fn create_file(
        &self,
        rel: &Path,
        flags: libc::c_int,
        mode: libc::mode_t,
    ) -> io::Result<File> {
        self.at(rel, |d, n| {
            openat(d, n, flags | libc::O_CREAT | libc::O_EXCL, mode).map(File::from)
        })
    }

    pub fn mkdir(&self, rel: &Path, mode: libc::mode_t) -> io::Result<()> {
        let r = self.at(rel, |d, n| sys::mkdirat(d, n, mode));
        // After the call (see the module docs): `rel` may be a directory now.
        self.forget_absent();
        r
    }

    pub fn mknod(&self, rel: &Path, mode: libc::mode_t, rdev: libc::dev_t) -> io::Result<()> {
        self.at(rel, |d, n| sys::mknodat(d, n, mode, rdev))
    }

    pub fn symlink(&self, target: &OsStr, rel: &Path) -> io::Result<()> {
        let t = cstr(target)?;
        self.at(rel, |d, n| sys::symlinkat(&t, d, n))
    }

    pub fn readlink(&self, rel: &Path) -> io::Result<OsString> {
        self.at(rel, sys::readlinkat)
    }

    pub fn unlink(&self, rel: &Path) -> io::Result<()> {
        self.at(rel, |d, n| sys::unlinkat(d, n, 0))
    }

    pub fn rmdir(&self, rel: &Path) -> io::Result<()> {
        let r = self.at(rel, |d, n| sys::unlinkat(d, n, libc::AT_REMOVEDIR));
        self.forget_dirs(rel);
        r
    }

    /// renameat2 within this layer; `flags` are RENAME_NOREPLACE / RENAME_EXCHANGE.
    pub fn rename(&self, from: &Path, to: &Path, flags: u32) -> io::Result<()> {
        let r = self.rename_uncached(from, to, flags);
        // After the call (see `DirFds::generation`): both names may have been dirs,
        // and `to` may be one now.
        self.forget_dirs(from);
        self.forget_dirs(to);
        self.forget_absent();
        r
    }

    fn rename_uncached(&self, from: &Path, to: &Path, flags: u32) -> io::Result<()> {
        self.at(from, |fd, fname| {
            self.at(to, |td, tname| sys::renameat2(fd, fname, td, tname, flags))
        })
    }

    /// Hard link `existing` as `new` (no symlink following).
    pub fn link(&self, existing: &Path, new: &Path) -> io::Result<()> {
        self.at(existing, |ed, ename| {
            self.at(new, |nd, nname| sys::linkat(ed, ename, nd, nname))
        })
    }

    /// lchown; `u32::MAX` leaves an id unchanged.
    pub fn chown(&self, rel: &Path, uid: u32, gid: u32) -> io::Result<()> {
        self.at_or_root(rel, |d, n, flags| sys::fchownat(d, n, uid, gid, flags))
    }

    /// chmod of a non-symlink (the caller checked the type; Linux cannot chmod symlinks).
    pub fn chmod(&self, rel: &Path, mode: libc::mode_t) -> io::Result<()> {
        let fd = self.open_beneath(rel, libc::O_PATH)?;
        sys::chmod_fd(fd.as_fd(), mode)
    }

    /// utimensat with AT_SYMLINK_NOFOLLOW.
    pub fn set_times(
        &self,
        rel: &Path,
        atime: Option<SetTime>,
        mtime: Option<SetTime>,
    ) -> io::Result<()> {
        let ts = [SetTime::timespec(atime), SetTime::timespec(mtime)];
        self.at_or_root(rel, |d, n, flags| sys::utimensat(d, n, &ts, flags))
    }

    /// Like [`Layer::at`] but the root itself is addressed as (root, "", AT_EMPTY_PATH).
    fn at_or_root<R>(
        &self,
        rel: &Path,
        f: impl FnOnce(BorrowedFd<'_>, &CStr, libc::c_int) -> io::Result<R>,
    ) -> io::Result<R> {
        if rel.as_os_str().is_empty() {
            f(self.root()?.as_fd(), c"", libc::AT_EMPTY_PATH)
        } else {
            self.at(rel, |d, n| f(d, n, 0))
        }
    }

    /// Lists a directory (without "." and "..").
    pub fn read_dir(&self, rel: &Path) -> io::Result<Vec<DirEntry>> {
        let fd = self.open_beneath(rel, libc::O_RDONLY | libc::O_DIRECTORY)?;
        read_dir_fd(fd)
    }

    /// getxattr; `None` value buffer asks for the size.
    pub fn getxattr(&self, rel: &Path, name: &OsStr) -> io::Result<Vec<u8>> {
        if !NO_GETXATTRAT.load(Ordering::Relaxed) {
            let r = match split(rel) {
                // The root as "." beneath itself, never as `AT_EMPTY_PATH` on the root's
                // `O_PATH` fd: getxattrat refuses that with EBADF (Linux 6.18).
                None => getxattrat(self.root()?.as_fd(), c".", 0, name),
                Some(_) => self.at(rel, |d, n| {
                    getxattrat(d, n, libc::AT_SYMLINK_NOFOLLOW, name)
                }),
            };
            match r {
                Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                    NO_GETXATTRAT.store(true, Ordering::Relaxed)
                }
                r => return r,
            }
        }
        let fd = self.open_beneath(rel, libc::O_PATH)?;
        getxattr_fd(fd.as_fd(), name)
    }

    /// getxattr of `xattr` on each of `names` in directory `rel`: one path walk, then
    /// one getxattrat(2) per name (`Ok(None)`: no directory at `rel`). ENOSYS as a
    /// whole where the kernel lacks getxattrat (the caller asks name by name).
    #[allow(clippy::type_complexity)]
    pub fn getxattr_names(
        &self,
        rel: &Path,
        names: &[OsString],
        xattr: &OsStr,
        progress: &std::sync::atomic::AtomicU64,
    ) -> io::Result<Option<Vec<io::Result<Vec<u8>>>>> {
        if NO_GETXATTRAT.load(Ordering::Relaxed) {
            return Err(io::Error::from_raw_os_error(libc::ENOSYS));
        }
        let Some(dir) = self.dir_if_present(rel)? else {
            return Ok(None);
        };
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let r = getxattrat(dir.as_fd(), &cstr(name)?, libc::AT_SYMLINK_NOFOLLOW, xattr);
            if matches!(&r, Err(e) if e.raw_os_error() == Some(libc::ENOSYS)) {
                NO_GETXATTRAT.store(true, Ordering::Relaxed);
                return Err(io::Error::from_raw_os_error(libc::ENOSYS));
            }
            // An outage fails the whole call (see `stat_names`).
            if let Err(e) = &r
                && super::is_outage(e)
            {
                return Err(r.unwrap_err());
            }
            out.push(r);
            progress.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Some(out))
    }

    pub fn listxattr(&self, rel: &Path) -> io::Result<Vec<u8>> {
        let fd = self.open_beneath(rel, libc::O_PATH)?;
        listxattr_fd(fd.as_fd())
    }

    pub fn setxattr(&self, rel: &Path, name: &OsStr, value: &[u8], flags: i32) -> io::Result<()> {
        let fd = self.open_beneath(rel, libc::O_PATH)?;
        sys::setxattr_fd(fd.as_fd(), name, value, flags)
    }

    pub fn removexattr(&self, rel: &Path, name: &OsStr) -> io::Result<()> {
        let fd = self.open_beneath(rel, libc::O_PATH)?;
        sys::removexattr_fd(fd.as_fd(), name)
    }

    /// statvfs of the filesystem holding the root.
    pub fn statvfs(&self) -> io::Result<libc::statvfs> {
        let fd = self.open_beneath(Path::new(""), libc::O_RDONLY | libc::O_DIRECTORY)?;
        sys::fstatvfs(fd.as_fd())
    }
}

/// Whether getxattrat(2) (Linux 6.13+) is known to be missing: then xattrs are read
/// through `/proc/self/fd` paths.
static NO_GETXATTRAT: AtomicBool = AtomicBool::new(false);

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn stat_and_create_stay_beneath_root() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"s").unwrap();
        let root = tempfile::tempdir().unwrap();
        symlink(outside.path(), root.path().join("link")).unwrap();
        std::fs::create_dir(root.path().join("d")).unwrap();
        std::fs::write(root.path().join("d/f"), b"x").unwrap();
        let layer = Layer::open(root.path()).unwrap();

        assert!(layer.stat(Path::new("d/f")).unwrap().is_some());
        assert!(layer.stat(Path::new("d/none")).unwrap().is_none());
        // The symlink itself is visible, but never traversed.
        let st = layer.stat(Path::new("link")).unwrap().unwrap();
        assert_eq!(st.st_mode & libc::S_IFMT, libc::S_IFLNK);
        assert!(!matches!(layer.stat(Path::new("link/secret")), Ok(Some(_))));
        assert!(
            layer
                .open_file(Path::new("link/secret"), libc::O_RDONLY)
                .is_err()
        );
        assert!(layer.open_file(Path::new("link"), libc::O_RDONLY).is_err());
        assert!(
            layer
                .create_file(Path::new("link/new"), libc::O_WRONLY, 0o644)
                .is_err()
        );
        assert!(!outside.path().join("new").exists());
        assert!(layer.stat(Path::new("../x")).is_err());
    }

    #[test]
    fn absent_dirs_are_remembered_until_mkdir_or_rename() {
        let root = tempfile::tempdir().unwrap();
        let layer = Layer::open_caching_dirs(root.path()).unwrap();
        assert!(layer.dir_if_present(Path::new("x/y")).unwrap().is_none());
        assert!(layer.known_absent_dir(Path::new("x/y")));
        assert!(layer.known_absent_dir(Path::new("x/y/z")), "covers below");
        assert!(!layer.known_absent_dir(Path::new("x")), "not asked");
        // Made behind the layer's back: the absence is still believed (within the TTL),
        // which proves no path walk is made for it.
        std::fs::create_dir_all(root.path().join("x/y")).unwrap();
        assert!(layer.dir_if_present(Path::new("x/y")).unwrap().is_none());
        assert!(matches!(
            layer.probe(Path::new("x/y/f")),
            Ok(Probe::NoParent)
        ));
        // Any mkdir through the layer forgets every absence.
        layer.mkdir(Path::new("other"), 0o755).unwrap();
        assert!(!layer.known_absent_dir(Path::new("x/y")));
        assert!(layer.dir_if_present(Path::new("x/y")).unwrap().is_some());

        // A rename can make a directory appear too.
        assert!(layer.dir_if_present(Path::new("moved")).unwrap().is_none());
        layer
            .rename(Path::new("other"), Path::new("moved"), 0)
            .unwrap();
        assert!(layer.dir_if_present(Path::new("moved")).unwrap().is_some());

        // mkdir of the very directory (copy-up of a directory dst lacked).
        assert!(layer.dir_if_present(Path::new("n")).unwrap().is_none());
        layer.mkdir(Path::new("n"), 0o755).unwrap();
        assert!(matches!(layer.probe(Path::new("n/f")), Ok(Probe::NoName)));
    }

    #[test]
    fn absences_are_not_kept_for_reserved_paths_or_without_caching() {
        let root = tempfile::tempdir().unwrap();
        let layer = Layer::open_caching_dirs(root.path()).unwrap();
        assert!(
            layer
                .dir_if_present(Path::new(".cachefs-state/x"))
                .unwrap()
                .is_none()
        );
        assert!(!layer.known_absent_dir(Path::new(".cachefs-state/x")));
        let plain = Layer::open(root.path()).unwrap();
        assert!(plain.dir_if_present(Path::new("q")).unwrap().is_none());
        std::fs::create_dir(root.path().join("q")).unwrap();
        assert!(
            plain.dir_if_present(Path::new("q")).unwrap().is_some(),
            "src never caches"
        );
    }

    #[test]
    fn the_dir_fd_cache_stays_within_the_descriptor_limit() {
        let cap = dir_fd_cap();
        assert!((DIR_FD_MIN..=DIR_FD_MAX).contains(&cap));
        let root = tempfile::tempdir().unwrap();
        for i in 0..cap + 20 {
            std::fs::create_dir_all(root.path().join(format!("d{i}"))).unwrap();
        }
        let layer = Layer::open_caching_dirs(root.path()).unwrap();
        for i in 0..cap + 20 {
            assert!(layer.stat(Path::new(&format!("d{i}/x"))).unwrap().is_none());
        }
        let held = layer.dirs.as_ref().unwrap().lock().unwrap().map.len();
        assert!(held <= cap, "{held} cached fds, cap {cap}");
    }

    #[test]
    fn rename_link_and_list() {
        let root = tempfile::tempdir().unwrap();
        let layer = Layer::open(root.path()).unwrap();
        layer.mkdir(Path::new("a"), 0o755).unwrap();
        drop(
            layer
                .create_file(Path::new("a/f"), libc::O_WRONLY, 0o600)
                .unwrap(),
        );
        layer.link(Path::new("a/f"), Path::new("g")).unwrap();
        layer.rename(Path::new("a"), Path::new("b"), 0).unwrap();
        let mut names: Vec<_> = layer
            .read_dir(Path::new(""))
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        names.sort();
        assert_eq!(names, ["b", "g"]);
        assert_eq!(layer.stat(Path::new("g")).unwrap().unwrap().st_nlink, 2);
    }
}
