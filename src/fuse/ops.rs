//! The `fuser::Filesystem` implementation: each request converted to a core call and
//! its result to a reply, timed by op ([`FuseOp`]). Nothing here decides semantics.

use std::ffi::OsStr;
use std::io;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenFlags,
    PollEvents, PollFlags, PollNotifier, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyLseek, ReplyOpen,
    ReplyPoll, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::fs::{Attr, SetAttr};
use crate::metrics::FuseOp;

use super::convert::{NEGATIVE, caller, errno, file_type, fuse_attr, reply_xattr, time_spec};
use super::{CreateArgs, FuseAdapter, direntplus_size};

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Large writes: fewer round trips for the daemon-served data path.
        let _ = config.set_max_write(1024 * 1024);
        let _ = config.set_max_readahead(1024 * 1024);
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        // Shared mmap of direct-I/O handles (partially present files, see open_now).
        let _ = config.add_capabilities(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP);
        // readdirplus: a listing also answers the lookups of `ls -l` / `find`.
        let _ = config
            .add_capabilities(InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO);
        // POSIX ACLs: the kernel enforces and caches them, and leaves the umask to the
        // daemon (`FUSE_DONT_MASK`: the core applies it unless the parent has a default
        // ACL); dst's file system stores them and keeps mode and ACL in step.
        let want_acl = self.acl.load(Ordering::Relaxed);
        let dst_acl = want_acl && self.fs.dst_holds_acls();
        let acl = dst_acl
            && config
                .add_capabilities(InitFlags::FUSE_POSIX_ACL | InitFlags::FUSE_DONT_MASK)
                .is_ok();
        self.acl.store(acl, Ordering::Relaxed);
        if self.no_xattr {
            log::info!("extended attributes: off (--no-xattr; no ACLs either)");
        } else if acl {
            log::info!("POSIX ACLs: on (the kernel checks them)");
        } else if want_acl {
            let why = if dst_acl {
                "the kernel does not offer FUSE_POSIX_ACL"
            } else {
                "dst's file system holds no ACLs"
            };
            log::info!("POSIX ACLs: off ({why}); the kernel checks modes only");
        }
        let want = self.passthrough.load(Ordering::Relaxed);
        // SAFETY: geteuid cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        let enabled = want
            && root
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok();
        self.passthrough.store(enabled, Ordering::Relaxed);
        if enabled {
            log::info!("data path: FUSE passthrough (the kernel reads and writes cached files)");
        } else {
            let why = if !want {
                "--no-passthrough"
            } else if !root {
                "passthrough needs root"
            } else {
                "the kernel does not offer passthrough (Linux 6.9+)"
            };
            log::info!("data path: served by the daemon ({why})");
        }
        if let Some(ready) = self.ready.take() {
            let _ = ready.send(());
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _timer = FuseOp::Lookup.timer();
        match self.fs.lookup(parent.0, name) {
            Ok(a) => reply.entry(&self.ttl, &fuse_attr(&a), Generation(0)),
            // A negative entry (node id 0): the kernel caches "no such name" for the
            // TTL, so repeated misses (PATH searches, include paths) stay in the kernel.
            Err(e) if e.errno() == libc::ENOENT && !self.ttl.is_zero() => {
                let mut none = fuse_attr(&NEGATIVE);
                none.ino = INodeNo(0);
                reply.entry(&self.ttl, &none, Generation(0))
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let _timer = FuseOp::Getattr.timer();
        match self.fs.getattr(ino.0, fh.map(|f| f.0)) {
            Ok(a) => reply.attr(&self.ttl, &fuse_attr(&a)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _timer = FuseOp::Setattr.timer();
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(time_spec),
            mtime: mtime.map(time_spec),
        };
        match self.fs.setattr(caller(req), ino.0, fh.map(|f| f.0), set) {
            Ok(a) => reply.attr(&self.ttl, &fuse_attr(&a)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _timer = FuseOp::Readlink.timer();
        match self.fs.readlink(ino.0) {
            Ok(t) => reply.data(std::os::unix::ffi::OsStrExt::as_bytes(t.as_os_str())),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let _timer = FuseOp::Mknod.timer();
        match self
            .fs
            .mknod(caller(req), parent.0, name, mode, umask, rdev)
        {
            Ok(a) => reply.entry(&self.ttl, &fuse_attr(&a), Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let _timer = FuseOp::Mkdir.timer();
        match self.fs.mkdir(caller(req), parent.0, name, mode, umask) {
            Ok(a) => reply.entry(&self.ttl, &fuse_attr(&a), Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _timer = FuseOp::Unlink.timer();
        match self.fs.unlink(parent.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _timer = FuseOp::Rmdir.timer();
        match self.fs.rmdir(parent.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let _timer = FuseOp::Symlink.timer();
        match self
            .fs
            .symlink(caller(req), parent.0, link_name, target.as_os_str())
        {
            Ok(a) => reply.entry(&self.ttl, &fuse_attr(&a), Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _timer = FuseOp::Rename.timer();
        match self
            .fs
            .rename(parent.0, name, newparent.0, newname, flags.bits())
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let _timer = FuseOp::Link.timer();
        match self.fs.link(ino.0, newparent.0, newname) {
            Ok(a) => reply.entry(&self.ttl, &fuse_attr(&a), Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let timer = FuseOp::Open.timer();
        if crate::fs::opens_for_writing(flags.0) && self.fs.writer_must_wait() {
            // --max-dirty: wait on a thread of its own, not on a FUSE worker (timed
            // there, until the reply).
            let me = self.share();
            std::thread::spawn(move || {
                let _timer = timer;
                me.open_now(ino, flags, reply)
            });
            return;
        }
        self.open_now(ino, flags, reply);
        drop(timer);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let _timer = FuseOp::Read.timer();
        match self.fs.read(fh.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let timer = FuseOp::Write.timer();
        if self.fs.writer_must_wait() {
            // --max-dirty: wait on a thread of its own, not on a FUSE worker.
            let (fs, data) = (self.fs.clone(), data.to_vec());
            std::thread::spawn(move || {
                let _timer = timer;
                match fs.write(fh.0, offset, &data) {
                    Ok(n) => reply.written(n),
                    Err(e) => reply.error(errno(e)),
                }
            });
            return;
        }
        match self.fs.write(fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(e)),
        }
        drop(timer);
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let _timer = FuseOp::Flush.timer();
        let writer = self.is_passthrough_writer(fh.0);
        if !self.fs.flush_needed() {
            if writer {
                self.attrs_stale(ino.0);
                return reply.ok();
            }
            if !self.passthrough.load(Ordering::Relaxed) {
                // A kernel without FOPEN_NOFLUSH: ENOSYS turns FLUSH off for the
                // whole connection (release does the work, see
                // `CacheFs::flush_needed`). Not with passthrough: its writers need it.
                return reply.error(Errno::ENOSYS);
            }
            return reply.ok();
        }
        let r = self.fs.flush(fh.0);
        if writer {
            self.attrs_stale(ino.0);
        }
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _timer = FuseOp::Release.timer();
        // Writes through a mapping that outlived close() (and its FLUSH) end here.
        let writer = self.is_passthrough_writer(fh.0);
        self.release_backing(ino.0, fh.0);
        let r = self.fs.release(fh.0);
        if writer {
            self.attrs_stale(ino.0);
        }
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _timer = FuseOp::Fsync.timer();
        let r = self.fs.fsync(fh.0, datasync);
        // msync() of a mapping: the times it changed are visible from here on.
        if self.is_passthrough_writer(fh.0) {
            self.attrs_stale(ino.0);
        }
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _timer = FuseOp::Opendir.timer();
        // The kernel caches the listings it reads (FOPEN_CACHE_DIR), and keeps the one
        // it cached at an earlier open when the core says it is still the listing.
        match self.fs.opendir_for_kernel(ino.0) {
            Ok(d) => {
                let keep = if d.keep_cache {
                    FopenFlags::FOPEN_KEEP_CACHE
                } else {
                    FopenFlags::empty()
                };
                reply.opened(FileHandle(d.fh), FopenFlags::FOPEN_CACHE_DIR | keep)
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _timer = FuseOp::Readdir.timer();
        let items = match self.fs.readdir(fh.0, offset) {
            Ok(items) => items,
            Err(e) => return reply.error(errno(e)),
        };
        // Offsets: 1 = ".", 2 = "..", 2 + k = the k-th item.
        let mut next = offset;
        if next == 0 {
            if reply.add(ino, 1, FileType::Directory, ".") {
                return reply.ok();
            }
            next = 1;
        }
        if next == 1 {
            // The kernel fills in ".." itself; its number here is not used.
            if reply.add(ino, 2, FileType::Directory, "..") {
                return reply.ok();
            }
            next = 2;
        }
        for (i, item) in items.iter().enumerate().skip((next - 2) as usize) {
            let kind = file_type(item.kind);
            if reply.add(INodeNo(item.ino), i as u64 + 3, kind, &item.name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let _timer = FuseOp::Readdirplus.timer();
        let items = match self.fs.readdir(fh.0, offset) {
            Ok(items) => items,
            Err(e) => return reply.error(errno(e)),
        };
        // "." and ".." carry no lookup reference; the kernel ignores their attributes.
        let dot = fuse_attr(&Attr {
            ino: ino.0,
            ..NEGATIVE
        });
        let mut next = offset;
        while next < 2 {
            let name = if next == 0 { "." } else { ".." };
            if reply.add(ino, next + 1, name, &self.ttl, &dot, Generation(0)) {
                return reply.ok();
            }
            next += 1;
        }
        // The entries are looked up in batches (one src job per batch, see
        // `CacheFs::lookup_many`), each about what the reply buffer holds: its size is
        // learned from the last reply that filled up (fuser does not tell it). The
        // first batch takes one name beyond that: if it fits, the buffer is bigger than
        // learned, and the next batches take 2, 4, 8, ... names until one does not fit.
        // (Doubling the whole batch instead looked up twice the names a reply holds,
        // half of them for nothing: 2 fstatat per name of a cold `ls -l`.)
        let mut idx = (next - 2) as usize;
        let room = self.readdirplus_room.load(Ordering::Relaxed);
        let mut used = 0usize;
        let mut added = false;
        let mut probe = 0usize;
        while idx < items.len() {
            let mut end = idx;
            if probe == 0 {
                let mut bytes = used;
                while end < items.len() {
                    let size = direntplus_size(&items[end].name);
                    if end > idx && bytes + size > room {
                        break;
                    }
                    bytes += size;
                    end += 1;
                }
                end = (end + 1).min(items.len());
                probe = 1;
            } else {
                probe *= 2;
                end = (idx + probe).min(items.len());
            }
            let names: Vec<&OsStr> = items[idx..end].iter().map(|i| i.name.as_os_str()).collect();
            let attrs = match self.fs.lookup_many(ino.0, &names) {
                Ok(attrs) => attrs,
                Err(e) if !added => return reply.error(errno(e)),
                Err(_) => break,
            };
            let mut full = false;
            for (k, attr) in attrs.into_iter().enumerate() {
                // gone since opendir, or not answerable now: skipped (and the listing
                // the kernel caches lacks it, so it is not kept)
                let Some(attr) = attr else {
                    if !full {
                        self.fs.listing_incomplete(ino.0, fh.0);
                    }
                    continue;
                };
                // Each found entry holds one kernel reference: given back if the entry
                // does not fit.
                if full {
                    self.fs.forget(attr.ino, 1);
                    continue;
                }
                let item = &items[idx + k];
                if reply.add(
                    INodeNo(attr.ino),
                    (idx + k) as u64 + 3,
                    &item.name,
                    &self.ttl,
                    &fuse_attr(&attr),
                    Generation(0),
                ) {
                    self.fs.forget(attr.ino, 1);
                    full = true;
                    continue;
                }
                added = true;
                used += direntplus_size(&item.name);
            }
            if full {
                if used > 0 {
                    self.readdirplus_room.store(used, Ordering::Relaxed);
                }
                break;
            }
            idx = end;
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let _timer = FuseOp::Releasedir.timer();
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _timer = FuseOp::Fsyncdir.timer();
        // Directory entries in dst are made durable by the writeback journal, not here.
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _timer = FuseOp::Statfs.timer();
        match self.fs.statfs() {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let _timer = FuseOp::Setxattr.timer();
        if let Some(e) = self.xattr_refusal() {
            return reply.error(e);
        }
        let r = self.fs.setxattr(ino.0, name, value, flags);
        if r.is_ok() && name == crate::sys::ACL_ACCESS && self.acl.load(Ordering::Relaxed) {
            self.acl_kill_sgid(req, ino.0);
        }
        self.after_xattr_change(ino.0, name, &r);
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _timer = FuseOp::Getxattr.timer();
        if let Some(e) = self.xattr_refusal() {
            return reply.error(e);
        }
        match self.fs.getxattr(ino.0, name) {
            Ok(v) => reply_xattr(reply, size, v),
            // The kernel asks for an entry's ACL to check a permission and takes only
            // ENODATA as "none": a src without xattrs (rclone) answers EOPNOTSUPP,
            // which would fail the open or lookup itself.
            Err(e)
                if e.errno() == libc::EOPNOTSUPP
                    && name.as_encoded_bytes().starts_with(b"system.posix_acl_")
                    && self.acl.load(Ordering::Relaxed) =>
            {
                reply.error(Errno::from_i32(libc::ENODATA))
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _timer = FuseOp::Listxattr.timer();
        if let Some(e) = self.xattr_refusal() {
            return reply.error(e);
        }
        match self.fs.listxattr(ino.0) {
            Ok(v) => reply_xattr(reply, size, v),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _timer = FuseOp::Removexattr.timer();
        if let Some(e) = self.xattr_refusal() {
            return reply.error(e);
        }
        let r = self.fs.removexattr(ino.0, name);
        self.after_xattr_change(ino.0, name, &r);
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    /// cachefs implements no ioctl: ENOTTY ("not a supported ioctl") is what callers
    /// probing for one expect (isatty, lsattr), where ENOSYS would make fuser log a
    /// warning per call.
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        let _timer = FuseOp::Ioctl.timer();
        log::trace!("ioctl {cmd:#x}: ENOTTY");
        reply.error(Errno::ENOTTY);
    }

    /// Files of a cache are always ready, as local files are: ENOSYS tells the kernel
    /// so once for the whole mount (it stops asking), without fuser's warning.
    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ph: PollNotifier,
        _events: PollEvents,
        _flags: PollFlags,
        reply: ReplyPoll,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        let _timer = FuseOp::Access.timer();
        match self.fs.access(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let timer = FuseOp::Create.timer();
        let args = CreateArgs {
            caller: caller(req),
            parent,
            mode,
            umask,
            flags,
        };
        if self.fs.writer_must_wait() {
            // --max-dirty: wait on a thread of its own, not on a FUSE worker.
            let (me, name) = (self.share(), name.to_os_string());
            std::thread::spawn(move || {
                let _timer = timer;
                me.create_now(args, &name, reply)
            });
            return;
        }
        self.create_now(args, name, reply);
        drop(timer);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let _timer = FuseOp::Fallocate.timer();
        match self.fs.fallocate(fh.0, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let _timer = FuseOp::Lseek.timer();
        match self.fs.lseek(fh.0, offset, whence) {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let _timer = FuseOp::CopyFileRange.timer();
        match self
            .fs
            .copy_file_range(fh_in.0, offset_in, fh_out.0, offset_out, len)
        {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno(e)),
        }
    }
}
