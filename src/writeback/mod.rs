//! Durable writeback of dst's mutations to src (`-w`).
//!
//! Contract with the layered view (`fs`):
//! - `fs` performs every mutation on dst first, then calls [`Writeback::record`] with a
//!   mount-relative path description of what changed, before the FUSE call returns.
//!   `record` returns only once the op is durable in the journal (dst/.cachefs-state/).
//! - Replay reads dst's *current* state at replay time (content, mode, owner, times,
//!   xattrs, symlink target), so ops describe *which path* changed, not the bytes.
//! - `fs` calls [`Writeback::wait_synced`] from fsync/release in mirror mode
//!   (`-concurrent 0`): it returns once src holds dst's bytes for that path.
//!
//! (Implementation status: see the module's submodules; this file is the interface.)

use std::path::PathBuf;

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
}
