//! Lazy range fetch on a real mount (`--lazy-threshold`, default 64 MiB; blocks of
//! `--block-size`, default 1 MiB): the first bytes of a huge uncached file arrive
//! without a whole copy, reads at random offsets are exact while dst holds only the
//! touched blocks, a half-fetched file continues after kill -9, and writes into a
//! partially present file (with -w) leave the mount and src with the bytes a normal
//! file would hold; fsx on a lazily opened 64 MiB+ file.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::common::*;

const MIB: u64 = 1 << 20;

/// Bytes allocated under `root` (all of dst, state folder included).
fn allocated(root: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(root).unwrap().flatten() {
        let md = e.path().symlink_metadata().unwrap();
        total += md.blocks() * 512;
        if md.is_dir() {
            total += allocated(&e.path());
        }
    }
    total
}

fn read_at(p: &Path, off: u64, len: usize) -> Vec<u8> {
    let f = File::open(p).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, off).unwrap();
    buf
}

fn status_json(dst: &Path) -> String {
    let out = std::process::Command::new(cachefs_bin())
        .arg("status")
        .arg(dst)
        .arg("--json")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn first_4k_of_an_uncached_2gib_file_comes_without_a_whole_copy() {
    if !can_mount("lazy first 4k") {
        return;
    }
    let src = tempdir();
    let size = 2u64 << 30;
    let head = content(1, 64 << 10);
    let mid = content(2, 4096);
    let tail = content(3, 4096);
    {
        let f = File::create(src.path().join("huge")).unwrap();
        f.set_len(size).unwrap();
        f.write_all_at(&head, 0).unwrap();
        f.write_all_at(&mid, 1 << 30).unwrap();
        f.write_all_at(&tail, size - 4096).unwrap();
    }
    let m = Mounted::with_dirs(src, tempdir(), &[]);
    let before = allocated(m.dst.path());
    let t0 = Instant::now();
    let got = read_at(&m.mnt_path("huge"), 0, 4096);
    let took = t0.elapsed();
    eprintln!("first 4 KiB of a 2 GiB uncached file: {took:?}");
    assert_eq!(got, head[..4096]);
    let used = allocated(m.dst.path()) - before;
    assert!(used < 16 * MIB, "dst took {used} bytes for a 4 KiB read");
    assert_eq!(std::fs::metadata(m.mnt_path("huge")).unwrap().len(), size);
    assert_eq!(read_at(&m.mnt_path("huge"), 1 << 30, 4096), mid);
    assert_eq!(read_at(&m.mnt_path("huge"), size - 4096, 4096), tail);
    assert!(!m.dst_path("huge").exists(), "no whole copy at the path");
    let j = status_json(m.dst.path());
    assert_eq!(json_u64(&j, "partial_files"), Some(1), "{j}");
    assert_eq!(json_u64(&j, "partial_total_bytes"), Some(size), "{j}");
    m.stop();
}

#[test]
fn random_offset_reads_are_exact_and_dst_holds_only_touched_blocks() {
    if !can_mount("lazy random reads") {
        return;
    }
    let len = 96 * MIB;
    let data = content(7, len);
    let src = dir_with(&[("big", &data)]);
    let m = Mounted::with_dirs(src, tempdir(), &["--no-passthrough"]);
    let f = File::open(m.mnt_path("big")).unwrap();
    let mut x: u64 = 12345;
    let mut touched = std::collections::BTreeSet::new();
    for _ in 0..40 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let off = (x >> 16) % len;
        let n = ((x >> 8) % (300 << 10)).min(len - off) as usize + 1;
        let n = n.min((len - off) as usize);
        let mut buf = vec![0u8; n];
        f.read_exact_at(&mut buf, off).unwrap();
        assert!(
            buf == data[off as usize..off as usize + n],
            "bytes at {off}+{n}"
        );
        for b in off / MIB..=(off + n as u64 - 1) / MIB {
            touched.insert(b);
        }
    }
    let used = allocated(m.dst.path());
    // Kernel read-ahead and prefetch may add a few blocks per touched one.
    let bound = (touched.len() as u64 + 1) * 6 * MIB;
    eprintln!("touched {} blocks, dst holds {used} bytes", touched.len());
    assert!(
        used <= bound && used < len / 2,
        "dst holds {used} bytes, bound {bound}"
    );
    assert!(
        used >= touched.len() as u64 * MIB / 2,
        "dst holds {used} bytes"
    );
    drop(f);
    m.stop();
}

#[test]
fn half_fetched_file_continues_after_kill_9() {
    if !can_mount("lazy kill -9") {
        return;
    }
    let len = 70 * MIB + 777;
    let data = content(9, len);
    let src = dir_with(&[("big", &data)]);
    let mut m = Mounted::with_dirs(src, tempdir(), &[]);
    {
        let f = File::open(m.mnt_path("big")).unwrap();
        let mut buf = vec![0u8; 8 * MIB as usize];
        f.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf == data[..buf.len()]);
        let mut b2 = vec![0u8; 4096];
        f.read_exact_at(&mut b2, 50 * MIB).unwrap();
        assert!(b2 == data[50 * MIB as usize..50 * MIB as usize + 4096]);
    }
    // The handle's last map update is written at RELEASE, which the kernel sends
    // after close() returns (passthrough opens need no FLUSH); a kill -9 before it
    // costs a refetch of those blocks, never data. Wait for it, so that what the test
    // kills is a daemon whose map records the reads.
    let t = std::time::Instant::now();
    while json_u64(&status_json(m.dst.path()), "partial_present_bytes").unwrap_or(0) < 8 * MIB
        && t.elapsed() < std::time::Duration::from_secs(10)
    {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    m.kill9();
    let j = status_json(m.dst.path());
    let present = json_u64(&j, "partial_present_bytes").unwrap_or(0);
    assert!(
        json_u64(&j, "partial_files") == Some(1) && present >= 8 * MIB && present < len,
        "the map survived kill -9: {j}"
    );
    m.restart(&[]);
    let got = std::fs::read(m.mnt_path("big")).unwrap();
    assert!(got == data, "whole file after restart");
    // Complete now: the next open installs it as a normal cached file.
    drop(read_at(&m.mnt_path("big"), 0, 1));
    assert!(std::fs::read(m.dst_path("big")).unwrap() == data);
    let j = status_json(m.dst.path());
    assert_eq!(json_u64(&j, "partial_files"), Some(0), "{j}");
    m.stop();
}

fn writes_into_a_partial_file(extra: &[&str]) {
    let name = format!("lazy writes {extra:?}");
    if !can_mount(&name) {
        return;
    }
    let len = 72 * MIB;
    let mut model = content(11, len);
    let src = dir_with(&[("big", &model)]);
    let mut args = vec!["-w"];
    args.extend_from_slice(extra);
    let m = Mounted::with_dirs(src, tempdir(), &args);
    let p = m.mnt_path("big");
    // Fetch a few blocks, keep the read-only handle open.
    let ro = File::open(&p).unwrap();
    let mut buf = vec![0u8; 4096];
    ro.read_exact_at(&mut buf, 3 * MIB).unwrap();
    assert!(buf == model[3 * MIB as usize..3 * MIB as usize + 4096]);
    {
        let w = OpenOptions::new().write(true).open(&p).unwrap();
        for (off, seed, n) in [
            (3 * MIB + 100, 21u64, 5000u64),  // a fetched block
            (40 * MIB - 10, 22, 3 * MIB / 2), // unfetched blocks, across a boundary
            (len - 10, 23, 30),               // past the end: grows the file
        ] {
            let bytes = content(seed, n);
            w.write_all_at(&bytes, off).unwrap();
            let end = (off + n) as usize;
            if end > model.len() {
                model.resize(end, 0);
            }
            model[off as usize..end].copy_from_slice(&bytes);
        }
        w.sync_all().unwrap();
    }
    // The read-only handle opened while the file was partial sees the writes.
    let mut seen = vec![0u8; 2 * MIB as usize];
    ro.read_exact_at(&mut seen, 40 * MIB - MIB).unwrap();
    assert!(
        seen == model[(39 * MIB) as usize..(41 * MIB) as usize],
        "an older read-only handle sees the written bytes"
    );
    let cut = 60 * MIB + 123;
    OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(cut)
        .unwrap();
    model.truncate(cut as usize);
    let mut w = OpenOptions::new().append(true).open(&p).unwrap();
    w.write_all(b"tail").unwrap();
    model.extend_from_slice(b"tail");
    drop(w);
    drop(ro);
    assert!(
        std::fs::read(&p).unwrap() == model,
        "the mount holds the model's bytes"
    );
    wait_drained(&m, Duration::from_secs(60));
    sleep(Duration::from_millis(200));
    assert!(
        std::fs::read(m.src_path("big")).unwrap() == model,
        "src holds the model's bytes"
    );
    m.stop();
}

#[test]
fn writes_into_a_partially_present_file_match_a_normal_file_on_mount_and_src() {
    writes_into_a_partial_file(&[]);
}

#[test]
fn writes_into_a_partially_present_file_no_passthrough() {
    writes_into_a_partial_file(&["--no-passthrough"]);
}

fn fsx_on_lazy(extra: &[&str]) {
    let name = format!("lazy fsx {extra:?}");
    if !can_mount(&name) {
        return;
    }
    if std::process::Command::new("fsx")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("{name}: skipped, fsx is not installed (scripts/install-deps.sh)");
        return;
    }
    let len = 66 * MIB;
    let data = content(5, len);
    let src = dir_with(&[("big", &data)]);
    let mut args = vec!["-w"];
    args.extend_from_slice(extra);
    let m = Mounted::with_dirs(src, tempdir(), &args);
    // Partially present first: a few blocks fetched by a read-only open.
    {
        let f = File::open(m.mnt_path("big")).unwrap();
        let mut buf = vec![0u8; 8192];
        for off in [0, 17 * MIB, 65 * MIB] {
            f.read_exact_at(&mut buf, off).unwrap();
            assert!(buf == data[off as usize..off as usize + 8192]);
        }
    }
    let j = status_json(m.dst.path());
    assert_eq!(json_u64(&j, "partial_files"), Some(1), "{j}");
    let conf = tempdir();
    let conf_path = conf.path().join("fsx.toml");
    std::fs::write(
        &conf_path,
        "blockmode = true\nnosizechecks = true\n[opsize]\nmax = 131072\n[weights]\n\
         close_open = 0\nread = 10\nwrite = 10\nmapread = 10\nmapwrite = 10\ninvalidate = 1\n\
         truncate = 0\nfsync = 1\nfdatasync = 1\nposix_fallocate = 0\n",
    )
    .unwrap();
    let out = std::process::Command::new("fsx")
        .args(["-q", "-N", "3000", "-S", "7", "-f"])
        .arg(&conf_path)
        .arg("-P")
        .arg(conf.path())
        .arg(m.mnt_path("big"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{name}: fsx failed: {}\n{}\ndaemon log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        m.stderr()
    );
    let mounted = std::fs::read(m.mnt_path("big")).unwrap();
    assert_eq!(mounted.len() as u64, len);
    wait_drained(&m, Duration::from_secs(60));
    sleep(Duration::from_millis(200));
    assert!(
        std::fs::read(m.src_path("big")).unwrap() == mounted,
        "src equals the mount"
    );
    m.stop();
}

#[test]
fn fsx_on_a_lazily_fetched_file_with_passthrough() {
    fsx_on_lazy(&[]);
}

#[test]
fn fsx_on_a_lazily_fetched_file_no_passthrough() {
    fsx_on_lazy(&["--no-passthrough"]);
}

#[test]
fn pinned_large_file_is_fetched_whole_not_lazily() {
    if !can_mount("lazy pinned") {
        return;
    }
    let data = content(13, 70 * MIB);
    let src = dir_with(&[("big", &data)]);
    let m = Mounted::with_dirs(src, tempdir(), &["--pin", "big"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !m.dst_path("big").exists() {
        assert!(Instant::now() < deadline, "the pinned file was not fetched");
        sleep(Duration::from_millis(50));
    }
    assert!(std::fs::read(m.dst_path("big")).unwrap() == data);
    let j = status_json(m.dst.path());
    assert_eq!(json_u64(&j, "partial_files"), Some(0), "{j}");
    m.stop();
}

#[test]
fn truncate_of_a_partially_present_file_keeps_the_right_bytes() {
    if !can_mount("lazy truncate") {
        return;
    }
    let data = content(17, 70 * MIB);
    let src = dir_with(&[("big", &data)]);
    let m = Mounted::with_dirs(src, tempdir(), &["-w"]);
    let p = m.mnt_path("big");
    assert_eq!(
        read_at(&p, 5 * MIB, 4096),
        data[5 * MIB as usize..5 * MIB as usize + 4096]
    );
    let cut = 20 * MIB + 5;
    let c = cpath(&p);
    // SAFETY: a valid path; truncate(2) without an open handle (setattr on the path).
    assert_eq!(unsafe { libc::truncate(c.as_ptr(), cut as libc::off_t) }, 0);
    let want = &data[..cut as usize];
    assert!(
        std::fs::read(&p).unwrap() == want,
        "the mount after truncate"
    );
    wait_drained(&m, Duration::from_secs(60));
    sleep(Duration::from_millis(200));
    assert!(
        std::fs::read(m.src_path("big")).unwrap() == want,
        "src after truncate"
    );
    m.stop();
}

#[test]
fn concurrent_readers_of_one_lazy_file_get_exact_bytes() {
    if !can_mount("lazy concurrent readers") {
        return;
    }
    let data = std::sync::Arc::new(content(19, 70 * MIB + 3));
    let src = dir_with(&[("big", &data[..])]);
    let m = Mounted::with_dirs(src, tempdir(), &[]);
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(6));
    let readers: Vec<_> = (0..6)
        .map(|i| {
            let (barrier, data, p) = (barrier.clone(), data.clone(), m.mnt_path("big"));
            std::thread::spawn(move || {
                barrier.wait();
                // Each reader starts elsewhere and wraps around.
                let f = File::open(&p).unwrap();
                let len = data.len() as u64;
                let start = i * 11 * MIB;
                let mut off = start;
                let mut buf = vec![0u8; 256 << 10];
                loop {
                    let n = (buf.len() as u64).min(len - off) as usize;
                    f.read_exact_at(&mut buf[..n], off).unwrap();
                    assert!(
                        buf[..n] == data[off as usize..off as usize + n],
                        "reader {i} at {off}"
                    );
                    off = (off + n as u64) % len;
                    if off == start {
                        break;
                    }
                }
            })
        })
        .collect();
    for r in readers {
        r.join().unwrap();
    }
    // Every block is present now: the next open installs the file at its path.
    drop(read_at(&m.mnt_path("big"), 0, 1));
    assert!(std::fs::read(m.dst_path("big")).unwrap() == data[..]);
    m.stop();
}

/// How many bytes of the partial files `cachefs status` counts as present.
fn present_bytes(dst: &Path) -> u64 {
    json_u64(&status_json(dst), "partial_present_bytes").unwrap_or(0)
}

#[test]
fn lazy_fill_completes_an_opened_file_in_the_background() {
    if !can_mount("lazy fill") {
        return;
    }
    let len = 24 * MIB;
    let data = content(11, len);
    // Without --lazy-fill, a 4 KiB read leaves the rest of the file in src.
    let m = Mounted::with_dirs(
        dir_with(&[("big", &data)]),
        tempdir(),
        &["--lazy-threshold", "4M"],
    );
    assert_eq!(read_at(&m.mnt_path("big"), 0, 4096), data[..4096]);
    sleep(Duration::from_millis(1500));
    let present = present_bytes(m.dst.path());
    assert!(present > 0 && present < len / 2, "present {present}");
    m.stop();

    // With it, the rest arrives in the background, and the next open installs the
    // file at its path: an ordinary cached file.
    let m = Mounted::with_dirs(
        dir_with(&[("big", &data)]),
        tempdir(),
        &["--lazy-threshold", "4M", "--lazy-fill"],
    );
    assert_eq!(read_at(&m.mnt_path("big"), 0, 4096), data[..4096]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while present_bytes(m.dst.path()) < len {
        assert!(
            Instant::now() < deadline,
            "not filled in 30 s: {} of {len} bytes present",
            present_bytes(m.dst.path())
        );
        sleep(Duration::from_millis(100));
    }
    assert!(!m.dst_path("big").exists(), "still a partial until opened");
    assert!(std::fs::read(m.mnt_path("big")).unwrap() == data, "bytes");
    assert!(m.dst_path("big").exists(), "installed at its path");
    assert!(std::fs::read(m.dst_path("big")).unwrap() == data);
    m.stop();
}
