//! Extended attributes: get and list from whichever layer holds the node, set and
//! remove on dst (copying up first) with the change recorded. cachefs's own xattrs
//! (origin records) are never shown and cannot be set.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use super::layer::Layer;
use super::src_calls::is_outage;
use super::view::denied;
use super::{CacheFs, FsError, FsResult, Kind, Op, hooks, layer, origin};

impl CacheFs {
    /// Runs a read-only call on whichever layer holds the node.
    fn on_layer<R: Send + 'static>(
        &self,
        ino: u64,
        f: impl Fn(&Layer, &Path) -> io::Result<R> + Send + Sync + 'static,
    ) -> FsResult<R> {
        let _ns = self.namespace.read().unwrap();
        let (path, _, _) = self.node_path(ino)?;
        // dst first, with no stat before it: "not found" is the one answer that means
        // dst has no such entry (the xattr calls never give it otherwise).
        match f(&self.dst, &path) {
            Err(e) if layer::is_not_found(&e) => {
                let p = path.clone();
                self.src_do(crate::metrics::SrcOp::Stat, &path, move |s| f(s, &p))
            }
            r => Ok(r?),
        }
    }

    pub(crate) fn getxattr(&self, ino: u64, name: &OsStr) -> FsResult<Vec<u8>> {
        if origin::is_reserved_xattr(name) {
            return denied(libc::ENODATA);
        }
        {
            // dst first; a name only src has may be answered by a batch (`src_ahead`).
            let _ns = self.namespace.read().unwrap();
            let (path, _, _) = self.node_path(ino)?;
            match self.dst.getxattr(&path, name) {
                Err(e) if layer::is_not_found(&e) => {}
                r => return Ok(r?),
            }
            if let Some(r) = self.src_ahead.take_xattr(&path, name) {
                return r.map_err(|errno| io::Error::from_raw_os_error(errno).into());
            }
            if let Some(batch) = self.src_ahead.xattr_batch_for(&path, name)
                && let Some(r) = self.getxattr_src_batch(&path, name, batch)
            {
                return r;
            }
        }
        let name = name.to_os_string();
        self.on_layer(ino, move |l, p| l.getxattr(p, &name))
    }

    /// getxattr of `xattr` on src's `path`, asking src about `batch` (`path`'s name and
    /// the names after it in the listing) in one job and keeping the other answers for
    /// their requests. `None`: not answered this way (ask about `path` alone).
    fn getxattr_src_batch(
        &self,
        path: &Path,
        xattr: &OsStr,
        batch: Vec<OsString>,
    ) -> Option<FsResult<Vec<u8>>> {
        let dir = path.parent().unwrap_or(Path::new("")).to_path_buf();
        let progress = Arc::new(AtomicU64::new(0));
        let (p, d, asked, x) = (
            Arc::clone(&progress),
            dir.clone(),
            batch.clone(),
            xattr.to_os_string(),
        );
        let r = self.src_do_watched(
            crate::metrics::SrcOp::Stat,
            path,
            Some(progress),
            move |s| s.getxattr_names(&d, &asked, &x, &p),
        );
        let answers = match r {
            Ok(Some(answers)) => answers,
            Ok(None) => return Some(Err(FsError::not_found())),
            Err(FsError::Io(e)) if e.raw_os_error() == Some(libc::ENOSYS) => return None,
            Err(e) => return Some(Err(e)),
        };
        let mut mine = None;
        let mut keep = Vec::new();
        for (k, (name, r)) in batch.into_iter().zip(answers).enumerate() {
            if k == 0 {
                mine = Some(r);
                continue;
            }
            match r {
                Ok(v) => keep.push((name, Ok(v))),
                Err(e) if !is_outage(&e) => keep.push((name, Err(super::error::errno_of(&e)))),
                Err(_) => {}
            }
        }
        self.src_ahead.put_xattrs(&dir, xattr, keep.into_iter());
        Some(self.src_result(mine?))
    }

    pub(crate) fn listxattr(&self, ino: u64) -> FsResult<Vec<u8>> {
        let names = self.on_layer(ino, |l, p| l.listxattr(p))?;
        let mut out = Vec::with_capacity(names.len());
        for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
            if !origin::is_reserved_xattr(OsStr::from_bytes(name)) {
                out.extend_from_slice(name);
                out.push(0);
            }
        }
        Ok(out)
    }

    /// Runs a mutating xattr call on dst after copy-up, then records it.
    fn xattr_change(&self, ino: u64, f: impl Fn(&Path) -> io::Result<()>) -> FsResult<()> {
        let _ns = self.namespace.read().unwrap();
        let (path, kind, _) = self.node_path(ino)?;
        if kind == Kind::Dir {
            self.ensure_dst_dir(&path)?;
        } else {
            self.ensure_in_dst(ino, &path, None)?;
        }
        if kind == Kind::File {
            self.origins.mark_dirty(&path)?;
        }
        let _intent = self.intend(&[&path])?;
        f(&path)?;
        self.record(Op::Xattr { path })
    }

    pub(crate) fn setxattr(
        &self,
        ino: u64,
        name: &OsStr,
        value: &[u8],
        flags: i32,
    ) -> FsResult<()> {
        hooks::on_xattr(&self.cache, name);
        if origin::is_reserved_xattr(name) {
            return denied(libc::EPERM);
        }
        self.xattr_change(ino, |p| self.dst.setxattr(p, name, value, flags))
    }

    /// Whether dst's file system holds POSIX ACLs (its root answers a getxattr of
    /// `system.posix_acl_access` with a value or ENODATA, not EOPNOTSUPP).
    pub(crate) fn dst_holds_acls(&self) -> bool {
        match self
            .dst
            .getxattr(Path::new(""), OsStr::new(crate::sys::ACL_ACCESS))
        {
            Ok(_) => true,
            Err(e) => e.raw_os_error() == Some(libc::ENODATA),
        }
    }

    pub(crate) fn removexattr(&self, ino: u64, name: &OsStr) -> FsResult<()> {
        hooks::on_xattr(&self.cache, name);
        if origin::is_reserved_xattr(name) {
            return denied(libc::EPERM);
        }
        self.xattr_change(ino, |p| self.dst.removexattr(p, name))
    }
}
