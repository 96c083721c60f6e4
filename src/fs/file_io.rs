//! File handles and their I/O: open (copying up, or a lazy partial for a large file),
//! read, write, flush, fsync, release, fallocate, lseek and copy_file_range. A handle is
//! always on a dst file (or, for a lazy read-only open, a partial). The first write since
//! the last report is recorded before its bytes land; writes that bypass the daemon
//! (passthrough) are found at flush, fsync and release by the file's version. `handles`
//! is held for table updates only, never across I/O.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::cached::Freshness;
use super::layer::Stat;
use super::view::denied;
use super::{CacheFs, FsError, FsResult, Kind, hooks, layer, lazy, origin};

/// Whether an open with these flags lets a writer in (`--max-dirty` applies).
pub fn opens_for_writing(flags: i32) -> bool {
    flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0
}

/// How a file is opened: open(2) flags from the kernel, and whether the kernel will do
/// the I/O on the dst file itself (FUSE passthrough).
#[derive(Debug, Clone, Copy)]
pub struct OpenRequest {
    pub flags: i32,
    pub for_backing: bool,
}

/// An opened file.
#[derive(Debug, Clone, Copy)]
pub struct Opened {
    pub fh: u64,
    /// The dst file is open read-write (usable as the inode's passthrough backing).
    pub(crate) rw: bool,
    /// The cached copy was just refetched from src: the kernel's cached pages are stale.
    pub(crate) fresh: bool,
    /// A partially present file ([`lazy`]): the daemon must serve its reads (no
    /// passthrough: the kernel would read unfetched blocks as zeros).
    pub(crate) lazy: bool,
}

/// An open file: always a dst file.
#[derive(Debug)]
pub struct OpenFile {
    pub(crate) ino: u64,
    pub(crate) file: File,
    /// Written since the last report to the change log.
    pub(super) dirty: AtomicBool,
    /// Writes may bypass the daemon (FUSE passthrough of a writable open): the daemon
    /// cannot see them, so at flush/fsync/release it compares the file's version with
    /// the one last reported instead of trusting `dirty`.
    writes_bypass: bool,
    /// (mtime, size) of the dst file when its content was last reported.
    pub(super) reported: Mutex<Option<Version>>,
    /// Held by a writable handle: uploads meanwhile leave the file's origin record
    /// dirty (see [`origin::Origin::open_writer`]), since writes after the last report
    /// reach the journal only at the next flush/fsync/release.
    _writer: Option<origin::OpenWriter>,
    /// A read-only handle on a partially present file: reads fetch missing blocks.
    pub(super) lazy: Option<Arc<lazy::Partial>>,
}

/// A file's version as far as writes can tell: mtime, ctime (s, ns) and size.
type Version = (i64, i64, i64, i64, i64);

pub(super) fn version_of(st: &Stat) -> Version {
    (
        st.st_mtime,
        st.st_mtime_nsec,
        st.st_ctime,
        st.st_ctime_nsec,
        st.st_size,
    )
}

/// open(2) flags for the dst file, from an allowlist: the kernel already handled
/// creation, truncation and appending offsets; O_DIRECT would need aligned buffers the
/// daemon does not have; kernel-internal bits (e.g. `__FMODE_EXEC` of execve) make
/// openat2 fail with EINVAL.
pub(super) fn open_flags(flags: i32) -> i32 {
    flags & (libc::O_ACCMODE | libc::O_SYNC | libc::O_DSYNC | libc::O_NOATIME | libc::O_LARGEFILE)
}

impl CacheFs {
    /// `writer`: the file's [`origin::OpenWriter`], for a writable handle (taken before
    /// the first change of the handle is journaled).
    pub(super) fn add_handle(
        &self,
        ino: u64,
        file: File,
        writes_bypass: bool,
        writer: Option<origin::OpenWriter>,
    ) -> u64 {
        self.insert_handle(ino, file, writes_bypass, writer, None)
    }

    /// A read-only handle on a partially present file (see [`lazy`]).
    fn add_lazy_handle(&self, ino: u64, p: Arc<lazy::Partial>) -> FsResult<u64> {
        let file = p.data.try_clone()?;
        Ok(self.insert_handle(ino, file, false, None, Some(p)))
    }

    fn insert_handle(
        &self,
        ino: u64,
        file: File,
        writes_bypass: bool,
        writer: Option<origin::OpenWriter>,
        lazy: Option<Arc<lazy::Partial>>,
    ) -> u64 {
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.handles.write().unwrap().insert(
            fh,
            Arc::new(OpenFile {
                ino,
                file,
                dirty: AtomicBool::new(false),
                writes_bypass,
                reported: Mutex::new(None),
                _writer: writer,
                lazy,
            }),
        );
        fh
    }

    /// The open file behind a handle (also used by the FUSE adapter for passthrough).
    pub(crate) fn handle(&self, fh: u64) -> FsResult<Arc<OpenFile>> {
        self.handles
            .read()
            .unwrap()
            .get(&fh)
            .cloned()
            .ok_or(FsError::Stale)
    }

    /// Opens a file (copying it into dst first if needed). Returns the handle and
    /// whether its dst file is open read-write.
    ///
    /// `for_backing`: the kernel will do the I/O on the dst file itself (FUSE
    /// passthrough). Then the dst file is opened read-write when possible (the kernel
    /// shares one backing file among all opens of an inode), and a writable open is
    /// reported dirty at once, since its writes will not pass through the daemon.
    pub fn open(&self, ino: u64, req: OpenRequest) -> FsResult<Opened> {
        let r = self.open_inner(ino, req, true);
        if let Err(e) = &r
            && e.errno() == libc::ENOENT
            && let Ok((path, ..)) = self.node_path(ino)
        {
            // The file went behind the kernel's back (src deleted it): the kernel's
            // listing of its directory shows it.
            self.listing_changed_at(&path);
        }
        r
    }

    /// Opens a file read-only with its whole content in dst (copied or completed now,
    /// never lazily): a pin prefetch.
    pub(crate) fn open_whole(&self, ino: u64) -> FsResult<Opened> {
        let req = OpenRequest {
            flags: libc::O_RDONLY,
            for_backing: false,
        };
        self.open_inner(ino, req, false)
    }

    fn open_inner(&self, ino: u64, req: OpenRequest, allow_lazy: bool) -> FsResult<Opened> {
        let OpenRequest { flags, for_backing } = req;
        if opens_for_writing(flags) {
            self.throttle_writer()?;
        }
        let lazy_from = match &self.lazy {
            Some(l) if allow_lazy && !opens_for_writing(flags) => Some(l.threshold),
            _ => None,
        };
        hooks::on_open(&self.cache, self, ino, lazy_from, || {
            Ok(self.node_path(ino)?.0)
        })?;
        let _ns = self.namespace.read().unwrap();
        let (path, kind, merges) = self.node_path(ino)?;
        if kind == Kind::Dir {
            return denied(libc::EISDIR);
        }
        let parent_merges = {
            let t = self.inodes.lock().unwrap();
            path.parent()
                .and_then(|p| t.ino_of(p))
                .and_then(|i| t.get(i).map(|n| n.merge_src))
                .unwrap_or(merges)
        };
        let wanted = open_flags(flags);
        let open_dst = |path: &Path| -> io::Result<(File, bool)> {
            if for_backing {
                // Read-write when it may: the backing file is shared per inode, and a
                // later writer of the inode reuses it.
                let rw_flags = (wanted & !libc::O_ACCMODE) | libc::O_RDWR;
                if let Ok(f) = self.dst.open_file(path, rw_flags) {
                    return Ok((f, true));
                }
            }
            let f = self.dst.open_file(path, wanted)?;
            Ok((f, wanted & libc::O_ACCMODE == libc::O_RDWR))
        };
        // The hot path, a reader of a cached file: open dst's file first (no stat
        // before it); a revalidation that replaces the file sends us the long way.
        let mut fresh = false;
        // Whether dst has the file, when the hot path already found out.
        let mut known_in_dst = None;
        if !opens_for_writing(flags) && flags & libc::O_TRUNC == 0 {
            match open_dst(&path) {
                Ok((file, rw)) => {
                    let freshness = if parent_merges {
                        self.revalidate(ino, &path)?
                    } else {
                        Freshness::Unchanged
                    };
                    match freshness {
                        Freshness::Unchanged => {
                            crate::metrics::cache_hit();
                            let fh = self.add_handle(ino, file, false, None);
                            return Ok(Opened {
                                fh,
                                rw,
                                fresh: self.take_refetched(ino),
                                lazy: false,
                            });
                        }
                        Freshness::Refetched => {
                            fresh = true;
                            known_in_dst = Some(true);
                        }
                        Freshness::Gone => return Err(FsError::not_found()),
                    }
                }
                Err(e) if layer::is_not_found(&e) => known_in_dst = Some(false),
                Err(e) => return Err(e.into()),
            }
        }
        let lazy_candidate = allow_lazy && self.lazy.is_some() && !opens_for_writing(flags);
        // One dst stat serves both checks (a refetch keeps the file in dst).
        let in_dst = match known_in_dst {
            Some(known) => known,
            None => (parent_merges || lazy_candidate) && self.dst.stat(&path)?.is_some(),
        };
        if parent_merges && in_dst && !fresh {
            match self.revalidate(ino, &path)? {
                Freshness::Unchanged => {}
                Freshness::Refetched => fresh = true,
                Freshness::Gone => return Err(FsError::not_found()),
            }
        }
        if lazy_candidate
            && !in_dst
            && let Some(p) = self.lazy_open(&path)?
        {
            if self.lazy_fill {
                let cache = self.cache.clone();
                // Room that is free without evicting, as for prefetch.
                p.fill_in_background(move |bytes| hooks::on_prefetch(&cache, bytes));
            }
            let fh = self.add_lazy_handle(ino, p)?;
            return Ok(Opened {
                fh,
                rw: false,
                fresh: false,
                lazy: true,
            });
        }
        self.ensure_in_dst(ino, &path, None)?;
        let (file, rw) = open_dst(&path)?;
        let writer = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let guard = if writer {
            self.origins.writer_opened(&file).ok()
        } else {
            None
        };
        let fh = self.add_handle(ino, file, for_backing && writer, guard);
        if for_backing && writer {
            self.note_bypassing_writer(fh)?;
        }
        Ok(Opened {
            fh,
            rw,
            fresh: fresh | self.take_refetched(ino),
            lazy: false,
        })
    }

    /// Makes `[offset, offset + len)` of a lazy handle's file present (on the src
    /// pool, bounded by `--src-timeout`), after the cache budget made room for the
    /// blocks it lacks (ENOSPC if it cannot: nothing is fetched).
    pub(super) fn lazy_ensure(&self, h: &OpenFile, offset: u64, len: u64) -> FsResult<()> {
        if let Some(p) = &h.lazy
            && !p.installed()
        {
            if p.missing(offset, len) > 0 {
                self.src_gate()?; // blocks already present are served while src is offline
            }
            // The reservation is held until the blocks are reported.
            let room =
                hooks::on_lazy_fetch(&self.cache, self, p.data_rel(), || p.missing(offset, len))?;
            // Waits for a stream of src reads (never a src call on this thread),
            // bounded by --src-timeout without progress.
            let r = crate::metrics::timed(crate::metrics::SrcOp::Fetch, || p.ensure(offset, len));
            if let Some(room) = room {
                // The stream may still be filling the read's last block.
                p.hold_until_fetched(offset, len, room);
            }
            self.src_result(r)?;
            p.note_read(offset, len, &|bytes| hooks::on_prefetch(&self.cache, bytes));
        }
        Ok(())
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let h = self.handle(fh)?;
        self.lazy_ensure(&h, offset, u64::from(size))?;
        let mut buf = vec![0u8; size as usize];
        let mut done = 0;
        while done < buf.len() {
            match h.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        buf.truncate(done);
        Ok(buf)
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        self.throttle_writer()?;
        let h = self.handle(fh)?;
        // Journaled before the bytes land: a crash in between leaves an op (a write
        // that then fails only costs an upload of unchanged bytes).
        self.mark_dirty(&h)?;
        h.file.write_all_at(data, offset)?;
        Ok(data.len() as u32)
    }

    /// A writable open whose writes will bypass the daemon: the file counts as changed
    /// from now on (recorded at once, so a crash before close loses nothing), and its
    /// current version is remembered so flush/fsync/release can tell later writes.
    fn note_bypassing_writer(&self, fh: u64) -> FsResult<()> {
        let h = self.handle(fh)?;
        self.mark_dirty(&h)?;
        let now = version_of(&layer::fstat(std::os::fd::AsFd::as_fd(&h.file))?);
        *h.reported.lock().unwrap() = Some(now);
        h.dirty.store(false, Ordering::Release);
        Ok(())
    }

    /// First write since the last report: the file is now a local version (never
    /// refetched over), and the content change is recorded (durably).
    pub(super) fn mark_dirty(&self, h: &OpenFile) -> FsResult<()> {
        if !h.dirty.swap(true, Ordering::AcqRel) {
            let path = self.inodes.lock().unwrap().path(h.ino);
            if let Some(p) = &path {
                self.origins.mark_dirty(p)?;
            }
            if self.changes.is_some() {
                self.record_content(h.ino)?;
            }
        }
        Ok(())
    }

    /// Whether close() has work to do here ([`CacheFs::flush`]): with writeback. A
    /// change must be journaled (visibly pending) by the time close() returns, and
    /// with FUSE passthrough only the daemon's look at the file at close tells it
    /// changed; RELEASE, which does the same, is asynchronous (close() does not wait
    /// for it). In mirror mode close() also waits for src. Without writeback there is
    /// nothing to do and FLUSH may be turned off.
    pub(crate) fn flush_needed(&self) -> bool {
        self.changes.is_some()
    }

    /// close(): in mirror mode, returns once src has the bytes.
    pub(crate) fn flush(&self, fh: u64) -> FsResult<()> {
        let h = self.handle(fh)?;
        self.sync_out(&h)
    }

    /// Reports a dirty file again (a replay may have run mid-write) and, in mirror
    /// mode, waits until src holds it.
    fn sync_out(&self, h: &OpenFile) -> FsResult<()> {
        let Some(changes) = &self.changes else {
            return Ok(());
        };
        let mut changed = h.dirty.swap(false, Ordering::AcqRel);
        if h.writes_bypass {
            let now = version_of(&layer::fstat(std::os::fd::AsFd::as_fd(&h.file))?);
            let mut reported = h.reported.lock().unwrap();
            changed |= *reported != Some(now);
            *reported = Some(now);
        }
        let path = if changed {
            // The dst file now holds data src does not: never refetch over it.
            if let Ok((p, _, _)) = self.node_path(h.ino) {
                self.origins.mark_dirty(&p)?;
            }
            self.record_content(h.ino)?
        } else {
            self.node_path(h.ino).ok().map(|(p, _, _)| p)
        };
        // Mirror mode: also an unwritten new file or a truncate still pending must be
        // on src when close/fsync returns (a no-op with asynchronous writeback).
        if let Some(path) = path {
            changes.wait_synced(&path).map_err(FsError::Journal)?;
        }
        Ok(())
    }

    pub(crate) fn fsync(&self, fh: u64, datasync: bool) -> FsResult<()> {
        let h = self.handle(fh)?;
        if datasync {
            h.file.sync_data()?;
        } else {
            h.file.sync_all()?;
        }
        self.sync_out(&h)
    }

    /// The last writer of `ino` closed. If an upload ran while it was open (the record
    /// stays dirty then: later writes may not have been reported) and nothing new was
    /// reported since, nothing would ever upload it again and the copy would stay dirty
    /// for good: queue one more upload (of bytes src probably has already).
    fn upload_if_uploaded_while_open(&self, ino: u64) -> FsResult<()> {
        let Some(changes) = &self.changes else {
            return Ok(());
        };
        let Ok((path, _, _)) = self.node_path(ino) else {
            return Ok(());
        };
        if self.origins.uploaded_while_open(&path) && !changes.has_pending(&path) {
            self.record_content(ino)?;
        }
        Ok(())
    }

    pub fn release(&self, fh: u64) -> FsResult<()> {
        let h = self.handles.write().unwrap().remove(&fh);
        match h {
            Some(h) => {
                match &h.lazy {
                    Some(p) if !p.installed() => {
                        // What was read through it is durable in the partial's map.
                        if let Err(e) = p.flush() {
                            log::warn!("{}: cannot sync its partial file: {e}", p.path.display());
                        }
                        p.close_idle();
                        hooks::on_partial_used(&self.cache, p.data_rel())
                    }
                    _ => hooks::on_release(&self.cache, || Ok(self.node_path(h.ino)?.0)),
                }
                let synced = self.sync_out(&h);
                let (ino, wrote) = (h.ino, h._writer.is_some());
                drop(h); // the writer guard goes
                if wrote {
                    self.upload_if_uploaded_while_open(ino)?;
                }
                synced
            }
            None => Err(FsError::Stale),
        }
    }

    pub(crate) fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> FsResult<()> {
        let h = self.handle(fh)?;
        self.mark_dirty(&h)?; // journaled first, as in `write`
        // SAFETY: valid fd.
        let r = unsafe {
            libc::fallocate(
                h.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                length as libc::off_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error().into());
        }
        Ok(())
    }

    pub(crate) fn lseek(&self, fh: u64, offset: i64, whence: i32) -> FsResult<i64> {
        let h = self.handle(fh)?;
        if let Some(p) = &h.lazy
            && !p.installed()
            && matches!(whence, libc::SEEK_DATA | libc::SEEK_HOLE)
        {
            // Unfetched blocks are holes in dst, not in the file: all of it is data.
            return match offset {
                o if o < 0 || o as u64 >= p.size => denied(libc::ENXIO),
                o if whence == libc::SEEK_DATA => Ok(o),
                _ => Ok(p.size as i64),
            };
        }
        // SAFETY: valid fd; SEEK_DATA/SEEK_HOLE answered by dst's filesystem.
        let r = unsafe { libc::lseek(h.file.as_raw_fd(), offset, whence) };
        if r < 0 {
            return Err(io::Error::last_os_error().into());
        }
        Ok(r)
    }

    pub(crate) fn copy_file_range(
        &self,
        fh_in: u64,
        off_in: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
    ) -> FsResult<u64> {
        let (hin, hout) = (self.handle(fh_in)?, self.handle(fh_out)?);
        self.lazy_ensure(&hin, off_in, len)?;
        self.mark_dirty(&hout)?; // journaled first, as in `write`
        let (mut oi, mut oo) = (off_in as i64, off_out as i64);
        // SAFETY: valid fds and offset pointers.
        let r = unsafe {
            libc::copy_file_range(
                hin.file.as_raw_fd(),
                &mut oi,
                hout.file.as_raw_fd(),
                &mut oo,
                len as usize,
                0,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error().into());
        }
        Ok(r as u64)
    }
}
