//! Rebuilding the usage index from what is on disk: a walk of dst (at start and, as a
//! reconciliation, now and then while mounted), and the persisted last-use times.
//!
//! - Reserved names (`.cachefs-*`: state folder, whiteouts, temp files, opaque markers)
//!   are never counted, listed or evicted, except the data files of lazy fetch's
//!   partial files (`.cachefs-state/lazy/<key>.data`, see `fs::lazy`): they count, by
//!   that dst-relative name, and are evictable unless their path is pinned.
//! - Only regular files count; a file with several names counts once.
//! - Every access goes through the dst [`Layer`] (no symlink is ever followed).
//! - Last use: the persisted time if the index file has the path, else the newest of
//!   the file's atime, mtime and ctime (copy-up keeps src's atime/mtime, but its
//!   rename gives the copy a fresh ctime, so a fetch counts as a use).

use std::collections::{HashMap, HashSet};
use std::io::{self, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use super::lru::{Class, Entry};
use super::pin::{Pins, has_pin_xattr};
use crate::fs::layer::{Layer, Stat};
use crate::fs::{lazy, names, origin};

/// What a walk of dst found.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    pub(crate) entries: Vec<(PathBuf, Entry)>,
    /// Topmost directories carrying the pin xattr (their src trees are prefetched).
    pub(crate) pinned_dirs: Vec<PathBuf>,
    /// Sum of the entries' bytes so far.
    pub(crate) bytes: u64,
}

/// What one walk carries along besides its output.
struct Walk<'a> {
    seen_links: HashSet<(u64, u64)>,
    /// Called after each regular file counted: (files, bytes) so far.
    tick: &'a mut dyn FnMut(usize, u64),
}

fn nanos(sec: i64, nsec: i64) -> u64 {
    (sec.max(0) as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(nsec.max(0) as u64)
}

/// The last-use seed from a file's times.
pub(crate) fn seed_stamp(st: &Stat) -> u64 {
    nanos(st.st_atime, st.st_atime_nsec)
        .max(nanos(st.st_mtime, st.st_mtime_nsec))
        .max(nanos(st.st_ctime, st.st_ctime_nsec))
}

/// The class of dst's regular file at `path`, given whether an ancestor pins it.
pub(crate) fn classify(dst: &Layer, pins: &Pins, path: &Path, under_pin: bool) -> Class {
    if under_pin || pins.matches(path) || has_pin_xattr(dst, path) {
        return Class::Pinned;
    }
    match origin::read(dst, path) {
        Ok(Some(o)) if !o.dirty => Class::Clean,
        _ => Class::Local,
    }
}

/// Walks dst.
#[cfg(test)]
pub(crate) fn scan(dst: &Layer, pins: &Pins, last_use: &HashMap<PathBuf, u64>) -> Scan {
    scan_with(dst, pins, last_use, &mut |_, _| {})
}

/// Walks dst, calling `tick(files, bytes)` after each regular file counted (for
/// progress reports; it must be cheap).
pub(crate) fn scan_with(
    dst: &Layer,
    pins: &Pins,
    last_use: &HashMap<PathBuf, u64>,
    tick: &mut dyn FnMut(usize, u64),
) -> Scan {
    let mut out = Scan::default();
    let mut w = Walk {
        seen_links: HashSet::new(),
        tick,
    };
    walk(dst, pins, last_use, Path::new(""), false, &mut w, &mut out);
    partials(dst, pins, last_use, &mut out);
    out
}

/// The partial files of lazy fetch (their data files; maps are a few KiB and not
/// counted).
fn partials(dst: &Layer, pins: &Pins, last_use: &HashMap<PathBuf, u64>, out: &mut Scan) {
    let dir = lazy::lazy_dir();
    let Ok(entries) = dst.read_dir(&dir) else {
        return;
    };
    for e in entries {
        let rel = dir.join(&e.name);
        if !lazy::is_data_rel(&rel) {
            continue;
        }
        let Ok(Some(st)) = dst.stat(&rel) else {
            continue;
        };
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            continue;
        }
        let pinned = lazy::path_of(dst, &rel)
            .is_some_and(|p| pins.matches(&p) || super::pin::pinned_by_xattr(dst, &p));
        let stamp = last_use
            .get(&rel)
            .copied()
            .unwrap_or_else(|| seed_stamp(&st));
        let bytes = st.st_blocks as u64 * 512;
        out.bytes += bytes;
        out.entries.push((
            rel,
            Entry {
                bytes,
                stamp,
                class: if pinned { Class::Pinned } else { Class::Clean },
            },
        ));
    }
}

fn walk(
    dst: &Layer,
    pins: &Pins,
    last_use: &HashMap<PathBuf, u64>,
    dir: &Path,
    under_pin: bool,
    w: &mut Walk<'_>,
    out: &mut Scan,
) {
    let entries = match dst.read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            log::debug!("cache scan: cannot list dst/{}: {e}", dir.display());
            return;
        }
    };
    for e in entries {
        if names::is_reserved(&e.name) {
            continue;
        }
        let path = dir.join(&e.name);
        let Ok(Some(st)) = dst.stat(&path) else {
            continue;
        };
        match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => {
                let pinned_here = !under_pin && has_pin_xattr(dst, &path);
                if pinned_here {
                    out.pinned_dirs.push(path.clone());
                }
                walk(dst, pins, last_use, &path, under_pin || pinned_here, w, out);
            }
            libc::S_IFREG => {
                let mut bytes = st.st_blocks as u64 * 512;
                if st.st_nlink > 1 && !w.seen_links.insert((st.st_dev, st.st_ino)) {
                    bytes = 0;
                }
                let stamp = last_use
                    .get(&path)
                    .copied()
                    .unwrap_or_else(|| seed_stamp(&st));
                let class = classify(dst, pins, &path, under_pin);
                out.entries.push((
                    path,
                    Entry {
                        bytes,
                        stamp,
                        class,
                    },
                ));
                out.bytes += bytes;
                (w.tick)(out.entries.len(), out.bytes);
            }
            _ => {}
        }
    }
}

fn escape(p: &Path, out: &mut Vec<u8>) {
    for &b in p.as_os_str().as_bytes() {
        if b <= b' ' || b >= 0x7f || b == b'%' {
            out.extend_from_slice(format!("%{b:02x}").as_bytes());
        } else {
            out.push(b);
        }
    }
}

fn unescape(s: &[u8]) -> Option<PathBuf> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            let hex = std::str::from_utf8(s.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    Some(PathBuf::from(std::ffi::OsString::from_vec(out)))
}

/// The persisted last-use file: one `NANOS PATH` line per file, the path escaped
/// (`%xx` for bytes <= space, >= 0x7f and `%`).
pub(crate) fn encode_last_use<'a>(items: impl Iterator<Item = (&'a PathBuf, u64)>) -> Vec<u8> {
    let mut out = b"cachefs-lru v1\n".to_vec();
    for (p, stamp) in items {
        out.extend_from_slice(stamp.to_string().as_bytes());
        out.push(b' ');
        escape(p, &mut out);
        out.push(b'\n');
    }
    out
}

/// Reads [`encode_last_use`]'s format; unreadable lines are skipped.
pub(crate) fn decode_last_use(data: &[u8]) -> HashMap<PathBuf, u64> {
    let mut map = HashMap::new();
    let mut lines = data.split(|b| *b == b'\n');
    if lines.next() != Some(b"cachefs-lru v1") {
        return map;
    }
    for line in lines {
        let Some(sp) = line.iter().position(|b| *b == b' ') else {
            continue;
        };
        let stamp = std::str::from_utf8(&line[..sp])
            .ok()
            .and_then(|s| s.parse::<u64>().ok());
        if let (Some(stamp), Some(p)) = (stamp, unescape(&line[sp + 1..])) {
            map.insert(p, stamp);
        }
    }
    map
}

/// Writes `data` to `path` atomically and durably (`sys::state_file`: temp file
/// `.<name>.tmp` beside it, fsync, rename, fsync of the folder), creating the folder
/// if needed.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = format!(
        ".{}.tmp",
        path.file_name().unwrap_or_default().to_string_lossy()
    );
    crate::sys::state_file::replace(path, tmp.as_ref(), 0o666, |f| f.write_all(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_use_round_trip() {
        let weird = PathBuf::from(std::ffi::OsString::from_vec(
            b"a dir/f%1\n\xff.jpg".to_vec(),
        ));
        let items = [(PathBuf::from("x/y"), 5u64), (weird.clone(), 7u64)];
        let data = encode_last_use(items.iter().map(|(p, s)| (p, *s)));
        let back = decode_last_use(&data);
        assert_eq!(back.len(), 2);
        assert_eq!(back[&weird], 7);
        assert_eq!(back[Path::new("x/y")], 5);
        assert!(decode_last_use(b"garbage\n1 a\n").is_empty());
    }

    #[test]
    fn scan_counts_files_and_skips_reserved() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::create_dir_all(root.join(".cachefs-state")).unwrap();
        std::fs::write(root.join("a/b/f"), vec![1u8; 10000]).unwrap();
        std::fs::write(root.join("g"), b"x").unwrap();
        std::fs::hard_link(root.join("g"), root.join("g2")).unwrap();
        std::fs::write(root.join(".cachefs-state/journal"), vec![1u8; 9000]).unwrap();
        std::fs::write(root.join("a/.cachefs-wh.z"), b"").unwrap();
        std::os::unix::fs::symlink("g", root.join("link")).unwrap();
        let dst = Layer::open(root).unwrap();
        let pins = Pins::new(&["a/**".into()]).unwrap();
        let mut last = HashMap::new();
        last.insert(PathBuf::from("g"), 42);
        let s = scan(&dst, &pins, &last);
        let mut got: Vec<_> = s
            .entries
            .iter()
            .map(|(p, e)| (p.clone(), e.class))
            .collect();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            got,
            vec![
                ("a/b/f".into(), Class::Pinned),
                ("g".into(), Class::Local),
                ("g2".into(), Class::Local)
            ]
        );
        let total: u64 = s.entries.iter().map(|(_, e)| e.bytes).sum();
        assert!((12288..=16384).contains(&total), "{total}");
        let g = s.entries.iter().find(|(p, _)| p == Path::new("g")).unwrap();
        assert_eq!(g.1.stamp, 42);
        assert!(s.pinned_dirs.is_empty());
    }
}
