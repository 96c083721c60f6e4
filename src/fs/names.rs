//! Reserved names in dst: the on-disk layout contract shared by the layered view
//! (`fs`) and the writeback replay (`writeback`).
//!
//! Invariants:
//! - Every name cachefs itself writes into dst starts with [`RESERVED_PREFIX`], except the
//!   GoCacheFS legacy whiteouts it honours and removes ([`GOCACHEFS_WHITEOUT_PREFIX`]).
//! - A reserved name is never listed, looked up, created, renamed to or linked to through
//!   the mount; such calls fail with `EPERM` (creation) or `ENOENT` (lookup).
//! - A whiteout `.cachefs-wh.<name>` in dst directory D hides `<name>` of src in D.
//!   The name after the prefix is the whole entry name: it never contains `/`, so the
//!   encoding is unambiguous (unlike GoCacheFS's `----` path encoding).
//! - A name too long for that prefix (over 243 bytes) gets the whiteout
//!   `.cachefs-whh.<16 hex digits of FNV-1a 64>` whose *content* is the full name; the
//!   content is compared on every check, so a hash collision cannot hide a wrong name.
//! - An opaque marker `.cachefs-opaque` in dst directory D means src is not consulted
//!   for D's children (after rmdir+mkdir, or a directory renamed over another).

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

/// Every internal name starts with this.
pub const RESERVED_PREFIX: &[u8] = b".cachefs-";
/// Whiteout: `.cachefs-wh.<name>` hides `<name>` of src in the same directory.
pub const WHITEOUT_PREFIX: &[u8] = b".cachefs-wh.";
/// Whiteout for names too long for [`WHITEOUT_PREFIX`]: hashed name, full name inside.
pub const HASHED_WHITEOUT_PREFIX: &[u8] = b".cachefs-whh.";
/// Longest file name on Linux filesystems.
const NAME_MAX: usize = 255;
/// Opaque marker file inside a dst directory.
pub const OPAQUE_MARKER: &str = ".cachefs-opaque";
/// Temp files of copy-up (in dst) and of writeback (in src): `.cachefs-tmp.<unique>`.
pub const TEMP_PREFIX: &str = ".cachefs-tmp.";
/// The state folder at dst's root (journal, metadata).
pub const STATE_DIR: &str = ".cachefs-state";
/// GoCacheFS's root-level whiteouts: `.__gocachefs_rm__` + path with `/` written as `----`.
pub const GOCACHEFS_WHITEOUT_PREFIX: &[u8] = b".__gocachefs_rm__";

/// True for names that belong to cachefs (or GoCacheFS) and never appear in the mount.
pub fn is_reserved(name: &OsStr) -> bool {
    let b = name.as_bytes();
    b.starts_with(RESERVED_PREFIX) || b.starts_with(GOCACHEFS_WHITEOUT_PREFIX)
}

/// The whiteout file name hiding `name`.
pub fn whiteout_name(name: &OsStr) -> OsString {
    if WHITEOUT_PREFIX.len() + name.len() > NAME_MAX {
        let h = crate::sys::fnv1a64(name.as_bytes());
        let mut v = HASHED_WHITEOUT_PREFIX.to_vec();
        v.extend_from_slice(format!("{h:016x}").as_bytes());
        return OsString::from_vec(v);
    }
    let mut v = WHITEOUT_PREFIX.to_vec();
    v.extend_from_slice(name.as_bytes());
    OsString::from_vec(v)
}

/// Whether the whiteout found at [`whiteout_name`]`(name)` hides `name`: a short one
/// by its name alone; a hashed one only if its content is `name` (`content` reads it,
/// and is called only for a hashed one; `None`: the file is gone), so a hash collision
/// hides nothing. The rule for every reader of whiteouts.
pub fn whiteout_hides<E>(
    name: &OsStr,
    content: impl FnOnce() -> Result<Option<Vec<u8>>, E>,
) -> Result<bool, E> {
    if !is_hashed_whiteout(&whiteout_name(name)) {
        return Ok(true);
    }
    Ok(content()?.is_some_and(|c| c == name.as_bytes()))
}

/// Whether a whiteout's name is hashed (the hidden name is the file's content).
pub fn is_hashed_whiteout(name: &OsStr) -> bool {
    name.as_bytes().starts_with(HASHED_WHITEOUT_PREFIX)
}

/// If `name` is a whiteout, the name it hides.
pub fn whiteout_target(name: &OsStr) -> Option<&OsStr> {
    name.as_bytes()
        .strip_prefix(WHITEOUT_PREFIX)
        .filter(|rest| !rest.is_empty())
        .map(OsStr::from_bytes)
}

/// If `name` is a GoCacheFS whiteout at dst's root, the mount-relative path it hides
/// (no leading `/`), e.g. `.__gocachefs_rm__----a----b` -> `a/b`.
pub fn gocachefs_whiteout_target(name: &OsStr) -> Option<OsString> {
    let rest = name.as_bytes().strip_prefix(GOCACHEFS_WHITEOUT_PREFIX)?;
    let text = String::from_utf8_lossy(rest).replace("----", "/");
    let path = text.trim_start_matches('/');
    (!path.is_empty()).then(|| OsString::from(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whiteout_round_trip() {
        let wh = whiteout_name(OsStr::new("a----b"));
        assert_eq!(wh, ".cachefs-wh.a----b");
        assert!(is_reserved(&wh));
        assert_eq!(whiteout_target(&wh), Some(OsStr::new("a----b")));
        assert_eq!(whiteout_target(OsStr::new(".cachefs-wh.")), None);
        assert_eq!(whiteout_target(OsStr::new("plain")), None);
        let long = "x".repeat(255);
        let wh = whiteout_name(OsStr::new(&long));
        assert!(wh.len() <= 255 && is_hashed_whiteout(&wh) && is_reserved(&wh));
        assert_eq!(whiteout_target(&wh), None);
        assert_ne!(wh, whiteout_name(OsStr::new(&"y".repeat(255))));
        // A hashed whiteout hides only the name it holds; a short one, by its name.
        let no = || -> Result<_, ()> { panic!("a short whiteout is never read") };
        assert_eq!(whiteout_hides(OsStr::new("a"), no), Ok(true));
        let long = OsStr::new(&long);
        let holds = |c: &str| {
            let c = c.as_bytes().to_vec();
            move || Ok::<_, ()>(Some(c))
        };
        assert_eq!(whiteout_hides(long, holds(&"x".repeat(255))), Ok(true));
        assert_eq!(whiteout_hides(long, holds("another name")), Ok(false));
        assert_eq!(whiteout_hides(long, || Ok::<_, ()>(None)), Ok(false));
    }

    #[test]
    fn gocachefs_names_decode_to_paths() {
        let n = OsStr::new(".__gocachefs_rm__----a----b");
        assert!(is_reserved(n));
        assert_eq!(gocachefs_whiteout_target(n), Some(OsString::from("a/b")));
        assert_eq!(
            gocachefs_whiteout_target(OsStr::new(".__gocachefs_rm__")),
            None
        );
    }

    #[test]
    fn ordinary_names_are_not_reserved() {
        for n in ["a", ".cachefs", "cachefs-wh.x", ".gocachefs", "..cachefs-x"] {
            assert!(!is_reserved(OsStr::new(n)), "{n}");
        }
        for n in [".cachefs-state", ".cachefs-opaque", ".cachefs-tmp.1"] {
            assert!(is_reserved(OsStr::new(n)), "{n}");
        }
    }
}
