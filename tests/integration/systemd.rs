//! systemd integration: `Type=notify` units get READY=1 once the mount answers and
//! STOPPING=1 when the daemon begins to shut down; long start-up work (the walk of a
//! large dst with a cache budget, pin prefetch) reports its progress with STATUS= and,
//! before READY=1, EXTEND_TIMEOUT_USEC=.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;

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
    // READY means the mount already answers, and `cachefs ctl` reaches the daemon.
    assert!(is_fuse_mounted(mnt.path()));
    assert!(
        dst.path().join(".cachefs-state/control.sock").exists(),
        "READY before the control channel listens"
    );
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

/// Every notification up to and including the one containing `last`.
fn recv_until(sock: &UnixDatagram, last: &str) -> Vec<String> {
    let mut got = Vec::new();
    loop {
        let m = recv(sock);
        let done = m.contains(last);
        got.push(m);
        if done {
            return got;
        }
    }
}

/// The file count of a progress report ("STATUS=cache: scanning dst: 123 files, ...").
fn files_in(status: &str) -> Option<u64> {
    let rest = status.split(": ").last()?;
    let rest = rest.strip_prefix("done: ").unwrap_or(rest);
    rest.split(' ').next()?.parse().ok()
}

#[test]
fn start_up_scan_of_a_large_dst_reports_progress_to_systemd() {
    if !can_mount("start_up_scan_of_a_large_dst_reports_progress_to_systemd") {
        return;
    }
    let (src, dst, mnt, sockdir) = (tempdir(), tempdir(), tempdir(), tempdir());
    // A dst with many cached files: the budget's start-up walk takes a while.
    let files = 30_000u64;
    for d in 0..60 {
        let dir = dst.path().join(format!("d{d}"));
        std::fs::create_dir(&dir).unwrap();
        for f in 0..files / 60 {
            std::fs::write(dir.join(format!("f{f}")), b"x").unwrap();
        }
    }
    let sock_path = sockdir.path().join("notify");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut child = Command::new(cachefs_bin())
        .args(["-src", src.path().to_str().unwrap()])
        .args(["-dst", dst.path().to_str().unwrap()])
        .args(["-mountpoint", mnt.path().to_str().unwrap()])
        .args(["--cache-size", "10G"])
        .env("NOTIFY_SOCKET", &sock_path)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let got = recv_until(&sock, "READY=1");
    let (ready, before) = got.split_last().unwrap();
    // The first report comes at the first file, long before the walk ends; then at
    // most every 250 ms; the last one says it is done; all before READY=1.
    assert!(before.len() >= 2, "{got:#?}");
    let first = &before[0];
    assert!(
        first.starts_with("STATUS=cache: scanning dst: 1 files, "),
        "{got:#?}"
    );
    let last = before.last().unwrap();
    assert!(
        last.starts_with(&format!(
            "STATUS=cache: scanning dst: done: {files} files, "
        )),
        "{got:#?}"
    );
    let mut prev = 0;
    for m in before {
        assert!(m.contains("\nEXTEND_TIMEOUT_USEC=30000000"), "{m:?}");
        let n = files_in(m.lines().next().unwrap()).unwrap_or_else(|| panic!("{m:?}"));
        assert!(n > prev || n == files, "counts go up: {got:#?}");
        prev = n;
    }
    eprintln!(
        "{} progress reports during the walk of {files} files",
        before.len()
    );
    assert!(ready.contains("READY=1") && !ready.contains("EXTEND_TIMEOUT_USEC"));
    assert!(is_fuse_mounted(mnt.path()));
    signal(&child, libc::SIGTERM);
    assert!(
        wait_timeout(&mut child, Duration::from_secs(20))
            .unwrap()
            .success()
    );
}

#[test]
fn pin_prefetch_reports_progress_to_systemd() {
    if !can_mount("pin_prefetch_reports_progress_to_systemd") {
        return;
    }
    let (src, dst, mnt, sockdir) = (tempdir(), tempdir(), tempdir(), tempdir());
    for i in 0..50 {
        write_file(src.path(), &format!("keep/f{i}"), vec![b'k'; 10_000]);
    }
    let sock_path = sockdir.path().join("notify");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut child = Command::new(cachefs_bin())
        .args(["-src", src.path().to_str().unwrap()])
        .args(["-dst", dst.path().to_str().unwrap()])
        .args(["-mountpoint", mnt.path().to_str().unwrap()])
        .args(["--cache-size", "1G", "--pin", "keep/**"])
        .env("NOTIFY_SOCKET", &sock_path)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Prefetch runs beside the mount: its reports come before or after READY=1.
    let got = recv_until(&sock, "STATUS=cache: prefetching pinned files: done: ");
    let reports: Vec<&String> = got
        .iter()
        .filter(|m| m.starts_with("STATUS=cache: prefetching pinned files: "))
        .collect();
    assert!(
        reports[0].starts_with("STATUS=cache: prefetching pinned files: 1 files, "),
        "{got:#?}"
    );
    assert!(
        reports
            .last()
            .unwrap()
            .starts_with("STATUS=cache: prefetching pinned files: done: 50 files, "),
        "{got:#?}"
    );
    // After READY=1 there is no start timeout to extend.
    assert!(reports.iter().all(|m| !m.contains("EXTEND_TIMEOUT_USEC")));
    if !got.iter().any(|m| m.contains("READY=1")) {
        assert!(recv(&sock).contains("READY=1"));
    }
    assert_eq!(
        std::fs::read(dst.path().join("keep/f49")).unwrap().len(),
        10_000
    );
    signal(&child, libc::SIGTERM);
    assert!(
        wait_timeout(&mut child, Duration::from_secs(20))
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
