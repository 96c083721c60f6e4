//! What the core reports when it changes dst, and where it reports it: the [`Op`]
//! description (a mount-relative path per change, never bytes), the [`ChangeLog`] it is
//! recorded in (implemented by the writeback journal), and the two guards a change log
//! may hand back ([`ChangeGuard`] across a namespace change and its record,
//! [`IntentGuard`] from before a change until its op is recorded).
//!
//! Pure descriptions: nothing here knows how a change log stores or replays ops, so the
//! core depends on no implementation of it. The core's side is here too (the
//! `impl CacheFs` at the end): recording an op (for every name of a hard-linked file),
//! intents and `--max-dirty` throttling, each a no-op without a change log; no core lock
//! is held across a change-log wait.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::RwLockReadGuard;

use super::{CacheFs, FsError, FsResult};

/// One mutation, by mount-relative path (no leading `/`; "" is the root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// File content changed (write, truncate, fallocate, copy_file_range target).
    Write {
        path: PathBuf,
    },
    /// A regular file was created.
    Create {
        path: PathBuf,
    },
    /// A fifo, socket or device node was created.
    Mknod {
        path: PathBuf,
    },
    Mkdir {
        path: PathBuf,
    },
    Symlink {
        path: PathBuf,
    },
    /// Hard link `new` to the existing `existing`.
    Link {
        existing: PathBuf,
        new: PathBuf,
    },
    Unlink {
        path: PathBuf,
    },
    Rmdir {
        path: PathBuf,
    },
    /// `exchange`: RENAME_EXCHANGE swapped the two.
    Rename {
        from: PathBuf,
        to: PathBuf,
        exchange: bool,
    },
    /// chmod, chown or utimens.
    SetAttr {
        path: PathBuf,
    },
    /// setxattr/removexattr.
    Xattr {
        path: PathBuf,
    },
    /// Make src's `path` match dst's view of it, recursively: content, metadata,
    /// children; dst's whiteouts and opaque marker below it remove the src entries they
    /// hide. Used for rename follow-ups; `fs` may use it for anything coarse.
    Sync {
        path: PathBuf,
    },
}

/// The paths an op touches (one or two), in journal order.
pub fn op_paths(op: &Op) -> Vec<&Path> {
    match op {
        Op::Write { path }
        | Op::Create { path }
        | Op::Mknod { path }
        | Op::Mkdir { path }
        | Op::Symlink { path }
        | Op::Unlink { path }
        | Op::Rmdir { path }
        | Op::SetAttr { path }
        | Op::Xattr { path }
        | Op::Sync { path } => vec![path],
        Op::Link { existing, new } => vec![existing, new],
        Op::Rename { from, to, .. } => vec![from, to],
    }
}

/// Where the core reports mutations (implemented by the writeback journal).
pub trait ChangeLog: Send + Sync {
    /// Durably records `op` before returning.
    fn record(&self, op: Op) -> io::Result<()>;
    /// Returns once src holds dst's current state for `path` (mirror mode); a no-op
    /// when replay is asynchronous.
    fn wait_synced(&self, path: &Path) -> io::Result<()>;
    /// Whether ops for `path` (or below it) are still waiting to reach src.
    fn has_pending(&self, path: &Path) -> bool;
    /// Held across a rename on dst and its `record`, so that replay never retires an
    /// op on the strength of a rename it cannot yet see in the journal.
    fn begin_change(&self) -> ChangeGuard<'_> {
        ChangeGuard::none()
    }
    /// Called before `paths` change on dst; the guard is kept until the change's op is
    /// recorded, so a crash in between leaves the paths to resync at the next start.
    fn intend(&self, _paths: &[&Path]) -> io::Result<IntentGuard<'_>> {
        Ok(IntentGuard::none())
    }
    /// `--max-dirty` backpressure: returns when a writer may go on (called with no
    /// core lock held); an error answers the writer.
    fn throttle(&self) -> io::Result<()> {
        Ok(())
    }
    /// Whether [`ChangeLog::throttle`] would wait now (a cheap check).
    fn over_dirty_limit(&self) -> bool {
        false
    }
}

/// Held (shared) across a dst rename and its [`ChangeLog::record`] (see
/// [`ChangeLog::begin_change`]). Inert without a change log.
pub struct ChangeGuard<'a>(#[allow(dead_code)] Option<RwLockReadGuard<'a, ()>>);

impl<'a> ChangeGuard<'a> {
    /// A guard that holds nothing (no writeback).
    pub fn none() -> ChangeGuard<'static> {
        ChangeGuard(None)
    }

    /// A guard holding `lock` shared until it is dropped.
    pub fn shared(lock: RwLockReadGuard<'a, ()>) -> ChangeGuard<'a> {
        ChangeGuard(Some(lock))
    }
}

/// What ends an intent when its [`IntentGuard`] is dropped (implemented by the change
/// log's intent store).
pub trait EndIntent: Sync {
    /// The change the intent guarded is recorded (or abandoned).
    fn end_intent(&self);
}

/// An intent in progress (see [`ChangeLog::intend`]); a no-op one without writeback.
#[must_use = "the intent ends when the guard is dropped"]
pub struct IntentGuard<'a> {
    intents: Option<&'a dyn EndIntent>,
}

impl<'a> IntentGuard<'a> {
    /// A guard that notes nothing (no writeback).
    pub fn none() -> IntentGuard<'static> {
        IntentGuard { intents: None }
    }

    /// A guard that calls `intents`' [`EndIntent::end_intent`] when dropped.
    pub fn new(intents: &'a dyn EndIntent) -> IntentGuard<'a> {
        IntentGuard {
            intents: Some(intents),
        }
    }
}

impl Drop for IntentGuard<'_> {
    fn drop(&mut self) {
        if let Some(i) = self.intents {
            i.end_intent();
        }
    }
}

impl CacheFs {
    /// Whether a writer let in now would wait for the writeback (`--max-dirty`): the
    /// FUSE adapter then serves that request on a thread of its own, so waiting
    /// writers never hold every FUSE thread and readers keep being served.
    pub fn writer_must_wait(&self) -> bool {
        self.changes.as_ref().is_some_and(|c| c.over_dirty_limit())
    }

    /// Wait while too much data waits for src (`--max-dirty`); see [`ChangeLog::throttle`].
    pub(super) fn throttle_writer(&self) -> FsResult<()> {
        if let Some(c) = &self.changes {
            c.throttle().map_err(FsError::Journal)?;
        }
        Ok(())
    }

    /// Notes that `paths` are about to change on dst (see [`ChangeLog::intend`]); hold
    /// the guard until the change's op is recorded.
    pub(super) fn intend(&self, paths: &[&Path]) -> FsResult<IntentGuard<'_>> {
        match &self.changes {
            Some(c) => c.intend(paths).map_err(FsError::Journal),
            None => Ok(IntentGuard::none()),
        }
    }

    pub(super) fn record(&self, op: Op) -> FsResult<()> {
        if let Some(c) = &self.changes {
            // src gets these paths at replay: no longer "absent" there.
            for p in op_paths(&op) {
                self.src_absent.forget(p);
                self.src_ahead.forget(p);
            }
            c.record(op).map_err(FsError::Journal)?;
        }
        Ok(())
    }

    pub(super) fn record_content(&self, ino: u64) -> FsResult<Option<PathBuf>> {
        let path = self.inodes.lock().unwrap().path(ino);
        if let Some(p) = &path {
            self.record_each_name(ino, p, |path| Op::Write { path })?;
        }
        Ok(path)
    }

    /// Record `op` for `path` and for every other name the mount knows the inode by
    /// (hard links): replay syncs names, and a src without hard links (rclone) keeps
    /// each name as its own copy, which must get the new bytes and attributes too.
    pub(super) fn record_each_name(
        &self,
        ino: u64,
        path: &Path,
        op: impl Fn(PathBuf) -> Op,
    ) -> FsResult<()> {
        self.record(op(path.to_path_buf()))?;
        let mut others = self.inodes.lock().unwrap().paths(ino);
        others.retain(|p| p != path);
        for p in others {
            self.record(op(p))?;
        }
        Ok(())
    }
}
