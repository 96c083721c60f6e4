//! What the core tells the cache budget, through an interface it owns: [`CacheHooks`]
//! is implemented by the cache (`src/cache/`), so the core never names it. The core
//! holds `Option<Arc<dyn CacheHooks>>`: `None` without a budget or pins, and then every
//! hook below costs nothing (arguments that take work are closures, only called when
//! there is a cache).
//!
//! `on_open` and `on_lazy_fetch` may evict through the core (`CacheFs::evict`,
//! `CacheFs::evict_partial`) to make room, so the core calls them with no core lock
//! held; the other hooks take no core lock (the cache's own leaf locks, dst I/O).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::layer::Stat;
use super::{CacheFs, FsResult};

/// The cache budget's side of the core's calls (implemented by the cache).
pub trait CacheHooks: Send + Sync {
    /// At the top of `CacheFs::open`, before the core takes any lock: records the use
    /// of `path` and, for a file dst does not have yet, makes room for it (ENOSPC when
    /// none can be made). `lazy_from`: the open may be lazy for files at least this
    /// large.
    fn on_open(&self, fs: &CacheFs, ino: u64, path: &Path, lazy_from: Option<u64>) -> FsResult<()>;
    /// Before a lazy read fetches `bytes` of missing blocks of the partial `data_rel`:
    /// makes room and reserves it; the guard is held until the fetch is done.
    fn on_lazy_fetch(
        self: Arc<Self>,
        fs: &CacheFs,
        data_rel: &Path,
        bytes: u64,
    ) -> FsResult<Option<Box<dyn Send>>>;
    /// Before background prefetch fetches `bytes`: a guard to hold across the fetch
    /// when they fit without evicting, `None` to skip it.
    fn on_prefetch(self: Arc<Self>, bytes: u64) -> Option<Box<dyn Send>>;
    /// A handle on the partial file `data_rel` closed.
    fn on_partial_used(&self, data_rel: &Path);
    /// A copy-up put `path` in dst, with this stat.
    fn on_fetched(&self, path: &Path, st: &Stat);
    /// A handle on `path` closed (`CacheFs::release`).
    fn on_release(&self, path: &Path);
    /// An xattr named `name` is being set or removed.
    fn on_xattr(&self, name: &OsStr);
}

/// The cache hooks a core holds (`None`: no cache).
pub(super) type Hooks = Option<Arc<dyn CacheHooks>>;

/// See [`CacheHooks::on_open`]; `path` is only resolved when there is a cache.
#[inline]
pub(super) fn on_open(
    cache: &Hooks,
    fs: &CacheFs,
    ino: u64,
    lazy_from: Option<u64>,
    path: impl FnOnce() -> FsResult<PathBuf>,
) -> FsResult<()> {
    match cache {
        Some(c) => c.on_open(fs, ino, &path()?, lazy_from),
        None => Ok(()),
    }
}

/// See [`CacheHooks::on_lazy_fetch`]; `missing()` (the bytes to fetch) is only asked
/// with a cache. Hold the guard until the fetch is done.
#[inline]
pub(super) fn on_lazy_fetch(
    cache: &Hooks,
    fs: &CacheFs,
    data_rel: &Path,
    missing: impl FnOnce() -> u64,
) -> FsResult<Option<Box<dyn Send>>> {
    match cache {
        Some(c) => Arc::clone(c).on_lazy_fetch(fs, data_rel, missing()),
        None => Ok(None),
    }
}

/// See [`CacheHooks::on_prefetch`]; always a guard without a cache.
#[inline]
pub(super) fn on_prefetch(cache: &Hooks, bytes: u64) -> Option<Box<dyn Send>> {
    match cache {
        Some(c) => Arc::clone(c).on_prefetch(bytes),
        None => Some(Box::new(())),
    }
}

/// See [`CacheHooks::on_partial_used`].
#[inline]
pub(super) fn on_partial_used(cache: &Hooks, data_rel: &Path) {
    if let Some(c) = cache {
        c.on_partial_used(data_rel);
    }
}

/// See [`CacheHooks::on_fetched`].
#[inline]
pub(super) fn on_fetched(cache: &Hooks, path: &Path, st: &Stat) {
    if let Some(c) = cache {
        c.on_fetched(path, st);
    }
}

/// See [`CacheHooks::on_release`]; `path` is only resolved when there is a cache, and
/// a path that no longer resolves is not reported.
#[inline]
pub(super) fn on_release(cache: &Hooks, path: impl FnOnce() -> FsResult<PathBuf>) {
    if let Some(c) = cache
        && let Ok(p) = path()
    {
        c.on_release(&p);
    }
}

/// See [`CacheHooks::on_xattr`].
#[inline]
pub(super) fn on_xattr(cache: &Hooks, name: &OsStr) {
    if let Some(c) = cache {
        c.on_xattr(name);
    }
}
