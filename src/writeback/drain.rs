//! The end of a run: draining the queue at shutdown (bounded, reporting progress) and
//! the queue summary the daemon logs on SIGUSR1.
//!
//! Invariants:
//! - A drain never waits past its deadline plus [`ABANDON_STUCK_WORKERS_AFTER`]: what
//!   is not replayed by then stays in the journal (compacted) for the next start.

use super::*;

/// At shutdown, how long past the drain's deadline workers get to notice `stop` before
/// those still inside a src call are abandoned.
pub const ABANDON_STUCK_WORKERS_AFTER: Duration = Duration::from_secs(1);

/// How often a drain at shutdown reports its progress.
pub const DRAIN_PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Where a drain at shutdown stands (see [`Writeback::shutdown_reporting`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainProgress {
    /// Ops not yet replayed on src (pending and failed).
    pub ops_left: usize,
    /// Bytes still to upload: dst sizes of the distinct files with pending content.
    pub bytes_left: u64,
    pub elapsed: Duration,
    /// Until the drain gives up and leaves the rest in the journal.
    pub remaining: Duration,
}

impl fmt::Display for DrainProgress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.ops_left == 0 {
            return write!(
                f,
                "writeback: drained the queue in {:.1}s",
                self.elapsed.as_secs_f64()
            );
        }
        write!(
            f,
            "writeback: draining before exit: {} ops ({} bytes) left after {:.1}s; \
             the rest stays in the journal in {:.1}s",
            self.ops_left,
            self.bytes_left,
            self.elapsed.as_secs_f64(),
            self.remaining.as_secs_f64()
        )
    }
}

impl Writeback {
    /// Log the queue state (the daemon calls this on SIGUSR1).
    pub fn log_summary(&self) {
        let Some(sh) = &self.shared else {
            log::info!("writeback: disabled");
            return;
        };
        let (lives, running) = {
            let st = lock(&sh.state);
            for (seq, e) in st.sched.entries.iter().take(10) {
                log::info!(
                    "writeback: pending #{seq} {} {} ({})",
                    op::kind(&e.op),
                    op::paths(&e.op)
                        .iter()
                        .map(|p| show(p))
                        .collect::<Vec<_>>()
                        .join(" -> "),
                    st.sched.describe(*seq)
                );
            }
            let lives: Vec<journal::Live> = st
                .sched
                .entries
                .values()
                .map(|e| journal::Live {
                    ms: e.ms,
                    op: e.op.clone(),
                    ids: e.ids,
                    fail: e.fail.clone(),
                })
                .collect();
            (lives, st.sched.running)
        };
        let s = status::summarize(&sh.dst, lives.iter().map(|l| (l, true)));
        log::info!(
            "writeback: {} pending ops ({} running), {} bytes, oldest {}, {} failed",
            s.pending_ops,
            running,
            s.pending_bytes,
            s.oldest_age_secs
                .map_or("-".to_string(), |a| format!("{a}s ago")),
            s.failed.len()
        );
        let leftovers = sh.leftovers.pending();
        if leftovers > 0 {
            log::info!("writeback: {leftovers} leftover checks waiting (see --src-settle)");
        }
        let unrep = lock(&sh.unrep).map.len();
        if unrep > 0 {
            log::info!(
                "writeback: {unrep} paths not representable on src (kept in dst only; \
                 `cachefs status` lists them)"
            );
        }
        for (kind, paths, attempts, _, msg) in s.failed.iter().take(50) {
            let p: Vec<String> = paths.iter().map(|p| show(p)).collect();
            log::info!(
                "writeback: FAILED {kind} {} (attempts {attempts}): {msg}",
                p.join(" -> ")
            );
        }
    }

    /// Stop accepting ops, replay what can be replayed within `max_wait` (start delays
    /// waived, retry backoff kept), then stop the workers (an upload in progress is
    /// abandoned, its temp file removed; a worker stuck in a src syscall is abandoned
    /// [`ABANDON_STUCK_WORKERS_AFTER`] past the deadline, its op left journaled) and
    /// persist the rest in a compacted journal.
    ///
    /// A drain logs its progress (ops and bytes left) when it begins and every
    /// [`DRAIN_PROGRESS_EVERY`] until it ends.
    pub fn shutdown(&self, max_wait: Duration) {
        self.shutdown_reporting(max_wait, DRAIN_PROGRESS_EVERY, &mut |p| log::info!("{p}"));
    }

    /// [`Writeback::shutdown`], reporting the drain's progress to `report` (when it
    /// begins, then every `every`, and once when the queue is empty).
    pub fn shutdown_reporting(
        &self,
        max_wait: Duration,
        every: Duration,
        report: &mut dyn FnMut(&DrainProgress),
    ) {
        let Some(sh) = &self.shared else {
            return;
        };
        let started = Instant::now();
        let deadline = started + max_wait;
        {
            let mut st = lock(&sh.state);
            if st.shut {
                return;
            }
            st.accepting = false;
            let last = st.next_seq.saturating_sub(1);
            st.sched.make_urgent(last, Instant::now());
        }
        sh.wake();
        let mut next_report = started;
        let mut reported = false;
        loop {
            let st = lock(&sh.state);
            let now = Instant::now();
            let empty = st.sched.entries.is_empty();
            if empty || now >= deadline || !st.sched.can_progress_before(deadline) {
                if empty && reported {
                    drop(st);
                    report(&DrainProgress {
                        ops_left: 0,
                        bytes_left: 0,
                        elapsed: started.elapsed(),
                        remaining: deadline.saturating_duration_since(Instant::now()),
                    });
                }
                break;
            }
            if now >= next_report {
                let ops: Vec<Op> = st.sched.entries.values().map(|e| e.op.clone()).collect();
                drop(st);
                // dst sizes are read without the lock: workers keep completing.
                report(&DrainProgress {
                    ops_left: ops.len(),
                    bytes_left: status::pending_bytes(&sh.dst, ops.iter()),
                    elapsed: now - started,
                    remaining: deadline - now,
                });
                reported = true;
                next_report = now + every;
                continue;
            }
            let wait = (deadline - now)
                .min(next_report - now)
                .min(Duration::from_millis(200));
            drop(
                sh.cond
                    .wait_timeout(st, wait)
                    .unwrap_or_else(|e| e.into_inner()),
            );
        }
        sh.stop.store(true, Ordering::Relaxed);
        sh.wake();
        // Workers see `stop` between src calls. One stuck inside a src call (a hung
        // network mount) cannot: it is abandoned (left to the process's exit) and its
        // op stays in the journal, so the drain stays bounded by `max_wait`.
        let join_by = deadline.max(Instant::now()) + ABANDON_STUCK_WORKERS_AFTER;
        let mut threads = std::mem::take(&mut *lock(&self.threads));
        while threads.iter().any(|t| !t.is_finished()) && Instant::now() < join_by {
            std::thread::sleep(Duration::from_millis(10));
        }
        let (done, stuck): (Vec<_>, Vec<_>) = threads.drain(..).partition(|t| t.is_finished());
        for t in done {
            let _ = t.join();
        }
        if !stuck.is_empty() {
            log::warn!(
                "writeback: {} replay workers are stuck in a src call (src hung?); \
                 leaving their ops in the journal",
                stuck.len()
            );
        }
        let mut st = lock(&sh.state);
        st.shut = true;
        let left = st.sched.entries.len();
        if let Err(e) = Shared::compact(&mut st) {
            log::error!("writeback: cannot persist the journal at shutdown: {e}");
        }
        if left > 0 {
            log::warn!("writeback: {left} ops left in the journal for the next start");
        }
        drop(st);
        sh.cond.notify_all();
    }
}
