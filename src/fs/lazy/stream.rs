//! Streams: the in-order readers of src that fill a partial's blocks (see the parent
//! module's "Streams").
//!
//! Each [`Stream`] is a src descriptor of its own, read strictly in order from `pos` up
//! to `until` by one worker thread (`cachefs-fetch`) at a time, at most [`MAX_STREAMS`]
//! per partial. A block is given to the stream that reaches it in order, else to an
//! idle stream at most [`JOIN`] before it, else to the least recently used idle one,
//! else to a new one ([`Partial::assign`]).
//!
//! Invariants:
//! - One block is filled by one stream at a time: a stream takes a block into the
//!   state's `inflight` set before reading it and skips blocks that are ready or
//!   inflight; `cur` is the block it fills, its bytes `[cur * block, pos)` written.
//! - A block is marked ready only once all its bytes are written; its read-ahead
//!   reservation is given back only after its bytes were reported to the
//!   [`super::Usage`] hook. Ready blocks are made durable (fdatasync, then the map) in
//!   batches of [`SYNC_BATCH`] or every [`SYNC_EVERY`], on a `cachefs-sync` thread,
//!   and whenever the stream stops.
//! - A failed stream drops its descriptor, gives its block back (no longer inflight)
//!   and records the error for the readers waiting on it.
//!
//! Lock order: the worker takes only the partial's state lock, never across src I/O,
//! a write to the data file or an fdatasync; the [`super::Usage`] hook and the guards'
//! drop (the cache's index lock) run under it as leaves.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::allocated;
use super::map::{bit, set_bit};
use super::partial::{Partial, State};

/// Streams (src descriptors, each read in order by one thread at a time) per partial.
pub(super) const MAX_STREAMS: usize = 4;
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

/// One reader of src: a descriptor of its own, read strictly in order from `pos` up to
/// `until` by one worker thread at a time. See the module docs ("Streams").
pub(super) struct Stream {
    /// The next byte it reads. A block boundary, except inside block `cur`.
    pub(super) pos: u64,
    /// It reads on up to here (a block boundary or the file's end), then idles.
    pub(super) until: u64,
    /// The block it is filling: inflight, bytes `[cur * block, pos)` written.
    pub(super) cur: Option<u64>,
    /// A worker thread runs it (it holds the descriptor meanwhile).
    pub(super) running: bool,
    /// Its src descriptor while idle (`None`: not opened yet, or dropped after an error).
    pub(super) file: Option<File>,
    /// Cache budget reservations of the read-ahead blocks it will fetch.
    pub(super) guards: HashMap<u64, Box<dyn Send>>,
    /// Failures so far, and the last one's errno: a waiter fails with it.
    pub(super) fails: u64,
    pub(super) last_err: i32,
    /// Bytes moved so far, and when it last moved (or started): progress for waiters.
    pub(super) moved: u64,
    pub(super) last_move: Instant,
    /// When it was last given work (the least recently used idle stream is reused).
    pub(super) used: u64,
}

impl Stream {
    /// A stream not started yet: no descriptor, no work.
    pub(super) fn new() -> Self {
        Stream {
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
        }
    }

    /// Whether this stream's current run brings block `b`: it is filling it, or it
    /// runs and `b` is before its `until` or at most a block past it.
    pub(super) fn brings(&self, b: u64, block: u64) -> bool {
        self.cur == Some(b)
            || (self.running && self.pos <= b * block && b * block <= self.until + block)
    }
}

impl Partial {
    /// See [`JOIN`].
    fn join(&self) -> u64 {
        JOIN.max(2 * self.block)
    }

    /// Gives block `b` (and on up to `until`) to a stream: one that reaches it in
    /// order, else the least recently used idle one (moved there), else a new one (at
    /// most [`MAX_STREAMS`]). Starts its worker if it has none. `None`: every stream is
    /// busy elsewhere (the caller waits for one).
    pub(super) fn assign(self: &Arc<Self>, s: &mut State, b: u64, until: u64) -> Option<usize> {
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
    pub(super) fn stream_for(&self, s: &mut State, b: u64) -> Option<usize> {
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
                s.streams.push(Stream::new());
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
    pub(super) fn start(self: &Arc<Self>, s: &mut State, i: usize) {
        let st = &mut s.streams[i];
        if st.running || st.pos >= st.until {
            return;
        }
        st.running = true;
        st.last_move = Instant::now();
        let spawned = self.spawn("cachefs-fetch", move |p| p.run_stream(i));
        if let Err(e) = spawned {
            log::warn!("{}: cannot start a fetch thread: {e}", self.path.display());
            let st = &mut s.streams[i];
            st.running = false;
            st.fails += 1;
            st.last_err = crate::fs::error::errno_of(&e);
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
    fn run_stream(self: &Arc<Self>, i: usize) {
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
                // with none left (only the table and the partial's threads hold
                // it), close it: an idle rclone handle holds a request and its
                // read-ahead buffer.
                let st = &mut s.streams[i];
                st.running = false;
                if Partial::in_use(self) {
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
                let mut blocks = std::mem::take(&mut unsynced);
                let spawned = self.spawn("cachefs-sync", move |p| {
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
            st.last_err = crate::fs::error::errno_of(&e);
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

    /// A handle closed: idle streams close their descriptors (an idle rclone handle
    /// holds a request and its read-ahead buffer); a reader that goes on opens new ones.
    pub(crate) fn close_idle(&self) {
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
