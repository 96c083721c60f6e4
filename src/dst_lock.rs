//! One daemon per dst: an exclusive lock on `dst/.cachefs-state/lock`, held for the
//! daemon's life.
//!
//! - Every mode takes it, with or without `-w`: two daemons on one dst each keep their
//!   own idea of it (inode numbers, origin records, the journal, the cache budget) and
//!   their views diverge.
//! - It is a `flock(2)` lock (std's `File::try_lock`): the kernel drops it when the
//!   holder exits, `kill -9` included, so a crash never leaves a stale lock behind.
//! - The holder writes its pid and mountpoint into the file once it holds the lock, so
//!   a refused daemon can say who holds it. That text is informative only (a holder
//!   that has not written it yet is "another cachefs"); the lock is what counts.

use std::fs::{DirBuilder, File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::fs::names::STATE_DIR;

/// The lock file, in dst's state folder.
pub(crate) fn path(dst: &Path) -> PathBuf {
    dst.join(STATE_DIR).join("lock")
}

/// Held while this process serves dst (dropping it, or exiting, releases the lock).
#[derive(Debug)]
pub(crate) struct DstLock {
    _file: File,
}

/// Who holds the lock, as the holder wrote it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Holder {
    pub(crate) pid: Option<u32>,
    pub(crate) mountpoint: Option<PathBuf>,
}

/// Why the lock was not taken.
#[derive(Debug)]
pub(crate) enum LockError {
    /// Another process (another cachefs) holds it.
    Busy(Holder),
    /// The state folder or the lock file could not be made or opened.
    Io(io::Error),
}

/// Takes the lock of `dst` for a daemon serving `mountpoint`, without waiting.
pub(crate) fn acquire(dst: &Path, mountpoint: &Path) -> Result<DstLock, LockError> {
    match DirBuilder::new().mode(0o700).create(dst.join(STATE_DIR)) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(LockError::Io(e)),
        _ => {}
    }
    // Not truncated at open: a refused daemon must leave the holder's text alone.
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path(dst))
        .map_err(LockError::Io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Err(LockError::Busy(parse(&text)));
        }
        Err(TryLockError::Error(e)) => return Err(LockError::Io(e)),
    }
    let who = format!("{}\n{}\n", std::process::id(), mountpoint.display());
    // Best effort: the text only names the holder to a refused daemon.
    let _ = file
        .set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| file.write_all(who.as_bytes()));
    Ok(DstLock { _file: file })
}

/// What [`acquire`] wrote: the pid, then the mountpoint, one per line.
fn parse(text: &str) -> Holder {
    let mut lines = text.lines();
    Holder {
        pid: lines.next().and_then(|l| l.trim().parse().ok()),
        mountpoint: lines.next().filter(|l| !l.is_empty()).map(PathBuf::from),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_taker_is_refused_with_the_holder_named_until_the_first_goes() {
        let d = tempfile::tempdir().unwrap();
        let first = acquire(d.path(), Path::new("/mnt/a")).unwrap();
        // A second open file description conflicts even in the same process.
        match acquire(d.path(), Path::new("/mnt/b")) {
            Err(LockError::Busy(h)) => assert_eq!(
                h,
                Holder {
                    pid: Some(std::process::id()),
                    mountpoint: Some("/mnt/a".into())
                }
            ),
            other => panic!("expected Busy, got {other:?}"),
        }
        drop(first);
        let _again = acquire(d.path(), Path::new("/mnt/b")).unwrap();
        let text = std::fs::read_to_string(path(d.path())).unwrap();
        assert_eq!(text, format!("{}\n/mnt/b\n", std::process::id()));
    }

    #[test]
    fn unreadable_holder_text_names_nobody() {
        assert_eq!(parse(""), Holder::default());
        assert_eq!(
            parse("x\n\n"),
            Holder {
                pid: None,
                mountpoint: None
            }
        );
    }
}
