//! examples/mount.fuse.cachefs, the helper mount(8) runs for `mount -t fuse.cachefs`
//! and fstab lines: it translates `SRC MOUNTPOINT -o dst=DST,w,...` into cachefs's
//! command line, starts the daemon in the background and returns once the mount is up.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::common::*;

fn helper() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/mount.fuse.cachefs")
}

fn run_helper(args: &[&str]) -> Output {
    run_helper_env(args, &[])
}

fn run_helper_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(helper())
        .args(args)
        .env("CACHEFS_BIN", cachefs_bin())
        .env("CACHEFS_MOUNT_TIMEOUT", "15")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// Wait until `path`'s text contains `needle`; the text.
fn wait_text(path: &Path, needle: &str) -> String {
    let t = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            t.elapsed() < STOP_TIMEOUT,
            "no {needle:?} in {}:\n{text}",
            path.display()
        );
        sleep(Duration::from_millis(50));
    }
}

/// mount(8) run by a .mount unit passes systemd's JOURNAL_STREAM on to the helper and
/// cachefs; their stderr is a log file or a pipe, not that stream, so no literal `<6>`.
#[test]
fn an_inherited_journal_stream_does_not_prefix_a_log_file() {
    if !can_mount("an_inherited_journal_stream_does_not_prefix_a_log_file") {
        return;
    }
    let (src, dst, mnt, logs) = (tempdir(), tempdir(), tempdir(), tempdir());
    let log = logs.path().join("cachefs.log");
    let opts = format!("dst={},logfile={}", dst.path().display(), log.display());
    let out = run_helper_env(
        &[
            src.path().to_str().unwrap(),
            mnt.path().to_str().unwrap(),
            "-o",
            &opts,
        ],
        &[("JOURNAL_STREAM", "8:12345")],
    );
    let mountpoint = std::fs::canonicalize(mnt.path()).unwrap();
    let _cleanup = Detach(mountpoint.clone());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        Command::new("umount")
            .arg(&mountpoint)
            .status()
            .unwrap()
            .success()
    );
    let text = wait_text(&log, "cachefs exiting");
    for line in text.lines() {
        assert!(
            !line.starts_with('<'),
            "syslog prefix in a log file: {line}\n{text}"
        );
    }
    assert!(text.contains("INFO"), "{text}");
}

/// Without logfile=, the log goes through `logger --prio-prefix` with a `<N>` level on
/// every line, so the journal keeps warnings and errors apart from info.
#[test]
fn the_syslog_path_keeps_levels() {
    if !can_mount("the_syslog_path_keeps_levels") {
        return;
    }
    let (src, dst, mnt, bin) = (tempdir(), tempdir(), tempdir(), tempdir());
    // A stand-in logger(1): records its arguments and the lines it is given.
    let args_file = bin.path().join("args");
    let lines_file = bin.path().join("lines");
    let fake = bin.path().join("logger");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\n\
             case \"$1\" in --help) echo '     --prio-prefix        look for a prefix'; exit 0 ;; esac\n\
             echo \"$*\" >{}\n\
             exec cat >>{}\n",
            args_file.display(),
            lines_file.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap()
    );
    let opts = format!("dst={}", dst.path().display());
    let out = run_helper_env(
        &[
            src.path().to_str().unwrap(),
            mnt.path().to_str().unwrap(),
            "-o",
            &opts,
        ],
        &[("PATH", &path), ("JOURNAL_STREAM", "8:12345")],
    );
    let mountpoint = std::fs::canonicalize(mnt.path()).unwrap();
    let _cleanup = Detach(mountpoint.clone());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        Command::new("umount")
            .arg(&mountpoint)
            .status()
            .unwrap()
            .success()
    );
    let text = wait_text(&lines_file, "cachefs exiting");
    let args = std::fs::read_to_string(&args_file).unwrap();
    assert!(
        args.contains("--prio-prefix") && args.contains("-t cachefs"),
        "{args}"
    );
    for line in text.lines() {
        assert!(
            line.starts_with("<6>") || line.starts_with("<4>") || line.starts_with("<7>"),
            "a line without a level prefix: {line:?}\n{text}"
        );
    }
    assert!(
        text.contains("<6>cachefs::daemon: cachefs exiting"),
        "{text}"
    );
}

#[test]
fn options_become_cachefs_flags() {
    let out = run_helper(&[
        "/srv/src",
        "/",
        "-f",
        "-v",
        "-t",
        "fuse.cachefs",
        "-o",
        "defaults,dst=/srv/cache,w,revalidate=5,concurrent=4,pin=*.jpg,metrics-addr=127.0.0.1:9477",
        "-o",
        "allow_other,nofail,_netdev,x-systemd.requires=rclone.service,noatime",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let want = format!(
        "mount.fuse.cachefs: {} -src /srv/src -mountpoint / -w --revalidate 5 --concurrent 4 \
         --pin *.jpg --metrics-addr 127.0.0.1:9477 -dst /srv/cache -o allow_other,noatime,dev,suid\n",
        cachefs_bin()
    );
    assert_eq!(stderr, want);

    // mount(8) passes nodev / nosuid but never dev / suid (its defaults).
    let out = run_helper(&["/srv/src", "/", "-f", "-v", "-o", "dst=/c,nodev,nosuid,ro"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.ends_with(" -dst /c -o nodev,nosuid,ro\n"),
        "{stderr}"
    );

    let out = run_helper(&["/srv/src", "/", "-o", "w"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("dst=DIR is required"));
}

#[test]
fn mounts_in_the_background_and_stops_at_umount() {
    if !can_mount("mounts_in_the_background_and_stops_at_umount") {
        return;
    }
    let (src, dst, mnt, logs) = (tempdir(), tempdir(), tempdir(), tempdir());
    write_file(src.path(), "hello", "from src");
    let log = logs.path().join("cachefs.log");
    let opts = format!(
        "dst={},w,revalidate=1,logfile={},nofail",
        dst.path().display(),
        log.display()
    );
    let out = run_helper(&[
        src.path().to_str().unwrap(),
        mnt.path().to_str().unwrap(),
        "-o",
        &opts,
    ]);
    let mountpoint = std::fs::canonicalize(mnt.path()).unwrap();
    let _cleanup = Detach(mountpoint.clone());
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // Returned once mounted.
    assert!(is_fuse_mounted(&mountpoint));
    assert_eq!(
        std::fs::read(mountpoint.join("hello")).unwrap(),
        b"from src"
    );
    std::fs::write(mountpoint.join("new"), b"written back").unwrap();
    let t = Instant::now();
    while std::fs::read(src.path().join("new")).ok().as_deref() != Some(b"written back") {
        assert!(t.elapsed() < Duration::from_secs(20), "w was not passed on");
        sleep(Duration::from_millis(50));
    }
    // A second mount on the same place is refused.
    let again = run_helper(&[
        src.path().to_str().unwrap(),
        mnt.path().to_str().unwrap(),
        "-o",
        &opts,
    ]);
    assert_eq!(again.status.code(), Some(1));

    // umount: the daemon sees the unmount, drains and exits.
    let st = Command::new("umount").arg(&mountpoint).status().unwrap();
    assert!(st.success());
    let t = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("cachefs exiting") {
            break;
        }
        assert!(t.elapsed() < STOP_TIMEOUT, "cachefs did not exit:\n{text}");
        sleep(Duration::from_millis(50));
    }
}

/// The source (fsname) of the mount at `mountpoint`, from /proc/self/mountinfo.
fn mount_source(mountpoint: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines().rev().find_map(|line| {
        (line.split(' ').nth(4)? == mountpoint.to_str()?).then(|| {
            line.split_once(" - ")?
                .1
                .split(' ')
                .nth(1)
                .map(str::to_string)
        })?
    })
}

/// `NAME MNT -o src=SRC,dst=DST` (xfstests' TEST_DEV style): NAME is the mount's
/// source; `-o remount,ro` / `remount,rw` change the flags of the running mount
/// instead of starting a second daemon.
#[test]
fn src_option_names_the_mount_and_remount_changes_flags() {
    if !can_mount("src_option_names_the_mount_and_remount_changes_flags") {
        return;
    }
    let (src, dst, mnt, logs) = (tempdir(), tempdir(), tempdir(), tempdir());
    write_file(src.path(), "hello", "from src");
    let log = logs.path().join("cachefs.log");
    let name = format!("helper-test-{}", std::process::id());
    let mnt_s = mnt.path().to_str().unwrap();
    let opts = format!(
        "src={},dst={},logfile={}",
        src.path().display(),
        dst.path().display(),
        log.display()
    );
    let out = run_helper(&[&name, mnt_s, "-o", &opts]);
    let mountpoint = std::fs::canonicalize(mnt.path()).unwrap();
    let _cleanup = Detach(mountpoint.clone());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mount_source(&mountpoint).as_deref(), Some(name.as_str()));
    assert_eq!(
        std::fs::read(mountpoint.join("hello")).unwrap(),
        b"from src"
    );

    let out = run_helper(&[&name, mnt_s, "-o", &format!("remount,ro,{opts}")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = std::fs::write(mountpoint.join("new"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    let out = run_helper(&[&name, mnt_s, "-o", "remount,rw"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(mountpoint.join("new"), b"x").unwrap();
    // Still the one daemon, its flags otherwise unchanged (dev and suid, the defaults
    // of a mount by mount(8), added by the helper as mount.fuse3 does).
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.matches("cachefs mounted").count(), 1, "{text}");
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .find(|l| l.split(' ').nth(4) == mountpoint.to_str())
        .unwrap();
    assert!(line.contains(" rw,relatime "), "{line}");

    let st = Command::new("umount").arg(&name).status().unwrap();
    assert!(st.success());
    let t = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("cachefs exiting")
    {
        assert!(t.elapsed() < STOP_TIMEOUT, "cachefs did not exit");
        sleep(Duration::from_millis(50));
    }
}

/// A daemon that fails at start: the helper reports its real exit status (2, a bad
/// command line), with or without logfile=.
#[test]
fn reports_the_daemons_exit_status() {
    let (dst, mnt, logs) = (tempdir(), tempdir(), tempdir());
    let missing = dst.path().join("no-such-src");
    let mnt_s = mnt.path().to_str().unwrap();
    let log = logs.path().join("cachefs.log");
    for opts in [
        format!("dst={}", dst.path().display()),
        format!("dst={},logfile={}", dst.path().display(), log.display()),
    ] {
        let out = run_helper(&[missing.to_str().unwrap(), mnt_s, "-o", &opts]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("cachefs exited (status 2)"),
            "{opts}: {stderr}"
        );
    }
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("no-such-src")
    );
}

struct Detach(PathBuf);

impl Drop for Detach {
    fn drop(&mut self) {
        detach(&self.0);
    }
}

/// `mount` of a dst a cachefs serves, with the same src and options, at a second place
/// (xfstests' generic/732 mounts its scratch device twice): returns at once with a
/// second view of the same filesystem; the daemon exits with the last view's umount.
#[test]
fn a_second_mount_of_one_dst_is_a_view_until_the_last_umount() {
    if !can_mount("a_second_mount_of_one_dst_is_a_view_until_the_last_umount") || !is_root() {
        return;
    }
    let (src, dst, mnt, mnt2, logs) = (tempdir(), tempdir(), tempdir(), tempdir(), tempdir());
    let log = logs.path().join("cachefs.log");
    let log2 = logs.path().join("second.log");
    let opts = |log: &Path| format!("dst={},w,logfile={}", dst.path().display(), log.display());
    let mount = |at: &Path, log: &Path| {
        run_helper(&[
            src.path().to_str().unwrap(),
            at.to_str().unwrap(),
            "-o",
            &opts(log),
        ])
    };
    let out = mount(mnt.path(), &log);
    let first = std::fs::canonicalize(mnt.path()).unwrap();
    let _cleanup = Detach(first.clone());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let t = Instant::now();
    let out = mount(mnt2.path(), &log2);
    let second = std::fs::canonicalize(mnt2.path()).unwrap();
    let _cleanup2 = Detach(second.clone());
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(&log2).unwrap_or_default()
    );
    // Not after the helper's wait for dst's lock (CACHEFS_MOUNT_TIMEOUT, 15 s here).
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    assert!(wait_text(&log2, "second view").contains("bind mount"));
    std::fs::write(second.join("f"), b"through the view").unwrap();
    assert_eq!(std::fs::read(first.join("f")).unwrap(), b"through the view");

    assert!(
        Command::new("umount")
            .arg(&first)
            .status()
            .unwrap()
            .success()
    );
    sleep(Duration::from_millis(500));
    assert!(
        !std::fs::read_to_string(&log)
            .unwrap()
            .contains("cachefs exiting"),
        "the daemon exited while a view was mounted"
    );
    assert_eq!(
        std::fs::read(second.join("f")).unwrap(),
        b"through the view"
    );
    assert!(
        Command::new("umount")
            .arg(&second)
            .status()
            .unwrap()
            .success()
    );
    wait_text(&log, "cachefs exiting");
    assert_eq!(
        std::fs::read(src.path().join("f")).unwrap(),
        b"through the view"
    );
}
