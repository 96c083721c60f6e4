//! `--metrics-addr`: the real daemon serves Prometheus metrics over loopback HTTP, and the
//! counters move when the mount is used.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::bindfs_support::{BindfsSrc, have_bindfs};
use crate::common::*;

/// `GET path` over a fresh connection: (status line, headers+body split).
fn http_get(addr: SocketAddr, path: &str) -> (String, String, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").expect("a complete response");
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_string(), body.to_string())
}

/// Scrape /metrics: series (name with labels) -> value.
pub(crate) fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let (status, headers, body) = http_get(addr, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        headers
            .lines()
            .any(|h| h == "Content-Type: text/plain; version=0.0.4; charset=utf-8"),
        "{headers}"
    );
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let (series, v) = l.rsplit_once(' ').expect("a sample");
            (series.to_string(), v.parse().expect("a number"))
        })
        .collect()
}

/// The address the daemon logged ("serving metrics at http://ADDR/metrics").
pub(crate) fn metrics_addr(m: &Mounted) -> SocketAddr {
    let needle = "serving metrics at http://";
    let log = m.wait_for_log(needle, Duration::from_secs(10));
    let rest = &log[log.find(needle).unwrap() + needle.len()..];
    rest[..rest.find("/metrics").unwrap()]
        .parse()
        .expect("a socket address in the log")
}

const FETCHES: &str = "cachefs_src_op_duration_seconds_count{op=\"fetch\"}";

#[test]
fn counters_move_when_the_mount_is_used() {
    if !can_mount("counters_move_when_the_mount_is_used") {
        return;
    }
    let data = vec![7u8; 100_000];
    let src = dir_with(&[("dir/big.bin", &data), ("small.txt", b"hi")]);
    let m = Mounted::with_dirs(src, tempdir(), &["--metrics-addr", "127.0.0.1:0"]);
    let addr = metrics_addr(&m);
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");

    let before = scrape(addr);
    for name in [
        "cachefs_cache_hits_total",
        "cachefs_cache_misses_total",
        "cachefs_src_bytes_fetched_total",
        "cachefs_cache_evictions_total",
        "cachefs_writeback_queue_depth",
        "cachefs_src_online",
        "cachefs_src_errors_total{kind=\"enotconn\"}",
        FETCHES,
    ] {
        assert!(before.contains_key(name), "no {name} in {before:?}");
    }

    // A miss: the first read copies the file up.
    assert_eq!(std::fs::read(m.mnt_path("dir/big.bin")).unwrap(), data);
    let after = scrape(addr);
    let delta = |name: &str| after[name] - before[name];
    assert_eq!(delta("cachefs_cache_misses_total"), 1.0);
    assert_eq!(delta("cachefs_src_bytes_fetched_total"), 100_000.0);
    assert_eq!(delta(FETCHES), 1.0);
    assert!(
        after["cachefs_src_op_duration_seconds_bucket{op=\"fetch\",le=\"+Inf\"}"] >= after[FETCHES]
    );

    // A hit: reading it again copies nothing.
    assert_eq!(std::fs::read(m.mnt_path("dir/big.bin")).unwrap(), data);
    let again = scrape(addr);
    assert!(again["cachefs_cache_hits_total"] > after["cachefs_cache_hits_total"]);
    assert_eq!(
        again["cachefs_cache_misses_total"],
        after["cachefs_cache_misses_total"]
    );
    assert_eq!(
        again["cachefs_src_bytes_fetched_total"],
        after["cachefs_src_bytes_fetched_total"]
    );

    let (status, _, _) = http_get(addr, "/");
    assert_eq!(status, "HTTP/1.1 404 Not Found");

    m.stop();
    assert!(
        TcpStream::connect(addr).is_err(),
        "{addr} still answers after the daemon exited"
    );
}

#[test]
fn a_taken_port_fails_the_start_before_mounting() {
    if !can_mount("a_taken_port_fails_the_start_before_mounting") {
        return;
    }
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (src, dst, mnt) = (tempdir(), tempdir(), tempdir());
    let out = Command::new(cachefs_bin())
        .arg("-src")
        .arg(src.path())
        .arg("-dst")
        .arg(dst.path())
        .arg("-mountpoint")
        .arg(mnt.path())
        .args(["--metrics-addr", &addr])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let mountpoint = std::fs::canonicalize(mnt.path()).unwrap();
    let mounted = mount_type(&mountpoint).is_some();
    detach(&mountpoint);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot serve metrics at {addr}")),
        "{stderr}"
    );
    assert!(!mounted, "mounted although the metrics port was taken");
}

#[test]
fn a_bad_address_is_a_usage_error() {
    let (src, dst, mnt) = (tempdir(), tempdir(), tempdir());
    for bad in ["localhost:9477", "127.0.0.1", "9477", "127.0.0.1:99999", ""] {
        let out = Command::new(cachefs_bin())
            .arg("-src")
            .arg(src.path())
            .arg("-dst")
            .arg(dst.path())
            .arg("-mountpoint")
            .arg(mnt.path())
            .arg(format!("-metrics-addr={bad}"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains(&format!("--metrics-addr '{bad}'"))
                && stderr.contains("write e.g. --metrics-addr 127.0.0.1:9477"),
            "{stderr}"
        );
    }
}

#[test]
fn help_suggests_a_loopback_address() {
    let out = Command::new(cachefs_bin()).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(help.contains("--metrics-addr <ADDR>"), "{help}");
    assert!(help.contains("loopback"), "{help}");
}

/// Scrape until `done` holds (metrics move asynchronously); panics after `limit`.
pub(crate) fn scrape_until(
    addr: SocketAddr,
    limit: Duration,
    what: &str,
    done: impl Fn(&HashMap<String, f64>) -> bool,
) -> HashMap<String, f64> {
    let t = Instant::now();
    loop {
        let m = scrape(addr);
        if done(&m) {
            return m;
        }
        assert!(
            t.elapsed() < limit,
            "{what} not reached in {limit:?}: {m:?}"
        );
        sleep(Duration::from_millis(50));
    }
}

const REPLAYED: &str = "cachefs_writeback_replayed_total";
const DEPTH: &str = "cachefs_writeback_queue_depth";

#[test]
fn writeback_counters_move_and_the_queue_drains_to_zero() {
    if !can_mount("writeback_counters_move_and_the_queue_drains_to_zero") {
        return;
    }
    let m = Mounted::with_dirs(
        tempdir(),
        tempdir(),
        &["-w", "--metrics-addr", "127.0.0.1:0"],
    );
    let addr = metrics_addr(&m);
    let before = scrape(addr);
    assert_eq!(before[DEPTH], 0.0);
    std::fs::create_dir(m.mnt_path("d")).unwrap();
    for i in 0..5 {
        std::fs::write(m.mnt_path(&format!("d/f{i}")), vec![b'a'; 4096]).unwrap();
    }
    let after = scrape_until(addr, Duration::from_secs(20), "replayed and drained", |s| {
        s[REPLAYED] >= before[REPLAYED] + 6.0 && s[DEPTH] == 0.0
    });
    for i in 0..5 {
        assert_eq!(
            std::fs::read(m.src_path(&format!("d/f{i}"))).unwrap().len(),
            4096
        );
    }
    // Replays are timed: uploads under op="write", the mkdir under op="meta".
    let count = |op: &str| format!("cachefs_src_op_duration_seconds_count{{op=\"{op}\"}}");
    assert!(
        after[&count("write")] >= before[&count("write")] + 5.0,
        "{after:?}"
    );
    assert!(after[&count("meta")] > before[&count("meta")], "{after:?}");
    assert_eq!(
        after["cachefs_writeback_failures_total"],
        before["cachefs_writeback_failures_total"]
    );
    assert_eq!(after["cachefs_src_online"], 1.0);
    m.stop();
}

#[test]
fn a_dead_src_shows_as_offline_with_errors() {
    if !can_mount("a_dead_src_shows_as_offline_with_errors") {
        return;
    }
    assert!(
        have_bindfs(),
        "bindfs is needed (scripts/install-deps.sh installs it)"
    );
    let real = dir_with(&[("cached", b"cached"), ("uncached", b"only in src")]);
    let srcmnt = tempdir();
    let mut bind = BindfsSrc::start(real, srcmnt.path()).expect("bindfs starts");
    let m = Mounted::with_dirs(srcmnt, tempdir(), &["--metrics-addr", "127.0.0.1:0"]);
    let addr = metrics_addr(&m);
    assert_eq!(std::fs::read(m.mnt_path("cached")).unwrap(), b"cached");
    assert_eq!(std::fs::read_dir(m.mnt_path("")).unwrap().count(), 2);
    let before = scrape(addr);
    assert_eq!(before["cachefs_src_online"], 1.0);
    let stats = "cachefs_src_op_duration_seconds_count{op=\"stat\"}";
    assert!(before[stats] > 0.0, "lookups are timed: {before:?}");

    bind.kill9(); // src answers ENOTCONN from now on
    sleep(Duration::from_millis(1200)); // kernel caches expire
    let err = std::fs::read(m.mnt_path("uncached")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_eq!(std::fs::read(m.mnt_path("cached")).unwrap(), b"cached");
    let down = scrape(addr);
    assert_eq!(down["cachefs_src_online"], 0.0, "{down:?}");
    let enotconn = "cachefs_src_errors_total{kind=\"enotconn\"}";
    assert!(down[enotconn] > before[enotconn], "{down:?}");
    assert!(down[stats] > before[stats], "failed calls are timed too");

    bind.restart();
    sleep(Duration::from_millis(1200));
    assert_eq!(
        std::fs::read(m.mnt_path("uncached")).unwrap(),
        b"only in src"
    );
    let up = scrape(addr);
    assert_eq!(up["cachefs_src_online"], 1.0, "{up:?}");
    // (The first call after the restart may still fail once on the old, dead root
    // before cachefs reopens it: that is counted, so errors are not compared here.)
    m.stop();
}

/// docs/METRICS.md's table lists exactly the metric families the binary serves, each
/// with its type (no mount needed: the registry renders every family from the start).
#[test]
fn every_metric_served_is_documented_and_vice_versa() {
    use std::collections::BTreeMap;
    let served: BTreeMap<String, String> = cachefs::metrics::render()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let (name, kind) = l.split_once(' ').unwrap();
            (name.to_string(), kind.to_string())
        })
        .collect();
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/METRICS.md"),
    )
    .unwrap();
    let documented: BTreeMap<String, String> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("| `cachefs_"))
        .map(|l| {
            let mut cells = l.split('|');
            let name = format!(
                "cachefs_{}",
                cells.next().unwrap().trim().trim_end_matches('`')
            );
            (name, cells.next().unwrap().trim().to_string())
        })
        .collect();
    assert!(served.len() >= 10, "{served:?}");
    assert_eq!(
        served, documented,
        "served (left) and documented in docs/METRICS.md (right) differ"
    );
}

#[test]
fn cache_gauges_show_usage_and_budget() {
    if !can_mount("cache_gauges_show_usage_and_budget") {
        return;
    }
    let data = vec![3u8; 300_000];
    let src = dir_with(&[("f.bin", &data)]);
    let m = Mounted::with_dirs(
        src,
        tempdir(),
        &[
            "--cache-size",
            "10M",
            "--min-free",
            "1M",
            "--metrics-addr",
            "127.0.0.1:0",
        ],
    );
    let addr = metrics_addr(&m);
    let before = scrape_until(addr, Duration::from_secs(10), "budget published", |s| {
        s["cachefs_cache_budget_bytes"] > 0.0
    });
    assert_eq!(before["cachefs_cache_budget_bytes"], 10.0 * 1048576.0);
    assert_eq!(before["cachefs_cache_min_free_bytes"], 1048576.0);
    assert_eq!(before["cachefs_cache_usage_bytes"], 0.0, "{before:?}");
    assert_eq!(before["cachefs_cache_files"], 0.0);
    assert!(before["cachefs_dst_free_bytes"] > 0.0);
    assert_eq!(std::fs::read(m.mnt_path("f.bin")).unwrap(), data);
    // Published on the cache's next tick (once a second).
    let after = scrape_until(addr, Duration::from_secs(10), "usage published", |s| {
        s["cachefs_cache_files"] == 1.0
    });
    let usage = after["cachefs_cache_usage_bytes"];
    assert!((300_000.0..400_000.0).contains(&usage), "{after:?}");
    assert_eq!(after["cachefs_cache_pinned_bytes"], 0.0);
    // The same numbers as cache.json.
    let json = std::fs::read_to_string(m.dst_path(".cachefs-state/cache.json")).unwrap();
    assert!(
        json.contains(&format!("\"usage_bytes\":{usage},")),
        "{json}"
    );
    m.stop();
}

#[test]
fn fuse_requests_are_timed_by_op() {
    if !can_mount("fuse_requests_are_timed_by_op") {
        return;
    }
    let src = dir_with(&[("d/f.txt", b"hello")]);
    // Without passthrough the daemon serves reads and writes, so they are seen.
    let m = Mounted::with_dirs(
        src,
        tempdir(),
        &["--no-passthrough", "--metrics-addr", "127.0.0.1:0"],
    );
    let addr = metrics_addr(&m);
    let count = |s: &HashMap<String, f64>, op: &str| {
        s[&format!("cachefs_fuse_op_duration_seconds_count{{op=\"{op}\"}}")]
    };
    let before = scrape(addr);
    assert_eq!(std::fs::read(m.mnt_path("d/f.txt")).unwrap(), b"hello");
    std::fs::create_dir(m.mnt_path("new")).unwrap();
    std::fs::write(m.mnt_path("new/g"), b"x").unwrap();
    assert_eq!(std::fs::read_dir(m.mnt_path("d")).unwrap().count(), 1);
    // RELEASE reaches the daemon after close() returned, and a readdirplus served on
    // its own thread records its time after its reply: wait for both.
    let listed = |s: &HashMap<String, f64>| count(s, "readdir") + count(s, "readdirplus");
    let after = scrape_until(
        addr,
        Duration::from_secs(10),
        "releases and listings",
        |s| count(s, "release") > count(&before, "release") && listed(s) > listed(&before),
    );
    for op in [
        "lookup", "open", "read", "mkdir", "create", "write", "release", "opendir",
    ] {
        assert!(
            count(&after, op) > count(&before, op),
            "op {op}: {} -> {}",
            count(&before, op),
            count(&after, op)
        );
    }
    assert!(
        count(&after, "readdir") + count(&after, "readdirplus")
            > count(&before, "readdir") + count(&before, "readdirplus")
    );
    let bucket = "cachefs_fuse_op_duration_seconds_bucket{op=\"lookup\",le=\"+Inf\"}";
    assert_eq!(after[bucket], count(&after, "lookup"));
    assert_eq!(count(&after, "symlink"), 0.0);
    m.stop();
}

#[test]
fn process_metrics_are_the_daemons() {
    if !can_mount("process_metrics_are_the_daemons") {
        return;
    }
    let m = Mounted::with_dirs(tempdir(), tempdir(), &["--metrics-addr", "127.0.0.1:0"]);
    let addr = metrics_addr(&m);
    let pid = m.pid().expect("the daemon runs");
    let s = scrape(addr);
    // The daemon's, not this test's: compare with /proc/PID.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| -> f64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next())
            .unwrap()
            .parse()
            .unwrap()
    };
    let threads = s["cachefs_process_threads"];
    assert!(threads > 2.0, "{s:?}");
    assert!(
        (threads - field("Threads:")).abs() <= 4.0,
        "{threads} vs {status}"
    );
    let rss = s["cachefs_process_resident_memory_bytes"];
    assert!(rss > 1e6, "{rss}");
    assert!(
        (rss / (field("VmRSS:") * 1024.0) - 1.0).abs() < 0.5,
        "{rss} vs {status}"
    );
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as f64;
    let open = s["cachefs_process_open_fds"];
    assert!(open >= 4.0 && (open - fds).abs() <= 4.0, "{open} vs {fds}");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let soft: f64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(s["cachefs_process_max_fds"], soft);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let started = s["cachefs_process_start_time_seconds"];
    assert!(
        started <= now + 1.0 && started > now - 120.0,
        "{started} vs {now}"
    );
    assert!(s["cachefs_process_cpu_seconds_total"] >= 0.0);
    m.stop();
}

#[test]
fn lazy_fetch_bytes_are_counted_once() {
    if !can_mount("lazy_fetch_bytes_are_counted_once") {
        return;
    }
    const MIB: usize = 1 << 20;
    let size = 16 * MIB;
    let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8 + 1).collect();
    let src = dir_with(&[("big", &data)]);
    let m = Mounted::with_dirs(
        src,
        tempdir(),
        &[
            "--lazy-threshold",
            "4M",
            "--block-size",
            "1M",
            "--metrics-addr",
            "127.0.0.1:0",
        ],
    );
    let addr = metrics_addr(&m);
    let before = scrape(addr);
    let delta = |s: &HashMap<String, f64>, k: &str| s[k] - before[k];
    const ALL: &str = "cachefs_src_bytes_fetched_total";
    const LAZY: &str = "cachefs_lazy_bytes_fetched_total";
    const READS: &str = "cachefs_src_op_duration_seconds_count{op=\"read\"}";

    // One 4 KiB read in the middle: a block or a few come, not the file.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(m.mnt_path("big")).unwrap();
        let mut buf = vec![0u8; 4096];
        f.read_exact_at(&mut buf, 8 * MIB as u64).unwrap();
        assert_eq!(buf, data[8 * MIB..8 * MIB + 4096]);
    }
    // Streams may finish their block after the read returned: wait until the counters
    // stand still (two scrapes 200 ms apart agree).
    let mut partly = scrape(addr);
    let t = Instant::now();
    loop {
        sleep(Duration::from_millis(200));
        let again = scrape(addr);
        if again[LAZY] == partly[LAZY] && again[ALL] == partly[ALL] {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "lazy fetch never settled"
        );
        partly = again;
    }
    let lazy = delta(&partly, LAZY);
    assert!(lazy >= 4096.0 && lazy < size as f64, "lazy bytes {lazy}");
    assert_eq!(delta(&partly, ALL), lazy, "range fetches count in both");
    assert!(delta(&partly, READS) >= 1.0, "range reads are timed");
    assert_eq!(delta(&partly, "cachefs_cache_misses_total"), 0.0);

    // Opening it for writing completes it into a whole copy: one miss, and every byte
    // of src counted once overall.
    drop(
        std::fs::OpenOptions::new()
            .write(true)
            .open(m.mnt_path("big"))
            .unwrap(),
    );
    let done = scrape(addr);
    assert_eq!(delta(&done, "cachefs_cache_misses_total"), 1.0);
    assert_eq!(delta(&done, ALL), size as f64, "{done:?}");
    assert_eq!(delta(&done, LAZY), size as f64);
    assert_eq!(std::fs::read(m.dst_path("big")).unwrap(), data);
    m.stop();
}

/// `--no-xattr`: every xattr call fails with ENOTSUP, and the kernel asks the daemon
/// once per kind of call, not once per entry: `ls -l` of 200 entries sends it one
/// getxattr (its two per entry otherwise: `security.selinux` and the ACL).
#[test]
fn no_xattr_answers_enotsup_and_the_kernel_stops_asking() {
    if !can_mount("no_xattr_answers_enotsup_and_the_kernel_stops_asking") {
        return;
    }
    let files: Vec<(String, Vec<u8>)> = (0..200).map(|i| (format!("d/f{i}"), vec![1])).collect();
    let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, d)| (n.as_str(), &d[..])).collect();
    let getxattrs = "cachefs_fuse_op_duration_seconds_count{op=\"getxattr\"}";
    for (args, want) in [(&[][..], 400.0), (&["--no-xattr"][..], 1.0)] {
        let mut all = vec!["--metrics-addr", "127.0.0.1:0"];
        all.extend_from_slice(args);
        let m = Mounted::with_dirs(dir_with(&refs), tempdir(), &all);
        let addr = metrics_addr(&m);
        let before = scrape(addr).get(getxattrs).copied().unwrap_or(0.0);
        let out = std::process::Command::new("ls")
            .arg("-l")
            .arg(m.mnt_path("d"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 201);
        let asked = scrape(addr).get(getxattrs).copied().unwrap_or(0.0) - before;
        eprintln!("{args:?}: {asked} getxattr requests for ls -l of 200 entries");
        if args.is_empty() {
            assert!(asked >= 200.0, "without --no-xattr: {asked} getxattrs");
        } else {
            assert_eq!(asked, want, "--no-xattr: getxattrs that reached the daemon");
            let p = m.mnt_path("d/f1");
            assert_eq!(getxattr(&p, "user.x"), Err(libc::EOPNOTSUPP));
            assert_eq!(setxattr(&p, "user.x", b"v"), Err(libc::EOPNOTSUPP));
            assert!(
                m.stderr().contains("extended attributes: off"),
                "{}",
                m.stderr()
            );
        }
        m.stop();
    }
}
