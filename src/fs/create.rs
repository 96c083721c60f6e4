//! Creating and removing names: mknod, mkdir, symlink, create, unlink and rmdir. Each
//! holds `namespace` for writing, changes dst first, notes an intent before and records
//! the op after; removing a name src also has leaves a whiteout, and a new directory over
//! a whiteout is opaque. Reserved names are refused with EPERM.

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use super::attr::{Attr, Caller};
use super::file_io::{OpenRequest, open_flags, version_of};
use super::layer::Stat;
use super::view::{Found, Layered, check_name, denied, is_dir};
use super::{CacheFs, FsError, FsResult, Op, layer, names};

/// S_ISGID kept on directories only (a setgid parent makes new directories setgid).
fn mode_if_dir(st: &Stat) -> u32 {
    if is_dir(st) { libc::S_ISGID } else { 0 }
}

impl CacheFs {
    /// Common path of every operation that creates a name: checks, parent in dst,
    /// whiteouts, ownership, node registration. `make` creates `path` in dst with the
    /// mode it is given (`mode`, less `umask` unless the parent has a default ACL), and
    /// returns its stat when it has it at hand (an open file: one fstat, no lookup).
    fn create_common(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        (mode, umask): (u32, u32),
        make: impl FnOnce(&Path, u32) -> io::Result<Option<Stat>>,
        op: impl FnOnce(PathBuf) -> Op,
    ) -> FsResult<Attr> {
        check_name(name)?;
        let (dir, merges) = self.dir_path(parent)?;
        let path = dir.join(name);
        match self.find(&path, merges) {
            Ok(Some(_)) => return denied(libc::EEXIST),
            Ok(None) => {}
            // Offline, src cannot say whether it has the name: create it in dst, which
            // wins over whatever src has.
            Err(_) if self.src_offline.load(Ordering::Relaxed) => {}
            Err(e) => return Err(e),
        }
        let parent_st = self.ensure_dst_dir(&dir)?;
        let mode = self.creation_mode(&dir, mode, umask);
        let _intent = self.intend(&[&path])?;
        let had_whiteout = self.clear_whiteouts(&path)?;
        let created = match make(&path, mode)? {
            Some(st) => st,
            None => self.dst.stat(&path)?.ok_or_else(FsError::not_found)?,
        };
        // Whether the attributes changed since `created` was taken.
        let mut touched = false;
        if self.is_root {
            // Owned by the caller; a setgid parent gives its group (as the kernel would).
            let gid = if parent_st.st_mode & libc::S_ISGID != 0 {
                parent_st.st_gid
            } else {
                caller.gid
            };
            if created.st_uid != caller.uid || created.st_gid != gid {
                touched = true;
                self.dst.chown(&path, caller.uid, gid)?;
                // chown of a file clears setuid/setgid: put the requested bits back (the
                // rwx bits as created: a default ACL may have set them).
                let want = (created.st_mode & 0o777)
                    | (mode & 0o7000)
                    | (created.st_mode & libc::S_ISGID & mode_if_dir(&created));
                if mode & 0o7000 != 0 && created.st_mode & libc::S_IFMT != libc::S_IFLNK {
                    self.dst.chmod(&path, want)?;
                }
            }
        }
        let is_new_dir = is_dir(&created);
        if is_new_dir && had_whiteout {
            // src still has an old directory here: its children must not reappear.
            touched = true;
            self.mark_opaque(&path)?;
        }
        let st = if touched {
            self.dst.stat(&path)?.ok_or_else(FsError::not_found)?
        } else {
            created
        };
        let found = Found {
            layer: Layered::Dst,
            st,
            merge_src: is_new_dir && merges && !had_whiteout,
        };
        self.record(op(path.clone()))?;
        Ok(self.register(&path, &found, 1))
    }

    /// The mode a new entry of `dir` (in dst) is created with: `mode` less `umask`,
    /// unless `dir` has a default ACL. Then dst's file system applies that ACL instead,
    /// as POSIX asks (the kernel leaves the umask to the daemon with `FUSE_DONT_MASK`;
    /// without it the mode comes masked already).
    fn creation_mode(&self, dir: &Path, mode: u32, umask: u32) -> u32 {
        let masked = mode & !(umask & 0o777);
        if masked == mode {
            return mode;
        }
        match self.dst.getxattr(dir, OsStr::new(crate::sys::ACL_DEFAULT)) {
            Ok(_) => mode,
            Err(_) => masked,
        }
    }

    pub(crate) fn mknod(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
    ) -> FsResult<Attr> {
        let _ns = self.namespace.write().unwrap();
        self.create_common(
            caller,
            parent,
            name,
            (mode, umask),
            |p, mode| self.dst.mknod(p, mode, rdev as libc::dev_t).map(|()| None),
            |path| {
                if mode & libc::S_IFMT == libc::S_IFREG {
                    Op::Create { path }
                } else {
                    Op::Mknod { path }
                }
            },
        )
    }

    pub fn mkdir(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
    ) -> FsResult<Attr> {
        let _ns = self.namespace.write().unwrap();
        self.create_common(
            caller,
            parent,
            name,
            (mode & 0o7777, umask),
            |p, mode| self.dst.mkdir(p, mode).map(|()| None),
            |path| Op::Mkdir { path },
        )
    }

    pub fn symlink(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        target: &OsStr,
    ) -> FsResult<Attr> {
        let _ns = self.namespace.write().unwrap();
        self.create_common(
            caller,
            parent,
            name,
            (0o777, 0),
            |p, _| self.dst.symlink(target, p).map(|()| None),
            |path| Op::Symlink { path },
        )
    }

    /// Creates and opens a regular file. Returns its attributes and a handle.
    pub fn create(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        req: OpenRequest,
    ) -> FsResult<(Attr, u64)> {
        let OpenRequest { flags, for_backing } = req;
        self.throttle_writer()?;
        let _ns = self.namespace.write().unwrap();
        let file = std::cell::RefCell::new(None);
        let attr = self.create_common(
            caller,
            parent,
            name,
            (mode & 0o7777, umask),
            |p, mode| {
                let wanted = open_flags(flags);
                let flags = if for_backing {
                    (wanted & !libc::O_ACCMODE) | libc::O_RDWR
                } else {
                    wanted
                };
                let f = self.dst.create_file(p, flags, mode)?;
                let st = layer::fstat(std::os::fd::AsFd::as_fd(&f))?;
                // Before the Create is journaled: its upload may run at once.
                let writer = self.origins.writer_opened(&f).ok();
                *file.borrow_mut() = Some((f, writer));
                Ok(Some(st))
            },
            |path| Op::Create { path },
        )?;
        let (file, writer) = file.into_inner().ok_or(FsError::Stale)?;
        let fh = self.add_handle(attr.ino, file, for_backing, writer);
        if for_backing {
            // No Write record now: the journaled Create already uploads dst's bytes as
            // they are at replay time (one fdatasync per new file, not two). Later
            // passthrough writes are found by version at flush/fsync/release.
            let h = self.handle(fh)?;
            let now = version_of(&layer::fstat(std::os::fd::AsFd::as_fd(&h.file))?);
            *h.reported.lock().unwrap() = Some(now);
        }
        Ok((attr, fh))
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        self.remove(parent, name, false)
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        self.remove(parent, name, true)
    }

    pub(super) fn remove(&self, parent: u64, name: &OsStr, dir: bool) -> FsResult<()> {
        if names::is_reserved(name) {
            return Err(FsError::not_found());
        }
        let _ns = self.namespace.write().unwrap();
        let (parent_path, merges) = self.dir_path(parent)?;
        let path = parent_path.join(name);
        let found = self.find(&path, merges)?.ok_or_else(FsError::not_found)?;
        match (dir, is_dir(&found.st)) {
            (true, false) => return denied(libc::ENOTDIR),
            (false, true) => return denied(libc::EISDIR),
            _ => {}
        }
        if dir && !self.list_merged(&path, found.merge_src)?.is_empty() {
            return denied(libc::ENOTEMPTY);
        }
        let src_has = self.src_has(&path, merges)?;
        self.reserve.before_namespace_change(&self.dst);
        if src_has {
            self.ensure_dst_dir(&parent_path)?;
        }
        let _intent = self.intend(&[&path])?;
        if found.layer == Layered::Dst {
            if dir {
                self.remove_reserved_children(&path)?;
                self.dst.rmdir(&path)?;
            } else {
                self.dst.unlink(&path)?;
                self.origins.clear(&path)?;
            }
        }
        if !dir && let Some(lazy) = &self.lazy {
            lazy.discard(&path);
        }
        if src_has {
            self.add_whiteout(&path)?;
        }
        if dir {
            self.keep_attr_of_open_dir(&path, &found.st);
        }
        self.inodes.lock().unwrap().detach_path(&path);
        self.record(if dir {
            Op::Rmdir { path }
        } else {
            Op::Unlink { path }
        })
    }

    /// Deletes whiteouts and the opaque marker inside a dst directory that is empty in
    /// the view, so that it can be removed or replaced.
    pub(super) fn remove_reserved_children(&self, dir: &Path) -> FsResult<()> {
        for e in self.dst.read_dir(dir)? {
            if names::is_reserved(&e.name) {
                self.dst.unlink(&dir.join(&e.name))?;
            }
        }
        Ok(())
    }
}
