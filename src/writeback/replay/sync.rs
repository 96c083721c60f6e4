//! Path syncs: making src's entry at a path (and, recursively, below it) what dst
//! holds there now, with its metadata; dst's whiteouts and opaque markers are applied
//! by a recursive sync only; what src cannot hold stays in dst and is noted.

use super::*;

/// Sync one mount-relative path from dst to src. `content`: rewrite file bytes even if
/// src has a file there; `recursive`: also sync a directory's children (and apply dst's
/// whiteouts and opaque marker).
///
/// `expect`: the dst object the op was recorded for; if dst now holds another object at
/// `path` (deleted and recreated, or renamed away and replaced), nothing is done: that
/// later object has its own later ops, and materialising it now, before the ops recorded
/// in between (renames of the old object, say), could leave it where the view never has it.
pub(super) fn sync_path(
    ctx: &Ctx,
    roots: &Roots,
    path: &Path,
    expect: Option<Id>,
    content: bool,
    recursive: bool,
) -> io::Result<Outcome> {
    let Some((comps, name)) = op::split(path) else {
        // The root itself: metadata (and children if recursive).
        let st = at::fstat(roots.dst.as_fd())?;
        let dot = OsStr::new(".");
        if recursive {
            sync_children(
                ctx,
                Path::new(""),
                roots.dst.as_fd(),
                roots.src.as_fd(),
                dot,
            )?;
        }
        set_meta(roots.dst.as_fd(), roots.src.as_fd(), dot, &st)?;
        return Ok(Outcome::Applied);
    };
    let dparent = match at::walk(&roots.dst, &comps) {
        Ok(fd) => fd,
        Err(e) if at::is_gone(&e) => return reclaim(ctx, roots, &comps),
        Err(e) => return Err(e),
    };
    let Some(dst_st) = at::lstat_at(dparent.as_fd(), name)? else {
        if recursive
            && at::whited_out(dparent.as_fd(), name)?
            && let Ok(sp) = at::walk(&roots.src, &comps)
        {
            remove_tree(ctx, sp.as_fd(), name)?;
            return Ok(Outcome::Applied);
        }
        return reclaim(ctx, roots, &comps);
    };
    if let Some(want) = expect
        && at::identity_at(dparent.as_fd(), name)? != Some(want)
    {
        return reclaim(ctx, roots, &comps);
    }
    // Before any src call: a deferred op looks again every few hundred ms.
    if content
        && ctx.may_defer
        && at::file_type(&dst_st) == libc::S_IFREG
        && upload::open_for_writing(ctx, dparent.as_fd(), name)
    {
        return Err(deferred());
    }
    let sparent = ensure_src_parent(roots, &comps)?;
    let dir: PathBuf = comps.iter().collect();
    sync_entry(
        ctx,
        &dir,
        dparent.as_fd(),
        sparent.as_fd(),
        name,
        &dst_st,
        content,
        recursive,
    )?;
    Ok(Outcome::Applied)
}

/// A skipped sync: an earlier run of this op may have died between creating its temp
/// file and renaming it (a crash mid-upload); its name is known, reclaim it.
pub(super) fn reclaim(ctx: &Ctx, roots: &Roots, comps: &[&OsStr]) -> io::Result<Outcome> {
    if let Ok(sp) = at::walk(&roots.src, comps) {
        let name = ctx.temp_name_in(sp.as_fd());
        let _ = at::unlink_at(sp.as_fd(), &name, false);
    }
    Ok(Outcome::Skipped)
}

/// `dir`: the dst-relative path of `dd` (names the origin records).
#[allow(clippy::too_many_arguments)]
pub(super) fn sync_entry(
    ctx: &Ctx,
    dir: &Path,
    dd: BorrowedFd<'_>,
    sd: BorrowedFd<'_>,
    name: &OsStr,
    dst_st: &Stat,
    content: bool,
    recursive: bool,
) -> io::Result<()> {
    if ctx.stop.load(Ordering::Relaxed) {
        return Err(interrupted());
    }
    let src_st = at::lstat_at(sd, name)?;
    let ftype = at::file_type(dst_st);
    let src_type = src_st.map(|s| at::file_type(&s));
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
                None => at::mkdir_at(sd, name, 0o700)?,
                Some(libc::S_IFDIR) => {}
                Some(_) => {
                    at::unlink_at(sd, name, false)?;
                    at::mkdir_at(sd, name, 0o700)?;
                }
            }
            if recursive {
                sync_children(ctx, dir, dd, sd, name)?;
            }
            set_meta(dd, sd, name, dst_st)?;
            note_meta(ctx, &dir.join(name), dd, sd, name, dst_st)
        }
        libc::S_IFLNK => {
            let target = at::readlink_keeping_atime(dd, name)?;
            if src_type == Some(libc::S_IFLNK) && at::readlink_at(sd, name)? == target {
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
            make_temp(sd, &tmp, || at::symlink_at(&target, sd, &tmp))?;
            let mut g = TempGuard {
                dir: sd,
                name: &tmp,
                armed: true,
            };
            set_meta_as(dd, name, sd, &tmp, dst_st)?;
            at::rename_at(sd, &tmp, sd, name, false)?;
            g.armed = false;
            ctx.note(dir.join(name), unrep::ALL, 0, String::new());
            Ok(())
        }
        _ => {
            let same =
                src_st.is_some_and(|s| at::file_type(&s) == ftype && (s.st_rdev == dst_st.st_rdev));
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
                at::mknod_at(sd, &tmp, ftype | 0o600, dst_st.st_rdev)
            })?;
            let mut g = TempGuard {
                dir: sd,
                name: &tmp,
                armed: true,
            };
            set_meta_as(dd, name, sd, &tmp, dst_st)?;
            at::rename_at(sd, &tmp, sd, name, false)?;
            g.armed = false;
            ctx.note(dir.join(name), unrep::ALL, 0, String::new());
            Ok(())
        }
    }
}

/// dst's `rel` (a symlink or special file) is something src cannot hold: it stays in
/// dst only. Whatever src still has at that name is stale (the view replaced it; had
/// src been able to hold the new entry, it would have replaced it too), so it goes.
pub(super) fn keep_in_dst_only(
    ctx: &Ctx,
    rel: &Path,
    sd: BorrowedFd<'_>,
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
pub(super) fn mode_loss_matters(d: u32, s: u32) -> bool {
    (s & !d & 0o044) != 0 || (d & !s & 0o7111) != 0
}

/// After a regular file or directory was synced: note what of dst's metadata src does
/// not show (see `unrep`). Mode: when the loss matters, or after a chmod/chown/utimens
/// whatever the difference; owner and mtime: after a chmod/chown/utimens only (every
/// file rclone shows has its `--uid`/`--gid`). User xattrs and hard links: always.
pub(super) fn note_meta(
    ctx: &Ctx,
    rel: &Path,
    dd: BorrowedFd<'_>,
    sd: BorrowedFd<'_>,
    name: &OsStr,
    dst_st: &Stat,
) -> io::Result<()> {
    let Some(s) = at::lstat_at(sd, name)? else {
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
    let want = at::list_synced_xattrs(dd, name).unwrap_or_default();
    if !want.is_empty() {
        let missing: Vec<&Vec<u8>> = match at::list_synced_xattrs(sd, name) {
            Ok(have) => want.iter().filter(|a| !have.contains(a)).collect(),
            Err(_) => want.iter().collect(),
        };
        let acls = missing.iter().filter(|a| at::is_acl(a)).count();
        for (n, what) in [(missing.len() - acls, "user xattrs"), (acls, "POSIX ACLs")] {
            if n > 0 {
                found |= unrep::XATTRS;
                detail.push(format!("{n} {what}"));
            }
        }
    }
    if at::file_type(dst_st) == libc::S_IFREG {
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
pub(super) fn sync_children(
    ctx: &Ctx,
    dir: &Path,
    dd: BorrowedFd<'_>,
    sd: BorrowedFd<'_>,
    name: &OsStr,
) -> io::Result<()> {
    let here = if name == "." {
        dir.to_path_buf()
    } else {
        dir.join(name)
    };
    let (dchild, schild) = if name == "." {
        (at::dup(dd)?, at::dup(sd)?)
    } else {
        (at::open_dir_at(dd, name)?, at::open_dir_at(sd, name)?)
    };
    let (dc, sc) = (dchild.as_fd(), schild.as_fd());
    let entries = at::list_dir(dc, OsStr::new("."))?;
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
        if let Some(st) = at::lstat_at(dc, n)? {
            sync_entry(ctx, &here, dc, sc, n, &st, true, true)?;
        }
    }
    for t in whiteouts {
        if !seen.contains(&t) && !names::is_reserved(&t) {
            remove_tree(ctx, sc, &t)?;
        }
    }
    if opaque {
        for n in at::list_dir(sc, OsStr::new("."))? {
            if !seen.contains(&n) && !names::is_reserved(&n) {
                remove_tree(ctx, sc, &n)?;
            }
        }
    }
    Ok(())
}

/// Remove `name` under `dir` on src, recursively; already gone is fine.
pub(super) fn remove_tree(ctx: &Ctx, dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    if ctx.stop.load(Ordering::Relaxed) {
        return Err(interrupted());
    }
    let Some(st) = at::lstat_at(dir, name)? else {
        return Ok(());
    };
    if at::file_type(&st) == libc::S_IFDIR {
        let sub = at::open_dir_at(dir, name)?;
        for n in at::list_dir(sub.as_fd(), OsStr::new("."))? {
            remove_tree(ctx, sub.as_fd(), &n)?;
        }
    }
    match at::unlink_at(dir, name, at::file_type(&st) == libc::S_IFDIR) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}
