//! Paths whose dst state src cannot hold ("not representable on src"): a symlink on a
//! src without symlinks, a fifo or device node, a hard link stored as a copy, a mode,
//! owner or mtime src does not keep, user xattrs or POSIX ACLs src has no room for.
//!
//! Such an op is not a failure: replay does on src what src can hold (a hard link's
//! bytes, a file's content), keeps the rest in dst (the mount shows it), retires the op
//! and notes the path here. Nothing is retried and nothing later waits for it. A path
//! leaves the list when a later replay finds it representable (replaced by a regular
//! file, its xattrs removed, ...), or when it is removed; a rename moves its entries.
//!
//! On disk: `dst/.cachefs-state/writeback/unrepresentable`, lines of
//!
//! ```text
//! + <unix_ms> <what, hex bits> <path> <detail>    set the entry of path
//! = <path>                                      remove the entry of path
//! - <path>                                      remove path's entry and every one below
//! ```
//!
//! with paths and details percent-encoded as in the journal. Not fsynced: a lost line
//! loses a report, never data. Rewritten (compacted) when mostly stale. `cachefs status`
//! reads it without a lock; a torn last line is skipped.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use super::journal::{decode_bytes, encode_bytes};

pub(crate) const SYMLINK: u16 = 1;
pub(crate) const SPECIAL: u16 = 2;
pub(crate) const HARD_LINK: u16 = 4;
pub(crate) const MODE: u16 = 8;
pub(crate) const OWNER: u16 = 16;
pub(crate) const MTIME: u16 = 32;
pub(crate) const XATTRS: u16 = 64;
/// Everything a sync of an entry looks at.
pub(crate) const ALL: u16 = 127;

/// The names of the bits, for `status` (`what` in JSON).
pub(crate) fn names(what: u16) -> Vec<&'static str> {
    [
        (SYMLINK, "symlink"),
        (SPECIAL, "special file"),
        (HARD_LINK, "hard link"),
        (MODE, "mode"),
        (OWNER, "owner"),
        (MTIME, "mtime"),
        (XATTRS, "xattrs"),
    ]
    .iter()
    .filter(|(b, _)| what & b != 0)
    .map(|(_, n)| *n)
    .collect()
}

/// What to do about each kind (for `status`).
pub(crate) fn advice(what: u16) -> Vec<&'static str> {
    let mut v = Vec::new();
    if what & SYMLINK != 0 {
        v.push(
            "symlink: kept in dst only; run rclone with --links to store symlinks \
             (then restart cachefs: it uploads them), or replace it by a copy",
        );
    }
    if what & SPECIAL != 0 {
        v.push("special file: kept in dst only; buckets cannot hold fifos, sockets or devices");
    }
    if what & HARD_LINK != 0 {
        v.push(
            "hard link: each name is stored on src as its own copy (a change through one \
             name reaches the copies of the names the mount knows)",
        );
    }
    if what & (MODE | OWNER | MTIME) != 0 {
        v.push(
            "mode/owner/mtime: kept in dst only; src shows its own (rclone: --uid/--gid/--umask)",
        );
    }
    if what & XATTRS != 0 {
        v.push("xattrs: user xattrs and POSIX ACLs src cannot hold are kept in dst only");
    }
    v
}

/// One path's state, as found by a replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Note {
    pub(crate) path: PathBuf,
    /// The bits this replay looked at (others keep their earlier state).
    pub(crate) checked: u16,
    /// The bits found not representable.
    pub(crate) found: u16,
    pub(crate) detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) ms: u64,
    pub(crate) what: u16,
    pub(crate) detail: String,
}

pub(crate) fn path(dst: &Path) -> PathBuf {
    super::journal::dir(dst).join("unrepresentable")
}

fn enc_path(out: &mut String, p: &Path) {
    out.push('/');
    encode_bytes(out, p.as_os_str().as_bytes());
}

fn dec_path(s: &str) -> Option<PathBuf> {
    let b = decode_bytes(s.strip_prefix('/')?)?;
    Some(PathBuf::from(OsString::from_vec(b)))
}

fn parse_into(text: &str, map: &mut BTreeMap<PathBuf, Entry>) -> u64 {
    let mut lines = 0;
    for line in text.lines() {
        lines += 1;
        let f: Vec<&str> = line.split(' ').collect();
        match f.as_slice() {
            ["+", ms, what, p, detail] => {
                let (Ok(ms), Ok(what), Some(p), Some(d)) = (
                    ms.parse(),
                    u16::from_str_radix(what, 16),
                    dec_path(p),
                    decode_bytes(detail),
                ) else {
                    continue;
                };
                let detail = String::from_utf8_lossy(&d).into_owned();
                map.insert(p, Entry { ms, what, detail });
            }
            ["=", p] => {
                if let Some(p) = dec_path(p) {
                    map.remove(&p);
                }
            }
            ["-", p] => {
                if let Some(p) = dec_path(p) {
                    remove_tree(map, &p);
                }
            }
            _ => {}
        }
    }
    lines
}

fn under(map: &BTreeMap<PathBuf, Entry>, base: &Path) -> Vec<PathBuf> {
    map.range(base.to_path_buf()..)
        .take_while(|(k, _)| k.starts_with(base))
        .map(|(k, _)| k.clone())
        .collect()
}

fn remove_tree(map: &mut BTreeMap<PathBuf, Entry>, base: &Path) -> Vec<(PathBuf, Entry)> {
    under(map, base)
        .into_iter()
        .filter_map(|k| map.remove(&k).map(|e| (k, e)))
        .collect()
}

/// Reads the list (for `status`): empty if there is none.
pub(crate) fn read(dst: &Path) -> BTreeMap<PathBuf, Entry> {
    let mut map = BTreeMap::new();
    if let Ok(text) = std::fs::read_to_string(path(dst)) {
        parse_into(&text, &mut map);
    }
    map
}

/// The daemon's copy of the list, with its append-only file.
pub(crate) struct Store {
    file: Option<File>,
    path: PathBuf,
    pub(crate) map: BTreeMap<PathBuf, Entry>,
    lines: u64,
}

impl Store {
    pub(crate) fn open(dst: &Path) -> io::Result<Store> {
        let path = path(dst);
        let mut map = BTreeMap::new();
        let lines = match std::fs::read_to_string(&path) {
            Ok(text) => parse_into(&text, &mut map),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        let mut s = Store {
            file: None,
            path,
            map,
            lines,
        };
        s.compact_if_stale(true);
        Ok(s)
    }

    fn append(&mut self, line: &str) {
        if self.path.as_os_str().is_empty() {
            return;
        }
        if self.file.is_none() {
            self.file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .ok();
        }
        let ok = self
            .file
            .as_mut()
            .is_some_and(|f| f.write_all(line.as_bytes()).is_ok());
        if !ok {
            log::warn!(
                "writeback: cannot update {} (a report of paths src cannot hold)",
                self.path.display()
            );
        }
        self.lines += line.matches('\n').count() as u64;
        self.compact_if_stale(false);
    }

    fn set_line(p: &Path, e: &Entry) -> String {
        let mut l = format!("+ {} {:x} ", e.ms, e.what);
        enc_path(&mut l, p);
        l.push(' ');
        encode_bytes(&mut l, e.detail.as_bytes());
        l.push('\n');
        l
    }

    fn compact_if_stale(&mut self, force_if_any: bool) {
        let live = self.map.len() as u64;
        let stale = self.lines > 2 * live + 256 || (force_if_any && self.lines > live);
        if !stale || self.path.as_os_str().is_empty() {
            return;
        }
        let tmp = self.path.with_extension("tmp");
        let text: String = self.map.iter().map(|(p, e)| Self::set_line(p, e)).collect();
        let tmp = tmp.file_name().unwrap_or_default();
        if crate::sys::state_file::replace_with(&self.path, tmp, text.as_bytes()).is_ok() {
            self.file = None;
            self.lines = live;
        }
    }

    /// Applies a replay's finding; returns the bits newly found (to log them once).
    pub(crate) fn apply(&mut self, n: &Note, ms: u64) -> u16 {
        let old = self.map.get(&n.path).map_or(0, |e| e.what);
        let what = (old & !n.checked) | n.found;
        if what == 0 {
            if self.map.remove(&n.path).is_some() {
                let mut l = String::from("= ");
                enc_path(&mut l, &n.path);
                l.push('\n');
                self.append(&l);
            }
            return 0;
        }
        let detail = if n.found != 0 {
            n.detail.clone()
        } else {
            self.map
                .get(&n.path)
                .map(|e| e.detail.clone())
                .unwrap_or_default()
        };
        let e = Entry {
            ms: if old == what {
                self.map.get(&n.path).map_or(ms, |e| e.ms)
            } else {
                ms
            },
            what,
            detail,
        };
        if self.map.get(&n.path) != Some(&e) {
            let l = Self::set_line(&n.path, &e);
            self.map.insert(n.path.clone(), e);
            self.append(&l);
        }
        what & !old
    }

    /// `base` and everything below it is gone (unlink, rmdir).
    pub(crate) fn remove_tree(&mut self, base: &Path) {
        if remove_tree(&mut self.map, base).is_empty() {
            return;
        }
        let mut l = String::from("- ");
        enc_path(&mut l, base);
        l.push('\n');
        self.append(&l);
    }

    /// Entries at and below `from` move to `to` (and `to`'s to `from` for an exchange);
    /// entries that were at `to` are dropped otherwise (replaced).
    pub(crate) fn rename(&mut self, from: &Path, to: &Path, exchange: bool) {
        let moved = remove_tree(&mut self.map, from);
        let other = remove_tree(&mut self.map, to);
        if moved.is_empty() && other.is_empty() {
            return;
        }
        let mut text = String::new();
        for base in [from, to] {
            text.push_str("- ");
            enc_path(&mut text, base);
            text.push('\n');
        }
        let rebase = |p: &Path, a: &Path, b: &Path| b.join(p.strip_prefix(a).unwrap_or(p));
        let mut add: Vec<(PathBuf, Entry)> = moved
            .into_iter()
            .map(|(p, e)| (rebase(&p, from, to), e))
            .collect();
        if exchange {
            add.extend(other.into_iter().map(|(p, e)| (rebase(&p, to, from), e)));
        }
        for (p, e) in add {
            text.push_str(&Self::set_line(&p, &e));
            self.map.insert(p, e);
        }
        self.append(&text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(p: &str, checked: u16, found: u16) -> Note {
        Note {
            path: p.into(),
            checked,
            found,
            detail: format!("d{found}"),
        }
    }

    #[test]
    fn set_clear_rename_and_reload() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(super::super::journal::dir(t.path())).unwrap();
        let mut s = Store::open(t.path()).unwrap();
        assert_eq!(s.apply(&note("a/l", ALL, SYMLINK), 1), SYMLINK);
        assert_eq!(s.apply(&note("a/l", ALL, SYMLINK), 2), 0, "already known");
        assert_eq!(s.apply(&note("f", ALL, MODE | XATTRS), 3), MODE | XATTRS);
        // A content sync does not look at the mode: it stays.
        s.apply(&note("f", ALL & !MODE, 0), 4);
        assert_eq!(s.map[Path::new("f")].what, MODE);
        s.apply(&note("g", ALL, SPECIAL), 5);
        s.rename(Path::new("a"), Path::new("b"), false);
        assert!(s.map.contains_key(Path::new("b/l")) && !s.map.contains_key(Path::new("a/l")));
        s.remove_tree(Path::new("g"));
        assert_eq!(read(t.path()), s.map);
        let again = Store::open(t.path()).unwrap();
        assert_eq!(again.map, s.map);
        assert_eq!(
            again.map.keys().collect::<Vec<_>>(),
            [Path::new("b/l"), Path::new("f")]
        );
        // Representable again: gone.
        let mut s = again;
        s.apply(&note("f", ALL, 0), 6);
        assert_eq!(read(t.path()).len(), 1);
        assert_eq!(names(SYMLINK | MODE), ["symlink", "mode"]);
    }
}
