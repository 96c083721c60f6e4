//! Shared harness for tests that run the real `cachefs` binary on a real FUSE mount.
//!
//! Guarantees:
//! - [`Mounted::start`] returns only once the mountpoint shows up in /proc/self/mountinfo as
//!   a FUSE mount; if the daemon exits or the mount does not appear within
//!   [`MOUNT_TIMEOUT`], it panics with the daemon's stderr.
//! - No mount outlives a [`Mounted`]: dropping it (also while a test panics) detaches the
//!   mount (`umount -l`) and kills the daemon if it still runs.
//! - Every `Mounted` has its own temporary src, dst and mountpoint, so tests can run in
//!   parallel (threads of one `cargo test` process or nextest's process per test).
//! - Mounting needs root here: tests call [`can_mount`] first and skip (with a printed
//!   reason) when it is false.
//!
//! Typical use:
//! ```ignore
//! use crate::common::*;
//! #[test]
//! fn reads_a_src_file() {
//!     if !can_mount("reads_a_src_file") { return; }
//!     let src = tempdir();
//!     write_file(src.path(), "a/b.txt", "hello");
//!     let m = Mounted::with_dirs(src, tempdir(), &["-w"]);
//!     assert_eq!(std::fs::read_to_string(m.mnt_path("a/b.txt")).unwrap(), "hello");
//!     m.stop();
//! }
//! ```

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

pub use tempfile::TempDir;

/// How long [`Mounted::start`] waits for the mount to appear.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long [`Mounted::stop`] waits for the daemon to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The binary under test.
pub fn cachefs_bin() -> &'static str {
    // `CACHEFS_TEST_BIN` runs the tests against another build (an older commit's, to
    // check that a new test fails there).
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("CACHEFS_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_cachefs").into())
    })
}

/// Whether this process can mount FUSE (root and /dev/fuse). Prints why not, for the log.
pub fn can_mount(test: &str) -> bool {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping {test}: mounting FUSE in tests needs root");
        return false;
    }
    if !Path::new("/dev/fuse").exists() {
        eprintln!("skipping {test}: /dev/fuse is missing (modprobe fuse)");
        return false;
    }
    true
}

/// Whether the process runs as root (for tests that mount other things, e.g. tmpfs).
pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A fresh temporary directory.
pub fn tempdir() -> TempDir {
    tempfile::Builder::new()
        .prefix("cachefs-test.")
        .tempdir()
        .expect("create a temporary directory")
}

/// Write `data` to `root/rel`, creating parent directories.
pub fn write_file(root: &Path, rel: &str, data: impl AsRef<[u8]>) -> PathBuf {
    let p = root.join(rel);
    if let Some(parent) = p.parent() {
        fs::create_dir_all(parent).expect("create parent directories");
    }
    fs::write(&p, data).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
    p
}

/// Create `root/rel` and its parents.
pub fn mkdirs(root: &Path, rel: &str) -> PathBuf {
    let p = root.join(rel);
    fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir -p {}: {e}", p.display()));
    p
}

/// A temporary directory holding `files` (path, content); parents are created.
pub fn dir_with(files: &[(&str, &[u8])]) -> TempDir {
    let d = tempdir();
    for (rel, data) in files {
        write_file(d.path(), rel, data);
    }
    d
}

/// The filesystem type mounted exactly at `path` (canonical), from /proc/self/mountinfo.
pub fn mount_type(path: &Path) -> Option<String> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    // The last mount at a point is the one on top.
    cachefs::mountinfo::mounts(&info)
        .filter(|m| m.point == path)
        .last()
        .map(|m| m.fstype)
}

/// Whether a FUSE filesystem is mounted exactly at `path` (canonical).
pub fn is_fuse_mounted(path: &Path) -> bool {
    mount_type(path).is_some_and(|t| t == "fuse" || t.starts_with("fuse."))
}

/// Detach whatever is mounted at `path` (`umount -l`); true if something was.
pub fn detach(path: &Path) -> bool {
    if mount_type(path).is_none() {
        return false;
    }
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        // Not root: fall back to the setuid helper.
        let _ = Command::new("fusermount3")
            .args(["-u", "-z", "--"])
            .arg(path)
            .stderr(Stdio::null())
            .status();
    }
    true
}

/// Wait for `child` to exit for at most `timeout`.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().expect("wait for the daemon") {
            return Some(st);
        }
        if Instant::now() >= deadline {
            return None;
        }
        sleep(Duration::from_millis(10));
    }
}

/// Send `sig` to `child`.
pub fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: kill with a pid we spawned and have not reaped.
    unsafe { libc::kill(child.id() as libc::pid_t, sig) };
}

/// A running `cachefs` mounted over temporary directories. See the module docs.
pub struct Mounted {
    pub src: TempDir,
    pub dst: TempDir,
    pub mnt: TempDir,
    /// Canonical mountpoint (what mountinfo shows).
    mountpoint: PathBuf,
    child: Option<Child>,
    /// Holds the daemon's stderr log.
    logs: TempDir,
    runs: usize,
}

impl Mounted {
    /// Mount fresh, empty src and dst with `extra_args` (GoCacheFS style, e.g. `["-w"]`).
    pub fn start(extra_args: &[&str]) -> Mounted {
        Mounted::with_dirs(tempdir(), tempdir(), extra_args)
    }

    /// Mount pre-populated `src` and `dst` with `extra_args`.
    pub fn with_dirs(src: TempDir, dst: TempDir, extra_args: &[&str]) -> Mounted {
        let mnt = tempdir();
        let mountpoint = fs::canonicalize(mnt.path()).expect("canonical mountpoint");
        let mut m = Mounted {
            src,
            dst,
            mnt,
            mountpoint,
            child: None,
            logs: tempdir(),
            runs: 0,
        };
        m.spawn(extra_args);
        m
    }

    fn log_path(&self) -> PathBuf {
        self.logs.path().join(format!("stderr.{}", self.runs))
    }

    fn spawn(&mut self, extra_args: &[&str]) {
        assert!(self.child.is_none(), "the daemon is already running");
        self.runs += 1;
        let log = fs::File::create(self.log_path()).expect("create the daemon log");
        let mut cmd = Command::new(cachefs_bin());
        cmd.arg("-src")
            .arg(self.src.path())
            .arg("-dst")
            .arg(self.dst.path())
            .arg("-mountpoint")
            .arg(self.mnt.path())
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .env("RUST_LOG_STYLE", "never");
        let child = cmd.spawn().expect("spawn cachefs");
        self.child = Some(child);
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        loop {
            if is_fuse_mounted(&self.mountpoint) {
                return;
            }
            let child = self.child.as_mut().unwrap();
            if let Some(st) = child.try_wait().expect("wait for the daemon") {
                self.child = None;
                panic!(
                    "cachefs exited ({st}) before mounting {}; its stderr:\n{}",
                    self.mountpoint.display(),
                    self.stderr()
                );
            }
            if Instant::now() >= deadline {
                signal(child, libc::SIGKILL);
                let _ = child.wait();
                self.child = None;
                detach(&self.mountpoint);
                panic!(
                    "{} did not show up as a FUSE mount within {MOUNT_TIMEOUT:?}; cachefs's stderr:\n{}",
                    self.mountpoint.display(),
                    self.stderr()
                );
            }
            sleep(Duration::from_millis(10));
        }
    }

    /// `mountpoint/rel`.
    pub fn mnt_path(&self, rel: &str) -> PathBuf {
        self.mountpoint.join(rel)
    }

    /// `src/rel`.
    pub fn src_path(&self, rel: &str) -> PathBuf {
        self.src.path().join(rel)
    }

    /// `dst/rel`.
    pub fn dst_path(&self, rel: &str) -> PathBuf {
        self.dst.path().join(rel)
    }

    /// The canonical mountpoint.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The daemon's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything the current (or last) daemon wrote to stderr.
    pub fn stderr(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Wait until the daemon's stderr contains `needle` (log lines may trail the mount a
    /// little); panics with the whole log after `timeout`. Returns the log.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.stderr();
            if log.contains(needle) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "cachefs's stderr lacks {needle:?} after {timeout:?}:\n{log}"
            );
            sleep(Duration::from_millis(10));
        }
    }

    /// Send `sig` to the running daemon.
    pub fn signal(&self, sig: libc::c_int) {
        signal(self.child.as_ref().expect("the daemon is running"), sig);
    }

    /// Whether the daemon has not exited yet.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().expect("wait for the daemon").is_none())
    }

    /// Wait for the daemon to exit on its own (e.g. after an external unmount).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("the daemon is running");
        match wait_timeout(child, timeout) {
            Some(st) => {
                self.child = None;
                st
            }
            None => panic!(
                "cachefs did not exit within {timeout:?}; its stderr:\n{}",
                self.stderr()
            ),
        }
    }

    /// SIGTERM, wait, and assert a clean exit (status 0) with the mount gone.
    pub fn stop(mut self) {
        self.signal(libc::SIGTERM);
        let st = self.wait_exit(STOP_TIMEOUT);
        assert!(
            st.success(),
            "cachefs exited with {st} after SIGTERM; its stderr:\n{}",
            self.stderr()
        );
        assert!(
            mount_type(&self.mountpoint).is_none(),
            "{} is still mounted after cachefs exited; its stderr:\n{}",
            self.mountpoint.display(),
            self.stderr()
        );
    }

    /// SIGKILL the daemon (a crash). The mount is left behind, stale (ENOTCONN), until
    /// [`Mounted::restart`] or drop detaches it.
    pub fn kill9(&mut self) {
        let child = self.child.as_mut().expect("the daemon is running");
        signal(child, libc::SIGKILL);
        let _ = child.wait();
        self.child = None;
    }

    /// Start the daemon again on the same directories (after [`Mounted::kill9`] or an
    /// external unmount), detaching a stale mount first.
    pub fn restart(&mut self, extra_args: &[&str]) {
        assert!(self.child.is_none(), "stop or kill the daemon first");
        detach(&self.mountpoint);
        self.spawn(extra_args);
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        // Detach first, so that killing the daemon cannot leave a stale mount behind.
        detach(&self.mountpoint);
        if let Some(mut child) = self.child.take() {
            signal(&child, libc::SIGKILL);
            let _ = child.wait();
        }
        detach(&self.mountpoint);
    }
}

// ----- helpers added for the layered-view tests (layered.rs and friends) ---------------

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

/// The errno of a failed call; panics (with `what`) if it succeeded.
pub fn errno_of<T: std::fmt::Debug>(what: &str, r: std::io::Result<T>) -> i32 {
    match r {
        Ok(v) => panic!("{what}: expected an error, got Ok({v:?})"),
        Err(e) => e
            .raw_os_error()
            .unwrap_or_else(|| panic!("{what}: error without errno: {e}")),
    }
}

/// The sorted entry names of directory `dir` (without "." and "..").
pub fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Deterministic, file-specific content (xorshift, one byte per step).
pub fn content(seed: u64, len: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Deterministic pseudo-random bytes (xorshift64*), different per `seed`.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// setxattr(2) (follows symlinks): the errno on failure.
pub fn setxattr(p: &Path, name: &str, v: &[u8]) -> Result<(), i32> {
    let (c, n) = (cpath(p), std::ffi::CString::new(name).unwrap());
    // SAFETY: valid path, name, value.
    let r = unsafe { libc::setxattr(c.as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
    if r == 0 { Ok(()) } else { Err(last_errno()) }
}

/// getxattr(2) (follows symlinks, values up to 4 KiB): the errno on failure.
pub fn getxattr(p: &Path, name: &str) -> Result<Vec<u8>, i32> {
    let (c, n) = (cpath(p), std::ffi::CString::new(name).unwrap());
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid path, name, buffer.
    let r = unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(last_errno());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

/// The calling thread's errno.
pub fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap()
}

/// A NUL-terminated copy of a path, for libc calls.
pub fn cpath(p: &Path) -> std::ffi::CString {
    std::ffi::CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

/// `user.*` xattrs of `p` (not following a final symlink), sorted by name; `Err` when
/// the names cannot be listed. A value that cannot be read fails the test.
pub fn read_user_xattrs(p: &Path) -> std::io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let c = cpath(p);
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: valid path and buffer.
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    for name in buf[..n as usize].split(|b| *b == 0) {
        if !name.starts_with(b"user.") {
            continue;
        }
        let cn = std::ffi::CString::new(name).unwrap();
        let mut val = vec![0u8; 64 * 1024];
        // SAFETY: valid path, name and buffer.
        let m =
            unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), val.as_mut_ptr().cast(), val.len()) };
        assert!(
            m >= 0,
            "lgetxattr {} {}: {}",
            p.display(),
            String::from_utf8_lossy(name),
            std::io::Error::last_os_error()
        );
        val.truncate(m as usize);
        out.push((name.to_vec(), val));
    }
    out.sort();
    Ok(out)
}

/// `user.*` xattrs of `p` with text names; none where they cannot be listed.
pub fn user_xattrs(p: &Path) -> Vec<(String, Vec<u8>)> {
    read_user_xattrs(p)
        .unwrap_or_default()
        .into_iter()
        .map(|(n, v)| (String::from_utf8_lossy(&n).into_owned(), v))
        .collect()
}

/// What a tree snapshot records for one entry: everything but atime (reads may move it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntrySnap {
    pub ino: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u64,
    pub size: u64,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
    /// Regular files: the bytes. Symlinks: the target.
    pub data: Vec<u8>,
    pub xattrs: Vec<(String, Vec<u8>)>,
}

/// Every entry below `root` (relative path -> attributes and content), not following
/// symlinks. Used to prove that a tree was not touched at all.
pub fn snapshot(root: &Path) -> BTreeMap<PathBuf, EntrySnap> {
    fn walk(root: &Path, rel: &Path, out: &mut BTreeMap<PathBuf, EntrySnap>) {
        let p = root.join(rel);
        let md = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
        let ft = md.file_type();
        let data = if ft.is_file() {
            // O_NOATIME: taking a snapshot must not change what a test asserts on.
            let mut f = std::os::unix::fs::OpenOptionsExt::custom_flags(
                fs::OpenOptions::new().read(true),
                libc::O_NOATIME,
            )
            .open(&p)
            .unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut f, &mut v).unwrap();
            v
        } else if ft.is_symlink() {
            fs::read_link(&p).unwrap().into_os_string().into_vec()
        } else {
            Vec::new()
        };
        out.insert(
            rel.to_path_buf(),
            EntrySnap {
                ino: md.ino(),
                mode: md.mode(),
                uid: md.uid(),
                gid: md.gid(),
                nlink: md.nlink(),
                size: if ft.is_dir() { 0 } else { md.size() },
                mtime: (md.mtime(), md.mtime_nsec()),
                ctime: (md.ctime(), md.ctime_nsec()),
                data,
                xattrs: if ft.is_fifo() {
                    Vec::new()
                } else {
                    user_xattrs(&p)
                },
            },
        );
        if ft.is_dir() {
            for e in fs::read_dir(&p).unwrap() {
                walk(root, &rel.join(e.unwrap().file_name()), out);
            }
        }
    }
    use std::os::unix::ffi::OsStringExt;
    let mut out = BTreeMap::new();
    walk(root, Path::new(""), &mut out);
    out
}

/// Panics with the differing entries if `root` no longer matches `before`.
pub fn assert_unchanged(root: &Path, before: &BTreeMap<PathBuf, EntrySnap>) {
    let now = snapshot(root);
    if &now == before {
        return;
    }
    let mut diffs = Vec::new();
    for (k, v) in before {
        match now.get(k) {
            None => diffs.push(format!("removed: {}", k.display())),
            Some(n) if n != v => diffs.push(format!("changed: {}: {v:?} -> {n:?}", k.display())),
            _ => {}
        }
    }
    for k in now.keys().filter(|k| !before.contains_key(*k)) {
        diffs.push(format!("added: {}", k.display()));
    }
    let mut msg = diffs.join("\n");
    msg.truncate(4000);
    panic!("{} changed:\n{msg}", root.display());
}

/// Every path below `root` whose file name satisfies `pred` (not following symlinks).
pub fn find_names(root: &Path, pred: &dyn Fn(&str) -> bool) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd {
            let e = e.unwrap();
            let p = e.path();
            if pred(&e.file_name().to_string_lossy()) {
                out.push(p.clone());
            }
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

impl Mounted {
    /// A clean stop (SIGTERM, exit 0, mount gone) followed by a start on the same dirs.
    pub fn stop_and_restart(&mut self, extra_args: &[&str]) {
        self.signal(libc::SIGTERM);
        let st = self.wait_exit(STOP_TIMEOUT);
        assert!(
            st.success(),
            "cachefs exited with {st}; stderr:\n{}",
            self.stderr()
        );
        assert!(
            mount_type(&self.mountpoint).is_none(),
            "still mounted after a clean exit"
        );
        self.restart(extra_args);
    }
}

// ----- helpers added for the mounted writeback tests (writeback_*mount.rs) -------------

/// `cachefs status DST --json`, parsed: the exit code and the numeric keys.
#[derive(Debug, Clone)]
pub struct WbStatus {
    pub code: i32,
    pub pending_ops: u64,
    pub failed_ops: u64,
    /// Leftover checks waiting (`--src-settle`).
    pub leftover_checks: u64,
    /// The whole JSON text, for messages.
    pub json: String,
}

fn wb_json_u64(json: &str, key: &str) -> u64 {
    let pat = format!("\"{key}\":");
    let at = json
        .find(&pat)
        .unwrap_or_else(|| panic!("`cachefs status --json` lacks {key:?}: {json}"))
        + pat.len();
    let digits: String = json[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("`cachefs status --json`: {key:?} is not a number: {json}"))
}

/// Run `cachefs status DST --json` (works with or without a daemon).
pub fn wb_status(dst: &Path) -> WbStatus {
    let out = Command::new(cachefs_bin())
        .arg("status")
        .arg(dst)
        .arg("--json")
        .output()
        .expect("run cachefs status");
    let json = String::from_utf8_lossy(&out.stdout).into_owned();
    let code = out.status.code().unwrap_or(-1);
    assert!(
        code == 0 || code == 1,
        "cachefs status {} exited {code}: {json}{}",
        dst.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    // No test reads pending_bytes; it is still checked to be there, a number.
    wb_json_u64(&json, "pending_bytes");
    WbStatus {
        code,
        pending_ops: wb_json_u64(&json, "pending_ops"),
        failed_ops: wb_json_u64(&json, "failed_ops"),
        leftover_checks: wb_json_u64(&json, "leftover_checks"),
        json,
    }
}

/// Poll `cachefs status` until `pred` holds; panics with the last status after `timeout`.
pub fn wb_wait_status(
    dst: &Path,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&WbStatus) -> bool,
) -> WbStatus {
    let deadline = Instant::now() + timeout;
    loop {
        let s = wb_status(dst);
        if pred(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "writeback queue of {}: not {what} after {timeout:?}; last status: {}",
            dst.display(),
            s.json
        );
        sleep(Duration::from_millis(25));
    }
}

/// Wait until the writeback queue of `dst` is empty (no pending, no failed op).
pub fn wb_wait_drained(dst: &Path, timeout: Duration) {
    wb_wait_status(dst, timeout, "drained", |s| {
        s.pending_ops == 0 && s.failed_ops == 0
    });
}

/// What the tree comparison of the writeback tests looks at, per entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WbEntry {
    /// st_mode: type and permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Regular files only (directory times legitimately differ).
    pub mtime: Option<(i64, i64)>,
    /// Regular files: the bytes. Symlinks: the target.
    pub data: Vec<u8>,
    /// `user.*` xattrs (not for symlinks and fifos).
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// `user.*` xattrs of `p` (not following a final symlink), sorted; listing must work.
pub fn wb_user_xattrs(p: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    read_user_xattrs(p).unwrap_or_else(|e| panic!("llistxattr {}: {e}", p.display()))
}

/// Every entry below `root` (relative path -> [`WbEntry`]), not following symlinks, and
/// the hard-link groups (paths of regular files sharing an inode, when more than one).
pub fn wb_tree(
    root: &Path,
) -> (
    std::collections::BTreeMap<PathBuf, WbEntry>,
    Vec<Vec<PathBuf>>,
) {
    use std::os::unix::ffi::OsStringExt;
    use std::os::unix::fs::MetadataExt;
    let mut out = std::collections::BTreeMap::new();
    let mut inodes: std::collections::BTreeMap<u64, Vec<PathBuf>> =
        std::collections::BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let p = root.join(&rel);
        let md = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
        let ft = md.file_type();
        let data = if ft.is_file() {
            fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
        } else if ft.is_symlink() {
            fs::read_link(&p).unwrap().into_os_string().into_vec()
        } else {
            Vec::new()
        };
        if ft.is_file() {
            inodes.entry(md.ino()).or_default().push(rel.clone());
        }
        let xattrs = if ft.is_file() || ft.is_dir() {
            wb_user_xattrs(&p)
        } else {
            Vec::new()
        };
        if ft.is_dir() {
            for e in fs::read_dir(&p).unwrap_or_else(|e| panic!("readdir {}: {e}", p.display())) {
                stack.push(rel.join(e.unwrap().file_name()));
            }
        }
        out.insert(
            rel,
            WbEntry {
                mode: md.mode(),
                uid: md.uid(),
                gid: md.gid(),
                mtime: ft.is_file().then(|| (md.mtime(), md.mtime_nsec())),
                data,
                xattrs,
            },
        );
    }
    let mut groups: Vec<Vec<PathBuf>> = inodes
        .into_values()
        .filter(|g| g.len() > 1)
        .map(|mut g| {
            g.sort();
            g
        })
        .collect();
    groups.sort();
    (out, groups)
}

/// Paths below `root` whose name starts with `.cachefs-` (internal names).
pub fn wb_internal_names(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd {
            let e = e.unwrap();
            if e.file_name().as_bytes().starts_with(b".cachefs-") {
                out.push(e.path());
            }
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }
    out.sort();
    out
}

fn wb_describe(e: &WbEntry) -> String {
    let data = if e.data.len() > 48 {
        format!("{} bytes, fnv {:016x}", e.data.len(), wb_fnv(&e.data))
    } else {
        format!("{:?}", String::from_utf8_lossy(&e.data))
    };
    let xattrs: Vec<String> = e
        .xattrs
        .iter()
        .map(|(n, v)| {
            format!(
                "{}={:016x}/{}",
                String::from_utf8_lossy(n),
                wb_fnv(v),
                v.len()
            )
        })
        .collect();
    format!(
        "mode {:o} uid {} gid {} mtime {:?} data {data} xattrs {xattrs:?}",
        e.mode, e.uid, e.gid, e.mtime
    )
}

/// FNV-1a 64 of `data` (a cheap content fingerprint for messages and crash checks).
pub fn wb_fnv(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The differences between two trees taken with [`wb_tree`] (empty: equal). With
/// `links`, hard-link groups must match too.
pub fn wb_tree_diff(
    a_name: &str,
    a: &(
        std::collections::BTreeMap<PathBuf, WbEntry>,
        Vec<Vec<PathBuf>>,
    ),
    b_name: &str,
    b: &(
        std::collections::BTreeMap<PathBuf, WbEntry>,
        Vec<Vec<PathBuf>>,
    ),
    links: bool,
) -> Vec<String> {
    let mut diffs = Vec::new();
    for (k, v) in &a.0 {
        match b.0.get(k) {
            None => diffs.push(format!(
                "only in {a_name}: /{} ({})",
                k.display(),
                wb_describe(v)
            )),
            Some(w) if w != v => diffs.push(format!(
                "differs: /{}\n    {a_name}: {}\n    {b_name}: {}",
                k.display(),
                wb_describe(v),
                wb_describe(w)
            )),
            _ => {}
        }
    }
    for (k, w) in &b.0 {
        if !a.0.contains_key(k) {
            diffs.push(format!(
                "only in {b_name}: /{} ({})",
                k.display(),
                wb_describe(w)
            ));
        }
    }
    if links && a.1 != b.1 {
        diffs.push(format!(
            "hard links differ: {a_name} {:?} vs {b_name} {:?}",
            a.1, b.1
        ));
    }
    diffs
}

// ----- helpers added for the hostile-input tests (hostile.rs) ---------------------------

/// uid and gid of the local user `name` (e.g. pjdfstest's `tests`), if it exists.
pub fn user_ids(name: &str) -> Option<(u32, u32)> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: valid C string; the returned record is read at once, before any other
    // getpw* call in this thread.
    let pw = unsafe { libc::getpwnam(c.as_ptr()) };
    if pw.is_null() {
        return None;
    }
    // SAFETY: non-null record from getpwnam.
    Some(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
}

/// `program args...` run as `ids` (uid, gid) with no supplementary groups, umask 022
/// (inherited: the harness does not change it), stdin closed.
pub fn run_as(ids: (u32, u32), program: &str, args: &[&dyn AsRef<OsStr>]) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(program);
    for a in args {
        cmd.arg(a);
    }
    // As root, std drops the supplementary groups (setgroups(0)) when uid is set.
    cmd.uid(ids.0)
        .gid(ids.1)
        .current_dir("/")
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {program} as {ids:?}: {e}"))
}

/// Runs the Perl snippet `code` (which sees the paths in @ARGV) as `ids` and returns 0 if
/// it exits 0, else its exit status, which the snippet sets to the errno:
/// `mkdir $ARGV[0] or exit($!+0)`. Perl is used because it is in every base image and
/// reports the exact errno (the shell tools only print a message).
pub fn errno_as(ids: (u32, u32), code: &str, paths: &[&Path]) -> i32 {
    let mut args: Vec<&dyn AsRef<OsStr>> = vec![&"-e", &code];
    for p in paths {
        args.push(p);
    }
    let out = run_as(ids, "/usr/bin/perl", &args);
    assert!(
        out.stderr.is_empty(),
        "perl {code:?} as {ids:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.status
        .code()
        .unwrap_or_else(|| panic!("perl {code:?} killed: {}", out.status))
}

/// `cachefs status DST --json`: (exit code, the JSON line).
pub fn hostile_status(dst: &Path) -> (i32, String) {
    let out = Command::new(cachefs_bin())
        .arg("status")
        .arg(dst)
        .arg("--json")
        .output()
        .expect("run cachefs status");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The number after `"key":` in a flat JSON object (None for null or a missing key).
pub fn json_u64(json: &str, key: &str) -> Option<u64> {
    let at = json.find(&format!("\"{key}\":"))? + key.len() + 3;
    let digits: String = json[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Polls `cachefs status DST --json` until `done(json)`; panics with the last status after
/// `timeout`. Returns (exit code, JSON).
pub fn wait_status(dst: &Path, timeout: Duration, done: impl Fn(&str) -> bool) -> (i32, String) {
    let deadline = Instant::now() + timeout;
    loop {
        let (code, json) = hostile_status(dst);
        if done(&json) {
            return (code, json);
        }
        assert!(
            Instant::now() < deadline,
            "writeback status not reached after {timeout:?}: exit {code}, {json}"
        );
        sleep(Duration::from_millis(50));
    }
}

/// Waits until the writeback queue is empty (pending_ops == 0) and asserts nothing failed.
pub fn wait_drained(m: &Mounted, timeout: Duration) {
    let (code, json) = wait_status(m.dst.path(), timeout, |j| {
        json_u64(j, "pending_ops") == Some(0)
    });
    assert_eq!(
        (code, json_u64(&json, "failed_ops")),
        (0, Some(0)),
        "{json}\ndaemon stderr:\n{}",
        m.stderr()
    );
}

/// `chattr +i` on `p` while alive (removed at drop): writes into `p` fail with EPERM.
/// `None` where the file system or user cannot set it, or it does not bite.
pub struct Immutable(PathBuf);

impl Immutable {
    pub fn set(p: &Path) -> Option<Immutable> {
        let ok = Command::new("chattr")
            .arg("+i")
            .arg(p)
            .status()
            .is_ok_and(|s| s.success());
        // Also check it really bites (not every filesystem or user can do this).
        let bites = ok && fs::write(p.join(".probe"), b"").is_err();
        if ok && !bites {
            let _ = Command::new("chattr").arg("-i").arg(p).status();
        }
        bites.then(|| Immutable(p.to_path_buf()))
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

/// Allocated bytes of the visible regular files under `dir` (not `.cachefs-*`).
pub fn dst_usage(dir: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_name().as_bytes().starts_with(b".cachefs-") {
            continue;
        }
        // Eviction may remove a file between the listing and its stat.
        let md = match e.metadata() {
            Ok(md) => md,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
            Err(err) => panic!("stat {:?}: {err}", e.path()),
        };
        if md.is_dir() {
            total += dst_usage(&e.path());
        } else if md.is_file() {
            total += md.blocks() * 512;
        }
    }
    total
}

/// A small deterministic PRNG (splitmix64) for seeded random tests.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn chance(&mut self, num: usize, den: usize) -> bool {
        self.below(den) < num
    }
    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}
