//! The command line's clap definitions: subcommands, the mount flags, their help texts
//! (what `--help`, the man page and the completions show). Values stay strings here;
//! `validate` turns them into a [`Config`](crate::config::Config) with clear errors.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

const ABOUT: &str = "Mount a fast local cache directory (dst) in front of a slow directory (src).";

const LONG_ABOUT: &str = "\
cachefs mounts a merged view of SRC and DST at MOUNTPOINT. Reads of a file that is not \
in DST copy it from SRC first; every change happens in DST. With -w, changes are also \
written back to SRC in the background, from a durable journal kept in DST.

A drop-in replacement for GoCacheFS: the same flags, written with one dash (-src /a, \
-src=/a) or two (--src /a).";

const AFTER_HELP: &str = "\
Examples:
  cachefs -src /mnt/uploads-gcs -dst /mnt/uploads-cache -mountpoint /app/uploads -w
  cachefs -src /dirA -dst /dirB -mountpoint /mnt/mirror -w -concurrent 0
  cachefs status /mnt/uploads-cache --json

Stop with SIGTERM or SIGINT (or unmount MOUNTPOINT): cachefs unmounts, drains the \
writeback queue for a bounded time, keeps the rest in the journal, and exits 0. SIGHUP \
does not stop it: it reopens SRC's root (picks up a SRC mounted anew at its path) and \
logs the status summary; SIGUSR1 logs the summary only.
Durations take units: 500ms, 30s, 5m, 1h, 1h30m; a plain number is seconds (0.5 too).
Exit status: 0 clean exit, 1 runtime failure, 2 bad command line.";

/// The raw command line, after single-dash flags were rewritten (see
/// `rewrite_args`). Values stay strings here;
/// `validate` turns them into a [`Config`](crate::config::Config)
/// with clear errors.
#[derive(Parser, Debug)]
#[command(
    name = "cachefs",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = AFTER_HELP,
    args_conflicts_with_subcommands = true,
    disable_help_subcommand = true,
    color = clap::ColorChoice::Never
)]
pub struct Cli {
    #[command(subcommand)]
    pub(crate) command: Option<Command>,
    #[command(flatten)]
    pub(crate) mount: MountArgs,
}

/// Subcommands (none: mount).
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Report the state kept in a cache directory: src online/offline, the writeback
    /// queue (pending, failed ops), the cache budget. Works with or without a daemon.
    Status {
        /// The cache directory (the -dst of the mount).
        #[arg(value_name = "DST")]
        dst: PathBuf,
        /// Print machine-readable JSON instead of text.
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// Show live rates from the running daemon (hits, misses, bytes fetched and
        /// uploaded per second, queue, src latency), refreshed in place on a terminal,
        /// one line per interval otherwise.
        #[arg(long)]
        watch: bool,
        /// With --watch: seconds between refreshes (a duration: 1s, 500ms, 2).
        #[arg(
            long,
            value_name = "DURATION",
            default_value = "1s",
            requires = "watch"
        )]
        interval: String,
        /// With --watch: stop after N refreshes.
        #[arg(long, value_name = "N", requires = "watch")]
        count: Option<u64>,
    },
    /// Control the daemon serving DST, without unmounting: retry failed writeback,
    /// revalidate, pin, evict, change limits, show per-path state. Only root or the
    /// user the daemon runs as may (a Unix socket in DST's state folder).
    Ctl {
        /// The cache directory (the -dst of the running mount).
        #[arg(value_name = "DST")]
        dst: PathBuf,
        /// Print the daemon's answers as JSON.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: CtlCommand,
    },
    /// Fetch files into the cache ahead of use, through the mount (honouring the
    /// daemon's locks and cache budget), with progress; or drop clean cached copies
    /// (--evict). Exit status 1 if any file failed.
    Warmup {
        /// Files or directories inside a cachefs mount.
        #[arg(value_name = "PATH", required = true)]
        paths: Vec<PathBuf>,
        /// Warm (or evict) everything below the directories given.
        #[arg(long)]
        recursive: bool,
        /// Drop the clean cached copies instead (dirty, pending, pinned or open files
        /// stay); asks the daemon, so --dst is needed.
        #[arg(long, requires = "dst")]
        evict: bool,
        /// The mount's cache directory: needed by --evict; when fetching, files larger
        /// than the daemon's --cache-size then fail at once, unread.
        #[arg(long, value_name = "DST")]
        dst: Option<PathBuf>,
    },
    /// Print the man page (roff), generated from these definitions: `cachefs man |
    /// man -l -`. For packaging.
    #[command(hide = true)]
    Man,
    /// Print a completion script for SHELL (bash, zsh, fish), generated from these
    /// definitions. For packaging.
    #[command(hide = true)]
    Completions {
        #[arg(value_enum, value_name = "SHELL")]
        shell: CompletionShell,
    },
}

/// `cachefs ctl DST COMMAND`. PATHs are inside the mount (absolute, or relative to the
/// current directory in the mount) or relative to the mount's root.
#[derive(Subcommand, Debug)]
pub enum CtlCommand {
    /// The daemon's pid, mountpoint and the limits in force.
    Info,
    /// The daemon's counters since start, as JSON.
    Stats,
    /// Per-path state: cached, partial N%, dirty, not cached; pending upload, pinned.
    State {
        #[arg(value_name = "PATH")]
        paths: Vec<PathBuf>,
        /// Also every path below, as dst holds them.
        #[arg(long)]
        recursive: bool,
    },
    /// Retry the writeback ops parked as failed now.
    Retry,
    /// Compare the cached files at or below PATH with src at their next use (refetch
    /// changed ones, drop deleted ones), and forget names src was seen to lack.
    Revalidate {
        #[arg(value_name = "PATH")]
        paths: Vec<PathBuf>,
    },
    /// Pin PATH (fetched ahead, never evicted): the user.cachefs.pin xattr.
    Pin {
        #[arg(value_name = "PATH", required = true)]
        paths: Vec<PathBuf>,
    },
    /// Unpin PATH.
    Unpin {
        #[arg(value_name = "PATH", required = true)]
        paths: Vec<PathBuf>,
    },
    /// Drop clean cached copies at PATH (dirty, pending, pinned, open files stay).
    Evict {
        #[arg(value_name = "PATH", required = true)]
        paths: Vec<PathBuf>,
        /// Also everything below.
        #[arg(long)]
        recursive: bool,
    },
    /// Change a limit now, without remounting: cache-size, min-free, max-dirty
    /// (sizes, or none) or revalidate (a duration).
    Set {
        #[arg(value_enum, value_name = "NAME")]
        name: Setting,
        #[arg(value_name = "VALUE", allow_hyphen_values = true)]
        value: String,
    },
}

/// What `cachefs ctl DST set` changes.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setting {
    CacheSize,
    MinFree,
    MaxDirty,
    Revalidate,
}

impl Setting {
    pub(super) fn name(self) -> &'static str {
        match self {
            Setting::CacheSize => "cache-size",
            Setting::MinFree => "min-free",
            Setting::MaxDirty => "max-dirty",
            Setting::Revalidate => "revalidate",
        }
    }
}

/// The shells `cachefs completions` writes scripts for.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

/// The mount flags, as given.
#[derive(Args, Debug, Default, Clone)]
pub struct MountArgs {
    /// The slow directory to cache (e.g. an rclone mount). Required.
    #[arg(long, value_name = "DIR", allow_hyphen_values = true)]
    pub(crate) src: Option<OsString>,
    /// The fast cache directory (e.g. on an SSD). Required.
    #[arg(long, value_name = "DIR", allow_hyphen_values = true)]
    pub(crate) dst: Option<OsString>,
    /// Where the merged view is mounted. Required.
    #[arg(long, value_name = "DIR", allow_hyphen_values = true)]
    pub(crate) mountpoint: Option<OsString>,
    /// Write changes back to src in the background (from a durable journal in dst).
    #[arg(short = 'w')]
    pub(crate) writeback: bool,
    /// Attempts per writeback operation before it is parked as failed (then retried
    /// 5 s later, doubling up to every 5 min).
    #[arg(
        long,
        value_name = "N",
        default_value = "5",
        allow_hyphen_values = true
    )]
    pub(crate) retries: String,
    /// Writeback workers; 0 = mirror mode (in order, and fsync/close wait for src).
    #[arg(
        long,
        value_name = "N",
        default_value = "10",
        allow_hyphen_values = true
    )]
    pub(crate) concurrent: String,
    /// Base delay between writeback attempts (exponential backoff, jitter), e.g. 2s.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "0",
        allow_hyphen_values = true
    )]
    pub(crate) retry_delay: String,
    /// How long to wait before replaying a writeback operation (changes in that window
    /// are coalesced), e.g. 5s.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "0",
        allow_hyphen_values = true
    )]
    pub(crate) start_delay: String,
    /// Debug logging (RUST_LOG, if set, overrides the log filter).
    #[arg(short = 'd')]
    pub(crate) debug: bool,
    /// Log each replayed writeback operation.
    #[arg(long = "log")]
    pub(crate) log: bool,
    /// Extra FUSE mount options, comma-separated (e.g. -o allow_other). Repeatable.
    #[arg(
        short = 'o',
        value_name = "OPTIONS",
        action = clap::ArgAction::Append,
        allow_hyphen_values = true
    )]
    pub(crate) options: Vec<OsString>,
    /// FUSE worker threads [default: one per core, 2 to 8].
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub(crate) threads: Option<String>,
    /// How long the kernel may cache entries and attributes, e.g. 1s or 200ms.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "1s",
        allow_hyphen_values = true
    )]
    pub(crate) attr_ttl: String,
    /// Never use FUSE passthrough (serve all reads and writes through the daemon).
    #[arg(long)]
    pub(crate) no_passthrough: bool,
    /// Do not offer POSIX ACLs to the kernel (it then checks modes only, as before).
    #[arg(long)]
    pub(crate) no_acl: bool,
    /// Serve no extended attributes (no ACLs either): the kernel stops asking, so
    /// `ls -l` of a big directory costs no xattr round trip per entry.
    #[arg(long)]
    pub(crate) no_xattr: bool,
    /// How long one src call may take before it fails with EIO and src counts as
    /// offline, e.g. 30s (0: wait forever). Copies fail only after this long with no
    /// progress.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "30s",
        allow_hyphen_values = true
    )]
    pub(crate) src_timeout: String,
    /// With -w: at shutdown (SIGTERM, unmount), how long to keep replaying the queue on
    /// src before exiting, e.g. 20s; what is left stays in the journal for the next start.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "20s",
        allow_hyphen_values = true
    )]
    pub(crate) drain_timeout: String,
    /// After this long (e.g. 60s, 5m), a clean cached file is compared with src again on
    /// its next lookup or open (refetched if src changed, dropped if src deleted it);
    /// 0: never.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "60s",
        allow_hyphen_values = true
    )]
    pub(crate) revalidate: String,
    /// With -w: how long after a file was renamed away or deleted on src its old name
    /// is looked at again, to remove a copy src kept there (rclone can keep one when the
    /// rename or delete came during its own upload). Set it above rclone's
    /// --dir-cache-time plus --vfs-write-back; 0: never look.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "6m",
        allow_hyphen_values = true
    )]
    pub(crate) src_settle: String,
    /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9477. Use a
    /// loopback address: the endpoint has no authentication.
    #[arg(long, value_name = "ADDR", allow_hyphen_values = true)]
    pub(crate) metrics_addr: Option<String>,
    /// Most space cached files may take in dst (e.g. 20G, 500M, 1T): above it, least
    /// recently used clean files are evicted (refetched from src on next open).
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    pub(crate) cache_size: Option<String>,
    /// Free space to keep on dst's filesystem, a size or a percentage (10G, 5%):
    /// clean files are evicted to keep it.
    #[arg(long, value_name = "SIZE|PERCENT", allow_hyphen_values = true)]
    pub(crate) min_free: Option<String>,
    /// Keep files matching GLOB (mount-relative: 'videos/**', '*.jpg') in dst: fetched
    /// ahead of use, never evicted. Repeatable. The xattr user.cachefs.pin on a file or
    /// directory does the same.
    #[arg(
        long = "pin",
        value_name = "GLOB",
        action = clap::ArgAction::Append,
        allow_hyphen_values = true
    )]
    pub(crate) pin: Vec<String>,
    /// With -w: data not yet on src above which new writers wait for the writeback
    /// (ENOSPC if src takes nothing for --src-timeout).
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    pub(crate) max_dirty: Option<String>,
    /// Files at least this large (e.g. 64M, 1G; 0 turns it off) are not copied whole
    /// when first opened for reading: blocks are fetched from src as reads need them.
    #[arg(
        long,
        value_name = "SIZE",
        default_value = "64M",
        allow_hyphen_values = true
    )]
    pub(crate) lazy_threshold: String,
    /// The unit of a lazy fetch (4K to 64M, a multiple of 4K).
    #[arg(
        long,
        value_name = "SIZE",
        default_value = "1M",
        allow_hyphen_values = true
    )]
    pub(crate) block_size: String,
    /// Complete lazily fetched files in the background once opened, with room the
    /// cache limits leave free (never evicting for it).
    #[arg(long)]
    pub(crate) lazy_fill: bool,
}
