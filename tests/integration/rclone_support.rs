//! The rclone + S3 test bed: a real S3 server (moto's, on loopback), a real rclone
//! mounting one of its buckets with the flags `examples/systemd/` recommends, and
//! cachefs nodes in front. Used by the rclone* tests.
//!
//! Guarantees:
//! - Every process the bed starts (S3 server, rclone mounts, cachefs nodes) is its own
//!   child, on ports and directories of its own, so tests run in parallel.
//! - Nothing outlives a test: dropping a [`Node`] detaches and kills its cachefs, then
//!   its rclone; dropping the [`Bucket`] resumes (if paused) and kills the S3 server.
//!   Drop order: declare the bucket first, nodes after (Rust drops in reverse).
//! - Every wait is bounded: a hang fails the test with the components' logs.
//! - Checks read the bucket through the S3 API ([`Bucket::objects`]: `rclone md5sum` on
//!   the S3 remote, not on a mount), so rclone's VFS cache cannot hide what is missing.
//!
//! Faults it can inject: [`Bucket::pause`] (SIGSTOP the S3 server: a hung bucket, rclone
//! alive and blocking), [`RcloneMount::kill9`] (rclone crashes and its unit's
//! `fusermount3 -uz` leaves the bare directory at src's path), [`RcloneMount::restart`].
//!
//! rclone's own upload queue is read through its remote control (`vfs/stats`), so
//! "drained" can mean what it means in production: cachefs's journal empty *and*
//! rclone's write-back cache uploaded.

use std::collections::BTreeMap;
use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use super::common::{
    TempDir, cachefs_bin, detach, is_fuse_mounted, mount_type, signal, tempdir, wait_timeout,
    wb_status,
};

/// How long a component may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// The bucket every test bed uses.
pub const BUCKET: &str = "bed";
/// rclone's `--dir-cache-time` on the bed (the example unit uses 30s; shorter here so
/// that tests that wait for it stay short).
pub const DIR_CACHE: Duration = Duration::from_secs(3);
/// rclone's `--vfs-write-back` on the bed (rclone's default is 5s).
pub const RCLONE_WRITE_BACK: Duration = Duration::from_secs(1);
/// cachefs's `--src-settle` on the bed: above DIR_CACHE plus RCLONE_WRITE_BACK, as the
/// docs say to set it.
pub const SRC_SETTLE: &str = "6s";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

fn wait_for(
    what: &str,
    timeout: Duration,
    mut ok: impl FnMut() -> bool,
    logs: impl Fn() -> String,
) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "{what}: not within {timeout:?}\n{}",
            logs()
        );
        sleep(Duration::from_millis(50));
    }
}

fn tool(name: &str, env: &str) -> String {
    let bin = std::env::var(env).unwrap_or_else(|_| name.to_string());
    let found = Command::new(&bin)
        .arg(if name == "rclone" {
            "version"
        } else {
            "--help"
        })
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{bin} is not installed: the rclone test bed needs it (scripts/install-deps.sh installs \
         it; {env} overrides the path)"
    );
    bin
}

/// The rclone binary (PATH or `$CACHEFS_TEST_RCLONE`).
pub fn rclone_bin() -> String {
    tool("rclone", "CACHEFS_TEST_RCLONE")
}

/// A local S3 server with one empty bucket, [`BUCKET`].
pub struct Bucket {
    dir: TempDir,
    pub port: u16,
    server: Option<Child>,
    paused: bool,
    rclone: String,
}

impl Bucket {
    /// Starts the S3 server (moto) on a free loopback port and creates the bucket.
    pub fn start() -> Bucket {
        let moto = tool("moto_server", "CACHEFS_TEST_MOTO");
        let rclone = rclone_bin();
        let dir = tempdir();
        let port = free_port();
        let log = fs::File::create(dir.path().join("s3.log")).unwrap();
        let server = Command::new(moto)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start the S3 server");
        let b = Bucket {
            dir,
            port,
            server: Some(server),
            paused: false,
            rclone,
        };
        wait_for(
            "the S3 server answering",
            START_TIMEOUT,
            || TcpStream::connect(("127.0.0.1", port)).is_ok(),
            || b.logs(),
        );
        let out = b.rclone_cmd(&["mkdir", &b.remote("")]);
        assert!(out.status.success(), "create the bucket: {}", show(&out));
        b
    }

    /// `s3:BUCKET/rel` in the environment-configured remote `s3`.
    pub fn remote(&self, rel: &str) -> String {
        format!("s3:{BUCKET}/{rel}")
    }

    /// The environment that defines rclone's remote `s3` for this server (no config file).
    pub fn rclone_env(&self, cmd: &mut Command) {
        cmd.env("RCLONE_CONFIG", "/dev/null")
            .env("RCLONE_CONFIG_S3_TYPE", "s3")
            .env("RCLONE_CONFIG_S3_PROVIDER", "Other")
            .env(
                "RCLONE_CONFIG_S3_ENDPOINT",
                format!("http://127.0.0.1:{}", self.port),
            )
            .env("RCLONE_CONFIG_S3_ACCESS_KEY_ID", "test")
            .env("RCLONE_CONFIG_S3_SECRET_ACCESS_KEY", "test")
            .env("RCLONE_CONFIG_S3_REGION", "us-east-1");
    }

    /// Runs `rclone ARGS` against the S3 API directly (bounded: 60 s).
    pub fn rclone_cmd(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(&self.rclone);
        self.rclone_env(&mut cmd);
        cmd.args(args)
            .args(["--contimeout", "10s", "--timeout", "30s", "--retries", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("run rclone");
        let Some(_) = wait_timeout(&mut child, Duration::from_secs(60)) else {
            signal(&child, libc::SIGKILL);
            let out = child.wait_with_output().unwrap();
            panic!("rclone {args:?} hung for 60 s: {}", show(&out));
        };
        child.wait_with_output().unwrap()
    }

    /// Every object in the bucket: key -> (size, md5), read through the S3 API.
    pub fn objects(&self) -> BTreeMap<String, (u64, String)> {
        let sums = self.rclone_cmd(&["md5sum", &self.remote("")]);
        assert!(sums.status.success(), "list the bucket: {}", show(&sums));
        let sizes = self.rclone_cmd(&["lsl", &self.remote("")]);
        assert!(sizes.status.success(), "list the bucket: {}", show(&sizes));
        let mut size_of = BTreeMap::new();
        for line in String::from_utf8_lossy(&sizes.stdout).lines() {
            // "   1234 2026-12-06 21:14:43.936137356 key with spaces"
            let mut it = line.trim_start().splitn(4, ' ');
            let (Some(n), Some(_), Some(_), Some(key)) =
                (it.next(), it.next(), it.next(), it.next())
            else {
                continue;
            };
            size_of.insert(key.to_string(), n.parse::<u64>().unwrap());
        }
        parse_md5sum(&sums.stdout)
            .into_iter()
            .map(|(k, md5)| {
                let size = size_of.get(&k).copied().unwrap_or(u64::MAX);
                (k, (size, md5))
            })
            .collect()
    }

    /// Writes an object straight into the bucket (another client, not a node).
    pub fn put(&self, key: &str, data: &[u8]) {
        let tmp = self.dir.path().join("put.tmp");
        fs::write(&tmp, data).unwrap();
        let out = self.rclone_cmd(&["copyto", tmp.to_str().unwrap(), &self.remote(key)]);
        assert!(out.status.success(), "put {key}: {}", show(&out));
    }

    /// A hung bucket: the S3 server stops answering (SIGSTOP); rclone stays up.
    pub fn pause(&mut self) {
        signal(self.server.as_ref().unwrap(), libc::SIGSTOP);
        self.paused = true;
    }

    /// The bucket answers again (SIGCONT).
    pub fn resume(&mut self) {
        signal(self.server.as_ref().unwrap(), libc::SIGCONT);
        self.paused = false;
    }

    pub fn logs(&self) -> String {
        let s3 = fs::read_to_string(self.dir.path().join("s3.log")).unwrap_or_default();
        let tail: Vec<&str> = s3.lines().rev().take(20).collect();
        format!(
            "S3 server log (last lines, newest first):\n{}",
            tail.join("\n")
        )
    }
}

impl Drop for Bucket {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            if self.paused {
                signal(&s, libc::SIGCONT);
            }
            signal(&s, libc::SIGKILL);
            let _ = s.wait();
        }
    }
}

/// `md5sum`-format lines ("<hex>  <name>") as name -> hex.
pub fn parse_md5sum(out: &[u8]) -> BTreeMap<String, String> {
    String::from_utf8_lossy(out)
        .lines()
        .filter_map(|l| l.split_once("  "))
        .map(|(h, k)| (k.to_string(), h.to_string()))
        .collect()
}

fn show(out: &Output) -> String {
    format!(
        "{}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `rclone mount s3:BUCKET DIR` with the flags of `examples/systemd/` (uid/gid/umask,
/// `--vfs-cache-mode writes`, a persistent `--cache-dir`), plus its remote control on a
/// loopback port for `vfs/stats`.
pub struct RcloneMount {
    pub path: PathBuf,
    cache_dir: PathBuf,
    log: PathBuf,
    rc_port: u16,
    child: Option<Child>,
    env: Vec<(String, String)>,
    extra: Vec<String>,
    runs: usize,
    rclone: String,
}

impl RcloneMount {
    /// Mounts the bucket at `path` (an existing empty directory). `work` keeps rclone's
    /// cache and log (it survives restarts, as on a real machine's persistent disk).
    pub fn start(bucket: &Bucket, path: &Path, work: &Path, extra: &[&str]) -> RcloneMount {
        let mut probe = Command::new("true");
        bucket.rclone_env(&mut probe);
        let env = probe
            .get_envs()
            .map(|(k, v)| {
                (
                    k.to_string_lossy().into_owned(),
                    v.unwrap().to_string_lossy().into_owned(),
                )
            })
            .collect();
        let mut m = RcloneMount {
            path: path.to_path_buf(),
            cache_dir: work.join("rclone-cache"),
            log: work.join("rclone.log"),
            rc_port: free_port(),
            child: None,
            env,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            runs: 0,
            rclone: rclone_bin(),
        };
        m.spawn().unwrap_or_else(|e| panic!("{e}"));
        m
    }

    fn spawn(&mut self) -> Result<(), String> {
        self.runs += 1;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(&self.rclone);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)))
            .arg("mount")
            .arg(format!("s3:{BUCKET}"))
            .arg(&self.path)
            .args(["--uid", "33", "--gid", "33", "--umask", "002"])
            .args(["--vfs-cache-mode", "writes"])
            .arg("--dir-cache-time")
            .arg(format!("{}s", DIR_CACHE.as_secs()))
            .arg("--vfs-write-back")
            .arg(format!("{}s", RCLONE_WRITE_BACK.as_secs()))
            .arg("--cache-dir")
            .arg(&self.cache_dir)
            .args(["--rc", "--rc-no-auth", "--rc-addr"])
            .arg(format!("127.0.0.1:{}", self.rc_port))
            .args(["--contimeout", "5s", "--timeout", "10s"])
            .args(["--log-level", "NOTICE"])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = cmd.spawn().map_err(|e| format!("spawn rclone: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if mount_type(&self.path).as_deref() == Some("fuse.rclone") {
                return Ok(());
            }
            let child = self.child.as_mut().unwrap();
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                return Err(format!(
                    "rclone exited ({st}) before mounting {}:\n{}",
                    self.path.display(),
                    self.logs()
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "rclone did not mount {} within {START_TIMEOUT:?}:\n{}",
                    self.path.display(),
                    self.logs()
                ));
            }
            sleep(Duration::from_millis(50));
        }
    }

    /// rclone crashes (SIGKILL) and, as its unit's `ExecStop=fusermount3 -uz` does, the
    /// dead mount is detached: the bare directory is left at the mount's path.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(&c, libc::SIGKILL);
            let _ = c.wait();
        }
        detach(&self.path);
        assert!(!is_fuse_mounted(&self.path));
    }

    /// Mounts again at the same path (systemd's `Restart=on-failure`). Fails as rclone
    /// does, e.g. when something was written into the bare directory meanwhile.
    pub fn restart(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "kill rclone first");
        self.spawn()
    }

    /// The extra rclone flags of the next [`RcloneMount::restart`] (e.g. `--links`).
    pub fn set_extra(&mut self, extra: &[&str]) {
        self.extra = extra.iter().map(|s| s.to_string()).collect();
    }

    /// rclone's own upload queue (`vfs/stats` diskCache): uploads queued + in progress.
    pub fn uploads_pending(&self) -> Option<u64> {
        let out = Command::new(&self.rclone)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(["rc", "--url"])
            .arg(format!("http://127.0.0.1:{}/", self.rc_port))
            .arg("vfs/stats")
            .stdin(Stdio::null())
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let num = |key: &str| -> Option<u64> {
            let at = text.find(&format!("\"{key}\":"))? + key.len() + 3;
            let digits: String = text[at..]
                .trim_start()
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        };
        Some(num("uploadsInProgress")? + num("uploadsQueued")?)
    }

    /// Waits until rclone has uploaded everything it accepted.
    pub fn wait_uploaded(&self, timeout: Duration) {
        wait_for(
            "rclone's upload queue empty",
            timeout,
            || self.uploads_pending() == Some(0),
            || self.logs(),
        );
    }

    pub fn logs(&self) -> String {
        format!(
            "rclone log ({}):\n{}",
            self.log.display(),
            fs::read_to_string(&self.log).unwrap_or_default()
        )
    }
}

impl Drop for RcloneMount {
    fn drop(&mut self) {
        detach(&self.path);
        if let Some(mut c) = self.child.take() {
            signal(&c, libc::SIGKILL);
            let _ = c.wait();
        }
    }
}

/// One machine: an rclone mount of the bucket and a cachefs in front of it.
/// Fields drop in order: cachefs first, then rclone, then the directories.
pub struct Node {
    cachefs: Option<Child>,
    pub rclone: RcloneMount,
    pub src: PathBuf,
    pub dst: PathBuf,
    pub mnt: PathBuf,
    args: Vec<String>,
    runs: usize,
    pub dir: TempDir,
}

impl Node {
    /// rclone at `DIR/src`, cachefs `-src DIR/src -dst DIR/dst -mountpoint DIR/mnt ARGS`.
    pub fn start(bucket: &Bucket, args: &[&str]) -> Node {
        let dir = tempdir();
        let root = fs::canonicalize(dir.path()).unwrap();
        let (src, dst, mnt) = (root.join("src"), root.join("dst"), root.join("mnt"));
        for d in [&src, &dst, &mnt] {
            fs::create_dir(d).unwrap();
        }
        let rclone = RcloneMount::start(bucket, &src, &root, &[]);
        let mut n = Node {
            cachefs: None,
            rclone,
            src,
            dst,
            mnt,
            args: args.iter().map(|s| s.to_string()).collect(),
            runs: 0,
            dir,
        };
        n.spawn_cachefs();
        n
    }

    fn cachefs_log(&self) -> PathBuf {
        self.dir.path().join(format!("cachefs.{}.log", self.runs))
    }

    fn spawn_cachefs(&mut self) {
        self.runs += 1;
        let log = fs::File::create(self.cachefs_log()).unwrap();
        // The bed's --src-settle unless the test sets its own.
        let settle: &[&str] = if self.args.iter().any(|a| a == "--src-settle") {
            &[]
        } else {
            &["--src-settle", SRC_SETTLE]
        };
        let child = Command::new(cachefs_bin())
            .args(settle)
            .arg("-src")
            .arg(&self.src)
            .arg("-dst")
            .arg(&self.dst)
            .arg("-mountpoint")
            .arg(&self.mnt)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .env("RUST_LOG_STYLE", "never")
            .spawn()
            .expect("spawn cachefs");
        self.cachefs = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        while !is_fuse_mounted(&self.mnt) {
            let exited = self.cachefs.as_mut().unwrap().try_wait().unwrap();
            assert!(
                exited.is_none(),
                "cachefs exited ({exited:?}) before mounting:\n{}",
                self.logs()
            );
            assert!(
                Instant::now() < deadline,
                "cachefs did not mount within {START_TIMEOUT:?}:\n{}",
                self.logs()
            );
            sleep(Duration::from_millis(20));
        }
    }

    /// `mnt/rel`.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// Everything this node's current cachefs logged.
    pub fn log(&self) -> String {
        fs::read_to_string(self.cachefs_log()).unwrap_or_default()
    }

    pub fn logs(&self) -> String {
        format!("cachefs log:\n{}\n{}", self.log(), self.rclone.logs())
    }

    /// Stops cachefs (SIGTERM: it drains for `--drain-timeout`) and waits for its exit.
    pub fn stop_cachefs(&mut self) {
        if let Some(mut c) = self.cachefs.take() {
            signal(&c, libc::SIGTERM);
            if wait_timeout(&mut c, Duration::from_secs(60)).is_none() {
                signal(&c, libc::SIGKILL);
                let _ = c.wait();
                detach(&self.mnt);
                panic!(
                    "cachefs did not exit within 60 s of SIGTERM\n{}",
                    self.logs()
                );
            }
        }
    }

    /// Starts cachefs again over the same directories.
    pub fn restart_cachefs(&mut self) {
        assert!(self.cachefs.is_none());
        detach(&self.mnt);
        self.spawn_cachefs();
    }

    /// cachefs's journal is empty with nothing failed, and rclone uploaded everything it
    /// accepted: the bucket holds what the mount shows.
    pub fn wait_drained(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        wait_for(
            "cachefs's writeback queue drained",
            timeout,
            || {
                let s = wb_status(&self.dst);
                assert!(
                    s.failed_ops == 0,
                    "failed writeback ops: {}\n{}",
                    s.json,
                    self.logs()
                );
                s.pending_ops == 0
            },
            || format!("{}\n{}", wb_status(&self.dst).json, self.logs()),
        );
        self.rclone.wait_uploaded(
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_secs(5)),
        );
    }

    /// [`Node::wait_drained`], then the leftover checks of renamed-away and deleted
    /// names have run (`--src-settle` after the last one) and rclone uploaded or
    /// deleted what they changed: nothing cachefs still means to do to the bucket.
    pub fn wait_settled(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        self.wait_drained(timeout);
        wait_for(
            "cachefs's leftover checks done",
            deadline.saturating_duration_since(Instant::now()),
            || wb_status(&self.dst).leftover_checks == 0,
            || format!("{}\n{}", wb_status(&self.dst).json, self.logs()),
        );
        self.wait_drained(
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_secs(5)),
        );
    }

    /// Every regular file the mount shows: relative path -> (size, md5), by
    /// `rclone md5sum` of the mount (a local directory to rclone).
    pub fn files(&self) -> BTreeMap<String, (u64, String)> {
        let out = Command::new(&self.rclone.rclone)
            .args(["md5sum", "--links"])
            .arg(&self.mnt)
            .env("RCLONE_CONFIG", "/dev/null")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "md5sum of the mount: {}", show(&out));
        parse_md5sum(&out.stdout)
            .into_iter()
            .map(|(k, md5)| {
                let len = fs::symlink_metadata(self.mnt.join(&k)).map_or(u64::MAX, |m| m.len());
                (k, (len, md5))
            })
            .collect()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        detach(&self.mnt);
        if let Some(mut c) = self.cachefs.take() {
            signal(&c, libc::SIGKILL);
            let _ = c.wait();
        }
        detach(&self.mnt);
        // self.rclone drops next (its own Drop detaches and kills it).
    }
}

/// Asserts the bucket holds exactly what `node` shows (names, sizes, checksums).
pub fn assert_bucket_equals_mount(bucket: &Bucket, node: &Node) {
    let (objects, files) = (bucket.objects(), node.files());
    if objects != files {
        let only_bucket: Vec<_> = objects.keys().filter(|k| !files.contains_key(*k)).collect();
        let only_mount: Vec<_> = files.keys().filter(|k| !objects.contains_key(*k)).collect();
        let differ: Vec<_> = objects
            .iter()
            .filter(|(k, v)| files.get(*k).is_some_and(|f| f != *v))
            .map(|(k, v)| format!("{k}: bucket {v:?}, mount {:?}", files[k]))
            .collect();
        panic!(
            "bucket != mount\nonly in the bucket: {only_bucket:?}\nonly in the mount: {only_mount:?}\n\
             different: {differ:#?}\n{}",
            node.logs()
        );
    }
}
