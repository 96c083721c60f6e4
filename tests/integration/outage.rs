//! Outages of src: src behind a real bindfs mount that is killed with SIGKILL (as when
//! rclone crashes) and started again. Cached files keep working, new writes work,
//! unreachable files fail with EIO quickly, the mount stays responsive, and everything
//! comes back by itself when src is mounted again.

use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::bindfs_support::{self, BindfsSrc};
use crate::common::*;

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

/// Mounts a fresh tmpfs at `dir`.
fn mount_tmpfs(dir: &std::path::Path) {
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64m", "cachefs-test-src"])
        .arg(dir)
        .status()
        .expect("run mount");
    assert!(st.success(), "mount tmpfs at {}", dir.display());
}

/// A temporary directory with a fresh tmpfs mounted on it: (the directory, its
/// canonical path). Guard the path with [`Unmount`].
fn tmpfs_src() -> (TempDir, std::path::PathBuf) {
    let dir = tempdir();
    let path = std::fs::canonicalize(dir.path()).unwrap();
    mount_tmpfs(&path);
    (dir, path)
}

/// Unmounts whatever is at `dir` when dropped (the test's src).
struct Unmount<'a>(&'a std::path::Path);
impl Drop for Unmount<'_> {
    fn drop(&mut self) {
        while detach(self.0) {}
    }
}

fn bare_entries(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

/// Writeback replays through the same src gateway as the view: when src's filesystem
/// is detached (rclone died and its unit ran `fusermount3 -uz`), the bare directory
/// left at its path is not src. Before, replay opened src by path, wrote the queued
/// changes into that directory and marked them done: nothing reached the bucket, and
/// rclone then refused to mount over the non-empty directory.
#[test]
fn writeback_never_replays_into_the_bare_directory_of_an_unmounted_src() {
    if !can_mount("writeback_never_replays_into_the_bare_directory_of_an_unmounted_src") {
        return;
    }
    let (srcdir, src) = tmpfs_src();
    let _unmount = Unmount(&src);
    let m = Mounted::with_dirs(srcdir, tempdir(), &["-w", "--src-timeout", "2"]);
    std::fs::write(m.mnt_path("before"), b"before").unwrap();
    wait_drained(&m, Duration::from_secs(30));
    assert_eq!(std::fs::read(src.join("before")).unwrap(), b"before");

    assert!(detach(&src));
    std::fs::write(m.mnt_path("during"), b"written while src was gone").unwrap();
    std::fs::create_dir(m.mnt_path("dir")).unwrap();
    sleep(Duration::from_secs(3));
    assert_eq!(bare_entries(&src), Vec::<String>::new(), "{}", m.stderr());
    let (_, json) = hostile_status(m.dst.path());
    assert!(json_u64(&json, "pending_ops").unwrap() >= 2, "{json}");

    // The filesystem comes back (a new, empty one: the queue makes it whole).
    mount_tmpfs(&src);
    wait_drained(&m, Duration::from_secs(60));
    assert_eq!(
        std::fs::read(src.join("during")).unwrap(),
        b"written while src was gone"
    );
    assert!(src.join("dir").is_dir());
    m.stop();
}

/// A cachefs started while src's filesystem is not mounted (yet), where one was mounted
/// when it last ran, does not take the bare directory for src: it starts offline, and
/// writes reach the filesystem once it is mounted.
#[test]
fn a_start_before_src_is_mounted_does_not_take_the_bare_directory() {
    if !can_mount("a_start_before_src_is_mounted_does_not_take_the_bare_directory") {
        return;
    }
    let (srcdir, src) = tmpfs_src();
    let _unmount = Unmount(&src);
    let mut m = Mounted::with_dirs(srcdir, tempdir(), &["-w"]);
    std::fs::write(m.mnt_path("a"), b"a").unwrap();
    wait_drained(&m, Duration::from_secs(30));
    m.signal(libc::SIGTERM);
    m.wait_exit(Duration::from_secs(30));

    assert!(detach(&src));
    m.restart(&["-w"]);
    assert_eq!(
        std::fs::read(m.mnt_path("a")).unwrap(),
        b"a",
        "the cached copy is served"
    );
    std::fs::write(m.mnt_path("b"), b"b").unwrap();
    sleep(Duration::from_secs(2));
    assert_eq!(bare_entries(&src), Vec::<String>::new(), "{}", m.stderr());
    assert!(m.stderr().contains("is not one now"), "{}", m.stderr());
    let (_, json) = hostile_status(m.dst.path());
    assert!(
        json.contains("\"src_online\":false"),
        "status shows src offline: {json}"
    );

    mount_tmpfs(&src);
    wait_drained(&m, Duration::from_secs(60));
    assert_eq!(std::fs::read(src.join("b")).unwrap(), b"b");
    m.stop();
}

/// dst full (generic/213 of xfstests fills it with fallocate): deleting through the
/// mount must still work, since that is how a user frees space. With -w a delete
/// writes to dst (its journal record, a whiteout where src has the name): it failed
/// with ENOSPC, so nothing could be removed until space was freed behind cachefs.
#[test]
fn a_full_dst_still_takes_deletes() {
    if !can_mount("a_full_dst_still_takes_deletes") {
        return;
    }
    let dst = tempdir();
    let dst_path = std::fs::canonicalize(dst.path()).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "cachefs-test-dst"])
        .arg(&dst_path)
        .status()
        .expect("run mount");
    assert!(st.success());
    let _guard = Unmount(&dst_path);
    let src = dir_with(&[("in-src-1", b"from src"), ("in-src-2", b"from src")]);
    let m = Mounted::with_dirs(src, dst, &["-w"]);
    for n in ["in-src-1", "in-src-2"] {
        assert_eq!(std::fs::read(m.mnt_path(n)).unwrap(), b"from src");
    }
    // Fill dst through the mount until the writes fail.
    let mut i = 0;
    let chunk = vec![7u8; 256 << 10];
    loop {
        let p = m.mnt_path(&format!("fill{i}"));
        let r = std::fs::File::create(&p).and_then(|mut f| {
            std::io::Write::write_all(&mut f, &chunk)?;
            f.sync_all()
        });
        match r {
            Ok(()) => i += 1,
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
                break;
            }
        }
        assert!(i < 1000, "dst never filled");
    }
    // Top it off with small files until not even those fit.
    for j in 0..10_000 {
        if std::fs::write(m.mnt_path(&format!("small{j}")), b"x").is_err() {
            break;
        }
    }
    // Deletes go through: of a file only dst has, and of names src has too (a
    // whiteout and a journal record each).
    std::fs::remove_file(m.mnt_path("fill0"))
        .unwrap_or_else(|e| panic!("delete on a full dst: {e}\n{}", m.stderr()));
    for n in ["in-src-1", "in-src-2"] {
        std::fs::remove_file(m.mnt_path(n))
            .unwrap_or_else(|e| panic!("delete {n} on a full dst: {e}"));
    }
    for j in 1..i {
        std::fs::remove_file(m.mnt_path(&format!("fill{j}"))).unwrap();
    }
    wb_wait_status(m.dst.path(), Duration::from_secs(30), "drained", |s| {
        s.pending_ops == 0
    });
    assert!(!m.src_path("in-src-1").exists() && !m.src_path("in-src-2").exists());
    m.stop();
}
