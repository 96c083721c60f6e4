//! A short memory of what src does not have, so that a burst of lookups and creates
//! of new names (untar, a WordPress upload, `cp -r` into the mount) does not ask src
//! about every name twice (the kernel's LOOKUP, then our CREATE) and about every name
//! under a directory src has never had.
//!
//! An entry "src had nothing at `path`" is believed for `ttl` (the `--attr-ttl` the
//! kernel already trusts its own negative entries for), and it covers everything
//! below `path`. It is only used where a stale "absent" costs no more than the
//! kernel's own negative cache would: resolving a name in the view (`CacheFs::find`).
//! Decisions that must see src as it is now (whether a removal needs a whiteout)
//! ask src itself. Anything cachefs learns is there, or puts there, forgets the entry.
//!
//! Invariant: an entry is never older than `ttl`; the table never exceeds
//! [`MAX_ENTRIES`] (it is emptied when full). One leaf lock.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The most entries kept; a full table is emptied (cheap, and rare: entries expire).
const MAX_ENTRIES: usize = 4096;

pub(crate) struct SrcAbsent {
    ttl: Duration,
    seen: Mutex<HashMap<PathBuf, Instant>>,
}

impl SrcAbsent {
    /// `ttl` zero: remembers nothing.
    pub(crate) fn new(ttl: Duration) -> SrcAbsent {
        SrcAbsent {
            ttl,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// src answered that nothing is at `path`.
    pub(crate) fn note(&self, path: &Path) {
        if self.ttl.is_zero() {
            return;
        }
        let mut seen = self.seen.lock().unwrap();
        if seen.len() >= MAX_ENTRIES {
            seen.clear();
        }
        seen.insert(path.to_path_buf(), Instant::now());
    }

    /// Whether src is known, within the ttl, to have nothing at `path` or at one of
    /// its ancestors.
    pub(crate) fn covers(&self, path: &Path) -> bool {
        if self.ttl.is_zero() {
            return false;
        }
        let mut seen = self.seen.lock().unwrap();
        if seen.is_empty() {
            return false;
        }
        for p in path.ancestors() {
            if p.as_os_str().is_empty() {
                break;
            }
            if let Some(at) = seen.get(p) {
                if at.elapsed() < self.ttl {
                    return true;
                }
                seen.remove(p);
            }
        }
        false
    }

    /// Something is (or may now be) at `path` on src: forget it and its ancestors.
    pub(crate) fn forget(&self, path: &Path) {
        self.listed(path, std::iter::empty());
    }

    /// src listed directory `dir` with `names` in it: forget `dir`, its ancestors and
    /// those children. One lock, and nothing at all when the table is empty (the
    /// common case: no path is built per listed name).
    pub(crate) fn listed<'a>(&self, dir: &Path, names: impl Iterator<Item = &'a OsStr>) {
        if self.ttl.is_zero() {
            return;
        }
        let mut seen = self.seen.lock().unwrap();
        if seen.is_empty() {
            return;
        }
        for p in dir.ancestors() {
            seen.remove(p);
        }
        for name in names {
            seen.remove(&dir.join(name));
        }
    }

    /// Forget everything (src was replaced or came back from an outage).
    pub(crate) fn clear(&self) {
        self.seen.lock().unwrap().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_absent_directory_covers_its_children_until_the_ttl() {
        let a = SrcAbsent::new(Duration::from_millis(50));
        assert!(!a.covers(Path::new("d/f")));
        a.note(Path::new("d"));
        assert!(a.covers(Path::new("d")));
        assert!(a.covers(Path::new("d/f")));
        assert!(a.covers(Path::new("d/e/f")));
        assert!(!a.covers(Path::new("e")));
        assert!(!a.covers(Path::new("dd/f")));
        std::thread::sleep(Duration::from_millis(60));
        assert!(!a.covers(Path::new("d/f")));
    }

    #[test]
    fn forgetting_a_path_forgets_its_ancestors() {
        let a = SrcAbsent::new(Duration::from_secs(10));
        a.note(Path::new("d"));
        a.note(Path::new("d/f"));
        a.note(Path::new("x"));
        a.forget(Path::new("d/f/g"));
        assert!(!a.covers(Path::new("d/f")));
        assert!(!a.covers(Path::new("d/h")));
        assert!(a.covers(Path::new("x")));
        a.clear();
        assert!(!a.covers(Path::new("x")));
    }

    #[test]
    fn a_listing_forgets_the_directory_and_the_names_it_shows() {
        let a = SrcAbsent::new(Duration::from_secs(10));
        a.note(Path::new("d/f"));
        a.note(Path::new("d/g"));
        a.note(Path::new("e"));
        a.listed(Path::new("d"), [OsStr::new("f")].into_iter());
        assert!(!a.covers(Path::new("d/f")));
        assert!(a.covers(Path::new("d/g")));
        assert!(a.covers(Path::new("e")));
    }

    #[test]
    fn a_zero_ttl_remembers_nothing() {
        let a = SrcAbsent::new(Duration::ZERO);
        a.note(Path::new("d"));
        assert!(!a.covers(Path::new("d")));
    }
}
