//! Telling when an offline src answers again, without making anyone wait for it.
//!
//! While src is offline (an outage error or a call that ran into `--src-timeout`), the
//! core fails src calls at once ([`CacheFs::src_gate`](super::CacheFs)) instead of
//! letting every caller wait out the timeout on a hung bucket. This module runs the
//! health checks that end an outage: at most one probe at a time, at most one every
//! [`PROBE_INTERVAL`], started by a caller of src that waits for it only briefly
//! (a src that answers at once lets that caller through; a hung one leaves the probe
//! running in the background and the caller fails). A probe reopens src's root (a mount restarted
//! at the same path; the layer refuses a bare directory) and stats the path of the
//! call that last timed out: a question that needs the remote to answer (a stat of
//! the root would be answered from rclone's memory). When a probe succeeds, the next
//! caller is let through; its success marks src online.
//!
//! It also remembers whether a question left to run in the background has gone
//! unanswered ([`SrcProbe::is_slow`]), so that revalidations stop waiting on a src that
//! is hanging before it is known to be offline.
//!
//! State: four atomics and two leaf mutexes; no lock is held across a src call.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::layer::Layer;
use super::src_pool::SrcPool;

/// Least time between two probes of an offline src.
pub(crate) const PROBE_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Default)]
pub(crate) struct SrcProbe {
    /// A probe is running (or stuck on a hung src: then no other is started).
    in_flight: AtomicBool,
    /// A probe saw src answer; taken by the next caller.
    answered: AtomicBool,
    last_start: Mutex<Option<Instant>>,
    /// What to ask: the path of the last call that timed out ("" = src's root).
    path: Mutex<PathBuf>,
    /// A question left to run in the background (a revalidation past its bound) has
    /// not been answered yet: src is slow or hung, so later revalidations do not wait
    /// for it either.
    slow: AtomicBool,
}

impl SrcProbe {
    pub(crate) fn new() -> Arc<SrcProbe> {
        Arc::new(SrcProbe::default())
    }

    /// A src call on `path` timed out: the next probes ask about it.
    pub(crate) fn note_timeout(&self, path: &Path) {
        *self.path.lock().unwrap() = path.to_path_buf();
    }

    /// Whether a probe saw src answer since the last call (and forgets it).
    pub(crate) fn take_answer(&self) -> bool {
        self.answered.swap(false, Ordering::AcqRel)
    }

    /// A bounded question went unanswered ([`SrcProbe::is_slow`] until one answers).
    pub(crate) fn mark_slow(&self) {
        self.slow.store(true, Ordering::Release);
    }

    /// src answered a question left in the background.
    pub(crate) fn clear_slow(&self) {
        self.slow.store(false, Ordering::Release);
    }

    pub(crate) fn is_slow(&self) -> bool {
        self.slow.load(Ordering::Acquire)
    }

    /// Forgets a stale answer (src went offline again).
    pub(crate) fn reset(&self) {
        self.answered.store(false, Ordering::Release);
    }

    /// Probes src unless a probe runs or ran within [`PROBE_INTERVAL`], waiting at
    /// most `wait` for it: whether src answered within that. A probe that takes longer
    /// goes on in the background; if src answers then, [`SrcProbe::take_answer`]
    /// says so to the next caller.
    pub(crate) fn probe(
        self: &Arc<Self>,
        pool: &SrcPool,
        src: &Arc<Layer>,
        wait: Duration,
    ) -> bool {
        {
            let mut last = self.last_start.lock().unwrap();
            if last.is_some_and(|t| t.elapsed() < PROBE_INTERVAL) {
                return false;
            }
            if self.in_flight.swap(true, Ordering::AcqRel) {
                return false;
            }
            *last = Some(Instant::now());
        }
        let (me, src) = (Arc::clone(self), Arc::clone(src));
        let path = self.path.lock().unwrap().clone();
        let asked = pool.run_bounded(wait, move || {
            // ENOTCONN here: src's path is a bare directory (its mount is gone); the
            // stat below then fails on the old root as well.
            let _ = src.reopen();
            let answered = src.stat(&path).is_ok();
            log::debug!("src probe ({}): answered: {answered}", path.display());
            if answered {
                me.answered.store(true, Ordering::Release);
            }
            me.in_flight.store(false, Ordering::Release);
            Ok(answered)
        });
        if matches!(asked, Some(Ok(true))) {
            self.answered.store(false, Ordering::Release); // this caller takes it
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_probe_at_a_time_and_its_answer_is_taken_once() {
        let d = tempfile::tempdir().unwrap();
        let src = Arc::new(Layer::open(d.path()).unwrap());
        let pool = SrcPool::new(2, Duration::from_secs(5));
        let probe = SrcProbe::new();
        assert!(probe.probe(&pool, &src, Duration::from_secs(1)));
        // Within the interval: no second probe.
        assert!(!probe.probe(&pool, &src, Duration::from_secs(1)));
        assert!(
            !probe.take_answer(),
            "the caller that waited took the answer"
        );
    }
}
