//! Applying one journaled op to src, from dst's *current* state.
//!
//! Rules (each makes a replay idempotent and convergent, whatever happened on dst since
//! the op was recorded):
//! - A path-syncing op (write, create, mknod, mkdir, symlink, setattr, xattr, sync) whose
//!   dst entry is gone is skipped: the unlink/rmdir/rename that removed it is journaled
//!   after it, and a rename journals follow-ups for what was pending below its source.
//! - Files are written to a `.cachefs-tmp.*` file in the same src directory, given dst's
//!   owner, mode, user xattrs, POSIX ACLs and times, fsynced, then renamed over the
//!   target. A file with several hard links on both sides is rewritten in place so the
//!   links survive.
//! - Missing src parents are created (with dst's attributes when dst has them).
//! - A path is materialised only if dst still holds the object recorded with the op
//!   (identity check, see the module doc of `writeback`).
//! - A rename whose source is gone from src syncs its target from dst (recursively) or,
//!   if dst no longer holds the moved object there, clears the target on src. An exchange
//!   with one side on src moves that side. A target src cannot replace as is (another
//!   type, a non-empty directory) is removed first: the view replaced it.
//! - Unlink/rmdir of something already gone succeed; whatever src has at that path goes
//!   (recursively): the view has nothing there at that point of the journal. A whiteout
//!   or the opaque marker in dst is applied (src entries removed) only by a recursive
//!   sync; internal names are never created on src.
//! - Origin records (`fs::origin`, in the state folder; never on the dst file, whose
//!   ctime the mount shows): after an upload, dst's file records the src version just
//!   written (clean if dst did not change during the upload, dirty otherwise), files
//!   created here included; an upload of a dirty file whose src version is no longer
//!   the recorded one is a conflict (src's version is kept beside it). A replayed
//!   rename clears the records at both names first: it changes src under them.
//! - Nothing follows a symlink: see [`super::sys`].
//! - What src cannot hold (see `caps`) is not tried, or not retried: a symlink or special
//!   file on a src without them is kept in dst only (and whatever src had at that path
//!   is removed: the view replaced it); a hard link on a src without them is a copy; a
//!   mode, owner, mtime, user xattrs or ACLs src does not keep are left as src shows them.
//!   Each is noted in [`Ctx::notes`] (`unrep`: "not representable on src"), and the op
//!   succeeds.

use crate::fs::layer;
use crate::fs::origin::{self, Origin};
use std::cell::Cell;
use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::caps::{Caps, SrcCaps};
use super::sys::{self, Id, Stat};
use super::unrep::{self, Note};
use super::{Op, op};
use crate::fs::names;
use std::cell::RefCell;

/// What a replay did (for the `-log` line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Applied,
    /// Nothing to do (dst entry gone, or src already in that state).
    Skipped,
}

/// The two roots and the stop flag of one replay.
pub(crate) struct Ctx<'a> {
    /// src, as the view sees it (one gateway: an unmounted src is offline here too).
    pub src: &'a layer::Layer,
    pub dst: &'a Path,
    pub stop: &'a AtomicBool,
    /// `.cachefs-tmp.wb.<run>.<seq>.` (see [`super::journal::Runs`]).
    pub tmp_prefix: String,
    /// The same op's prefixes under earlier runs of this dst on this machine (empty
    /// for an op journaled by this run): their temp files are leftovers of a crash.
    pub reclaim_prefixes: Vec<String>,
    pub tmp_counter: Cell<u32>,
    /// What src can hold (probed once).
    pub caps: &'a Caps,
    /// Names this replay renamed away or deleted on src are noted here.
    pub leftovers: &'a super::leftovers::Leftovers,
    /// The op is a chmod/chown/utimens (`SetAttr`): src's mode, owner and mtime are
    /// compared with dst's.
    pub attrs_op: bool,
    /// What this replay found src cannot hold, per path synced (and, with nothing
    /// found, that a path is representable again).
    pub notes: RefCell<Vec<Note>>,
}

struct Roots {
    src: OwnedFd,
    dst: OwnedFd,
}

fn interrupted() -> io::Error {
    io::Error::new(io::ErrorKind::Interrupted, "writeback shutting down")
}

/// Apply `op` to src. `ids`: the dst objects it refers to (see `op::id_paths`).
pub(crate) fn apply(ctx: &Ctx, op: &Op, ids: &[Option<Id>; 2]) -> io::Result<Outcome> {
    let roots = Roots {
        src: ctx.src.root_fd_checked()?,
        dst: sys::open_root(ctx.dst)?,
    };
    let [id0, id1] = *ids;
    match op {
        Op::Write { path } | Op::Create { path } => sync_path(ctx, &roots, path, id0, true, false),
        Op::Mknod { path }
        | Op::Mkdir { path }
        | Op::Symlink { path }
        | Op::SetAttr { path }
        | Op::Xattr { path } => sync_path(ctx, &roots, path, id0, false, false),
        Op::Sync { path } => sync_path(ctx, &roots, path, id0, true, true),
        Op::Unlink { path } => remove(ctx, &roots, path, false),
        Op::Rmdir { path } => remove(ctx, &roots, path, true),
        Op::Link { existing, new } => link(ctx, &roots, existing, new, id1),
        Op::Rename { from, to, exchange } => rename(ctx, &roots, from, to, *exchange, [id0, id1]),
    }
}

impl Ctx<'_> {
    /// src's capabilities (probed now if not known yet).
    fn caps(&self) -> io::Result<SrcCaps> {
        if let Some(c) = self.caps.get() {
            return Ok(c);
        }
        let root = self.src.root_fd_checked()?;
        self.caps.get_or_probe(root.as_raw_fd())
    }

    fn note(&self, path: PathBuf, checked: u16, found: u16, detail: String) {
        self.notes.borrow_mut().push(Note {
            path,
            checked,
            found,
            detail,
        });
    }

    /// The next temp name of this op, `.cachefs-tmp.wb.<run>.<seq>.<n>`, for use in
    /// src's directory `dir`. Names are a function of the run and the op: the replay of
    /// an op interrupted by a crash reuses (and so reclaims) the temp file this run left
    /// in src; the same name under earlier runs of this dst on this machine (the op was
    /// left pending by them) is removed from `dir` here.
    fn temp_name_in(&self, dir: RawFd) -> OsString {
        let n = self.tmp_counter.get();
        self.tmp_counter.set(n + 1);
        for old in &self.reclaim_prefixes {
            let _ = sys::unlink_at(dir, OsStr::new(&format!("{old}{n}")), false);
        }
        OsString::from(format!("{}{n}", self.tmp_prefix))
    }
}

/// Create a temp entry with `make`; a leftover of ours with that name is replaced.
fn make_temp<T>(dir: RawFd, name: &OsStr, make: impl Fn() -> io::Result<T>) -> io::Result<T> {
    match make() {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            sys::unlink_at(dir, name, false)?;
            make()
        }
        other => other,
    }
}

/// Removes a temp entry on drop unless disarmed.
struct TempGuard<'a> {
    dir: RawFd,
    name: &'a OsStr,
    armed: bool,
}

impl Drop for TempGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = sys::unlink_at(self.dir, self.name, false);
        }
    }
}

/// Ignore "not supported here" (and, for chown, "not permitted") from the src filesystem.
fn tolerate(r: io::Result<()>, chown: bool) -> io::Result<()> {
    match r {
        Err(e) if sys::is_unsupported(&e) => Ok(()),
        Err(e) if chown && e.raw_os_error() == Some(libc::EPERM) => Ok(()),
        other => other,
    }
}

/// Make src's parent directory of `comps` exist; missing levels are created with dst's
/// attributes when dst has them, else as 0755 placeholders (a later journaled op renames
/// or removes them, since dst no longer has them).
fn ensure_src_parent(roots: &Roots, comps: &[&OsStr]) -> io::Result<OwnedFd> {
    let mut s = sys::dup(roots.src.as_raw_fd())?;
    let mut d = Some(sys::dup(roots.dst.as_raw_fd())?);
    for c in comps {
        let dst_st = match &d {
            Some(dfd) => sys::lstat_at(dfd.as_raw_fd(), c)?,
            None => None,
        };
        let dst_is_dir = dst_st.is_some_and(|st| sys::file_type(&st) == libc::S_IFDIR);
        match sys::open_dir_at(s.as_raw_fd(), c) {
            Ok(next) => s = next,
            Err(e) if sys::is_gone(&e) => {
                if e.raw_os_error() == Some(libc::ENOTDIR) {
                    // A non-directory (or symlink) where the view has a directory: stale.
                    sys::unlink_at(s.as_raw_fd(), c, false)?;
                }
                let created = match sys::mkdir_at(s.as_raw_fd(), c, 0o755) {
                    Ok(()) => true,
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => false,
                    Err(e) => return Err(e),
                };
                if created && dst_is_dir {
                    let dfd = d.as_ref().map(|x| x.as_raw_fd()).unwrap_or(-1);
                    set_meta(dfd, s.as_raw_fd(), c, &dst_st.unwrap_or_else(zero_stat))?;
                }
                s = sys::open_dir_at(s.as_raw_fd(), c)?;
            }
            Err(e) => return Err(e),
        }
        d = match (d, dst_is_dir) {
            (Some(dfd), true) => Some(sys::open_dir_at(dfd.as_raw_fd(), c)?),
            _ => None,
        };
    }
    Ok(s)
}

fn zero_stat() -> Stat {
    // SAFETY: stat is plain old data.
    unsafe { std::mem::zeroed() }
}

/// Copy owner, mode, user xattrs, ACLs and times of dst's `name` (under `dd`) to src's `name`
/// (under `sd`). `st` is dst's lstat.
fn set_meta(dd: RawFd, sd: RawFd, name: &OsStr, st: &Stat) -> io::Result<()> {
    set_meta_as(dd, name, sd, name, st)
}

/// [`set_meta`] from dst's `dname` onto src's `sname` (a temp name before its rename).
fn set_meta_as(dd: RawFd, dname: &OsStr, sd: RawFd, sname: &OsStr, st: &Stat) -> io::Result<()> {
    let is_link = sys::file_type(st) == libc::S_IFLNK;
    tolerate(sys::chown_at(sd, sname, st.st_uid, st.st_gid), true)?;
    if !is_link {
        tolerate(sys::chmod_at(sd, sname, st.st_mode & 0o7777), false)?;
        copy_xattrs(dd, dname, sd, sname)?;
    }
    sys::utimes_at(sd, sname, st)
}

/// Make src's user xattrs and POSIX ACLs of `sname` equal to dst's of `dname` (skipped
/// where unsupported). After the chmod: setting an access ACL sets the mode from it
/// (dst's, so the same), removing one leaves the mode.
fn copy_xattrs(dd: RawFd, dname: &OsStr, sd: RawFd, sname: &OsStr) -> io::Result<()> {
    let want = match sys::list_synced_xattrs(dd, dname) {
        Ok(v) => v,
        Err(e) if sys::is_unsupported(&e) => return Ok(()),
        Err(e) => return Err(e),
    };
    let have = match sys::list_synced_xattrs(sd, sname) {
        Ok(v) => v,
        Err(e) if sys::is_unsupported(&e) => return Ok(()),
        Err(e) => return Err(e),
    };
    for a in &have {
        if !want.contains(a) {
            tolerate(sys::remove_xattr(sd, sname, a), false)?;
        }
    }
    for a in &want {
        let v = match sys::get_xattr(dd, dname, a) {
            Ok(v) => v,
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => continue,
            Err(e) => return Err(e),
        };
        if have.contains(a) && sys::get_xattr(sd, sname, a).ok().as_deref() == Some(&v[..]) {
            continue;
        }
        tolerate(sys::set_xattr(sd, sname, a, &v), false)?;
    }
    Ok(())
}

/// Sync one mount-relative path from dst to src. `content`: rewrite file bytes even if
/// src has a file there; `recursive`: also sync a directory's children (and apply dst's
/// whiteouts and opaque marker).
///
/// `expect`: the dst object the op was recorded for; if dst now holds another object at
/// `path` (deleted and recreated, or renamed away and replaced), nothing is done: that
/// later object has its own later ops, and materialising it now, before the ops recorded
/// in between (renames of the old object, say), could leave it where the view never has it.
fn sync_path(
    ctx: &Ctx,
    roots: &Roots,
    path: &Path,
    expect: Option<Id>,
    content: bool,
    recursive: bool,
) -> io::Result<Outcome> {
    let Some((comps, name)) = op::split(path) else {
        // The root itself: metadata (and children if recursive).
        let st = sys::fstat(roots.dst.as_raw_fd())?;
        let dot = OsStr::new(".");
        if recursive {
            sync_children(
                ctx,
                Path::new(""),
                roots.dst.as_raw_fd(),
                roots.src.as_raw_fd(),
                dot,
            )?;
        }
        set_meta(roots.dst.as_raw_fd(), roots.src.as_raw_fd(), dot, &st)?;
        return Ok(Outcome::Applied);
    };
    let dparent = match sys::walk(&roots.dst, &comps) {
        Ok(fd) => fd,
        Err(e) if sys::is_gone(&e) => return reclaim(ctx, roots, &comps),
        Err(e) => return Err(e),
    };
    let Some(dst_st) = sys::lstat_at(dparent.as_raw_fd(), name)? else {
        if recursive
            && whited_out(dparent.as_raw_fd(), name)?
            && let Ok(sp) = sys::walk(&roots.src, &comps)
        {
            remove_tree(ctx, sp.as_raw_fd(), name)?;
            return Ok(Outcome::Applied);
        }
        return reclaim(ctx, roots, &comps);
    };
    if let Some(want) = expect
        && sys::identity_at(dparent.as_raw_fd(), name)? != Some(want)
    {
        return reclaim(ctx, roots, &comps);
    }
    let sparent = ensure_src_parent(roots, &comps)?;
    let dir: PathBuf = comps.iter().collect();
    sync_entry(
        ctx,
        &dir,
        dparent.as_raw_fd(),
        sparent.as_raw_fd(),
        name,
        &dst_st,
        content,
        recursive,
    )?;
    Ok(Outcome::Applied)
}

/// A skipped sync: an earlier run of this op may have died between creating its temp
/// file and renaming it (a crash mid-upload); its name is known, reclaim it.
fn reclaim(ctx: &Ctx, roots: &Roots, comps: &[&OsStr]) -> io::Result<Outcome> {
    if let Ok(sp) = sys::walk(&roots.src, comps) {
        let name = ctx.temp_name_in(sp.as_raw_fd());
        let _ = sys::unlink_at(sp.as_raw_fd(), &name, false);
    }
    Ok(Outcome::Skipped)
}

fn whited_out(dd: RawFd, name: &OsStr) -> io::Result<bool> {
    Ok(sys::lstat_at(dd, &names::whiteout_name(name))?.is_some())
}

/// `dir`: the dst-relative path of `dd` (names the origin records).
#[allow(clippy::too_many_arguments)]
fn sync_entry(
    ctx: &Ctx,
    dir: &Path,
    dd: RawFd,
    sd: RawFd,
    name: &OsStr,
    dst_st: &Stat,
    content: bool,
    recursive: bool,
) -> io::Result<()> {
    if ctx.stop.load(Ordering::Relaxed) {
        return Err(interrupted());
    }
    let src_st = sys::lstat_at(sd, name)?;
    let ftype = sys::file_type(dst_st);
    let src_type = src_st.map(|s| sys::file_type(&s));
    match ftype {
        libc::S_IFREG => {
            if !content && src_type == Some(libc::S_IFREG) {
                set_meta(dd, sd, name, dst_st)?;
                refresh_record(ctx, &dir.join(name), dd, sd, name, src_st.as_ref(), dst_st);
            } else {
                if src_type == Some(libc::S_IFDIR) {
                    remove_tree(ctx, sd, name)?;
                }
                copy_file(ctx, &dir.join(name), dd, sd, name, src_st.as_ref())?;
            }
            note_meta(ctx, &dir.join(name), dd, sd, name, dst_st)
        }
        libc::S_IFDIR => {
            match src_type {
                None => sys::mkdir_at(sd, name, 0o700)?,
                Some(libc::S_IFDIR) => {}
                Some(_) => {
                    sys::unlink_at(sd, name, false)?;
                    sys::mkdir_at(sd, name, 0o700)?;
                }
            }
            if recursive {
                sync_children(ctx, dir, dd, sd, name)?;
            }
            set_meta(dd, sd, name, dst_st)?;
            note_meta(ctx, &dir.join(name), dd, sd, name, dst_st)
        }
        libc::S_IFLNK => {
            let target = sys::readlink_keeping_atime(dd, name)?;
            if src_type == Some(libc::S_IFLNK) && sys::readlink_at(sd, name)? == target {
                ctx.note(dir.join(name), unrep::ALL, 0, String::new());
                return set_meta(dd, sd, name, dst_st);
            }
            if !ctx.caps()?.symlinks {
                return keep_in_dst_only(
                    ctx,
                    &dir.join(name),
                    sd,
                    name,
                    src_st.is_some(),
                    unrep::SYMLINK,
                    format!("symlink to {}", target.to_string_lossy()),
                );
            }
            if src_type == Some(libc::S_IFDIR) {
                remove_tree(ctx, sd, name)?;
            }
            let tmp = ctx.temp_name_in(sd);
            make_temp(sd, &tmp, || sys::symlink_at(&target, sd, &tmp))?;
            let mut g = TempGuard {
                dir: sd,
                name: &tmp,
                armed: true,
            };
            set_meta_as(dd, name, sd, &tmp, dst_st)?;
            sys::rename_at(sd, &tmp, sd, name, false)?;
            g.armed = false;
            ctx.note(dir.join(name), unrep::ALL, 0, String::new());
            Ok(())
        }
        _ => {
            let same = src_st
                .is_some_and(|s| sys::file_type(&s) == ftype && (s.st_rdev == dst_st.st_rdev));
            if same {
                ctx.note(dir.join(name), unrep::ALL, 0, String::new());
                return set_meta(dd, sd, name, dst_st);
            }
            if !ctx.caps()?.special_files {
                let kind = match ftype {
                    libc::S_IFIFO => "fifo",
                    libc::S_IFSOCK => "socket",
                    libc::S_IFCHR => "character device",
                    libc::S_IFBLK => "block device",
                    _ => "special file",
                };
                return keep_in_dst_only(
                    ctx,
                    &dir.join(name),
                    sd,
                    name,
                    src_st.is_some(),
                    unrep::SPECIAL,
                    kind.to_string(),
                );
            }
            if src_type == Some(libc::S_IFDIR) {
                remove_tree(ctx, sd, name)?;
            }
            let tmp = ctx.temp_name_in(sd);
            make_temp(sd, &tmp, || {
                sys::mknod_at(sd, &tmp, ftype | 0o600, dst_st.st_rdev)
            })?;
            let mut g = TempGuard {
                dir: sd,
                name: &tmp,
                armed: true,
            };
            set_meta_as(dd, name, sd, &tmp, dst_st)?;
            sys::rename_at(sd, &tmp, sd, name, false)?;
            g.armed = false;
            ctx.note(dir.join(name), unrep::ALL, 0, String::new());
            Ok(())
        }
    }
}

/// dst's `rel` (a symlink or special file) is something src cannot hold: it stays in
/// dst only. Whatever src still has at that name is stale (the view replaced it; had
/// src been able to hold the new entry, it would have replaced it too), so it goes.
fn keep_in_dst_only(
    ctx: &Ctx,
    rel: &Path,
    sd: RawFd,
    name: &OsStr,
    src_has_it: bool,
    what: u16,
    detail: String,
) -> io::Result<()> {
    if src_has_it {
        remove_tree(ctx, sd, name)?;
    }
    ctx.note(rel.to_path_buf(), unrep::ALL, what, detail);
    Ok(())
}

/// Whether src showing mode `s` for dst's mode `d` loses something that matters: src
/// lets group or others read what dst does not, or drops execute, setuid, setgid or
/// sticky bits. (rclone shows every file with its `--umask` mode: a 0644 file shown as
/// 0664 is not worth a report, a 0600 one shown as 0664 is.)
fn mode_loss_matters(d: u32, s: u32) -> bool {
    (s & !d & 0o044) != 0 || (d & !s & 0o7111) != 0
}

/// After a regular file or directory was synced: note what of dst's metadata src does
/// not show (see `unrep`). Mode: when the loss matters, or after a chmod/chown/utimens
/// whatever the difference; owner and mtime: after a chmod/chown/utimens only (every
/// file rclone shows has its `--uid`/`--gid`). User xattrs and hard links: always.
fn note_meta(
    ctx: &Ctx,
    rel: &Path,
    dd: RawFd,
    sd: RawFd,
    name: &OsStr,
    dst_st: &Stat,
) -> io::Result<()> {
    let Some(s) = sys::lstat_at(sd, name)? else {
        return Ok(());
    };
    let mut checked = unrep::SYMLINK | unrep::SPECIAL | unrep::MODE | unrep::XATTRS;
    let mut found = 0;
    let mut detail = Vec::new();
    let (dm, sm) = (dst_st.st_mode & 0o7777, s.st_mode & 0o7777);
    if dm != sm && (ctx.attrs_op || mode_loss_matters(dm, sm)) {
        found |= unrep::MODE;
        detail.push(format!("mode {dm:04o} (src shows {sm:04o})"));
    }
    if ctx.attrs_op {
        checked |= unrep::OWNER | unrep::MTIME;
        if (dst_st.st_uid, dst_st.st_gid) != (s.st_uid, s.st_gid) {
            found |= unrep::OWNER;
            detail.push(format!(
                "owner {}:{} (src shows {}:{})",
                dst_st.st_uid, dst_st.st_gid, s.st_uid, s.st_gid
            ));
        }
        if dst_st.st_mtime != s.st_mtime {
            found |= unrep::MTIME;
            detail.push(format!(
                "mtime {} (src shows {})",
                dst_st.st_mtime, s.st_mtime
            ));
        }
    }
    let want = sys::list_synced_xattrs(dd, name).unwrap_or_default();
    if !want.is_empty() {
        let missing: Vec<&Vec<u8>> = match sys::list_synced_xattrs(sd, name) {
            Ok(have) => want.iter().filter(|a| !have.contains(a)).collect(),
            Err(_) => want.iter().collect(),
        };
        let acls = missing.iter().filter(|a| sys::is_acl(a)).count();
        for (n, what) in [(missing.len() - acls, "user xattrs"), (acls, "POSIX ACLs")] {
            if n > 0 {
                found |= unrep::XATTRS;
                detail.push(format!("{n} {what}"));
            }
        }
    }
    if sys::file_type(dst_st) == libc::S_IFREG {
        checked |= unrep::HARD_LINK;
        if dst_st.st_nlink > 1 && !ctx.caps()?.hard_links {
            found |= unrep::HARD_LINK;
            detail.push(format!(
                "hard link ({} names in dst; a copy on src)",
                dst_st.st_nlink
            ));
        }
    }
    ctx.note(rel.to_path_buf(), checked, found, detail.join(", "));
    Ok(())
}

/// Recursive part of a directory sync: children of dst's `name` under `dd` onto src's.
fn sync_children(ctx: &Ctx, dir: &Path, dd: RawFd, sd: RawFd, name: &OsStr) -> io::Result<()> {
    let here = if name == "." {
        dir.to_path_buf()
    } else {
        dir.join(name)
    };
    let (dchild, schild) = if name == "." {
        (sys::dup(dd)?, sys::dup(sd)?)
    } else {
        (sys::open_dir_at(dd, name)?, sys::open_dir_at(sd, name)?)
    };
    let (dc, sc) = (dchild.as_raw_fd(), schild.as_raw_fd());
    let entries = sys::list_dir(dc, OsStr::new("."))?;
    let mut seen: HashSet<OsString> = HashSet::new();
    let mut opaque = false;
    let mut whiteouts = Vec::new();
    for n in &entries {
        if n == names::OPAQUE_MARKER {
            opaque = true;
        } else if let Some(t) = names::whiteout_target(n) {
            whiteouts.push(t.to_os_string());
        } else if !names::is_reserved(n) {
            seen.insert(n.clone());
        }
    }
    for n in &entries {
        if !seen.contains(n) {
            continue;
        }
        if let Some(st) = sys::lstat_at(dc, n)? {
            sync_entry(ctx, &here, dc, sc, n, &st, true, true)?;
        }
    }
    for t in whiteouts {
        if !seen.contains(&t) && !names::is_reserved(&t) {
            remove_tree(ctx, sc, &t)?;
        }
    }
    if opaque {
        for n in sys::list_dir(sc, OsStr::new("."))? {
            if !seen.contains(&n) && !names::is_reserved(&n) {
                remove_tree(ctx, sc, &n)?;
            }
        }
    }
    Ok(())
}

/// Remove `name` under `dir` on src, recursively; already gone is fine.
fn remove_tree(ctx: &Ctx, dir: RawFd, name: &OsStr) -> io::Result<()> {
    if ctx.stop.load(Ordering::Relaxed) {
        return Err(interrupted());
    }
    let Some(st) = sys::lstat_at(dir, name)? else {
        return Ok(());
    };
    if sys::file_type(&st) == libc::S_IFDIR {
        let sub = sys::open_dir_at(dir, name)?;
        for n in sys::list_dir(sub.as_raw_fd(), OsStr::new("."))? {
            remove_tree(ctx, sub.as_raw_fd(), &n)?;
        }
    }
    match sys::unlink_at(dir, name, sys::file_type(&st) == libc::S_IFDIR) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// Copy dst's regular file `name` (under `dd`, at `rel` in dst) to src (under `sd`).
fn copy_file(
    ctx: &Ctx,
    rel: &Path,
    dd: RawFd,
    sd: RawFd,
    name: &OsStr,
    src_st: Option<&Stat>,
) -> io::Result<()> {
    let mut df = sys::open_read_at(dd, name)?;
    let st = sys::fstat(df.as_raw_fd())?;
    if sys::file_type(&st) != libc::S_IFREG {
        // Replaced under us by something else: a later journaled op covers it.
        return Ok(());
    }
    let linked_in_place = st.st_nlink > 1
        && src_st.is_some_and(|s| sys::file_type(s) == libc::S_IFREG && s.st_nlink > 1);
    if linked_in_place {
        let mut sf = sys::open_write_at(sd, name)?;
        let n = copy_data(ctx, &mut df, &mut sf)?;
        sf.set_len(n)?;
        finish_file(dd, name, &sf, sd, name, &st)?;
        record_upload(ctx, rel, &df, &st, sd, name);
        return Ok(());
    }
    // Records apply to single-link files only (hard links may be separate files on
    // src): no verdict for the others.
    let fetched_from = origin_of_open(ctx, rel, &df);
    if let (Some(o), Some(s)) = (fetched_from, src_st)
        && o.dirty
        && sys::file_type(s) == libc::S_IFREG
        && !o.same_source(s)
    {
        keep_conflicting_src_version(sd, name)?;
    }
    let tmp = ctx.temp_name_in(sd);
    let mut sf = make_temp(sd, &tmp, || sys::create_excl_at(sd, &tmp, 0o600))?;
    let mut g = TempGuard {
        dir: sd,
        name: &tmp,
        armed: true,
    };
    copy_data(ctx, &mut df, &mut sf)?;
    finish_file(dd, name, &sf, sd, &tmp, &st)?;
    drop(sf);
    // src has no compare-and-swap: look again right before replacing, so that a version
    // another machine stored while this upload ran is kept, not overwritten. What is
    // left is the gap between this look and the rename, plus however stale src's own
    // view is (rclone's --dir-cache-time): docs/SEMANTICS.md.
    if fetched_from.is_some_and(|o| o.dirty)
        && let Some(now) = sys::lstat_at(sd, name)?
        && sys::file_type(&now) == libc::S_IFREG
        && src_st.is_none_or(|before| !same_version(before, &now))
    {
        keep_conflicting_src_version(sd, name)?;
    }
    sys::rename_at(sd, &tmp, sd, name, false)?;
    g.armed = false;
    let _ = sys::fsync_dir(sd);
    record_upload(ctx, rel, &df, &st, sd, name);
    Ok(())
}

/// Whether two stats of src's file show the same version (as [`Origin::same_source`]).
fn same_version(a: &Stat, b: &Stat) -> bool {
    Origin::of(a).same_source(b)
}

/// The origin record of dst's file open as `df` at `rel`, if it applies to that file.
fn origin_of_open(ctx: &Ctx, rel: &Path, df: &File) -> Option<Origin> {
    let id = layer::identity_at(df.as_fd(), c"").ok()?;
    origin::Store::of_root(ctx.dst).ok()?.get_for(rel, &id)
}

/// Metadata replayed onto src's file changed its identity (mtime): move dst's record to
/// it, keeping the dirty flag, so the next upload does not take our own replay for
/// somebody else's change (a false conflict). A file without a record gets none: src's
/// bytes are not known to be dst's.
/// After an attribute-only sync (chmod, chown, utimens, xattrs) of a regular file:
/// the record takes src's new version. It becomes clean when the change was only
/// attributes: src held the version dst's copy came from (`src_before`) and dst's
/// size and mtime are still that version's (no content change here since; a write
/// moves the mtime and has its own op), and src now shows dst's mode and owner. Else
/// it keeps its dirtiness. Without this, a chmod left a clean cached file dirty for
/// good (never evicted).
fn refresh_record(
    ctx: &Ctx,
    rel: &Path,
    dd: RawFd,
    sd: RawFd,
    name: &OsStr,
    src_before: Option<&Stat>,
    dst_st: &Stat,
) {
    let Ok(df) = sys::open_read_at(dd, name) else {
        return;
    };
    if let Some(old) = origin_of_open(ctx, rel, &df)
        && let Ok(Some(on_src)) = sys::lstat_at(sd, name)
        && let Ok(store) = origin::Store::of_root(ctx.dst)
    {
        // src keeps what was set (a src that drops modes or owners, as rclone does,
        // leaves the local attributes dirty: an eviction would lose them).
        let kept = (on_src.st_mode & 0o7777, on_src.st_uid, on_src.st_gid)
            == (dst_st.st_mode & 0o7777, dst_st.st_uid, dst_st.st_gid);
        let attrs_only = kept
            && !old.open_writer
            && src_before.is_some_and(|s| old.same_source(s))
            && old.same_source(dst_st);
        let mut record = Origin::of(&on_src);
        record.dirty = old.dirty && !attrs_only;
        let _ = store.put_fd(rel, &df, record);
    }
}

/// src's file changed since dst's copy was fetched, and dst's copy changed here too:
/// local data wins on src, and src's version is kept beside it under a clearly named
/// conflict file (visible through the mount), with a warning.
fn keep_conflicting_src_version(sd: RawFd, name: &OsStr) -> io::Result<()> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // Never over an earlier conflict file (two conflicts within one second).
    let mut n = 1;
    let kept = loop {
        let mut kept = name.to_os_string();
        kept.push(format!(".conflict-{secs}"));
        if n > 1 {
            kept.push(format!("-{n}"));
        }
        if sys::lstat_at(sd, &kept)?.is_none() {
            break kept;
        }
        n += 1;
    };
    sys::rename_at(sd, name, sd, &kept, false)?;
    crate::metrics::METRICS.conflicts.inc();
    log::warn!(
        "conflict: {} changed on src and here since it was fetched; the local version wins, \
         src's version is kept as {}",
        name.to_string_lossy(),
        kept.to_string_lossy()
    );
    Ok(())
}

/// After an upload: dst's copy now derives from the src version just written, so its
/// record points there (otherwise the next upload would take our own earlier upload for
/// somebody else's change: a false conflict). If dst did not change meanwhile, src
/// holds exactly its bytes and the copy is clean (revalidated against src, evictable);
/// otherwise it is dirty, and the pending write uploads the rest.
///
/// Files created here get their first record this way (they are then revalidated like
/// fetched ones). The record goes to the store in the state folder, never on the dst
/// file (whose ctime the mount shows). A file with several links gets none (local).
fn record_upload(ctx: &Ctx, rel: &Path, df: &File, before: &Stat, sd: RawFd, name: &OsStr) {
    let Ok(store) = origin::Store::of_root(ctx.dst) else {
        return;
    };
    let Ok(id) = layer::identity_at(df.as_fd(), c"") else {
        return;
    };
    let unchanged = unchanged_since(df, before);
    if let Ok(Some(on_src)) = sys::lstat_at(sd, name) {
        let mut record = Origin::of(&on_src);
        record.dirty = !unchanged;
        let _ = store.put(rel, &id, record);
        // A write that landed after the check above (FUSE passthrough writes do not
        // pass through the daemon) must not be left under a clean record: check again
        // after writing it. A later write is followed by a flush that marks it dirty.
        if !record.dirty && !unchanged_since(df, before) {
            record.dirty = true;
            let _ = store.put(rel, &id, record);
        }
    }
}

/// Whether dst's open file still has the mtime, size and inode of `before`.
fn unchanged_since(df: &File, before: &Stat) -> bool {
    sys::fstat(df.as_raw_fd()).is_ok_and(|now| {
        (now.st_mtime, now.st_mtime_nsec, now.st_size, now.st_ino)
            == (
                before.st_mtime,
                before.st_mtime_nsec,
                before.st_size,
                before.st_ino,
            )
    })
}

/// Owner, mode, xattrs, times, fsync of a freshly written src file.
fn finish_file(
    dd: RawFd,
    dname: &OsStr,
    sf: &File,
    sd: RawFd,
    sname: &OsStr,
    st: &Stat,
) -> io::Result<()> {
    let fd = sf.as_raw_fd();
    tolerate(sys::fchown(fd, st.st_uid, st.st_gid), true)?;
    tolerate(sys::fchmod(fd, st.st_mode & 0o7777), false)?;
    copy_xattrs(dd, dname, sd, sname)?;
    sys::futimes(fd, st)?;
    sf.sync_all()
}

fn copy_data(ctx: &Ctx, from: &mut File, to: &mut File) -> io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        if ctx.stop.load(Ordering::Relaxed) {
            return Err(interrupted());
        }
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// Unlink or rmdir on src; already gone succeeds. Whatever src has there goes, whatever
/// its type and content: at this point of the journal the view has nothing at `path`,
/// so a directory still holding entries there holds only what the view hides (src-side
/// leftovers, our temp files, or a later incarnation of the path that an earlier
/// replay synced from dst ahead of time and that the later ops will sync again).
fn remove(ctx: &Ctx, roots: &Roots, path: &Path, dir: bool) -> io::Result<Outcome> {
    let Some((comps, name)) = op::split(path) else {
        return Ok(Outcome::Skipped);
    };
    let sp = match sys::walk(&roots.src, &comps) {
        Ok(fd) => fd,
        Err(e) if sys::is_gone(&e) => return Ok(Outcome::Skipped),
        Err(e) => return Err(e),
    };
    let sd = sp.as_raw_fd();
    let Some(st) = sys::lstat_at(sd, name)? else {
        return Ok(Outcome::Skipped);
    };
    let is_dir = sys::file_type(&st) == libc::S_IFDIR;
    if !is_dir {
        // Noted first: a crash after the unlink must still look again.
        ctx.leftovers.note(path, &st);
    }
    if is_dir != dir {
        log::debug!("writeback: {path:?} on src is not what was removed; removing it anyway");
    }
    if is_dir {
        match sys::unlink_at(sd, name, true) {
            Ok(()) => return Ok(Outcome::Applied),
            Err(e) if !matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EEXIST)) => {
                return Err(e);
            }
            Err(_) => {}
        }
    }
    remove_tree(ctx, sd, name)?;
    drop_whiteout(roots, &comps, name, sd)?;
    Ok(Outcome::Applied)
}

/// src no longer has `name` (in src directory `sd`, dst directory `comps`): dst's
/// whiteout for it hides nothing any more, and would hide what another machine puts
/// there later. Removed unless dst has an entry there (the view's own).
fn drop_whiteout(roots: &Roots, comps: &[&OsStr], name: &OsStr, sd: RawFd) -> io::Result<()> {
    if sys::lstat_at(sd, name)?.is_some() {
        return Ok(());
    }
    let dd = match sys::walk(&roots.dst, comps) {
        Ok(fd) => fd,
        Err(e) if sys::is_gone(&e) => return Ok(()),
        Err(e) => return Err(e),
    };
    if sys::lstat_at(dd.as_raw_fd(), name)?.is_some() {
        return Ok(());
    }
    match sys::unlink_at(dd.as_raw_fd(), &names::whiteout_name(name), false) {
        Err(e)
            if !matches!(
                e.raw_os_error(),
                Some(libc::ENOENT) | Some(libc::ENAMETOOLONG)
            ) =>
        {
            Err(e)
        }
        _ => Ok(()),
    }
}

fn link(
    ctx: &Ctx,
    roots: &Roots,
    existing: &Path,
    new: &Path,
    id: Option<Id>,
) -> io::Result<Outcome> {
    let (Some((ec, en)), Some((nc, nn))) = (op::split(existing), op::split(new)) else {
        return Ok(Outcome::Skipped);
    };
    // dst must still have `new`, else a later op covers it.
    match sys::walk(&roots.dst, &nc) {
        Ok(d) if sys::lstat_at(d.as_raw_fd(), nn)?.is_some() => {}
        Ok(_) => return Ok(Outcome::Skipped),
        Err(e) if sys::is_gone(&e) => return Ok(Outcome::Skipped),
        Err(e) => return Err(e),
    }
    if ctx.caps()?.hard_links
        && let Ok(ep) = sys::walk(&roots.src, &ec)
        && let Some(est) = sys::lstat_at(ep.as_raw_fd(), en)?
        && sys::file_type(&est) != libc::S_IFDIR
    {
        let np = ensure_src_parent(roots, &nc)?;
        match sys::link_at(ep.as_raw_fd(), en, np.as_raw_fd(), nn) {
            Ok(()) => return Ok(Outcome::Applied),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                let same = sys::lstat_at(np.as_raw_fd(), nn)?
                    .is_some_and(|s| s.st_ino == est.st_ino && s.st_dev == est.st_dev);
                if same {
                    return Ok(Outcome::Skipped);
                }
            }
            Err(_) => {} // refused here: copy instead
        }
    }
    sync_path(ctx, roots, new, id, true, false)
}

/// True if src has an entry at `path` (no symlink followed on the way).
fn src_has(roots: &Roots, path: &Path) -> io::Result<bool> {
    if op::split(path).is_none() {
        return Ok(true);
    }
    Ok(src_stat(roots, path)?.is_some())
}

/// src's entry at `path`, if any (no symlink followed on the way).
fn src_stat(roots: &Roots, path: &Path) -> io::Result<Option<Stat>> {
    let Some((comps, name)) = op::split(path) else {
        return Ok(None);
    };
    match sys::walk(&roots.src, &comps) {
        Ok(d) => sys::lstat_at(d.as_raw_fd(), name),
        Err(e) if sys::is_gone(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A degraded rename side: make src's `path` hold dst's object `id` (recursively), or,
/// if dst no longer has that object there, hold nothing: at this point of the journal
/// the view has that object at `path`, so whatever src has there was replaced, and the
/// later object has its own later ops.
fn sync_or_clear(ctx: &Ctx, roots: &Roots, path: &Path, id: Option<Id>) -> io::Result<Outcome> {
    if sync_path(ctx, roots, path, id, true, true)? == Outcome::Applied {
        return Ok(Outcome::Applied);
    }
    if let Some((comps, name)) = op::split(path)
        && let Ok(sp) = sys::walk(&roots.src, &comps)
    {
        remove_tree(ctx, sp.as_raw_fd(), name)?;
    }
    Ok(Outcome::Applied)
}

/// rename(2) on src, replacing a target that cannot be replaced as is. `Ok(false)` if
/// the source vanished.
fn move_on_src(ctx: &Ctx, roots: &Roots, from: &Path, to: &Path) -> io::Result<bool> {
    let (Some((fc, fname)), Some((tc, tname))) = (op::split(from), op::split(to)) else {
        return Ok(false);
    };
    let fp = match sys::walk(&roots.src, &fc) {
        Ok(fd) => fd,
        Err(e) if sys::is_gone(&e) => return Ok(false),
        Err(e) => return Err(e),
    };
    let tp = ensure_src_parent(roots, &tc)?;
    let mut r = sys::rename_at(fp.as_raw_fd(), fname, tp.as_raw_fd(), tname, false);
    if let Err(e) = &r
        && matches!(
            e.raw_os_error(),
            Some(libc::ENOTEMPTY | libc::EEXIST | libc::EISDIR | libc::ENOTDIR)
        )
    {
        // src's target is not replaceable as is (a non-empty directory, or another
        // type): the view replaced it, so what src holds there is stale. EISDIR /
        // ENOTDIR can only come from the target here: both parents are open.
        remove_tree(ctx, tp.as_raw_fd(), tname)?;
        r = sys::rename_at(fp.as_raw_fd(), fname, tp.as_raw_fd(), tname, false);
    }
    match r {
        Ok(()) => {
            let _ = sys::fsync_dir(tp.as_raw_fd());
            Ok(true)
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Rename on src as a rename (a directory is never copied when src has it). If src
/// lacks a side, that side is synced from dst or cleared ([`sync_or_clear`]).
/// `ids`: dst objects now at `from` (exchange only) and at `to`.
fn rename(
    ctx: &Ctx,
    roots: &Roots,
    from: &Path,
    to: &Path,
    exchange: bool,
    ids: [Option<Id>; 2],
) -> io::Result<Outcome> {
    if op::split(from).is_none() || op::split(to).is_none() {
        return Ok(Outcome::Skipped);
    }
    // Origin records at either name (or below) describe src entries this rename
    // replaces or moves away: an earlier replay may have synced a later incarnation
    // ahead of time, recording the version this rename now replaces, and that record
    // would take our own rename for somebody else's change (a false conflict). The
    // files are local until their next upload, as the core left them at the rename.
    // (Ops on related paths are ordered around this one: none records meanwhile.)
    if let Ok(store) = origin::Store::of_root(ctx.dst) {
        let _ = store.clear_tree(from);
        let _ = store.clear_tree(to);
    }
    if !exchange {
        if let Some(st) = src_stat(roots, from)? {
            // Noted first: a crash after the rename must still look again.
            ctx.leftovers.note(from, &st);
            if move_on_src(ctx, roots, from, to)? {
                let (fc, fname) = op::split(from).expect("checked");
                if let Ok(fp) = sys::walk(&roots.src, &fc) {
                    drop_whiteout(roots, &fc, fname, fp.as_raw_fd())?;
                }
                return Ok(Outcome::Applied);
            }
        }
        return sync_or_clear(ctx, roots, to, ids[1]);
    }
    match (src_has(roots, from)?, src_has(roots, to)?) {
        (true, true) => {
            let (fc, fname) = op::split(from).expect("checked");
            let (tc, tname) = op::split(to).expect("checked");
            let fp = sys::walk(&roots.src, &fc)?;
            let tp = sys::walk(&roots.src, &tc)?;
            match sys::rename_at(fp.as_raw_fd(), fname, tp.as_raw_fd(), tname, true) {
                Ok(()) => Ok(Outcome::Applied),
                Err(e) if sys::is_unsupported(&e) || e.raw_os_error() == Some(libc::ENOENT) => {
                    sync_or_clear(ctx, roots, from, ids[0])?;
                    sync_or_clear(ctx, roots, to, ids[1])
                }
                Err(e) => Err(e),
            }
        }
        (true, false) => {
            move_on_src(ctx, roots, from, to)?;
            sync_or_clear(ctx, roots, from, ids[0])
        }
        (false, true) => {
            move_on_src(ctx, roots, to, from)?;
            sync_or_clear(ctx, roots, to, ids[1])
        }
        (false, false) => {
            sync_or_clear(ctx, roots, from, ids[0])?;
            sync_or_clear(ctx, roots, to, ids[1])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflict_files_never_replace_each_other() {
        let d = tempfile::tempdir().unwrap();
        let dir = File::open(d.path()).unwrap();
        for v in ["first", "second", "third"] {
            std::fs::write(d.path().join("f"), v).unwrap();
            keep_conflicting_src_version(dir.as_raw_fd(), OsStr::new("f")).unwrap();
        }
        let mut kept: Vec<(String, String)> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let name = e.file_name().into_string().unwrap();
                (name, std::fs::read_to_string(e.path()).unwrap())
            })
            .collect();
        kept.sort_by(|a, b| a.1.cmp(&b.1));
        let contents: Vec<&str> = kept.iter().map(|k| k.1.as_str()).collect();
        assert_eq!(contents, ["first", "second", "third"], "{kept:?}");
        assert!(
            kept.iter().all(|k| k.0.starts_with("f.conflict-")),
            "{kept:?}"
        );
    }
}
