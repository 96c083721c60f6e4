//! Durable writeback of dst's mutations to src (`-w`).
//!
//! Contract with the layered view (`fs`):
//! - `fs` performs every mutation on dst first, then calls [`Writeback::record`] with a
//!   mount-relative path description of what changed, before the FUSE call returns.
//!   `record` returns only once the op is durable in the journal (dst/.cachefs-state/).
//! - Replay reads dst's *current* state at replay time (content, mode, owner, times,
//!   user xattrs, symlink target), so ops describe *which path* changed, not the bytes.
//!   dst must hold a complete file when a `Write`/`Create` is recorded for it (a sparse,
//!   partially fetched file must be completed first), and `fs`/`cache` must not evict a
//!   path while [`Writeback::has_pending`] says it is dirty.
//! - `fs` calls [`Writeback::wait_synced`] from fsync/release in mirror mode
//!   (`-concurrent 0`): it returns once src holds dst's bytes for that path.
//! - Without `-w`, [`Writeback::start`] returns an inert instance: `record` is a no-op,
//!   src is never touched, and an existing journal is left alone.
//!
//! Pieces: this file (the contract above, the public API the view calls, the queue's
//! shared state), `start` (opening the journal, loading, crash-recovery resyncs),
//! `workers` (dispatcher, replay workers, their outcomes, the probe and leftover
//! threads), `drain` (shutdown and the SIGUSR1 summary), `journal` (on-disk format),
//! `sched` (causal queue), `replay` (applying an op to src), `retry` (backoff), `at`
//! (no-follow name-relative calls, over `crate::sys`), `status` (the CLI view),
//! `caps` (what src can hold, probed at start), `unrep` (paths whose dst state src
//! cannot hold: kept in dst, reported, not retried).
//!
//! # What survives
//! - **Process crash (kill -9, panic, OOM):** every op whose `record` returned, and any
//!   whose journal line was written: the line is in the page cache. At the next start the
//!   queue resumes from the journal (ops being replayed at the crash are replayed again;
//!   every replay is idempotent because it re-reads dst and tolerates "already done").
//! - **Power loss / kernel crash:** every op whose `record` returned (the journal was
//!   fdatasynced, by this call or by a group commit covering it). A torn last line is
//!   detected by its CRC and dropped: it was never acknowledged. "Done" marks are not
//!   synced, so some applied ops may replay again (harmless). What replay then copies is
//!   whatever dst holds after the reboot: file *bytes* are only as durable as the user's
//!   own fsync on dst made them.
//! - **A crash between a change on dst and its record:** the core notes the paths in
//!   the intent file first (`Writeback::intend`, see `intents`); the next start
//!   journals a `sync` of each path left there.
//! - **A file open for writing at a crash:** its last writes may not be journaled (they
//!   are reported at flush/fsync/release); uploads while it is open leave its origin
//!   record `open_writer`, and the next start queues an upload of each such file
//!   (`Writeback::requeue_open_writers`).
//! - A recorded op is removed from the journal only after it was applied on src (src
//!   file fsynced before its rename). Failed ops stay, marked failed, and are retried.
//!
//! # Identity
//! With each op, `record` stores the dst identity (inode + birth time) of the object the
//! op syncs, taken right after the mutation. Replay materialises a path only while dst
//! still holds that object there: a later object at the same path (deleted and
//! recreated, renamed over) has its own later ops, and copying it early could let a
//! rename recorded in between carry it where the view never has it. A rename that cannot
//! be a rename on src (its source is not there) syncs its target from dst if dst still
//! holds the moved object, and otherwise clears the target on src (what src has there
//! was replaced). Replay also replaces whatever src holds where the view says otherwise
//! (a file where the view has a directory, a non-empty directory the view removed):
//! such src entries are invisible in the view.
//!
//! # Hard links
//! `fs` records a content or attribute change of a multiply-linked file for every name
//! the mount knows it by (names looked up or created since the mount started). Replay
//! rewrites a file in place when both dst and src have it multiply linked, so a src
//! that keeps the hard link stays right; on a src without hard links (rclone), each
//! name is its own copy and gets its own upload. Limitation: a name of the file that
//! the mount has not seen since it started (never looked up) is not known to `fs`; on a
//! src without hard links that copy goes stale until its own next op.
//!
//! # Namespace changes and skipped ops
//! A replay that finds its object gone from dst (renamed away, or its parent was)
//! skips, trusting the rename's follow-up ops to carry it. Those follow-ups are
//! computed from the pending ops when the rename is *recorded*, which is after dst was
//! changed: a replay that observed the change in that window would be dropped before
//! the rename saw it (its bytes never reaching src). So `fs` holds a
//! [`Writeback::begin_change`] guard (shared) across each namespace change and its
//! `record`, and a worker that skipped takes the same lock exclusively before it
//! retires the op: by then every change it may have observed is recorded, with the
//! skipped op (still in the queue) among its follow-ups. Lock order: change guard,
//! then the queue state.
//!
//! # Ordering
//! Op B waits for every earlier unapplied op touching the same path, an ancestor, or a
//! descendant of one of B's paths (both sides of a rename/link). Unrelated ops run in
//! parallel on `concurrent` workers; in mirror mode (`concurrent` 0) one worker replays
//! them in journal order. A new `Write`/`SetAttr`/`Xattr` that an earlier not-started op
//! on the same path already covers (and nothing related came after it) is not journaled
//! again: that op will read the newer bytes. A `Rename` journals follow-up ops for
//! everything still pending under its source, rebased to the target, since replay skips
//! ops whose dst path is gone.
//!
//! # Locks
//! Order: `sync_lock` -> `state`. `state` guards the queue and the journal file and is
//! held only for in-memory work and small journal appends, never during src I/O or an
//! fdatasync. `sync_lock` serialises group commits (fdatasync outside `state`).
//! `cond` (on `state`) wakes `wait_synced` and `shutdown` waiters on every completion.

mod at;
mod caps;
mod drain;
mod intents;
pub(crate) mod journal;
mod leftovers;
mod op;
mod replay;
mod retry;
mod sched;
mod start;
pub(crate) mod status;
mod unrep;
mod workers;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::config::Config;
pub use crate::fs::change::{ChangeGuard, IntentGuard, Op};
use crate::metrics::{self, METRICS};
use intents::Intents;
use journal::{FailInfo, Journal, Record};
use sched::Sched;

/// Errors of the writeback layer. [`WritebackError::errno`] maps them for FUSE replies.
#[derive(Debug)]
pub enum WritebackError {
    /// Journal I/O (on dst), or starting the workers.
    Io(io::Error),
    /// A path with `..`, or a reserved (internal) name: a bug in the caller.
    InvalidPath(PathBuf),
    /// `record` after `shutdown` began, or `wait_synced` interrupted by it.
    ShuttingDown,
    /// `throttle`: more than `--max-dirty` bytes wait for src and none went out for
    /// the stall timeout (src offline or failing).
    DirtyLimit {
        dirty: u64,
        limit: u64,
        stalled: Duration,
    },
    /// `wait_synced`: an op the path depends on is parked as failed.
    Failed {
        path: PathBuf,
        errno: i32,
        message: String,
    },
}

impl WritebackError {
    /// The errno to answer a FUSE request with.
    pub fn errno(&self) -> i32 {
        match self {
            WritebackError::Io(e) => crate::fs::error::errno_of(e),
            WritebackError::InvalidPath(_) => libc::EINVAL,
            WritebackError::ShuttingDown => libc::EIO,
            WritebackError::DirtyLimit { .. } => libc::ENOSPC,
            WritebackError::Failed { errno, .. } => match *errno {
                libc::ENOSPC | libc::EDQUOT => *errno,
                _ => libc::EIO,
            },
        }
    }
}

/// The ChangeLog's answers to the core: the errno only.
impl From<WritebackError> for io::Error {
    fn from(e: WritebackError) -> io::Error {
        io::Error::from_raw_os_error(e.errno())
    }
}

impl fmt::Display for WritebackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WritebackError::Io(e) => write!(f, "writeback journal: {e}"),
            WritebackError::InvalidPath(p) => write!(f, "invalid writeback path {p:?}"),
            WritebackError::ShuttingDown => write!(f, "writeback is shutting down"),
            WritebackError::DirtyLimit {
                dirty,
                limit,
                stalled,
            } => write!(
                f,
                "{dirty} bytes wait for src, over --max-dirty {limit}, and nothing reached src \
                 for {}s (is src offline? see `cachefs status`): refusing new writes (ENOSPC)",
                stalled.as_secs()
            ),
            WritebackError::Failed { path, message, .. } => {
                write!(f, "writeback of /{} failed: {message}", path.display())
            }
        }
    }
}

impl std::error::Error for WritebackError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            WritebackError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for WritebackError {
    fn from(e: io::Error) -> Self {
        WritebackError::Io(e)
    }
}

pub use drain::{ABANDON_STUCK_WORKERS_AFTER, DRAIN_PROGRESS_EVERY, DrainProgress};

struct Job {
    seq: u64,
    op: Op,
    ids: [Option<at::Id>; 2],
    attempt: u32,
    /// The op may wait while the mount has its file open for writing (see
    /// [`replay::OPEN_WRITER_DEFER`]).
    may_defer: bool,
}

/// Everything behind the `state` lock.
struct Inner {
    journal: Journal,
    sched: Sched,
    next_seq: u64,
    /// Highest seq written to the journal file.
    written_upto: u64,
    /// Highest seq known durable (fdatasync or compaction).
    durable_upto: u64,
    accepting: bool,
    shut: bool,
}

struct Shared {
    /// src, shared with the view: the same root and mount-root rule (see
    /// [`crate::fs::layer::Layer::open_src`]).
    src: Arc<crate::fs::layer::Layer>,
    dst: PathBuf,
    attempts: u32,
    retry_delay: Duration,
    start_delay: Duration,
    log: bool,
    /// This run's temp names and the earlier runs whose leftovers it reclaims
    /// ([`journal::Runs`]).
    runs: journal::Runs,
    /// The first seq journaled by this run: ops below it were left by earlier runs,
    /// whose temp files they may reclaim.
    first_seq: u64,
    state: Mutex<Inner>,
    cond: Condvar,
    sync_lock: Mutex<()>,
    wake: Sender<()>,
    stop: AtomicBool,
    /// Shared: a dst namespace change and its record in progress; exclusive: a worker
    /// retiring a skipped op (see "Namespace changes and skipped ops").
    changes: RwLock<()>,
    /// `--max-dirty`: writers wait while more than this waits for src. `u64::MAX`: no
    /// limit. Changed at runtime by [`Writeback::set_max_dirty`].
    max_dirty: AtomicU64,
    /// Changes begun on dst and not journaled yet (see `intents`).
    intents: Intents,
    /// How long a throttled writer waits with no op reaching src before ENOSPC.
    dirty_stall: Duration,
    /// What src can hold (see `caps`).
    caps: caps::Caps,
    /// Paths whose dst state src cannot hold (see `unrep`). Lock order: after `state`.
    unrep: Mutex<unrep::Store>,
    /// How many paths were reported not representable since start (to log only the
    /// first ones one by one).
    unrep_logged: AtomicU64,
    /// Names renamed away or deleted on src, to look at again (see `leftovers`).
    leftovers: leftovers::Leftovers,
    /// Mirror mode (`-concurrent 0`): every op is waited for; none is deferred.
    mirror: bool,
}

/// The queue's numbers at one moment ([`Writeback::counters`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct QueueCounters {
    /// Ops journaled and not yet applied on src (failed ones included).
    pub(crate) pending: u64,
    /// Of those, ops parked as failed (their attempts exhausted).
    pub(crate) failed: u64,
    /// Ops being replayed now.
    pub(crate) running: u64,
    /// File data waiting for upload (what `--max-dirty` bounds).
    pub(crate) dirty_bytes: u64,
    /// Ops applied on src since start.
    pub(crate) applied: u64,
    /// File data of the ops applied since start.
    pub(crate) uploaded_bytes: u64,
}

/// The writeback queue: journal + replay workers. See the module doc.
pub struct Writeback {
    shared: Option<Arc<Shared>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Mirror mode (`-concurrent 0`): close/fsync wait until src holds the bytes.
    mirror: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Bytes a content op will upload: dst's current size of the file it syncs.
fn upload_size(dst: &Path, op: &Op) -> u64 {
    match op {
        Op::Write { path } | Op::Create { path } | Op::Sync { path } => {
            std::fs::symlink_metadata(dst.join(path))
                .ok()
                .filter(|m| m.is_file())
                .map_or(0, |m| m.len())
        }
        _ => 0,
    }
}

fn show(p: &Path) -> String {
    format!("/{}", p.display())
}

impl Shared {
    /// `--max-dirty` in force.
    fn max_dirty(&self) -> Option<u64> {
        Some(self.max_dirty.load(Ordering::Relaxed)).filter(|&m| m != u64::MAX)
    }

    /// A writeback op for `path` (or below it) is queued.
    fn path_pending(&self, path: &Path) -> bool {
        op::normalize_path(path).is_some_and(|p| lock(&self.state).sched.has_pending_under(&p))
    }

    /// dst identities of the objects `op` syncs, as dst is right now.
    fn ids_of(&self, op: &Op) -> [Option<at::Id>; 2] {
        op::id_paths(op).map(|p| p.and_then(|p| at::identity_path(&self.dst.join(p))))
    }

    fn wake(&self) {
        let _ = self.wake.try_send(());
    }

    /// Group commit: make every journal line up to `target` durable.
    fn sync_upto(&self, target: u64) -> Result<(), WritebackError> {
        let _g = lock(&self.sync_lock);
        let (file, upto) = {
            let st = lock(&self.state);
            if st.durable_upto >= target {
                return Ok(());
            }
            (st.journal.file.clone(), st.written_upto)
        };
        file.sync_data()?;
        let mut st = lock(&self.state);
        st.durable_upto = st.durable_upto.max(upto);
        Ok(())
    }

    fn live_records(st: &Inner) -> Vec<Record> {
        let mut v = Vec::with_capacity(st.sched.entries.len());
        for (&seq, e) in &st.sched.entries {
            v.push(Record::Op {
                seq,
                ms: e.ms,
                op: e.op.clone(),
                ids: e.ids,
            });
            if let Some(f) = &e.fail {
                v.push(Record::Failed {
                    seq,
                    fail: f.clone(),
                });
            }
        }
        v
    }

    fn compact(st: &mut Inner) -> io::Result<()> {
        let recs = Self::live_records(st);
        st.journal.compact(&recs)?;
        st.durable_upto = st.written_upto;
        Ok(())
    }

    fn maybe_compact(st: &mut Inner) {
        let live = st.sched.entries.len() as u64;
        if st.journal.lines > 4096
            && st.journal.lines > 4 * (live + 1)
            && let Err(e) = Self::compact(st)
        {
            log::warn!("writeback: journal compaction failed: {e}");
        }
    }

    /// `cachefs_writeback_queue_depth` from the queue's own count (pending + failed).
    fn publish_depth(st: &Inner) {
        METRICS
            .writeback_queue_depth
            .set(st.sched.entries.len() as i64);
        METRICS
            .writeback_dirty_bytes
            .set(st.sched.dirty_bytes as i64);
    }
}

impl Writeback {
    /// Notes that `paths` are about to change on dst; keep the guard until the change's
    /// op is journaled (see `intents`).
    pub(crate) fn intend(&self, paths: &[&Path]) -> Result<IntentGuard<'_>, WritebackError> {
        match &self.shared {
            Some(sh) => Ok(sh.intents.begin(paths)?),
            None => Ok(IntentGuard::none()),
        }
    }

    /// Hold across a dst rename and its `record` (see "Namespace changes and skipped
    /// ops" in the module doc).
    pub fn begin_change(&self) -> ChangeGuard<'_> {
        match &self.shared {
            Some(sh) => ChangeGuard::shared(sh.changes.read().unwrap_or_else(|p| p.into_inner())),
            None => ChangeGuard::none(),
        }
    }

    /// Journal `op` durably (the mutation is already done on dst). Returns once the op
    /// (or an earlier, not yet started op that covers it) is durable on dst's disk.
    pub fn record(&self, op: Op) -> Result<(), WritebackError> {
        let Some(sh) = &self.shared else {
            return Ok(());
        };
        let op = op::normalize(&op).ok_or_else(|| {
            WritebackError::InvalidPath(
                op::paths(&op)
                    .first()
                    .map(|p| p.to_path_buf())
                    .unwrap_or_default(),
            )
        })?;
        for p in op::paths(&op) {
            sh.leftovers.cancel(p);
        }
        let ids = sh.ids_of(&op);
        let bytes = upload_size(&sh.dst, &op);
        let target = {
            let mut st = lock(&sh.state);
            if !st.accepting {
                return Err(WritebackError::ShuttingDown);
            }
            if let Some(t) = st.sched.coalesce_target(&op, &ids) {
                st.sched.note_bytes(t, bytes);
                Shared::publish_depth(&st);
                t
            } else {
                let mut ops = vec![(op.clone(), ids, bytes)];
                if let Op::Rename { from, to, exchange } = &op {
                    let mut pending = st.sched.pending_under(from);
                    if *exchange {
                        pending.extend(st.sched.pending_under(to));
                    }
                    for f in op::rename_followups(&op, pending.into_iter()) {
                        let fids = sh.ids_of(&f);
                        let fbytes = upload_size(&sh.dst, &f);
                        ops.push((f, fids, fbytes));
                    }
                }
                let ms = crate::sys::clock::now_ms();
                let now = Instant::now();
                let first = st.next_seq;
                let mut text = String::new();
                for (i, (o, oids, _)) in ops.iter().enumerate() {
                    text.push_str(&journal::encode(&Record::Op {
                        seq: first + i as u64,
                        ms,
                        op: o.clone(),
                        ids: *oids,
                    }));
                }
                st.journal.append(&text)?;
                let n = ops.len() as u64;
                for (i, (o, oids, obytes)) in ops.into_iter().enumerate() {
                    let seq = first + i as u64;
                    st.sched.insert(seq, ms, o, oids, now + sh.start_delay, now);
                    st.sched.note_bytes(seq, obytes);
                }
                st.next_seq = first + n;
                st.written_upto = first + n - 1;
                Shared::publish_depth(&st);
                st.written_upto
            }
        };
        sh.wake();
        sh.sync_upto(target)
    }

    /// Changes `--max-dirty` at runtime (`None`: no limit); waiting writers see the
    /// new limit at once.
    pub(crate) fn set_max_dirty(&self, max_dirty: Option<u64>) {
        if let Some(sh) = &self.shared {
            sh.max_dirty
                .store(max_dirty.unwrap_or(u64::MAX), Ordering::Relaxed);
            let _st = lock(&sh.state);
            sh.cond.notify_all();
        }
    }

    /// `--max-dirty` in force.
    pub(crate) fn max_dirty(&self) -> Option<u64> {
        self.shared.as_ref().and_then(|sh| sh.max_dirty())
    }

    /// Retries every op parked as failed now, instead of at its periodic retry
    /// (`cachefs ctl DST retry`). How many were parked.
    pub(crate) fn retry_failed_now(&self) -> usize {
        let Some(sh) = &self.shared else {
            return 0;
        };
        let n = lock(&sh.state).sched.retry_failed_now(Instant::now());
        sh.wake();
        n
    }

    /// The queue's numbers now (for the control channel).
    pub(crate) fn counters(&self) -> QueueCounters {
        let Some(sh) = &self.shared else {
            return QueueCounters::default();
        };
        let st = lock(&sh.state);
        QueueCounters {
            pending: st.sched.entries.len() as u64,
            failed: st
                .sched
                .entries
                .values()
                .filter(|e| e.fail.is_some())
                .count() as u64,
            running: st.sched.running as u64,
            dirty_bytes: st.sched.dirty_bytes,
            applied: st.sched.applied,
            uploaded_bytes: st.sched.uploaded_bytes,
        }
    }

    /// Whether [`Writeback::throttle`] would wait now.
    pub(crate) fn over_dirty_limit(&self) -> bool {
        self.shared.as_ref().is_some_and(|sh| {
            sh.max_dirty()
                .is_some_and(|limit| lock(&sh.state).sched.dirty_bytes > limit)
        })
    }

    /// `--max-dirty` backpressure, called before a writer is let in (an open for
    /// writing, a create, a write served by the daemon). Returns at once under the
    /// limit; otherwise waits (start delay waived) while the queue drains, logging
    /// once per episode. Errors with [`WritebackError::DirtyLimit`] (ENOSPC) when no op
    /// reached src for the stall timeout (`--src-timeout`): a mount whose src is down
    /// must not hang its writers forever; what they wrote before stays queued.
    pub(crate) fn throttle(&self) -> Result<(), WritebackError> {
        let Some(sh) = &self.shared else {
            return Ok(());
        };
        let Some(mut limit) = sh.max_dirty() else {
            return Ok(());
        };
        let mut st = lock(&sh.state);
        if st.sched.dirty_bytes <= limit {
            return Ok(());
        }
        let started = Instant::now();
        log::info!(
            "writeback: {} bytes wait for src, over --max-dirty {limit}: writers wait for the queue to drain",
            st.sched.dirty_bytes
        );
        METRICS.writeback_throttled.inc();
        let last = st.next_seq.saturating_sub(1);
        st.sched.make_urgent(last, Instant::now());
        sh.wake();
        let (mut applied, mut progress_at) = (st.sched.applied, Instant::now());
        loop {
            // A runtime change (`cachefs ctl DST set max-dirty`) applies to waiters too.
            limit = sh.max_dirty().unwrap_or(u64::MAX);
            if st.sched.dirty_bytes <= limit {
                log::info!(
                    "writeback: back under --max-dirty after {:.1}s",
                    started.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            if st.shut || !st.accepting {
                return Err(WritebackError::ShuttingDown);
            }
            let now = Instant::now();
            if st.sched.applied != applied {
                (applied, progress_at) = (st.sched.applied, now);
            } else if now >= progress_at + sh.dirty_stall {
                let e = WritebackError::DirtyLimit {
                    dirty: st.sched.dirty_bytes,
                    limit,
                    stalled: sh.dirty_stall,
                };
                log::warn!("{e}");
                return Err(e);
            }
            let wait = (progress_at + sh.dirty_stall)
                .saturating_duration_since(now)
                .min(Duration::from_millis(200));
            st = sh
                .cond
                .wait_timeout(st, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Block until every op recorded so far that touches exactly `path` is applied on
    /// src (its start delay is waived). Errors if one of them, or an op it waits for,
    /// has exhausted its attempts (parked as failed), or on shutdown.
    pub fn wait_synced(&self, path: &Path) -> Result<(), WritebackError> {
        let Some(sh) = &self.shared else {
            return Ok(());
        };
        let p = op::normalize_path(path)
            .ok_or_else(|| WritebackError::InvalidPath(path.to_path_buf()))?;
        let mut st = lock(&sh.state);
        let Some(target) = st.sched.latest_on(&p) else {
            return Ok(());
        };
        st.sched.make_urgent(target, Instant::now());
        sh.wake();
        loop {
            if !st.sched.entries.contains_key(&target) {
                return Ok(());
            }
            if let Some((seq, f)) = st.sched.failure_blocking(target)
                && st.sched.entries[&seq].not_before > Instant::now()
            {
                return Err(WritebackError::Failed {
                    path: p,
                    errno: f.errno,
                    message: f.message.clone(),
                });
            }
            if st.shut {
                return Err(WritebackError::ShuttingDown);
            }
            st = sh
                .cond
                .wait_timeout(st, Duration::from_secs(1))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Queues an upload of every file whose origin record was put while a writer
    /// bypassing the daemon (FUSE passthrough) had it open, unless an op for it is
    /// already pending. Called by `start`: such a writer's last bytes reach the journal
    /// only at its flush, fsync or close, which a crash (kill -9) may have prevented.
    /// Returns how many were queued.
    fn requeue_open_writers(&self) -> Result<usize, WritebackError> {
        let Some(sh) = &self.shared else {
            return Ok(0);
        };
        let store = crate::fs::origin::Store::of_root(&sh.dst).map_err(WritebackError::Io)?;
        let mut queued = 0;
        for path in store.open_writer_paths() {
            if !self.has_pending(&path) {
                self.record(Op::Write { path })?;
                queued += 1;
            }
        }
        if queued > 0 {
            log::info!(
                "writeback: {queued} file(s) were open for writing when the daemon last stopped: queued for upload"
            );
        }
        Ok(queued)
    }

    /// True while an op touching `path` or anything below it is not yet applied on src:
    /// such dst data is dirty and must not be evicted.
    pub fn has_pending(&self, path: &Path) -> bool {
        let Some(sh) = &self.shared else {
            return false;
        };
        let Some(p) = op::normalize_path(path) else {
            return false;
        };
        lock(&sh.state).sched.has_pending_under(&p)
    }
}

impl Drop for Writeback {
    fn drop(&mut self) {
        self.shutdown(Duration::ZERO);
    }
}

/// The layered view reports its mutations here.
impl crate::fs::ChangeLog for Writeback {
    fn record(&self, op: Op) -> io::Result<()> {
        Ok(Writeback::record(self, op)?)
    }

    fn begin_change(&self) -> ChangeGuard<'_> {
        Writeback::begin_change(self)
    }

    fn intend(&self, paths: &[&Path]) -> io::Result<IntentGuard<'_>> {
        Ok(Writeback::intend(self, paths)?)
    }

    fn throttle(&self) -> io::Result<()> {
        Ok(Writeback::throttle(self)?)
    }

    fn over_dirty_limit(&self) -> bool {
        Writeback::over_dirty_limit(self)
    }

    /// Only mirror mode waits: with asynchronous writeback, close() and fsync() return
    /// once dst holds the bytes and the journal holds the op.
    fn wait_synced(&self, path: &Path) -> io::Result<()> {
        if !self.mirror {
            return Ok(());
        }
        Writeback::wait_synced(self, path).map_err(|e| {
            log::warn!("{e}");
            io::Error::from(e)
        })
    }

    fn has_pending(&self, path: &Path) -> bool {
        Writeback::has_pending(self, path)
    }
}
