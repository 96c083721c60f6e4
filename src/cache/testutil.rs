//! Helpers of the cache's unit tests: a src of files with known bytes, a mount of the
//! core with a cache, reads through it, and what dst holds.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;

use super::Cache;
use crate::config::Config;
use crate::fs::{CacheFs, FsResult, OpenRequest, ROOT, lazy, names};

pub(super) const MIB: usize = 1 << 20;

pub(super) fn content(i: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|j| (j.wrapping_mul(31) ^ i.wrapping_mul(97) ^ (j >> 11)) as u8)
        .collect()
}

pub(super) struct Setup {
    _dirs: [tempfile::TempDir; 3],
    pub(super) cfg: Config,
}

pub(super) fn setup(files: usize) -> Setup {
    let dirs = [
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    ];
    for i in 0..files {
        std::fs::write(dirs[0].path().join(format!("f{i}")), content(i, MIB)).unwrap();
    }
    let cfg = Config::new(
        dirs[0].path().into(),
        dirs[1].path().into(),
        dirs[2].path().into(),
    );
    Setup { _dirs: dirs, cfg }
}

pub(super) fn mount(cfg: &Config) -> (Arc<CacheFs>, Arc<Cache>) {
    let mut fs = CacheFs::new(cfg, None).unwrap();
    let cache = Cache::open(cfg).unwrap().expect("a cache");
    fs.set_cache(Arc::clone(&cache));
    (Arc::new(fs), cache)
}

pub(super) fn read_file(fs: &CacheFs, name: &str) -> FsResult<Vec<u8>> {
    let ino = fs.lookup(ROOT, OsStr::new(name))?.ino;
    let req = OpenRequest {
        flags: libc::O_RDONLY,
        for_backing: false,
    };
    let opened = fs.open(ino, req);
    let out = opened.and_then(|o| {
        let data = fs.read(o.fh, 0, 4 * MIB as u32);
        fs.release(o.fh)?;
        data
    });
    fs.forget(ino, 1);
    out
}

/// Allocated bytes of dst's visible regular files.
pub(super) fn dst_usage(dst: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for e in std::fs::read_dir(dst).unwrap() {
        let e = e.unwrap();
        if names::is_reserved(&e.file_name()) {
            continue;
        }
        let m = e.metadata().unwrap();
        if m.is_file() {
            total += m.blocks() * 512;
        }
    }
    total
}

/// Allocated bytes of dst's partial data files.
pub(super) fn partial_usage(dst: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(rd) = std::fs::read_dir(dst.join(lazy::lazy_dir())) else {
        return 0;
    };
    rd.flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".data"))
        .map(|e| e.metadata().unwrap().blocks() * 512)
        .sum()
}

pub(super) const KIB: u64 = 1024;

/// Lazy fetch of 1 MiB files in 64 KiB blocks under a 512 KiB budget.
pub(super) fn lazy_setup(files: usize) -> Setup {
    let mut s = setup(files);
    s.cfg.cache_size = Some(512 * KIB);
    s.cfg.lazy_threshold = 256 * KIB;
    s.cfg.block_size = 64 * KIB;
    s
}

pub(super) fn open_ro(fs: &CacheFs, name: &str) -> (u64, u64) {
    let ino = fs.lookup(ROOT, OsStr::new(name)).unwrap().ino;
    let req = OpenRequest {
        flags: libc::O_RDONLY,
        for_backing: false,
    };
    let o = fs.open(ino, req).unwrap();
    assert!(o.lazy, "{name} is opened lazily");
    (ino, o.fh)
}

pub(super) fn close(fs: &CacheFs, (ino, fh): (u64, u64)) {
    fs.release(fh).unwrap();
    fs.forget(ino, 1);
}

/// Reads 4 KiB at block `b` (+ 100 bytes) of file `i` through handle `fh`.
pub(super) fn read_block(fs: &CacheFs, fh: u64, i: usize, b: u64) -> FsResult<()> {
    let off = b * 64 * KIB + 100;
    let got = fs.read(fh, off, 4096)?;
    let want = &content(i, MIB)[off as usize..off as usize + 4096];
    assert!(got == want, "f{i} block {b}: bytes differ from src");
    Ok(())
}
