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
//! # The HTTP endpoint
//!
//! [`serve`] binds a `std::net::TcpListener` and answers on a background thread:
//! `GET /metrics` (or `HEAD`) with `Content-Type: text/plain; version=0.0.4`, 404 for other
//! paths, 405 for other methods, 400 for a malformed request. Every response closes the
//! connection. Each connection gets its own short-lived thread (at most
//! [`MAX_CONNECTIONS`] at once; more are closed unanswered) with read and write timeouts,
//! and the whole request head must arrive within [`REQUEST_DEADLINE`]: a stuck client
//! cannot block other scrapes, nor hold a thread for long. The endpoint has no
//! authentication: bind it to a loopback address.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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

    /// Renders the histogram's series with `label` (`op="stat"`) into `out`.
    fn render(&self, out: &mut String, name: &str, label: &str) {
        let (cumulative, sum) = self.snapshot();
        for ((_, le), n) in self.bounds.iter().zip(&cumulative) {
            let _ = writeln!(out, "{name}_bucket{{{label},le=\"{le}\"}} {n}");
        }
        let count = cumulative[self.bounds.len()];
        let _ = writeln!(out, "{name}_bucket{{{label},le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum{{{label}}} {}", sum.as_secs_f64());
        let _ = writeln!(out, "{name}_count{{{label}}} {count}");
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

    /// The Prometheus text exposition (format 0.0.4) of every metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let o = &mut out;
        counter(
            o,
            "cachefs_cache_hits_total",
            "Times a file's data was needed in dst (open, truncate, link, rename of a subtree) and was already there.",
            self.cache_hits.get(),
        );
        counter(
            o,
            "cachefs_cache_misses_total",
            "Files copied from src into dst (copy-ups).",
            self.cache_misses.get(),
        );
        counter(
            o,
            "cachefs_src_bytes_fetched_total",
            "Bytes of file data read from src into dst (copy-ups and range fetches).",
            self.src_bytes_fetched.get(),
        );
        counter(
            o,
            "cachefs_cache_evictions_total",
            "Clean files evicted from dst to respect the cache budget.",
            self.evictions.get(),
        );
        gauge(
            o,
            "cachefs_writeback_queue_depth",
            "Writeback ops journaled and not yet replayed on src (pending and failed).",
            self.writeback_queue_depth.get(),
        );
        gauge(
            o,
            "cachefs_writeback_dirty_bytes",
            "Bytes of file data journaled for upload and not yet on src.",
            self.writeback_dirty_bytes.get(),
        );
        counter(
            o,
            "cachefs_writeback_throttled_total",
            "Times a writer waited because --max-dirty was exceeded.",
            self.writeback_throttled.get(),
        );
        counter(
            o,
            "cachefs_writeback_replayed_total",
            "Writeback ops replayed on src successfully.",
            self.writeback_replayed.get(),
        );
        counter(
            o,
            "cachefs_writeback_retries_total",
            "Writeback attempts that failed and were scheduled again.",
            self.writeback_retries.get(),
        );
        counter(
            o,
            "cachefs_writeback_failures_total",
            "Writeback ops that exhausted their retries and were parked as failed.",
            self.writeback_failures.get(),
        );
        gauge(
            o,
            "cachefs_writeback_not_representable",
            "Paths whose dst state src cannot hold (symlinks behind rclone...): kept in dst only.",
            self.writeback_not_representable.get(),
        );
        counter(
            o,
            "cachefs_conflicts_total",
            "Files changed both in dst and in src; src's version was kept under a conflict name.",
            self.conflicts.get(),
        );

        let name = "cachefs_src_errors_total";
        header(
            o,
            name,
            "Failed src operations by kind (timeout, eio, enotconn, other); ENOENT and other normal answers are not counted.",
            "counter",
        );
        for kind in SrcErrorKind::ALL {
            let v = self.src_errors(kind).get();
            let _ = writeln!(o, "{name}{{kind=\"{}\"}} {v}", kind.name());
        }

        gauge(
            o,
            "cachefs_src_online",
            "1 while src answers, 0 after a src operation failed with ENOTCONN or a timeout.",
            self.src_online.get(),
        );

        let name = "cachefs_src_op_duration_seconds";
        header(o, name, "Latency of src operations by op.", "histogram");
        for op in SrcOp::ALL {
            let label = format!("op=\"{}\"", op.name());
            self.src_latency(op).render(o, name, &label);
        }

        counter(
            o,
            "cachefs_lazy_bytes_fetched_total",
            "Bytes of file data read from src by lazy range fetches (included in cachefs_src_bytes_fetched_total).",
            self.lazy_bytes_fetched.get(),
        );

        let name = "cachefs_fuse_op_duration_seconds";
        header(
            o,
            name,
            "Latency of FUSE requests answered by the daemon, by op (passthrough reads and writes never reach it).",
            "histogram",
        );
        for op in FuseOp::ALL {
            let label = format!("op=\"{}\"", op.name());
            self.fuse_latency(op).render(o, name, &label);
        }

        for (name, help, g) in [
            (
                "cachefs_cache_usage_bytes",
                "Bytes of dst the cache budget counts (allocated bytes of cached files and partial files); 0 without a budget, --min-free or pins.",
                &self.cache_usage_bytes,
            ),
            (
                "cachefs_cache_files",
                "Files the cache budget counts (cached and partial); 0 without a budget, --min-free or pins.",
                &self.cache_files,
            ),
            (
                "cachefs_cache_pinned_bytes",
                "Bytes of pinned files in dst (never evicted).",
                &self.cache_pinned_bytes,
            ),
            (
                "cachefs_cache_partial_bytes",
                "Bytes of partial files of lazy fetch in dst.",
                &self.cache_partial_bytes,
            ),
            (
                "cachefs_cache_budget_bytes",
                "The --cache-size budget in bytes; 0 when there is none.",
                &self.cache_budget_bytes,
            ),
            (
                "cachefs_cache_min_free_bytes",
                "The --min-free floor in bytes of dst's file system; 0 when there is none.",
                &self.cache_min_free_bytes,
            ),
            (
                "cachefs_dst_free_bytes",
                "Bytes free on dst's file system for unprivileged users.",
                &self.dst_free_bytes,
            ),
        ] {
            gauge(o, name, help, g.get());
        }

        let p = process_stats();
        for (name, help, v) in [
            (
                "cachefs_process_resident_memory_bytes",
                "Resident memory of the cachefs process (VmRSS).",
                p.rss_bytes,
            ),
            (
                "cachefs_process_open_fds",
                "Open file descriptors of the cachefs process.",
                p.open_fds,
            ),
            (
                "cachefs_process_max_fds",
                "The soft limit on open file descriptors (RLIMIT_NOFILE).",
                p.max_fds,
            ),
            (
                "cachefs_process_threads",
                "Threads of the cachefs process.",
                p.threads,
            ),
            (
                "cachefs_process_start_time_seconds",
                "Start time of the cachefs process, seconds since the Unix epoch.",
                p.start_time_seconds,
            ),
        ] {
            gauge(o, name, help, v);
        }
        let name = "cachefs_process_cpu_seconds_total";
        header(
            o,
            name,
            "CPU time (user and system) of the cachefs process in seconds.",
            "counter",
        );
        let _ = writeln!(o, "{name} {}", p.cpu_seconds);

        let name = "cachefs_build_info";
        header(
            o,
            name,
            "Always 1; the version label is the cachefs version.",
            "gauge",
        );
        let _ = writeln!(o, "{name}{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
        out
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn counter(out: &mut String, name: &str, help: &str, v: u64) {
    header(out, name, help, "counter");
    let _ = writeln!(out, "{name} {v}");
}

fn gauge(out: &mut String, name: &str, help: &str, v: i64) {
    header(out, name, help, "gauge");
    let _ = writeln!(out, "{name} {v}");
}

/// The process numbers of `/proc/self` (0 where one cannot be read).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct ProcessStats {
    pub rss_bytes: i64,
    pub open_fds: i64,
    pub max_fds: i64,
    pub threads: i64,
    pub start_time_seconds: i64,
    pub cpu_seconds: f64,
}

/// Reads [`ProcessStats`] from `/proc/self` (status, stat, fd) and getrlimit.
pub fn process_stats() -> ProcessStats {
    let mut p = ProcessStats::default();
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        let field = |key: &str| -> Option<i64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        };
        p.rss_bytes = field("VmRSS:").unwrap_or(0) * 1024;
        p.threads = field("Threads:").unwrap_or(0);
    }
    if let Ok(rd) = std::fs::read_dir("/proc/self/fd") {
        // The directory's own descriptor, open while it is read, is not counted.
        p.open_fds = (rd.count() as i64 - 1).max(0);
    }
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        p.max_fds = i64::try_from(lim.rlim_cur).unwrap_or(i64::MAX);
    }
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0
        && let Ok(stat) = std::fs::read_to_string("/proc/self/stat")
        // Fields after the command name (which may hold spaces), from field 3 on.
        && let Some((_, rest)) = stat.rsplit_once(") ")
    {
        let f: Vec<&str> = rest.split_whitespace().collect();
        let num = |i: usize| f.get(i - 3).and_then(|v| v.parse::<u64>().ok());
        if let (Some(utime), Some(stime)) = (num(14), num(15)) {
            p.cpu_seconds = (utime + stime) as f64 / ticks as f64;
        }
        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<u64>().ok())
        });
        if let (Some(start), Some(boot)) = (num(22), boot) {
            p.start_time_seconds = (boot + start / ticks as u64) as i64;
        }
    }
    p
}

/// The exposition of the global [`METRICS`].
pub fn render() -> String {
    METRICS.render()
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

// ---------------------------------------------------------------------------------------
// The HTTP endpoint.

/// Connections served at once; more are closed unanswered.
pub const MAX_CONNECTIONS: usize = 8;
/// Time a client has to send its request head (and for each read or write).
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
/// Longest request head accepted.
const MAX_REQUEST: usize = 8 * 1024;

/// The running endpoint. [`MetricsServer::stop`] (or drop) closes the listener and joins
/// its thread; connections in flight finish on their own within their timeouts.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    stopping: Arc<AtomicBool>,
    listener_fd: i32,
    thread: Option<JoinHandle<()>>,
}

/// Binds `addr` and serves [`render`] at `/metrics` on a background thread. Fails only if
/// the bind fails (address in use, not local, ...).
pub fn serve(addr: SocketAddr) -> io::Result<MetricsServer> {
    let listener = TcpListener::bind(addr)?;
    let addr = listener.local_addr()?;
    let stopping = Arc::new(AtomicBool::new(false));
    let listener_fd = listener.as_raw_fd();
    let flag = stopping.clone();
    let thread = std::thread::Builder::new()
        .name("cachefs-metrics".into())
        .spawn(move || accept_loop(listener, &flag))?;
    Ok(MetricsServer {
        addr,
        stopping,
        listener_fd,
        thread: Some(thread),
    })
}

impl MetricsServer {
    /// The bound address (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and joins the accept thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.stopping.store(true, Ordering::SeqCst);
        // Wake the blocked accept(): on Linux, shutting a listening socket down makes
        // accept fail with EINVAL. The fd is still open: the thread owns the listener
        // until it returns, and we join it below. Should that not work, connect to it.
        // SAFETY: a valid socket fd (see above).
        if unsafe { libc::shutdown(self.listener_fd, libc::SHUT_RDWR) } != 0 {
            let _ = TcpStream::connect_timeout(&connectable(self.addr), REQUEST_DEADLINE);
        }
        if thread.join().is_err() {
            log::error!("the metrics server thread panicked");
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// `addr` with an unspecified IP (0.0.0.0, ::) replaced by loopback.
fn connectable(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

fn accept_loop(listener: TcpListener, stopping: &AtomicBool) {
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let accepted = listener.accept();
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                log::warn!("metrics server: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            log::debug!("metrics server: too many connections; closing one unanswered");
            continue;
        }
        let done = active.clone();
        let spawned = std::thread::Builder::new()
            .name("cachefs-metrics-conn".into())
            .spawn(move || {
                if let Err(e) = handle(stream) {
                    log::debug!("metrics server: {e}");
                }
                done.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            active.fetch_sub(1, Ordering::SeqCst);
            log::warn!("metrics server: cannot start a connection thread: {e}");
        }
    }
}

/// Serves one request on `stream` and closes it.
fn handle(mut stream: TcpStream) -> io::Result<()> {
    stream.set_read_timeout(Some(REQUEST_DEADLINE))?;
    stream.set_write_timeout(Some(REQUEST_DEADLINE))?;
    let head = read_head(&mut stream)?;
    let (status, content_type, body, head_only) = respond(&head, render);
    let mut msg = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if status.starts_with("405") {
        msg.push_str("Allow: GET, HEAD\r\n");
    }
    msg.push_str("\r\n");
    let mut bytes = msg.into_bytes();
    if !head_only {
        bytes.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&bytes)?;
    let _ = stream.shutdown(Shutdown::Write);
    Ok(())
}

/// Reads up to the end of the request head (`\r\n\r\n`), within [`REQUEST_DEADLINE`] and
/// [`MAX_REQUEST`] bytes. A head cut short by EOF is returned as is (and judged by
/// [`respond`]).
fn read_head(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "client too slow to send its request",
            ));
        }
        stream.set_read_timeout(Some(left))?;
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(head)
}

/// The response to a request head: (status line, content type, body, HEAD request).
/// `body` renders the metrics, only when they are asked for.
fn respond(
    head: &[u8],
    body: impl FnOnce() -> String,
) -> (&'static str, &'static str, String, bool) {
    const TEXT: &str = "text/plain; charset=utf-8";
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return ("400 Bad Request", TEXT, "bad request\n".into(), false);
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return ("400 Bad Request", TEXT, "bad request\n".into(), false);
    }
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return (
            "405 Method Not Allowed",
            TEXT,
            "only GET and HEAD\n".into(),
            false,
        );
    }
    let path = target.split(['?', '#']).next().unwrap_or(target);
    if path != "/metrics" {
        return (
            "404 Not Found",
            TEXT,
            "not found; the metrics are at /metrics\n".into(),
            head_only,
        );
    }
    (
        "200 OK",
        "text/plain; version=0.0.4; charset=utf-8",
        body(),
        head_only,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks `text` against the 0.0.4 grammar we use: every sample belongs to the family
    /// announced by the `# HELP`/`# TYPE` pair right above it, counters end in `_total`,
    /// names are prefixed, values parse, and the text ends with a newline.
    fn check_format(text: &str) {
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

    #[test]
    fn requests_get_the_right_responses() {
        let body = || "m 1\n".to_string();
        let r = respond(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", body);
        assert_eq!(
            r,
            (
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                "m 1\n".to_string(),
                false
            )
        );
        let r = respond(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n", body);
        assert_eq!(r.0, "200 OK");
        let r = respond(b"HEAD /metrics HTTP/1.1\r\n\r\n", body);
        assert_eq!((r.0, r.3), ("200 OK", true));
        assert_eq!(respond(b"GET / HTTP/1.1\r\n\r\n", body).0, "404 Not Found");
        assert_eq!(
            respond(b"GET /metricsx HTTP/1.1\r\n\r\n", body).0,
            "404 Not Found"
        );
        assert_eq!(
            respond(b"POST /metrics HTTP/1.1\r\n\r\n", body).0,
            "405 Method Not Allowed"
        );
        for bad in [
            &b""[..],
            b"GET\r\n\r\n",
            b"GET /metrics\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics SPDY/3\r\n\r\n",
            b"\xff\xfe",
        ] {
            assert_eq!(respond(bad, body).0, "400 Bad Request", "{bad:?}");
        }
    }

    fn get(addr: SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn server_serves_and_stops() {
        let server = serve("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = server.local_addr();
        assert_ne!(addr.port(), 0);
        let r = get(addr, "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n");
        let (head, body) = r.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(
            head.contains("\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"),
            "{head}"
        );
        assert!(head.contains(&format!("\r\nContent-Length: {}\r\n", body.len())));
        assert!(head.contains("\r\nConnection: close"));
        check_format(body);
        let r = get(addr, "GET /nope HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 404 Not Found\r\n"), "{r}");
        let r = get(addr, "DELETE /metrics HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 405") && r.contains("\r\nAllow: GET, HEAD\r\n"));
        let r = get(addr, "HEAD /metrics HTTP/1.1\r\n\r\n");
        assert!(
            r.starts_with("HTTP/1.1 200 OK\r\n") && r.ends_with("\r\n\r\n"),
            "{r}"
        );

        // A second bind of the same port fails (the caller reports it).
        assert!(serve(addr).is_err());

        let t = Instant::now();
        server.stop();
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "stop took {:?}",
            t.elapsed()
        );
        assert!(
            TcpStream::connect(addr).is_err(),
            "still listening after stop"
        );
    }

    #[test]
    fn stuck_client_does_not_block_others() {
        let server = serve("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = server.local_addr();
        // Connected, sends half a request, then nothing.
        let mut stuck = TcpStream::connect(addr).unwrap();
        stuck.write_all(b"GET /metr").unwrap();
        let idle = TcpStream::connect(addr).unwrap();
        let t = Instant::now();
        let r = get(addr, "GET /metrics HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200 OK"));
        assert!(t.elapsed() < REQUEST_DEADLINE, "waited {:?}", t.elapsed());
        // The stuck one is cut off after the deadline.
        stuck.set_read_timeout(Some(REQUEST_DEADLINE * 3)).unwrap();
        let mut buf = Vec::new();
        let _ = stuck.read_to_end(&mut buf);
        assert!(t.elapsed() < REQUEST_DEADLINE * 3);
        drop(idle);
        // Stopping does not wait for connections.
        server.stop();
    }

    #[test]
    fn unspecified_addresses_are_connectable() {
        let a: SocketAddr = "0.0.0.0:9".parse().unwrap();
        assert_eq!(connectable(a), "127.0.0.1:9".parse().unwrap());
        let a: SocketAddr = "[::]:9".parse().unwrap();
        assert_eq!(connectable(a), "[::1]:9".parse().unwrap());
        let a: SocketAddr = "10.1.2.3:9".parse().unwrap();
        assert_eq!(connectable(a), a);
    }
}
