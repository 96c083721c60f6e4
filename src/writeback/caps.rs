//! What src can hold, found by trying it once (`-w`), not by retrying ops that cannot
//! succeed.
//!
//! The probe makes a hidden folder on src, `.cachefs-tmp.probe.<run>.<random>`
//! (a reserved temp name; `<run>` is 128 random bits new at every start, see
//! `journal::Runs`, so two machines sharing a bucket never touch each other's, even
//! when one's dst is a copy of the other's), tries in it: a file with a chmod, a chown (root
//! only), a utimes and a user xattr, a hard link, a symlink and a fifo, reads each
//! result back (a src may accept a call and not keep it: rclone answers chmod and
//! chown with success and shows its fixed `--umask`/`--uid`/`--gid`), and removes the
//! folder. A leftover folder of this dst (a crash mid-probe) is removed at the next
//! probe.
//!
//! Empty directories cannot be told apart by a probe on rclone: its VFS shows a new
//! directory whether or not the backend stores it (S3 and GCS without directory
//! markers do not). For `fuse.rclone` src that capability is reported as unknown.
//!
//! When: before the first op is replayed on src after a start (a mount that changes
//! nothing never writes to src), by the worker about to replay it
//! ([`Caps::get_or_probe`]; an offline src fails that op as offline, without spending
//! an attempt, and the next replay probes again; a hung src holds that worker as the
//! op would have). If the list of paths not representable on src is not empty, at
//! start instead, in a background thread the start waits for at most 2 s (retried
//! while src is offline), so that what src can hold now is synced (rclone restarted
//! with `--links`). The result is logged in one line and written to
//! `dst/.cachefs-state/writeback/src-caps` (one JSON object) for `cachefs status`.
//! It is not probed again while the daemon runs: restart cachefs after changing how
//! src is mounted (rclone's `--links`, say).

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::at;
use crate::fs::names;

/// What a src can hold (each read back after it was made).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SrcCaps {
    pub symlinks: bool,
    /// fifos (and so sockets and device nodes: mknod).
    pub special_files: bool,
    pub hard_links: bool,
    pub user_xattrs: bool,
    /// A chmod is kept (read back).
    pub chmod: bool,
    /// A chown is kept (read back); false when the daemon is not root.
    pub chown: bool,
    /// A file's mtime is kept (read back).
    pub utimes: bool,
    /// `None`: a probe cannot tell (rclone: depends on its backend).
    pub empty_dirs: Option<bool>,
    /// src's filesystem type, from /proc/self/mountinfo ("fuse.rclone", "ext4"...).
    pub fstype: String,
}

impl SrcCaps {
    fn fields(&self) -> [(&'static str, Option<bool>); 8] {
        [
            ("symlinks", Some(self.symlinks)),
            ("special_files", Some(self.special_files)),
            ("hard_links", Some(self.hard_links)),
            ("user_xattrs", Some(self.user_xattrs)),
            ("chmod", Some(self.chmod)),
            ("chown", Some(self.chown)),
            ("utimes", Some(self.utimes)),
            ("empty_dirs", self.empty_dirs),
        ]
    }

    /// One JSON object (the `src-caps` file, and `src_caps` in `status --json`).
    pub(crate) fn to_json(&self) -> String {
        let mut out = String::from("{");
        for (k, v) in self.fields() {
            let _ = write!(
                out,
                "\"{k}\":{},",
                v.map_or("null".to_string(), |b| b.to_string())
            );
        }
        out.push_str("\"fstype\":");
        crate::fs::src_state::json_str(&mut out, &self.fstype);
        out.push('}');
        out
    }

    /// The human summary: "symlinks no, fifos/devices no, ...".
    pub(crate) fn describe(&self) -> String {
        let yn = |b: bool| if b { "yes" } else { "no" };
        let empty = match self.empty_dirs {
            Some(b) => yn(b).to_string(),
            None => "unknown (rclone: S3 and GCS keep none)".to_string(),
        };
        format!(
            "symlinks {}, fifos/devices {}, hard links {}, user xattrs {}, chmod {}, chown {}, \
             mtime {}, empty directories {empty}",
            if self.symlinks {
                "yes"
            } else {
                "no (rclone: --links stores them)"
            },
            yn(self.special_files),
            if self.hard_links {
                "yes"
            } else {
                "no (uploaded as copies)"
            },
            yn(self.user_xattrs),
            yn(self.chmod),
            yn(self.chown),
            yn(self.utimes),
        )
    }
}

/// Parses [`SrcCaps::to_json`]'s output (for `status`).
pub(crate) fn parse(json: &str) -> Option<SrcCaps> {
    let get = |k: &str| -> Option<Option<bool>> {
        let at = json.find(&format!("\"{k}\":"))? + k.len() + 3;
        let rest = &json[at..];
        if rest.starts_with("true") {
            Some(Some(true))
        } else if rest.starts_with("false") {
            Some(Some(false))
        } else if rest.starts_with("null") {
            Some(None)
        } else {
            None
        }
    };
    let b = |k: &str| get(k).flatten();
    let fstype = json
        .find("\"fstype\":\"")
        .map(|i| &json[i + 10..])
        .and_then(|r| r.split('"').next())
        .unwrap_or_default()
        .to_string();
    Some(SrcCaps {
        symlinks: b("symlinks")?,
        special_files: b("special_files")?,
        hard_links: b("hard_links")?,
        user_xattrs: b("user_xattrs")?,
        chmod: b("chmod")?,
        chown: b("chown")?,
        utimes: b("utimes")?,
        empty_dirs: get("empty_dirs")?,
        fstype,
    })
}

/// Where the probe result is kept for `status`.
pub(crate) fn file(dst: &Path) -> PathBuf {
    super::journal::dir(dst).join("src-caps")
}

/// The last probe result this dst recorded, if any.
pub(crate) fn read(dst: &Path) -> Option<SrcCaps> {
    parse(&std::fs::read_to_string(file(dst)).ok()?)
}

/// src's capabilities, once known.
pub(crate) struct Caps {
    known: Mutex<Option<SrcCaps>>,
    /// Serialises probes (the first caller probes, the others wait for its answer).
    probing: Mutex<()>,
    /// Probe folder prefixes: this run's first, then earlier runs' of this dst on
    /// this machine (their leftovers are removed).
    prefixes: Vec<String>,
    src_path: PathBuf,
    dst: PathBuf,
}

impl Caps {
    pub(crate) fn new(runs: &super::journal::Runs, src_path: &Path, dst: &Path) -> Caps {
        let prefixes = std::iter::once(&runs.current)
            .chain(&runs.reclaim)
            .map(|r| format!("{}probe.{r}.", names::TEMP_PREFIX))
            .collect();
        Caps {
            known: Mutex::new(None),
            probing: Mutex::new(()),
            prefixes,
            src_path: src_path.to_path_buf(),
            dst: dst.to_path_buf(),
        }
    }

    pub(crate) fn get(&self) -> Option<SrcCaps> {
        self.known.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The capabilities, probing src (its root open as `root`) if not known yet. Errors
    /// if src fails the probe's first steps (offline, hung then failing): try later.
    pub(crate) fn get_or_probe(&self, root: BorrowedFd<'_>) -> io::Result<SrcCaps> {
        if let Some(c) = self.get() {
            return Ok(c);
        }
        let _g = self.probing.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = self.get() {
            return Ok(c);
        }
        let caps = probe(root, &self.prefixes, &self.src_path)?;
        log::info!(
            "src {} ({}) can hold: {}; what it cannot is kept in dst only and listed by \
             `cachefs status` as not representable on src",
            self.src_path.display(),
            if caps.fstype.is_empty() {
                "?"
            } else {
                &caps.fstype
            },
            caps.describe()
        );
        if let Err(e) = write_atomically(&file(&self.dst), caps.to_json().as_bytes()) {
            log::warn!("writeback: cannot record src's capabilities for `status`: {e}");
        }
        *self.known.lock().unwrap_or_else(|p| p.into_inner()) = Some(caps.clone());
        Ok(caps)
    }
}

fn write_atomically(p: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = p.with_extension("tmp");
    let tmp = tmp.file_name().unwrap_or_default();
    crate::sys::state_file::replace(p, tmp, 0o666, |f| {
        f.write_all(data)?;
        f.write_all(b"\n")
    })
}

/// The filesystem type of the mount holding `p` (longest mount point prefix in
/// /proc/self/mountinfo), or "".
pub(crate) fn fstype_of(p: &Path) -> String {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return String::new();
    };
    let p = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let mut best: Option<(usize, String)> = None;
    for line in info.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let Some(sep) = f.iter().position(|x| *x == "-") else {
            continue;
        };
        let (Some(mp), Some(ty)) = (f.get(4), f.get(sep + 1)) else {
            continue;
        };
        let mp = mp.replace("\\040", " ");
        if p.starts_with(&mp) && best.as_ref().is_none_or(|(l, _)| mp.len() >= *l) {
            best = Some((mp.len(), ty.to_string()));
        }
    }
    best.map(|b| b.1).unwrap_or_default()
}

/// Try each capability in a fresh hidden folder under `root`, then remove it.
/// `prefixes`: this run's probe folder prefix, then earlier runs' (see [`Caps`]).
fn probe(root: BorrowedFd<'_>, prefixes: &[String], src_path: &Path) -> io::Result<SrcCaps> {
    // Leftovers of this dst's earlier probes on this machine (a crash mid-probe).
    if let Ok(list) = at::list_dir(root, OsStr::new(".")) {
        for n in list {
            if prefixes
                .iter()
                .any(|p| n.as_encoded_bytes().starts_with(p.as_bytes()))
            {
                remove_probe_dir(root, &n);
            }
        }
    }
    let name = format!("{}{:016x}", prefixes[0], super::retry::rand_u64());
    let name = OsStr::new(&name);
    at::mkdir_at(root, name, 0o700)?;
    let r = at::open_dir_at(root, name).and_then(|d| {
        let caps = probe_in(d.as_fd(), src_path);
        // src answered to the end: a failure in a step was that step's answer.
        at::lstat_at(root, name)?;
        caps
    });
    remove_probe_dir(root, name);
    r
}

fn remove_probe_dir(root: BorrowedFd<'_>, name: &OsStr) {
    if let Ok(d) = at::open_dir_at(root, name) {
        for n in at::list_dir(d.as_fd(), OsStr::new(".")).unwrap_or_default() {
            let _ = at::unlink_at(d.as_fd(), &n, false);
        }
    }
    if let Err(e) = at::unlink_at(root, name, true)
        && !at::is_gone(&e)
    {
        log::warn!(
            "writeback: cannot remove the capability probe folder {} on src: {e}",
            name.to_string_lossy()
        );
    }
}

fn probe_in(d: BorrowedFd<'_>, src_path: &Path) -> io::Result<SrcCaps> {
    let f = OsStr::new("f");
    {
        let mut file = at::create_excl_at(d, f, 0o600)?;
        file.write_all(b"cachefs capability probe\n")?;
    }
    let st = at::lstat_at(d, f)?.ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
    let read_back = || at::lstat_at(d, f).ok().flatten();

    let want_mode = if st.st_mode & 0o7777 == 0o614 {
        0o641
    } else {
        0o614
    };
    let chmod = at::chmod_at(d, f, want_mode).is_ok()
        && read_back().is_some_and(|s| s.st_mode & 0o7777 == want_mode);

    // SAFETY: geteuid cannot fail.
    let root_user = unsafe { libc::geteuid() } == 0;
    let (uid, gid) = (st.st_uid.wrapping_add(1), st.st_gid.wrapping_add(1));
    let chown = root_user
        && at::chown_at(d, f, uid, gid).is_ok()
        && read_back().is_some_and(|s| (s.st_uid, s.st_gid) == (uid, gid));

    let mut t = st;
    t.st_mtime = 1_000_000_000;
    t.st_mtime_nsec = 0;
    t.st_atime = 1_000_000_000;
    t.st_atime_nsec = 0;
    let utimes =
        at::utimes_at(d, f, &t).is_ok() && read_back().is_some_and(|s| s.st_mtime == 1_000_000_000);

    let attr = b"user.cachefs.probe";
    let user_xattrs = at::set_xattr(d, f, attr, b"1").is_ok()
        && at::get_xattr(d, f, attr).ok().as_deref() == Some(b"1".as_slice());

    let h = OsStr::new("h");
    let hard_links = at::link_at(d, f, d, h).is_ok()
        && at::lstat_at(d, h)
            .ok()
            .flatten()
            .is_some_and(|s| s.st_ino == st.st_ino && s.st_nlink >= 2);

    let s = OsStr::new("s");
    let symlinks = at::symlink_at(OsStr::new("f"), d, s).is_ok()
        && at::lstat_at(d, s)
            .ok()
            .flatten()
            .is_some_and(|x| at::file_type(&x) == libc::S_IFLNK)
        && at::readlink_at(d, s).ok().as_deref() == Some(OsStr::new("f"));

    // rclone answers EIO and leaves an empty regular file: only a fifo read back counts.
    let p = OsStr::new("p");
    let special_files = at::mknod_at(d, p, libc::S_IFIFO | 0o600, 0).is_ok()
        && at::lstat_at(d, p)
            .ok()
            .flatten()
            .is_some_and(|x| at::file_type(&x) == libc::S_IFIFO);

    let fstype = fstype_of(src_path);
    let empty_dirs = (!fstype.starts_with("fuse.rclone")).then_some(true);
    Ok(SrcCaps {
        symlinks,
        special_files,
        hard_links,
        user_xattrs,
        chmod,
        chown,
        utimes,
        empty_dirs,
        fstype,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_directory_holds_everything_and_the_probe_leaves_nothing() {
        let t = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(super::super::journal::dir(dst.path())).unwrap();
        let root = crate::sys::open_dir_path(t.path()).unwrap();
        // A leftover of an earlier probe of this dst (run "before") goes; another
        // dst's (or a clone's) stays.
        let old = t.path().join(".cachefs-tmp.probe.before.0");
        std::fs::create_dir(&old).unwrap();
        std::fs::write(old.join("f"), b"x").unwrap();
        let other = t.path().join(".cachefs-tmp.probe.other.0");
        std::fs::create_dir(&other).unwrap();
        let runs = super::super::journal::Runs {
            current: "me".into(),
            reclaim: vec!["before".into()],
        };
        let caps = Caps::new(&runs, t.path(), dst.path());
        let c = caps.get_or_probe(root.as_fd()).unwrap();
        assert!(c.symlinks && c.special_files && c.hard_links, "{c:?}");
        assert!(c.chmod && c.utimes && c.empty_dirs == Some(true), "{c:?}");
        let left: Vec<_> = std::fs::read_dir(t.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            left,
            vec![std::ffi::OsString::from(".cachefs-tmp.probe.other.0")]
        );
        assert_eq!(read(dst.path()), Some(c.clone()));
        assert_eq!(parse(&c.to_json()), Some(c));
    }
}
