//! Directories: the merged listing of dst and src (dst wins, whiteouts and reserved
//! names left out), and the directory handles readdir pages through (a listing taken at
//! the first readdir and afresh at each rewind). `dir_handles` is a leaf lock.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use super::attr::Attr;
use super::{CacheFs, FsError, FsResult, Kind, layer, names};

/// One directory listing entry.
#[derive(Debug, Clone)]
pub struct DirItem {
    pub ino: u64,
    pub kind: Kind,
    pub name: OsString,
    /// (device, inode) in dst for entries dst holds, so hard links listed here share
    /// one number with their other names.
    dst_ident: Option<(u64, u64)>,
}

pub(super) struct DirHandle {
    pub(super) ino: u64,
    /// The listing readdir pages through: taken at the first readdir, not at opendir
    /// (names made between the two show, as on a local filesystem), and afresh at every
    /// readdir from offset 0 (a rewind). `None` until the first readdir.
    items: Mutex<Option<Arc<[DirItem]>>>,
    /// The directory's attributes when its name went (rmdir, or a directory renamed
    /// over it), with no link: fstat of the open directory still answers.
    pub(super) gone: Mutex<Option<Attr>>,
}

impl CacheFs {
    /// The merged names of directory `path` (without "." / ".."), as (name, S_IFMT).
    pub(super) fn list_merged(&self, path: &Path, merge_src: bool) -> FsResult<Vec<DirItem>> {
        let mut out = Vec::new();
        let mut seen: HashSet<OsString> = HashSet::new();
        let mut whiteouts: HashSet<OsString> = HashSet::new();
        let mut opaque = false;
        let dst_entries = match self.dst.read_dir(path) {
            Ok(v) => v,
            Err(e) if layer::is_not_found(&e) => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        for e in dst_entries {
            if let Some(t) = names::whiteout_target(&e.name) {
                whiteouts.insert(t.to_os_string());
                continue;
            }
            if names::is_hashed_whiteout(&e.name) {
                if let Some(t) = self.hashed_whiteout_target(&path.join(&e.name))? {
                    whiteouts.insert(t);
                }
                continue;
            }
            if e.name == names::OPAQUE_MARKER {
                opaque = true;
                continue;
            }
            if names::is_reserved(&e.name) {
                continue;
            }
            seen.insert(e.name.clone());
            out.push((e.name, e.kind, Some(e.ino)));
        }
        if merge_src && !opaque {
            let dir = path.to_path_buf();
            let listed = self.src_do(crate::metrics::SrcOp::Readdir, path, move |s| {
                match s.read_dir(&dir) {
                    Err(e) if layer::is_not_found(&e) => Ok(Vec::new()),
                    r => r,
                }
            });
            let src_entries = match listed {
                Ok(v) => v,
                // Offline: list what dst has. Whiteouts are kept, since src's answer
                // about them is unknown.
                Err(_) if self.src_offline.load(Ordering::Relaxed) => {
                    return self.finish_listing(path, out);
                }
                Err(e) => return Err(e),
            };
            let legacy = self.legacy_whiteouts.lock().unwrap().clone();
            let mut src_names = HashSet::new();
            // src has this directory and these names: a listing and the lookups after
            // it must agree.
            self.src_absent
                .listed(path, src_entries.iter().map(|e| e.name.as_os_str()));
            self.src_ahead
                .listed(path, src_entries.iter().map(|e| e.name.as_os_str()));
            for e in src_entries {
                src_names.insert(e.name.clone());
                if names::is_reserved(&e.name)
                    || seen.contains(&e.name)
                    || whiteouts.contains(&e.name)
                    || (!legacy.is_empty() && legacy.contains(&path.join(&e.name)))
                {
                    continue;
                }
                out.push((e.name, e.kind, None));
            }
            // Garbage-collect whiteouts src no longer needs.
            for w in whiteouts.iter().filter(|w| !src_names.contains(*w)) {
                let _ = self.dst.unlink(&Self::whiteout_path(&path.join(w)));
            }
            // Clean cached copies of files src deleted (another machine's delete).
            if !self.revalidate_every().is_zero() {
                out.retain(|(name, kind, dst_ino)| {
                    dst_ino.is_none()
                        || *kind != libc::S_IFREG
                        || src_names.contains(name)
                        || !self.drop_if_clean(&path.join(name))
                });
            }
        }
        self.finish_listing(path, out)
    }

    /// Fills in unknown entry types of a merged listing.
    /// `out`: (name, S_IFMT or 0, d_ino in dst for dst's entries).
    fn finish_listing(
        &self,
        path: &Path,
        out: Vec<(OsString, u32, Option<u64>)>,
    ) -> FsResult<Vec<DirItem>> {
        let mut items = Vec::with_capacity(out.len());
        for (name, mut kind, dst_ino) in out {
            let child = path.join(&name);
            if kind == 0 {
                let st = match dst_ino {
                    Some(_) => self.dst.stat(&child)?,
                    None => self.src_stat(&child)?,
                };
                kind = st.map_or(libc::S_IFREG, |s| s.st_mode & libc::S_IFMT);
            }
            items.push(DirItem {
                ino: 0,
                kind: Kind::from_mode(kind),
                name,
                dst_ident: dst_ino
                    .filter(|_| kind != libc::S_IFDIR)
                    .map(|i| (self.dst_dev, i)),
            });
        }
        Ok(items)
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

    /// The merged listing of directory `ino`, every entry numbered.
    pub(super) fn list_dir(&self, ino: u64) -> FsResult<Arc<[DirItem]>> {
        let _ns = self.namespace.read().unwrap();
        let (path, merges) = self.dir_path(ino)?;
        let mut items = self.list_merged(&path, merges)?;
        {
            let mut t = self.inodes.lock().unwrap();
            for item in items.iter_mut() {
                let child = path.join(&item.name);
                item.ino = match t.ino_of(&child) {
                    // Reused only for the same kind of object (src may have replaced a
                    // file by a directory since).
                    Some(i) if t.get(i).map(|n| n.kind) == Some(item.kind) => i,
                    // Numbered now (no kernel reference) so d_ino matches a later stat.
                    _ => t.upsert(&child, item.kind, merges, item.dst_ident, 0),
                };
            }
        }
        Ok(items.into())
    }

    /// The listing to serve a readdir at `offset` from (the caller skips to it). The
    /// handle's snapshot keeps a listing read in several calls consistent; a readdir
    /// from offset 0 (the first one, or after rewinddir or a seekdir to the start)
    /// lists afresh, as a local filesystem shows names made since opendir.
    pub fn readdir(&self, fh: u64, offset: u64) -> FsResult<Arc<[DirItem]>> {
        let h = self
            .dir_handles
            .lock()
            .unwrap()
            .get(&fh)
            .cloned()
            .ok_or(FsError::Stale)?;
        if offset != 0
            && let Some(items) = &*h.items.lock().unwrap()
        {
            return Ok(Arc::clone(items));
        }
        // A directory whose name went is empty (only its handles know it).
        let items = if h.gone.lock().unwrap().is_some() {
            Arc::from([])
        } else {
            self.list_dir(h.ino)?
        };
        *h.items.lock().unwrap() = Some(Arc::clone(&items));
        Ok(items)
    }

    pub fn releasedir(&self, fh: u64) {
        self.dir_handles.lock().unwrap().remove(&fh);
    }

    pub fn statfs(&self) -> FsResult<libc::statvfs> {
        Ok(self.dst.statvfs()?)
    }
}
