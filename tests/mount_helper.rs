//! examples/mount.fuse.cachefs, the helper mount(8) runs for `mount -t fuse.cachefs`
//! and fstab lines: it translates `SRC MOUNTPOINT -o dst=DST,w,...` into cachefs's
//! command line, starts the daemon in the background and returns once the mount is up.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::*;

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
         --pin *.jpg --metrics-addr 127.0.0.1:9477 -dst /srv/cache -o allow_other,noatime\n",
        cachefs_bin()
    );
    assert_eq!(stderr, want);

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

struct Detach(PathBuf);

impl Drop for Detach {
    fn drop(&mut self) {
        detach(&self.0);
    }
}
