//! One partially present file ([`Partial`]): its state, the wait of a read for its
//! bytes ([`Partial::ensure`]), and making fetched blocks durable ([`Partial::flush`]).
//!
//! Invariants (see also the parent module):
//! - `ready` (bytes written to the data file, readable) is a superset of the map's
//!   present blocks (fdatasync'ed); a block enters the map only after an fdatasync of
//!   the data file ([`Partial::commit`]), and the map file is then replaced whole.
//! - A read returns only durable bytes: if a block it read is not in the map yet,
//!   every ready block is synced before it returns.
//! - Once `installed` (a copy-up consumed the partial) or `discarded`, the map is no
//!   longer written and no size is reported to the [`Usage`] hook; `installed` also
//!   stops every fetch ([`Partial::seal`]).
//! - A reader waits on `done` for the stream that brings its block, and fails with
//!   that stream's error, or ETIMEDOUT after `--src-timeout` without its progress.
//!
//! Lock order: `map_write` -> `state` -> the [`Usage`] hook (the cache's index, a
//! leaf). No lock is held across src I/O or an fdatasync.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::map::{Map, bit, write_atomic};
use super::readahead::Held;
use super::stream::Stream;
use super::{Usage, allocated};
use crate::fs::layer::Layer;

pub(super) struct State {
    /// Blocks durable in the data file (fdatasync'ed): what the map file says.
    pub(super) map: Map,
    /// Blocks whose bytes are in the data file (maybe not synced yet): what reads may
    /// use. A superset of the map's present blocks.
    pub(super) ready: Vec<u8>,
    /// Blocks a stream is filling.
    pub(super) inflight: HashSet<u64>,
    pub(super) streams: Vec<Stream>,
    /// Work handed out (for [`Stream::used`]).
    pub(super) tick: u64,
    /// Bytes moved by all streams (progress of a waiter that has no stream yet).
    pub(super) progress: u64,
    /// Consumed by a copy-up: the data file is now dst's copy, complete.
    pub(super) installed: bool,
    /// Dropped (unlinked name, changed src): the map is no longer written.
    pub(super) discarded: bool,
    /// Where the last read ended and where its sequential run began (sequential read
    /// detection).
    pub(super) last_end: u64,
    pub(super) run_start: u64,
    /// Budget reservations of reads that returned while a block they touch was still
    /// being filled (a reader waits only for its bytes, not the whole block): each is
    /// held until none of its blocks is inflight, so the block's bytes are reported
    /// to the [`Usage`] hook before its room is given back.
    pub(super) held: Vec<Held>,
}

/// Opens src's file again (a descriptor for one more stream).
pub(crate) type Opener = Box<dyn Fn() -> io::Result<File> + Send + Sync>;

/// One partially present file.
pub(crate) struct Partial {
    pub(crate) path: PathBuf,
    pub(crate) size: u64,
    pub(super) block: u64,
    pub(super) data_rel: PathBuf,
    pub(super) map_rel: PathBuf,
    /// The partial file, read-write.
    pub(crate) data: File,
    /// src's file, read-only: its xattrs are copied at install (streams read
    /// descriptors of their own, or duplicates of it without an opener).
    pub(super) src: File,
    /// Opens src's file for another stream (`None`: streams share duplicates of `src`).
    pub(super) opener: Option<Opener>,
    /// `--src-timeout`: a wait for a stream fails after this long without progress
    /// (zero: waits forever).
    pub(super) timeout: Duration,
    pub(super) dst: Arc<Layer>,
    pub(super) state: Mutex<State>,
    /// Notified whenever a stream moves, fails or stops.
    pub(super) done: Condvar,
    pub(super) map_write: Mutex<()>,
    /// A background filler runs for this partial (`--lazy-fill`).
    pub(super) filling: AtomicBool,
    /// The cache budget's hook, if there is a budget.
    pub(super) usage: Option<Arc<dyn Usage>>,
    /// How many of the references to this partial its own threads (fetch, sync, fill)
    /// hold. Each such reference is taken and dropped under this lock (outside the
    /// partial, so a thread can drop the last reference under it), so that
    /// [`Partial::in_use`] sees the count and the references agree.
    pub(super) threads: Arc<Mutex<usize>>,
}

impl Partial {
    /// Runs `work` on a thread of its own named `name`, its reference to the partial
    /// counted in `threads` until it is dropped.
    pub(super) fn spawn(
        self: &Arc<Self>,
        name: &str,
        work: impl FnOnce(&Arc<Self>) + Send + 'static,
    ) -> io::Result<()> {
        let threads = Arc::clone(&self.threads);
        let p = {
            let mut n = threads.lock().unwrap();
            *n += 1;
            Arc::clone(self)
        };
        let spawned = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                work(&p);
                let mut n = threads.lock().unwrap();
                drop(p);
                *n -= 1;
            });
        if let Err(e) = spawned {
            *self.threads.lock().unwrap() -= 1;
            return Err(e);
        }
        Ok(())
    }

    /// Whether anything holds the partial besides `table_ref` (the table's reference)
    /// and its own threads: an open handle, or a copy-up installing it. The threads
    /// winding down after the last handle closed (a fetch making its blocks durable)
    /// do not keep it from being evicted: eviction discards it as an unlink does.
    pub(super) fn in_use(table_ref: &Arc<Self>) -> bool {
        let threads = table_ref.threads.lock().unwrap();
        Arc::strong_count(table_ref) > 1 + *threads
    }

    pub(crate) fn installed(&self) -> bool {
        self.state.lock().unwrap().installed
    }

    /// Every block is present (durable).
    pub(crate) fn complete(&self) -> bool {
        let s = self.state.lock().unwrap();
        s.installed || s.map.count() == s.map.blocks()
    }

    pub(crate) fn map(&self) -> Map {
        self.state.lock().unwrap().map.clone()
    }

    pub(super) fn block_end(&self, b: u64) -> u64 {
        ((b + 1) * self.block).min(self.size)
    }

    /// Bytes of the blocks of `[offset, offset + len)` that are neither present nor
    /// being fetched nor reserved by read-ahead (what a read there would add to dst),
    /// and of the block before it when a running stream reads through that block to
    /// reach the read (a read at most a block past a stream's end joins it, see
    /// `Stream::brings`).
    pub(crate) fn missing(&self, offset: u64, len: u64) -> u64 {
        let end = (offset.saturating_add(len)).min(self.size);
        if offset >= end {
            return 0;
        }
        let s = self.state.lock().unwrap();
        if s.installed {
            return 0;
        }
        let first = offset / self.block;
        let from = s
            .streams
            .iter()
            .filter(|st| st.brings(first, self.block) && st.until < first * self.block)
            .map(|st| st.until / self.block)
            .min()
            .unwrap_or(first);
        (from..=(end - 1) / self.block)
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
    pub(crate) fn ensure(self: &Arc<Self>, offset: u64, len: u64) -> io::Result<()> {
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
    /// Makes every ready block durable (a handle closes): what was read through it
    /// survives a crash.
    pub(crate) fn flush(&self) -> io::Result<()> {
        self.flush_blocks(0, self.size.div_ceil(self.block))
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
    pub(super) fn commit(&self, blocks: &mut Vec<u64>) -> io::Result<()> {
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

    /// src's file (read-only).
    pub(crate) fn src(&self) -> &File {
        &self.src
    }

    /// Before an install: no fetch starts any more and none is in flight.
    pub(crate) fn seal(&self) {
        let mut s = self.state.lock().unwrap();
        s.installed = true;
        while !s.inflight.is_empty() {
            s = self.done.wait(s).unwrap();
        }
    }

    /// Waits until no stream runs (their blocks are durable and in the map).
    #[cfg(test)]
    pub(crate) fn quiesce(&self) {
        let mut s = self.state.lock().unwrap();
        while s.streams.iter().any(|st| st.running) {
            s = self.done.wait(s).unwrap();
        }
    }

    /// A failed install: fetches may go on.
    pub(crate) fn unseal(&self) {
        self.state.lock().unwrap().installed = false;
    }

    /// The staged data file (for the install), once every block of `[0, limit)` is
    /// present.
    pub(crate) fn data_rel(&self) -> &Path {
        &self.data_rel
    }
}

impl std::fmt::Debug for Partial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partial")
            .field("path", &self.path)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}
