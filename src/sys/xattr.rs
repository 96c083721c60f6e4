//! Extended attributes: by fd (through `/proc/self/fd/N`, or getxattrat(2) where the
//! kernel has it) and by (directory fd, name) with the `l*xattr` calls, which act on
//! exactly that entry and never follow it.

use super::{cstr, cstr_bytes, cvt, cvt_ssize, proc_entry_path, proc_fd_path};
use std::ffi::{CStr, OsStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// The POSIX ACL of a file (what its mode's group bits mask).
pub(crate) const ACL_ACCESS: &str = "system.posix_acl_access";
/// A directory's default ACL, inherited by what is created in it.
pub(crate) const ACL_DEFAULT: &str = "system.posix_acl_default";
/// Both POSIX ACL xattrs.
pub(crate) const ACLS: [&str; 2] = [ACL_ACCESS, ACL_DEFAULT];

/// Whether `attr` names a POSIX ACL.
pub(crate) fn is_acl(attr: &[u8]) -> bool {
    ACLS.iter().any(|a| a.as_bytes() == attr)
}

/// getxattrat(2)'s syscall number (the same on every architecture but alpha).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const SYS_GETXATTRAT: libc::c_long = 464;

/// `struct xattr_args` of getxattrat(2).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[repr(C)]
struct XattrArgs {
    value: u64,
    size: u32,
    flags: u32,
}

/// getxattrat(2) (Linux 6.13+) of `name` at (`dir`, `path`) with `at_flags`: no
/// `/proc` path walk. ENOSYS where the kernel (or this build's architecture) lacks it.
pub(crate) fn getxattrat(
    dir: BorrowedFd<'_>,
    path: &CStr,
    at_flags: libc::c_int,
    name: &OsStr,
) -> io::Result<Vec<u8>> {
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    {
        let n = cstr(name)?;
        let call = |buf: &mut [u8]| {
            let args = XattrArgs {
                value: buf.as_mut_ptr() as u64,
                size: buf.len() as u32,
                flags: 0,
            };
            // SAFETY: valid dirfd, NUL-terminated strings, and an args struct whose
            // value buffer is `size` writable bytes.
            cvt_ssize(unsafe {
                libc::syscall(
                    SYS_GETXATTRAT,
                    dir.as_raw_fd(),
                    path.as_ptr(),
                    at_flags,
                    n.as_ptr(),
                    &args as *const XattrArgs,
                    std::mem::size_of::<XattrArgs>(),
                )
            } as libc::ssize_t)
        };
        // Most values are small: one call with a 256-byte buffer, the size query only
        // when it does not fit.
        let mut buf = vec![0u8; 256];
        loop {
            match call(&mut buf) {
                Ok(len) => {
                    buf.truncate(len);
                    return Ok(buf);
                }
                Err(e) if e.raw_os_error() == Some(libc::ERANGE) => {
                    let size = call(&mut [])?;
                    buf = vec![0u8; size.max(buf.len() * 2)];
                }
                Err(e) => return Err(e),
            }
        }
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let _ = (dir, path, at_flags, name);
        Err(io::Error::from_raw_os_error(libc::ENOSYS))
    }
}

/// getxattr on the object behind an (O_PATH) fd.
pub(crate) fn getxattr_fd(fd: BorrowedFd<'_>, name: &OsStr) -> io::Result<Vec<u8>> {
    let p = proc_fd_path(fd.as_raw_fd());
    let n = cstr(name)?;
    loop {
        // SAFETY: size query with a null buffer.
        let size =
            cvt_ssize(unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) })?;
        let mut buf = vec![0u8; size];
        // SAFETY: buffer of `size` bytes.
        match cvt_ssize(unsafe {
            libc::getxattr(
                p.as_ptr(),
                n.as_ptr(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
            )
        }) {
            Ok(len) => {
                buf.truncate(len);
                return Ok(buf);
            }
            // The value grew between the two calls: ask again.
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// listxattr on the object behind an (O_PATH) fd: NUL-separated names.
pub(crate) fn listxattr_fd(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let p = proc_fd_path(fd.as_raw_fd());
    loop {
        // SAFETY: size query with a null buffer.
        let size = cvt_ssize(unsafe { libc::listxattr(p.as_ptr(), std::ptr::null_mut(), 0) })?;
        let mut buf = vec![0u8; size];
        // SAFETY: buffer of `size` bytes.
        match cvt_ssize(unsafe {
            libc::listxattr(p.as_ptr(), buf.as_mut_ptr() as *mut libc::c_char, buf.len())
        }) {
            Ok(len) => {
                buf.truncate(len);
                return Ok(buf);
            }
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// setxattr on the object behind an (O_PATH) fd.
pub(crate) fn setxattr_fd(
    fd: BorrowedFd<'_>,
    name: &OsStr,
    value: &[u8],
    flags: i32,
) -> io::Result<()> {
    let p = proc_fd_path(fd.as_raw_fd());
    let n = cstr(name)?;
    // SAFETY: valid path, name and value buffer.
    cvt(unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr() as *const libc::c_void,
            value.len(),
            flags,
        )
    })
    .map(drop)
}

/// removexattr on the object behind an (O_PATH) fd.
pub(crate) fn removexattr_fd(fd: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let p = proc_fd_path(fd.as_raw_fd());
    let n = cstr(name)?;
    // SAFETY: valid path and name.
    cvt(unsafe { libc::removexattr(p.as_ptr(), n.as_ptr()) }).map(drop)
}

/// fsetxattr on an open (not `O_PATH`) file, flags 0.
pub(crate) fn fsetxattr(fd: BorrowedFd<'_>, name: &OsStr, value: &[u8]) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: valid fd, name and value.
    cvt(unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            c.as_ptr(),
            value.as_ptr() as *const libc::c_void,
            value.len(),
            0,
        )
    })
    .map(drop)
}

/// A value or list read with a growing buffer: 4 KiB first, up to 1 MiB on ERANGE.
fn read_growing(mut call: impl FnMut(&mut [u8]) -> libc::ssize_t) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 4096];
    loop {
        let n = call(&mut buf);
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(buf);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ERANGE) && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        return Err(e);
    }
}

/// llistxattr of `name` under `dir` ("." for `dir` itself): NUL-separated names.
pub(crate) fn llistxattr_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Vec<u8>> {
    let p = proc_entry_path(dir.as_raw_fd(), name)?;
    read_growing(|buf| {
        // SAFETY: buffer valid for its length.
        unsafe { libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) }
    })
}

/// lgetxattr of `attr` on `name` under `dir` ("." for `dir` itself).
pub(crate) fn lgetxattr_at(dir: BorrowedFd<'_>, name: &OsStr, attr: &[u8]) -> io::Result<Vec<u8>> {
    let p = proc_entry_path(dir.as_raw_fd(), name)?;
    let a = cstr_bytes(attr)?;
    read_growing(|buf| {
        // SAFETY: buffer valid for its length.
        unsafe { libc::lgetxattr(p.as_ptr(), a.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) }
    })
}

/// lsetxattr (flags 0) of `attr` on `name` under `dir` ("." for `dir` itself).
pub(crate) fn lsetxattr_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    attr: &[u8],
    value: &[u8],
) -> io::Result<()> {
    let p = proc_entry_path(dir.as_raw_fd(), name)?;
    let a = cstr_bytes(attr)?;
    // SAFETY: pointers valid for the given lengths.
    cvt(unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            a.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })
    .map(drop)
}

/// lremovexattr of `attr` on `name` under `dir` ("." for `dir` itself).
pub(crate) fn lremovexattr_at(dir: BorrowedFd<'_>, name: &OsStr, attr: &[u8]) -> io::Result<()> {
    let p = proc_entry_path(dir.as_raw_fd(), name)?;
    let a = cstr_bytes(attr)?;
    // SAFETY: valid, NUL-terminated path and name.
    cvt(unsafe { libc::lremovexattr(p.as_ptr(), a.as_ptr()) }).map(drop)
}
