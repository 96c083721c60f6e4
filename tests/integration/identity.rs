//! Security on a real mount (DESIGN section 6): callers' identities and the kernel's
//! permission checks, mount flags, and symlinks swapped into src or dst behind the
//! daemon's back.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;
use std::process::{Command, Output};

use crate::common::*;

const NOBODY: u32 = 65534;

/// Runs `sh -c script` as uid/gid 65534 with no supplementary groups and umask 022.
fn as_nobody(script: &str) -> Output {
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
        ])
        .arg(format!("umask 022; {script}"))
        .output()
        .expect("run setpriv")
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "as nobody: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn denied(out: &Output) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && (err.contains("Permission denied") || err.contains("Operation not permitted")),
        "as nobody: expected a permission error, got {} / {err}",
        out.status
    );
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

fn owner(p: &Path) -> (u32, u32) {
    let md = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
    (md.uid(), md.gid())
}

/// A src and a dst whose roots nobody can traverse (TempDirs are 0700).
fn open_roots(files: &[(&str, &[u8])]) -> (TempDir, TempDir) {
    let (src, dst) = (dir_with(files), tempdir());
    chmod(src.path(), 0o755);
    chmod(dst.path(), 0o755);
    (src, dst)
}

#[test]
fn files_are_created_with_the_callers_identity() {
    if !can_mount("files_are_created_with_the_callers_identity") {
        return;
    }
    let (src, dst) = open_roots(&[("pub/rootfile", b"r"), ("sg/x", b"x")]);
    chmod(&src.path().join("pub"), 0o1777);
    std::os::unix::fs::chown(src.path().join("sg"), Some(0), Some(4321)).unwrap();
    chmod(&src.path().join("sg"), 0o2777);
    let before = snapshot(src.path());
    let m = Mounted::with_dirs(src, dst, &["--attr-ttl", "0"]);
    let mnt = |r: &str| m.mnt_path(r).display().to_string();
    ok(&as_nobody(&format!(
        "touch {0}/f && mkdir {0}/d && ln -s tgt {0}/l && mkfifo {0}/p && echo hi > {0}/d/inner",
        mnt("pub")
    )));
    for n in ["pub/f", "pub/d", "pub/l", "pub/p", "pub/d/inner"] {
        assert_eq!(owner(&m.dst_path(n)), (NOBODY, NOBODY), "dst {n}");
        assert_eq!(owner(&m.mnt_path(n)), (NOBODY, NOBODY), "mount {n}");
    }
    assert_eq!(
        fs::metadata(m.dst_path("pub/f")).unwrap().mode(),
        libc::S_IFREG | 0o644
    );
    assert_eq!(
        fs::metadata(m.dst_path("pub/d")).unwrap().mode(),
        libc::S_IFDIR | 0o755
    );
    // The sticky src dir protects root's file from nobody, through the mount.
    denied(&as_nobody(&format!("rm -f {}", mnt("pub/rootfile"))));
    assert_eq!(fs::read(m.mnt_path("pub/rootfile")).unwrap(), b"r");
    // nobody cannot give files away.
    denied(&as_nobody(&format!("chown 0 {}", mnt("pub/f"))));
    // A setgid directory gives its group, and setgid to new subdirectories.
    ok(&as_nobody(&format!(
        "touch {0}/f && mkdir {0}/sub",
        mnt("sg")
    )));
    assert_eq!(owner(&m.mnt_path("sg/f")), (NOBODY, 4321));
    assert_eq!(owner(&m.dst_path("sg/sub")), (NOBODY, 4321));
    assert_ne!(
        fs::metadata(m.mnt_path("sg/sub")).unwrap().mode() & libc::S_ISGID,
        0,
        "sg/sub is setgid"
    );
    assert_unchanged(m.src.path(), &before);
    m.stop();
}

#[test]
fn kernel_checks_modes_before_any_copy() {
    if !can_mount("kernel_checks_modes_before_any_copy") {
        return;
    }
    let (src, dst) = open_roots(&[("secret", b"top secret"), ("public", b"pub")]);
    std::os::unix::fs::chown(src.path().join("secret"), Some(1234), Some(1234)).unwrap();
    chmod(&src.path().join("secret"), 0o600);
    std::os::unix::fs::chown(src.path().join("public"), Some(1234), Some(1234)).unwrap();
    chmod(&src.path().join("public"), 0o644);
    let before = snapshot(src.path());
    let m = Mounted::with_dirs(src, dst, &["--attr-ttl", "0"]);
    let out = as_nobody(&format!("cat {}", m.mnt_path("secret").display()));
    denied(&out);
    assert!(out.stdout.is_empty());
    denied(&as_nobody(&format!(
        "echo x >> {}",
        m.mnt_path("public").display()
    )));
    assert!(
        !m.dst_path("secret").exists(),
        "a denied open copied the file"
    );
    let out = as_nobody(&format!("cat {}", m.mnt_path("public").display()));
    ok(&out);
    assert_eq!(out.stdout, b"pub");
    // Not writable by nobody: the root dir is 0755 root's.
    denied(&as_nobody(&format!(
        "touch {}",
        m.mnt_path("new").display()
    )));
    assert_eq!(fs::read(m.mnt_path("public")).unwrap(), b"pub");
    assert_unchanged(m.src.path(), &before);
    m.stop();
}

#[test]
fn mount_is_nosuid_nodev_allow_other_default_permissions() {
    if !can_mount("mount_is_nosuid_nodev_allow_other_default_permissions") {
        return;
    }
    let m = Mounted::start(&[]);
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .rev()
        .find(|l| l.split(' ').nth(4) == Some(m.mountpoint().to_str().unwrap()))
        .expect("mountinfo line");
    let mount_opts: Vec<&str> = line.split(' ').nth(5).unwrap().split(',').collect();
    let super_opts: Vec<&str> = line
        .split_once(" - ")
        .unwrap()
        .1
        .split(' ')
        .nth(2)
        .unwrap()
        .split(',')
        .collect();
    for o in ["nosuid", "nodev"] {
        assert!(mount_opts.contains(&o), "{o} missing: {line}");
    }
    for o in ["allow_other", "default_permissions"] {
        assert!(super_opts.contains(&o), "{o} missing: {line}");
    }
    m.stop();
}

// ----- 14. symlinks swapped in behind the daemon's back --------------------------------
//
// After a swap, the kernel may learn that the entry is now a symlink and follow it itself,
// with the caller's rights: that is ordinary symlink semantics. What must never happen is
// the root daemon following it on the caller's behalf. So the probes run as nobody, and the
// secret sits in a root-only (0700) directory that nobody cannot enter by itself.

const SECRET: &str = "TOPSECRET";

/// A 0700 directory outside src and dst; its files are 0644 (only the dir protects them).
fn secret_dir() -> TempDir {
    let d = dir_with(&[
        ("file", SECRET.as_bytes()),
        ("secretonly", SECRET.as_bytes()),
    ]);
    chmod(d.path(), 0o700);
    d
}

/// Runs `script` as nobody and fails if its output shows the secret or a secret name
/// (error messages naming the path asked for are fine).
fn probe(script: &str) {
    let out = as_nobody(script);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        !stdout.contains(SECRET)
            && !stdout.contains("secretonly")
            && !stdout.contains("root:")
            && !stderr.contains(SECRET),
        "as nobody, `{script}` revealed: {stdout}{stderr}"
    );
}

fn assert_dst_has_no_secret(m: &Mounted) {
    for (p, e) in snapshot(m.dst.path()) {
        assert!(
            !String::from_utf8_lossy(&e.data).contains(SECRET),
            "dst/{} holds the secret",
            p.display()
        );
    }
}

#[test]
fn src_dir_swapped_for_a_symlink_reveals_nothing() {
    if !can_mount("src_dir_swapped_for_a_symlink_reveals_nothing") {
        return;
    }
    let secret = secret_dir();
    let secret_before = snapshot(secret.path());
    let (src, dst) = open_roots(&[
        ("dir/file", b"public"),
        ("dir/sub/x", b"x"),
        ("etc/shadow", b"fake"),
        ("plain", b"plain file"),
    ]);
    chmod(&src.path().join("dir"), 0o777);
    // A long TTL: the kernel keeps its entries for dir, dir/file, etc.
    let m = Mounted::with_dirs(src, dst, &["--attr-ttl", "60"]);
    let mnt = |r: &str| m.mnt_path(r).display().to_string();
    // Before the swap nobody can read and list through the mount (the probes can fail).
    let out = as_nobody(&format!("cat {} && ls {}", mnt("dir/file"), mnt("dir")));
    ok(&out);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "publicfile\nsub\n");
    ok(&as_nobody(&format!(
        "ls {} {} && cat {} && stat {}",
        mnt("etc"),
        mnt("dir/sub"),
        mnt("plain"),
        mnt("dir/sub/x")
    )));

    fs::rename(m.src_path("dir"), m.src_path("dir.orig")).unwrap();
    symlink(secret.path(), m.src_path("dir")).unwrap();
    fs::rename(m.src_path("etc"), m.src_path("etc.orig")).unwrap();
    symlink("/etc", m.src_path("etc")).unwrap();
    fs::remove_file(m.src_path("plain")).unwrap();
    symlink(secret.path().join("file"), m.src_path("plain")).unwrap();

    for script in [
        format!("cat {}", mnt("dir/file")),
        format!("cat {}", mnt("dir/secretonly")),
        format!("ls -la {}", mnt("dir")),
        format!("ls -la {}", mnt("dir/sub")),
        format!("cat {}", mnt("plain")),
        format!("cat {}", mnt("etc/shadow")),
        format!("echo planted > {}", mnt("dir/planted")),
        format!("echo planted > {}", mnt("dir/file")),
        format!("mkdir {}", mnt("dir/newdir")),
        format!("rm -f {}", mnt("dir/secretonly")),
    ] {
        probe(&script);
    }
    assert_dst_has_no_secret(&m);
    assert_unchanged(secret.path(), &secret_before);
    m.stop();
}

#[test]
fn dst_dir_swapped_for_a_symlink_reveals_and_writes_nothing() {
    if !can_mount("dst_dir_swapped_for_a_symlink_reveals_and_writes_nothing") {
        return;
    }
    let secret = secret_dir();
    let secret_before = snapshot(secret.path());
    let (src, dst) = open_roots(&[]);
    write_file(dst.path(), "cached/file", "cached");
    write_file(dst.path(), "cached/sub/y", "y");
    chmod(&dst.path().join("cached"), 0o777);
    let m = Mounted::with_dirs(src, dst, &["--attr-ttl", "60"]);
    let mnt = |r: &str| m.mnt_path(r).display().to_string();
    let out = as_nobody(&format!(
        "cat {} && ls {}",
        mnt("cached/file"),
        mnt("cached")
    ));
    ok(&out);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "cachedfile\nsub\n");
    ok(&as_nobody(&format!("stat {}", mnt("cached/sub/y"))));

    fs::rename(m.dst_path("cached"), m.dst_path("cached.orig")).unwrap();
    symlink(secret.path(), m.dst_path("cached")).unwrap();

    for script in [
        format!("cat {}", mnt("cached/file")),
        format!("cat {}", mnt("cached/secretonly")),
        format!("ls -la {}", mnt("cached")),
        format!("echo planted > {}", mnt("cached/planted")),
        format!("echo overwrite > {}", mnt("cached/file")),
        format!("mkdir {}", mnt("cached/newdir")),
        format!("chmod 666 {}", mnt("cached/file")),
        format!("rm -f {}", mnt("cached/secretonly")),
    ] {
        probe(&script);
    }
    assert_unchanged(secret.path(), &secret_before);
    m.stop();
}
