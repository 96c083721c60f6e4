//! The command line as users meet it: the real binary, bad input (exit 2, one helpful line,
//! nothing mounted), GoCacheFS-style flags on a real mount, signals and external unmount.

use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::bindfs_support;
use crate::common::*;

/// Run cachefs with `args`; a run that is still going after 10 s was wrongly accepted:
/// kill it, detach whatever it mounted, and fail.
fn run(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    run_cmd(Command::new(cachefs_bin()).args(args))
}

fn run_cmd(cmd: &mut Command) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cachefs");
    if wait_timeout(&mut child, Duration::from_secs(10)).is_none() {
        signal(&child, libc::SIGTERM);
        let out = child.wait_with_output().unwrap();
        panic!(
            "cachefs accepted the command line and kept running; stderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    child.wait_with_output().unwrap()
}

/// Exit status 2, nothing on stdout, exactly one line on stderr containing every `needle`.
fn assert_usage_error(out: &Output, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "exit status; stderr: {stderr}");
    assert!(out.stdout.is_empty(), "stdout: {:?}", out.stdout);
    assert!(
        stderr.ends_with('\n') && stderr.matches('\n').count() == 1,
        "stderr must be exactly one line: {stderr:?}"
    );
    assert!(stderr.starts_with("cachefs: "), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "stderr lacks {n:?}: {stderr}");
    }
    stderr
}

fn assert_not_mounted(mnt: &Path) {
    let mnt = std::fs::canonicalize(mnt).unwrap_or_else(|_| mnt.to_path_buf());
    assert!(
        !is_fuse_mounted(&mnt),
        "{} got mounted by a rejected command line",
        mnt.display()
    );
}

/// Three fresh sibling directories.
struct Dirs {
    src: TempDir,
    dst: TempDir,
    mnt: TempDir,
}

fn dirs() -> Dirs {
    Dirs {
        src: tempdir(),
        dst: tempdir(),
        mnt: tempdir(),
    }
}

fn p(t: &TempDir) -> &Path {
    t.path()
}

#[test]
fn missing_src() {
    let d = dirs();
    let out = run(&[&"-dst", &p(&d.dst), &"-mountpoint", &p(&d.mnt)]);
    assert_usage_error(&out, &["missing -src", "-src DIR"]);
    assert_not_mounted(p(&d.mnt));
}

#[test]
fn missing_dst() {
    let d = dirs();
    let out = run(&[&"-src", &p(&d.src), &"-mountpoint", &p(&d.mnt)]);
    assert_usage_error(&out, &["missing -dst", "-dst DIR"]);
    assert_not_mounted(p(&d.mnt));
}

#[test]
fn missing_mountpoint() {
    let d = dirs();
    let out = run(&[&"-src", &p(&d.src), &"-dst", &p(&d.dst)]);
    assert_usage_error(&out, &["missing -mountpoint", "-mountpoint DIR"]);
}

#[test]
fn no_arguments_at_all() {
    assert_usage_error(&run(&[]), &["missing -src", "--help"]);
}

#[test]
fn src_does_not_exist() {
    let d = dirs();
    let gone = p(&d.src).join("nope");
    let out = run(&[
        &"-src",
        &gone,
        &"-dst",
        &p(&d.dst),
        &"-mountpoint",
        &p(&d.mnt),
    ]);
    assert_usage_error(&out, &["-src", "does not exist", "mkdir -p"]);
    assert_not_mounted(p(&d.mnt));
}

#[test]
fn mountpoint_does_not_exist() {
    let d = dirs();
    let gone = p(&d.mnt).join("nope");
    let out = run(&[
        &"-src",
        &p(&d.src),
        &"-dst",
        &p(&d.dst),
        &"-mountpoint",
        &gone,
    ]);
    assert_usage_error(&out, &["-mountpoint", "does not exist", "mkdir -p"]);
}

#[test]
fn dst_is_not_a_directory() {
    let d = dirs();
    let files = tempdir();
    let file = write_file(p(&files), "file", "x");
    let out = run(&[
        &"-src",
        &p(&d.src),
        &"-dst",
        &file,
        &"-mountpoint",
        &p(&d.mnt),
    ]);
    assert_usage_error(&out, &["-dst", "is not a directory"]);
    assert_not_mounted(p(&d.mnt));
}

#[test]
fn src_equals_dst() {
    let d = dirs();
    let out = run(&[
        &"-src",
        &p(&d.src),
        &"-dst",
        &p(&d.src),
        &"-mountpoint",
        &p(&d.mnt),
    ]);
    assert_usage_error(&out, &["-src and -dst are the same directory", "separate"]);
    assert_not_mounted(p(&d.mnt));
}

#[test]
fn src_equals_dst_through_a_symlink() {
    let d = dirs();
    let links = tempdir();
    let link = p(&links).join("to-src");
    symlink(p(&d.src), &link).unwrap();
    let dotted = p(&d.src).join(".");
    let out = run(&[&"-src", &dotted, &"-dst", &link, &"-mountpoint", &p(&d.mnt)]);
    assert_usage_error(&out, &["-src and -dst are the same directory"]);
    assert_not_mounted(p(&d.mnt));
}

#[test]
fn dst_inside_src() {
    let d = dirs();
    let inner = mkdirs(p(&d.src), "cache");
    let out = run(&[
        &"-src",
        &p(&d.src),
        &"-dst",
        &inner,
        &"-mountpoint",
        &p(&d.mnt),
    ]);
    assert_usage_error(
        &out,
        &["-dst", "is inside -src", "do not contain each other"],
    );
    assert_not_mounted(p(&d.mnt));
}

#[test]
fn mountpoint_inside_dst() {
    let d = dirs();
    let inner = mkdirs(p(&d.dst), "mnt");
    let out = run(&[
        &"-src",
        &p(&d.src),
        &"-dst",
        &p(&d.dst),
        &"-mountpoint",
        &inner,
    ]);
    assert_usage_error(&out, &["-mountpoint", "is inside -dst"]);
    assert_not_mounted(&inner);
}

#[test]
fn src_inside_mountpoint() {
    let d = dirs();
    let inner = mkdirs(p(&d.mnt), "src");
    let out = run(&[
        &"-src",
        &inner,
        &"-dst",
        &p(&d.dst),
        &"-mountpoint",
        &p(&d.mnt),
    ]);
    assert_usage_error(&out, &["-src", "is inside -mountpoint"]);
    assert_not_mounted(p(&d.mnt));
}

#[test]
fn mountpoint_already_mounted() {
    if !is_root() {
        eprintln!("skipping mountpoint_already_mounted: mounting a tmpfs needs root");
        return;
    }
    let d = dirs();
    let mnt = std::fs::canonicalize(p(&d.mnt)).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "cachefs-test-tmpfs"])
        .arg(&mnt)
        .status()
        .expect("run mount");
    assert!(st.success(), "mount -t tmpfs failed");
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            detach(self.0);
        }
    }
    let _guard = Unmount(&mnt);
    let out = run(&[
        &"-src",
        &p(&d.src),
        &"-dst",
        &p(&d.dst),
        &"-mountpoint",
        &mnt,
    ]);
    assert_usage_error(
        &out,
        &["already a mount point (tmpfs)", "umount", "choose another"],
    );
    assert_eq!(mount_type(&mnt).as_deref(), Some("tmpfs"));
}

#[test]
fn stale_fuse_mount_left_by_a_crash() {
    if !can_mount("stale_fuse_mount_left_by_a_crash") {
        return;
    }
    let mut m = Mounted::start(&[]);
    m.kill9();
    // The kernel may answer stat from its attribute cache until the TTL (1 s) runs out.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let err = loop {
        match std::fs::metadata(m.mountpoint()) {
            Err(e) => break e,
            Ok(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50))
            }
            Ok(_) => panic!("the dead mount still answers stat after 5 s"),
        }
    };
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");

    let (src2, dst2) = (tempdir(), tempdir());
    let out = run(&[
        &"-src",
        &p(&src2),
        &"-dst",
        &p(&dst2),
        &"-mountpoint",
        &m.mountpoint(),
    ]);
    let mnt = m.mountpoint().display().to_string();
    assert_usage_error(
        &out,
        &[
            "stale FUSE mount",
            "Transport endpoint is not connected",
            &format!("fusermount3 -u {mnt}"),
            &format!("umount -l {mnt}"),
        ],
    );
    // After the advised cleanup, the same mountpoint works again.
    m.restart(&[]);
    m.stop();
}

#[test]
fn no_permission_to_mount() {
    if !is_root() || !Path::new("/usr/bin/setpriv").exists() {
        eprintln!("skipping no_permission_to_mount: needs root and setpriv to become nobody");
        return;
    }
    let d = dirs();
    for t in [&d.src, &d.dst, &d.mnt] {
        std::fs::set_permissions(
            t.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
    }
    let out = run_cmd(
        Command::new("/usr/bin/setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(cachefs_bin())
            .arg("-src")
            .arg(p(&d.src))
            .arg("-dst")
            .arg(p(&d.dst))
            .arg("-mountpoint")
            .arg(p(&d.mnt))
            .env("PATH", "/nonexistent"),
    );
    assert_usage_error(&out, &["not root", "fusermount3", "apt-get install fuse3"]);
    assert_not_mounted(p(&d.mnt));
}

#[test]
fn unknown_flag() {
    let d = dirs();
    let out = run(&[
        &"-src",
        &p(&d.src),
        &"-dst",
        &p(&d.dst),
        &"-mountpoint",
        &p(&d.mnt),
        &"-no-such-flag",
        &"10G",
    ]);
    assert_usage_error(&out, &["unknown flag '-no-such-flag'", "cachefs --help"]);
    assert_not_mounted(p(&d.mnt));
}

#[test]
fn misspelled_flag_gets_a_suggestion() {
    let out = run(&[&"-retry_delay=3"]);
    assert_usage_error(&out, &["unknown flag", "did you mean -retry-delay?"]);
}

#[test]
fn stray_argument() {
    let d = dirs();
    let out = run(&[&"-src", &p(&d.src), &"-dst", &p(&d.dst), &p(&d.mnt)]);
    assert_usage_error(&out, &["unexpected argument", "cachefs --help"]);
    assert_not_mounted(p(&d.mnt));
}

#[test]
fn bad_numbers() {
    let d = dirs();
    for (flag, value) in [
        ("-retries", "many"),
        ("-retries", "-1"),
        ("-concurrent", "2.5"),
        ("-retry-delay", "3sec"),
        ("-start-delay", "-1"),
        ("--threads", "0"),
        ("--attr-ttl", "inf"),
    ] {
        let out = run(&[
            &"-src",
            &p(&d.src),
            &"-dst",
            &p(&d.dst),
            &"-mountpoint",
            &p(&d.mnt),
            &flag,
            &value,
        ]);
        let name = flag.trim_start_matches('-');
        assert_usage_error(&out, &[name, value, "write e.g."]);
        assert_not_mounted(p(&d.mnt));
    }
}

#[test]
fn flag_without_value() {
    let out = run(&[&"-src"]);
    assert_usage_error(&out, &["-src needs a value"]);
}

#[test]
fn help_lists_every_flag() {
    for h in ["--help", "-help", "-h"] {
        let out = run(&[&h]);
        assert!(out.status.success(), "{h}: {:?}", out.status);
        let text = String::from_utf8_lossy(&out.stdout);
        for flag in [
            "--src",
            "--dst",
            "--mountpoint",
            "-w",
            "--retries",
            "--concurrent",
            "--retry-delay",
            "--start-delay",
            "-d",
            "--log",
            "-o",
            "--threads",
            "--attr-ttl",
            "--no-passthrough",
            "--help",
            "--version",
            "status",
        ] {
            assert!(text.contains(flag), "{h}: help lacks {flag}:\n{text}");
        }
    }
}

#[test]
fn version() {
    for v in ["--version", "-version", "-V"] {
        let out = run(&[&v]);
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("cachefs {}", env!("CARGO_PKG_VERSION"))
        );
    }
}

#[test]
fn status_needs_a_directory() {
    assert_usage_error(&run(&[&"status"]), &["<DST>"]);
}

/// A second daemon on a dst another daemon serves is refused, whatever the modes of
/// the two (with or without -w): exit 2, one line naming the other daemon, nothing
/// mounted, and the first one keeps serving (xfstests generic/732: two views of one
/// dst diverge).
#[test]
fn a_second_daemon_on_the_same_dst_is_refused() {
    if !can_mount("a_second_daemon_on_the_same_dst_is_refused") {
        return;
    }
    let none: &[&str] = &[];
    for (first, second) in [
        (none, none),
        (none, &["-w"]),
        (&["-w"], none),
        (&["-w"], &["-w"]),
    ] {
        let a = Mounted::start(first);
        std::fs::write(a.mnt_path("f"), b"through a").unwrap();
        let (src2, mnt2) = (tempdir(), tempdir());
        let out = run_cmd(
            Command::new(cachefs_bin())
                .arg("-src")
                .arg(p(&src2))
                .arg("-dst")
                .arg(p(&a.dst))
                .arg("-mountpoint")
                .arg(p(&mnt2))
                .args(second),
        );
        let pid = format!("pid {}", a.pid().unwrap());
        let dst = std::fs::canonicalize(a.dst.path()).unwrap();
        let what = format!("first {first:?}, second {second:?}");
        let err = assert_usage_error(
            &out,
            &[
                &format!("-dst {} is in use by another cachefs", dst.display()),
                &pid,
                &a.mountpoint().display().to_string(),
            ],
        );
        eprintln!("{what}: {err}");
        assert_not_mounted(mnt2.path());
        assert_eq!(
            std::fs::read(a.mnt_path("f")).unwrap(),
            b"through a",
            "{what}"
        );
        a.stop();
    }
}

/// A second mount of a served dst with the same src and mode is a second view of the
/// first mount (a bind mount, as for a block device mounted twice: xfstests' generic/732
/// mounts its scratch device so), served by the one daemon; another mode is refused.
#[test]
fn a_second_mount_of_the_same_src_and_mode_is_a_view_of_the_first() {
    if !can_mount("a_second_mount_of_the_same_src_and_mode_is_a_view_of_the_first") || !is_root() {
        return;
    }
    for mode in [&[][..], &["-w"][..], &["-w", "-concurrent", "0"][..]] {
        let mut a = Mounted::start(mode);
        let second = |mnt: &Path, args: &[&str]| {
            run_cmd(
                Command::new(cachefs_bin())
                    .arg("-src")
                    .arg(a.src.path())
                    .arg("-dst")
                    .arg(a.dst.path())
                    .arg("-mountpoint")
                    .arg(mnt)
                    .args(args),
            )
        };
        // Another writeback mode: refused, naming what the holder serves.
        let other_mode: &[&str] = if mode.is_empty() { &["-w"] } else { &[] };
        let refused_at = tempdir();
        let out = second(refused_at.path(), other_mode);
        assert_usage_error(&out, &["is in use by another cachefs", "mode"]);
        assert_not_mounted(refused_at.path());

        let view = tempdir();
        let out = second(view.path(), mode);
        assert!(
            out.status.success(),
            "{mode:?}: the second mount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v = std::fs::canonicalize(view.path()).unwrap();
        assert!(is_fuse_mounted(&v), "{mode:?}: the view is not mounted");
        // generic/732's moves, across the two views of one filesystem.
        std::fs::create_dir(a.mnt_path("A")).unwrap();
        std::fs::create_dir(v.join("B")).unwrap();
        std::fs::write(a.mnt_path("A/f"), b"one file").unwrap();
        std::fs::rename(a.mnt_path("A/f"), a.mnt_path("B/f")).unwrap();
        assert_eq!(std::fs::read(v.join("B/f")).unwrap(), b"one file");
        std::fs::rename(v.join("B/f"), v.join("A/f")).unwrap();
        assert_eq!(std::fs::read(a.mnt_path("A/f")).unwrap(), b"one file");
        use std::os::unix::fs::MetadataExt;
        let (i1, i2) = (
            std::fs::metadata(a.mnt_path("A/f")).unwrap().ino(),
            std::fs::metadata(v.join("A/f")).unwrap().ino(),
        );
        assert_eq!(i1, i2, "{mode:?}: one file, one inode in both views");
        // An external unmount of the first mount leaves the view serving.
        assert!(
            run_cmd(Command::new("umount").arg(a.mountpoint()))
                .status
                .success(),
            "umount {}",
            a.mountpoint().display()
        );
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            a.is_running(),
            "{mode:?}: the daemon exited with a view left"
        );
        assert_eq!(std::fs::read(v.join("A/f")).unwrap(), b"one file");
        std::fs::write(v.join("after"), b"still served").unwrap();
        // A signal stops the daemon and unmounts every view.
        a.signal(libc::SIGTERM);
        let st = a.wait_exit(Duration::from_secs(30));
        assert!(st.success(), "{mode:?}: exit {st}: {}", a.stderr());
        assert!(!is_fuse_mounted(&v), "{mode:?}: the view is still mounted");
        if !mode.is_empty() {
            assert_eq!(
                std::fs::read(a.src_path("after")).unwrap(),
                b"still served",
                "{mode:?}: a write through the view reached src"
            );
        }
    }
}

// ---- Mounted: the accepted spellings really mount, and every way of stopping exits 0 ----

#[test]
fn go_style_flags_mount_and_sigterm_exits_zero() {
    if !can_mount("go_style_flags_mount_and_sigterm_exits_zero") {
        return;
    }
    let m = Mounted::start(&[
        "-retries",
        "3",
        "-retry-delay=3",
        "-start-delay",
        "0",
        "-concurrent=4",
        "-log",
        "-o",
        "default_permissions",
    ]);
    m.wait_for_log(
        &format!(
            "cachefs mounted {} over {} at {} (writeback: off)",
            std::fs::canonicalize(m.src.path()).unwrap().display(),
            std::fs::canonicalize(m.dst.path()).unwrap().display(),
            m.mountpoint().display()
        ),
        Duration::from_secs(5),
    );
    m.stop();
}

#[test]
fn double_dash_flags_mount() {
    if !can_mount("double_dash_flags_mount") {
        return;
    }
    let d = dirs();
    let mnt = std::fs::canonicalize(p(&d.mnt)).unwrap();
    let mut child = Command::new(cachefs_bin())
        .arg(format!("--src={}", p(&d.src).display()))
        .arg("--dst")
        .arg(p(&d.dst))
        .arg("--mountpoint")
        .arg(&mnt)
        .args(["--threads", "2", "--attr-ttl", "0.5", "--no-passthrough"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + MOUNT_TIMEOUT;
    while !is_fuse_mounted(&mnt) {
        if child.try_wait().unwrap().is_some() || std::time::Instant::now() > deadline {
            let _ = child.kill();
            detach(&mnt);
            let out = child.wait_with_output().unwrap();
            panic!("no mount: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    signal(&child, libc::SIGINT);
    let st = wait_timeout(&mut child, STOP_TIMEOUT);
    detach(&mnt);
    assert!(st.is_some_and(|s| s.success()), "{st:?}");
}

#[test]
fn sigint_exits_zero() {
    if !can_mount("sigint_exits_zero") {
        return;
    }
    let mut m = Mounted::start(&[]);
    m.signal(libc::SIGINT);
    let st = m.wait_exit(STOP_TIMEOUT);
    assert!(st.success(), "SIGINT: {st}; stderr:\n{}", m.stderr());
    assert!(mount_type(m.mountpoint()).is_none());
}

fn mount_tmpfs(dir: &Path) {
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "cachefs-test-src"])
        .arg(dir)
        .status()
        .expect("run mount");
    assert!(st.success(), "mount tmpfs at {}", dir.display());
}

/// SIGHUP does not unmount: the daemon reopens src's root and logs its summary. A src
/// mounted anew at its path (rclone restarted after `umount -l`, while the detached old
/// mount still answers through the root cachefs holds) is used from then on.
#[test]
fn sighup_reopens_src_and_keeps_the_mount() {
    if !can_mount("sighup_reopens_src_and_keeps_the_mount") {
        return;
    }
    let srcdir = tempdir();
    let src = std::fs::canonicalize(srcdir.path()).unwrap();
    mount_tmpfs(&src);
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            while detach(&self.0) {}
        }
    }
    let _unmount = Unmount(src.clone());
    std::fs::write(src.join("old"), b"old src").unwrap();
    let mut m = Mounted::with_dirs(srcdir, tempdir(), &["-w", "--attr-ttl", "0"]);
    assert_eq!(std::fs::read(m.mnt_path("old")).unwrap(), b"old src");

    // A new src at the same path; the detached old one still answers.
    assert!(detach(&src));
    mount_tmpfs(&src);
    std::fs::write(src.join("seen-before"), b"new").unwrap();
    std::fs::write(src.join("seen-after"), b"new src").unwrap();
    assert!(
        !m.mnt_path("seen-before").exists(),
        "the old src root is still in use before SIGHUP"
    );

    m.signal(libc::SIGHUP);
    let log = m.wait_for_log("is online", Duration::from_secs(10));
    assert!(log.contains("SIGHUP: reopened src"), "{log}");
    assert!(
        log.contains("SIGHUP: src ") && log.contains("is online"),
        "{log}"
    );
    assert!(is_fuse_mounted(m.mountpoint()), "SIGHUP unmounted:\n{log}");
    assert_eq!(std::fs::read(m.mnt_path("seen-after")).unwrap(), b"new src");
    // A cached file keeps being served; writes still reach (the new) src.
    assert_eq!(std::fs::read(m.mnt_path("old")).unwrap(), b"old src");
    std::fs::write(m.mnt_path("written"), b"after HUP").unwrap();
    wb_wait_drained(m.dst.path(), Duration::from_secs(30));
    assert_eq!(std::fs::read(src.join("written")).unwrap(), b"after HUP");

    // A second SIGHUP is as harmless; SIGTERM still stops it cleanly.
    m.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    assert!(is_fuse_mounted(m.mountpoint()));
    m.signal(libc::SIGTERM);
    let st = m.wait_exit(STOP_TIMEOUT);
    assert!(st.success(), "{st}; stderr:\n{}", m.stderr());
    assert!(mount_type(m.mountpoint()).is_none());
}

/// SIGHUP with a hung src (bindfs stopped): the reopen is given up after
/// --src-timeout, the mount keeps serving cached files, a second SIGHUP does not pile
/// up another stuck reopen, and SIGTERM still stops the daemon at once.
#[test]
fn sighup_with_a_hung_src_neither_blocks_nor_unmounts() {
    if !can_mount("sighup_with_a_hung_src_neither_blocks_nor_unmounts")
        || !bindfs_support::have_bindfs()
    {
        return;
    }
    let srcmnt = tempdir();
    let bind =
        bindfs_support::BindfsSrc::start(dir_with(&[("cached", b"cached bytes")]), srcmnt.path())
            .expect("bindfs starts");
    let mut m = Mounted::with_dirs(srcmnt, tempdir(), &["--src-timeout", "1"]);
    assert_eq!(
        std::fs::read(m.mnt_path("cached")).unwrap(),
        b"cached bytes"
    );

    bind.pause(true);
    std::thread::sleep(Duration::from_millis(1500)); // the kernel's attributes of src expire
    m.signal(libc::SIGHUP);
    let log = m.wait_for_log("did not answer within 1s", Duration::from_secs(10));
    assert!(log.contains("keeping the current src root"), "{log}");
    assert!(is_fuse_mounted(m.mountpoint()));
    assert_eq!(
        std::fs::read(m.mnt_path("cached")).unwrap(),
        b"cached bytes"
    );
    m.signal(libc::SIGHUP);
    m.wait_for_log("the previous reopen of src", Duration::from_secs(10));

    let t = std::time::Instant::now();
    m.signal(libc::SIGTERM);
    let st = m.wait_exit(STOP_TIMEOUT);
    assert!(st.success(), "{st}; stderr:\n{}", m.stderr());
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(mount_type(m.mountpoint()).is_none());
    bind.pause(false);
}

/// Durations take units (as rclone's flags do) on a real mount; a bad one is a usage
/// error naming the fix.
#[test]
fn durations_with_units() {
    let d = dirs();
    let out = run(&[
        &"-src",
        &p(&d.src),
        &"-dst",
        &p(&d.dst),
        &"-mountpoint",
        &p(&d.mnt),
        &"--revalidate",
        &"5x",
    ]);
    assert_usage_error(&out, &["-revalidate '5x' is not a duration", "30s"]);
    assert_not_mounted(p(&d.mnt));

    if !can_mount("durations_with_units") {
        return;
    }
    let m = Mounted::start(&[
        "-d",
        "-w",
        "--attr-ttl",
        "500ms",
        "--revalidate=5m",
        "-src-timeout",
        "1h",
        "--drain-timeout",
        "45s",
        "-retry-delay=1.5",
        "-start-delay",
        "0s",
    ]);
    let log = m.wait_for_log("configuration:", Duration::from_secs(10));
    for want in [
        "attr_ttl: 500ms",
        "revalidate: 300s",
        "src_timeout: 3600s",
        "drain_timeout: 45s",
        "retry_delay: 1.5s",
        "start_delay: 0ns",
    ] {
        assert!(log.contains(want), "lacks {want}:\n{log}");
    }
    m.stop();
}

#[test]
fn external_unmount_exits_zero() {
    if !can_mount("external_unmount_exits_zero") {
        return;
    }
    let mut m = Mounted::start(&[]);
    let st = Command::new("umount").arg(m.mountpoint()).status().unwrap();
    assert!(st.success());
    let st = m.wait_exit(STOP_TIMEOUT);
    assert!(st.success(), "{st}; stderr:\n{}", m.stderr());
    assert!(
        m.stderr().contains("unmounted externally"),
        "{}",
        m.stderr()
    );
}

#[test]
fn busy_mount_is_detached_and_daemon_exits_when_released() {
    if !can_mount("busy_mount_is_detached_and_daemon_exits_when_released") {
        return;
    }
    let mut m = Mounted::start(&[]);
    // A process with its cwd in the mount keeps it busy.
    let mut holder = Command::new("sleep")
        .arg("30")
        .current_dir(m.mountpoint())
        .spawn()
        .unwrap();
    m.signal(libc::SIGTERM);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while mount_type(m.mountpoint()).is_some() {
        assert!(std::time::Instant::now() < deadline, "never detached");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(m.pid().is_some());
    let _ = holder.kill();
    let _ = holder.wait();
    let st = m.wait_exit(STOP_TIMEOUT);
    assert!(st.success(), "{st}; stderr:\n{}", m.stderr());
    m.wait_for_log("is busy; detaching it lazily", Duration::ZERO);
}

/// `cachefs man` is generated from the clap definitions: every flag is on the page,
/// and groff renders it without warnings.
#[test]
fn man_page_documents_every_flag() {
    use clap::CommandFactory;
    let out = run(&[&"man"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let page = String::from_utf8(out.stdout).unwrap();
    assert!(page.starts_with(".TH CACHEFS 1 "), "{page}");
    let cmd = cachefs::cli::Cli::command();
    // Every visible subcommand's flags too (ctl's nested commands included).
    let mut cmds = vec![cmd.clone()];
    let mut args = Vec::new();
    while let Some(c) = cmds.pop() {
        args.extend(c.get_arguments().cloned());
        cmds.extend(c.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
    }
    for sub in ["status", "ctl", "warmup"] {
        assert!(cmd.find_subcommand(sub).is_some(), "no {sub} subcommand");
        assert!(
            page.contains(&format!("cachefs {sub}")),
            "the man page lacks cachefs {sub}"
        );
    }
    let mut checked = 0;
    for arg in &args {
        if arg.is_hide_set() {
            continue;
        }
        if let Some(long) = arg.get_long() {
            let roff = format!("\\-\\-{}", long.replace('-', "\\-"));
            assert!(page.contains(&roff), "the man page lacks --{long}");
            checked += 1;
        }
        if let Some(short) = arg.get_short() {
            assert!(
                page.contains(&format!("\\-{short}")),
                "the man page lacks -{short}"
            );
            checked += 1;
        }
    }
    assert!(checked > 25, "only {checked} flags");
    for section in [
        "SYNOPSIS",
        "OPTIONS",
        "SIGNALS",
        "\"EXIT STATUS\"",
        "ENVIRONMENT",
        "FILES",
    ] {
        assert!(
            page.contains(&format!(".SH {section}")),
            "no {section} section"
        );
    }
    // The hidden packaging subcommands stay off the page and out of --help.
    assert!(!page.contains("completions"));
    let help = run(&[&"--help"]);
    assert!(!String::from_utf8_lossy(&help.stdout).contains("completions"));

    let groff = Command::new("groff")
        .args(["-man", "-Tutf8", "-ww", "-z"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let Ok(mut groff) = groff else {
        eprintln!("groff is not installed: not rendering the page");
        return;
    };
    use std::io::Write;
    groff
        .stdin
        .take()
        .unwrap()
        .write_all(page.as_bytes())
        .unwrap();
    let out = groff.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `cachefs completions SHELL` for bash, zsh and fish, from the clap definitions.
#[test]
fn completions_for_bash_zsh_and_fish() {
    for (shell, check) in [("bash", "-n"), ("zsh", "-n"), ("fish", "--no-execute")] {
        let out = run(&[&"completions", &shell]);
        assert!(
            out.status.success(),
            "{shell}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let script = String::from_utf8(out.stdout).unwrap();
        for word in ["revalidate", "lazy-fill", "mountpoint", "status"] {
            assert!(script.contains(word), "{shell} completion lacks {word}");
        }
        // A syntax check where the shell is installed.
        let dir = tempdir();
        let file = dir.path().join("completion");
        std::fs::write(&file, &script).unwrap();
        match Command::new(shell).arg(check).arg(&file).output() {
            Ok(o) => assert!(
                o.status.success(),
                "{shell}: {}",
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(_) => eprintln!("{shell} is not installed: no syntax check"),
        }
    }
    assert_usage_error(
        &run(&[&"completions", &"tcsh"]),
        &["'tcsh' is not a valid <SHELL>", "bash, zsh, fish"],
    );
}

/// The top-level keys of a JSON object (no general parser: strings and nesting only).
fn json_top_keys(json: &str) -> Vec<String> {
    let (mut depth, mut in_str, mut esc) = (0, false, false);
    let (mut keys, mut cur, mut expect_key) = (Vec::new(), String::new(), false);
    for c in json.chars() {
        if in_str {
            match (esc, c) {
                (true, _) => esc = false,
                (false, '\\') => esc = true,
                (false, '"') => in_str = false,
                _ => {}
            }
            if depth == 1 && expect_key && in_str {
                cur.push(c);
            }
            continue;
        }
        match c {
            '"' => in_str = true,
            '{' | '[' => {
                depth += 1;
                expect_key = depth == 1;
            }
            '}' | ']' => depth -= 1,
            ',' if depth == 1 => expect_key = true,
            ':' if depth == 1 && expect_key => {
                keys.push(std::mem::take(&mut cur));
                expect_key = false;
            }
            _ => {}
        }
    }
    keys
}

/// docs/PRODUCTION.md lists the keys `cachefs status --json` prints, all of them, and
/// says what its exit status judges.
#[test]
fn status_json_keys_match_the_docs() {
    let d = dirs();
    let out = run(&[&"status", &p(&d.dst), &"--json"]);
    assert_eq!(out.status.code(), Some(0));
    let real = json_top_keys(&String::from_utf8(out.stdout).unwrap());
    assert!(real.contains(&"pending_ops".to_string()), "{real:?}");

    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/PRODUCTION.md"))
            .unwrap();
    let start = doc
        .find("- `--json` prints one object:")
        .expect("the --json bullet");
    let bullet = &doc[start..];
    let bullet = &bullet[..bullet[2..].find("\n- ").map_or(bullet.len(), |e| e + 2)];
    // Top-level keys only: what a key's value holds is described in parentheses.
    let mut depth = 0usize;
    let top: String = bullet
        .chars()
        .filter(|c| {
            match c {
                '(' => depth += 1,
                ')' => depth = depth.saturating_sub(1),
                _ => return depth == 0,
            }
            false
        })
        .collect();
    let documented: Vec<String> = top
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|w| w.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .map(String::from)
        .collect();
    assert_eq!(
        real, documented,
        "real (left) vs docs/PRODUCTION.md (right)"
    );
    assert!(
        doc.contains("- Exit status: 0 no failed writeback ops; 1 failed writeback ops exist;"),
        "the exit status text"
    );
}
