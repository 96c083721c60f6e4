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
//! Pieces: [`journal`] (on-disk format), `sched` (causal queue), `replay` (applying an
//! op to src), `retry` (backoff), `at` (no-follow name-relative calls, over `crate::sys`), [`status`] (the CLI view),
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
//!   the intent file first ([`Writeback::intend`], see `intents`); the next start
//!   journals a `sync` of each path left there.
//! - **A file open for writing at a crash:** its last writes may not be journaled (they
//!   are reported at flush/fsync/release); uploads while it is open leave its origin
//!   record `open_writer`, and the next start queues an upload of each such file
//!   ([`Writeback::requeue_open_writers`]).
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
mod intents;
pub mod journal;
mod leftovers;
mod op;
mod replay;
mod retry;
mod sched;
pub mod status;
mod unrep;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::config::Config;
use crate::metrics::{self, METRICS};
pub use intents::IntentGuard;
use intents::Intents;
use journal::{FailInfo, Journal, Record};
pub(crate) use op::paths as op_paths;
use sched::Sched;

/// One mutation, by mount-relative path (no leading `/`; "" is the root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// File content changed (write, truncate, fallocate, copy_file_range target).
    Write {
        path: PathBuf,
    },
    /// A regular file was created.
    Create {
        path: PathBuf,
    },
    /// A fifo, socket or device node was created.
    Mknod {
        path: PathBuf,
    },
    Mkdir {
        path: PathBuf,
    },
    Symlink {
        path: PathBuf,
    },
    /// Hard link `new` to the existing `existing`.
    Link {
        existing: PathBuf,
        new: PathBuf,
    },
    Unlink {
        path: PathBuf,
    },
    Rmdir {
        path: PathBuf,
    },
    /// `exchange`: RENAME_EXCHANGE swapped the two.
    Rename {
        from: PathBuf,
        to: PathBuf,
        exchange: bool,
    },
    /// chmod, chown or utimens.
    SetAttr {
        path: PathBuf,
    },
    /// setxattr/removexattr.
    Xattr {
        path: PathBuf,
    },
    /// Make src's `path` match dst's view of it, recursively: content, metadata,
    /// children; dst's whiteouts and opaque marker below it remove the src entries they
    /// hide. Used for rename follow-ups; `fs` may use it for anything coarse.
    Sync {
        path: PathBuf,
    },
}

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
            WritebackError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
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

struct Job {
    seq: u64,
    op: Op,
    ids: [Option<at::Id>; 2],
    attempt: u32,
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
}

/// Held (shared) across a dst rename and its [`Writeback::record`]; see the
/// module doc. Inert without `-w`.
pub struct ChangeGuard<'a>(#[allow(dead_code)] Option<RwLockReadGuard<'a, ()>>);

impl ChangeGuard<'_> {
    /// A guard that holds nothing (no writeback).
    pub fn none() -> ChangeGuard<'static> {
        ChangeGuard(None)
    }
}

/// The queue's numbers at one moment ([`Writeback::counters`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueCounters {
    /// Ops journaled and not yet applied on src (failed ones included).
    pub pending: u64,
    /// Of those, ops parked as failed (their attempts exhausted).
    pub failed: u64,
    /// Ops being replayed now.
    pub running: u64,
    /// File data waiting for upload (what `--max-dirty` bounds).
    pub dirty_bytes: u64,
    /// Ops applied on src since start.
    pub applied: u64,
    /// File data of the ops applied since start.
    pub uploaded_bytes: u64,
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
                        ms: status::now_ms(),
                        errno: e.raw_os_error().unwrap_or(libc::EIO),
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
        let ms = status::now_ms();
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

fn dispatcher(sh: Arc<Shared>, jobs: Sender<Job>, wake: Receiver<()>, workers: usize) {
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
                if jobs
                    .send(Job {
                        seq,
                        op,
                        ids,
                        attempt,
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
const PROBE_WAIT: Duration = Duration::from_secs(2);

/// Finds src's capabilities in the background (see `caps`): at once, and while src is
/// offline or fails the probe, again after 1 s, 2 s, 4 s ... 60 s, unless a replay
/// probed meanwhile. Ends with the daemon. `tried` hears once, after the first try.
fn probe_src(sh: std::sync::Weak<Shared>, tried: Sender<()>) {
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
fn leftover_checks(sh: std::sync::Weak<Shared>) {
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let Some(sh) = sh.upgrade() else { return };
        if sh.stop.load(Ordering::Acquire) {
            return;
        }
        let due = sh.leftovers.take_due(status::now_ms());
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

fn worker(sh: Arc<Shared>, jobs: Receiver<Job>) {
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
        // not a src error.
        let took = t.observe(op::src_op(&job.op));
        if !matches!(&r, Err(e) if e.kind() == io::ErrorKind::Interrupted) {
            METRICS.src_result(&r);
        }
        sh.complete(job, r, notes, took, src_offline);
    }
}

impl Writeback {
    /// Open (or create) the journal in `cfg.dst`, load what is pending and start the
    /// replay workers. Pending ops (failed ones included) start after `start_delay`.
    /// Fails if another process holds the journal.
    pub fn start(cfg: &Config) -> Result<Arc<Writeback>, WritebackError> {
        if !cfg.writeback {
            return Ok(Arc::new(Writeback {
                shared: None,
                threads: Mutex::new(Vec::new()),
                mirror: false,
            }));
        }
        let src = crate::fs::src_state::open_src(&cfg.src, &cfg.dst)?;
        Self::start_with_src(cfg, Arc::new(src))
    }

    /// Like [`Writeback::start`] with `-w`, replaying through `src`: the layer the view
    /// uses ([`crate::fs::src_state::open_src`]).
    pub fn start_with_src(
        cfg: &Config,
        src: Arc<crate::fs::layer::Layer>,
    ) -> Result<Arc<Writeback>, WritebackError> {
        let (journal, live, next_seq) = Journal::open(&cfg.dst)?;
        let (intents, interrupted) = Intents::open(&journal::dir(&cfg.dst))?;
        let now = Instant::now();
        let mut sched = Sched::default();
        let loaded = live.len();
        for (seq, l) in live {
            sched.insert(seq, l.ms, l.op, l.ids, now + cfg.start_delay, now);
            if let Some(f) = l.fail {
                let e = sched.entries.get_mut(&seq).expect("just inserted");
                e.attempts = f.attempts;
                e.fail = Some(f);
            }
            let op = &sched.entries[&seq].op;
            sched.note_bytes(seq, upload_size(&cfg.dst, op));
        }
        let mut inner = Inner {
            journal,
            sched,
            next_seq,
            written_upto: next_seq - 1,
            durable_upto: next_seq - 1,
            accepting: true,
            shut: false,
        };
        if inner.journal.lines > loaded as u64 + 1 {
            Shared::compact(&mut inner)?;
        }
        Shared::publish_depth(&inner);
        let unrep = unrep::Store::open(&cfg.dst)?;
        METRICS
            .writeback_not_representable
            .set(unrep.map.len() as i64);
        if loaded > 0 {
            log::info!("writeback: resuming {loaded} pending ops from the journal");
        }
        let (wake_tx, wake_rx) = crossbeam_channel::bounded(1);
        let runs = journal::new_run(&cfg.dst)?;
        log::info!(
            "writeback: temp names on src this run: {}wb.{}.*",
            crate::fs::names::TEMP_PREFIX,
            runs.current
        );
        let sh = Arc::new(Shared {
            caps: caps::Caps::new(&runs, &cfg.src, &cfg.dst),
            unrep: Mutex::new(unrep),
            unrep_logged: std::sync::atomic::AtomicU64::new(0),
            leftovers: leftovers::Leftovers::open(&cfg.dst, cfg.src_settle),
            src,
            dst: cfg.dst.clone(),
            attempts: cfg.retries.max(1),
            retry_delay: cfg.retry_delay,
            start_delay: cfg.start_delay,
            log: cfg.log_writeback,
            runs,
            first_seq: next_seq,
            state: Mutex::new(inner),
            cond: Condvar::new(),
            sync_lock: Mutex::new(()),
            wake: wake_tx,
            stop: AtomicBool::new(false),
            changes: RwLock::new(()),
            max_dirty: AtomicU64::new(cfg.max_dirty.unwrap_or(u64::MAX)),
            dirty_stall: cfg.src_timeout.max(Duration::from_secs(1)),
            intents,
        });
        let workers = (cfg.concurrent as usize).max(1);
        let (job_tx, job_rx) = crossbeam_channel::unbounded();
        let mut threads = Vec::new();
        for i in 0..workers {
            let (s, r) = (sh.clone(), job_rx.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("writeback-{i}"))
                    .spawn(move || worker(s, r))?,
            );
        }
        // Not joined at shutdown: it may sit in a call to a hung src.
        let weak = Arc::downgrade(&sh);
        std::thread::Builder::new()
            .name("writeback-leftovers".into())
            .spawn(move || leftover_checks(weak))?;
        let s = sh.clone();
        threads.push(
            std::thread::Builder::new()
                .name("writeback-dispatch".into())
                .spawn(move || dispatcher(s, job_tx, wake_rx, workers))?,
        );
        // src's capabilities are probed before the first replay (see `worker`), so a
        // mount that changes nothing leaves src untouched. With paths listed as not
        // representable, they are probed now (src may have changed: rclone restarted
        // with --links), in a thread the start waits for at most PROBE_WAIT. Not
        // joined: it may sit in a call to a hung src; it holds no lock meanwhile.
        let probe_now = !lock(&sh.unrep).map.is_empty();
        if probe_now {
            let weak = Arc::downgrade(&sh);
            let (tried_tx, tried_rx) = crossbeam_channel::bounded(1);
            std::thread::Builder::new()
                .name("writeback-probe".into())
                .spawn(move || probe_src(weak, tried_tx))?;
            if matches!(
                tried_rx.recv_timeout(PROBE_WAIT),
                Err(RecvTimeoutError::Timeout)
            ) {
                log::info!(
                    "writeback: src does not answer the capability probe within {PROBE_WAIT:?}; \
                     probing in the background"
                );
            }
        }
        let wb = Arc::new(Writeback {
            shared: Some(sh),
            threads: Mutex::new(threads),
            mirror: cfg.concurrent == 0,
        });
        // Crash recovery, before the first request: what the journal cannot know.
        wb.resync_interrupted(interrupted)?;
        wb.requeue_open_writers()?;
        wb.resync_now_representable()?;
        Ok(wb)
    }

    /// Journals a `sync` of every path listed as not representable for a reason src
    /// can hold now (rclone restarted with `--links`, say), if the probe answered
    /// during the start. A hard link stays a copy (a sync does not link).
    fn resync_now_representable(&self) -> Result<(), WritebackError> {
        let Some(sh) = &self.shared else {
            return Ok(());
        };
        let Some(c) = sh.caps.get() else {
            return Ok(());
        };
        let fixed = [
            (c.symlinks, unrep::SYMLINK),
            (c.special_files, unrep::SPECIAL),
            (c.chmod, unrep::MODE),
            (c.chown, unrep::OWNER),
            (c.utimes, unrep::MTIME),
            (c.user_xattrs, unrep::XATTRS),
        ]
        .iter()
        .filter(|(can, _)| *can)
        .fold(0, |acc, (_, bit)| acc | bit);
        let paths: Vec<PathBuf> = lock(&sh.unrep)
            .map
            .iter()
            .filter(|(_, e)| e.what & fixed != 0)
            .map(|(p, _)| p.clone())
            .collect();
        for path in &paths {
            self.record(Op::Sync { path: path.clone() })?;
        }
        if !paths.is_empty() {
            log::info!(
                "writeback: src can now hold what {} path(s) listed as not representable \
                 need: queued a sync of each",
                paths.len()
            );
        }
        Ok(())
    }

    /// Journals a `sync` of every path whose change a crash interrupted (left in the
    /// intent file), then empties that file.
    fn resync_interrupted(&self, paths: Vec<PathBuf>) -> Result<(), WritebackError> {
        let Some(sh) = &self.shared else {
            return Ok(());
        };
        let mut seen = std::collections::BTreeSet::new();
        for path in paths.iter().filter_map(|p| op::normalize_path(p)) {
            if seen.insert(path.clone()) {
                self.record(Op::Sync { path })?;
            }
        }
        if !seen.is_empty() {
            log::info!(
                "writeback: {} path(s) were being changed when the daemon last stopped: queued a sync of each",
                seen.len()
            );
        }
        sh.intents.clear()?;
        Ok(())
    }

    /// Notes that `paths` are about to change on dst; keep the guard until the change's
    /// op is journaled (see `intents`).
    pub fn intend(&self, paths: &[&Path]) -> Result<IntentGuard<'_>, WritebackError> {
        match &self.shared {
            Some(sh) => Ok(sh.intents.begin(paths)?),
            None => Ok(IntentGuard::none()),
        }
    }

    /// Hold across a dst rename and its `record` (see "Namespace changes and skipped
    /// ops" in the module doc).
    pub fn begin_change(&self) -> ChangeGuard<'_> {
        ChangeGuard(
            self.shared
                .as_ref()
                .map(|sh| sh.changes.read().unwrap_or_else(|p| p.into_inner())),
        )
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
                let ms = status::now_ms();
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
    pub fn set_max_dirty(&self, max_dirty: Option<u64>) {
        if let Some(sh) = &self.shared {
            sh.max_dirty
                .store(max_dirty.unwrap_or(u64::MAX), Ordering::Relaxed);
            let _st = lock(&sh.state);
            sh.cond.notify_all();
        }
    }

    /// `--max-dirty` in force.
    pub fn max_dirty(&self) -> Option<u64> {
        self.shared.as_ref().and_then(|sh| sh.max_dirty())
    }

    /// Retries every op parked as failed now, instead of at its periodic retry
    /// (`cachefs ctl DST retry`). How many were parked.
    pub fn retry_failed_now(&self) -> usize {
        let Some(sh) = &self.shared else {
            return 0;
        };
        let n = lock(&sh.state).sched.retry_failed_now(Instant::now());
        sh.wake();
        n
    }

    /// The queue's numbers now (for the control channel).
    pub fn counters(&self) -> QueueCounters {
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
    pub fn over_dirty_limit(&self) -> bool {
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
    pub fn throttle(&self) -> Result<(), WritebackError> {
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

impl Drop for Writeback {
    fn drop(&mut self) {
        self.shutdown(Duration::ZERO);
    }
}

/// The layered view reports its mutations here.
impl crate::fs::ChangeLog for Writeback {
    fn record(&self, op: Op) -> io::Result<()> {
        Writeback::record(self, op).map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }

    fn begin_change(&self) -> ChangeGuard<'_> {
        Writeback::begin_change(self)
    }

    fn intend(&self, paths: &[&Path]) -> io::Result<IntentGuard<'_>> {
        Writeback::intend(self, paths).map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }

    fn throttle(&self) -> io::Result<()> {
        Writeback::throttle(self).map_err(|e| io::Error::from_raw_os_error(e.errno()))
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
            io::Error::from_raw_os_error(e.errno())
        })
    }

    fn has_pending(&self, path: &Path) -> bool {
        Writeback::has_pending(self, path)
    }
}
