//! Outages of src: src behind a real bindfs mount that is killed with SIGKILL (as when
//! rclone crashes) and started again. Cached files keep working, new writes work,
//! unreachable files fail with EIO quickly, the mount stays responsive, and everything
//! comes back by itself when src is mounted again.

mod bindfs_support;
mod common;

use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use bindfs_support::BindfsSrc;
use common::*;

#[test]
fn src_dies_and_comes_back() {
    if !can_mount("src_dies_and_comes_back") {
        return;
    }
    if Command::new("bindfs").arg("--version").output().is_err() {
        panic!("bindfs is needed (scripts/install-deps.sh installs it)");
    }
    let real = dir_with(&[
        ("cached", b"cached bytes"),
        ("uncached", b"only in src"),
        ("dir/inner", b"inner"),
    ]);
    let real_path = real.path().to_path_buf();
    let srcmnt = tempdir();
    let mut bind = BindfsSrc::start(real, srcmnt.path()).expect("bindfs starts");
    let m = Mounted::with_dirs(srcmnt, tempdir(), &[]);

    // Warm the cache with one file, and let the mount see the others' names.
    assert_eq!(
        std::fs::read(m.mnt_path("cached")).unwrap(),
        b"cached bytes"
    );
    let mut names: Vec<_> = std::fs::read_dir(m.mnt_path(""))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["cached", "dir", "uncached"]);

    bind.kill9();
    // Let the kernel's entry and attribute caches (1 s TTL) expire.
    sleep(Duration::from_millis(1200));

    // Cached files: read and write.
    assert_eq!(
        std::fs::read(m.mnt_path("cached")).unwrap(),
        b"cached bytes"
    );
    std::fs::write(m.mnt_path("cached"), b"changed offline").unwrap();
    assert_eq!(
        std::fs::read(m.mnt_path("cached")).unwrap(),
        b"changed offline"
    );
    // New files and directories.
    std::fs::create_dir(m.mnt_path("newdir")).unwrap();
    std::fs::write(m.mnt_path("newdir/new"), b"new offline").unwrap();
    // A file the mount knows but cannot reach fails with EIO, quickly.
    let t = Instant::now();
    let err = std::fs::read(m.mnt_path("uncached")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    // Listings still answer with what dst has.
    let mut offline: Vec<_> = std::fs::read_dir(m.mnt_path(""))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    offline.sort();
    assert_eq!(offline, ["cached", "newdir"]);
    assert!(m.stderr().contains("is offline"), "{}", m.stderr());

    bind.restart();
    sleep(Duration::from_millis(1200));
    // Back without any manual step: src-only files reappear and read fine.
    assert_eq!(
        std::fs::read(m.mnt_path("uncached")).unwrap(),
        b"only in src"
    );
    assert_eq!(std::fs::read(m.mnt_path("dir/inner")).unwrap(), b"inner");
    assert_eq!(
        std::fs::read(m.mnt_path("cached")).unwrap(),
        b"changed offline"
    );
    assert_eq!(
        std::fs::read(m.mnt_path("newdir/new")).unwrap(),
        b"new offline"
    );
    // Cache mode never writes to src.
    assert_eq!(
        std::fs::read(real_path.join("cached")).unwrap(),
        b"cached bytes"
    );
    assert!(m.stderr().contains("answers again"), "{}", m.stderr());
    m.stop();
}

#[test]
fn stalled_src_times_out_and_the_mount_stays_responsive() {
    if !can_mount("stalled_src_times_out_and_the_mount_stays_responsive") {
        return;
    }
    let real = dir_with(&[
        ("cached", b"cached bytes"),
        ("uncached", b"only in src"),
        ("other", b"other"),
    ]);
    let srcmnt = tempdir();
    let bind = BindfsSrc::start(real, srcmnt.path()).expect("bindfs starts");
    let m = Mounted::with_dirs(srcmnt, tempdir(), &["--src-timeout", "1"]);
    assert_eq!(
        std::fs::read(m.mnt_path("cached")).unwrap(),
        b"cached bytes"
    );
    assert_eq!(std::fs::read_dir(m.mnt_path("")).unwrap().count(), 3);

    bind.pause(true);
    sleep(Duration::from_millis(1200)); // kernel caches expire

    // Several readers of unreachable files at once: each gets EIO within the
    // timeout (plus slack), none hangs.
    let t = Instant::now();
    let readers: Vec<_> = ["uncached", "other"]
        .into_iter()
        .map(|name| {
            let p = m.mnt_path(name);
            std::thread::spawn(move || std::fs::read(p).map_err(|e| e.raw_os_error()))
        })
        .collect();
    for r in readers {
        assert_eq!(r.join().unwrap(), Err(Some(libc::EIO)));
    }
    assert!(
        t.elapsed() < Duration::from_secs(6),
        "took {:?}",
        t.elapsed()
    );
    // Cached data, new files and the listing still answer while src hangs.
    let t = Instant::now();
    assert_eq!(
        std::fs::read(m.mnt_path("cached")).unwrap(),
        b"cached bytes"
    );
    std::fs::write(m.mnt_path("new"), b"written while src hangs").unwrap();
    assert!(std::fs::read_dir(m.mnt_path("")).is_ok());
    assert!(
        t.elapsed() < Duration::from_secs(6),
        "took {:?}",
        t.elapsed()
    );
    assert!(m.stderr().contains("is offline"), "{}", m.stderr());

    bind.pause(false);
    sleep(Duration::from_millis(1200));
    assert_eq!(
        std::fs::read(m.mnt_path("uncached")).unwrap(),
        b"only in src"
    );
    assert_eq!(
        std::fs::read(m.mnt_path("new")).unwrap(),
        b"written while src hangs"
    );
    m.stop();
}

/// rclone's unit clears a crashed mount with `fusermount -uz`: src's path is then the
/// empty directory under it until rclone mounts again. That directory is not src:
/// cachefs must stay offline (cached files shown and readable, none dropped as
/// "deleted in src"), and use the new mount once it is there.
#[test]
fn an_unmounted_src_leaves_an_empty_dir_that_is_not_taken_for_src() {
    if !can_mount("an_unmounted_src_leaves_an_empty_dir_that_is_not_taken_for_src") {
        return;
    }
    if !bindfs_support::have_bindfs() {
        panic!("bindfs is needed (scripts/install-deps.sh installs it)");
    }
    let real = dir_with(&[("cached", b"cached bytes"), ("uncached", b"only in src")]);
    let srcmnt = tempdir();
    let mut bind = BindfsSrc::start(real, srcmnt.path()).expect("bindfs starts");
    let m = Mounted::with_dirs(srcmnt, tempdir(), &["--revalidate", "1"]);
    assert_eq!(
        std::fs::read(m.mnt_path("cached")).unwrap(),
        b"cached bytes"
    );
    let list = |m: &Mounted| {
        let mut v: Vec<_> = std::fs::read_dir(m.mnt_path(""))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    assert_eq!(list(&m), ["cached", "uncached"]);

    bind.kill9();
    detach(&bind.mnt);
    // Past the kernel's TTL and the revalidation interval.
    sleep(Duration::from_millis(1500));
    assert_eq!(
        list(&m),
        ["cached"],
        "the empty mountpoint is not an empty src"
    );
    assert_eq!(
        std::fs::read(m.mnt_path("cached")).unwrap(),
        b"cached bytes"
    );
    assert!(m.dst_path("cached").exists(), "the clean copy was kept");
    assert!(
        m.stderr().contains("no longer a mount point"),
        "{}",
        m.stderr()
    );

    bind.restart();
    sleep(Duration::from_millis(1500));
    assert_eq!(list(&m), ["cached", "uncached"]);
    assert_eq!(
        std::fs::read(m.mnt_path("uncached")).unwrap(),
        b"only in src"
    );
    m.stop();
}
