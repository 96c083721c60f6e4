//! The filesystem core's error type, and the one place errors become errno values.

use std::fmt;
use std::io;

/// An error from the layered view.
#[derive(Debug)]
pub enum FsError {
    /// A syscall on dst or src failed.
    Io(io::Error),
    /// An errno decided by cachefs, not returned by a syscall: a rule of the layered
    /// view (ENOENT for a hidden name, EPERM for a reserved one, ENOTEMPTY for a merged
    /// directory with children, ...) or the cache budget (ENOSPC).
    Errno(i32),
    /// The writeback journal could not record the change (the change itself is on dst).
    Journal(io::Error),
    /// An unknown inode or handle number from the kernel.
    Stale,
}

pub type FsResult<T> = Result<T, FsError>;

/// The errno of a failed syscall (EIO for an error that carries none). Writeback's
/// errors map through it too.
pub(crate) fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

impl FsError {
    /// The errno for the kernel. The only mapping from errors to errno in cachefs.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::Io(e) | FsError::Journal(e) => errno_of(e),
            FsError::Errno(errno) => *errno,
            FsError::Stale => libc::ESTALE,
        }
    }

    pub(crate) fn not_found() -> FsError {
        FsError::Errno(libc::ENOENT)
    }
}

impl From<io::Error> for FsError {
    fn from(e: io::Error) -> Self {
        FsError::Io(e)
    }
}

impl fmt::Display for FsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FsError::Io(e) => write!(f, "{e}"),
            FsError::Errno(errno) => write!(f, "{}", io::Error::from_raw_os_error(*errno)),
            FsError::Journal(e) => write!(f, "writeback journal: {e}"),
            FsError::Stale => write!(f, "stale inode or handle"),
        }
    }
}

impl std::error::Error for FsError {}
