//! Helpers shared by the `writeback_*` integration tests: temp src/dst trees, a config,
//! waiting for the queue to drain, and a byte-for-byte comparison of src with dst's view.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cachefs::config::Config;
use cachefs::writeback::{Op, Writeback};

pub struct Env {
    pub tmp: tempfile::TempDir,
    pub src: PathBuf,
    pub dst: PathBuf,
}

impl Env {
    pub fn new() -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        let dst = tmp.path().join("dst");
        std::fs::create_dir(&src).unwrap();
        std::fs::create_dir(&dst).unwrap();
        Env { tmp, src, dst }
    }

    pub fn cfg(&self, concurrent: u32, start_delay: Duration) -> Config {
        let mut c = Config::new(
            self.src.clone(),
            self.dst.clone(),
            self.tmp.path().join("mnt"),
        );
        c.writeback = true;
        c.concurrent = concurrent;
        c.start_delay = start_delay;
        c.retries = 3;
        c.retry_delay = Duration::from_millis(20);
        c.log_writeback = true;
        c
    }

    pub fn start(&self, concurrent: u32) -> Arc<Writeback> {
        Writeback::start(&self.cfg(concurrent, Duration::ZERO)).unwrap()
    }

    pub fn d(&self, p: &str) -> PathBuf {
        self.dst.join(p)
    }

    pub fn s(&self, p: &str) -> PathBuf {
        self.src.join(p)
    }

    /// Ops recorded in the journal file and not marked done (`R` lines without a `D`).
    pub fn journal_ops(&self) -> usize {
        let j = self.dst.join(".cachefs-state/writeback/journal");
        let text = std::fs::read_to_string(j).unwrap_or_default();
        let mut live = std::collections::BTreeSet::new();
        for l in text.lines() {
            let f: Vec<&str> = l.split(' ').collect();
            match f.get(1) {
                Some(&"R") => {
                    live.insert(f[2].to_string());
                }
                Some(&"D") => {
                    live.remove(f[2]);
                }
                _ => {}
            }
        }
        live.len()
    }
}

pub fn rec(wb: &Writeback, op: Op) {
    wb.record(op).unwrap();
}

pub fn p(s: &str) -> PathBuf {
    PathBuf::from(s)
}

/// Wait until nothing is pending (panics after `limit`).
pub fn wait_idle(wb: &Writeback, limit: Duration) {
    let t = Instant::now();
    while wb.has_pending(Path::new("")) {
        assert!(t.elapsed() < limit, "writeback did not drain in {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn init_logging() {
    let _ = env_logger::builder().is_test(true).try_init();
}

#[derive(Debug, PartialEq)]
pub struct Node {
    kind: char,
    mode: u32,
    uid: u32,
    gid: u32,
    /// mtime (s, ns) for files and symlinks; directories' mtimes move as children change.
    mtime: Option<(i64, i64)>,
    content: Vec<u8>,
    xattrs: BTreeMap<String, Vec<u8>>,
}

fn xattrs(p: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let mut buf = vec![0u8; 65536];
    // SAFETY: buffer valid for its length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n <= 0 {
        return out;
    }
    for name in buf[..n as usize].split(|b| *b == 0) {
        if !name.starts_with(b"user.") {
            continue;
        }
        let cn = std::ffi::CString::new(name).unwrap();
        let mut v = vec![0u8; 65536];
        // SAFETY: buffer valid for its length.
        let m = unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        if m >= 0 {
            v.truncate(m as usize);
            out.insert(String::from_utf8_lossy(name).into_owned(), v);
        }
    }
    out
}

/// The tree under `root` as the mount would show it from dst alone: reserved names
/// (whiteouts, opaque markers, the state folder, temp files) left out.
pub fn snapshot(root: &Path) -> BTreeMap<PathBuf, Node> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Node>) {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    for n in names {
        if n.as_encoded_bytes().starts_with(b".cachefs-") {
            continue;
        }
        let path = dir.join(&n);
        let m = std::fs::symlink_metadata(&path).unwrap();
        let ft = m.file_type();
        let (kind, content, mtime) = if ft.is_dir() {
            ('d', Vec::new(), None)
        } else if ft.is_symlink() {
            (
                'l',
                std::fs::read_link(&path)
                    .unwrap()
                    .into_os_string()
                    .into_encoded_bytes(),
                Some((m.mtime(), m.mtime_nsec())),
            )
        } else if ft.is_file() {
            (
                'f',
                std::fs::read(&path).unwrap(),
                Some((m.mtime(), m.mtime_nsec())),
            )
        } else {
            ('o', Vec::new(), Some((m.mtime(), m.mtime_nsec())))
        };
        out.insert(
            path.strip_prefix(root).unwrap().to_path_buf(),
            Node {
                kind,
                mode: if kind == 'l' { 0 } else { m.mode() & 0o7777 },
                uid: m.uid(),
                gid: m.gid(),
                mtime,
                content,
                xattrs: if kind == 'l' {
                    BTreeMap::new()
                } else {
                    xattrs(&path)
                },
            },
        );
        if ft.is_dir() {
            walk(root, &path, out);
        }
    }
}

/// Every name anywhere under `root` that cachefs reserves.
pub fn reserved_names(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    fn rec(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let n = e.file_name();
            let b = n.as_encoded_bytes();
            if b.starts_with(b".cachefs-") || b.starts_with(b".__gocachefs_rm__") {
                out.push(e.path());
            }
            if e.file_type().unwrap().is_dir() {
                rec(&e.path(), out);
            }
        }
    }
    rec(root, &mut out);
    out
}

/// src equals dst's view byte for byte, and src holds no internal name.
pub fn assert_converged(env: &Env) {
    let d = snapshot(&env.dst);
    let s = snapshot(&env.src);
    if d != s {
        let keys: std::collections::BTreeSet<_> = d.keys().chain(s.keys()).collect();
        for k in keys {
            if d.get(k) != s.get(k) {
                eprintln!("DIFF {k:?}:\n  dst {:?}\n  src {:?}", d.get(k), s.get(k));
            }
        }
        panic!("src differs from dst");
    }
    assert_eq!(reserved_names(&env.src), Vec::<PathBuf>::new());
}

/// Set a file's mtime (not following symlinks).
pub fn set_mtime(p: &Path, secs: i64, nsec: i64) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let t = [
        libc::timespec {
            tv_sec: secs,
            tv_nsec: nsec,
        },
        libc::timespec {
            tv_sec: secs,
            tv_nsec: nsec,
        },
    ];
    // SAFETY: valid path and times.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            t.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(r, 0);
}

pub fn set_xattr(p: &Path, k: &str, v: &[u8]) -> bool {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let kc = std::ffi::CString::new(k).unwrap();
    // SAFETY: valid pointers.
    unsafe { libc::lsetxattr(c.as_ptr(), kc.as_ptr(), v.as_ptr().cast(), v.len(), 0) == 0 }
}
