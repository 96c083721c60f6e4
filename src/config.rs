//! Plain configuration structs with defaults. Built by `cli`, read by every layer.
//! No parsing or validation here: `cli` validates, everything else trusts these values.

use std::path::PathBuf;
use std::time::Duration;

pub use crate::cache::budget::MinFree;

/// Everything the daemon needs to know, after the command line was validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// The slow directory (e.g. an rclone mount). Absolute, canonical.
    pub src: PathBuf,
    /// The fast cache directory. Absolute, canonical.
    pub dst: PathBuf,
    /// Where the merged view is mounted. Absolute, canonical.
    pub mountpoint: PathBuf,
    /// `-w`: replay mutations on src in the background.
    pub writeback: bool,
    /// `-retries`: attempts per writeback op before it is parked as failed.
    pub retries: u32,
    /// `-concurrent`: writeback workers; 0 = mirror mode (ordered, synchronous fsync/close).
    pub concurrent: u32,
    /// `-retry-delay`: base of the exponential backoff between attempts.
    pub retry_delay: Duration,
    /// `-start-delay`: wait before replaying an op.
    pub start_delay: Duration,
    /// `-d`: debug logging.
    pub debug: bool,
    /// `-log`: one log line per replayed writeback op.
    pub log_writeback: bool,
    /// `-o`: extra FUSE mount options, already split on commas.
    pub mount_options: Vec<String>,
    /// FUSE worker threads.
    pub threads: usize,
    /// Kernel entry/attribute cache TTL.
    pub attr_ttl: Duration,
    /// Use FUSE passthrough for cached files when the kernel allows it (`--no-passthrough` clears).
    pub passthrough: bool,
    /// Offer POSIX ACLs to the kernel (`FUSE_POSIX_ACL`) where dst holds them (`--no-acl` clears).
    pub acl: bool,
    /// `--src-timeout`: longest wait for one src call (zero: unbounded).
    pub src_timeout: Duration,
    /// `--drain-timeout`: at shutdown with `-w`, how long to keep replaying the queue.
    pub drain_timeout: Duration,
    /// `--revalidate`: how old a clean cached file's check against src may get before
    /// the next lookup/open compares it with src again (zero: never).
    pub revalidate: Duration,
    /// `--metrics-addr`: serve Prometheus metrics over HTTP at this address.
    pub metrics_addr: Option<std::net::SocketAddr>,
    // --- cache budget (src/cache/) ---
    /// `--cache-size`: most bytes dst's files may use; least recently used clean
    /// files are evicted above it (None: unbounded).
    pub cache_size: Option<u64>,
    /// `--min-free`: free space to keep on dst's filesystem (bytes or percent).
    pub min_free: Option<MinFree>,
    /// `--pin`: mount-relative globs of files fetched ahead of use and never evicted.
    pub pins: Vec<String>,
    /// `--max-dirty`: bytes waiting for src above which new writers wait for the
    /// writeback (backpressure; see `Writeback::throttle`).
    pub max_dirty: Option<u64>,
    /// `--lazy-threshold`: regular files at least this large are fetched block by block
    /// on demand instead of copied whole at open (0: never).
    pub lazy_threshold: u64,
    /// `--block-size`: the unit of a lazy fetch.
    pub block_size: u64,
    /// `--lazy-fill`: complete partially present files in the background.
    pub lazy_fill: bool,
    /// `--src-settle`: how long after replay renamed away or deleted a file on src it
    /// looks at that name again, for a copy src kept (zero: never; see
    /// `writeback::leftovers`).
    pub src_settle: Duration,
}

impl Config {
    /// A config with GoCacheFS's defaults for the given directories (used by tests).
    pub fn new(src: PathBuf, dst: PathBuf, mountpoint: PathBuf) -> Self {
        Config {
            src,
            dst,
            mountpoint,
            writeback: false,
            retries: 5,
            concurrent: 10,
            retry_delay: Duration::ZERO,
            start_delay: Duration::ZERO,
            debug: false,
            log_writeback: false,
            mount_options: Vec::new(),
            threads: default_threads(),
            attr_ttl: Duration::from_secs(1),
            passthrough: true,
            acl: true,
            src_timeout: DEFAULT_SRC_TIMEOUT,
            revalidate: DEFAULT_REVALIDATE,
            drain_timeout: Duration::from_secs(20),
            metrics_addr: None,
            cache_size: None,
            min_free: None,
            pins: Vec::new(),
            max_dirty: None,
            lazy_threshold: DEFAULT_LAZY_THRESHOLD,
            block_size: DEFAULT_BLOCK_SIZE,
            lazy_fill: false,
            src_settle: DEFAULT_SRC_SETTLE,
        }
    }
}

/// Files at least this large are fetched lazily, block by block (64 MiB).
pub const DEFAULT_LAZY_THRESHOLD: u64 = 64 << 20;

/// The unit of a lazy fetch (1 MiB: one round trip to a bucket, little read-ahead waste).
pub const DEFAULT_BLOCK_SIZE: u64 = 1 << 20;

/// How long one src call may take before it fails with EIO and src counts as offline.
/// Long enough for a slow bucket listing, short enough that a hung rclone mount shows.
pub const DEFAULT_SRC_TIMEOUT: Duration = Duration::from_secs(30);

/// Revalidation interval: other machines' written-back changes show within a minute,
/// while a busy cached file costs at most one src stat a minute.
pub const DEFAULT_REVALIDATE: Duration = Duration::from_secs(60);

/// Leftover checks after `--src-settle`: above rclone's default `--dir-cache-time`
/// (5m), so its listing of the name was read again since the rename or delete.
pub const DEFAULT_SRC_SETTLE: Duration = Duration::from_secs(360);

/// FUSE worker threads by default: one per core, at least 2, at most 8.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(2, 8)
}
