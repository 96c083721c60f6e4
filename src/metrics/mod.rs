//! Process-wide metrics, rendered in the Prometheus text format (0.0.4) and served over
//! HTTP by `--metrics-addr`.
//!
//! # Design
//!
//! One global registry, [`METRICS`], made only of atomics: any module calls it from any
//! thread with no setup, no locks and no allocation (`METRICS.evictions.inc()` is one
//! relaxed atomic add). Every series exists from the start (at 0), so dashboards and
//! alerts never see a missing series. [`render`] reads the atomics one by one: a scrape
//! is not an atomic snapshot across metrics, but each histogram's `+Inf` bucket and
//! `_count` are computed from the same bucket reads, so they always agree.
//!
//! # Metrics
//!
//! | name | type | meaning |
//! |---|---|---|
//! | `cachefs_cache_hits_total` | counter | a file's data was needed in dst (open, truncate, link or rename of a subtree) and was already there |
//! | `cachefs_cache_misses_total` | counter | a file was copied from src into dst (a copy-up) |
//! | `cachefs_src_bytes_fetched_total` | counter | bytes of file data read from src into dst (copy-ups and range fetches) |
//! | `cachefs_cache_evictions_total` | counter | clean files evicted from dst to respect the cache budget |
//! | `cachefs_writeback_queue_depth` | gauge | writeback ops journaled and not yet replayed on src (pending + failed) |
//! | `cachefs_writeback_dirty_bytes` | gauge | bytes of file data journaled for upload and not yet on src (what `--max-dirty` bounds) |
//! | `cachefs_writeback_throttled_total` | counter | times a writer had to wait because `--max-dirty` was exceeded |
//! | `cachefs_writeback_replayed_total` | counter | writeback ops replayed on src successfully |
//! | `cachefs_writeback_retries_total` | counter | writeback attempts that failed and were scheduled again |
//! | `cachefs_writeback_failures_total` | counter | writeback ops that exhausted their retries and were parked as failed |
//! | `cachefs_writeback_not_representable` | gauge | paths whose dst state src cannot hold (kept in dst, listed by `cachefs status`) |
//! | `cachefs_conflicts_total` | counter | files changed in dst and in src; src's version was kept under a conflict name |
//! | `cachefs_src_errors_total{kind}` | counter | src operations that failed, by `kind`: `timeout`, `eio`, `enotconn`, `other` |
//! | `cachefs_src_online` | gauge | 1 while src answers; 0 after a src operation failed with ENOTCONN or a timeout |
//! | `cachefs_src_op_duration_seconds{op}` | histogram | latency of src operations, by `op` (see [`SrcOp`]) |
//! | `cachefs_lazy_bytes_fetched_total` | counter | bytes read from src by lazy range fetches (also in `src_bytes_fetched`) |
//! | `cachefs_fuse_op_duration_seconds{op}` | histogram | latency of FUSE requests the daemon answers, by `op` (see [`FuseOp`]) |
//! | `cachefs_cache_usage_bytes`, `_files`, `_pinned_bytes`, `_partial_bytes` | gauge | the cache's usage index (as in `cache.json`; 0 without one) |
//! | `cachefs_cache_budget_bytes`, `cachefs_cache_min_free_bytes` | gauge | `--cache-size`, `--min-free` in bytes (0: none) |
//! | `cachefs_dst_free_bytes` | gauge | free bytes on dst's file system |
//! | `cachefs_process_*` | gauge, counter | resident memory, open and max fds, threads, start time, CPU seconds, read from `/proc/self` at each scrape |
//! | `cachefs_build_info{version}` | gauge | always 1; the `version` label is the cachefs version |
//!
//! Normal negative answers of src (ENOENT, ENOTDIR, EISDIR, EEXIST, ENOTEMPTY, ENODATA,
//! EOPNOTSUPP) are not src errors: a lookup of a name that src lacks is not a failure.
//! Latency buckets (seconds): [`LATENCY_BUCKETS`] for src operations, the finer
//! [`FUSE_BUCKETS`] for FUSE requests. docs/METRICS.md has the full list (a test checks
//! it against [`render`]'s families).
//!
//! # API for other modules
//!
//! ```
//! use cachefs::metrics::{self, SrcOp, Timer, METRICS};
//! # let (path, bytes) = ("/tmp", 0u64);
//! // Time a src call, count its error (by kind) and update cachefs_src_online:
//! let st = metrics::src_op(SrcOp::Stat, || std::fs::symlink_metadata(path));
//! // Time any closure (latency only):
//! let n = metrics::timed(SrcOp::Fetch, || 42);
//! // Or time by hand:
//! let t = Timer::start();
//! /* ... */
//! t.observe(SrcOp::Write);
//! // Counters and gauges:
//! metrics::cache_hit();
//! metrics::cache_miss(bytes); // one copy-up that fetched `bytes`
//! METRICS.src_bytes_fetched.add(4096); // a range fetch
//! METRICS.writeback_queue_depth.inc();
//! METRICS.writeback_replayed.inc();
//! ```
//!
//! docs/METRICS.md lists which module calls what.
//!
//! # Files
//!
//! This file is the registry (the types and [`METRICS`]); `render` writes the
//! Prometheus text of it (and reads `/proc/self` for the process series); `http` is
//! the `--metrics-addr` endpoint ([`serve`]: `GET /metrics`, bounded connections and
//! deadlines, no authentication: bind it to a loopback address).

use std::io;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

mod http;
mod render;

pub use http::{MAX_CONNECTIONS, MetricsServer, REQUEST_DEADLINE, serve};
pub use render::{ProcessStats, process_stats, render};

const RELAXED: Ordering = Ordering::Relaxed;

/// The process-wide registry.
pub static METRICS: Metrics = Metrics::new();

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub const fn new() -> Counter {
        Counter(AtomicU64::new(0))
    }
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, RELAXED);
    }
    pub fn get(&self) -> u64 {
        self.0.load(RELAXED)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub const fn new(v: i64) -> Gauge {
        Gauge(AtomicI64::new(v))
    }
    pub fn set(&self, v: i64) {
        self.0.store(v, RELAXED);
    }
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn dec(&self) {
        self.add(-1);
    }
    pub fn add(&self, n: i64) {
        self.0.fetch_add(n, RELAXED);
    }
    pub fn get(&self) -> i64 {
        self.0.load(RELAXED)
    }
}

/// Upper bounds of the src latency buckets, and their `le` label (the last bucket,
/// `+Inf`, is implicit).
pub const LATENCY_BUCKETS: [(Duration, &str); 15] = [
    (Duration::from_millis(1), "0.001"),
    (Duration::from_micros(2500), "0.0025"),
    (Duration::from_millis(5), "0.005"),
    (Duration::from_millis(10), "0.01"),
    (Duration::from_millis(25), "0.025"),
    (Duration::from_millis(50), "0.05"),
    (Duration::from_millis(100), "0.1"),
    (Duration::from_millis(250), "0.25"),
    (Duration::from_millis(500), "0.5"),
    (Duration::from_secs(1), "1"),
    (Duration::from_millis(2500), "2.5"),
    (Duration::from_secs(5), "5"),
    (Duration::from_secs(10), "10"),
    (Duration::from_secs(30), "30"),
    (Duration::from_secs(60), "60"),
];

/// Upper bounds of the FUSE operation latency buckets: most requests are answered from
/// dst in microseconds, a miss waits for src.
pub const FUSE_BUCKETS: [(Duration, &str); 12] = [
    (Duration::from_micros(100), "0.0001"),
    (Duration::from_micros(500), "0.0005"),
    (Duration::from_millis(1), "0.001"),
    (Duration::from_millis(5), "0.005"),
    (Duration::from_millis(10), "0.01"),
    (Duration::from_millis(50), "0.05"),
    (Duration::from_millis(100), "0.1"),
    (Duration::from_millis(500), "0.5"),
    (Duration::from_secs(1), "1"),
    (Duration::from_secs(5), "5"),
    (Duration::from_secs(10), "10"),
    (Duration::from_secs(60), "60"),
];

/// Most buckets a histogram has, `+Inf` included.
const MAX_BUCKETS: usize = 16;

/// A latency histogram with fixed bucket bounds ([`LATENCY_BUCKETS`] or
/// [`FUSE_BUCKETS`]). `observe` is two relaxed atomic adds; the cumulative counts are
/// computed when rendering.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [(Duration, &'static str)],
    /// Observations per bucket (not cumulative); `counts[bounds.len()]` is `+Inf`.
    counts: [AtomicU64; MAX_BUCKETS],
    sum_nanos: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new()
    }
}

impl Histogram {
    /// A histogram with the src latency buckets.
    pub const fn new() -> Histogram {
        Histogram::with_bounds(&LATENCY_BUCKETS)
    }

    /// A histogram with `bounds` (increasing; at most `MAX_BUCKETS - 1` of them).
    pub const fn with_bounds(bounds: &'static [(Duration, &'static str)]) -> Histogram {
        assert!(bounds.len() < MAX_BUCKETS);
        Histogram {
            bounds,
            counts: [const { AtomicU64::new(0) }; MAX_BUCKETS],
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// The bucket bounds (without `+Inf`).
    pub fn bounds(&self) -> &'static [(Duration, &'static str)] {
        self.bounds
    }

    /// Record one observation.
    pub fn observe(&self, d: Duration) {
        let i = self
            .bounds
            .iter()
            .position(|(le, _)| d <= *le)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, RELAXED);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, RELAXED);
    }

    /// Cumulative counts per bucket (`le` order, `+Inf` last: `bounds().len() + 1` of
    /// them) and the sum.
    pub fn snapshot(&self) -> (Vec<u64>, Duration) {
        let mut total = 0u64;
        let out = self.counts[..=self.bounds.len()]
            .iter()
            .map(|c| {
                total += c.load(RELAXED);
                total
            })
            .collect();
        (out, Duration::from_nanos(self.sum_nanos.load(RELAXED)))
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts[..=self.bounds.len()]
            .iter()
            .map(|c| c.load(RELAXED))
            .sum()
    }
}

/// Kinds of src operation, the `op` label of `cachefs_src_op_duration_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SrcOp {
    /// stat, lstat, readlink, getxattr/listxattr of one entry.
    Stat,
    /// Listing a directory.
    Readdir,
    /// Reading a range of a file (lazy fetch of large files).
    Read,
    /// Copying a whole entry from src into dst (a copy-up), first src stat to dst rename.
    Fetch,
    /// Writing a file's content to src (writeback upload, temp + rename).
    Write,
    /// A metadata change on src: mkdir, rmdir, unlink, rename, symlink, link, chmod,
    /// chown, utimens, setxattr, truncate.
    Meta,
    /// Anything else.
    Other,
}

impl SrcOp {
    pub const ALL: [SrcOp; 7] = [
        SrcOp::Stat,
        SrcOp::Readdir,
        SrcOp::Read,
        SrcOp::Fetch,
        SrcOp::Write,
        SrcOp::Meta,
        SrcOp::Other,
    ];

    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            SrcOp::Stat => "stat",
            SrcOp::Readdir => "readdir",
            SrcOp::Read => "read",
            SrcOp::Fetch => "fetch",
            SrcOp::Write => "write",
            SrcOp::Meta => "meta",
            SrcOp::Other => "other",
        }
    }
}

/// Kinds of src failure, the `kind` label of `cachefs_src_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SrcErrorKind {
    /// ETIMEDOUT, or an `io::ErrorKind::TimedOut` from a watchdog.
    Timeout,
    /// EIO (what rclone returns when the remote fails).
    Eio,
    /// ENOTCONN (a dead FUSE mount, e.g. rclone crashed).
    Enotconn,
    /// Any other failure (EACCES, ENOSPC, ...).
    Other,
}

impl SrcErrorKind {
    pub const ALL: [SrcErrorKind; 4] = [
        SrcErrorKind::Timeout,
        SrcErrorKind::Eio,
        SrcErrorKind::Enotconn,
        SrcErrorKind::Other,
    ];

    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            SrcErrorKind::Timeout => "timeout",
            SrcErrorKind::Eio => "eio",
            SrcErrorKind::Enotconn => "enotconn",
            SrcErrorKind::Other => "other",
        }
    }

    /// The kind of a src failure, or `None` for a normal negative answer (ENOENT, ...)
    /// that says nothing about src's health.
    pub fn of(e: &io::Error) -> Option<SrcErrorKind> {
        match e.raw_os_error() {
            Some(
                libc::ENOENT
                | libc::ENOTDIR
                | libc::EISDIR
                | libc::EEXIST
                | libc::ENOTEMPTY
                | libc::ENODATA
                | libc::EOPNOTSUPP,
            ) => None,
            Some(libc::ETIMEDOUT) => Some(SrcErrorKind::Timeout),
            Some(libc::EIO) => Some(SrcErrorKind::Eio),
            Some(libc::ENOTCONN) => Some(SrcErrorKind::Enotconn),
            Some(_) => Some(SrcErrorKind::Other),
            None => match e.kind() {
                io::ErrorKind::NotFound => None,
                io::ErrorKind::TimedOut => Some(SrcErrorKind::Timeout),
                _ => Some(SrcErrorKind::Other),
            },
        }
    }
}

/// FUSE requests the daemon answers, the `op` label of
/// `cachefs_fuse_op_duration_seconds` (one per `fuser::Filesystem` method the adapter
/// implements, named like it; `init` and `forget`, which have no reply, are not timed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FuseOp {
    Lookup,
    Getattr,
    Setattr,
    Readlink,
    Mknod,
    Mkdir,
    Unlink,
    Rmdir,
    Symlink,
    Rename,
    Link,
    Open,
    Read,
    Write,
    Flush,
    Release,
    Fsync,
    Opendir,
    Readdir,
    Readdirplus,
    Releasedir,
    Fsyncdir,
    Statfs,
    Setxattr,
    Getxattr,
    Listxattr,
    Removexattr,
    Ioctl,
    Access,
    Create,
    Fallocate,
    Lseek,
    CopyFileRange,
}

impl FuseOp {
    pub const ALL: [FuseOp; 33] = [
        FuseOp::Lookup,
        FuseOp::Getattr,
        FuseOp::Setattr,
        FuseOp::Readlink,
        FuseOp::Mknod,
        FuseOp::Mkdir,
        FuseOp::Unlink,
        FuseOp::Rmdir,
        FuseOp::Symlink,
        FuseOp::Rename,
        FuseOp::Link,
        FuseOp::Open,
        FuseOp::Read,
        FuseOp::Write,
        FuseOp::Flush,
        FuseOp::Release,
        FuseOp::Fsync,
        FuseOp::Opendir,
        FuseOp::Readdir,
        FuseOp::Readdirplus,
        FuseOp::Releasedir,
        FuseOp::Fsyncdir,
        FuseOp::Statfs,
        FuseOp::Setxattr,
        FuseOp::Getxattr,
        FuseOp::Listxattr,
        FuseOp::Removexattr,
        FuseOp::Ioctl,
        FuseOp::Access,
        FuseOp::Create,
        FuseOp::Fallocate,
        FuseOp::Lseek,
        FuseOp::CopyFileRange,
    ];

    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            FuseOp::Lookup => "lookup",
            FuseOp::Getattr => "getattr",
            FuseOp::Setattr => "setattr",
            FuseOp::Readlink => "readlink",
            FuseOp::Mknod => "mknod",
            FuseOp::Mkdir => "mkdir",
            FuseOp::Unlink => "unlink",
            FuseOp::Rmdir => "rmdir",
            FuseOp::Symlink => "symlink",
            FuseOp::Rename => "rename",
            FuseOp::Link => "link",
            FuseOp::Open => "open",
            FuseOp::Read => "read",
            FuseOp::Write => "write",
            FuseOp::Flush => "flush",
            FuseOp::Release => "release",
            FuseOp::Fsync => "fsync",
            FuseOp::Opendir => "opendir",
            FuseOp::Readdir => "readdir",
            FuseOp::Readdirplus => "readdirplus",
            FuseOp::Releasedir => "releasedir",
            FuseOp::Fsyncdir => "fsyncdir",
            FuseOp::Statfs => "statfs",
            FuseOp::Setxattr => "setxattr",
            FuseOp::Getxattr => "getxattr",
            FuseOp::Listxattr => "listxattr",
            FuseOp::Removexattr => "removexattr",
            FuseOp::Ioctl => "ioctl",
            FuseOp::Access => "access",
            FuseOp::Create => "create",
            FuseOp::Fallocate => "fallocate",
            FuseOp::Lseek => "lseek",
            FuseOp::CopyFileRange => "copy_file_range",
        }
    }

    /// Starts timing one request; the time is recorded when the timer is dropped
    /// (after the reply was sent, at the end of the adapter's method or of the thread
    /// it handed the request to).
    pub fn timer(self) -> FuseTimer {
        FuseTimer {
            op: self,
            start: Instant::now(),
        }
    }
}

/// Times one FUSE request into [`METRICS`] when dropped (see [`FuseOp::timer`]).
#[derive(Debug)]
#[must_use = "the request is timed until the timer is dropped"]
pub struct FuseTimer {
    op: FuseOp,
    start: Instant,
}

impl Drop for FuseTimer {
    fn drop(&mut self) {
        METRICS.fuse_latency(self.op).observe(self.start.elapsed());
    }
}

/// The registry. Use the global [`METRICS`]; separate instances exist for tests.
#[derive(Debug)]
pub struct Metrics {
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub src_bytes_fetched: Counter,
    pub evictions: Counter,
    pub writeback_queue_depth: Gauge,
    pub writeback_dirty_bytes: Gauge,
    pub writeback_throttled: Counter,
    pub writeback_replayed: Counter,
    pub writeback_retries: Counter,
    pub writeback_failures: Counter,
    pub writeback_not_representable: Gauge,
    pub conflicts: Counter,
    pub src_online: Gauge,
    /// Bytes of file data read from src by lazy range fetches (part of
    /// `src_bytes_fetched`).
    pub lazy_bytes_fetched: Counter,
    /// The cache's numbers (`cache.json`), published by the cache once a second; 0
    /// without a cache budget, `--min-free` or pins (no usage index then).
    pub cache_usage_bytes: Gauge,
    pub cache_files: Gauge,
    pub cache_pinned_bytes: Gauge,
    pub cache_partial_bytes: Gauge,
    /// `--cache-size`; 0 when none.
    pub cache_budget_bytes: Gauge,
    /// `--min-free` in bytes; 0 when none.
    pub cache_min_free_bytes: Gauge,
    /// Free bytes on dst's file system (for unprivileged users).
    pub dst_free_bytes: Gauge,
    src_errors: [Counter; 4],
    src_latency: [Histogram; 7],
    fuse_latency: [Histogram; FuseOp::ALL.len()],
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// All counters at 0, `src_online` at 1 (src was checked at startup).
    pub const fn new() -> Metrics {
        Metrics {
            cache_hits: Counter::new(),
            cache_misses: Counter::new(),
            src_bytes_fetched: Counter::new(),
            evictions: Counter::new(),
            writeback_queue_depth: Gauge::new(0),
            writeback_dirty_bytes: Gauge::new(0),
            writeback_throttled: Counter::new(),
            writeback_replayed: Counter::new(),
            writeback_retries: Counter::new(),
            writeback_failures: Counter::new(),
            writeback_not_representable: Gauge::new(0),
            conflicts: Counter::new(),
            src_online: Gauge::new(1),
            lazy_bytes_fetched: Counter::new(),
            cache_usage_bytes: Gauge::new(0),
            cache_files: Gauge::new(0),
            cache_pinned_bytes: Gauge::new(0),
            cache_partial_bytes: Gauge::new(0),
            cache_budget_bytes: Gauge::new(0),
            cache_min_free_bytes: Gauge::new(0),
            dst_free_bytes: Gauge::new(0),
            src_errors: [const { Counter::new() }; 4],
            src_latency: [const { Histogram::new() }; 7],
            fuse_latency: [const { Histogram::with_bounds(&FUSE_BUCKETS) }; FuseOp::ALL.len()],
        }
    }

    /// The `cachefs_src_errors_total{kind}` counter.
    pub fn src_errors(&self, kind: SrcErrorKind) -> &Counter {
        &self.src_errors[kind as usize]
    }

    /// The `cachefs_src_op_duration_seconds{op}` histogram.
    pub fn src_latency(&self, op: SrcOp) -> &Histogram {
        &self.src_latency[op as usize]
    }

    /// The `cachefs_fuse_op_duration_seconds{op}` histogram.
    pub fn fuse_latency(&self, op: FuseOp) -> &Histogram {
        &self.fuse_latency[op as usize]
    }

    /// Account for the outcome of a src operation: count a failure by kind, and set
    /// `src_online` to 0 after ENOTCONN or a timeout, to 1 after a success or any answer
    /// but EIO (which rclone returns both for a dead remote and for one bad object).
    pub fn src_result<T>(&self, r: &io::Result<T>) {
        let online = match r {
            Ok(_) => Some(1),
            Err(e) => match SrcErrorKind::of(e) {
                None => Some(1),
                Some(kind) => {
                    self.src_errors(kind).inc();
                    match kind {
                        SrcErrorKind::Timeout | SrcErrorKind::Enotconn => Some(0),
                        SrcErrorKind::Eio => None,
                        SrcErrorKind::Other => Some(1),
                    }
                }
            },
        };
        // Load first: no cache-line write on the common path.
        if let Some(v) = online
            && self.src_online.get() != v
        {
            self.src_online.set(v);
        }
    }
}

/// A file's data was needed in dst and was already there.
pub fn cache_hit() {
    METRICS.cache_hits.inc();
}

/// One copy-up from src into dst, which read `bytes_fetched` bytes of data from src.
pub fn cache_miss(bytes_fetched: u64) {
    METRICS.cache_misses.inc();
    METRICS.src_bytes_fetched.add(bytes_fetched);
}

/// `bytes` of file data read from src by a lazy range fetch: counted in
/// `cachefs_src_bytes_fetched_total` and `cachefs_lazy_bytes_fetched_total`.
pub fn lazy_fetched(bytes: u64) {
    METRICS.src_bytes_fetched.add(bytes);
    METRICS.lazy_bytes_fetched.add(bytes);
}

/// Runs `f`, recording its duration in the latency histogram of `op`.
pub fn timed<R>(op: SrcOp, f: impl FnOnce() -> R) -> R {
    let t = Timer::start();
    let r = f();
    t.observe(op);
    r
}

/// Runs the src call `f`: records its latency under `op`, counts a failure by kind and
/// updates `cachefs_src_online` (see [`Metrics::src_result`]).
pub fn src_op<T>(op: SrcOp, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    let r = timed(op, f);
    METRICS.src_result(&r);
    r
}

/// A started stopwatch for [`Histogram::observe`].
#[derive(Debug, Clone, Copy)]
pub struct Timer(Instant);

impl Timer {
    pub fn start() -> Timer {
        Timer(Instant::now())
    }
    pub fn elapsed(&self) -> Duration {
        self.0.elapsed()
    }
    /// Records the time since [`Timer::start`] under `op` in [`METRICS`]; returns it.
    pub fn observe(self, op: SrcOp) -> Duration {
        let d = self.elapsed();
        METRICS.src_latency(op).observe(d);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks `text` against the 0.0.4 grammar we use: every sample belongs to the family
    /// announced by the `# HELP`/`# TYPE` pair right above it, counters end in `_total`,
    /// names are prefixed, values parse, and the text ends with a newline.
    pub(super) fn check_format(text: &str) {
        assert!(text.ends_with('\n'));
        let mut family: Option<(String, String)> = None;
        let mut lines = text.lines();
        while let Some(line) = lines.next() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').expect("HELP has a text");
                assert!(!help.is_empty() && !help.contains('\\'), "{line}");
                let ty = lines.next().expect("TYPE after HELP");
                let kind = ty
                    .strip_prefix(&format!("# TYPE {name} "))
                    .unwrap_or_else(|| panic!("TYPE for {name} right after HELP: {ty}"));
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{kind}");
                assert!(name.starts_with("cachefs_"), "{name}");
                if kind == "counter" {
                    assert!(name.ends_with("_total"), "{name}");
                }
                family = Some((name.to_string(), kind.to_string()));
                continue;
            }
            assert!(!line.starts_with('#'), "stray comment {line}");
            let (name, kind) = family.as_ref().expect("sample after a TYPE line");
            let (series, value) = line.rsplit_once(' ').expect("sample has a value");
            value
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("value of {line}"));
            let metric = series.split('{').next().unwrap();
            let ok = if kind == "histogram" {
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| metric == format!("{name}{s}"))
            } else {
                metric == name
            };
            assert!(ok, "{series} outside its family {name}");
            let labels = &series[metric.len()..];
            if !labels.is_empty() {
                assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
                for pair in labels[1..labels.len() - 1].split(',') {
                    let (k, v) = pair.split_once('=').expect("label=value");
                    assert!(k.chars().all(|c| c.is_ascii_lowercase()), "{line}");
                    assert!(v.len() >= 2 && v.starts_with('"') && v.ends_with('"'));
                }
            }
        }
    }

    #[test]
    fn fresh_registry_renders_every_series_at_zero() {
        let m = Metrics::new();
        let text = m.render();
        check_format(&text);
        for line in [
            "cachefs_cache_hits_total 0",
            "cachefs_cache_misses_total 0",
            "cachefs_src_bytes_fetched_total 0",
            "cachefs_cache_evictions_total 0",
            "cachefs_writeback_queue_depth 0",
            "cachefs_writeback_dirty_bytes 0",
            "cachefs_writeback_throttled_total 0",
            "cachefs_writeback_replayed_total 0",
            "cachefs_writeback_retries_total 0",
            "cachefs_writeback_failures_total 0",
            "cachefs_writeback_not_representable 0",
            "cachefs_conflicts_total 0",
            "cachefs_src_errors_total{kind=\"timeout\"} 0",
            "cachefs_src_errors_total{kind=\"eio\"} 0",
            "cachefs_src_errors_total{kind=\"enotconn\"} 0",
            "cachefs_src_errors_total{kind=\"other\"} 0",
            "cachefs_src_online 1",
            "cachefs_src_op_duration_seconds_bucket{op=\"fetch\",le=\"0.001\"} 0",
            "cachefs_src_op_duration_seconds_bucket{op=\"other\",le=\"+Inf\"} 0",
            "cachefs_src_op_duration_seconds_sum{op=\"stat\"} 0",
            "cachefs_src_op_duration_seconds_count{op=\"meta\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        let build = format!(
            "cachefs_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.lines().any(|l| l == build));
        // 7 ops x (16 buckets + sum + count).
        assert_eq!(
            text.matches("cachefs_src_op_duration_seconds_").count(),
            7 * 18
        );
    }

    #[test]
    fn counter_renders_exactly() {
        let m = Metrics::new();
        m.cache_misses.inc();
        m.cache_misses.add(2);
        m.src_bytes_fetched.add(1 << 40);
        let text = m.render();
        let want = "# HELP cachefs_cache_misses_total Files copied from src into dst (copy-ups).\n\
                    # TYPE cachefs_cache_misses_total counter\n\
                    cachefs_cache_misses_total 3\n";
        assert!(text.contains(want), "{text}");
        assert!(text.contains("\ncachefs_src_bytes_fetched_total 1099511627776\n"));
    }

    #[test]
    fn gauges_go_both_ways() {
        let m = Metrics::new();
        m.writeback_queue_depth.add(5);
        m.writeback_queue_depth.dec();
        m.writeback_queue_depth.inc();
        m.writeback_queue_depth.add(-2);
        m.src_online.set(0);
        let text = m.render();
        assert!(text.contains(
            "# TYPE cachefs_writeback_queue_depth gauge\ncachefs_writeback_queue_depth 3\n"
        ));
        assert!(text.contains("\ncachefs_src_online 0\n"));
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::new();
        let h = m.src_latency(SrcOp::Stat);
        for d in [
            Duration::from_micros(10),  // <= 1ms
            Duration::from_millis(1),   // exactly 1ms: le is inclusive
            Duration::from_millis(3),   // <= 5ms
            Duration::from_millis(700), // <= 1s
            Duration::from_secs(61),    // +Inf only
            Duration::from_secs(3600),  // +Inf only
        ] {
            h.observe(d);
        }
        let text = m.render();
        check_format(&text);
        let want: Vec<String> = [
            ("0.001", 2),
            ("0.0025", 2),
            ("0.005", 3),
            ("0.01", 3),
            ("0.025", 3),
            ("0.05", 3),
            ("0.1", 3),
            ("0.25", 3),
            ("0.5", 3),
            ("1", 4),
            ("2.5", 4),
            ("5", 4),
            ("10", 4),
            ("30", 4),
            ("60", 4),
            ("+Inf", 6),
        ]
        .iter()
        .map(|(le, n)| {
            format!("cachefs_src_op_duration_seconds_bucket{{op=\"stat\",le=\"{le}\"}} {n}")
        })
        .chain([
            "cachefs_src_op_duration_seconds_sum{op=\"stat\"} 3661.70401".to_string(),
            "cachefs_src_op_duration_seconds_count{op=\"stat\"} 6".to_string(),
        ])
        .collect();
        let got: Vec<&str> = text.lines().filter(|l| l.contains("op=\"stat\"")).collect();
        assert_eq!(got, want);
        assert_eq!(h.count(), 6);
        // Other ops are untouched.
        assert!(text.contains("cachefs_src_op_duration_seconds_count{op=\"fetch\"} 0\n"));
        // The family header comes once, before the first op.
        let header = "# HELP cachefs_src_op_duration_seconds Latency of src operations by op.\n\
                      # TYPE cachefs_src_op_duration_seconds histogram\n\
                      cachefs_src_op_duration_seconds_bucket{op=\"stat\",le=\"0.001\"} 2\n";
        assert!(text.contains(header), "{text}");
        assert_eq!(
            text.matches("# TYPE cachefs_src_op_duration_seconds ")
                .count(),
            1
        );
    }

    #[test]
    fn bucket_bounds_increase_and_match_their_labels() {
        for bounds in [&LATENCY_BUCKETS[..], &FUSE_BUCKETS[..]] {
            assert!(bounds.len() < MAX_BUCKETS);
            for w in bounds.windows(2) {
                assert!(w[0].0 < w[1].0);
            }
            for (d, le) in bounds {
                assert_eq!(le.parse::<f64>().unwrap(), d.as_secs_f64());
            }
        }
    }

    #[test]
    fn fuse_ops_are_timed_by_op_with_their_own_buckets() {
        let names: std::collections::HashSet<_> = FuseOp::ALL.iter().map(|o| o.name()).collect();
        assert_eq!(names.len(), FuseOp::ALL.len(), "op names are unique");
        for (i, op) in FuseOp::ALL.iter().enumerate() {
            assert_eq!(*op as usize, i, "ALL is in declaration order");
        }
        let m = Metrics::new();
        let h = m.fuse_latency(FuseOp::Lookup);
        h.observe(Duration::from_micros(50)); // <= 0.0001
        h.observe(Duration::from_millis(3)); // <= 0.005
        h.observe(Duration::from_secs(120)); // +Inf only
        let text = m.render();
        check_format(&text);
        let got: Vec<&str> = text
            .lines()
            .filter(|l| {
                l.starts_with("cachefs_fuse_op_duration_seconds") && l.contains("op=\"lookup\"")
            })
            .collect();
        let mut want: Vec<String> = [
            ("0.0001", 1),
            ("0.0005", 1),
            ("0.001", 1),
            ("0.005", 2),
            ("0.01", 2),
            ("0.05", 2),
            ("0.1", 2),
            ("0.5", 2),
            ("1", 2),
            ("5", 2),
            ("10", 2),
            ("60", 2),
            ("+Inf", 3),
        ]
        .iter()
        .map(|(le, n)| {
            format!("cachefs_fuse_op_duration_seconds_bucket{{op=\"lookup\",le=\"{le}\"}} {n}")
        })
        .collect();
        want.push("cachefs_fuse_op_duration_seconds_sum{op=\"lookup\"} 120.00305".into());
        want.push("cachefs_fuse_op_duration_seconds_count{op=\"lookup\"} 3".into());
        assert_eq!(got, want);
        // Every op has its series from the start: 13 buckets + sum + count.
        assert_eq!(
            text.matches("\ncachefs_fuse_op_duration_seconds_").count(),
            FuseOp::ALL.len() * 15
        );
        assert!(
            text.contains("cachefs_fuse_op_duration_seconds_count{op=\"copy_file_range\"} 0\n")
        );

        // The timer records into the global registry when dropped.
        let before = METRICS.fuse_latency(FuseOp::Readdirplus).count();
        {
            let _t = FuseOp::Readdirplus.timer();
            assert_eq!(METRICS.fuse_latency(FuseOp::Readdirplus).count(), before);
        }
        assert!(METRICS.fuse_latency(FuseOp::Readdirplus).count() > before);
    }

    #[test]
    fn process_stats_are_this_process() {
        let p = process_stats();
        assert!(p.rss_bytes > 1 << 20, "{p:?}");
        assert!(p.threads >= 1, "{p:?}");
        assert!(p.max_fds >= p.open_fds && p.open_fds >= 3, "{p:?}");
        assert!(p.cpu_seconds >= 0.0, "{p:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!(
            p.start_time_seconds <= now + 1 && p.start_time_seconds > now - 3600,
            "{p:?} vs now {now}"
        );
        // 32 more descriptors show (other tests of this process may open some too).
        let files: Vec<_> = (0..32)
            .map(|_| std::fs::File::open("/proc/self/stat").unwrap())
            .collect();
        let more = process_stats();
        assert!(more.open_fds >= p.open_fds + 32 - 8, "{p:?} then {more:?}");
        drop(files);
        // And a thread more.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || rx.recv());
        let with = process_stats();
        assert!(with.threads >= 2, "{with:?}");
        drop(tx);
        let _ = t.join();
        let text = Metrics::new().render();
        check_format(&text);
        for name in [
            "cachefs_process_resident_memory_bytes",
            "cachefs_process_open_fds",
            "cachefs_process_max_fds",
            "cachefs_process_threads",
            "cachefs_process_start_time_seconds",
            "cachefs_process_cpu_seconds_total",
        ] {
            let v: f64 = text
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .unwrap_or_else(|| panic!("no {name}"))
                .parse()
                .unwrap();
            if name != "cachefs_process_cpu_seconds_total" {
                assert!(v > 0.0, "{name} {v}");
            }
        }
    }

    #[test]
    fn lazy_fetches_count_in_both_byte_counters() {
        let (all, lazy) = (
            METRICS.src_bytes_fetched.get(),
            METRICS.lazy_bytes_fetched.get(),
        );
        lazy_fetched(4096);
        assert!(METRICS.src_bytes_fetched.get() >= all + 4096);
        assert!(METRICS.lazy_bytes_fetched.get() >= lazy + 4096);
        let m = Metrics::new();
        m.cache_usage_bytes.set(123);
        m.cache_budget_bytes.set(1 << 30);
        let text = m.render();
        check_format(&text);
        assert!(text.contains("\ncachefs_cache_usage_bytes 123\n"));
        assert!(text.contains("\ncachefs_cache_budget_bytes 1073741824\n"));
        assert!(text.contains("\ncachefs_lazy_bytes_fetched_total 0\n"));
    }

    #[test]
    fn src_errors_by_kind_and_online() {
        let m = Metrics::new();
        let e = |n| -> io::Result<()> { Err(io::Error::from_raw_os_error(n)) };
        m.src_result(&e(libc::ENOENT));
        m.src_result(&e(libc::EEXIST));
        assert_eq!(m.src_online.get(), 1);
        m.src_result(&e(libc::ENOTCONN));
        assert_eq!(m.src_online.get(), 0);
        m.src_result(&e(libc::EIO));
        assert_eq!(m.src_online.get(), 0, "EIO does not say src is back");
        m.src_result(&Ok(()));
        assert_eq!(m.src_online.get(), 1);
        m.src_result(&e(libc::ETIMEDOUT));
        assert_eq!(m.src_online.get(), 0);
        m.src_result(&Err::<(), _>(io::Error::new(
            io::ErrorKind::TimedOut,
            "watchdog",
        )));
        m.src_result(&e(libc::EACCES));
        assert_eq!(m.src_online.get(), 1);
        m.src_result(&Err::<(), _>(io::Error::other("weird")));
        let text = m.render();
        for line in [
            "cachefs_src_errors_total{kind=\"timeout\"} 2",
            "cachefs_src_errors_total{kind=\"eio\"} 1",
            "cachefs_src_errors_total{kind=\"enotconn\"} 1",
            "cachefs_src_errors_total{kind=\"other\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}:\n{text}");
        }
    }

    #[test]
    fn global_helpers_move_the_global_registry() {
        // Other tests in this process may move METRICS too: compare increases only.
        let (hits, misses, bytes) = (
            METRICS.cache_hits.get(),
            METRICS.cache_misses.get(),
            METRICS.src_bytes_fetched.get(),
        );
        let fetches = METRICS.src_latency(SrcOp::Fetch).count();
        let stats = METRICS.src_latency(SrcOp::Readdir).count();
        cache_hit();
        cache_miss(10);
        assert_eq!(timed(SrcOp::Fetch, || 7), 7);
        let r = src_op(SrcOp::Readdir, || {
            std::fs::read_dir("/nonexistent-cachefs-test")
        });
        assert!(r.is_err());
        Timer::start().observe(SrcOp::Readdir);
        assert!(METRICS.cache_hits.get() > hits);
        assert!(METRICS.cache_misses.get() > misses);
        assert!(METRICS.src_bytes_fetched.get() >= bytes + 10);
        assert!(METRICS.src_latency(SrcOp::Fetch).count() > fetches);
        assert!(METRICS.src_latency(SrcOp::Readdir).count() >= stats + 2);
        check_format(&render());
    }
}
