//! `cachefs warmup PATH... [--recursive] [--evict --dst DST]`.
//!
//! Fetching reads every file through the mount, as an application would: the daemon
//! serves each read with its own locks, its own copy-up or lazy fetch and its own
//! budget (a file that does not fit fails with ENOSPC, and warmup reports it), so
//! warmup cannot get around any of them, and it needs nothing of the daemon but the
//! mount. Files are read whole (a lazily fetched file becomes complete).
//!
//! With `--dst DST` warmup also asks the daemon for its `--cache-size` first: a file
//! larger than the whole budget fails at once, unread (reading it would evict other
//! files for blocks that cannot all stay).
//!
//! `--evict` asks the daemon over the control channel (which needs its dst) to drop
//! the clean cached copies and partial files of the same paths; dirty files, files
//! waiting for upload, pinned and open files stay, and are listed.
//!
//! Progress: on a terminal an indicatif bar (files, bytes, rate, ETA); otherwise one
//! plain line per file and a summary. Exit status: 0 when every file was fetched, 1
//! when any failed (listed on stderr), 2 for bad arguments (a path not in a cachefs
//! mount, a directory without `--recursive`).

use std::fs::File;
use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

use super::ControlError;
use super::client::{self, Conn};
use crate::cache::budget::human;

/// What `cachefs warmup` was asked to do.
#[derive(Debug, Clone, PartialEq)]
pub struct Warmup {
    pub(crate) paths: Vec<PathBuf>,
    pub(crate) recursive: bool,
    pub(crate) evict: bool,
    pub(crate) dst: Option<PathBuf>,
}

/// One file to read: its path and size.
struct Item {
    path: PathBuf,
    size: u64,
}

/// Runs it; the exit status.
pub fn run(w: &Warmup) -> i32 {
    let files = match collect(w) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("cachefs: {e}");
            return e.exit_code();
        }
    };
    let r = if w.evict {
        evict(w, &files)
    } else {
        budget(w).map(|limit| fetch(&files, limit))
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cachefs: {e}");
            e.exit_code()
        }
    }
}

/// The mountpoint of the cachefs mount holding `p` (canonical), from mountinfo.
pub(crate) fn cachefs_mount_of(p: &Path) -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // The innermost mount holding `p` (the later of two at one point: it is on top).
    let innermost = crate::mountinfo::mounts(&info)
        .filter(|m| p.starts_with(&m.point))
        .fold(None::<crate::mountinfo::Mount>, |best, m| match best {
            Some(b) if b.point.as_os_str().len() > m.point.as_os_str().len() => Some(b),
            _ => Some(m),
        })?;
    // The kernel shows the subtype only for some mounts: "fuse" with the fsname
    // "cachefs:SRC" is ours too.
    let ours = innermost.fstype == "fuse.cachefs"
        || (innermost.fstype.starts_with("fuse") && innermost.source.starts_with("cachefs:"));
    ours.then_some(innermost.point)
}

fn collect(w: &Warmup) -> Result<Vec<Item>, ControlError> {
    let usage = |m: String| ControlError::Usage(m);
    if w.paths.is_empty() {
        return Err(usage(
            "warmup needs at least one PATH inside a cachefs mount".into(),
        ));
    }
    let mut out = Vec::new();
    for p in &w.paths {
        let abs = std::fs::canonicalize(p).map_err(|e| usage(format!("{}: {e}", p.display())))?;
        if cachefs_mount_of(&abs).is_none() {
            return Err(usage(format!(
                "{} is not inside a cachefs mount; give paths through the mountpoint",
                p.display()
            )));
        }
        let md =
            std::fs::symlink_metadata(&abs).map_err(|e| usage(format!("{}: {e}", p.display())))?;
        if md.is_dir() {
            if !w.recursive {
                return Err(usage(format!(
                    "{} is a directory; add --recursive to warm everything below it",
                    p.display()
                )));
            }
            walk(&abs, &mut out).map_err(ControlError::Io)?;
        } else if md.is_file() {
            out.push(Item {
                path: abs,
                size: md.len(),
            });
        }
    }
    Ok(out)
}

/// Every regular file below `dir`, through the mount (symlinks are not followed).
fn walk(dir: &Path, out: &mut Vec<Item>) -> std::io::Result<()> {
    let mut names: Vec<_> = std::fs::read_dir(dir)?.flatten().collect();
    names.sort_by_key(|e| e.file_name());
    for e in names {
        let Ok(md) = e.metadata() else { continue };
        if md.is_dir() {
            walk(&e.path(), out)?;
        } else if md.is_file() {
            out.push(Item {
                path: e.path(),
                size: md.len(),
            });
        }
    }
    Ok(())
}

/// Reads `path` whole, reporting bytes as they come.
fn read_whole(path: &Path, mut progress: impl FnMut(u64)) -> std::io::Result<u64> {
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
        progress(n as u64);
    }
}

fn why(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOSPC) => {
            "does not fit in the cache (ENOSPC: the cache budget or dst is full)".into()
        }
        Some(libc::EIO) => "src error (EIO: src failed or is offline)".into(),
        _ => e.to_string(),
    }
}

fn rate(bytes: u64, d: Duration) -> String {
    let s = d.as_secs_f64();
    if s <= 0.0 {
        return "-".into();
    }
    format!("{}/s", human((bytes as f64 / s) as u64))
}

/// With `--dst`: the daemon's `--cache-size`, so that a file larger than the whole
/// budget fails without being read (reading it would evict other files for blocks
/// that cannot all stay).
fn budget(w: &Warmup) -> Result<Option<u64>, ControlError> {
    let Some(dst) = &w.dst else {
        return Ok(None);
    };
    let info = client::call(dst, &json!({"cmd": "info"}))?;
    Ok(info.get("cache_size").and_then(serde_json::Value::as_u64))
}

fn fetch(files: &[Item], limit: Option<u64>) -> i32 {
    let total: u64 = files.iter().map(|i| i.size).sum();
    let tty = std::io::stderr().is_terminal();
    let bar = ProgressBar::with_draw_target(
        Some(total),
        if tty {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} {wide_bar} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .expect("a valid template"),
    );
    let started = Instant::now();
    let (mut done_bytes, mut failed) = (0u64, Vec::new());
    for (i, item) in files.iter().enumerate() {
        bar.set_message(format!("files {}/{}", i + 1, files.len()));
        let t = Instant::now();
        let r = match limit {
            Some(l) if item.size > l => Err(std::io::Error::other(format!(
                "does not fit in the cache ({} is more than --cache-size {}); not read",
                human(item.size),
                human(l)
            ))),
            _ => read_whole(&item.path, |n| {
                bar.inc(n);
            }),
        };
        match r {
            Ok(n) => {
                done_bytes += n;
                if !tty {
                    println!(
                        "fetched {} ({}, {}) [{}/{} files, {}/{}, {}]",
                        item.path.display(),
                        human(n),
                        rate(n, t.elapsed()),
                        i + 1,
                        files.len(),
                        human(done_bytes),
                        human(total),
                        rate(done_bytes, started.elapsed())
                    );
                }
            }
            Err(e) => {
                let msg = format!("{}: {}", item.path.display(), why(&e));
                bar.suspend(|| eprintln!("cachefs: cannot warm {msg}"));
                failed.push(msg);
            }
        }
    }
    bar.finish_and_clear();
    println!(
        "warmed {} of {} files, {} in {:.1}s ({}){}",
        files.len() - failed.len(),
        files.len(),
        human(done_bytes),
        started.elapsed().as_secs_f64(),
        rate(done_bytes, started.elapsed()),
        if failed.is_empty() {
            String::new()
        } else {
            format!("; {} failed", failed.len())
        }
    );
    if failed.is_empty() { 0 } else { 1 }
}

fn evict(w: &Warmup, files: &[Item]) -> Result<i32, ControlError> {
    let Some(dst) = &w.dst else {
        return Err(ControlError::Usage(
            "--evict asks the daemon over its control channel: add --dst DST (the \
             mount's -dst)"
                .into(),
        ));
    };
    let mut conn = Conn::connect(dst)?;
    let mnt = client::mountpoint(&mut conn)?;
    let mut rels = Vec::new();
    for f in files {
        rels.push(
            client::rel_to_mount(&mnt, &f.path)?
                .to_string_lossy()
                .into_owned(),
        );
    }
    let (mut evicted, mut freed, mut errors) = (0, 0, 0);
    for chunk in rels.chunks(1000) {
        let v = conn.call(&json!({"cmd": "evict", "paths": chunk}))?;
        client::print_evicted(&v);
        evicted += v["evicted"].as_u64().unwrap_or(0);
        freed += v["freed_bytes"].as_u64().unwrap_or(0);
        errors += v["errors"].as_array().map_or(0, Vec::len);
    }
    if rels.len() > 1000 {
        println!("evicted {evicted} files ({}) in all", human(freed));
    }
    Ok(if errors == 0 { 0 } else { 1 })
}
