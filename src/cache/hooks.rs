//! The cache's side of the core's [`CacheHooks`]: each hook hands over to the
//! `Cache` method that does the work (see the module docs of `cache` for what each
//! one decides).

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;

use super::Cache;
use crate::fs::layer::Stat;
use crate::fs::{CacheFs, CacheHooks, FsResult};

impl CacheHooks for Cache {
    /// See [`Cache::before_open`].
    fn on_open(&self, fs: &CacheFs, ino: u64, path: &Path, lazy_from: Option<u64>) -> FsResult<()> {
        self.before_open(fs, ino, path, lazy_from)
    }

    /// See [`Cache::reserve`].
    fn on_lazy_fetch(
        self: Arc<Self>,
        fs: &CacheFs,
        data_rel: &Path,
        bytes: u64,
    ) -> FsResult<Option<Box<dyn Send>>> {
        Ok(self
            .reserve(fs, data_rel, bytes)?
            .map(|r| Box::new(r) as Box<dyn Send>))
    }

    /// See [`Cache::try_reserve`].
    fn on_prefetch(self: Arc<Self>, bytes: u64) -> Option<Box<dyn Send>> {
        self.try_reserve(bytes)
            .map(|r| Box::new(r) as Box<dyn Send>)
    }

    /// See [`Cache::partial_used`].
    fn on_partial_used(&self, data_rel: &Path) {
        self.partial_used(data_rel);
    }

    /// See [`Cache::fetched`].
    fn on_fetched(&self, path: &Path, st: &Stat) {
        self.fetched(path, st);
    }

    /// See [`Cache::released`].
    fn on_release(&self, path: &Path) {
        self.released(path);
    }

    /// See [`Cache::xattr_changed`].
    fn on_xattr(&self, name: &OsStr) {
        self.xattr_changed(name);
    }
}
