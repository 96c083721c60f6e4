//! The Prometheus text exposition (format 0.0.4) of the registry, and the process
//! series read from `/proc/self` at each scrape.
//!
//! Every family is written as a `# HELP`/`# TYPE` pair followed by its samples; every
//! series is written at every scrape, at 0 if nothing happened. A histogram's `+Inf`
//! bucket and `_count` come from the same bucket reads, so they always agree.

use std::fmt::Write as _;

use super::{FuseOp, Histogram, METRICS, Metrics, SrcErrorKind, SrcOp};

impl Metrics {
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

impl Histogram {
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
