//! Command line: GoCacheFS-compatible flags, validation, and the resulting [`Config`].
//!
//! Guarantees:
//! - Every GoCacheFS flag is accepted the way Go's `flag` package accepts it: `-src /a`,
//!   `-src=/a`, `--src /a`, `--src=/a`, and boolean flags as `-w`, `-w=true`, `-w=false`.
//!   libfuse's attached form `-oallow_other` works too. cachefs's own flags
//!   (`--threads`, `--attr-ttl`, `--no-passthrough`) accept the same spellings.
//! - [`parse`] never touches the system and [`validate`] only looks at it through the
//!   [`Probe`] trait, so every rule is unit-tested with a fake system.
//! - A rejected command line yields exactly one [`CliError`]: a single line that names the
//!   problem and the fix. `main` prints it and exits with status 2 before anything is
//!   mounted or written.
//! - An accepted command line yields a [`Config`] with every field set and the three
//!   directories canonical, existing, distinct, not nested in one another, and the
//!   mountpoint not already a mount point.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::{self, Config};

/// The exit status for a rejected command line.
pub const EXIT_USAGE: i32 = 2;

/// What the command line asks for.
#[derive(Debug)]
pub enum Action {
    /// Mount: the validated configuration.
    Mount(Box<Config>),
    /// `cachefs status DST [--json]`: report the writeback queue of a cache directory.
    Status { dst: PathBuf, json: bool },
    /// `cachefs status DST --watch`: live rates from the running daemon.
    Watch {
        dst: PathBuf,
        interval: Duration,
        count: Option<u64>,
    },
    /// `cachefs ctl DST COMMAND`: a request to the running daemon.
    Ctl {
        dst: PathBuf,
        ctl: crate::control::client::Ctl,
        json: bool,
    },
    /// `cachefs warmup PATH...`.
    Warmup(crate::control::warmup::Warmup),
    /// `--help` or `--version`: print this to stdout and exit 0.
    Print(String),
}

/// A rejected command line: one line naming the problem and the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliError(pub String);

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cachefs: {}", self.0)
    }
}

impl std::error::Error for CliError {}

fn err<T>(msg: impl Into<String>) -> Result<T, CliError> {
    Err(CliError(msg.into()))
}

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

/// The raw command line, after single-dash flags were rewritten (see [`rewrite_args`]).
/// Values stay strings here; [`validate`] turns them into a [`Config`] with clear errors.
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
    pub command: Option<Command>,
    #[command(flatten)]
    pub mount: MountArgs,
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
    fn name(self) -> &'static str {
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

/// The completion script for `shell`, from the clap definitions (so it cannot drift).
pub fn completions(shell: CompletionShell) -> String {
    use clap::CommandFactory;
    use clap_complete::Shell;
    let sh = match shell {
        CompletionShell::Bash => Shell::Bash,
        CompletionShell::Zsh => Shell::Zsh,
        CompletionShell::Fish => Shell::Fish,
    };
    let mut out = Vec::new();
    clap_complete::generate(sh, &mut Cli::command(), "cachefs", &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// The man page cachefs(1), in roff: clap_mangen's sections from the clap definitions
/// (so every flag is there, with its help text), plus the sections a daemon's page
/// needs that clap does not model.
pub fn man_page() -> String {
    use clap::CommandFactory;
    let cmd = Cli::command();
    let man = clap_mangen::Man::new(cmd);
    // .TH by hand: clap_mangen drops an empty date field, which shifts the others (no
    // build date: the page is reproducible).
    let mut page = concat!(
        ".TH CACHEFS 1 \"\" \"cachefs ",
        env!("CARGO_PKG_VERSION"),
        "\" \"User Commands\"\n"
    )
    .to_string();
    let mut out = Vec::new();
    let rendered = man.render_name_section(&mut out).and_then(|()| {
        out.extend_from_slice(MAN_SYNOPSIS.as_bytes());
        man.render_description_section(&mut out)?;
        man.render_options_section(&mut out)
    });
    rendered.expect("writing to a Vec cannot fail");
    page.push_str(&String::from_utf8_lossy(&out));
    page.push_str(MAN_EXTRA);
    page
}

/// The man page's synopsis (clap's lists every flag without its value).
const MAN_SYNOPSIS: &str = r#".SH SYNOPSIS
\fBcachefs\fR \fB\-src\fR \fIDIR\fR \fB\-dst\fR \fIDIR\fR \fB\-mountpoint\fR \fIDIR\fR [\fIFLAGS\fR]
.br
\fBcachefs status\fR \fIDST\fR [\fB\-\-json\fR | \fB\-\-watch\fR [\fB\-\-interval\fR \fIDURATION\fR] [\fB\-\-count\fR \fIN\fR]]
.br
\fBcachefs ctl\fR \fIDST\fR [\fB\-\-json\fR] \fICOMMAND\fR [\fIARGS\fR]
.br
\fBcachefs warmup\fR [\fB\-\-recursive\fR] [\fB\-\-dst\fR \fIDST\fR [\fB\-\-evict\fR]] \fIPATH\fR...
"#;

/// The man page's hand-written sections (roff). Flags are described by clap.
const MAN_EXTRA: &str = r#".SH "GO-STYLE FLAGS"
Every flag can be written the GoCacheFS (Go \fBflag\fR package) way or the GNU way:
\fB\-src /a\fR, \fB\-src=/a\fR, \fB\-\-src /a\fR and \fB\-\-src=/a\fR are the same;
boolean flags also accept \fB\-w=true\fR and \fB\-w=false\fR; \fB\-o\fR also takes
libfuse's attached form \fB\-oallow_other\fR.
.PP
Durations take a unit, as rclone's flags do: \fB500ms\fR, \fB30s\fR, \fB5m\fR,
\fB1h\fR, \fB1d\fR, \fB1h30m\fR (also \fBus\fR, \fBns\fR); a plain number is
seconds, fractions allowed. Sizes take binary units: \fB4K\fR, \fB500M\fR,
\fB20G\fR, \fB1T\fR.
.SH COMMANDS
.TP
\fBcachefs status\fR \fIDST\fR [\fB\-\-json\fR]
Report the state kept in a cache directory, with or without a running daemon:
src online or offline, the writeback queue (pending and failed operations), the
cache budget. \fB\-\-json\fR prints one machine\-readable object. Exit status 0 when
no writeback operation has failed, 1 when failed operations exist, 2 when the
journal cannot be read. An offline src is shown, not judged: the daemon learns that
src is back only at its next call to it.
.TP
\fBcachefs status\fR \fIDST\fR \fB\-\-watch\fR [\fB\-\-interval\fR \fIDURATION\fR] [\fB\-\-count\fR \fIN\fR]
Live rates from the running daemon, over its control channel: cache hits and misses
per second, bytes fetched from src and uploaded to it per second, the writeback queue
(pending, failed, dirty bytes), the mean src call latency, src online or not.
Redrawn in place on a terminal every \fB\-\-interval\fR (default 1s); one plain line
per interval otherwise. \fB\-\-count\fR stops after \fIN\fR refreshes.
.TP
\fBcachefs ctl\fR \fIDST\fR [\fB\-\-json\fR] \fICOMMAND\fR
Steer the daemon serving \fIDST\fR without unmounting, over the Unix socket
\fIDST\fB/.cachefs\-state/control.sock\fR (mode 0600; the daemon also checks the
caller's uid with SO_PEERCRED: only root and the user it runs as are answered).
\fIPATH\fRs are paths through the mount, or relative to the mount's root.
Commands: \fBinfo\fR (pid, mountpoint, limits in force); \fBstats\fR (counters, JSON);
\fBstate\fR [\fB\-\-recursive\fR] \fIPATH\fR... (\fBcached\fR, \fBpartial\fR \fIN\fR%,
\fBdirty\fR, \fBnot cached\fR; \fBpending upload\fR, \fBpinned\fR); \fBretry\fR (retry
failed writeback ops now); \fBrevalidate\fR \fIPATH\fR... (compare with src at next use);
\fBpin\fR / \fBunpin\fR \fIPATH\fR...; \fBevict\fR [\fB\-\-recursive\fR] \fIPATH\fR...
(drop clean copies); \fBset\fR \fBcache\-size\fR|\fBmin\-free\fR|\fBmax\-dirty\fR
\fISIZE\fR|\fBnone\fR, \fBset revalidate\fR \fIDURATION\fR (at once, no remount;
a smaller \fBcache\-size\fR evicts down to it within a second).
\fB\-\-json\fR prints the daemon's answers. Exit status 0 done, 1 failed or refused,
2 bad arguments.
.TP
\fBcachefs warmup\fR [\fB\-\-recursive\fR] \fIPATH\fR...
Fetch files into dst ahead of use by reading them whole through the mount, so the
daemon's own locks and cache budget apply. A progress bar on a terminal (files,
bytes, rate, ETA), plain lines otherwise. Exit status 1 if any file failed (a file
that does not fit the budget fails with ENOSPC; a src error with EIO).
With \fB\-\-dst\fR \fIDST\fR, a file larger than the daemon's \fB\-\-cache\-size\fR
fails at once, unread. \fB\-\-evict\fR \fB\-\-dst\fR \fIDST\fR drops the clean cached
copies of the same files instead (dirty, pending, pinned and open files stay, and are
listed).
.SH SIGNALS
.TP
\fBSIGTERM\fR, \fBSIGINT\fR
Unmount (lazily, with a warning, if the mount is busy), drain the writeback queue for
at most \fB\-\-drain\-timeout\fR, keep the rest in the journal, exit 0. A second
signal exits at once. \fBumount\fR \fIMOUNTPOINT\fR does the same.
.TP
\fBSIGHUP\fR
Reopen src's root, so that a src mounted anew at its path is used from then on, and
log the status summary. Never unmounts (\fBsystemctl reload\fR).
.TP
\fBSIGUSR1\fR
Log the status summary: src online or offline, the writeback queue, failed operations.
.SH "EXIT STATUS"
.TP
\fB0\fR
Clean stop.
.TP
\fB1\fR
Runtime failure (the mount failed, dst unusable, the metrics address taken).
.TP
\fB2\fR
Bad command line, or a \fB\-dst\fR another cachefs serves; nothing was mounted.
Service managers should not restart on it (systemd: \fBRestartPreventExitStatus=2\fR).
.SH ENVIRONMENT
.TP
\fBRUST_LOG\fR
Log filter (e.g. \fBdebug\fR, \fBcachefs=debug\fR); overrides \fB\-d\fR.
.TP
\fBNOTIFY_SOCKET\fR
Set by systemd for \fBType=notify\fR units: cachefs sends \fBREADY=1\fR once the
mount answers and \fBSTOPPING=1\fR at shutdown.
.TP
\fBJOURNAL_STREAM\fR
Set by systemd: when it names cachefs's stderr, log lines carry \fB<N>\fR priority
prefixes and no timestamps.
.TP
\fBCACHEFS_SYSLOG_PREFIX\fR
\fB1\fR forces those prefixes (for \fBlogger \-\-prio\-prefix\fR), \fB0\fR forbids them.
.SH FILES
.TP
\fIDST\fB/.cachefs\-state/\fR
cachefs's state in the cache directory: the lock (one daemon per dst), the
writeback journal, src's last known state, the cache budget, the control socket
\fBcontrol.sock\fR.
.TP
\fB/sbin/mount.fuse.cachefs\fR
The helper for \fBmount \-t fuse.cachefs\fR \fISRC MOUNTPOINT\fR \fB\-o dst=\fR\fIDST\fR[,\fBw\fR,...]
and fstab lines.
.SH EXAMPLES
.nf
cachefs \-src /mnt/uploads\-gcs \-dst /var/cache/uploads \e
    \-mountpoint /var/www/html/wp\-content/uploads \-w \-\-revalidate 60s
cachefs status /var/cache/uploads \-\-json
mount \-t fuse.cachefs /mnt/nfs/share /srv/view \-o dst=/srv/cache,w
.fi
.SH "SEE ALSO"
\fBmount\fR(8), \fBfstab\fR(5), \fBsystemd.service\fR(5), \fBrclone\fR(1);
/usr/share/doc/cachefs/ (README.md, PRODUCTION.md, SEMANTICS.md, CACHE.md, METRICS.md).
"#;

/// The mount flags, as given.
#[derive(Args, Debug, Default, Clone)]
pub struct MountArgs {
    /// The slow directory to cache (e.g. an rclone mount). Required.
    #[arg(long, value_name = "DIR", allow_hyphen_values = true)]
    pub src: Option<OsString>,
    /// The fast cache directory (e.g. on an SSD). Required.
    #[arg(long, value_name = "DIR", allow_hyphen_values = true)]
    pub dst: Option<OsString>,
    /// Where the merged view is mounted. Required.
    #[arg(long, value_name = "DIR", allow_hyphen_values = true)]
    pub mountpoint: Option<OsString>,
    /// Write changes back to src in the background (from a durable journal in dst).
    #[arg(short = 'w')]
    pub writeback: bool,
    /// Attempts per writeback operation before it is parked as failed (then retried
    /// 5 s later, doubling up to every 5 min).
    #[arg(
        long,
        value_name = "N",
        default_value = "5",
        allow_hyphen_values = true
    )]
    pub retries: String,
    /// Writeback workers; 0 = mirror mode (in order, and fsync/close wait for src).
    #[arg(
        long,
        value_name = "N",
        default_value = "10",
        allow_hyphen_values = true
    )]
    pub concurrent: String,
    /// Base delay between writeback attempts (exponential backoff, jitter), e.g. 2s.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "0",
        allow_hyphen_values = true
    )]
    pub retry_delay: String,
    /// How long to wait before replaying a writeback operation (changes in that window
    /// are coalesced), e.g. 5s.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "0",
        allow_hyphen_values = true
    )]
    pub start_delay: String,
    /// Debug logging (RUST_LOG, if set, overrides the log filter).
    #[arg(short = 'd')]
    pub debug: bool,
    /// Log each replayed writeback operation.
    #[arg(long = "log")]
    pub log: bool,
    /// Extra FUSE mount options, comma-separated (e.g. -o allow_other). Repeatable.
    #[arg(
        short = 'o',
        value_name = "OPTIONS",
        action = clap::ArgAction::Append,
        allow_hyphen_values = true
    )]
    pub options: Vec<OsString>,
    /// FUSE worker threads [default: one per core, 2 to 8].
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub threads: Option<String>,
    /// How long the kernel may cache entries and attributes, e.g. 1s or 200ms.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "1s",
        allow_hyphen_values = true
    )]
    pub attr_ttl: String,
    /// Never use FUSE passthrough (serve all reads and writes through the daemon).
    #[arg(long)]
    pub no_passthrough: bool,
    /// Do not offer POSIX ACLs to the kernel (it then checks modes only, as before).
    #[arg(long)]
    pub no_acl: bool,
    /// How long one src call may take before it fails with EIO and src counts as
    /// offline, e.g. 30s (0: wait forever). Copies fail only after this long with no
    /// progress.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "30s",
        allow_hyphen_values = true
    )]
    pub src_timeout: String,
    /// With -w: at shutdown (SIGTERM, unmount), how long to keep replaying the queue on
    /// src before exiting, e.g. 20s; what is left stays in the journal for the next start.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "20s",
        allow_hyphen_values = true
    )]
    pub drain_timeout: String,
    /// After this long (e.g. 60s, 5m), a clean cached file is compared with src again on
    /// its next lookup or open (refetched if src changed, dropped if src deleted it);
    /// 0: never.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "60s",
        allow_hyphen_values = true
    )]
    pub revalidate: String,
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
    pub src_settle: String,
    /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9477. Use a
    /// loopback address: the endpoint has no authentication.
    #[arg(long, value_name = "ADDR", allow_hyphen_values = true)]
    pub metrics_addr: Option<String>,
    /// Most space cached files may take in dst (e.g. 20G, 500M, 1T): above it, least
    /// recently used clean files are evicted (refetched from src on next open).
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    pub cache_size: Option<String>,
    /// Free space to keep on dst's filesystem, a size or a percentage (10G, 5%):
    /// clean files are evicted to keep it.
    #[arg(long, value_name = "SIZE|PERCENT", allow_hyphen_values = true)]
    pub min_free: Option<String>,
    /// Keep files matching GLOB (mount-relative: 'videos/**', '*.jpg') in dst: fetched
    /// ahead of use, never evicted. Repeatable. The xattr user.cachefs.pin on a file or
    /// directory does the same.
    #[arg(
        long = "pin",
        value_name = "GLOB",
        action = clap::ArgAction::Append,
        allow_hyphen_values = true
    )]
    pub pin: Vec<String>,
    /// With -w: data not yet on src above which new writers wait for the writeback
    /// (ENOSPC if src takes nothing for --src-timeout).
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    pub max_dirty: Option<String>,
    /// Files at least this large (e.g. 64M, 1G; 0 turns it off) are not copied whole
    /// when first opened for reading: blocks are fetched from src as reads need them.
    #[arg(
        long,
        value_name = "SIZE",
        default_value = "64M",
        allow_hyphen_values = true
    )]
    pub lazy_threshold: String,
    /// The unit of a lazy fetch (4K to 64M, a multiple of 4K).
    #[arg(
        long,
        value_name = "SIZE",
        default_value = "1M",
        allow_hyphen_values = true
    )]
    pub block_size: String,
    /// Complete lazily fetched files in the background once opened, with room the
    /// cache limits leave free (never evicting for it).
    #[arg(long)]
    pub lazy_fill: bool,
}

/// Flags that take a value, by their long name (also written with one dash).
const VALUE_FLAGS: &[&str] = &[
    "src",
    "dst",
    "mountpoint",
    "retries",
    "concurrent",
    "retry-delay",
    "start-delay",
    "threads",
    "attr-ttl",
    "src-timeout",
    "drain-timeout",
    "revalidate",
    "src-settle",
    "metrics-addr",
    "cache-size",
    "min-free",
    "pin",
    "max-dirty",
    "lazy-threshold",
    "block-size",
    "interval",
    "count",
];
/// Boolean flags with a long name.
const BOOL_LONG_FLAGS: &[&str] = &[
    "log",
    "no-passthrough",
    "no-acl",
    "lazy-fill",
    "json",
    "watch",
    "recursive",
    "evict",
    "help",
    "version",
];
/// Subcommands: the first word that is not a flag (then positional words may follow).
const SUBCOMMANDS: &[&[u8]] = &[b"status", b"man", b"completions", b"ctl", b"warmup"];
/// Boolean flags with a one-letter name (GoCacheFS's `-w`, `-d`; clap's `-h`, `-V`).
const BOOL_SHORT_FLAGS: &[&str] = &["w", "d", "h", "V"];

/// Parse `argv` (including argv[0]) into an [`Action`], validating against the real system.
pub fn parse<I, T>(argv: I) -> Result<Action, CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    parse_with(argv, &HostProbe)
}

/// [`parse`] with an injected view of the system.
pub fn parse_with<I, T>(argv: I, probe: &dyn Probe) -> Result<Action, CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let args = rewrite_args(argv.into_iter().map(Into::into).collect())?;
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => return clap_error(e),
    };
    match cli.command {
        Some(Command::Status {
            dst,
            json,
            watch: true,
            interval,
            count,
        }) => {
            let _ = json;
            let interval = parse_duration("interval", &interval)?;
            if interval.is_zero() {
                return err("--interval must be more than 0; write e.g. --interval 1s");
            }
            Ok(Action::Watch {
                dst,
                interval,
                count,
            })
        }
        Some(Command::Status { dst, json, .. }) => Ok(Action::Status { dst, json }),
        Some(Command::Ctl { dst, json, command }) => {
            use crate::control::client::Ctl;
            let ctl = match command {
                CtlCommand::Info => Ctl::Info,
                CtlCommand::Stats => Ctl::Stats,
                CtlCommand::State { paths, recursive } => Ctl::State { paths, recursive },
                CtlCommand::Retry => Ctl::Retry,
                CtlCommand::Revalidate { paths } => Ctl::Revalidate { paths },
                CtlCommand::Pin { paths } => Ctl::Pin { paths },
                CtlCommand::Unpin { paths } => Ctl::Unpin { paths },
                CtlCommand::Evict { paths, recursive } => Ctl::Evict { paths, recursive },
                CtlCommand::Set { name, value } => {
                    // Checked here so a bad value is a usage error before connecting.
                    crate::control::client::set_request(name.name(), &value).map_err(CliError)?;
                    Ctl::Set {
                        name: name.name().to_string(),
                        value,
                    }
                }
            };
            Ok(Action::Ctl { dst, ctl, json })
        }
        Some(Command::Warmup {
            paths,
            recursive,
            evict,
            dst,
        }) => Ok(Action::Warmup(crate::control::warmup::Warmup {
            paths,
            recursive,
            evict,
            dst,
        })),
        Some(Command::Man) => Ok(Action::Print(man_page())),
        Some(Command::Completions { shell }) => Ok(Action::Print(completions(shell))),
        None => validate(&cli.mount, probe).map(|c| Action::Mount(Box::new(c))),
    }
}

/// Turn a clap error into text to print with exit 0 (help, version) or one line.
fn clap_error(e: clap::Error) -> Result<Action, CliError> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        return Ok(Action::Print(e.to_string()));
    }
    let arg = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    let msg = match (e.kind(), arg) {
        (ErrorKind::UnknownArgument, Some(a)) => {
            format!("unknown argument '{a}'; run 'cachefs --help' to list the flags")
        }
        (ErrorKind::InvalidSubcommand, Some(a)) => {
            format!("unknown argument '{a}'; run 'cachefs --help' to list the flags")
        }
        (ErrorKind::InvalidValue, Some(a)) if a.starts_with('<') => {
            let value = match e.get(ContextKind::InvalidValue) {
                Some(ContextValue::String(v)) => v.clone(),
                _ => String::new(),
            };
            let valid = match e.get(ContextKind::ValidValue) {
                Some(ContextValue::Strings(v)) => v.join(", "),
                _ => String::new(),
            };
            format!("'{value}' is not a valid {a}; use one of: {valid}")
        }
        (ErrorKind::InvalidValue, Some(a)) | (ErrorKind::NoEquals, Some(a)) => format!(
            "flag {} needs a value; write it as {} VALUE",
            go_flag(&a),
            go_flag(&a)
        ),
        _ => {
            // clap's text, minus its usage block, folded onto one line.
            let text = e.to_string();
            let body: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .filter(|l| !l.is_empty() && !l.starts_with("tip:"))
                .collect();
            let body = body.join(" ");
            let body = body.strip_prefix("error: ").unwrap_or(&body);
            format!("{body}; run 'cachefs --help' for usage")
        }
    };
    err(msg)
}

/// `--retry-delay <DURATION>` -> `-retry-delay` (how GoCacheFS users know the flag).
fn go_flag(clap_arg: &str) -> String {
    let name = clap_arg.split([' ', '=']).next().unwrap_or(clap_arg);
    name.strip_prefix('-')
        .filter(|n| n.starts_with('-'))
        .unwrap_or(name)
        .to_string()
}

/// Rewrite Go-style flags into clap's syntax, following Go's `flag` rules: one or two dashes
/// mean the same thing, `-name=value` and `-name value` both work for value flags, and
/// boolean flags accept `=true`/`=false`. A single-dash word that is not a known flag is
/// an unknown flag (Go has no `-abc` = `-a -b -c` clusters); the one exception is libfuse's
/// attached `-oOPTIONS`. Values (the word after a value flag) and everything after `--`
/// pass through untouched, so paths starting with `-` and non-UTF-8 paths survive.
pub fn rewrite_args(argv: Vec<OsString>) -> Result<Vec<OsString>, CliError> {
    let mut out = Vec::with_capacity(argv.len());
    let mut it = argv.into_iter();
    if let Some(argv0) = it.next() {
        out.push(argv0);
    }
    let mut status = false;
    while let Some(arg) = it.next() {
        let bytes = arg.as_bytes();
        if bytes == b"--" {
            let rest: Vec<OsString> = it.collect();
            match rest.first() {
                Some(extra) if !status => return err(unexpected_msg(extra)),
                _ => {}
            }
            out.push(arg);
            out.extend(rest);
            break;
        }
        if !bytes.starts_with(b"-") || bytes == b"-" {
            if out.len() == 1 && SUBCOMMANDS.contains(&bytes) {
                status = true;
            } else if !status {
                return err(unexpected_msg(&arg));
            }
            out.push(arg);
            continue;
        }
        let double = bytes.starts_with(b"--");
        let body = &bytes[if double { 2 } else { 1 }..];
        let (name_bytes, value) = match body.iter().position(|&b| b == b'=') {
            Some(i) => (&body[..i], Some(&body[i + 1..])),
            None => (body, None),
        };
        let shown = String::from_utf8_lossy(bytes).into_owned();
        let Ok(name) = std::str::from_utf8(name_bytes) else {
            return err(unknown_flag_msg(&shown, ""));
        };
        if VALUE_FLAGS.contains(&name) {
            match value {
                Some(v) => out.push(join_os(&format!("--{name}="), v)),
                None => {
                    out.push(format!("--{name}").into());
                    if let Some(v) = it.next() {
                        out.push(v);
                    }
                }
            }
        } else if name == "o" {
            out.push("-o".into());
            match value {
                Some(v) => out.push(OsStr::from_bytes(v).to_os_string()),
                None => {
                    if let Some(v) = it.next() {
                        out.push(v);
                    }
                }
            }
        } else if BOOL_LONG_FLAGS.contains(&name) || BOOL_SHORT_FLAGS.contains(&name) {
            let on = match value {
                None => true,
                Some(v) => parse_go_bool(v).ok_or_else(|| {
                    CliError(format!(
                        "flag -{name} takes no value or =true/=false, got '{shown}'; write -{name} or -{name}=false"
                    ))
                })?,
            };
            if on {
                out.push(if name.len() == 1 {
                    format!("-{name}").into()
                } else {
                    format!("--{name}").into()
                });
            }
        } else if !double && name_bytes.len() > 1 && name_bytes.starts_with(b"o") {
            // libfuse style: -oallow_other,ro
            out.push("-o".into());
            out.push(OsStr::from_bytes(&bytes[2..]).to_os_string());
        } else {
            return err(unknown_flag_msg(&shown, name));
        }
    }
    Ok(out)
}

fn join_os(prefix: &str, value: &[u8]) -> OsString {
    let mut v = prefix.as_bytes().to_vec();
    v.extend_from_slice(value);
    OsString::from_vec(v)
}

/// Go's `strconv.ParseBool`.
fn parse_go_bool(v: &[u8]) -> Option<bool> {
    match v {
        b"1" | b"t" | b"T" | b"true" | b"TRUE" | b"True" => Some(true),
        b"0" | b"f" | b"F" | b"false" | b"FALSE" | b"False" => Some(false),
        _ => None,
    }
}

fn unexpected_msg(arg: &OsStr) -> String {
    let a = arg.to_string_lossy();
    if a == "status" {
        "unexpected argument 'status': the subcommand comes first, as in 'cachefs status DST'"
            .to_string()
    } else {
        format!(
            "unexpected argument '{a}': cachefs takes only flags (e.g. -src DIR); \
             run 'cachefs --help' to list them"
        )
    }
}

fn unknown_flag_msg(shown: &str, name: &str) -> String {
    let all = VALUE_FLAGS
        .iter()
        .chain(BOOL_LONG_FLAGS)
        .chain(["w", "d", "o"].iter());
    // A prefix of a flag (-mount), or a typo: one edit, two for long names.
    let best = all
        .map(|f| {
            let prefix = name.len() >= 3 && f.starts_with(name);
            (if prefix { 0 } else { edit_distance(name, f) }, *f)
        })
        .filter(|(d, _)| *d <= if name.len() >= 6 { 2 } else { 1 })
        .min();
    match best {
        Some((_, f)) => format!(
            "unknown flag '{shown}' (did you mean -{f}?); run 'cachefs --help' to list the flags"
        ),
        None => format!("unknown flag '{shown}'; run 'cachefs --help' to list the flags"),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// How [`validate`] sees the system; [`HostProbe`] is the real one.
pub trait Probe {
    /// `stat` then canonicalize: (canonical path, is a directory).
    fn dir(&self, path: &Path) -> io::Result<(PathBuf, bool)>;
    /// The text of /proc/self/mountinfo.
    fn mountinfo(&self) -> io::Result<String>;
    /// The effective uid.
    fn euid(&self) -> u32;
    /// Whether a setuid mount helper (fusermount3 or fusermount) is in PATH.
    fn has_fusermount(&self) -> bool;
}

/// The real system.
pub struct HostProbe;

impl Probe for HostProbe {
    fn dir(&self, path: &Path) -> io::Result<(PathBuf, bool)> {
        let meta = std::fs::metadata(path)?;
        Ok((std::fs::canonicalize(path)?, meta.is_dir()))
    }
    fn mountinfo(&self) -> io::Result<String> {
        std::fs::read_to_string("/proc/self/mountinfo")
    }
    fn euid(&self) -> u32 {
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() }
    }
    fn has_fusermount(&self) -> bool {
        let Some(path) = std::env::var_os("PATH") else {
            return false;
        };
        std::env::split_paths(&path)
            .any(|d| d.join("fusermount3").is_file() || d.join("fusermount").is_file())
    }
}

/// Validate the mount flags into a [`Config`]. Checks, in order: required flags, numbers,
/// each directory (exists, is a directory, not a dead FUSE mount), the three are distinct
/// and not nested, the mountpoint is not already mounted, and we may mount at all.
pub fn validate(m: &MountArgs, probe: &dyn Probe) -> Result<Config, CliError> {
    let src = required("src", "the slow directory to cache", &m.src)?;
    let dst = required("dst", "the fast cache directory", &m.dst)?;
    let mnt = required(
        "mountpoint",
        "where to mount the merged view",
        &m.mountpoint,
    )?;

    let retries = parse_count("retries", &m.retries)?;
    let concurrent = parse_count("concurrent", &m.concurrent)?;
    let retry_delay = parse_duration("retry-delay", &m.retry_delay)?;
    let start_delay = parse_duration("start-delay", &m.start_delay)?;
    let attr_ttl = parse_duration("attr-ttl", &m.attr_ttl)?;
    let src_timeout = parse_duration("src-timeout", &m.src_timeout)?;
    let revalidate = parse_duration("revalidate", &m.revalidate)?;
    let drain_timeout = parse_duration("drain-timeout", &m.drain_timeout)?;
    let src_settle = parse_duration("src-settle", &m.src_settle)?;
    let threads = match &m.threads {
        None => config::default_threads(),
        Some(t) => parse_threads(t)?,
    };
    let mount_options = split_options(&m.options)?;
    let metrics_addr = m.metrics_addr.as_deref().map(parse_addr).transpose()?;
    let cache = cache_flags(m)?;

    let src = resolve_dir("src", &src, probe.dir(&src))?;
    let dst = resolve_dir("dst", &dst, probe.dir(&dst))?;
    let mnt = resolve_dir("mountpoint", &mnt, probe.dir(&mnt))?;
    check_layout(&src, &dst, &mnt)?;
    match probe.mountinfo() {
        Ok(text) => check_not_mounted(&mnt, &text)?,
        Err(e) => log::debug!("cannot read /proc/self/mountinfo ({e}); skipping the check"),
    }
    check_can_mount(probe.euid(), probe.has_fusermount())?;
    if cache.max_dirty.is_some() && !m.writeback {
        return err(
            "--max-dirty bounds data waiting for writeback, which needs -w: add -w or drop --max-dirty"
                .to_string(),
        );
    }

    Ok(Config {
        src,
        dst,
        mountpoint: mnt,
        writeback: m.writeback,
        retries,
        concurrent,
        retry_delay,
        start_delay,
        debug: m.debug,
        log_writeback: m.log,
        mount_options,
        threads,
        attr_ttl,
        passthrough: !m.no_passthrough,
        acl: !m.no_acl,
        src_timeout,
        revalidate,
        drain_timeout,
        metrics_addr,
        cache_size: cache.cache_size,
        min_free: cache.min_free,
        pins: cache.pins,
        max_dirty: cache.max_dirty,
        lazy_threshold: cache.lazy_threshold,
        block_size: cache.block_size,
        lazy_fill: cache.lazy_fill,
        src_settle,
    })
}

/// The cache budget flags, validated (`--cache-size`, `--min-free`, `--pin`,
/// `--max-dirty`).
pub struct CacheFlags {
    pub cache_size: Option<u64>,
    pub min_free: Option<config::MinFree>,
    pub pins: Vec<String>,
    pub max_dirty: Option<u64>,
    pub lazy_threshold: u64,
    pub block_size: u64,
    pub lazy_fill: bool,
}

/// Validates the cache budget flags of `m`.
pub fn cache_flags(m: &MountArgs) -> Result<CacheFlags, CliError> {
    use crate::cache::{budget, pin};
    let size = |flag: &str, v: &Option<String>| -> Result<Option<u64>, CliError> {
        let Some(v) = v else { return Ok(None) };
        match budget::parse_size(v) {
            Ok(0) => err(format!(
                "--{flag} '{v}' must be more than 0; write e.g. --{flag} 20G"
            )),
            Ok(n) => Ok(Some(n)),
            Err(why) => err(format!(
                "--{flag} '{v}' is not a size ({why}); write e.g. --{flag} 20G or --{flag} 500M"
            )),
        }
    };
    let cache_size = size("cache-size", &m.cache_size)?;
    let max_dirty = size("max-dirty", &m.max_dirty)?;
    let min_free = match &m.min_free {
        None => None,
        Some(v) => match budget::parse_min_free(v) {
            Ok(budget::MinFree::Bytes(0)) => {
                return err(format!(
                    "--min-free '{v}' must be more than 0; write e.g. --min-free 10G or --min-free 5%"
                ));
            }
            Ok(mf) => Some(mf),
            Err(why) => {
                return err(format!(
                    "--min-free '{v}' is not a size or a percentage ({why}); write e.g. --min-free 10G or --min-free 5%"
                ));
            }
        },
    };
    for g in &m.pin {
        if let Err(why) = pin::check_glob(g) {
            return err(format!(
                "--pin '{g}' is not a valid glob ({why}); write e.g. --pin 'videos/**' or --pin '*.jpg'"
            ));
        }
    }
    let lazy_threshold = match budget::parse_size(&m.lazy_threshold) {
        Ok(n) => n,
        Err(why) => {
            return err(format!(
                "--lazy-threshold '{}' is not a size ({why}); write e.g. --lazy-threshold 64M, or 0 to turn lazy fetch off",
                m.lazy_threshold
            ));
        }
    };
    let block_size = match budget::parse_size(&m.block_size) {
        Ok(n) if (4096..=64 << 20).contains(&n) && n % 4096 == 0 => n,
        Ok(_) => {
            return err(format!(
                "--block-size '{}' must be a multiple of 4K between 4K and 64M; write e.g. --block-size 1M",
                m.block_size
            ));
        }
        Err(why) => {
            return err(format!(
                "--block-size '{}' is not a size ({why}); write e.g. --block-size 1M",
                m.block_size
            ));
        }
    };
    if m.lazy_fill && lazy_threshold == 0 {
        return err(
            "--lazy-fill completes lazily fetched files, and --lazy-threshold 0 turns lazy fetch off: drop one of them"
                .to_string(),
        );
    }
    Ok(CacheFlags {
        cache_size,
        min_free,
        pins: m.pin.clone(),
        max_dirty,
        lazy_threshold,
        block_size,
        lazy_fill: m.lazy_fill,
    })
}

fn required(flag: &str, what: &str, v: &Option<OsString>) -> Result<PathBuf, CliError> {
    match v {
        Some(v) if !v.is_empty() => Ok(PathBuf::from(v)),
        _ => err(format!(
            "missing -{flag}: pass -{flag} DIR ({what}); run 'cachefs --help' for usage"
        )),
    }
}

/// A whole number >= 0 (`-retries`, `-concurrent`).
pub fn parse_count(flag: &str, v: &str) -> Result<u32, CliError> {
    v.trim().parse::<u32>().or_else(|_| {
        err(format!(
            "-{flag} '{v}' is not a whole number >= 0; write e.g. -{flag} 5"
        ))
    })
}

/// A duration >= 0 (`-retry-delay`, `-start-delay`, `--attr-ttl`, `--src-timeout`,
/// `--drain-timeout`, `--revalidate`), written as rclone and Go write them: a number
/// with a unit (`500ms`, `30s`, `5m`, `1h`, `1d`, `1.5h`, `1h30m`; also `us`, `ns`), or
/// a plain number of seconds, fractions allowed (`2`, `0.5`), as GoCacheFS took it.
pub fn parse_duration(flag: &str, v: &str) -> Result<Duration, CliError> {
    duration(v.trim()).map_or_else(
        || {
            err(format!(
                "-{flag} '{v}' is not a duration >= 0; write e.g. -{flag} 30s, -{flag} 500ms, \
                 -{flag} 5m, -{flag} 1h, or a number of seconds (-{flag} 3, -{flag} 0.5)"
            ))
        },
        Ok,
    )
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

/// `--threads`: 1 to 1024.
pub fn parse_threads(v: &str) -> Result<usize, CliError> {
    match v.trim().parse::<usize>() {
        Ok(n) if (1..=1024).contains(&n) => Ok(n),
        _ => err(format!(
            "--threads '{v}' is not a thread count from 1 to 1024; write e.g. --threads 4"
        )),
    }
}

/// `--metrics-addr`: an IP address and a port (no host names: nothing is resolved).
pub fn parse_addr(v: &str) -> Result<std::net::SocketAddr, CliError> {
    v.trim().parse().or_else(|_| {
        err(format!(
            "--metrics-addr '{v}' is not an IP address with a port; write e.g. \
             --metrics-addr 127.0.0.1:9477 (or [::1]:9477)"
        ))
    })
}

/// `-o a,b -o c` -> [a, b, c]; empty items are dropped.
pub fn split_options(values: &[OsString]) -> Result<Vec<String>, CliError> {
    let mut out = Vec::new();
    for v in values {
        let Some(s) = v.to_str() else {
            return err(format!(
                "-o '{}' is not valid UTF-8; mount options are plain ASCII words like allow_other",
                v.to_string_lossy()
            ));
        };
        out.extend(
            s.split(',')
                .map(str::trim)
                .filter(|o| !o.is_empty())
                .map(String::from),
        );
    }
    Ok(out)
}

/// Judge the result of probing a directory flag.
pub fn resolve_dir(
    flag: &str,
    given: &Path,
    probed: io::Result<(PathBuf, bool)>,
) -> Result<PathBuf, CliError> {
    let p = given.display();
    match probed {
        Ok((canon, true)) => Ok(canon),
        Ok((_, false)) => err(format!(
            "-{flag} {p} is not a directory; pass a directory (mkdir -p it first if needed)"
        )),
        Err(e) => match e.raw_os_error() {
            Some(libc::ENOENT) => err(format!(
                "-{flag} {p} does not exist; create it with 'mkdir -p {p}' or fix the path"
            )),
            Some(libc::ENOTDIR) => err(format!(
                "-{flag} {p}: a component of the path is not a directory; fix the path"
            )),
            Some(libc::ENOTCONN) => err(format!(
                "-{flag} {p} is a stale FUSE mount (Transport endpoint is not connected: its daemon died); \
                 unmount it with 'fusermount3 -u {p}' or 'umount -l {p}', then start again"
            )),
            Some(libc::EACCES) | Some(libc::EPERM) => err(format!(
                "-{flag} {p}: permission denied; run cachefs as root or fix the permissions of {p}"
            )),
            _ => err(format!("-{flag} {p}: {e}; check the path")),
        },
    }
}

/// src, dst and mountpoint (canonical) must be three distinct directories, none inside another.
pub fn check_layout(src: &Path, dst: &Path, mnt: &Path) -> Result<(), CliError> {
    let dirs = [("src", src), ("dst", dst), ("mountpoint", mnt)];
    for (i, (fa, a)) in dirs.iter().enumerate() {
        for (fb, b) in &dirs[i + 1..] {
            if a == b {
                return err(format!(
                    "-{fa} and -{fb} are the same directory ({}); use a separate directory for each",
                    a.display()
                ));
            }
            for ((fo, outer), (fi, inner)) in [((fa, a), (fb, b)), ((fb, b), (fa, a))] {
                if inner.starts_with(outer) {
                    return err(format!(
                        "-{fi} {} is inside -{fo} {}; use directories that do not contain each other",
                        inner.display(),
                        outer.display()
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The mountpoint (canonical) must not already be a mount point.
pub fn check_not_mounted(mnt: &Path, mountinfo: &str) -> Result<(), CliError> {
    for line in mountinfo.lines() {
        let mut fields = line.split(' ');
        let Some(point) = fields.nth(4) else { continue };
        if Path::new(OsStr::from_bytes(&unescape_mountinfo(point))) != mnt {
            continue;
        }
        let fstype = line
            .split_once(" - ")
            .and_then(|(_, rest)| rest.split(' ').next())
            .unwrap_or("?");
        let m = mnt.display();
        return err(format!(
            "-mountpoint {m} is already a mount point ({fstype}); unmount it first ('umount {m}', \
             or 'fusermount3 -u {m}' for a FUSE mount) or choose another directory"
        ));
    }
    Ok(())
}

/// Undo mountinfo's octal escapes (`\040` for space, `\011`, `\012`, `\134`).
pub fn unescape_mountinfo(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        if let (b'\\', Some(d)) = (b[i], octal) {
            let v =
                u32::from(d[0] - b'0') * 64 + u32::from(d[1] - b'0') * 8 + u32::from(d[2] - b'0');
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// Mounting needs root, or a setuid fusermount3 helper.
pub fn check_can_mount(euid: u32, has_fusermount: bool) -> Result<(), CliError> {
    if euid == 0 || has_fusermount {
        Ok(())
    } else {
        err(format!(
            "cannot mount as uid {euid}: not root and no fusermount3 in PATH; \
             run cachefs as root or install fuse3 ('apt-get install fuse3')"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    /// A fake system: every path under /fake is a directory whose canonical form is itself,
    /// except a few special names.
    struct Fake {
        mountinfo: String,
        euid: u32,
        fusermount: bool,
    }

    impl Default for Fake {
        fn default() -> Self {
            Fake {
                mountinfo: "22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n".into(),
                euid: 0,
                fusermount: false,
            }
        }
    }

    impl Probe for Fake {
        fn dir(&self, path: &Path) -> io::Result<(PathBuf, bool)> {
            let s = path.to_str().unwrap();
            match s {
                "/fake/missing" => Err(io::Error::from_raw_os_error(libc::ENOENT)),
                "/fake/stale" => Err(io::Error::from_raw_os_error(libc::ENOTCONN)),
                "/fake/file" => Ok((path.into(), false)),
                "/fake/link-to-src" => Ok(("/fake/src".into(), true)),
                _ => Ok((path.into(), true)),
            }
        }
        fn mountinfo(&self) -> io::Result<String> {
            Ok(self.mountinfo.clone())
        }
        fn euid(&self) -> u32 {
            self.euid
        }
        fn has_fusermount(&self) -> bool {
            self.fusermount
        }
    }

    fn run(args: &[&str], fake: &Fake) -> Result<Action, CliError> {
        let mut v = vec!["cachefs"];
        v.extend_from_slice(args);
        parse_with(v, fake)
    }

    fn cfg(args: &[&str]) -> Config {
        match run(args, &Fake::default()) {
            Ok(Action::Mount(c)) => *c,
            other => panic!("expected a mount config, got {other:?}"),
        }
    }

    fn fail(args: &[&str]) -> String {
        fail_with(args, &Fake::default())
    }

    fn fail_with(args: &[&str], fake: &Fake) -> String {
        match run(args, fake) {
            Err(e) => {
                let s = e.to_string();
                assert!(!s.contains('\n'), "error must be one line: {s:?}");
                s
            }
            Ok(a) => panic!("expected an error for {args:?}, got {a:?}"),
        }
    }

    const BASE: [&str; 6] = [
        "-src",
        "/fake/src",
        "-dst",
        "/fake/dst",
        "-mountpoint",
        "/fake/mnt",
    ];

    fn with(extra: &[&str]) -> Vec<&'static str> {
        let mut v: Vec<&'static str> = BASE.to_vec();
        for e in extra {
            v.push(Box::leak(e.to_string().into_boxed_str()));
        }
        v
    }

    #[test]
    fn go_single_dash_flags_parse() {
        let c = cfg(&BASE);
        assert_eq!(c.src, Path::new("/fake/src"));
        assert_eq!(c.dst, Path::new("/fake/dst"));
        assert_eq!(c.mountpoint, Path::new("/fake/mnt"));
        assert!(!c.writeback);
        assert_eq!((c.retries, c.concurrent), (5, 10));
        assert_eq!(c.retry_delay, Duration::ZERO);
        assert_eq!(c.start_delay, Duration::ZERO);
        assert_eq!(c.attr_ttl, Duration::from_secs(1));
        assert_eq!(c.threads, config::default_threads());
        assert!(c.passthrough && !c.debug && !c.log_writeback);
        assert!(c.mount_options.is_empty());
    }

    #[test]
    fn double_dash_and_equals_forms_parse() {
        let c = cfg(&[
            "--src",
            "/fake/src",
            "--dst=/fake/dst",
            "-mountpoint=/fake/mnt",
            "-retry-delay=3",
            "--start-delay",
            "1.5",
            "-retries=7",
            "--concurrent=0",
        ]);
        assert_eq!(c.dst, Path::new("/fake/dst"));
        assert_eq!(c.mountpoint, Path::new("/fake/mnt"));
        assert_eq!(c.retry_delay, Duration::from_secs(3));
        assert_eq!(c.start_delay, Duration::from_millis(1500));
        assert_eq!((c.retries, c.concurrent), (7, 0));
    }

    #[test]
    fn every_flag_sets_its_field() {
        let c = cfg(&with(&[
            "-w",
            "-d",
            "-log",
            "-o",
            "allow_other,ro",
            "-o=default_permissions",
            "-onosuid",
            "--threads",
            "3",
            "--attr-ttl=0.25",
            "--no-passthrough",
        ]));
        assert!(c.writeback && c.debug && c.log_writeback && !c.passthrough);
        assert_eq!(
            c.mount_options,
            ["allow_other", "ro", "default_permissions", "nosuid"]
        );
        assert_eq!(c.threads, 3);
        assert_eq!(c.attr_ttl, Duration::from_millis(250));
    }

    #[test]
    fn go_bool_values() {
        assert!(cfg(&with(&["-w=true"])).writeback);
        assert!(!cfg(&with(&["-w=false"])).writeback);
        assert!(cfg(&with(&["--w"])).writeback);
        assert!(cfg(&with(&["-d=1", "-log=T"])).debug);
        assert!(fail(&with(&["-w=maybe"])).contains("-w=false"));
    }

    #[test]
    fn values_that_look_like_flags_pass_through() {
        let v = rewrite_args(os(&["c", "-src", "-weird", "-o", "-x", "-dst=-y"])).unwrap();
        assert_eq!(v, os(&["c", "--src", "-weird", "-o", "-x", "--dst=-y"]));
        let c = cfg(&["-src", "-s", "-dst", "--d", "-mountpoint", "-m", "-o", "-x"]);
        assert_eq!(
            (c.src.as_path(), c.dst.as_path(), c.mountpoint.as_path()),
            (Path::new("-s"), Path::new("--d"), Path::new("-m"))
        );
        assert_eq!(c.mount_options, ["-x"]);
        let v = rewrite_args(os(&["c", "status", "-json", "--", "-dir"])).unwrap();
        assert_eq!(v, os(&["c", "status", "--json", "--", "-dir"]));
    }

    #[test]
    fn help_and_version() {
        for h in ["-h", "--help", "-help"] {
            match run(&[h], &Fake::default()) {
                Ok(Action::Print(text)) => {
                    for flag in [
                        "--src",
                        "--dst",
                        "--mountpoint",
                        "-w",
                        "--retries",
                        "--concurrent",
                        "--retry-delay",
                        "--start-delay",
                        "-d",
                        "--log",
                        "-o",
                        "--threads",
                        "--attr-ttl",
                        "--no-passthrough",
                        "--version",
                        "status",
                    ] {
                        assert!(text.contains(flag), "{h}: help lacks {flag}:\n{text}");
                    }
                }
                other => panic!("{h}: {other:?}"),
            }
        }
        for v in ["--version", "-version", "-V"] {
            match run(&[v], &Fake::default()) {
                Ok(Action::Print(text)) => assert!(text.contains(env!("CARGO_PKG_VERSION"))),
                other => panic!("{v}: {other:?}"),
            }
        }
    }

    #[test]
    fn status_subcommand() {
        match run(&["status", "/x", "--json"], &Fake::default()) {
            Ok(Action::Status { dst, json }) => {
                assert_eq!(dst, Path::new("/x"));
                assert!(json);
            }
            other => panic!("{other:?}"),
        }
        match run(&["status", "/x"], &Fake::default()) {
            Ok(Action::Status { json, .. }) => assert!(!json),
            other => panic!("{other:?}"),
        }
        let e = fail(&["status"]);
        assert!(e.contains("<DST>") && e.contains("cachefs --help"), "{e}");
        assert!(matches!(
            run(&["status", "-json", "/x"], &Fake::default()),
            Ok(Action::Status { json: true, .. })
        ));
    }

    #[test]
    fn missing_flags() {
        assert!(fail(&[]).contains("missing -src"));
        assert!(fail(&["-src", "/fake/src"]).contains("missing -dst"));
        assert!(fail(&["-src", "/fake/src", "-dst", "/fake/dst"]).contains("missing -mountpoint"));
        assert!(fail(&["-src=", "-dst", "/a", "-mountpoint", "/b"]).contains("missing -src"));
        // A value flag at the very end has no value.
        assert!(fail(&["-src"]).contains("-src"));
    }

    #[test]
    fn unknown_flags() {
        let e = fail(&with(&["-mount", "/x"]));
        assert!(
            e.contains("unknown flag '-mount'") && e.contains("--help"),
            "{e}"
        );
        let e = fail(&with(&["-retry_delay=3"]));
        assert!(e.contains("did you mean -retry-delay"), "{e}");
        let e = fail(&with(&["--bogus"]));
        assert!(e.contains("unknown flag '--bogus'"), "{e}");
        let e = fail(&with(&["-x"]));
        assert!(e.contains("unknown flag '-x'"), "{e}");
        let e = fail(&with(&["-foo"]));
        assert!(!e.contains("did you mean"), "{e}");
        let e = fail(&with(&["-mount", "/x"]));
        assert!(e.contains("did you mean -mountpoint"), "{e}");
        let e = fail(&with(&["stray"]));
        assert!(e.contains("unexpected argument 'stray'"), "{e}");
        let e = fail(&with(&["--", "-d"]));
        assert!(e.contains("unexpected argument '-d'"), "{e}");
        let e = fail(&with(&["status", "/x"]));
        assert!(e.contains("subcommand comes first"), "{e}");
        // A trailing `--` is harmless, as in Go.
        cfg(&with(&["--"]));
    }

    #[test]
    fn bad_numbers() {
        for (flag, bad) in [
            ("-retries", "abc"),
            ("-retries", "-1"),
            ("-concurrent", "1.5"),
            ("-retry-delay", "soon"),
            ("-start-delay", "-2"),
            ("--attr-ttl", "NaN"),
            ("--threads", "0"),
            ("--threads", "x"),
        ] {
            let e = fail(&with(&[flag, bad]));
            assert!(
                e.contains(bad) && e.contains("write e.g."),
                "{flag} {bad}: {e}"
            );
        }
    }

    #[test]
    fn durations_take_units() {
        let ms = Duration::from_millis;
        for (v, want) in [
            ("0", Duration::ZERO),
            ("2", ms(2000)),
            ("0.5", ms(500)),
            (" 1.25 ", ms(1250)),
            ("500ms", ms(500)),
            ("30s", ms(30_000)),
            ("1.5s", ms(1500)),
            ("5m", ms(300_000)),
            ("1h", ms(3_600_000)),
            ("1.5h", ms(5_400_000)),
            ("1h30m", ms(5_400_000)),
            ("2m30s", ms(150_000)),
            ("1d", ms(86_400_000)),
            ("0s", Duration::ZERO),
            (".5s", ms(500)),
            ("250us", Duration::from_micros(250)),
            ("10ns", Duration::from_nanos(10)),
        ] {
            assert_eq!(parse_duration("x", v).unwrap(), want, "{v}");
        }
        for bad in [
            "",
            "s",
            "-1s",
            "-2",
            "1x",
            "5 m",
            "1.2.3s",
            "NaN",
            "inf",
            "1h-5m",
            "1e3s",
            "m5",
            "99999999999999999999999h",
        ] {
            let e = parse_duration("revalidate", bad).unwrap_err().to_string();
            assert!(
                e.contains("is not a duration") && e.contains("-revalidate 30s"),
                "{bad}: {e}"
            );
        }
        let c = cfg(&with(&[
            "--attr-ttl",
            "250ms",
            "-retry-delay=2s",
            "-start-delay",
            "1m",
            "--src-timeout=1h",
            "--drain-timeout",
            "45s",
            "--revalidate",
            "5m",
        ]));
        assert_eq!(c.attr_ttl, ms(250));
        assert_eq!(c.retry_delay, ms(2000));
        assert_eq!(c.start_delay, ms(60_000));
        assert_eq!(c.src_timeout, ms(3_600_000));
        assert_eq!(c.drain_timeout, ms(45_000));
        assert_eq!(c.revalidate, ms(300_000));
    }

    #[test]
    fn directory_problems() {
        let e = fail(&[
            "-src",
            "/fake/missing",
            "-dst",
            "/fake/d",
            "-mountpoint",
            "/fake/m",
        ]);
        assert!(e.contains("-src /fake/missing does not exist") && e.contains("mkdir -p"));
        let e = fail(&[
            "-src",
            "/fake/s",
            "-dst",
            "/fake/file",
            "-mountpoint",
            "/fake/m",
        ]);
        assert!(e.contains("-dst /fake/file is not a directory"), "{e}");
        let e = fail(&[
            "-src",
            "/fake/s",
            "-dst",
            "/fake/d",
            "-mountpoint",
            "/fake/stale",
        ]);
        assert!(
            e.contains("stale FUSE mount")
                && e.contains("fusermount3 -u /fake/stale")
                && e.contains("umount -l /fake/stale"),
            "{e}"
        );
    }

    #[test]
    fn same_or_nested_directories() {
        let e = fail(&[
            "-src",
            "/fake/src",
            "-dst",
            "/fake/link-to-src",
            "-mountpoint",
            "/fake/m",
        ]);
        assert!(e.contains("-src and -dst are the same directory"), "{e}");
        let e = fail(&[
            "-src",
            "/fake/a",
            "-dst",
            "/fake/b",
            "-mountpoint",
            "/fake/a",
        ]);
        assert!(e.contains("-src and -mountpoint are the same"), "{e}");
        let e = fail(&[
            "-src",
            "/fake/s",
            "-dst",
            "/fake/s/cache",
            "-mountpoint",
            "/fake/m",
        ]);
        assert!(
            e.contains("-dst /fake/s/cache is inside -src /fake/s"),
            "{e}"
        );
        let e = fail(&[
            "-src",
            "/fake/s",
            "-dst",
            "/fake/d",
            "-mountpoint",
            "/fake/d/m",
        ]);
        assert!(
            e.contains("-mountpoint /fake/d/m is inside -dst /fake/d"),
            "{e}"
        );
        let e = fail(&[
            "-src",
            "/fake/m/s",
            "-dst",
            "/fake/d",
            "-mountpoint",
            "/fake/m",
        ]);
        assert!(
            e.contains("-src /fake/m/s is inside -mountpoint /fake/m"),
            "{e}"
        );
        // A common prefix that is not a path prefix is fine.
        check_layout(
            Path::new("/fake/s"),
            Path::new("/fake/s2"),
            Path::new("/fake/m"),
        )
        .unwrap();
    }

    #[test]
    fn already_mounted() {
        let fake = Fake {
            mountinfo: "22 1 0:21 / / rw - ext4 /dev/vda1 rw\n\
                        40 22 0:35 / /fake/m\\040x rw,relatime - tmpfs tmpfs rw\n"
                .into(),
            ..Fake::default()
        };
        let e = fail_with(
            &[
                "-src",
                "/fake/s",
                "-dst",
                "/fake/d",
                "-mountpoint",
                "/fake/m x",
            ],
            &fake,
        );
        assert!(
            e.contains("already a mount point (tmpfs)") && e.contains("umount /fake/m x"),
            "{e}"
        );
        // A mount below or beside the mountpoint is not a problem.
        assert!(matches!(
            run(
                &[
                    "-src",
                    "/fake/s",
                    "-dst",
                    "/fake/d",
                    "-mountpoint",
                    "/fake/m"
                ],
                &fake
            ),
            Ok(Action::Mount(_))
        ));
    }

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mountinfo("/a\\040b\\134c\\011"), b"/a b\\c\t");
        assert_eq!(unescape_mountinfo("/plain\\"), b"/plain\\");
        assert_eq!(unescape_mountinfo("/x\\09"), b"/x\\09");
    }

    #[test]
    fn mount_permission() {
        let fake = Fake {
            euid: 1000,
            ..Fake::default()
        };
        let e = fail_with(&BASE, &fake);
        assert!(
            e.contains("not root") && e.contains("apt-get install fuse3"),
            "{e}"
        );
        let fake = Fake {
            euid: 1000,
            fusermount: true,
            ..Fake::default()
        };
        assert!(matches!(run(&BASE, &fake), Ok(Action::Mount(_))));
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn lazy_fetch_flags() {
        let c = cfg(&with(&[]));
        assert_eq!((c.lazy_threshold, c.block_size), (64 << 20, 1 << 20));
        let c = cfg(&with(&["--lazy-threshold", "1G", "-block-size=256K"]));
        assert_eq!((c.lazy_threshold, c.block_size), (1 << 30, 256 << 10));
        assert_eq!(cfg(&with(&["--lazy-threshold", "0"])).lazy_threshold, 0);
        assert!(!c.lazy_fill);
        assert!(cfg(&with(&["-lazy-fill"])).lazy_fill);
        for (args, needle) in [
            (
                &["--lazy-threshold", "big"][..],
                "--lazy-threshold 'big' is not a size",
            ),
            (&["--block-size", "1000"][..], "must be a multiple of 4K"),
            (&["--block-size", "0"][..], "between 4K and 64M"),
            (&["--block-size", "128M"][..], "between 4K and 64M"),
            (&["--block-size", "x"][..], "--block-size 'x' is not a size"),
            (
                &["--lazy-fill", "--lazy-threshold", "0"][..],
                "--lazy-fill completes lazily fetched files",
            ),
        ] {
            let e = fail_with(&with(args), &Fake::default());
            assert!(e.contains(needle), "{args:?}: {e}");
        }
    }

    #[test]
    fn cache_budget_flags() {
        let c = cfg(&with(&[
            "--cache-size",
            "20G",
            "-min-free=5%",
            "--pin",
            "videos/**",
            "-pin",
            "*.jpg",
            "--max-dirty",
            "1.5G",
            "-w",
        ]));
        assert_eq!(c.cache_size, Some(20 << 30));
        assert_eq!(c.min_free, Some(config::MinFree::Percent(5.0)));
        assert_eq!(c.pins, vec!["videos/**".to_string(), "*.jpg".into()]);
        assert_eq!(c.max_dirty, Some(3 << 29));
        let c = cfg(&with(&["--min-free", "10G"]));
        assert_eq!(c.min_free, Some(config::MinFree::Bytes(10 << 30)));
        assert_eq!(c.cache_size, None);
        assert!(c.pins.is_empty());
        for (args, needle) in [
            (
                &["--cache-size", "20X"][..],
                "--cache-size '20X' is not a size",
            ),
            (&["--cache-size", "0"][..], "must be more than 0"),
            (&["--cache-size", "-5G"][..], "is not a size"),
            (
                &["--min-free", "150%"][..],
                "--min-free '150%' is not a size or a percentage",
            ),
            (
                &["--min-free", "lots"][..],
                "write e.g. --min-free 10G or --min-free 5%",
            ),
            (&["--pin", "a/[b"][..], "--pin 'a/[b' is not a valid glob"),
            (&["--max-dirty", "x"][..], "--max-dirty 'x' is not a size"),
            (
                &["--max-dirty", "1G"][..],
                "--max-dirty bounds data waiting for writeback, which needs -w",
            ),
        ] {
            let e = fail(&with(args));
            assert!(e.contains(needle), "{args:?}: {e}");
        }
    }
}
