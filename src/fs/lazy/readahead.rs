//! Fetches no read waits for, and the cache budget's reservations for fetches: the
//! read-ahead past a sequential reader ([`Partial::note_read`]), the background fill
//! (`--lazy-fill`, [`Partial::fill_in_background`]) and the reservations a read keeps
//! until its blocks are counted ([`Partial::hold_until_fetched`]).
//!
//! Invariants:
//! - Room for a block is never given back before the block's bytes were reported to
//!   the [`super::Usage`] hook: a read's reservation is held (`State::held`) while any
//!   block it touched is inflight; a read-ahead block's reservation lives in its
//!   stream (`guards`) until the block is written and reported.
//! - Read-ahead and fill never evict: each block needs a reservation `room` gives
//!   without evicting, else it is not fetched ahead.
//! - At most [`MAX_FILLERS`] fillers run, all files together, one per partial.
//!
//! Lock order: the partial's state lock -> the reservations (`room`, and the guards'
//! drop: the cache's index lock, a leaf).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::map::bit;
use super::partial::{Partial, State};

/// Read-ahead past a sequential reader (at least two blocks). It only has to keep one
/// stream busy: a remote src (rclone) streams a sequential read on one descriptor
/// itself, with its own read-ahead.
const READAHEAD: u64 = 32 << 20;
/// Background fillers (`--lazy-fill`) at most, all files together: one stream each,
/// behind the readers' fetches and read-ahead.
const MAX_FILLERS: usize = 2;

/// Background fillers running (all files together).
static FILLERS: AtomicUsize = AtomicUsize::new(0);

/// A reservation kept for blocks `first..=last` (see [`State::held`]).
pub(super) struct Held {
    pub(super) first: u64,
    pub(super) last: u64,
    pub(super) _guard: Box<dyn Send>,
}

impl State {
    /// Gives back the held reservations none of whose blocks is inflight any more
    /// (fetched and reported, or abandoned by a failed stream). Under the state lock:
    /// the guards' drop takes the cache's index lock, a leaf below it.
    pub(super) fn release_held(&mut self) {
        let inflight = &self.inflight;
        self.held
            .retain(|h| (h.first..=h.last).any(|b| inflight.contains(&b)));
    }
}

impl Partial {
    /// Read-ahead past a sequential reader, in bytes (at least two blocks).
    fn readahead(&self) -> u64 {
        READAHEAD.max(2 * self.block).div_ceil(self.block) * self.block
    }

    /// After a read of `[offset, offset + len)` returned (or failed): keeps `guard`, the
    /// budget's reservation for the blocks it fetched, until none of those blocks is
    /// being filled any more. A read returns as soon as its own bytes are there, while
    /// its stream still fills the rest of the block; giving the room back then would
    /// let another fetch take it before the block's bytes are counted.
    pub(crate) fn hold_until_fetched(&self, offset: u64, len: u64, guard: Box<dyn Send>) {
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

    /// Called after a read at `[offset, offset+len)` was served: once a reader has read
    /// at least a block sequentially, the stream ahead of it (or an idle or new one, at
    /// the first missing block) reads on in order past the read: twice the run so far,
    /// from two blocks up to [`READAHEAD`].
    /// Each read-ahead block only if `room(bytes)` gives a guard (the cache budget's
    /// reservation, held until the block is fetched; read-ahead never evicts).
    pub(crate) fn note_read(
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
    pub(crate) fn fill_in_background(
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
        let spawned = self.spawn("cachefs-fill", move |p| {
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
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::path::Path;
    use std::sync::Mutex;

    use super::*;
    use crate::fs::layer::{Layer, Stat};
    use crate::fs::lazy::{Lazy, Usage};
    use crate::fs::names::STATE_DIR;

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
