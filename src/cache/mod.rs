//! The bounded cache: usage tracking of dst, LRU eviction under `--cache-size` and
//! `--min-free`, pinning (`--pin`, the `user.cachefs.pin` xattr) with background
//! prefetch, and the state file `dst/.cachefs-state/cache.json` for `cachefs status`.
//!
//! How it meets the core (`fs`): the core holds an `Option<Arc<Cache>>` (none without a
//! budget or pins: zero cost) and calls three hooks:
//! - [`Cache::before_open`] at the top of `CacheFs::open`, before the core takes any
//!   lock: records the use (LRU), and for a file that is not in dst yet makes room for
//!   it first, evicting least recently used clean files, or fails with ENOSPC when even
//!   evicting every evictable file would not make room.
//! - [`Cache::fetched`] after every copy-up (`CacheFs::ensure_in_dst`): the new file's
//!   bytes join the usage.
//! - [`Cache::xattr_changed`] from setxattr/removexattr: a pin xattr changed, so the
//!   pins are read again and pinned trees are prefetched.
//!
//! Partial files of lazy fetch (`fs::lazy`, issue 5) are cache entries too, under
//! their data file's dst-relative name `.cachefs-state/lazy/<key>.data`:
//! - the cache is their [`crate::fs::lazy::Usage`] hook: a partial made, loaded or
//!   grown by a fetched block reports its allocated bytes (a use), a discarded,
//!   installed or evicted one is removed;
//! - a lazy open does not make room for the whole file (it may be larger than the
//!   budget); instead [`Cache::reserve`] runs before a read fetches missing blocks:
//!   it makes room for them like a fetch (evicting clean files and idle partials) and
//!   reserves the bytes until the fetch reported them, so concurrent fetches cannot
//!   all take the same room; with no room to be made the read fails with ENOSPC.
//!   Background prefetch only reserves room that is free without evicting
//!   ([`Cache::try_reserve`]), else it is skipped;
//! - they are evicted with the clean files, least recently used first (a use: an
//!   open or close of a handle on it, or a block fetched), through
//!   [`CacheFs::evict_partial`], which refuses a partial held by a handle or being
//!   installed. Partials of pinned paths are never tried.
//!
//! Eviction always goes through [`CacheFs::evict`] (or `evict_partial`), which refuses
//! dirty, local, open and pending-writeback files by construction; this module only
//! decides what to try and when. Pinned files are never tried.
//!
//! Usage: the sum of the allocated bytes of every regular file in dst outside the
//! reserved names, clean or local, and of the partial files' data files. Copy-ups,
//! block fetches and evictions update it at once; other
//! growth (local writes, which pass through no hook, e.g. under FUSE passthrough) is
//! picked up by a reconciling rescan of dst, every [`RESCAN_MIN`] or 20 times as long
//! as the last scan took. `--min-free` is checked against statvfs of dst at every
//! decision, so it reacts to local writes at once.
//!
//! Threads: `cachefs-cache` (once a second: trim to the limits, rescan when due,
//! publish the cache gauges of `metrics`, write `cache.json`, persist the LRU) and `cachefs-pins` (prefetch of pinned src
//! files through the core's public API, at start, after a pin xattr change and every
//! [`PREFETCH_EVERY`]).
//!
//! Lock order: `evicting` -> (the core's locks, inside `CacheFs::evict` and
//! `CacheFs::evict_partial`) ; `index`, `wake` and `scan_info` are leaf locks, never
//! held across a call into the core or any I/O. The lazy [`crate::fs::lazy::Usage`]
//! hook takes `index` under a partial's state lock (and the lazy table), as a leaf.
//!
//! `--max-dirty` is enforced by the writeback queue (`Writeback::throttle`); the cache
//! only shows the limit in `cache.json`.
//!
//! Parts: this file holds the [`Cache`] itself (its state, start-up, the hooks the core
//! calls, the limits) and the core's one-line `on_*` hooks; `evict` the budget and
//! eviction engine (room for fetches, reservations for lazy blocks, LRU eviction
//! passes); `maintain` the maintenance thread, rescans of dst and the persisted last-use
//! times; `prefetch` the prefetch of pinned files; `status` `cache.json`, the cache
//! gauges of `metrics` and `cachefs status`'s cache part; `budget`, `lru`, `pin` and
//! `scan` the plain parts underneath (limits, the usage index, pins, the walk of dst).

pub mod budget;
mod hooks;
pub mod lru;
pub mod pin;
pub mod scan;

mod evict;
mod maintain;
mod prefetch;
mod status;
#[cfg(test)]
mod testutil;

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use budget::{Limits, human, on_disk};
use lru::{Class, Entry, Index};
use pin::{PIN_XATTR, Pins};

use crate::config::Config;
use crate::fs::layer::{Layer, Stat};
use crate::fs::{CacheFs, FsError, FsResult, Kind, ROOT, lazy, names};

pub use evict::Reserved;
pub use status::{status_raw, status_text};

/// The cache's state, under dst's state folder.
pub const STATE_SUBDIR: &str = "cache";
/// The persisted last-use times (inside [`STATE_SUBDIR`]).
pub const LRU_FILE: &str = "lru";
/// The status file `cachefs status` prints (in the state folder itself).
pub const STATUS_FILE: &str = "cache.json";

/// Shortest interval between two reconciling rescans of dst.
pub const RESCAN_MIN: Duration = Duration::from_secs(60);
/// How often pinned trees are walked again for new src files.
pub const PREFETCH_EVERY: Duration = Duration::from_secs(600);

/// Counters since start (shown by `cachefs status`).
#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    fetches: AtomicU64,
    fetched_bytes: AtomicU64,
    evictions: AtomicU64,
    evicted_bytes: AtomicU64,
    enospc: AtomicU64,
}

#[derive(Debug, Default)]
struct Wake {
    stop: bool,
    /// When a pin xattr changed (rescan, then prefetch). The hook runs just before
    /// the change, so the rescan waits [`SETTLE`] after it.
    pins_changed: Option<Instant>,
    /// For the prefetch thread: walk the pinned trees now.
    prefetch: bool,
}

#[derive(Debug, Default)]
struct ScanInfo {
    last: Option<Instant>,
    took: Duration,
    /// Topmost dst directories with the pin xattr.
    pinned_dirs: Vec<PathBuf>,
}

/// The bounded cache of one mount. See the module docs.
pub struct Cache {
    dst: Layer,
    dst_path: PathBuf,
    /// `--cache-size` and `--min-free`; changed at runtime by [`Cache::set_limits`]
    /// (a leaf lock).
    limits: Mutex<Limits>,
    pins: Pins,
    /// `--max-dirty`, for `cache.json` (enforced by writeback). A leaf lock.
    max_dirty: Mutex<Option<u64>>,
    index: Mutex<Index>,
    /// Held by whoever runs an eviction pass (one at a time).
    evicting: Mutex<()>,
    counters: Counters,
    wake: Mutex<Wake>,
    wake_cv: Condvar,
    scan_info: Mutex<ScanInfo>,
    last_stamp: AtomicU64,
    /// Last time the "over budget and nothing to evict" warning was logged.
    warned: Mutex<Option<Instant>>,
    /// Last [`Cache::refresh_unevictable`].
    refreshed: Mutex<Option<Instant>>,
    /// `last_stamp` at the last persist of the LRU.
    persisted_stamp: AtomicU64,
    /// When `cache.json` was last written, and its numbers then.
    status_written: Mutex<Option<(Instant, String)>>,
    /// Bytes reserved for lazy block fetches in flight ([`Cache::reserve`]): counted as
    /// used until the fetch reported them. Changed under `index`.
    pending: AtomicU64,
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn enospc<T>() -> FsResult<T> {
    Err(FsError::Denied(libc::ENOSPC))
}

impl Cache {
    /// Builds the cache for `cfg` when it asks for a budget, a free-space floor or
    /// pins (`None` otherwise: the core then runs no cache code at all), and rebuilds
    /// the usage index by walking dst.
    pub fn open(cfg: &Config) -> io::Result<Option<Arc<Cache>>> {
        let limits = Limits {
            budget: cfg.cache_size,
            min_free: cfg.min_free,
        };
        if !limits.any() && cfg.pins.is_empty() && cfg.max_dirty.is_none() {
            return Ok(None);
        }
        let pins = Pins::new(&cfg.pins).map_err(io::Error::other)?;
        let cache = Cache {
            dst: Layer::open(&cfg.dst)?,
            dst_path: cfg.dst.clone(),
            limits: Mutex::new(limits),
            pins,
            max_dirty: Mutex::new(cfg.max_dirty),
            index: Mutex::new(Index::new()),
            evicting: Mutex::new(()),
            counters: Counters::default(),
            wake: Mutex::new(Wake::default()),
            wake_cv: Condvar::new(),
            scan_info: Mutex::new(ScanInfo::default()),
            last_stamp: AtomicU64::new(0),
            warned: Mutex::new(None),
            refreshed: Mutex::new(None),
            persisted_stamp: AtomicU64::new(0),
            status_written: Mutex::new(None),
            pending: AtomicU64::new(0),
        };
        let persisted = std::fs::read(cache.lru_path())
            .map(|d| scan::decode_last_use(&d))
            .unwrap_or_default();
        // Before READY=1: a large dst takes a while; systemd hears how far it got and
        // extends the start timeout while the walk moves (see `crate::systemd`).
        let mut progress = crate::systemd::Progress::new("cache: scanning dst", true);
        let started = Instant::now();
        cache.rescan_with(&persisted, &mut |files, bytes| {
            progress.update(|| format!("{files} files, {} so far", human(bytes)))
        });
        let (files, usage) = {
            let ix = cache.index.lock().unwrap();
            (ix.len(), ix.usage())
        };
        progress.finish(false, || {
            format!(
                "done: {files} files, {} in {:.1}s",
                human(usage),
                started.elapsed().as_secs_f64()
            )
        });
        let ix = cache.index.lock().unwrap();
        log::info!(
            "cache: {} in {} files in dst (budget {}, min free {}, {} pinned, {} local); {} pin glob(s)",
            human(ix.usage()),
            ix.len(),
            limits.budget.map_or("none".into(), human),
            limits.min_free.map_or("none".into(), |m| m.to_string()),
            human(ix.bytes_in(Class::Pinned)),
            human(ix.bytes_in(Class::Local)),
            cfg.pins.len(),
        );
        drop(ix);
        cache.publish_metrics();
        Ok(Some(Arc::new(cache)))
    }

    fn state_dir(&self) -> PathBuf {
        self.dst_path.join(names::STATE_DIR)
    }

    fn lru_path(&self) -> PathBuf {
        self.state_dir().join(STATE_SUBDIR).join(LRU_FILE)
    }

    /// A fresh, strictly increasing last-use stamp.
    fn stamp(&self) -> u64 {
        let now = now_nanos();
        let prev = self.last_stamp.fetch_max(now, Ordering::AcqRel);
        if prev >= now {
            self.last_stamp.fetch_add(1, Ordering::AcqRel) + 1
        } else {
            now
        }
    }

    // ----- hooks called by the core --------------------------------------------------

    /// Hook at the top of `CacheFs::open` (no core lock held): records the use of
    /// `path`, and before a fetch of a file dst does not have yet, makes room for it.
    /// Fails with ENOSPC when the limits cannot be met even by evicting every clean,
    /// closed, unpinned file. `lazy_from`: the open may be lazy for files at least
    /// this large; such a file gets no room now (its blocks do, as they are fetched),
    /// only the use of its partial is recorded.
    pub fn before_open(
        &self,
        fs: &CacheFs,
        ino: u64,
        path: &Path,
        lazy_from: Option<u64>,
    ) -> FsResult<()> {
        let stamp = self.stamp();
        if self.index.lock().unwrap().touch(path, stamp) {
            self.counters.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        if let Ok(Some(st)) = self.dst.stat(path) {
            // In dst but not indexed yet (created here since the last scan).
            if st.st_mode & libc::S_IFMT == libc::S_IFREG {
                self.add(path, &st, stamp);
            }
            self.counters.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let attr = match fs.getattr(ino, None) {
            Ok(a) if a.kind == Kind::File => a,
            _ => return Ok(()), // not a file to fetch; open says what is wrong
        };
        self.counters.misses.fetch_add(1, Ordering::Relaxed);
        if lazy_from.is_some_and(|t| attr.size >= t) {
            self.index
                .lock()
                .unwrap()
                .touch(&lazy::data_rel_of(path), stamp);
            return Ok(());
        }
        if !self.limits().any() {
            return Ok(());
        }
        let need = on_disk(attr.size);
        if let Err(short) = self.make_room(fs, need) {
            return self.no_room(
                format_args!("{} ({})", path.display(), human(attr.size)),
                short,
            );
        }
        Ok(())
    }

    /// ENOSPC for a fetch of `what` that the limits leave no room for (`short` bytes
    /// missing), counted and logged with what dst holds.
    fn no_room<T>(&self, what: std::fmt::Arguments<'_>, short: u64) -> FsResult<T> {
        self.counters.enospc.fetch_add(1, Ordering::Relaxed);
        let ix = self.index.lock().unwrap();
        log::warn!(
            "cannot fetch {what}: ENOSPC, the cache limits leave no room ({} short; dst holds {}: {} local, {} pinned, {} clean but open or pending, {} in partial files)",
            human(short),
            human(ix.usage()),
            human(ix.bytes_in(Class::Local)),
            human(ix.bytes_in(Class::Pinned)),
            human(ix.bytes_in(Class::Clean)),
            human(ix.partials().0),
        );
        enospc()
    }

    /// Hook after a copy-up put src's file at `path` into dst (`st`: dst's stat).
    pub fn fetched(&self, path: &Path, st: &Stat) {
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return;
        }
        self.counters.fetches.fetch_add(1, Ordering::Relaxed);
        self.counters
            .fetched_bytes
            .fetch_add(st.st_size as u64, Ordering::Relaxed);
        self.add(path, st, self.stamp());
    }

    /// Hook when a file handle is closed: the file may have grown or been created
    /// here (writes, also under passthrough, pass through no other hook), so its size
    /// is taken again.
    pub fn released(&self, path: &Path) {
        let Ok(Some(st)) = self.dst.stat(path) else {
            return;
        };
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return;
        }
        let bytes = st.st_blocks as u64 * 512;
        let mut ix = self.index.lock().unwrap();
        match ix.get(path).copied() {
            Some(e) if e.bytes == bytes => {}
            Some(e) => ix.insert(path, Entry { bytes, ..e }),
            None => {
                drop(ix);
                self.add(path, &st, self.stamp());
            }
        }
    }

    /// Hook from setxattr/removexattr (any node): a pin xattr change makes the
    /// maintenance thread rescan dst and the prefetch thread walk the pinned trees.
    pub fn xattr_changed(&self, name: &OsStr) {
        if name == PIN_XATTR {
            self.wake.lock().unwrap().pins_changed = Some(Instant::now());
        }
    }

    fn add(&self, path: &Path, st: &Stat, stamp: u64) {
        let class = scan::classify(&self.dst, &self.pins, path, self.pinned_above(path));
        self.index.lock().unwrap().insert(
            path,
            Entry {
                bytes: st.st_blocks as u64 * 512,
                stamp,
                class,
            },
        );
    }

    /// Whether an ancestor directory of `path` in dst carries the pin xattr.
    fn pinned_above(&self, path: &Path) -> bool {
        path.parent()
            .is_some_and(|p| pin::pinned_by_xattr(&self.dst, p))
    }

    /// Records a use of a partial file (a handle on it closed).
    pub fn partial_used(&self, data_rel: &Path) {
        let stamp = self.stamp();
        self.index.lock().unwrap().touch(data_rel, stamp);
    }

    /// The limits in force.
    fn limits(&self) -> Limits {
        *self.limits.lock().unwrap()
    }

    /// Changes `--cache-size` and `--min-free` at runtime (`None`: no limit) and wakes
    /// the maintenance thread, which evicts down to the new limits within a tick.
    pub fn set_limits(&self, budget: Option<u64>, min_free: Option<budget::MinFree>) {
        *self.limits.lock().unwrap() = Limits { budget, min_free };
        *self.status_written.lock().unwrap() = None;
        self.wake_cv.notify_all();
    }

    /// `--cache-size` and `--min-free` in force.
    pub fn current_limits(&self) -> (Option<u64>, Option<budget::MinFree>) {
        let l = self.limits();
        (l.budget, l.min_free)
    }

    /// The `--max-dirty` shown in `cache.json` (writeback enforces it).
    pub fn set_max_dirty_shown(&self, max_dirty: Option<u64>) {
        *self.max_dirty.lock().unwrap() = max_dirty;
        *self.status_written.lock().unwrap() = None;
    }

    /// Whether `path` is pinned now (glob, or xattr on it or an ancestor).
    pub fn is_pinned(&self, path: &Path) -> bool {
        self.pins.matches(path) || pin::pinned_by_xattr(&self.dst, path)
    }

    /// Bytes the index counts as used in dst now.
    pub fn usage(&self) -> u64 {
        self.index.lock().unwrap().usage()
    }
}

/// The inode of mount-relative `path`, with one lookup reference the caller forgets
/// (none for the root).
fn lookup_path(fs: &CacheFs, path: &Path) -> Option<u64> {
    let mut ino = ROOT;
    for comp in path.components() {
        let next = fs.lookup(ino, comp.as_os_str()).ok();
        if ino != ROOT {
            fs.forget(ino, 1);
        }
        ino = next?.ino;
    }
    Some(ino)
}

/// Walks the view below directory `dir` (inode `ino`), calling `visit(ino, path,
/// size)` for each regular file; `false` from `visit` stops the walk (returned).
fn walk_view(
    fs: &CacheFs,
    ino: u64,
    dir: &Path,
    visit: &mut dyn FnMut(u64, &Path, u64) -> bool,
) -> bool {
    let items = match fs.opendir(ino) {
        Ok(fh) => {
            let items = fs.readdir(fh, 0);
            fs.releasedir(fh);
            match items {
                Ok(i) => i,
                Err(_) => return true,
            }
        }
        Err(_) => return true,
    };
    for item in items.iter() {
        if item.kind != Kind::File && item.kind != Kind::Dir {
            continue;
        }
        let Ok(attr) = fs.lookup(ino, &item.name) else {
            continue;
        };
        let path = dir.join(&item.name);
        let go_on = match attr.kind {
            Kind::Dir => walk_view(fs, attr.ino, &path, visit),
            Kind::File => visit(attr.ino, &path, attr.size),
            _ => true,
        };
        fs.forget(attr.ino, 1);
        if !go_on {
            return false;
        }
    }
    true
}

impl lazy::Usage for Cache {
    fn partial_grew(&self, data_rel: &Path, path: &Path, bytes: u64) {
        let stamp = self.stamp();
        let mut ix = self.index.lock().unwrap();
        let e = match ix.get(data_rel).copied() {
            Some(e) => Entry {
                bytes,
                stamp: e.stamp.max(stamp),
                ..e
            },
            // Globs only here (no I/O under the partial's lock); a pin xattr is
            // checked before any eviction.
            None => Entry {
                bytes,
                stamp,
                class: if self.pins.matches(path) {
                    Class::Pinned
                } else {
                    Class::Clean
                },
            },
        };
        ix.insert(data_rel, e);
    }

    fn partial_gone(&self, data_rel: &Path) {
        self.index.lock().unwrap().remove(data_rel);
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;

    #[test]
    fn no_flags_no_cache() {
        let s = setup(0);
        assert!(Cache::open(&s.cfg).unwrap().is_none());
    }
}
