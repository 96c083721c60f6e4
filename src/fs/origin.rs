//! Origin records: which src version a cached file's bytes came from.
//!
//! Invariants:
//! - A record says: "dst's regular file at PATH, while it is the object ID (inode number
//!   and birth time), holds the bytes of src's version (size, mtime, inode) at PATH, or
//!   derives from it if `dirty`". Records live in the record store, a log in the state
//!   folder (`.cachefs-state/origins`), never on the dst file itself: writing the file's
//!   xattrs changed its ctime under the user (pjdfstest -w), which is why files created
//!   through the mount used to get no record at all.
//! - A record applies only while dst's object at PATH is still ID with a single link. A
//!   rename, a hard link or a delete-and-recreate therefore turns the file "local" (no
//!   record). The core also clears the records it makes stale, durably where the record
//!   could apply again: on a rename (the file may come back to PATH, changed under its
//!   other name) and a hard link (the link may go); on a delete only where dst has no
//!   birth times (a reused inode number would match).
//! - No record means local: never refetched, dropped or evicted. A missing or torn record
//!   is always safe. A record never claims "clean" for bytes src does not hold: it is
//!   written after a fetch is installed in dst, or after an upload's rename on src.
//! - A record put while the file is open for writing (an `OpenWriter` guard is held)
//!   is dirty and `open_writer`: writes after the last flush may not be journaled yet
//!   (passthrough writes bypass the daemon), so after a crash the writeback queues an
//!   upload of each such file (`Store::open_writer_paths`).
//! - `dirty` is set on the first local change, durably (fdatasync of the log) before the
//!   change is made. A dirty file is never refetched or dropped because of src (local
//!   data wins; writeback turns a src that changed too into a conflict).
//! - The log is one checksummed line per change, appended with one write; it is read into
//!   memory when the store opens (one store per dst per process, shared by the core, the
//!   cache and the writeback replay), compacted then and when it grows past
//!   `COMPACT_SLACK` dead lines. Opens of cached files cost a map lookup and a statx.
//! - Migration: versions before the store kept the record in the `*.cachefs.origin`
//!   xattr of the dst file. When a store is opened on a dst without a log, those xattrs
//!   are imported once (a walk of dst); later they are ignored (and stay hidden from
//!   the mount: `is_reserved_xattr`).
//!
//! Lock order: the store's mutex is a leaf; it is held across a log append (and its
//! fdatasync), never across any other I/O or lock.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::layer::{Ident, Layer, Stat};
use super::names::{STATE_DIR, is_reserved};
use crate::sys::state_file;

/// Root daemons used the trusted namespace (invisible to users even on dst itself).
const XATTR_ROOT: &str = "trusted.cachefs.origin";
/// Unprivileged daemons could not write trusted.*.
const XATTR_USER: &str = "user.cachefs.origin";

/// The record log, inside the state folder.
const LOG: &str = "origins";
const LOG_TMP: &str = "origins.tmp";
/// Dead lines tolerated in the log before it is rewritten with the live records.
pub(crate) const COMPACT_SLACK: usize = 100_000;

fn xattr_name() -> &'static OsStr {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        OsStr::new(XATTR_ROOT)
    } else {
        OsStr::new(XATTR_USER)
    }
}

/// xattr names that belong to cachefs and never pass through the mount.
pub(crate) fn is_reserved_xattr(name: &OsStr) -> bool {
    let b = name.as_bytes();
    b.starts_with(b"trusted.cachefs.") || b == XATTR_USER.as_bytes()
}

/// Which src version a cached file was fetched from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Origin {
    pub(crate) size: u64,
    pub(crate) mtime_sec: i64,
    pub(crate) mtime_nsec: i64,
    pub(crate) ino: u64,
    pub(crate) dirty: bool,
    /// Put while a writer that bypasses the daemon (FUSE passthrough) had the file
    /// open: src may lack bytes written after this record, and a crash before that
    /// writer's flush leaves no journal op for them, so the next start queues an
    /// upload ([`Store::open_writer_paths`]). Implies `dirty`; logged as dirty `2`.
    pub(crate) open_writer: bool,
}

impl Origin {
    /// The record for a fresh copy of the src file described by `st`.
    pub(crate) fn of(st: &Stat) -> Origin {
        Origin {
            size: st.st_size as u64,
            mtime_sec: st.st_mtime,
            mtime_nsec: st.st_mtime_nsec,
            ino: st.st_ino,
            dirty: false,
            open_writer: false,
        }
    }

    /// Whether src's file (`st`) is still the version this copy came from: the same
    /// size and modification time. The inode number is not part of a version: rclone
    /// (and most network filesystems behind FUSE) numbers inodes by path or by cache
    /// entry, so a file renamed there, or re-read after its directory cache expired,
    /// shows a new number for the same object. Taking that for a change made false
    /// conflicts and refetches of a node's own uploads.
    pub(crate) fn same_source(&self, st: &Stat) -> bool {
        let now = Origin::of(st);
        (self.size, self.mtime_sec, self.mtime_nsec) == (now.size, now.mtime_sec, now.mtime_nsec)
    }

    /// The old xattr format (read only, for the migration).
    fn decode_xattr(b: &[u8]) -> Option<Origin> {
        let text = std::str::from_utf8(b).ok()?;
        let mut it = text.split(' ');
        if it.next()? != "v1" {
            return None;
        }
        let mut num = || it.next()?.parse::<i64>().ok();
        Some(Origin {
            size: num()? as u64,
            mtime_sec: num()?,
            mtime_nsec: num()?,
            ino: num()? as u64,
            dirty: num()? != 0,
            open_writer: false,
        })
    }
}

/// The dst object a record belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    ino: u64,
    btime: Option<(i64, u32)>,
}

impl Key {
    fn of(id: &Ident) -> Key {
        Key {
            ino: id.ino,
            btime: id.btime,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rec {
    key: Key,
    origin: Origin,
}

impl Rec {
    fn applies_to(&self, id: &Ident) -> bool {
        id.kind == libc::S_IFREG && id.nlink == 1 && self.key == Key::of(id)
    }
}

/// One change of the log.
#[derive(Debug, PartialEq, Eq)]
enum Entry {
    Put(PathBuf, Rec),
    Remove(PathBuf),
    /// The path and everything below it.
    RemoveTree(PathBuf),
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|c| format!("{c:02x}")).collect()
}

pub(crate) fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl Entry {
    fn encode(&self) -> String {
        let body = match self {
            Entry::Put(p, r) => {
                let (bs, bn) = match r.key.btime {
                    Some((s, n)) => (s.to_string(), n.to_string()),
                    None => ("-".into(), "-".into()),
                };
                let o = &r.origin;
                format!(
                    "r {} {} {bs} {bn} {} {} {} {} {}",
                    hex(p.as_os_str().as_bytes()),
                    r.key.ino,
                    o.size,
                    o.mtime_sec,
                    o.mtime_nsec,
                    o.ino,
                    // 2: dirty, with a bypassing writer open (older versions read dirty)
                    if o.open_writer { 2 } else { u8::from(o.dirty) }
                )
            }
            Entry::Remove(p) => format!("d {}", hex(p.as_os_str().as_bytes())),
            Entry::RemoveTree(p) => format!("t {}", hex(p.as_os_str().as_bytes())),
        };
        format!("{:016x} {body}\n", crate::sys::fnv1a64(body.as_bytes()))
    }

    fn decode(line: &str) -> Option<Entry> {
        let (sum, body) = line.split_once(' ')?;
        if u64::from_str_radix(sum, 16).ok()? != crate::sys::fnv1a64(body.as_bytes()) {
            return None;
        }
        let mut it = body.split(' ');
        let tag = it.next()?;
        let path = PathBuf::from(std::ffi::OsString::from_vec(unhex(it.next()?)?));
        if path.as_os_str().is_empty() {
            return None;
        }
        let e = match tag {
            "d" => Entry::Remove(path),
            "t" => Entry::RemoveTree(path),
            "r" => {
                let ino = it.next()?.parse().ok()?;
                let (bs, bn) = (it.next()?, it.next()?);
                let btime = if bs == "-" {
                    None
                } else {
                    Some((bs.parse().ok()?, bn.parse().ok()?))
                };
                let mut num = || it.next()?.parse::<i64>().ok();
                let (size, mtime_sec, mtime_nsec, src_ino, dirty) =
                    (num()? as u64, num()?, num()?, num()? as u64, num()?);
                let origin = Origin {
                    size,
                    mtime_sec,
                    mtime_nsec,
                    ino: src_ino,
                    dirty: dirty != 0,
                    open_writer: dirty == 2,
                };
                Entry::Put(
                    path,
                    Rec {
                        key: Key { ino, btime },
                        origin,
                    },
                )
            }
            _ => return None,
        };
        it.next().is_none().then_some(e)
    }
}

struct Inner {
    map: BTreeMap<PathBuf, Rec>,
    /// The log, open for appending (`None` once it failed: records then live in memory
    /// only, and a restart finds the files local: safe).
    log: Option<File>,
    /// Lines in the log.
    lines: usize,
    /// When this process last knew src to hold each record's version (it put the
    /// record after a fetch or an upload, or a revalidation found src unchanged): a
    /// revalidation is not due before the interval has passed since. Kept by path, so
    /// it outlives the kernel forgetting the inode (a page-cache drop, a big walk).
    /// Not persisted: after a restart every record is checked once.
    verified_at: HashMap<PathBuf, Instant>,
    /// dst files open for writes that bypass the daemon (FUSE passthrough), with how
    /// many such opens each has ([`OpenWriter`] guards).
    open_writers: HashMap<Key, usize>,
}

impl Inner {
    fn apply(&mut self, e: Entry) {
        match e {
            Entry::Put(p, r) => {
                self.map.insert(p, r);
            }
            Entry::Remove(p) => {
                self.verified_at.remove(&p);
                self.map.remove(&p);
            }
            Entry::RemoveTree(p) => {
                for k in subtree(&self.map, &p) {
                    self.verified_at.remove(&k);
                    self.map.remove(&k);
                }
            }
        }
    }
}

fn subtree(map: &BTreeMap<PathBuf, Rec>, top: &Path) -> Vec<PathBuf> {
    map.range(top.to_path_buf()..)
        .take_while(|(k, _)| k.starts_with(top))
        .map(|(k, _)| k.clone())
        .collect()
}

/// The origin records of one dst (see the module doc).
pub struct Store {
    dst: Layer,
    inner: Mutex<Inner>,
}

/// A dst file open for writes that bypass the daemon; see [`Store::writer_opened`].
pub(crate) struct OpenWriter {
    store: Arc<Store>,
    key: Key,
}

impl std::fmt::Debug for OpenWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OpenWriter({:?})", self.key)
    }
}

impl Drop for OpenWriter {
    fn drop(&mut self) {
        let mut inner = self.store.inner.lock().unwrap();
        if let Some(n) = inner.open_writers.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                inner.open_writers.remove(&self.key);
            }
        }
    }
}

/// One store per dst root in this process.
static STORES: Mutex<Vec<(PathBuf, Arc<Store>)>> = Mutex::new(Vec::new());

fn log_path() -> PathBuf {
    Path::new(STATE_DIR).join(LOG)
}

impl Store {
    /// The store of the dst rooted at `root`, loaded (and migrated) on first use.
    pub fn of_root(root: &Path) -> io::Result<Arc<Store>> {
        let mut stores = STORES.lock().unwrap();
        if let Some((_, s)) = stores.iter().find(|(p, _)| p == root) {
            return Ok(Arc::clone(s));
        }
        let canonical = std::fs::canonicalize(root)?;
        if let Some((_, s)) = stores.iter().find(|(p, _)| *p == canonical) {
            let s = Arc::clone(s);
            stores.push((root.to_path_buf(), Arc::clone(&s)));
            return Ok(s);
        }
        let s = Arc::new(Store::load(Layer::open(&canonical)?)?);
        stores.push((root.to_path_buf(), Arc::clone(&s)));
        if canonical != root {
            stores.push((canonical, Arc::clone(&s)));
        }
        Ok(s)
    }

    /// The store of dst (`dst.root_path()`).
    pub(crate) fn of(dst: &Layer) -> io::Result<Arc<Store>> {
        Store::of_root(dst.root_path())
    }

    fn load(dst: Layer) -> io::Result<Store> {
        match dst.mkdir(Path::new(STATE_DIR), 0o700) {
            Err(e) if e.raw_os_error() != Some(libc::EEXIST) => return Err(e),
            _ => {}
        }
        let mut inner = Inner {
            map: BTreeMap::new(),
            log: None,
            lines: 0,
            verified_at: HashMap::new(),
            open_writers: HashMap::new(),
        };
        match dst.open_file(&log_path(), libc::O_RDONLY) {
            Ok(mut f) => {
                let mut text = Vec::new();
                f.read_to_end(&mut text)?;
                for line in text.split(|&b| b == b'\n') {
                    // A torn or foreign line is skipped: its record is lost (local).
                    if let Some(e) = std::str::from_utf8(line).ok().and_then(Entry::decode) {
                        inner.apply(e);
                    }
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                let mut n = 0;
                migrate_xattrs(&dst, Path::new(""), &mut inner.map, &mut n);
                if n > 0 {
                    log::info!("origin records: imported {n} from dst xattrs (older version)");
                }
            }
            Err(e) => return Err(e),
        }
        let store = Store {
            dst,
            inner: Mutex::new(inner),
        };
        {
            let mut inner = store.inner.lock().unwrap();
            store.compact(&mut inner)?;
        }
        Ok(store)
    }

    /// Rewrites the log with the live records (`sys::state_file`: temp file, fsync,
    /// rename, fsync of the state folder) and reopens it.
    fn compact(&self, inner: &mut Inner) -> io::Result<()> {
        inner.log = None;
        let dir = self.dst.open_dir(Path::new(STATE_DIR))?;
        let records = &inner.map;
        state_file::replace_at(
            dir.as_fd(),
            OsStr::new(LOG),
            OsStr::new(LOG_TMP),
            0o600,
            |f| {
                let mut buf = String::new();
                for (p, r) in records {
                    buf.push_str(&Entry::Put(p.clone(), *r).encode());
                    if buf.len() > 1 << 20 {
                        f.write_all(buf.as_bytes())?;
                        buf.clear();
                    }
                }
                f.write_all(buf.as_bytes())
            },
        )?;
        inner.lines = inner.map.len();
        inner.log = Some(self.dst.open_file(
            &log_path(),
            libc::O_WRONLY | libc::O_APPEND | libc::O_CLOEXEC,
        )?);
        Ok(())
    }

    /// Applies `e` in memory and appends it to the log, fdatasync'd when `durable`.
    /// In memory it applies even when the log cannot take it (a dirty mark still
    /// protects the file while the daemon runs); the error is returned so that a
    /// durable change can fail the operation that needed it.
    fn append(&self, inner: &mut Inner, e: Entry, durable: bool) -> io::Result<()> {
        let mut line = e.encode();
        inner.apply(e);
        if inner.log.is_none() {
            // After a failed append: reopen, and end a line the failure may have torn
            // (an empty line is skipped at load).
            inner.log = self
                .dst
                .open_file(
                    &log_path(),
                    libc::O_WRONLY | libc::O_APPEND | libc::O_CLOEXEC,
                )
                .ok();
            line.insert(0, '\n');
        }
        let Some(log) = inner.log.as_mut() else {
            return Err(io::Error::other("the origin record log cannot be opened"));
        };
        let written = log
            .write_all(line.as_bytes())
            .and_then(|()| if durable { log.sync_data() } else { Ok(()) });
        if let Err(e) = written {
            log::warn!("origin records: cannot append to the log: {e}");
            inner.log = None;
            return Err(e);
        }
        inner.lines += 1;
        if inner.lines > inner.map.len() * 2 + COMPACT_SLACK
            && let Err(e) = self.compact(inner)
        {
            log::warn!("origin records: cannot compact the log: {e}");
        }
        Ok(())
    }

    /// [`Store::append`] for a removal: the change already happened on dst, so a log
    /// that cannot take it is only logged (the record may then come back at the next
    /// start, where the dst object check keeps it from applying elsewhere).
    fn append_removal(&self, inner: &mut Inner, e: Entry, durable: bool) -> io::Result<()> {
        if let Err(err) = self.append(inner, e, durable) {
            log::warn!("origin records: a removal is not persisted: {err}");
        }
        Ok(())
    }

    /// The record of dst's file at `path`, if it has one that applies to it.
    pub(crate) fn get(&self, path: &Path) -> io::Result<Option<Origin>> {
        let Some(rec) = self.inner.lock().unwrap().map.get(path).copied() else {
            return Ok(None);
        };
        let id = self.dst.identity(path)?;
        Ok(id.filter(|id| rec.applies_to(id)).map(|_| rec.origin))
    }

    /// How long ago this process last knew src to hold `path`'s recorded version (see
    /// `Inner::verified_at`), if it did.
    pub(crate) fn verified_ago(&self, path: &Path) -> Option<Duration> {
        let inner = self.inner.lock().unwrap();
        inner.verified_at.get(path).map(Instant::elapsed)
    }

    /// Forgets when src was last known to hold the records at or below `path` (""
    /// for all): their next lookup or open compares them with src again.
    pub(crate) fn forget_verified_under(&self, path: &Path) {
        let mut inner = self.inner.lock().unwrap();
        inner.verified_at.retain(|p, _| !p.starts_with(path));
    }

    /// A revalidation found src still holding `path`'s recorded version.
    pub(crate) fn note_verified(&self, path: &Path) {
        let mut inner = self.inner.lock().unwrap();
        if inner.map.contains_key(path) {
            inner.verified_at.insert(path.to_path_buf(), Instant::now());
        }
    }

    /// The record of `path` if it applies to the dst object `id` (an open file).
    pub(crate) fn get_for(&self, path: &Path, id: &Ident) -> Option<Origin> {
        let rec = self.inner.lock().unwrap().map.get(path).copied()?;
        rec.applies_to(id).then_some(rec.origin)
    }

    /// Replaces `path`'s clean record `old` by the clean `new` (src settled on another
    /// version of the same bytes), unless the record changed meanwhile (a writer made
    /// it dirty, an upload replaced it, the file went): `Ok(false)` then.
    pub(crate) fn replace_clean(&self, path: &Path, old: &Origin, new: Origin) -> io::Result<bool> {
        let mut inner = self.inner.lock().unwrap();
        let Some(rec) = inner.map.get(path).copied() else {
            return Ok(false);
        };
        if rec.origin != *old || old.dirty || new.dirty || inner.open_writers.contains_key(&rec.key)
        {
            return Ok(false);
        }
        inner.verified_at.insert(path.to_path_buf(), Instant::now());
        let rec = Rec {
            key: rec.key,
            origin: new,
        };
        self.append(&mut inner, Entry::Put(path.to_path_buf(), rec), false)?;
        Ok(true)
    }

    /// `path`'s record is dirty only because it was uploaded while a writer held the
    /// file (`open_writer`), and none holds it now: one more upload, with no writer,
    /// makes it clean.
    pub(crate) fn uploaded_while_open(&self, path: &Path) -> bool {
        let inner = self.inner.lock().unwrap();
        matches!(inner.map.get(path), Some(rec)
            if rec.origin.open_writer && !inner.open_writers.contains_key(&rec.key))
    }

    /// Records that dst's object `id`, at `path`, derives from `origin`. A dirty record
    /// is durable on return.
    pub(crate) fn put(&self, path: &Path, id: &Ident, mut origin: Origin) -> io::Result<()> {
        if id.kind != libc::S_IFREG || id.nlink != 1 {
            return self.clear(path);
        }
        let mut inner = self.inner.lock().unwrap();
        if inner.open_writers.contains_key(&Key::of(id)) {
            // Later bytes may not reach the daemon before a crash: never clean now.
            origin.dirty = true;
            origin.open_writer = true;
        }
        let rec = Rec {
            key: Key::of(id),
            origin,
        };
        inner.verified_at.insert(path.to_path_buf(), Instant::now());
        if inner.map.get(path) == Some(&rec) {
            return Ok(());
        }
        self.append(
            &mut inner,
            Entry::Put(path.to_path_buf(), rec),
            origin.dirty,
        )
    }

    /// Records that the dst file open as `f`, at `path`, derives from `origin`.
    pub(crate) fn put_fd(&self, path: &Path, f: &File, origin: Origin) -> io::Result<()> {
        let id = super::layer::identity_at(f.as_fd(), c"")?;
        self.put(path, &id, origin)
    }

    /// Marks dst's file at `path` as changed locally (if it has a clean record), durably.
    pub(crate) fn mark_dirty(&self, path: &Path) -> io::Result<()> {
        let Some(rec) = self.inner.lock().unwrap().map.get(path).copied() else {
            return Ok(());
        };
        if rec.origin.dirty {
            return Ok(());
        }
        let Some(id) = self.dst.identity(path)? else {
            return Ok(());
        };
        let mut inner = self.inner.lock().unwrap();
        match inner.map.get(path) {
            Some(r) if r.applies_to(&id) && !r.origin.dirty => {
                let mut r = *r;
                r.origin.dirty = true;
                self.append(&mut inner, Entry::Put(path.to_path_buf(), r), true)
            }
            _ => Ok(()),
        }
    }

    /// Forgets the record of `path` (its file was removed). Durable only where a stale
    /// record could apply again: no birth time to tell a reused inode number.
    pub(crate) fn clear(&self, path: &Path) -> io::Result<()> {
        let mut inner = self.inner.lock().unwrap();
        let Some(rec) = inner.map.get(path).copied() else {
            return Ok(());
        };
        let durable = rec.key.btime.is_none();
        self.append_removal(&mut inner, Entry::Remove(path.to_path_buf()), durable)
    }

    /// Forgets the record of `path`, durably: the file got a second link, and the
    /// record would apply again once that link goes, to bytes changed through it.
    pub(crate) fn clear_durably(&self, path: &Path) -> io::Result<()> {
        let mut inner = self.inner.lock().unwrap();
        if !inner.map.contains_key(path) {
            return Ok(());
        }
        self.append_removal(&mut inner, Entry::Remove(path.to_path_buf()), true)
    }

    /// Forgets the records of `path` and everything below it (moved away, or replaced
    /// by a rename), durably: a moved file keeps its identity, and if it came back to
    /// this path the record would apply again, to bytes changed meanwhile (changes
    /// under another name mark no record dirty).
    pub fn clear_tree(&self, path: &Path) -> io::Result<()> {
        let mut inner = self.inner.lock().unwrap();
        if subtree(&inner.map, path).is_empty() {
            return Ok(());
        }
        self.append_removal(&mut inner, Entry::RemoveTree(path.to_path_buf()), true)
    }

    /// Notes that the dst file open as `f` takes writes that bypass the daemon, until
    /// the returned guard is dropped (records put meanwhile are `open_writer`).
    pub(crate) fn writer_opened(self: &Arc<Self>, f: &File) -> io::Result<OpenWriter> {
        let key = Key::of(&super::layer::identity_at(f.as_fd(), c"")?);
        *self
            .inner
            .lock()
            .unwrap()
            .open_writers
            .entry(key)
            .or_insert(0) += 1;
        Ok(OpenWriter {
            store: Arc::clone(self),
            key,
        })
    }

    /// Whether dst's object `id` is open for writing through the mount (a guard of
    /// [`Store::writer_opened`] is held).
    pub(crate) fn open_for_writing(&self, id: &Ident) -> bool {
        self.inner
            .lock()
            .unwrap()
            .open_writers
            .contains_key(&Key::of(id))
    }

    /// Paths whose record was put while a bypassing writer was open (and still applies
    /// to dst's file there): after a crash, src may lack their last bytes.
    pub(crate) fn open_writer_paths(&self) -> Vec<PathBuf> {
        let candidates: Vec<(PathBuf, Rec)> = {
            let inner = self.inner.lock().unwrap();
            inner
                .map
                .iter()
                .filter(|(_, r)| r.origin.open_writer)
                .map(|(p, r)| (p.clone(), *r))
                .collect()
        };
        candidates
            .into_iter()
            .filter(|(p, r)| matches!(self.dst.identity(p), Ok(Some(id)) if r.applies_to(&id)))
            .map(|(p, _)| p)
            .collect()
    }

    /// Number of records.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.inner.lock().unwrap().map.len()
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Imports the old per-file xattr records under `dir` (see the module doc).
fn migrate_xattrs(dst: &Layer, dir: &Path, map: &mut BTreeMap<PathBuf, Rec>, n: &mut usize) {
    let Ok(entries) = dst.read_dir(dir) else {
        return;
    };
    for e in entries {
        if is_reserved(&e.name) {
            continue;
        }
        let p = dir.join(&e.name);
        let kind = if e.kind != 0 {
            e.kind
        } else {
            match dst.identity(&p) {
                Ok(Some(id)) => id.kind,
                _ => continue,
            }
        };
        if kind == libc::S_IFDIR {
            migrate_xattrs(dst, &p, map, n);
        } else if kind == libc::S_IFREG
            && let Ok(v) = dst.getxattr(&p, xattr_name())
            && let Some(origin) = Origin::decode_xattr(&v)
            && let Ok(Some(id)) = dst.identity(&p)
            && id.nlink == 1
        {
            map.insert(
                p,
                Rec {
                    key: Key::of(&id),
                    origin,
                },
            );
            *n += 1;
        }
    }
}

/// The record of dst's file at `path`, if it has one.
pub(crate) fn read(dst: &Layer, path: &Path) -> io::Result<Option<Origin>> {
    Store::of(dst)?.get(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(dirty: bool) -> Origin {
        Origin {
            size: 5,
            mtime_sec: -3,
            mtime_nsec: 7,
            ino: 99,
            dirty,
            open_writer: false,
        }
    }

    #[test]
    fn log_lines_round_trip_and_reserved_names() {
        let rec = Rec {
            key: Key {
                ino: 4,
                btime: Some((1, 2)),
            },
            origin: origin(true),
        };
        for e in [
            Entry::Put(PathBuf::from("a b/\nc"), rec),
            Entry::Put(
                PathBuf::from("x"),
                Rec {
                    key: Key {
                        ino: 4,
                        btime: None,
                    },
                    ..rec
                },
            ),
            Entry::Remove(PathBuf::from("d")),
            Entry::RemoveTree(PathBuf::from("d/e")),
        ] {
            let line = e.encode();
            assert_eq!(Entry::decode(line.trim_end_matches('\n')), Some(e));
            // A torn line is rejected.
            assert_eq!(Entry::decode(&line[..line.len() - 3]), None);
        }
        assert_eq!(Entry::decode("garbage"), None);
        assert!(is_reserved_xattr(OsStr::new("trusted.cachefs.origin")));
        assert!(is_reserved_xattr(OsStr::new("user.cachefs.origin")));
        assert!(!is_reserved_xattr(OsStr::new("user.cachefs.pin")));
        assert!(!is_reserved_xattr(OsStr::new("user.other")));
    }

    fn fresh_store(root: &Path) -> Store {
        Store::load(Layer::open(root).unwrap()).unwrap()
    }

    #[test]
    fn records_persist_apply_to_their_object_only_and_leave_the_file_alone() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), b"x").unwrap();
        let ctime = |p: &str| {
            let st = Layer::open(d.path())
                .unwrap()
                .stat(Path::new(p))
                .unwrap()
                .unwrap();
            (st.st_ctime, st.st_ctime_nsec)
        };
        let before = ctime("f");
        let s = fresh_store(d.path());
        let id = s.dst.identity(Path::new("f")).unwrap().unwrap();
        s.put(Path::new("f"), &id, origin(false)).unwrap();
        assert_eq!(s.get(Path::new("f")).unwrap(), Some(origin(false)));
        s.mark_dirty(Path::new("f")).unwrap();
        assert_eq!(ctime("f"), before, "the dst file is never touched");
        // Reloaded from the log.
        let s = fresh_store(d.path());
        assert_eq!(s.get(Path::new("f")).unwrap(), Some(origin(true)));
        // Renamed away: the record does not follow, nor applies to what replaces it.
        std::fs::rename(d.path().join("f"), d.path().join("g")).unwrap();
        std::fs::write(d.path().join("f"), b"new").unwrap();
        assert_eq!(s.get(Path::new("f")).unwrap(), None);
        assert_eq!(s.get(Path::new("g")).unwrap(), None);
        // A second link suspends it.
        std::fs::rename(d.path().join("g"), d.path().join("h")).unwrap();
        let id = s.dst.identity(Path::new("h")).unwrap().unwrap();
        s.put(Path::new("h"), &id, origin(false)).unwrap();
        std::fs::hard_link(d.path().join("h"), d.path().join("l")).unwrap();
        assert_eq!(s.get(Path::new("h")).unwrap(), None);
        std::fs::remove_file(d.path().join("l")).unwrap();
        assert_eq!(s.get(Path::new("h")).unwrap(), Some(origin(false)));
        s.clear_tree(Path::new("h")).unwrap();
        // The stale record of "f" lingers until cleared (it applies to nothing).
        assert_eq!(s.len(), 1);
        s.clear(Path::new("f")).unwrap();
        assert!(s.is_empty());
        assert!(fresh_store(d.path()).is_empty());
    }

    #[test]
    fn a_record_put_while_a_writer_is_open_stays_dirty_and_is_listed_after_reload() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), b"x").unwrap();
        let f = File::open(d.path().join("f")).unwrap();
        let path = Path::new("f");
        {
            let s = Arc::new(fresh_store(d.path()));
            let id = s.dst.identity(path).unwrap().unwrap();
            let _guard = s.writer_opened(&f).unwrap();
            s.put(path, &id, origin(false)).unwrap();
            let got = s.get(path).unwrap().unwrap();
            assert!(got.dirty && got.open_writer, "{got:?}");
        }
        // Reloaded (as after kill -9): still listed, and read as dirty.
        let s = Arc::new(fresh_store(d.path()));
        assert_eq!(s.open_writer_paths(), vec![PathBuf::from("f")]);
        assert!(s.get(path).unwrap().unwrap().dirty);
        // Two opens: dirty until both are closed; then the next put (an upload) is clean.
        let id = s.dst.identity(path).unwrap().unwrap();
        let (one, two) = (s.writer_opened(&f).unwrap(), s.writer_opened(&f).unwrap());
        drop(one);
        s.put(path, &id, origin(false)).unwrap();
        assert!(s.get(path).unwrap().unwrap().open_writer);
        drop(two);
        s.put(path, &id, origin(false)).unwrap();
        assert_eq!(s.get(path).unwrap(), Some(origin(false)));
        assert!(s.open_writer_paths().is_empty());
        drop(s);
        assert!(fresh_store(d.path()).open_writer_paths().is_empty());
    }

    #[test]
    fn a_temp_file_left_by_a_crash_mid_compaction_does_not_stop_a_load() {
        let d = tempfile::tempdir().unwrap();
        drop(fresh_store(d.path()));
        std::fs::write(d.path().join(STATE_DIR).join(LOG_TMP), b"torn").unwrap();
        let s = fresh_store(d.path());
        assert!(s.is_empty());
        assert!(!d.path().join(STATE_DIR).join(LOG_TMP).exists());
    }

    #[test]
    fn old_xattr_records_are_imported_once() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("sub/f"), b"x").unwrap();
        let f = File::open(d.path().join("sub/f")).unwrap();
        let v = b"v1 5 -3 7 99 0";
        let r = crate::sys::fsetxattr(f.as_fd(), xattr_name(), v);
        if r.is_err() {
            return; // no xattrs on this filesystem
        }
        let s = fresh_store(d.path());
        assert_eq!(s.get(Path::new("sub/f")).unwrap(), Some(origin(false)));
        s.clear(Path::new("sub/f")).unwrap();
        // The log exists now: the xattr is not imported again.
        assert!(fresh_store(d.path()).is_empty());
    }
}
