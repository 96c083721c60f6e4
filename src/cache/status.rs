//! What the cache shows: `cache.json` in dst's state folder (written by the
//! maintenance thread when its numbers change, or a minute after the last write, and at
//! shutdown), the cache gauges of [`crate::metrics::METRICS`], and `cachefs status`'s
//! cache part read back from `cache.json` ([`status_text`], [`status_raw`]).
//!
//! Invariants: `cache.json` is replaced whole (temp + rename); its numbers are a
//! snapshot of the index taken under `index` (a leaf), with the counters since start.
//! Lock order: `index`, `limits`, `max_dirty` and `status_written` are leaves, each
//! taken alone.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::budget::{Space, human};
use super::lru::Class;
use super::{Cache, STATUS_FILE, now_nanos, scan};
use crate::fs::names;

impl Cache {
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
    pub(super) fn publish_metrics(&self) {
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
    pub(super) fn write_status(&self) {
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
}

/// `cachefs status`'s cache part: the text lines for `dst`'s `cache.json`, or `None`
/// when the cache never ran with a budget or pins there.
pub fn status_text(dst: &Path) -> Option<String> {
    let json = status_raw(dst)?;
    // A file that is not JSON shows no numbers, like a file without the keys.
    let json: Value = serde_json::from_str(&json).unwrap_or(Value::Null);
    let num = |key: &str| json.get(key).and_then(Value::as_u64);
    let text = |key: &str| json.get(key).and_then(Value::as_str).map(str::to_string);
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
    use super::super::testutil::*;
    use super::*;
    use crate::cache::budget;

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
}
