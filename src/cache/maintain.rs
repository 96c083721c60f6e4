//! The maintenance thread (`cachefs-cache`) and the cache's persisted state: once a
//! [`TICK`] it trims dst to the limits, rescans dst when due (or after a pin xattr
//! changed), publishes the cache gauges, writes `cache.json` and persists the last-use
//! times (every [`PERSIST_EVERY`]). Start and stop of both cache threads.
//!
//! Invariants:
//! - A rescan rebuilds the index from dst: stamps only move forward, and files fetched
//!   while the walk ran (stamped after it started) are kept.
//! - The threads hold the core weakly: they end when it is gone or at
//!   [`Cache::shutdown`], which persists the LRU and writes `cache.json` a last time.
//!
//! Lock order: `wake` and `scan_info` are leaves; `index` is taken alone (never with
//! `wake`); no lock is held across a rescan walk, an eviction pass or a file write.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::budget::human;
use super::lru::{Class, Index};
use super::{Cache, RESCAN_MIN, now_nanos, scan};
use crate::fs::CacheFs;

/// Trim and status period of the maintenance thread.
const TICK: Duration = Duration::from_secs(1);
/// How often the last-use times are persisted (and at shutdown).
const PERSIST_EVERY: Duration = Duration::from_secs(30);
/// How long after a pin xattr change the rescan waits (the hook runs just before the
/// change is made).
const SETTLE: Duration = Duration::from_millis(200);

impl Cache {
    /// Walks dst and reconciles the index with it (`last_use`: persisted times, used
    /// for paths the index does not know).
    pub(super) fn rescan(&self, last_use: &HashMap<PathBuf, u64>) {
        self.rescan_with(last_use, &mut |_, _| {});
    }

    /// [`Cache::rescan`], calling `tick(files, bytes)` as the walk counts files.
    pub(super) fn rescan_with(
        &self,
        last_use: &HashMap<PathBuf, u64>,
        tick: &mut dyn FnMut(usize, u64),
    ) {
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
    pub(crate) fn persist(&self) {
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

    /// Starts the maintenance and prefetch threads; they hold `fs` weakly and end
    /// when it is gone or at [`Cache::shutdown`].
    pub(crate) fn start(self: &Arc<Self>, fs: Weak<CacheFs>) {
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
    pub(crate) fn shutdown(&self) {
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
            // cache.json first: a scraper that sees the new gauges finds them there too.
            self.write_status();
            self.publish_metrics();
            if last_persist.elapsed() >= PERSIST_EVERY {
                last_persist = Instant::now();
                self.persist();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::testutil::*;
    use crate::fs::lazy;

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
