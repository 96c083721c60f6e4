//! A little dst space kept back for deletes: `dst/.cachefs-state/reserve`.
//!
//! A delete through the mount writes to dst before it frees anything: an intent line,
//! an origin-log line and, with `-w`, its journal record, plus a whiteout where src has
//! the name. On a full dst all of these fail with ENOSPC, so a user could not free
//! space through the mount (xfstests generic/213 fills dst with fallocate and then
//! removes the file). The reserve is a preallocated file of [`RESERVE`] bytes: before
//! a delete or rename, when dst has less than that free, it is removed, and it is made
//! again once dst has plenty of room (at most once a minute).
//!
//! Invariants: the file is only ever created with `fallocate` (its blocks are really
//! allocated) and only removed here; it is never part of the view (the state folder).
//! Lock order: `state` is a leaf; no dst call is made while holding it.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::layer::Layer;
use super::names::STATE_DIR;

/// Bytes kept back: a few thousand journal and log lines, whiteouts included.
pub(crate) const RESERVE: u64 = 1 << 20;
/// The reserve is made again only with this much free besides it.
const REMAKE_FREE: u64 = 4 * RESERVE;
const REMAKE_EVERY: Duration = Duration::from_secs(60);

pub(crate) struct Reserve {
    rel: PathBuf,
    /// Whether the file exists, and when it was last (re)made or tried.
    state: Mutex<(bool, Option<Instant>)>,
}

fn free_bytes(dst: &Layer) -> Option<u64> {
    let s = dst.statvfs().ok()?;
    Some(s.f_bavail * s.f_frsize)
}

impl Reserve {
    /// Makes the reserve in `dst` if there is room for it (and keeps one that exists).
    pub(crate) fn open(dst: &Layer) -> Reserve {
        let r = Reserve {
            rel: Path::new(STATE_DIR).join("reserve"),
            state: Mutex::new((false, None)),
        };
        let exists = dst.stat(&r.rel).ok().flatten().is_some();
        *r.state.lock().unwrap() = (exists, None);
        if !exists {
            r.make(dst);
        }
        r
    }

    fn make(&self, dst: &Layer) {
        self.state.lock().unwrap().1 = Some(Instant::now());
        if free_bytes(dst).is_none_or(|f| f < REMAKE_FREE) {
            return;
        }
        let made = dst
            .create_file(&self.rel, libc::O_WRONLY | libc::O_CLOEXEC, 0o600)
            .and_then(|f| {
                // SAFETY: valid fd; allocates RESERVE bytes from offset 0.
                let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, RESERVE as libc::off_t) };
                if r == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        match made {
            Ok(()) => self.state.lock().unwrap().0 = true,
            Err(e) => {
                log::debug!("no space reserve in dst: {e}");
                let _ = dst.unlink(&self.rel);
            }
        }
    }

    /// Before a delete or rename: gives the reserve back if dst is nearly full, so
    /// the change can be recorded; makes it again if dst has room and it is gone.
    pub(crate) fn before_namespace_change(&self, dst: &Layer) {
        let (exists, tried) = *self.state.lock().unwrap();
        if exists {
            if free_bytes(dst).is_some_and(|f| f < RESERVE) {
                match dst.unlink(&self.rel) {
                    Ok(()) => log::warn!(
                        "dst is full: gave back cachefs's {} KiB reserve so that deletes \
                         can be recorded; free space in dst",
                        RESERVE >> 10
                    ),
                    Err(e) => log::warn!("dst is full and its reserve cannot go: {e}"),
                }
                *self.state.lock().unwrap() = (false, Some(Instant::now()));
            }
        } else if tried.is_none_or(|t| t.elapsed() >= REMAKE_EVERY) {
            self.make(dst);
        }
    }
}
