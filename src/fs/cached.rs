//! What dst holds and how it stays right: copy-up of src's files and directories into
//! dst (single flight per path under `copy_flights`), lazy partial files, revalidation
//! of clean cached copies against src (refetched when src changed, dropped when src
//! deleted them), eviction for the cache budget (never a dirty, open or pending file),
//! and the read-only answers for `cachefs ctl state`. Invariant: a partial file is not
//! at its dst path; for the view it is src-only until a copy-up installs it.

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::layer::Stat;
use super::src_calls::is_outage;
use super::view::{Layered, denied, ident, is_dir};
use super::{CacheFs, FsError, FsResult, Kind, copyup, hooks, lazy, names, origin};

/// What revalidation did to a cached file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Freshness {
    Unchanged,
    Refetched,
    /// src deleted it and the clean cached copy was dropped.
    Gone,
}

/// What dst holds for one mount path ([`CacheFs::cached_state`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cached {
    /// Nothing: the path is served from src (or does not exist).
    No,
    /// A directory.
    Dir,
    /// A regular file; `clean` when it is an unchanged copy of src's version (an
    /// origin record), else local or changed here (dirty).
    File { bytes: u64, clean: bool },
    /// A partial file of lazy fetch: `present` of `size` bytes fetched.
    Partial { present: u64, size: u64 },
    /// A symlink or special file.
    Other,
}

impl CacheFs {
    /// Makes sure directory `path` (visible in the view) exists in dst, creating it and
    /// its missing ancestors with src's attributes. Returns dst's stat of it.
    pub(super) fn ensure_dst_dir(&self, path: &Path) -> FsResult<Stat> {
        match self.dst.stat(path)? {
            Some(st) if is_dir(&st) => return Ok(st),
            Some(_) => return denied(libc::ENOTDIR),
            None => {}
        }
        if let Some(parent) = path.parent() {
            self.ensure_dst_dir(parent)?;
        }
        let st = self.src_stat(path)?.ok_or_else(FsError::not_found)?;
        if !is_dir(&st) {
            return denied(libc::ENOTDIR);
        }
        copyup::copy_entry(
            &self.src,
            &self.dst,
            path,
            &st,
            copyup::CopyOpts::default(),
            None,
        )?;
        self.dst.stat(path)?.ok_or_else(FsError::not_found)
    }

    /// Makes sure the non-directory at `path` is in dst (single flight per path).
    /// `limit` caps the bytes copied (for a truncate). Returns dst's stat.
    pub(super) fn ensure_in_dst(
        &self,
        ino: u64,
        path: &Path,
        limit: Option<u64>,
    ) -> FsResult<Stat> {
        if let Some(st) = self.dst.stat(path)? {
            crate::metrics::cache_hit();
            return Ok(st);
        }
        {
            let mut flights = self.copy_flights.lock().unwrap();
            while flights.contains(path) {
                flights = self.copy_done.wait(flights).unwrap();
            }
            if let Some(st) = self.dst.stat(path)? {
                return Ok(st);
            }
            flights.insert(path.to_path_buf());
        }
        let result =
            crate::metrics::timed(crate::metrics::SrcOp::Fetch, || self.copy_up(path, limit));
        self.copy_flights.lock().unwrap().remove(path);
        self.copy_done.notify_all();
        let (st, copied) = result?;
        crate::metrics::cache_miss(copied);
        hooks::on_fetched(&self.cache, path, &st);
        let mut t = self.inodes.lock().unwrap();
        t.set_dst_ident(ino, ident(&st));
        t.mark_checked(ino);
        Ok(st)
    }

    /// Copies `path` from src into dst: its stat in dst, and the bytes of file data this
    /// read from src itself (0 when a lazy fetch completed: its block reads count
    /// their own bytes, see `metrics::lazy_fetched`).
    pub(super) fn copy_up(&self, path: &Path, limit: Option<u64>) -> FsResult<(Stat, u64)> {
        let st = self.src_stat(path)?.ok_or_else(FsError::not_found)?;
        if let Some(parent) = path.parent() {
            self.ensure_dst_dir(parent)?;
        }
        if let Some(lazy) = &self.lazy
            && st.st_mode & libc::S_IFMT == libc::S_IFREG
            && lazy.has(path)
            && let Some(p) = lazy.take(path, &st, || self.open_src_file(path))
        {
            log::debug!("copy-up {} (completing its lazy fetch)", path.display());
            return match self.install_partial(&p, path, &st, limit) {
                Ok(()) => Ok((self.dst.stat(path)?.ok_or_else(FsError::not_found)?, 0)),
                Err(e) => {
                    lazy.put_back(p);
                    Err(e)
                }
            };
        }
        log::debug!("copy-up {}", path.display());
        let opts = copyup::CopyOpts {
            limit,
            replace: false,
        };
        self.copy_from_src(path, st, opts)?;
        // File data only (a directory's or symlink's size is not data read).
        let copied = match limit {
            _ if st.st_mode & libc::S_IFMT != libc::S_IFREG => 0,
            Some(l) => l.min(st.st_size as u64),
            None => st.st_size as u64,
        };
        Ok((self.dst.stat(path)?.ok_or_else(FsError::not_found)?, copied))
    }

    /// Fetches what a partially present file still lacks (up to `limit`) and installs
    /// it at `path` as dst's copy; handles reading it go on with the same bytes.
    fn install_partial(
        &self,
        p: &Arc<lazy::Partial>,
        path: &Path,
        st: &Stat,
        limit: Option<u64>,
    ) -> FsResult<()> {
        self.src_gate()?;
        let end = limit.unwrap_or(p.size).min(p.size);
        // Streams read what is missing in order; fails only after --src-timeout
        // without progress.
        let fetched = p.ensure(0, end);
        self.note_if_timed_out(&fetched, path);
        if fetched.as_ref().err().is_none_or(is_outage) {
            crate::metrics::METRICS.src_result(&fetched);
        }
        self.src_result(fetched)?;
        p.seal();
        let r = copyup::install_staged(&self.dst, p.src(), p.data_rel(), path, st, limit);
        match r {
            Ok(()) => {
                self.lazy.as_ref().unwrap().installed(p);
                Ok(())
            }
            Err(e) => {
                p.unseal();
                Err(e.into())
            }
        }
    }

    /// src's file at `path`, read-only (O_NOATIME where allowed), on the src pool.
    fn open_src_file(&self, path: &Path) -> FsResult<File> {
        let p = path.to_path_buf();
        self.src_do(crate::metrics::SrcOp::Fetch, path, move |s| {
            match s.open_file(&p, libc::O_RDONLY | libc::O_NOATIME) {
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => s.open_file(&p, libc::O_RDONLY),
                r => r,
            }
        })
    }

    /// Opens the src file at `path` for a lazy fetch if it is one (large enough, no
    /// copy in dst): the partial file, made now if needed. `None`: open it as usual.
    pub(super) fn lazy_open(&self, path: &Path) -> FsResult<Option<Arc<lazy::Partial>>> {
        let Some(lazy) = &self.lazy else {
            return Ok(None);
        };
        let Some(st) = self.src_stat(path)? else {
            return Ok(None);
        };
        if !lazy.applies(&st) {
            return Ok(None);
        }
        let src_file = self.open_src_file(path)?;
        let partial = {
            let mut flights = self.copy_flights.lock().unwrap();
            while flights.contains(path) {
                flights = self.copy_done.wait(flights).unwrap();
            }
            if self.dst.stat(path)?.is_some() {
                return Ok(None);
            }
            lazy.open_or_create(path, &st, move || Ok(src_file))?
        };
        // Fully fetched: installed as a normal cached file by the usual open.
        Ok((!partial.complete()).then_some(partial))
    }

    /// Copies src's entry `st` at `path` into dst on the src pool, watched for
    /// progress: a large file may take longer than the timeout.
    fn copy_from_src(&self, path: &Path, st: Stat, opts: copyup::CopyOpts) -> FsResult<()> {
        self.src_gate()?;
        let progress = Arc::new(AtomicU64::new(0));
        let (src, dst, p, counter) = (
            Arc::clone(&self.src),
            Arc::clone(&self.dst),
            path.to_path_buf(),
            Arc::clone(&progress),
        );
        let copied = self.src_pool.run_watched(Some(progress), move || {
            copyup::copy_entry(&src, &dst, &p, &st, opts, Some(&counter))
        });
        self.note_if_timed_out(&copied, path);
        // Timed by the caller (`SrcOp::Fetch`); dst's own errors (ENOSPC) are not src's.
        if copied.as_ref().err().is_none_or(is_outage) {
            crate::metrics::METRICS.src_result(&copied);
        }
        self.src_result(copied)
    }

    /// Drops dst's copy at `path` if it is a clean cached copy with no open handle and
    /// src, asked now, has nothing there. Whether it was dropped.
    ///
    /// The caller saw `path` missing from a src listing, but that listing may predate
    /// the record: with `-w`, an upload that finished while the listing ran records
    /// its file clean, and src has it. So src is asked again after the record was
    /// read, and a copy src shows now is kept. An answer that does not come in time
    /// counts as the listing's: the copy goes, as the lookup's own revalidation would
    /// decide a moment later (a listing must not show a name its lookup then drops).
    pub(super) fn drop_if_clean(&self, path: &Path) -> bool {
        if !matches!(self.origins.get(path), Ok(Some(o)) if !o.dirty) {
            return false;
        }
        let ino = self.inodes.lock().unwrap().ino_of(path);
        if ino.is_some_and(|i| self.has_open_handles(i)) {
            return false;
        }
        if matches!(self.src_stat_for_revalidation(path), Some(Ok(Some(_)))) {
            return false;
        }
        log::info!(
            "{}: gone from src, dropping the cached copy",
            path.display()
        );
        if self.dst.unlink(path).is_err() {
            return false;
        }
        let _ = self.origins.clear(path);
        self.inodes.lock().unwrap().detach_path(path);
        true
    }

    /// Evicts dst's copy of the regular file at `path` (a cache budget decision): the
    /// entry becomes src-backed again, keeping its inode number, and is refetched on
    /// its next open. Only a clean copy (fetched from src, unchanged here, nothing
    /// pending for writeback) that is not open and that src still has is evicted.
    /// Returns the bytes freed in dst, or `None` when the file must stay.
    /// Never waits for the namespace: with a long copy-up in progress the eviction is
    /// skipped (the budget thread tries again), instead of stalling the mount behind it.
    pub(crate) fn evict(&self, path: &Path) -> FsResult<Option<u64>> {
        let Ok(_ns) = self.namespace.try_write() else {
            return Ok(None);
        };
        let Some(st) = self.dst.stat(path)? else {
            return Ok(None);
        };
        if st.st_mode & libc::S_IFMT != libc::S_IFREG
            || !matches!(self.origins.get(path)?, Some(o) if !o.dirty)
            || self.changes.as_ref().is_some_and(|c| c.has_pending(path))
        {
            return Ok(None);
        }
        let ino = self.inodes.lock().unwrap().ino_of(path);
        if ino.is_some_and(|i| self.has_open_handles(i)) || self.src_offline.load(Ordering::Relaxed)
        {
            return Ok(None);
        }
        // src must still have a file there, or the entry would vanish from the view.
        match self.src_stat(path) {
            Ok(Some(s)) if s.st_mode & libc::S_IFMT == libc::S_IFREG => {}
            _ => return Ok(None),
        }
        self.src_absent.forget(path);
        self.src_ahead.forget(path);
        self.dst.unlink(path)?;
        self.origins.clear(path)?;
        if let Some(ino) = ino {
            self.inodes.lock().unwrap().clear_dst_ident(ino);
        }
        log::debug!("evicted {}", path.display());
        Ok(Some(st.st_blocks as u64 * 512))
    }

    /// Evicts an idle partial file of lazy fetch (a cache budget decision): its data
    /// file `data_rel`, of the mount path `path` its map names. Refused (`None`) while
    /// a handle or a prefetch holds it, while a copy-up of `path` runs (it may be
    /// installing it), and while src is offline (its blocks could not be fetched
    /// again). Returns the bytes freed in dst.
    pub(crate) fn evict_partial(
        &self,
        data_rel: &Path,
        path: Option<&Path>,
    ) -> FsResult<Option<u64>> {
        let Some(lazy) = &self.lazy else {
            return Ok(None);
        };
        if self.src_offline.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let flights = self.copy_flights.lock().unwrap();
        if path.is_some_and(|p| flights.contains(p)) {
            return Ok(None);
        }
        let freed = lazy.evict_idle(data_rel)?;
        drop(flights);
        if freed.is_some() {
            log::debug!("evicted the partial file {}", data_rel.display());
        }
        Ok(freed)
    }

    /// The `--revalidate` interval in force (zero: never).
    pub(crate) fn revalidate_every(&self) -> Duration {
        Duration::from_nanos(self.revalidate_ns.load(Ordering::Relaxed))
    }

    /// Changes the `--revalidate` interval at runtime: the next lookup or open uses it.
    pub(crate) fn set_revalidate(&self, every: Duration) {
        let ns = u64::try_from(every.as_nanos()).unwrap_or(u64::MAX);
        self.revalidate_ns.store(ns, Ordering::Relaxed);
    }

    /// Makes the clean cached files at or below `path` ("" for all) due for a
    /// comparison with src at their next lookup or open (refetched if src changed,
    /// dropped if src deleted them), and forgets the names src was seen to lack.
    /// Nothing is compared here: no src call, no lock held for long. With
    /// `--revalidate 0` (never) nothing is compared later either.
    pub(crate) fn expire(&self, path: &Path) {
        self.origins.forget_verified_under(path);
        self.inodes.lock().unwrap().uncheck_all();
        self.src_absent.clear();
        // Listings the kernel cached are taken again too.
        self.dircache.changed_everywhere();
    }

    /// The names dst holds in the directory `path`, cachefs's own (state, whiteouts)
    /// left out, for `cachefs ctl state --recursive`. Resolved beneath dst with no
    /// symlink followed, like every dst path.
    pub(crate) fn cached_children(&self, path: &Path) -> FsResult<Vec<OsString>> {
        Ok(self
            .dst
            .read_dir(path)?
            .into_iter()
            .map(|e| e.name)
            .filter(|n| !names::is_reserved(n))
            .collect())
    }

    /// The mount paths at or below `path` that have a partial file of lazy fetch
    /// (they are not in dst's tree), sorted.
    pub(crate) fn partial_paths_under(&self, path: &Path) -> Vec<PathBuf> {
        self.lazy
            .as_ref()
            .map_or_else(Vec::new, |l| l.paths_under(path))
    }

    /// What dst holds for the mount path `path`, for `cachefs ctl state`. Reads dst
    /// and the core's records only (never src).
    pub(crate) fn cached_state(&self, path: &Path) -> FsResult<Cached> {
        if let Some((present, size)) = self.lazy.as_ref().and_then(|l| l.progress(path)) {
            return Ok(Cached::Partial { present, size });
        }
        let Some(st) = self.dst.stat(path)? else {
            return Ok(Cached::No);
        };
        Ok(match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => Cached::Dir,
            libc::S_IFREG => Cached::File {
                bytes: st.st_size as u64,
                clean: matches!(self.origins.get(path)?, Some(o) if !o.dirty),
            },
            _ => Cached::Other,
        })
    }

    fn has_open_handles(&self, ino: u64) -> bool {
        self.handles.read().unwrap().values().any(|h| h.ino == ino)
    }

    /// Compares a cached, clean file with src once its last check is older than the
    /// revalidation interval: refetches it if src changed, drops it if src deleted it.
    /// Files with open handles, local (dirty) files and an offline src are left alone.
    pub(super) fn revalidate(&self, ino: u64, path: &Path) -> FsResult<Freshness> {
        let every = self.revalidate_every();
        if every.is_zero() {
            return Ok(Freshness::Unchanged);
        }
        {
            let t = self.inodes.lock().unwrap();
            match t.get(ino) {
                Some(n) if n.kind == Kind::File => {
                    if t.checked_within(ino, every) {
                        return Ok(Freshness::Unchanged);
                    }
                }
                _ => return Ok(Freshness::Unchanged),
            }
        }
        let checked = |fs: &CacheFs| {
            fs.inodes.lock().unwrap().mark_checked(ino);
        };
        // Fetched, uploaded or checked by us within the interval: src held this version
        // then, so there is nothing to ask src yet (a hung src must not stall the
        // lookup, and a forgotten inode must not cost a src round trip). Whatever
        // happened to the record since (dirty, dropped) also means "unchanged".
        if self
            .origins
            .verified_ago(path)
            .is_some_and(|ago| ago < every)
        {
            return Ok(Freshness::Unchanged);
        }
        // Our own pending uploads change src: dst is the authority for such a path.
        if self.changes.as_ref().is_some_and(|c| c.has_pending(path)) {
            return Ok(Freshness::Unchanged);
        }
        let clean = match self.origins.get(path)? {
            Some(o) if !o.dirty => o,
            _ => {
                checked(self);
                return Ok(Freshness::Unchanged);
            }
        };
        let Some(Ok(now)) = self.src_stat_for_revalidation(path) else {
            // Offline or slow to answer: keep serving the cache, and ask again only
            // after another interval.
            checked(self);
            return Ok(Freshness::Unchanged);
        };
        match now {
            Some(st) if clean.same_source(&st) => {
                checked(self);
                self.origins.note_verified(path);
                Ok(Freshness::Unchanged)
            }
            _ if self.has_open_handles(ino) => Ok(Freshness::Unchanged),
            // src shows the copy's own size and mtime: it holds these bytes under a
            // version it reported differently before (rclone reports a file it is
            // uploading with a local mtime, and the bucket's once the upload is done).
            Some(st)
                if st.st_mode & libc::S_IFMT == libc::S_IFREG
                    && self.dst.stat(path)?.is_some_and(|d| {
                        (d.st_size, d.st_mtime, d.st_mtime_nsec)
                            == (st.st_size, st.st_mtime, st.st_mtime_nsec)
                    })
                    && self
                        .origins
                        .replace_clean(path, &clean, origin::Origin::of(&st))? =>
            {
                log::debug!(
                    "{}: src settled on the cached copy's own size and mtime",
                    path.display()
                );
                checked(self);
                Ok(Freshness::Unchanged)
            }
            Some(st) if st.st_mode & libc::S_IFMT == libc::S_IFREG => {
                log::info!(
                    "{}: changed in src, refetching (src: {} bytes, mtime {}.{:09}; the copy came from {} bytes, mtime {}.{:09})",
                    path.display(),
                    st.st_size,
                    st.st_mtime,
                    st.st_mtime_nsec,
                    clean.size,
                    clean.mtime_sec,
                    clean.mtime_nsec
                );
                let opts = copyup::CopyOpts {
                    limit: None,
                    replace: true,
                };
                crate::metrics::timed(crate::metrics::SrcOp::Fetch, || {
                    self.copy_from_src(path, st, opts)
                })?;
                crate::metrics::cache_miss(st.st_size as u64);
                if let Some(st) = self.dst.stat(path)? {
                    self.inodes.lock().unwrap().set_dst_ident(ino, ident(&st));
                }
                checked(self);
                // The kernel may hold the old bytes in its page cache: the next open
                // must not keep them, also when this refetch ran in a lookup.
                self.refetched.lock().unwrap().insert(ino);
                Ok(Freshness::Refetched)
            }
            _ => {
                log::info!(
                    "{}: gone from src, dropping the cached copy",
                    path.display()
                );
                self.dst.unlink(path)?;
                self.origins.clear(path)?;
                // The name leaves the view: a listing the kernel cached shows it.
                self.listing_changed_at(path);
                Ok(Freshness::Gone)
            }
        }
    }

    /// Copies a whole visible subtree into dst (before a directory rename), and marks
    /// its top opaque: afterwards dst alone holds everything the view shows there.
    pub(super) fn copy_up_tree(&self, path: &Path, merge_src: bool) -> FsResult<()> {
        self.ensure_dst_dir(path)?;
        if merge_src {
            for item in self.list_merged(path, true)? {
                let child = path.join(&item.name);
                let Some(found) = self.find(&child, true)? else {
                    continue;
                };
                if found.layer == Layered::Dst && !found.merge_src {
                    continue;
                }
                if is_dir(&found.st) {
                    self.copy_up_tree(&child, found.merge_src)?;
                } else if found.layer == Layered::Src {
                    let ino = self.inodes.lock().unwrap().ino_of(&child);
                    match ino {
                        Some(ino) => drop(self.ensure_in_dst(ino, &child, None)?),
                        None => drop(self.copy_up(&child, None)?),
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether `ino` was refetched since its last open (and forgets it).
    pub(super) fn take_refetched(&self, ino: u64) -> bool {
        let mut r = self.refetched.lock().unwrap();
        !r.is_empty() && r.remove(&ino)
    }
}
