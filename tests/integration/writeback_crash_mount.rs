//! Writeback (`-w`) on a real FUSE mount across crashes and src failures:
//!
//! - kill -9 of the daemon with a pending queue (`-start-delay 30`), and in the middle
//!   of a drain with a writer running: after a restart, src holds every fsynced file's
//!   exact bytes, and equals the mount's view.
//! - src behind a real bindfs mount that is SIGKILLed while writes go through cachefs:
//!   replays fail, `cachefs status` counts them, and once bindfs is back at the same path
//!   everything converges with no manual step.
//! - `cachefs status DST` with and without a daemon, exit status 1 with failed ops.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::bindfs_support::BindfsSrc;
use crate::common::*;

const DRAIN: Duration = Duration::from_secs(60);

/// Deterministic bytes (splitmix64), different per seed.
fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        v.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Panics unless src equals the mount's view, without internal names in either.
fn assert_converged(mnt: &Path, src: &Path, context: &str) {
    let internal = wb_internal_names(src);
    assert!(
        internal.is_empty(),
        "{context}: internal names in src: {internal:?}"
    );
    let view = wb_tree(mnt);
    let have = wb_tree(src);
    let diffs = wb_tree_diff("mount", &view, "src", &have, true);
    assert!(
        diffs.is_empty(),
        "{context}: src differs from the mount's view:\n{}",
        diffs.join("\n")
    );
}

/// Every (path, fnv, len) must be in `root` with exactly those bytes.
fn assert_files(root: &Path, files: &[(String, u64, usize)], context: &str) {
    let mut bad = Vec::new();
    for (rel, h, len) in files {
        match fs::read(root.join(rel)) {
            Ok(d) if wb_fnv(&d) == *h && d.len() == *len => {}
            Ok(d) => bad.push(format!(
                "{rel}: {} bytes fnv {:016x}, want {len} bytes fnv {h:016x}",
                d.len(),
                wb_fnv(&d)
            )),
            Err(e) => bad.push(format!("{rel}: {e}")),
        }
    }
    assert!(
        bad.is_empty(),
        "{context}: {} of {} fsynced files wrong in {}:\n{}",
        bad.len(),
        files.len(),
        root.display(),
        bad.join("\n")
    );
}

// ----- crash ----------------------------------------------------------------------------------

const SIZES: &[usize] = &[0, 1, 4095, 4096, 65_537, 1 << 20, (3 << 20) + 7, 100];

fn crash_with_pending_queue(extra: &[&str]) {
    let name = format!("crash_with_pending_queue {extra:?}");
    if !can_mount(&name) {
        return;
    }
    let src = dir_with(&[
        ("old/a", &bytes(200_000, 1)),
        ("old/b", b"b"),
        ("old/gone", b"gone"),
    ]);
    let mut args = vec!["-w", "-start-delay", "30"];
    args.extend_from_slice(extra);
    let mut m = Mounted::with_dirs(src, tempdir(), &args);
    fs::create_dir(m.mnt_path("w")).unwrap();
    let mut files = Vec::new();
    for i in 0..24 {
        let rel = if i % 3 == 0 {
            format!("top{i}")
        } else {
            format!("w/f{i}")
        };
        let data = bytes(SIZES[i % SIZES.len()], 100 + i as u64);
        let mut f = File::create(m.mnt_path(&rel)).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
        drop(f);
        files.push((rel, wb_fnv(&data), data.len()));
    }
    // A rewrite of a file only src had.
    let data = bytes(150_000, 7);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(m.mnt_path("old/a"))
        .unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    drop(f);
    files.push(("old/a".into(), wb_fnv(&data), data.len()));
    // Metadata ops last: they stay pending whatever close()/fsync() do.
    fs::create_dir(m.mnt_path("meta")).unwrap();
    std::os::unix::fs::symlink("../old/a", m.mnt_path("meta/link")).unwrap();
    fs::rename(m.mnt_path("old/b"), m.mnt_path("meta/b")).unwrap();
    fs::remove_file(m.mnt_path("old/gone")).unwrap();

    let s = wb_status(m.dst.path());
    assert!(s.pending_ops >= 4, "{name}: queue not pending: {}", s.json);
    m.kill9();
    assert!(
        !m.src_path("meta").exists(),
        "{name}: the queue ran despite -start-delay 30"
    );
    let s = wb_status(m.dst.path());
    assert!(
        s.pending_ops >= 4,
        "{name}: queue lost by kill -9: {}",
        s.json
    );
    let mut args = vec!["-w", "-start-delay", "0"];
    args.extend_from_slice(extra);
    m.restart(&args);
    wb_wait_drained(m.dst.path(), DRAIN);
    assert_files(m.src.path(), &files, &name);
    assert!(!m.src_path("old/gone").exists() && !m.src_path("old/b").exists());
    sleep(Duration::from_millis(1100));
    assert_converged(m.mountpoint(), m.src.path(), &name);
    m.stop();
}

#[test]
fn kill9_with_a_pending_queue_loses_no_fsynced_file() {
    crash_with_pending_queue(&[]);
}

#[test]
fn kill9_with_a_pending_queue_loses_no_fsynced_file_no_passthrough() {
    crash_with_pending_queue(&["--no-passthrough"]);
}

/// A writer creates, fsyncs and closes files (and makes directories) as fast as it can;
/// the daemon is SIGKILLed in the middle of the drain. Every file whose fsync() returned
/// before the kill must reach src after the restart.
fn crash_mid_drain(extra: &[&str]) {
    let name = format!("crash_mid_drain {extra:?}");
    if !can_mount(&name) {
        return;
    }
    let mut args = vec!["-w", "-concurrent", "4"];
    args.extend_from_slice(extra);
    let mut m = Mounted::with_dirs(tempdir(), tempdir(), &args);
    let done: Arc<Mutex<Vec<(String, u64, usize)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let (mnt, d2, s2) = (m.mountpoint().to_path_buf(), done.clone(), stop.clone());
    let writer = std::thread::spawn(move || {
        let sizes = [10_000, 300, 70_000, 2 << 20, 4096, 150_000];
        for i in 0.. {
            if s2.load(Ordering::Relaxed) {
                break;
            }
            let dir = format!("d{}", i / 20);
            if i % 20 == 0 && fs::create_dir(mnt.join(&dir)).is_err() {
                break;
            }
            let rel = format!("{dir}/f{i}");
            let data = bytes(sizes[i % sizes.len()], i as u64);
            let r = (|| {
                let mut f = File::create(mnt.join(&rel))?;
                f.write_all(&data)?;
                f.sync_all()?;
                Ok::<_, std::io::Error>(f)
            })();
            match r {
                Ok(f) => {
                    d2.lock().unwrap().push((rel, wb_fnv(&data), data.len()));
                    drop(f); // close may fail once the daemon is gone: fsync counted
                }
                Err(_) => break, // the daemon is gone
            }
        }
    });
    // Let the queue fill and drain for a while, then crash.
    let t = Instant::now();
    while done.lock().unwrap().len() < 60 && t.elapsed() < Duration::from_secs(20) {
        sleep(Duration::from_millis(20));
    }
    m.kill9();
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let files = done.lock().unwrap().clone();
    assert!(files.len() >= 10, "{name}: the writer did too little");
    let before = wb_status(m.dst.path());
    let in_src = files
        .iter()
        .filter(|(rel, h, _)| fs::read(m.src_path(rel)).is_ok_and(|d| wb_fnv(&d) == *h))
        .count();
    eprintln!(
        "{name}: killed with {} fsynced files, {in_src} already on src; journal: {}",
        files.len(),
        before.json.trim()
    );
    m.restart(&args);
    wb_wait_drained(m.dst.path(), DRAIN);
    assert_files(m.src.path(), &files, &name);
    sleep(Duration::from_millis(1100));
    assert_converged(m.mountpoint(), m.src.path(), &name);
    m.stop();
}

#[test]
fn kill9_mid_drain_loses_no_fsynced_file() {
    crash_mid_drain(&[]);
}

#[test]
fn kill9_mid_drain_loses_no_fsynced_file_no_passthrough() {
    crash_mid_drain(&["--no-passthrough"]);
}

// ----- src failures ---------------------------------------------------------------------------

/// src behind bindfs, a mount over it with quick retries.
fn bindfs_setup(name: &str, extra: &[&str]) -> Option<(BindfsSrc, PathBuf, Mounted)> {
    if !can_mount(name) {
        return None;
    }
    let real = dir_with(&[
        ("cached", b"cached bytes"),
        ("dir/inner", b"inner"),
        ("dir/old", b"old"),
    ]);
    let real_path = real.path().to_path_buf();
    let srcmnt = tempdir();
    let bind = BindfsSrc::start(real, srcmnt.path())
        .expect("bindfs is needed (scripts/install-deps.sh installs it)");
    let mut args = vec!["-w", "-retries", "2", "-retry-delay", "0.2"];
    args.extend_from_slice(extra);
    let m = Mounted::with_dirs(srcmnt, tempdir(), &args);
    // Warm the cache: these are readable while src is down.
    assert_eq!(fs::read(m.mnt_path("cached")).unwrap(), b"cached bytes");
    assert_eq!(fs::read(m.mnt_path("dir/old")).unwrap(), b"old");
    Some((bind, real_path, m))
}

/// Namespace and metadata ops while src is dead (none of them waits for src).
fn metadata_ops_during_outage(m: &Mounted) {
    fs::create_dir(m.mnt_path("newdir")).unwrap();
    fs::create_dir(m.mnt_path("newdir/sub")).unwrap();
    std::os::unix::fs::symlink("../cached", m.mnt_path("newdir/link")).unwrap();
    // (No rename: every rename fails while src is down, see
    // `rename_works_while_src_is_down`.)
    fs::remove_file(m.mnt_path("dir/old")).unwrap();
    fs::set_permissions(
        m.mnt_path("newdir/sub"),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
}

fn wait_failures_then_recover(bind: &mut BindfsSrc, real: &Path, m: &Mounted, name: &str) {
    let s = wb_wait_status(
        m.dst.path(),
        Duration::from_secs(30),
        "counting failed ops",
        |s| s.failed_ops > 0,
    );
    assert_eq!(
        s.code, 1,
        "{name}: status exits 0 with failed ops: {}",
        s.json
    );
    assert!(
        s.json.contains("\"errno\":107") || s.json.contains("onnected"),
        "{name}: failures should be ENOTCONN: {}",
        s.json
    );
    assert!(s.pending_ops >= s.failed_ops, "{}", s.json);
    bind.restart();
    // No manual step: the parked ops are retried on their timer, src is reopened.
    let t = Instant::now();
    wb_wait_drained(m.dst.path(), DRAIN);
    eprintln!("{name}: converged {:?} after bindfs came back", t.elapsed());
    assert_eq!(wb_status(m.dst.path()).code, 0);
    sleep(Duration::from_millis(1100));
    assert_converged(m.mountpoint(), real, name);
}

#[test]
fn src_killed_metadata_ops_are_counted_and_converge() {
    let name = "src_killed_metadata_ops_are_counted_and_converge";
    let Some((mut bind, real, m)) = bindfs_setup(name, &[]) else {
        return;
    };
    bind.kill9();
    metadata_ops_during_outage(&m);
    wait_failures_then_recover(&mut bind, &real, &m, name);
    m.stop();
}

#[test]
fn rename_works_while_src_is_down() {
    let name = "rename_works_while_src_is_down";
    if !can_mount(name) {
        return;
    }
    let real = dir_with(&[("dir/old", b"old"), ("dir/other", b"o")]);
    let real_path = real.path().to_path_buf();
    let srcmnt = tempdir();
    let mut bind = BindfsSrc::start(real, srcmnt.path())
        .expect("bindfs is needed (scripts/install-deps.sh installs it)");
    let m = Mounted::with_dirs(
        srcmnt,
        tempdir(),
        &["-w", "-retries", "2", "-retry-delay", "0.2"],
    );
    assert_eq!(fs::read(m.mnt_path("dir/old")).unwrap(), b"old");
    bind.kill9();
    fs::create_dir(m.mnt_path("newdir")).unwrap();
    fs::create_dir(m.mnt_path("newdir/sub")).unwrap();
    fs::rename(m.mnt_path("newdir/sub"), m.mnt_path("newdir/sub2"))
        .expect("rename of a new (dst-only) directory while src is down");
    fs::rename(m.mnt_path("dir/old"), m.mnt_path("newdir/old"))
        .expect("rename of a cached file while src is down");
    assert_eq!(fs::read(m.mnt_path("newdir/old")).unwrap(), b"old");
    bind.restart();
    wb_wait_drained(m.dst.path(), DRAIN);
    assert!(real_path.join("newdir/old").is_file() && !real_path.join("dir/old").exists());
    assert!(real_path.join("newdir/sub2").is_dir() && !real_path.join("newdir/sub").exists());
    m.stop();
}

/// The full case: file writes too, while src is dead. close() must succeed (the data is
/// in dst and journaled), and everything reaches src once it is back.
fn src_killed_during_writes(extra: &[&str]) {
    let name = format!("src_killed_during_writes {extra:?}");
    let Some((mut bind, real, m)) = bindfs_setup(&name, extra) else {
        return;
    };
    bind.kill9();
    metadata_ops_during_outage(&m);
    let mut files = Vec::new();
    for i in 0..12 {
        let rel = format!("newdir/f{i}");
        let data = bytes(1000 + 40_000 * i, i as u64);
        let r = (|| {
            let mut f = File::create(m.mnt_path(&rel))?;
            f.write_all(&data)?;
            f.sync_all()?;
            drop(f);
            Ok::<_, std::io::Error>(())
        })();
        if let Err(e) = r {
            panic!(
                "{name}: writing {rel} through the mount failed while src is down: {e}\n{}",
                m.stderr()
            );
        }
        files.push((rel, wb_fnv(&data), data.len()));
    }
    fs::write(m.mnt_path("cached"), b"rewritten while src was down").unwrap();
    files.push(("cached".into(), wb_fnv(b"rewritten while src was down"), 28));
    wait_failures_then_recover(&mut bind, &real, &m, &name);
    assert_files(&real, &files, &name);
    m.stop();
}

#[test]
fn src_killed_during_writes_converges_when_it_returns() {
    src_killed_during_writes(&[]);
}

#[test]
fn src_killed_during_writes_converges_when_it_returns_no_passthrough() {
    src_killed_during_writes(&["--no-passthrough"]);
}

// ----- cachefs status -------------------------------------------------------------------------

fn status_text(dst: &Path) -> (i32, String) {
    let out = Command::new(cachefs_bin())
        .arg("status")
        .arg(dst)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn status_with_and_without_a_daemon() {
    let name = "status_with_and_without_a_daemon";
    // A directory that never saw a daemon: empty queue, exit 0.
    let fresh = tempdir();
    let s = wb_status(fresh.path());
    assert_eq!(
        (s.code, s.pending_ops, s.failed_ops),
        (0, 0, 0),
        "{}",
        s.json
    );

    let Some((mut bind, real, mut m)) = bindfs_setup(name, &["-start-delay", "30"]) else {
        return;
    };
    // Pending, nothing failed: exit 0, with the daemon running.
    fs::create_dir(m.mnt_path("p1")).unwrap();
    fs::create_dir(m.mnt_path("p2")).unwrap();
    let s = wb_status(m.dst.path());
    assert_eq!(
        (s.code, s.pending_ops, s.failed_ops),
        (0, 2, 0),
        "{}",
        s.json
    );
    let (code, text) = status_text(m.dst.path());
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("pending ops:    2"), "{text}");
    // Without the daemon (kill -9): the same, read from the journal.
    m.kill9();
    let s = wb_status(m.dst.path());
    assert_eq!(
        (s.code, s.pending_ops, s.failed_ops),
        (0, 2, 0),
        "{}",
        s.json
    );

    // Failures: src dead, the queue replayed at once.
    bind.kill9();
    m.restart(&["-w", "-retries", "2", "-retry-delay", "0.2"]);
    let s = wb_wait_status(m.dst.path(), Duration::from_secs(30), "failed", |s| {
        s.failed_ops >= 2
    });
    assert_eq!(s.code, 1, "{}", s.json);
    assert!(
        s.json.contains("\"op\":\"mkdir\"") && s.json.contains("\"path\":\"/p1\""),
        "{}",
        s.json
    );
    let (code, text) = status_text(m.dst.path());
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("FAILED mkdir /p1"), "{text}");
    // Failed ops survive the daemon: status without it still reports them, exit 1.
    m.kill9();
    let s = wb_status(m.dst.path());
    assert_eq!((s.code, s.failed_ops), (1, 2), "{}", s.json);
    // src back, daemon back: they are retried at start and the status is clean again.
    bind.restart();
    m.restart(&["-w", "-retries", "2", "-retry-delay", "0.2"]);
    wb_wait_drained(m.dst.path(), DRAIN);
    assert_eq!(wb_status(m.dst.path()).code, 0);
    assert!(real.join("p1").is_dir() && real.join("p2").is_dir());
    let dst = m.dst.path().to_path_buf();
    m.signal(libc::SIGTERM);
    assert!(m.wait_exit(STOP_TIMEOUT).success());
    let s = wb_status(&dst);
    assert_eq!(
        (s.code, s.pending_ops, s.failed_ops),
        (0, 0, 0),
        "{}",
        s.json
    );
}

/// A file still open for writing when the daemon is killed: with FUSE passthrough its
/// writes never pass through the daemon, and the Create was already uploaded (empty),
/// so no journal op covers the later bytes. The next start must upload them anyway
/// (the crash test above hit this: a 2 MiB file stayed empty on src for good).
fn killed_with_a_writer_open(extra: &[&str]) {
    let name = format!("killed_with_a_writer_open {extra:?}");
    if !can_mount(&name) {
        return;
    }
    let mut args = vec!["-w"];
    args.extend_from_slice(extra);
    let mut m = Mounted::with_dirs(tempdir(), tempdir(), &args);
    let mut f = File::create(m.mnt_path("open")).unwrap();
    f.write_all(b"first").unwrap();
    // The Create (and whatever the daemon saw) reaches src while the file stays open.
    wb_wait_drained(m.dst.path(), DRAIN);
    let t = Instant::now();
    while !m.src_path("open").exists() && t.elapsed() < DRAIN {
        sleep(Duration::from_millis(20));
    }
    assert!(
        m.src_path("open").exists(),
        "{name}: the create never reached src"
    );
    let data = bytes(1 << 20, 42);
    f.write_all(&data).unwrap();
    m.kill9();
    drop(f);
    let mut want = b"first".to_vec();
    want.extend_from_slice(&data);
    m.restart(&args);
    wb_wait_drained(m.dst.path(), DRAIN);
    assert_eq!(
        fs::read(m.mnt_path("open")).unwrap().len(),
        want.len(),
        "{name}: the mount lost bytes"
    );
    let on_src = fs::read(m.src_path("open")).unwrap();
    assert!(
        on_src == want,
        "{name}: src has {} bytes, want {} (the bytes written before the crash never reached src)",
        on_src.len(),
        want.len()
    );
    m.stop();
}

#[test]
fn killed_with_a_writer_open_uploads_its_bytes_at_restart() {
    killed_with_a_writer_open(&[]);
}

#[test]
fn killed_with_a_writer_open_uploads_its_bytes_at_restart_no_passthrough() {
    killed_with_a_writer_open(&["--no-passthrough"]);
}

/// A crash between a change on dst and its journal record (the daemon changes dst
/// first): the intent file names the paths, and the next start syncs them, so a file
/// created and a file deleted in that window still reach src. The crash is staged by
/// hand: dst as the interrupted create and unlink left it, the intent file as they
/// wrote it.
#[test]
fn changes_a_crash_interrupted_before_their_record_are_synced_at_start() {
    if !can_mount("interrupted changes") {
        return;
    }
    let src = dir_with(&[("gone", b"old"), ("kept", b"kept")]);
    let dst = tempdir();
    fs::write(dst.path().join("made"), b"made before the crash").unwrap();
    fs::write(dst.path().join(".cachefs-wh.gone"), b"").unwrap();
    let journal_dir = dst.path().join(".cachefs-state/writeback");
    fs::create_dir_all(&journal_dir).unwrap();
    let hex = |s: &str| s.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    fs::write(
        journal_dir.join("intents"),
        format!("{}\n{}\n", hex("made"), hex("gone")),
    )
    .unwrap();
    let m = Mounted::with_dirs(src, dst, &["-w"]);
    wb_wait_drained(m.dst.path(), DRAIN);
    let t = Instant::now();
    while (m.src_path("gone").exists() || !m.src_path("made").exists()) && t.elapsed() < DRAIN {
        sleep(Duration::from_millis(20));
    }
    assert_eq!(
        fs::read(m.src_path("made")).unwrap(),
        b"made before the crash"
    );
    assert!(
        !m.src_path("gone").exists(),
        "the interrupted unlink never reached src"
    );
    assert_eq!(fs::read(m.src_path("kept")).unwrap(), b"kept");
    assert_eq!(
        fs::metadata(m.dst.path().join(".cachefs-state/writeback/intents"))
            .unwrap()
            .len(),
        0,
        "the intent file is emptied once its paths are journaled"
    );
    assert_converged(m.mountpoint(), m.src.path(), "interrupted changes");
    m.stop();
}
