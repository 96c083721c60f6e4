//! Running the daemon: set up the process, build the layers from a [`Config`], mount, and
//! serve in the foreground until a signal or an external unmount.
//!
//! Guarantees:
//! - Process setup happens before any thread exists: logging (env_logger on stderr; `-d` =
//!   debug, else info; `RUST_LOG` overrides; no colors unless stderr is a terminal; when
//!   stderr is the journal stream systemd connected, `<N>` syslog priority prefixes and no
//!   timestamps), umask 0 (the core sets every mode explicitly and relies on it),
//!   RLIMIT_NOFILE soft limit raised to the hard limit, and SIGINT/SIGTERM/SIGHUP/SIGUSR1
//!   blocked in every thread so only [`run`]'s loop receives them (synchronously, with
//!   `sigtimedwait`: no async-signal-safety concerns).
//! - SIGTERM or SIGINT unmounts the filesystem (lazily, with a warning, if it is busy: open
//!   files keep working until closed; a second signal exits at once), drains writeback for
//!   at most `--drain-timeout` (default 20 s), and [`run`] returns `Ok` (exit 0). An
//!   external `umount` ends the session the same way.
//! - SIGHUP never unmounts: it reopens src's root (a src mounted anew at its path is used
//!   from then on, even while a detached old mount still answers) and logs the status
//!   summary (src online or offline, the writeback queue), then keeps serving. A src that
//!   hangs cannot hold the loop: the reopen waits at most `--src-timeout` (5 s if 0).
//!   SIGUSR1 logs the same summary without the reopen.
//! - Mount failures come back as a [`DaemonError`] whose message says what to do.
//! - Before touching anything else, the daemon takes dst's lock (`crate::dst_lock`) and
//!   holds it until it exits: a second daemon on the same dst is refused, in every mode.
//!   A second *mount* of a dst that a daemon serves, with the same src and writeback
//!   mode, is what mounting a block device twice is: a second view of the one
//!   filesystem. Then this process bind-mounts the holder's mount at its mountpoint and
//!   exits 0 (root only; otherwise it is refused like a second daemon). The holder,
//!   told to stop by a signal, unmounts those views with its own mount; an external
//!   `umount` of one of them leaves the others serving, and the daemon exits when the
//!   last is gone (the kernel ends the FUSE connection then).

use std::ffi::CString;
use std::fmt;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::Arc;

use log::{debug, error, info, warn};

use crate::config::Config;
use crate::fs::CacheFs;
use crate::fs::layer::Layer;

/// How often the main loop checks whether the session ended (external unmount).
const POLL: Duration = Duration::from_millis(100);

/// Why the daemon could not run (exit status: [`DaemonError::exit_code`]).
#[derive(Debug)]
pub enum DaemonError {
    /// Another daemon serves this dst (exit status 2, like a mountpoint that is
    /// already mounted: the command line names a directory that is taken).
    DstInUse {
        dst: PathBuf,
        holder: crate::dst_lock::Holder,
    },
    /// A second view of the holder's mount (see the module doc) could not be bound.
    Share {
        mountpoint: PathBuf,
        holder_mountpoint: PathBuf,
        source: io::Error,
    },
    /// Blocking the shutdown signals failed.
    Signals(io::Error),
    /// The writeback journal/workers could not start.
    Writeback(String),
    /// The filesystem core could not be built (e.g. dst unusable).
    Fs(String),
    /// Mounting failed.
    Mount {
        mountpoint: PathBuf,
        source: io::Error,
    },
    /// The FUSE session ended with an error.
    Session(io::Error),
    /// `--metrics-addr` could not be bound (checked before mounting).
    Metrics {
        addr: std::net::SocketAddr,
        source: io::Error,
    },
}

impl DaemonError {
    /// 2 for a directory the command line names that another daemon holds (nothing was
    /// mounted or written), 1 for every other failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            DaemonError::DstInUse { .. } | DaemonError::Share { .. } => crate::config::EXIT_USAGE,
            _ => 1,
        }
    }
}

impl fmt::Display for DaemonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DaemonError::DstInUse { dst, holder } => {
                let who = match (holder.pid, &holder.mountpoint) {
                    (Some(pid), Some(m)) => format!(" (pid {pid}, mounted at {})", m.display()),
                    (Some(pid), None) => format!(" (pid {pid})"),
                    (None, _) => String::new(),
                };
                let serving = match (&holder.src, &holder.mode) {
                    (Some(src), Some(mode)) => {
                        format!(", serving -src {} in {mode} mode", src.display())
                    }
                    _ => String::new(),
                };
                write!(
                    f,
                    "-dst {} is in use by another cachefs{who}{serving}; two daemons on one \
                     dst would diverge: stop that one first or use another -dst (a second \
                     mount with the same -src and writeback mode, as root, becomes a view of \
                     that mount)",
                    dst.display()
                )
            }
            DaemonError::Share {
                mountpoint,
                holder_mountpoint,
                source,
            } => write!(
                f,
                "cannot mount at {}: dst is served by the cachefs mounted at {}, and binding \
                 that mount here failed ({source}); a second view of a mount needs root \
                 (CAP_SYS_ADMIN); otherwise give this mount its own -dst",
                mountpoint.display(),
                holder_mountpoint.display()
            ),
            DaemonError::Signals(e) => write!(f, "cannot block shutdown signals: {e}"),
            DaemonError::Writeback(e) => write!(f, "cannot start writeback: {e}"),
            DaemonError::Fs(e) => write!(f, "cannot open the cache: {e}"),
            DaemonError::Mount { mountpoint, source } => {
                let m = mountpoint.display();
                let text = source.to_string();
                if text.contains("user_allow_other") || text.contains("/dev/fuse is mode") {
                    // fusermount's refusal, or the checks before it: the text says what
                    // to do.
                    return write!(f, "cannot mount at {m}: {source}");
                }
                match mount_errno(source) {
                    Some(libc::EPERM) | Some(libc::EACCES) => write!(
                        f,
                        "cannot mount at {m}: permission denied ({source}); run cachefs as root, \
                         or install fuse3 (fusermount3) and, for -o allow_other, add \
                         user_allow_other to /etc/fuse.conf"
                    ),
                    Some(libc::ENOENT) | Some(libc::ENODEV) if !Path::new("/dev/fuse").exists() => {
                        write!(
                            f,
                            "cannot mount at {m}: /dev/fuse is missing; load the FUSE module \
                             ('modprobe fuse') or install it ('apt-get install fuse3')"
                        )
                    }
                    Some(libc::ENOENT) => write!(
                        f,
                        "cannot mount at {m}: {source}; install fuse3 ('apt-get install fuse3') \
                         or run cachefs as root"
                    ),
                    Some(libc::ENODEV) => write!(
                        f,
                        "cannot mount at {m}: the kernel has no FUSE support ({source}); \
                         load it with 'modprobe fuse'"
                    ),
                    Some(libc::EINVAL) => write!(
                        f,
                        "cannot mount at {m}: the kernel rejected the mount ({source}); \
                         check the -o options"
                    ),
                    _ if source.kind() == io::ErrorKind::PermissionDenied => write!(
                        f,
                        "cannot mount at {m}: {source}; run cachefs as root, or add \
                         user_allow_other to /etc/fuse.conf for -o allow_other"
                    ),
                    _ => write!(f, "cannot mount at {m}: {source}"),
                }
            }
            DaemonError::Session(e) => write!(f, "the FUSE session failed: {e}"),
            DaemonError::Metrics { addr, source } => write!(
                f,
                "cannot serve metrics at {addr}: {source}; pick a free port on a local \
                 address for --metrics-addr (e.g. 127.0.0.1:9477)"
            ),
        }
    }
}

impl std::error::Error for DaemonError {}

/// The errno behind a mount failure: fuser reports some as `io::Error`s with an errno, and
/// mount(2) failures as text ending in nix's "EINVAL: Invalid argument".
fn mount_errno(e: &io::Error) -> Option<i32> {
    if let Some(n) = e.raw_os_error() {
        return Some(n);
    }
    let text = e.to_string();
    let named = [
        ("EPERM", libc::EPERM),
        ("EACCES", libc::EACCES),
        ("ENOENT", libc::ENOENT),
        ("ENODEV", libc::ENODEV),
        ("EINVAL", libc::EINVAL),
        ("EBUSY", libc::EBUSY),
    ];
    named
        .iter()
        .find(|(name, _)| text.contains(&format!("{name}:")))
        .map(|(_, n)| *n)
        .or(match e.kind() {
            io::ErrorKind::PermissionDenied => Some(libc::EACCES),
            io::ErrorKind::NotFound => Some(libc::ENOENT),
            _ => None,
        })
}

/// Print a fatal error for `main`: one line on stderr, with the syslog "error" priority
/// prefix when stderr goes to journald (see `syslog_prefixes`) so it records it as an
/// error.
pub fn print_error(e: &DaemonError) {
    let prio = if syslog_prefixes() { "<3>" } else { "" };
    eprintln!("{prio}cachefs: {e}");
}

/// Forces (`1`) or forbids (`0`) `<N>` syslog priority prefixes on log lines, whatever
/// stderr is. The fstab helper sets it to 1 when it pipes the log into
/// `logger --prio-prefix`.
pub(crate) const SYSLOG_PREFIX_ENV: &str = "CACHEFS_SYSLOG_PREFIX";

/// Whether log lines start with a `<N>` syslog priority prefix (and carry no timestamp):
/// as [`SYSLOG_PREFIX_ENV`] says, else when stderr *is* the journal stream systemd
/// connected. systemd.exec(5): `JOURNAL_STREAM` holds the device and inode of that
/// stream, for comparing with stderr; the variable alone proves nothing, since children
/// inherit it (mount(8) run by a .mount unit, then the fstab helper piping cachefs into
/// logger or a file), and there the prefixes would be printed literally.
fn syslog_prefixes() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        match std::env::var(SYSLOG_PREFIX_ENV).as_deref() {
            Ok("1") => return true,
            Ok("0") => return false,
            _ => {}
        }
        let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
            return false;
        };
        // SAFETY: fd 2 is only borrowed for an fstat; it stays open for the process.
        let stderr = unsafe { std::os::fd::BorrowedFd::borrow_raw(2) };
        fd_is_stream(stderr, &stream.to_string_lossy())
    })
}

/// Whether `fd` is the file `stream` ("DEV:INO", in decimal, as in `JOURNAL_STREAM`) names.
fn fd_is_stream(fd: std::os::fd::BorrowedFd<'_>, stream: &str) -> bool {
    use std::os::fd::AsRawFd;
    let Some((dev, ino)) = stream.trim().split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    // SAFETY: all-zero bytes are a valid libc::stat (plain integers).
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into `st`; the fd is valid for the call.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return false;
    }
    st.st_dev == dev && st.st_ino == ino
}

/// Mount and serve until a signal or an external unmount; `Ok` means a clean exit.
pub fn run(cfg: Config) -> Result<(), DaemonError> {
    init_logging(cfg.debug);
    // SAFETY: umask only changes this process's file creation mask.
    unsafe { libc::umask(0) };
    // Held until we return: writeback drains with it, after the unmount.
    let _dst_lock = match take_dst_lock(&cfg)? {
        DstClaim::Own(lock) => lock,
        DstClaim::Share(holder_mountpoint) => return share_mount(&cfg, &holder_mountpoint),
    };
    raise_nofile_limit();
    keep_big_allocations_mapped();
    // Before any thread is spawned, so that every thread inherits the blocked mask.
    let signals = Signals::block().map_err(DaemonError::Signals)?;
    debug!("configuration: {cfg:?}");

    // After blocking signals (its threads inherit the mask); before mounting, so a
    // taken port fails the start with nothing mounted.
    let metrics = start_metrics(&cfg)?;
    // A normal user's mount needs /dev/fuse open to them, and -o allow_other needs
    // user_allow_other: say so before starting anything.
    crate::fuse::fusermount::check_can_mount(crate::fuse::mount_options(&cfg).1).map_err(
        |source| DaemonError::Mount {
            mountpoint: cfg.mountpoint.clone(),
            source,
        },
    )?;
    // One src gateway for the view and writeback replay alike (the mount-root rule).
    let src = crate::fs::src_state::open_src(&cfg.src, &cfg.dst)
        .map(Arc::new)
        .map_err(|e| DaemonError::Fs(format!("src {}: {e}", cfg.src.display())))?;
    let wb = start_writeback(&cfg, &src)?;
    let result = mount_and_serve(&cfg, src, wb.clone(), &signals);
    sd_notify("STOPPING=1\nSTATUS=stopping");
    if let Some(wb) = &wb {
        // Drain only after a clean unmount; after a failure or a forced exit the
        // journal keeps the queue for the next start.
        let max_wait = match result {
            Ok(Stop::Clean) => cfg.drain_timeout,
            _ => Duration::ZERO,
        };
        info!("stopping writeback (waiting at most {max_wait:?} for the queue to drain)");
        wb.shutdown(max_wait);
    }
    if let Some(m) = metrics {
        m.stop();
    }
    // A failure is printed by `main` (see `print_error`), not logged twice.
    if result.is_ok() {
        info!("cachefs exiting: {} unmounted", cfg.mountpoint.display());
    }
    result.map(|_| ())
}

/// What [`take_dst_lock`] got: dst's lock, or the mountpoint of the daemon that holds
/// it and serves what this one would (see the module doc).
enum DstClaim {
    Own(crate::dst_lock::DstLock),
    Share(PathBuf),
}

/// The writeback mode as dst's lock records it: one word.
fn mode_word(cfg: &Config) -> &'static str {
    match (cfg.writeback, cfg.concurrent) {
        (false, _) => "plain",
        (true, 0) => "mirror",
        (true, _) => "writeback",
    }
}

/// The mountpoint of `holder`'s mount, if this daemon's mount can be a second view of
/// it: the same src and mode, and the holder's mount is up (a FUSE mount there).
fn shareable(cfg: &Config, holder: &crate::dst_lock::Holder) -> Option<PathBuf> {
    if holder.src.as_deref() != Some(cfg.src.as_path())
        || holder.mode.as_deref() != Some(mode_word(cfg))
    {
        return None;
    }
    let mnt = holder.mountpoint.clone()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    crate::mountinfo::mounts(&info)
        .any(|m| m.point == mnt && m.fstype.starts_with("fuse"))
        .then_some(mnt)
}

/// Bind the holder's mount at our mountpoint: a second view of one filesystem.
fn share_mount(cfg: &Config, holder_mountpoint: &Path) -> Result<(), DaemonError> {
    let fail = |source| DaemonError::Share {
        mountpoint: cfg.mountpoint.clone(),
        holder_mountpoint: holder_mountpoint.to_path_buf(),
        source,
    };
    let from = CString::new(holder_mountpoint.as_os_str().as_bytes())
        .map_err(|_| fail(io::Error::from_raw_os_error(libc::EINVAL)))?;
    let to = CString::new(cfg.mountpoint.as_os_str().as_bytes())
        .map_err(|_| fail(io::Error::from_raw_os_error(libc::EINVAL)))?;
    // SAFETY: both are valid NUL-terminated paths that outlive the call; a bind mount
    // reads no fstype or data.
    let rc = unsafe {
        libc::mount(
            from.as_ptr(),
            to.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(fail(io::Error::last_os_error()));
    }
    info!(
        "{} serves {} over {} already, mounted at {}: {} is now a second view of that mount \
         (a bind mount; that mount's options apply). This process exits; that daemon serves \
         both.",
        cfg.dst.display(),
        cfg.src.display(),
        cfg.dst.display(),
        holder_mountpoint.display(),
        cfg.mountpoint.display()
    );
    sd_notify("READY=1\nSTATUS=a second view of the cachefs mount it binds");
    Ok(())
}

/// dst's lock (see [`crate::dst_lock`]); a dst that cannot hold one (read-only, say) is
/// reported as the cache it is.
///
/// A holder whose mountpoint is no longer mounted is on its way out (unmounted, now
/// draining its writeback queue): then this waits for it, up to its drain timeout and
/// a margin, so that `umount M; mount M` works. A holder still mounted is refused at
/// once.
fn take_dst_lock(cfg: &Config) -> Result<DstClaim, DaemonError> {
    use crate::dst_lock::LockError;
    let claim = crate::dst_lock::Claim {
        mountpoint: &cfg.mountpoint,
        src: &cfg.src,
        mode: mode_word(cfg),
    };
    let deadline = std::time::Instant::now() + cfg.drain_timeout + Duration::from_secs(10);
    let mut told = false;
    loop {
        match crate::dst_lock::acquire(&cfg.dst, claim) {
            Ok(lock) => return Ok(DstClaim::Own(lock)),
            Err(LockError::Busy(holder))
                if std::time::Instant::now() < deadline && holder_is_exiting(&holder) =>
            {
                if !std::mem::replace(&mut told, true) {
                    info!(
                        "{}: waiting for the previous cachefs (pid {}) to finish exiting",
                        cfg.dst.display(),
                        holder.pid.map_or("?".into(), |p| p.to_string())
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(LockError::Busy(holder)) => {
                if let Some(mnt) = shareable(cfg, &holder) {
                    return Ok(DstClaim::Share(mnt));
                }
                return Err(DaemonError::DstInUse {
                    dst: cfg.dst.clone(),
                    holder,
                });
            }
            Err(LockError::Io(e)) => return Err(DaemonError::Fs(e.to_string())),
        }
    }
}

/// Whether the daemon holding a dst's lock no longer has its mount (it is exiting).
fn holder_is_exiting(holder: &crate::dst_lock::Holder) -> bool {
    let Some(mnt) = &holder.mountpoint else {
        return false;
    };
    std::fs::read_to_string("/proc/self/mountinfo")
        .is_ok_and(|info| crate::cli::check_not_mounted(mnt, &info).is_ok())
}

/// Tells systemd (Type=notify units) about our state (see [`crate::systemd::notify`]).
pub(crate) fn sd_notify(state: &str) {
    crate::systemd::notify(state)
}

/// Serve `--metrics-addr`, if given (see [`crate::metrics`]).
fn start_metrics(cfg: &Config) -> Result<Option<crate::metrics::MetricsServer>, DaemonError> {
    let Some(addr) = cfg.metrics_addr else {
        return Ok(None);
    };
    let server =
        crate::metrics::serve(addr).map_err(|source| DaemonError::Metrics { addr, source })?;
    let bound = server.local_addr();
    info!("serving metrics at http://{bound}/metrics");
    if !bound.ip().is_loopback() {
        warn!("metrics at {bound} are reachable from other machines and have no authentication");
    }
    Ok(Some(server))
}

/// How long to wait for the kernel's FUSE INIT after mounting.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The writeback journal and workers (`-w`), shared by the core and the daemon.
type Writeback = Arc<crate::writeback::Writeback>;

/// Start the writeback journal and workers when `-w` is given.
fn start_writeback(cfg: &Config, src: &Arc<Layer>) -> Result<Option<Writeback>, DaemonError> {
    if !cfg.writeback {
        return Ok(None);
    }
    crate::writeback::Writeback::start_with_src(cfg, Arc::clone(src))
        .map(Some)
        .map_err(|e| DaemonError::Writeback(e.to_string()))
}

/// `cachefs status DST [--json]`: the exit status of the writeback status report.
pub fn run_status(dst: &Path, json: bool) -> i32 {
    crate::status::run(dst, json)
}

/// How serving ended.
enum Stop {
    /// Unmounted (by us after a signal, or externally) and the session finished.
    Clean,
    /// A second signal while a lazily detached mount was still in use.
    Forced,
}

fn mount_and_serve(
    cfg: &Config,
    src: Arc<Layer>,
    wb: Option<Writeback>,
    signals: &Signals,
) -> Result<Stop, DaemonError> {
    let changes = wb.clone().map(|w| w as Arc<dyn crate::fs::ChangeLog>);
    let mut fs = CacheFs::with_src(cfg, changes, Arc::clone(&src))
        .map_err(|e| DaemonError::Fs(e.to_string()))?;
    // The cache budget (src/cache/): usage rebuilt from dst before mounting.
    let cache = crate::cache::Cache::open(cfg)
        .map_err(|e| DaemonError::Fs(format!("cache budget: {e}")))?;
    if let Some(c) = &cache {
        fs.set_cache(Arc::clone(c));
    }
    let fs = Arc::new(fs);
    if let Some(c) = &cache {
        c.start(Arc::downgrade(&fs));
    }
    let hup = Hup {
        src,
        fs: Arc::clone(&fs),
        wb: wb.clone(),
        timeout: if cfg.src_timeout.is_zero() {
            HUP_REOPEN_TIMEOUT
        } else {
            cfg.src_timeout
        },
        pending: None,
    };
    // The control channel listens before the mount appears (and before READY=1):
    // `cachefs ctl` run as soon as the mount is there reaches this daemon.
    let control = start_control(cfg, &hup.fs, &cache, &wb);
    let mounted = match crate::fuse::spawn_mount(fs, cfg) {
        Ok(m) => m,
        Err(source) => {
            if let Some(c) = control {
                c.stop();
            }
            return Err(DaemonError::Mount {
                mountpoint: cfg.mountpoint.clone(),
                source,
            });
        }
    };
    let session = mounted.session;
    // The mount answers once the kernel's INIT has been answered. Never check by
    // touching the mount from here: a daemon blocked in a request to itself cannot
    // be killed cleanly.
    if mounted.ready.recv_timeout(READY_TIMEOUT).is_err() {
        warn!(
            "{}: the kernel did not initialise the mount within {READY_TIMEOUT:?}",
            cfg.mountpoint.display()
        );
    }
    sd_notify("READY=1\nSTATUS=serving");
    info!(
        "cachefs mounted {} over {} at {} (writeback: {})",
        cfg.src.display(),
        cfg.dst.display(),
        cfg.mountpoint.display(),
        writeback_mode(cfg)
    );
    let stop = serve(session, signals, &cfg.mountpoint, hup);
    if let Some(c) = control {
        c.stop();
    }
    if let Some(c) = &cache {
        c.shutdown(); // persist the LRU and cache.json
    }
    stop
}

/// "off", "on N workers" or "mirror", for the mount log line.
pub(crate) fn writeback_mode(cfg: &Config) -> String {
    match (cfg.writeback, cfg.concurrent) {
        (false, _) => "off".into(),
        (true, 0) => "mirror".into(),
        (true, n) => format!("on {n} workers"),
    }
}

/// The control channel (`cachefs ctl`, `warmup --evict`, `status --watch`); a
/// daemon that cannot open it serves anyway, with a warning.
fn start_control(
    cfg: &Config,
    fs: &Arc<CacheFs>,
    cache: &Option<Arc<crate::cache::Cache>>,
    wb: &Option<Writeback>,
) -> Option<crate::control::Server> {
    let path = crate::control::socket_path(&cfg.dst);
    let target = crate::control::Target {
        fs: Arc::clone(fs),
        cache: cache.clone(),
        wb: wb.clone(),
        dst: cfg.dst.clone(),
        mountpoint: cfg.mountpoint.clone(),
    };
    match crate::control::Server::start(&path, target) {
        Ok(s) => {
            debug!("control channel at {}", path.display());
            Some(s)
        }
        Err(e) => {
            warn!(
                "cannot open the control channel at {} ({e}); cachefs ctl will not reach this daemon",
                path.display()
            );
            None
        }
    }
}

/// How long SIGHUP's reopen of src's root may take with `--src-timeout 0`.
const HUP_REOPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// What SIGHUP and SIGUSR1 act on.
struct Hup {
    /// src's root, shared by the view and writeback replay.
    src: Arc<Layer>,
    fs: Arc<CacheFs>,
    wb: Option<Writeback>,
    /// How long to wait for src's root to reopen.
    timeout: Duration,
    /// A reopen that outlived `timeout` (src hangs): its result, once it has one.
    pending: Option<crossbeam_channel::Receiver<io::Result<()>>>,
}

impl Hup {
    /// SIGHUP: reopen src's root, then log the summary. The reopen runs on a thread of
    /// its own so that a hung src cannot keep this loop from seeing SIGTERM.
    fn reload(&mut self) {
        let root = self.src.root_path().display().to_string();
        let still_waiting = self
            .pending
            .as_ref()
            .is_some_and(|rx| rx.try_recv().is_err_and(|e| e.is_empty()));
        if still_waiting {
            warn!("SIGHUP: the previous reopen of src {root} is still waiting for src");
        } else {
            let (tx, rx) = crossbeam_channel::bounded(1);
            let src = Arc::clone(&self.src);
            let spawned = std::thread::Builder::new()
                .name("cachefs-sighup".into())
                .spawn(move || {
                    let _ = tx.send(src.reopen());
                });
            self.pending = None;
            match spawned {
                Err(e) => warn!("SIGHUP: cannot reopen src {root}: {e}"),
                Ok(_) => match rx.recv_timeout(self.timeout) {
                    Ok(Ok(())) => info!("SIGHUP: reopened src {root}"),
                    Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOTCONN) => warn!(
                        "SIGHUP: src {root} is not a mount point now; keeping the current src root"
                    ),
                    Ok(Err(e)) => warn!(
                        "SIGHUP: cannot reopen src {root} ({e}); keeping the current src root"
                    ),
                    Err(_) => {
                        warn!(
                            "SIGHUP: src {root} did not answer within {:?}; keeping the current src root",
                            self.timeout
                        );
                        self.pending = Some(rx);
                    }
                },
            }
        }
        self.summary("SIGHUP");
    }

    /// SIGUSR1 (and SIGHUP): src's state and the writeback queue, in the log.
    fn summary(&self, sig: &str) {
        let root = self.src.root_path().display();
        match self.fs.src_offline_since() {
            None => info!("{sig}: src {root} is online"),
            Some(t) => {
                let ago = t.elapsed().unwrap_or_default().as_secs();
                info!("{sig}: src {root} is OFFLINE (since {ago}s ago)");
            }
        }
        match &self.wb {
            Some(wb) => wb.log_summary(),
            None => info!("{sig}: writeback is off (no -w); nothing queued"),
        }
    }
}

fn serve(
    session: fuser::BackgroundSession,
    signals: &Signals,
    mnt: &Path,
    mut hup: Hup,
) -> Result<Stop, DaemonError> {
    let m = mnt.display();
    // Read while the mount is surely up: its views are found by it at the stop, even
    // after the mount itself was unmounted externally.
    let device = std::fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|info| {
            crate::mountinfo::mounts(&info)
                .filter(|v| v.point == mnt)
                .last()
                .map(|v| v.device)
        });
    let signal = loop {
        match signals.wait(POLL).map_err(DaemonError::Signals)? {
            // SIGUSR1: log the writeback queue (as GoCacheFS did), keep serving.
            Some(libc::SIGUSR1) => hup.summary("SIGUSR1"),
            // SIGHUP: reopen src's root and log the summary, keep serving.
            Some(libc::SIGHUP) => hup.reload(),
            Some(sig) => break Some(sig),
            None => {}
        }
        if session.guard.is_finished() {
            break None;
        }
    };
    let Some(sig) = signal else {
        info!("{m} was unmounted externally");
        return join_unmounted(session)
            .map(|_| Stop::Clean)
            .map_err(DaemonError::Session);
    };

    info!("received {}, unmounting {m}", signal_name(sig));
    if let Some(device) = &device {
        unmount_other_views(mnt, device);
    }
    // Not root, umount(2) is not permitted: the setuid fusermount3 unmounts, as libfuse
    // does (see `fuse::fusermount`). Errors keep their kind either way.
    let as_user = |lazy| crate::fuse::fusermount::unmount(mnt, lazy);
    let (first, via_fusermount) = match umount2(mnt, 0) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            debug!("umount2 not permitted ({e}); unmounting through fusermount3");
            (as_user(false), true)
        }
        r => (r, false),
    };
    match first {
        Ok(()) => {}
        // EINVAL: not mounted (any more).
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
            debug!("{m} was already unmounted");
        }
        Err(e) => {
            if e.kind() == io::ErrorKind::ResourceBusy {
                warn!(
                    "{m} is busy; detaching it lazily: files open in it keep working until \
                     closed, and cachefs exits then (send {} again to exit now)",
                    signal_name(sig)
                );
            } else {
                warn!("cannot unmount {m} ({e}); detaching it lazily");
            }
            let detached = if via_fusermount {
                as_user(true)
            } else {
                umount2(mnt, libc::MNT_DETACH)
            };
            if let Err(e) = detached {
                error!("cannot detach {m} either ({e}); exiting, which aborts the mount");
                return Ok(Stop::Forced);
            }
        }
    }
    while !session.guard.is_finished() {
        if let Some(again) = signals.wait(POLL).map_err(DaemonError::Signals)? {
            if again == libc::SIGHUP || again == libc::SIGUSR1 {
                hup.summary(signal_name(again));
                continue;
            }
            warn!(
                "received {} again; exiting now: files still open in the detached mount \
                 fail with ENOTCONN",
                signal_name(again)
            );
            return Ok(Stop::Forced);
        }
    }
    match join_unmounted(session) {
        Ok(()) => Ok(Stop::Clean),
        // We unmounted it: the kernel ending the connection with ECONNABORTED rather
        // than ENODEV (seen after a lazy detach through fusermount3 once its last file
        // closed, under load) is still the end we asked for.
        Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => {
            debug!("{m}: the kernel aborted the FUSE connection after the unmount ({e})");
            Ok(Stop::Clean)
        }
        Err(e) => Err(DaemonError::Session(e)),
    }
}

/// Join a session whose mount is gone (its thread has finished: the kernel ended the
/// connection) without unmounting the mountpoint again. fuser 0.18's `join` drops the
/// session's `Mount`, whose check "is it still mounted?" reads POLLERR on /dev/fuse
/// (which means the connection is gone) as "mounted" and so calls umount2(mountpoint):
/// that unmounts whatever is mounted there by then, typically the next cachefs mount
/// when `umount M; mount M` run back to back (fixed in fuser after 0.18). So the
/// `Mount` and the /dev/fuse handle of the dead connection are leaked instead: one
/// file descriptor until the process exits, shortly after.
fn join_unmounted(session: fuser::BackgroundSession) -> io::Result<()> {
    let session = std::mem::ManuallyDrop::new(session);
    // SAFETY: `guard` is read out exactly once, and `session` is never used or dropped
    // afterwards (ManuallyDrop), so the JoinHandle has a single owner.
    let guard = unsafe { std::ptr::read(&session.guard) };
    guard
        .join()
        .map_err(|_| io::Error::other("filesystem background thread panicked"))?
}

/// Unmount the second views of our mount (bind mounts of it: the same device in the
/// mount table, see the module doc), so that the stop a signal asks for ends the FUSE
/// connection. A busy one is detached lazily; one that cannot be unmounted keeps the
/// connection, and the daemon, alive until it goes (a second signal exits at once).
fn unmount_other_views(mnt: &Path, device: &str) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let all: Vec<_> = crate::mountinfo::mounts(&info).collect();
    for view in all.iter().filter(|m| m.device == device && m.point != mnt) {
        let p = view.point.display();
        match umount2(&view.point, 0).or_else(|_| umount2(&view.point, libc::MNT_DETACH)) {
            Ok(()) => info!("unmounted {p}, a second view of {}", mnt.display()),
            Err(e) => warn!(
                "cannot unmount {p}, a second view of {} ({e})",
                mnt.display()
            ),
        }
    }
}

fn umount2(path: &Path, flags: libc::c_int) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The shutdown signals, blocked in the calling thread and every thread it spawns later.
struct Signals {
    set: libc::sigset_t,
}

impl Signals {
    fn block() -> io::Result<Signals> {
        // SAFETY: plain libc calls on a local, initialised sigset_t.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGUSR1] {
                libc::sigaddset(&mut set, sig);
            }
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            Ok(Signals { set })
        }
    }

    /// The next pending signal, or `None` after `timeout`.
    fn wait(&self, timeout: Duration) -> io::Result<Option<libc::c_int>> {
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `set` is initialised, `ts` is valid, siginfo may be null.
        let sig = unsafe { libc::sigtimedwait(&self.set, std::ptr::null_mut(), &ts) };
        if sig > 0 {
            return Ok(Some(sig));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
            _ => Err(e),
        }
    }
}

fn signal_name(sig: libc::c_int) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        libc::SIGUSR1 => "SIGUSR1",
        _ => "a signal",
    }
}

/// env_logger on stderr: `-d` = debug, else info; `RUST_LOG` overrides. Colors only on a
/// terminal. When stderr goes to journald (or `logger --prio-prefix`: see
/// [`syslog_prefixes`]) lines carry `<N>` priority prefixes and no timestamp, since
/// the journal adds its own.
fn init_logging(debug: bool) {
    // fuser::mnt warns "Unmount failed: EINVAL" when it retries an unmount that the
    // daemon already did (its drop-time check); the daemon reports unmount errors itself.
    let default = if debug {
        "debug,fuser::mnt=error"
    } else {
        "info,fuser::mnt=error"
    };
    let mut b =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default));
    if syslog_prefixes() {
        b.format(|buf, rec| {
            let prio = match rec.level() {
                log::Level::Error => 3,
                log::Level::Warn => 4,
                log::Level::Info => 6,
                log::Level::Debug | log::Level::Trace => 7,
            };
            writeln!(buf, "<{prio}>{}: {}", rec.target(), rec.args())
        });
    }
    // Already initialised (e.g. run twice in one test process): keep the first logger.
    let _ = b.try_init();
}

/// glibc's malloc: allocations from 4 MiB up are mapped, and unmapped when freed.
///
/// By default glibc raises that threshold after the first such block is freed (up to
/// 32 MiB), and from then on keeps every big block in its per-thread arenas, where a
/// freed one stays resident: the inode table's index as it doubles, the listing of a
/// huge directory. Measured on a walk of 1,000,000 entries: 103.8 -> 76 MiB peak RSS
/// (47 MiB of arenas held ~25 MiB of freed tables); 256 KiB and 2 MiB thresholds did
/// no better. At 4 MiB the 1 MiB buffers of daemon-served reads and writes stay in
/// the arenas, reused without a page fault. Left alone when the admin tunes malloc
/// (`GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...`, or `MALLOC_MMAP_THRESHOLD_`).
fn keep_big_allocations_mapped() {
    let tuned = std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some()
        || std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("mmap_threshold"));
    if tuned {
        return;
    }
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a parameter of the allocator (it takes the arena locks).
    if unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20) } != 1 {
        debug!("mallopt(M_MMAP_THRESHOLD) refused");
    }
}

/// Raise the soft RLIMIT_NOFILE to the hard limit: every cached open file holds an fd.
fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        warn!("getrlimit(RLIMIT_NOFILE): {}", io::Error::last_os_error());
        return;
    }
    let mut target = lim.rlim_max;
    if target == libc::RLIM_INFINITY {
        // The kernel caps the fd limit at fs.nr_open.
        target = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1 << 20);
    }
    if lim.rlim_cur >= target {
        return;
    }
    let old = lim.rlim_cur;
    lim.rlim_cur = target;
    // SAFETY: `lim` is a valid in-pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
        debug!("raised the open file limit from {old} to {target}");
    } else {
        warn!(
            "cannot raise the open file limit from {old} to {target}: {}",
            io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writeback_mode_names() {
        let mut c = Config::new("/s".into(), "/d".into(), "/m".into());
        assert_eq!(writeback_mode(&c), "off");
        c.writeback = true;
        assert_eq!(writeback_mode(&c), "on 10 workers");
        c.concurrent = 0;
        assert_eq!(writeback_mode(&c), "mirror");
    }

    #[test]
    fn mount_errors_say_what_to_do() {
        let e = |errno| {
            DaemonError::Mount {
                mountpoint: "/m".into(),
                source: io::Error::from_raw_os_error(errno),
            }
            .to_string()
        };
        assert!(e(libc::EPERM).contains("run cachefs as root"));
        assert!(e(libc::EACCES).contains("fusermount3"));
        assert!(e(libc::EINVAL).contains("-o options"));
        let text = DaemonError::Mount {
            mountpoint: "/m".into(),
            source: io::Error::other("Error calling mount() at \"/m\": EINVAL: Invalid argument"),
        }
        .to_string();
        assert!(text.contains("check the -o options"), "{text}");
        if !Path::new("/dev/fuse").exists() {
            assert!(e(libc::ENOENT).contains("apt-get install fuse3"));
        }
        assert!(e(libc::ENOENT).contains("fuse3"));
    }

    #[test]
    fn journal_stream_must_name_the_fd() {
        use std::os::fd::AsFd;
        use std::os::unix::fs::MetadataExt;
        let f = tempfile::tempfile().unwrap();
        let m = f.metadata().unwrap();
        let fd = f.as_fd();
        assert!(fd_is_stream(fd, &format!("{}:{}", m.dev(), m.ino())));
        assert!(fd_is_stream(fd, &format!("{}:{}\n", m.dev(), m.ino())));
        // Inherited from a parent whose stderr was the journal: another file.
        assert!(!fd_is_stream(fd, &format!("{}:{}", m.dev(), m.ino() + 1)));
        assert!(!fd_is_stream(fd, &format!("{}:{}", m.dev() + 1, m.ino())));
        for junk in ["", "1", "a:b", "12:", ":34", "1:2:3"] {
            assert!(!fd_is_stream(fd, junk), "{junk:?}");
        }
    }

    #[test]
    fn nofile_limit_is_raised_to_hard() {
        raise_nofile_limit();
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: valid out-pointer.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        if lim.rlim_max != libc::RLIM_INFINITY {
            assert_eq!(lim.rlim_cur, lim.rlim_max);
        }
    }
}
