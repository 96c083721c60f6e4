//! Thin `fuser::Filesystem` adapter over [`CacheFs`]: converts fuser types to core
//! types and core errors to errno ([`FsError::errno`]), and nothing else.
//!
//! Mount policy: `default_permissions` always (the kernel checks modes); as root also
//! `allow_other`, and `nosuid,nodev` unless `-o suid` / `-o dev` ask otherwise. A normal
//! user mounts through the setuid `fusermount3` (fuser's fallback after mount(2) fails
//! with EPERM); what that needs is checked up front ([`fusermount::check_can_mount`]).
//!
//! Attributes behind the daemon's back: with FUSE passthrough the kernel writes dst
//! files itself. A `write(2)` through a passthrough handle updates the kernel's cached
//! attributes, but a write through a shared mapping does not (the backing file's
//! mtime/ctime move, the FUSE inode's cached ones stay until `--attr-ttl`). So every
//! handle opened for writing with passthrough gets FLUSH (close() waits for it),
//! FSYNC and RELEASE told to the kernel as "this inode's attributes are stale"
//! (`FUSE_NOTIFY_INVAL_INODE` for attributes only, no page cache); every other handle
//! is opened `FOPEN_NOFLUSH` when the core has nothing to do at close
//! ([`CacheFs::flush_needed`]), so a close() costs no round trip. Likewise after
//! setting or removing a POSIX ACL (`system.posix_acl_*`), which changes the mode in
//! dst: without `FUSE_POSIX_ACL` the kernel keeps its cached mode.
//!
//! POSIX ACLs: negotiated (`FUSE_POSIX_ACL`, with `FUSE_DONT_MASK`) unless `--no-acl`
//! or dst's file system holds none. The kernel then checks and caches ACLs and sends
//! the umask with each create for the core to apply (not under a default ACL); dst's
//! file system keeps mode and ACL in step (setting an ACL, chmod).

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BackgroundSession, BackingId, BsdFileFlags, Config as FuseConfig,
    CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, MountOption, Notifier, OpenFlags,
    PollEvents, PollFlags, PollNotifier, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyLseek, ReplyOpen,
    ReplyPoll, ReplyStatfs, ReplyWrite, ReplyXattr, Request, SessionACL, TimeOrNow, WriteFlags,
};

pub mod fusermount;

use crate::config::Config;
use crate::fs::{Attr, CacheFs, Caller, FsError, Kind, OpenRequest, Opened, SetAttr, TimeSpec};
use crate::metrics::FuseOp;

/// The arguments of a create request, to serve it on another thread.
#[derive(Clone, Copy)]
struct CreateArgs {
    caller: Caller,
    parent: INodeNo,
    mode: u32,
    umask: u32,
    flags: i32,
}

/// The adapter the session drives.
pub struct FuseAdapter {
    fs: Arc<CacheFs>,
    ttl: Duration,
    /// FUSE passthrough in use: asked for, negotiated, and not refused since.
    passthrough: Arc<AtomicBool>,
    /// POSIX ACLs (`FUSE_POSIX_ACL`): asked for, then whether negotiated.
    acl: Arc<AtomicBool>,
    backing: Arc<Mutex<BackingTable>>,
    /// Notifications to the kernel (set once the session exists, before it serves).
    notifier: Arc<OnceLock<Notifier>>,
    /// Told once the kernel's INIT was answered: the mount serves requests.
    ready: Option<crossbeam_channel::Sender<()>>,
    /// Bytes of entries the last full readdirplus reply held: how many names one
    /// batch of lookups takes (see `readdirplus`).
    readdirplus_room: Arc<AtomicUsize>,
}

/// What one readdirplus entry takes in the reply: `fuse_entry_out` (128 bytes) and
/// `fuse_dirent` (24) with the name, padded to 8 bytes.
fn direntplus_size(name: &OsStr) -> usize {
    (152 + name.len() + 7) & !7
}

/// The first guess at a readdirplus reply's size (one page), before one filled up.
const READDIRPLUS_ROOM: usize = 4096;

/// Backing files registered with the kernel for passthrough. The kernel allows one
/// backing file per inode at a time, so all open handles of an inode share one
/// `BackingId` (weak by inode, strong per handle; dropped at the last release).
#[derive(Default)]
struct BackingTable {
    by_ino: HashMap<u64, Weak<BackingId>>,
    by_fh: HashMap<u64, Arc<BackingId>>,
    /// Handles open for writing with passthrough: the kernel may change their file's
    /// times without telling the daemon (writes through a mapping).
    writers: HashSet<u64>,
}

impl FuseAdapter {
    pub fn new(fs: Arc<CacheFs>, cfg: &Config) -> FuseAdapter {
        FuseAdapter {
            fs,
            ttl: cfg.attr_ttl,
            passthrough: Arc::new(AtomicBool::new(cfg.passthrough)),
            acl: Arc::new(AtomicBool::new(cfg.acl)),
            backing: Arc::new(Mutex::new(BackingTable::default())),
            notifier: Arc::new(OnceLock::new()),
            ready: None,
            readdirplus_room: Arc::new(AtomicUsize::new(READDIRPLUS_ROOM)),
        }
    }

    /// Another handle on the same adapter state, for a request served on its own
    /// thread.
    fn share(&self) -> FuseAdapter {
        FuseAdapter {
            fs: self.fs.clone(),
            ttl: self.ttl,
            passthrough: self.passthrough.clone(),
            acl: self.acl.clone(),
            backing: self.backing.clone(),
            notifier: self.notifier.clone(),
            ready: None,
            readdirplus_room: self.readdirplus_room.clone(),
        }
    }

    /// create(2): the core creates the file in dst, then as [`FuseAdapter::open_now`].
    fn create_now(&self, args: CreateArgs, name: &OsStr, reply: ReplyCreate) {
        let CreateArgs {
            caller,
            parent,
            mode,
            umask,
            flags,
        } = args;
        let passthrough = self.passthrough.load(Ordering::Relaxed);
        let (a, fh) = match self.fs.create(
            caller,
            parent.0,
            name,
            mode,
            umask,
            OpenRequest {
                flags,
                for_backing: passthrough,
            },
        ) {
            Ok(r) => r,
            Err(e) => return reply.error(errno(e)),
        };
        let attr = fuse_attr(&a);
        if passthrough && let Some(id) = self.backing_for(a.ino, fh, |f| reply.open_backing(f)) {
            let flags = self.passthrough_flags(fh, flags);
            return reply.created_passthrough(
                &self.ttl,
                &attr,
                Generation(0),
                FileHandle(fh),
                flags,
                &id,
            );
        }
        reply.created(
            &self.ttl,
            &attr,
            Generation(0),
            FileHandle(fh),
            FopenFlags::FOPEN_KEEP_CACHE | self.no_flush(),
        );
    }

    /// open(2): the core opens (fetching if needed), then the kernel gets a backing
    /// file (passthrough) or a handle the daemon serves.
    fn open_now(&self, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let passthrough = self.passthrough.load(Ordering::Relaxed);
        let req = OpenRequest {
            flags: flags.0,
            for_backing: passthrough,
        };
        let Opened {
            fh,
            rw,
            fresh,
            lazy,
        } = match self.fs.open(ino.0, req) {
            Ok(r) => r,
            Err(e) => return reply.error(errno(e)),
        };
        if passthrough
            && rw
            && !lazy
            && let Some(id) = self.backing_for(ino.0, fh, |f| reply.open_backing(f))
        {
            let flags = self.passthrough_flags(fh, flags.0);
            return reply.opened_passthrough(FileHandle(fh), flags, &id);
        }
        // Only this mount changes dst files, so the kernel's page cache stays valid,
        // unless the copy was just refetched from src.
        let keep = if lazy && passthrough {
            // A partially present file: the daemon serves its reads, and the kernel
            // must not put the inode in caching mode, or a later passthrough open
            // (after the file is completed in dst) would fail.
            FopenFlags::FOPEN_DIRECT_IO
        } else if fresh {
            FopenFlags::empty()
        } else {
            FopenFlags::FOPEN_KEEP_CACHE
        };
        reply.opened(FileHandle(fh), keep | self.no_flush());
    }

    /// `FOPEN_NOFLUSH` when close() has nothing to do in the daemon for a handle
    /// without passthrough writes.
    fn no_flush(&self) -> FopenFlags {
        if self.fs.flush_needed() {
            FopenFlags::empty()
        } else {
            FopenFlags::FOPEN_NOFLUSH
        }
    }

    /// The open flags of passthrough handle `fh`, opened with `open_flags`: one open
    /// for writing is noted in `writers` and gets FLUSH (see the module docs).
    fn passthrough_flags(&self, fh: u64, open_flags: i32) -> FopenFlags {
        if open_flags & libc::O_ACCMODE == libc::O_RDONLY {
            return self.no_flush();
        }
        self.backing.lock().unwrap().writers.insert(fh);
        FopenFlags::empty()
    }

    /// Whether `fh` is a passthrough handle open for writing.
    fn is_passthrough_writer(&self, fh: u64) -> bool {
        self.backing.lock().unwrap().writers.contains(&fh)
    }

    /// After setxattr/removexattr of `name` on `ino`: a POSIX ACL's base entries are
    /// the mode's bits (dst's file system changed the mode with the ACL), and without
    /// `FUSE_POSIX_ACL` the kernel passes ACLs through as plain xattrs and keeps its
    /// cached mode (it only moves ctime itself): drop the cached attributes.
    fn after_xattr_change(&self, ino: u64, name: &OsStr, r: &Result<(), FsError>) {
        if r.is_ok() && name.as_encoded_bytes().starts_with(b"system.posix_acl_") {
            self.attrs_stale(ino);
        }
    }

    /// After an access ACL was set on `ino`: clears setgid, as a local file system does,
    /// when the caller is neither in the file's group nor holds CAP_FSETID (dst's file
    /// system kept it: the daemon holds CAP_FSETID). The kernel would say so with
    /// `FUSE_SETXATTR_ACL_KILL_SGID`, but only in the longer setxattr request of
    /// `FUSE_SETXATTR_EXT`, which fuser 0.18 does not parse; so the caller's groups and
    /// capabilities are read from `/proc/PID/status`. Unknown (no such process): kept.
    fn acl_kill_sgid(&self, req: &Request, ino: u64) {
        let Ok(a) = self.fs.getattr(ino, None) else {
            return;
        };
        let sgid = libc::S_ISGID as u16;
        if a.perm & sgid == 0 || in_group_or_capable(req.pid(), req.gid(), a.gid) != Some(false) {
            return;
        }
        let set = SetAttr {
            mode: Some(u32::from(a.perm & !sgid)),
            uid: None,
            gid: None,
            size: None,
            atime: None,
            mtime: None,
        };
        if let Err(e) = self.fs.setattr(caller(req), ino, None, set) {
            log::debug!("clearing setgid of inode {ino} after an ACL change: {e}");
        }
    }

    /// Tells the kernel that `ino`'s cached attributes are stale (its dst file may have
    /// been written through a mapping): the next stat asks the daemon. Attributes
    /// only (offset -1): no page cache is dropped, so no page lock is waited on.
    fn attrs_stale(&self, ino: u64) {
        if let Some(n) = self.notifier.get()
            && let Err(e) = n.inval_inode(INodeNo(ino), -1, 0)
        {
            log::debug!("invalidating the attributes of inode {ino}: {e}");
        }
    }

    /// The shared backing id for `ino`, registering the handle's dst file if needed.
    /// `None` (and passthrough off for good, logged once) when the kernel refuses.
    fn backing_for(
        &self,
        ino: u64,
        fh: u64,
        register: impl FnOnce(&std::fs::File) -> io::Result<BackingId>,
    ) -> Option<Arc<BackingId>> {
        let mut table = self.backing.lock().unwrap();
        let id = match table.by_ino.get(&ino).and_then(Weak::upgrade) {
            Some(id) => id,
            None => {
                let handle = self.fs.handle(fh).ok()?;
                match register(&handle.file) {
                    Ok(id) => {
                        let id = Arc::new(id);
                        table.by_ino.insert(ino, Arc::downgrade(&id));
                        id
                    }
                    Err(e) => {
                        if self.passthrough.swap(false, Ordering::Relaxed) {
                            log::warn!(
                                "FUSE passthrough refused by the kernel ({e}); serving reads \
                                 and writes in the daemon from now on"
                            );
                        }
                        return None;
                    }
                }
            }
        };
        table.by_fh.insert(fh, Arc::clone(&id));
        Some(id)
    }

    fn release_backing(&self, ino: u64, fh: u64) {
        let mut table = self.backing.lock().unwrap();
        table.by_fh.remove(&fh);
        table.writers.remove(&fh);
        if table
            .by_ino
            .get(&ino)
            .is_some_and(|w| w.strong_count() == 0)
        {
            table.by_ino.remove(&ino);
        }
    }
}

/// Attributes for entries whose attributes the kernel ignores ("." / "..", negative).
const NEGATIVE: Attr = Attr {
    ino: 0,
    kind: Kind::Dir,
    size: 0,
    blocks: 0,
    atime: SystemTime::UNIX_EPOCH,
    mtime: SystemTime::UNIX_EPOCH,
    ctime: SystemTime::UNIX_EPOCH,
    perm: 0,
    nlink: 0,
    uid: 0,
    gid: 0,
    rdev: 0,
    blksize: 4096,
};

fn errno(e: FsError) -> Errno {
    if let FsError::Io(ref io) = e {
        log::debug!("io error: {io}");
    }
    Errno::from_i32(e.errno())
}

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDevice => FileType::CharDevice,
        Kind::BlockDevice => FileType::BlockDevice,
    }
}

fn fuse_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.ctime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: a.blksize,
        flags: 0,
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

/// Whether process `pid`, with file system gid `fsgid`, is in group `gid` (its fsgid or
/// a supplementary group) or holds CAP_FSETID: the kernel's `in_group_or_capable`, read
/// from `/proc/PID/status`. `None` when that cannot be read.
fn in_group_or_capable(pid: u32, fsgid: u32, gid: u32) -> Option<bool> {
    if fsgid == gid {
        return Some(true);
    }
    if pid == 0 {
        return None;
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::trim)
    };
    let in_group = field("Groups:")?
        .split_whitespace()
        .any(|g| g.parse() == Ok(gid));
    let caps = u64::from_str_radix(field("CapEff:")?, 16).ok()?;
    const CAP_FSETID: u32 = 4; // linux/capability.h
    Some(in_group || caps & (1 << CAP_FSETID) != 0)
}

fn time_spec(t: TimeOrNow) -> TimeSpec {
    match t {
        TimeOrNow::Now => TimeSpec::Now,
        TimeOrNow::SpecificTime(st) => {
            let (sec, nsec) = match st.duration_since(SystemTime::UNIX_EPOCH) {
                Ok(d) => (d.as_secs() as i64, d.subsec_nanos() as i64),
                Err(e) => {
                    let d = e.duration();
                    let mut sec = -(d.as_secs() as i64);
                    let mut nsec = -(d.subsec_nanos() as i64);
                    if nsec < 0 {
                        sec -= 1;
                        nsec += 1_000_000_000;
                    }
                    (sec, nsec)
                }
            };
            TimeSpec::At(libc::timespec {
                tv_sec: sec,
                tv_nsec: nsec,
            })
        }
    }
}

fn reply_xattr(reply: ReplyXattr, size: u32, data: Vec<u8>) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if data.len() > size as usize {
        reply.error(Errno::from_i32(libc::ERANGE));
    } else {
        reply.data(&data);
    }
}

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
        if acl {
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
        match self.fs.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
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
        // learned from the last reply that filled up (fuser does not tell it).
        let mut idx = (next - 2) as usize;
        let mut room = self.readdirplus_room.load(Ordering::Relaxed);
        let mut used = 0usize;
        let mut added = false;
        while idx < items.len() {
            let mut end = idx;
            let mut bytes = used;
            while end < items.len() {
                let size = direntplus_size(&items[end].name);
                if end > idx && bytes + size > room {
                    break;
                }
                bytes += size;
                end += 1;
            }
            let names: Vec<&OsStr> = items[idx..end].iter().map(|i| i.name.as_os_str()).collect();
            let attrs = match self.fs.lookup_many(ino.0, &names) {
                Ok(attrs) => attrs,
                Err(e) if !added => return reply.error(errno(e)),
                Err(_) => break,
            };
            let mut full = false;
            for (k, attr) in attrs.into_iter().enumerate() {
                // gone since opendir, or not answerable now: skipped
                let Some(attr) = attr else { continue };
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
            // Everything fitted: the buffer is bigger than thought.
            room = room.max(used).saturating_mul(2);
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
        let r = self.fs.setxattr(ino.0, name, value, flags);
        if r.is_ok() && name == "system.posix_acl_access" && self.acl.load(Ordering::Relaxed) {
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
        match self.fs.getxattr(ino.0, name) {
            Ok(v) => reply_xattr(reply, size, v),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _timer = FuseOp::Listxattr.timer();
        match self.fs.listxattr(ino.0) {
            Ok(v) => reply_xattr(reply, size, v),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _timer = FuseOp::Removexattr.timer();
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

/// Mount options from the config: cachefs's defaults plus `-o` (which may override
/// nosuid/nodev with suid/dev).
pub fn mount_options(cfg: &Config) -> (Vec<MountOption>, SessionACL) {
    let mut opts = vec![
        MountOption::FSName(format!("cachefs:{}", cfg.src.display())),
        MountOption::Subtype("cachefs".into()),
        MountOption::DefaultPermissions,
    ];
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let mut acl = if root {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    let (mut suid, mut dev) = (false, false);
    for o in &cfg.mount_options {
        match o.as_str() {
            "" | "default_permissions" => {}
            "suid" => suid = true,
            "dev" => dev = true,
            "nosuid" => suid = false,
            "nodev" => dev = false,
            "allow_other" => acl = SessionACL::All,
            "allow_root" => acl = SessionACL::RootAndOwner,
            "ro" => opts.push(MountOption::RO),
            "rw" => opts.push(MountOption::RW),
            "exec" => opts.push(MountOption::Exec),
            "noexec" => opts.push(MountOption::NoExec),
            "atime" => opts.push(MountOption::Atime),
            "noatime" => opts.push(MountOption::NoAtime),
            "auto_unmount" => opts.push(MountOption::AutoUnmount),
            o if o.starts_with("fsname=") => opts[0] = MountOption::FSName(o[7..].into()),
            o if o.starts_with("subtype=") => opts[1] = MountOption::Subtype(o[8..].into()),
            o => opts.push(MountOption::CUSTOM(o.into())),
        }
    }
    opts.push(if suid {
        MountOption::Suid
    } else {
        MountOption::NoSuid
    });
    opts.push(if dev {
        MountOption::Dev
    } else {
        MountOption::NoDev
    });
    (opts, acl)
}

/// A mount being served on background threads.
pub struct Mounted {
    pub session: BackgroundSession,
    /// Receives once the kernel's INIT was answered (the mount serves requests). The
    /// daemon waits on this instead of touching its own mount: a daemon blocked in a
    /// request to itself cannot be killed cleanly.
    pub ready: crossbeam_channel::Receiver<()>,
}

/// Mounts `fs` at `cfg.mountpoint` and serves it on background threads.
/// [`fusermount::check_can_mount`] first gives the clearer errors.
pub fn spawn_mount(fs: impl Into<Arc<CacheFs>>, cfg: &Config) -> io::Result<Mounted> {
    let (mount_options, acl) = mount_options(cfg);
    let mut fc = FuseConfig::default();
    fc.mount_options = mount_options;
    fc.acl = acl;
    fc.n_threads = Some(cfg.threads.max(1));
    fc.clone_fd = cfg.threads > 1;
    let mut adapter = FuseAdapter::new(fs.into(), cfg);
    let (tx, ready) = crossbeam_channel::bounded(1);
    adapter.ready = Some(tx);
    let notifier = adapter.notifier.clone();
    let session = fuser::Session::new(adapter, &cfg.mountpoint, &fc)?;
    let _ = notifier.set(session.notifier());
    let session = session.spawn()?;
    Ok(Mounted { session, ready })
}
