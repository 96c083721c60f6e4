//! `--drain-timeout`: at SIGTERM with `-w`, the queue is replayed for at most that long
//! (the start delay is waived); what is left stays in the journal for the next start.

mod common;

use std::time::Duration;

use common::*;

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
