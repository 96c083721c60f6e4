//! `umount M; mount M` back to back, as xfstests does between tests: the daemon of the
//! old mount, still exiting, must not unmount the new one. fuser 0.18 did (its
//! drop-time unmount reads "connection gone" as "still mounted"); see
//! `daemon::join_unmounted`.

use std::fs;
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::common::*;

const CYCLES: usize = 50;

fn spawn(
    src: &std::path::Path,
    dst: &std::path::Path,
    mnt: &std::path::Path,
    log: fs::File,
) -> Child {
    Command::new(cachefs_bin())
        .arg("-src")
        .arg(src)
        .arg("-dst")
        .arg(dst)
        .arg("-mountpoint")
        .arg(mnt)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .env("RUST_LOG_STYLE", "never")
        .spawn()
        .expect("spawn cachefs")
}

#[test]
fn fifty_unmount_mount_cycles_at_one_mountpoint() {
    if !can_mount("fifty_unmount_mount_cycles_at_one_mountpoint") {
        return;
    }
    let (src, dst, mnt, logs) = (tempdir(), tempdir(), tempdir(), tempdir());
    write_file(src.path(), "f", "data");
    let mountpoint = fs::canonicalize(mnt.path()).unwrap();
    let log_of = |i: usize| logs.path().join(format!("cachefs.{i}.log"));
    let stderr_of = |i: usize| fs::read_to_string(log_of(i)).unwrap_or_default();
    let mut previous: Option<Child> = None;
    for i in 0..CYCLES {
        let mut child = spawn(
            src.path(),
            dst.path(),
            &mountpoint,
            fs::File::create(log_of(i)).unwrap(),
        );
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        while !is_fuse_mounted(&mountpoint) {
            if let Some(st) = child.try_wait().unwrap() {
                detach(&mountpoint);
                panic!(
                    "cycle {i}: cachefs exited ({st}) before mounting:\n{}",
                    stderr_of(i)
                );
            }
            assert!(
                Instant::now() < deadline,
                "cycle {i}: no mount within {MOUNT_TIMEOUT:?}"
            );
            sleep(Duration::from_millis(5));
        }
        // The previous daemon (unmounted just before this one started) exits now; its
        // exit must leave this mount alone.
        if let Some(mut old) = previous.take() {
            let st = wait_timeout(&mut old, STOP_TIMEOUT);
            assert!(
                st.is_some_and(|s| s.success()),
                "cycle {i}: the previous daemon: {st:?}:\n{}",
                stderr_of(i - 1)
            );
        }
        let alive = child.try_wait().unwrap().is_none();
        let mounted = is_fuse_mounted(&mountpoint);
        if !(alive && mounted) {
            detach(&mountpoint);
            panic!(
                "cycle {i}: once the previous daemon exited, this mount is gone (mounted: \
                 {mounted}, daemon alive: {alive}); its log:\n{}",
                stderr_of(i)
            );
        }
        assert_eq!(
            fs::read(mountpoint.join("f")).unwrap(),
            b"data",
            "cycle {i}"
        );
        // umount(8)'s way: the daemon notices and exits by itself.
        let st = Command::new("umount").arg(&mountpoint).status().unwrap();
        assert!(st.success(), "cycle {i}: umount failed");
        previous = Some(child);
    }
    let mut last = previous.unwrap();
    let st = wait_timeout(&mut last, STOP_TIMEOUT);
    assert!(st.is_some_and(|s| s.success()), "the last daemon: {st:?}");
    assert!(!is_fuse_mounted(&mountpoint));
}
