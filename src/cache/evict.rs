//! The budget and eviction engine: room for what enters dst, within `--cache-size` and
//! `--min-free`.
//!
//! - A whole fetch gets room before it starts ([`Cache::make_room`], from the
//!   `before_open` hook): least recently used clean files and idle partials are evicted
//!   until it fits, or it fails with ENOSPC (without evicting anything) when even every
//!   evictable file would not make room.
//! - A lazy block fetch reserves its room ([`Cache::reserve`], evicting like a fetch) or,
//!   for read-ahead and background work, takes only room that is free
//!   ([`Cache::try_reserve`]); a [`Reserved`] counts as used (`pending`) until dropped,
//!   after the fetch reported the block's bytes.
//! - Every eviction goes through the core (`CacheFs::evict`, `CacheFs::evict_partial`),
//!   which refuses dirty, local, open and pending-writeback files; this part only picks
//!   the candidates (the LRU, [`BATCH`] at a time) and keeps the index and counters
//!   right whatever the outcome. Pinned paths are never evicted.
//!
//! Lock order: `evicting` (one eviction pass at a time) -> the core's locks (inside
//! `CacheFs::evict*`); `index` and `limits` are leaves, never held across a call into
//! the core or any I/O. `pending` changes only under `index`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::budget::{Space, human};
use super::lru::{Class, Entry, Index};
use super::{Cache, enospc, scan};
use crate::fs::{CacheFs, FsResult, lazy};

/// Candidates taken from the LRU per round of an eviction pass.
const BATCH: usize = 32;

/// Room reserved for a lazy block fetch; given back when dropped (after the fetch
/// reported the partial's new size).
pub(crate) struct Reserved {
    cache: Arc<Cache>,
    bytes: u64,
}

impl Drop for Reserved {
    fn drop(&mut self) {
        let _ix = self.cache.index.lock().unwrap();
        self.cache.pending.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

impl Cache {
    /// Before a lazy read fetches `bytes` of missing blocks of the partial `data_rel`:
    /// makes room for them (evicting like a fetch) and reserves it until the returned
    /// guard is dropped. ENOSPC when no room can be made.
    pub(crate) fn reserve(
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
    pub(crate) fn try_reserve(self: &Arc<Self>, bytes: u64) -> Option<Reserved> {
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
    pub(crate) fn make_room(&self, fs: &CacheFs, incoming: u64) -> Result<(), u64> {
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
    pub(crate) fn evict_now(
        &self,
        fs: &CacheFs,
        path: &Path,
        partial: bool,
    ) -> FsResult<Option<u64>> {
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
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::super::testutil::*;
    use super::*;
    use crate::fs::{Caller, OpenRequest, ROOT};

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
            // Two blocks between reads at least: a read one block past a fetch still
            // running joins it and fetches the block between (fetches linger under load).
            for b in [0, 3, 6, 9, 14] {
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
}
