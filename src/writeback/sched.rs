//! In-memory queue of journaled ops: causal dependencies, readiness, retries.
//!
//! Invariants:
//! - `entries` holds exactly the ops recorded and not yet applied (the journal's live set).
//! - Op B depends on an earlier op A iff some path of A equals, is an ancestor of, or is
//!   a descendant of some path of B. Only the latest earlier op per touched path is
//!   linked (earlier ones on that path are ordered before it anyway), so `blockers` is
//!   the number of unapplied ops B must wait for.
//! - An entry is in exactly one of: `ready` (blockers 0, due), `delayed` (blockers 0, not
//!   due: start delay, backoff or parked), running (dispatched), or blocked (blockers > 0).
//! - A failed (parked) op keeps blocking its dependents: order is never broken.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::at::Id;
use super::journal::FailInfo;
use super::op;
use crate::fs::change::Op;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    Waiting,
    Running,
}

#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) op: Op,
    /// dst identities of the objects the op syncs (see `op::id_paths`).
    pub(crate) ids: [Option<Id>; 2],
    /// Wall-clock recording time (ms since the epoch), for `status`.
    pub(crate) ms: u64,
    pub(crate) state: State,
    /// Attempts made so far (counting the running one).
    pub(crate) attempts: u32,
    /// Set once the op exhausted its attempts; cleared only by success.
    pub(crate) fail: Option<FailInfo>,
    /// Not dispatched before this instant.
    pub(crate) not_before: Instant,
    /// `not_before` is a retry backoff (not the start delay, which urgency overrides).
    pub(crate) backoff: bool,
    /// dst size of the file this op uploads (content ops), for `--max-dirty`.
    pub(crate) bytes: u64,
    blockers: usize,
    deps: Vec<u64>,
    dependents: Vec<u64>,
}

#[derive(Default)]
pub(crate) struct Sched {
    pub(crate) entries: BTreeMap<u64, Entry>,
    index: BTreeMap<PathBuf, BTreeSet<u64>>,
    ready: BTreeSet<u64>,
    delayed: BTreeSet<(Instant, u64)>,
    pub(crate) running: usize,
    /// Ops up to this seq ignore the start delay (mirror fsync, shutdown drain).
    urgent_upto: u64,
    /// Sum of `bytes` over `entries`: data not yet on src (an estimate: a file with
    /// several pending content ops counts once per op that is not coalesced).
    pub(crate) dirty_bytes: u64,
    /// Ops applied since start (progress, for waiters on `dirty_bytes`).
    pub(crate) applied: u64,
    /// Sum of `bytes` over the ops applied since start: file data uploaded to src
    /// (for `cachefs status --watch`).
    pub(crate) uploaded_bytes: u64,
}

impl Sched {
    /// The latest pending op on exactly `p`, on any ancestor of `p`, and on each distinct
    /// descendant path of `p`.
    fn conflicts(&self, p: &Path, out: &mut BTreeSet<u64>) {
        let mut a = Some(p);
        while let Some(q) = a {
            if let Some(s) = self.index.get(q).and_then(|s| s.last()) {
                out.insert(*s);
            }
            a = q.parent();
        }
        let range = self
            .index
            .range::<Path, _>((Bound::Excluded(p), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(p));
        for (_, s) in range {
            if let Some(s) = s.last() {
                out.insert(*s);
            }
        }
    }

    /// If `op` is already covered by a pending, not started op, that op's seq.
    pub(crate) fn coalesce_target(&self, op: &Op, ids: &[Option<Id>; 2]) -> Option<u64> {
        let mut c = BTreeSet::new();
        for p in op::paths(op) {
            self.conflicts(p, &mut c);
        }
        let last = *c.last()?;
        let e = &self.entries[&last];
        (e.state == State::Waiting && op::covers(&e.op, op) && e.ids == *ids).then_some(last)
    }

    /// Pending ops that touch `base` or anything below it, in seq order.
    pub(crate) fn pending_under(&self, base: &Path) -> Vec<&Op> {
        let mut seqs = BTreeSet::new();
        for (k, s) in self
            .index
            .range::<Path, _>((Bound::Included(base), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(base))
        {
            let _ = k;
            seqs.extend(s.iter().copied());
        }
        seqs.iter().map(|s| &self.entries[s].op).collect()
    }

    /// Add a recorded op. `not_before`: when its start delay ends.
    pub(crate) fn insert(
        &mut self,
        seq: u64,
        ms: u64,
        op: Op,
        ids: [Option<Id>; 2],
        not_before: Instant,
        now: Instant,
    ) {
        let mut deps = BTreeSet::new();
        for p in op::paths(&op) {
            self.conflicts(p, &mut deps);
        }
        for d in &deps {
            self.entries.get_mut(d).expect("dep").dependents.push(seq);
        }
        for p in op::paths(&op) {
            self.index.entry(p.to_path_buf()).or_default().insert(seq);
        }
        let blockers = deps.len();
        self.entries.insert(
            seq,
            Entry {
                op,
                ids,
                ms,
                state: State::Waiting,
                attempts: 0,
                fail: None,
                not_before,
                backoff: false,
                bytes: 0,
                blockers,
                deps: deps.into_iter().collect(),
                dependents: Vec::new(),
            },
        );
        if blockers == 0 {
            self.schedule(seq, now);
        }
    }

    fn schedule(&mut self, seq: u64, now: Instant) {
        let e = &self.entries[&seq];
        if e.not_before <= now || (seq <= self.urgent_upto && !e.backoff) {
            self.ready.insert(seq);
        } else {
            self.delayed.insert((e.not_before, seq));
        }
    }

    /// Ops parked as failed become due now (`cachefs ctl DST retry`), instead of at
    /// their periodic retry; order is kept (only ops with no blockers are delayed).
    /// How many.
    pub(crate) fn retry_failed_now(&mut self, now: Instant) -> usize {
        let parked: Vec<(Instant, u64)> = self
            .delayed
            .iter()
            .filter(|(_, s)| self.entries.get(s).is_some_and(|e| e.fail.is_some()))
            .copied()
            .collect();
        for k in &parked {
            self.delayed.remove(k);
            if let Some(e) = self.entries.get_mut(&k.1) {
                e.not_before = now;
            }
            self.ready.insert(k.1);
        }
        parked.len()
    }

    /// Move due delayed ops to ready; the next instant something becomes due.
    pub(crate) fn promote(&mut self, now: Instant) -> Option<Instant> {
        while let Some(&(t, s)) = self.delayed.first() {
            if t > now {
                return Some(t);
            }
            self.delayed.pop_first();
            self.ready.insert(s);
        }
        None
    }

    /// Take the lowest ready op, marking it running.
    pub(crate) fn take_ready(&mut self) -> Option<(u64, Op, u32)> {
        let seq = self.ready.pop_first()?;
        let e = self.entries.get_mut(&seq).expect("ready entry");
        e.state = State::Running;
        e.attempts += 1;
        self.running += 1;
        Some((seq, e.op.clone(), e.attempts))
    }

    /// Set the upload size of a pending op (at record, or when a write is coalesced
    /// into it: the larger of the two).
    pub(crate) fn note_bytes(&mut self, seq: u64, bytes: u64) {
        if let Some(e) = self.entries.get_mut(&seq)
            && bytes > e.bytes
        {
            self.dirty_bytes += bytes - e.bytes;
            e.bytes = bytes;
        }
    }

    /// Ops up to `seq` skip their start delay from now on.
    pub(crate) fn make_urgent(&mut self, seq: u64, now: Instant) {
        if seq <= self.urgent_upto {
            return;
        }
        self.urgent_upto = seq;
        let move_now: Vec<(Instant, u64)> = self
            .delayed
            .iter()
            .filter(|(_, s)| *s <= seq && !self.entries[s].backoff)
            .copied()
            .collect();
        for k in move_now {
            self.delayed.remove(&k);
            self.schedule(k.1, now);
        }
    }

    /// The op was applied: drop it and release its dependents.
    pub(crate) fn succeed(&mut self, seq: u64, now: Instant) {
        self.running -= 1;
        let e = self.entries.remove(&seq).expect("running entry");
        self.dirty_bytes -= e.bytes;
        self.applied += 1;
        self.uploaded_bytes += e.bytes;
        for p in op::paths(&e.op) {
            if let Some(s) = self.index.get_mut(p) {
                s.remove(&seq);
                if s.is_empty() {
                    self.index.remove(p);
                }
            }
        }
        for d in e.dependents {
            let de = self.entries.get_mut(&d).expect("dependent");
            de.blockers -= 1;
            if de.blockers == 0 {
                self.schedule(d, now);
            }
        }
    }

    /// The attempt failed or was interrupted; retry at `retry_at`. `fail` parks it.
    pub(crate) fn retry(
        &mut self,
        seq: u64,
        retry_at: Instant,
        fail: Option<FailInfo>,
        count_attempt: bool,
        now: Instant,
    ) {
        self.running -= 1;
        let e = self.entries.get_mut(&seq).expect("running entry");
        e.state = State::Waiting;
        if !count_attempt {
            e.attempts -= 1;
        }
        if fail.is_some() {
            e.fail = fail;
        }
        e.not_before = retry_at;
        e.backoff = true;
        self.schedule(seq, now);
    }

    /// The running op `seq` waits until `until` without spending an attempt and
    /// without a backoff: an op someone waits for ([`Sched::make_urgent`]) runs at once.
    pub(crate) fn defer(&mut self, seq: u64, until: Instant, now: Instant) {
        self.running -= 1;
        let e = self.entries.get_mut(&seq).expect("running entry");
        e.state = State::Waiting;
        e.attempts -= 1;
        e.not_before = until;
        e.backoff = false;
        self.schedule(seq, now);
    }

    /// Whether someone waits for op `seq` (a drain, `--max-dirty`, mirror mode's
    /// close/fsync): it must not be deferred.
    pub(crate) fn is_urgent(&self, seq: u64) -> bool {
        seq <= self.urgent_upto
    }

    /// Ready, or running, or due before `deadline` and not parked as failed: something
    /// can still progress (a drain at shutdown waits for nothing else). A parked op's
    /// periodic retry does not count: it failed all its attempts, and waiting out the
    /// drain timeout on it only delays the exit (it stays in the journal, and ops that
    /// depend on it are blocked anyway). A failed op loaded from the journal is ready
    /// (not backing off) at shutdown, so it still gets one retry.
    pub(crate) fn can_progress_before(&self, deadline: Instant) -> bool {
        self.running > 0
            || !self.ready.is_empty()
            || self
                .delayed
                .iter()
                .take_while(|(t, _)| *t <= deadline)
                .any(|(_, s)| self.entries.get(s).is_some_and(|e| e.fail.is_none()))
    }

    /// Whether `seq` (pending) is parked as failed or waits, transitively, on such an op.
    pub(crate) fn failure_blocking(&self, seq: u64) -> Option<(u64, &FailInfo)> {
        let mut stack = vec![seq];
        let mut seen = BTreeSet::new();
        while let Some(s) = stack.pop() {
            if !seen.insert(s) {
                continue;
            }
            let Some(e) = self.entries.get(&s) else {
                continue;
            };
            if let Some(f) = &e.fail
                && e.state == State::Waiting
            {
                return Some((s, f));
            }
            stack.extend(e.deps.iter().copied());
        }
        None
    }

    /// Human-readable state of a pending op (for `log_summary`).
    pub(crate) fn describe(&self, seq: u64) -> String {
        let Some(e) = self.entries.get(&seq) else {
            return "done".into();
        };
        let where_ = if e.state == State::Running {
            "running".to_string()
        } else if e.blockers > 0 {
            format!("waiting for {} earlier ops", e.blockers)
        } else if self.ready.contains(&seq) {
            "ready".to_string()
        } else {
            let left = e.not_before.saturating_duration_since(Instant::now());
            format!("due in {left:?}")
        };
        format!("{where_}, attempt {}", e.attempts)
    }

    /// The latest pending op touching exactly `p`.
    pub(crate) fn latest_on(&self, p: &Path) -> Option<u64> {
        self.index.get(p).and_then(|s| s.last().copied())
    }

    /// Any pending op touching `p` or below (a dirty path the cache must not evict).
    pub(crate) fn has_pending_under(&self, p: &Path) -> bool {
        self.index
            .range::<Path, _>((Bound::Included(p), Bound::Unbounded))
            .next()
            .is_some_and(|(k, _)| k.starts_with(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const N: [Option<Id>; 2] = [None, None];

    fn w(p: &str) -> Op {
        Op::Write { path: p.into() }
    }

    fn drain(s: &mut Sched, now: Instant) -> Vec<u64> {
        s.promote(now);
        let mut v = Vec::new();
        while let Some((seq, _, _)) = s.take_ready() {
            v.push(seq);
        }
        v
    }

    #[test]
    fn related_paths_wait_independent_run() {
        let now = Instant::now();
        let mut s = Sched::default();
        s.insert(1, 0, Op::Mkdir { path: "a".into() }, N, now, now);
        s.insert(2, 0, w("a/f"), N, now, now);
        s.insert(3, 0, w("b"), N, now, now);
        s.insert(
            4,
            0,
            Op::Rename {
                from: "a".into(),
                to: "c".into(),
                exchange: false,
            },
            N,
            now,
            now,
        );
        s.insert(5, 0, w("c/g"), N, now, now);
        assert_eq!(drain(&mut s, now), vec![1, 3]);
        s.succeed(3, now);
        assert!(drain(&mut s, now).is_empty());
        s.succeed(1, now);
        assert_eq!(drain(&mut s, now), vec![2]);
        s.succeed(2, now);
        assert_eq!(drain(&mut s, now), vec![4]);
        s.succeed(4, now);
        assert_eq!(drain(&mut s, now), vec![5]);
    }

    #[test]
    fn coalesce_only_into_latest_unstarted_cover() {
        let now = Instant::now();
        let mut s = Sched::default();
        s.insert(1, 0, w("f"), N, now, now);
        assert_eq!(s.coalesce_target(&w("f"), &N), Some(1));
        assert_eq!(
            s.coalesce_target(&Op::SetAttr { path: "f".into() }, &N),
            Some(1)
        );
        assert_eq!(
            s.coalesce_target(&Op::Unlink { path: "f".into() }, &N),
            None
        );
        s.insert(2, 0, Op::Rmdir { path: "".into() }, N, now, now);
        assert_eq!(s.coalesce_target(&w("f"), &N), None, "a later barrier");
        let mut s = Sched::default();
        s.insert(1, 0, w("f"), N, now, now);
        assert_eq!(drain(&mut s, now), vec![1]);
        assert_eq!(
            s.coalesce_target(&w("f"), &N),
            None,
            "running: may have read old bytes"
        );
    }

    #[test]
    fn failed_op_blocks_dependents_and_delay_is_respected() {
        let now = Instant::now();
        let later = now + std::time::Duration::from_secs(60);
        let mut s = Sched::default();
        s.insert(1, 0, Op::Mkdir { path: "a".into() }, N, now, now);
        s.insert(2, 0, w("a/f"), N, later, now);
        assert_eq!(drain(&mut s, now), vec![1]);
        let f = FailInfo {
            attempts: 1,
            ms: 0,
            errno: 5,
            message: "EIO".into(),
        };
        s.retry(1, later, Some(f), true, now);
        assert_eq!(s.failure_blocking(2).map(|x| x.0), Some(1));
        assert!(drain(&mut s, now).is_empty());
        assert!(!s.can_progress_before(now));
        // Its next retry falls before the deadline, but it is parked as failed.
        assert!(!s.can_progress_before(later));
        assert_eq!(drain(&mut s, later), vec![1]);
        s.succeed(1, later);
        s.make_urgent(2, later);
        assert_eq!(drain(&mut s, later), vec![2]);
        assert!(s.has_pending_under(Path::new("a")));
        assert!(!s.has_pending_under(Path::new("b")));
    }
}
