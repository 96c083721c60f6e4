//! `cachefs status DST --watch`: live rates from the daemon's `stats` over the control
//! channel, every interval: cache hits and misses per second, bytes fetched from src
//! and uploaded to it per second, the writeback queue (pending, failed, dirty bytes),
//! the mean src call latency over the interval, src online or not, cache use.
//!
//! On a terminal the view is redrawn in place; otherwise one plain line per interval
//! (after a header), for logs and pipes. Rates are differences of the daemon's
//! counters between two answers, divided by the time between them as the daemon saw
//! it.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::cache::budget::human;

fn num(v: &Value, k: &str) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(0.0)
}

/// The numbers of one interval.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Rates {
    pub(crate) hits: f64,
    pub(crate) misses: f64,
    pub(crate) fetched: f64,
    pub(crate) uploaded: f64,
    pub(crate) pending: u64,
    pub(crate) failed: u64,
    pub(crate) dirty: u64,
    /// Mean src call latency over the interval (`None`: no src call).
    pub(crate) src_latency: Option<Duration>,
    pub(crate) src_online: bool,
    pub(crate) cache_used: Option<u64>,
    pub(crate) cache_size: Option<u64>,
}

/// Rates between two `stats` answers.
pub(crate) fn rates(prev: &Value, now: &Value) -> Rates {
    let dt = (num(now, "time") - num(prev, "time")).max(1e-3);
    let per_s = |k: &str| ((num(now, k) - num(prev, k)) / dt).max(0.0);
    let ops = num(now, "src_ops") - num(prev, "src_ops");
    let secs = num(now, "src_seconds") - num(prev, "src_seconds");
    Rates {
        hits: per_s("hits"),
        misses: per_s("misses"),
        fetched: per_s("fetched_bytes"),
        uploaded: per_s("uploaded_bytes"),
        pending: num(now, "queue_pending") as u64,
        failed: num(now, "queue_failed") as u64,
        dirty: num(now, "dirty_bytes") as u64,
        src_latency: (ops > 0.0).then(|| Duration::from_secs_f64((secs / ops).max(0.0))),
        src_online: now.get("src_online").and_then(Value::as_bool) != Some(false),
        cache_used: now.get("cache_used").and_then(Value::as_u64),
        cache_size: now.get("cache_size").and_then(Value::as_u64),
    }
}

fn latency(r: &Rates) -> String {
    r.src_latency
        .map_or("-".into(), |d| format!("{:.1}ms", d.as_secs_f64() * 1e3))
}

/// The header of the plain form.
pub(crate) const HEADER: &str =
    "time      hits/s  misses/s  fetched/s  uploaded/s  queue  failed  dirty  src-latency  src";

/// One plain line.
pub(crate) fn line(clock: &str, r: &Rates) -> String {
    format!(
        "{clock:<8} {:>7.1} {:>9.1} {:>10} {:>11} {:>6} {:>7} {:>6} {:>12}  {}",
        r.hits,
        r.misses,
        format!("{}/s", human(r.fetched as u64)),
        format!("{}/s", human(r.uploaded as u64)),
        r.pending,
        r.failed,
        human(r.dirty),
        latency(r),
        if r.src_online { "online" } else { "OFFLINE" }
    )
}

fn block(dst: &Path, clock: &str, r: &Rates) -> String {
    let cache = match (r.cache_used, r.cache_size) {
        (Some(u), Some(s)) => format!("{} of {}", human(u), human(s)),
        (Some(u), None) => format!("{} (no --cache-size)", human(u)),
        _ => "no budget".into(),
    };
    format!(
        "cachefs {}  {clock}  (Ctrl-C to quit)\n\n\
         cache     {:>8.1} hits/s  {:>8.1} misses/s   used {cache}\n\
         src       {:>10}/s fetched   latency {}   {}\n\
         writeback {:>10}/s uploaded  queue {}  failed {}  dirty {}\n",
        dst.display(),
        r.hits,
        r.misses,
        human(r.fetched as u64),
        latency(r),
        if r.src_online { "online" } else { "OFFLINE" },
        human(r.uploaded as u64),
        r.pending,
        r.failed,
        human(r.dirty),
    )
}

fn clock() -> String {
    let secs = crate::sys::clock::now_secs();
    let d = secs % 86_400;
    format!("{:02}:{:02}:{:02}", d / 3600, d % 3600 / 60, d % 60)
}

/// Runs the view every `interval`, `count` times (forever if `None`); the exit status.
/// Each poll is a connection of its own: a watcher holds none of the daemon's
/// connection slots between polls, whatever its interval.
pub fn run(dst: &Path, interval: Duration, count: Option<u64>) -> i32 {
    let req = json!({"cmd": "stats"});
    let poll = || super::client::call(dst, &req);
    let mut prev = match poll() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("cachefs: {e}");
            return e.exit_code();
        }
    };
    let tty = std::io::stdout().is_terminal();
    if !tty {
        println!("{HEADER}");
    }
    let mut shown = 0u64;
    loop {
        if count.is_some_and(|c| shown >= c) {
            return 0;
        }
        std::thread::sleep(interval);
        let now = match poll() {
            Ok(v) => v,
            Err(e) => {
                eprintln!("cachefs: {e}");
                return 1;
            }
        };
        let r = rates(&prev, &now);
        let mut out = std::io::stdout().lock();
        let written = if tty {
            // Home, clear, redraw.
            write!(out, "\x1b[H\x1b[2J{}", block(dst, &clock(), &r))
        } else {
            writeln!(out, "{}", line(&clock(), &r))
        };
        if written.and_then(|()| out.flush()).is_err() {
            return 0; // stdout closed (| head)
        }
        prev = now;
        shown += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_differences_over_time() {
        let a = json!({"time": 100.0, "hits": 10, "misses": 2, "fetched_bytes": 0,
            "uploaded_bytes": 0, "src_ops": 4, "src_seconds": 0.4});
        let b = json!({"time": 102.0, "hits": 30, "misses": 6, "fetched_bytes": 4194304,
            "uploaded_bytes": 2097152, "src_ops": 14, "src_seconds": 0.9,
            "queue_pending": 3, "queue_failed": 1, "dirty_bytes": 1024, "src_online": true});
        let r = rates(&a, &b);
        assert_eq!(r.hits, 10.0);
        assert_eq!(r.misses, 2.0);
        assert_eq!(r.fetched, 2097152.0);
        assert_eq!(r.uploaded, 1048576.0);
        assert_eq!(r.pending, 3);
        assert_eq!(r.failed, 1);
        assert_eq!(r.src_latency, Some(Duration::from_millis(50)));
        let l = line("12:00:00", &r);
        assert!(
            l.contains("2.0M/s") || l.contains("2.0 MiB/s") || l.contains("/s"),
            "{l}"
        );
        assert!(l.contains("50.0ms"), "{l}");
        // No src call in the interval: no latency.
        assert_eq!(rates(&b, &b).src_latency, None);
    }
}
