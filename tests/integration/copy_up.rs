//! Copy on first open (DESIGN section 2) and stable inode numbers (section 1), on a real
//! mount in cache mode: preserved attributes, atomic single-flight copies, failed copies
//! that leave nothing, `st_ino`/`st_nlink` across copy-up, rename and hard links.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};

use crate::common::*;

/// Attribute caching off: every stat reaches the daemon.
const ARGS: &[&str] = &["--attr-ttl", "0"];

/// utimensat(path, [atime, mtime]) without following a final symlink.
fn set_times(p: &Path, atime: (i64, i64), mtime: (i64, i64)) {
    let ts = [
        libc::timespec {
            tv_sec: atime.0,
            tv_nsec: atime.1,
        },
        libc::timespec {
            tv_sec: mtime.0,
            tv_nsec: mtime.1,
        },
    ];
    let c = cpath(p);
    // SAFETY: valid path and a 2-element timespec array.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(
        r,
        0,
        "utimensat {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    let (c, n) = (cpath(p), std::ffi::CString::new(name).unwrap());
    // SAFETY: valid path, name and value.
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "lsetxattr {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

fn mtime(md: &fs::Metadata) -> (i64, i64) {
    (md.mtime(), md.mtime_nsec())
}

fn atime(md: &fs::Metadata) -> (i64, i64) {
    (md.atime(), md.atime_nsec())
}

fn lstat(p: &Path) -> fs::Metadata {
    fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()))
}

fn chown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).unwrap();
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

const F_ATIME: (i64, i64) = (1_000_000_000, 123_456_789);
const F_MTIME: (i64, i64) = (1_100_000_000, 987_654_321);

/// src: d1 (0750, 1111:2222) / d2 (0705, 3333:4444) / f (04755, 1234:5678, user.k),
/// f2, and the symlink d1/l -> d2/f (1234:5678); all with nanosecond times.
fn attr_src() -> TempDir {
    let src = dir_with(&[("d1/d2/f", b"first file"), ("d1/d2/f2", b"second")]);
    let p = src.path();
    let f = p.join("d1/d2/f");
    chown(&f, 1234, 5678);
    chmod(&f, 0o4755);
    set_xattr(&f, "user.k", b"value k");
    set_xattr(&f, "user.empty", b"");
    set_times(&f, F_ATIME, F_MTIME);
    symlink("d2/f", p.join("d1/l")).unwrap();
    chown(&p.join("d1/l"), 1234, 5678);
    set_times(&p.join("d1/l"), (1_200_000_000, 1), (1_300_000_000, 2));
    chown(&p.join("d1/d2"), 3333, 4444);
    chmod(&p.join("d1/d2"), 0o705);
    set_times(&p.join("d1/d2"), (1_400_000_000, 3), (1_500_000_000, 4));
    chown(&p.join("d1"), 1111, 2222);
    chmod(&p.join("d1"), 0o750);
    set_times(&p.join("d1"), (1_600_000_000, 5), (1_700_000_000, 6));
    src
}

#[test]
fn first_open_copies_content_mode_owner_times_xattrs_and_parents() {
    if !can_mount("first_open_copies_content_mode_owner_times_xattrs_and_parents") {
        return;
    }
    let src = attr_src();
    let before = snapshot(src.path());
    let m = Mounted::with_dirs(src, tempdir(), ARGS);
    let mnt_f = m.mnt_path("d1/d2/f");
    let seen = lstat(&mnt_f);
    assert_eq!(seen.mode(), libc::S_IFREG | 0o4755);
    assert_eq!((seen.uid(), seen.gid()), (1234, 5678));
    assert_eq!((mtime(&seen), atime(&seen)), (F_MTIME, F_ATIME));
    let dirs_before: Vec<_> = ["", "d1", "d1/d2"]
        .iter()
        .map(|d| mtime(&lstat(&m.mnt_path(d))))
        .collect();

    let mut file = fs::File::open(&mnt_f).unwrap();
    // Checked before reading through the mount (which may move dst's atime).
    let got = lstat(&m.dst_path("d1/d2/f"));
    assert_eq!(got.mode(), libc::S_IFREG | 0o4755, "mode incl. setuid");
    assert_eq!((got.uid(), got.gid()), (1234, 5678), "owner");
    assert_eq!(mtime(&got), F_MTIME, "mtime");
    assert_eq!(atime(&got), F_ATIME, "atime");
    assert_eq!(
        user_xattrs(&m.dst_path("d1/d2/f")),
        [
            ("user.empty".to_string(), Vec::new()),
            ("user.k".to_string(), b"value k".to_vec())
        ]
    );
    let mut content = Vec::new();
    file.read_to_end(&mut content).unwrap();
    drop(file);
    assert_eq!(content, b"first file");
    // Parents, created in dst with src's attributes.
    for (d, mode, uid, gid) in [("d1", 0o750, 1111, 2222), ("d1/d2", 0o705, 3333, 4444)] {
        let (s, t) = (lstat(&m.src_path(d)), lstat(&m.dst_path(d)));
        assert!(t.is_dir(), "{d}");
        assert_eq!(t.mode() & 0o7777, mode, "{d} mode");
        assert_eq!((t.uid(), t.gid()), (uid, gid), "{d} owner");
        assert_eq!(mtime(&t), mtime(&s), "{d} mtime in dst");
    }
    assert_eq!(names(&m.dst_path("d1/d2")), ["f"], "only f, no temp file");
    assert_eq!(names(&m.dst_path("d1")), ["d2"]);
    // The view did not change: same inode, attributes, and parents' mtimes.
    let after = lstat(&mnt_f);
    assert_eq!(after.ino(), seen.ino(), "st_ino across copy-up");
    assert_eq!(
        (after.mode(), after.uid(), after.gid()),
        (seen.mode(), 1234, 5678)
    );
    assert_eq!(mtime(&after), F_MTIME);
    let dirs_after: Vec<_> = ["", "d1", "d1/d2"]
        .iter()
        .map(|d| mtime(&lstat(&m.mnt_path(d))))
        .collect();
    assert_eq!(
        dirs_before, dirs_after,
        "mtime of /, d1, d1/d2 through the mount"
    );
    // A second copy into the now-existing dst directory does not move its mtime either.
    assert_eq!(fs::read(m.mnt_path("d1/d2/f2")).unwrap(), b"second");
    assert_eq!(mtime(&lstat(&m.mnt_path("d1/d2"))), dirs_before[2]);
    assert_eq!(mtime(&lstat(&m.dst_path("d1/d2"))), (1_500_000_000, 4));
    assert_eq!(
        user_xattrs(&mnt_f),
        [
            ("user.empty".to_string(), Vec::new()),
            ("user.k".to_string(), b"value k".to_vec())
        ]
    );
    assert_unchanged(m.src.path(), &before);
    m.stop();
}

#[test]
fn symlinks_stay_symlinks_when_copied() {
    if !can_mount("symlinks_stay_symlinks_when_copied") {
        return;
    }
    let src = attr_src();
    symlink("/nonexistent/abs", src.path().join("dangling")).unwrap();
    let before = snapshot(src.path());
    let m = Mounted::with_dirs(src, tempdir(), ARGS);
    let l = m.mnt_path("d1/l");
    let ino = lstat(&l).ino();
    assert!(lstat(&l).file_type().is_symlink());
    assert_eq!(fs::read_link(&l).unwrap(), Path::new("d2/f"));
    // lchown to the same owner: a metadata change, which copies the link up.
    chown(&l, 1234, 5678);
    let d = lstat(&m.dst_path("d1/l"));
    assert!(d.file_type().is_symlink(), "copied as a symlink");
    assert_eq!(
        fs::read_link(m.dst_path("d1/l")).unwrap(),
        Path::new("d2/f")
    );
    assert_eq!((d.uid(), d.gid()), (1234, 5678));
    assert_eq!(mtime(&d), (1_300_000_000, 2));
    assert_eq!(fs::read_link(&l).unwrap(), Path::new("d2/f"));
    assert_eq!(lstat(&l).ino(), ino);
    // Following it through the mount reaches the (copied) target.
    assert_eq!(fs::read(&l).unwrap(), b"first file");
    // A dangling absolute link is copied verbatim, not resolved.
    chown(&m.mnt_path("dangling"), 0, 0);
    assert_eq!(
        fs::read_link(m.dst_path("dangling")).unwrap(),
        Path::new("/nonexistent/abs")
    );
    assert_eq!(
        fs::read_link(m.mnt_path("dangling")).unwrap(),
        Path::new("/nonexistent/abs")
    );
    assert_unchanged(m.src.path(), &before);
    m.stop();
}

#[test]
fn directory_xattrs_survive_copy_up_of_a_child() {
    if !can_mount("directory_xattrs_survive_copy_up_of_a_child") {
        return;
    }
    let src = attr_src();
    set_xattr(&src.path().join("d1"), "user.dir", b"dv");
    let before = snapshot(src.path());
    let m = Mounted::with_dirs(src, tempdir(), ARGS);
    let want = [("user.dir".to_string(), b"dv".to_vec())];
    assert_eq!(user_xattrs(&m.mnt_path("d1")), want, "before copy-up");
    assert_eq!(fs::read(m.mnt_path("d1/d2/f")).unwrap(), b"first file");
    assert_eq!(
        user_xattrs(&m.mnt_path("d1")),
        want,
        "after copy-up of d1/d2/f"
    );
    assert_eq!(user_xattrs(&m.dst_path("d1")), want, "dst's d1");
    assert_unchanged(m.src.path(), &before);
    m.stop();
}

// ----- 4. atomic, single flight --------------------------------------------------------

#[test]
fn concurrent_first_opens_do_one_atomic_copy() {
    if !can_mount("concurrent_first_opens_do_one_atomic_copy") {
        return;
    }
    const SIZE: usize = 64 << 20;
    const THREADS: usize = 8;
    let data = Arc::new(pattern(SIZE, 42));
    let src = dir_with(&[("big/f", &data[..])]);
    let before = snapshot(src.path());
    // Whole copies: 64 MiB is the default lazy-fetch threshold (lazy_fetch.rs).
    let args = [ARGS, &["--lazy-threshold", "0"]].concat();
    let m = Mounted::with_dirs(src, tempdir(), &args);
    let target = m.mnt_path("big/f");
    assert_eq!(lstat(&target).len(), SIZE as u64);
    let ino = lstat(&target).ino();

    // A watcher polls dst: every temp name it sees is one copy; a visible f is complete.
    let done = Arc::new(AtomicBool::new(false));
    let temps = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
    let dst_dir = m.dst_path("big");
    let watcher = {
        let (done, temps, dst_dir) = (done.clone(), temps.clone(), dst_dir.clone());
        std::thread::spawn(move || {
            let mut partial = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let Ok(rd) = fs::read_dir(&dst_dir) else {
                    continue;
                };
                for e in rd.flatten() {
                    let n = e.file_name().to_string_lossy().into_owned();
                    if n.starts_with(".cachefs-tmp.") {
                        temps.lock().unwrap().insert(n);
                    } else if n == "f"
                        && let Ok(md) = fs::symlink_metadata(e.path())
                        && md.len() != SIZE as u64
                    {
                        partial.push(md.len());
                    }
                }
            }
            partial
        })
    };
    let barrier = Arc::new(Barrier::new(THREADS));
    let readers: Vec<_> = (0..THREADS)
        .map(|i| {
            let (barrier, data, target) = (barrier.clone(), data.clone(), target.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let mut f = fs::File::open(&target).map_err(|e| format!("open {i}: {e}"))?;
                let mut buf = vec![0u8; 1 << 20];
                let mut off = 0;
                loop {
                    let n = f.read(&mut buf).map_err(|e| format!("read {i}: {e}"))?;
                    if n == 0 {
                        break;
                    }
                    if off + n > SIZE || buf[..n] != data[off..off + n] {
                        return Err(format!("reader {i}: wrong bytes at offset {off}"));
                    }
                    off += n;
                }
                if off != SIZE {
                    return Err(format!("reader {i}: got {off} bytes"));
                }
                Ok(())
            })
        })
        .collect();
    let results: Vec<_> = readers.into_iter().map(|t| t.join().unwrap()).collect();
    done.store(true, Ordering::Relaxed);
    let partial = watcher.join().unwrap();
    for r in results {
        r.unwrap();
    }
    assert!(
        partial.is_empty(),
        "a partial f was visible in dst: sizes {partial:?}"
    );
    let temps = temps.lock().unwrap().clone();
    assert!(
        temps.len() <= 1,
        "more than one copy ran: temp files {temps:?}"
    );
    assert_eq!(names(&dst_dir), ["f"]);
    assert_eq!(
        find_names(m.dst.path(), &|n| n.starts_with(".cachefs-tmp")),
        Vec::<PathBuf>::new()
    );
    assert_eq!(lstat(&m.dst_path("big/f")).len(), SIZE as u64);
    assert_eq!(lstat(&target).ino(), ino);
    assert_unchanged(m.src.path(), &before);
    m.stop();
}

#[test]
fn concurrent_copies_into_one_new_dst_dir_keep_its_attributes() {
    if !can_mount("concurrent_copies_into_one_new_dst_dir_keep_its_attributes") {
        return;
    }
    const THREADS: usize = 8;
    const ROUNDS: usize = 40;
    let src = tempdir();
    for r in 0..ROUNDS {
        for i in 0..THREADS {
            write_file(src.path(), &format!("r{r}/s{i}/f"), format!("{r}.{i}"));
            set_times(&src.path().join(format!("r{r}/s{i}")), (5, 5), (6, 6));
        }
        set_times(
            &src.path().join(format!("r{r}")),
            (7, 7),
            (8_000_000 + r as i64, 9),
        );
    }
    let before = snapshot(src.path());
    let m = Mounted::with_dirs(src, tempdir(), ARGS);
    for r in 0..ROUNDS {
        let barrier = Arc::new(Barrier::new(THREADS));
        let ts: Vec<_> = (0..THREADS)
            .map(|i| {
                let p = m.mnt_path(&format!("r{r}/s{i}/f"));
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    fs::read_to_string(&p)
                })
            })
            .collect();
        for (i, t) in ts.into_iter().enumerate() {
            assert_eq!(t.join().unwrap().unwrap(), format!("{r}.{i}"));
        }
        // The race is probabilistic: several rounds, each checked at once.
        let d = format!("r{r}");
        assert_eq!(
            mtime(&lstat(&m.dst_path(&d))),
            (8_000_000 + r as i64, 9),
            "dst {d} mtime after concurrent copy-ups below it (round {r})"
        );
        assert_eq!(mtime(&lstat(&m.mnt_path(&d))), (8_000_000 + r as i64, 9));
        for i in 0..THREADS {
            assert_eq!(mtime(&lstat(&m.dst_path(&format!("r{r}/s{i}")))), (6, 6));
        }
    }
    assert_unchanged(m.src.path(), &before);
    m.stop();
}

// ----- 5. a failed copy leaves nothing -------------------------------------------------

/// A small tmpfs mounted over a dst subdirectory; detached on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, opts: &str) -> Tmpfs {
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
            .arg(at)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs on {}", at.display());
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        detach(&self.0);
    }
}

#[test]
fn failed_copy_on_a_full_dst_leaves_nothing_behind() {
    if !can_mount("failed_copy_on_a_full_dst_leaves_nothing_behind") {
        return;
    }
    let big = pattern(4 << 20, 7);
    let src = dir_with(&[("d/big", &big), ("d/small", b"small")]);
    let dst = tempdir();
    mkdirs(dst.path(), "d");
    let before = snapshot(src.path());
    let m = Mounted::with_dirs(src, dst, ARGS);
    // dst/d becomes a 1 MiB filesystem: the 4 MiB copy fails midway with ENOSPC.
    let _tmpfs = Tmpfs::mount(&m.dst_path("d"), "size=1m,mode=0755");
    for attempt in 0..2 {
        let e = errno_of("open d/big", fs::File::open(m.mnt_path("d/big")));
        assert_eq!(e, libc::ENOSPC, "attempt {attempt}");
        assert!(
            names(&m.dst_path("d")).is_empty(),
            "dst/d after a failed copy"
        );
    }
    // The view still shows src's file, and the filesystem still works.
    assert_eq!(lstat(&m.mnt_path("d/big")).len(), big.len() as u64);
    assert_eq!(names(&m.mnt_path("d")), ["big", "small"]);
    assert_eq!(fs::read(m.mnt_path("d/small")).unwrap(), b"small");
    assert_eq!(names(&m.dst_path("d")), ["small"]);
    drop(_tmpfs);
    // The daemon keeps directory fds for up to DIR_FD_TTL; a change to dst made behind
    // its back (here: a filesystem unmounted from under dst/d) is seen after that.
    std::thread::sleep(cachefs::fs::layer::DIR_FD_TTL);
    // With room again, the copy succeeds.
    assert!(
        fs::read(m.mnt_path("d/big")).unwrap() == big,
        "content after retry"
    );
    assert_unchanged(m.src.path(), &before);
    m.stop();
}

// ----- 6. stable inode numbers ---------------------------------------------------------

#[test]
fn inode_numbers_survive_copy_up_and_rename_and_match_readdir() {
    if !can_mount("inode_numbers_survive_copy_up_and_rename_and_match_readdir") {
        return;
    }
    let src = dir_with(&[("f", b"f"), ("dir/a/b", b"b"), ("both", b"s"), ("g", b"g")]);
    let dst = dir_with(&[("both", b"d"), ("donly", b"x")]);
    let before = snapshot(src.path());
    let m = Mounted::with_dirs(src, dst, ARGS);
    // d_ino from readdir equals st_ino from stat.
    for e in fs::read_dir(m.mountpoint()).unwrap() {
        let e = e.unwrap();
        assert_eq!(
            std::os::unix::fs::DirEntryExt::ino(&e),
            lstat(&e.path()).ino(),
            "{:?}",
            e.file_name()
        );
    }
    let ino = |r: &str| lstat(&m.mnt_path(r)).ino();
    let (f, dir, b, g) = (ino("f"), ino("dir"), ino("dir/a/b"), ino("g"));
    let all = [f, dir, b, g, ino("both"), ino("donly"), ino("dir/a")];
    let mut uniq = all.to_vec();
    uniq.sort();
    uniq.dedup();
    assert_eq!(
        uniq.len(),
        all.len(),
        "distinct objects, distinct numbers: {all:?}"
    );
    drop(fs::File::open(m.mnt_path("f")).unwrap());
    assert_eq!(ino("f"), f, "after copy-up");
    fs::write(m.mnt_path("g"), b"changed").unwrap();
    assert_eq!(ino("g"), g, "after a write");
    fs::rename(m.mnt_path("f"), m.mnt_path("f2")).unwrap();
    assert_eq!(ino("f2"), f, "after rename of a file");
    fs::rename(m.mnt_path("dir"), m.mnt_path("dir2")).unwrap();
    assert_eq!(ino("dir2"), dir, "after rename of a directory");
    assert_eq!(ino("dir2/a/b"), b, "child after rename of its directory");
    assert_unchanged(m.src.path(), &before);
    m.stop();
}

#[test]
fn hard_links_share_one_inode_and_count_links() {
    if !can_mount("hard_links_share_one_inode_and_count_links") {
        return;
    }
    let src = dir_with(&[("s", b"src file"), ("d/x", b"x")]);
    let dst = dir_with(&[("p1", b"pre")]);
    fs::hard_link(dst.path().join("p1"), dst.path().join("p2")).unwrap();
    let before = snapshot(src.path());
    let m = Mounted::with_dirs(src, dst, ARGS);
    let st = |r: &str| {
        let md = lstat(&m.mnt_path(r));
        (md.ino(), md.nlink())
    };
    // Links already in dst.
    let (p1, n) = st("p1");
    assert_eq!((st("p2"), n), ((p1, 2), 2));
    // Links made through the mount, of a new file.
    fs::write(m.mnt_path("h"), b"hh").unwrap();
    let (h, _) = st("h");
    fs::hard_link(m.mnt_path("h"), m.mnt_path("d/h2")).unwrap();
    assert_eq!(st("h"), (h, 2));
    assert_eq!(st("d/h2"), (h, 2));
    fs::write(m.mnt_path("d/h2"), b"via h2").unwrap();
    assert_eq!(fs::read(m.mnt_path("h")).unwrap(), b"via h2");
    fs::remove_file(m.mnt_path("h")).unwrap();
    assert_eq!(st("d/h2"), (h, 1));
    // Links of an uncached src file (copied up first).
    let (s, n) = st("s");
    assert_eq!(n, 1);
    fs::hard_link(m.mnt_path("s"), m.mnt_path("s2")).unwrap();
    assert_eq!(st("s"), (s, 2));
    assert_eq!(st("s2"), (s, 2));
    assert_eq!(fs::read(m.mnt_path("s2")).unwrap(), b"src file");
    fs::remove_file(m.mnt_path("s")).unwrap();
    assert_eq!(st("s2"), (s, 1));
    assert_eq!(
        errno_of("stat s", fs::symlink_metadata(m.mnt_path("s"))),
        libc::ENOENT
    );
    assert_eq!(fs::read(m.mnt_path("s2")).unwrap(), b"src file");
    assert_eq!(st("p1"), (p1, 2));
    assert_unchanged(m.src.path(), &before);
    m.stop();
}
