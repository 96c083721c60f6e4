//! The view's building blocks: from an inode to its mount path, from a mount path to
//! the layer that holds it ([`CacheFs::find`]: dst wins; src only when the parent
//! merges src and no whiteout, GoCacheFS root whiteout or opaque marker hides it), and
//! the whiteouts and opaque markers that record what dst hides of src. Invariants:
//! `merge_src` is recomputed at each `find`; a reserved name is never created
//! ([`check_name`]: EPERM) nor looked up (ENOENT). `inodes` is taken for table updates
//! only, never across I/O.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::attr::{Attr, attr_of};
use super::layer::{Probe, Stat};
use super::{CacheFs, FsError, FsResult, Kind, copyup, layer, names};

/// Which layer an entry was found in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Layered {
    Dst,
    Src,
}

/// An entry of the view: where it is and its stat.
pub(super) struct Found {
    pub(super) layer: Layered,
    pub(super) st: Stat,
    pub(super) merge_src: bool,
}

pub(super) fn ident(st: &Stat) -> (u64, u64) {
    (st.st_dev, st.st_ino)
}

pub(super) fn is_dir(st: &Stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

pub(super) fn denied<T>(errno: i32) -> FsResult<T> {
    Err(FsError::Errno(errno))
}

pub(super) fn check_name(name: &OsStr) -> FsResult<()> {
    if names::is_reserved(name) {
        return denied(libc::EPERM);
    }
    if name.len() > 255 {
        return denied(libc::ENAMETOOLONG);
    }
    Ok(())
}

impl CacheFs {
    pub(super) fn load_legacy_whiteouts(&self) -> FsResult<()> {
        let mut set = self.legacy_whiteouts.lock().unwrap();
        for e in self.dst.read_dir(Path::new(""))? {
            if let Some(p) = names::gocachefs_whiteout_target(&e.name) {
                set.insert(PathBuf::from(p));
            }
        }
        if !set.is_empty() {
            log::info!("honouring {} GoCacheFS whiteout(s) in dst", set.len());
        }
        Ok(())
    }

    pub(super) fn node_path(&self, ino: u64) -> FsResult<(PathBuf, Kind, bool)> {
        let t = self.inodes.lock().unwrap();
        let node = t.get(ino).ok_or(FsError::Stale)?;
        let (kind, merge_src) = (node.kind, node.merge_src);
        let path = t.path(ino).ok_or_else(FsError::not_found)?;
        Ok((path, kind, merge_src))
    }

    pub(super) fn dir_path(&self, ino: u64) -> FsResult<(PathBuf, bool)> {
        let (p, kind, merge) = self.node_path(ino)?;
        if kind != Kind::Dir {
            return denied(libc::ENOTDIR);
        }
        Ok((p, merge))
    }

    pub(super) fn whiteout_path(path: &Path) -> PathBuf {
        let name = path.file_name().unwrap_or_default();
        path.with_file_name(names::whiteout_name(name))
    }

    pub(super) fn is_opaque(&self, dst_dir: &Path) -> FsResult<bool> {
        Ok(self
            .dst
            .stat(&dst_dir.join(names::OPAQUE_MARKER))?
            .is_some())
    }

    /// Whether src's entry at `path` (in a merging parent) is hidden by a whiteout.
    pub(super) fn whited_out(&self, path: &Path) -> FsResult<bool> {
        let wh = Self::whiteout_path(path);
        if self.dst.stat(&wh)?.is_some() {
            let hashed = names::is_hashed_whiteout(wh.file_name().unwrap_or_default());
            if !hashed || self.hashed_whiteout_target(&wh)?.as_deref() == path.file_name() {
                return Ok(true);
            }
        }
        let legacy = self.legacy_whiteouts.lock().unwrap();
        Ok(!legacy.is_empty() && path.ancestors().any(|a| legacy.contains(a)))
    }

    /// Resolves `path` in the view, given whether its parent merges src.
    pub(super) fn find(&self, path: &Path, parent_merges: bool) -> FsResult<Option<Found>> {
        if let Some(st) = self.dst.stat(path)? {
            let merge_src = is_dir(&st) && parent_merges && !self.is_opaque(path)?;
            return Ok(Some(Found {
                layer: Layered::Dst,
                st,
                merge_src,
            }));
        }
        if !parent_merges || self.src_absent.covers(path) || self.whited_out(path)? {
            return Ok(None);
        }
        if let Some(st) = self.src_ahead.take(path) {
            return Ok(Some(Found {
                layer: Layered::Src,
                st,
                merge_src: true,
            }));
        }
        if let Some(batch) = self.src_ahead.batch_for(path) {
            return self.find_in_src_batch(path, batch);
        }
        let probe = path.to_path_buf();
        match self.src_do(crate::metrics::SrcOp::Stat, path, move |s| s.probe(&probe))? {
            Probe::Found(st) => Ok(Some(Found {
                layer: Layered::Src,
                st,
                merge_src: true,
            })),
            Probe::NoName => {
                self.src_absent.note(path);
                Ok(None)
            }
            Probe::NoParent => {
                self.src_absent.note(path.parent().unwrap_or(path));
                Ok(None)
            }
        }
    }

    /// `find` of src's `path` by asking src about `batch` (`path`'s name and the names
    /// after it in the listing) in one job; the answers for the other names are kept
    /// for their lookups (see `src_ahead`).
    fn find_in_src_batch(&self, path: &Path, batch: Vec<OsString>) -> FsResult<Option<Found>> {
        let dir = path.parent().unwrap_or(Path::new("")).to_path_buf();
        let progress = Arc::new(AtomicU64::new(0));
        let (p, d, asked) = (Arc::clone(&progress), dir.clone(), batch.clone());
        let r = self.src_do_watched(
            crate::metrics::SrcOp::Stat,
            path,
            Some(progress),
            move |s| s.stat_names(&d, &asked, &p),
        )?;
        let Some(stats) = r else {
            self.src_absent.note(&dir);
            return Ok(None);
        };
        let mut mine = None;
        let mut found = Vec::new();
        for (k, (name, st)) in batch.into_iter().zip(stats).enumerate() {
            if k == 0 {
                mine = Some(st);
                continue;
            }
            if let Ok(Some(st)) = st {
                found.push((name, st));
            }
        }
        self.src_ahead.put(&dir, found.into_iter());
        match self.src_result(mine.unwrap_or(Ok(None)))? {
            Some(st) => Ok(Some(Found {
                layer: Layered::Src,
                st,
                merge_src: true,
            })),
            None => {
                self.src_absent.note(path);
                Ok(None)
            }
        }
    }

    /// Registers a found entry as a node with `lookups` kernel references.
    pub(super) fn register(&self, path: &Path, found: &Found, lookups: u64) -> Attr {
        self.register_new(path, found, lookups).0
    }

    /// [`CacheFs::register`], and whether the name was new to the inode table (not in
    /// its directory's last listing, nor looked up since), or named another object.
    pub(super) fn register_new(&self, path: &Path, found: &Found, lookups: u64) -> (Attr, bool) {
        let kind = Kind::from_mode(found.st.st_mode);
        let dst_ident = (found.layer == Layered::Dst).then(|| ident(&found.st));
        let mut t = self.inodes.lock().unwrap();
        let before = t.relinks();
        let ino = t.upsert(path, kind, found.merge_src, dst_ident, lookups);
        let new = t.relinks() != before;
        drop(t);
        (attr_of(ino, &found.st), new)
    }

    /// The attributes of a node from whichever layer holds it. A node with no name
    /// left (unlinked or replaced while open) is answered from an open handle.
    pub(super) fn stat_node(&self, ino: u64) -> FsResult<Attr> {
        let path = match self.node_path(ino) {
            Err(FsError::Errno(libc::ENOENT)) => return self.stat_nameless(ino),
            r => r?.0,
        };
        if let Some(st) = self.dst.stat(&path)? {
            return Ok(attr_of(ino, &st));
        }
        match self.src_stat(&path)? {
            Some(st) => Ok(attr_of(ino, &st)),
            None => Err(FsError::not_found()),
        }
    }

    /// A node with no name left, from an open handle: a file's dst fd, or what an open
    /// directory kept when its name went ([`CacheFs::keep_attr_of_open_dir`]).
    fn stat_nameless(&self, ino: u64) -> FsResult<Attr> {
        if let Some(h) = self.handles.read().unwrap().values().find(|h| h.ino == ino) {
            return Ok(attr_of(
                ino,
                &layer::fstat(std::os::fd::AsFd::as_fd(&h.file))?,
            ));
        }
        let dirs = self.dir_handles.lock().unwrap();
        dirs.values()
            .filter(|h| h.ino == ino)
            .find_map(|h| *h.gone.lock().unwrap())
            .ok_or_else(FsError::not_found)
    }

    /// Before the directory at `path` (stat `st`) loses its name: its open handles
    /// keep its attributes with no link, as an unlinked file's open fd does (a dst
    /// directory's fd would not do for one that only src has, and costs an fd per
    /// opendir).
    pub(super) fn keep_attr_of_open_dir(&self, path: &Path, st: &Stat) {
        let Some(ino) = self.inodes.lock().unwrap().ino_of(path) else {
            return;
        };
        let dirs = self.dir_handles.lock().unwrap();
        for h in dirs.values().filter(|h| h.ino == ino) {
            let mut attr = attr_of(ino, st);
            attr.nlink = 0;
            *h.gone.lock().unwrap() = Some(attr);
        }
    }

    pub(super) fn mark_opaque(&self, dir: &Path) -> FsResult<()> {
        copyup::keeping_parent_times(&self.dst, &dir.join(names::OPAQUE_MARKER), || {
            match self
                .dst
                .create_file(&dir.join(names::OPAQUE_MARKER), libc::O_WRONLY, 0o000)
            {
                Ok(_) => Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
                Err(e) => Err(e),
            }
        })?;
        Ok(())
    }

    /// The name a hashed whiteout hides (its content).
    pub(super) fn hashed_whiteout_target(&self, wh: &Path) -> FsResult<Option<OsString>> {
        let mut content = Vec::new();
        match self.dst.open_file(wh, libc::O_RDONLY) {
            Ok(mut f) => drop(io::Read::read_to_end(&mut f, &mut content)?),
            Err(e) if layer::is_not_found(&e) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        Ok(Some(OsString::from_vec(content)))
    }

    /// Hides src's `path` (after it was removed or renamed away in the view).
    pub(super) fn add_whiteout(&self, path: &Path) -> FsResult<()> {
        let wh = Self::whiteout_path(path);
        match self.dst.create_file(&wh, libc::O_WRONLY, 0o000) {
            Ok(mut f) => {
                if names::is_hashed_whiteout(wh.file_name().unwrap_or_default()) {
                    let name = path.file_name().unwrap_or_default();
                    io::Write::write_all(&mut f, name.as_bytes())?;
                }
                Ok(())
            }
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The name `path` is being created again: drop whiteouts for it. Returns whether
    /// one existed (src still has an old entry there).
    pub(super) fn clear_whiteouts(&self, path: &Path) -> FsResult<bool> {
        let mut had = match self.dst.unlink(&Self::whiteout_path(path)) {
            Ok(()) => true,
            Err(e) if layer::is_not_found(&e) => false,
            Err(e) => return Err(e.into()),
        };
        let mut legacy = self.legacy_whiteouts.lock().unwrap();
        if legacy.remove(path) {
            let encoded = format!(
                "{}----{}",
                String::from_utf8_lossy(names::GOCACHEFS_WHITEOUT_PREFIX),
                path.to_string_lossy().replace('/', "----")
            );
            let _ = self.dst.unlink(Path::new(&encoded));
            had = true;
        }
        Ok(had)
    }

    /// Whether src has an entry at `path` under a merging parent (so removing it from
    /// the view needs a whiteout).
    /// When src cannot tell (offline), assume it has the entry: a needless whiteout is
    /// harmless and collected later, a missing one would let the entry reappear.
    /// Also true while writeback still has ops for `path`: src may get the entry at
    /// any moment (an upload in flight), and it must not reappear from there.
    pub(super) fn src_has(&self, path: &Path, parent_merges: bool) -> FsResult<bool> {
        if !parent_merges {
            return Ok(false);
        }
        if self.changes.as_ref().is_some_and(|c| c.has_pending(path)) {
            return Ok(true);
        }
        match self.src_stat(path) {
            Ok(found) => Ok(found.is_some()),
            Err(_) if self.src_offline.load(Ordering::Relaxed) => Ok(true),
            Err(e) => Err(e),
        }
    }
}
