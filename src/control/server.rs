//! The daemon's side of the control channel: a listener thread on the socket, one
//! short-lived thread per connection (at most [`MAX_CONNECTIONS`] at once; more are
//! answered "busy" and closed), each checking its caller with `SO_PEERCRED` before it
//! reads a request.
//!
//! Commands (`"cmd"`; paths are mount-relative):
//! - `info`: pid, dst, mountpoint, the runtime-changeable settings in force.
//! - `stats`: counters since start for rates (`cachefs status --watch`): cache hits
//!   and misses, bytes fetched from src, evictions, the writeback queue (pending,
//!   failed, dirty bytes, applied ops, uploaded bytes), src calls and their total time.
//! - `state` (`path`, `recursive`): per path, what dst holds (`cached`, `partial N%`,
//!   `dirty`, `not cached`) and flags `pending upload`, `pinned`.
//! - `retry`: writeback ops parked as failed are retried now.
//! - `revalidate` (`path`): the subtree is compared with src at its next lookup or open.
//! - `pin` / `unpin` (`path`): sets / removes the `user.cachefs.pin` xattr through the
//!   core, as `setfattr` through the mount does.
//! - `evict` (`paths`, `recursive`): drops clean cached copies and partial files; dirty,
//!   pending, pinned and open files stay (each is reported with the reason).
//! - `set` (`name`: `cache-size`, `min-free`, `max-dirty`, `revalidate`; `bytes`,
//!   `percent` or `secs`, `null` for none): changes a limit at once, no remount.
//!
//! Lock order: the server has no lock; `connections` is an atomic.

use std::ffi::OsStr;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{Value, json};

use crate::cache::Cache;
use crate::cache::budget::MinFree;
use crate::fs::{CacheFs, Cached, ROOT};
use crate::metrics::{METRICS, SrcOp};
use crate::writeback::Writeback;

/// Connections served at once; more are refused with an answer.
pub(crate) const MAX_CONNECTIONS: usize = 8;
/// Most paths one `state` or `evict` request reports.
pub(crate) const MAX_PATHS: usize = 100_000;

/// What the server acts on.
pub(crate) struct Target {
    pub(crate) fs: Arc<CacheFs>,
    pub(crate) cache: Option<Arc<Cache>>,
    pub(crate) wb: Option<Arc<Writeback>>,
    pub(crate) dst: PathBuf,
    pub(crate) mountpoint: PathBuf,
}

/// A running server; [`Server::stop`] ends it and removes the socket.
pub(crate) struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    /// The listening socket (a clone of the accept thread's), shut down to wake it.
    waker: UnixListener,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Binds the socket at `path` (a leftover file there is replaced: the daemon holds
    /// dst's lock, so no other daemon uses it), mode 0600, and serves on a thread.
    pub(crate) fn start(path: &Path, target: Target) -> io::Result<Server> {
        let listener = bind_listening(path)?;
        // SAFETY: geteuid cannot fail.
        let owner = unsafe { libc::geteuid() };
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            target,
            owner,
            connections: AtomicUsize::new(0),
        });
        let flag = Arc::clone(&stop);
        let waker = listener.try_clone()?;
        let thread = std::thread::Builder::new()
            .name("cachefs-control".into())
            .spawn(move || accept_loop(listener, shared, flag))?;
        Ok(Server {
            path: path.to_path_buf(),
            stop,
            waker,
            thread: Some(thread),
        })
    }

    /// Stops accepting, removes the socket. Connections in progress finish on their
    /// own threads.
    pub(crate) fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept: shutdown(2) of a listening socket makes it return
        // (EINVAL). Not by connecting to the socket's path: that path may be gone (dst
        // deleted under a running daemon, the socket file removed), and the join below
        // then waited forever, so SIGTERM never ended the daemon.
        // SAFETY: a valid socket descriptor, owned by `self.waker`.
        unsafe { libc::shutdown(self.waker.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds a listening socket at `path`, mode 0600, such that `path` appears only once
/// the socket listens: bound under a temporary name beside it, then renamed over
/// `path` (replacing a leftover: the daemon holds dst's lock, so no other daemon uses
/// it). A client that connects as soon as it sees `path` (`cachefs ctl` right after
/// the mount) is never refused, as it could be between `bind` and `listen`.
fn bind_listening(path: &Path) -> io::Result<UnixListener> {
    let mut temp = path.as_os_str().to_owned();
    temp.push(format!(".{}.new", std::process::id()));
    let temp = PathBuf::from(temp);
    match std::fs::remove_file(&temp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(&temp)?;
    // The daemon's umask is 0: tighten before the name is visible.
    let ready = std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&temp, path));
    if let Err(e) = ready {
        let _ = std::fs::remove_file(&temp);
        return Err(e);
    }
    Ok(listener)
}

struct Shared {
    target: Target,
    owner: u32,
    connections: AtomicUsize,
}

fn accept_loop(listener: UnixListener, shared: Arc<Shared>, stop: Arc<AtomicBool>) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(mut conn) = conn else { continue };
        if shared.connections.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            shared.connections.fetch_sub(1, Ordering::SeqCst);
            let _ = answer(&mut conn, &err("busy: too many control connections"));
            continue;
        }
        let sh = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name("cachefs-ctl-conn".into())
            .spawn(move || {
                serve_conn(conn, &sh);
                sh.connections.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            shared.connections.fetch_sub(1, Ordering::SeqCst);
            log::warn!("control: cannot start a connection thread: {e}");
        }
    }
}

/// The uid of the process at the other end (`SO_PEERCRED`).
fn peer_uid(s: &UnixStream) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid out-pointers of the sizes passed; the fd is
    // open for the call.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

fn answer(conn: &mut UnixStream, v: &Value) -> io::Result<()> {
    let mut line = v.to_string();
    line.push('\n');
    conn.write_all(line.as_bytes())
}

fn err(msg: impl Into<String>) -> Value {
    json!({"ok": false, "error": msg.into()})
}

fn serve_conn(mut conn: UnixStream, sh: &Shared) {
    let uid = match peer_uid(&conn) {
        Ok(u) => u,
        Err(e) => {
            log::debug!("control: no peer credentials ({e}); closing");
            return;
        }
    };
    if !super::authorized(uid, sh.owner) {
        log::warn!("control: refused a caller with uid {uid}");
        let _ = answer(
            &mut conn,
            &err(format!(
                "permission denied: uid {uid} is neither root nor the mount's owner (uid {})",
                sh.owner
            )),
        );
        return;
    }
    let _ = conn.set_read_timeout(Some(super::IDLE));
    let _ = conn.set_write_timeout(Some(super::IDLE));
    let Ok(read_half) = conn.try_clone() else {
        return;
    };
    // At most 16 MiB of requests per connection.
    let mut lines = BufReader::new(read_half.take(16 << 20));
    let mut line = String::new();
    loop {
        line.clear();
        match lines.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let reply = match serde_json::from_str::<Value>(&line) {
            Ok(req) => handle(&sh.target, &req),
            Err(e) => err(format!("not a JSON request: {e}")),
        };
        if answer(&mut conn, &reply).is_err() {
            return;
        }
    }
}

/// Runs one request.
pub(crate) fn handle(t: &Target, req: &Value) -> Value {
    let cmd = req.get("cmd").and_then(Value::as_str).unwrap_or("");
    let path = || -> Result<PathBuf, String> {
        let p = req.get("path").and_then(Value::as_str).unwrap_or("");
        super::mount_rel(Path::new(p))
    };
    let recursive = req.get("recursive").and_then(Value::as_bool) == Some(true);
    let r: Result<Value, String> = match cmd {
        "info" => Ok(info(t)),
        "stats" => Ok(stats(t)),
        "state" => path().map(|p| state(t, &p, recursive)),
        "retry" => Ok(match &t.wb {
            Some(wb) => json!({"retried": wb.retry_failed_now()}),
            None => json!({"retried": 0, "note": "writeback is off (no -w)"}),
        }),
        "revalidate" => path().map(|p| {
            t.fs.expire(&p);
            log::info!("control: {} is due for revalidation", show(&p));
            json!({"revalidate_secs": t.fs.revalidate_every().as_secs_f64()})
        }),
        "pin" => path().and_then(|p| pin(t, &p, true)),
        "unpin" => path().and_then(|p| pin(t, &p, false)),
        "evict" => evict_all(t, req, recursive),
        "set" => set(t, req),
        "" => Err("no \"cmd\" in the request".into()),
        other => Err(format!("unknown command '{other}'")),
    };
    match r {
        Ok(Value::Object(mut m)) => {
            m.insert("ok".into(), Value::Bool(true));
            Value::Object(m)
        }
        Ok(v) => json!({"ok": true, "value": v}),
        Err(e) => err(e),
    }
}

fn show(p: &Path) -> String {
    format!("/{}", p.display())
}

fn info(t: &Target) -> Value {
    let (cache_size, min_free) = t
        .cache
        .as_ref()
        .map_or((None, None), |c| c.current_limits());
    json!({
        "pid": std::process::id(),
        "dst": t.dst.to_string_lossy(),
        "mountpoint": t.mountpoint.to_string_lossy(),
        "writeback": t.wb.is_some(),
        "budget": t.cache.is_some(),
        "cache_size": cache_size,
        "min_free": min_free.map(|m| m.to_string()),
        "max_dirty": t.wb.as_ref().and_then(|w| w.max_dirty()),
        "revalidate_secs": t.fs.revalidate_every().as_secs_f64(),
    })
}

fn stats(t: &Target) -> Value {
    let (mut src_ops, mut src_nanos) = (0u64, 0u128);
    for op in SrcOp::ALL {
        let h = METRICS.src_latency(op);
        let (buckets, sum) = h.snapshot();
        src_ops += buckets[buckets.len() - 1];
        src_nanos += sum.as_nanos();
    }
    let q = t.wb.as_ref().map(|w| w.counters()).unwrap_or_default();
    let now = crate::sys::clock::now_nanos() as f64 / 1e9;
    let (cache_size, _) = t
        .cache
        .as_ref()
        .map_or((None, None), |c| c.current_limits());
    json!({
        "time": now,
        "hits": METRICS.cache_hits.get(),
        "misses": METRICS.cache_misses.get(),
        "fetched_bytes": METRICS.src_bytes_fetched.get(),
        "evictions": METRICS.evictions.get(),
        "src_online": METRICS.src_online.get() == 1,
        "src_ops": src_ops,
        "src_seconds": src_nanos as f64 / 1e9,
        "queue_pending": q.pending,
        "queue_failed": q.failed,
        "queue_running": q.running,
        "dirty_bytes": q.dirty_bytes,
        "applied": q.applied,
        "uploaded_bytes": q.uploaded_bytes,
        "cache_used": t.cache.as_ref().map(|c| c.usage()),
        "cache_size": cache_size,
    })
}

/// The words `cachefs ctl state` prints for one path.
fn words(t: &Target, p: &Path) -> Result<Vec<String>, String> {
    let held =
        t.fs.cached_state(p)
            .map_err(|e| format!("{}: {e}", show(p)))?;
    let mut w = vec![match held {
        Cached::No => "not cached".to_string(),
        Cached::Dir => "directory".to_string(),
        Cached::File { clean: true, .. } => "cached".to_string(),
        Cached::File { clean: false, .. } => "dirty".to_string(),
        Cached::Partial { present, size } => {
            let pct = (present * 100).checked_div(size).unwrap_or(100);
            format!("partial {pct}%")
        }
        Cached::Other => "cached".to_string(),
    }];
    if t.wb.as_ref().is_some_and(|wb| wb.has_pending(p)) {
        w.push("pending upload".into());
    }
    if t.cache.as_ref().is_some_and(|c| c.is_pinned(p)) {
        w.push("pinned".into());
    }
    Ok(w)
}

fn state(t: &Target, p: &Path, recursive: bool) -> Value {
    let mut out = Vec::new();
    let partials = if recursive {
        t.fs.partial_paths_under(p)
    } else {
        Vec::new()
    };
    let mut todo = vec![p.to_path_buf()];
    while let Some(p) = todo.pop() {
        if out.len() >= MAX_PATHS {
            break;
        }
        match words(t, &p) {
            Ok(w) => out.push(json!({"path": p.to_string_lossy(), "state": w})),
            Err(e) => out.push(json!({"path": p.to_string_lossy(), "error": e})),
        }
        if recursive {
            todo.extend(children(t, &p, &partials).into_iter().rev());
        }
    }
    json!({"paths": out})
}

/// The names dst holds in the directory `p`, and those leading to `partials` (partial
/// files of lazy fetch, which live in the state folder); sorted, cachefs's own names
/// left out. What is only in src is not cached, so not listed.
fn children(t: &Target, p: &Path, partials: &[PathBuf]) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> =
        t.fs.cached_children(p)
            .unwrap_or_default()
            .into_iter()
            .map(|n| p.join(n))
            .collect();
    // The next name towards each partial below `p` (its directory may be src's only).
    v.extend(partials.iter().filter_map(|q| {
        let first = q.strip_prefix(p).ok()?.iter().next()?;
        Some(p.join(first))
    }));
    v.sort();
    v.dedup();
    v
}

/// Looks `p` up through the core, component by component (as the kernel would), runs
/// `f` on its inode, then forgets the lookups.
fn with_ino<R>(
    t: &Target,
    p: &Path,
    f: impl FnOnce(u64) -> crate::fs::FsResult<R>,
) -> Result<R, String> {
    let mut looked = Vec::new();
    let mut ino = ROOT;
    let mut r = Ok(());
    for name in p.iter() {
        match t.fs.lookup(ino, name) {
            Ok(a) => {
                ino = a.ino;
                looked.push(ino);
            }
            Err(e) => {
                r = Err(format!("{}: {e}", show(p)));
                break;
            }
        }
    }
    let out = r.and_then(|()| f(ino).map_err(|e| format!("{}: {e}", show(p))));
    for i in looked {
        t.fs.forget(i, 1);
    }
    out
}

fn pin(t: &Target, p: &Path, on: bool) -> Result<Value, String> {
    if t.cache.is_none() {
        return Err(
            "pins need the cache: start cachefs with --cache-size, --min-free or --pin \
                    to pin at run time"
                .into(),
        );
    }
    let name = OsStr::new(crate::cache::pin::PIN_XATTR);
    with_ino(t, p, |ino| {
        if on {
            t.fs.setxattr(ino, name, b"1", 0)
        } else {
            match t.fs.removexattr(ino, name) {
                Err(e) if e.errno() == libc::ENODATA => Ok(()),
                r => r,
            }
        }
    })?;
    log::info!(
        "control: {} {}",
        if on { "pinned" } else { "unpinned" },
        show(p)
    );
    let pinned = t.cache.as_ref().is_some_and(|c| c.is_pinned(p));
    Ok(json!({"pinned": pinned}))
}

fn evict_all(t: &Target, req: &Value, recursive: bool) -> Result<Value, String> {
    let paths: Vec<PathBuf> = match req.get("paths").and_then(Value::as_array) {
        Some(a) => a
            .iter()
            .map(|v| super::mount_rel(Path::new(v.as_str().unwrap_or(""))))
            .collect::<Result<_, _>>()?,
        None => vec![super::mount_rel(Path::new(
            req.get("path").and_then(Value::as_str).unwrap_or(""),
        ))?],
    };
    let (mut evicted, mut freed, mut kept, mut errors) = (0u64, 0u64, Vec::new(), Vec::new());
    let partials = if recursive {
        let mut all: Vec<PathBuf> = paths
            .iter()
            .flat_map(|p| t.fs.partial_paths_under(p))
            .collect();
        all.sort();
        all.dedup();
        all
    } else {
        Vec::new()
    };
    let mut todo: Vec<PathBuf> = paths.into_iter().rev().collect();
    let mut seen = 0usize;
    while let Some(p) = todo.pop() {
        seen += 1;
        if seen > MAX_PATHS {
            break;
        }
        match evict_one(t, &p) {
            Ok(Evicted::Freed(n)) => {
                evicted += 1;
                freed += n;
            }
            Ok(Evicted::NotCached) => {}
            Ok(Evicted::Dir) if recursive => {
                todo.extend(children(t, &p, &partials).into_iter().rev())
            }
            Ok(Evicted::Dir) => {}
            Ok(Evicted::Kept(why)) => kept.push(json!({"path": p.to_string_lossy(), "why": why})),
            Err(e) => errors.push(json!({"path": p.to_string_lossy(), "error": e})),
        }
    }
    if evicted > 0 {
        log::info!("control: evicted {evicted} files ({freed} bytes) on request");
    }
    Ok(json!({"evicted": evicted, "freed_bytes": freed, "kept": kept, "errors": errors}))
}

enum Evicted {
    Freed(u64),
    NotCached,
    Dir,
    Kept(&'static str),
}

fn evict_one(t: &Target, p: &Path) -> Result<Evicted, String> {
    let held = t.fs.cached_state(p).map_err(|e| e.to_string())?;
    let partial = match held {
        Cached::No | Cached::Other => return Ok(Evicted::NotCached),
        Cached::Dir => return Ok(Evicted::Dir),
        Cached::File { clean: false, .. } => return Ok(Evicted::Kept("dirty")),
        Cached::File { clean: true, .. } => false,
        Cached::Partial { .. } => true,
    };
    if t.wb.as_ref().is_some_and(|wb| wb.has_pending(p)) {
        return Ok(Evicted::Kept("pending upload"));
    }
    if t.cache.as_ref().is_some_and(|c| c.is_pinned(p)) {
        return Ok(Evicted::Kept("pinned"));
    }
    let r = match &t.cache {
        Some(c) => c.evict_now(&t.fs, p, partial),
        None if partial => {
            t.fs.evict_partial(&crate::fs::lazy::data_rel_of(p), Some(p))
        }
        None => t.fs.evict(p),
    };
    match r {
        Ok(Some(n)) => Ok(Evicted::Freed(n)),
        Ok(None) => Ok(Evicted::Kept("open, src lacks it, or src is offline")),
        Err(e) => Err(e.to_string()),
    }
}

/// A size in the request: `bytes` (a number, or null for none).
fn bytes_of(req: &Value) -> Result<Option<u64>, String> {
    match req.get("bytes") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(0) => Err("a size must be more than 0 (or none)".into()),
            Some(n) => Ok(Some(n)),
            None => Err("\"bytes\" must be a whole number".into()),
        },
    }
}

fn set(t: &Target, req: &Value) -> Result<Value, String> {
    let name = req.get("name").and_then(Value::as_str).unwrap_or("");
    let no_budget = || {
        format!(
            "this mount has no cache budget (started without --cache-size, --min-free, --pin \
             or --max-dirty): restart it with one of them to change {name} at run time"
        )
    };
    match name {
        "cache-size" => {
            let cache = t.cache.as_ref().ok_or_else(no_budget)?;
            let (_, min_free) = cache.current_limits();
            let size = bytes_of(req)?;
            cache.set_limits(size, min_free);
            log::info!("control: --cache-size is now {size:?} bytes");
        }
        "min-free" => {
            let cache = t.cache.as_ref().ok_or_else(no_budget)?;
            let (size, _) = cache.current_limits();
            let mf = match req.get("percent").and_then(Value::as_f64) {
                Some(p) if p > 0.0 && p < 100.0 => Some(MinFree::Percent(p)),
                Some(_) => return Err("a percentage must be between 0 and 100".into()),
                None => bytes_of(req)?.map(MinFree::Bytes),
            };
            cache.set_limits(size, mf);
            log::info!(
                "control: --min-free is now {}",
                mf.map_or("none".into(), |m| m.to_string())
            );
        }
        "max-dirty" => {
            let wb =
                t.wb.as_ref()
                    .ok_or("--max-dirty bounds data waiting for writeback, which is off (no -w)")?;
            let v = bytes_of(req)?;
            wb.set_max_dirty(v);
            if let Some(c) = &t.cache {
                c.set_max_dirty_shown(v);
            }
            log::info!("control: --max-dirty is now {v:?} bytes");
        }
        "revalidate" => {
            let secs = req
                .get("secs")
                .and_then(Value::as_f64)
                .ok_or("\"secs\" must be a number of seconds")?;
            let d = Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())?;
            t.fs.set_revalidate(d);
            log::info!("control: --revalidate is now {d:?}");
        }
        "" => return Err("no \"name\": one of cache-size, min-free, max-dirty, revalidate".into()),
        other => {
            return Err(format!(
                "'{other}' cannot be changed at run time; one of cache-size, min-free, max-dirty, revalidate"
            ));
        }
    }
    Ok(info(t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;
    use std::sync::mpsc;

    /// A watcher woken by inotify the moment the socket's name appears in the folder
    /// connects at once: it must never be refused (with a plain bind the name appears
    /// before the socket listens). 200 rounds, each a fresh socket.
    #[test]
    fn the_socket_name_appears_only_once_it_listens() {
        const ROUNDS: usize = 200;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        // SAFETY: plain syscall, no pointers.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        assert!(fd >= 0);
        let c = std::ffi::CString::new(dir.path().as_os_str().as_bytes()).unwrap();
        let mask = libc::IN_CREATE | libc::IN_MOVED_TO;
        // SAFETY: a valid C string.
        assert!(unsafe { libc::inotify_add_watch(fd, c.as_ptr(), mask) } >= 0);
        let (tx, rx) = mpsc::channel();
        let watcher = {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                let header = std::mem::size_of::<libc::inotify_event>();
                let mut rounds = 0;
                while rounds < ROUNDS {
                    // SAFETY: reads into a buffer of the given size.
                    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
                    assert!(n > 0);
                    let mut at = 0;
                    while at + header <= n as usize {
                        // SAFETY: the kernel wrote a whole event at `at`; read unaligned.
                        let ev: libc::inotify_event =
                            unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
                        let name = &buf[at + header..at + header + ev.len as usize];
                        let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
                        at += header + ev.len as usize;
                        if name == b"control.sock" {
                            tx.send(UnixStream::connect(&path).map(drop)).unwrap();
                            rounds += 1;
                        }
                    }
                }
            })
        };
        let mut refused = 0;
        for _ in 0..ROUNDS {
            let listener = bind_listening(&path).unwrap();
            let connected = rx.recv_timeout(Duration::from_secs(10)).unwrap();
            if connected.is_err() {
                refused += 1;
            }
            drop(listener);
            std::fs::remove_file(&path).unwrap();
        }
        watcher.join().unwrap();
        // SAFETY: our own descriptor.
        unsafe { libc::close(fd) };
        assert_eq!(refused, 0, "connects refused right after the name appeared");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "no temporary name left behind: {left:?}");
    }
}
