//! `cachefs status DST [--json]`: what dst's state folder says, whether or not a daemon
//! runs (files are read, never locked or modified).
//!
//! Reported:
//! - src: online or offline and since when, with the error that took it offline, from
//!   `src.json` (written by the core at start and at each transition, see
//!   [`crate::fs::src_state`]), and whether the daemon that wrote it still runs (if not,
//!   the state is the last one known).
//! - the writeback queue, from the journal: pending ops, pending bytes (current dst size
//!   of each distinct path with pending content), age of the oldest pending op, and every
//!   failed (parked) op with its path, attempts and last error.
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

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::journal::{self, Live};
use super::op;
use crate::fs::change::Op;
use crate::fs::src_state::{self, SrcState, json_str};

/// Summary of a live set (shared by `status` and [`super::Writeback::log_summary`]).
pub(crate) struct Summary {
    pub pending_ops: usize,
    pub pending_bytes: u64,
    pub oldest_age_secs: Option<u64>,
    /// (op kind, paths, attempts, errno, message)
    pub failed: Vec<(String, Vec<PathBuf>, u32, i32, String)>,
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Bytes that will be uploaded: dst sizes of distinct paths with pending content.
pub(crate) fn pending_bytes<'a>(dst: &Path, ops: impl Iterator<Item = &'a Op>) -> u64 {
    let mut paths = BTreeSet::new();
    for o in ops {
        match o {
            Op::Write { path } | Op::Create { path } | Op::Sync { path } => {
                paths.insert(path.clone());
            }
            Op::Link { new, .. } => {
                paths.insert(new.clone());
            }
            _ => {}
        }
    }
    paths
        .iter()
        .filter_map(|p| std::fs::symlink_metadata(dst.join(p)).ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

pub(crate) fn summarize<'a>(
    dst: &Path,
    live: impl Iterator<Item = (&'a Live, bool)> + Clone,
) -> Summary {
    let now = now_ms();
    let pending_ops = live.clone().count();
    let oldest = live.clone().map(|(l, _)| l.ms).min();
    let failed = live
        .clone()
        .filter_map(|(l, parked)| {
            let f = l.fail.as_ref().filter(|_| parked)?;
            Some((
                op::kind(&l.op).to_string(),
                op::paths(&l.op).iter().map(|p| p.to_path_buf()).collect(),
                f.attempts,
                f.errno,
                f.message.clone(),
            ))
        })
        .collect();
    Summary {
        pending_ops,
        pending_bytes: pending_bytes(dst, live.map(|(l, _)| &l.op)),
        oldest_age_secs: oldest.map(|ms| now.saturating_sub(ms) / 1000),
        failed,
    }
}

fn show(p: &Path) -> String {
    format!("/{}", p.to_string_lossy())
}

pub(crate) fn render(s: &Summary, json: bool) -> String {
    let mut out = String::new();
    if json {
        let _ = write!(
            out,
            "{{\"pending_ops\":{},\"pending_bytes\":{},\"oldest_pending_secs\":{},\"failed_ops\":{},\"failed\":[",
            s.pending_ops,
            s.pending_bytes,
            s.oldest_age_secs
                .map_or("null".to_string(), |a| a.to_string()),
            s.failed.len()
        );
        for (i, (kind, paths, attempts, errno, msg)) in s.failed.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str("{\"op\":");
            json_str(&mut out, kind);
            out.push_str(",\"path\":");
            json_str(&mut out, &show(&paths[0]));
            if let Some(p2) = paths.get(1) {
                out.push_str(",\"path2\":");
                json_str(&mut out, &show(p2));
            }
            let _ = write!(out, ",\"attempts\":{attempts},\"errno\":{errno},\"error\":");
            json_str(&mut out, msg);
            out.push('}');
        }
        out.push_str("]}\n");
    } else {
        let _ = writeln!(out, "pending ops:    {}", s.pending_ops);
        let _ = writeln!(out, "pending bytes:  {}", s.pending_bytes);
        match s.oldest_age_secs {
            Some(a) => {
                let _ = writeln!(out, "oldest pending: {a}s ago");
            }
            None => out.push_str("oldest pending: -\n"),
        }
        let _ = writeln!(out, "failed ops:     {}", s.failed.len());
        if !s.failed.is_empty() {
            out.push_str(
                "  (failed and will retry: each is retried 5 s after it was parked, then at \
                 doubling intervals up to 5 min, and at the next start; fix what the error \
                 says and it goes through)\n",
            );
        }
        for (kind, paths, attempts, _, msg) in &s.failed {
            let p: Vec<String> = paths.iter().map(|p| show(p)).collect();
            let _ = writeln!(
                out,
                "  FAILED {kind} {} (attempts {attempts}): {msg}",
                p.join(" -> ")
            );
        }
    }
    out
}

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
    /// Paths whose dst state src cannot hold (see `unrep`).
    pub unrep: std::collections::BTreeMap<PathBuf, super::unrep::Entry>,
    /// What src can hold, as last probed.
    pub caps: Option<super::caps::SrcCaps>,
    /// Leftover checks waiting (see `leftovers`): (count, earliest due, unix ms).
    pub leftovers: (usize, Option<u64>),
}

/// At most this many not-representable paths are listed (the count is always whole).
const UNREP_LIST_MAX: usize = 1000;
const UNREP_TEXT_MAX: usize = 20;

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
            unrep: super::unrep::read(dst),
            caps: super::caps::read(dst),
            leftovers: {
                let l = super::leftovers::read(dst);
                (l.len(), l.iter().map(|c| c.due_ms).min())
            },
        }
    }

    fn unrep_json(&self, out: &mut String) {
        let _ = write!(
            out,
            ",\"not_representable\":{},\"not_representable_paths\":[",
            self.unrep.len()
        );
        for (i, (p, e)) in self.unrep.iter().take(UNREP_LIST_MAX).enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str("{\"path\":");
            json_str(out, &show(p));
            out.push_str(",\"what\":[");
            for (j, n) in super::unrep::names(e.what).iter().enumerate() {
                if j > 0 {
                    out.push(',');
                }
                json_str(out, n);
            }
            out.push_str("],\"detail\":");
            json_str(out, &e.detail);
            let _ = write!(out, ",\"since_ms\":{}}}", e.ms);
        }
        out.push_str("],\"src_caps\":");
        match &self.caps {
            Some(c) => out.push_str(&c.to_json()),
            None => out.push_str("null"),
        }
    }

    fn unrep_text(&self, out: &mut String) {
        if let Some(c) = &self.caps {
            let _ = writeln!(out, "src can hold:   {}", c.describe());
        }
        let _ = writeln!(out, "not representable on src: {}", self.unrep.len());
        if self.unrep.is_empty() {
            return;
        }
        out.push_str(
            "  (src cannot store these: kept in dst only, shown by the mount, not retried, \
             not an error; other paths are not held up)\n",
        );
        let mut all = 0;
        for (p, e) in self.unrep.iter().take(UNREP_TEXT_MAX) {
            all |= e.what;
            let _ = writeln!(
                out,
                "  NOT REPRESENTABLE {} ({}): {}",
                show(p),
                super::unrep::names(e.what).join(", "),
                e.detail
            );
        }
        if self.unrep.len() > UNREP_TEXT_MAX {
            for e in self.unrep.values().skip(UNREP_TEXT_MAX) {
                all |= e.what;
            }
            let _ = writeln!(
                out,
                "  ... and {} more (`cachefs status --json` lists up to {UNREP_LIST_MAX})",
                self.unrep.len() - UNREP_TEXT_MAX
            );
        }
        for a in super::unrep::advice(all) {
            let _ = writeln!(out, "  what to do: {a}");
        }
    }

    fn json_fields(&self, out: &mut String) {
        let num = |v: Option<u64>| v.map_or("null".to_string(), |v| v.to_string());
        let src = self.src.as_ref();
        let _ = write!(
            out,
            "\"src_online\":{},\"src_since\":{},\"src_offline_since\":{},\"src_last_error\":",
            src.map_or("null".to_string(), |s| s.online.to_string()),
            num(src.map(|s| s.since)),
            num(src.filter(|s| !s.online).map(|s| s.since)),
        );
        match src.and_then(|s| s.last_error.as_deref()) {
            Some(e) => json_str(out, e),
            None => out.push_str("null"),
        }
        let _ = write!(
            out,
            ",\"partial_files\":{},\"partial_present_bytes\":{},\"partial_total_bytes\":{}",
            self.partial.0, self.partial.1, self.partial.2
        );
        self.unrep_json(out);
        let _ = write!(
            out,
            ",\"leftover_checks\":{},\"leftover_checks_next_ms\":{}",
            self.leftovers.0,
            num(self.leftovers.1)
        );
        let _ = write!(out, ",\"daemon_running\":{},\"cache\":", self.running);
        match self.cache_raw.as_deref().map(str::trim) {
            Some(c) if c.starts_with('{') && c.ends_with('}') => out.push_str(c),
            _ => out.push_str("null"),
        }
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
    let wb = render(s, json);
    if json {
        // `{...writeback keys...}\n` -> `{...writeback keys...,src and cache keys}\n`
        let mut out = wb.trim_end().trim_end_matches('}').to_string();
        out.push(',');
        x.json_fields(&mut out);
        out.push_str("}\n");
        out
    } else {
        let mut out = x.src_line();
        out.push_str(&wb);
        x.unrep_text(&mut out);
        if x.leftovers.0 > 0 {
            let next = x
                .leftovers
                .1
                .map_or(0, |ms| (ms / 1000).saturating_sub(x.now));
            let _ = writeln!(
                out,
                "leftover checks: {} (names renamed away or deleted on src, looked at again \
                 after --src-settle for a copy src kept; next in {})",
                x.leftovers.0,
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
    match journal::read(dst) {
        Ok((live, _)) => {
            let s = summarize(dst, live.values().map(|l| (l, true)));
            let x = Extra::read(dst);
            print!("{}", render_all(&s, &x, json));
            i32::from(!s.failed.is_empty())
        }
        Err(e) => {
            eprintln!(
                "cachefs status: cannot read {}: {e}",
                journal::dir(dst).display()
            );
            2
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writeback::journal::FailInfo;

    #[test]
    fn renders_text_and_json() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("a"), b"12345").unwrap();
        let live = [
            Live {
                ms: now_ms() - 5000,
                op: Op::Write { path: "a".into() },
                ids: [None, None],
                fail: None,
            },
            Live {
                ms: now_ms(),
                op: Op::Mkdir {
                    path: "q\"d".into(),
                },
                ids: [None, None],
                fail: Some(FailInfo {
                    attempts: 3,
                    ms: 0,
                    errno: 1,
                    message: "Operation not permitted (os error 1)".into(),
                }),
            },
        ];
        let s = summarize(t.path(), live.iter().map(|l| (l, true)));
        assert_eq!((s.pending_ops, s.pending_bytes, s.failed.len()), (2, 5, 1));
        assert!(s.oldest_age_secs.unwrap() >= 4);
        let j = render(&s, true);
        assert!(
            j.starts_with("{\"pending_ops\":2,\"pending_bytes\":5,"),
            "{j}"
        );
        assert!(j.contains("\"failed_ops\":1") && j.contains("\"path\":\"/q\\\"d\""));
        let txt = render(&s, false);
        assert!(txt.contains("FAILED mkdir /q\"d (attempts 3)"), "{txt}");
    }

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
        let s = summarize(t.path(), std::iter::empty());
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
        std::fs::create_dir_all(journal::dir(t.path())).unwrap();
        std::fs::write(
            super::super::unrep::path(t.path()),
            "+ 1000 1 /l symlink%20to%20f\n+ 2000 18 /k mode%200600\n",
        )
        .unwrap();
        std::fs::write(
            super::super::caps::file(t.path()),
            "{\"symlinks\":false,\"special_files\":false,\"hard_links\":false,\
             \"user_xattrs\":false,\"chmod\":false,\"chown\":false,\"utimes\":true,\
             \"empty_dirs\":null,\"fstype\":\"fuse.rclone\"}\n",
        )
        .unwrap();
        let s = summarize(t.path(), std::iter::empty());
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
