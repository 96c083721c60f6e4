//! Draining the writeback queue at shutdown reports its progress (ops and bytes left)
//! when it begins and periodically, and says when the queue is empty. The daemon logs
//! these reports (every 5 s, see `DRAIN_PROGRESS_EVERY`); here they are collected.

use std::fs;
use std::time::{Duration, Instant};

use crate::writeback_support::*;
use cachefs::writeback::{DRAIN_PROGRESS_EVERY, DrainProgress, Op, Writeback};

fn write_ops(env: &Env, wb: &Writeback, n: usize, size: usize) {
    for i in 0..n {
        let name = format!("f{i}");
        fs::write(env.d(&name), vec![b'x'; size]).unwrap();
        rec(wb, Op::Create { path: p(&name) });
    }
}

#[test]
fn a_drain_that_finishes_reports_the_queue_then_empty() {
    init_logging();
    let env = Env::new();
    // Ops wait for an hour: nothing is replayed before shutdown waives the delay.
    let wb = Writeback::start(&env.cfg(2, Duration::from_secs(3600))).unwrap();
    write_ops(&env, &wb, 5, 1000);
    let mut reports: Vec<DrainProgress> = Vec::new();
    wb.shutdown_reporting(Duration::from_secs(30), Duration::from_secs(5), &mut |p| {
        reports.push(p.clone())
    });
    assert!(reports.len() >= 2, "{reports:?}");
    let first = &reports[0];
    assert_eq!((first.ops_left, first.bytes_left), (5, 5000), "{reports:?}");
    assert!(
        first.to_string().contains("5 ops (5000 bytes) left"),
        "{first}"
    );
    let last = reports.last().unwrap();
    assert_eq!(last.ops_left, 0);
    assert!(last.to_string().contains("drained the queue"), "{last}");
    for i in 0..5 {
        assert_eq!(fs::read(env.s(&format!("f{i}"))).unwrap().len(), 1000);
    }
}

#[test]
fn a_long_drain_reports_periodically_until_it_gives_up() {
    init_logging();
    let env = Env::new();
    let mut cfg = env.cfg(1, Duration::from_secs(3600));
    cfg.retries = 1000;
    cfg.retry_delay = Duration::from_millis(100);
    let wb = Writeback::start(&cfg).unwrap();
    write_ops(&env, &wb, 3, 2000);
    // src goes away: every replay fails and is retried with backoff, so the drain
    // keeps going until its deadline or until the next retry falls after it.
    let gone = env.tmp.path().join("src.gone");
    fs::rename(&env.src, &gone).unwrap();
    let t = Instant::now();
    let mut reports: Vec<DrainProgress> = Vec::new();
    wb.shutdown_reporting(
        Duration::from_millis(1500),
        Duration::from_millis(100),
        &mut |p| reports.push(p.clone()),
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(reports.len() >= 4, "a report every 100ms: {reports:?}");
    for (i, r) in reports.iter().enumerate() {
        assert_eq!((r.ops_left, r.bytes_left), (3, 6000), "{reports:?}");
        assert!(r.remaining <= Duration::from_millis(1500));
        if i > 0 {
            assert!(r.elapsed > reports[i - 1].elapsed);
        }
    }
    assert!(
        reports[1]
            .to_string()
            .contains("3 ops (6000 bytes) left after 0."),
        "{}",
        reports[1]
    );
    // Nothing was lost: the ops wait in the journal for the next start.
    assert_eq!(env.journal_ops(), 3);
    drop(wb); // releases the journal
    fs::rename(&gone, &env.src).unwrap();
    let wb = env.start(1);
    wait_idle(&wb, Duration::from_secs(10));
    assert_eq!(fs::read(env.s("f2")).unwrap().len(), 2000);
}

#[test]
fn the_daemon_reports_every_few_seconds() {
    assert!(DRAIN_PROGRESS_EVERY >= Duration::from_secs(1));
    assert!(DRAIN_PROGRESS_EVERY <= Duration::from_secs(10));
}
