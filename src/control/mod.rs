//! The control channel of a running daemon (issue 16): a Unix socket in dst's state
//! folder, `DST/.cachefs-state/control.sock`, and the commands that use it
//! (`cachefs ctl`, `cachefs warmup`, `cachefs status --watch`).
//!
//! # Protocol
//!
//! One JSON object per line each way: a request `{"cmd":"...", ...}`, then its answer
//! `{"ok":true, ...}` or `{"ok":false,"error":"..."}`. A connection may carry several
//! requests; the server closes it after [`IDLE`] without one. Paths are mount-relative
//! (`videos/a.mp4`, `""` for the root). The commands are listed in [`server`].
//!
//! # Who may use it
//!
//! Only root and the uid the daemon runs as (the mount's owner). Two locks, either one
//! enough: the socket is mode 0600 inside the state folder (0700, the daemon's), so
//! another user cannot even connect; and the server checks the caller's uid with
//! `SO_PEERCRED` before reading a request, and answers anyone else with
//! `{"ok":false,"error":"permission denied: ..."}` ([`authorized`]).
//!
//! # Dependencies and invariants
//!
//! `daemon → control → fs, cache, writeback, metrics`; nothing imports this module but
//! the daemon (to start and stop the server) and `main` (the client commands). The
//! server calls the layers only through their public, narrow methods: it takes none
//! of their locks itself and holds no lock of its own across a call into them (its one
//! lock-free state is the connection count). A mount-path lookup it makes on the core
//! is paired with a `forget` of the same count, as the kernel's are.
//!
//! Errors: one type per layer; here [`ControlError`] (client side: no daemon, refused,
//! the daemon's answer was an error). The server turns every core error into the
//! answer's `error` text.

pub mod client;
pub mod server;
pub mod warmup;
pub mod watch;

use std::fmt;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

pub use server::{Server, Target};

/// The socket's name inside dst's state folder.
pub const SOCKET_NAME: &str = "control.sock";

/// A connection with no request for this long is closed.
pub const IDLE: Duration = Duration::from_secs(30);

/// The control socket of the daemon serving `dst`.
pub fn socket_path(dst: &Path) -> PathBuf {
    dst.join(crate::fs::names::STATE_DIR).join(SOCKET_NAME)
}

/// Whether a caller with `uid` may use the channel of a daemon running as `owner`:
/// root, or the owner.
pub fn authorized(uid: u32, owner: u32) -> bool {
    uid == 0 || uid == owner
}

/// A mount-relative path from the command line or a request: `""` is the root;
/// leading `/` and `.` components are dropped; `..` and reserved names (cachefs's
/// own state) are refused.
pub fn mount_rel(p: &Path) -> Result<PathBuf, String> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => {
                if crate::fs::names::is_reserved(n) {
                    return Err(format!(
                        "{}: names starting with .cachefs are cachefs's own",
                        p.display()
                    ));
                }
                out.push(n);
            }
            Component::ParentDir | Component::Prefix(_) => {
                return Err(format!(
                    "{}: use a path inside the mount, without '..'",
                    p.display()
                ));
            }
        }
    }
    Ok(out)
}

/// What can go wrong on the client side of the channel.
#[derive(Debug)]
pub enum ControlError {
    /// No daemon answers at the socket (none runs on this dst, or it is an old one).
    NoDaemon { socket: PathBuf, source: io::Error },
    /// The socket exists but this user may not use it.
    Refused { socket: PathBuf, why: String },
    /// The connection failed midway or the answer was not JSON.
    Io(io::Error),
    /// The daemon answered with an error.
    Daemon(String),
    /// A bad argument (a path outside the mount, a bad value).
    Usage(String),
}

impl ControlError {
    /// Exit status for `main`: 2 for a bad argument, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            ControlError::Usage(_) => crate::config::EXIT_USAGE,
            _ => 1,
        }
    }
}

impl fmt::Display for ControlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ControlError::NoDaemon { socket, source } => write!(
                f,
                "no running cachefs answers at {} ({source}); is a daemon mounted with this -dst?",
                socket.display()
            ),
            ControlError::Refused { socket, why } => write!(
                f,
                "cannot control the cachefs at {}: {why}; only root or the user the daemon runs as may",
                socket.display()
            ),
            ControlError::Io(e) => write!(f, "control channel: {e}"),
            ControlError::Daemon(e) => write!(f, "{e}"),
            ControlError::Usage(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ControlError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_root_and_the_owner_are_authorized() {
        assert!(authorized(0, 1000));
        assert!(authorized(1000, 1000));
        assert!(!authorized(65534, 1000));
        assert!(authorized(0, 0));
        assert!(!authorized(1000, 0));
    }

    #[test]
    fn mount_relative_paths() {
        assert_eq!(mount_rel(Path::new("/a/./b")).unwrap(), Path::new("a/b"));
        assert_eq!(mount_rel(Path::new("")).unwrap(), Path::new(""));
        assert_eq!(mount_rel(Path::new("/")).unwrap(), Path::new(""));
        assert!(mount_rel(Path::new("a/../b")).is_err());
        assert!(mount_rel(Path::new(".cachefs-state/x")).is_err());
    }
}
