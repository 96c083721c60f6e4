//! `cachefs status DST` with a real daemon and a src that dies (a bindfs mount killed
//! with SIGKILL): src shows online, then OFFLINE with since-when and the error, then
//! online again; with the daemon stopped it shows the last known state. The writeback
//! queue and the cache budget lines are there too.

use std::process::{Command, Output};
use std::thread::sleep;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::bindfs_support::{BindfsSrc, have_bindfs};
use crate::common::*;

fn status(dst: &std::path::Path, json: bool) -> (Option<i32>, String) {
    let mut cmd = Command::new(cachefs_bin());
    cmd.arg("status").arg(dst);
    if json {
        cmd.arg("--json");
    }
    let Output { status, stdout, .. } = cmd.output().unwrap();
    (status.code(), String::from_utf8_lossy(&stdout).into_owned())
}

/// The number after `"key":` in a flat JSON object.
fn json_field<'a>(json: &'a str, key: &str) -> &'a str {
    let pat = format!("\"{key}\":");
    let at = json
        .find(&pat)
        .unwrap_or_else(|| panic!("no {key} in {json}"))
        + pat.len();
    let rest = &json[at..];
    &rest[..rest.find([',', '}']).unwrap()]
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn status_follows_src_through_an_outage() {
    if !can_mount("status_follows_src_through_an_outage") {
        return;
    }
    assert!(
        have_bindfs(),
        "bindfs is needed (scripts/install-deps.sh installs it)"
    );
    let real = dir_with(&[("cached", b"cached"), ("uncached", b"only in src")]);
    let srcmnt = tempdir();
    let mut bind = BindfsSrc::start(real, srcmnt.path()).expect("bindfs starts");
    let m = Mounted::with_dirs(
        srcmnt,
        tempdir(),
        &["-w", "--cache-size", "100M", "--src-timeout", "2"],
    );
    let dst = m.dst.path().to_path_buf();
    assert_eq!(std::fs::read(m.mnt_path("cached")).unwrap(), b"cached");
    assert_eq!(std::fs::read_dir(m.mnt_path("")).unwrap().count(), 2);

    let (code, text) = status(&dst, false);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.starts_with("src:            online since "), "{text}");
    assert!(text.contains("pending ops:"), "{text}");
    let (_, json) = status(&dst, true);
    assert_eq!(json_field(&json, "src_online"), "true", "{json}");
    assert_eq!(json_field(&json, "src_offline_since"), "null", "{json}");
    assert_eq!(json_field(&json, "daemon_running"), "true", "{json}");

    let t0 = now();
    bind.kill9();
    sleep(Duration::from_millis(1200)); // kernel caches expire
    let err = std::fs::read(m.mnt_path("uncached")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // Writes queue while src is away.
    std::fs::write(m.mnt_path("new"), b"written offline").unwrap();

    // Offline is shown; the exit status judges failed ops only (the daemon learns that
    // src is back only at its next call to src).
    let (_code, text) = status(&dst, false);
    assert!(text.starts_with("src:            OFFLINE since "), "{text}");
    assert!(text.contains("not connected"), "{text}");
    let (_code, json) = status(&dst, true);
    assert_eq!(json_field(&json, "src_online"), "false", "{json}");
    let since: u64 = json_field(&json, "src_offline_since").parse().unwrap();
    assert!(since >= t0 && since <= now(), "{since} vs {t0}: {json}");
    assert!(json.contains("\"cache\":{"), "the cache budget ran: {json}");

    bind.restart();
    sleep(Duration::from_millis(1200));
    assert_eq!(
        std::fs::read(m.mnt_path("uncached")).unwrap(),
        b"only in src"
    );
    // The queued write reaches src by itself.
    let real = bind.real.path().to_path_buf();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::fs::read(real.join("new")).ok().as_deref() != Some(b"written offline") {
        assert!(
            std::time::Instant::now() < deadline,
            "the queued write never reached src"
        );
        sleep(Duration::from_millis(100));
    }
    let (code, text) = status(&dst, false);
    assert!(text.starts_with("src:            online since "), "{text}");
    assert!(text.contains("cache: "), "{text}");
    assert_eq!(code, Some(0), "{text}");
    let (_, json) = status(&dst, true);
    assert_eq!(json_field(&json, "src_online"), "true", "{json}");
    assert_eq!(json_field(&json, "src_offline_since"), "null", "{json}");

    // Stop the daemon but keep its dst (`Mounted::stop` would remove it).
    let mut m = m;
    m.signal(libc::SIGTERM);
    assert!(m.wait_exit(STOP_TIMEOUT).success(), "{}", m.stderr());
    // No daemon: status still answers, with the last known state.
    let (code, text) = status(&dst, false);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("is not running]"), "{text}");
    let (_, json) = status(&dst, true);
    assert_eq!(json_field(&json, "daemon_running"), "false", "{json}");
}
