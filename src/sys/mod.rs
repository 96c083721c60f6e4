//! The syscall layer: every `unsafe` libc call cachefs makes on a path or on a
//! directory fd (the `open*`/`openat2`/`*at` calls, statx, the xattr calls), and
//! the one writer of state files ([`state_file`]); also the wall clock as numbers
//! ([`clock`]) and the one checksum of cachefs's files ([`fnv1a64`]).
//!
//! Invariants:
//! - A leaf: uses no other module of cachefs. Policy (which root, which names are
//!   cachefs's own, what an error means to the view) lives with the callers
//!   (`fs::layer` is the gateway to src and dst); this module only makes calls safe.
//! - Every call that takes a name relative to a directory fd never follows a final
//!   symlink (`O_NOFOLLOW`, `AT_SYMLINK_NOFOLLOW`, or a `/proc/self/fd/N/name` path
//!   with the `l*xattr` calls); [`openat2_beneath`] follows no symlink anywhere and
//!   never leaves its directory. Every fd it opens is `O_CLOEXEC`.
//! - The only whole-path calls are [`open_dir_path`] (a configured root, which may
//!   itself contain symlinks: the admin's choice), [`identity_path`] (metadata only)
//!   and [`state_file::replace`] (the parent directory of a state file).
//! - Every `unsafe` block carries its `// SAFETY:` reason here and nowhere else.

mod at;
pub mod clock;
pub mod state_file;
mod xattr;

pub use at::*;
pub use xattr::*;

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

/// `struct stat` of an entry, never following a final symlink.
pub type Stat = libc::stat;

/// A libc return value: negative is `errno`.
pub(crate) fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Like [`cvt`], for calls that return a length.
pub(crate) fn cvt_ssize(r: libc::ssize_t) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// An fd returned by a successful open, now owned.
fn own(r: libc::c_int) -> io::Result<OwnedFd> {
    let fd = cvt(r)?;
    // SAFETY: `fd` was just returned by a successful call and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A C string from a name; names with NUL bytes cannot exist on Linux (EINVAL).
pub fn cstr(name: &OsStr) -> io::Result<CString> {
    cstr_bytes(name.as_bytes())
}

/// [`cstr`] of raw bytes.
pub fn cstr_bytes(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Whether an error means "there is nothing there" in a lookup.
pub fn is_not_found(e: &io::Error) -> bool {
    // ELOOP: a symlink where a directory of the path should be (never followed).
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT) | Some(libc::ENOTDIR) | Some(libc::ELOOP)
    )
}

/// FNV-1a, 64 bits: stable across builds and machines (keys and checksums on disk).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &c| {
        (h ^ u64::from(c)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `/proc/self/fd/N`: reaches the object behind an `O_PATH` fd for calls with no `f*` form.
pub fn proc_fd_path(fd: RawFd) -> CString {
    CString::new(format!("/proc/self/fd/{fd}")).expect("no NUL in a number")
}

/// `/proc/self/fd/<dir>/<name>`: the entry `name` of the directory behind `dir`. For
/// the directory itself (`name` "."), the trailing `/.` matters: `l*xattr` on the
/// bare `/proc/self/fd/<dir>` would act on the magic link, not on the directory it
/// stands for.
fn proc_entry_path(dir: RawFd, name: &OsStr) -> io::Result<CString> {
    let mut v = format!("/proc/self/fd/{dir}/").into_bytes();
    v.extend_from_slice(name.as_bytes());
    cstr_bytes(&v)
}

#[cfg(test)]
mod tests {
    #[test]
    fn fnv1a64_matches_the_reference_vectors() {
        assert_eq!(super::fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(super::fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(super::fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }
}
