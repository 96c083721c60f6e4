//! Namespace ops on src: unlink/rmdir (whatever src has there goes), link, rename and
//! exchange (a side src lacks is synced from dst or cleared), and dropping a dst
//! whiteout that hides nothing on src any more.

use super::*;

/// Unlink or rmdir on src; already gone succeeds. Whatever src has there goes, whatever
/// its type and content: at this point of the journal the view has nothing at `path`,
/// so a directory still holding entries there holds only what the view hides (src-side
/// leftovers, our temp files, or a later incarnation of the path that an earlier
/// replay synced from dst ahead of time and that the later ops will sync again).
pub(super) fn remove(ctx: &Ctx, roots: &Roots, path: &Path, dir: bool) -> io::Result<Outcome> {
    let Some((comps, name)) = op::split(path) else {
        return Ok(Outcome::Skipped);
    };
    let sp = match at::walk(&roots.src, &comps) {
        Ok(fd) => fd,
        Err(e) if at::is_gone(&e) => return Ok(Outcome::Skipped),
        Err(e) => return Err(e),
    };
    let sd = sp.as_fd();
    let Some(st) = at::lstat_at(sd, name)? else {
        return Ok(Outcome::Skipped);
    };
    let is_dir = at::file_type(&st) == libc::S_IFDIR;
    if !is_dir {
        // Noted before the unlink, which then cannot run without it; the list reaches
        // disk within a second (a crash in between loses the check: a possible
        // leftover, never data; see `leftovers`).
        ctx.leftovers.note(path, &st);
    }
    if is_dir != dir {
        log::debug!("writeback: {path:?} on src is not what was removed; removing it anyway");
    }
    if is_dir {
        match at::unlink_at(sd, name, true) {
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
pub(super) fn drop_whiteout(
    roots: &Roots,
    comps: &[&OsStr],
    name: &OsStr,
    sd: BorrowedFd<'_>,
) -> io::Result<()> {
    if at::lstat_at(sd, name)?.is_some() {
        return Ok(());
    }
    let dd = match at::walk(&roots.dst, comps) {
        Ok(fd) => fd,
        Err(e) if at::is_gone(&e) => return Ok(()),
        Err(e) => return Err(e),
    };
    if at::lstat_at(dd.as_fd(), name)?.is_some() {
        return Ok(());
    }
    // Only a whiteout that hides `name` (a hashed one holding another name is that
    // name's).
    match at::whited_out(dd.as_fd(), name) {
        Ok(true) => {}
        Ok(false) => return Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENAMETOOLONG) => return Ok(()),
        Err(e) => return Err(e),
    }
    match at::unlink_at(dd.as_fd(), &names::whiteout_name(name), false) {
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

pub(super) fn link(
    ctx: &Ctx,
    roots: &Roots,
    existing: &Path,
    new: &Path,
    id: Option<Id>,
) -> io::Result<Outcome> {
    let (Some((ec, en)), Some((nc, nn))) = (op::split(existing), op::split(new)) else {
        return Ok(Outcome::Skipped);
    };
    // Linked on src even when dst no longer has `new`: every way the view lost it is a
    // later op on `new` (a rename moves the link on src, an unlink removes it), and a
    // rename whose source src lacks copies the file instead, which would split the
    // link (a name linked, then renamed over another, before this op ran).
    if ctx.caps()?.hard_links
        && let Ok(ep) = at::walk(&roots.src, &ec)
        && let Some(est) = at::lstat_at(ep.as_fd(), en)?
        && at::file_type(&est) != libc::S_IFDIR
    {
        let np = ensure_src_parent(roots, &nc)?;
        match at::link_at(ep.as_fd(), en, np.as_fd(), nn) {
            Ok(()) => return Ok(Outcome::Applied),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                let same = at::lstat_at(np.as_fd(), nn)?
                    .is_some_and(|s| s.st_ino == est.st_ino && s.st_dev == est.st_dev);
                if same {
                    return Ok(Outcome::Skipped);
                }
                // The view had nothing at `new` before the link: what src has there is
                // stale, or dst's file synced there ahead of this op (the recursive
                // sync of a parent) as a copy. The link replaces it (refused: copy).
                let tmp = ctx.temp_name_in(np.as_fd());
                let linked = make_temp(np.as_fd(), &tmp, || {
                    at::link_at(ep.as_fd(), en, np.as_fd(), &tmp)
                });
                if linked.is_ok() {
                    let mut g = TempGuard {
                        dir: np.as_fd(),
                        name: &tmp,
                        armed: true,
                    };
                    let mut r = at::rename_at(np.as_fd(), &tmp, np.as_fd(), nn, false);
                    if let Err(e) = &r
                        && e.raw_os_error() == Some(libc::EISDIR)
                    {
                        remove_tree(ctx, np.as_fd(), nn)?;
                        r = at::rename_at(np.as_fd(), &tmp, np.as_fd(), nn, false);
                    }
                    r?;
                    g.armed = false;
                    return Ok(Outcome::Applied);
                }
            }
            Err(_) => {} // refused here: copy instead
        }
    }
    // A copy needs dst's file at `new`: if it is gone, a later op covers it.
    match at::walk(&roots.dst, &nc) {
        Ok(d) if at::lstat_at(d.as_fd(), nn)?.is_some() => {}
        Ok(_) => return Ok(Outcome::Skipped),
        Err(e) if at::is_gone(&e) => return Ok(Outcome::Skipped),
        Err(e) => return Err(e),
    }
    let copied = sync_path(ctx, roots, new, id, true, false)?;
    // src lacks `existing`: its create was skipped, the view having moved the file on
    // by then (the rename's follow-ups carry it to its later name). At this point of
    // the journal the view has the file at both names, so src gets the copy at both:
    // the later renames of `existing` then move a link, where finding no source on src
    // they would copy the file again (a split link).
    if copied == Outcome::Applied && ctx.caps()?.hard_links && !src_has(roots, existing)? {
        let ep = ensure_src_parent(roots, &ec)?;
        let np = at::walk(&roots.src, &nc)?;
        if let Err(e) = at::link_at(np.as_fd(), nn, ep.as_fd(), en) {
            // (Nothing at `new`: kept in dst only; or refused here.) `existing` stays
            // as before: its later ops sync it.
            log::debug!("writeback: cannot link {new:?} back to {existing:?} on src: {e}");
        }
    }
    Ok(copied)
}

/// True if src has an entry at `path` (no symlink followed on the way).
pub(super) fn src_has(roots: &Roots, path: &Path) -> io::Result<bool> {
    if op::split(path).is_none() {
        return Ok(true);
    }
    Ok(src_stat(roots, path)?.is_some())
}

/// src's entry at `path`, if any (no symlink followed on the way).
pub(super) fn src_stat(roots: &Roots, path: &Path) -> io::Result<Option<Stat>> {
    let Some((comps, name)) = op::split(path) else {
        return Ok(None);
    };
    match at::walk(&roots.src, &comps) {
        Ok(d) => at::lstat_at(d.as_fd(), name),
        Err(e) if at::is_gone(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A degraded rename side: make src's `path` hold dst's object `id` (recursively), or,
/// if dst no longer has that object there, hold nothing: at this point of the journal
/// the view has that object at `path`, so whatever src has there was replaced, and the
/// later object has its own later ops.
pub(super) fn sync_or_clear(
    ctx: &Ctx,
    roots: &Roots,
    path: &Path,
    id: Option<Id>,
) -> io::Result<Outcome> {
    if sync_path(ctx, roots, path, id, true, true)? == Outcome::Applied {
        return Ok(Outcome::Applied);
    }
    if let Some((comps, name)) = op::split(path)
        && let Ok(sp) = at::walk(&roots.src, &comps)
    {
        remove_tree(ctx, sp.as_fd(), name)?;
    }
    Ok(Outcome::Applied)
}

/// rename(2) on src, replacing a target that cannot be replaced as is. `Ok(false)` if
/// the source vanished.
pub(super) fn move_on_src(ctx: &Ctx, roots: &Roots, from: &Path, to: &Path) -> io::Result<bool> {
    let (Some((fc, fname)), Some((tc, tname))) = (op::split(from), op::split(to)) else {
        return Ok(false);
    };
    let fp = match at::walk(&roots.src, &fc) {
        Ok(fd) => fd,
        Err(e) if at::is_gone(&e) => return Ok(false),
        Err(e) => return Err(e),
    };
    let tp = ensure_src_parent(roots, &tc)?;
    let mut r = at::rename_at(fp.as_fd(), fname, tp.as_fd(), tname, false);
    if let Err(e) = &r
        && matches!(
            e.raw_os_error(),
            Some(libc::ENOTEMPTY | libc::EEXIST | libc::EISDIR | libc::ENOTDIR)
        )
    {
        // src's target is not replaceable as is (a non-empty directory, or another
        // type): the view replaced it, so what src holds there is stale. EISDIR /
        // ENOTDIR can only come from the target here: both parents are open.
        remove_tree(ctx, tp.as_fd(), tname)?;
        r = at::rename_at(fp.as_fd(), fname, tp.as_fd(), tname, false);
    }
    match r {
        Ok(()) => {
            let _ = at::fsync_dir(tp.as_fd());
            Ok(true)
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Rename on src as a rename (a directory is never copied when src has it). If src
/// lacks a side, that side is synced from dst or cleared ([`sync_or_clear`]).
/// `ids`: dst objects now at `from` (exchange only) and at `to`.
pub(super) fn rename(
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
            // Noted before the rename, as for an unlink above.
            ctx.leftovers.note(from, &st);
            if move_on_src(ctx, roots, from, to)? {
                let (fc, fname) = op::split(from).expect("checked");
                if let Ok(fp) = at::walk(&roots.src, &fc) {
                    drop_whiteout(roots, &fc, fname, fp.as_fd())?;
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
            let fp = at::walk(&roots.src, &fc)?;
            let tp = at::walk(&roots.src, &tc)?;
            match at::rename_at(fp.as_fd(), fname, tp.as_fd(), tname, true) {
                Ok(()) => Ok(Outcome::Applied),
                Err(e) if at::is_unsupported(&e) || e.raw_os_error() == Some(libc::ENOENT) => {
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
