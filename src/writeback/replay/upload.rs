//! Uploading a regular file: temp file in src's directory, data, metadata, fsync,
//! rename (or in-place rewrite of a multiply-linked file), the conflict check against
//! dst's origin record, and the record's update after the upload.

use super::*;

/// Copy dst's regular file `name` (under `dd`, at `rel` in dst) to src (under `sd`).
pub(super) fn copy_file(
    ctx: &Ctx,
    rel: &Path,
    dd: BorrowedFd<'_>,
    sd: BorrowedFd<'_>,
    name: &OsStr,
    src_st: Option<&Stat>,
) -> io::Result<()> {
    let mut df = at::open_read_at(dd, name)?;
    let st = at::fstat(df.as_fd())?;
    if at::file_type(&st) != libc::S_IFREG {
        // Replaced under us by something else: a later journaled op covers it.
        return Ok(());
    }
    let linked_in_place = st.st_nlink > 1
        && src_st.is_some_and(|s| at::file_type(s) == libc::S_IFREG && s.st_nlink > 1);
    if linked_in_place {
        let mut sf = at::open_write_at(sd, name)?;
        let (st, n) = copy_settled(ctx, &mut df, &mut sf, st)?;
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
        && at::file_type(s) == libc::S_IFREG
        && !o.same_source(s)
    {
        keep_conflicting_src_version(sd, name)?;
    }
    let tmp = ctx.temp_name_in(sd);
    let mut sf = make_temp(sd, &tmp, || at::create_excl_at(sd, &tmp, 0o600))?;
    let mut g = TempGuard {
        dir: sd,
        name: &tmp,
        armed: true,
    };
    let (st, _) = copy_settled(ctx, &mut df, &mut sf, st)?;
    finish_file(dd, name, &sf, sd, &tmp, &st)?;
    drop(sf);
    // src has no compare-and-swap: look again right before replacing, so that a version
    // another machine stored while this upload ran is kept, not overwritten. What is
    // left is the gap between this look and the rename, plus however stale src's own
    // view is (rclone's --dir-cache-time): docs/SEMANTICS.md.
    if fetched_from.is_some_and(|o| o.dirty)
        && let Some(now) = at::lstat_at(sd, name)?
        && at::file_type(&now) == libc::S_IFREG
        && src_st.is_none_or(|before| !same_version(before, &now))
    {
        keep_conflicting_src_version(sd, name)?;
    }
    at::rename_at(sd, &tmp, sd, name, false)?;
    g.armed = false;
    let _ = at::fsync_dir(sd);
    record_upload(ctx, rel, &df, &st, sd, name);
    Ok(())
}

/// Whether the mount has dst's file `name` (in `dir`) open for writing (the origin
/// store's writer guards: every open for writing through the mount takes one).
pub(super) fn open_for_writing(ctx: &Ctx, dir: BorrowedFd<'_>, name: &OsStr) -> bool {
    let Ok(id) = crate::sys::cstr(name).and_then(|c| layer::identity_at(dir, &c)) else {
        return false;
    };
    origin::Store::of_root(ctx.dst).is_ok_and(|s| s.open_for_writing(&id))
}

/// Whether two stats of src's file show the same version (as [`Origin::same_source`]).
pub(super) fn same_version(a: &Stat, b: &Stat) -> bool {
    Origin::of(a).same_source(b)
}

/// The origin record of dst's file open as `df` at `rel`, if it applies to that file.
pub(super) fn origin_of_open(ctx: &Ctx, rel: &Path, df: &File) -> Option<Origin> {
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
pub(super) fn refresh_record(
    ctx: &Ctx,
    rel: &Path,
    dd: BorrowedFd<'_>,
    sd: BorrowedFd<'_>,
    name: &OsStr,
    src_before: Option<&Stat>,
    dst_st: &Stat,
) {
    let Ok(df) = at::open_read_at(dd, name) else {
        return;
    };
    if let Some(old) = origin_of_open(ctx, rel, &df)
        && let Ok(Some(on_src)) = at::lstat_at(sd, name)
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
pub(super) fn keep_conflicting_src_version(sd: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let secs = crate::sys::clock::now_secs();
    // Never over an earlier conflict file (two conflicts within one second).
    let mut n = 1;
    let kept = loop {
        let mut kept = name.to_os_string();
        kept.push(format!(".conflict-{secs}"));
        if n > 1 {
            kept.push(format!("-{n}"));
        }
        if at::lstat_at(sd, &kept)?.is_none() {
            break kept;
        }
        n += 1;
    };
    at::rename_at(sd, name, sd, &kept, false)?;
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
pub(super) fn record_upload(
    ctx: &Ctx,
    rel: &Path,
    df: &File,
    before: &Stat,
    sd: BorrowedFd<'_>,
    name: &OsStr,
) {
    let Ok(store) = origin::Store::of_root(ctx.dst) else {
        return;
    };
    let Ok(id) = layer::identity_at(df.as_fd(), c"") else {
        return;
    };
    let unchanged = unchanged_since(df, before);
    if let Ok(Some(on_src)) = at::lstat_at(sd, name) {
        let mut record = Origin::of(&on_src);
        record.dirty = !unchanged;
        log::debug!(
            "writeback: {} uploaded as {} bytes, mtime {}.{:09}; src shows {} bytes, mtime {}.{:09}{}",
            rel.display(),
            before.st_size,
            before.st_mtime,
            before.st_mtime_nsec,
            on_src.st_size,
            on_src.st_mtime,
            on_src.st_mtime_nsec,
            if record.dirty {
                " (dst changed since: dirty)"
            } else {
                ""
            }
        );
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
pub(super) fn unchanged_since(df: &File, before: &Stat) -> bool {
    at::fstat(df.as_fd()).is_ok_and(|now| {
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
pub(super) fn finish_file(
    dd: BorrowedFd<'_>,
    dname: &OsStr,
    sf: &File,
    sd: BorrowedFd<'_>,
    sname: &OsStr,
    st: &Stat,
) -> io::Result<()> {
    let fd = sf.as_fd();
    tolerate(at::fchown(fd, st.st_uid, st.st_gid), true)?;
    tolerate(at::fchmod(fd, st.st_mode & 0o7777), false)?;
    copy_xattrs(dd, dname, sd, sname)?;
    at::futimes(fd, st)?;
    sf.sync_all()
}

/// How many times an upload copies a file that keeps changing under the copy before it
/// gives up on a settled copy (see [`copy_settled`]).
const SETTLE_ATTEMPTS: u32 = 5;

/// Copies dst's open file `df` (whose stat before the copy is `st`) into `to` from the
/// start, again while a write lands during the copy (FUSE passthrough writes bypass the
/// daemon), at most [`SETTLE_ATTEMPTS`] times. Returns the stat the copied bytes go with
/// and their length.
///
/// Why: a copy that read bytes written after `st` would give src the new bytes under the
/// old mtime, a version dst never had. The write's own op uploads again, but a src that
/// sees the same bytes twice may keep the first mtime (rclone 1.7x, back to back: seen
/// in 3 of 240 such pairs), and the next revalidation then takes src's file for changed
/// and refetches it. A file still changing after the last attempt is uploaded as copied,
/// under a dirty record (see [`record_upload`]): its pending write uploads it again.
fn copy_settled(ctx: &Ctx, df: &mut File, to: &mut File, st: Stat) -> io::Result<(Stat, u64)> {
    let mut st = st;
    let mut attempt = 1;
    loop {
        let n = copy_data(ctx, df, to)?;
        if attempt == SETTLE_ATTEMPTS || unchanged_since(df, &st) {
            return Ok((st, n));
        }
        attempt += 1;
        st = at::fstat(df.as_fd())?;
        log::debug!("writeback: dst changed during the copy; copying again (attempt {attempt})");
        io::Seek::rewind(df)?;
        io::Seek::rewind(to)?;
        to.set_len(0)?;
    }
}

pub(super) fn copy_data(ctx: &Ctx, from: &mut File, to: &mut File) -> io::Result<u64> {
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
