//! The layered view over dst (cache) and src (slow), with no fuser types.
//!
//! What the mount shows (DESIGN section 1):
//! - A path is visible if dst has it, or src has it and neither a whiteout in dst nor an
//!   opaque dst directory above it hides it. dst wins. Listings merge both.
//! - stat/lookup never copy data. The first open of a src-only file copies it into dst
//!   (atomic, single flight); so does any mutation of it.
//! - Every mutation happens on dst, then is reported to the change log (writeback).
//!
//! Invariants:
//! - `Node::merge_src` of a directory is true iff src is consulted for its children:
//!   its parent merges src and dst has no opaque marker in it. It is recomputed at each
//!   lookup.
//! - A renamed directory holds its whole subtree in dst and is opaque: renaming first
//!   copies every src-only descendant, so no byte depends on src's old path.
//! - Reserved names ([`names::is_reserved`]) never pass through: lookup -> ENOENT,
//!   creation / rename-to / link-to -> EPERM.
//!
//! Lock order (never the reverse; no lock is held across a change-log wait):
//!   `namespace` (RwLock: write for ops that add/remove/move names, read otherwise)
//!   -> `copy_flights` -> `inodes` -> `handles`.
//!   `inodes` and `handles` are held only for table updates, never across I/O.
//!   `dir_handles` (then a directory handle's own locks) is a leaf: taken under
//!   `namespace` at most, never holding `inodes` or `handles`.
//!   The origin record store's mutex ([`origin::Store`]) is a leaf, taken under any of
//!   these and never holding another; so are `refetched`, `src_absent`'s and
//!   `src_ahead`'s tables, and the dst layer's directory table (see [`layer`]).
//!   The lazy fetch table ([`lazy::Lazy`], then a partial's state) is taken under
//!   `copy_flights` or alone (`evict_partial` holds `copy_flights` so that no copy-up
//!   installs the partial it evicts), never holding a core lock; no lock is held
//!   across a block fetch. A partial's state lock may call the cache budget's
//!   [`lazy::Usage`] hook, which only takes the cache's leaf index lock.
//! - A partially present file ([`lazy`]) is not at its dst path: for this module it is
//!   src-only until a copy-up completes and installs it.

pub mod copyup;
pub mod error;
pub mod inodes;
pub mod layer;
pub mod lazy;
pub mod names;
pub mod origin;
pub mod reserve;
pub mod src_absent;
pub mod src_ahead;
pub mod src_pool;
pub mod src_probe;
pub mod src_state;

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use error::{FsError, FsResult};
pub use inodes::{Kind, ROOT};
use layer::{Layer, Probe, SetTime, Stat};

use crate::config::Config;
use crate::writeback::{ChangeGuard, IntentGuard, Op};

/// Where the core reports mutations (implemented by the writeback journal).
pub trait ChangeLog: Send + Sync {
    /// Durably records `op` before returning.
    fn record(&self, op: Op) -> io::Result<()>;
    /// Returns once src holds dst's current state for `path` (mirror mode); a no-op
    /// when replay is asynchronous.
    fn wait_synced(&self, path: &Path) -> io::Result<()>;
    /// Whether ops for `path` (or below it) are still waiting to reach src.
    fn has_pending(&self, path: &Path) -> bool;
    /// Held across a rename on dst and its `record`, so that replay never retires an
    /// op on the strength of a rename it cannot yet see in the journal.
    fn begin_change(&self) -> ChangeGuard<'_> {
        ChangeGuard::none()
    }
    /// Called before `paths` change on dst; the guard is kept until the change's op is
    /// recorded, so a crash in between leaves the paths to resync at the next start.
    fn intend(&self, _paths: &[&Path]) -> io::Result<IntentGuard<'_>> {
        Ok(IntentGuard::none())
    }
    /// `--max-dirty` backpressure: returns when a writer may go on (called with no
    /// core lock held); an error answers the writer.
    fn throttle(&self) -> io::Result<()> {
        Ok(())
    }
    /// Whether [`ChangeLog::throttle`] would wait now (a cheap check).
    fn over_dirty_limit(&self) -> bool {
        false
    }
}

/// Whether an open with these flags lets a writer in (`--max-dirty` applies).
pub fn opens_for_writing(flags: i32) -> bool {
    flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0
}

/// Who is calling (for ownership of new files).
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// Attributes of a node as the mount shows them.
#[derive(Debug, Clone, Copy)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    pub blocks: u64,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    /// Permission bits including setuid/setgid/sticky.
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
}

/// A time to set in `setattr`.
pub type TimeSpec = SetTime;

/// The attribute changes of one `setattr` call.
#[derive(Debug, Default, Clone, Copy)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeSpec>,
    pub mtime: Option<TimeSpec>,
}

/// How a file is opened: open(2) flags from the kernel, and whether the kernel will do
/// the I/O on the dst file itself (FUSE passthrough).
#[derive(Debug, Clone, Copy)]
pub struct OpenRequest {
    pub flags: i32,
    pub for_backing: bool,
}

/// An opened file.
#[derive(Debug, Clone, Copy)]
pub struct Opened {
    pub fh: u64,
    /// The dst file is open read-write (usable as the inode's passthrough backing).
    pub rw: bool,
    /// The cached copy was just refetched from src: the kernel's cached pages are stale.
    pub fresh: bool,
    /// A partially present file ([`lazy`]): the daemon must serve its reads (no
    /// passthrough: the kernel would read unfetched blocks as zeros).
    pub lazy: bool,
}

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

/// An open file: always a dst file.
#[derive(Debug)]
pub struct OpenFile {
    pub ino: u64,
    pub file: File,
    /// Written since the last report to the change log.
    dirty: AtomicBool,
    /// Writes may bypass the daemon (FUSE passthrough of a writable open): the daemon
    /// cannot see them, so at flush/fsync/release it compares the file's version with
    /// the one last reported instead of trusting `dirty`.
    writes_bypass: bool,
    /// (mtime, size) of the dst file when its content was last reported.
    reported: Mutex<Option<Version>>,
    /// Held by a writable handle: uploads meanwhile leave the file's origin record
    /// dirty (see [`origin::Origin::open_writer`]), since writes after the last report
    /// reach the journal only at the next flush/fsync/release.
    _writer: Option<origin::OpenWriter>,
    /// A read-only handle on a partially present file: reads fetch missing blocks.
    lazy: Option<Arc<lazy::Partial>>,
}

/// A file's version as far as writes can tell: mtime, ctime (s, ns) and size.
type Version = (i64, i64, i64, i64, i64);

fn version_of(st: &Stat) -> Version {
    (
        st.st_mtime,
        st.st_mtime_nsec,
        st.st_ctime,
        st.st_ctime_nsec,
        st.st_size,
    )
}

struct DirHandle {
    ino: u64,
    /// The listing readdir pages through: taken at the first readdir, not at opendir
    /// (names made between the two show, as on a local filesystem), and afresh at every
    /// readdir from offset 0 (a rewind). `None` until the first readdir.
    items: Mutex<Option<Arc<[DirItem]>>>,
    /// The directory's attributes when its name went (rmdir, or a directory renamed
    /// over it), with no link: fstat of the open directory still answers.
    gone: Mutex<Option<Attr>>,
}

/// What revalidation did to a cached file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Freshness {
    Unchanged,
    Refetched,
    /// src deleted it and the clean cached copy was dropped.
    Gone,
}

/// Which layer an entry was found in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layered {
    Dst,
    Src,
}

/// An entry of the view: where it is and its stat.
struct Found {
    layer: Layered,
    st: Stat,
    merge_src: bool,
}

/// The filesystem core.
pub struct CacheFs {
    dst: Arc<Layer>,
    src: Arc<Layer>,
    /// Every src call runs here, bounded by `--src-timeout`.
    src_pool: src_pool::SrcPool,
    /// Health checks of an offline src (see [`CacheFs::src_gate`]).
    src_probe: Arc<src_probe::SrcProbe>,
    /// What src was just seen not to have (see `src_absent`): spares src a question
    /// per new name.
    src_absent: src_absent::SrcAbsent,
    /// Stats of src names asked ahead of their lookups (see `src_ahead`).
    src_ahead: src_ahead::SrcAhead,
    /// Files revalidation replaced in dst since their last open: that open tells the
    /// kernel to drop its cached pages (no FOPEN_KEEP_CACHE). A leaf lock.
    refetched: Mutex<HashSet<u64>>,
    /// src's root was a mount root and the path now is a plain directory (logged once).
    src_unmounted: AtomicBool,
    changes: Option<Arc<dyn ChangeLog>>,
    namespace: RwLock<()>,
    inodes: Mutex<inodes::Inodes>,
    handles: RwLock<HashMap<u64, Arc<OpenFile>>>,
    dir_handles: Mutex<HashMap<u64, Arc<DirHandle>>>,
    next_handle: AtomicU64,
    /// Paths being copied up right now (single flight), and a condvar for waiters.
    copy_flights: Mutex<HashSet<PathBuf>>,
    copy_done: Condvar,
    /// GoCacheFS root-level whiteouts: hidden mount-relative paths.
    legacy_whiteouts: Mutex<HashSet<PathBuf>>,
    is_root: bool,
    /// Set while src fails with an outage error (dead mount, I/O error, timeout).
    src_offline: AtomicBool,
    src_offline_since: Mutex<Option<SystemTime>>,
    /// `--revalidate` interval in nanoseconds (zero: never); changed at runtime
    /// through [`CacheFs::set_revalidate`].
    revalidate_ns: AtomicU64,
    /// dst's device number (identity of dst objects listed by readdir).
    dst_dev: u64,
    /// Last time the src root was reopened after an outage (rate limit).
    src_reopened: Mutex<Option<std::time::Instant>>,
    /// Origin records of dst's files (the same store copy-up, the cache and the
    /// writeback replay use).
    origins: Arc<origin::Store>,
    /// Space kept back in dst so that deletes can be recorded on a full dst.
    reserve: reserve::Reserve,
    /// CACHE HOOK: the cache budget (src/cache/), called from open, ensure_in_dst and
    /// setxattr/removexattr; `None` without a budget or pins.
    cache: Option<Arc<crate::cache::Cache>>,
    /// Lazy range fetch of large files (`None` with `--lazy-threshold 0`).
    lazy: Option<Arc<lazy::Lazy>>,
    /// `--lazy-fill`: partials are completed in the background once opened.
    lazy_fill: bool,
}

/// Threads that run src calls; while all are stuck on a stalled src, src calls fail
/// at once.
const SRC_WORKERS: usize = 16;

/// Longest a lookup or open waits for src to revalidate a cached file: past it, the
/// cached copy is served and the question goes on in the background (a hung bucket
/// must not stall reads of what dst holds).
const REVALIDATE_WAIT: Duration = Duration::from_millis(300);

/// Longest a src call waits for the probe of an offline src (at most one a second):
/// a src that is back answers within it, a hung one does not.
const PROBE_WAIT: Duration = Duration::from_millis(250);

/// What dst holds for one mount path ([`CacheFs::cached_state`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cached {
    /// Nothing: the path is served from src (or does not exist).
    No,
    /// A directory.
    Dir,
    /// A regular file; `clean` when it is an unchanged copy of src's version (an
    /// origin record), else local or changed here (dirty).
    File { bytes: u64, clean: bool },
    /// A partial file of lazy fetch: `present` of `size` bytes fetched.
    Partial { present: u64, size: u64 },
    /// A symlink or special file.
    Other,
}

/// Errors that mean "src is unreachable" rather than "src says no".
pub(crate) fn is_outage(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ENOTCONN
                | libc::EIO
                | libc::ETIMEDOUT
                | libc::ESHUTDOWN
                | libc::EHOSTDOWN
                | libc::EHOSTUNREACH
                | libc::ECONNABORTED
                | libc::ECONNRESET
                | libc::ENETDOWN
                | libc::ENETUNREACH
                | libc::ESTALE
        )
    )
}

fn to_time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + Duration::from_nanos(nsec as u64)
    }
}

fn attr_of(ino: u64, st: &Stat) -> Attr {
    Attr {
        ino,
        kind: Kind::from_mode(st.st_mode),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: to_time(st.st_atime, st.st_atime_nsec),
        mtime: to_time(st.st_mtime, st.st_mtime_nsec),
        ctime: to_time(st.st_ctime, st.st_ctime_nsec),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
    }
}

fn ident(st: &Stat) -> (u64, u64) {
    (st.st_dev, st.st_ino)
}

fn is_dir(st: &Stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

fn denied<T>(errno: i32) -> FsResult<T> {
    Err(FsError::Denied(errno))
}

fn check_name(name: &OsStr) -> FsResult<()> {
    if names::is_reserved(name) {
        return denied(libc::EPERM);
    }
    if name.len() > 255 {
        return denied(libc::ENAMETOOLONG);
    }
    Ok(())
}

impl CacheFs {
    /// Opens both roots and loads GoCacheFS whiteouts from dst's root.
    pub fn new(cfg: &Config, changes: Option<Arc<dyn ChangeLog>>) -> FsResult<CacheFs> {
        let src = Arc::new(src_state::open_src(&cfg.src, &cfg.dst)?);
        CacheFs::with_src(cfg, changes, src)
    }

    /// Like [`CacheFs::new`], with src's layer given: the one writeback replays through
    /// too (see [`src_state::open_src`]).
    pub fn with_src(
        cfg: &Config,
        changes: Option<Arc<dyn ChangeLog>>,
        src: Arc<Layer>,
    ) -> FsResult<CacheFs> {
        // Modes passed by the kernel are final (it applied the caller's umask); the
        // daemon's own umask must not strip bits again.
        // SAFETY: umask cannot fail.
        unsafe { libc::umask(0) };
        let dst = Arc::new(Layer::open_caching_dirs(&cfg.dst)?);
        let dst_dev = dst.stat(Path::new(""))?.map_or(0, |st| st.st_dev);
        // Origin records: loaded (and migrated from old xattrs) before the first request.
        let origins = origin::Store::of(&dst)?;
        copyup::prepare_staging(&dst)?;
        let lazy = match cfg.lazy_threshold {
            0 => None,
            t => Some(Arc::new(
                lazy::Lazy::new(Arc::clone(&dst), t, cfg.block_size)?
                    .with_src(Arc::clone(&src), cfg.src_timeout),
            )),
        };
        let fs = CacheFs {
            reserve: reserve::Reserve::open(&dst),
            lazy,
            lazy_fill: cfg.lazy_fill,
            origins,
            dst,
            src,
            src_pool: src_pool::SrcPool::new(SRC_WORKERS, cfg.src_timeout),
            src_probe: src_probe::SrcProbe::new(),
            src_absent: src_absent::SrcAbsent::new(cfg.attr_ttl),
            src_ahead: src_ahead::SrcAhead::new(cfg.attr_ttl),
            refetched: Mutex::new(HashSet::new()),
            src_unmounted: AtomicBool::new(false),
            changes,
            namespace: RwLock::new(()),
            inodes: Mutex::new(inodes::Inodes::new()),
            handles: RwLock::new(HashMap::new()),
            dir_handles: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            copy_flights: Mutex::new(HashSet::new()),
            copy_done: Condvar::new(),
            legacy_whiteouts: Mutex::new(HashSet::new()),
            // SAFETY: geteuid cannot fail.
            is_root: unsafe { libc::geteuid() } == 0,
            src_offline: AtomicBool::new(false),
            src_offline_since: Mutex::new(None),
            src_reopened: Mutex::new(None),
            revalidate_ns: AtomicU64::new(
                u64::try_from(cfg.revalidate.as_nanos()).unwrap_or(u64::MAX),
            ),
            dst_dev,
            cache: None, // CACHE HOOK
        };
        fs.load_legacy_whiteouts()?;
        match fs.src.root_fd() {
            Ok(_) => fs.persist_src_state(None), // src was checked at startup
            Err(e) => {
                fs.src_offline.store(true, Ordering::Relaxed);
                fs.src_unmounted.store(true, Ordering::Relaxed);
                *fs.src_offline_since.lock().unwrap() = Some(SystemTime::now());
                fs.persist_src_state(Some(&e));
            }
        }
        Ok(fs)
    }

    /// CACHE HOOK: attaches the cache budget (before mounting).
    pub fn set_cache(&mut self, cache: Arc<crate::cache::Cache>) {
        if let Some(lazy) = &self.lazy {
            lazy.set_usage(Arc::clone(&cache) as Arc<dyn lazy::Usage>);
        }
        self.cache = Some(cache);
    }

    fn load_legacy_whiteouts(&self) -> FsResult<()> {
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

    // ----- helpers: nodes, lookups, the view ---------------------------------------

    fn node_path(&self, ino: u64) -> FsResult<(PathBuf, Kind, bool)> {
        let t = self.inodes.lock().unwrap();
        let node = t.get(ino).ok_or(FsError::Stale)?;
        let (kind, merge_src) = (node.kind, node.merge_src);
        let path = t.path(ino).ok_or_else(FsError::not_found)?;
        Ok((path, kind, merge_src))
    }

    fn dir_path(&self, ino: u64) -> FsResult<(PathBuf, bool)> {
        let (p, kind, merge) = self.node_path(ino)?;
        if kind != Kind::Dir {
            return denied(libc::ENOTDIR);
        }
        Ok((p, merge))
    }

    fn whiteout_path(path: &Path) -> PathBuf {
        let name = path.file_name().unwrap_or_default();
        path.with_file_name(names::whiteout_name(name))
    }

    fn is_opaque(&self, dst_dir: &Path) -> FsResult<bool> {
        Ok(self
            .dst
            .stat(&dst_dir.join(names::OPAQUE_MARKER))?
            .is_some())
    }

    /// Whether src's entry at `path` (in a merging parent) is hidden by a whiteout.
    fn whited_out(&self, path: &Path) -> FsResult<bool> {
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
    fn find(&self, path: &Path, parent_merges: bool) -> FsResult<Option<Found>> {
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
    fn register(&self, path: &Path, found: &Found, lookups: u64) -> Attr {
        let kind = Kind::from_mode(found.st.st_mode);
        let dst_ident = (found.layer == Layered::Dst).then(|| ident(&found.st));
        let ino =
            self.inodes
                .lock()
                .unwrap()
                .upsert(path, kind, found.merge_src, dst_ident, lookups);
        attr_of(ino, &found.st)
    }

    /// The attributes of a node from whichever layer holds it. A node with no name
    /// left (unlinked or replaced while open) is answered from an open handle.
    fn stat_node(&self, ino: u64) -> FsResult<Attr> {
        let path = match self.node_path(ino) {
            Err(FsError::Denied(libc::ENOENT)) => return self.stat_nameless(ino),
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
    fn keep_attr_of_open_dir(&self, path: &Path, st: &Stat) {
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

    /// Passes a src result through, tracking outages: an outage error is logged once
    /// (when src goes offline) and becomes EIO for the caller; the next success logs
    /// that src is back.
    fn src_result<T>(&self, r: io::Result<T>) -> FsResult<T> {
        match r {
            Ok(v) => {
                if self.src_offline.load(Ordering::Relaxed)
                    && self.src_offline.swap(false, Ordering::AcqRel)
                {
                    *self.src_offline_since.lock().unwrap() = None;
                    self.src_absent.clear();
                    self.src_ahead.clear();
                    self.src_ahead.clear();
                    log::warn!("src {} answers again", self.src.root_path().display());
                    self.persist_src_state(None);
                }
                Ok(v)
            }
            Err(e) if is_outage(&e) => {
                if !self.src_offline.swap(true, Ordering::AcqRel) {
                    self.src_probe.reset();
                    *self.src_offline_since.lock().unwrap() = Some(SystemTime::now());
                    log::warn!(
                        "src {} is offline ({e}): cached files keep working, uncached ones fail with EIO",
                        self.src.root_path().display()
                    );
                    self.persist_src_state(Some(&e));
                }
                Err(FsError::Io(io::Error::from_raw_os_error(libc::EIO)))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Records src's state (online, or offline because of `error`) in
    /// `dst/.cachefs-state/src.json` for `cachefs status` (see [`src_state`]). Called at
    /// startup and at each transition only.
    fn persist_src_state(&self, error: Option<&io::Error>) {
        let state = src_state::SrcState {
            online: error.is_none(),
            since: src_state::unix_now(SystemTime::now()),
            last_error: error.map(|e| e.to_string()),
            pid: std::process::id(),
        };
        if let Err(e) = src_state::write(self.dst.root_path(), &state) {
            log::warn!("cannot record src's state for `cachefs status`: {e}");
        }
    }

    /// Runs a src call on the src pool (bounded by `--src-timeout`); after an outage
    /// error other than a timeout it reopens src's root once (a src mount restarted at
    /// the same path, e.g. by systemd) and tries again.
    /// Each attempt is timed under `op` and counted in the src metrics.
    fn src_do<T: Send + 'static>(
        &self,
        op: crate::metrics::SrcOp,
        path: &Path,
        f: impl Fn(&Layer) -> io::Result<T> + Send + Sync + 'static,
    ) -> FsResult<T> {
        self.src_do_watched(op, path, None, f)
    }

    /// [`CacheFs::src_do`] for a call that does many steps (a batch of stats): with
    /// `progress`, it times out only after a whole `--src-timeout` with no step done.
    fn src_do_watched<T: Send + 'static>(
        &self,
        op: crate::metrics::SrcOp,
        path: &Path,
        progress: Option<Arc<AtomicU64>>,
        f: impl Fn(&Layer) -> io::Result<T> + Send + Sync + 'static,
    ) -> FsResult<T> {
        self.src_gate()?;
        let f = Arc::new(f);
        let attempt = || {
            let (src, f) = (Arc::clone(&self.src), Arc::clone(&f));
            let progress = progress.clone();
            let r =
                crate::metrics::src_op(op, || self.src_pool.run_watched(progress, move || f(&src)));
            self.note_if_timed_out(&r, path);
            r
        };
        match attempt() {
            Err(e)
                if is_outage(&e)
                    && e.raw_os_error() != Some(libc::ETIMEDOUT)
                    && self.reopen_src() =>
            {
                self.src_result(attempt())
            }
            r => self.src_result(r),
        }
    }

    /// While src is offline, src calls fail at once with EIO rather than each waiting
    /// for a src that may hang (only the calls that found the outage waited). At most
    /// once a second a call probes src ([`src_probe`]) and waits [`PROBE_WAIT`] for
    /// it; when src answers (then or later, in the background) the call is let
    /// through, and its success marks src online.
    fn src_gate(&self) -> FsResult<()> {
        if !self.src_offline.load(Ordering::Relaxed)
            || self.src_probe.take_answer()
            || self.src_probe.probe(&self.src_pool, &self.src, PROBE_WAIT)
        {
            return Ok(());
        }
        Err(FsError::Io(io::Error::from_raw_os_error(libc::EIO)))
    }

    /// A src call on `path` ran into `--src-timeout`: the probes of the coming outage
    /// ask about that path (a question the remote itself must answer).
    fn note_if_timed_out<T>(&self, r: &io::Result<T>, path: &Path) {
        if matches!(r, Err(e) if e.raw_os_error() == Some(libc::ETIMEDOUT)) {
            self.src_probe.note_timeout(path);
        }
    }

    /// lstat on src.
    fn src_stat(&self, path: &Path) -> FsResult<Option<Stat>> {
        let p = path.to_path_buf();
        self.src_do(crate::metrics::SrcOp::Stat, path, move |s| s.stat(&p))
    }

    /// lstat on src for a revalidation: `None` when src has not answered within
    /// [`REVALIDATE_WAIT`] (the question goes on in the background; the caller serves
    /// the cached copy rather than wait for a src that may hang).
    fn src_stat_for_revalidation(&self, path: &Path) -> Option<FsResult<Option<Stat>>> {
        if let Err(e) = self.src_gate() {
            return Some(Err(e));
        }
        if self.src_probe.is_slow() {
            return None; // an earlier question is still unanswered
        }
        let done = Arc::new(AtomicBool::new(false));
        let (src, p, probe, finished) = (
            Arc::clone(&self.src),
            path.to_path_buf(),
            Arc::clone(&self.src_probe),
            Arc::clone(&done),
        );
        let r = crate::metrics::src_op(crate::metrics::SrcOp::Stat, || {
            let asked = self.src_pool.run_bounded(REVALIDATE_WAIT, move || {
                let r = src.stat(&p);
                finished.store(true, Ordering::Release);
                probe.clear_slow();
                r
            });
            asked.unwrap_or_else(|| Err(io::Error::from_raw_os_error(libc::EINPROGRESS)))
        });
        match r {
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
                self.src_probe.mark_slow();
                if done.load(Ordering::Acquire) {
                    self.src_probe.clear_slow(); // it answered just after the bound
                }
                log::debug!(
                    "{}: src is slow to answer; serving the cached copy",
                    path.display()
                );
                None
            }
            r => Some(self.src_result(r)),
        }
    }

    /// Reopens src's root, at most once a second. Whether it was reopened.
    fn reopen_src(&self) -> bool {
        let mut last = self.src_reopened.lock().unwrap();
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return false;
        }
        *last = Some(std::time::Instant::now());
        let src = Arc::clone(&self.src);
        match self.src_pool.run(move || src.reopen()) {
            Ok(()) => {
                self.src_absent.clear();
                self.src_ahead.clear();
                self.src_unmounted.store(false, Ordering::Relaxed);
                if self.src.is_mount_root() {
                    src_state::remember_mounted(self.dst.root_path());
                }
                log::debug!("reopened src root {}", self.src.root_path().display());
                true
            }
            Err(e) => {
                if e.raw_os_error() == Some(libc::ENOTCONN)
                    && !self.src_unmounted.swap(true, Ordering::Relaxed)
                {
                    log::warn!(
                        "src {} is no longer a mount point (its filesystem was unmounted, an \
                         empty directory is left): treating src as offline until it is mounted \
                         again, cached files keep working",
                        self.src.root_path().display()
                    );
                }
                false
            }
        }
    }

    /// Since when src has been offline, if it is.
    pub fn src_offline_since(&self) -> Option<SystemTime> {
        *self.src_offline_since.lock().unwrap()
    }

    /// Whether a writer let in now would wait for the writeback (`--max-dirty`): the
    /// FUSE adapter then serves that request on a thread of its own, so waiting
    /// writers never hold every FUSE thread and readers keep being served.
    pub fn writer_must_wait(&self) -> bool {
        self.changes.as_ref().is_some_and(|c| c.over_dirty_limit())
    }

    /// Wait while too much data waits for src (`--max-dirty`); see [`ChangeLog::throttle`].
    fn throttle_writer(&self) -> FsResult<()> {
        if let Some(c) = &self.changes {
            c.throttle().map_err(FsError::Journal)?;
        }
        Ok(())
    }

    /// Notes that `paths` are about to change on dst (see [`ChangeLog::intend`]); hold
    /// the guard until the change's op is recorded.
    fn intend(&self, paths: &[&Path]) -> FsResult<IntentGuard<'_>> {
        match &self.changes {
            Some(c) => c.intend(paths).map_err(FsError::Journal),
            None => Ok(IntentGuard::none()),
        }
    }

    fn record(&self, op: Op) -> FsResult<()> {
        if let Some(c) = &self.changes {
            // src gets these paths at replay: no longer "absent" there.
            for p in crate::writeback::op_paths(&op) {
                self.src_absent.forget(p);
                self.src_ahead.forget(p);
            }
            c.record(op).map_err(FsError::Journal)?;
        }
        Ok(())
    }

    // ----- copy-up -----------------------------------------------------------------

    /// Makes sure directory `path` (visible in the view) exists in dst, creating it and
    /// its missing ancestors with src's attributes. Returns dst's stat of it.
    fn ensure_dst_dir(&self, path: &Path) -> FsResult<Stat> {
        match self.dst.stat(path)? {
            Some(st) if is_dir(&st) => return Ok(st),
            Some(_) => return denied(libc::ENOTDIR),
            None => {}
        }
        if let Some(parent) = path.parent() {
            self.ensure_dst_dir(parent)?;
        }
        let st = self.src_stat(path)?.ok_or_else(FsError::not_found)?;
        if !is_dir(&st) {
            return denied(libc::ENOTDIR);
        }
        copyup::copy_entry(
            &self.src,
            &self.dst,
            path,
            &st,
            copyup::CopyOpts::default(),
            None,
        )?;
        self.dst.stat(path)?.ok_or_else(FsError::not_found)
    }

    /// Makes sure the non-directory at `path` is in dst (single flight per path).
    /// `limit` caps the bytes copied (for a truncate). Returns dst's stat.
    fn ensure_in_dst(&self, ino: u64, path: &Path, limit: Option<u64>) -> FsResult<Stat> {
        if let Some(st) = self.dst.stat(path)? {
            crate::metrics::cache_hit();
            return Ok(st);
        }
        {
            let mut flights = self.copy_flights.lock().unwrap();
            while flights.contains(path) {
                flights = self.copy_done.wait(flights).unwrap();
            }
            if let Some(st) = self.dst.stat(path)? {
                return Ok(st);
            }
            flights.insert(path.to_path_buf());
        }
        let result =
            crate::metrics::timed(crate::metrics::SrcOp::Fetch, || self.copy_up(path, limit));
        self.copy_flights.lock().unwrap().remove(path);
        self.copy_done.notify_all();
        let (st, copied) = result?;
        crate::metrics::cache_miss(copied);
        crate::cache::on_fetched(&self.cache, path, &st); // CACHE HOOK
        let mut t = self.inodes.lock().unwrap();
        t.set_dst_ident(ino, ident(&st));
        t.mark_checked(ino);
        Ok(st)
    }

    /// Copies `path` from src into dst: its stat in dst, and the bytes of file data this
    /// read from src itself (0 when a lazy fetch completed: its block reads count
    /// their own bytes, see `metrics::lazy_fetched`).
    fn copy_up(&self, path: &Path, limit: Option<u64>) -> FsResult<(Stat, u64)> {
        let st = self.src_stat(path)?.ok_or_else(FsError::not_found)?;
        if let Some(parent) = path.parent() {
            self.ensure_dst_dir(parent)?;
        }
        if let Some(lazy) = &self.lazy
            && st.st_mode & libc::S_IFMT == libc::S_IFREG
            && lazy.has(path)
            && let Some(p) = lazy.take(path, &st, || self.open_src_file(path))
        {
            log::debug!("copy-up {} (completing its lazy fetch)", path.display());
            return match self.install_partial(&p, path, &st, limit) {
                Ok(()) => Ok((self.dst.stat(path)?.ok_or_else(FsError::not_found)?, 0)),
                Err(e) => {
                    lazy.put_back(p);
                    Err(e)
                }
            };
        }
        log::debug!("copy-up {}", path.display());
        let opts = copyup::CopyOpts {
            limit,
            replace: false,
        };
        self.copy_from_src(path, st, opts)?;
        // File data only (a directory's or symlink's size is not data read).
        let copied = match limit {
            _ if st.st_mode & libc::S_IFMT != libc::S_IFREG => 0,
            Some(l) => l.min(st.st_size as u64),
            None => st.st_size as u64,
        };
        Ok((self.dst.stat(path)?.ok_or_else(FsError::not_found)?, copied))
    }

    /// Fetches what a partially present file still lacks (up to `limit`) and installs
    /// it at `path` as dst's copy; handles reading it go on with the same bytes.
    fn install_partial(
        &self,
        p: &Arc<lazy::Partial>,
        path: &Path,
        st: &Stat,
        limit: Option<u64>,
    ) -> FsResult<()> {
        self.src_gate()?;
        let end = limit.unwrap_or(p.size).min(p.size);
        // Streams read what is missing in order; fails only after --src-timeout
        // without progress.
        let fetched = p.ensure(0, end);
        self.note_if_timed_out(&fetched, path);
        if fetched.as_ref().err().is_none_or(is_outage) {
            crate::metrics::METRICS.src_result(&fetched);
        }
        self.src_result(fetched)?;
        p.seal();
        let r = copyup::install_staged(&self.dst, p.src(), p.data_rel(), path, st, limit);
        match r {
            Ok(()) => {
                self.lazy.as_ref().unwrap().installed(p);
                Ok(())
            }
            Err(e) => {
                p.unseal();
                Err(e.into())
            }
        }
    }

    /// src's file at `path`, read-only (O_NOATIME where allowed), on the src pool.
    fn open_src_file(&self, path: &Path) -> FsResult<File> {
        let p = path.to_path_buf();
        self.src_do(crate::metrics::SrcOp::Fetch, path, move |s| {
            match s.open_file(&p, libc::O_RDONLY | libc::O_NOATIME) {
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => s.open_file(&p, libc::O_RDONLY),
                r => r,
            }
        })
    }

    /// Opens the src file at `path` for a lazy fetch if it is one (large enough, no
    /// copy in dst): the partial file, made now if needed. `None`: open it as usual.
    fn lazy_open(&self, path: &Path) -> FsResult<Option<Arc<lazy::Partial>>> {
        let Some(lazy) = &self.lazy else {
            return Ok(None);
        };
        let Some(st) = self.src_stat(path)? else {
            return Ok(None);
        };
        if !lazy.applies(&st) {
            return Ok(None);
        }
        let src_file = self.open_src_file(path)?;
        let partial = {
            let mut flights = self.copy_flights.lock().unwrap();
            while flights.contains(path) {
                flights = self.copy_done.wait(flights).unwrap();
            }
            if self.dst.stat(path)?.is_some() {
                return Ok(None);
            }
            lazy.open_or_create(path, &st, move || Ok(src_file))?
        };
        // Fully fetched: installed as a normal cached file by the usual open.
        Ok((!partial.complete()).then_some(partial))
    }

    /// Copies src's entry `st` at `path` into dst on the src pool, watched for
    /// progress: a large file may take longer than the timeout.
    fn copy_from_src(&self, path: &Path, st: Stat, opts: copyup::CopyOpts) -> FsResult<()> {
        self.src_gate()?;
        let progress = Arc::new(AtomicU64::new(0));
        let (src, dst, p, counter) = (
            Arc::clone(&self.src),
            Arc::clone(&self.dst),
            path.to_path_buf(),
            Arc::clone(&progress),
        );
        let copied = self.src_pool.run_watched(Some(progress), move || {
            copyup::copy_entry(&src, &dst, &p, &st, opts, Some(&counter))
        });
        self.note_if_timed_out(&copied, path);
        // Timed by the caller (`SrcOp::Fetch`); dst's own errors (ENOSPC) are not src's.
        if copied.as_ref().err().is_none_or(is_outage) {
            crate::metrics::METRICS.src_result(&copied);
        }
        self.src_result(copied)
    }

    // ----- revalidation ------------------------------------------------------------

    /// Drops dst's copy at `path` if it is a clean cached copy with no open handle
    /// (src no longer has it). Whether it was dropped.
    fn drop_if_clean(&self, path: &Path) -> bool {
        if !matches!(self.origins.get(path), Ok(Some(o)) if !o.dirty) {
            return false;
        }
        let ino = self.inodes.lock().unwrap().ino_of(path);
        if ino.is_some_and(|i| self.has_open_handles(i)) {
            return false;
        }
        log::info!(
            "{}: gone from src, dropping the cached copy",
            path.display()
        );
        if self.dst.unlink(path).is_err() {
            return false;
        }
        let _ = self.origins.clear(path);
        self.inodes.lock().unwrap().detach_path(path);
        true
    }

    /// Evicts dst's copy of the regular file at `path` (a cache budget decision): the
    /// entry becomes src-backed again, keeping its inode number, and is refetched on
    /// its next open. Only a clean copy (fetched from src, unchanged here, nothing
    /// pending for writeback) that is not open and that src still has is evicted.
    /// Returns the bytes freed in dst, or `None` when the file must stay.
    /// Never waits for the namespace: with a long copy-up in progress the eviction is
    /// skipped (the budget thread tries again), instead of stalling the mount behind it.
    pub fn evict(&self, path: &Path) -> FsResult<Option<u64>> {
        let Ok(_ns) = self.namespace.try_write() else {
            return Ok(None);
        };
        let Some(st) = self.dst.stat(path)? else {
            return Ok(None);
        };
        if st.st_mode & libc::S_IFMT != libc::S_IFREG
            || !matches!(self.origins.get(path)?, Some(o) if !o.dirty)
            || self.changes.as_ref().is_some_and(|c| c.has_pending(path))
        {
            return Ok(None);
        }
        let ino = self.inodes.lock().unwrap().ino_of(path);
        if ino.is_some_and(|i| self.has_open_handles(i)) || self.src_offline.load(Ordering::Relaxed)
        {
            return Ok(None);
        }
        // src must still have a file there, or the entry would vanish from the view.
        match self.src_stat(path) {
            Ok(Some(s)) if s.st_mode & libc::S_IFMT == libc::S_IFREG => {}
            _ => return Ok(None),
        }
        self.src_absent.forget(path);
        self.src_ahead.forget(path);
        self.dst.unlink(path)?;
        self.origins.clear(path)?;
        if let Some(ino) = ino {
            self.inodes.lock().unwrap().clear_dst_ident(ino);
        }
        log::debug!("evicted {}", path.display());
        Ok(Some(st.st_blocks as u64 * 512))
    }

    /// Evicts an idle partial file of lazy fetch (a cache budget decision): its data
    /// file `data_rel`, of the mount path `path` its map names. Refused (`None`) while
    /// a handle or a prefetch holds it, while a copy-up of `path` runs (it may be
    /// installing it), and while src is offline (its blocks could not be fetched
    /// again). Returns the bytes freed in dst.
    pub fn evict_partial(&self, data_rel: &Path, path: Option<&Path>) -> FsResult<Option<u64>> {
        let Some(lazy) = &self.lazy else {
            return Ok(None);
        };
        if self.src_offline.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let flights = self.copy_flights.lock().unwrap();
        if path.is_some_and(|p| flights.contains(p)) {
            return Ok(None);
        }
        let freed = lazy.evict_idle(data_rel)?;
        drop(flights);
        if freed.is_some() {
            log::debug!("evicted the partial file {}", data_rel.display());
        }
        Ok(freed)
    }

    /// The `--revalidate` interval in force (zero: never).
    pub fn revalidate_every(&self) -> Duration {
        Duration::from_nanos(self.revalidate_ns.load(Ordering::Relaxed))
    }

    /// Changes the `--revalidate` interval at runtime: the next lookup or open uses it.
    pub fn set_revalidate(&self, every: Duration) {
        let ns = u64::try_from(every.as_nanos()).unwrap_or(u64::MAX);
        self.revalidate_ns.store(ns, Ordering::Relaxed);
    }

    /// Makes the clean cached files at or below `path` ("" for all) due for a
    /// comparison with src at their next lookup or open (refetched if src changed,
    /// dropped if src deleted them), and forgets the names src was seen to lack.
    /// Nothing is compared here: no src call, no lock held for long. With
    /// `--revalidate 0` (never) nothing is compared later either.
    pub fn expire(&self, path: &Path) {
        self.origins.forget_verified_under(path);
        self.inodes.lock().unwrap().uncheck_all();
        self.src_absent.clear();
    }

    /// The names dst holds in the directory `path`, cachefs's own (state, whiteouts)
    /// left out, for `cachefs ctl state --recursive`. Resolved beneath dst with no
    /// symlink followed, like every dst path.
    pub fn cached_children(&self, path: &Path) -> FsResult<Vec<OsString>> {
        Ok(self
            .dst
            .read_dir(path)?
            .into_iter()
            .map(|e| e.name)
            .filter(|n| !names::is_reserved(n))
            .collect())
    }

    /// The mount paths at or below `path` that have a partial file of lazy fetch
    /// (they are not in dst's tree), sorted.
    pub fn partial_paths_under(&self, path: &Path) -> Vec<PathBuf> {
        self.lazy
            .as_ref()
            .map_or_else(Vec::new, |l| l.paths_under(path))
    }

    /// What dst holds for the mount path `path`, for `cachefs ctl state`. Reads dst
    /// and the core's records only (never src).
    pub fn cached_state(&self, path: &Path) -> FsResult<Cached> {
        if let Some((present, size)) = self.lazy.as_ref().and_then(|l| l.progress(path)) {
            return Ok(Cached::Partial { present, size });
        }
        let Some(st) = self.dst.stat(path)? else {
            return Ok(Cached::No);
        };
        Ok(match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => Cached::Dir,
            libc::S_IFREG => Cached::File {
                bytes: st.st_size as u64,
                clean: matches!(self.origins.get(path)?, Some(o) if !o.dirty),
            },
            _ => Cached::Other,
        })
    }

    fn has_open_handles(&self, ino: u64) -> bool {
        self.handles.read().unwrap().values().any(|h| h.ino == ino)
    }

    /// Compares a cached, clean file with src once its last check is older than the
    /// revalidation interval: refetches it if src changed, drops it if src deleted it.
    /// Files with open handles, local (dirty) files and an offline src are left alone.
    fn revalidate(&self, ino: u64, path: &Path) -> FsResult<Freshness> {
        let every = self.revalidate_every();
        if every.is_zero() {
            return Ok(Freshness::Unchanged);
        }
        {
            let t = self.inodes.lock().unwrap();
            match t.get(ino) {
                Some(n) if n.kind == Kind::File => {
                    if t.checked_within(ino, every) {
                        return Ok(Freshness::Unchanged);
                    }
                }
                _ => return Ok(Freshness::Unchanged),
            }
        }
        let checked = |fs: &CacheFs| {
            fs.inodes.lock().unwrap().mark_checked(ino);
        };
        // Fetched, uploaded or checked by us within the interval: src held this version
        // then, so there is nothing to ask src yet (a hung src must not stall the
        // lookup, and a forgotten inode must not cost a src round trip). Whatever
        // happened to the record since (dirty, dropped) also means "unchanged".
        if self
            .origins
            .verified_ago(path)
            .is_some_and(|ago| ago < every)
        {
            return Ok(Freshness::Unchanged);
        }
        // Our own pending uploads change src: dst is the authority for such a path.
        if self.changes.as_ref().is_some_and(|c| c.has_pending(path)) {
            return Ok(Freshness::Unchanged);
        }
        let clean = match self.origins.get(path)? {
            Some(o) if !o.dirty => o,
            _ => {
                checked(self);
                return Ok(Freshness::Unchanged);
            }
        };
        let Some(Ok(now)) = self.src_stat_for_revalidation(path) else {
            // Offline or slow to answer: keep serving the cache, and ask again only
            // after another interval.
            checked(self);
            return Ok(Freshness::Unchanged);
        };
        match now {
            Some(st) if clean.same_source(&st) => {
                checked(self);
                self.origins.note_verified(path);
                Ok(Freshness::Unchanged)
            }
            _ if self.has_open_handles(ino) => Ok(Freshness::Unchanged),
            // src shows the copy's own size and mtime: it holds these bytes under a
            // version it reported differently before (rclone reports a file it is
            // uploading with a local mtime, and the bucket's once the upload is done).
            Some(st)
                if st.st_mode & libc::S_IFMT == libc::S_IFREG
                    && self.dst.stat(path)?.is_some_and(|d| {
                        (d.st_size, d.st_mtime, d.st_mtime_nsec)
                            == (st.st_size, st.st_mtime, st.st_mtime_nsec)
                    })
                    && self
                        .origins
                        .replace_clean(path, &clean, origin::Origin::of(&st))? =>
            {
                log::debug!(
                    "{}: src settled on the cached copy's own size and mtime",
                    path.display()
                );
                checked(self);
                Ok(Freshness::Unchanged)
            }
            Some(st) if st.st_mode & libc::S_IFMT == libc::S_IFREG => {
                log::info!(
                    "{}: changed in src, refetching (src: {} bytes, mtime {}.{:09}; the copy came from {} bytes, mtime {}.{:09})",
                    path.display(),
                    st.st_size,
                    st.st_mtime,
                    st.st_mtime_nsec,
                    clean.size,
                    clean.mtime_sec,
                    clean.mtime_nsec
                );
                let opts = copyup::CopyOpts {
                    limit: None,
                    replace: true,
                };
                crate::metrics::timed(crate::metrics::SrcOp::Fetch, || {
                    self.copy_from_src(path, st, opts)
                })?;
                crate::metrics::cache_miss(st.st_size as u64);
                if let Some(st) = self.dst.stat(path)? {
                    self.inodes.lock().unwrap().set_dst_ident(ino, ident(&st));
                }
                checked(self);
                // The kernel may hold the old bytes in its page cache: the next open
                // must not keep them, also when this refetch ran in a lookup.
                self.refetched.lock().unwrap().insert(ino);
                Ok(Freshness::Refetched)
            }
            _ => {
                log::info!(
                    "{}: gone from src, dropping the cached copy",
                    path.display()
                );
                self.dst.unlink(path)?;
                self.origins.clear(path)?;
                Ok(Freshness::Gone)
            }
        }
    }

    /// Copies a whole visible subtree into dst (before a directory rename), and marks
    /// its top opaque: afterwards dst alone holds everything the view shows there.
    fn copy_up_tree(&self, path: &Path, merge_src: bool) -> FsResult<()> {
        self.ensure_dst_dir(path)?;
        if merge_src {
            for item in self.list_merged(path, true)? {
                let child = path.join(&item.name);
                let Some(found) = self.find(&child, true)? else {
                    continue;
                };
                if found.layer == Layered::Dst && !found.merge_src {
                    continue;
                }
                if is_dir(&found.st) {
                    self.copy_up_tree(&child, found.merge_src)?;
                } else if found.layer == Layered::Src {
                    let ino = self.inodes.lock().unwrap().ino_of(&child);
                    match ino {
                        Some(ino) => drop(self.ensure_in_dst(ino, &child, None)?),
                        None => drop(self.copy_up(&child, None)?),
                    }
                }
            }
        }
        Ok(())
    }

    fn mark_opaque(&self, dir: &Path) -> FsResult<()> {
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
    fn hashed_whiteout_target(&self, wh: &Path) -> FsResult<Option<OsString>> {
        let mut content = Vec::new();
        match self.dst.open_file(wh, libc::O_RDONLY) {
            Ok(mut f) => drop(io::Read::read_to_end(&mut f, &mut content)?),
            Err(e) if layer::is_not_found(&e) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        Ok(Some(OsString::from_vec(content)))
    }

    /// Hides src's `path` (after it was removed or renamed away in the view).
    fn add_whiteout(&self, path: &Path) -> FsResult<()> {
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
    fn clear_whiteouts(&self, path: &Path) -> FsResult<bool> {
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
    fn src_has(&self, path: &Path, parent_merges: bool) -> FsResult<bool> {
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

    // ----- listing -----------------------------------------------------------------

    /// The merged names of directory `path` (without "." / ".."), as (name, S_IFMT).
    fn list_merged(&self, path: &Path, merge_src: bool) -> FsResult<Vec<DirItem>> {
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

    // ----- operations --------------------------------------------------------------

    pub fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Attr> {
        if names::is_reserved(name) {
            return Err(FsError::not_found());
        }
        let _ns = self.namespace.read().unwrap();
        let (dir, merges) = self.dir_path(parent)?;
        let path = dir.join(name);
        let found = match self.find(&path, merges) {
            Ok(found) => found.ok_or_else(FsError::not_found)?,
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
        let attr = self.register(&path, &found, 1);
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
    pub fn lookup_many(&self, parent: u64, names: &[&OsStr]) -> FsResult<Vec<Option<Attr>>> {
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

    pub fn getattr(&self, ino: u64, fh: Option<u64>) -> FsResult<Attr> {
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
        match self
            .dst
            .getxattr(dir, OsStr::new("system.posix_acl_default"))
        {
            Ok(_) => mode,
            Err(_) => masked,
        }
    }

    pub fn mknod(
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

    fn remove(&self, parent: u64, name: &OsStr, dir: bool) -> FsResult<()> {
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
    fn remove_reserved_children(&self, dir: &Path) -> FsResult<()> {
        for e in self.dst.read_dir(dir)? {
            if names::is_reserved(&e.name) {
                self.dst.unlink(&dir.join(&e.name))?;
            }
        }
        Ok(())
    }

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
    fn clear_merge_below(&self, dir: &Path) {
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

    // ----- files -------------------------------------------------------------------

    /// `writer`: the file's [`origin::OpenWriter`], for a writable handle (taken before
    /// the first change of the handle is journaled).
    fn add_handle(
        &self,
        ino: u64,
        file: File,
        writes_bypass: bool,
        writer: Option<origin::OpenWriter>,
    ) -> u64 {
        self.insert_handle(ino, file, writes_bypass, writer, None)
    }

    /// A read-only handle on a partially present file (see [`lazy`]).
    fn add_lazy_handle(&self, ino: u64, p: Arc<lazy::Partial>) -> FsResult<u64> {
        let file = p.data.try_clone()?;
        Ok(self.insert_handle(ino, file, false, None, Some(p)))
    }

    fn insert_handle(
        &self,
        ino: u64,
        file: File,
        writes_bypass: bool,
        writer: Option<origin::OpenWriter>,
        lazy: Option<Arc<lazy::Partial>>,
    ) -> u64 {
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.handles.write().unwrap().insert(
            fh,
            Arc::new(OpenFile {
                ino,
                file,
                dirty: AtomicBool::new(false),
                writes_bypass,
                reported: Mutex::new(None),
                _writer: writer,
                lazy,
            }),
        );
        fh
    }

    /// The open file behind a handle (also used by the FUSE adapter for passthrough).
    pub fn handle(&self, fh: u64) -> FsResult<Arc<OpenFile>> {
        self.handles
            .read()
            .unwrap()
            .get(&fh)
            .cloned()
            .ok_or(FsError::Stale)
    }

    /// Opens a file (copying it into dst first if needed). Returns the handle and
    /// whether its dst file is open read-write.
    ///
    /// `for_backing`: the kernel will do the I/O on the dst file itself (FUSE
    /// passthrough). Then the dst file is opened read-write when possible (the kernel
    /// shares one backing file among all opens of an inode), and a writable open is
    /// reported dirty at once, since its writes will not pass through the daemon.
    pub fn open(&self, ino: u64, req: OpenRequest) -> FsResult<Opened> {
        self.open_inner(ino, req, true)
    }

    /// Opens a file read-only with its whole content in dst (copied or completed now,
    /// never lazily): a pin prefetch.
    pub fn open_whole(&self, ino: u64) -> FsResult<Opened> {
        let req = OpenRequest {
            flags: libc::O_RDONLY,
            for_backing: false,
        };
        self.open_inner(ino, req, false)
    }

    fn open_inner(&self, ino: u64, req: OpenRequest, allow_lazy: bool) -> FsResult<Opened> {
        let OpenRequest { flags, for_backing } = req;
        if opens_for_writing(flags) {
            self.throttle_writer()?;
        }
        let lazy_from = match &self.lazy {
            Some(l) if allow_lazy && !opens_for_writing(flags) => Some(l.threshold),
            _ => None,
        };
        crate::cache::on_open(&self.cache, self, ino, lazy_from, || {
            Ok(self.node_path(ino)?.0)
        })?; // CACHE HOOK
        let _ns = self.namespace.read().unwrap();
        let (path, kind, merges) = self.node_path(ino)?;
        if kind == Kind::Dir {
            return denied(libc::EISDIR);
        }
        let parent_merges = {
            let t = self.inodes.lock().unwrap();
            path.parent()
                .and_then(|p| t.ino_of(p))
                .and_then(|i| t.get(i).map(|n| n.merge_src))
                .unwrap_or(merges)
        };
        let wanted = open_flags(flags);
        let open_dst = |path: &Path| -> io::Result<(File, bool)> {
            if for_backing {
                // Read-write when it may: the backing file is shared per inode, and a
                // later writer of the inode reuses it.
                let rw_flags = (wanted & !libc::O_ACCMODE) | libc::O_RDWR;
                if let Ok(f) = self.dst.open_file(path, rw_flags) {
                    return Ok((f, true));
                }
            }
            let f = self.dst.open_file(path, wanted)?;
            Ok((f, wanted & libc::O_ACCMODE == libc::O_RDWR))
        };
        // The hot path, a reader of a cached file: open dst's file first (no stat
        // before it); a revalidation that replaces the file sends us the long way.
        let mut fresh = false;
        // Whether dst has the file, when the hot path already found out.
        let mut known_in_dst = None;
        if !opens_for_writing(flags) && flags & libc::O_TRUNC == 0 {
            match open_dst(&path) {
                Ok((file, rw)) => {
                    let freshness = if parent_merges {
                        self.revalidate(ino, &path)?
                    } else {
                        Freshness::Unchanged
                    };
                    match freshness {
                        Freshness::Unchanged => {
                            crate::metrics::cache_hit();
                            let fh = self.add_handle(ino, file, false, None);
                            return Ok(Opened {
                                fh,
                                rw,
                                fresh: self.take_refetched(ino),
                                lazy: false,
                            });
                        }
                        Freshness::Refetched => {
                            fresh = true;
                            known_in_dst = Some(true);
                        }
                        Freshness::Gone => return Err(FsError::not_found()),
                    }
                }
                Err(e) if layer::is_not_found(&e) => known_in_dst = Some(false),
                Err(e) => return Err(e.into()),
            }
        }
        let lazy_candidate = allow_lazy && self.lazy.is_some() && !opens_for_writing(flags);
        // One dst stat serves both checks (a refetch keeps the file in dst).
        let in_dst = match known_in_dst {
            Some(known) => known,
            None => (parent_merges || lazy_candidate) && self.dst.stat(&path)?.is_some(),
        };
        if parent_merges && in_dst && !fresh {
            match self.revalidate(ino, &path)? {
                Freshness::Unchanged => {}
                Freshness::Refetched => fresh = true,
                Freshness::Gone => return Err(FsError::not_found()),
            }
        }
        if lazy_candidate
            && !in_dst
            && let Some(p) = self.lazy_open(&path)?
        {
            if self.lazy_fill {
                let cache = self.cache.clone();
                // CACHE HOOK: room that is free without evicting, as for prefetch.
                p.fill_in_background(move |bytes| crate::cache::on_prefetch(&cache, bytes));
            }
            let fh = self.add_lazy_handle(ino, p)?;
            return Ok(Opened {
                fh,
                rw: false,
                fresh: false,
                lazy: true,
            });
        }
        self.ensure_in_dst(ino, &path, None)?;
        let (file, rw) = open_dst(&path)?;
        let writer = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let guard = if writer {
            self.origins.writer_opened(&file).ok()
        } else {
            None
        };
        let fh = self.add_handle(ino, file, for_backing && writer, guard);
        if for_backing && writer {
            self.note_bypassing_writer(fh)?;
        }
        Ok(Opened {
            fh,
            rw,
            fresh: fresh | self.take_refetched(ino),
            lazy: false,
        })
    }

    /// Makes `[offset, offset + len)` of a lazy handle's file present (on the src
    /// pool, bounded by `--src-timeout`), after the cache budget made room for the
    /// blocks it lacks (ENOSPC if it cannot: nothing is fetched).
    fn lazy_ensure(&self, h: &OpenFile, offset: u64, len: u64) -> FsResult<()> {
        if let Some(p) = &h.lazy
            && !p.installed()
        {
            if p.missing(offset, len) > 0 {
                self.src_gate()?; // blocks already present are served while src is offline
            }
            // CACHE HOOK: the reservation is held until the blocks are reported.
            let room = crate::cache::on_lazy_fetch(&self.cache, self, p.data_rel(), || {
                p.missing(offset, len)
            })?;
            // Waits for a stream of src reads (never a src call on this thread),
            // bounded by --src-timeout without progress.
            let r = crate::metrics::timed(crate::metrics::SrcOp::Fetch, || p.ensure(offset, len));
            if let Some(room) = room {
                // The stream may still be filling the read's last block.
                p.hold_until_fetched(offset, len, Box::new(room));
            }
            self.src_result(r)?;
            p.note_read(offset, len, &|bytes| {
                crate::cache::on_prefetch(&self.cache, bytes) // CACHE HOOK
            });
        }
        Ok(())
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let h = self.handle(fh)?;
        self.lazy_ensure(&h, offset, u64::from(size))?;
        let mut buf = vec![0u8; size as usize];
        let mut done = 0;
        while done < buf.len() {
            match h.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        buf.truncate(done);
        Ok(buf)
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        self.throttle_writer()?;
        let h = self.handle(fh)?;
        // Journaled before the bytes land: a crash in between leaves an op (a write
        // that then fails only costs an upload of unchanged bytes).
        self.mark_dirty(&h)?;
        h.file.write_all_at(data, offset)?;
        Ok(data.len() as u32)
    }

    /// A writable open whose writes will bypass the daemon: the file counts as changed
    /// from now on (recorded at once, so a crash before close loses nothing), and its
    /// current version is remembered so flush/fsync/release can tell later writes.
    fn note_bypassing_writer(&self, fh: u64) -> FsResult<()> {
        let h = self.handle(fh)?;
        self.mark_dirty(&h)?;
        let now = version_of(&layer::fstat(std::os::fd::AsFd::as_fd(&h.file))?);
        *h.reported.lock().unwrap() = Some(now);
        h.dirty.store(false, Ordering::Release);
        Ok(())
    }

    /// First write since the last report: the file is now a local version (never
    /// refetched over), and the content change is recorded (durably).
    fn mark_dirty(&self, h: &OpenFile) -> FsResult<()> {
        if !h.dirty.swap(true, Ordering::AcqRel) {
            let path = self.inodes.lock().unwrap().path(h.ino);
            if let Some(p) = &path {
                self.origins.mark_dirty(p)?;
            }
            if self.changes.is_some() {
                self.record_content(h.ino)?;
            }
        }
        Ok(())
    }

    fn record_content(&self, ino: u64) -> FsResult<Option<PathBuf>> {
        let path = self.inodes.lock().unwrap().path(ino);
        if let Some(p) = &path {
            self.record_each_name(ino, p, |path| Op::Write { path })?;
        }
        Ok(path)
    }

    /// Record `op` for `path` and for every other name the mount knows the inode by
    /// (hard links): replay syncs names, and a src without hard links (rclone) keeps
    /// each name as its own copy, which must get the new bytes and attributes too.
    fn record_each_name(&self, ino: u64, path: &Path, op: impl Fn(PathBuf) -> Op) -> FsResult<()> {
        self.record(op(path.to_path_buf()))?;
        let mut others = self.inodes.lock().unwrap().paths(ino);
        others.retain(|p| p != path);
        for p in others {
            self.record(op(p))?;
        }
        Ok(())
    }

    /// Whether `ino` was refetched since its last open (and forgets it).
    fn take_refetched(&self, ino: u64) -> bool {
        let mut r = self.refetched.lock().unwrap();
        !r.is_empty() && r.remove(&ino)
    }

    /// Whether close() has work to do here ([`CacheFs::flush`]): with writeback. A
    /// change must be journaled (visibly pending) by the time close() returns, and
    /// with FUSE passthrough only the daemon's look at the file at close tells it
    /// changed; RELEASE, which does the same, is asynchronous (close() does not wait
    /// for it). In mirror mode close() also waits for src. Without writeback there is
    /// nothing to do and FLUSH may be turned off.
    pub fn flush_needed(&self) -> bool {
        self.changes.is_some()
    }

    /// close(): in mirror mode, returns once src has the bytes.
    pub fn flush(&self, fh: u64) -> FsResult<()> {
        let h = self.handle(fh)?;
        self.sync_out(&h)
    }

    /// Reports a dirty file again (a replay may have run mid-write) and, in mirror
    /// mode, waits until src holds it.
    fn sync_out(&self, h: &OpenFile) -> FsResult<()> {
        let Some(changes) = &self.changes else {
            return Ok(());
        };
        let mut changed = h.dirty.swap(false, Ordering::AcqRel);
        if h.writes_bypass {
            let now = version_of(&layer::fstat(std::os::fd::AsFd::as_fd(&h.file))?);
            let mut reported = h.reported.lock().unwrap();
            changed |= *reported != Some(now);
            *reported = Some(now);
        }
        let path = if changed {
            // The dst file now holds data src does not: never refetch over it.
            if let Ok((p, _, _)) = self.node_path(h.ino) {
                self.origins.mark_dirty(&p)?;
            }
            self.record_content(h.ino)?
        } else {
            self.node_path(h.ino).ok().map(|(p, _, _)| p)
        };
        // Mirror mode: also an unwritten new file or a truncate still pending must be
        // on src when close/fsync returns (a no-op with asynchronous writeback).
        if let Some(path) = path {
            changes.wait_synced(&path).map_err(FsError::Journal)?;
        }
        Ok(())
    }

    pub fn fsync(&self, fh: u64, datasync: bool) -> FsResult<()> {
        let h = self.handle(fh)?;
        if datasync {
            h.file.sync_data()?;
        } else {
            h.file.sync_all()?;
        }
        self.sync_out(&h)
    }

    /// The last writer of `ino` closed. If an upload ran while it was open (the record
    /// stays dirty then: later writes may not have been reported) and nothing new was
    /// reported since, nothing would ever upload it again and the copy would stay dirty
    /// for good: queue one more upload (of bytes src probably has already).
    fn upload_if_uploaded_while_open(&self, ino: u64) -> FsResult<()> {
        let Some(changes) = &self.changes else {
            return Ok(());
        };
        let Ok((path, _, _)) = self.node_path(ino) else {
            return Ok(());
        };
        if self.origins.uploaded_while_open(&path) && !changes.has_pending(&path) {
            self.record_content(ino)?;
        }
        Ok(())
    }

    pub fn release(&self, fh: u64) -> FsResult<()> {
        let h = self.handles.write().unwrap().remove(&fh);
        match h {
            Some(h) => {
                match &h.lazy {
                    Some(p) if !p.installed() => {
                        // What was read through it is durable in the partial's map.
                        if let Err(e) = p.flush() {
                            log::warn!("{}: cannot sync its partial file: {e}", p.path.display());
                        }
                        p.close_idle();
                        crate::cache::on_partial_used(&self.cache, p.data_rel()) // CACHE HOOK
                    }
                    _ => crate::cache::on_release(&self.cache, || Ok(self.node_path(h.ino)?.0)), // CACHE HOOK
                }
                let synced = self.sync_out(&h);
                let (ino, wrote) = (h.ino, h._writer.is_some());
                drop(h); // the writer guard goes
                if wrote {
                    self.upload_if_uploaded_while_open(ino)?;
                }
                synced
            }
            None => Err(FsError::Stale),
        }
    }

    pub fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> FsResult<()> {
        let h = self.handle(fh)?;
        self.mark_dirty(&h)?; // journaled first, as in `write`
        // SAFETY: valid fd.
        let r = unsafe {
            libc::fallocate(
                h.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                length as libc::off_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error().into());
        }
        Ok(())
    }

    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> FsResult<i64> {
        let h = self.handle(fh)?;
        if let Some(p) = &h.lazy
            && !p.installed()
            && matches!(whence, libc::SEEK_DATA | libc::SEEK_HOLE)
        {
            // Unfetched blocks are holes in dst, not in the file: all of it is data.
            return match offset {
                o if o < 0 || o as u64 >= p.size => denied(libc::ENXIO),
                o if whence == libc::SEEK_DATA => Ok(o),
                _ => Ok(p.size as i64),
            };
        }
        // SAFETY: valid fd; SEEK_DATA/SEEK_HOLE answered by dst's filesystem.
        let r = unsafe { libc::lseek(h.file.as_raw_fd(), offset, whence) };
        if r < 0 {
            return Err(io::Error::last_os_error().into());
        }
        Ok(r)
    }

    pub fn copy_file_range(
        &self,
        fh_in: u64,
        off_in: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
    ) -> FsResult<u64> {
        let (hin, hout) = (self.handle(fh_in)?, self.handle(fh_out)?);
        self.lazy_ensure(&hin, off_in, len)?;
        self.mark_dirty(&hout)?; // journaled first, as in `write`
        let (mut oi, mut oo) = (off_in as i64, off_out as i64);
        // SAFETY: valid fds and offset pointers.
        let r = unsafe {
            libc::copy_file_range(
                hin.file.as_raw_fd(),
                &mut oi,
                hout.file.as_raw_fd(),
                &mut oo,
                len as usize,
                0,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error().into());
        }
        Ok(r as u64)
    }

    // ----- directories -------------------------------------------------------------

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
    fn list_dir(&self, ino: u64) -> FsResult<Arc<[DirItem]>> {
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

    // ----- xattrs ------------------------------------------------------------------

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

    pub fn getxattr(&self, ino: u64, name: &OsStr) -> FsResult<Vec<u8>> {
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
                Err(e) if !is_outage(&e) => {
                    keep.push((name, Err(e.raw_os_error().unwrap_or(libc::EIO))))
                }
                Err(_) => {}
            }
        }
        self.src_ahead.put_xattrs(&dir, xattr, keep.into_iter());
        Some(self.src_result(mine?))
    }

    pub fn listxattr(&self, ino: u64) -> FsResult<Vec<u8>> {
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

    pub fn setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> FsResult<()> {
        crate::cache::on_xattr(&self.cache, name); // CACHE HOOK
        if origin::is_reserved_xattr(name) {
            return denied(libc::EPERM);
        }
        self.xattr_change(ino, |p| self.dst.setxattr(p, name, value, flags))
    }

    pub fn removexattr(&self, ino: u64, name: &OsStr) -> FsResult<()> {
        crate::cache::on_xattr(&self.cache, name); // CACHE HOOK
        if origin::is_reserved_xattr(name) {
            return denied(libc::EPERM);
        }
        self.xattr_change(ino, |p| self.dst.removexattr(p, name))
    }

    /// Whether dst's file system holds POSIX ACLs (its root answers a getxattr of
    /// `system.posix_acl_access` with a value or ENODATA, not EOPNOTSUPP).
    pub fn dst_holds_acls(&self) -> bool {
        match self
            .dst
            .getxattr(Path::new(""), OsStr::new("system.posix_acl_access"))
        {
            Ok(_) => true,
            Err(e) => e.raw_os_error() == Some(libc::ENODATA),
        }
    }

    /// access(2) (only called without default_permissions): existence check.
    pub fn access(&self, ino: u64) -> FsResult<()> {
        self.getattr(ino, None).map(drop)
    }
}

/// S_ISGID kept on directories only (a setgid parent makes new directories setgid).
fn mode_if_dir(st: &Stat) -> u32 {
    if is_dir(st) { libc::S_ISGID } else { 0 }
}

/// open(2) flags for the dst file, from an allowlist: the kernel already handled
/// creation, truncation and appending offsets; O_DIRECT would need aligned buffers the
/// daemon does not have; kernel-internal bits (e.g. `__FMODE_EXEC` of execve) make
/// openat2 fail with EINVAL.
fn open_flags(flags: i32) -> i32 {
    flags & (libc::O_ACCMODE | libc::O_SYNC | libc::O_DSYNC | libc::O_NOATIME | libc::O_LARGEFILE)
}
