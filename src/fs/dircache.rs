//! What the kernel may keep of a directory's listing between two opens.
//!
//! The FUSE adapter opens every directory the kernel opens with `FOPEN_CACHE_DIR`: the
//! kernel keeps the entries the daemon's readdir replies gave it (in the directory's
//! page cache) and serves the next listing from them. It drops them by itself when a
//! change goes through the mount (create, mknod, mkdir, symlink, link, unlink, rmdir,
//! rename in that directory bump its `i_version`, checked at each read from offset 0;
//! Linux `fs/fuse/dir.c` `fuse_dir_changed`, `fs/fuse/readdir.c`), and at every opendir
//! that does not answer `FOPEN_KEEP_CACHE`. This module decides that flag: an opendir
//! keeps the kernel's listing ([`DirCache::opened`] returns true) only when
//! - everything the kernel may hold of it came from listings that agree (one
//!   fingerprint of names, numbers and types: [`fingerprint`]),
//!   Since they agree, the kernel's copy is what the newest of them saw;
//! - one of them started after the last change the daemon learned of (a generation
//!   per directory, bumped by [`DirCache::changed`]; an epoch for every directory at
//!   once, bumped by [`DirCache::changed_everywhere`] and by each of the writeback's
//!   conflict copies, `cachefs_conflicts_total`), and
//! - that listing started less than `keep_for` ago: `--revalidate` (`0`: never kept;
//!   listings then reach the daemon at every open, as before), or `--attr-ttl` if
//!   shorter (see [`super::CacheFs::opendir_for_kernel`]).
//!
//! What the kernel may hold: entries of the replies sent on the directory's handles
//! since the last opendir that dropped its cache, plus whatever the handles still open
//! then may send later (a reply in flight included). So an opendir that does not keep
//! restarts the record from the listings of the handles still open, and every reply
//! adds its handle's listing to the record ([`DirCache::served`]). A handle whose
//! replies lacked entries of its listing ([`DirCache::incomplete`]) spoils the record
//! until it is closed.
//!
//! A handle the kernel holds open reads the kernel's copy at a rewind (`rewinddir`, a
//! seek to 0) without asking the daemon; so the copy of a directory held open is
//! dropped as soon as it may no longer be kept ([`DirCache::to_drop`]; the adapter
//! asks every [`DROP_EVERY`] and tells the kernel, `FUSE_NOTIFY_INVAL_INODE`).
//!
//! Conservative on purpose: a record that mixes listings that disagree is never kept
//! (a handle left open on an old listing keeps its directory listed at every open
//! until it is closed, if the listing changed meanwhile).
//!
//! State is kept per directory the kernel opened (by inode number, never reused, see
//! `inodes`); a directory with no state is never kept. Above [`MAX_DIRS`] entries, the
//! states of directories with no open handle are dropped (they are listed again once).
//!
//! Locking: `dirs` is a leaf lock, taken with no other core lock held.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::os::unix::ffi::OsStrExt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::Kind;

/// Directory states kept at most before the idle ones are dropped.
pub(super) const MAX_DIRS: usize = 16_384;

/// How often the adapter asks which open directories' copies to drop (a rewind may
/// see a listing this much older than the rule allows).
pub const DROP_EVERY: Duration = Duration::from_millis(200);

/// One listing the daemon took: what it showed, when it started, and the epoch and the
/// directory's generation then ([`DirCache::current`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Snap {
    pub(super) fingerprint: u64,
    pub(super) started: Instant,
    pub(super) epoch: u64,
    pub(super) generation: u64,
}

/// What the kernel may hold of one directory's listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fed {
    /// Nothing since the kernel last dropped it.
    Empty,
    /// Entries of listings with one fingerprint (so one content); the newest of them
    /// started at `newest`, the latest epoch and generation among them are these.
    Same {
        fingerprint: u64,
        newest: Instant,
        epoch: u64,
        generation: u64,
    },
    /// Listings that disagree, or entries a listing lacked: must be dropped.
    Poisoned,
}

impl Fed {
    fn add(self, s: Snap) -> Fed {
        match self {
            Fed::Empty => Fed::Same {
                fingerprint: s.fingerprint,
                newest: s.started,
                epoch: s.epoch,
                generation: s.generation,
            },
            Fed::Same {
                fingerprint,
                newest,
                epoch,
                generation,
            } if fingerprint == s.fingerprint => Fed::Same {
                fingerprint,
                newest: newest.max(s.started),
                epoch: epoch.max(s.epoch),
                generation: generation.max(s.generation),
            },
            _ => Fed::Poisoned,
        }
    }

    /// With what an open handle may still send.
    fn with(self, h: Handle) -> Fed {
        match h {
            Handle::Unread => self,
            Handle::Read(s) => self.add(s),
            Handle::Spoilt => Fed::Poisoned,
        }
    }
}

/// What one of the kernel's handles pages through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handle {
    /// No readdir yet.
    Unread,
    /// This listing.
    Read(Snap),
    /// Its replies lacked entries of its listing.
    Spoilt,
}

#[derive(Debug)]
struct DirState {
    fed: Fed,
    /// Bumped by [`DirCache::changed`].
    generation: u64,
    /// The kernel's open handles of the directory.
    open: Vec<(u64, Handle)>,
}

impl DirState {
    /// Whether the kernel may keep what it holds: see the module docs.
    fn keeps(&self, epoch: u64, every: Duration, now: Instant) -> bool {
        !every.is_zero()
            && matches!(self.fed, Fed::Same { newest, epoch: e, generation, .. }
                if e == epoch
                    && generation == self.generation
                    && now.saturating_duration_since(newest) < every)
    }
}

/// See the module docs.
#[derive(Debug, Default)]
pub(super) struct DirCache {
    epoch: AtomicU64,
    dirs: Mutex<HashMap<u64, DirState>>,
}

impl DirCache {
    /// The epoch a listing starting now belongs to: bumped by
    /// [`DirCache::changed_everywhere`] and by each conflict copy the writeback makes
    /// (a name that appears in src behind the kernel, in any directory).
    fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst) + crate::metrics::METRICS.conflicts.get()
    }

    /// The epoch and directory `ino`'s generation, for a listing of it starting now.
    pub(super) fn current(&self, ino: u64) -> (u64, u64) {
        let generation = self
            .dirs
            .lock()
            .unwrap()
            .get(&ino)
            .map_or(0, |s| s.generation);
        (self.epoch(), generation)
    }

    /// The kernel opens directory `ino` as handle `fh`: whether it may keep what it
    /// cached of the listing (`FOPEN_KEEP_CACHE`). `every`: the longest a listing is
    /// kept (zero: never).
    pub(super) fn opened(&self, ino: u64, fh: u64, every: Duration, now: Instant) -> bool {
        let epoch = self.epoch();
        let mut dirs = self.dirs.lock().unwrap();
        if dirs.len() >= MAX_DIRS && !dirs.contains_key(&ino) {
            dirs.retain(|_, s| !s.open.is_empty());
        }
        let st = dirs.entry(ino).or_insert_with(|| DirState {
            fed: Fed::Empty,
            generation: 0,
            open: Vec::new(),
        });
        let keep = st.keeps(epoch, every, now);
        if !keep {
            // The kernel drops its pages now; the handles still open may feed it again.
            st.fed = st.open.iter().fold(Fed::Empty, |f, (_, h)| f.with(*h));
        }
        st.open.push((fh, Handle::Unread));
        log::trace!("opendir {ino}: {:?}, keep: {keep}", st.fed);
        keep
    }

    /// The directories held open by the kernel whose cached listing it must drop now
    /// (stale, or changed since): the open handles would otherwise serve a rewind
    /// (`rewinddir`, a seek to 0) from it. The caller tells the kernel; the record
    /// restarts empty (as after an opendir that does not keep), so each drop is asked
    /// once.
    pub(super) fn to_drop(&self, every: Duration, now: Instant) -> Vec<u64> {
        let epoch = self.epoch();
        let mut out = Vec::new();
        for (ino, st) in self.dirs.lock().unwrap().iter_mut() {
            if st.open.is_empty() || st.fed == Fed::Empty || st.keeps(epoch, every, now) {
                continue;
            }
            st.fed = Fed::Empty;
            out.push(*ino);
        }
        out
    }

    /// A readdir reply of handle `fh` of directory `ino` is about to be sent, from the
    /// handle's listing `fresh` when it was just taken (offset 0), else from the one it
    /// took before.
    pub(super) fn served(&self, ino: u64, fh: u64, fresh: Option<Snap>) {
        let mut dirs = self.dirs.lock().unwrap();
        let Some(st) = dirs.get_mut(&ino) else {
            return;
        };
        let Some((_, h)) = st.open.iter_mut().find(|(h, _)| *h == fh) else {
            // Not a handle the kernel opened through `opened` (an internal listing).
            return;
        };
        if let Some(s) = fresh {
            *h = Handle::Read(s);
        }
        st.fed = match *h {
            Handle::Unread => Fed::Poisoned,
            h => st.fed.with(h),
        };
    }

    /// A reply of handle `fh` of directory `ino` lacked entries of its listing (the
    /// adapter could not look them up): the kernel's copy is not the listing.
    pub(super) fn incomplete(&self, ino: u64, fh: u64) {
        if let Some(st) = self.dirs.lock().unwrap().get_mut(&ino) {
            st.fed = Fed::Poisoned;
            if let Some((_, h)) = st.open.iter_mut().find(|(h, _)| *h == fh) {
                *h = Handle::Spoilt;
            }
        }
    }

    /// Handle `fh` of directory `ino` is released.
    pub(super) fn released(&self, ino: u64, fh: u64) {
        if let Some(st) = self.dirs.lock().unwrap().get_mut(&ino) {
            st.open.retain(|(h, _)| *h != fh);
        }
    }

    /// The daemon learned that directory `ino`'s listing changed (or may have) behind
    /// the kernel: its next opendir drops what the kernel cached.
    pub(super) fn changed(&self, ino: u64) {
        if let Some(st) = self.dirs.lock().unwrap().get_mut(&ino) {
            st.generation += 1;
        }
    }

    /// Like [`DirCache::changed`] for every directory (src came back or went offline,
    /// `cachefs ctl revalidate`).
    pub(super) fn changed_everywhere(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }
}

/// The fingerprint of a numbered listing: its names, inode numbers and types, in order
/// (what the kernel caches of it).
pub(super) fn fingerprint<'a>(items: impl Iterator<Item = (&'a OsStr, u64, Kind)>) -> u64 {
    let mut h = DefaultHasher::new();
    for (name, ino, kind) in items {
        name.as_bytes().hash(&mut h);
        ino.hash(&mut h);
        (kind as u8).hash(&mut h);
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    fn snap(c: &DirCache, ino: u64, fingerprint: u64, started: Instant) -> Snap {
        let (epoch, generation) = c.current(ino);
        Snap {
            fingerprint,
            started,
            epoch,
            generation,
        }
    }

    #[test]
    fn a_listing_is_kept_until_the_interval_ends() {
        let c = DirCache::default();
        let t0 = Instant::now();
        assert!(!c.opened(7, 1, MIN, t0), "nothing cached yet");
        c.served(7, 1, Some(snap(&c, 7, 1, t0)));
        c.served(7, 1, None);
        c.released(7, 1);
        assert!(c.opened(7, 2, MIN, t0 + Duration::from_secs(59)));
        c.released(7, 2);
        assert!(!c.opened(7, 3, MIN, t0 + MIN), "older than --revalidate");
        c.released(7, 3);
        assert!(
            !c.opened(7, 4, Duration::ZERO, t0),
            "--revalidate 0: never kept"
        );
    }

    #[test]
    fn listings_that_disagree_are_dropped() {
        let c = DirCache::default();
        let t0 = Instant::now();
        assert!(!c.opened(7, 1, MIN, t0));
        assert!(!c.opened(7, 2, MIN, t0));
        c.served(7, 1, Some(snap(&c, 7, 1, t0)));
        c.served(7, 2, Some(snap(&c, 7, 2, t0)));
        c.released(7, 1);
        c.released(7, 2);
        assert!(!c.opened(7, 3, MIN, t0));
        c.served(7, 3, Some(snap(&c, 7, 2, t0)));
        c.released(7, 3);
        assert!(c.opened(7, 4, MIN, t0), "one listing since the last drop");
    }

    #[test]
    fn listings_that_agree_count_from_the_newest() {
        let c = DirCache::default();
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(50);
        assert!(!c.opened(7, 1, MIN, t0));
        c.served(7, 1, Some(snap(&c, 7, 1, t0)));
        assert!(!c.opened(7, 2, Duration::ZERO, t1));
        c.served(7, 2, Some(snap(&c, 7, 1, t1)));
        c.released(7, 2);
        assert!(c.opened(7, 3, MIN, t0 + Duration::from_secs(100)));
    }

    #[test]
    fn a_handle_still_open_at_a_drop_still_counts() {
        let c = DirCache::default();
        let t0 = Instant::now();
        assert!(!c.opened(7, 1, MIN, t0));
        c.served(7, 1, Some(snap(&c, 7, 1, t0)));
        c.changed(7);
        // Handle 1 (the old listing) is still open when handle 2 drops the cache: it
        // may still feed it, so a newer listing next to it is no match.
        assert!(!c.opened(7, 2, MIN, t0));
        c.served(7, 2, Some(snap(&c, 7, 2, t0)));
        c.released(7, 2);
        assert!(!c.opened(7, 3, MIN, t0));
    }

    #[test]
    fn changes_drop_one_directory_or_all() {
        let c = DirCache::default();
        let t0 = Instant::now();
        for ino in [7, 8] {
            assert!(!c.opened(ino, ino, MIN, t0));
            c.served(ino, ino, Some(snap(&c, ino, 1, t0)));
            c.released(ino, ino);
        }
        c.changed(7);
        assert!(!c.opened(7, 1, MIN, t0));
        c.released(7, 1);
        assert!(c.opened(8, 2, MIN, t0));
        c.released(8, 2);
        c.changed_everywhere();
        assert!(!c.opened(8, 3, MIN, t0));
    }

    #[test]
    fn a_listing_that_started_before_a_change_is_stale() {
        let c = DirCache::default();
        let t0 = Instant::now();
        for change in [DirCache::changed_everywhere as fn(&DirCache), |c| {
            c.changed(7)
        }] {
            assert!(!c.opened(7, 1, MIN, t0));
            let before = snap(&c, 7, 1, t0);
            change(&c);
            // Recorded after the drop that the change causes, still stale.
            assert!(!c.opened(7, 2, MIN, t0));
            c.released(7, 2);
            c.served(7, 1, Some(before));
            c.released(7, 1);
            assert!(!c.opened(7, 3, MIN, t0));
            c.released(7, 3);
        }
    }

    #[test]
    fn an_incomplete_reply_spoils_the_record_until_its_handle_closes() {
        let c = DirCache::default();
        let t0 = Instant::now();
        assert!(!c.opened(7, 1, MIN, t0));
        c.served(7, 1, Some(snap(&c, 7, 1, t0)));
        c.incomplete(7, 1);
        assert!(!c.opened(7, 2, MIN, t0));
        c.served(7, 2, Some(snap(&c, 7, 1, t0)));
        c.released(7, 2);
        assert!(!c.opened(7, 3, MIN, t0), "handle 1 may still send");
        c.released(7, 1);
        c.served(7, 3, Some(snap(&c, 7, 1, t0)));
        c.released(7, 3);
        assert!(
            !c.opened(7, 4, MIN, t0),
            "handle 3 read after handle 1 spoilt it"
        );
        c.served(7, 4, Some(snap(&c, 7, 1, t0)));
        c.released(7, 4);
        assert!(c.opened(7, 5, MIN, t0));
    }

    #[test]
    fn an_open_directory_is_dropped_once_when_its_copy_may_not_be_kept() {
        let c = DirCache::default();
        let t0 = Instant::now();
        assert!(!c.opened(7, 1, MIN, t0));
        c.served(7, 1, Some(snap(&c, 7, 1, t0)));
        assert!(c.to_drop(MIN, t0).is_empty(), "fresh");
        assert_eq!(c.to_drop(MIN, t0 + MIN), [7], "older than the interval");
        assert!(c.to_drop(MIN, t0 + MIN).is_empty(), "asked once");
        c.served(7, 1, Some(snap(&c, 7, 1, t0 + MIN)));
        c.changed(7);
        assert_eq!(c.to_drop(MIN, t0 + MIN), [7], "changed");
        c.released(7, 1);
        c.changed_everywhere();
        assert!(c.to_drop(MIN, t0 + MIN).is_empty(), "no open handle");
    }

    #[test]
    fn internal_handles_do_not_count() {
        let c = DirCache::default();
        let t0 = Instant::now();
        c.served(7, 9, Some(snap(&c, 7, 1, t0)));
        assert!(!c.opened(7, 1, MIN, t0));
    }
}
