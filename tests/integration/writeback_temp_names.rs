//! Writeback temp names on src (`.cachefs-tmp.wb.<run>.<seq>.<n>`): unique per daemon
//! start, so machines whose dst was cloned from one dst (same journal, same seq
//! numbers) never write the same temp name into a shared bucket; and the temp file of
//! an upload cut short by a crash is still removed by the next run on this machine.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;

const TEMP: &str = ".cachefs-tmp.";

/// Names created in a directory, seen with inotify (the temp files live only for the
/// moment of an upload).
struct Created {
    fd: i32,
}

impl Created {
    fn watch(dir: &Path) -> Created {
        // SAFETY: plain syscalls; the path is a valid NUL-terminated string that
        // outlives the call.
        unsafe {
            let fd = libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC);
            assert!(fd >= 0, "inotify_init1");
            let p = CString::new(dir.as_os_str().as_bytes()).unwrap();
            let wd = libc::inotify_add_watch(fd, p.as_ptr(), libc::IN_CREATE);
            assert!(wd >= 0, "inotify_add_watch");
            Created { fd }
        }
    }

    /// The names created since the last call.
    fn names(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: `buf` is a valid writable buffer of its length.
            let n = unsafe { libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return out;
            }
            let mut i = 0usize;
            while i < n as usize {
                // struct inotify_event: wd i32, mask u32, cookie u32, len u32, name[len].
                let len = u32::from_ne_bytes(buf[i + 12..i + 16].try_into().unwrap()) as usize;
                let name = &buf[i + 16..i + 16 + len];
                let name = name.split(|&b| b == 0).next().unwrap();
                out.push(String::from_utf8_lossy(name).into_owned());
                i += 16 + len;
            }
        }
    }
}

impl Drop for Created {
    fn drop(&mut self) {
        // SAFETY: our own descriptor, closed once.
        unsafe { libc::close(self.fd) };
    }
}

/// The `<run>` of a temp name (`.cachefs-tmp.wb.<run>.<seq>.<n>` or
/// `.cachefs-tmp.probe.<run>.<random>`).
fn run_of(name: &str) -> Option<String> {
    let rest = name.strip_prefix(TEMP)?;
    let rest = rest
        .strip_prefix("wb.")
        .or_else(|| rest.strip_prefix("probe."))?;
    Some(rest.split('.').next()?.to_string())
}

fn copy_tree(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", from.display()))
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

fn wait_for(what: &str, limit: Duration, done: impl Fn() -> bool) {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < limit, "{what} not reached in {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn daemons_started_from_copies_of_one_dst_use_different_temp_names() {
    if !can_mount("daemons_started_from_copies_of_one_dst_use_different_temp_names") {
        return;
    }
    // One dst that has run with -w (its state, journal and run list exist).
    let m = Mounted::with_dirs(tempdir(), tempdir(), &["-w"]);
    std::fs::write(m.mnt_path("first"), b"1").unwrap();
    wait_drained(&m, Duration::from_secs(20));
    let (src0, dst0) = (m.src.path().to_path_buf(), m.dst.path().to_path_buf());
    // The ids dst holds (the run list; `instance` of the older format).
    let state = dst0.join(".cachefs-state/writeback");
    let original: Vec<String> = std::fs::read_to_string(state.join("runs"))
        .or_else(|_| std::fs::read_to_string(state.join("instance")))
        .unwrap()
        .lines()
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect();
    // Two machines cloned from it, each with its own copy of the bucket.
    let clones: Vec<(TempDir, TempDir)> = (0..2)
        .map(|_| {
            let (s, d) = (tempdir(), tempdir());
            copy_tree(&src0, s.path());
            copy_tree(&dst0, d.path());
            (s, d)
        })
        .collect();
    m.stop();

    let mut runs = Vec::new();
    let mut names = Vec::new();
    for (s, d) in clones {
        let watch = Created::watch(s.path());
        let c = Mounted::with_dirs(s, d, &["-w"]);
        std::fs::write(c.mnt_path("new.txt"), b"from a clone").unwrap();
        wait_drained(&c, Duration::from_secs(20));
        assert_eq!(
            std::fs::read(c.src_path("new.txt")).unwrap(),
            b"from a clone"
        );
        let temps: Vec<String> = watch
            .names()
            .into_iter()
            .filter(|n| n.starts_with(TEMP))
            .collect();
        let wb: Vec<&String> = temps.iter().filter(|n| n.contains(".wb.")).collect();
        assert!(!wb.is_empty(), "no upload temp file seen: {temps:?}");
        let these: BTreeSet<String> = temps.iter().filter_map(|n| run_of(n)).collect();
        assert_eq!(these.len(), 1, "one run id per daemon start: {temps:?}");
        runs.push(these.into_iter().next().unwrap());
        names.extend(wb.into_iter().cloned());
        c.stop();
    }
    let unique: BTreeSet<&String> = names.iter().collect();
    assert_eq!(
        unique.len(),
        names.len(),
        "a temp name used twice: {names:?}"
    );
    assert_ne!(runs[0], runs[1], "two clones share a temp name run id");
    for run in &runs {
        assert_eq!(run.len(), 26, "128 bits in base32: {run}");
        assert!(!original.contains(run), "a run id taken from dst: {run}");
    }
}

/// Pending `R` seqs of a dst's journal (`R` lines without a `D`).
fn pending_seqs(dst: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(dst.join(".cachefs-state/writeback/journal")).unwrap();
    let mut recorded = BTreeSet::new();
    let mut done = BTreeSet::new();
    for line in text.lines().skip(1) {
        let mut f = line.split(' ').skip(1);
        match (f.next(), f.next().and_then(|s| s.parse::<u64>().ok())) {
            (Some("R"), Some(seq)) => {
                recorded.insert(seq);
            }
            (Some("D"), Some(seq)) => {
                done.insert(seq);
            }
            _ => {}
        }
    }
    recorded.difference(&done).copied().collect()
}

#[test]
fn a_crashed_runs_temp_files_are_reclaimed_by_the_next_run() {
    if !can_mount("a_crashed_runs_temp_files_are_reclaimed_by_the_next_run") {
        return;
    }
    // Ops journaled but not replayed (a long --start-delay), then a crash.
    let mut m = Mounted::with_dirs(tempdir(), tempdir(), &["-w", "--start-delay", "3600"]);
    std::fs::write(m.mnt_path("f.txt"), b"content").unwrap();
    let runs_file = m.dst_path(".cachefs-state/writeback/runs");
    let crashed_run = std::fs::read_to_string(&runs_file)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .to_string();
    m.kill9();
    let pending = pending_seqs(m.dst.path());
    assert!(!pending.is_empty(), "nothing pending");
    // What the crashed run's uploads left in src (names as it would have made them),
    // and a temp file of another machine's run, which must stay.
    let mut ours = Vec::new();
    for seq in &pending {
        let name = format!("{TEMP}wb.{crashed_run}.{seq}.0");
        std::fs::write(m.src_path(&name), b"partial upload").unwrap();
        ours.push(name);
    }
    let theirs = format!("{TEMP}wb.someothermachinesrunid000.{}.0", pending[0]);
    std::fs::write(m.src_path(&theirs), b"another machine's upload").unwrap();

    m.restart(&["-w"]);
    wait_for("f.txt uploaded", Duration::from_secs(20), || {
        std::fs::read(m.src_path("f.txt")).is_ok_and(|d| d == b"content")
    });
    wait_drained(&m, Duration::from_secs(20));
    for name in &ours {
        assert!(
            !m.src_path(name).exists(),
            "{name} left behind; src has {:?}",
            std::fs::read_dir(m.src.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect::<Vec<_>>()
        );
    }
    assert!(
        m.src_path(&theirs).exists(),
        "another machine's temp file removed"
    );
    m.stop();
}
