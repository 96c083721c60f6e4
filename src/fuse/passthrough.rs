//! FUSE passthrough: the backing files registered with the kernel, one per inode shared
//! by all its handles, and the handles open for writing whose attributes the kernel may
//! change behind the daemon's back (see the module docs of `fuse`).

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use fuser::{BackingId, FopenFlags};

use super::FuseAdapter;

/// Backing files registered with the kernel for passthrough. The kernel allows one
/// backing file per inode at a time, so all open handles of an inode share one
/// `BackingId` (weak by inode, strong per handle; dropped at the last release).
#[derive(Default)]
pub(super) struct BackingTable {
    by_ino: HashMap<u64, Weak<BackingId>>,
    by_fh: HashMap<u64, Arc<BackingId>>,
    /// Handles open for writing with passthrough: the kernel may change their file's
    /// times without telling the daemon (writes through a mapping).
    writers: HashSet<u64>,
}

impl FuseAdapter {
    /// The open flags of passthrough handle `fh`, opened with `open_flags`: one open
    /// for writing is noted in `writers` and gets FLUSH (see the module docs).
    pub(super) fn passthrough_flags(&self, fh: u64, open_flags: i32) -> FopenFlags {
        if open_flags & libc::O_ACCMODE == libc::O_RDONLY {
            return self.no_flush();
        }
        self.backing.lock().unwrap().writers.insert(fh);
        FopenFlags::empty()
    }

    /// Whether `fh` is a passthrough handle open for writing.
    pub(super) fn is_passthrough_writer(&self, fh: u64) -> bool {
        self.backing.lock().unwrap().writers.contains(&fh)
    }

    /// The shared backing id for `ino`, registering the handle's dst file if needed.
    /// `None` (and passthrough off for good, logged once) when the kernel refuses.
    pub(super) fn backing_for(
        &self,
        ino: u64,
        fh: u64,
        register: impl FnOnce(&std::fs::File) -> io::Result<BackingId>,
    ) -> Option<Arc<BackingId>> {
        let mut table = self.backing.lock().unwrap();
        let id = match table.by_ino.get(&ino).and_then(Weak::upgrade) {
            Some(id) => id,
            None => {
                let handle = self.fs.handle(fh).ok()?;
                match register(&handle.file) {
                    Ok(id) => {
                        let id = Arc::new(id);
                        table.by_ino.insert(ino, Arc::downgrade(&id));
                        id
                    }
                    Err(e) => {
                        if self.passthrough.swap(false, Ordering::Relaxed) {
                            log::warn!(
                                "FUSE passthrough refused by the kernel ({e}); serving reads \
                                 and writes in the daemon from now on"
                            );
                        }
                        return None;
                    }
                }
            }
        };
        table.by_fh.insert(fh, Arc::clone(&id));
        Some(id)
    }

    pub(super) fn release_backing(&self, ino: u64, fh: u64) {
        let mut table = self.backing.lock().unwrap();
        table.by_fh.remove(&fh);
        table.writers.remove(&fh);
        if table
            .by_ino
            .get(&ino)
            .is_some_and(|w| w.strong_count() == 0)
        {
            table.by_ino.remove(&ino);
        }
    }
}
