//! Lookups and attributes: lookup (one name, or a batch asked of src in one job),
//! forget, getattr, setattr, readlink and access. Lookups register nodes in the inode
//! table and recompute `merge_src`; a reserved name is never found. setattr changes dst
//! (copying the file up first) and records the change.

use std::ffi::{OsStr, OsString};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::attr::{Attr, Caller, SetAttr, attr_of};
use super::cached::Freshness;
use super::view::{Found, Layered, is_dir};
use super::{CacheFs, FsError, FsResult, Kind, Op, layer, names};

impl CacheFs {
    pub fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Attr> {
        if names::is_reserved(name) {
            return Err(FsError::not_found());
        }
        let _ns = self.namespace.read().unwrap();
        let (dir, merges) = self.dir_path(parent)?;
        let path = dir.join(name);
        let found = match self.find(&path, merges) {
            Ok(Some(found)) => found,
            Ok(None) => {
                // A name the table knows (listed, or looked up) is gone behind the
                // kernel's back (src deleted it): the kernel's listing shows it.
                if self.inodes.lock().unwrap().ino_of(&path).is_some() {
                    self.dircache.changed(parent);
                }
                return Err(FsError::not_found());
            }
            // src is offline: a name this mount has seen is unreachable (EIO); one it
            // has never seen is reported absent, so that new files can be created.
            Err(e) if self.src_offline.load(Ordering::Relaxed) => {
                if self.inodes.lock().unwrap().ino_of(&path).is_some() {
                    return Err(e);
                }
                return Err(FsError::not_found());
            }
            Err(e) => return Err(e),
        };
        let (attr, new) = self.register_new(&path, &found, 1);
        if new {
            // A name the directory's last listing did not show (src or dst gained it
            // behind the kernel, or a kind changed): the kernel's listing lacks it.
            self.dircache.changed(parent);
        }
        if found.layer == Layered::Dst && attr.kind == Kind::File && merges {
            match self.revalidate(attr.ino, &path)? {
                Freshness::Unchanged => {}
                Freshness::Refetched => return self.stat_node(attr.ino),
                Freshness::Gone => {
                    let mut t = self.inodes.lock().unwrap();
                    t.forget(attr.ino, 1);
                    t.detach_path(&path);
                    return Err(FsError::not_found());
                }
            }
        }
        Ok(attr)
    }

    /// [`CacheFs::lookup`] of each of `names` in directory `parent` (readdirplus): the
    /// same answers, each found entry with one kernel reference, `None` for a name that
    /// is not there (or could not be looked up: the listing skips it, as before).
    ///
    /// Cost per name, independent of the batch size: in a directory dst has, one
    /// `fstatat` on its (cached) fd, plus one for the whiteout of a name dst lacks and
    /// one opaque probe per subdirectory dst holds; in a directory dst does not have,
    /// nothing (known from one failed open, remembered by the dst layer). The names
    /// only src can answer are asked in one src-pool job for the whole batch (one path
    /// walk to src's directory, one `fstatat` per name), under the offline gate and
    /// `--src-timeout` like every src call (a job that makes progress is not cut off).
    /// Cached files due for revalidation are revalidated one by one as in `lookup`
    /// (each bounded by [`REVALIDATE_WAIT`]).
    pub(crate) fn lookup_many(&self, parent: u64, names: &[&OsStr]) -> FsResult<Vec<Option<Attr>>> {
        let _ns = self.namespace.read().unwrap();
        let (dir, merges) = self.dir_path(parent)?;
        let mut out: Vec<Option<Attr>> = vec![None; names.len()];
        let dst_dir = self.dst.dir_if_present(&dir)?;
        // (index in `names`, path) of the names only src can answer.
        let mut ask_src: Vec<(usize, PathBuf)> = Vec::new();
        // (index, ino, path) of cached files to revalidate.
        let mut revalidate: Vec<(usize, u64, PathBuf)> = Vec::new();
        for (i, name) in names.iter().enumerate() {
            if names::is_reserved(name) {
                continue;
            }
            let path = dir.join(name);
            let in_dst = match &dst_dir {
                None => None,
                Some(fd) => match layer::statat(fd.as_fd(), &layer::cstr(name)?) {
                    Ok(st) => Some(st),
                    Err(e) if layer::is_not_found(&e) => None,
                    Err(_) => continue,
                },
            };
            if let Some(st) = in_dst {
                let merge_src = is_dir(&st)
                    && merges
                    && match self.is_opaque(&path) {
                        Ok(opaque) => !opaque,
                        Err(_) => continue,
                    };
                let found = Found {
                    layer: Layered::Dst,
                    st,
                    merge_src,
                };
                let attr = self.register(&path, &found, 1);
                if attr.kind == Kind::File && merges && !self.revalidate_every().is_zero() {
                    revalidate.push((i, attr.ino, path));
                }
                out[i] = Some(attr);
                continue;
            }
            if !merges || self.src_absent.covers(&path) {
                continue;
            }
            // A whiteout lives in dst's directory: none where dst has no directory.
            if dst_dir.is_some() && self.whited_out(&path).unwrap_or(true) {
                continue;
            }
            if dst_dir.is_none() {
                let legacy = self.legacy_whiteouts.lock().unwrap();
                if !legacy.is_empty() && path.ancestors().any(|a| legacy.contains(a)) {
                    continue;
                }
            }
            ask_src.push((i, path));
        }
        if !ask_src.is_empty() {
            let asked: Vec<OsString> = ask_src
                .iter()
                .map(|(i, _)| names[*i].to_os_string())
                .collect();
            let progress = Arc::new(AtomicU64::new(0));
            let p = Arc::clone(&progress);
            let d = dir.clone();
            let r = self.src_do_watched(
                crate::metrics::SrcOp::Stat,
                &dir,
                Some(progress),
                move |s| s.stat_names(&d, &asked, &p),
            );
            match r {
                Ok(None) => self.src_absent.note(&dir),
                Ok(Some(stats)) => {
                    for ((i, path), st) in ask_src.iter().zip(stats) {
                        match self.src_result(st) {
                            Ok(Some(st)) => {
                                let found = Found {
                                    layer: Layered::Src,
                                    st,
                                    merge_src: true,
                                };
                                out[*i] = Some(self.register(path, &found, 1));
                            }
                            Ok(None) => self.src_absent.note(path),
                            Err(_) => {}
                        }
                    }
                }
                // Offline or failing: these names are skipped (as each lookup would
                // have failed); dst's entries are answered.
                Err(_) => {}
            }
        }
        for (i, ino, path) in revalidate {
            match self.revalidate(ino, &path) {
                Ok(Freshness::Unchanged) => {}
                Ok(Freshness::Refetched) => out[i] = self.stat_node(ino).ok(),
                Ok(Freshness::Gone) => {
                    let mut t = self.inodes.lock().unwrap();
                    t.forget(ino, 1);
                    t.detach_path(&path);
                    out[i] = None;
                }
                Err(_) => {
                    self.inodes.lock().unwrap().forget(ino, 1);
                    out[i] = None;
                }
            }
        }
        Ok(out)
    }

    pub fn forget(&self, ino: u64, n: u64) {
        self.inodes.lock().unwrap().forget(ino, n);
        // The kernel evicted the inode, and its cached pages with it.
        self.take_refetched(ino);
    }

    pub(crate) fn getattr(&self, ino: u64, fh: Option<u64>) -> FsResult<Attr> {
        if let Some(h) = fh.and_then(|fh| self.handle(fh).ok())
            && h.lazy.as_ref().is_none_or(|p| p.installed())
        {
            return Ok(attr_of(
                ino,
                &layer::fstat(std::os::fd::AsFd::as_fd(&h.file))?,
            ));
        }
        let _ns = self.namespace.read().unwrap();
        self.stat_node(ino)
    }

    pub fn setattr(
        &self,
        caller: Caller,
        ino: u64,
        fh: Option<u64>,
        set: SetAttr,
    ) -> FsResult<Attr> {
        let _ns = self.namespace.read().unwrap();
        let (path, kind, _) = self.node_path(ino)?;
        if kind == Kind::Dir {
            self.ensure_dst_dir(&path)?;
        } else {
            self.ensure_in_dst(ino, &path, set.size)?;
        }
        let _ = caller;
        if kind == Kind::File {
            self.origins.mark_dirty(&path)?;
        }
        let _intent = self.intend(&[&path])?;
        if set.uid.is_some() || set.gid.is_some() {
            self.dst.chown(
                &path,
                set.uid.unwrap_or(u32::MAX),
                set.gid.unwrap_or(u32::MAX),
            )?;
        }
        if let Some(mode) = set.mode
            && kind != Kind::Symlink
        {
            self.dst.chmod(&path, mode & 0o7777)?;
        }
        if let Some(size) = set.size {
            let handle = fh.and_then(|fh| self.handle(fh).ok());
            match handle {
                Some(h) if h.file.set_len(size).is_ok() => {}
                _ => self
                    .dst
                    .open_file(&path, libc::O_WRONLY | libc::O_NONBLOCK)?
                    .set_len(size)?,
            }
        }
        if set.atime.is_some() || set.mtime.is_some() {
            self.dst.set_times(&path, set.atime, set.mtime)?;
        }
        if set.size.is_some() {
            self.record_each_name(ino, &path, |path| Op::Write { path })?;
        }
        if set.mode.is_some()
            || set.uid.is_some()
            || set.gid.is_some()
            || set.atime.is_some()
            || set.mtime.is_some()
        {
            self.record_each_name(ino, &path, |path| Op::SetAttr { path })?;
        }
        let st = self.dst.stat(&path)?.ok_or_else(FsError::not_found)?;
        Ok(attr_of(ino, &st))
    }

    pub fn readlink(&self, ino: u64) -> FsResult<OsString> {
        let _ns = self.namespace.read().unwrap();
        let (path, _, _) = self.node_path(ino)?;
        match self.dst.readlink(&path) {
            Ok(t) => Ok(t),
            Err(e) if layer::is_not_found(&e) => {
                let p = path.clone();
                self.src_do(crate::metrics::SrcOp::Stat, &path, move |s| s.readlink(&p))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// access(2) (only called without default_permissions): existence check.
    pub(crate) fn access(&self, ino: u64) -> FsResult<()> {
        self.getattr(ino, None).map(drop)
    }
}
