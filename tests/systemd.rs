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
