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
//! - A link is a link on src whenever src can hold one: from src's `existing`, or, when
//!   src lacks it (its create was skipped: the view had moved the file on), from the
//!   copy of dst's file at `new`, linked back to `existing`: at that point of the
//!   journal the view has the file at both names, and later renames of either name
//!   must move a link, not copy the file apart. Whatever src has at `new` is replaced
//!   (the view had nothing there before the link).
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
//! - Nothing follows a symlink: see [`super::at`].
//! - What src cannot hold (see `caps`) is not tried, or not retried: a symlink or special
//!   file on a src without them is kept in dst only (and whatever src had at that path
//!   is removed: the view replaced it); a hard link on a src without them is a copy; a
//!   mode, owner, mtime, user xattrs or ACLs src does not keep are left as src shows them.
//!   Each is noted in [`Ctx::notes`] (`unrep`: "not representable on src"), and the op
//!   succeeds.
//!
//! Pieces: this file (the context, `apply`, temp names, parents and metadata on src),
//! `sync` (path syncs), `upload` (regular files, conflicts, origin records),
//! `namespace` (unlink, rmdir, link, rename, whiteouts).

use crate::fs::layer;
use crate::fs::origin::{self, Origin};
use std::cell::Cell;
use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::at::{self, Id, Stat};
use super::caps::{Caps, SrcCaps};
use super::op;
use super::unrep::{self, Note};
use crate::fs::change::Op;
use crate::fs::names;
use std::cell::RefCell;

mod namespace;
mod sync;
mod upload;
use namespace::*;
use sync::*;
use upload::*;

/// What a replay did (for the `-log` line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Applied,
    /// Nothing to do (dst entry gone, or src already in that state).
    Skipped,
}

/// How long an upload waits while the mount has its file open for writing, counted
/// from the op's record. Why: the Create op is journaled at the create and would
/// upload the file as the application begins to write it; the close's op then uploads
/// it again. Waiting for the close gives src one upload of the finished file (no empty
/// or partial object in the bucket for other machines to see) instead of two back to
/// back (rclone, given one name replaced twice in quick succession, can keep the
/// first upload's mtime: the next revalidation then refetches). A file kept open
/// longer is uploaded anyway, as it is then: src never lags a long writer by more.
pub(crate) const OPEN_WRITER_DEFER: std::time::Duration = std::time::Duration::from_secs(10);
/// How often a deferred upload looks again (the close also coalesces into it).
pub(crate) const OPEN_WRITER_POLL: std::time::Duration = std::time::Duration::from_millis(200);

/// The error a replay returns to wait for the mount's writer to close the file.
#[derive(Debug)]
struct OpenForWriting;

impl std::fmt::Display for OpenForWriting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the file is open for writing through the mount")
    }
}

impl std::error::Error for OpenForWriting {}

pub(crate) fn deferred() -> io::Error {
    io::Error::other(OpenForWriting)
}

/// Whether `e` is [`deferred`]'s: the op waits, it did not fail.
pub(crate) fn is_deferred(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|r| r.is::<OpenForWriting>())
}

/// The two roots and the stop flag of one replay.
pub(crate) struct Ctx<'a> {
    /// src, as the view sees it (one gateway: an unmounted src is offline here too).
    pub(crate) src: &'a layer::Layer,
    pub(crate) dst: &'a Path,
    pub(crate) stop: &'a AtomicBool,
    /// `.cachefs-tmp.wb.<run>.<seq>.` (see [`super::journal::Runs`]).
    pub(crate) tmp_prefix: String,
    /// The same op's prefixes under earlier runs of this dst on this machine (empty
    /// for an op journaled by this run): their temp files are leftovers of a crash.
    pub(crate) reclaim_prefixes: Vec<String>,
    pub(crate) tmp_counter: Cell<u32>,
    /// What src can hold (probed once).
    pub(crate) caps: &'a Caps,
    /// Names this replay renamed away or deleted on src are noted here.
    pub(crate) leftovers: &'a super::leftovers::Leftovers,
    /// The op is a chmod/chown/utimens (`SetAttr`): src's mode, owner and mtime are
    /// compared with dst's.
    pub(crate) attrs_op: bool,
    /// What this replay found src cannot hold, per path synced (and, with nothing
    /// found, that a path is representable again).
    pub(crate) notes: RefCell<Vec<Note>>,
    /// The op may wait while the mount has its file open for writing (nobody waits
    /// for it, and it is younger than [`OPEN_WRITER_DEFER`]).
    pub(crate) may_defer: bool,
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
        dst: at::open_dst(ctx.dst)?,
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
        self.caps.get_or_probe(root.as_fd())
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
    fn temp_name_in(&self, dir: BorrowedFd<'_>) -> OsString {
        let n = self.tmp_counter.get();
        self.tmp_counter.set(n + 1);
        for old in &self.reclaim_prefixes {
            let _ = at::unlink_at(dir, OsStr::new(&format!("{old}{n}")), false);
        }
        OsString::from(format!("{}{n}", self.tmp_prefix))
    }
}

/// Create a temp entry with `make`; a leftover of ours with that name is replaced.
fn make_temp<T>(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    make: impl Fn() -> io::Result<T>,
) -> io::Result<T> {
    match make() {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            at::unlink_at(dir, name, false)?;
            make()
        }
        other => other,
    }
}

/// Removes a temp entry on drop unless disarmed.
struct TempGuard<'a> {
    dir: BorrowedFd<'a>,
    name: &'a OsStr,
    armed: bool,
}

impl Drop for TempGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = at::unlink_at(self.dir, self.name, false);
        }
    }
}

/// Ignore "not supported here" (and, for chown, "not permitted") from the src filesystem.
fn tolerate(r: io::Result<()>, chown: bool) -> io::Result<()> {
    match r {
        Err(e) if at::is_unsupported(&e) => Ok(()),
        Err(e) if chown && e.raw_os_error() == Some(libc::EPERM) => Ok(()),
        other => other,
    }
}

/// Make src's parent directory of `comps` exist; missing levels are created with dst's
/// attributes when dst has them, else as 0755 placeholders (a later journaled op renames
/// or removes them, since dst no longer has them).
fn ensure_src_parent(roots: &Roots, comps: &[&OsStr]) -> io::Result<OwnedFd> {
    let mut s = at::dup(roots.src.as_fd())?;
    let mut d = Some(at::dup(roots.dst.as_fd())?);
    for c in comps {
        let dst_st = match &d {
            Some(dfd) => at::lstat_at(dfd.as_fd(), c)?,
            None => None,
        };
        let dst_is_dir = dst_st.is_some_and(|st| at::file_type(&st) == libc::S_IFDIR);
        match at::open_dir_at(s.as_fd(), c) {
            Ok(next) => s = next,
            Err(e) if at::is_gone(&e) => {
                if e.raw_os_error() == Some(libc::ENOTDIR) {
                    // A non-directory (or symlink) where the view has a directory: stale.
                    at::unlink_at(s.as_fd(), c, false)?;
                }
                let created = match at::mkdir_at(s.as_fd(), c, 0o755) {
                    Ok(()) => true,
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => false,
                    Err(e) => return Err(e),
                };
                // (`dst_is_dir`: dst has the directory, so `d` and `dst_st` are set.)
                if created
                    && dst_is_dir
                    && let (Some(dfd), Some(st)) = (&d, &dst_st)
                {
                    set_meta(dfd.as_fd(), s.as_fd(), c, st)?;
                }
                s = at::open_dir_at(s.as_fd(), c)?;
            }
            Err(e) => return Err(e),
        }
        d = match (d, dst_is_dir) {
            (Some(dfd), true) => Some(at::open_dir_at(dfd.as_fd(), c)?),
            _ => None,
        };
    }
    Ok(s)
}

/// Copy owner, mode, user xattrs, ACLs and times of dst's `name` (under `dd`) to src's `name`
/// (under `sd`). `st` is dst's lstat.
fn set_meta(dd: BorrowedFd<'_>, sd: BorrowedFd<'_>, name: &OsStr, st: &Stat) -> io::Result<()> {
    set_meta_as(dd, name, sd, name, st)
}

/// [`set_meta`] from dst's `dname` onto src's `sname` (a temp name before its rename).
fn set_meta_as(
    dd: BorrowedFd<'_>,
    dname: &OsStr,
    sd: BorrowedFd<'_>,
    sname: &OsStr,
    st: &Stat,
) -> io::Result<()> {
    let is_link = at::file_type(st) == libc::S_IFLNK;
    tolerate(at::chown_at(sd, sname, st.st_uid, st.st_gid), true)?;
    if !is_link {
        tolerate(at::chmod_at(sd, sname, st.st_mode & 0o7777), false)?;
        copy_xattrs(dd, dname, sd, sname)?;
    }
    at::utimes_at(sd, sname, st)
}

/// Make src's user xattrs and POSIX ACLs of `sname` equal to dst's of `dname` (skipped
/// where unsupported). After the chmod: setting an access ACL sets the mode from it
/// (dst's, so the same), removing one leaves the mode.
fn copy_xattrs(
    dd: BorrowedFd<'_>,
    dname: &OsStr,
    sd: BorrowedFd<'_>,
    sname: &OsStr,
) -> io::Result<()> {
    let want = match at::list_synced_xattrs(dd, dname) {
        Ok(v) => v,
        Err(e) if at::is_unsupported(&e) => return Ok(()),
        Err(e) => return Err(e),
    };
    let have = match at::list_synced_xattrs(sd, sname) {
        Ok(v) => v,
        Err(e) if at::is_unsupported(&e) => return Ok(()),
        Err(e) => return Err(e),
    };
    for a in &have {
        if !want.contains(a) {
            tolerate(at::remove_xattr(sd, sname, a), false)?;
        }
    }
    for a in &want {
        let v = match at::get_xattr(dd, dname, a) {
            Ok(v) => v,
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => continue,
            Err(e) => return Err(e),
        };
        if have.contains(a) && at::get_xattr(sd, sname, a).ok().as_deref() == Some(&v[..]) {
            continue;
        }
        tolerate(at::set_xattr(sd, sname, a, &v), false)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one src gateway: replay's refusal of an unmounted src is the view's own
    /// (`Layer::root`, through `root_fd_checked`), not a check of replay's own.
    /// What a replay's [`Ctx`] borrows, for src `s` and dst `d`.
    struct Bed {
        dst: std::path::PathBuf,
        caps: Caps,
        leftovers: super::super::leftovers::Leftovers,
        stop: AtomicBool,
    }

    impl Bed {
        fn new(s: &Path, d: &Path) -> Bed {
            let runs = super::super::journal::Runs {
                current: "test".into(),
                reclaim: Vec::new(),
            };
            Bed {
                dst: d.to_path_buf(),
                caps: Caps::new(&runs, s, d),
                leftovers: super::super::leftovers::Leftovers::open(d, Default::default()),
                stop: AtomicBool::new(false),
            }
        }

        /// One replay's context over `src` (never deferred).
        fn ctx<'a>(&'a self, src: &'a layer::Layer) -> Ctx<'a> {
            Ctx {
                src,
                dst: &self.dst,
                stop: &self.stop,
                tmp_prefix: format!("{}wb.test.1.", names::TEMP_PREFIX),
                reclaim_prefixes: Vec::new(),
                tmp_counter: Cell::new(0),
                caps: &self.caps,
                leftovers: &self.leftovers,
                attrs_op: false,
                notes: RefCell::new(Vec::new()),
                may_defer: false,
            }
        }
    }

    #[test]
    fn replay_refuses_an_unmounted_src_through_the_views_layer() {
        let s = tempfile::tempdir().unwrap();
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), b"data").unwrap();
        let bed = Bed::new(s.path(), d.path());
        let replay_write = |src: &layer::Layer| {
            apply(
                &bed.ctx(src),
                &Op::Write { path: "f".into() },
                &[None, None],
            )
        };

        // src was a mount when cachefs last ran and is a bare directory now: the one
        // layer the view and replay share has no root (`src_state::open_src`).
        let unmounted = layer::Layer::open_src(s.path(), true).unwrap();
        let view = unmounted.stat(Path::new("f")).unwrap_err();
        assert_eq!(view.raw_os_error(), Some(libc::ENOTCONN), "{view}");
        let replay = replay_write(&unmounted).unwrap_err();
        assert_eq!(replay.raw_os_error(), Some(libc::ENOTCONN), "{replay}");
        assert!(crate::fs::is_outage(&replay), "an outage: the op waits");
        assert_eq!(
            std::fs::read_dir(s.path()).unwrap().count(),
            0,
            "nothing reached the bare directory"
        );

        // Control: the same replay through a layer with a root uploads.
        let plain = layer::Layer::open_src(s.path(), false).unwrap();
        assert_eq!(replay_write(&plain).unwrap(), Outcome::Applied);
        assert_eq!(std::fs::read(s.path().join("f")).unwrap(), b"data");
    }

    /// A file appended to while its upload copies it (FUSE passthrough writes bypass the
    /// daemon): src must end with a version dst really had, bytes and mtime of one
    /// moment, never the later bytes under the mtime from before the copy.
    #[test]
    fn an_upload_never_pairs_later_bytes_with_an_earlier_mtime() {
        use std::io::Write;
        use std::os::unix::fs::MetadataExt;
        let s = tempfile::tempdir().unwrap();
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, vec![7u8; 64 << 20]).unwrap();
        let bed = Bed::new(s.path(), d.path());
        let src = layer::Layer::open_src(s.path(), false).unwrap();
        let ctx = bed.ctx(&src);
        let version = |m: &std::fs::Metadata| (m.size(), m.mtime(), m.mtime_nsec());
        let mut had = vec![version(&std::fs::metadata(&f).unwrap())];
        let started = std::sync::Barrier::new(2);
        let appended = std::thread::scope(|scope| {
            let writer = scope.spawn(|| {
                let mut w = std::fs::OpenOptions::new().append(true).open(&f).unwrap();
                let mut seen = Vec::new();
                started.wait();
                for i in 0..10u8 {
                    w.write_all(&[i; 4096]).unwrap();
                    seen.push(version(&w.metadata().unwrap()));
                    std::thread::sleep(std::time::Duration::from_millis(3));
                }
                seen
            });
            started.wait();
            let applied = apply(&ctx, &Op::Write { path: "f".into() }, &[None, None]);
            assert_eq!(applied.unwrap(), Outcome::Applied);
            writer.join().unwrap()
        });
        had.extend(appended);
        let on_src = version(&std::fs::metadata(s.path().join("f")).unwrap());
        assert!(
            had.contains(&on_src),
            "src has {on_src:?}, a version dst never had (it had {had:?})"
        );
        let (dst_bytes, src_bytes) = (
            std::fs::read(&f).unwrap(),
            std::fs::read(s.path().join("f")).unwrap(),
        );
        assert!(dst_bytes.starts_with(&src_bytes), "src's bytes are dst's");
    }

    #[test]
    fn conflict_files_never_replace_each_other() {
        let d = tempfile::tempdir().unwrap();
        let dir = File::open(d.path()).unwrap();
        for v in ["first", "second", "third"] {
            std::fs::write(d.path().join("f"), v).unwrap();
            keep_conflicting_src_version(dir.as_fd(), OsStr::new("f")).unwrap();
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

    /// Panics unless `a` and `b` are one file (hard links) in src `root`, as in the view.
    fn assert_one_file_on_src(root: &Path, a: &str, b: &str) {
        use std::os::unix::fs::MetadataExt;
        let ino = |p: &str| std::fs::metadata(root.join(p)).unwrap().ino();
        assert_eq!(
            ino(a),
            ino(b),
            "{a} and {b} are one file on src, as in the view"
        );
    }

    /// A link replayed after the view renamed its new name over another file: src must
    /// end with the two names linked, as the view has them (the link was once skipped
    /// because dst no longer had the new name, and the rename, finding no source on
    /// src, copied the file: two independent files).
    #[test]
    fn a_link_renamed_over_another_name_stays_a_link_on_src() {
        let s = tempfile::tempdir().unwrap();
        let d = tempfile::tempdir().unwrap();
        std::fs::write(s.path().join("x"), b"linked").unwrap();
        std::fs::write(s.path().join("c"), b"old c").unwrap();
        // The view: link x -> b, then rename b -> c (c replaced).
        std::fs::write(d.path().join("x"), b"linked").unwrap();
        std::fs::hard_link(d.path().join("x"), d.path().join("c")).unwrap();
        let bed = Bed::new(s.path(), d.path());
        let src = layer::Layer::open_src(s.path(), false).unwrap();
        let ctx = bed.ctx(&src);
        let id = at::identity_path(&d.path().join("c"));
        let link = Op::Link {
            existing: "x".into(),
            new: "b".into(),
        };
        let rename = Op::Rename {
            from: "b".into(),
            to: "c".into(),
            exchange: false,
        };
        apply(&ctx, &link, &[None, id]).unwrap();
        apply(&ctx, &rename, &[None, id]).unwrap();
        assert_one_file_on_src(s.path(), "x", "c");
        assert!(!s.path().join("b").exists());
        assert_eq!(std::fs::read(s.path().join("c")).unwrap(), b"linked");
    }

    /// A link whose existing name src never got: the file's create was skipped because
    /// the view had moved it on by then, and the view renamed that name twice after the
    /// link (convergence seed 11: `link n1/a -> n1/c/c`, `rename n1/a -> n1/c/a`,
    /// `rename n1/c/a -> a`). src must end with the two names linked, as the view has
    /// them (the link once copied the file to its new name only, and the renames,
    /// finding no source on src, copied it again: two independent files).
    #[test]
    fn a_link_from_a_name_src_never_got_stays_a_link_on_src() {
        let s = tempfile::tempdir().unwrap();
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(s.path().join("n1/c")).unwrap();
        // The view now: the file at a and n1/c/c.
        std::fs::create_dir_all(d.path().join("n1/c")).unwrap();
        std::fs::write(d.path().join("a"), b"linked").unwrap();
        std::fs::hard_link(d.path().join("a"), d.path().join("n1/c/c")).unwrap();
        let bed = Bed::new(s.path(), d.path());
        let src = layer::Layer::open_src(s.path(), false).unwrap();
        let ctx = bed.ctx(&src);
        let id = at::identity_path(&d.path().join("a"));
        let rename = |from: &str, to: &str| Op::Rename {
            from: from.into(),
            to: to.into(),
            exchange: false,
        };
        let create = |path: &str| Op::Create { path: path.into() };
        let ops = [
            (create("n1/a"), [id, None]),
            (
                Op::Link {
                    existing: "n1/a".into(),
                    new: "n1/c/c".into(),
                },
                [None, id],
            ),
            (rename("n1/a", "n1/c/a"), [None, id]),
            (create("n1/c/a"), [id, None]),
            (rename("n1/c/a", "a"), [None, id]),
            (create("a"), [id, None]),
        ];
        for (op, ids) in &ops {
            apply(&ctx, op, ids).unwrap();
        }
        assert_one_file_on_src(s.path(), "a", "n1/c/c");
        assert!(!s.path().join("n1/a").exists());
        assert!(!s.path().join("n1/c/a").exists());
        assert_eq!(std::fs::read(s.path().join("a")).unwrap(), b"linked");
    }

    /// A link whose new name src already has as another file: the recursive sync of a
    /// parent directory (a rename's follow-up) copied dst's file there ahead of the link
    /// (convergence seed 7011: `rename dir d1 -> emptydir/x y/b/n1/x y`, then `link n1
    /// -> emptydir/x y/b/n1/x y/b/a/c`, the sync of `.../b/a` replayed after both). The
    /// view had nothing at the new name before the link, so src must end with the link
    /// there (the link once fell back to copying over the early copy: two files).
    #[test]
    fn a_link_over_an_early_copy_of_its_new_name_is_a_link_on_src() {
        let s = tempfile::tempdir().unwrap();
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(s.path().join("a")).unwrap();
        std::fs::write(s.path().join("n1"), b"linked").unwrap();
        std::fs::write(s.path().join("a/c"), b"linked").unwrap();
        std::fs::create_dir(d.path().join("a")).unwrap();
        std::fs::write(d.path().join("n1"), b"linked").unwrap();
        std::fs::hard_link(d.path().join("n1"), d.path().join("a/c")).unwrap();
        let bed = Bed::new(s.path(), d.path());
        let src = layer::Layer::open_src(s.path(), false).unwrap();
        let ctx = bed.ctx(&src);
        let id = at::identity_path(&d.path().join("a/c"));
        let link = Op::Link {
            existing: "n1".into(),
            new: "a/c".into(),
        };
        assert_eq!(apply(&ctx, &link, &[None, id]).unwrap(), Outcome::Applied);
        assert_one_file_on_src(s.path(), "n1", "a/c");
        assert_eq!(std::fs::read(s.path().join("a/c")).unwrap(), b"linked");
        assert_eq!(
            std::fs::read_dir(s.path().join("a")).unwrap().count(),
            1,
            "no temp file left"
        );
    }
}
