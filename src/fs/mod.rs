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
//!   `namespace` at most, never holding `inodes` or `handles`. So is `dircache`'s
//!   table, taken holding none of these.
//!   The origin record store's mutex ([`origin::Store`]) is a leaf, taken under any of
//!   these and never holding another; so are `refetched`, `src_absent`'s and
//!   `src_ahead`'s tables, and the dst layer's directory table (see [`layer`]).
//!   The lazy fetch table (`lazy::Lazy`, then a partial's state) is taken under
//!   `copy_flights` or alone (`evict_partial` holds `copy_flights` so that no copy-up
//!   installs the partial it evicts), never holding a core lock; no lock is held
//!   across a block fetch. A partial's state lock may call the cache budget's
//!   `lazy::Usage` hook, which only takes the cache's leaf index lock.
//! - A partially present file (`lazy`) is not at its dst path: for this module it is
//!   src-only until a copy-up completes and installs it.
//!
//! Where things are: this file holds the core's state ([`CacheFs`], its fields and
//! constructor); the operations live by family in `lookup` (lookups, attributes),
//! `create` (create/remove), `rename` (rename, link), `file_io` (handles and file
//! I/O), `dirs` (listings, directory handles), `xattr`, on top of `view` (inodes to
//! paths, paths to layers, whiteouts), `cached` (copy-up, revalidation, eviction),
//! `src_calls` (every src call, outages) and `change` (what is reported to the
//! change log); `attr` holds the attribute types.

mod attr;
mod cached;
pub(crate) mod change;
pub(crate) mod copyup;
mod create;
pub(crate) mod dircache;
mod dirs;
pub(crate) mod error;
mod file_io;
pub(crate) mod hooks;
pub(crate) mod inodes;
pub mod layer;
pub(crate) mod lazy;
mod lookup;
pub mod names;
pub mod origin;
mod rename;
pub(crate) mod reserve;
pub(crate) mod src_absent;
pub(crate) mod src_ahead;
mod src_calls;
pub(crate) mod src_pool;
pub(crate) mod src_probe;
pub(crate) mod src_state;
mod view;
mod xattr;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::SystemTime;

pub use attr::{Attr, Caller, SetAttr, TimeSpec};
pub(crate) use cached::Cached;
pub(crate) use change::{ChangeLog, Op};
use dirs::DirHandle;
pub use error::{FsError, FsResult};
pub use file_io::{OpenFile, OpenRequest, Opened, opens_for_writing};
pub(crate) use hooks::CacheHooks;
pub use inodes::{Kind, ROOT};
use layer::Layer;
pub(crate) use src_calls::is_outage;

use crate::config::Config;

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
    /// What the kernel may keep of each directory's listing (see `dircache`).
    dircache: dircache::DirCache,
    /// `--attr-ttl`: how long the kernel keeps entries and attributes (also the
    /// longest it keeps a listing, see [`CacheFs::opendir_for_kernel`]).
    attr_ttl: std::time::Duration,
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
    /// The cache budget's hooks (see [`hooks`]), called from open, lazy reads,
    /// ensure_in_dst, release and setxattr/removexattr; `None` without a budget or pins.
    cache: hooks::Hooks,
    /// Lazy range fetch of large files (`None` with `--lazy-threshold 0`).
    lazy: Option<Arc<lazy::Lazy>>,
    /// `--lazy-fill`: partials are completed in the background once opened.
    lazy_fill: bool,
}

/// Threads that run src calls; while all are stuck on a stalled src, src calls fail
/// at once.
const SRC_WORKERS: usize = 16;

impl CacheFs {
    /// Opens both roots and loads GoCacheFS whiteouts from dst's root.
    pub fn new(cfg: &Config, changes: Option<Arc<dyn ChangeLog>>) -> FsResult<CacheFs> {
        let src = Arc::new(src_state::open_src(&cfg.src, &cfg.dst)?);
        CacheFs::with_src(cfg, changes, src)
    }

    /// Like [`CacheFs::new`], with src's layer given: the one writeback replays through
    /// too (see [`src_state::open_src`]).
    pub(crate) fn with_src(
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
            dircache: dircache::DirCache::default(),
            attr_ttl: cfg.attr_ttl,
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
            cache: None,
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

    /// Attaches the cache budget (before mounting): its hooks, and its usage index for
    /// lazy fetch's partial files.
    pub(crate) fn set_cache<C: CacheHooks + lazy::Usage + 'static>(&mut self, cache: Arc<C>) {
        if let Some(lazy) = &self.lazy {
            lazy.set_usage(Arc::clone(&cache) as Arc<dyn lazy::Usage>);
        }
        self.cache = Some(cache as Arc<dyn CacheHooks>);
    }
}
