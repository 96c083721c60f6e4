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
    // The web server drop-in, on a stand-in web server unit.
    let web = dir.path().join("apache2.service");
    std::fs::write(
        &web,
        "[Unit]\nDescription=stand-in web server\n[Service]\nExecStart=/bin/true\n",
    )
    .unwrap();
    let dropins = dir.path().join("apache2.service.d");
    std::fs::create_dir(&dropins).unwrap();
    std::fs::copy(
        examples.join("apache2.service.d/cachefs-uploads.conf"),
        dropins.join("cachefs-uploads.conf"),
    )
    .unwrap();
    units.push(web);
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
        .filter(|l| {
            l.contains("cachefs-uploads")
                || l.contains("rclone-gcs-uploads")
                || l.contains("apache2")
        })
        .collect();
    assert!(ours.is_empty(), "{stderr}");
}

/// What the example units must say, whether or not systemd-analyze is here.
#[test]
fn example_units_say_what_production_needs() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/systemd");
    let read = |p: &str| std::fs::read_to_string(dir.join(p)).unwrap();
    // Directives only (comments explain what is not there).
    let directives = |text: &str| -> Vec<String> {
        text.replace("\\\n", " ")
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(String::from)
            .collect()
    };
    let cachefs = directives(&read("cachefs-uploads.service"));
    // A bad command line (exit 2) must not restart forever.
    assert!(
        cachefs.contains(&"RestartPreventExitStatus=2".to_string()),
        "{cachefs:?}"
    );
    assert!(
        cachefs
            .iter()
            .any(|l| l.starts_with("ExecReload=/bin/kill -HUP"))
    );

    let web = directives(&read("apache2.service.d/cachefs-uploads.conf"));
    for want in [
        "Requires=cachefs-uploads.service",
        "After=cachefs-uploads.service",
    ] {
        assert!(
            web.contains(&want.to_string()),
            "drop-in lacks {want}: {web:?}"
        );
    }

    let rclone = directives(&read("rclone-gcs-uploads.service"));
    let exec = rclone
        .iter()
        .find(|l| l.starts_with("ExecStart="))
        .expect("ExecStart");
    // cachefs (root) is the only user of the rclone mount: no --allow-other.
    assert!(!exec.contains("--allow-other"), "{exec}");
    // rclone's write-back queue on persistent disk.
    let cache_dir = exec
        .split_whitespace()
        .skip_while(|w| *w != "--cache-dir")
        .nth(1)
        .expect("--cache-dir");
    assert!(
        cache_dir.starts_with("/var/") && !cache_dir.starts_with("/var/tmp"),
        "{cache_dir}"
    );
}

/// The Debian package's template unit (packaging/systemd/cachefs@.service) passes
/// `systemd-analyze verify` as an instance, and says what a production unit must.
#[test]
fn packaged_template_unit_passes_verify() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("packaging/systemd/cachefs@.service")).unwrap();
    for want in [
        "Type=notify",
        "EnvironmentFile=/etc/cachefs/%i.conf",
        "RestartPreventExitStatus=2",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "ExecStart=/usr/bin/cachefs -src ${SRC} -dst ${DST} -mountpoint ${MOUNTPOINT} $CACHEFS_ARGS",
    ] {
        assert!(text.lines().any(|l| l == want), "the template lacks {want}");
    }
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipping the verify: systemd-analyze is not installed");
        return;
    }
    let dir = tempdir();
    std::fs::write(
        dir.path().join("cachefs@.service"),
        text.replace("/usr/bin/cachefs", cachefs_bin()),
    )
    .unwrap();
    // --man=no: the man page is installed by the package, not here.
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.path().join("cachefs@uploads.service"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("cachefs@"), "{stderr}");
}

/// Under systemd, stderr *is* the journal stream JOURNAL_STREAM names (dev:ino):
/// log lines then carry `<N>` priority prefixes and no timestamps.
#[test]
fn journal_stream_naming_stderr_gets_priority_prefixes() {
    if !can_mount("journal_stream_naming_stderr_gets_priority_prefixes") {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let (src, dst, mnt, logs) = (tempdir(), tempdir(), tempdir(), tempdir());
    let log = logs.path().join("stderr");
    let file = std::fs::File::create(&log).unwrap();
    let meta = file.metadata().unwrap();
    let mut child = Command::new(cachefs_bin())
        .args(["-src", src.path().to_str().unwrap()])
        .args(["-dst", dst.path().to_str().unwrap()])
        .args(["-mountpoint", mnt.path().to_str().unwrap()])
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stderr(file)
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap()
        .contains("cachefs mounted")
    {
        assert!(t.elapsed() < Duration::from_secs(10), "no mount");
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(&child, libc::SIGTERM);
    assert!(
        wait_timeout(&mut child, Duration::from_secs(10))
            .unwrap()
            .success()
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.lines()
            .all(|l| l.starts_with("<6>") || l.starts_with("<4>") || l.starts_with("<7>")),
        "{text}"
    );
    assert!(
        text.contains("<6>cachefs::daemon: cachefs mounted"),
        "{text}"
    );
}
