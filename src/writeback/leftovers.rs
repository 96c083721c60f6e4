//! Leftover checks: a name replay renamed away or deleted on src is looked at again
//! after `--src-settle`, and removed if src shows the very file that was moved or
//! deleted there.
//!
//! Why: rclone (1.75, `--vfs-cache-mode writes`, S3) cancels its background upload of
//! a file when that file is renamed or removed, and when the upload's PUT had already
//! completed the object stays in the bucket under the old name; rclone's own listing
//! hides it until its directory cache expires (`--dir-cache-time`), then shows it
//! again. Through cachefs that is a file the user renamed or deleted coming back.
//!
//! A check is due `--src-settle` after the op (set it above rclone's
//! `--dir-cache-time` plus `--vfs-write-back`). It removes src's entry at the name only
//! when all of these hold, and otherwise just ends:
//! - no writeback op for the name is pending (a later op decides what is there);
//! - the view has nothing there: dst has no entry at the name, or only a whiteout;
//! - src has a regular file there with the size and mtime (to the nanosecond) of the
//!   file the op moved or deleted: what another machine writes there has its own.
//!
//! Any later change the mount journals at the name (or above it) cancels its check:
//! what is there from then on is the user's.
//!
//! On disk: `dst/.cachefs-state/writeback/leftovers`, one line per check,
//! `<due unix ms> <size> <mtime s> <mtime ns> /<percent-encoded path>`, rewritten whole
//! at most once a second when it changed (`sys::state_file`: temp, fsync, rename), so
//! checks survive a restart and `cachefs status` can count them. A check made less
//! than a second before a crash can be lost: that costs a possible leftover, never
//! data.
//!
//! Lock order: `Leftovers::checks` is a leaf (no other lock is taken under it, and no
//! src I/O is done under it).

use crate::sys::state_file;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use super::journal::{decode_bytes, encode_bytes};
use super::{at, op};

/// One pending check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Check {
    pub(crate) due_ms: u64,
    pub(crate) path: PathBuf,
    pub(crate) size: u64,
    pub(crate) mtime: (i64, i64),
}

/// What a due check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Found {
    /// src kept the file the op moved or deleted: removed now.
    Removed,
    /// Nothing to do (src has nothing there, or something else, or the view has).
    Clean,
}

pub(crate) fn file(dst: &Path) -> PathBuf {
    super::journal::dir(dst).join("leftovers")
}

fn encode(c: &Check, out: &mut String) {
    use std::fmt::Write as _;
    let _ = write!(out, "{} {} {} {} /", c.due_ms, c.size, c.mtime.0, c.mtime.1);
    encode_bytes(out, c.path.as_os_str().as_bytes());
    out.push('\n');
}

fn parse(text: &str) -> Vec<Check> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.splitn(5, ' ');
            let due_ms = it.next()?.parse().ok()?;
            let size = it.next()?.parse().ok()?;
            let s = it.next()?.parse().ok()?;
            let ns = it.next()?.parse().ok()?;
            let p = decode_bytes(it.next()?.strip_prefix('/')?)?;
            Some(Check {
                due_ms,
                path: PathBuf::from(OsString::from_vec(p)),
                size,
                mtime: (s, ns),
            })
        })
        .collect()
}

/// The checks recorded in `dst` (for `status`; a torn line is skipped).
pub(crate) fn read(dst: &Path) -> Vec<Check> {
    std::fs::read_to_string(file(dst))
        .map(|t| parse(&t))
        .unwrap_or_default()
}

/// The pending checks of one writeback, by path.
pub(crate) struct Leftovers {
    file: PathBuf,
    settle: Duration,
    checks: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    by_path: BTreeMap<PathBuf, Check>,
    /// Changed since last written to disk.
    dirty: bool,
}

impl Leftovers {
    /// Loads the checks a previous run left in `dst`. `settle` zero: no new checks.
    pub(crate) fn open(dst: &Path, settle: Duration) -> Leftovers {
        let by_path = read(dst).into_iter().map(|c| (c.path.clone(), c)).collect();
        Leftovers {
            file: file(dst),
            settle,
            checks: Mutex::new(Table {
                by_path,
                dirty: false,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.checks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the list if it changed (the checker thread, once a second: a burst of
    /// deletes costs one write, and a crash loses at most a second of checks).
    pub(crate) fn persist(&self) {
        let text = {
            let mut t = self.lock();
            if !t.dirty {
                return;
            }
            t.dirty = false;
            let mut text = String::new();
            for c in t.by_path.values() {
                encode(c, &mut text);
            }
            text
        };
        let tmp = self.file.with_extension("tmp");
        let r = (|| -> io::Result<()> {
            if text.is_empty() {
                return match std::fs::remove_file(&self.file) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                    _ => Ok(()),
                };
            }
            let tmp = tmp.file_name().unwrap_or_default();
            state_file::replace_with(&self.file, tmp, text.as_bytes())
        })();
        if let Err(e) = r {
            log::warn!("writeback: cannot record the leftover checks: {e}");
        }
    }

    /// Replay moved or deleted src's regular file `st` at `path`: look again later.
    pub(crate) fn note(&self, path: &Path, st: &at::Stat) {
        if self.settle.is_zero() || at::file_type(st) != libc::S_IFREG {
            return;
        }
        let c = Check {
            due_ms: crate::sys::clock::now_ms() + self.settle.as_millis() as u64,
            path: path.to_path_buf(),
            size: st.st_size as u64,
            mtime: (st.st_mtime, st.st_mtime_nsec),
        };
        let mut t = self.lock();
        t.by_path.insert(c.path.clone(), c);
        t.dirty = true;
    }

    /// The mount changed `path` (or something below it) again: what is there from now
    /// on is the user's, never a leftover.
    pub(crate) fn cancel(&self, path: &Path) {
        let mut t = self.lock();
        if t.by_path.is_empty() {
            return;
        }
        let below: Vec<PathBuf> = t
            .by_path
            .range(path.to_path_buf()..)
            .take_while(|(p, _)| p.starts_with(path))
            .map(|(p, _)| p.clone())
            .collect();
        for p in below {
            t.by_path.remove(&p);
            t.dirty = true;
        }
    }

    /// How many checks wait.
    pub(crate) fn pending(&self) -> usize {
        self.lock().by_path.len()
    }

    /// The checks due at `now_ms`, taken out of the list (put back with
    /// [`Leftovers::put_back`] if they could not run).
    pub(crate) fn take_due(&self, now_ms: u64) -> Vec<Check> {
        let mut t = self.lock();
        let due: Vec<PathBuf> = t
            .by_path
            .values()
            .filter(|c| c.due_ms <= now_ms)
            .map(|c| c.path.clone())
            .collect();
        if !due.is_empty() {
            t.dirty = true;
        }
        due.iter().filter_map(|p| t.by_path.remove(p)).collect()
    }

    /// Puts checks that could not run back (unless the name was noted again meanwhile).
    pub(crate) fn put_back(&self, again: Vec<Check>) {
        let mut t = self.lock();
        for c in again {
            t.by_path.entry(c.path.clone()).or_insert(c);
            t.dirty = true;
        }
    }
}

/// Runs one due check against the open roots (see the module doc for the rule).
/// `pending(path)`: a writeback op for the name is queued.
pub(crate) fn check(
    src: &std::os::fd::OwnedFd,
    dst: &std::os::fd::OwnedFd,
    c: &Check,
    pending: impl Fn(&Path) -> bool,
) -> io::Result<Found> {
    let Some((comps, name)) = op::split(&c.path) else {
        return Ok(Found::Clean);
    };
    if pending(&c.path) {
        return Ok(Found::Clean);
    }
    match at::walk(dst, &comps) {
        Ok(dd) => {
            let dd = dd.as_fd();
            if at::lstat_at(dd, name)?.is_some() && !at::whited_out(dd, name)? {
                return Ok(Found::Clean);
            }
        }
        Err(e) if at::is_gone(&e) => {}
        Err(e) => return Err(e),
    }
    let sd = match at::walk(src, &comps) {
        Ok(fd) => fd,
        Err(e) if at::is_gone(&e) => return Ok(Found::Clean),
        Err(e) => return Err(e),
    };
    let Some(st) = at::lstat_at(sd.as_fd(), name)? else {
        return Ok(Found::Clean);
    };
    let same = at::file_type(&st) == libc::S_IFREG
        && st.st_size as u64 == c.size
        && (st.st_mtime, st.st_mtime_nsec) == c.mtime;
    if !same {
        return Ok(Found::Clean);
    }
    match at::unlink_at(sd.as_fd(), name, false) {
        Ok(()) => Ok(Found::Removed),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(Found::Clean),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat_of(p: &Path) -> at::Stat {
        let dir = crate::sys::open_dir_path(p.parent().unwrap()).unwrap();
        at::lstat_at(dir.as_fd(), p.file_name().unwrap())
            .unwrap()
            .unwrap()
    }

    #[test]
    fn checks_survive_a_restart_and_lines_roundtrip() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(super::super::journal::dir(t.path())).unwrap();
        std::fs::write(t.path().join("f"), b"x").unwrap();
        let st = stat_of(&t.path().join("f"));
        let l = Leftovers::open(t.path(), Duration::from_secs(60));
        l.note(Path::new("a dir/f\n%"), &st);
        l.note(Path::new("b/c"), &st);
        assert_eq!(l.pending(), 2);
        // A later change at or above a name cancels its check.
        l.cancel(Path::new("b"));
        assert_eq!(l.pending(), 1);
        l.persist();
        let again = Leftovers::open(t.path(), Duration::from_secs(60));
        let got = read(t.path());
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].path, Path::new("a dir/f\n%"));
        assert_eq!(got[0].size, 1);
        assert!(again.take_due(0).is_empty(), "not due yet");
        assert_eq!(again.take_due(u64::MAX).len(), 1);
        again.persist();
        assert!(read(t.path()).is_empty());
        // Directories and a zero settle make no check.
        let off = Leftovers::open(t.path(), Duration::ZERO);
        off.note(Path::new("f"), &st);
        assert_eq!(off.pending(), 0);
    }

    #[test]
    fn only_the_very_file_moved_away_is_removed_and_only_where_the_view_has_nothing() {
        let s = tempfile::tempdir().unwrap();
        let d = tempfile::tempdir().unwrap();
        let (src, dst) = (
            crate::sys::open_dir_path(s.path()).unwrap(),
            crate::sys::open_dir_path(d.path()).unwrap(),
        );
        std::fs::write(s.path().join("ghost"), b"old bytes").unwrap();
        let st = stat_of(&s.path().join("ghost"));
        let c = Check {
            due_ms: 0,
            path: PathBuf::from("ghost"),
            size: st.st_size as u64,
            mtime: (st.st_mtime, st.st_mtime_nsec),
        };
        // A pending op for the name: left alone.
        assert_eq!(check(&src, &dst, &c, |_| true).unwrap(), Found::Clean);
        assert!(s.path().join("ghost").exists());
        // The view has a file there: left alone.
        std::fs::write(d.path().join("ghost"), b"new").unwrap();
        assert_eq!(check(&src, &dst, &c, |_| false).unwrap(), Found::Clean);
        assert!(s.path().join("ghost").exists());
        std::fs::remove_file(d.path().join("ghost")).unwrap();
        // Another version (another machine wrote it): left alone.
        let other = Check {
            mtime: (c.mtime.0, c.mtime.1 ^ 1),
            ..c.clone()
        };
        assert_eq!(check(&src, &dst, &other, |_| false).unwrap(), Found::Clean);
        assert!(s.path().join("ghost").exists());
        // The very file, nothing in the view: removed.
        assert_eq!(check(&src, &dst, &c, |_| false).unwrap(), Found::Removed);
        assert!(!s.path().join("ghost").exists());
        // Gone already: nothing to do.
        assert_eq!(check(&src, &dst, &c, |_| false).unwrap(), Found::Clean);
    }
}
