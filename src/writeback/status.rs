//! The writeback part of `cachefs status` (the whole report, with src and the cache, is
//! [`crate::status`]): what the journal and writeback's files in dst's state folder say,
//! read without a daemon and without locking or changing anything.
//!
//! - the queue, from the journal (`read`, `Summary`): pending ops, pending bytes
//!   (current dst size of each distinct path with pending content), age of the oldest
//!   pending op, and every failed (parked) op with its path, attempts and last error;
//!   `render` prints it as text or as the report's first JSON keys.
//! - `Extra`: paths src cannot hold (`unrep`), what src can hold (`caps`), and the
//!   leftover checks waiting (`leftovers`).
//!
//! The daemon uses `summarize`, `pending_bytes` and `now_ms` too (its log summary,
//! drain progress, journal timestamps).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::journal::{self, Live};
use super::{Op, op};
use crate::json::{Object, array};

/// Summary of a live set (shared by `cachefs status` and [`super::Writeback::log_summary`]).
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

/// The queue's keys of `cachefs status --json`: `pending_ops`, `pending_bytes`,
/// `oldest_pending_secs`, `failed_ops` and `failed` (op, path, path2, attempts, errno,
/// error).
pub(crate) fn queue_json(s: &Summary, o: &mut Object) {
    let failed = s.failed.iter().map(|(kind, paths, attempts, errno, msg)| {
        let mut f = Object::new();
        f.field("op", kind.as_str()).field("path", show(&paths[0]));
        if let Some(p2) = paths.get(1) {
            f.field("path2", show(p2));
        }
        f.field("attempts", *attempts)
            .field("errno", *errno)
            .field("error", msg.as_str());
        f.finish()
    });
    o.field("pending_ops", s.pending_ops)
        .field("pending_bytes", s.pending_bytes)
        .field("oldest_pending_secs", s.oldest_age_secs)
        .field("failed_ops", s.failed.len())
        .raw("failed", &array(failed));
}

/// The queue as text, or as a JSON object of [`queue_json`]'s keys.
pub(crate) fn render(s: &Summary, json: bool) -> String {
    let mut out = String::new();
    if json {
        let mut o = Object::new();
        queue_json(s, &mut o);
        out = o.finish();
        out.push('\n');
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

/// The queue in dst's journal; the error says which directory could not be read.
pub(crate) fn read(dst: &Path) -> Result<Summary, String> {
    match journal::read(dst) {
        Ok((live, _)) => Ok(summarize(dst, live.values().map(|l| (l, true)))),
        Err(e) => Err(format!("cannot read {}: {e}", journal::dir(dst).display())),
    }
}

/// Writeback's findings beside the queue: what src cannot hold and what waits for a
/// second look.
pub(crate) struct Extra {
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
        Extra {
            unrep: super::unrep::read(dst),
            caps: super::caps::read(dst),
            leftovers: {
                let l = super::leftovers::read(dst);
                (l.len(), l.iter().map(|c| c.due_ms).min())
            },
        }
    }

    /// The keys `not_representable`, `not_representable_paths` (at most
    /// `UNREP_LIST_MAX`: path, what, detail, since_ms) and `src_caps`.
    pub(crate) fn unrep_json(&self, o: &mut Object) {
        let paths = self.unrep.iter().take(UNREP_LIST_MAX).map(|(p, e)| {
            let mut f = Object::new();
            f.field("path", show(p))
                .field("what", super::unrep::names(e.what))
                .field("detail", e.detail.as_str())
                .field("since_ms", e.ms);
            f.finish()
        });
        o.field("not_representable", self.unrep.len())
            .raw("not_representable_paths", &array(paths))
            .raw(
                "src_caps",
                &self
                    .caps
                    .as_ref()
                    .map_or("null".to_string(), |c| c.to_json()),
            );
    }

    pub(crate) fn unrep_text(&self, out: &mut String) {
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
}
