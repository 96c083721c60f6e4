//! Directories: the merged listing of dst and src (dst wins, whiteouts and reserved
//! names left out), and the directory handles readdir pages through (a listing taken at
//! the first readdir and afresh at each rewind). `dir_handles` is a leaf lock. The
//! handles the kernel opens also tell `dircache` which listings the kernel may cache
//! (released before `dircache`'s lock is taken).

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use super::attr::Attr;
use super::dircache::{Snap, fingerprint};
use super::{CacheFs, FsError, FsResult, Kind, layer, names};

/// A directory handle the kernel opened ([`CacheFs::opendir_for_kernel`]).
#[derive(Debug, Clone, Copy)]
pub struct OpenedDir {
    pub fh: u64,
    /// Whether the kernel may keep the listing it cached at an earlier open
    /// (`FOPEN_KEEP_CACHE`; see `dircache`).
    pub keep_cache: bool,
}

/// One directory listing entry.
#[derive(Debug, Clone)]
pub struct DirItem {
    /// The entry's inode number in the mount once [`CacheFs::list_dir`] numbered it;
    /// before that, its number in dst (`d_ino`) for an entry dst holds, else 0.
    pub ino: u64,
    pub name: OsString,
    pub kind: Kind,
    /// Whether dst holds the entry: its `ino` (before numbering) then names the dst
    /// object, so hard links listed here share one number with their other names.
    in_dst: bool,
}

pub(super) struct DirHandle {
    pub(super) ino: u64,
    /// The listing readdir pages through: taken at the first readdir, not at opendir
    /// (names made between the two show, as on a local filesystem), and afresh at every
    /// readdir from offset 0 (a rewind). `None` until the first readdir.
    items: Mutex<Option<Listing>>,
    /// The directory's attributes when its name went (rmdir, or a directory renamed
    /// over it), with no link: fstat of the open directory still answers.
    pub(super) gone: Mutex<Option<Attr>>,
}

/// A numbered listing, shared by a directory handle and the readdir calls paging
/// through it (an `Arc<Vec>`, not an `Arc<[_]>`: made from the listing without a copy).
pub type Listing = Arc<Vec<DirItem>>;

impl CacheFs {
    /// The merged names of directory `path` (without "." / ".."): dst's entries, then
    /// src's that dst neither has nor hides, in the order each layer lists them.
    ///
    /// Memory: every name is read once and moved, never copied (a listing of a huge
    /// directory peaks at its entries plus, only when dst has entries, a set of
    /// borrowed names; see `tests/integration/bigdir.rs` and the commit log).
    pub(super) fn list_merged(&self, path: &Path, merge_src: bool) -> FsResult<Vec<DirItem>> {
        let mut whiteouts: HashSet<OsString> = HashSet::new();
        let mut opaque = false;
        let mut dst_entries = match self.dst.read_dir(path) {
            Ok(v) => v,
            Err(e) if layer::is_not_found(&e) => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        let mut failed = None;
        dst_entries.retain(|e| {
            if let Some(t) = names::whiteout_target(&e.name) {
                whiteouts.insert(t.to_os_string());
                return false;
            }
            if names::is_hashed_whiteout(&e.name) {
                match self.hashed_whiteout_target(&path.join(&e.name)) {
                    Ok(Some(t)) => drop(whiteouts.insert(t)),
                    Ok(None) => {}
                    Err(err) => drop(failed.get_or_insert(err)),
                }
                return false;
            }
            if e.name == names::OPAQUE_MARKER {
                opaque = true;
                return false;
            }
            !names::is_reserved(&e.name)
        });
        if let Some(e) = failed {
            return Err(e);
        }
        if !merge_src || opaque {
            return self.finish_listing(path, dst_entries, Vec::new());
        }
        let dir = path.to_path_buf();
        let listed = self.src_do(crate::metrics::SrcOp::Readdir, path, move |s| {
            match s.read_dir(&dir) {
                Err(e) if layer::is_not_found(&e) => Ok(Vec::new()),
                r => r,
            }
        });
        let mut src_entries = match listed {
            Ok(v) => v,
            // Offline: list what dst has. Whiteouts are kept, since src's answer
            // about them is unknown.
            Err(_) if self.src_offline.load(Ordering::Relaxed) => {
                return self.finish_listing(path, dst_entries, Vec::new());
            }
            Err(e) => return Err(e),
        };
        // src has this directory and these names: a listing and the lookups after
        // it must agree.
        self.src_absent
            .listed(path, src_entries.iter().map(|e| e.name.as_os_str()));
        self.src_ahead
            .listed(path, src_entries.iter().map(|e| e.name.as_os_str()));
        // Cached copies of files src deleted (another machine's delete) are cleaned.
        let check_files = !self.revalidate_every().is_zero()
            && dst_entries.iter().any(|e| e.kind == libc::S_IFREG);
        if !whiteouts.is_empty() || check_files {
            let src_names: HashSet<&OsStr> =
                src_entries.iter().map(|e| e.name.as_os_str()).collect();
            // Garbage-collect whiteouts src no longer needs: src lacks the name, and no
            // op still to be replayed may put it there (a create, a link or a rename
            // replayed before the delete that follows it would show the name again).
            for w in whiteouts.iter().filter(|w| {
                !src_names.contains(w.as_os_str())
                    && !self
                        .changes
                        .as_ref()
                        .is_some_and(|c| c.has_pending(&path.join(w)))
            }) {
                let _ = self.dst.unlink(&Self::whiteout_path(&path.join(w)));
            }
            if check_files {
                dst_entries.retain(|e| {
                    e.kind != libc::S_IFREG
                        || src_names.contains(e.name.as_os_str())
                        || !self.drop_if_clean(&path.join(&e.name))
                });
            }
        }
        let legacy = self.legacy_whiteouts.lock().unwrap().clone();
        let in_dst: HashSet<&OsStr> = dst_entries.iter().map(|e| e.name.as_os_str()).collect();
        src_entries.retain(|e| {
            !(names::is_reserved(&e.name)
                || in_dst.contains(e.name.as_os_str())
                || whiteouts.contains(&e.name)
                || (!legacy.is_empty() && legacy.contains(&path.join(&e.name))))
        });
        drop(in_dst);
        self.finish_listing(path, dst_entries, src_entries)
    }

    /// The listing of `dst`'s entries then `src`'s, with unknown entry types filled in.
    /// Moves the entries into one vector (in place when dst has none).
    fn finish_listing(
        &self,
        path: &Path,
        dst: Vec<layer::DirEntry>,
        src: Vec<layer::DirEntry>,
    ) -> FsResult<Vec<DirItem>> {
        let from_dst = dst.len();
        let all = if dst.is_empty() {
            src
        } else {
            let mut all = dst;
            all.extend(src);
            all
        };
        all.into_iter()
            .enumerate()
            .map(|(i, e)| {
                let in_dst = i < from_dst;
                let mut kind = e.kind;
                if kind == 0 {
                    let child = path.join(&e.name);
                    let st = if in_dst {
                        self.dst.stat(&child)?
                    } else {
                        self.src_stat(&child)?
                    };
                    kind = st.map_or(libc::S_IFREG, |s| s.st_mode & libc::S_IFMT);
                }
                Ok(DirItem {
                    ino: if in_dst { e.ino } else { 0 },
                    name: e.name,
                    kind: Kind::from_mode(kind),
                    in_dst,
                })
            })
            .collect()
    }

    /// Snapshots the merged listing of a directory; readdir pages through it.
    pub fn opendir(&self, ino: u64) -> FsResult<u64> {
        {
            let _ns = self.namespace.read().unwrap();
            self.dir_path(ino)?; // the same errors as a listing (ENOENT, ENOTDIR)
        }
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.dir_handles.lock().unwrap().insert(
            fh,
            Arc::new(DirHandle {
                ino,
                items: Mutex::new(None),
                gone: Mutex::new(None),
            }),
        );
        Ok(fh)
    }

    /// [`CacheFs::opendir`] for the kernel, which caches the listings it reads: whether
    /// it may keep the one it cached before is decided here (see `dircache`).
    ///
    /// A listing is kept for at most `--revalidate` (the promise to src's changes;
    /// `0`: never) and at most `--attr-ttl`: past that, the entries the listing gave
    /// the kernel have expired, and a kept listing would make `ls -l` look every name
    /// up again, one LOOKUP each (measured: 15,000 names, 0.35-0.43 s against
    /// 0.14-0.20 s for a new listing, whose READDIRPLUS refreshes them in bulk).
    pub fn opendir_for_kernel(&self, ino: u64) -> FsResult<OpenedDir> {
        let fh = self.opendir(ino)?;
        let keep_for = self.revalidate_every().min(self.attr_ttl);
        let keep_cache = self
            .dircache
            .opened(ino, fh, keep_for, std::time::Instant::now());
        Ok(OpenedDir { fh, keep_cache })
    }

    /// The directories held open by the kernel whose cached listing the kernel must
    /// drop now (`FUSE_NOTIFY_INVAL_INODE`), or an open handle's rewind would read it:
    /// it is older than the rule allows, or changed (see `dircache`). Asked every
    /// `dircache::DROP_EVERY` by the adapter.
    pub fn listings_to_drop(&self) -> Vec<u64> {
        let keep_for = self.revalidate_every().min(self.attr_ttl);
        self.dircache.to_drop(keep_for, std::time::Instant::now())
    }

    /// A reply of handle `fh` of directory `ino` lacked entries of the listing (the
    /// adapter skipped entries it could not look up): what the kernel cached is not the
    /// listing, and is not kept.
    pub fn listing_incomplete(&self, ino: u64, fh: u64) {
        self.dircache.incomplete(ino, fh);
    }

    /// The entry at `path` appeared or went behind the kernel's back: the kernel's
    /// listing of its directory (if the table knows it) is not kept.
    pub(super) fn listing_changed_at(&self, path: &Path) {
        let dir = path
            .parent()
            .and_then(|d| self.inodes.lock().unwrap().ino_of(d));
        if let Some(dir) = dir {
            self.dircache.changed(dir);
        }
    }

    /// The merged listing of directory `ino`, every entry numbered.
    pub(super) fn list_dir(&self, ino: u64) -> FsResult<Listing> {
        let _ns = self.namespace.read().unwrap();
        let (path, merges) = self.dir_path(ino)?;
        let mut items = self.list_merged(&path, merges)?;
        {
            let mut t = self.inodes.lock().unwrap();
            let dir = t.dir_slot(&path);
            for item in items.iter_mut() {
                // A dst object's identity, so that hard links share a number; never
                // used for directories (they have no hard links).
                let dst_ident =
                    (item.in_dst && item.kind != Kind::Dir).then_some((self.dst_dev, item.ino));
                // Reused only for the same kind of object (src may have replaced a
                // file by a directory since); else numbered now (no kernel reference)
                // so that d_ino matches a later stat.
                item.ino = match dir {
                    Some(dir) => t.number_entry(dir, &item.name, item.kind, merges, dst_ident),
                    None => {
                        let child = path.join(&item.name);
                        match t.ino_of(&child) {
                            Some(i) if t.get(i).map(|n| n.kind) == Some(item.kind) => i,
                            _ => t.upsert(&child, item.kind, merges, dst_ident, 0),
                        }
                    }
                };
            }
        }
        Ok(Arc::new(items))
    }

    /// The listing to serve a readdir at `offset` from (the caller skips to it). The
    /// handle's snapshot keeps a listing read in several calls consistent; a readdir
    /// from offset 0 (the first one, or after rewinddir or a seekdir to the start)
    /// lists afresh, as a local filesystem shows names made since opendir.
    pub fn readdir(&self, fh: u64, offset: u64) -> FsResult<Listing> {
        let h = self
            .dir_handles
            .lock()
            .unwrap()
            .get(&fh)
            .cloned()
            .ok_or(FsError::Stale)?;
        if offset != 0
            && let Some(items) = h.items.lock().unwrap().clone()
        {
            self.dircache.served(h.ino, fh, None);
            return Ok(items);
        }
        // A directory whose name went is empty (only its handles know it).
        let items = if h.gone.lock().unwrap().is_some() {
            self.dircache.incomplete(h.ino, fh);
            Arc::new(Vec::new())
        } else {
            // The epoch and the time before the listing: a change learned while it
            // runs makes it stale.
            let (epoch, generation) = self.dircache.current(h.ino);
            let started = std::time::Instant::now();
            let items = self.list_dir(h.ino)?;
            let snap = Snap {
                fingerprint: fingerprint(items.iter().map(|i| (i.name.as_os_str(), i.ino, i.kind))),
                started,
                epoch,
                generation,
            };
            self.dircache.served(h.ino, fh, Some(snap));
            items
        };
        *h.items.lock().unwrap() = Some(Arc::clone(&items));
        Ok(items)
    }

    pub fn releasedir(&self, fh: u64) {
        let h = self.dir_handles.lock().unwrap().remove(&fh);
        if let Some(h) = h {
            self.dircache.released(h.ino, fh);
        }
    }

    pub(crate) fn statfs(&self) -> FsResult<libc::statvfs> {
        Ok(self.dst.statvfs()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listing entry moves in place from src's `DirEntry` (no second buffer while a
    /// huge listing is built): the two keep one size.
    #[test]
    fn a_listing_entry_is_as_small_as_a_read_one() {
        assert_eq!(std::mem::size_of::<DirItem>(), 40);
        assert_eq!(
            std::mem::size_of::<DirItem>(),
            std::mem::size_of::<layer::DirEntry>()
        );
    }
}
