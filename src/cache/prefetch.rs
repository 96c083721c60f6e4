//! Prefetch of pinned files (`cachefs-pins`): at start, after a pin xattr change and
//! every [`PREFETCH_EVERY`], every src file under a pin glob's root or a pinned
//! directory that dst lacks is fetched whole, through the core's public API (a pinned
//! file must never stay partially present).
//!
//! It stops at the first ENOSPC (the limits leave no room) and at
//! [`Cache::shutdown`]. Lock order: `wake` and `scan_info` are leaves, taken alone; no
//! cache lock is held across a call into the core.

use std::path::{Path, PathBuf};
use std::sync::Weak;
use std::time::Instant;

use super::budget::human;
use super::{Cache, PREFETCH_EVERY, lookup_path, walk_view};
use crate::fs::{CacheFs, ROOT};

impl Cache {
    pub(super) fn prefetch_loop(&self, fs: Weak<CacheFs>) {
        loop {
            {
                let mut w = self.wake.lock().unwrap();
                let deadline = Instant::now() + PREFETCH_EVERY;
                while !w.stop && !w.prefetch {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    w = self.wake_cv.wait_timeout(w, left).unwrap().0;
                }
                if w.stop {
                    return;
                }
                w.prefetch = false;
            }
            let Some(fs) = fs.upgrade() else { return };
            self.prefetch_pinned(&fs);
        }
    }

    fn stopping(&self) -> bool {
        self.wake.lock().unwrap().stop
    }

    /// Fetches every pinned src file dst lacks, walking the view under the glob roots
    /// and the pinned directories.
    pub fn prefetch_pinned(&self, fs: &CacheFs) {
        let mut roots: Vec<(PathBuf, bool)> = Vec::new();
        if !self.pins.is_empty() {
            roots.extend(self.pins.roots().iter().map(|r| (r.clone(), false)));
        }
        let dirs = self.scan_info.lock().unwrap().pinned_dirs.clone();
        roots.extend(dirs.into_iter().map(|d| (d, true)));
        if roots.is_empty() {
            return;
        }
        let mut fetched = 0u64;
        let mut bytes = 0u64;
        // `systemctl status` shows how far it got (after READY=1 too: no timeout then).
        let mut progress = crate::systemd::Progress::new("cache: prefetching pinned files", false);
        for (root, all) in roots {
            let Some(ino) = lookup_path(fs, &root) else {
                continue;
            };
            let mut visit = |ino: u64, path: &Path, size: u64| -> bool {
                if self.stopping() {
                    return false;
                }
                if !(all || self.pins.matches(path))
                    || self.dst.stat(path).is_ok_and(|s| s.is_some())
                {
                    return true;
                }
                // Whole files: a pinned file must not stay partially present.
                match fs.open_whole(ino) {
                    Ok(o) => {
                        let _ = fs.release(o.fh);
                        fetched += 1;
                        bytes += size;
                        progress.update(|| format!("{fetched} files, {} so far", human(bytes)));
                        true
                    }
                    Err(e) if e.errno() == libc::ENOSPC => {
                        log::warn!(
                            "cache: stopped prefetching pinned files at {}: no room within the cache limits",
                            path.display()
                        );
                        false
                    }
                    Err(e) => {
                        log::debug!("cache: cannot prefetch {}: {e}", path.display());
                        true
                    }
                }
            };
            let go_on = walk_view(fs, ino, &root, &mut visit);
            if ino != ROOT {
                fs.forget(ino, 1);
            }
            if !go_on {
                break;
            }
        }
        progress.finish(false, || {
            format!("done: {fetched} files, {}; serving", human(bytes))
        });
        if fetched > 0 {
            log::info!(
                "cache: prefetched {fetched} pinned file(s), {}",
                human(bytes)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::ffi::OsStr;

    use super::super::testutil::*;
    use crate::cache::pin::PIN_XATTR;
    use crate::fs::ROOT;

    #[test]
    fn pinned_files_are_never_evicted() {
        let mut s = setup(6);
        s.cfg.cache_size = Some(3 * MIB as u64);
        s.cfg.pins = vec!["f0".into()];
        std::fs::create_dir(s.cfg.src.join("d")).unwrap();
        std::fs::write(s.cfg.src.join("d/x"), content(9, MIB)).unwrap();
        let (fs, cache) = mount(&s.cfg);
        cache.prefetch_pinned(&fs);
        assert!(s.cfg.dst.join("f0").exists(), "prefetched");
        // Pin d/ by xattr (as setfattr through the mount does).
        let d = fs.lookup(ROOT, OsStr::new("d")).unwrap().ino;
        fs.setxattr(d, OsStr::new(PIN_XATTR), b"1", 0).unwrap();
        cache.rescan(&HashMap::new());
        cache.prefetch_pinned(&fs);
        assert!(s.cfg.dst.join("d/x").exists(), "prefetched by xattr");
        for i in 1..6 {
            read_file(&fs, &format!("f{i}")).unwrap();
        }
        assert!(s.cfg.dst.join("f0").exists() && s.cfg.dst.join("d/x").exists());
        assert!(s.cfg.dst.join("f5").exists());
        // Unpinned: evictable again.
        fs.removexattr(d, OsStr::new(PIN_XATTR)).unwrap();
        cache.rescan(&HashMap::new());
        read_file(&fs, "f1").unwrap();
        assert!(!s.cfg.dst.join("d/x").exists());
        fs.forget(d, 1);
    }
}
