//! The replay workers: the dispatcher hands ready ops to `concurrent` workers, each
//! replays one op on src and records the outcome ([`Shared::complete`]: done, retried
//! with backoff, parked as failed, or waiting for an offline src); beside them, the
//! thread that probes src's capabilities and the one that checks leftovers.
//!
//! Invariants:
//! - Workers reach src only through `Shared::src`, the view's `Layer` (replay takes its
//!   root with `root_fd_checked`, the mount-root rule): an unmounted src fails here as
//!   it does in the view, and the op waits ([`OFFLINE_RETRY`]) without using an
//!   attempt.
//! - No lock is held across a replay; `state` is taken only to pick and retire ops.

use super::*;

impl Shared {
    /// Records a replay's result. `src_offline`: it failed because src is unreachable
    /// (not counted as an attempt; retried every [`OFFLINE_RETRY`]).
    fn complete(
        &self,
        job: Job,
        result: io::Result<replay::Outcome>,
        notes: Vec<unrep::Note>,
        took: Duration,
        src_offline: bool,
    ) {
        let now = Instant::now();
        let kind = op::kind(&job.op);
        let paths: Vec<String> = op::paths(&job.op).iter().map(|p| show(p)).collect();
        let what = paths.join(" -> ");
        let ms = took.as_millis();
        let mut st = lock(&self.state);
        match result {
            Err(e) if replay::is_deferred(&e) => {
                log::debug!("writeback {kind} {what} waits: {e}");
                st.sched.defer(job.seq, now + replay::OPEN_WRITER_POLL, now);
            }
            Ok(outcome) => {
                if st.sched.entries[&job.seq].fail.is_some() {
                    log::info!(
                        "writeback {kind} {what} succeeded at attempt {} (it was parked as failed)",
                        job.attempt
                    );
                }
                st.sched.succeed(job.seq, now);
                self.note_unrepresentable(&job.op, &notes);
                METRICS.writeback_replayed.inc();
                Self::publish_depth(&st);
                let r = if notes.iter().any(|n| n.found != 0) {
                    "ok-partly-not-representable"
                } else if outcome == replay::Outcome::Applied {
                    "ok"
                } else {
                    "skipped"
                };
                if self.log {
                    log::info!(
                        "writeback {kind} {what} attempt={} result={r} duration={ms}ms",
                        job.attempt
                    );
                } else {
                    log::debug!("writeback {kind} {what} {r} in {ms}ms");
                }
                if let Err(e) = st
                    .journal
                    .append(&journal::encode(&Record::Done { seq: job.seq }))
                {
                    log::warn!(
                        "writeback: cannot mark op done in journal (will replay again): {e}"
                    );
                }
            }
            Err(e)
                if e.kind() == io::ErrorKind::Interrupted && self.stop.load(Ordering::Relaxed) =>
            {
                st.sched.retry(job.seq, now, None, false, now);
            }
            Err(e) if src_offline => {
                log::debug!("writeback {kind} {what} waits for src: {e}");
                st.sched
                    .retry(job.seq, now + OFFLINE_RETRY, None, false, now);
            }
            Err(e) => {
                let already = st.sched.entries[&job.seq].fail.is_some();
                if self.log {
                    log::info!(
                        "writeback {kind} {what} attempt={} result=error: {e} duration={ms}ms",
                        job.attempt
                    );
                }
                if already || job.attempt >= self.attempts {
                    let fail = FailInfo {
                        attempts: job.attempt,
                        ms: crate::sys::clock::now_ms(),
                        errno: crate::fs::error::errno_of(&e),
                        message: e.to_string(),
                    };
                    // Parked: retried on a growing schedule, logged once here (and once
                    // more when it finally succeeds), not at every retry.
                    let parked_failures = job.attempt.saturating_sub(self.attempts);
                    let wait = retry::park_interval(self.retry_delay, parked_failures);
                    if already {
                        log::debug!(
                            "writeback {kind} {what} (parked) failed again at attempt {}: {e}; next retry in {wait:?}",
                            job.attempt
                        );
                    } else {
                        log::error!(
                            "writeback {kind} {what} failed after {} attempts: {e}; parked: kept in the \
                             journal and retried in {wait:?}, then at doubling intervals up to {:?} \
                             and at the next start (`cachefs status` lists it)",
                            job.attempt,
                            retry::MAX_BACKOFF
                        );
                    }
                    let line = journal::encode(&Record::Failed {
                        seq: job.seq,
                        fail: fail.clone(),
                    });
                    if let Err(e) = st.journal.append(&line) {
                        log::warn!("writeback: cannot record failure in journal: {e}");
                    }
                    if already {
                        METRICS.writeback_retries.inc(); // a parked op failed again
                    } else {
                        METRICS.writeback_failures.inc();
                    }
                    st.sched.retry(job.seq, now + wait, Some(fail), true, now);
                } else {
                    let wait = retry::backoff(self.retry_delay, job.attempt);
                    if !self.log {
                        if job.attempt == 1 {
                            log::warn!(
                                "writeback {kind} {what} attempt 1 of {} failed: {e}; retrying in {wait:?}",
                                self.attempts
                            );
                        } else {
                            log::debug!(
                                "writeback {kind} {what} attempt {} of {} failed: {e}; retrying in {wait:?}",
                                job.attempt,
                                self.attempts
                            );
                        }
                    }
                    METRICS.writeback_retries.inc();
                    st.sched.retry(job.seq, now + wait, None, true, now);
                }
            }
        }
        Self::maybe_compact(&mut st);
        drop(st);
        self.cond.notify_all();
        self.wake();
    }
}

impl Shared {
    /// Updates the list of paths src cannot hold after `op` was applied with `notes`,
    /// and logs what is newly found (one line per path for the first ones, then one
    /// line per thousand).
    fn note_unrepresentable(&self, op: &Op, notes: &[unrep::Note]) {
        let mut u = lock(&self.unrep);
        match op {
            Op::Unlink { path } | Op::Rmdir { path } => u.remove_tree(path),
            Op::Rename { from, to, exchange } => u.rename(from, to, *exchange),
            _ => {}
        }
        let ms = crate::sys::clock::now_ms();
        let publish = |u: &unrep::Store| {
            METRICS.writeback_not_representable.set(u.map.len() as i64);
        };
        for n in notes {
            let new = u.apply(n, ms);
            if new == 0 {
                continue;
            }
            let count = self.unrep_logged.fetch_add(1, Ordering::Relaxed) + 1;
            if count <= 20 {
                log::warn!(
                    "writeback: {} not representable on src ({}: {}): kept in dst only, not \
                     retried; `cachefs status` lists it",
                    show(&n.path),
                    unrep::names(new).join(", "),
                    n.detail
                );
            } else if count.is_multiple_of(1000) {
                log::warn!(
                    "writeback: {count} paths found not representable on src since start \
                     (`cachefs status` lists them)"
                );
            }
        }
        publish(&u);
    }
}

/// How often an op that found src unreachable tries again (each try first checks src's
/// root, one stat, so a returning src is used within this long).
const OFFLINE_RETRY: Duration = Duration::from_secs(1);

pub(super) fn dispatcher(sh: Arc<Shared>, jobs: Sender<Job>, wake: Receiver<()>, workers: usize) {
    loop {
        if sh.stop.load(Ordering::Relaxed) {
            return;
        }
        let timeout = {
            let mut st = lock(&sh.state);
            let now = Instant::now();
            let next = st.sched.promote(now);
            while st.sched.running < workers {
                let Some((seq, op, attempt)) = st.sched.take_ready() else {
                    break;
                };
                let ids = st.sched.entries[&seq].ids;
                let age_ms = crate::sys::clock::now_ms().saturating_sub(st.sched.entries[&seq].ms);
                let may_defer = !sh.mirror
                    && !st.sched.is_urgent(seq)
                    && age_ms < replay::OPEN_WRITER_DEFER.as_millis() as u64;
                if jobs
                    .send(Job {
                        seq,
                        op,
                        ids,
                        attempt,
                        may_defer,
                    })
                    .is_err()
                {
                    return;
                }
            }
            next.map_or(Duration::from_secs(3600), |t| {
                t.saturating_duration_since(now)
            })
        };
        match wake.recv_timeout(timeout) {
            Ok(()) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// How long the start waits for the first try of the capability probe.
pub(super) const PROBE_WAIT: Duration = Duration::from_secs(2);

/// Finds src's capabilities in the background (see `caps`): at once, and while src is
/// offline or fails the probe, again after 1 s, 2 s, 4 s ... 60 s, unless a replay
/// probed meanwhile. Ends with the daemon. `tried` hears once, after the first try.
pub(super) fn probe_src(sh: std::sync::Weak<Shared>, tried: Sender<()>) {
    let mut wait = Duration::from_secs(1);
    let mut tried = Some(tried);
    loop {
        let done = {
            let Some(sh) = sh.upgrade() else { return };
            if sh.stop.load(Ordering::Relaxed) || sh.caps.get().is_some() {
                return;
            }
            let r = sh
                .src
                .root_fd_checked()
                .and_then(|root| sh.caps.get_or_probe(std::os::fd::AsFd::as_fd(&root)));
            if let Err(e) = &r {
                log::debug!(
                    "writeback: cannot probe src's capabilities yet ({e}); trying again in {wait:?}"
                );
            }
            r.is_ok()
        };
        if let Some(t) = tried.take() {
            let _ = t.try_send(());
        }
        if done {
            return;
        }
        let until = Instant::now() + wait;
        while Instant::now() < until {
            std::thread::sleep(Duration::from_millis(200));
            if sh.upgrade().is_none_or(|s| s.stop.load(Ordering::Relaxed)) {
                return;
            }
        }
        wait = (wait * 2).min(Duration::from_secs(60));
    }
}

/// Runs the leftover checks as they fall due (see `leftovers`), once a second, until
/// the writeback is gone. src calls go through the view's layer (an offline or
/// unmounted src puts the checks back for the next round).
pub(super) fn leftover_checks(sh: std::sync::Weak<Shared>) {
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let Some(sh) = sh.upgrade() else { return };
        if sh.stop.load(Ordering::Acquire) {
            return;
        }
        let due = sh.leftovers.take_due(crate::sys::clock::now_ms());
        if due.is_empty() {
            sh.leftovers.persist();
            continue;
        }
        let roots = sh
            .src
            .root_fd_checked()
            .and_then(|s| Ok((s, at::open_dst(&sh.dst)?)));
        let Ok((src, dst)) = roots else {
            sh.leftovers.put_back(due);
            continue;
        };
        let mut again = Vec::new();
        for c in due {
            match leftovers::check(&src, &dst, &c, |p| sh.path_pending(p)) {
                Ok(leftovers::Found::Removed) => log::info!(
                    "writeback: removed {} from src: the file renamed away or deleted there \
                     had come back (src kept a copy of it, as rclone does when its upload \
                     was under way)",
                    show(&c.path)
                ),
                Ok(leftovers::Found::Clean) => {}
                Err(e) if crate::fs::is_outage(&e) => again.push(c),
                Err(e) => log::warn!(
                    "writeback: cannot check {} on src for a leftover copy: {e}",
                    show(&c.path)
                ),
            }
        }
        sh.leftovers.put_back(again);
        sh.leftovers.persist();
    }
}

pub(super) fn worker(sh: Arc<Shared>, jobs: Receiver<Job>) {
    for job in jobs.iter() {
        let t = metrics::Timer::start();
        let ctx = replay::Ctx {
            src: &sh.src,
            dst: &sh.dst,
            stop: &sh.stop,
            tmp_prefix: format!(
                "{}wb.{}.{}.",
                crate::fs::names::TEMP_PREFIX,
                sh.runs.current,
                job.seq
            ),
            reclaim_prefixes: if job.seq < sh.first_seq {
                sh.runs
                    .reclaim
                    .iter()
                    .map(|r| format!("{}wb.{r}.{}.", crate::fs::names::TEMP_PREFIX, job.seq))
                    .collect()
            } else {
                Vec::new()
            },
            tmp_counter: std::cell::Cell::new(0),
            caps: &sh.caps,
            leftovers: &sh.leftovers,
            attrs_op: matches!(job.op, Op::SetAttr { .. }),
            notes: std::cell::RefCell::new(Vec::new()),
            may_defer: job.may_defer,
        };
        if sh.caps.get().is_none() {
            // The first replay probes what src can hold (an offline src fails the op
            // below just the same, and the next one probes again).
            if let Err(e) = sh
                .src
                .root_fd_checked()
                .and_then(|root| sh.caps.get_or_probe(std::os::fd::AsFd::as_fd(&root)))
            {
                log::debug!("writeback: cannot probe src's capabilities yet: {e}");
            }
        }
        let r = replay::apply(&ctx, &job.op, &job.ids);
        let notes = ctx.notes.take();
        // An outage is not the op's failure: src itself is unreachable (its mount is
        // gone or dead). The op waits for src without spending an attempt. The check
        // also takes a new mount at src's path (rclone restarted); the layer refuses
        // the bare directory a dead mount leaves.
        let src_offline =
            matches!(&r, Err(e) if crate::fs::is_outage(e)) && sh.src.root_fd_checked().is_err();
        if matches!(r, Ok(replay::Outcome::Skipped)) {
            // Wait out namespace changes not yet recorded: their follow-ups must see
            // this op before it leaves the queue.
            drop(sh.changes.write().unwrap_or_else(|p| p.into_inner()));
        }
        // The replay's src calls, as one src op; an upload abandoned at shutdown is
        // not a src error, and one deferred for an open writer made no src call.
        let deferred = matches!(&r, Err(e) if replay::is_deferred(e));
        let took = if deferred {
            t.elapsed()
        } else {
            t.observe(op::src_op(&job.op))
        };
        if !deferred && !matches!(&r, Err(e) if e.kind() == io::ErrorKind::Interrupted) {
            METRICS.src_result(&r);
        }
        sh.complete(job, r, notes, took, src_offline);
    }
}
