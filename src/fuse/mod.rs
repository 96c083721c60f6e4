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
//! Directories are opened `FOPEN_CACHE_DIR` (the kernel keeps the listings it reads),
//! and `FOPEN_KEEP_CACHE` when the core says the kernel's copy is still the listing
//! ([`CacheFs::opendir_for_kernel`]); the rule is the core's (`fs::dircache`). A thread
//! (`mount::drop_stale_listings`) tells the kernel to drop the copies of directories it
//! holds open once the core says so ([`CacheFs::listings_to_drop`]; a rewind would
//! read them), with `FUSE_NOTIFY_INVAL_INODE` on the whole page cache.
//!
//! POSIX ACLs: negotiated (`FUSE_POSIX_ACL`, with `FUSE_DONT_MASK`) unless `--no-acl`
//! or dst's file system holds none. The kernel then checks and caches ACLs and sends
//! the umask with each create for the core to apply (not under a default ACL); dst's
//! file system keeps mode and ACL in step (setting an ACL, chmod).
//!
//! # Files
//!
//! This file holds the adapter's state ([`FuseAdapter`]) and the create/open paths
//! shared by several requests; `ops` is the `fuser::Filesystem` implementation, one
//! method per request; `passthrough` the backing-file table; `convert` the type
//! conversions (core attributes and errors to fuser's); `mount` the mount options and
//! the session; `fusermount` what a normal user's mount needs.

use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use fuser::{
    FileHandle, FopenFlags, Generation, INodeNo, Notifier, OpenFlags, ReplyCreate, ReplyOpen,
    Request,
};

use crate::config::Config;
use crate::fs::{CacheFs, Caller, FsError, OpenRequest, Opened, SetAttr};

mod convert;
pub(crate) mod fusermount;
mod mount;
mod ops;
mod passthrough;

use convert::{caller, errno, fuse_attr};
pub(crate) use mount::{mount_options, spawn_mount};
use passthrough::BackingTable;

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
pub(crate) struct FuseAdapter {
    fs: Arc<CacheFs>,
    ttl: Duration,
    /// FUSE passthrough in use: asked for, negotiated, and not refused since.
    passthrough: Arc<AtomicBool>,
    /// POSIX ACLs (`FUSE_POSIX_ACL`): asked for, then whether negotiated.
    acl: Arc<AtomicBool>,
    /// `--no-xattr`: every xattr request is answered ENOSYS (the kernel then stops
    /// sending that kind of request for the life of the mount).
    no_xattr: bool,
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

impl FuseAdapter {
    pub(crate) fn new(fs: Arc<CacheFs>, cfg: &Config) -> FuseAdapter {
        FuseAdapter {
            fs,
            ttl: cfg.attr_ttl,
            passthrough: Arc::new(AtomicBool::new(cfg.passthrough)),
            acl: Arc::new(AtomicBool::new(cfg.acl)),
            no_xattr: !cfg.xattr,
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
            no_xattr: self.no_xattr,
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

    /// `--no-xattr`: the answer to every xattr request (ENOSYS: after the first, the
    /// kernel stops sending that kind of request for the life of the mount).
    fn xattr_refusal(&self) -> Option<fuser::Errno> {
        self.no_xattr.then(|| fuser::Errno::from_i32(libc::ENOSYS))
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
