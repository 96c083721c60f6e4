//! Plain configuration structs with defaults. Built by `cli`, read by every layer.
//! No validation here: `cli` validates, everything else trusts these values. The one
//! piece of syntax kept here is the duration (`parse_duration`), because the command
//! line and the control channel (`cachefs ctl set revalidate 30s`) both read it, and
//! `control` must not depend on `cli`. Likewise [`EXIT_USAGE`], the exit status both
//! give a rejected request. This module uses no other module of cachefs.

use std::path::PathBuf;
use std::time::Duration;

/// The exit status for a rejected command line (or a rejected `cachefs ctl` request, or
/// a dst another daemon serves: nothing was done).
pub const EXIT_USAGE: i32 = 2;

/// `--min-free`: free space dst must keep, in bytes or as a percentage of its size.
/// (Parsed by `cache::budget::parse_min_free`, printed by its `Display`, next to the
/// other sizes.)
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum MinFree {
    Bytes(u64),
    /// 0 < percent < 100.
    Percent(f64),
}

impl MinFree {
    /// The free space to keep on a filesystem of `total` bytes.
    pub(crate) fn bytes_of(&self, total: u64) -> u64 {
        match *self {
            MinFree::Bytes(b) => b,
            MinFree::Percent(p) => (total as f64 * p / 100.0) as u64,
        }
    }
}

/// Everything the daemon needs to know, after the command line was validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// The slow directory (e.g. an rclone mount). Absolute, canonical.
    pub(crate) src: PathBuf,
    /// The fast cache directory. Absolute, canonical.
    pub(crate) dst: PathBuf,
    /// Where the merged view is mounted. Absolute, canonical.
    pub(crate) mountpoint: PathBuf,
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
    pub(crate) debug: bool,
    /// `-log`: one log line per replayed writeback op.
    pub log_writeback: bool,
    /// `-o`: extra FUSE mount options, already split on commas.
    pub(crate) mount_options: Vec<String>,
    /// FUSE worker threads.
    pub(crate) threads: usize,
    /// Kernel entry/attribute cache TTL.
    pub attr_ttl: Duration,
    /// Use FUSE passthrough for cached files when the kernel allows it (`--no-passthrough` clears).
    pub(crate) passthrough: bool,
    /// Offer POSIX ACLs to the kernel (`FUSE_POSIX_ACL`) where dst holds them (`--no-acl` clears).
    pub(crate) acl: bool,
    /// Serve extended attributes (`--no-xattr` clears: every xattr call gets ENOSYS, and
    /// the kernel stops sending them).
    pub(crate) xattr: bool,
    /// `--src-timeout`: longest wait for one src call (zero: unbounded).
    pub(crate) src_timeout: Duration,
    /// `--drain-timeout`: at shutdown with `-w`, how long to keep replaying the queue.
    pub(crate) drain_timeout: Duration,
    /// `--revalidate`: how old a clean cached file's check against src may get before
    /// the next lookup/open compares it with src again (zero: never).
    pub revalidate: Duration,
    /// `--metrics-addr`: serve Prometheus metrics over HTTP at this address.
    pub(crate) metrics_addr: Option<std::net::SocketAddr>,
    // --- cache budget (src/cache/) ---
    /// `--cache-size`: most bytes dst's files may use; least recently used clean
    /// files are evicted above it (None: unbounded).
    pub(crate) cache_size: Option<u64>,
    /// `--min-free`: free space to keep on dst's filesystem (bytes or percent).
    pub(crate) min_free: Option<MinFree>,
    /// `--pin`: mount-relative globs of files fetched ahead of use and never evicted.
    pub(crate) pins: Vec<String>,
    /// `--max-dirty`: bytes waiting for src above which new writers wait for the
    /// writeback (backpressure; see `Writeback::throttle`).
    pub(crate) max_dirty: Option<u64>,
    /// `--lazy-threshold`: regular files at least this large are fetched block by block
    /// on demand instead of copied whole at open (0: never).
    pub(crate) lazy_threshold: u64,
    /// `--block-size`: the unit of a lazy fetch.
    pub(crate) block_size: u64,
    /// `--lazy-fill`: complete partially present files in the background.
    pub(crate) lazy_fill: bool,
    /// `--src-settle`: how long after replay renamed away or deleted a file on src it
    /// looks at that name again, for a copy src kept (zero: never; see
    /// `writeback::leftovers`).
    pub(crate) src_settle: Duration,
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
            xattr: true,
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
pub(crate) const DEFAULT_LAZY_THRESHOLD: u64 = 64 << 20;

/// The unit of a lazy fetch (1 MiB: one round trip to a bucket, little read-ahead waste).
pub(crate) const DEFAULT_BLOCK_SIZE: u64 = 1 << 20;

/// How long one src call may take before it fails with EIO and src counts as offline.
/// Long enough for a slow bucket listing, short enough that a hung rclone mount shows.
pub(crate) const DEFAULT_SRC_TIMEOUT: Duration = Duration::from_secs(30);

/// Revalidation interval: other machines' written-back changes show within a minute,
/// while a busy cached file costs at most one src stat a minute.
pub(crate) const DEFAULT_REVALIDATE: Duration = Duration::from_secs(60);

/// Leftover checks after `--src-settle`: above rclone's default `--dir-cache-time`
/// (5m), so its listing of the name was read again since the rename or delete.
pub(crate) const DEFAULT_SRC_SETTLE: Duration = Duration::from_secs(360);

/// FUSE worker threads by default: one per core, at least 2, at most 8.
pub(crate) fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(2, 8)
}

/// A duration >= 0 (`-retry-delay`, `-start-delay`, `--attr-ttl`, `--src-timeout`,
/// `--drain-timeout`, `--revalidate`), written as rclone and Go write them: a number
/// with a unit (`500ms`, `30s`, `5m`, `1h`, `1d`, `1.5h`, `1h30m`; also `us`, `ns`), or
/// a plain number of seconds, fractions allowed (`2`, `0.5`), as GoCacheFS took it.
pub(crate) fn parse_duration(flag: &str, v: &str) -> Result<Duration, String> {
    duration(v.trim()).ok_or_else(|| {
        format!(
            "-{flag} '{v}' is not a duration >= 0; write e.g. -{flag} 30s, -{flag} 500ms, \
                 -{flag} 5m, -{flag} 1h, or a number of seconds (-{flag} 3, -{flag} 0.5)"
        )
    })
}

/// See [`parse_duration`]; `None` for anything else (negative, NaN, no unit between two
/// numbers, an unknown unit, an overflow).
fn duration(s: &str) -> Option<Duration> {
    if s.is_empty() {
        return None;
    }
    if let Ok(secs) = s.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).ok();
    }
    let is_num = |c: char| c.is_ascii_digit() || c == '.';
    let mut total: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let n = rest.find(|c| !is_num(c)).unwrap_or(rest.len());
        let (num, tail) = rest.split_at(n);
        let u = tail.find(is_num).unwrap_or(tail.len());
        let (unit, next) = tail.split_at(u);
        let nanos_per: u128 = match unit {
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "d" => 86_400_000_000_000,
            _ => return None,
        };
        let (int, frac) = num.split_once('.').unwrap_or((num, ""));
        if (int.is_empty() && frac.is_empty()) || frac.contains('.') {
            return None;
        }
        let int: u128 = if int.is_empty() { 0 } else { int.parse().ok()? };
        let frac = if frac.is_empty() {
            0
        } else {
            let f: f64 = format!("0.{frac}").parse().ok()?;
            (f * nanos_per as f64).round() as u128
        };
        total = total.checked_add(int.checked_mul(nanos_per)?.checked_add(frac)?)?;
        rest = next;
    }
    let secs = u64::try_from(total / 1_000_000_000).ok()?;
    Some(Duration::new(secs, (total % 1_000_000_000) as u32))
}
