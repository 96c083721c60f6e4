//! `--drain-timeout`: at SIGTERM with `-w`, the queue is replayed for at most that long
//! (the start delay is waived); what is left stays in the journal for the next start.

use std::time::Duration;

use crate::bindfs_support;
use crate::common::*;

#[test]
fn shutdown_drains_within_the_timeout() {
    if !can_mount("shutdown_drains_within_the_timeout") {
        return;
    }
    let mut m = Mounted::start(&["-w", "-start-delay", "30", "--drain-timeout", "10"]);
    std::fs::write(m.mnt_path("f"), b"drained at shutdown").unwrap();
    assert!(!m.src_path("f").exists(), "held back by -start-delay");
    m.signal(libc::SIGTERM);
    assert!(
        m.wait_exit(Duration::from_secs(15)).success(),
        "{}",
        m.stderr()
    );
    assert_eq!(
        std::fs::read(m.src_path("f")).unwrap(),
        b"drained at shutdown"
    );
    assert_eq!(wb_status(m.dst.path()).pending_ops, 0);
}

#[test]
fn zero_drain_timeout_keeps_the_queue_for_the_next_start() {
    if !can_mount("zero_drain_timeout_keeps_the_queue_for_the_next_start") {
        return;
    }
    let mut m = Mounted::start(&["-w", "-start-delay", "30", "--drain-timeout", "0"]);
    std::fs::write(m.mnt_path("f"), b"kept in the journal").unwrap();
    m.signal(libc::SIGTERM);
    assert!(
        m.wait_exit(Duration::from_secs(10)).success(),
        "{}",
        m.stderr()
    );
    assert!(!m.src_path("f").exists());
    assert!(
        wb_status(m.dst.path()).pending_ops > 0,
        "the op stays journaled"
    );
    // The next start replays it.
    m.restart(&["-w"]);
    let s = wb_wait_status(m.dst.path(), Duration::from_secs(20), "drained", |s| {
        s.pending_ops == 0
    });
    assert_eq!(s.code, 0, "{}", s.json);
    assert_eq!(
        std::fs::read(m.src_path("f")).unwrap(),
        b"kept in the journal"
    );
    m.stop();
}

/// A src that hangs (SIGSTOP'd bindfs, as a dead network under an rclone mount) while a
/// replay is inside a src syscall: the drain still ends at `--drain-timeout`, the daemon
/// exits (abandoning the stuck worker) and the op stays journaled for the next start.
#[test]
fn drain_ends_on_time_with_a_hung_src() {
    if !can_mount("drain_ends_on_time_with_a_hung_src") {
        return;
    }
    assert!(
        bindfs_support::have_bindfs(),
        "bindfs is needed (scripts/install-deps.sh installs it)"
    );
    let srcmnt = tempdir();
    let bind = bindfs_support::BindfsSrc::start(tempdir(), srcmnt.path()).expect("bindfs");
    let mut m = Mounted::with_dirs(
        srcmnt,
        tempdir(),
        &["-w", "-start-delay", "30", "--drain-timeout", "2"],
    );
    std::fs::write(m.mnt_path("f"), b"stuck").unwrap();
    bind.pause(true);
    // Dropped before `m` (declared after it), also on a failed assertion: cleaning up
    // behind a stopped src would hang.
    let resume = Resume(&bind);
    let t = std::time::Instant::now();
    m.signal(libc::SIGTERM);
    let exited = m.wait_exit(Duration::from_secs(15));
    let took = t.elapsed();
    drop(resume);
    assert!(exited.success(), "{}", m.stderr());
    assert!(took < Duration::from_secs(8), "exit took {took:?}");
    assert!(
        m.stderr().contains("stuck in a src call"),
        "the worker was stuck in src: {}",
        m.stderr()
    );
    assert!(
        wb_status(m.dst.path()).pending_ops > 0,
        "the op stays journaled"
    );
    // The next start (src answering again) replays it.
    m.restart(&["-w"]);
    let s = wb_wait_status(m.dst.path(), Duration::from_secs(20), "drained", |s| {
        s.pending_ops == 0
    });
    assert_eq!(s.code, 0, "{}", s.json);
    assert_eq!(std::fs::read(m.src_path("f")).unwrap(), b"stuck");
    m.stop();
}

/// SIGCONT for a paused bindfs, on drop.
struct Resume<'a>(&'a bindfs_support::BindfsSrc);

impl Drop for Resume<'_> {
    fn drop(&mut self) {
        self.0.pause(false);
    }
}

/// Ops parked as failed (retries exhausted) cannot progress before the deadline: a
/// SIGTERM does not wait the drain timeout out for them, neither in the run that
/// parked them nor after a restart that loaded them from the journal (retried once).
#[test]
fn parked_failed_ops_do_not_hold_the_drain() {
    if !can_mount("parked_failed_ops_do_not_hold_the_drain") {
        return;
    }
    let src = dir_with(&[("ro/keep", b"k")]);
    let Some(_ro) = Immutable::set(&src.path().join("ro")) else {
        eprintln!("skipping: chattr +i does not work here");
        return;
    };
    let args = [
        "-w",
        "-retries",
        "2",
        "-retry-delay",
        "0.1",
        "--drain-timeout",
        "20",
    ];
    let mut m = Mounted::with_dirs(src, tempdir(), &args);
    std::fs::write(m.mnt_path("ro/f"), b"refused").unwrap();
    let s = wb_wait_status(m.dst.path(), Duration::from_secs(20), "parked", |s| {
        s.failed_ops > 0
    });
    assert_eq!(s.failed_ops, 1, "{}", s.json);
    for run in ["parked here", "loaded from the journal"] {
        let t = std::time::Instant::now();
        m.signal(libc::SIGTERM);
        assert!(
            m.wait_exit(Duration::from_secs(25)).success(),
            "{}",
            m.stderr()
        );
        let took = t.elapsed();
        assert!(
            took < Duration::from_secs(8),
            "{run}: exit took {took:?} with a 20 s drain timeout\n{}",
            m.stderr()
        );
        assert_eq!(
            wb_status(m.dst.path()).failed_ops,
            1,
            "{run}: still journaled"
        );
        if run == "parked here" {
            m.restart(&args);
        }
    }
}
