//! `cachefs status DST [--json]`: what dst's state folder says, whether or not a daemon
//! runs (files are read, never locked or modified). It reports every part alike, each
//! read by the module that owns it, and nothing below this module imports it.
//!
//! Reported:
//! - src: online or offline and since when, with the error that took it offline, from
//!   `src.json` (written by the core at start and at each transition, see
//!   [`crate::fs::src_state`]), and whether the daemon that wrote it still runs (if not,
//!   the state is the last one known).
//! - the writeback queue, from the journal: pending ops, pending bytes, age of the
//!   oldest pending op, and every failed (parked) op with its path, attempts and last
//!   error; paths src cannot hold; leftover checks (see [`crate::writeback::status`]).
//! - partially present (lazily fetched) files ([`crate::fs::lazy::summary`]).
//! - the cache budget, from `cache.json` (see [`crate::cache::status_text`]), when the
//!   daemon ran with a budget or pins.
//!
//! `--json` prints one object: the writeback keys, `src_online` (bool, null if unknown),
//! `src_since` and `src_offline_since` (unix seconds or null), `src_last_error`,
//! `daemon_running`, and `cache` (cache.json's object, or null).
//!
//! Exit code: 0 all fine, 1 failed ops exist (src's state is shown, not judged: the
//! daemon learns src is back only at its next src call),
//! 2 the journal could not be read.

use std::fmt::Write as _;
use std::path::Path;

use crate::fs::src_state::{self, SrcState};
use crate::json::Object;
use crate::writeback::status::{self as wb, Summary};

/// The src and cache parts of the status (beside the writeback summary).
pub(crate) struct Extra {
    pub src: Option<SrcState>,
    /// The daemon that wrote `src` still runs.
    pub running: bool,
    /// `cache.json` as it is on disk.
    pub cache_raw: Option<String>,
    pub cache_text: Option<String>,
    /// Unix seconds, for "N ago".
    pub now: u64,
    /// Partially present (lazily fetched) files: (count, present bytes, total bytes).
    pub partial: (u64, u64, u64),
    /// Writeback's findings: paths src cannot hold, src's abilities, leftover checks.
    pub wb: wb::Extra,
}

impl Extra {
    pub(crate) fn read(dst: &Path) -> Extra {
        let src = src_state::read(dst);
        Extra {
            running: src.as_ref().is_some_and(SrcState::writer_running),
            src,
            cache_raw: crate::cache::status_raw(dst),
            cache_text: crate::cache::status_text(dst),
            now: src_state::unix_now(std::time::SystemTime::now()),
            partial: crate::fs::lazy::summary(dst),
            wb: wb::Extra::read(dst),
        }
    }

    /// The report's keys after the queue's: src, partial files, writeback's findings,
    /// the daemon, and `cache` (cache.json's object as it is on disk, or null).
    fn json_fields(&self, o: &mut Object) {
        let src = self.src.as_ref();
        o.field("src_online", src.map(|s| s.online))
            .field("src_since", src.map(|s| s.since))
            .field(
                "src_offline_since",
                src.filter(|s| !s.online).map(|s| s.since),
            )
            .field("src_last_error", src.and_then(|s| s.last_error.as_deref()))
            .field("partial_files", self.partial.0)
            .field("partial_present_bytes", self.partial.1)
            .field("partial_total_bytes", self.partial.2);
        self.wb.unrep_json(o);
        o.field("leftover_checks", self.wb.leftovers.0)
            .field("leftover_checks_next_ms", self.wb.leftovers.1)
            .field("daemon_running", self.running);
        match self.cache_raw.as_deref().map(str::trim) {
            Some(c) if c.starts_with('{') && c.ends_with('}') => o.raw("cache", c),
            _ => o.field("cache", None::<u64>),
        };
    }

    fn src_line(&self) -> String {
        let Some(s) = &self.src else {
            return "src:            unknown (no src.json: no daemon has recorded it here)\n"
                .to_string();
        };
        let when = format!(
            "{} ({} ago)",
            utc(s.since),
            ago(self.now.saturating_sub(s.since))
        );
        let mut line = if s.online {
            format!("src:            online since {when}")
        } else {
            format!(
                "src:            OFFLINE since {when}: {}",
                s.last_error.as_deref().unwrap_or("-")
            )
        };
        if !self.running {
            let _ = write!(
                line,
                " [last known state: cachefs (pid {}) is not running]",
                s.pid
            );
        }
        line.push('\n');
        line
    }
}

/// `YYYY-MM-DD HH:MM:SS UTC` of unix seconds.
pub(crate) fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// `1h 2m 3s`, `4m 5s`, `6s`.
pub(crate) fn ago(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m {s}s"),
        _ => format!("{h}h {m}m {s}s"),
    }
}

/// The whole report: src, writeback queue, cache.
pub(crate) fn render_all(s: &Summary, x: &Extra, json: bool) -> String {
    if json {
        let mut o = Object::new();
        wb::queue_json(s, &mut o);
        x.json_fields(&mut o);
        o.finish() + "\n"
    } else {
        let queue = wb::render(s, false);
        let mut out = x.src_line();
        out.push_str(&queue);
        x.wb.unrep_text(&mut out);
        if x.wb.leftovers.0 > 0 {
            let next =
                x.wb.leftovers
                    .1
                    .map_or(0, |ms| (ms / 1000).saturating_sub(x.now));
            let _ = writeln!(
                out,
                "leftover checks: {} (names renamed away or deleted on src, looked at again \
                 after --src-settle for a copy src kept; next in {})",
                x.wb.leftovers.0,
                ago(next)
            );
        }
        let (n, present, total) = x.partial;
        let _ = writeln!(
            out,
            "partial files:  {n} ({present} of {total} bytes present; the rest is fetched on read)"
        );
        match &x.cache_text {
            Some(c) => out.push_str(c),
            None => out.push_str("cache:          no budget or pins (no cache.json)\n"),
        }
        out
    }
}

/// `cachefs status DST [--json]`. Returns the process exit code.
pub fn run(dst: &Path, json: bool) -> i32 {
    if !dst.is_dir() {
        let what = if dst.exists() {
            "is not a directory"
        } else {
            "does not exist"
        };
        eprintln!(
            "cachefs status: {} {what}; give the cache directory (the -dst of the mount)",
            dst.display()
        );
        return 2;
    }
    match wb::read(dst) {
        Ok(s) => {
            let x = Extra::read(dst);
            print!("{}", render_all(&s, &x, json));
            i32::from(!s.failed.is_empty())
        }
        Err(e) => {
            eprintln!("cachefs status: {e}");
            2
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_durations() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_700_000_000), "2023-11-14 22:13:20 UTC");
        assert_eq!(ago(5), "5s");
        assert_eq!(ago(65), "1m 5s");
        assert_eq!(ago(3725), "1h 2m 5s");
    }

    #[test]
    fn src_and_cache_in_text_and_json() {
        let t = tempfile::tempdir().unwrap();
        let s = wb::read(t.path()).unwrap();
        let mut x = Extra::read(t.path());
        assert!(x.src.is_none() && !x.running && x.cache_raw.is_none());
        let txt = render_all(&s, &x, false);
        assert!(txt.starts_with("src:            unknown"), "{txt}");
        assert!(txt.contains("no cache.json"), "{txt}");
        assert!(
            txt.contains("partial files:  0 (0 of 0 bytes present"),
            "{txt}"
        );
        let j = render_all(&s, &x, true);
        assert!(
            j.ends_with(
                ",\"src_online\":null,\"src_since\":null,\"src_offline_since\":null,\
                 \"src_last_error\":null,\"partial_files\":0,\"partial_present_bytes\":0,\
                 \"partial_total_bytes\":0,\"not_representable\":0,\"not_representable_paths\":[],\
                 \"src_caps\":null,\"leftover_checks\":0,\"leftover_checks_next_ms\":null,\
                 \"daemon_running\":false,\"cache\":null}\n"
            ),
            "{j}"
        );

        x.src = Some(SrcState {
            online: false,
            since: 1_700_000_000,
            last_error: Some("Transport endpoint is not connected (os error 107)".into()),
            pid: 4_000_000,
        });
        x.now = 1_700_000_065;
        x.running = true;
        x.cache_raw = Some("{\"usage_bytes\":5}\n".into());
        x.cache_text = Some("cache: 5 B used\n".into());
        assert!(x.running && x.src.as_ref().is_some_and(|s| !s.online));
        let txt = render_all(&s, &x, false);
        assert!(
            txt.starts_with(
                "src:            OFFLINE since 2023-11-14 22:13:20 UTC (1m 5s ago): Transport"
            ),
            "{txt}"
        );
        assert!(txt.ends_with("cache: 5 B used\n"), "{txt}");
        let j = render_all(&s, &x, true);
        assert!(j.contains("\"src_online\":false,\"src_since\":1700000000,\"src_offline_since\":1700000000,\"src_last_error\":\"Transport"), "{j}");
        assert!(
            j.ends_with("\"daemon_running\":true,\"cache\":{\"usage_bytes\":5}}\n"),
            "{j}"
        );

        x.running = false;
        assert!(!(x.running && x.src.as_ref().is_some_and(|s| !s.online)));
        assert!(
            render_all(&s, &x, false)
                .contains("[last known state: cachefs (pid 4000000) is not running]")
        );
    }

    #[test]
    fn not_representable_paths_are_listed_apart_from_failures_and_exit_0() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(crate::writeback::journal::dir(t.path())).unwrap();
        std::fs::write(
            crate::writeback::journal::dir(t.path()).join("unrepresentable"),
            "+ 1000 1 /l symlink%20to%20f\n+ 2000 18 /k mode%200600\n",
        )
        .unwrap();
        std::fs::write(
            crate::writeback::journal::dir(t.path()).join("src-caps"),
            "{\"symlinks\":false,\"special_files\":false,\"hard_links\":false,\
             \"user_xattrs\":false,\"chmod\":false,\"chown\":false,\"utimes\":true,\
             \"empty_dirs\":null,\"fstype\":\"fuse.rclone\"}\n",
        )
        .unwrap();
        let s = wb::read(t.path()).unwrap();
        let x = Extra::read(t.path());
        let txt = render_all(&s, &x, false);
        assert!(txt.contains("failed ops:     0\n"), "{txt}");
        assert!(txt.contains("src can hold:   symlinks no"), "{txt}");
        assert!(txt.contains("not representable on src: 2\n"), "{txt}");
        assert!(
            txt.contains("NOT REPRESENTABLE /l (symlink): symlink to f"),
            "{txt}"
        );
        assert!(
            txt.contains("NOT REPRESENTABLE /k (mode, owner): mode 0600"),
            "{txt}"
        );
        assert!(txt.contains("what to do: symlink:") && txt.contains("--links"));
        let j = render_all(&s, &x, true);
        assert!(j.contains("\"not_representable\":2,"), "{j}");
        assert!(
            j.contains("{\"path\":\"/l\",\"what\":[\"symlink\"],\"detail\":\"symlink to f\",\"since_ms\":1000}"),
            "{j}"
        );
        assert!(j.contains("\"src_caps\":{\"symlinks\":false,"), "{j}");
        assert_eq!(run(t.path(), true), 0, "not a failure");
    }

    #[test]
    fn missing_journal_is_empty_and_ok() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(run(t.path(), true), 0);
    }
}
