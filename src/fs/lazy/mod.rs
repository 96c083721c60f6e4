//! Lazy range fetch of large src files (`--lazy-threshold`, `--block-size`).
//!
//! A src file at least the threshold large, opened read-only while dst has no copy,
//! is not copied whole: a sparse "partial" file the size of the src file is made in
//! the state folder (`.cachefs-state/lazy/<key>.data`) with a persisted map of the
//! blocks it holds (`<key>.map`). Reads wait for the blocks they need; sequential
//! reads are read ahead of.
//!
//! Streams: src is only ever read through [`Stream`]s, each a descriptor of its own
//! read strictly in order by one worker thread at a time (at most [`MAX_STREAMS`] per
//! file). A remote src such as rclone's VFS serves in-order reads of a descriptor as
//! one streamed request and turns every out-of-order read into a new ranged request,
//! so a read is given to the stream that reaches its block in order, or to an idle or
//! new stream positioned there ([`Partial::ensure`]); a sequential reader's stream
//! reads on ahead ([`Partial::note_read`]). One block is filled by one stream at a
//! time (`inflight`); the others skip it. Readers wait on a condvar, bounded by
//! `--src-timeout` without progress of their stream.
//!
//! Invariants:
//! - A partial file is never at its path in dst: for the rest of the core the file is
//!   still src-only. Anything that needs dst's copy (an open for writing, a truncate,
//!   a rename, a link, ...) goes through the core's copy-up, which *consumes* the
//!   partial: it fetches the missing blocks, gives the file src's attributes and
//!   installs it with one rename, like a whole copy. Handles reading the partial
//!   share its inode, so they see the installed file's bytes from then on and never
//!   fetch again ([`Partial::installed`]).
//! - A block is *ready* (readable from the partial file) once a stream wrote it, and
//!   marked present in the map only after its bytes are fdatasync'ed in the partial
//!   file (streams in batches, off their thread; a read whose blocks are not all in
//!   the map syncs every ready block before it returns, and so does the close of a
//!   handle); the map is replaced atomically (temp + rename) and carries a
//!   checksum. A missing, torn or foreign map means "no block present": blocks are
//!   fetched again (idempotent). A map is tied to the src version (size, mtime)
//!   it was fetched from; a changed src discards it.
//!
//! - Budget (issue 5): when the cache budget is on, every partial data file is an
//!   entry of the cache's usage index under its key `.cachefs-state/lazy/<key>.data`
//!   ([`data_rel_of`]). The [`Usage`] hook is told the data file's allocated bytes when
//!   a partial is made or loaded and after every block fetched, and is told when the
//!   files are gone (discarded, installed, evicted). A partial is evicted only through
//!   [`Lazy::evict_idle`]: it must be unused (no handle or stream worker holds its
//!   `Arc`, so only the table does) and not being installed (the core checks `copy_flights`).
//!   Room for a block is made by the core before the fetch (`CacheFs::lazy_ensure`);
//!   read-ahead only extends a stream over blocks with room free without evicting
//!   (their reservations live in the stream until each block is written).
//!
//! Lock order: [`Lazy::table`] -> [`Partial::map_write`] -> [`Partial::state`] -> the
//! [`Usage`] hook and the read-ahead's room reservations (the cache's index, a leaf).
//! No lock is held across src I/O or an fdatasync.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::layer::{Layer, Stat};
use super::names::STATE_DIR;
use super::origin::Origin;

const MAGIC: &[u8; 8] = b"CFSLAZY1";
/// Streams (src descriptors, each read in order by one thread at a time) per partial.
const MAX_STREAMS: usize = 4;
/// Read-ahead past a sequential reader (at least two blocks). It only has to keep one
/// stream busy: a remote src (rclone) streams a sequential read on one descriptor
/// itself, with its own read-ahead.
const READAHEAD: u64 = 32 << 20;
/// A reader of a block prefers an idle stream at most this far before it (at least two
/// blocks): that stream skips forward on its descriptor.
const JOIN: u64 = 8 << 20;
/// A stream's first read from src, and its largest (within one block): small first so
/// that a waiting reader's bytes arrive after the src's first-byte latency, not after a
/// whole block.
const FIRST_PIECE: u64 = 128 << 10;
const MAX_PIECE: u64 = 1 << 20;
/// A stream makes its blocks durable (fdatasync, then the map) every this many bytes
/// or this often, and whenever it stops; so does the close of a handle
/// ([`Partial::flush`]).
const SYNC_BATCH: u64 = 16 << 20;
const SYNC_EVERY: Duration = Duration::from_secs(1);
/// Background fillers (`--lazy-fill`) at most, all files together: one stream each,
/// behind the readers' fetches and read-ahead.
const MAX_FILLERS: usize = 2;

/// The folder (in dst) holding partial files and their maps.
pub fn lazy_dir() -> PathBuf {
    Path::new(STATE_DIR).join("lazy")
}

/// FNV-1a, 64 bits: stable across builds (keys and checksums on disk).
fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn key_of(path: &Path) -> String {
    format!("{:016x}", fnv(path.as_os_str().as_bytes()))
}

/// The data file (dst-relative) of `path`'s partial: its key in the cache's index.
pub fn data_rel_of(path: &Path) -> PathBuf {
    rels(&key_of(path)).0
}

/// Whether dst-relative `rel` names a partial data file (a key of [`data_rel_of`]).
pub fn is_data_rel(rel: &Path) -> bool {
    rel.parent() == Some(lazy_dir().as_path()) && rel.extension().is_some_and(|e| e == "data")
}

fn map_rel_of(data_rel: &Path) -> PathBuf {
    data_rel.with_extension("map")
}

/// The mount path whose partial has data file `data_rel`, from its map (`None`: no
/// intact map of that key).
pub fn path_of(dst: &Layer, data_rel: &Path) -> Option<PathBuf> {
    let key = data_rel.file_stem()?.to_str()?;
    let f = dst.open_file(&map_rel_of(data_rel), libc::O_RDONLY).ok()?;
    let map = Map::decode(&read_all(&f).ok()?)?;
    (key_of(&map.path) == key).then_some(map.path)
}

/// Told how much dst space partial files take (the cache budget). Called with the
/// partial's state lock held: implementations must not call back into the core.
pub trait Usage: Send + Sync {
    /// `path`'s partial, data file `data_rel`, now allocates `bytes` (made, loaded or
    /// a block fetched: a use).
    fn partial_grew(&self, data_rel: &Path, path: &Path, bytes: u64);
    /// The partial's files are gone (or no longer a partial: installed at its path).
    fn partial_gone(&self, data_rel: &Path);
}

fn allocated(f: &File) -> u64 {
    use std::os::unix::fs::MetadataExt;
    f.metadata().map_or(0, |m| m.blocks() * 512)
}

/// The persisted map of a partial file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Map {
    pub path: PathBuf,
    pub block: u64,
    pub origin: (u64, i64, i64, u64),
    pub present: Vec<u8>,
}

impl Map {
    pub fn blocks(&self) -> u64 {
        self.origin.0.div_ceil(self.block)
    }

    pub fn has(&self, b: u64) -> bool {
        self.present
            .get((b / 8) as usize)
            .is_some_and(|x| x & (1 << (b % 8)) != 0)
    }

    fn set(&mut self, b: u64) {
        self.present[(b / 8) as usize] |= 1 << (b % 8);
    }

    pub fn count(&self) -> u64 {
        self.present.iter().map(|b| u64::from(b.count_ones())).sum()
    }

    /// Bytes of the file the present blocks cover.
    pub fn present_bytes(&self) -> u64 {
        let size = self.origin.0;
        (0..self.blocks())
            .filter(|b| self.has(*b))
            .map(|b| self.block.min(size - b * self.block))
            .sum()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(64 + self.present.len());
        v.extend_from_slice(MAGIC);
        v.extend_from_slice(&self.block.to_le_bytes());
        v.extend_from_slice(&self.origin.0.to_le_bytes());
        v.extend_from_slice(&self.origin.1.to_le_bytes());
        v.extend_from_slice(&self.origin.2.to_le_bytes());
        v.extend_from_slice(&self.origin.3.to_le_bytes());
        let p = self.path.as_os_str().as_bytes();
        v.extend_from_slice(&(p.len() as u32).to_le_bytes());
        v.extend_from_slice(p);
        v.extend_from_slice(&self.present);
        let sum = fnv(&v);
        v.extend_from_slice(&sum.to_le_bytes());
        v
    }

    /// `None` for anything but a whole, intact map.
    pub fn decode(b: &[u8]) -> Option<Map> {
        if b.len() < 8 + 8 * 5 + 4 + 8 || &b[..8] != MAGIC {
            return None;
        }
        let (body, sum) = b.split_at(b.len() - 8);
        if fnv(body) != u64::from_le_bytes(sum.try_into().ok()?) {
            return None;
        }
        let u = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().unwrap());
        let block = u(8);
        let origin = (u(16), u(24) as i64, u(32) as i64, u(40));
        let plen = u32::from_le_bytes(body[48..52].try_into().unwrap()) as usize;
        let rest = &body[52..];
        if block == 0 || rest.len() < plen {
            return None;
        }
        let path = PathBuf::from(std::ffi::OsStr::from_bytes(&rest[..plen]));
        let present = rest[plen..].to_vec();
        let map = Map {
            path,
            block,
            origin,
            present,
        };
        (map.present.len() as u64 == map.blocks().div_ceil(8)).then_some(map)
    }
}

/// The src version a map is tied to: size and mtime, as [`Origin::same_source`] (the
/// last field, once the inode number, stays 0 so that the map format is unchanged).
fn origin_key(st: &Stat) -> (u64, i64, i64, u64) {
    let o = Origin::of(st);
    (o.size, o.mtime_sec, o.mtime_nsec, 0)
}

fn bit(set: &[u8], b: u64) -> bool {
    set.get((b / 8) as usize)
        .is_some_and(|x| x & (1 << (b % 8)) != 0)
}

fn set_bit(set: &mut [u8], b: u64) {
    set[(b / 8) as usize] |= 1 << (b % 8);
}

/// One reader of src: a descriptor of its own, read strictly in order from `pos` up to
/// `until` by one worker thread at a time. See the module docs ("Streams").
struct Stream {
    /// The next byte it reads. A block boundary, except inside block `cur`.
    pos: u64,
    /// It reads on up to here (a block boundary or the file's end), then idles.
    until: u64,
    /// The block it is filling: inflight, bytes `[cur * block, pos)` written.
    cur: Option<u64>,
    /// A worker thread runs it (it holds the descriptor meanwhile).
    running: bool,
    /// Its src descriptor while idle (`None`: not opened yet, or dropped after an error).
    file: Option<File>,
    /// Cache budget reservations of the read-ahead blocks it will fetch.
    guards: HashMap<u64, Box<dyn Send>>,
    /// Failures so far, and the last one's errno: a waiter fails with it.
    fails: u64,
    last_err: i32,
    /// Bytes moved so far, and when it last moved (or started): progress for waiters.
    moved: u64,
    last_move: Instant,
    /// When it was last given work (the least recently used idle stream is reused).
    used: u64,
}

impl Stream {
    /// Whether this stream's current run brings block `b`: it is filling it, or it
    /// runs and `b` is before its `until` or at most a block past it.
    fn brings(&self, b: u64, block: u64) -> bool {
        self.cur == Some(b)
            || (self.running && self.pos <= b * block && b * block <= self.until + block)
    }
}

struct State {
    /// Blocks durable in the data file (fdatasync'ed): what the map file says.
    map: Map,
    /// Blocks whose bytes are in the data file (maybe not synced yet): what reads may
    /// use. A superset of the map's present blocks.
    ready: Vec<u8>,
    /// Blocks a stream is filling.
    inflight: HashSet<u64>,
    streams: Vec<Stream>,
    /// Work handed out (for [`Stream::used`]).
    tick: u64,
    /// Bytes moved by all streams (progress of a waiter that has no stream yet).
    progress: u64,
    /// Consumed by a copy-up: the data file is now dst's copy, complete.
    installed: bool,
    /// Dropped (unlinked name, changed src): the map is no longer written.
    discarded: bool,
    /// Where the last read ended and where its sequential run began (sequential read
    /// detection).
    last_end: u64,
    run_start: u64,
    /// Budget reservations of reads that returned while a block they touch was still
    /// being filled (a reader waits only for its bytes, not the whole block): each is
    /// held until none of its blocks is inflight, so the block's bytes are reported
    /// to the [`Usage`] hook before its room is given back.
    held: Vec<Held>,
}

/// A reservation kept for blocks `first..=last` (see [`State::held`]).
struct Held {
    first: u64,
    last: u64,
    _guard: Box<dyn Send>,
}

impl State {
    /// Gives back the held reservations none of whose blocks is inflight any more
    /// (fetched and reported, or abandoned by a failed stream). Under the state lock:
    /// the guards' drop takes the cache's index lock, a leaf below it.
    fn release_held(&mut self) {
        let inflight = &self.inflight;
        self.held
            .retain(|h| (h.first..=h.last).any(|b| inflight.contains(&b)));
    }
}

/// Opens src's file again (a descriptor for one more stream).
pub type Opener = Box<dyn Fn() -> io::Result<File> + Send + Sync>;

/// One partially present file.
pub struct Partial {
    pub path: PathBuf,
    pub size: u64,
    block: u64,
    data_rel: PathBuf,
    map_rel: PathBuf,
    /// The partial file, read-write.
    pub data: File,
    /// src's file, read-only: its xattrs are copied at install (streams read
    /// descriptors of their own, or duplicates of it without an opener).
    src: File,
    /// Opens src's file for another stream (`None`: streams share duplicates of `src`).
    opener: Option<Opener>,
    /// `--src-timeout`: a wait for a stream fails after this long without progress
    /// (zero: waits forever).
    timeout: Duration,
    dst: Arc<Layer>,
    state: Mutex<State>,
    /// Notified whenever a stream moves, fails or stops.
    done: Condvar,
    map_write: Mutex<()>,
    /// A background filler runs for this partial (`--lazy-fill`).
    filling: AtomicBool,
    /// The cache budget's hook, if there is a budget.
    usage: Option<Arc<dyn Usage>>,
}

impl Partial {
    pub fn installed(&self) -> bool {
        self.state.lock().unwrap().installed
    }

    /// Every block is present (durable).
    pub fn complete(&self) -> bool {
        let s = self.state.lock().unwrap();
        s.installed || s.map.count() == s.map.blocks()
    }

    pub fn map(&self) -> Map {
        self.state.lock().unwrap().map.clone()
    }

    /// Read-ahead past a sequential reader, in bytes (at least two blocks).
    fn readahead(&self) -> u64 {
        READAHEAD.max(2 * self.block).div_ceil(self.block) * self.block
    }

    /// See [`JOIN`].
    fn join(&self) -> u64 {
        JOIN.max(2 * self.block)
    }

    fn block_end(&self, b: u64) -> u64 {
        ((b + 1) * self.block).min(self.size)
    }

    /// Bytes of the blocks of `[offset, offset + len)` that are neither present nor
    /// being fetched nor reserved by read-ahead (what a read there would add to dst).
    pub fn missing(&self, offset: u64, len: u64) -> u64 {
        let end = (offset.saturating_add(len)).min(self.size);
        if offset >= end {
            return 0;
        }
        let s = self.state.lock().unwrap();
        if s.installed {
            return 0;
        }
        (offset / self.block..=(end - 1) / self.block)
            .filter(|b| {
                !bit(&s.ready, *b)
                    && !s.inflight.contains(b)
                    && !s.streams.iter().any(|st| st.guards.contains_key(b))
            })
            .map(|b| self.block.min(self.size - b * self.block))
            .sum()
    }

    /// Whether bytes `[.., to)` of block `b` can be read from the data file now.
    fn readable(&self, s: &State, b: u64, to: u64) -> bool {
        s.installed
            || bit(&s.ready, b)
            || s.streams.iter().any(|st| st.cur == Some(b) && st.pos >= to)
    }

    /// Makes the bytes `[offset, offset + len)` readable in the data file (clipped to
    /// the file): a stream that will reach them in order brings them, else an idle
    /// or new stream starts at the first missing block. Fails with the stream's error,
    /// or ETIMEDOUT when the stream it waits for moved no byte for the timeout.
    pub fn ensure(self: &Arc<Self>, offset: u64, len: u64) -> io::Result<()> {
        let end = (offset.saturating_add(len)).min(self.size);
        if offset >= end {
            return Ok(());
        }
        let need_until = self.block_end((end - 1) / self.block);
        let mut s = self.state.lock().unwrap();
        let mut watch: Option<(usize, u64)> = None;
        let mut seen = (usize::MAX, u64::MAX);
        let mut since = Instant::now();
        loop {
            let first = (offset / self.block..=(end - 1) / self.block)
                .find(|b| !self.readable(&s, *b, end.min(self.block_end(*b))));
            let Some(b) = first else {
                // A read returns only durable bytes, as with a whole copy: if a block
                // it reads is not in the map yet, every ready block is synced now
                // (one fdatasync, usually for a whole read-ahead window).
                let unsynced = !s.installed
                    && !s.discarded
                    && (offset / self.block..=(end - 1) / self.block).any(|b| !s.map.has(b));
                drop(s);
                if unsynced {
                    self.flush()?;
                }
                return Ok(());
            };
            if let Some((i, fails)) = watch
                && s.streams[i].fails != fails
            {
                return Err(io::Error::from_raw_os_error(s.streams[i].last_err));
            }
            let token = match self.assign(&mut s, b, need_until) {
                Some(i) => {
                    watch = Some((i, s.streams[i].fails));
                    let st = &s.streams[i];
                    if st.running
                        && !self.timeout.is_zero()
                        && st.last_move.elapsed() >= self.timeout
                    {
                        // Stuck in src already: fail now rather than wait again.
                        return Err(io::Error::from_raw_os_error(libc::ETIMEDOUT));
                    }
                    (i, st.moved)
                }
                None => (usize::MAX, s.progress),
            };
            if token != seen {
                seen = token;
                since = Instant::now();
            } else if !self.timeout.is_zero() && since.elapsed() >= self.timeout {
                return Err(io::Error::from_raw_os_error(libc::ETIMEDOUT));
            }
            s = if self.timeout.is_zero() {
                self.done.wait(s).unwrap()
            } else {
                let left = self.timeout.saturating_sub(since.elapsed());
                self.done
                    .wait_timeout(s, left.max(Duration::from_millis(10)))
                    .unwrap()
                    .0
            };
        }
    }

    /// After a read of `[offset, offset + len)` returned (or failed): keeps `guard`, the
    /// budget's reservation for the blocks it fetched, until none of those blocks is
    /// being filled any more. A read returns as soon as its own bytes are there, while
    /// its stream still fills the rest of the block; giving the room back then would
    /// let another fetch take it before the block's bytes are counted.
    pub fn hold_until_fetched(&self, offset: u64, len: u64, guard: Box<dyn Send>) {
        let end = (offset.saturating_add(len)).min(self.size);
        if offset >= end {
            return;
        }
        let (first, last) = (offset / self.block, (end - 1) / self.block);
        let mut s = self.state.lock().unwrap();
        if (first..=last).any(|b| s.inflight.contains(&b)) {
            s.held.push(Held {
                first,
                last,
                _guard: guard,
            });
        } else {
            // Dropped under the state lock: the index lock is a leaf below it.
            drop(guard);
        }
    }

    /// Gives block `b` (and on up to `until`) to a stream: one that reaches it in
    /// order, else the least recently used idle one (moved there), else a new one (at
    /// most [`MAX_STREAMS`]). Starts its worker if it has none. `None`: every stream is
    /// busy elsewhere (the caller waits for one).
    fn assign(self: &Arc<Self>, s: &mut State, b: u64, until: u64) -> Option<usize> {
        let i = self.stream_for(s, b)?;
        s.tick += 1;
        let tick = s.tick;
        let st = &mut s.streams[i];
        st.until = st.until.max(until);
        st.used = tick;
        self.start(s, i);
        Some(i)
    }

    /// The stream to bring block `b`, moved there if it was idle elsewhere (see
    /// [`Partial::assign`]). An idle stream at most [`JOIN`] before `b` is preferred:
    /// it skips forward on its descriptor (rclone serves a short forward skip from
    /// what it has read ahead, without a new request).
    fn stream_for(&self, s: &mut State, b: u64) -> Option<usize> {
        let (block, join) = (self.block, self.join());
        if let Some((i, _)) = s
            .streams
            .iter()
            .enumerate()
            .filter(|(_, st)| st.brings(b, block))
            .max_by_key(|(_, st)| st.pos)
        {
            return Some(i);
        }
        let idle = |st: &&Stream| !st.running;
        let near = s
            .streams
            .iter()
            .enumerate()
            .filter(|(_, st)| idle(st) && st.pos <= b * block && b * block - st.pos <= join)
            .max_by_key(|(_, st)| st.pos)
            .map(|(i, _)| i);
        let lru = || {
            s.streams
                .iter()
                .enumerate()
                .filter(|(_, st)| idle(st))
                .min_by_key(|(_, st)| st.used)
                .map(|(i, _)| i)
        };
        let i = match near.or_else(lru) {
            Some(i) => i,
            None if s.streams.len() < MAX_STREAMS => {
                s.streams.push(Stream {
                    pos: 0,
                    until: 0,
                    cur: None,
                    running: false,
                    file: None,
                    guards: HashMap::new(),
                    fails: 0,
                    last_err: libc::EIO,
                    moved: 0,
                    last_move: Instant::now(),
                    used: 0,
                });
                s.streams.len() - 1
            }
            None => return None,
        };
        let st = &mut s.streams[i];
        st.pos = b * block;
        st.until = st.pos;
        st.guards.clear();
        Some(i)
    }

    /// Starts stream `i`'s worker unless it runs.
    fn start(self: &Arc<Self>, s: &mut State, i: usize) {
        let st = &mut s.streams[i];
        if st.running || st.pos >= st.until {
            return;
        }
        st.running = true;
        st.last_move = Instant::now();
        let p = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("cachefs-fetch".into())
            .spawn(move || p.run_stream(i));
        if let Err(e) = spawned {
            log::warn!("{}: cannot start a fetch thread: {e}", self.path.display());
            let st = &mut s.streams[i];
            st.running = false;
            st.fails += 1;
            st.last_err = e.raw_os_error().unwrap_or(libc::EIO);
            st.until = st.pos;
        }
    }

    /// A descriptor for a stream: src's file opened again (checked to be the version
    /// this partial is of), or a duplicate of the first one.
    fn open_src(&self) -> io::Result<File> {
        let Some(opener) = &self.opener else {
            return self.src.try_clone();
        };
        let f = opener()?;
        let st = f.metadata()?;
        use std::os::unix::fs::MetadataExt;
        let origin = self.state.lock().unwrap().map.origin;
        if st.len() != origin.0 || (st.mtime(), st.mtime_nsec()) != (origin.1, origin.2) {
            log::warn!(
                "{}: src changed while it was being fetched",
                self.path.display()
            );
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(f)
    }

    /// Stream `i`'s worker: reads src in order, in growing pieces (the first small, so
    /// that a waiting reader gets its bytes early), skipping blocks that are ready or
    /// that another stream fills; marks blocks ready as they complete and makes them
    /// durable in batches ([`SYNC_BATCH`]). Exits when it reaches `until` (after
    /// syncing), at an error (recorded for its waiters) or when the partial is
    /// installed.
    fn run_stream(self: Arc<Self>, i: usize) {
        let mut file = self.state.lock().unwrap().streams[i].file.take();
        let mut piece = FIRST_PIECE;
        let mut unsynced: Vec<u64> = Vec::new();
        let mut synced = Instant::now();
        let mut buf = Vec::new();
        let failed = loop {
            let next = {
                let mut s = self.state.lock().unwrap();
                self.next_piece(&mut s, i, piece)
            };
            let Some((pos, len)) = next else {
                // Idle (or installed): make the batch durable, then stop unless more
                // work came meanwhile (decided under the lock, with `running`).
                if let Err(e) = self.commit(&mut unsynced) {
                    break e;
                }
                let mut s = self.state.lock().unwrap();
                if self.next_piece(&mut s, i, 0).is_some() {
                    continue;
                }
                // Keep the descriptor for the next run while a handle may read on;
                // with none left (only the table and running workers hold the
                // partial), close it: an idle rclone handle holds a request and its
                // read-ahead buffer.
                let workers = s.streams.iter().filter(|st| st.running).count();
                let st = &mut s.streams[i];
                st.running = false;
                if Arc::strong_count(&self) > 1 + workers {
                    st.file = file;
                }
                self.done.notify_all();
                return;
            };
            if file.is_none() {
                match self.open_src() {
                    Ok(f) => file = Some(f),
                    Err(e) => break e,
                }
            }
            buf.resize(len as usize, 0);
            // Timed as a src `read`; its failure is accounted by the reader that waits
            // for it (or the install), not here.
            let read = crate::metrics::timed(crate::metrics::SrcOp::Read, || {
                read_exact_at(file.as_ref().unwrap(), &mut buf, pos)
            });
            if let Err(e) = read {
                break e;
            }
            crate::metrics::lazy_fetched(len);
            // All-zero runs stay holes (a sparse src stays sparse in dst).
            if buf.iter().any(|x| *x != 0)
                && let Err(e) = self.data.write_all_at(&buf, pos)
            {
                break e;
            }
            {
                let mut s = self.state.lock().unwrap();
                let State {
                    streams,
                    ready,
                    inflight,
                    progress,
                    discarded,
                    installed,
                    ..
                } = &mut *s;
                let st = &mut streams[i];
                st.pos = pos + len;
                st.moved += len;
                st.last_move = Instant::now();
                *progress += len;
                if let Some(b) = st.cur
                    && st.pos == self.block_end(b)
                {
                    st.cur = None;
                    // The block's read-ahead reservation is given back only after its
                    // bytes are reported below: never is the block in neither.
                    let guard = st.guards.remove(&b);
                    set_bit(ready, b);
                    inflight.remove(&b);
                    unsynced.push(b);
                    // Under the state lock: reports of one partial arrive in order,
                    // and none after it was discarded (which reports "gone").
                    if !*discarded
                        && !*installed
                        && let Some(u) = &self.usage
                    {
                        u.partial_grew(&self.data_rel, &self.path, allocated(&self.data));
                    }
                    drop(guard);
                    s.release_held();
                }
                self.done.notify_all();
            }
            piece = (piece * 2).min(MAX_PIECE);
            if unsynced.len() as u64 * self.block >= SYNC_BATCH
                || synced.elapsed() >= SYNC_EVERY && !unsynced.is_empty()
            {
                // On a thread of its own: the stream reads on meanwhile (an
                // fdatasync here would stall src, and rclone's request with it).
                let (p, mut blocks) = (Arc::clone(&self), std::mem::take(&mut unsynced));
                let spawned = std::thread::Builder::new()
                    .name("cachefs-sync".into())
                    .spawn(move || {
                        if let Err(e) = p.commit(&mut blocks) {
                            log::warn!("{}: sync: {e}", p.path.display());
                        }
                    });
                if let Err(e) = spawned {
                    // The blocks stay ready; the next flush or stop syncs them.
                    log::warn!("{}: cannot start a sync thread: {e}", self.path.display());
                }
            }
            if unsynced.is_empty() {
                synced = Instant::now();
            }
        };
        let e = failed;
        log::debug!("{}: fetch stream {i}: {e}", self.path.display());
        {
            let mut s = self.state.lock().unwrap();
            let State {
                streams, inflight, ..
            } = &mut *s;
            let st = &mut streams[i];
            if let Some(b) = st.cur.take() {
                inflight.remove(&b);
                st.pos = b * self.block;
            }
            st.fails += 1;
            st.last_err = e.raw_os_error().unwrap_or(libc::EIO);
            st.until = st.pos;
            st.guards.clear();
            st.running = false;
            s.release_held();
            // The descriptor is dropped: the next run opens a fresh one.
            self.done.notify_all();
        }
        if let Err(e) = self.commit(&mut unsynced) {
            log::debug!("{}: sync: {e}", self.path.display());
        }
    }

    /// Stream `i`'s next piece, at most `piece` bytes (0: only whether there is one):
    /// skips ready blocks and blocks another stream fills, takes the next block as
    /// inflight. `None`: it reached `until`, or the partial was installed.
    fn next_piece(&self, s: &mut State, i: usize, piece: u64) -> Option<(u64, u64)> {
        if s.installed {
            return None;
        }
        let State {
            streams,
            ready,
            inflight,
            ..
        } = s;
        let st = &mut streams[i];
        loop {
            if st.pos >= st.until.min(self.size) {
                return None;
            }
            if st.cur.is_none() {
                let b = st.pos / self.block;
                if bit(ready, b) || inflight.contains(&b) {
                    st.pos = self.block_end(b);
                    st.guards.remove(&b);
                    continue;
                }
                if piece == 0 {
                    return Some((st.pos, 0));
                }
                inflight.insert(b);
                st.cur = Some(b);
            }
            let b = st.cur.unwrap();
            return Some((st.pos, piece.min(self.block_end(b) - st.pos)));
        }
    }

    /// Makes every ready block durable (a handle closes): what was read through it
    /// survives a crash.
    pub fn flush(&self) -> io::Result<()> {
        self.flush_blocks(0, self.size.div_ceil(self.block))
    }

    /// A handle closed: idle streams close their descriptors (an idle rclone handle
    /// holds a request and its read-ahead buffer); a reader that goes on opens new ones.
    pub fn close_idle(&self) {
        let files: Vec<File> = {
            let mut s = self.state.lock().unwrap();
            s.streams
                .iter_mut()
                .filter(|st| !st.running)
                .filter_map(|st| st.file.take())
                .collect()
        };
        drop(files);
    }

    /// Makes the ready blocks of `[first, end)` durable.
    fn flush_blocks(&self, first: u64, end: u64) -> io::Result<()> {
        let mut blocks: Vec<u64> = {
            let s = self.state.lock().unwrap();
            if s.installed || s.discarded {
                return Ok(());
            }
            (first..end)
                .filter(|b| bit(&s.ready, *b) && !s.map.has(*b))
                .collect()
        };
        self.commit(&mut blocks)
    }

    /// Makes `blocks` (ready, written) durable: fdatasync, then the map says present.
    fn commit(&self, blocks: &mut Vec<u64>) -> io::Result<()> {
        if blocks.is_empty() {
            return Ok(());
        }
        // Durable before the map may say "present".
        self.data.sync_data()?;
        let live = {
            let mut s = self.state.lock().unwrap();
            for b in blocks.drain(..) {
                s.map.set(b);
            }
            let live = !s.discarded && !s.installed;
            // Writeback may have allocated metadata blocks since the blocks were
            // reported: report the synced size (under the state lock, as always).
            if live && let Some(u) = &self.usage {
                u.partial_grew(&self.data_rel, &self.path, allocated(&self.data));
            }
            live
        };
        if live {
            self.persist()?;
        }
        Ok(())
    }

    /// Writes the map (temp + rename).
    fn persist(&self) -> io::Result<()> {
        let _w = self.map_write.lock().unwrap();
        let bytes = {
            let s = self.state.lock().unwrap();
            if s.discarded || s.installed {
                return Ok(());
            }
            s.map.encode()
        };
        write_atomic(&self.dst, &self.map_rel, &bytes)
    }

    /// Called after a read at `[offset, offset+len)` was served: once a reader has read
    /// at least a block sequentially, the stream ahead of it (or an idle or new one, at
    /// the first missing block) reads on in order past the read: twice the run so far,
    /// from two blocks up to [`READAHEAD`].
    /// Each read-ahead block only if `room(bytes)` gives a guard (the cache budget's
    /// reservation, held until the block is fetched; read-ahead never evicts).
    pub fn note_read(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
        room: &dyn Fn(u64) -> Option<Box<dyn Send>>,
    ) {
        let mut s = self.state.lock().unwrap();
        // The kernel sends a sequential reader's reads several at a time, so they
        // may arrive a little out of order: a read continues the run if it starts at
        // most a block past its end and does not end before its start.
        if offset > s.last_end + self.block || offset + len < s.run_start {
            s.run_start = offset;
            s.last_end = offset + len;
        } else {
            s.last_end = s.last_end.max(offset + len);
        }
        let sequential = s.last_end - s.run_start >= self.block;
        let end = (offset + len).min(self.size);
        if !sequential || s.installed || end >= self.size {
            return;
        }
        // Ramps up like the kernel's read-ahead: twice the run so far, at most
        // READAHEAD (a random reader whose reads the kernel rounds up to a block does
        // not pull in a whole window each time).
        let run = s.last_end - s.run_start;
        let ahead = (2 * run).clamp(2 * self.block, self.readahead());
        let target = (end + ahead).min(self.size);
        let target = self.block_end((target - 1) / self.block);
        let Some(c) = (end / self.block..target.div_ceil(self.block))
            .find(|b| !bit(&s.ready, *b) && !s.inflight.contains(b))
        else {
            return;
        };
        let Some(i) = self.stream_for(&mut s, c) else {
            return;
        };
        // Reserve room for the blocks this extends the stream over.
        let from = s.streams[i].until.max(c * self.block) / self.block;
        let mut until = s.streams[i].until.max(c * self.block);
        for b in from..target.div_ceil(self.block) {
            let free = !bit(&s.ready, b)
                && !s.inflight.contains(&b)
                && !s.streams.iter().any(|st| st.guards.contains_key(&b));
            if free {
                // The cache's index lock is a leaf below the state lock.
                let Some(guard) = room(self.block_end(b) - b * self.block) else {
                    break;
                };
                s.streams[i].guards.insert(b, guard);
            }
            until = self.block_end(b);
        }
        s.tick += 1;
        let tick = s.tick;
        let st = &mut s.streams[i];
        st.until = st.until.max(until);
        st.used = tick;
        self.start(&mut s, i);
    }

    /// `--lazy-fill`: fetches the blocks no read has fetched, first to last, on a
    /// thread of its own (one per partial, [`MAX_FILLERS`] in all; none is started
    /// when that many run). Each block only if `room(bytes)` gives a guard (the cache
    /// budget's reservation, which never evicts for it). Stops at the first failure,
    /// when room runs out, or once the partial is installed or discarded. The next
    /// open of the completed file installs it at its path like a whole copy.
    pub fn fill_in_background(
        self: &Arc<Self>,
        room: impl Fn(u64) -> Option<Box<dyn Send>> + Send + 'static,
    ) {
        if self.filling.swap(true, Ordering::AcqRel) {
            return;
        }
        if FILLERS.fetch_add(1, Ordering::AcqRel) >= MAX_FILLERS {
            FILLERS.fetch_sub(1, Ordering::AcqRel);
            self.filling.store(false, Ordering::Release);
            return;
        }
        let p = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("cachefs-fill".into())
            .spawn(move || {
                p.fill(&room);
                p.filling.store(false, Ordering::Release);
                FILLERS.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            FILLERS.fetch_sub(1, Ordering::AcqRel);
            self.filling.store(false, Ordering::Release);
        }
    }

    /// Fetches the missing blocks in runs (up to [`READAHEAD`] each, so that one
    /// stream reads them in order), with room for each block.
    fn fill(self: &Arc<Self>, room: &dyn Fn(u64) -> Option<Box<dyn Send>>) {
        let blocks = self.size.div_ceil(self.block);
        let run = self.readahead() / self.block;
        let mut b = 0;
        while b < blocks {
            {
                let s = self.state.lock().unwrap();
                if s.installed || s.discarded {
                    return;
                }
                if bit(&s.ready, b) {
                    b += 1;
                    continue;
                }
            }
            let mut guards = Vec::new();
            let mut end = b;
            while end < blocks && end - b < run {
                if bit(&self.state.lock().unwrap().ready, end) {
                    break;
                }
                let Some(g) = room(self.block_end(end) - end * self.block) else {
                    break;
                };
                guards.push(g);
                end += 1;
            }
            if end == b {
                log::debug!(
                    "{}: fill stopped, no room in the cache",
                    self.path.display()
                );
                return;
            }
            if let Err(e) = self.ensure(b * self.block, (end - b) * self.block) {
                log::debug!("{}: fill stopped at block {b}: {e}", self.path.display());
                return;
            }
            drop(guards);
            b = end;
        }
        log::debug!("{}: filled in the background", self.path.display());
    }

    pub fn block(&self) -> u64 {
        self.block
    }

    /// src's file (read-only).
    pub fn src(&self) -> &File {
        &self.src
    }

    /// Before an install: no fetch starts any more and none is in flight.
    pub fn seal(&self) {
        let mut s = self.state.lock().unwrap();
        s.installed = true;
        while !s.inflight.is_empty() {
            s = self.done.wait(s).unwrap();
        }
    }

    /// Waits until no stream runs (their blocks are durable and in the map).
    pub fn quiesce(&self) {
        let mut s = self.state.lock().unwrap();
        while s.streams.iter().any(|st| st.running) {
            s = self.done.wait(s).unwrap();
        }
    }

    /// A failed install: fetches may go on.
    pub fn unseal(&self) {
        self.state.lock().unwrap().installed = false;
    }

    /// The staged data file (for the install), once every block of `[0, limit)` is
    /// present.
    pub fn data_rel(&self) -> &Path {
        &self.data_rel
    }
}

/// Reads exactly `buf.len()` bytes at `off` (EIO if src ends early: never mark bytes we
/// do not have).
fn read_exact_at(f: &File, buf: &mut [u8], off: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => return Err(io::Error::from_raw_os_error(libc::EIO)),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl std::fmt::Debug for Partial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partial")
            .field("path", &self.path)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// Background fillers running (all files together).
static FILLERS: AtomicUsize = AtomicUsize::new(0);

fn write_atomic(dst: &Layer, rel: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = rel.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = dst.create_file(&tmp, libc::O_WRONLY | libc::O_TRUNC, 0o600)?;
    f.write_all(bytes)?;
    drop(f);
    dst.rename(&tmp, rel, 0)
}

/// The partial files of one dst.
pub struct Lazy {
    dst: Arc<Layer>,
    /// src, to open a src file again for another stream (`None`: streams share
    /// duplicates of the descriptor the partial was opened with).
    src: Option<Arc<Layer>>,
    /// `--src-timeout` (see [`Partial::ensure`]).
    timeout: Duration,
    pub threshold: u64,
    pub block: u64,
    table: Mutex<HashMap<PathBuf, Arc<Partial>>>,
    /// The cache budget's hook (set before the mount serves requests).
    usage: OnceLock<Arc<dyn Usage>>,
}

impl Lazy {
    /// Creates the folder; drops leftovers of a crash that no longer apply (temp maps,
    /// garbage maps, data without a map, maps of paths dst now holds itself).
    pub fn new(dst: Arc<Layer>, threshold: u64, block: u64) -> io::Result<Lazy> {
        match dst.mkdir(&lazy_dir(), 0o700) {
            Err(e) if e.raw_os_error() != Some(libc::EEXIST) => return Err(e),
            _ => {}
        }
        let lazy = Lazy {
            dst,
            src: None,
            timeout: Duration::ZERO,
            threshold,
            block,
            table: Mutex::new(HashMap::new()),
            usage: OnceLock::new(),
        };
        lazy.sweep()?;
        Ok(lazy)
    }

    fn sweep(&self) -> io::Result<()> {
        let dir = lazy_dir();
        let names: Vec<String> = self
            .dst
            .read_dir(&dir)?
            .into_iter()
            .map(|e| e.name.to_string_lossy().into_owned())
            .collect();
        let mut keep = HashSet::new();
        for n in &names {
            if let Some(key) = n.strip_suffix(".map") {
                let ok = self
                    .dst
                    .open_file(&dir.join(n), libc::O_RDONLY)
                    .ok()
                    .and_then(|f| read_all(&f).ok())
                    .and_then(|b| Map::decode(&b))
                    .is_some_and(|m| {
                        key_of(&m.path) == key && matches!(self.dst.stat(&m.path), Ok(None))
                    });
                if ok {
                    keep.insert(key.to_string());
                }
            }
        }
        for n in &names {
            let key = n.split('.').next().unwrap_or("");
            if n.ends_with(".tmp") || !keep.contains(key) {
                let _ = self.dst.unlink(&dir.join(n));
            }
        }
        Ok(())
    }

    /// Streams open `src`'s files themselves (one descriptor each), and a wait for a
    /// stream fails after `timeout` without progress (zero: never).
    pub fn with_src(mut self, src: Arc<Layer>, timeout: Duration) -> Lazy {
        self.src = Some(src);
        self.timeout = timeout;
        self
    }

    /// Attaches the cache budget: partials made from now on report their size.
    pub fn set_usage(&self, usage: Arc<dyn Usage>) {
        let _ = self.usage.set(usage);
    }

    fn gone(&self, data_rel: &Path) {
        if let Some(u) = self.usage.get() {
            u.partial_gone(data_rel);
        }
    }

    /// Whether a src file described by `st` is fetched lazily.
    pub fn applies(&self, st: &Stat) -> bool {
        self.threshold > 0
            && st.st_mode & libc::S_IFMT == libc::S_IFREG
            && st.st_size as u64 >= self.threshold
    }

    /// The partial for `path` (src's file `src_file`, version `st`), made now (a
    /// sparse file and an empty map) if there is none.
    pub fn open_or_create(
        &self,
        path: &Path,
        st: &Stat,
        src_file: impl FnOnce() -> io::Result<File>,
    ) -> io::Result<Arc<Partial>> {
        let mut t = self.table.lock().unwrap();
        self.get_locked_with(&mut t, path, st, src_file)
    }

    fn get_locked_with(
        &self,
        t: &mut HashMap<PathBuf, Arc<Partial>>,
        path: &Path,
        st: &Stat,
        src_file: impl FnOnce() -> io::Result<File>,
    ) -> io::Result<Arc<Partial>> {
        // In memory and current?
        if let Some(p) = t.get(path) {
            let s = p.state.lock().unwrap();
            let current = s.map.origin == origin_key(st) && !s.installed;
            drop(s);
            if current {
                return Ok(Arc::clone(p));
            }
            let p = t.remove(path).unwrap();
            self.drop_files(&p);
        }
        let key = key_of(path);
        let (data_rel, map_rel) = rels(&key);
        let src = src_file()?;
        // On disk (a previous run) and current?
        let loaded = self
            .dst
            .open_file(&map_rel, libc::O_RDONLY)
            .ok()
            .and_then(|f| read_all(&f).ok())
            .and_then(|b| Map::decode(&b))
            .filter(|m| m.path == path && m.origin == origin_key(st) && m.block > 0)
            .and_then(|m| {
                let f = self.dst.open_file(&data_rel, libc::O_RDWR).ok()?;
                (f.metadata().ok()?.len() == m.origin.0).then_some((m, f))
            });
        let (map, data) = match loaded {
            Some(x) => x,
            None => {
                let _ = self.dst.unlink(&map_rel);
                let _ = self.dst.unlink(&data_rel);
                let size = st.st_size as u64;
                let data = self
                    .dst
                    .create_file(&data_rel, libc::O_RDWR | libc::O_TRUNC, 0o600)?;
                data.set_len(size)?;
                data.sync_all()?;
                let map = Map {
                    path: path.to_path_buf(),
                    block: self.block,
                    origin: origin_key(st),
                    present: vec![0; size.div_ceil(self.block).div_ceil(8) as usize],
                };
                write_atomic(&self.dst, &map_rel, &map.encode())?;
                (map, data)
            }
        };
        let opener = self.src.as_ref().map(|layer| {
            let (layer, path) = (Arc::clone(layer), path.to_path_buf());
            Box::new(
                move || match layer.open_file(&path, libc::O_RDONLY | libc::O_NOATIME) {
                    Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                        layer.open_file(&path, libc::O_RDONLY)
                    }
                    r => r,
                },
            ) as Opener
        });
        let p = Arc::new(Partial {
            path: path.to_path_buf(),
            size: map.origin.0,
            block: map.block,
            data_rel,
            map_rel,
            data,
            src,
            opener,
            timeout: self.timeout,
            dst: Arc::clone(&self.dst),
            state: Mutex::new(State {
                ready: map.present.clone(),
                map,
                inflight: HashSet::new(),
                streams: Vec::new(),
                tick: 0,
                progress: 0,
                installed: false,
                discarded: false,
                last_end: 0,
                run_start: 0,
                held: Vec::new(),
            }),
            done: Condvar::new(),
            map_write: Mutex::new(()),
            filling: AtomicBool::new(false),
            usage: self.usage.get().cloned(),
        });
        if let Some(u) = &p.usage {
            u.partial_grew(&p.data_rel, path, allocated(&p.data));
        }
        t.insert(path.to_path_buf(), Arc::clone(&p));
        Ok(p)
    }

    /// Takes `path`'s partial out of the table for a copy-up (which installs its data
    /// file), if there is a current one.
    pub fn take<E>(
        &self,
        path: &Path,
        st: &Stat,
        src_file: impl FnOnce() -> Result<File, E>,
    ) -> Option<Arc<Partial>> {
        let src = src_file().ok()?;
        let mut t = self.table.lock().unwrap();
        let p = self
            .get_locked_with(&mut t, path, st, move || Ok(src))
            .ok()?;
        t.remove(path);
        Some(p)
    }

    /// Whether `path` may have a partial (in memory or on disk).
    pub fn has(&self, path: &Path) -> bool {
        self.table.lock().unwrap().contains_key(path)
            || matches!(self.dst.stat(&rels(&key_of(path)).1), Ok(Some(_)))
    }

    /// `path`'s partial, if it has one: (bytes present, file size), from the live
    /// partial when one is open, else from its map on disk (for `cachefs ctl state`).
    pub fn progress(&self, path: &Path) -> Option<(u64, u64)> {
        let live = self.table.lock().unwrap().get(path).cloned();
        let map = match live {
            Some(p) => p.map(),
            None => {
                let (_, m) = rels(&key_of(path));
                let f = self.dst.open_file(&m, libc::O_RDONLY).ok()?;
                Map::decode(&read_all(&f).ok()?).filter(|m| m.path == path)?
            }
        };
        Some((map.present_bytes(), map.origin.0))
    }

    /// The mount paths at or below `prefix` ("" for all) that have a partial, sorted:
    /// the live ones and those with an intact map on disk.
    pub fn paths_under(&self, prefix: &Path) -> Vec<PathBuf> {
        let mut out: std::collections::BTreeSet<PathBuf> = self
            .table
            .lock()
            .unwrap()
            .keys()
            .filter(|p| p.starts_with(prefix))
            .cloned()
            .collect();
        for e in self.dst.read_dir(&lazy_dir()).unwrap_or_default() {
            let rel = lazy_dir().join(&e.name);
            if rel.extension().is_none_or(|x| x != "map") {
                continue;
            }
            let map = self
                .dst
                .open_file(&rel, libc::O_RDONLY)
                .ok()
                .and_then(|f| read_all(&f).ok())
                .and_then(|b| Map::decode(&b));
            if let Some(m) = map
                && m.path.starts_with(prefix)
            {
                out.insert(m.path);
            }
        }
        out.into_iter().collect()
    }

    /// After a copy-up installed `p`'s data file: handles read it as it is.
    pub fn installed(&self, p: &Partial) {
        let _w = p.map_write.lock().unwrap();
        let _ = self.dst.unlink(&p.map_rel);
        self.gone(&p.data_rel);
    }

    /// A failed install: `p` stays the partial of its path.
    pub fn put_back(&self, p: Arc<Partial>) {
        self.table.lock().unwrap().insert(p.path.clone(), p);
    }

    /// Forgets `path`'s partial (its name was removed): open handles keep reading it.
    pub fn discard(&self, path: &Path) {
        let p = self.table.lock().unwrap().remove(path);
        match p {
            Some(p) => self.drop_files(&p),
            None => {
                let (d, m) = rels(&key_of(path));
                if let Ok(Some(map)) = self
                    .dst
                    .open_file(&m, libc::O_RDONLY)
                    .map(|f| read_all(&f).ok().and_then(|b| Map::decode(&b)))
                    && map.path == path
                {
                    let _ = self.dst.unlink(&m);
                    let _ = self.dst.unlink(&d);
                    self.gone(&d);
                }
            }
        }
    }

    fn drop_files(&self, p: &Partial) {
        p.state.lock().unwrap().discarded = true;
        let _w = p.map_write.lock().unwrap();
        if !p.installed() {
            let _ = self.dst.unlink(&p.map_rel);
            let _ = self.dst.unlink(&p.data_rel);
            self.gone(&p.data_rel);
        }
    }

    /// Evicts the partial whose data file is `data_rel` if nobody uses it: no handle or
    /// prefetch holds it (the table's is the only reference). Its data and map are
    /// deleted; the next open of its path starts a fresh partial. The caller makes sure
    /// no copy-up is installing it (it holds `copy_flights` without the partial's path
    /// in it; a partial being installed is out of the table but its map names the
    /// path). Returns the bytes freed, or `None` when it is in use.
    pub fn evict_idle(&self, data_rel: &Path) -> io::Result<Option<u64>> {
        let mut t = self.table.lock().unwrap();
        // The table is small (partials opened by this run): look by data file.
        let known = t
            .iter()
            .find(|(_, p)| p.data_rel == data_rel)
            .map(|(path, p)| (path.clone(), Arc::strong_count(p)));
        if let Some((path, refs)) = known {
            if refs > 1 {
                return Ok(None);
            }
            let p = t.remove(&path).unwrap();
            let freed = allocated(&p.data);
            self.drop_files(&p);
            return Ok(Some(freed));
        }
        // Only on disk (a previous run's, not opened since): nobody can be reading it.
        let freed = self
            .dst
            .stat(data_rel)?
            .map_or(0, |st| st.st_blocks as u64 * 512);
        let _ = self.dst.unlink(&map_rel_of(data_rel));
        match self.dst.unlink(data_rel) {
            Err(e) if e.raw_os_error() != Some(libc::ENOENT) => return Err(e),
            _ => {}
        }
        // Still under the table lock: a new partial of the key reports after this.
        self.gone(data_rel);
        drop(t);
        Ok(Some(freed))
    }
}

fn rels(key: &str) -> (PathBuf, PathBuf) {
    (
        lazy_dir().join(format!("{key}.data")),
        lazy_dir().join(format!("{key}.map")),
    )
}

fn read_all(f: &File) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut v = Vec::new();
    (&*f).read_to_end(&mut v)?;
    Ok(v)
}

/// The maps in a dst's state folder (for `cachefs status`): (files, present bytes,
/// total bytes). Unreadable or garbage maps are skipped.
pub fn summary(dst: &Path) -> (u64, u64, u64) {
    let dir = dst.join(lazy_dir());
    let Ok(rd) = std::fs::read_dir(dir) else {
        return (0, 0, 0);
    };
    let mut out = (0, 0, 0);
    for e in rd.flatten() {
        if !e.file_name().as_bytes().ends_with(b".map") {
            continue;
        }
        if let Some(m) = std::fs::read(e.path()).ok().and_then(|b| Map::decode(&b)) {
            out.0 += 1;
            out.1 += m.present_bytes();
            out.2 += m.origin.0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> Map {
        Map {
            path: PathBuf::from("a/big file"),
            block: 4096,
            origin: (10 * 4096 + 5, 1_700_000_000, 123, 42),
            present: vec![0; 2],
        }
    }

    #[test]
    fn map_roundtrips_and_counts() {
        let mut m = map();
        assert_eq!(m.blocks(), 11);
        m.set(0);
        m.set(10);
        let d = Map::decode(&m.encode()).unwrap();
        assert_eq!(d, m);
        assert!(d.has(0) && d.has(10) && !d.has(5));
        assert_eq!(d.count(), 2);
        assert_eq!(d.present_bytes(), 4096 + 5);
    }

    #[test]
    fn torn_or_garbage_map_is_rejected() {
        let mut m = map();
        m.set(3);
        let b = m.encode();
        for cut in 0..b.len() {
            assert!(Map::decode(&b[..cut]).is_none(), "torn at {cut}");
        }
        let mut flipped = b.clone();
        flipped[60] ^= 0x10;
        assert!(Map::decode(&flipped).is_none());
        assert!(Map::decode(b"garbage garbage garbage garbage garbage garbage garbage").is_none());
    }

    fn setup() -> (tempfile::TempDir, tempfile::TempDir, Arc<Layer>, Stat) {
        let s = tempfile::tempdir().unwrap();
        let d = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..(3 * 4096 + 100)).map(|i| (i % 251) as u8).collect();
        std::fs::write(s.path().join("f"), &data).unwrap();
        std::fs::create_dir(d.path().join(STATE_DIR)).unwrap();
        let dst = Arc::new(Layer::open(d.path()).unwrap());
        let src = Layer::open(s.path()).unwrap();
        let st = src.stat(Path::new("f")).unwrap().unwrap();
        (s, d, dst, st)
    }

    #[test]
    fn present_blocks_survive_a_restart_and_garbage_maps_are_dropped() {
        let (s, d, dst, st) = setup();
        let srcf = || File::open(s.path().join("f"));
        let want = std::fs::read(s.path().join("f")).unwrap();
        {
            let lazy = Lazy::new(Arc::clone(&dst), 1, 4096).unwrap();
            let p = lazy.open_or_create(Path::new("f"), &st, srcf).unwrap();
            p.ensure(4096 + 10, 10).unwrap();
            // The block is readable at once and durable once its stream stopped.
            p.quiesce();
            assert!(!p.complete());
        }
        // A new daemon: block 1 is present from the map, the others are not.
        let lazy = Lazy::new(Arc::clone(&dst), 1, 4096).unwrap();
        let p = lazy.open_or_create(Path::new("f"), &st, srcf).unwrap();
        let m = p.map();
        assert!(m.has(1) && !m.has(0) && !m.has(2) && !m.has(3));
        assert_eq!(summary(d.path()), (1, 4096, want.len() as u64));
        p.ensure(0, u64::MAX).unwrap();
        p.quiesce();
        assert!(p.complete());
        let mut got = vec![0u8; want.len()];
        p.data.read_exact_at(&mut got, 0).unwrap();
        assert_eq!(got, want);
        drop(p);
        drop(lazy);
        // A torn map: the partial starts over, empty.
        let map_path = d
            .path()
            .join(lazy_dir())
            .join(format!("{}.map", key_of(Path::new("f"))));
        let b = std::fs::read(&map_path).unwrap();
        std::fs::write(&map_path, &b[..b.len() - 3]).unwrap();
        let lazy = Lazy::new(Arc::clone(&dst), 1, 4096).unwrap();
        assert!(!map_path.exists(), "the sweep drops a garbage map");
        let p = lazy.open_or_create(Path::new("f"), &st, srcf).unwrap();
        assert_eq!(p.map().count(), 0);
    }

    #[test]
    fn a_changed_src_discards_the_map() {
        let (s, _d, dst, st) = setup();
        let srcf = || File::open(s.path().join("f"));
        let lazy = Lazy::new(Arc::clone(&dst), 1, 4096).unwrap();
        let p = lazy.open_or_create(Path::new("f"), &st, srcf).unwrap();
        p.ensure(0, 1).unwrap();
        let mut st2 = st;
        st2.st_mtime += 1;
        let p2 = lazy.open_or_create(Path::new("f"), &st2, srcf).unwrap();
        assert_eq!(p2.map().count(), 0);
    }

    /// The budget's view in these tests: the bytes last reported for the partial.
    struct Reported(std::sync::atomic::AtomicU64);

    impl Usage for Reported {
        fn partial_grew(&self, _data_rel: &Path, _path: &Path, bytes: u64) {
            self.0.store(bytes, Ordering::SeqCst);
        }
        fn partial_gone(&self, _data_rel: &Path) {}
    }

    /// A reservation that, when given back, records what the budget had been told
    /// by then.
    struct Room {
        reported: Arc<Reported>,
        seen_at_release: Arc<Mutex<Vec<u64>>>,
    }

    impl Drop for Room {
        fn drop(&mut self) {
            let now = self.reported.0.load(Ordering::SeqCst);
            self.seen_at_release.lock().unwrap().push(now);
        }
    }

    /// A big src file of non-zero bytes (no holes: a block's allocation is its size).
    fn big_setup(len: usize) -> (tempfile::TempDir, tempfile::TempDir, Arc<Layer>, Stat) {
        let s = tempfile::tempdir().unwrap();
        let d = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 | 1).collect();
        std::fs::write(s.path().join("f"), &data).unwrap();
        std::fs::create_dir(d.path().join(STATE_DIR)).unwrap();
        let dst = Arc::new(Layer::open(d.path()).unwrap());
        let st = Layer::open(s.path())
            .unwrap()
            .stat(Path::new("f"))
            .unwrap()
            .unwrap();
        (s, d, dst, st)
    }

    #[test]
    fn a_reads_room_is_given_back_only_once_its_block_is_reported() {
        // A read of 4 KiB returns after the stream's first piece (128 KiB) while the
        // stream still fills the 8 MiB block: the read's reservation must outlive that,
        // or another fetch takes the room before the block is counted (dst went over
        // --cache-size by a block).
        const BLOCK: u64 = 8 << 20;
        let (s, _d, dst, st) = big_setup(2 * BLOCK as usize);
        let srcf = || File::open(s.path().join("f"));
        let lazy = Lazy::new(Arc::clone(&dst), 1, BLOCK).unwrap();
        let reported = Arc::new(Reported(Default::default()));
        lazy.set_usage(Arc::clone(&reported) as Arc<dyn Usage>);
        let p = lazy.open_or_create(Path::new("f"), &st, srcf).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        p.ensure(100, 4096).unwrap();
        let room = Room {
            reported: Arc::clone(&reported),
            seen_at_release: Arc::clone(&seen),
        };
        p.hold_until_fetched(100, 4096, Box::new(room));
        p.quiesce();
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 1, "the reservation was given back once");
        assert!(
            seen[0] >= BLOCK,
            "the reservation was given back when the budget knew of {} bytes, before \
             the block ({BLOCK} bytes) was counted",
            seen[0]
        );
    }

    #[test]
    fn read_ahead_room_is_given_back_only_once_its_block_is_reported() {
        const BLOCK: u64 = 1 << 20;
        let (s, _d, dst, st) = big_setup(6 * BLOCK as usize);
        let srcf = || File::open(s.path().join("f"));
        let lazy = Lazy::new(Arc::clone(&dst), 1, BLOCK).unwrap();
        let reported = Arc::new(Reported(Default::default()));
        lazy.set_usage(Arc::clone(&reported) as Arc<dyn Usage>);
        let p = lazy.open_or_create(Path::new("f"), &st, srcf).unwrap();
        // A sequential reader of block 0: read-ahead takes a reservation per block.
        p.ensure(0, BLOCK).unwrap();
        p.quiesce();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let rooms = Mutex::new(0u64);
        p.note_read(0, BLOCK, &|_bytes| {
            *rooms.lock().unwrap() += 1;
            Some(Box::new(Room {
                reported: Arc::clone(&reported),
                seen_at_release: Arc::clone(&seen),
            }) as Box<dyn Send>)
        });
        p.quiesce();
        let rooms = *rooms.lock().unwrap();
        assert!(rooms >= 2, "read-ahead reserved {rooms} blocks");
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len() as u64, rooms);
        // Blocks are fetched in order: block k's room may go once k + 1 blocks count.
        for (k, at) in seen.iter().enumerate() {
            assert!(
                *at >= (k as u64 + 2) * BLOCK,
                "block {}'s reservation was given back when the budget knew of {at} \
                 bytes",
                k + 1
            );
        }
    }
}
