//! What a normal user needs to mount, checked before anything starts, and unmounting
//! through the setuid `fusermount3`, the way libfuse does.
//!
//! A normal user mounts FUSE through `fusermount3` (setuid root): fuser opens
//! `/dev/fuse`, tries mount(2), and on EPERM hands the mount to fusermount3. Both need
//! the user to be able to open `/dev/fuse`: fusermount3 (libfuse 3) deliberately opens
//! it with the caller's file-system uid, so the device's mode is the admin's switch for
//! "may normal users mount FUSE". Where it is 0600 (root only: a container, a system
//! without the udev rule), no normal user can mount FUSE, with libfuse or cachefs.
//! [`check_device`] says that, and what to change, instead of a bare "permission
//! denied".
//!
//! - [`check_can_mount`] runs both checks below.
//! - [`check_device`]: not root and `/dev/fuse` cannot be opened: an error naming the
//!   device's mode and owner and the fix (`chmod 0666 /dev/fuse`, the udev rule).
//! - [`check_allow_other`]: `allow_other` and `allow_root` are refused by fusermount3
//!   for a normal user unless `/etc/fuse.conf` has a `user_allow_other` line.
//! - [`unmount`]: `fusermount3 -u [-z] -- MOUNTPOINT`, for the daemon when umount(2) is
//!   not permitted (not root): first a normal unmount, so a busy mount is reported and
//!   detached lazily as root's is, not detached silently. The binary: `$FUSERMOUNT_PATH`
//!   (as fuser honours it), else `fusermount3` then `fusermount` on `PATH` or in
//!   `/usr/bin`, `/bin`, `/usr/sbin`, `/sbin`.
//!
//! Invariant: the checks only read (`/dev/fuse` is opened and closed, `/etc/fuse.conf`
//! read); root passes both.

use std::ffi::OsString;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};

use fuser::SessionACL;

/// The file fusermount3 reads for `user_allow_other`.
pub(crate) const FUSE_CONF: &str = "/etc/fuse.conf";
/// The FUSE device.
pub(crate) const DEV_FUSE: &str = "/dev/fuse";

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// For a normal user: whether `/dev/fuse` can be opened; if not (EACCES/EPERM), an
/// error that says why a FUSE mount is impossible for this user and what to change.
/// Other failures (no device) are left to the mount, which reports them.
pub(crate) fn check_device() -> io::Result<()> {
    if is_root() {
        return Ok(());
    }
    let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(DEV_FUSE)
    else {
        return Ok(());
    };
    if !matches!(e.raw_os_error(), Some(libc::EACCES | libc::EPERM)) {
        return Ok(());
    }
    let what = match std::fs::metadata(DEV_FUSE) {
        Ok(m) => format!(
            "{DEV_FUSE} is mode {:04o}, owner uid {} gid {}",
            m.mode() & 0o7777,
            m.uid(),
            m.gid()
        ),
        Err(_) => format!("{DEV_FUSE} cannot be opened"),
    };
    Err(io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "{what}, and this user may not open it ({e}); fusermount3 opens it as the \
             calling user too (as libfuse does), so no normal user can mount FUSE here. \
             Let users mount FUSE with 'chmod 0666 {DEV_FUSE}' (as root; make it last \
             with the udev rule KERNEL==\"fuse\", MODE=\"0666\" that Debian ships), or \
             run cachefs as root"
        ),
    ))
}

/// Both checks for a normal user's mount with `acl` ([`check_device`] first).
pub(crate) fn check_can_mount(acl: SessionACL) -> io::Result<()> {
    check_device()?;
    check_allow_other(acl)
}

/// The fusermount binary: `fusermount3` on `PATH` or in the usual places, else the
/// FUSE 2 `fusermount` (same protocol).
fn binary() -> OsString {
    if let Some(p) = std::env::var_os("FUSERMOUNT_PATH") {
        return p;
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    let dirs: Vec<_> = std::env::split_paths(&path)
        .chain(["/usr/bin", "/bin", "/usr/sbin", "/sbin"].map(Into::into))
        .collect();
    for name in ["fusermount3", "fusermount"] {
        for d in &dirs {
            let p = d.join(name);
            if p.is_file() {
                return p.into_os_string();
            }
        }
    }
    "fusermount3".into()
}

/// Whether `/etc/fuse.conf`'s text allows `allow_other` for normal users: a line that
/// is exactly `user_allow_other` (surrounding blanks aside), as fusermount3 reads it.
pub(crate) fn conf_allows_other(conf: &str) -> bool {
    conf.lines().any(|l| l.trim() == "user_allow_other")
}

/// For a normal user, `allow_other`/`allow_root` need `user_allow_other` in
/// `/etc/fuse.conf` (fusermount3 refuses the mount otherwise): an error that says so,
/// before anything is started. Root may always.
pub(crate) fn check_allow_other(acl: SessionACL) -> io::Result<()> {
    if acl == SessionACL::Owner || is_root() {
        return Ok(());
    }
    let conf = std::fs::read_to_string(FUSE_CONF).unwrap_or_default();
    if conf_allows_other(&conf) {
        return Ok(());
    }
    let opt = if acl == SessionACL::All {
        "allow_other"
    } else {
        "allow_root"
    };
    Err(io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "-o {opt} as a normal user needs a line 'user_allow_other' in {FUSE_CONF}, \
             which has none; add it (as root), or drop -o {opt} (then only this user \
             can use the mount), or run cachefs as root"
        ),
    ))
}

/// `fusermount3 -u [-z] -- mountpoint`: unmounts a FUSE mount of this user (lazily with
/// `lazy`). The error carries fusermount3's message ("... Device or resource busy").
pub(crate) fn unmount(mountpoint: &Path, lazy: bool) -> io::Result<()> {
    let bin = binary();
    let mut cmd = Command::new(&bin);
    cmd.arg("-u");
    if lazy {
        cmd.arg("-z");
    }
    let out = cmd
        .arg("--")
        .arg(mountpoint)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let errno = if stderr.contains("busy") {
        libc::EBUSY
    } else if stderr.contains("not found in /etc/mtab") || stderr.contains("not mounted") {
        libc::EINVAL
    } else {
        libc::EIO
    };
    Err(io::Error::new(
        io::Error::from_raw_os_error(errno).kind(),
        format!("{} -u: {stderr} (errno {errno})", bin.to_string_lossy()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuse_conf_needs_the_exact_line() {
        assert!(conf_allows_other("user_allow_other\n"));
        assert!(conf_allows_other(
            "# comment\n  user_allow_other  \nmount_max = 9\n"
        ));
        assert!(!conf_allows_other("#user_allow_other\n"));
        assert!(!conf_allows_other("# user_allow_other lets users...\n"));
        assert!(!conf_allows_other(""));
    }
}
