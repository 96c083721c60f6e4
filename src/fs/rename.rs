//! Moving and linking names: rename (with RENAME_NOREPLACE and RENAME_EXCHANGE) and
//! link. A renamed directory first gets its whole subtree into dst and becomes opaque,
//! so no byte depends on src's old path; a name moved away from src leaves a whiteout.
//! Both hold `namespace` for writing; rename also holds the change log's change guard
//! across the dst rename and its record.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::atomic::Ordering;

use super::attr::{Attr, attr_of};
use super::view::{Found, Layered, check_name, denied, is_dir};
use super::{CacheFs, FsError, FsResult, Kind, Op, names};

impl CacheFs {
    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> FsResult<()> {
        if names::is_reserved(name) {
            return Err(FsError::not_found());
        }
        check_name(newname)?;
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        let noreplace = flags & libc::RENAME_NOREPLACE != 0;
        if flags & !(libc::RENAME_EXCHANGE | libc::RENAME_NOREPLACE) != 0 {
            return denied(libc::EINVAL);
        }
        let _ns = self.namespace.write().unwrap();
        self.reserve.before_namespace_change(&self.dst);
        let (from_dir, from_merges) = self.dir_path(parent)?;
        let (to_dir, to_merges) = self.dir_path(newparent)?;
        let from = from_dir.join(name);
        let to = to_dir.join(newname);
        let src_found = self
            .find(&from, from_merges)?
            .ok_or_else(FsError::not_found)?;
        let dst_found = match self.find(&to, to_merges) {
            Ok(found) => found,
            // Offline, src cannot say whether it has the target: dst's answer is the
            // view's (a src entry there is shadowed by the moved one anyway).
            Err(_) if self.src_offline.load(Ordering::Relaxed) => None,
            Err(e) => return Err(e),
        };
        if from == to {
            return Ok(());
        }
        if to.starts_with(&from) {
            return denied(libc::EINVAL);
        }
        let from_is_dir = is_dir(&src_found.st);
        match (&dst_found, exchange) {
            (None, true) => return denied(libc::ENOENT),
            (Some(_), false) if noreplace => return denied(libc::EEXIST),
            (Some(t), false) => {
                let to_is_dir = is_dir(&t.st);
                if from_is_dir && !to_is_dir {
                    return denied(libc::ENOTDIR);
                }
                if !from_is_dir && to_is_dir {
                    return denied(libc::EISDIR);
                }
                if to_is_dir && !self.list_merged(&to, t.merge_src)?.is_empty() {
                    return denied(libc::ENOTEMPTY);
                }
            }
            _ => {}
        }
        // Everything that moves must live in dst first.
        self.materialize(&from, &src_found)?;
        if exchange && let Some(t) = &dst_found {
            self.materialize(&to, t)?;
        }
        self.ensure_dst_dir(&to_dir)?;
        let _intent = self.intend(&[&from, &to])?;
        if let Some(t) = &dst_found
            && !exchange
            && is_dir(&t.st)
            && t.layer == Layered::Dst
        {
            self.remove_reserved_children(&to)?;
        }
        let from_in_src = self.src_has(&from, from_merges)?;
        let to_in_src = self.src_has(&to, to_merges)?;
        let _recording = self.changes.as_ref().map(|c| c.begin_change());
        self.dst.rename(&from, &to, flags & libc::RENAME_EXCHANGE)?;
        // A moved file no longer derives from src's file at its new name: local until
        // writeback uploads it (never refetched, dropped or taken for a conflict
        // because of what src has there).
        // (Records name their dst object too, so they never follow a rename; they are
        // cleared because the moved object could come back to its old name.)
        for p in [&from, &to] {
            self.origins.clear_tree(p)?;
        }
        self.clear_whiteouts(&to)?;
        if !exchange && from_in_src {
            self.add_whiteout(&from)?;
        }
        // A moved directory is complete in dst: never merge src's tree at its new name.
        if from_is_dir && (to_in_src || from_in_src || to_merges) {
            self.mark_opaque(&to)?;
        }
        if exchange && dst_found.as_ref().is_some_and(|t| is_dir(&t.st)) {
            self.mark_opaque(&from)?;
        }
        if !exchange && let Some(t) = dst_found.as_ref().filter(|t| is_dir(&t.st)) {
            self.keep_attr_of_open_dir(&to, &t.st);
        }
        {
            let mut t = self.inodes.lock().unwrap();
            if exchange {
                t.exchange(&from, &to);
            } else {
                t.detach_path(&to);
                t.rename(&from, &to);
            }
            for p in [&from, &to] {
                if let Some(ino) = t.ino_of(p)
                    && let Some(n) = t.get_mut(ino)
                    && n.kind == Kind::Dir
                {
                    n.merge_src = false;
                }
            }
        }
        self.clear_merge_below(&to);
        if exchange {
            self.clear_merge_below(&from);
        }
        self.record(Op::Rename { from, to, exchange })
    }

    /// After a directory moved (and is complete + opaque in dst), no node below it
    /// consults src any more.
    pub(super) fn clear_merge_below(&self, dir: &Path) {
        self.inodes.lock().unwrap().clear_merge_below(dir);
    }

    /// Brings an entry that is about to move fully into dst.
    fn materialize(&self, path: &Path, found: &Found) -> FsResult<()> {
        if is_dir(&found.st) {
            if found.layer == Layered::Src || found.merge_src {
                self.copy_up_tree(path, found.merge_src)?;
            }
        } else if found.layer == Layered::Src {
            let ino = self.inodes.lock().unwrap().ino_of(path);
            match ino {
                Some(ino) => drop(self.ensure_in_dst(ino, path, None)?),
                None => drop(self.copy_up(path, None)?),
            }
        }
        Ok(())
    }

    pub fn link(&self, ino: u64, newparent: u64, newname: &OsStr) -> FsResult<Attr> {
        check_name(newname)?;
        let _ns = self.namespace.write().unwrap();
        let (path, kind, _) = self.node_path(ino)?;
        if kind == Kind::Dir {
            return denied(libc::EPERM);
        }
        let (dir, merges) = self.dir_path(newparent)?;
        let new = dir.join(newname);
        if self.find(&new, merges)?.is_some() {
            return denied(libc::EEXIST);
        }
        self.ensure_in_dst(ino, &path, None)?;
        self.ensure_dst_dir(&dir)?;
        let _intent = self.intend(&[&new])?;
        self.clear_whiteouts(&new)?;
        self.dst.link(&path, &new)?;
        // A record would apply again once the new link goes, to bytes changed through
        // it: drop it durably. (After the link: a failed link leaves the file alone.)
        self.origins.clear_durably(&path)?;
        self.inodes.lock().unwrap().add_path(ino, &new);
        let st = self.dst.stat(&new)?.ok_or_else(FsError::not_found)?;
        self.record(Op::Link {
            existing: path,
            new,
        })?;
        Ok(attr_of(ino, &st))
    }
}
