//! The control channel of a running daemon (issue 16), on real mounts: callers other
//! than root and the mount's owner are refused (both locks: the socket's mode and the
//! daemon's SO_PEERCRED check); a runtime `--cache-size` reduction evicts down to the
//! new budget with no remount; `--revalidate` and `--max-dirty` change at runtime;
//! per-path state; retry of failed writeback now; revalidate now; pin; `cachefs
//! warmup` (progress lines, ENOSPC for what does not fit, exit status, `--evict`);
//! `cachefs status --watch`.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::common::*;

const MIB: u64 = 1 << 20;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `cachefs ARGS...` (as root).
fn cachefs(args: &[&dyn AsRef<OsStr>]) -> Output {
    let mut cmd = Command::new(cachefs_bin());
    for a in args {
        cmd.arg(a);
    }
    cmd.stdin(Stdio::null()).output().unwrap()
}

/// `cachefs ctl DST ARGS...`, waiting for the socket first (the daemon opens it
/// right after the mount answers).
fn ctl(dst: &Path, args: &[&str]) -> Output {
    let sock = dst.join(".cachefs-state/control.sock");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "no control socket at {sock:?}");
        sleep(Duration::from_millis(20));
    }
    let mut all: Vec<&dyn AsRef<OsStr>> = vec![&"ctl", &dst];
    for a in args {
        all.push(a);
    }
    cachefs(&all)
}

/// `ctl`, asserting success; its stdout.
fn ctl_ok(dst: &Path, args: &[&str]) -> String {
    let out = ctl(dst, args);
    assert!(
        out.status.success(),
        "cachefs ctl {args:?}: {}\n{}",
        out.status,
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// The state words `cachefs ctl DST state PATH` prints for one path.
fn state_of(dst: &Path, rel: &str) -> String {
    let out = ctl_ok(dst, &["state", rel]);
    let line = out.lines().next().unwrap_or("").to_string();
    line.split_once('\t')
        .map_or(String::new(), |(_, w)| w.to_string())
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(50));
    }
}

fn src_with(n: u64, len: u64) -> TempDir {
    let src = tempdir();
    for i in 0..n {
        write_file(src.path(), &format!("f{i}"), content(i, len));
    }
    src
}

#[test]
fn other_users_are_refused() {
    if !can_mount("other_users_are_refused") {
        return;
    }
    let m = Mounted::start(&[]);
    let dst = m.dst.path().to_path_buf();
    ctl_ok(&dst, &["info"]);
    let as_nobody = |args: &[&str]| {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            cachefs_bin(),
        ])
        .arg("ctl")
        .arg(&dst)
        .args(args)
        .current_dir("/")
        .stdin(Stdio::null());
        cmd.output().unwrap()
    };
    // The socket's folders and mode keep another user out...
    let out = as_nobody(&["info"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("permission denied"), "{err}");
    assert!(
        err.contains("only root or the user the daemon runs as"),
        "{err}"
    );
    // ...and with them opened up, the daemon itself refuses the caller (SO_PEERCRED).
    let state = dst.join(".cachefs-state");
    for (p, mode) in [
        (dst.as_path(), 0o755),
        (state.as_path(), 0o755),
        (&state.join("control.sock"), 0o666),
    ] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    for args in [&["info"][..], &["set", "cache-size", "1M"], &["retry"]] {
        let out = as_nobody(args);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
        let err = text(&out.stderr);
        assert!(
            err.contains("uid 65534 is neither root nor the mount's owner (uid 0)"),
            "{err}"
        );
    }
    m.wait_for_log(
        "control: refused a caller with uid 65534",
        Duration::from_secs(5),
    );
    // Root still may.
    assert!(ctl_ok(&dst, &["info"]).contains("mountpoint:"));
    m.stop();
}

/// The control channel listens before the mount appears (and before systemd hears
/// READY=1): `cachefs ctl` run as soon as the mount is there reaches the daemon. It
/// used to be opened after the mount was announced.
#[test]
fn the_control_channel_listens_before_the_mount_appears() {
    if !can_mount("the_control_channel_listens_before_the_mount_appears") {
        return;
    }
    let m = Mounted::start(&["-d"]);
    let log = m.stderr();
    let listening = log
        .find("control channel at")
        .expect("the control channel opened");
    let mounted = log.find("cachefs mounted").expect("the mount was logged");
    assert!(
        listening < mounted,
        "the control channel opened after the mount was announced:\n{log}"
    );
    assert!(ctl_ok(m.dst.path(), &["info"]).contains("mountpoint:"));
    m.stop();
}

/// SIGTERM ends a daemon whose control socket file is gone (removed, or dst deleted
/// under it): stopping the control channel woke its accept by connecting to that path,
/// which failed, and the daemon then waited forever at shutdown.
#[test]
fn sigterm_ends_the_daemon_when_its_control_socket_file_is_gone() {
    if !can_mount("sigterm_ends_the_daemon_when_its_control_socket_file_is_gone") {
        return;
    }
    let mut m = Mounted::start(&[]);
    let sock = m.dst.path().join(".cachefs-state/control.sock");
    assert!(ctl_ok(m.dst.path(), &["info"]).contains("mountpoint:"));
    std::fs::remove_file(&sock).unwrap();
    m.signal(libc::SIGTERM);
    let st = m.wait_exit(Duration::from_secs(10));
    assert!(st.success(), "{st:?}");
    assert!(!is_fuse_mounted(m.mountpoint()));
}

#[test]
fn a_smaller_cache_size_at_runtime_evicts_down_to_it() {
    if !can_mount("a_smaller_cache_size_at_runtime_evicts_down_to_it") {
        return;
    }
    let m = Mounted::with_dirs(src_with(8, MIB), tempdir(), &["--cache-size", "20M"]);
    let dst = m.dst.path().to_path_buf();
    for i in 0..8 {
        assert_eq!(
            std::fs::read(m.mnt_path(&format!("f{i}"))).unwrap(),
            content(i, MIB)
        );
    }
    assert!(dst_usage(&dst) >= 8 * MIB, "{}", dst_usage(&dst));
    assert!(ctl_ok(&dst, &["info"]).contains("cache-size:   20M"));
    let out = ctl_ok(&dst, &["set", "cache-size", "3M"]);
    assert!(out.contains("cache-size is now 3M"), "{out}");
    wait_until(
        "dst within the new 3M budget",
        Duration::from_secs(10),
        || dst_usage(&dst) <= 3 * MIB,
    );
    assert!(ctl_ok(&dst, &["info"]).contains("cache-size:   3M"));
    // The mount never went away; evicted files come back from src.
    for i in 0..8 {
        assert_eq!(
            std::fs::read(m.mnt_path(&format!("f{i}"))).unwrap(),
            content(i, MIB)
        );
    }
    assert!(dst_usage(&dst) <= 3 * MIB, "{}", dst_usage(&dst));
    // Bad values are refused before reaching the daemon (exit 2), and without a budget
    // there is nothing to change.
    assert_eq!(
        ctl(&dst, &["set", "cache-size", "lots"]).status.code(),
        Some(2)
    );
    m.stop();
    let m = Mounted::start(&[]);
    let out = ctl(m.dst.path(), &["set", "cache-size", "3M"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no cache budget"),
        "{}",
        text(&out.stderr)
    );
    m.stop();
}

#[test]
fn revalidate_now_and_at_runtime() {
    if !can_mount("revalidate_now_and_at_runtime") {
        return;
    }
    let src = dir_with(&[("a", b"one"), ("b", b"one")]);
    let m = Mounted::with_dirs(src, tempdir(), &["--revalidate", "1h"]);
    let dst = m.dst.path().to_path_buf();
    assert_eq!(std::fs::read(m.mnt_path("a")).unwrap(), b"one");
    assert_eq!(std::fs::read(m.mnt_path("b")).unwrap(), b"one");
    std::fs::write(m.src_path("a"), b"two!").unwrap();
    std::fs::write(m.src_path("b"), b"two!").unwrap();
    sleep(Duration::from_millis(1200)); // the kernel's attribute cache expires
    // --revalidate 1h: the cached copies are served.
    assert_eq!(std::fs::read(m.mnt_path("a")).unwrap(), b"one");
    // Revalidate one path now.
    ctl_ok(&dst, &["revalidate", "/a"]);
    assert_eq!(std::fs::read(m.mnt_path("a")).unwrap(), b"two!");
    assert_eq!(std::fs::read(m.mnt_path("b")).unwrap(), b"one");
    // A shorter --revalidate at runtime reaches b too.
    ctl_ok(&dst, &["set", "revalidate", "200ms"]);
    assert!(ctl_ok(&dst, &["info"]).contains("revalidate:   0.2s"));
    sleep(Duration::from_millis(1200));
    assert_eq!(std::fs::read(m.mnt_path("b")).unwrap(), b"two!");
    m.stop();
}

#[test]
fn per_path_state_and_pins() {
    if !can_mount("per_path_state_and_pins") {
        return;
    }
    let src = tempdir();
    write_file(src.path(), "small", content(1, 100_000));
    write_file(src.path(), "big", content(2, 4 * MIB));
    write_file(src.path(), "other", content(3, 1000));
    write_file(src.path(), "dir/x", content(4, 1000));
    write_file(src.path(), "deep/er/big2", content(5, 2 * MIB));
    let m = Mounted::with_dirs(
        src,
        tempdir(),
        &[
            "-w",
            "--start-delay",
            "1h",
            "--cache-size",
            "100M",
            "--lazy-threshold",
            "1M",
            "--block-size",
            "64K",
        ],
    );
    let dst = m.dst.path().to_path_buf();
    std::fs::read(m.mnt_path("small")).unwrap();
    // One block of the big file: a partial file.
    let mut f = std::fs::File::open(m.mnt_path("big")).unwrap();
    let mut buf = vec![0u8; 65536];
    f.read_exact(&mut buf).unwrap();
    drop(f);
    let mut f = std::fs::File::open(m.mnt_path("deep/er/big2")).unwrap();
    f.read_exact(&mut buf).unwrap();
    drop(f);
    std::fs::write(m.mnt_path("new"), b"local").unwrap();

    assert_eq!(state_of(&dst, "small"), "cached");
    let big = state_of(&dst, "big");
    assert!(big.starts_with("partial "), "{big}");
    let pct: u64 = big["partial ".len()..]
        .trim_end_matches('%')
        .parse()
        .unwrap();
    assert!(pct < 100, "{big}");
    assert_eq!(state_of(&dst, "new"), "dirty, pending upload");
    assert_eq!(state_of(&dst, "other"), "not cached");
    // A path through the mount works as well as a mount-relative one.
    let through = m.mnt_path("small");
    assert_eq!(state_of(&dst, through.to_str().unwrap()), "cached");

    // Pin a directory: its files are fetched ahead and reported pinned.
    let out = ctl_ok(&dst, &["pin", "dir"]);
    assert!(out.contains("/dir: pinned"), "{out}");
    wait_until("dir/x prefetched", Duration::from_secs(10), || {
        state_of(&dst, "dir/x") == "cached, pinned"
    });
    // Evicting a pinned file, a dirty one and a clean one.
    let out = ctl_ok(&dst, &["evict", "dir/x", "new", "small"]);
    assert!(out.contains("evicted 1 files"), "{out}");
    assert!(out.contains("kept /dir/x: pinned"), "{out}");
    assert!(out.contains("kept /new: dirty"), "{out}");
    assert_eq!(state_of(&dst, "small"), "not cached");
    ctl_ok(&dst, &["unpin", "dir"]);
    assert_eq!(state_of(&dst, "dir/x"), "cached");
    // A recursive listing shows partial files too (they live in the state folder),
    // also below a directory only src has.
    let all = ctl_ok(&dst, &["state", "--recursive", "/"]);
    assert!(all.contains("/big\tpartial "), "{all}");
    assert!(all.contains("/deep/er/big2\tpartial "), "{all}");
    // A symlink in dst is reported, never followed.
    std::os::unix::fs::symlink("/etc", m.mnt_path("ln")).unwrap();
    let out = ctl_ok(&dst, &["state", "--recursive", "ln"]);
    assert_eq!(out.lines().count(), 1, "{out}");
    // JSON for scripts.
    let json = ctl_ok(&dst, &["--json", "state", "--recursive", "dir"]);
    assert!(json.contains("\"path\":\"dir/x\""), "{json}");
    m.stop();
}

/// A number in `cachefs ctl DST stats`.
fn stat(dst: &Path, key: &str) -> u64 {
    let json = ctl_ok(dst, &["stats"]);
    json_u64(&json, key).unwrap_or_else(|| panic!("no {key} in {json}"))
}

#[test]
fn failed_writeback_is_retried_now() {
    if !can_mount("failed_writeback_is_retried_now") {
        return;
    }
    let src = tempdir();
    mkdirs(src.path(), "locked");
    let Some(guard) = Immutable::set(&src.path().join("locked")) else {
        eprintln!("SKIP: chattr +i unavailable here");
        return;
    };
    let m = Mounted::with_dirs(src, tempdir(), &["-w", "--retries", "1"]);
    let dst = m.dst.path().to_path_buf();
    std::fs::write(m.mnt_path("locked/x"), b"data").unwrap();
    wait_until("the op parked as failed", Duration::from_secs(10), || {
        stat(&dst, "queue_failed") == 1
    });
    drop(guard);
    // Parked ops are retried 5 s after they fail, doubling; a retry asked for now
    // lands well before that.
    let t = Instant::now();
    let out = ctl_ok(&dst, &["retry"]);
    assert!(out.contains("retrying 1 failed writeback ops now"), "{out}");
    wait_until("the queue drained", Duration::from_secs(10), || {
        stat(&dst, "queue_pending") == 0
    });
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(std::fs::read(m.src_path("locked/x")).unwrap(), b"data");
    assert!(stat(&dst, "uploaded_bytes") >= 4);
    m.stop();
}

#[test]
fn max_dirty_changes_at_runtime() {
    if !can_mount("max_dirty_changes_at_runtime") {
        return;
    }
    let m = Mounted::start(&["-w", "--start-delay", "1h", "--max-dirty", "100M"]);
    let dst = m.dst.path().to_path_buf();
    std::fs::write(m.mnt_path("a"), content(1, 2 * MIB)).unwrap();
    std::fs::write(m.mnt_path("b"), content(2, 1000)).unwrap();
    assert!(!m.stderr().contains("over --max-dirty"), "{}", m.stderr());
    let out = ctl_ok(&dst, &["set", "max-dirty", "1M"]);
    assert!(out.contains("max-dirty is now 1M"), "{out}");
    // The next writer waits for the queue to drain below the new limit (the start
    // delay is waived for it), and then gets in.
    std::fs::write(m.mnt_path("c"), b"after").unwrap();
    m.wait_for_log("over --max-dirty 1048576", Duration::from_secs(5));
    assert_eq!(std::fs::read(m.src_path("a")).unwrap(), content(1, 2 * MIB));
    assert!(ctl_ok(&dst, &["info"]).contains("max-dirty:    1M"));
    m.stop();
}

#[test]
fn warmup_fetches_reports_and_evicts() {
    if !can_mount("warmup_fetches_reports_and_evicts") {
        return;
    }
    let src = src_with(3, MIB);
    write_file(src.path(), "dir/y", content(7, 300_000));
    write_file(src.path(), "huge", content(9, 6 * MIB));
    let m = Mounted::with_dirs(
        src,
        tempdir(),
        // The start delay keeps a file written here dirty for the whole test.
        &[
            "-w",
            "--start-delay",
            "1h",
            "--cache-size",
            "5M",
            "--lazy-threshold",
            "0",
        ],
    );
    let dst = m.dst.path().to_path_buf();
    let (f0, f1, dir) = (m.mnt_path("f0"), m.mnt_path("f1"), m.mnt_path("dir"));

    // A directory needs --recursive.
    let out = cachefs(&[&"warmup", &dir]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("--recursive"));
    // Paths outside a cachefs mount are refused.
    let out = cachefs(&[&"warmup", &m.src_path("f0")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("not inside a cachefs mount"));

    let out = cachefs(&[&"warmup", &f0, &f1, &"--recursive", &dir]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines = text(&out.stdout);
    assert!(
        lines.contains(&format!("fetched {}", f0.display())),
        "{lines}"
    );
    assert!(lines.contains("[3/3 files,"), "{lines}");
    assert!(lines.contains("warmed 3 of 3 files"), "{lines}");
    for p in ["f0", "f1", "dir/y"] {
        assert!(m.dst_path(p).exists(), "{p} not in dst");
    }
    assert!(!m.dst_path("f2").exists());

    // A file larger than the budget fails (ENOSPC) and the exit status says so.
    let out = cachefs(&[&"warmup", &m.mnt_path("huge"), &m.mnt_path("f2")]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let err = text(&out.stderr);
    assert!(err.contains("huge: does not fit in the cache"), "{err}");
    let summary = text(&out.stdout);
    assert!(summary.contains("warmed 1 of 2 files"), "{summary}");
    assert!(summary.trim_end().ends_with("; 1 failed"), "{summary}");
    assert!(m.dst_path("f2").exists());
    // With --dst, a file over the whole budget fails unread: nothing is evicted for it.
    let before = dst_usage(&dst);
    let out = cachefs(&[&"warmup", &"--dst", &dst, &m.mnt_path("huge")]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("is more than --cache-size 5M); not read"),
        "{err}"
    );
    assert_eq!(dst_usage(&dst), before);

    // --evict drops the clean copies, keeps a dirty file.
    std::fs::write(m.mnt_path("dir/mine"), b"local").unwrap();
    let out = cachefs(&[
        &"warmup",
        &"--evict",
        &"--recursive",
        &"--dst",
        &dst,
        &dir,
        &f0,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let o = text(&out.stdout);
    assert!(o.contains("evicted 2 files"), "{o}");
    assert!(
        o.contains("kept /dir/mine: dirty") || o.contains("kept /dir/mine: pending upload"),
        "{o}"
    );
    assert!(!m.dst_path("f0").exists());
    assert!(!m.dst_path("dir/y").exists());
    assert!(m.dst_path("dir/mine").exists());
    assert!(m.dst_path("f1").exists());
    // --evict needs the daemon's dst.
    let out = cachefs(&[&"warmup", &"--evict", &f1]);
    assert_eq!(out.status.code(), Some(2));
    m.stop();
}

#[test]
fn warmup_draws_a_progress_bar_on_a_terminal() {
    if !can_mount("warmup_draws_a_progress_bar_on_a_terminal") {
        return;
    }
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("SKIP: script(1) is missing");
        return;
    }
    let m = Mounted::with_dirs(src_with(4, 2 * MIB), tempdir(), &[]);
    let cmd = format!(
        "{} warmup --recursive {}",
        cachefs_bin(),
        m.mountpoint().display()
    );
    // script(1) gives the command a terminal and copies what it draws.
    let out = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env("COLUMNS", "120")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let screen = text(&out.stdout);
    assert!(out.status.success(), "{screen}");
    assert!(screen.contains("files "), "{screen:?}");
    assert!(screen.contains("ETA"), "{screen:?}");
    assert!(screen.contains("warmed 4 of 4 files"), "{screen:?}");
    // No per-file lines on a terminal: the bar shows progress.
    assert!(!screen.contains("fetched /"), "{screen:?}");
    m.stop();
}

#[test]
fn status_watch_shows_live_rates() {
    if !can_mount("status_watch_shows_live_rates") {
        return;
    }
    let m = Mounted::with_dirs(src_with(40, 256 * 1024), tempdir(), &[]);
    let dst = m.dst.path().to_path_buf();
    ctl_ok(&dst, &["info"]);
    let watch = Command::new(cachefs_bin())
        .args(["status", "--watch", "--interval", "300ms", "--count", "6"])
        .arg(&dst)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    for i in 0..40 {
        std::fs::read(m.mnt_path(&format!("f{i}"))).unwrap();
        sleep(Duration::from_millis(30));
    }
    let out = watch.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let o = text(&out.stdout);
    let lines: Vec<&str> = o.lines().collect();
    assert_eq!(lines.len(), 7, "{o}");
    assert!(
        lines[0].starts_with("time      hits/s  misses/s  fetched/s"),
        "{o}"
    );
    // Some interval saw the misses (copy-ups) and the bytes fetched.
    let busy = lines[1..].iter().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f[2].parse::<f64>().unwrap() > 0.0 && f[3] != "0/s"
    });
    assert!(busy, "{o}");
    assert!(lines[1..].iter().all(|l| l.ends_with("online")), "{o}");
    // Without a daemon: a clear error.
    m.stop();
    let out = cachefs(&[&"status", &dst, &"--watch", &"--count", &"1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no running cachefs answers"));
}

/// A file uploaded while a writer still held it open stays dirty until an upload made
/// with no writer open says src has its bytes; closing the writer with nothing new to
/// report must queue that upload, or the copy stays "dirty" for good (never evicted,
/// shown as changed here) although src holds the same bytes.
#[test]
fn a_file_uploaded_while_open_for_writing_is_clean_after_its_close() {
    if !can_mount("a_file_uploaded_while_open_for_writing_is_clean_after_its_close") {
        return;
    }
    for extra in [&[][..], &["--no-passthrough"][..]] {
        let mut args = vec!["-w"];
        args.extend_from_slice(extra);
        let m = Mounted::with_dirs(tempdir(), tempdir(), &args);
        let dst = m.dst.path().to_path_buf();
        let mut f = std::fs::File::create(m.mnt_path("f")).unwrap();
        f.write_all(b"all the bytes").unwrap();
        // fsync journals the write; the upload runs while the file is still open.
        f.sync_all().unwrap();
        wb_wait_status(&dst, Duration::from_secs(20), "drained", |s| {
            s.pending_ops == 0
        });
        assert_eq!(std::fs::read(m.src_path("f")).unwrap(), b"all the bytes");
        drop(f);
        wb_wait_status(&dst, Duration::from_secs(20), "drained", |s| {
            s.pending_ops == 0
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let st = state_of(&dst, "f");
            if !st.contains("dirty") {
                assert!(st.contains("cached"), "{extra:?}: {st}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{extra:?}: f is still `{st}` after its close, with src holding its bytes"
            );
            sleep(Duration::from_millis(100));
        }
        m.stop();
    }
}

/// A chmod or an xattr change of a clean cached file is an attribute change: once it
/// is on src (which keeps modes and xattrs here), the copy is clean again (it stayed
/// "dirty" for good, never evicted).
#[test]
fn an_attribute_change_leaves_the_copy_clean_once_on_src() {
    if !can_mount("an_attribute_change_leaves_the_copy_clean_once_on_src") {
        return;
    }
    let m = Mounted::with_dirs(dir_with(&[("a", b"a"), ("b", b"b")]), tempdir(), &["-w"]);
    let dst = m.dst.path().to_path_buf();
    for n in ["a", "b"] {
        assert_eq!(std::fs::read(m.mnt_path(n)).unwrap(), n.as_bytes());
        assert_eq!(state_of(&dst, n), "cached");
    }
    std::fs::set_permissions(m.mnt_path("a"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let path = std::ffi::CString::new(m.mnt_path("b").as_os_str().as_bytes()).unwrap();
    // SAFETY: valid C strings and a 1-byte value.
    let r = unsafe {
        libc::setxattr(
            path.as_ptr(),
            c"user.note".as_ptr(),
            b"v".as_ptr().cast(),
            1,
            0,
        )
    };
    assert_eq!(r, 0, "setxattr: {}", std::io::Error::last_os_error());
    wb_wait_status(&dst, Duration::from_secs(20), "drained", |s| {
        s.pending_ops == 0
    });
    assert_eq!(
        std::fs::metadata(m.src_path("a")).unwrap().mode() & 0o777,
        0o600
    );
    assert_eq!(state_of(&dst, "a"), "cached", "after a chmod");
    assert_eq!(state_of(&dst, "b"), "cached", "after setxattr");
    // A content change is still dirty until uploaded, then clean.
    std::fs::write(m.mnt_path("a"), b"new").unwrap();
    wb_wait_status(&dst, Duration::from_secs(20), "drained", |s| {
        s.pending_ops == 0
    });
    assert_eq!(std::fs::read(m.src_path("a")).unwrap(), b"new");
    m.stop();
}
