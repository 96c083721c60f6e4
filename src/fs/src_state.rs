//! The persisted src state, `dst/.cachefs-state/src.json`, for `cachefs status`.
//!
//! The core writes it when it starts (src was checked, so online) and at every
//! online/offline transition (see `CacheFs::src_result`), never on the hot path. Writes
//! are atomic and durable (`sys::state_file`: temp file in the state folder, fsync,
//! rename), so a reader sees the old or the new state, never a torn one. The format is one JSON object:
//!
//! ```json
//! {"online":false,"since":1700000000,"last_error":"Transport endpoint is not connected (os error 107)","pid":1234}
//! ```
//!
//! `since` is when src went offline (or came back online, or the daemon started), in unix
//! seconds; `last_error` is the error that took it offline (`null` while online); `pid`
//! is the daemon that wrote it, so a reader can tell a live state from a stale one left
//! by a daemon that is no longer running.

use std::fmt::Write as _;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::layer::Layer;
use super::names::STATE_DIR;
use crate::sys::state_file;

/// The file name in the state folder.
pub const FILE: &str = "src.json";

/// What `src.json` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrcState {
    pub online: bool,
    /// Unix seconds of the last transition (or of the daemon's start).
    pub since: u64,
    pub last_error: Option<String>,
    pub pid: u32,
}

/// `dst/.cachefs-state/src.json`.
pub fn path(dst: &Path) -> PathBuf {
    dst.join(STATE_DIR).join(FILE)
}

/// Unix seconds of a time (0 before 1970).
pub use crate::sys::clock::unix_secs as unix_now;

/// Appends `s` as a JSON string literal.
pub fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

impl SrcState {
    pub fn to_json(&self) -> String {
        let mut out = format!("{{\"online\":{},\"since\":{},", self.online, self.since);
        out.push_str("\"last_error\":");
        match &self.last_error {
            Some(e) => json_str(&mut out, e),
            None => out.push_str("null"),
        }
        let _ = write!(out, ",\"pid\":{}}}", self.pid);
        out
    }

    /// Parses what [`SrcState::to_json`] wrote (not a general JSON parser).
    pub fn parse(json: &str) -> Option<SrcState> {
        let raw = |key: &str| -> Option<&str> {
            let at = json.find(&format!("\"{key}\":"))? + key.len() + 3;
            Some(json[at..].trim_start())
        };
        let num = |key: &str| -> Option<u64> {
            let rest = raw(key)?;
            let end = rest.find([',', '}'])?;
            rest[..end].trim().parse().ok()
        };
        let online = match raw("online")? {
            r if r.starts_with("true") => true,
            r if r.starts_with("false") => false,
            _ => return None,
        };
        let last_error = match raw("last_error")? {
            r if r.starts_with("null") => None,
            r => Some(parse_str(r)?),
        };
        Some(SrcState {
            online,
            since: num("since")?,
            last_error,
            pid: u32::try_from(num("pid")?).ok()?,
        })
    }

    /// Whether the daemon that wrote this state still runs (its pid is alive and is a
    /// cachefs process).
    pub fn writer_running(&self) -> bool {
        if self.pid == 0 {
            return false;
        }
        // SAFETY: signal 0 only checks that the process exists.
        let alive = unsafe { libc::kill(self.pid as libc::pid_t, 0) } == 0
            || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        alive
            && std::fs::read_to_string(format!("/proc/{}/comm", self.pid))
                .is_ok_and(|c| c.trim_end().starts_with("cachefs"))
    }
}

/// A JSON string literal at the start of `s` (the escapes [`json_str`] writes).
fn parse_str(s: &str) -> Option<String> {
    let mut chars = s.strip_prefix('"')?.chars();
    let mut out = String::new();
    loop {
        match chars.next()? {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'u' => {
                    let hex: String = chars.by_ref().take(4).collect();
                    out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                }
                'n' => out.push('\n'),
                't' => out.push('\t'),
                c => out.push(c),
            },
            c => out.push(c),
        }
    }
}

/// Writes `state` to `dst`'s state folder atomically (temp + rename).
pub fn write(dst: &Path, state: &SrcState) -> io::Result<()> {
    let dir = dst.join(STATE_DIR);
    std::fs::create_dir_all(&dir)?;
    // Per process: a command may write while the daemon does.
    let tmp = format!("{FILE}.tmp.{}", std::process::id());
    state_file::replace(&dir.join(FILE), tmp.as_ref(), 0o666, |f| {
        f.write_all(state.to_json().as_bytes())?;
        f.write_all(b"\n")
    })
}

/// The marker file in the state folder: src was a mount root when a daemon last ran.
pub const MOUNTED_MARKER: &str = "src-is-a-mount";

/// Opens src's root for the view and writeback alike (one [`Layer`] for both), with
/// the mount-root rule: if src was a mount root when a daemon last ran on `dst` (the
/// marker) and is a bare directory now, src's mount is missing and the layer starts
/// offline ([`Layer::open_src`]). A src that is a mount root now leaves the marker.
/// To use a plain directory where a mount used to be, remove the marker.
pub fn open_src(src: &Path, dst: &Path) -> io::Result<Layer> {
    let marker = dst.join(STATE_DIR).join(MOUNTED_MARKER);
    let layer = Layer::open_src(src, marker.exists())?;
    if layer.root_fd().is_err() {
        log::warn!(
            "src {} was a mount point when cachefs last ran and is not one now (is rclone \
             mounted yet?): src counts as offline until a filesystem is mounted there; cached \
             files keep working and writeback waits. If src is now meant to be a plain \
             directory, remove {}",
            src.display(),
            marker.display()
        );
    } else if layer.is_mount_root() {
        remember_mounted(dst);
    }
    Ok(layer)
}

/// Leaves the marker that src is a mount root (see [`open_src`]).
pub fn remember_mounted(dst: &Path) {
    let dir = dst.join(STATE_DIR);
    let marker = dir.join(MOUNTED_MARKER);
    if !marker.exists() {
        // Durable (fsynced, with its directory): a power loss must not forget that src
        // was a mount, or the bare directory a missing mount leaves would pass for src.
        let made = std::fs::create_dir_all(&dir).and_then(|()| {
            let tmp = format!("{MOUNTED_MARKER}.tmp");
            state_file::replace_with(&marker, tmp.as_ref(), b"")
        });
        if let Err(e) = made {
            log::warn!(
                "cannot record that src is a mount point ({}): {e}",
                marker.display()
            );
        }
    }
}

/// The state `dst`'s daemon last wrote, if any.
pub fn read(dst: &Path) -> Option<SrcState> {
    SrcState::parse(&std::fs::read_to_string(path(dst)).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_the_file() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(read(d.path()), None);
        let s = SrcState {
            online: false,
            since: 1_700_000_000,
            last_error: Some("Transport \"endpoint\" \\ not\nconnected".into()),
            pid: std::process::id(),
        };
        write(d.path(), &s).unwrap();
        assert_eq!(read(d.path()), Some(s.clone()));
        let on = SrcState {
            online: true,
            last_error: None,
            ..s
        };
        write(d.path(), &on).unwrap();
        assert_eq!(read(d.path()), Some(on));
        // No temp file left behind.
        let names: Vec<_> = std::fs::read_dir(d.path().join(STATE_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [FILE]);
    }

    #[test]
    fn garbage_is_no_state() {
        for bad in [
            "",
            "{}",
            "{\"online\":maybe,\"since\":1,\"last_error\":null,\"pid\":1}",
        ] {
            assert_eq!(SrcState::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn writer_liveness() {
        let mut s = SrcState {
            online: true,
            since: 0,
            last_error: None,
            pid: 0,
        };
        assert!(!s.writer_running());
        // This test process is alive but is not a cachefs daemon... unless the test
        // binary's name starts with "cachefs" (it does: cachefs-<hash>).
        s.pid = std::process::id();
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        assert_eq!(s.writer_running(), comm.starts_with("cachefs"));
        s.pid = u32::MAX / 2; // no such process
        assert!(!s.writer_running());
    }
}
