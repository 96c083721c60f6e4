//! src served through a real bindfs mount that tests kill (SIGKILL, as when rclone
//! crashes), pause (SIGSTOP, a hung network) and restart. Used by the outage, metrics, status, max_dirty,
//! drain_timeout, cli, writeback_mount and writeback_crash_mount tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use super::common::{detach, is_fuse_mounted, signal};
use tempfile::TempDir;

/// Whether bindfs is installed (scripts/install-deps.sh installs it).
pub fn have_bindfs() -> bool {
    Command::new("bindfs").arg("--version").output().is_ok()
}

/// src served through `bindfs -f real mnt`, killable and restartable.
pub struct BindfsSrc {
    pub real: TempDir,
    pub mnt: PathBuf,
    child: Option<Child>,
    options: Vec<String>,
}

impl BindfsSrc {
    pub fn start(real: TempDir, mnt: &Path) -> Option<BindfsSrc> {
        BindfsSrc::start_with(real, mnt, &[])
    }

    /// [`BindfsSrc::start`] with extra bindfs arguments (e.g. `-o attr_timeout=0`).
    pub fn start_with(real: TempDir, mnt: &Path, options: &[&str]) -> Option<BindfsSrc> {
        let mut s = BindfsSrc {
            real,
            mnt: mnt.to_path_buf(),
            child: None,
            options: options.iter().map(|o| o.to_string()).collect(),
        };
        s.spawn().then_some(s)
    }

    /// Start bindfs and wait for its mount. `false` if bindfs cannot be run; panics
    /// with bindfs's stderr if it runs but does not mount within 30 s (generous: on a
    /// loaded 2-core CI machine bindfs can take a while to start).
    fn spawn(&mut self) -> bool {
        let log = self.mnt.with_extension("bindfs.log");
        let Ok(child) = Command::new("bindfs")
            .arg("-f")
            .args(&self.options)
            .arg(self.real.path())
            .arg(&self.mnt)
            .stderr(std::fs::File::create(&log).map_or_else(|_| Stdio::null(), Stdio::from))
            .spawn()
        else {
            return false;
        };
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !is_fuse_mounted(&self.mnt) {
            if Instant::now() >= deadline {
                let status = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten());
                panic!(
                    "bindfs did not mount {} within 30 s (bindfs exit: {status:?}); its stderr:\n{}",
                    self.mnt.display(),
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            sleep(Duration::from_millis(10));
        }
        true
    }

    /// SIGKILL: the mount stays behind, answering ENOTCONN.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        signal(&child, libc::SIGKILL);
        let _ = child.wait();
    }

    /// SIGSTOP / SIGCONT: every call into src hangs, as with a hung network.
    pub fn pause(&self, stop: bool) {
        let sig = if stop { libc::SIGSTOP } else { libc::SIGCONT };
        signal(self.child.as_ref().expect("running"), sig);
    }

    /// What systemd does with a crashed rclone: clear the dead mount, mount again.
    pub fn restart(&mut self) {
        detach(&self.mnt);
        assert!(self.spawn());
    }
}

impl Drop for BindfsSrc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(&c, libc::SIGCONT);
            signal(&c, libc::SIGKILL);
            let _ = c.wait();
        }
        detach(&self.mnt);
    }
}
