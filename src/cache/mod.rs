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

pub mod budget;
mod hooks;
pub mod lru;
pub mod pin;
pub mod scan;

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use budget::{Limits, Space, human, on_disk};
use lru::{Class, Entry, Index};
use pin::{PIN_XATTR, Pins};

use crate::config::Config;
use crate::fs::layer::{Layer, Stat};
use crate::fs::{CacheFs, FsError, FsResult, Kind, ROOT, lazy, names};

/// The cache's state, under dst's state folder.
pub const STATE_SUBDIR: &str = "cache";
/// The persisted last-use times (inside [`STATE_SUBDIR`]).
pub const LRU_FILE: &str = "lru";
/// The status file `cachefs status` prints (in the state folder itself).
pub const STATUS_FILE: &str = "cache.json";

/// Trim and status period of the maintenance thread.
const TICK: Duration = Duration::from_secs(1);
/// Shortest interval between two reconciling rescans of dst.
pub const RESCAN_MIN: Duration = Duration::from_secs(60);
/// How often pinned trees are walked again for new src files.
pub const PREFETCH_EVERY: Duration = Duration::from_secs(600);
/// How often the last-use times are persisted (and at shutdown).
const PERSIST_EVERY: Duration = Duration::from_secs(30);
/// How long after a pin xattr change the rescan waits (the hook runs just before the
/// change is made).
const SETTLE: Duration = Duration::from_millis(200);
/// Candidates taken from the LRU per round of an eviction pass.
const BATCH: usize = 32;

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

/// Room reserved for a lazy block fetch; given back when dropped (after the fetch
/// reported the partial's new size).
pub struct Reserved {
    cache: Arc<Cache>,
    bytes: u64,
}

impl Drop for Reserved {
    fn drop(&mut self) {
        let _ix = self.cache.index.lock().unwrap();
        self.cache.pending.fetch_sub(self.bytes, Ordering::AcqRel);
    }
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

    /// Before a lazy read fetches `bytes` of missing blocks of the partial `data_rel`:
    /// makes room for them (evicting like a fetch) and reserves it until the returned
    /// guard is dropped. ENOSPC when no room can be made.
    pub fn reserve(
        self: &Arc<Self>,
        fs: &CacheFs,
        data_rel: &Path,
        bytes: u64,
    ) -> FsResult<Option<Reserved>> {
        if !self.limits().any() || bytes == 0 {
            return Ok(None);
        }
        // Concurrent fetches may take the room made here first: try again a few times.
        for _ in 0..8 {
            if let Some(r) = self.try_reserve(bytes) {
                return Ok(Some(r));
            }
            if let Err(short) = self.make_room(fs, bytes) {
                let path = lazy::path_of(&self.dst, data_rel);
                let path = path.as_deref().unwrap_or(data_rel);
                return self.no_room(
                    format_args!("{} of {}", human(bytes), path.display()),
                    short,
                );
            }
        }
        self.counters.enospc.fetch_add(1, Ordering::Relaxed);
        log::warn!(
            "cannot fetch {} of {}: ENOSPC, concurrent fetches keep taking the room made",
            human(bytes),
            data_rel.display()
        );
        enospc()
    }

    /// Reserves `bytes` for a block fetch if they fit within the limits as they are
    /// (no eviction).
    pub fn try_reserve(self: &Arc<Self>, bytes: u64) -> Option<Reserved> {
        if !self.limits().any() {
            return Some(Reserved {
                cache: Arc::clone(self),
                bytes: 0,
            });
        }
        let space = self.space();
        let ix = self.index.lock().unwrap();
        if self.excess_locked(&ix, bytes, space) > 0 {
            return None;
        }
        self.pending.fetch_add(bytes, Ordering::AcqRel);
        Some(Reserved {
            cache: Arc::clone(self),
            bytes,
        })
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

    // ----- eviction --------------------------------------------------------------------

    fn space(&self) -> Option<Space> {
        self.limits().min_free?;
        self.dst.statvfs().ok().map(|s| Space::of(&s))
    }

    /// Bytes to free before `incoming` more bytes may enter dst (0: none). Room
    /// reserved for lazy fetches in flight counts as taken.
    fn excess(&self, incoming: u64) -> u64 {
        let space = self.space();
        self.excess_locked(&self.index.lock().unwrap(), incoming, space)
    }

    /// [`Cache::excess`] with `index` held (`pending` changes under it).
    fn excess_locked(&self, ix: &Index, incoming: u64, space: Option<Space>) -> u64 {
        let pending = self.pending.load(Ordering::Acquire);
        self.limits().excess(ix.usage(), incoming + pending, space)
    }

    /// Evicts least recently used clean, closed, unpinned files until `incoming` more
    /// bytes fit within the limits. `Err(bytes still missing)` when it cannot.
    pub fn make_room(&self, fs: &CacheFs, incoming: u64) -> Result<(), u64> {
        let need = self.excess(incoming);
        if need == 0 {
            return Ok(());
        }
        // A fetch that cannot fit even if every clean file went fails without evicting
        // anything, after checking that the files that cannot go are still there and
        // that big (deletes and truncates here pass through no hook). A trim
        // (`incoming` 0) gets as close to the limits as it can.
        // Either way, local files uploaded since become evictable here.
        if need > self.index.lock().unwrap().bytes_in(Class::Clean) {
            self.refresh_unevictable();
            let need = self.excess(incoming);
            if incoming > 0 && need > self.index.lock().unwrap().bytes_in(Class::Clean) {
                return Err(need);
            }
        }
        let _pass = self.evicting.lock().unwrap();
        let mut tried: HashSet<PathBuf> = HashSet::new();
        loop {
            let need = self.excess(incoming);
            if need == 0 {
                return Ok(());
            }
            let batch = self
                .index
                .lock()
                .unwrap()
                .oldest(BATCH, &|p| tried.contains(p));
            if batch.is_empty() {
                return Err(need);
            }
            for path in batch {
                tried.insert(path.clone());
                self.try_evict(fs, &path);
                if self.excess(incoming) == 0 {
                    return Ok(());
                }
            }
        }
    }

    /// Takes the sizes of the local and pinned files again (at most once a second), and
    /// moves local files that writeback has since uploaded (clean origin record, see
    /// `fs::origin`) to the evictable class.
    fn refresh_unevictable(&self) {
        {
            let mut last = self.refreshed.lock().unwrap();
            if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return;
            }
            *last = Some(Instant::now());
        }
        let stuck: Vec<(PathBuf, Class)> = {
            let ix = self.index.lock().unwrap();
            ix.iter()
                .filter(|(_, e)| e.class != Class::Clean)
                .map(|(p, e)| (p.clone(), e.class))
                .collect()
        };
        for (path, class) in stuck {
            let now = self.dst.stat(&path);
            let uploaded = class == Class::Local
                && matches!(crate::fs::origin::read(&self.dst, &path), Ok(Some(o)) if !o.dirty);
            let mut ix = self.index.lock().unwrap();
            match now {
                Ok(Some(st)) if st.st_mode & libc::S_IFMT == libc::S_IFREG => {
                    if let Some(e) = ix.get(&path).copied() {
                        ix.insert(
                            &path,
                            Entry {
                                bytes: st.st_blocks as u64 * 512,
                                class: if uploaded && e.class == Class::Local {
                                    Class::Clean
                                } else {
                                    e.class
                                },
                                ..e
                            },
                        );
                    }
                }
                Ok(_) => drop(ix.remove(&path)),
                Err(_) => {}
            }
        }
    }

    /// Evicts `path`'s clean copy (or, `partial`, its partial file) now, on request
    /// (`cachefs warmup --evict`), keeping the index and the counters right. Pinned
    /// paths stay (`None`), as does whatever [`CacheFs::evict`] refuses.
    pub fn evict_now(&self, fs: &CacheFs, path: &Path, partial: bool) -> FsResult<Option<u64>> {
        if self.is_pinned(path) {
            return Ok(None);
        }
        let _pass = self.evicting.lock().unwrap();
        let key = if partial {
            lazy::data_rel_of(path)
        } else {
            path.to_path_buf()
        };
        let r = if partial {
            fs.evict_partial(&key, Some(path))
        } else {
            fs.evict(path)
        };
        if let Ok(Some(freed)) = &r {
            self.index.lock().unwrap().remove(&key);
            self.counters.evictions.fetch_add(1, Ordering::Relaxed);
            crate::metrics::METRICS.evictions.inc();
            self.counters
                .evicted_bytes
                .fetch_add(*freed, Ordering::Relaxed);
        }
        r
    }

    /// Bytes the index counts as used in dst now.
    pub fn usage(&self) -> u64 {
        self.index.lock().unwrap().usage()
    }

    /// One eviction attempt; keeps the index right whatever the outcome.
    fn try_evict(&self, fs: &CacheFs, path: &Path) {
        if lazy::is_data_rel(path) {
            return self.try_evict_partial(fs, path);
        }
        if self.is_pinned(path) {
            self.index.lock().unwrap().set_class(path, Class::Pinned);
            return;
        }
        match fs.evict(path) {
            Ok(Some(freed)) => {
                self.index.lock().unwrap().remove(path);
                self.counters.evictions.fetch_add(1, Ordering::Relaxed);
                crate::metrics::METRICS.evictions.inc();
                self.counters
                    .evicted_bytes
                    .fetch_add(freed, Ordering::Relaxed);
                log::debug!("cache: evicted {} ({})", path.display(), human(freed));
            }
            Ok(None) => match self.dst.stat(path) {
                // Gone (deleted or renamed here): rescan finds its new name.
                Ok(None) => drop(self.index.lock().unwrap().remove(path)),
                // Changed here since: never evictable again.
                Ok(Some(_)) => {
                    let class = scan::classify(&self.dst, &self.pins, path, false);
                    if class != Class::Clean {
                        self.index.lock().unwrap().set_class(path, class);
                    }
                    // else: open, pending writeback or src offline: later.
                }
                Err(_) => {}
            },
            Err(e) => log::debug!("cache: cannot evict {}: {e}", path.display()),
        }
    }

    /// One eviction attempt of a partial file (its data file `data_rel`).
    fn try_evict_partial(&self, fs: &CacheFs, data_rel: &Path) {
        let path = lazy::path_of(&self.dst, data_rel);
        if path.as_ref().is_some_and(|p| self.is_pinned(p)) {
            self.index
                .lock()
                .unwrap()
                .set_class(data_rel, Class::Pinned);
            return;
        }
        match fs.evict_partial(data_rel, path.as_deref()) {
            Ok(Some(freed)) => {
                self.index.lock().unwrap().remove(data_rel);
                self.counters.evictions.fetch_add(1, Ordering::Relaxed);
                crate::metrics::METRICS.evictions.inc();
                self.counters
                    .evicted_bytes
                    .fetch_add(freed, Ordering::Relaxed);
                log::debug!(
                    "cache: evicted the partial file of {} ({})",
                    path.unwrap_or_else(|| data_rel.to_path_buf()).display(),
                    human(freed)
                );
            }
            Ok(None) => {} // open, being installed, or src offline: later
            Err(e) => log::debug!("cache: cannot evict {}: {e}", data_rel.display()),
        }
    }

    // ----- rescans and state -------------------------------------------------------------

    /// Walks dst and reconciles the index with it (`last_use`: persisted times, used
    /// for paths the index does not know).
    fn rescan(&self, last_use: &HashMap<PathBuf, u64>) {
        self.rescan_with(last_use, &mut |_, _| {});
    }

    /// [`Cache::rescan`], calling `tick(files, bytes)` as the walk counts files.
    fn rescan_with(&self, last_use: &HashMap<PathBuf, u64>, tick: &mut dyn FnMut(usize, u64)) {
        let started = Instant::now();
        let started_stamp = now_nanos();
        let found = scan::scan_with(&self.dst, &self.pins, last_use, tick);
        let mut fresh = Index::new();
        let mut ix = self.index.lock().unwrap();
        for (path, mut e) in found.entries {
            if let Some(old) = ix.get(&path) {
                e.stamp = e.stamp.max(old.stamp);
            }
            fresh.insert(&path, e);
        }
        // Fetched while the walk ran (behind it): keep.
        for (path, e) in ix.iter() {
            if fresh.get(path).is_none()
                && e.stamp >= started_stamp
                && self.dst.stat(path).is_ok_and(|s| s.is_some())
            {
                fresh.insert(path, *e);
            }
        }
        *ix = fresh;
        drop(ix);
        let mut info = self.scan_info.lock().unwrap();
        info.last = Some(Instant::now());
        info.took = started.elapsed();
        info.pinned_dirs = found.pinned_dirs;
        log::debug!("cache: rescanned dst in {:?}", info.took);
    }

    fn rescan_due(&self) -> bool {
        let info = self.scan_info.lock().unwrap();
        info.last
            .is_none_or(|t| t.elapsed() >= RESCAN_MIN.max(info.took * 20))
    }

    /// Persists the last-use times (best effort).
    pub fn persist(&self) {
        // Unchanged since the last write: no use was recorded (every use takes a stamp).
        let stamp = self.last_stamp.load(Ordering::Acquire);
        if self.persisted_stamp.swap(stamp, Ordering::AcqRel) == stamp && stamp != 0 {
            return;
        }
        let data = {
            let ix = self.index.lock().unwrap();
            scan::encode_last_use(ix.iter().map(|(p, e)| (p, e.stamp)))
        };
        if let Err(e) = scan::write_atomic(&self.lru_path(), &data) {
            log::debug!("cache: cannot persist the LRU: {e}");
        }
    }

    /// The numbers `cachefs status` shows, as one JSON object.
    pub fn status_json(&self) -> String {
        let (usage, files, clean, local, pinned, (partial, partial_files)) = {
            let ix = self.index.lock().unwrap();
            (
                ix.usage(),
                ix.len(),
                ix.bytes_in(Class::Clean),
                ix.bytes_in(Class::Local),
                ix.bytes_in(Class::Pinned),
                ix.partials(),
            )
        };
        let space = self.dst.statvfs().ok().map(|s| Space::of(&s));
        let opt = |v: Option<u64>| v.map_or("null".into(), |v| v.to_string());
        let c = &self.counters;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            concat!(
                "{{\"version\":1,\"updated_unix\":{},\"pid\":{},",
                "\"usage_bytes\":{},\"files\":{},\"clean_bytes\":{},\"local_bytes\":{},\"pinned_bytes\":{},",
                "\"partial_bytes\":{},\"partial_files\":{},",
                "\"budget_bytes\":{},\"min_free\":{},\"min_free_bytes\":{},\"free_bytes\":{},\"max_dirty_bytes\":{},",
                "\"pin_globs\":{},\"hits\":{},\"misses\":{},\"fetches\":{},\"fetched_bytes\":{},",
                "\"evictions\":{},\"evicted_bytes\":{},\"enospc\":{}}}\n"
            ),
            now_nanos() / 1_000_000_000,
            std::process::id(),
            usage,
            files,
            clean,
            local,
            pinned,
            partial,
            partial_files,
            opt(self.limits().budget),
            self.limits()
                .min_free
                .map_or("null".into(), |m| format!("\"{m}\"")),
            opt(self
                .limits()
                .min_free
                .zip(space)
                .map(|(m, s)| m.bytes_of(s.total))),
            opt(space.map(|s| s.avail)),
            opt(*self.max_dirty.lock().unwrap()),
            self.pins.len(),
            n(&c.hits),
            n(&c.misses),
            n(&c.fetches),
            n(&c.fetched_bytes),
            n(&c.evictions),
            n(&c.evicted_bytes),
            n(&c.enospc),
        )
    }

    /// Sets the cache gauges of [`crate::metrics::METRICS`] (usage, files, pinned and
    /// partial bytes, the limits, dst's free space): after the start-up scan and once
    /// a second from the maintenance thread.
    fn publish_metrics(&self) {
        let (usage, files, pinned, (partial, _)) = {
            let ix = self.index.lock().unwrap();
            (
                ix.usage(),
                ix.len(),
                ix.bytes_in(Class::Pinned),
                ix.partials(),
            )
        };
        let space = self.dst.statvfs().ok().map(|s| Space::of(&s));
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let m = &crate::metrics::METRICS;
        m.cache_usage_bytes.set(g(usage));
        m.cache_files.set(g(files as u64));
        m.cache_pinned_bytes.set(g(pinned));
        m.cache_partial_bytes.set(g(partial));
        let limits = self.limits();
        m.cache_budget_bytes.set(g(limits.budget.unwrap_or(0)));
        let min_free = limits.min_free.zip(space).map(|(m, s)| m.bytes_of(s.total));
        m.cache_min_free_bytes.set(g(min_free.unwrap_or(0)));
        if let Some(s) = space {
            m.dst_free_bytes.set(g(s.avail));
        }
    }

    /// Writes `cache.json` when its numbers changed, or a minute after the last write.
    fn write_status(&self) {
        let json = self.status_json();
        // Compare without the timestamp (the first field).
        let body = json
            .split_once(",\"pid\"")
            .map_or("", |(_, b)| b)
            .to_string();
        {
            let mut last = self.status_written.lock().unwrap();
            if let Some((t, prev)) = &*last
                && *prev == body
                && t.elapsed() < Duration::from_secs(60)
            {
                return;
            }
            *last = Some((Instant::now(), body));
        }
        let path = self.state_dir().join(STATUS_FILE);
        if let Err(e) = scan::write_atomic(&path, json.as_bytes()) {
            log::debug!("cache: cannot write {}: {e}", path.display());
        }
    }

    // ----- threads -----------------------------------------------------------------------

    /// Starts the maintenance and prefetch threads; they hold `fs` weakly and end
    /// when it is gone or at [`Cache::shutdown`].
    pub fn start(self: &Arc<Self>, fs: Weak<CacheFs>) {
        self.wake.lock().unwrap().prefetch = true;
        let (me, weak) = (Arc::clone(self), fs.clone());
        let spawned = std::thread::Builder::new()
            .name("cachefs-cache".into())
            .spawn(move || me.maintain(weak));
        if let Err(e) = spawned {
            log::error!("cache: cannot start the maintenance thread: {e}");
        }
        let me = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("cachefs-pins".into())
            .spawn(move || me.prefetch_loop(fs));
        if let Err(e) = spawned {
            log::error!("cache: cannot start the prefetch thread: {e}");
        }
    }

    /// Stops the threads and persists the state (at unmount).
    pub fn shutdown(&self) {
        self.wake.lock().unwrap().stop = true;
        self.wake_cv.notify_all();
        self.persist();
        *self.status_written.lock().unwrap() = None;
        self.write_status();
    }

    fn maintain(&self, fs: Weak<CacheFs>) {
        let mut last_persist = Instant::now();
        loop {
            let pins_changed = {
                let mut w = self.wake.lock().unwrap();
                let wait = match w.pins_changed {
                    Some(t) => SETTLE.saturating_sub(t.elapsed()),
                    None => TICK,
                };
                if !w.stop && !wait.is_zero() {
                    w = self.wake_cv.wait_timeout(w, wait).unwrap().0;
                }
                if w.stop {
                    return;
                }
                match w.pins_changed {
                    Some(t) if t.elapsed() >= SETTLE => w.pins_changed.take().is_some(),
                    _ => false,
                }
            };
            let Some(fs) = fs.upgrade() else { return };
            if pins_changed || self.rescan_due() {
                self.rescan(&HashMap::new());
            }
            if pins_changed {
                self.wake.lock().unwrap().prefetch = true;
                self.wake_cv.notify_all();
            }
            if self.limits().any()
                && let Err(short) = self.make_room(&fs, 0)
            {
                let mut warned = self.warned.lock().unwrap();
                if warned.is_none_or(|t| t.elapsed() > Duration::from_secs(300)) {
                    *warned = Some(Instant::now());
                    let ix = self.index.lock().unwrap();
                    log::warn!(
                        "cache is {} over its limits and nothing more can be evicted now: {} local (dirty), {} pinned, {} clean but open or pending writeback",
                        human(short),
                        human(ix.bytes_in(Class::Local)),
                        human(ix.bytes_in(Class::Pinned)),
                        human(ix.bytes_in(Class::Clean)),
                    );
                }
            }
            drop(fs);
            self.publish_metrics();
            self.write_status();
            if last_persist.elapsed() >= PERSIST_EVERY {
                last_persist = Instant::now();
                self.persist();
            }
        }
    }

    fn prefetch_loop(&self, fs: Weak<CacheFs>) {
        loop {
            {
                let mut w = self.wake.lock().unwrap();
                let deadline = Instant::now() + PREFETCH_EVERY;
                while !w.stop && !w.prefetch {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    w = self.wake_cv.wait_timeout(w, left).unwrap().0;
                }
                if w.stop {
                    return;
                }
                w.prefetch = false;
            }
            let Some(fs) = fs.upgrade() else { return };
            self.prefetch_pinned(&fs);
        }
    }

    fn stopping(&self) -> bool {
        self.wake.lock().unwrap().stop
    }

    /// Fetches every pinned src file dst lacks, walking the view under the glob roots
    /// and the pinned directories.
    pub fn prefetch_pinned(&self, fs: &CacheFs) {
        let mut roots: Vec<(PathBuf, bool)> = Vec::new();
        if !self.pins.is_empty() {
            roots.extend(self.pins.roots().iter().map(|r| (r.clone(), false)));
        }
        let dirs = self.scan_info.lock().unwrap().pinned_dirs.clone();
        roots.extend(dirs.into_iter().map(|d| (d, true)));
        if roots.is_empty() {
            return;
        }
        let mut fetched = 0u64;
        let mut bytes = 0u64;
        // `systemctl status` shows how far it got (after READY=1 too: no timeout then).
        let mut progress = crate::systemd::Progress::new("cache: prefetching pinned files", false);
        for (root, all) in roots {
            let Some(ino) = lookup_path(fs, &root) else {
                continue;
            };
            let mut visit = |ino: u64, path: &Path, size: u64| -> bool {
                if self.stopping() {
                    return false;
                }
                if !(all || self.pins.matches(path))
                    || self.dst.stat(path).is_ok_and(|s| s.is_some())
                {
                    return true;
                }
                // Whole files: a pinned file must not stay partially present.
                match fs.open_whole(ino) {
                    Ok(o) => {
                        let _ = fs.release(o.fh);
                        fetched += 1;
                        bytes += size;
                        progress.update(|| format!("{fetched} files, {} so far", human(bytes)));
                        true
                    }
                    Err(e) if e.errno() == libc::ENOSPC => {
                        log::warn!(
                            "cache: stopped prefetching pinned files at {}: no room within the cache limits",
                            path.display()
                        );
                        false
                    }
                    Err(e) => {
                        log::debug!("cache: cannot prefetch {}: {e}", path.display());
                        true
                    }
                }
            };
            let go_on = walk_view(fs, ino, &root, &mut visit);
            if ino != ROOT {
                fs.forget(ino, 1);
            }
            if !go_on {
                break;
            }
        }
        progress.finish(false, || {
            format!("done: {fetched} files, {}; serving", human(bytes))
        });
        if fetched > 0 {
            log::info!(
                "cache: prefetched {fetched} pinned file(s), {}",
                human(bytes)
            );
        }
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

/// `cachefs status`'s cache part: the text lines for `dst`'s `cache.json`, or `None`
/// when the cache never ran with a budget or pins there.
pub fn status_text(dst: &Path) -> Option<String> {
    let json = status_raw(dst)?;
    let num = |key: &str| -> Option<u64> {
        let at = json.find(&format!("\"{key}\":"))? + key.len() + 3;
        let rest = &json[at..];
        let end = rest.find([',', '}'])?;
        rest[..end].trim().parse().ok()
    };
    let text = |key: &str| -> Option<String> {
        let at = json.find(&format!("\"{key}\":\""))? + key.len() + 4;
        let rest = &json[at..];
        Some(rest[..rest.find('"')?].to_string())
    };
    let h = |v: Option<u64>| v.map_or("-".to_string(), human);
    let mut out = String::new();
    out += &format!(
        "cache: {} used in {} files (budget {}, min free {}, {} free on dst)\n",
        h(num("usage_bytes")),
        num("files").unwrap_or(0),
        num("budget_bytes").map_or("none".into(), human),
        text("min_free").unwrap_or_else(|| "none".into()),
        h(num("free_bytes")),
    );
    out += &format!(
        "cache: {} clean (evictable), {} local (not yet evictable), {} pinned\n",
        h(num("clean_bytes")),
        h(num("local_bytes")),
        h(num("pinned_bytes")),
    );
    if let Some(n) = num("partial_files").filter(|n| *n > 0) {
        out += &format!(
            "cache: {} of the usage in {n} partial file(s) of lazy fetch (evictable when not open)\n",
            h(num("partial_bytes")),
        );
    }
    out += &format!(
        "cache: since start: {} hits, {} misses, {} fetches ({}), {} evictions ({}), {} ENOSPC\n",
        num("hits").unwrap_or(0),
        num("misses").unwrap_or(0),
        num("fetches").unwrap_or(0),
        h(num("fetched_bytes")),
        num("evictions").unwrap_or(0),
        h(num("evicted_bytes")),
        num("enospc").unwrap_or(0),
    );
    if let Some(m) = num("max_dirty_bytes") {
        out += &format!("cache: --max-dirty {} (writers wait above it)\n", human(m));
    }
    Some(out)
}

/// The raw `cache.json` of `dst` (for `cachefs status --json`).
pub fn status_raw(dst: &Path) -> Option<String> {
    std::fs::read_to_string(dst.join(names::STATE_DIR).join(STATUS_FILE)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::{Caller, OpenRequest};

    const MIB: usize = 1 << 20;

    fn content(i: usize, len: usize) -> Vec<u8> {
        (0..len)
            .map(|j| (j.wrapping_mul(31) ^ i.wrapping_mul(97) ^ (j >> 11)) as u8)
            .collect()
    }

    struct Setup {
        _dirs: [tempfile::TempDir; 3],
        cfg: Config,
    }

    fn setup(files: usize) -> Setup {
        let dirs = [
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        ];
        for i in 0..files {
            std::fs::write(dirs[0].path().join(format!("f{i}")), content(i, MIB)).unwrap();
        }
        let cfg = Config::new(
            dirs[0].path().into(),
            dirs[1].path().into(),
            dirs[2].path().into(),
        );
        Setup { _dirs: dirs, cfg }
    }

    fn mount(cfg: &Config) -> (Arc<CacheFs>, Arc<Cache>) {
        let mut fs = CacheFs::new(cfg, None).unwrap();
        let cache = Cache::open(cfg).unwrap().expect("a cache");
        fs.set_cache(Arc::clone(&cache));
        (Arc::new(fs), cache)
    }

    fn read_file(fs: &CacheFs, name: &str) -> FsResult<Vec<u8>> {
        let ino = fs.lookup(ROOT, OsStr::new(name))?.ino;
        let req = OpenRequest {
            flags: libc::O_RDONLY,
            for_backing: false,
        };
        let opened = fs.open(ino, req);
        let out = opened.and_then(|o| {
            let data = fs.read(o.fh, 0, 4 * MIB as u32);
            fs.release(o.fh)?;
            data
        });
        fs.forget(ino, 1);
        out
    }

    /// Allocated bytes of dst's visible regular files.
    fn dst_usage(dst: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let mut total = 0;
        for e in std::fs::read_dir(dst).unwrap() {
            let e = e.unwrap();
            if names::is_reserved(&e.file_name()) {
                continue;
            }
            let m = e.metadata().unwrap();
            if m.is_file() {
                total += m.blocks() * 512;
            }
        }
        total
    }

    #[test]
    fn status_file_renders() {
        let mut s = setup(1);
        s.cfg.cache_size = Some(3 * MIB as u64);
        s.cfg.min_free = Some(budget::MinFree::Percent(5.0));
        s.cfg.max_dirty = Some(MIB as u64);
        let (fs, cache) = mount(&s.cfg);
        assert!(status_text(&s.cfg.dst).is_none());
        read_file(&fs, "f0").unwrap();
        cache.shutdown();
        let text = status_text(&s.cfg.dst).unwrap();
        assert!(
            text.contains("1M used in 1 files (budget 3M, min free 5%"),
            "{text}"
        );
        assert!(text.contains("0 hits, 1 misses, 1 fetches (1M)"), "{text}");
        assert!(text.contains("--max-dirty 1M (writers wait"), "{text}");
        assert!(
            status_raw(&s.cfg.dst)
                .unwrap()
                .contains("\"budget_bytes\":3145728")
        );
    }

    #[test]
    fn no_flags_no_cache() {
        let s = setup(0);
        assert!(Cache::open(&s.cfg).unwrap().is_none());
    }

    #[test]
    fn lru_eviction_keeps_the_budget_and_data_reads_back() {
        let mut s = setup(9);
        s.cfg.cache_size = Some(3 * MIB as u64 + 64 * 1024);
        let (fs, cache) = mount(&s.cfg);
        let evicted_before = crate::metrics::METRICS.evictions.get();
        for round in 0..2 {
            for i in 0..9 {
                let got = read_file(&fs, &format!("f{i}")).unwrap();
                assert!(got == content(i, MIB), "round {round} f{i}");
                let used = dst_usage(&s.cfg.dst);
                assert!(used <= s.cfg.cache_size.unwrap(), "{used}");
            }
        }
        // The most recent three are the ones cached.
        for i in 6..9 {
            assert!(s.cfg.dst.join(format!("f{i}")).exists(), "f{i}");
        }
        assert!(!s.cfg.dst.join("f0").exists());
        // A use moves a file to the back of the queue.
        read_file(&fs, "f6").unwrap();
        read_file(&fs, "f0").unwrap();
        assert!(s.cfg.dst.join("f6").exists() && !s.cfg.dst.join("f7").exists());
        let json = cache.status_json();
        assert!(json.contains("\"evictions\":"), "{json}");
        assert!(!json.contains("\"evictions\":0,"), "{json}");
        // cachefs_cache_evictions_total moves too (other tests may add to it).
        assert!(crate::metrics::METRICS.evictions.get() >= evicted_before + 6);
    }

    #[test]
    fn local_files_stay_and_fetches_fail_with_enospc_when_nothing_can_go() {
        let mut s = setup(3);
        s.cfg.cache_size = Some(2 * MIB as u64);
        let (fs, cache) = mount(&s.cfg);
        let caller = Caller { uid: 0, gid: 0 };
        let req = OpenRequest {
            flags: libc::O_RDWR,
            for_backing: false,
        };
        read_file(&fs, "f0").unwrap();
        let (attr, fh) = fs
            .create(caller, ROOT, OsStr::new("local"), 0o644, 0, req)
            .unwrap();
        fs.write(fh, 0, &content(7, 3 * MIB / 2)).unwrap();
        fs.release(fh).unwrap();
        fs.forget(attr.ino, 1);
        // The local file is over budget with f0: f0 goes, the local file stays, and f1
        // cannot fit next to it.
        let e = read_file(&fs, "f1").unwrap_err();
        assert_eq!(e.errno(), libc::ENOSPC);
        // Nothing was evicted for a fetch that could not fit anyway...
        assert!(s.cfg.dst.join("f0").exists());
        // ...but the background trim brings the cache back within its budget.
        assert_eq!(cache.make_room(&fs, 0), Ok(()));
        assert!(!s.cfg.dst.join("f0").exists());
        assert!(!s.cfg.dst.join("f1").exists());
        assert_eq!(
            std::fs::read(s.cfg.dst.join("local")).unwrap(),
            content(7, 3 * MIB / 2)
        );
    }

    #[test]
    fn pinned_files_are_never_evicted() {
        let mut s = setup(6);
        s.cfg.cache_size = Some(3 * MIB as u64);
        s.cfg.pins = vec!["f0".into()];
        std::fs::create_dir(s.cfg.src.join("d")).unwrap();
        std::fs::write(s.cfg.src.join("d/x"), content(9, MIB)).unwrap();
        let (fs, cache) = mount(&s.cfg);
        cache.prefetch_pinned(&fs);
        assert!(s.cfg.dst.join("f0").exists(), "prefetched");
        // Pin d/ by xattr (as setfattr through the mount does).
        let d = fs.lookup(ROOT, OsStr::new("d")).unwrap().ino;
        fs.setxattr(d, OsStr::new(PIN_XATTR), b"1", 0).unwrap();
        cache.rescan(&HashMap::new());
        cache.prefetch_pinned(&fs);
        assert!(s.cfg.dst.join("d/x").exists(), "prefetched by xattr");
        for i in 1..6 {
            read_file(&fs, &format!("f{i}")).unwrap();
        }
        assert!(s.cfg.dst.join("f0").exists() && s.cfg.dst.join("d/x").exists());
        assert!(s.cfg.dst.join("f5").exists());
        // Unpinned: evictable again.
        fs.removexattr(d, OsStr::new(PIN_XATTR)).unwrap();
        cache.rescan(&HashMap::new());
        read_file(&fs, "f1").unwrap();
        assert!(!s.cfg.dst.join("d/x").exists());
        fs.forget(d, 1);
    }

    /// Allocated bytes of dst's partial data files.
    fn partial_usage(dst: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let Ok(rd) = std::fs::read_dir(dst.join(lazy::lazy_dir())) else {
            return 0;
        };
        rd.flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".data"))
            .map(|e| e.metadata().unwrap().blocks() * 512)
            .sum()
    }

    const KIB: u64 = 1024;

    /// Lazy fetch of 1 MiB files in 64 KiB blocks under a 512 KiB budget.
    fn lazy_setup(files: usize) -> Setup {
        let mut s = setup(files);
        s.cfg.cache_size = Some(512 * KIB);
        s.cfg.lazy_threshold = 256 * KIB;
        s.cfg.block_size = 64 * KIB;
        s
    }

    fn open_ro(fs: &CacheFs, name: &str) -> (u64, u64) {
        let ino = fs.lookup(ROOT, OsStr::new(name)).unwrap().ino;
        let req = OpenRequest {
            flags: libc::O_RDONLY,
            for_backing: false,
        };
        let o = fs.open(ino, req).unwrap();
        assert!(o.lazy, "{name} is opened lazily");
        (ino, o.fh)
    }

    fn close(fs: &CacheFs, (ino, fh): (u64, u64)) {
        fs.release(fh).unwrap();
        fs.forget(ino, 1);
    }

    /// Reads 4 KiB at block `b` (+ 100 bytes) of file `i` through handle `fh`.
    fn read_block(fs: &CacheFs, fh: u64, i: usize, b: u64) -> FsResult<()> {
        let off = b * 64 * KIB + 100;
        let got = fs.read(fh, off, 4096)?;
        let want = &content(i, MIB)[off as usize..off as usize + 4096];
        assert!(got == want, "f{i} block {b}: bytes differ from src");
        Ok(())
    }

    #[test]
    fn partial_files_count_and_idle_ones_are_evicted_lru_first() {
        let s = lazy_setup(6);
        let (fs, cache) = mount(&s.cfg);
        let budget = s.cfg.cache_size.unwrap();
        let block = s.cfg.block_size;
        // f0 stays open all along: 3 blocks of it.
        let held = open_ro(&fs, "f0");
        for b in [1, 7, 12] {
            read_block(&fs, held.1, 0, b).unwrap();
        }
        let held_data = s.cfg.dst.join(lazy::data_rel_of(Path::new("f0")));
        for i in 1..6 {
            let h = open_ro(&fs, &format!("f{i}"));
            for b in [0, 3, 5, 9, 14] {
                read_block(&fs, h.1, i, b).unwrap();
                let used = partial_usage(&s.cfg.dst) + dst_usage(&s.cfg.dst);
                assert!(used <= budget + block, "f{i} block {b}: {used} used");
                assert_eq!(cache.index.lock().unwrap().usage(), used);
            }
            close(&fs, h);
            // The held partial keeps its blocks and reads on.
            read_block(&fs, held.1, 0, 7).unwrap();
            assert!(held_data.exists());
        }
        // 5 files x 5 blocks went through a budget of 8 blocks: the oldest idle
        // partials went, the newest stays, the held one too.
        for gone in ["f1", "f2", "f3"] {
            let d = s.cfg.dst.join(lazy::data_rel_of(Path::new(gone)));
            assert!(!d.exists(), "{gone}'s partial was evicted");
            assert!(!d.with_extension("map").exists());
        }
        assert!(s.cfg.dst.join(lazy::data_rel_of(Path::new("f5"))).exists());
        assert_eq!(
            cache.index.lock().unwrap().partials().0,
            partial_usage(&s.cfg.dst)
        );
        let json = cache.status_json();
        assert!(!json.contains("\"evictions\":0,"), "{json}");
        assert!(
            json.contains(&format!("\"usage_bytes\":{}", partial_usage(&s.cfg.dst))),
            "{json}"
        );
        // An evicted file starts over with a fresh partial.
        let h = open_ro(&fs, "f1");
        read_block(&fs, h.1, 1, 3).unwrap();
        close(&fs, h);
        for b in [1, 7, 12, 15] {
            read_block(&fs, held.1, 0, b).unwrap();
        }
        close(&fs, held);
    }

    #[test]
    fn a_partial_bigger_than_the_budget_opens_and_fails_with_enospc_only_when_full() {
        let s = lazy_setup(2);
        let (fs, cache) = mount(&s.cfg);
        // Whole-file room would be 1 MiB > 512 KiB: a lazy open needs none.
        let held = open_ro(&fs, "f0");
        for b in 0..8 {
            read_block(&fs, held.1, 0, b).unwrap();
        }
        // The budget is full of blocks of the open f0: a new block has no room.
        let e = read_block(&fs, held.1, 0, 9).unwrap_err();
        assert_eq!(e.errno(), libc::ENOSPC);
        let other = open_ro(&fs, "f1");
        let e = read_block(&fs, other.1, 1, 0).unwrap_err();
        assert_eq!(e.errno(), libc::ENOSPC);
        // Nothing was lost: present blocks still read.
        for b in 0..8 {
            read_block(&fs, held.1, 0, b).unwrap();
        }
        assert!(cache.status_json().contains("\"enospc\":2"));
        // Closed, f0's partial may go: f1 reads.
        close(&fs, held);
        read_block(&fs, other.1, 1, 0).unwrap();
        assert!(!s.cfg.dst.join(lazy::data_rel_of(Path::new("f0"))).exists());
        close(&fs, other);
    }

    #[test]
    fn restart_counts_partial_files_from_disk() {
        let s = lazy_setup(1);
        {
            let (fs, cache) = mount(&s.cfg);
            let h = open_ro(&fs, "f0");
            for b in [2, 4] {
                read_block(&fs, h.1, 0, b).unwrap();
            }
            close(&fs, h);
            cache.persist();
        }
        let (_fs, cache) = mount(&s.cfg);
        let ix = cache.index.lock().unwrap();
        assert_eq!(ix.partials(), (partial_usage(&s.cfg.dst), 1));
        assert!(ix.partials().0 >= 2 * 64 * KIB);
        assert_eq!(
            ix.oldest(1, &|_| false),
            vec![lazy::data_rel_of(Path::new("f0"))]
        );
    }

    #[test]
    fn restart_rebuilds_usage_and_lru_order() {
        let mut s = setup(4);
        s.cfg.cache_size = Some(3 * MIB as u64 + 64 * 1024);
        {
            let (fs, cache) = mount(&s.cfg);
            for i in [0, 1, 2] {
                read_file(&fs, &format!("f{i}")).unwrap();
            }
            read_file(&fs, "f0").unwrap(); // f1 is now the oldest
            cache.persist();
        }
        let (fs, cache) = mount(&s.cfg);
        let usage = cache.index.lock().unwrap().usage();
        assert_eq!(usage, dst_usage(&s.cfg.dst));
        assert!(usage >= 3 * MIB as u64);
        read_file(&fs, "f3").unwrap();
        assert!(!s.cfg.dst.join("f1").exists());
        assert!(s.cfg.dst.join("f0").exists() && s.cfg.dst.join("f2").exists());
    }
}
