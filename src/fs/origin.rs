//! The origin record of a cached file: which src version dst's copy came from.
//!
//! Invariants:
//! - A regular file copied from src carries, in a reserved xattr on the dst file, src's
//!   size, mtime and inode at fetch time and a `dirty` flag. Files created through the
//!   mount have no record: they are local, never refetched or dropped.
//! - `dirty` is set on the first local change (write, truncate, chmod, ...). A dirty
//!   file is never refetched or dropped because of src: local data wins (writeback
//!   handles a src that changed as well: a conflict).
//! - The record's xattr is invisible and untouchable through the mount
//!   ([`is_reserved_xattr`]) and is never copied from src.
//! - Where dst has no xattr support, there is no record and no revalidation.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::layer::{Layer, Stat, cstr};

/// Root daemons use the trusted namespace (invisible to users even on dst itself).
const XATTR_ROOT: &str = "trusted.cachefs.origin";
/// Unprivileged daemons cannot write trusted.*.
const XATTR_USER: &str = "user.cachefs.origin";

fn xattr_name() -> &'static OsStr {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        OsStr::new(XATTR_ROOT)
    } else {
        OsStr::new(XATTR_USER)
    }
}

/// xattr names that belong to cachefs and never pass through the mount.
pub fn is_reserved_xattr(name: &OsStr) -> bool {
    let b = name.as_bytes();
    b.starts_with(b"trusted.cachefs.") || b == XATTR_USER.as_bytes()
}

/// Which src version a cached file was fetched from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: i64,
    pub ino: u64,
    pub dirty: bool,
}

impl Origin {
    /// The record for a fresh copy of the src file described by `st`.
    pub fn of(st: &Stat) -> Origin {
        Origin {
            size: st.st_size as u64,
            mtime_sec: st.st_mtime,
            mtime_nsec: st.st_mtime_nsec,
            ino: st.st_ino,
            dirty: false,
        }
    }

    /// Whether src's file (`st`) is still the version this copy came from.
    pub fn same_source(&self, st: &Stat) -> bool {
        let now = Origin::of(st);
        (self.size, self.mtime_sec, self.mtime_nsec, self.ino)
            == (now.size, now.mtime_sec, now.mtime_nsec, now.ino)
    }

    fn encode(&self) -> String {
        format!(
            "v1 {} {} {} {} {}",
            self.size,
            self.mtime_sec,
            self.mtime_nsec,
            self.ino,
            u8::from(self.dirty)
        )
    }

    fn decode(b: &[u8]) -> Option<Origin> {
        let text = std::str::from_utf8(b).ok()?;
        let mut it = text.split(' ');
        if it.next()? != "v1" {
            return None;
        }
        let mut num = || it.next()?.parse::<i64>().ok();
        Some(Origin {
            size: num()? as u64,
            mtime_sec: num()?,
            mtime_nsec: num()?,
            ino: num()? as u64,
            dirty: num()? != 0,
        })
    }
}

fn no_xattrs(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENODATA) | Some(libc::ENOTSUP) | Some(libc::EPERM)
    )
}

/// The record of dst's file at `path`, if it has one.
pub fn read(dst: &Layer, path: &Path) -> io::Result<Option<Origin>> {
    match dst.getxattr(path, xattr_name()) {
        Ok(v) => Ok(Origin::decode(&v)),
        Err(e) if no_xattrs(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes the record of dst's file at `path` (no-op where dst has no xattrs).
pub fn write(dst: &Layer, path: &Path, origin: &Origin) -> io::Result<()> {
    match dst.setxattr(path, xattr_name(), origin.encode().as_bytes(), 0) {
        Err(e) if no_xattrs(&e) => Ok(()),
        r => r,
    }
}

/// Writes the record on an open file (the temp file of a copy-up).
pub fn write_fd(file: &File, origin: &Origin) -> io::Result<()> {
    let name = cstr(xattr_name())?;
    let value = origin.encode();
    // SAFETY: valid fd, name and value.
    let r = unsafe {
        libc::fsetxattr(
            file.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr() as *const libc::c_void,
            value.len(),
            0,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if !no_xattrs(&e) {
            return Err(e);
        }
    }
    Ok(())
}

/// Marks dst's file at `path` as changed locally (if it has a clean record).
pub fn mark_dirty(dst: &Layer, path: &Path) -> io::Result<()> {
    if let Some(mut o) = read(dst, path)?
        && !o.dirty
    {
        o.dirty = true;
        write(dst, path, &o)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_reserved_names() {
        let o = Origin {
            size: 5,
            mtime_sec: -3,
            mtime_nsec: 7,
            ino: 99,
            dirty: true,
        };
        assert_eq!(Origin::decode(o.encode().as_bytes()), Some(o));
        assert_eq!(Origin::decode(b"garbage"), None);
        assert!(is_reserved_xattr(OsStr::new("trusted.cachefs.origin")));
        assert!(is_reserved_xattr(OsStr::new("user.cachefs.origin")));
        assert!(!is_reserved_xattr(OsStr::new("user.cachefs.pin")));
        assert!(!is_reserved_xattr(OsStr::new("user.other")));
    }

    #[test]
    fn dirty_flag_persists_on_dst() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), b"x").unwrap();
        let dst = Layer::open(d.path()).unwrap();
        let st = dst.stat(Path::new("f")).unwrap().unwrap();
        write(&dst, Path::new("f"), &Origin::of(&st)).unwrap();
        let got = read(&dst, Path::new("f")).unwrap().unwrap();
        assert!(got.same_source(&st) && !got.dirty);
        mark_dirty(&dst, Path::new("f")).unwrap();
        assert!(read(&dst, Path::new("f")).unwrap().unwrap().dirty);
    }
}
