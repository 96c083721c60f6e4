//! systemd integration: `Type=notify` units get READY=1 once the mount answers and
//! STOPPING=1 when the daemon begins to shut down.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn recv(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 512];
    let n = sock
        .recv(&mut buf)
        .expect("a notification within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn notifies_ready_after_mount_and_stopping_at_shutdown() {
    if !can_mount("notifies_ready_after_mount_and_stopping_at_shutdown") {
        return;
    }
    let (src, dst, mnt, sockdir) = (tempdir(), tempdir(), tempdir(), tempdir());
    write_file(src.path(), "hello", "hi");
    let sock_path = sockdir.path().join("notify");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();

    let mut child = Command::new(cachefs_bin())
        .args(["-src", src.path().to_str().unwrap()])
        .args(["-dst", dst.path().to_str().unwrap()])
        .args(["-mountpoint", mnt.path().to_str().unwrap()])
        .env("NOTIFY_SOCKET", &sock_path)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let ready = recv(&sock);
    assert!(ready.contains("READY=1"), "got {ready:?}");
    // READY means the mount already answers.
    assert!(is_fuse_mounted(mnt.path()));
    assert_eq!(std::fs::read(mnt.path().join("hello")).unwrap(), b"hi");

    signal(&child, libc::SIGTERM);
    let stopping = recv(&sock);
    assert!(stopping.contains("STOPPING=1"), "got {stopping:?}");
    let status = wait_timeout(&mut child, Duration::from_secs(10)).expect("daemon exits");
    assert!(status.success(), "{status:?}");
    assert!(!is_fuse_mounted(mnt.path()));
}

#[test]
fn abstract_notify_socket_works_too() {
    if !can_mount("abstract_notify_socket_works_too") {
        return;
    }
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::SocketAddr;
    let (src, dst, mnt) = (tempdir(), tempdir(), tempdir());
    let name = format!("cachefs-test-{}", std::process::id());
    let sock = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut child = Command::new(cachefs_bin())
        .args(["-src", src.path().to_str().unwrap()])
        .args(["-dst", dst.path().to_str().unwrap()])
        .args(["-mountpoint", mnt.path().to_str().unwrap()])
        .env("NOTIFY_SOCKET", format!("@{name}"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(recv(&sock).contains("READY=1"));
    signal(&child, libc::SIGTERM);
    assert!(
        wait_timeout(&mut child, Duration::from_secs(10))
            .unwrap()
            .success()
    );
}

/// The example units (examples/systemd/) pass `systemd-analyze verify`, with the
/// binaries they run pointed at ones that exist here.
#[test]
fn example_units_pass_systemd_analyze_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!(
            "skipping example_units_pass_systemd_analyze_verify: systemd-analyze is not \
             installed (apt-get install systemd)"
        );
        return;
    }
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/systemd");
    let dir = tempdir();
    let mut units = Vec::new();
    for e in std::fs::read_dir(&examples).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "service") {
            continue;
        }
        let mut text = std::fs::read_to_string(&p).unwrap();
        // verify checks that ExecStart= binaries exist: use the one under test, and
        // stand in for rclone where it is not installed.
        text = text.replace("/usr/local/bin/cachefs", cachefs_bin());
        if !std::path::Path::new("/usr/bin/rclone").exists() {
            eprintln!("rclone is not installed: verifying with /bin/true in its place");
            text = text.replace("/usr/bin/rclone", "/bin/true");
        }
        let to = dir.path().join(p.file_name().unwrap());
        std::fs::write(&to, text).unwrap();
        units.push(to);
    }
    assert_eq!(units.len(), 2, "{units:?}");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Warnings (unknown keys, bad values) do not fail verify: none may name our units.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("cachefs-uploads") || l.contains("rclone-gcs-uploads"))
        .collect();
    assert!(ours.is_empty(), "{stderr}");
}
