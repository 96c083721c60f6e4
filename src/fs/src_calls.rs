//! Every src call of the view goes through here: run on the src pool bounded by
//! `--src-timeout` ([`CacheFs::src_do`]), with outages tracked ([`CacheFs::src_result`]:
//! an outage error marks src offline, is logged once and answers EIO; the next success
//! marks it back), calls failing at once while src is offline except for one probe a
//! second ([`CacheFs::src_gate`]), the root reopened after a dead mount, and the
//! bounded stat that revalidation uses. No core lock is held across a src call.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use super::layer::{Layer, Stat};
use super::{CacheFs, FsError, FsResult, src_state};

/// Longest a lookup or open waits for src to revalidate a cached file: past it, the
/// cached copy is served and the question goes on in the background (a hung bucket
/// must not stall reads of what dst holds).
pub(super) const REVALIDATE_WAIT: Duration = Duration::from_millis(300);

/// Longest a src call waits for the probe of an offline src (at most one a second):
/// a src that is back answers within it, a hung one does not.
pub(super) const PROBE_WAIT: Duration = Duration::from_millis(250);

/// Errors that mean "src is unreachable" rather than "src says no".
pub(crate) fn is_outage(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ENOTCONN
                | libc::EIO
                | libc::ETIMEDOUT
                | libc::ESHUTDOWN
                | libc::EHOSTDOWN
                | libc::EHOSTUNREACH
                | libc::ECONNABORTED
                | libc::ECONNRESET
                | libc::ENETDOWN
                | libc::ENETUNREACH
                | libc::ESTALE
        )
    )
}

impl CacheFs {
    /// Passes a src result through, tracking outages: an outage error is logged once
    /// (when src goes offline) and becomes EIO for the caller; the next success logs
    /// that src is back.
    pub(super) fn src_result<T>(&self, r: io::Result<T>) -> FsResult<T> {
        match r {
            Ok(v) => {
                if self.src_offline.load(Ordering::Relaxed)
                    && self.src_offline.swap(false, Ordering::AcqRel)
                {
                    *self.src_offline_since.lock().unwrap() = None;
                    self.src_absent.clear();
                    self.src_ahead.clear();
                    // Listings cached while offline lack src's names.
                    self.dircache.changed_everywhere();
                    log::warn!("src {} answers again", self.src.root_path().display());
                    self.persist_src_state(None);
                }
                Ok(v)
            }
            Err(e) if is_outage(&e) => {
                if !self.src_offline.swap(true, Ordering::AcqRel) {
                    self.src_probe.reset();
                    // Listings show dst's names only from now on.
                    self.dircache.changed_everywhere();
                    *self.src_offline_since.lock().unwrap() = Some(SystemTime::now());
                    log::warn!(
                        "src {} is offline ({e}): cached files keep working, uncached ones fail with EIO",
                        self.src.root_path().display()
                    );
                    self.persist_src_state(Some(&e));
                }
                Err(FsError::Io(io::Error::from_raw_os_error(libc::EIO)))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Records src's state (online, or offline because of `error`) in
    /// `dst/.cachefs-state/src.json` for `cachefs status` (see [`src_state`]). Called at
    /// startup and at each transition only.
    pub(super) fn persist_src_state(&self, error: Option<&io::Error>) {
        let state = src_state::SrcState {
            online: error.is_none(),
            since: crate::sys::clock::now_secs(),
            last_error: error.map(|e| e.to_string()),
            pid: std::process::id(),
        };
        if let Err(e) = src_state::write(self.dst.root_path(), &state) {
            log::warn!("cannot record src's state for `cachefs status`: {e}");
        }
    }

    /// Runs a src call on the src pool (bounded by `--src-timeout`); after an outage
    /// error other than a timeout it reopens src's root once (a src mount restarted at
    /// the same path, e.g. by systemd) and tries again.
    /// Each attempt is timed under `op` and counted in the src metrics.
    pub(super) fn src_do<T: Send + 'static>(
        &self,
        op: crate::metrics::SrcOp,
        path: &Path,
        f: impl Fn(&Layer) -> io::Result<T> + Send + Sync + 'static,
    ) -> FsResult<T> {
        self.src_do_watched(op, path, None, f)
    }

    /// [`CacheFs::src_do`] for a call that does many steps (a batch of stats): with
    /// `progress`, it times out only after a whole `--src-timeout` with no step done.
    pub(super) fn src_do_watched<T: Send + 'static>(
        &self,
        op: crate::metrics::SrcOp,
        path: &Path,
        progress: Option<Arc<AtomicU64>>,
        f: impl Fn(&Layer) -> io::Result<T> + Send + Sync + 'static,
    ) -> FsResult<T> {
        self.src_gate()?;
        let f = Arc::new(f);
        let attempt = || {
            let (src, f) = (Arc::clone(&self.src), Arc::clone(&f));
            let progress = progress.clone();
            let r =
                crate::metrics::src_op(op, || self.src_pool.run_watched(progress, move || f(&src)));
            self.note_if_timed_out(&r, path);
            r
        };
        match attempt() {
            Err(e)
                if is_outage(&e)
                    && e.raw_os_error() != Some(libc::ETIMEDOUT)
                    && self.reopen_src() =>
            {
                self.src_result(attempt())
            }
            r => self.src_result(r),
        }
    }

    /// While src is offline, src calls fail at once with EIO rather than each waiting
    /// for a src that may hang (only the calls that found the outage waited). At most
    /// once a second a call probes src ([`src_probe`]) and waits [`PROBE_WAIT`] for
    /// it; when src answers (then or later, in the background) the call is let
    /// through, and its success marks src online.
    pub(super) fn src_gate(&self) -> FsResult<()> {
        if !self.src_offline.load(Ordering::Relaxed)
            || self.src_probe.take_answer()
            || self.src_probe.probe(&self.src_pool, &self.src, PROBE_WAIT)
        {
            return Ok(());
        }
        Err(FsError::Io(io::Error::from_raw_os_error(libc::EIO)))
    }

    /// A src call on `path` ran into `--src-timeout`: the probes of the coming outage
    /// ask about that path (a question the remote itself must answer).
    pub(super) fn note_if_timed_out<T>(&self, r: &io::Result<T>, path: &Path) {
        if matches!(r, Err(e) if e.raw_os_error() == Some(libc::ETIMEDOUT)) {
            self.src_probe.note_timeout(path);
        }
    }

    /// lstat on src.
    pub(super) fn src_stat(&self, path: &Path) -> FsResult<Option<Stat>> {
        let p = path.to_path_buf();
        self.src_do(crate::metrics::SrcOp::Stat, path, move |s| s.stat(&p))
    }

    /// lstat on src for a revalidation: `None` when src has not answered within
    /// [`REVALIDATE_WAIT`] (the question goes on in the background; the caller serves
    /// the cached copy rather than wait for a src that may hang).
    pub(super) fn src_stat_for_revalidation(&self, path: &Path) -> Option<FsResult<Option<Stat>>> {
        if let Err(e) = self.src_gate() {
            return Some(Err(e));
        }
        if self.src_probe.is_slow() {
            return None; // an earlier question is still unanswered
        }
        let done = Arc::new(AtomicBool::new(false));
        let (src, p, probe, finished) = (
            Arc::clone(&self.src),
            path.to_path_buf(),
            Arc::clone(&self.src_probe),
            Arc::clone(&done),
        );
        let r = crate::metrics::src_op(crate::metrics::SrcOp::Stat, || {
            let asked = self.src_pool.run_bounded(REVALIDATE_WAIT, move || {
                let r = src.stat(&p);
                finished.store(true, Ordering::Release);
                probe.clear_slow();
                r
            });
            asked.unwrap_or_else(|| Err(io::Error::from_raw_os_error(libc::EINPROGRESS)))
        });
        match r {
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
                self.src_probe.mark_slow();
                if done.load(Ordering::Acquire) {
                    self.src_probe.clear_slow(); // it answered just after the bound
                }
                log::debug!(
                    "{}: src is slow to answer; serving the cached copy",
                    path.display()
                );
                None
            }
            r => Some(self.src_result(r)),
        }
    }

    /// Reopens src's root, at most once a second. Whether it was reopened.
    fn reopen_src(&self) -> bool {
        let mut last = self.src_reopened.lock().unwrap();
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return false;
        }
        *last = Some(std::time::Instant::now());
        let src = Arc::clone(&self.src);
        match self.src_pool.run(move || src.reopen()) {
            Ok(()) => {
                self.src_absent.clear();
                self.src_ahead.clear();
                self.src_unmounted.store(false, Ordering::Relaxed);
                if self.src.is_mount_root() {
                    src_state::remember_mounted(self.dst.root_path());
                }
                log::debug!("reopened src root {}", self.src.root_path().display());
                true
            }
            Err(e) => {
                if e.raw_os_error() == Some(libc::ENOTCONN)
                    && !self.src_unmounted.swap(true, Ordering::Relaxed)
                {
                    log::warn!(
                        "src {} is no longer a mount point (its filesystem was unmounted, an \
                         empty directory is left): treating src as offline until it is mounted \
                         again, cached files keep working",
                        self.src.root_path().display()
                    );
                }
                false
            }
        }
    }

    /// Since when src has been offline, if it is.
    pub(crate) fn src_offline_since(&self) -> Option<SystemTime> {
        *self.src_offline_since.lock().unwrap()
    }
}
