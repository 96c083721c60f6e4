//! Mounting: the mount options cachefs always sets (and what `-o` may override), and
//! the background session serving the adapter.

use std::io;
use std::sync::Arc;

use fuser::{BackgroundSession, Config as FuseConfig, MountOption, SessionACL};

use crate::config::Config;
use crate::fs::CacheFs;

use super::FuseAdapter;

/// Mount options from the config: cachefs's defaults plus `-o` (which may override
/// nosuid/nodev with suid/dev).
pub(crate) fn mount_options(cfg: &Config) -> (Vec<MountOption>, SessionACL) {
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
pub(crate) struct Mounted {
    pub(crate) session: BackgroundSession,
    /// Receives once the kernel's INIT was answered (the mount serves requests). The
    /// daemon waits on this instead of touching its own mount: a daemon blocked in a
    /// request to itself cannot be killed cleanly.
    pub(crate) ready: crossbeam_channel::Receiver<()>,
}

/// Mounts `fs` at `cfg.mountpoint` and serves it on background threads.
/// [`fusermount::check_can_mount`](super::fusermount::check_can_mount) first gives the
/// clearer errors.
pub(crate) fn spawn_mount(fs: impl Into<Arc<CacheFs>>, cfg: &Config) -> io::Result<Mounted> {
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
    let core = Arc::clone(&adapter.fs);
    let session = fuser::Session::new(adapter, &cfg.mountpoint, &fc)?;
    let _ = notifier.set(session.notifier());
    drop_stale_listings(core, Arc::downgrade(&notifier));
    let session = session.spawn()?;
    Ok(Mounted { session, ready })
}

/// Tells the kernel to drop the cached listings of the directories it holds open once
/// they may no longer be kept ([`CacheFs::listings_to_drop`]): an open handle's rewind
/// reads them without asking the daemon. A thread that asks every `DROP_EVERY` and ends
/// with the session (when the adapter, which holds the notifier, is dropped).
fn drop_stale_listings(
    fs: Arc<CacheFs>,
    notifier: std::sync::Weak<std::sync::OnceLock<fuser::Notifier>>,
) {
    let spawned = std::thread::Builder::new()
        .name("dircache".into())
        .spawn(move || {
            loop {
                std::thread::sleep(crate::fs::dircache::DROP_EVERY);
                let Some(n) = notifier.upgrade() else { return };
                let Some(n) = n.get() else { continue };
                for ino in fs.listings_to_drop() {
                    // Offset 0, length 0: the whole page cache (the listing).
                    if let Err(e) = n.inval_inode(fuser::INodeNo(ino), 0, 0) {
                        log::debug!("dropping the kernel's listing of inode {ino}: {e}");
                    }
                }
            }
        });
    if let Err(e) = spawned {
        log::warn!("no thread to drop stale listings of open directories: {e}");
    }
}
