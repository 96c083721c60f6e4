//! What a bucket behind rclone (without `--links`) cannot hold, on the test bed of
//! rclone_support.rs: a symlink, a fifo, a hard link, a chmod, a user xattr. Each is
//! handled as docs/SEMANTICS.md ("What src cannot hold") says: the data reaches the
//! bucket, the rest stays in dst (the mount shows it) and `cachefs status` lists it as
//! not representable on src, apart from failed ops; nothing is retried, nothing later
//! waits for it. And `-retries N` means N attempts before an op is parked, then retries
//! on a doubling schedule with one ERROR line.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::rclone_support::*;

const DRAIN: Duration = Duration::from_secs(120);

/// `cachefs status DST --json` and its exit code.
fn status_json(dst: &Path) -> (i32, String) {
    let s = wb_status(dst);
    (s.code, s.json)
}

/// The `not_representable_paths` entry of `path` in the status JSON, if any.
fn unrep_entry(json: &str, path: &str) -> Option<String> {
    let key = format!("{{\"path\":\"{path}\",");
    let at = json.find(&key)?;
    let end = json[at..].find('}')? + at + 1;
    Some(json[at..end].to_string())
}

/// Objects in the bucket, names only.
fn keys(bucket: &Bucket) -> Vec<String> {
    bucket.objects().into_keys().collect()
}

/// How many replays of ops on `path` the daemon's `-log` lines show.
fn attempts(log: &str, path: &str) -> usize {
    let pat = format!(" {path} attempt=");
    log.lines().filter(|l| l.contains(&pat)).count()
}

fn assert_capability_line(node: &Node) {
    let log = node.log();
    assert!(
        log.contains("can hold: symlinks no") && log.contains("fuse.rclone"),
        "no capability line:\n{log}"
    );
}

/// Status lists `path` as not representable with `what`, exits 0, fails nothing.
fn assert_reported(node: &Node, path: &str, what: &str) -> String {
    let (code, json) = status_json(&node.dst);
    let e = unrep_entry(&json, path)
        .unwrap_or_else(|| panic!("{path} not reported: {json}\n{}", node.logs()));
    assert!(e.contains(&format!("\"{what}\"")), "{e}");
    assert_eq!(code, 0, "not representable is not a failure: {json}");
    assert_eq!(json_u64(&json, "failed_ops"), Some(0), "{json}");
    let text = Command::new(cachefs_bin())
        .arg("status")
        .arg(&node.dst)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    eprintln!("cachefs status:\n{text}");
    assert!(
        text.contains(&format!("NOT REPRESENTABLE {path} (")) && text.contains("what to do:"),
        "{text}"
    );
    e
}

fn no_internal_objects(bucket: &Bucket) {
    let k = keys(bucket);
    assert!(
        k.iter().all(|k| !k.contains(".cachefs-")),
        "temp or probe objects left in the bucket: {k:?}"
    );
}

#[test]
fn rclone_symlink_is_kept_in_dst_and_reported_not_retried() {
    if !can_mount("rclone_symlink_is_kept_in_dst_and_reported_not_retried") {
        return;
    }
    let bucket = Bucket::start();
    let node = Node::start(&bucket, &["-w", "-retries", "3", "-log"]);
    fs::write(node.path("f"), b"target\n").unwrap();
    std::os::unix::fs::symlink("f", node.path("l")).unwrap();
    node.wait_drained(DRAIN);
    let e = assert_reported(&node, "/l", "symlink");
    assert!(e.contains("symlink to f"), "{e}");
    assert_capability_line(&node);
    eprintln!("{}", node.log());
    // Tried once, not retried, even after a while.
    sleep(Duration::from_secs(4));
    let log = node.log();
    assert_eq!(attempts(&log, "/l"), 1, "{log}");
    assert!(!log.contains("ERROR"), "{log}");
    assert_eq!(keys(&bucket), ["f"]);
    // The mount keeps showing it, past rclone's directory cache.
    sleep(DIR_CACHE);
    assert_eq!(
        fs::read_link(node.path("l")).unwrap(),
        Path::new("f"),
        "{}",
        node.logs()
    );
    assert_eq!(fs::read(node.path("l")).unwrap(), b"target\n");
    // Replaced by a regular file, it is representable again and leaves the list.
    fs::remove_file(node.path("l")).unwrap();
    fs::write(node.path("l"), b"now a file\n").unwrap();
    node.wait_drained(DRAIN);
    let (_, json) = status_json(&node.dst);
    assert_eq!(unrep_entry(&json, "/l"), None, "{json}");
    assert_eq!(json_u64(&json, "not_representable"), Some(0), "{json}");
    assert_eq!(keys(&bucket), ["f", "l"]);
    no_internal_objects(&bucket);
}

/// After rclone is restarted with `--links` (and cachefs after it), symlinks listed as
/// not representable are uploaded (as rclone's `NAME.rclonelink` objects) and leave
/// the list.
#[test]
fn rclone_symlink_is_uploaded_once_rclone_runs_with_links() {
    if !can_mount("rclone_symlink_is_uploaded_once_rclone_runs_with_links") {
        return;
    }
    let bucket = Bucket::start();
    let mut node = Node::start(&bucket, &["-w"]);
    fs::write(node.path("f"), b"target\n").unwrap();
    std::os::unix::fs::symlink("f", node.path("l")).unwrap();
    node.wait_drained(DRAIN);
    assert_reported(&node, "/l", "symlink");
    node.stop_cachefs();
    node.rclone.kill9();
    node.rclone.set_extra(&["--links"]);
    node.rclone
        .restart()
        .unwrap_or_else(|e| panic!("{e}\n{}", node.logs()));
    node.restart_cachefs();
    assert!(
        node.log().contains("can hold: symlinks yes"),
        "{}",
        node.log()
    );
    node.wait_drained(DRAIN);
    let (code, json) = status_json(&node.dst);
    assert_eq!(code, 0, "{json}");
    assert_eq!(json_u64(&json, "not_representable"), Some(0), "{json}");
    assert_eq!(keys(&bucket), ["f", "l.rclonelink"], "{}", node.logs());
    let out = bucket.rclone_cmd(&["cat", &bucket.remote("l.rclonelink")]);
    assert_eq!(out.stdout, b"f");
    assert_eq!(fs::read_link(node.path("l")).unwrap(), Path::new("f"));
}

#[test]
fn rclone_fifo_is_kept_in_dst_and_reported() {
    if !can_mount("rclone_fifo_is_kept_in_dst_and_reported") {
        return;
    }
    let bucket = Bucket::start();
    let node = Node::start(&bucket, &["-w", "-retries", "3"]);
    fs::create_dir(node.path("d")).unwrap();
    fs::write(node.path("d/data"), b"payload").unwrap();
    let c = CString::new(node.path("d/p").as_os_str().as_bytes()).unwrap();
    // SAFETY: plain syscall on a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    node.wait_drained(DRAIN);
    let e = assert_reported(&node, "/d/p", "special file");
    assert!(e.contains("fifo"), "{e}");
    // rclone turns a fifo into an empty regular file: none reached the bucket.
    assert_eq!(keys(&bucket), ["d/data"]);
    assert!(
        fs::symlink_metadata(node.path("d/p"))
            .unwrap()
            .file_type()
            .is_fifo()
    );
    no_internal_objects(&bucket);
}

#[test]
fn rclone_hard_link_uploads_a_copy_and_is_reported() {
    if !can_mount("rclone_hard_link_uploads_a_copy_and_is_reported") {
        return;
    }
    let bucket = Bucket::start();
    let node = Node::start(&bucket, &["-w"]);
    fs::write(node.path("f"), b"linked bytes\n").unwrap();
    node.wait_drained(DRAIN);
    fs::hard_link(node.path("f"), node.path("g")).unwrap();
    node.wait_drained(DRAIN);
    let e = assert_reported(&node, "/g", "hard link");
    assert!(e.contains("a copy on src"), "{e}");
    let objects = bucket.objects();
    assert_eq!(
        objects.keys().collect::<Vec<_>>(),
        ["f", "g"],
        "{objects:?}"
    );
    assert_eq!(objects["f"], objects["g"], "the copy has the same bytes");
    // Removed, it leaves the list.
    fs::remove_file(node.path("g")).unwrap();
    node.wait_drained(DRAIN);
    let (_, json) = status_json(&node.dst);
    assert_eq!(unrep_entry(&json, "/g"), None, "{json}");
    assert_eq!(keys(&bucket), ["f"]);
}

#[test]
fn rclone_chmod_not_kept_is_reported() {
    if !can_mount("rclone_chmod_not_kept_is_reported") {
        return;
    }
    let bucket = Bucket::start();
    let node = Node::start(&bucket, &["-w"]);
    fs::write(node.path("f"), b"secret\n").unwrap();
    fs::write(node.path("plain"), b"plain\n").unwrap();
    node.wait_drained(DRAIN);
    fs::set_permissions(node.path("f"), fs::Permissions::from_mode(0o600)).unwrap();
    node.wait_drained(DRAIN);
    let e = assert_reported(&node, "/f", "mode");
    assert!(e.contains("mode 0600 (src shows 0664)"), "{e}");
    assert_eq!(
        fs::metadata(node.path("f")).unwrap().permissions().mode() & 0o7777,
        0o600,
        "the mount keeps dst's mode"
    );
    // A file with rclone's usual mode difference (0644 vs 0664) is not reported.
    let (_, json) = status_json(&node.dst);
    assert_eq!(unrep_entry(&json, "/plain"), None, "{json}");
    assert_eq!(keys(&bucket), ["f", "plain"]);
}

#[test]
fn rclone_user_xattr_is_kept_in_dst_and_reported() {
    if !can_mount("rclone_user_xattr_is_kept_in_dst_and_reported") {
        return;
    }
    let bucket = Bucket::start();
    let node = Node::start(&bucket, &["-w"]);
    fs::write(node.path("f"), b"with an xattr\n").unwrap();
    let st = Command::new("setfattr")
        .args(["-n", "user.origin", "-v", "camera"])
        .arg(node.path("f"))
        .status()
        .unwrap();
    assert!(st.success());
    node.wait_drained(DRAIN);
    let e = assert_reported(&node, "/f", "xattrs");
    assert!(e.contains("1 user xattrs"), "{e}");
    let got = Command::new("getfattr")
        .args(["--only-values", "-n", "user.origin"])
        .arg(node.path("f"))
        .output()
        .unwrap();
    assert_eq!(got.stdout, b"camera", "the mount keeps it");
    assert_bucket_equals_mount(&bucket, &node);
}

#[test]
fn rclone_unrepresentable_op_does_not_block_later_ops() {
    if !can_mount("rclone_unrepresentable_op_does_not_block_later_ops") {
        return;
    }
    let bucket = Bucket::start();
    let node = Node::start(&bucket, &["-w", "-retries", "2"]);
    fs::create_dir(node.path("dir")).unwrap();
    std::os::unix::fs::symlink("a", node.path("dir/l")).unwrap();
    let c = CString::new(node.path("dir/p").as_os_str().as_bytes()).unwrap();
    // SAFETY: plain syscall on a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    // Later ops on the same directory (they wait for the ops below it) and elsewhere.
    fs::write(node.path("dir/a"), b"a").unwrap();
    fs::rename(node.path("dir"), node.path("moved")).unwrap();
    fs::write(node.path("moved/b"), b"b").unwrap();
    fs::create_dir(node.path("other")).unwrap();
    fs::write(node.path("other/c"), b"c").unwrap();
    let t = Instant::now();
    node.wait_drained(DRAIN);
    eprintln!("drained in {:?}", t.elapsed());
    assert_eq!(keys(&bucket), ["moved/a", "moved/b", "other/c"]);
    // The entries moved with their directory.
    let (code, json) = status_json(&node.dst);
    assert_eq!(code, 0, "{json}");
    assert_eq!(json_u64(&json, "not_representable"), Some(2), "{json}");
    assert!(unrep_entry(&json, "/moved/l").is_some(), "{json}");
    assert!(unrep_entry(&json, "/moved/p").is_some(), "{json}");
    let link = fs::read_link(node.path("moved/l"));
    assert!(
        link.as_ref().is_ok_and(|t| t == Path::new("a")),
        "the symlink moved with its directory: {link:?}\n{}",
        node.logs()
    );
    // Removing the directory clears them.
    for n in ["l", "p", "a", "b"] {
        fs::remove_file(node.path(&format!("moved/{n}"))).unwrap();
    }
    fs::remove_dir(node.path("moved")).unwrap();
    node.wait_drained(DRAIN);
    let (_, json) = status_json(&node.dst);
    assert_eq!(json_u64(&json, "not_representable"), Some(0), "{json}");
    assert_eq!(keys(&bucket), ["other/c"]);
    no_internal_objects(&bucket);
}

/// rclone's VFS cache folder of the bucket (`rclone-cache/vfs/<remote>/bed`).
fn rclone_cache_of_bucket(node: &Node) -> std::path::PathBuf {
    let vfs = node.dir.path().join("rclone-cache/vfs");
    for e in fs::read_dir(&vfs).unwrap() {
        let p = e.unwrap().path().join(BUCKET);
        if p.is_dir() {
            return p;
        }
    }
    panic!("no bucket folder under {}", vfs.display());
}

#[test]
fn rclone_retries_n_means_n_then_parked_with_backoff() {
    if !can_mount("rclone_retries_n_means_n_then_parked_with_backoff") {
        return;
    }
    let bucket = Bucket::start();
    let node = Node::start(&bucket, &["-w", "-retries", "3", "-log"]);
    fs::write(node.path("warmup"), b"w").unwrap();
    node.wait_drained(DRAIN);
    // rclone cannot create files in its cache: every upload through it fails (EIO).
    let cache = rclone_cache_of_bucket(&node);
    let Some(guard) = Immutable::set(&cache) else {
        eprintln!("skipping: chattr +i does not work here");
        return;
    };
    fs::write(node.path("x"), b"payload").unwrap();
    let s = wb_wait_status(&node.dst, Duration::from_secs(30), "parked", |s| {
        s.failed_ops == 1
    });
    assert_eq!(s.code, 1, "{}", s.json);
    let parked = Instant::now();
    assert_eq!(
        attempts(&node.log(), "/x"),
        3,
        "-retries 3: three attempts before parking\n{}",
        node.log()
    );
    // Parked: retried after 5 s, then 10 s later (not every second).
    sleep(Duration::from_secs(12));
    let log = node.log();
    let n = attempts(&log, "/x");
    assert!(
        (4..=5).contains(&n),
        "{n} attempts within 12 s of parking (want 3 + 1 or 2)\n{log}"
    );
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "one ERROR line, when parked: {errors:#?}");
    assert!(errors[0].contains("/x") && errors[0].contains("parked"));
    // Failed (will retry), not "not representable".
    let s = wb_status(&node.dst);
    assert_eq!((s.code, s.failed_ops), (1, 1), "{}", s.json);
    assert_eq!(
        json_u64(&s.json, "not_representable"),
        Some(0),
        "{}",
        s.json
    );
    // Repaired: the next scheduled retry uploads it, and says so once.
    drop(guard);
    wb_wait_status(&node.dst, Duration::from_secs(60), "retried", |s| {
        s.pending_ops == 0 && s.failed_ops == 0
    });
    node.wait_drained(DRAIN);
    eprintln!("converged {:?} after parking", parked.elapsed());
    assert!(
        node.log().contains(" /x succeeded at attempt"),
        "{}",
        node.log()
    );
    assert_eq!(keys(&bucket), ["warmup", "x"]);
    no_internal_objects(&bucket);
}
