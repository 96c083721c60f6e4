//! A normal user's mount: through the setuid `fusermount3`, as libfuse does.
//!
//! Each test runs in a private mount namespace (`unshare -m`) with its own `/dev/fuse`
//! node bind-mounted over the real one, at the mode the test needs (0666 as Debian's
//! udev rule sets it, or 0600), so the machine's device and its other mounts are left
//! alone. The user is `nobody` (switched to with `setpriv`); src, dst and the
//! mountpoint belong to it. `/etc/fuse.conf` is replaced the same way where a test
//! needs a given one. Needs root (to switch users and make the namespace) and
//! `fusermount3` (skips with a message without it).

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;

use crate::common::*;

const NOBODY: u32 = 65534;

fn have_fusermount3() -> bool {
    ["/usr/bin/fusermount3", "/bin/fusermount3"]
        .iter()
        .any(|p| Path::new(p).exists())
}

/// Whether the test can run; prints why not.
fn can_run(test: &str) -> bool {
    if !can_mount(test) {
        return false;
    }
    if !have_fusermount3() {
        eprintln!(
            "skipping {test}: fusermount3 is not installed (scripts/install-deps.sh installs \
             fuse3)"
        );
        return false;
    }
    true
}

/// A tree owned by `nobody`: `src` (with `a.txt`), `dst`, `mnt`.
fn user_tree() -> TempDir {
    let t = tempdir();
    write_file(t.path(), "src/a.txt", "hello from src\n");
    mkdirs(t.path(), "dst");
    mkdirs(t.path(), "mnt");
    chown_r(t.path());
    t
}

fn chown_r(p: &Path) {
    let st = Command::new("chown")
        .args(["-R", &format!("{NOBODY}:{NOBODY}")])
        .arg(p)
        .status()
        .unwrap();
    assert!(st.success());
}

/// Runs `script` (sh, `set -e`) in a private mount namespace whose `/dev/fuse` has mode
/// `dev_mode` and, with `fuse_conf`, whose `/etc/fuse.conf` has that text. In the
/// script: `$T` is `tree`, `$BIN` a copy of the cachefs binary in it, `$AS_USER` runs a command as
/// nobody. Returns (exit code, stdout + stderr).
fn in_namespace(
    tree: &Path,
    dev_mode: u32,
    fuse_conf: Option<&str>,
    script: &str,
) -> (i32, String) {
    let dev = std::fs::metadata("/dev/fuse").expect("/dev/fuse");
    assert!(dev.file_type().is_char_device());
    let (major, minor) = (libc::major(dev.rdev()), libc::minor(dev.rdev()));
    let conf = match fuse_conf {
        Some(text) => {
            std::fs::write(tree.join("fuse.conf"), text).unwrap();
            "mount --bind \"$T/fuse.conf\" /etc/fuse.conf\n"
        }
        None => "",
    };
    let full = format!(
        "set -e\n\
         mknod \"$T/fuse-dev\" c {major} {minor}\n\
         chmod {dev_mode:o} \"$T/fuse-dev\"\n\
         mount --bind \"$T/fuse-dev\" /dev/fuse\n\
         {conf}\
         AS_USER='setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups'\n\
         wait_mounted() {{ for i in $(seq 100); do grep -q \" $1 \" /proc/self/mountinfo && return 0; sleep 0.1; done; echo 'not mounted'; return 1; }}\n\
         {script}"
    );
    // A copy nobody can run wherever the build is (a checkout under /root is not).
    let bin = tree.join("cachefs");
    if !bin.exists() {
        std::fs::copy(cachefs_bin(), &bin).unwrap();
    }
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &full])
        .env("T", tree)
        .env("BIN", &bin)
        .output()
        .expect("run unshare");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn normal_user_mounts_through_fusermount3_reads_writes_and_unmounts() {
    let name = "normal_user_mounts_through_fusermount3_reads_writes_and_unmounts";
    if !can_run(name) {
        return;
    }
    let t = user_tree();
    let (code, out) = in_namespace(
        t.path(),
        0o666,
        None,
        r#"
$AS_USER "$BIN" -src "$T/src" -dst "$T/dst" -mountpoint "$T/mnt" -w 2>"$T/log" &
pid=$!
wait_mounted "$T/mnt"
grep " $T/mnt " /proc/self/mountinfo
echo "read: $($AS_USER cat "$T/mnt/a.txt")"
$AS_USER sh -c "echo written by nobody > '$T/mnt/b.txt'"
echo "reread: $($AS_USER cat "$T/mnt/b.txt")"
# root is not the mount's owner and there is no allow_other: refused.
if cat "$T/mnt/a.txt" 2>/dev/null; then echo "root could read"; fi
$AS_USER fusermount3 -u "$T/mnt"
rc=0; wait $pid || rc=$?
echo "daemon exit: $rc"
if grep -q " $T/mnt " /proc/self/mountinfo; then echo "still mounted"; fi
cat "$T/log"
"#,
    );
    assert_eq!(code, 0, "{out}");
    let mountinfo = out
        .lines()
        .find(|l| l.contains(" - fuse.cachefs "))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(mountinfo.contains("user_id=65534"), "{mountinfo}");
    assert!(out.contains("read: hello from src"), "{out}");
    assert!(out.contains("reread: written by nobody"), "{out}");
    assert!(!out.contains("root could read"), "{out}");
    assert!(out.contains("daemon exit: 0"), "{out}");
    assert!(!out.contains("still mounted"), "{out}");
    // -w uploaded the file (the daemon drains before it exits), as nobody.
    let up = t.path().join("src/b.txt");
    assert_eq!(std::fs::read_to_string(&up).unwrap(), "written by nobody\n");
    assert_eq!(std::fs::metadata(&up).unwrap().uid(), NOBODY);
}

#[test]
fn normal_user_without_access_to_dev_fuse_gets_a_clear_error() {
    let name = "normal_user_without_access_to_dev_fuse_gets_a_clear_error";
    if !can_run(name) {
        return;
    }
    let t = user_tree();
    let (code, out) = in_namespace(
        t.path(),
        0o600,
        None,
        r#"
rc=0; $AS_USER "$BIN" -src "$T/src" -dst "$T/dst" -mountpoint "$T/mnt" || rc=$?
echo "daemon exit: $rc"
if grep -q " $T/mnt " /proc/self/mountinfo; then echo "mounted"; fi
"#,
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("daemon exit: 1"), "{out}");
    assert!(!out.contains("\nmounted"), "{out}");
    let err = out
        .lines()
        .find(|l| l.starts_with("cachefs: "))
        .unwrap_or_else(|| panic!("{out}"));
    for want in [
        "/dev/fuse is mode 0600",
        "fusermount3 opens it as the calling user",
        "chmod 0666 /dev/fuse",
        "run cachefs as root",
    ] {
        assert!(err.contains(want), "{want:?} not in {err}");
    }
}

#[test]
fn allow_other_needs_user_allow_other_in_fuse_conf() {
    let name = "allow_other_needs_user_allow_other_in_fuse_conf";
    if !can_run(name) {
        return;
    }
    // Without the line: refused before anything starts, saying what to add.
    let t = user_tree();
    let (code, out) = in_namespace(
        t.path(),
        0o666,
        Some("# no user_allow_other here\n#user_allow_other\nmount_max = 1000\n"),
        r#"
rc=0; $AS_USER "$BIN" -src "$T/src" -dst "$T/dst" -mountpoint "$T/mnt" -o allow_other || rc=$?
echo "daemon exit: $rc"
if grep -q " $T/mnt " /proc/self/mountinfo; then echo "mounted"; fi
"#,
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("daemon exit: 1"), "{out}");
    assert!(!out.contains("\nmounted"), "{out}");
    let err = out
        .lines()
        .find(|l| l.starts_with("cachefs: "))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        err.contains(
            "-o allow_other as a normal user needs a line 'user_allow_other' in /etc/fuse.conf"
        ),
        "{err}"
    );

    // With it: the mount is open to other users (root here), and SIGTERM unmounts it
    // through fusermount3.
    let t = user_tree();
    let (code, out) = in_namespace(
        t.path(),
        0o666,
        Some("user_allow_other\n"),
        r#"
$AS_USER "$BIN" -src "$T/src" -dst "$T/dst" -mountpoint "$T/mnt" -o allow_other 2>"$T/log" &
pid=$!
wait_mounted "$T/mnt"
echo "root reads: $(cat "$T/mnt/a.txt")"
kill -TERM $pid
rc=0; wait $pid || rc=$?
echo "daemon exit: $rc"
if grep -q " $T/mnt " /proc/self/mountinfo; then echo "still mounted"; fi
cat "$T/log"
"#,
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("root reads: hello from src"), "{out}");
    assert!(out.contains("daemon exit: 0"), "{out}");
    assert!(!out.contains("still mounted"), "{out}");
}

#[test]
fn sigterm_on_a_busy_user_mount_detaches_it_lazily_and_says_so() {
    let name = "sigterm_on_a_busy_user_mount_detaches_it_lazily_and_says_so";
    if !can_run(name) {
        return;
    }
    let t = user_tree();
    let (code, out) = in_namespace(
        t.path(),
        0o666,
        None,
        r#"
$AS_USER "$BIN" -src "$T/src" -dst "$T/dst" -mountpoint "$T/mnt" 2>"$T/log" &
pid=$!
wait_mounted "$T/mnt"
# A reader holds a file open in the mount for a while.
$AS_USER sh -c "exec 3<'$T/mnt/a.txt'; sleep 2; cat <&3" > "$T/held" &
reader=$!
sleep 0.5
kill -TERM $pid
sleep 0.5
if grep -q " $T/mnt " /proc/self/mountinfo; then echo "still mounted"; fi
if kill -0 $pid 2>/dev/null; then echo "daemon serves the open file"; fi
wait $reader
echo "held read: $(cat "$T/held")"
rc=0; wait $pid || rc=$?
echo "daemon exit: $rc"
cat "$T/log"
"#,
    );
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("still mounted"), "{out}");
    assert!(out.contains("daemon serves the open file"), "{out}");
    assert!(out.contains("held read: hello from src"), "{out}");
    assert!(out.contains("daemon exit: 0"), "{out}");
    assert!(out.contains("is busy; detaching it lazily"), "{out}");
}
