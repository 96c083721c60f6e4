//! The kernel's directory cache (issue 17): directories are opened `FOPEN_CACHE_DIR`,
//! and `FOPEN_KEEP_CACHE` while the core knows the listing the kernel cached is still
//! the listing. A second listing of an unchanged directory reaches the daemon with no
//! READDIR / READDIRPLUS (counted through the metrics endpoint); every change still
//! shows: through the mount at once (the kernel drops its cache itself), in src after
//! `--revalidate` (at once with `--revalidate 0`), and at once when the daemon learns
//! of it (a lookup, `cachefs ctl revalidate`, a writeback conflict copy).

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::metrics::{metrics_addr, scrape, scrape_until};

fn op(s: &HashMap<String, f64>, op: &str) -> f64 {
    s.get(&format!(
        "cachefs_fuse_op_duration_seconds_count{{op=\"{op}\"}}"
    ))
    .copied()
    .unwrap_or(0.0)
}

fn listings(s: &HashMap<String, f64>) -> f64 {
    op(s, "readdir") + op(s, "readdirplus")
}

/// A mount whose src has `d/f0` .. `d/f{n-1}` and `e/g`, and dst `d/local`, with a
/// metrics endpoint. dst holds `d`, so the mount shows dst's attributes of `d`: a
/// change in src does not change its mtime (which would make the kernel drop its
/// cached listing by itself when it next asks for the attributes).
struct Bed {
    m: Mounted,
    addr: SocketAddr,
}

impl Bed {
    fn new(n: usize, args: &[&str]) -> Bed {
        let src = tempdir();
        for i in 0..n {
            write_file(src.path(), &format!("d/f{i}"), b"x");
        }
        write_file(src.path(), "e/g", b"g");
        let mut all = vec!["--metrics-addr", "127.0.0.1:0"];
        all.extend_from_slice(args);
        let dst = dir_with(&[("d/local", b"l")]);
        let m = Mounted::with_dirs(src, dst, &all);
        let addr = metrics_addr(&m);
        Bed { m, addr }
    }

    /// Lists `rel` through the mount: its sorted names, and whether the listing
    /// reached the daemon (a READDIR or READDIRPLUS), counted once the daemon saw the
    /// directory closed (its readdirs were answered before the close).
    fn list(&self, rel: &str) -> (Vec<String>, bool) {
        let before = scrape(self.addr);
        let names = names(&self.m.mnt_path(rel));
        scrape_until(self.addr, Duration::from_secs(10), "RELEASEDIR", |s| {
            op(s, "releasedir") > op(&before, "releasedir")
        });
        // A readdir's time is recorded just after its reply: slack for a worker
        // descheduled in between.
        sleep(Duration::from_millis(100));
        let after = scrape(self.addr);
        (names, listings(&after) > listings(&before))
    }
}

fn set(names: &[String]) -> BTreeSet<String> {
    names.iter().cloned().collect()
}

#[test]
fn a_second_listing_of_an_unchanged_directory_is_the_kernels() {
    if !can_mount("a_second_listing_of_an_unchanged_directory_is_the_kernels") {
        return;
    }
    let b = Bed::new(300, &["--attr-ttl", "10s"]);
    let (first, went) = b.list("d");
    assert_eq!(first.len(), 301);
    assert!(went, "the first listing is the daemon's");
    for _ in 0..2 {
        let (again, went) = b.list("d");
        assert_eq!(again, first);
        assert!(
            !went,
            "a listing of an unchanged directory reached the daemon"
        );
    }
    b.m.stop();
}

#[test]
fn with_revalidate_0_every_listing_reaches_the_daemon() {
    if !can_mount("with_revalidate_0_every_listing_reaches_the_daemon") {
        return;
    }
    let b = Bed::new(20, &["--revalidate", "0"]);
    for _ in 0..3 {
        let (names, went) = b.list("d");
        assert_eq!(names.len(), 21);
        assert!(went, "--revalidate 0 lists at every open");
    }
    // And so a change in src shows at the next listing.
    write_file(b.m.src.path(), "d/new", b"n");
    fs::remove_file(b.m.src_path("d/f0")).unwrap();
    let (names, _) = b.list("d");
    assert!(names.contains(&"new".to_string()), "{names:?}");
    assert!(!names.contains(&"f0".to_string()), "{names:?}");
    b.m.stop();
}

/// The kernel drops its cached listing at every change through the mount (create,
/// mknod, mkdir, symlink, link, unlink, rmdir, rename, in both directories).
#[test]
fn changes_through_the_mount_show_at_once() {
    if !can_mount("changes_through_the_mount_show_at_once") {
        return;
    }
    let b = Bed::new(10, &["--attr-ttl", "10s"]);
    let mnt = |rel: &str| b.m.mnt_path(rel);
    let (first, _) = b.list("d");
    assert!(!b.list("d").1, "cached");
    let (e_names, _) = b.list("e");
    let mut d = set(&first);
    let mut e = set(&e_names);
    let check = |what: &str, d: &BTreeSet<String>, e: &BTreeSet<String>| {
        let (names, went) = b.list("d");
        assert_eq!(set(&names), *d, "d after {what}");
        assert!(went, "after {what}, d's listing was not asked again");
        let (names, _) = b.list("e");
        assert_eq!(set(&names), *e, "e after {what}");
    };
    let s = |n: &str| n.to_string();

    fs::write(mnt("d/new"), b"n").unwrap();
    d.insert(s("new"));
    check("create", &d, &e);
    fs::create_dir(mnt("d/sub")).unwrap();
    d.insert(s("sub"));
    check("mkdir", &d, &e);
    std::os::unix::fs::symlink("f0", mnt("d/link")).unwrap();
    d.insert(s("link"));
    check("symlink", &d, &e);
    fs::hard_link(mnt("d/f1"), mnt("d/f1.hard")).unwrap();
    d.insert(s("f1.hard"));
    check("link", &d, &e);
    let fifo = cpath(&mnt("d/fifo"));
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    d.insert(s("fifo"));
    check("mknod", &d, &e);
    fs::rename(mnt("d/f2"), mnt("d/f2.moved")).unwrap();
    d.remove("f2");
    d.insert(s("f2.moved"));
    check("rename in d", &d, &e);
    fs::rename(mnt("e/g"), mnt("d/g")).unwrap();
    e.remove("g");
    d.insert(s("g"));
    check("rename from e to d", &d, &e);
    fs::rename(mnt("d/f3"), mnt("e/f3")).unwrap();
    d.remove("f3");
    e.insert(s("f3"));
    check("rename from d to e", &d, &e);
    fs::remove_file(mnt("d/f4")).unwrap();
    d.remove("f4");
    check("unlink", &d, &e);
    fs::remove_dir(mnt("d/sub")).unwrap();
    d.remove("sub");
    check("rmdir", &d, &e);
    // Unchanged again: the kernel's once more (after one listing that refills it).
    b.list("d");
    let (names, went) = b.list("d");
    assert_eq!(set(&names), d);
    assert!(!went, "cached again");
    b.m.stop();
}

/// A change made in src (by another machine) shows once the listing the kernel holds
/// is older than `--revalidate`: the next opendir asks the daemon, which lists src.
#[test]
fn a_src_change_shows_after_the_revalidation_interval() {
    if !can_mount("a_src_change_shows_after_the_revalidation_interval") {
        return;
    }
    let every = Duration::from_secs(2);
    let b = Bed::new(10, &["--revalidate", "2s", "--attr-ttl", "10s"]);
    let (first, went) = b.list("d");
    assert!(went);
    // The daemon's listing started before this.
    let listed = Instant::now();
    write_file(b.m.src.path(), "d/new", b"n");
    fs::remove_file(b.m.src_path("d/f0")).unwrap();
    let (names, went) = b.list("d");
    if listed.elapsed() < every {
        assert!(!went, "cached within the interval");
        assert_eq!(names, first, "served from the kernel's cache");
    }
    if let Some(rest) = (listed + every).checked_duration_since(Instant::now()) {
        sleep(rest + Duration::from_millis(20));
    }
    let (names, went) = b.list("d");
    assert!(
        went,
        "a listing older than --revalidate was served by the kernel"
    );
    assert!(names.contains(&"new".to_string()), "{names:?}");
    assert!(!names.contains(&"f0".to_string()), "{names:?}");
    b.m.stop();
}

/// A name the daemon finds in src, or finds gone, by a lookup or an open drops the
/// kernel's listing of its directory: the next listing shows it, well within
/// `--revalidate` and `--attr-ttl`.
#[test]
fn a_src_change_found_by_the_daemon_shows_in_the_next_listing() {
    if !can_mount("a_src_change_found_by_the_daemon_shows_in_the_next_listing") {
        return;
    }
    let b = Bed::new(300, &["--attr-ttl", "10s"]);
    let has = |names: &[String], n: &str| names.iter().any(|x| x == n);
    b.list("d");
    assert!(!b.list("d").1, "cached");

    // A lookup finds a name src gained.
    write_file(b.m.src.path(), "d/new", b"n");
    fs::metadata(b.m.mnt_path("d/new")).expect("the lookup finds src's new name");
    let (names, _) = b.list("d");
    assert!(has(&names, "new"), "{names:?}");
    assert!(!b.list("d").1, "cached");

    // An open finds gone a name the kernel holds an entry for.
    fs::metadata(b.m.mnt_path("d/f1")).unwrap();
    fs::remove_file(b.m.src_path("d/f1")).unwrap();
    let e = fs::File::open(b.m.mnt_path("d/f1")).expect_err("src deleted f1");
    assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
    let (names, _) = b.list("d");
    assert!(!has(&names, "f1"), "{names:?}");
    assert!(!b.list("d").1, "cached");

    // A lookup finds gone names the kernel holds no entry for (a listing gives
    // entries in its first reply only, a READDIRPLUS; the rest are plain READDIR).
    let gone: Vec<String> = (50..300).map(|i| format!("f{i}")).collect();
    for n in &gone {
        fs::remove_file(b.m.src_path(&format!("d/{n}"))).unwrap();
    }
    let asked = gone
        .iter()
        .filter(|n| fs::symlink_metadata(b.m.mnt_path(&format!("d/{n}"))).is_err())
        .count();
    assert!(asked > 0, "every removed name had a kernel entry");
    let (names, _) = b.list("d");
    let shown: Vec<&String> = gone.iter().filter(|n| has(&names, n)).collect();
    assert!(shown.is_empty(), "src deleted {shown:?}");
    b.m.stop();
}

/// `cachefs ctl DST revalidate PATH` drops the kernel's listings too.
#[test]
fn ctl_revalidate_drops_the_kernels_listings() {
    if !can_mount("ctl_revalidate_drops_the_kernels_listings") {
        return;
    }
    let b = Bed::new(10, &["--attr-ttl", "10s"]);
    b.list("d");
    assert!(!b.list("d").1, "cached");
    write_file(b.m.src.path(), "d/new", b"n");
    let sock = b.m.dst.path().join(".cachefs-state/control.sock");
    let t = Instant::now();
    while !sock.exists() {
        assert!(t.elapsed() < Duration::from_secs(10), "no control socket");
        sleep(Duration::from_millis(20));
    }
    let out = Command::new(cachefs_bin())
        .arg("ctl")
        .arg(b.m.dst.path())
        .args(["revalidate", "/d"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let (names, went) = b.list("d");
    assert!(went);
    assert!(names.contains(&"new".to_string()), "{names:?}");
    b.m.stop();
}

/// The conflict copy the writeback makes in src (src's version kept beside the local
/// one) shows in the next listing, though src changed behind the kernel.
#[test]
fn a_conflict_copy_shows_in_the_next_listing() {
    if !can_mount("a_conflict_copy_shows_in_the_next_listing") {
        return;
    }
    let b = Bed::new(3, &["-w", "--attr-ttl", "10s"]);
    assert_eq!(fs::read(b.m.mnt_path("d/f0")).unwrap(), b"x");
    // Another machine's version, unseen here (the copy was checked just now).
    fs::write(b.m.src_path("d/f0"), b"the other machine's version").unwrap();
    b.list("d");
    assert!(!b.list("d").1, "cached");
    fs::write(b.m.mnt_path("d/f0"), b"mine").unwrap();
    let t = Instant::now();
    let in_src = loop {
        let kept: Vec<String> = names(&b.m.src_path("d"))
            .into_iter()
            .filter(|n| n.starts_with("f0.conflict-"))
            .collect();
        if !kept.is_empty() {
            break kept;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "no conflict copy");
        sleep(Duration::from_millis(50));
    };
    let (names, _) = b.list("d");
    assert!(names.contains(&in_src[0]), "{names:?} lacks {in_src:?}");
    b.m.stop();
}

/// src going offline, and coming back, changes every merged listing (offline: dst's
/// names only): the kernel's cached listings are not kept across either.
#[test]
fn listings_follow_src_going_offline_and_back() {
    if !can_mount("listings_follow_src_going_offline_and_back") {
        return;
    }
    assert!(
        crate::bindfs_support::have_bindfs(),
        "bindfs is needed (scripts/install-deps.sh installs it)"
    );
    let real = dir_with(&[("d/f0", b"x"), ("d/f1", b"x")]);
    let srcmnt = tempdir();
    let mut bind = crate::bindfs_support::BindfsSrc::start(real, srcmnt.path()).expect("bindfs");
    let m = Mounted::with_dirs(srcmnt, dir_with(&[("d/local", b"l")]), &[]);
    let all = ["f0", "f1", "local"];
    assert_eq!(names(&m.mnt_path("d")), all);
    assert_eq!(names(&m.mnt_path("d")), all);

    bind.kill9();
    // A lookup of a name the mount has not seen asks src, which fails: offline.
    let _ = fs::metadata(m.mnt_path("d/unseen"));
    m.wait_for_log("is offline", Duration::from_secs(10));
    assert_eq!(names(&m.mnt_path("d")), ["local"], "offline: dst's names");

    bind.restart();
    let t = Instant::now();
    while !m.stderr().contains("answers again") {
        assert!(t.elapsed() < Duration::from_secs(10), "src not back");
        let _ = fs::metadata(m.mnt_path("d/unseen"));
        sleep(Duration::from_millis(100));
    }
    assert_eq!(
        names(&m.mnt_path("d")),
        all,
        "online again: src's names too"
    );
    m.stop();
}

/// A cached copy that revalidation drops because src deleted the file leaves the
/// view at once: the kernel's listing (taken after the copy's last check, so still
/// fresh when the check falls due) is not kept.
#[test]
fn a_copy_revalidation_drops_leaves_the_next_listing() {
    if !can_mount("a_copy_revalidation_drops_leaves_the_next_listing") {
        return;
    }
    let every = Duration::from_secs(4);
    let b = Bed::new(3, &["--revalidate", "4s", "--attr-ttl", "10s"]);
    // Fetched (and checked against src) now.
    assert_eq!(fs::read(b.m.mnt_path("d/f0")).unwrap(), b"x");
    let checked = Instant::now();
    sleep(every / 2);
    // A change through the mount makes the kernel list again: a listing younger than
    // the copy's check (which it does not repeat: not due yet).
    fs::write(b.m.mnt_path("d/new"), b"n").unwrap();
    let listed = Instant::now();
    assert!(b.list("d").1);
    assert!(!b.list("d").1, "cached");
    fs::remove_file(b.m.src_path("d/f0")).unwrap();
    if let Some(rest) = (checked + every).checked_duration_since(Instant::now()) {
        sleep(rest + Duration::from_millis(50));
    }
    // Due now: the next open compares it with src and drops it.
    let t = Instant::now();
    while fs::File::open(b.m.mnt_path("d/f0")).is_ok() {
        assert!(t.elapsed() < Duration::from_secs(10), "f0 still found");
        sleep(Duration::from_millis(50));
    }
    let (names, _) = b.list("d");
    if listed.elapsed() < every {
        assert!(!names.contains(&"f0".to_string()), "{names:?}");
    } else {
        eprintln!("too slow to tell: the listing expired by itself");
    }
    b.m.stop();
}

/// Past `--attr-ttl` the entries a listing gave the kernel have expired: the listing
/// is taken again (its READDIRPLUS refreshes them all, where a kept listing would
/// make `ls -l` look up every name), although `--revalidate` would allow keeping it.
#[test]
fn a_listing_older_than_the_attr_ttl_is_taken_again() {
    if !can_mount("a_listing_older_than_the_attr_ttl_is_taken_again") {
        return;
    }
    let b = Bed::new(10, &["--attr-ttl", "1s", "--revalidate", "60s"]);
    assert!(b.list("d").1);
    // The daemon took the listing before `list` returned (timing from before the call
    // counted its metrics scrape too, and under load the listing was then younger
    // than the 1 s slept).
    sleep(Duration::from_millis(1020));
    assert!(b.list("d").1, "a listing older than --attr-ttl was kept");
    b.m.stop();
}

/// The names an open directory stream reads after a `rewinddir` (libc's stream: the
/// rewind seeks the kernel's file back to 0).
fn rewound_names(d: *mut libc::DIR) -> Vec<String> {
    // SAFETY: `d` is an open stream (the caller's), used by this thread only.
    unsafe { libc::rewinddir(d) };
    let mut v = Vec::new();
    loop {
        // SAFETY: as above; the entry is read before the next readdir on `d`.
        let e = unsafe { libc::readdir(d) };
        if e.is_null() {
            break;
        }
        // SAFETY: d_name is a NUL-terminated name inside the entry.
        let name = unsafe { std::ffi::CStr::from_ptr((*e).d_name.as_ptr()) };
        let name = name.to_string_lossy().into_owned();
        if name != "." && name != ".." {
            v.push(name);
        }
    }
    v.sort();
    v
}

/// A directory held open reads the kernel's copy at a rewind, with no request to the
/// daemon: that copy is dropped (FUSE_NOTIFY_INVAL_INODE) as soon as a new opendir
/// would not keep it, so a rewind sees a change the daemon learned of at once, and a
/// change in src once the copy is older than `--revalidate`.
#[test]
fn a_rewind_of_an_open_directory_sees_what_a_new_listing_would() {
    if !can_mount("a_rewind_of_an_open_directory_sees_what_a_new_listing_would") {
        return;
    }
    let b = Bed::new(10, &["--revalidate", "2s", "--attr-ttl", "10s"]);
    let path = cpath(&b.m.mnt_path("d"));
    // SAFETY: a valid C string; the stream is closed below.
    let d = unsafe { libc::opendir(path.as_ptr()) };
    assert!(!d.is_null(), "{}", std::io::Error::last_os_error());
    assert!(rewound_names(d).contains(&"f0".to_string()));
    let wait = |what: &str, ok: &dyn Fn(&[String]) -> bool| {
        let t = Instant::now();
        loop {
            let names = rewound_names(d);
            if ok(&names) {
                return;
            }
            assert!(t.elapsed() < Duration::from_secs(8), "{what}: {names:?}");
            sleep(Duration::from_millis(50));
        }
    };
    write_file(b.m.src.path(), "d/new", b"n");
    fs::metadata(b.m.mnt_path("d/new")).expect("the lookup finds src's new name");
    wait("a name a lookup found", &|n| n.contains(&"new".to_string()));
    fs::remove_file(b.m.src_path("d/f0")).unwrap();
    wait("a name src deleted", &|n| !n.contains(&"f0".to_string()));
    // SAFETY: `d` is open and not used after.
    unsafe { libc::closedir(d) };
    b.m.stop();
}
