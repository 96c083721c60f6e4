//! One daemon per dst: an exclusive lock on `dst/.cachefs-state/lock`, held for the
//! daemon's life.
//!
//! - Every mode takes it, with or without `-w`: two daemons on one dst each keep their
//!   own idea of it (inode numbers, origin records, the journal, the cache budget) and
//!   their views diverge.
//! - It is a `flock(2)` lock (std's `File::try_lock`): the kernel drops it when the
//!   holder exits, `kill -9` included, so a crash never leaves a stale lock behind.
//! - The holder writes its pid, mountpoint, src and writeback mode into the file once it
//!   holds the lock, so that a refused daemon can say who holds it, and a second mount
//!   of the same src in the same mode can become a view of the holder's mount (see
//!   `daemon`). That text is informative only (a holder that has not written it yet is
//!   "another cachefs", which shares nothing); the lock is what counts.

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
    /// The src it serves (absent in the text of versions before it was recorded).
    pub(crate) src: Option<PathBuf>,
    /// Its writeback mode, as [`Claim::mode`] says.
    pub(crate) mode: Option<String>,
}

/// What a daemon taking the lock serves, written into the lock file for the next taker.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Claim<'a> {
    pub(crate) mountpoint: &'a Path,
    pub(crate) src: &'a Path,
    /// One word: "plain", "writeback" or "mirror" (no newline).
    pub(crate) mode: &'a str,
}

/// Why the lock was not taken.
#[derive(Debug)]
pub(crate) enum LockError {
    /// Another process (another cachefs) holds it.
    Busy(Holder),
    /// The state folder or the lock file could not be made or opened.
    Io(io::Error),
}

/// Takes the lock of `dst` for a daemon serving what `claim` says, without waiting.
pub(crate) fn acquire(dst: &Path, claim: Claim<'_>) -> Result<DstLock, LockError> {
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
    let who = format!(
        "{}\n{}\n{}\n{}\n",
        std::process::id(),
        claim.mountpoint.display(),
        claim.src.display(),
        claim.mode
    );
    // Best effort: the text only names the holder to a refused daemon.
    let _ = file
        .set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| file.write_all(who.as_bytes()));
    Ok(DstLock { _file: file })
}

/// What [`acquire`] wrote: the pid, mountpoint, src and mode, one per line.
fn parse(text: &str) -> Holder {
    let mut lines = text.lines();
    let mut path = || lines.next().filter(|l| !l.is_empty()).map(PathBuf::from);
    let (pid, mountpoint, src, mode) = (path(), path(), path(), path());
    Holder {
        pid: pid.and_then(|p| p.to_str()?.trim().parse().ok()),
        mountpoint,
        src,
        mode: mode.and_then(|m| m.to_str().map(String::from)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_taker_is_refused_with_the_holder_named_until_the_first_goes() {
        let d = tempfile::tempdir().unwrap();
        let claim = |mnt| Claim {
            mountpoint: Path::new(mnt),
            src: Path::new("/srv/src"),
            mode: "writeback",
        };
        let first = acquire(d.path(), claim("/mnt/a")).unwrap();
        // A second open file description conflicts even in the same process.
        match acquire(d.path(), claim("/mnt/b")) {
            Err(LockError::Busy(h)) => assert_eq!(
                h,
                Holder {
                    pid: Some(std::process::id()),
                    mountpoint: Some("/mnt/a".into()),
                    src: Some("/srv/src".into()),
                    mode: Some("writeback".into()),
                }
            ),
            other => panic!("expected Busy, got {other:?}"),
        }
        drop(first);
        let _again = acquire(d.path(), claim("/mnt/b")).unwrap();
        let text = std::fs::read_to_string(path(d.path())).unwrap();
        assert_eq!(
            text,
            format!("{}\n/mnt/b\n/srv/src\nwriteback\n", std::process::id())
        );
    }

    #[test]
    fn unreadable_holder_text_names_nobody() {
        assert_eq!(parse(""), Holder::default());
        assert_eq!(parse("x\n\n"), Holder::default());
        // The text of a version that recorded no src or mode.
        assert_eq!(
            parse("12\n/mnt/a\n"),
            Holder {
                pid: Some(12),
                mountpoint: Some("/mnt/a".into()),
                ..Holder::default()
            }
        );
    }
}
