//! Copying one entry from src into dst ("copy-up").
//!
//! Invariants:
//! - A copied file appears in dst only complete: data goes to a temp file
//!   (`.cachefs-tmp.*`, reserved) in the target directory, which is fsynced and renamed
//!   into place with RENAME_NOREPLACE. A failure removes the temp file and leaves nothing.
//! - Mode (including setuid bits), owner, atime/mtime, user xattrs and symlink targets are
//!   preserved. The parent directory's times in dst are restored afterwards, so a read
//!   miss never looks like a modification of the directory.
//! - Single flight is the caller's job (`CacheFs` serialises copy-ups per path).

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::layer::{self, Layer, SetTime, Stat};
use super::names::TEMP_PREFIX;

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A unique reserved temp name next to `path`.
pub fn temp_path_near(path: &Path) -> PathBuf {
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = format!("{TEMP_PREFIX}{}.{n}", std::process::id());
    path.parent().unwrap_or(Path::new("")).join(name)
}

/// Removes the temp entry unless disarmed (on every error path).
struct TempGuard<'a> {
    layer: &'a Layer,
    path: PathBuf,
    armed: bool,
}

impl Drop for TempGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.layer.unlink(&self.path);
        }
    }
}

pub fn times_of(st: &Stat) -> (SetTime, SetTime) {
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
    let ts = [
        libc::timespec {
            tv_sec: st.st_atime,
            tv_nsec: st.st_atime_nsec,
        },
        libc::timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec,
        },
    ];
    // SAFETY: valid fd and a 2-element array.
    if unsafe { libc::futimens(f.as_raw_fd(), ts.as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Copies `user.*` xattrs from `from` to `to` (other namespaces are the system's).
fn copy_user_xattrs(from: &File, to: &File) -> io::Result<()> {
    let names = match layer::listxattr_fd(from.as_fd()) {
        Ok(n) => n,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTSUP)) => return Ok(()),
        Err(e) => return Err(e),
    };
    for name in names.split(|b| *b == 0).filter(|n| n.starts_with(b"user.")) {
        let name = OsStr::from_bytes(name);
        let value = layer::getxattr_fd(from.as_fd(), name)?;
        let c = layer::cstr(name)?;
        // SAFETY: valid fd, name and value.
        let r = unsafe {
            libc::fsetxattr(
                to.as_raw_fd(),
                c.as_ptr(),
                value.as_ptr() as *const libc::c_void,
                value.len(),
                0,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Runs `f` (which adds an entry to `path`'s directory in dst) and then restores that
/// directory's times, so that a copy-up is invisible in the parent's mtime.
pub fn keeping_parent_times<R>(
    dst: &Layer,
    path: &Path,
    f: impl FnOnce() -> io::Result<R>,
) -> io::Result<R> {
    let parent = path.parent().unwrap_or(Path::new(""));
    let before = dst.stat(parent)?;
    let r = f()?;
    if let Some(st) = before {
        let (a, m) = times_of(&st);
        dst.set_times(parent, Some(a), Some(m))?;
    }
    Ok(r)
}

/// Copies the src entry at `path` (described by `st`) into dst. For regular files at
/// most `limit` bytes are copied (a copy-up for a truncate needs no more).
pub fn copy_entry(
    src: &Layer,
    dst: &Layer,
    path: &Path,
    st: &Stat,
    limit: Option<u64>,
) -> io::Result<()> {
    keeping_parent_times(dst, path, || match st.st_mode & libc::S_IFMT {
        libc::S_IFDIR => copy_dir(dst, path, st),
        libc::S_IFREG => copy_file(src, dst, path, st, limit),
        libc::S_IFLNK => copy_symlink(src, dst, path, st),
        _ => copy_special(dst, path, st),
    })
}

fn copy_dir(dst: &Layer, path: &Path, st: &Stat) -> io::Result<()> {
    match dst.mkdir(path, st.st_mode & 0o7777) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => return Ok(()),
        r => r?,
    }
    ignore_eperm(dst.chown(path, st.st_uid, st.st_gid))?;
    dst.chmod(path, st.st_mode & 0o7777)?;
    let (a, m) = times_of(st);
    dst.set_times(path, Some(a), Some(m))
}

fn copy_file(
    src: &Layer,
    dst: &Layer,
    path: &Path,
    st: &Stat,
    limit: Option<u64>,
) -> io::Result<()> {
    let from = src.open_file(path, libc::O_RDONLY)?;
    let tmp = temp_path_near(path);
    let mut to = dst.create_file(&tmp, libc::O_WRONLY, 0o600)?;
    let mut guard = TempGuard {
        layer: dst,
        path: tmp.clone(),
        armed: true,
    };
    // std's File-to-File copy uses copy_file_range/sendfile where it can.
    let mut reader = (&from).take(limit.unwrap_or(u64::MAX));
    io::copy(&mut reader, &mut to)?;
    copy_user_xattrs(&from, &to)?;
    ignore_eperm(fchown(&to, st.st_uid, st.st_gid))?;
    fchmod(&to, st.st_mode & 0o7777)?;
    futimens(&to, st)?;
    to.sync_all()?;
    dst.rename(&tmp, path, libc::RENAME_NOREPLACE)?;
    guard.armed = false;
    Ok(())
}

fn copy_symlink(src: &Layer, dst: &Layer, path: &Path, st: &Stat) -> io::Result<()> {
    let target = src.readlink(path)?;
    let tmp = temp_path_near(path);
    dst.symlink(&target, &tmp)?;
    let mut guard = TempGuard {
        layer: dst,
        path: tmp.clone(),
        armed: true,
    };
    ignore_eperm(dst.chown(&tmp, st.st_uid, st.st_gid))?;
    let (a, m) = times_of(st);
    dst.set_times(&tmp, Some(a), Some(m))?;
    dst.rename(&tmp, path, libc::RENAME_NOREPLACE)?;
    guard.armed = false;
    Ok(())
}

fn copy_special(dst: &Layer, path: &Path, st: &Stat) -> io::Result<()> {
    let tmp = temp_path_near(path);
    dst.mknod(&tmp, st.st_mode, st.st_rdev)?;
    let mut guard = TempGuard {
        layer: dst,
        path: tmp.clone(),
        armed: true,
    };
    ignore_eperm(dst.chown(&tmp, st.st_uid, st.st_gid))?;
    dst.chmod(&tmp, st.st_mode & 0o7777)?;
    let (a, m) = times_of(st);
    dst.set_times(&tmp, Some(a), Some(m))?;
    dst.rename(&tmp, path, libc::RENAME_NOREPLACE)?;
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

        for name in ["dir/f", "dir/l"] {
            let st = src.stat(Path::new(name)).unwrap().unwrap();
            copy_entry(&src, &dst, Path::new(name), &st, None).unwrap();
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
        let st = src.stat(Path::new("f")).unwrap().unwrap();
        assert!(copy_entry(&src, &dst, Path::new("f"), &st, None).is_err());
        assert_eq!(std::fs::read(d.path().join("f")).unwrap(), b"already");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }

    fn xattr_set(p: &Path, name: &str, v: &[u8]) -> io::Result<()> {
        let l = Layer::open(p.parent().unwrap()).unwrap();
        l.setxattr(Path::new(p.file_name().unwrap()), OsStr::new(name), v, 0)
    }
}
