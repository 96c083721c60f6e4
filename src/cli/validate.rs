//! Validation: the clap values of the mount flags become a [`Config`], or one
//! [`CliError`] line naming the problem and the fix. The system is seen only through
//! [`Probe`] ([`HostProbe`] is the real one), so every rule is unit-tested with a fake.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::args::MountArgs;
use super::{CliError, err};
use crate::config::{self, Config};

/// How [`validate`] sees the system; [`HostProbe`] is the real one.
pub(crate) trait Probe {
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
pub(crate) struct HostProbe;

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
pub(crate) fn validate(m: &MountArgs, probe: &dyn Probe) -> Result<Config, CliError> {
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
        acl: !m.no_acl && !m.no_xattr,
        xattr: !m.no_xattr,
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
pub(crate) struct CacheFlags {
    pub(crate) cache_size: Option<u64>,
    pub(crate) min_free: Option<config::MinFree>,
    pub(crate) pins: Vec<String>,
    pub(crate) max_dirty: Option<u64>,
    pub(crate) lazy_threshold: u64,
    pub(crate) block_size: u64,
    pub(crate) lazy_fill: bool,
}

/// Validates the cache budget flags of `m`.
pub(crate) fn cache_flags(m: &MountArgs) -> Result<CacheFlags, CliError> {
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
pub(crate) fn parse_count(flag: &str, v: &str) -> Result<u32, CliError> {
    v.trim().parse::<u32>().or_else(|_| {
        err(format!(
            "-{flag} '{v}' is not a whole number >= 0; write e.g. -{flag} 5"
        ))
    })
}

/// A duration >= 0 (see [`config::parse_duration`], which holds the syntax).
pub(crate) fn parse_duration(flag: &str, v: &str) -> Result<Duration, CliError> {
    config::parse_duration(flag, v).map_err(CliError)
}

/// `--threads`: 1 to 1024.
pub(crate) fn parse_threads(v: &str) -> Result<usize, CliError> {
    match v.trim().parse::<usize>() {
        Ok(n) if (1..=1024).contains(&n) => Ok(n),
        _ => err(format!(
            "--threads '{v}' is not a thread count from 1 to 1024; write e.g. --threads 4"
        )),
    }
}

/// `--metrics-addr`: an IP address and a port (no host names: nothing is resolved).
pub(crate) fn parse_addr(v: &str) -> Result<std::net::SocketAddr, CliError> {
    v.trim().parse().or_else(|_| {
        err(format!(
            "--metrics-addr '{v}' is not an IP address with a port; write e.g. \
             --metrics-addr 127.0.0.1:9477 (or [::1]:9477)"
        ))
    })
}

/// `-o a,b -o c` -> [a, b, c]; empty items are dropped.
pub(crate) fn split_options(values: &[OsString]) -> Result<Vec<String>, CliError> {
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
pub(crate) fn resolve_dir(
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
pub(crate) fn check_layout(src: &Path, dst: &Path, mnt: &Path) -> Result<(), CliError> {
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
pub(crate) fn check_not_mounted(mnt: &Path, mountinfo: &str) -> Result<(), CliError> {
    let Some(mount) = crate::mountinfo::mounts(mountinfo).find(|m| m.point == mnt) else {
        return Ok(());
    };
    let (m, fstype) = (mnt.display(), mount.fstype);
    err(format!(
        "-mountpoint {m} is already a mount point ({fstype}); unmount it first ('umount {m}', \
         or 'fusermount3 -u {m}' for a FUSE mount) or choose another directory"
    ))
}

/// Mounting needs root, or a setuid fusermount3 helper.
pub(crate) fn check_can_mount(euid: u32, has_fusermount: bool) -> Result<(), CliError> {
    if euid == 0 || has_fusermount {
        Ok(())
    } else {
        err(format!(
            "cannot mount as uid {euid}: not root and no fusermount3 in PATH; \
             run cachefs as root or install fuse3 ('apt-get install fuse3')"
        ))
    }
}
