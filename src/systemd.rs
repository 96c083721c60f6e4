//! systemd's notification protocol (sd_notify(3)) for `Type=notify` units, and progress
//! reports for long start-up work.
//!
//! - [`notify`] sends one datagram to `$NOTIFY_SOCKET` (a path, or an abstract socket
//!   `@name`); it does nothing when the variable is not set (not run by systemd).
//! - [`Progress`] reports a long task: `STATUS=` lines that `systemctl status` shows and,
//!   for work before `READY=1`, `EXTEND_TIMEOUT_USEC=` so that a task that keeps
//!   moving (the walk of a large dst) never hits `TimeoutStartSec=`, while one that is
//!   stuck still does: each report extends the start timeout by [`EXTEND_BY`] from now,
//!   and reports come at most every [`REPORT_EVERY`] while the task makes progress.
//!
//! Invariants: a leaf module (nothing of cachefs is used here); without
//! `NOTIFY_SOCKET` no report formats a string or reads the clock more than once per
//! call; a failure to send is logged, never returned (systemd's absence must not stop
//! the daemon).

use std::time::{Duration, Instant};

/// How much each start-up progress report extends the start timeout, from now.
pub(crate) const EXTEND_BY: Duration = Duration::from_secs(30);
/// Shortest time between two progress reports of one task.
pub(crate) const REPORT_EVERY: Duration = Duration::from_millis(250);

/// Whether a service manager listens (`NOTIFY_SOCKET` is set).
pub(crate) fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// Tells systemd about our state: a datagram with `state` (newline-separated
/// `KEY=value` lines) to `$NOTIFY_SOCKET`. Silent when not run by systemd.
pub(crate) fn notify(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let bytes = target.as_encoded_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name),
        None => SocketAddr::from_pathname(&target),
    };
    let sent = addr.and_then(|a| UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &a));
    if let Err(e) = sent {
        log::warn!("cannot notify systemd at {}: {e}", target.to_string_lossy());
    }
}

/// Progress reports of one long task (see the module doc). The first [`Progress::update`]
/// reports at once, later ones when [`REPORT_EVERY`] has passed since the last report;
/// [`Progress::finish`] reports the outcome if anything was reported before or
/// `always` says so.
#[derive(Debug)]
pub(crate) struct Progress {
    what: &'static str,
    /// Before `READY=1`: reports extend the start timeout.
    extend: bool,
    on: bool,
    last: Option<Instant>,
}

impl Progress {
    /// A task called `what` ("cache: scanning dst"); `extend` for start-up work.
    pub(crate) fn new(what: &'static str, extend: bool) -> Progress {
        Progress {
            what,
            extend,
            on: enabled(),
            last: None,
        }
    }

    /// The task moved on; `detail` ("1200 files, 3.1G so far") is called only when a
    /// report is due.
    pub(crate) fn update(&mut self, detail: impl FnOnce() -> String) {
        if !self.on {
            return;
        }
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < REPORT_EVERY)
        {
            return;
        }
        self.last = Some(now);
        self.send(&detail());
    }

    /// The task is done: reports `detail` if an update was reported (or `always`).
    pub(crate) fn finish(&mut self, always: bool, detail: impl FnOnce() -> String) {
        if self.on && (always || self.last.is_some()) {
            self.last = Some(Instant::now());
            self.send(&detail());
        }
    }

    fn send(&self, detail: &str) {
        notify(&self.message(detail));
    }

    /// The datagram of one report.
    fn message(&self, detail: &str) -> String {
        let mut m = format!("STATUS={}: {detail}", self.what);
        if self.extend {
            m.push_str(&format!("\nEXTEND_TIMEOUT_USEC={}", EXTEND_BY.as_micros()));
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_carry_status_and_extend_only_for_start_up() {
        let p = Progress {
            what: "cache: scanning dst",
            extend: true,
            on: true,
            last: None,
        };
        assert_eq!(
            p.message("10 files"),
            "STATUS=cache: scanning dst: 10 files\nEXTEND_TIMEOUT_USEC=30000000"
        );
        let p = Progress { extend: false, ..p };
        assert_eq!(p.message("x"), "STATUS=cache: scanning dst: x");
    }

    #[test]
    fn updates_are_rate_limited_and_lazy() {
        let mut p = Progress {
            what: "t",
            extend: false,
            on: true,
            last: None,
        };
        let mut calls = 0;
        for _ in 0..1000 {
            p.update(|| {
                calls += 1;
                String::new()
            });
        }
        assert_eq!(calls, 1, "the first update reports, the next ones wait");
        p.last = Some(Instant::now() - REPORT_EVERY);
        p.update(|| {
            calls += 1;
            String::new()
        });
        assert_eq!(calls, 2);
        // Off (no NOTIFY_SOCKET): nothing is formatted.
        let mut off = Progress {
            on: false,
            last: None,
            ..p
        };
        off.update(|| unreachable!());
        off.finish(true, || unreachable!());
    }
}
