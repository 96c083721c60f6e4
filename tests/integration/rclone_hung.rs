//! A hung bucket (the S3 server stopped with SIGSTOP, rclone alive and every call into
//! the bucket blocking) never hangs the mount: what dst can answer is answered at
//! local speed, before and after src is known to be offline, and at most one caller
//! waits `--src-timeout` (an uncached read, which then fails with EIO).
//! The test prints the latency table (bucket up vs hung) that bench/rclone-hung.sh
//! reports.

use std::fs;
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::rclone_support::*;

/// `--src-timeout` of the node under test.
const SRC_TIMEOUT: Duration = Duration::from_secs(5);
/// What "local speed" may take at worst on a loaded 2-core CI machine.
const LOCAL: Duration = Duration::from_millis(700);

struct Timings(Vec<(String, Duration, Duration)>);

fn time<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed())
}

/// The operations measured, on the node's mount: each returns how long it took.
fn ops(node: &Node, round: &str) -> Vec<(&'static str, Duration)> {
    let mut v = Vec::new();
    // A cached file whose revalidation is due (interval 1 s, last check long ago).
    let (r, t) = time(|| fs::read(node.path("d/0")));
    r.unwrap();
    v.push(("read cached file (revalidation due)", t));
    let (r, t) = time(|| fs::read(node.path("d/1")));
    r.unwrap();
    v.push(("read another cached file", t));
    let (r, t) = time(|| fs::metadata(node.path("d/2")));
    r.unwrap();
    v.push(("stat cached file", t));
    let (r, t) = time(|| {
        for i in 0..3 {
            fs::write(node.path(&format!("new-{round}-{i}")), b"new")?;
        }
        Ok::<_, std::io::Error>(())
    });
    r.unwrap();
    v.push(("create 3 new files", t));
    let (r, t) = time(|| {
        let mut n = 0;
        for e in fs::read_dir(node.path("d"))? {
            e?.metadata()?;
            n += 1;
        }
        Ok::<_, std::io::Error>(n)
    });
    assert_eq!(r.unwrap(), 28);
    v.push(("ls -l of a 28-entry cached dir", t));
    let (r, t) = time(|| fs::write(node.path("d/3"), b"overwritten"));
    r.unwrap();
    v.push(("overwrite a cached file", t));
    v
}

#[test]
fn a_hung_bucket_never_hangs_what_dst_can_answer() {
    if !can_mount("a_hung_bucket_never_hangs_what_dst_can_answer") {
        return;
    }
    let mut bucket = Bucket::start();
    for i in 0..28 {
        bucket.put(&format!("d/{i}"), format!("file {i}\n").as_bytes());
    }
    bucket.put("uncached.bin", &[7u8; 4096]);
    let timeout = format!("{}", SRC_TIMEOUT.as_secs());
    let node = Node::start(
        &bucket,
        &["-w", "--revalidate", "1", "--src-timeout", &timeout],
    );
    for i in 0..28 {
        fs::read(node.path(&format!("d/{i}"))).unwrap();
    }
    // Known to the mount (looked up), not cached: its read needs the bucket.
    assert_eq!(fs::metadata(node.path("uncached.bin")).unwrap().len(), 4096);
    // Past the revalidation interval and rclone's directory cache.
    sleep(DIR_CACHE + Duration::from_millis(1500));
    let up = ops(&node, "up");
    node.wait_drained(Duration::from_secs(60));
    sleep(DIR_CACHE + Duration::from_millis(1500));

    bucket.pause();
    let hung = ops(&node, "hung");
    let (r, uncached) = time(|| fs::read(node.path("uncached.bin")));
    let errno = r.err().and_then(|e| e.raw_os_error());
    let again = ops(&node, "again");
    let status = wb_status(&node.dst);
    bucket.resume();

    let mut table = Timings(Vec::new());
    for (i, (name, t_up)) in up.iter().enumerate() {
        table
            .0
            .push((name.to_string(), *t_up, hung[i].1.max(again[i].1)));
    }
    eprintln!(
        "{:<40} {:>10} {:>12}",
        "operation", "bucket up", "bucket hung"
    );
    for (n, u, h) in &table.0 {
        eprintln!(
            "{n:<40} {:>8.1}ms {:>10.1}ms",
            u.as_secs_f64() * 1e3,
            h.as_secs_f64() * 1e3
        );
    }
    eprintln!(
        "{:<40} {:>10} {:>10.1}ms (errno {errno:?})",
        "read uncached file",
        "-",
        uncached.as_secs_f64() * 1e3
    );

    // At most the first caller that needs the bucket waits (up to --src-timeout):
    // it finds the outage. Everything after it, and everything dst can answer,
    // runs at local speed.
    let slow: Vec<_> = hung.iter().filter(|(_, t)| *t >= LOCAL).collect();
    assert!(
        slow.len() <= 1,
        "more than one slow call with the bucket hung: {slow:?}\n{}",
        node.logs()
    );
    assert!(
        slow.iter()
            .all(|(_, t)| *t <= SRC_TIMEOUT + Duration::from_secs(2)),
        "{slow:?}"
    );
    for (n, t) in &again {
        assert!(
            *t < LOCAL,
            "{n}: {t:?} with src known to be offline\n{}",
            node.logs()
        );
    }
    assert_eq!(errno, Some(libc::EIO), "an uncached read fails with EIO");
    assert!(
        uncached <= SRC_TIMEOUT + Duration::from_secs(2),
        "{uncached:?}"
    );
    assert!(
        status.json.contains("\"src_online\":false"),
        "status shows the outage: {}",
        status.json
    );
    // And the bucket's return is noticed: writes made meanwhile reach it.
    node.wait_drained(Duration::from_secs(90));
    let objects = bucket.objects();
    assert!(
        objects.contains_key("new-hung-0") && objects.contains_key("new-again-2"),
        "{objects:?}"
    );
}

/// The leftover checks (`--src-settle` after a delete, the bed uses 6 s) make src calls
/// of their own. When one falls due while the bucket hangs, it waits on its own thread:
/// cached reads, stats and listings stay at local speed all along, and once the bucket
/// is back the check runs and the bucket ends up equal to the mount.
#[test]
fn a_leftover_check_due_while_the_bucket_hangs_blocks_nothing() {
    if !can_mount("a_leftover_check_due_while_the_bucket_hangs_blocks_nothing") {
        return;
    }
    let mut bucket = Bucket::start();
    for i in 0..10 {
        bucket.put(&format!("d/{i}"), format!("file {i}\n").as_bytes());
    }
    let timeout = format!("{}", SRC_TIMEOUT.as_secs());
    let node = Node::start(
        &bucket,
        &["-w", "--revalidate", "1", "--src-timeout", &timeout],
    );
    for i in 0..10 {
        fs::read(node.path(&format!("d/{i}"))).unwrap();
    }
    fs::remove_file(node.path("d/9")).unwrap();
    node.wait_drained(Duration::from_secs(60));
    // The list of checks reaches disk (where `status` reads it) within a second.
    let t = Instant::now();
    while wb_status(&node.dst).leftover_checks != 1 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the delete noted no check: {}",
            wb_status(&node.dst).json
        );
        sleep(Duration::from_millis(100));
    }

    bucket.pause();
    let t = Instant::now();
    let mut worst: Vec<(&str, Duration)> = Vec::new();
    // Past the check's due time (6 s after the delete) and rclone's directory cache.
    while t.elapsed() < Duration::from_secs(10) {
        let (r, read) = time(|| fs::read(node.path("d/0")));
        assert_eq!(r.unwrap(), b"file 0\n");
        let (r, stat) = time(|| fs::metadata(node.path("d/1")));
        r.unwrap();
        let (r, list) = time(|| fs::read_dir(node.path("d")).map(|d| d.count()));
        assert_eq!(r.unwrap(), 9);
        worst.push(("round", read.max(stat).max(list)));
        sleep(Duration::from_millis(200));
    }
    let status = wb_status(&node.dst);
    bucket.resume();
    let slow: Vec<_> = worst.iter().filter(|(_, d)| *d >= LOCAL).collect();
    eprintln!(
        "{} rounds with the bucket hung, slowest {:?}; status then: {}",
        worst.len(),
        worst.iter().map(|w| w.1).max(),
        status.json
    );
    // One caller may be the one that finds the outage (up to --src-timeout).
    assert!(
        slow.len() <= 1,
        "cached calls stalled with a leftover check due: {slow:?}\n{}",
        node.logs()
    );

    node.wait_settled(Duration::from_secs(120));
    assert_eq!(wb_status(&node.dst).leftover_checks, 0);
    assert_bucket_equals_mount(&bucket, &node);
}
