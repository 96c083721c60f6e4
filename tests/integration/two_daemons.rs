//! Two cachefs daemons (two machines) on one src with `-w --revalidate 1`: each sees
//! the other's written-back changes within the revalidation interval, and a file both
//! changed is a conflict: the last writer's version wins on src, the other version is
//! kept beside it as `NAME.conflict-<unix secs>`, a warning is logged and
//! `cachefs_conflicts_total` counts it.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::common::*;

const REVALIDATE: Duration = Duration::from_secs(1);
/// The interval, plus the kernel's entry/attribute TTL (1 s) and some slack.
const VISIBLE_WITHIN: Duration = Duration::from_millis(3500);

fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        sleep(Duration::from_millis(50));
    }
    t.elapsed()
}

fn read(p: &Path) -> Option<Vec<u8>> {
    fs::read(p).ok()
}

/// `cachefs_conflicts_total` from the daemon's `--metrics-addr`.
fn conflicts_total(m: &Mounted) -> f64 {
    let needle = "serving metrics at http://";
    let log = m.wait_for_log(needle, Duration::from_secs(10));
    let rest = &log[log.find(needle).unwrap() + needle.len()..];
    let addr: SocketAddr = rest[..rest.find("/metrics").unwrap()].parse().unwrap();
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp.lines()
        .find_map(|l| l.strip_prefix("cachefs_conflicts_total "))
        .expect("cachefs_conflicts_total in the scrape")
        .parse()
        .unwrap()
}

#[test]
fn two_daemons_share_one_src() {
    if !can_mount("two_daemons_share_one_src") {
        return;
    }
    let src = dir_with(&[("shared", b"v1"), ("both", b"v1")]);
    let src_path = src.path().to_path_buf();
    let args = ["-w", "--revalidate", "1", "--metrics-addr", "127.0.0.1:0"];
    let a = Mounted::with_dirs(src, tempdir(), &args);
    // B's src is the same directory, bind-mounted on B's own (empty) src TempDir. The
    // guard is declared after `b`, so it unmounts before `b`'s drop removes that
    // TempDir (whose removal would otherwise empty the shared src).
    let mut b = Mounted::with_dirs(tempdir(), tempdir(), &args);
    b.signal(libc::SIGTERM);
    assert!(b.wait_exit(STOP_TIMEOUT).success());
    let _bind = BindMount::new(&src_path, b.src.path());
    b.restart(&args);

    // Both cache the files.
    for m in [&a, &b] {
        assert_eq!(read(&m.mnt_path("shared")).unwrap(), b"v1");
        assert_eq!(read(&m.mnt_path("both")).unwrap(), b"v1");
        assert_eq!(names(m.mountpoint()), ["both", "shared"]);
    }

    // 1. A new file written through A shows through B once A's queue drained.
    fs::write(a.mnt_path("fromA"), b"written through A").unwrap();
    wait_until(Duration::from_secs(20), "A's write reaches src", || {
        read(&src_path.join("fromA")).as_deref() == Some(b"written through A")
    });
    let took = wait_until(VISIBLE_WITHIN, "B sees A's new file", || {
        read(&b.mnt_path("fromA")).as_deref() == Some(b"written through A")
    });
    eprintln!("B saw A's new file {took:?} after it reached src");
    wait_until(VISIBLE_WITHIN, "B lists A's new file", || {
        names(b.mountpoint()) == ["both", "fromA", "shared"]
    });

    // 2. A file B has cached, changed through A, shows changed through B.
    fs::write(a.mnt_path("shared"), b"v2 from A").unwrap();
    wait_until(Duration::from_secs(20), "A's change reaches src", || {
        read(&src_path.join("shared")).as_deref() == Some(b"v2 from A")
    });
    let took = wait_until(VISIBLE_WITHIN, "B sees A's change", || {
        read(&b.mnt_path("shared")).as_deref() == Some(b"v2 from A")
    });
    eprintln!("B saw A's change {took:?} after it reached src");
    // And the other way round.
    fs::write(b.mnt_path("shared"), b"v3 from B").unwrap();
    wait_until(Duration::from_secs(20), "B's change reaches src", || {
        read(&src_path.join("shared")).as_deref() == Some(b"v3 from B")
    });
    wait_until(VISIBLE_WITHIN, "A sees B's change", || {
        read(&a.mnt_path("shared")).as_deref() == Some(b"v3 from B")
    });

    // 3. A conflict: B changes "both" while its copy is from before A's change. B holds
    // the file open (an open file is never refetched under a reader), so B's copy is
    // still v1 when A's change lands on src.
    let conflicts_before = conflicts_total(&b);
    let held = File::open(b.mnt_path("both")).unwrap();
    fs::write(a.mnt_path("both"), b"A's version").unwrap();
    wait_until(Duration::from_secs(20), "A's version reaches src", || {
        read(&src_path.join("both")).as_deref() == Some(b"A's version")
    });
    sleep(REVALIDATE + Duration::from_millis(200));
    let mut w = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(b.mnt_path("both"))
        .unwrap();
    w.write_all(b"B's version").unwrap();
    drop(w);
    drop(held);
    // B's local version wins on src; A's is kept beside it.
    wait_until(Duration::from_secs(20), "B's version reaches src", || {
        read(&src_path.join("both")).as_deref() == Some(b"B's version")
    });
    let kept: Vec<String> = names(&src_path)
        .into_iter()
        .filter(|n| n.starts_with("both.conflict-"))
        .collect();
    assert_eq!(kept.len(), 1, "{:?}", names(&src_path));
    let secs: u64 = kept[0]["both.conflict-".len()..]
        .parse()
        .expect("unix seconds");
    assert!(secs > 1_600_000_000, "{}", kept[0]);
    assert_eq!(read(&src_path.join(&kept[0])).unwrap(), b"A's version");
    let log = b.wait_for_log("conflict: both changed on src", Duration::from_secs(5));
    assert!(log.contains(&format!("kept as {}", kept[0])), "{log}");
    assert!(log.contains("WARN"), "a warning: {log}");
    assert_eq!(conflicts_total(&b), conflicts_before + 1.0);
    // Both mounts end up showing the same: B's version and the conflict file.
    for m in [&a, &b] {
        wait_until(
            VISIBLE_WITHIN,
            "the conflict shows through both mounts",
            || {
                read(&m.mnt_path("both")).as_deref() == Some(b"B's version")
                    && read(&m.mnt_path(&kept[0])).as_deref() == Some(b"A's version")
            },
        );
    }
    a.stop();
    // Stop B before the bind mount goes (see above).
    b.signal(libc::SIGTERM);
    assert!(b.wait_exit(STOP_TIMEOUT).success(), "{}", b.stderr());
}

/// Two daemons on one src, both `args`: A over `src` directly, B over a bind mount of
/// it. Bind the three results in this order (`let (a, b, _bind) = ...`): locals drop in
/// reverse, so the bind mount goes before B's TempDir is removed (which would
/// otherwise empty the shared src).
fn two_on_one_src(src: tempfile::TempDir, args: &[&str]) -> (Mounted, Mounted, BindMount) {
    let src_path = src.path().to_path_buf();
    let a = Mounted::with_dirs(src, tempdir(), args);
    let mut b = Mounted::with_dirs(tempdir(), tempdir(), args);
    b.signal(libc::SIGTERM);
    assert!(b.wait_exit(STOP_TIMEOUT).success());
    let bind = BindMount::new(&src_path, b.src.path());
    b.restart(args);
    (a, b, bind)
}

/// Files created through a mount get an origin record once written back (kept in the
/// state folder, not on the file), so they are revalidated like fetched ones: A sees
/// B's later change to a file A created, and A's later edit of it while B changed it
/// too is a conflict (seen by A), not a silent overwrite of B's version.
#[test]
fn files_created_here_are_revalidated_and_conflict_after_writeback() {
    if !can_mount("files_created_here_are_revalidated_and_conflict_after_writeback") {
        return;
    }
    let src = tempdir();
    let src_path = src.path().to_path_buf();
    let args = ["-w", "--revalidate", "1", "--metrics-addr", "127.0.0.1:0"];
    let (a, b, _bind) = two_on_one_src(src, &args);

    // 1. Created through A, written back; B then changes it: A sees B's bytes.
    fs::write(a.mnt_path("created"), b"A1").unwrap();
    wait_until(Duration::from_secs(20), "A's file reaches src", || {
        read(&src_path.join("created")).as_deref() == Some(b"A1")
    });
    wait_drained(&a, Duration::from_secs(20));
    assert_eq!(read(&b.mnt_path("created")).unwrap(), b"A1");
    fs::write(b.mnt_path("created"), b"B2, longer").unwrap();
    wait_until(Duration::from_secs(20), "B's change reaches src", || {
        read(&src_path.join("created")).as_deref() == Some(b"B2, longer")
    });
    let took = wait_until(VISIBLE_WITHIN, "A sees B's change to A's file", || {
        read(&a.mnt_path("created")).as_deref() == Some(b"B2, longer")
    });
    eprintln!("A saw B's change to the file A created {took:?} after it reached src");

    // 2. Created through A, written back, then changed on both sides: A holds it open
    // (an open file is never refetched), B's version lands on src, then A writes.
    let conflicts_before = conflicts_total(&a);
    fs::write(a.mnt_path("made"), b"A's first").unwrap();
    wait_until(Duration::from_secs(20), "A's file reaches src", || {
        read(&src_path.join("made")).as_deref() == Some(b"A's first")
    });
    wait_drained(&a, Duration::from_secs(20));
    let held = File::open(a.mnt_path("made")).unwrap();
    fs::write(b.mnt_path("made"), b"B's version").unwrap();
    wait_until(Duration::from_secs(20), "B's version reaches src", || {
        read(&src_path.join("made")).as_deref() == Some(b"B's version")
    });
    sleep(REVALIDATE + Duration::from_millis(200));
    let mut w = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(a.mnt_path("made"))
        .unwrap();
    w.write_all(b"A's second").unwrap();
    drop(w);
    drop(held);
    // A's local version wins on src; B's is kept beside it, with a warning on A.
    wait_until(Duration::from_secs(20), "A's version reaches src", || {
        read(&src_path.join("made")).as_deref() == Some(b"A's second")
    });
    let kept: Vec<String> = names(&src_path)
        .into_iter()
        .filter(|n| n.starts_with("made.conflict-"))
        .collect();
    assert_eq!(kept.len(), 1, "{:?}\n{}", names(&src_path), a.stderr());
    assert_eq!(read(&src_path.join(&kept[0])).unwrap(), b"B's version");
    let log = a.wait_for_log("conflict: made changed on src", Duration::from_secs(5));
    assert!(log.contains(&format!("kept as {}", kept[0])), "{log}");
    assert!(log.contains("WARN"), "a warning: {log}");
    assert_eq!(conflicts_total(&a), conflicts_before + 1.0);
    for m in [&a, &b] {
        wait_until(
            VISIBLE_WITHIN,
            "the conflict shows through both mounts",
            || {
                read(&m.mnt_path("made")).as_deref() == Some(b"A's second")
                    && read(&m.mnt_path(&kept[0])).as_deref() == Some(b"B's version")
            },
        );
    }
    a.stop();
    let mut b = b;
    b.signal(libc::SIGTERM);
    assert!(b.wait_exit(STOP_TIMEOUT).success(), "{}", b.stderr());
}

/// Writeback never touches the dst file's inode (pjdfstest -w checks ctimes): a file
/// created through the mount keeps its ctime across its upload, as seen through the
/// mount and on dst.
#[test]
fn writeback_keeps_the_ctime_of_created_files() {
    if !can_mount("writeback_keeps_the_ctime_of_created_files") {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let m = Mounted::with_dirs(tempdir(), tempdir(), &["-w", "--revalidate", "1"]);
    let ctime = |p: &Path| {
        let md = fs::symlink_metadata(p).unwrap();
        (md.ctime(), md.ctime_nsec())
    };
    fs::write(m.mnt_path("f"), b"data").unwrap();
    fs::create_dir(m.mnt_path("d")).unwrap();
    fs::write(m.mnt_path("d/g"), b"more").unwrap();
    let before: Vec<_> = ["f", "d/g"]
        .iter()
        .map(|f| (ctime(&m.mnt_path(f)), ctime(&m.dst_path(f))))
        .collect();
    wait_drained(&m, Duration::from_secs(20));
    assert_eq!(read(&m.src_path("d/g")).unwrap(), b"more");
    // Past the kernel's attribute TTL, so the mount's stat comes from the daemon.
    sleep(Duration::from_millis(1200));
    let after: Vec<_> = ["f", "d/g"]
        .iter()
        .map(|f| (ctime(&m.mnt_path(f)), ctime(&m.dst_path(f))))
        .collect();
    assert_eq!(
        before, after,
        "ctimes (mount, dst) before and after writeback"
    );
    m.stop();
}

/// `mount --bind from to`, undone on drop.
struct BindMount(std::path::PathBuf);

impl BindMount {
    fn new(from: &Path, to: &Path) -> BindMount {
        let st = std::process::Command::new("mount")
            .arg("--bind")
            .arg(from)
            .arg(to)
            .status()
            .unwrap();
        assert!(
            st.success(),
            "mount --bind {} {}",
            from.display(),
            to.display()
        );
        BindMount(to.to_path_buf())
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        let c = cpath(&self.0);
        // SAFETY: valid NUL-terminated path.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// One daemon alone: a file that keeps changing while its upload runs is no conflict.
/// (Replay once took src's new version, its own upload, for a change made elsewhere,
/// and kept it as a conflict file.)
#[test]
fn writes_during_an_upload_are_no_conflict() {
    if !can_mount("writes_during_an_upload_are_no_conflict") {
        return;
    }
    let src = dir_with(&[("big", b"v1")]);
    let src_path = src.path().to_path_buf();
    let m = Mounted::with_dirs(src, tempdir(), &["-w"]);
    assert_eq!(read(&m.mnt_path("big")).unwrap(), b"v1");
    let chunk = vec![7u8; 8 << 20];
    let mut f = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(m.mnt_path("big"))
        .unwrap();
    for _ in 0..4 {
        // fsync journals the write: its upload starts while more is written.
        f.write_all(&chunk).unwrap();
        f.sync_all().unwrap();
        f.write_all(&chunk).unwrap();
    }
    drop(f);
    let want = 8 * chunk.len() as u64;
    wait_until(
        Duration::from_secs(60),
        "the last version reaches src",
        || fs::metadata(src_path.join("big")).is_ok_and(|md| md.len() == want),
    );
    sleep(Duration::from_millis(300));
    let names = names(&src_path);
    assert_eq!(
        names,
        ["big"],
        "no conflict file: {names:?}\n{}",
        m.stderr()
    );
    m.stop();
}
