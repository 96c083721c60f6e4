//! Copying one entry from src into dst ("copy-up").
//!
//! Invariants:
//! - An entry appears in dst only complete: it is built under a temp name in the
//!   staging folder `dst/.cachefs-state/tmp/` (data fsynced, then mode, owner, times,
//!   user xattrs and POSIX ACLs set) and installed with one rename (RENAME_NOREPLACE, or replacing
//!   for a refetch). A failure removes the temp entry and leaves nothing.
//! - Directories too: concurrent copy-ups below one uncached directory never see it
//!   half made (without owner, mode or times).
//! - Mode (including setuid bits), owner, atime/mtime, user xattrs, POSIX ACLs and
//!   symlink targets are preserved. Only the install touches the parent directory, and it restores the
//!   parent's times inside one process-wide critical section ([`PARENT_TIMES`]), so a
//!   read miss never looks like a modification of the directory, even when several
//!   copy-ups land in one directory at once.
//! - Single flight of a file is the caller's job (`CacheFs` serialises copy-ups per path).

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::layer::{self, Layer, SetTime, Stat};
use super::names::{STATE_DIR, TEMP_PREFIX};
use super::origin::{self, Origin};

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Serialises "snapshot the parent's times, add an entry, restore them" in dst.
static PARENT_TIMES: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The staging folder (in dst) where entries are built before they are installed.
pub(crate) fn staging_dir() -> PathBuf {
    Path::new(STATE_DIR).join("tmp")
}

/// Creates the staging folder and empties it (leftovers of a crash).
pub(crate) fn prepare_staging(dst: &Layer) -> io::Result<()> {
    for dir in [PathBuf::from(STATE_DIR), staging_dir()] {
        match dst.mkdir(&dir, 0o700) {
            Err(e) if e.raw_os_error() != Some(libc::EEXIST) => return Err(e),
            _ => {}
        }
    }
    for e in dst.read_dir(&staging_dir())? {
        let p = staging_dir().join(&e.name);
        if dst.unlink(&p).is_err() {
            let _ = remove_tree(dst, &p);
        }
    }
    Ok(())
}

fn remove_tree(dst: &Layer, path: &Path) -> io::Result<()> {
    for e in dst.read_dir(path)? {
        let p = path.join(&e.name);
        if e.kind == libc::S_IFDIR {
            remove_tree(dst, &p)?;
        } else {
            dst.unlink(&p)?;
        }
    }
    dst.rmdir(path)
}

/// A unique reserved temp name for building `path`: in the staging folder, or next to
/// `path` when its directory is another filesystem (something mounted inside dst),
/// where a rename from the staging folder would fail with EXDEV.
pub(crate) fn temp_path(dst: &Layer, path: &Path) -> PathBuf {
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = format!("{TEMP_PREFIX}{}.{n}", std::process::id());
    let parent = path.parent().unwrap_or(Path::new(""));
    let dev = |p: &Path| dst.stat(p).ok().flatten().map(|st| st.st_dev);
    match (dev(parent), dev(&staging_dir())) {
        (Some(a), Some(b)) if a != b => parent.join(name),
        _ => staging_dir().join(name),
    }
}

/// Installs the staged entry `tmp` as `path`, keeping the parent directory's times.
fn install(dst: &Layer, tmp: &Path, path: &Path, replace: bool) -> io::Result<()> {
    let flags = if replace { 0 } else { libc::RENAME_NOREPLACE };
    keeping_parent_times(dst, path, || dst.rename(tmp, path, flags))
}

/// Removes the temp entry unless disarmed (on every error path).
struct TempGuard<'a> {
    layer: &'a Layer,
    path: PathBuf,
    armed: bool,
    dir: bool,
}

impl Drop for TempGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = if self.dir {
                self.layer.rmdir(&self.path)
            } else {
                self.layer.unlink(&self.path)
            };
        }
    }
}

pub(crate) fn times_of(st: &Stat) -> (SetTime, SetTime) {
    (
        SetTime::At(libc::timespec {
            tv_sec: st.st_atime,
            tv_nsec: st.st_atime_nsec,
        }),
        SetTime::At(libc::timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec,
        }),
    )
}

fn ignore_eperm(r: io::Result<()>) -> io::Result<()> {
    match r {
        // Not root (e.g. a user mount via fusermount3): files stay the daemon user's.
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Ok(()),
        r => r,
    }
}

fn fchown(f: &File, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: valid fd.
    if unsafe { libc::fchown(f.as_raw_fd(), uid, gid) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn fchmod(f: &File, mode: u32) -> io::Result<()> {
    // SAFETY: valid fd.
    if unsafe { libc::fchmod(f.as_raw_fd(), mode) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn futimens(f: &File, st: &Stat) -> io::Result<()> {
    crate::sys::futimens(f.as_fd(), &crate::sys::stat_times(st))
}

/// Copies `user.*` xattrs and POSIX ACLs from `from` to `to` (other namespaces are the
/// system's; the ACLs, so that a copy grants and inherits what src's entry does). An ACL src lacks is removed from `to` (a temp entry may have inherited
/// its directory's default ACL); where dst holds no ACLs, they are not copied.
fn copy_user_xattrs(from: &File, to: &File) -> io::Result<()> {
    let names = match layer::listxattr_fd(from.as_fd()) {
        Ok(n) => n,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTSUP)) => return Ok(()),
        Err(e) => return Err(e),
    };
    use crate::sys::{ACLS, is_acl};
    for name in names
        .split(|b| *b == 0)
        .filter(|n| n.starts_with(b"user.") || is_acl(n))
    {
        let acl = is_acl(name);
        let name = OsStr::from_bytes(name);
        if origin::is_reserved_xattr(name) {
            continue;
        }
        let value = layer::getxattr_fd(from.as_fd(), name)?;
        match crate::sys::fsetxattr(to.as_fd(), name, &value) {
            Err(e) if acl && e.raw_os_error() == Some(libc::ENOTSUP) => {}
            r => r?,
        }
    }
    for acl in ACLS.map(str::as_bytes) {
        if names.split(|b| *b == 0).any(|n| n == acl) {
            continue;
        }
        match crate::sys::removexattr_fd(to.as_fd(), OsStr::from_bytes(acl)) {
            Err(e) if !matches!(e.raw_os_error(), Some(libc::ENODATA) | Some(libc::ENOTSUP)) => {
                return Err(e);
            }
            _ => {}
        }
    }
    Ok(())
}

/// Runs `f` (which adds an entry to `path`'s directory in dst) and then restores that
/// directory's times, so that a copy-up is invisible in the parent's mtime.
pub(crate) fn keeping_parent_times<R>(
    dst: &Layer,
    path: &Path,
    f: impl FnOnce() -> io::Result<R>,
) -> io::Result<R> {
    let _serial = PARENT_TIMES.lock().unwrap_or_else(|p| p.into_inner());
    let parent = path.parent().unwrap_or(Path::new(""));
    let before = dst.stat(parent)?;
    let r = f()?;
    if let Some(st) = before {
        let (a, m) = times_of(&st);
        dst.set_times(parent, Some(a), Some(m))?;
    }
    Ok(r)
}

/// How a regular file is copied.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CopyOpts {
    /// Copy at most this many bytes (a copy-up for a truncate needs no more).
    pub(crate) limit: Option<u64>,
    /// Replace dst's existing copy (a refetch) instead of refusing to.
    pub(crate) replace: bool,
}

/// Copies the src entry at `path` (described by `st`) into dst; `progress` counts the
/// bytes copied so far.
pub(crate) fn copy_entry(
    src: &Layer,
    dst: &Layer,
    path: &Path,
    st: &Stat,
    opts: CopyOpts,
    progress: Option<&AtomicU64>,
) -> io::Result<()> {
    match st.st_mode & libc::S_IFMT {
        libc::S_IFDIR => copy_dir(src, dst, path, st),
        libc::S_IFREG => copy_file(src, dst, path, st, opts, progress),
        libc::S_IFLNK => copy_symlink(src, dst, path, st),
        _ => copy_special(dst, path, st),
    }
}

/// An (empty) directory with src's mode, owner, times and user xattrs. Another
/// thread installing it first is fine: it installed a complete one.
fn copy_dir(src: &Layer, dst: &Layer, path: &Path, st: &Stat) -> io::Result<()> {
    let tmp = temp_path(dst, path);
    dst.mkdir(&tmp, st.st_mode & 0o7777)?;
    let mut guard = TempGuard {
        layer: dst,
        path: tmp.clone(),
        armed: true,
        dir: true,
    };
    let from = src.open_file(path, libc::O_RDONLY | libc::O_DIRECTORY)?;
    let to = dst.open_file(&tmp, libc::O_RDONLY | libc::O_DIRECTORY)?;
    copy_user_xattrs(&from, &to)?;
    ignore_eperm(dst.chown(&tmp, st.st_uid, st.st_gid))?;
    dst.chmod(&tmp, st.st_mode & 0o7777)?;
    let (a, m) = times_of(st);
    dst.set_times(&tmp, Some(a), Some(m))?;
    match install(dst, &tmp, path, false) {
        Ok(()) => {
            guard.armed = false;
            Ok(())
        }
        Err(e) if matches!(e.raw_os_error(), Some(libc::EEXIST) | Some(libc::ENOTEMPTY)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Counts bytes read into a shared progress counter.
struct Counting<'a, R> {
    inner: R,
    progress: Option<&'a AtomicU64>,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(p) = self.progress {
            p.fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok(n)
    }
}

fn copy_file(
    src: &Layer,
    dst: &Layer,
    path: &Path,
    st: &Stat,
    opts: CopyOpts,
    progress: Option<&AtomicU64>,
) -> io::Result<()> {
    // O_NOATIME where allowed: a copy-up is not an access of the src file by anyone.
    let from = match src.open_file(path, libc::O_RDONLY | libc::O_NOATIME) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => src.open_file(path, libc::O_RDONLY)?,
        r => r?,
    };
    let tmp = temp_path(dst, path);
    let mut to = dst.create_file(&tmp, libc::O_WRONLY, 0o600)?;
    let mut guard = TempGuard {
        layer: dst,
        path: tmp.clone(),
        armed: true,
        dir: false,
    };
    // 1 MiB reads: few round trips to a remote src, and progress for the watchdog.
    let counting = Counting {
        inner: (&from).take(opts.limit.unwrap_or(u64::MAX)),
        progress,
    };
    io::copy(
        &mut io::BufReader::with_capacity(1 << 20, counting),
        &mut to,
    )?;
    copy_user_xattrs(&from, &to)?;
    ignore_eperm(fchown(&to, st.st_uid, st.st_gid))?;
    fchmod(&to, st.st_mode & 0o7777)?;
    futimens(&to, st)?;
    to.sync_all()?;
    install(dst, &tmp, path, opts.replace)?;
    guard.armed = false;
    // Once installed (never before: a record must not outlive a failed copy). Without
    // it the copy is merely local, so a store that cannot record does not fail the copy.
    let mut record = Origin::of(st);
    // A partial copy (for a truncate) is already a local change.
    record.dirty = opts.limit.is_some();
    if let Err(e) = origin::Store::of(dst).and_then(|s| s.put_fd(path, &to, record)) {
        log::warn!("{}: cannot record its origin: {e}", path.display());
    }
    Ok(())
}

/// Installs a lazily fetched file: `staged` (in dst, every byte of `[0, limit or its
/// size)` present) gets src's attributes (`st`, user xattrs from src's open file
/// `from`), cut to `limit` if given, and is renamed to `path` like a whole copy.
pub(crate) fn install_staged(
    dst: &Layer,
    from: &File,
    staged: &Path,
    path: &Path,
    st: &Stat,
    limit: Option<u64>,
) -> io::Result<()> {
    let to = dst.open_file(staged, libc::O_RDWR)?;
    if let Some(n) = limit
        && n < to.metadata()?.len()
    {
        to.set_len(n)?;
    }
    copy_user_xattrs(from, &to)?;
    ignore_eperm(fchown(&to, st.st_uid, st.st_gid))?;
    fchmod(&to, st.st_mode & 0o7777)?;
    futimens(&to, st)?;
    to.sync_all()?;
    install(dst, staged, path, false)?;
    let mut record = Origin::of(st);
    record.dirty = limit.is_some();
    if let Err(e) = origin::Store::of(dst).and_then(|s| s.put_fd(path, &to, record)) {
        log::warn!("{}: cannot record its origin: {e}", path.display());
    }
    Ok(())
}

fn copy_symlink(src: &Layer, dst: &Layer, path: &Path, st: &Stat) -> io::Result<()> {
    let target = src.readlink(path)?;
    let tmp = temp_path(dst, path);
    dst.symlink(&target, &tmp)?;
    let mut guard = TempGuard {
        layer: dst,
        path: tmp.clone(),
        armed: true,
        dir: false,
    };
    ignore_eperm(dst.chown(&tmp, st.st_uid, st.st_gid))?;
    let (a, m) = times_of(st);
    dst.set_times(&tmp, Some(a), Some(m))?;
    install(dst, &tmp, path, false)?;
    guard.armed = false;
    Ok(())
}

fn copy_special(dst: &Layer, path: &Path, st: &Stat) -> io::Result<()> {
    let tmp = temp_path(dst, path);
    dst.mknod(&tmp, st.st_mode, st.st_rdev)?;
    let mut guard = TempGuard {
        layer: dst,
        path: tmp.clone(),
        armed: true,
        dir: false,
    };
    ignore_eperm(dst.chown(&tmp, st.st_uid, st.st_gid))?;
    dst.chmod(&tmp, st.st_mode & 0o7777)?;
    let (a, m) = times_of(st);
    dst.set_times(&tmp, Some(a), Some(m))?;
    install(dst, &tmp, path, false)?;
    guard.armed = false;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};

    #[test]
    fn copies_file_with_attributes_and_leaves_no_temp() {
        let s = tempfile::tempdir().unwrap();
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(s.path().join("dir")).unwrap();
        std::fs::create_dir(d.path().join("dir")).unwrap();
        let f = s.path().join("dir/f");
        std::fs::write(&f, b"hello world").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o4751)).unwrap();
        let _ = xattr_set(&f, "user.k", b"v");
        symlink("target/elsewhere", s.path().join("dir/l")).unwrap();
        let (src, dst) = (
            Layer::open(s.path()).unwrap(),
            Layer::open(d.path()).unwrap(),
        );
        prepare_staging(&dst).unwrap();

        for name in ["dir/f", "dir/l"] {
            let st = src.stat(Path::new(name)).unwrap().unwrap();
            copy_entry(&src, &dst, Path::new(name), &st, CopyOpts::default(), None).unwrap();
        }
        let got = d.path().join("dir/f");
        assert_eq!(std::fs::read(&got).unwrap(), b"hello world");
        let (sm, dm) = (f.metadata().unwrap(), got.metadata().unwrap());
        assert_eq!(dm.mode(), sm.mode());
        assert_eq!(dm.mtime(), sm.mtime());
        assert_eq!(dm.mtime_nsec(), sm.mtime_nsec());
        assert_eq!(
            std::fs::read_link(d.path().join("dir/l")).unwrap(),
            Path::new("target/elsewhere")
        );
        let names: Vec<_> = std::fs::read_dir(d.path().join("dir"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "no temp file left: {names:?}");
    }

    #[test]
    fn failed_copy_leaves_nothing() {
        let s = tempfile::tempdir().unwrap();
        let d = tempfile::tempdir().unwrap();
        std::fs::write(s.path().join("f"), b"x").unwrap();
        std::fs::write(d.path().join("f"), b"already").unwrap();
        let (src, dst) = (
            Layer::open(s.path()).unwrap(),
            Layer::open(d.path()).unwrap(),
        );
        prepare_staging(&dst).unwrap();
        let st = src.stat(Path::new("f")).unwrap().unwrap();
        assert!(copy_entry(&src, &dst, Path::new("f"), &st, CopyOpts::default(), None).is_err());
        assert_eq!(std::fs::read(d.path().join("f")).unwrap(), b"already");
        // Nothing left: the staging folder is empty again.
        assert_eq!(
            std::fs::read_dir(d.path().join(STATE_DIR).join("tmp"))
                .unwrap()
                .count(),
            0
        );
    }

    /// A POSIX ACL in the kernel's xattr format: (tag, perm, id) entries, sorted.
    fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut v = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in entries {
            v.extend_from_slice(&tag.to_le_bytes());
            v.extend_from_slice(&perm.to_le_bytes());
            v.extend_from_slice(&id.to_le_bytes());
        }
        v
    }

    fn xattr_get(p: &Path, name: &str) -> io::Result<Vec<u8>> {
        let l = Layer::open(p.parent().unwrap()).unwrap();
        l.getxattr(Path::new(p.file_name().unwrap()), OsStr::new(name))
    }

    /// src's access ACL (a named user) and a directory's default ACL reach dst's copy;
    /// an ACL the staging folder would pass on to a copy without one does not.
    #[test]
    fn copies_posix_acls_and_drops_inherited_ones() {
        let s = tempfile::tempdir().unwrap();
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(s.path().join("dir")).unwrap();
        std::fs::write(s.path().join("f"), b"acl").unwrap();
        std::fs::write(s.path().join("plain"), b"none").unwrap();
        let access = acl(&[
            (0x01, 6, u32::MAX),
            (0x02, 4, 4242),
            (0x04, 4, u32::MAX),
            (0x10, 4, u32::MAX),
            (0x20, 0, u32::MAX),
        ]);
        let default = acl(&[
            (0x01, 7, u32::MAX),
            (0x02, 7, 4242),
            (0x04, 5, u32::MAX),
            (0x10, 7, u32::MAX),
            (0x20, 0, u32::MAX),
        ]);
        match xattr_set(&s.path().join("f"), "system.posix_acl_access", &access) {
            Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => {
                eprintln!("skipping: no POSIX ACLs on the test file system");
                return;
            }
            r => r.unwrap(),
        }
        xattr_set(&s.path().join("dir"), "system.posix_acl_default", &default).unwrap();
        let (src, dst) = (
            Layer::open(s.path()).unwrap(),
            Layer::open(d.path()).unwrap(),
        );
        prepare_staging(&dst).unwrap();
        // As if dst's staging folder had inherited a default ACL.
        xattr_set(
            &d.path().join(staging_dir()),
            "system.posix_acl_default",
            &default,
        )
        .unwrap();
        for name in ["f", "dir", "plain"] {
            let st = src.stat(Path::new(name)).unwrap().unwrap();
            copy_entry(&src, &dst, Path::new(name), &st, CopyOpts::default(), None).unwrap();
        }
        let got = |n: &str, a: &str| xattr_get(&d.path().join(n), a).map_err(|e| e.raw_os_error());
        assert_eq!(got("f", "system.posix_acl_access"), Ok(access));
        assert_eq!(got("dir", "system.posix_acl_default"), Ok(default));
        assert_eq!(
            got("dir", "system.posix_acl_access"),
            Err(Some(libc::ENODATA))
        );
        assert_eq!(
            got("plain", "system.posix_acl_access"),
            Err(Some(libc::ENODATA))
        );
        let mode = |n: &str| std::fs::metadata(n).unwrap().mode() & 0o7777;
        for n in ["f", "dir", "plain"] {
            let (a, b) = (s.path().join(n), d.path().join(n));
            assert_eq!(mode(b.to_str().unwrap()), mode(a.to_str().unwrap()), "{n}");
        }
    }

    fn xattr_set(p: &Path, name: &str, v: &[u8]) -> io::Result<()> {
        let l = Layer::open(p.parent().unwrap()).unwrap();
        l.setxattr(Path::new(p.file_name().unwrap()), OsStr::new(name), v, 0)
    }
}
