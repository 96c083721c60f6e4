//! Lazy range fetch of large src files (`--lazy-threshold`, `--block-size`).
//!
//! A src file at least the threshold large, opened read-only while dst has no copy,
//! is not copied whole: a sparse "partial" file the size of the src file is made in
//! the state folder (`.cachefs-state/lazy/<key>.data`) with a persisted map of the
//! blocks it holds (`<key>.map`). Reads wait for the blocks they need; sequential
//! reads are read ahead of.
//!
//! Streams: src is only ever read through [`Stream`](stream::Stream)s, each a
//! descriptor of its own read strictly in order by one worker thread at a time (at most
//! [`MAX_STREAMS`](stream::MAX_STREAMS) per file). A remote src such as rclone's VFS
//! serves in-order reads of a descriptor as one streamed request and turns every
//! out-of-order read into a new ranged request, so a read is given to the stream that
//! reaches its block in order, or to an idle or new stream positioned there
//! ([`Partial::ensure`]); a sequential reader's stream reads on ahead
//! ([`Partial::note_read`]). One block is filled by one stream at a time (`inflight`);
//! the others skip it. Readers wait on a condvar, bounded by `--src-timeout` without
//! progress of their stream.
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
//!
//! Parts: this file holds the table of partials of one dst ([`Lazy`]: make, load,
//! take for an install, discard, evict, the start-up sweep) and the [`Usage`] hook;
//! `map` the on-disk naming and the persisted map; `partial` one partial's state, the
//! wait of a read for its bytes and durability; `stream` the in-order readers of src
//! and their workers; `readahead` read-ahead, background fill and the budget
//! reservations of fetches.

mod map;
mod partial;
mod readahead;
mod stream;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use super::layer::{Layer, Stat};
use map::{Map, key_of, map_rel_of, origin_key, read_all, rels, write_atomic};
pub(crate) use map::{data_rel_of, is_data_rel, lazy_dir, path_of, summary};
use partial::State;
pub(crate) use partial::{Opener, Partial};

/// Told how much dst space partial files take (the cache budget). Called with the
/// partial's state lock held: implementations must not call back into the core.
pub(crate) trait Usage: Send + Sync {
    /// `path`'s partial, data file `data_rel`, now allocates `bytes` (made, loaded or
    /// a block fetched: a use).
    fn partial_grew(&self, data_rel: &Path, path: &Path, bytes: u64);
    /// The partial's files are gone (or no longer a partial: installed at its path).
    fn partial_gone(&self, data_rel: &Path);
}

pub(super) fn allocated(f: &File) -> u64 {
    use std::os::unix::fs::MetadataExt;
    f.metadata().map_or(0, |m| m.blocks() * 512)
}

/// The partial files of one dst.
pub(crate) struct Lazy {
    dst: Arc<Layer>,
    /// src, to open a src file again for another stream (`None`: streams share
    /// duplicates of the descriptor the partial was opened with).
    src: Option<Arc<Layer>>,
    /// `--src-timeout` (see [`Partial::ensure`]).
    timeout: Duration,
    pub(crate) threshold: u64,
    pub(crate) block: u64,
    table: Mutex<HashMap<PathBuf, Arc<Partial>>>,
    /// The cache budget's hook (set before the mount serves requests).
    usage: OnceLock<Arc<dyn Usage>>,
}

impl Lazy {
    /// Creates the folder; drops leftovers of a crash that no longer apply (temp maps,
    /// garbage maps, data without a map, maps of paths dst now holds itself).
    pub(crate) fn new(dst: Arc<Layer>, threshold: u64, block: u64) -> io::Result<Lazy> {
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
    pub(crate) fn with_src(mut self, src: Arc<Layer>, timeout: Duration) -> Lazy {
        self.src = Some(src);
        self.timeout = timeout;
        self
    }

    /// Attaches the cache budget: partials made from now on report their size.
    pub(crate) fn set_usage(&self, usage: Arc<dyn Usage>) {
        let _ = self.usage.set(usage);
    }

    fn gone(&self, data_rel: &Path) {
        if let Some(u) = self.usage.get() {
            u.partial_gone(data_rel);
        }
    }

    /// Whether a src file described by `st` is fetched lazily.
    pub(crate) fn applies(&self, st: &Stat) -> bool {
        self.threshold > 0
            && st.st_mode & libc::S_IFMT == libc::S_IFREG
            && st.st_size as u64 >= self.threshold
    }

    /// The partial for `path` (src's file `src_file`, version `st`), made now (a
    /// sparse file and an empty map) if there is none.
    pub(crate) fn open_or_create(
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
            threads: Arc::new(Mutex::new(0)),
        });
        if let Some(u) = &p.usage {
            u.partial_grew(&p.data_rel, path, allocated(&p.data));
        }
        t.insert(path.to_path_buf(), Arc::clone(&p));
        Ok(p)
    }

    /// Takes `path`'s partial out of the table for a copy-up (which installs its data
    /// file), if there is a current one.
    pub(crate) fn take<E>(
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
    pub(crate) fn has(&self, path: &Path) -> bool {
        self.table.lock().unwrap().contains_key(path)
            || matches!(self.dst.stat(&rels(&key_of(path)).1), Ok(Some(_)))
    }

    /// `path`'s partial, if it has one: (bytes present, file size), from the live
    /// partial when one is open, else from its map on disk (for `cachefs ctl state`).
    pub(crate) fn progress(&self, path: &Path) -> Option<(u64, u64)> {
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
    pub(crate) fn paths_under(&self, prefix: &Path) -> Vec<PathBuf> {
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
    pub(crate) fn installed(&self, p: &Partial) {
        let _w = p.map_write.lock().unwrap();
        let _ = self.dst.unlink(&p.map_rel);
        self.gone(&p.data_rel);
    }

    /// A failed install: `p` stays the partial of its path.
    pub(crate) fn put_back(&self, p: Arc<Partial>) {
        self.table.lock().unwrap().insert(p.path.clone(), p);
    }

    /// Forgets `path`'s partial (its name was removed): open handles keep reading it.
    pub(crate) fn discard(&self, path: &Path) {
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
    pub(crate) fn evict_idle(&self, data_rel: &Path) -> io::Result<Option<u64>> {
        let mut t = self.table.lock().unwrap();
        // The table is small (partials opened by this run): look by data file.
        let known = t
            .iter()
            .find(|(_, p)| p.data_rel == data_rel)
            .map(|(path, p)| (path.clone(), Partial::in_use(p)));
        if let Some((path, in_use)) = known {
            if in_use {
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::fs::names::STATE_DIR;

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

    #[test]
    fn a_partial_held_only_by_its_own_threads_is_evicted() {
        let (s, d, dst, st) = setup();
        let srcf = || File::open(s.path().join("f"));
        let lazy = Lazy::new(Arc::clone(&dst), 1, 4096).unwrap();
        let p = lazy.open_or_create(Path::new("f"), &st, srcf).unwrap();
        p.ensure(0, 1).unwrap();
        p.quiesce();
        // One of the partial's threads winding down after the last handle closed (a
        // fetch making its blocks durable, a sync).
        let (finish, tail) = std::sync::mpsc::channel::<()>();
        p.spawn("cachefs-test", move |_| {
            let _ = tail.recv();
        })
        .unwrap();
        let data_rel = p.data_rel.clone();
        assert_eq!(
            lazy.evict_idle(&data_rel).unwrap(),
            None,
            "a handle holds it"
        );
        drop(p);
        assert!(
            lazy.evict_idle(&data_rel).unwrap().is_some(),
            "only its own thread holds it"
        );
        assert!(!d.path().join(&data_rel).exists());
        finish.send(()).unwrap();
    }

    #[test]
    fn a_read_that_joins_a_running_stream_counts_the_block_it_reads_through() {
        let (s, _d, dst, st) = setup();
        let srcf = || File::open(s.path().join("f"));
        let lazy = Lazy::new(Arc::clone(&dst), 1, 4096).unwrap();
        let p = lazy.open_or_create(Path::new("f"), &st, srcf).unwrap();
        assert_eq!(p.missing(2 * 4096 + 10, 10), 4096);
        // A stream still running after block 0 (its blocks being made durable): a read
        // of block 2 joins it, so block 1 is fetched too.
        p.state.lock().unwrap().streams.push(stream::Stream {
            pos: 4096,
            until: 4096,
            running: true,
            ..stream::Stream::new()
        });
        assert_eq!(p.missing(2 * 4096 + 10, 10), 2 * 4096);
        assert_eq!(p.missing(3 * 4096 + 10, 10), 100, "block 3 is not joined");
    }
}
