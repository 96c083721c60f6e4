//! The usage index of dst: every regular file cachefs shows from dst, its bytes on disk,
//! its class and its last use, with the evictable ones ordered least recently used first.
//!
//! Invariants:
//! - `usage` is the sum of `bytes` over all entries; `by_class` sums per class.
//! - Entries are dst-relative paths: a visible file's own path, or for a partial file of
//!   lazy fetch its data file `.cachefs-state/lazy/<key>.data`
//!   ([`crate::fs::lazy::is_data_rel`]); `partial`/`partial_files` sum those.
//! - `order` holds `(stamp, path)` exactly for the `Clean` entries, so the first
//!   element is the least recently used evictable candidate.
//! - Stamps are nanoseconds since the Unix epoch, so in-memory uses, persisted uses and
//!   file times seeded at start compare with each other.
//!
//! The index is a plain data structure, not thread safe: `Cache` wraps it in a mutex
//! that is a leaf lock (nothing else is locked or called while it is held).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// What eviction may do with a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Class {
    /// A clean copy fetched from src: evictable (unless open or pending writeback).
    Clean,
    /// Created or changed here (dirty, or no origin record): never evicted.
    Local,
    /// Matches `--pin` or lies under a `user.cachefs.pin` xattr: never evicted.
    Pinned,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) bytes: u64,
    pub(crate) stamp: u64,
    pub(crate) class: Class,
}

#[derive(Debug, Default)]
pub(crate) struct Index {
    entries: HashMap<PathBuf, Entry>,
    order: BTreeSet<(u64, PathBuf)>,
    usage: u64,
    clean: u64,
    local: u64,
    pinned: u64,
    partial: u64,
    partial_files: usize,
}

impl Index {
    pub(crate) fn new() -> Index {
        Index::default()
    }

    pub(crate) fn usage(&self) -> u64 {
        self.usage
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Bytes in `class`.
    pub(crate) fn bytes_in(&self, class: Class) -> u64 {
        match class {
            Class::Clean => self.clean,
            Class::Local => self.local,
            Class::Pinned => self.pinned,
        }
    }

    pub(crate) fn get(&self, path: &Path) -> Option<&Entry> {
        self.entries.get(path)
    }

    /// Bytes and number of the partial files (of every class).
    pub(crate) fn partials(&self) -> (u64, usize) {
        (self.partial, self.partial_files)
    }

    fn account(&mut self, path: &Path, e: &Entry, add: bool) {
        if crate::fs::lazy::is_data_rel(path) {
            if add {
                self.partial += e.bytes;
                self.partial_files += 1;
            } else {
                self.partial -= e.bytes;
                self.partial_files -= 1;
            }
        }
        let slot = match e.class {
            Class::Clean => &mut self.clean,
            Class::Local => &mut self.local,
            Class::Pinned => &mut self.pinned,
        };
        if add {
            *slot += e.bytes;
            self.usage += e.bytes;
        } else {
            *slot -= e.bytes;
            self.usage -= e.bytes;
        }
    }

    /// Adds or replaces the entry for `path`.
    pub(crate) fn insert(&mut self, path: &Path, e: Entry) {
        self.remove(path);
        self.account(path, &e, true);
        if e.class == Class::Clean {
            self.order.insert((e.stamp, path.to_path_buf()));
        }
        self.entries.insert(path.to_path_buf(), e);
    }

    pub(crate) fn remove(&mut self, path: &Path) -> Option<Entry> {
        let old = self.entries.remove(path)?;
        self.account(path, &old, false);
        if old.class == Class::Clean {
            self.order.remove(&(old.stamp, path.to_path_buf()));
        }
        Some(old)
    }

    /// Records a use of `path` at `stamp` (never moving it back in time). Whether the
    /// index has the path.
    pub(crate) fn touch(&mut self, path: &Path, stamp: u64) -> bool {
        match self.entries.get(path).copied() {
            Some(e) if e.stamp < stamp => {
                self.insert(path, Entry { stamp, ..e });
                true
            }
            Some(_) => true,
            None => false,
        }
    }

    pub(crate) fn set_class(&mut self, path: &Path, class: Class) {
        if let Some(e) = self.entries.get(path).copied()
            && e.class != class
        {
            self.insert(path, Entry { class, ..e });
        }
    }

    /// Up to `n` evictable paths, least recently used first, skipping `skip`.
    pub(crate) fn oldest(&self, n: usize, skip: &impl Fn(&Path) -> bool) -> Vec<PathBuf> {
        self.order
            .iter()
            .map(|(_, p)| p)
            .filter(|p| !skip(p))
            .take(n)
            .cloned()
            .collect()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&PathBuf, &Entry)> {
        self.entries.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(bytes: u64, stamp: u64, class: Class) -> Entry {
        Entry {
            bytes,
            stamp,
            class,
        }
    }

    #[test]
    fn lru_order_and_accounting() {
        let mut ix = Index::new();
        ix.insert(Path::new("a"), e(10, 3, Class::Clean));
        ix.insert(Path::new("b"), e(20, 1, Class::Clean));
        ix.insert(Path::new("c"), e(30, 2, Class::Local));
        ix.insert(Path::new("d"), e(40, 0, Class::Pinned));
        assert_eq!(ix.usage(), 100);
        assert_eq!(ix.bytes_in(Class::Clean), 30);
        assert_eq!(ix.bytes_in(Class::Local), 30);
        assert_eq!(ix.bytes_in(Class::Pinned), 40);
        let none = |_: &Path| false;
        assert_eq!(ix.oldest(10, &none), vec![PathBuf::from("b"), "a".into()]);
        assert!(ix.touch(Path::new("b"), 5));
        assert!(!ix.touch(Path::new("zz"), 5));
        assert_eq!(ix.oldest(1, &none), vec![PathBuf::from("a")]);
        // Never back in time.
        ix.touch(Path::new("b"), 4);
        assert_eq!(ix.get(Path::new("b")).unwrap().stamp, 5);
        let skip_a = |p: &Path| p == Path::new("a");
        assert_eq!(ix.oldest(1, &skip_a), vec![PathBuf::from("b")]);
        ix.set_class(Path::new("a"), Class::Local);
        assert_eq!(ix.oldest(10, &none), vec![PathBuf::from("b")]);
        assert_eq!(ix.bytes_in(Class::Local), 40);
        assert_eq!(ix.remove(Path::new("b")).unwrap().bytes, 20);
        assert_eq!(ix.usage(), 80);
        assert!(ix.oldest(10, &none).is_empty());
        // Replacing an entry replaces its bytes.
        ix.insert(Path::new("a"), e(1, 9, Class::Clean));
        assert_eq!(ix.usage(), 71);
        assert_eq!(ix.len(), 3);
    }

    #[test]
    fn partial_files_are_ordinary_lru_entries_and_summed() {
        let mut ix = Index::new();
        let part = crate::fs::lazy::data_rel_of(Path::new("big"));
        ix.insert(Path::new("a"), e(10, 2, Class::Clean));
        ix.insert(&part, e(4096, 1, Class::Clean));
        assert_eq!(ix.partials(), (4096, 1));
        assert_eq!(ix.usage(), 4106);
        let none = |_: &Path| false;
        assert_eq!(ix.oldest(1, &none), vec![part.clone()]);
        ix.insert(&part, e(8192, 3, Class::Clean));
        assert_eq!(ix.partials(), (8192, 1));
        assert_eq!(ix.oldest(1, &none), vec![PathBuf::from("a")]);
        ix.remove(&part);
        assert_eq!(ix.partials(), (0, 0));
        assert_eq!(ix.usage(), 10);
    }
}
