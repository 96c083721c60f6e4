//! `cachefs status DST [--json]`: the writeback queue as the journal on disk says,
//! whether or not a daemon runs (the journal is read, never locked or modified).
//!
//! Reported: pending ops, pending bytes (current dst size of each distinct path with
//! pending content), age of the oldest pending op, and every failed (parked) op with its
//! path, attempts and last error. Exit code: 0 all fine, 1 failed ops exist, 2 the
//! journal could not be read.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::journal::{self, Live};
use super::{Op, op};

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

fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
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
            print!("{}", render(&s, json));
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
    fn missing_journal_is_empty_and_ok() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(run(t.path(), true), 0);
    }
}
