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
//! | `cachefs_build_info{version}` | gauge | always 1; the `version` label is the cachefs version |
//!
//! Normal negative answers of src (ENOENT, ENOTDIR, EISDIR, EEXIST, ENOTEMPTY, ENODATA,
//! EOPNOTSUPP) are not src errors: a lookup of a name that src lacks is not a failure.
//! Latency buckets (seconds): 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
//! 2.5, 5, 10, 30, 60, +Inf.
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

/// Upper bounds of the latency buckets, and their `le` label (the last bucket, `+Inf`, is
/// implicit).
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

const NBUCKETS: usize = LATENCY_BUCKETS.len() + 1;

/// A latency histogram with the fixed [`LATENCY_BUCKETS`]. `observe` is two relaxed
/// atomic adds; the cumulative counts are computed when rendering.
#[derive(Debug)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last one is `+Inf`.
    counts: [AtomicU64; NBUCKETS],
    sum_nanos: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new()
    }
}

impl Histogram {
    pub const fn new() -> Histogram {
        Histogram {
            counts: [const { AtomicU64::new(0) }; NBUCKETS],
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// Record one observation.
    pub fn observe(&self, d: Duration) {
        let i = LATENCY_BUCKETS
            .iter()
            .position(|(le, _)| d <= *le)
            .unwrap_or(NBUCKETS - 1);
        self.counts[i].fetch_add(1, RELAXED);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, RELAXED);
    }

    /// Cumulative counts per bucket (`le` order, `+Inf` last) and the sum.
    pub fn snapshot(&self) -> ([u64; NBUCKETS], Duration) {
        let mut out = [0; NBUCKETS];
        let mut total = 0u64;
        for (o, c) in out.iter_mut().zip(&self.counts) {
            total += c.load(RELAXED);
            *o = total;
        }
        (out, Duration::from_nanos(self.sum_nanos.load(RELAXED)))
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.snapshot().0[NBUCKETS - 1]
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
    src_errors: [Counter; 4],
    src_latency: [Histogram; 7],
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
            src_errors: [const { Counter::new() }; 4],
            src_latency: [const { Histogram::new() }; 7],
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
            let (cumulative, sum) = self.src_latency(op).snapshot();
            let op = op.name();
            for ((_, le), n) in LATENCY_BUCKETS.iter().zip(&cumulative) {
                let _ = writeln!(o, "{name}_bucket{{op=\"{op}\",le=\"{le}\"}} {n}");
            }
            let count = cumulative[NBUCKETS - 1];
            let _ = writeln!(o, "{name}_bucket{{op=\"{op}\",le=\"+Inf\"}} {count}");
            let _ = writeln!(o, "{name}_sum{{op=\"{op}\"}} {}", sum.as_secs_f64());
            let _ = writeln!(o, "{name}_count{{op=\"{op}\"}} {count}");
        }

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
        for w in LATENCY_BUCKETS.windows(2) {
            assert!(w[0].0 < w[1].0);
        }
        for (d, le) in LATENCY_BUCKETS {
            assert_eq!(le.parse::<f64>().unwrap(), d.as_secs_f64());
        }
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
