//! One way to replace a state file (cachefs's own files in `dst/.cachefs-state/`):
//! write a temp file beside it, fsync it, rename it over the file, fsync the directory.
//!
//! Invariants:
//! - A reader sees the old contents or the new, never a torn file: the new contents
//!   reach the name only by a rename within one directory.
//! - When [`replace`]/[`replace_at`] return `Ok`, the new contents survive a power
//!   loss (the temp file is fsynced before the rename, the directory after it). This
//!   is the strongest of the rules the writers used before this module (the journal's
//!   and the origin store's); there is no weaker mode.
//! - On an error the temp file is removed (best effort) and the old file is untouched,
//!   unless the error came from the final directory fsync (the rename has happened).
//!   A directory fsync the filesystem does not do (EINVAL, ENOTSUP: some FUSE and
//!   network filesystems) is no error: nothing more can be asked of it.
//! - The temp name is the caller's: writers that may run in two processes at once
//!   (the daemon and a command) give a per-process one.

use super::{cstr, fsync_dir, open_dir_path, openat, renameat2, unlinkat};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

/// Replaces `path` with what `write` writes, through the temp file `tmp_name` in the
/// same directory (which must exist). The file is created with `mode` (umask applies)
/// if it is new.
pub fn replace(
    path: &Path,
    tmp_name: &OsStr,
    mode: libc::mode_t,
    write: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    let dir = open_dir_path(dir)?;
    replace_at(dir.as_fd(), name, tmp_name, mode, write)
}

/// [`replace`] of `name` in the directory `dir` (an `O_PATH` fd will do); neither
/// name may contain a `/`, and no symlink is followed at either.
pub fn replace_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    tmp_name: &OsStr,
    mode: libc::mode_t,
    write: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    let name = cstr(name)?;
    let tmp = cstr(tmp_name)?;
    let written = (|| {
        let mut f = File::from(openat(
            dir,
            &tmp,
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
            mode,
        )?);
        write(&mut f)?;
        f.flush()?;
        f.sync_all()?;
        drop(f);
        renameat2(dir, &tmp, dir, &name, 0)
    })();
    if let Err(e) = written {
        let _ = unlinkat(dir, &tmp, 0);
        return Err(e);
    }
    match fsync_dir(dir) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOTSUP)) => Ok(()),
        r => r,
    }
}

/// [`replace`] with `data` as the whole new contents.
pub fn replace_with(path: &Path, tmp_name: &OsStr, data: &[u8]) -> io::Result<()> {
    replace(path, tmp_name, 0o666, |f| f.write_all(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_and_leaves_no_temp_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state");
        replace_with(&p, OsStr::new("state.tmp"), b"one").unwrap();
        replace_with(&p, OsStr::new("state.tmp"), b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        // A stale temp file (a crash before the rename) is simply overwritten.
        std::fs::write(d.path().join("state.tmp"), b"stale and longer").unwrap();
        replace_with(&p, OsStr::new("state.tmp"), b"3").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"3");
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["state"]);
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_removes_the_temp_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state");
        replace_with(&p, OsStr::new("t"), b"old").unwrap();
        let e = replace(&p, OsStr::new("t"), 0o600, |f| {
            f.write_all(b"half")?;
            Err(io::Error::other("no"))
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "no");
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert!(!d.path().join("t").exists());
    }
}
