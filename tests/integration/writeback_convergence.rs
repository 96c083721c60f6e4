//! Convergence property: for random sequences of mutations applied to dst the way the
//! layered view applies them (whiteouts and opaque markers included) and recorded while
//! replay runs concurrently, src ends up equal to dst's view, byte for byte, with no
//! internal name in it.
//!
//! Seeded and reproducible: `CACHEFS_WB_SEED=n` runs one seed, `CACHEFS_WB_SEEDS=n`
//! runs n seeds (default 24). A failure prints its seed and the op trace.

use std::ffi::CString;
use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::Rng;
use crate::writeback_support::*;
use cachefs::writeback::{Op, Writeback};

const NAMES: &[&str] = &["a", "b", "c", "dd", "e f"];

/// Non-reserved entries under `rel` in dst, recursively (dirs and the rest separately).
fn listing(root: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let (mut dirs, mut others) = (vec![PathBuf::new()], Vec::new());
    let mut i = 0;
    while i < dirs.len() {
        let d = dirs[i].clone();
        let mut names: Vec<_> = fs::read_dir(root.join(&d))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for n in names {
            if n.as_encoded_bytes().starts_with(b".cachefs-") {
                continue;
            }
            let rel = d.join(&n);
            if fs::symlink_metadata(root.join(&rel)).unwrap().is_dir() {
                dirs.push(rel);
            } else {
                others.push(rel);
            }
        }
        i += 1;
    }
    (dirs, others)
}

fn wh(root: &Path, rel: &Path) -> PathBuf {
    let name = rel.file_name().unwrap();
    let mut w = std::ffi::OsString::from(".cachefs-wh.");
    w.push(name);
    root.join(rel.parent().unwrap()).join(w)
}

/// The name is being (re)created: drop its whiteout, as the layered view does.
fn clear_wh(root: &Path, rel: &Path) -> bool {
    fs::remove_file(wh(root, rel)).is_ok()
}

/// Remove the reserved entries of a dst dir (before rmdir / rename over it).
fn clear_reserved(dir: &Path) {
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_name().as_encoded_bytes().starts_with(b".cachefs-") {
            fs::remove_file(e.path()).unwrap();
        }
    }
}

fn is_empty_view(dir: &Path) -> bool {
    fs::read_dir(dir).unwrap().all(|e| {
        e.unwrap()
            .file_name()
            .as_encoded_bytes()
            .starts_with(b".cachefs-")
    })
}

/// What the core does when it renames or links: the origin records of both names
/// (and below them) no longer describe what dst holds there (see `fs::origin`).
/// Without this the harness would hand the replay records the core never leaves.
fn forget_origins(root: &Path, paths: &[&Path]) {
    let store = cachefs::fs::origin::Store::of_root(root).unwrap();
    for p in paths {
        store.clear_tree(p).unwrap();
    }
}

fn exchange(a: &Path, b: &Path) {
    let ca = CString::new(a.as_os_str().as_encoded_bytes()).unwrap();
    let cb = CString::new(b.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: valid paths.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
}

/// One random mutation of dst; returns the op to record (None: nothing done).
fn step(rng: &mut Rng, root: &Path) -> Option<Op> {
    let (dirs, others) = listing(root);
    let dir = rng.pick(&dirs).clone();
    let fresh = dir.join(rng.pick(NAMES));
    let fresh_abs = root.join(&fresh);
    let free = fs::symlink_metadata(&fresh_abs).is_err() && fresh.components().count() <= 4;
    let all: Vec<PathBuf> = dirs[1..].iter().chain(others.iter()).cloned().collect();
    let existing = (!all.is_empty()).then(|| rng.pick(&all).clone());
    let files: Vec<PathBuf> = others
        .iter()
        .filter(|p| fs::symlink_metadata(root.join(p)).unwrap().is_file())
        .cloned()
        .collect();
    match rng.below(15) {
        0 | 1 if free => {
            let n = rng.below(3) * rng.below(40_000);
            let byte = rng.below(256) as u8;
            fs::write(&fresh_abs, vec![byte; n]).unwrap();
            clear_wh(root, &fresh);
            Some(Op::Create { path: fresh })
        }
        2 | 3 if !files.is_empty() => {
            let f = rng.pick(&files).clone();
            let abs = root.join(&f);
            match rng.below(3) {
                0 => fs::write(&abs, format!("rewrite {}", rng.next())).unwrap(),
                1 => {
                    use std::io::Write;
                    let mut h = fs::OpenOptions::new().append(true).open(&abs).unwrap();
                    h.write_all(&vec![b'+'; rng.below(5000)]).unwrap();
                }
                _ => fs::OpenOptions::new()
                    .write(true)
                    .open(&abs)
                    .unwrap()
                    .set_len(rng.below(100) as u64)
                    .unwrap(),
            }
            Some(Op::Write { path: f })
        }
        4 if free => {
            fs::create_dir(&fresh_abs).unwrap();
            if clear_wh(root, &fresh) {
                // mkdir over a deleted directory: opaque, src's old children stay hidden.
                fs::write(fresh_abs.join(".cachefs-opaque"), b"").unwrap();
            }
            Some(Op::Mkdir { path: fresh })
        }
        5 if free => {
            symlink(format!("target-{}", rng.below(5)), &fresh_abs).unwrap();
            clear_wh(root, &fresh);
            Some(Op::Symlink { path: fresh })
        }
        6 => {
            let e = existing?;
            let abs = root.join(&e);
            match rng.below(3) {
                0 if !fs::symlink_metadata(&abs).unwrap().is_symlink() => {
                    let m = *rng.pick(&[0o644, 0o600, 0o755, 0o2750, 0o444]);
                    fs::set_permissions(&abs, fs::Permissions::from_mode(m)).unwrap();
                }
                1 => {
                    let id = *rng.pick(&[0, 1000, 65534]);
                    std::os::unix::fs::lchown(&abs, Some(id), Some(id)).unwrap();
                }
                _ => set_mtime(
                    &abs,
                    1_500_000_000 + rng.below(1000) as i64,
                    rng.below(1000) as i64,
                ),
            }
            Some(Op::SetAttr { path: e })
        }
        7 if !files.is_empty() => {
            let f = rng.pick(&files).clone();
            if !set_xattr(
                &root.join(&f),
                "user.k",
                format!("{}", rng.below(9)).as_bytes(),
            ) {
                return None;
            }
            Some(Op::Xattr { path: f })
        }
        8 if !others.is_empty() => {
            let f = rng.pick(&others).clone();
            fs::remove_file(root.join(&f)).unwrap();
            if rng.below(2) == 0 {
                fs::write(wh(root, &f), b"").unwrap();
            }
            Some(Op::Unlink { path: f })
        }
        9 if dirs.len() > 1 => {
            let d = rng.pick(&dirs[1..]).clone();
            let abs = root.join(&d);
            if !is_empty_view(&abs) {
                return None;
            }
            clear_reserved(&abs);
            fs::remove_dir(&abs).unwrap();
            if rng.below(2) == 0 {
                fs::write(wh(root, &d), b"").unwrap();
            }
            Some(Op::Rmdir { path: d })
        }
        10..=12 => {
            let from = existing?;
            let to = if rng.below(3) == 0 {
                let other = rng.pick(&all).clone();
                if other == from {
                    return None;
                }
                other
            } else {
                fresh
            };
            if to.starts_with(&from) || from.starts_with(&to) {
                return None;
            }
            let (fa, ta) = (root.join(&from), root.join(&to));
            let fm = fs::symlink_metadata(&fa).unwrap();
            if let Ok(tm) = fs::symlink_metadata(&ta) {
                if fm.is_dir() != tm.is_dir() || (tm.is_dir() && !is_empty_view(&ta)) {
                    return None;
                }
                if tm.is_dir() {
                    clear_reserved(&ta);
                }
            }
            if rng.below(4) == 0 && fs::symlink_metadata(&ta).is_ok() {
                exchange(&fa, &ta);
                forget_origins(root, &[&from, &to]);
                return Some(Op::Rename {
                    from,
                    to,
                    exchange: true,
                });
            }
            fs::rename(&fa, &ta).unwrap();
            forget_origins(root, &[&from, &to]);
            clear_wh(root, &to);
            if rng.below(2) == 0 {
                fs::write(wh(root, &from), b"").unwrap();
            }
            Some(Op::Rename {
                from,
                to,
                exchange: false,
            })
        }
        13 if free && !files.is_empty() && links_enabled() => {
            let f = rng.pick(&files).clone();
            fs::hard_link(root.join(&f), &fresh_abs).unwrap();
            forget_origins(root, &[&f]);
            clear_wh(root, &fresh);
            Some(Op::Link {
                existing: f,
                new: fresh,
            })
        }
        14 => {
            std::thread::sleep(Duration::from_millis(rng.below(4) as u64));
            None
        }
        _ => None,
    }
}

/// Hard links are opt-in (`CACHEFS_WB_LINKS=1`): this harness journals a write through
/// one name of a multiply-linked file for that name only (the core records every name
/// it knows, see writeback_mount.rs `hard_link_names_all_get_the_change_*`), so
/// src copies of the other names that are not hard links on src go stale here.
fn links_enabled() -> bool {
    std::env::var_os("CACHEFS_WB_LINKS").is_some()
}

fn run_seed(seed: u64) {
    init_logging();
    let env = Env::new();
    let mut rng = Rng(seed);
    let concurrent = *rng.pick(&[0, 1, 2, 4]);
    let delay = *rng.pick(&[0, 0, 30]);
    let env_num = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let concurrent = env_num("CACHEFS_WB_CONCURRENT").map_or(concurrent, |v| v as u32);
    let delay = env_num("CACHEFS_WB_DELAY_MS").unwrap_or(delay);
    let mut cfg = env.cfg(concurrent, Duration::from_millis(delay));
    cfg.log_writeback = std::env::var_os("CACHEFS_WB_VERBOSE").is_some();
    let wb = Writeback::start(&cfg).unwrap();
    let mut trace = Vec::new();
    for _ in 0..150 {
        // As the core does around a rename: the change and its record, as one.
        let _recording = wb.begin_change();
        if let Some(op) = step(&mut rng, &env.dst) {
            trace.push(op.clone());
            if std::env::var_os("CACHEFS_WB_VERBOSE").is_some() {
                log::info!("RECORD {op:?}");
            }
            wb.record(op).unwrap();
        }
    }
    // Half the seeds also restart mid-way through the queue.
    let wb = if rng.below(2) == 0 && delay <= 1000 {
        drop(wb);
        Writeback::start(&cfg).unwrap()
    } else {
        wb
    };
    if delay > 1000 {
        // Everything replays at once against dst's final state: shutdown drains it.
        wb.shutdown(Duration::from_secs(30));
    }
    let t = std::time::Instant::now();
    while wb.has_pending(Path::new("")) {
        if t.elapsed() > Duration::from_secs(30) {
            wb.log_summary();
            panic!("seed {seed}: did not drain; trace {trace:#?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let r = std::panic::catch_unwind(|| assert_converged(&env));
    if r.is_err() {
        panic!("seed {seed} (concurrent {concurrent}, delay {delay}ms) diverged; trace {trace:#?}");
    }
}

#[test]
fn random_op_sequences_converge() {
    if let Ok(s) = std::env::var("CACHEFS_WB_SEED") {
        run_seed(s.parse().unwrap());
        return;
    }
    let n: u64 = std::env::var("CACHEFS_WB_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24);
    for seed in 0..n {
        run_seed(seed);
    }
}
