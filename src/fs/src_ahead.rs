//! Stat-ahead of src: `ls -l`, `find` and backup tools list a directory, then stat
//! its entries in listing order, one kernel LOOKUP each (and `ls -l` one GETXATTR
//! each, for ACLs or security labels). Asking src about each name in
//! a job of its own costs two thread hand-offs per name; here the first LOOKUP that
//! needs src in a recently listed directory asks src about a run of the names that
//! follow it in the listing, in one src-pool job, and the next LOOKUPs find their
//! answer here.
//!
//! Invariants:
//! - What this table holds is no older than `ttl` (the `--attr-ttl` the kernel trusts
//!   its own attributes for): a stat read from here is as fresh as one the kernel
//!   could have kept from a readdirplus. `ttl` zero: nothing is kept.
//! - It is only consulted for names dst does not have and no whiteout hides
//!   (`CacheFs::find`), and an answer is used once (taken). Anything cachefs changes on
//!   src (writeback) forgets the paths involved ([`SrcAhead::forget`]); an outage or a
//!   reopened src forgets everything ([`SrcAhead::clear`]).
//! - Batches are only asked for access in listing order: the first miss in a listing,
//!   or a miss right where the previous batch ended. A random stat pattern costs one
//!   question per name, as without this table. A batch grows from
//!   [`FIRST_BATCH`] to [`MAX_BATCH`] names while the access stays in order.
//! - Bounded memory: at most [`MAX_LISTINGS`] listings (the oldest is dropped) and
//!   [`MAX_STATS`] stats (emptied when full). A listing keeps its names packed in one
//!   buffer, with a 4-byte end offset and a 4-byte index slot per name (about 20 bytes
//!   per name of 8 bytes, against ~150 for a list and a map of `OsString`s: it is
//!   kept while `ls -l` of a huge directory runs). One leaf lock.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::hash::{BuildHasher, RandomState};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hashbrown::HashTable;

use super::layer::Stat;

/// Names of the first batch of a listing.
pub(crate) const FIRST_BATCH: usize = 32;
/// Most names in one batch.
pub(crate) const MAX_BATCH: usize = 1024;
/// Listings remembered (the directories listed last).
const MAX_LISTINGS: usize = 4;
/// Stats kept.
const MAX_STATS: usize = 4 * MAX_BATCH;
/// How long a listing guides batches (only which names to ask: the answers are fresh).
const LISTING_TTL: Duration = Duration::from_secs(60);
/// How far past the previous batch's end a miss still counts as in order.
const IN_ORDER_SLACK: usize = 16;

/// A directory's names in listing order, packed: name `i` is `bytes[ends[i - 1]..ends[i]]`
/// (from 0 for the first), and `index` finds a name's position by its hash.
struct Listing {
    bytes: Vec<u8>,
    ends: Vec<u32>,
    index: HashTable<u32>,
    hasher: RandomState,
    at: Instant,
    /// End (exclusive) and size of the last batch asked, per question: `None` for
    /// stats, the attribute's name for getxattr.
    last: HashMap<Option<OsString>, (usize, usize)>,
}

impl Listing {
    /// `None` if the names take 4 GiB or more.
    fn new<'a>(names: impl Iterator<Item = &'a OsStr>) -> Option<Listing> {
        let mut l = Listing {
            bytes: Vec::new(),
            ends: Vec::new(),
            index: HashTable::new(),
            hasher: RandomState::new(),
            at: Instant::now(),
            last: HashMap::new(),
        };
        for name in names {
            l.bytes.extend_from_slice(name.as_bytes());
            l.ends.push(u32::try_from(l.bytes.len()).ok()?);
        }
        l.bytes.shrink_to_fit();
        l.ends.shrink_to_fit();
        let n = u32::try_from(l.ends.len()).ok()?;
        l.index.reserve(n as usize, |_| 0);
        for i in 0..n {
            let h = l.hasher.hash_one(l.name(i as usize).as_bytes());
            let (ends, bytes, hasher) = (&l.ends, &l.bytes, &l.hasher);
            l.index.insert_unique(h, i, |&k| {
                hasher.hash_one(name_at(bytes, ends, k as usize).as_bytes())
            });
        }
        Some(l)
    }

    fn name(&self, i: usize) -> &OsStr {
        name_at(&self.bytes, &self.ends, i)
    }

    /// Where `name` is in the listing (its first place, should src list it twice).
    fn position(&self, name: &OsStr) -> Option<usize> {
        let h = self.hasher.hash_one(name.as_bytes());
        let mut first: Option<u32> = None;
        for &k in self.index.iter_hash(h) {
            if self.name(k as usize) == name {
                first = Some(first.map_or(k, |f| f.min(k)));
            }
        }
        first.map(|k| k as usize)
    }
}

fn name_at<'a>(bytes: &'a [u8], ends: &[u32], i: usize) -> &'a OsStr {
    let start = if i == 0 { 0 } else { ends[i - 1] as usize };
    OsStr::from_bytes(&bytes[start..ends[i] as usize])
}

/// A getxattr answer: the value or the errno.
pub(crate) type XattrAnswer = Result<Vec<u8>, i32>;

#[derive(Default)]
struct Inner {
    listings: HashMap<PathBuf, Listing>,
    stats: HashMap<PathBuf, (Stat, Instant)>,
    xattrs: HashMap<(PathBuf, OsString), (XattrAnswer, Instant)>,
}

pub(crate) struct SrcAhead {
    ttl: Duration,
    inner: Mutex<Inner>,
}

impl SrcAhead {
    pub(crate) fn new(ttl: Duration) -> SrcAhead {
        SrcAhead {
            ttl,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// src listed `dir` with `names`, in this order.
    pub(crate) fn listed<'a>(&self, dir: &Path, names: impl Iterator<Item = &'a OsStr>) {
        if self.ttl.is_zero() {
            return;
        }
        let Some(listing) = Listing::new(names) else {
            return; // over 4 GiB of names: no batches for this one
        };
        let mut inner = self.inner.lock().unwrap();
        if inner.listings.len() >= MAX_LISTINGS && !inner.listings.contains_key(dir) {
            let oldest = inner
                .listings
                .iter()
                .min_by_key(|(_, l)| l.at)
                .map(|(p, _)| p.clone());
            if let Some(p) = oldest {
                inner.listings.remove(&p);
            }
        }
        inner.listings.insert(dir.to_path_buf(), listing);
    }

    /// src's stat of `path` if a batch brought it within the ttl (used once).
    pub(crate) fn take(&self, path: &Path) -> Option<Stat> {
        if self.ttl.is_zero() {
            return None;
        }
        let mut inner = self.inner.lock().unwrap();
        if inner.stats.is_empty() {
            return None;
        }
        let (st, at) = inner.stats.remove(path)?;
        (at.elapsed() < self.ttl).then_some(st)
    }

    /// The names to ask src about, starting with `path`'s own, when `path` is in a
    /// recent listing of its parent and is looked up in listing order (see the module
    /// docs); `None`: ask about `path` alone.
    pub(crate) fn batch_for(&self, path: &Path) -> Option<Vec<OsString>> {
        self.batch_of(path, None)
    }

    /// Like [`SrcAhead::batch_for`], for a getxattr of `xattr`.
    pub(crate) fn xattr_batch_for(&self, path: &Path, xattr: &OsStr) -> Option<Vec<OsString>> {
        self.batch_of(path, Some(xattr))
    }

    fn batch_of(&self, path: &Path, question: Option<&OsStr>) -> Option<Vec<OsString>> {
        if self.ttl.is_zero() {
            return None;
        }
        let (dir, name) = (path.parent()?, path.file_name()?);
        let mut inner = self.inner.lock().unwrap();
        let l = inner.listings.get_mut(dir)?;
        if l.at.elapsed() >= LISTING_TTL {
            inner.listings.remove(dir);
            return None;
        }
        let i = l.position(name)?;
        let question = question.map(OsStr::to_os_string);
        let size = match l.last.get(&question) {
            None => FIRST_BATCH,
            Some(&(end, size)) if i >= end && i < end + IN_ORDER_SLACK => (size * 2).min(MAX_BATCH),
            Some(_) => return None,
        };
        let end = (i + size).min(l.ends.len());
        l.last.insert(question, (end, size));
        Some((i..end).map(|k| l.name(k).to_os_string()).collect())
    }

    /// src's answers for a batch of `dir`: the stats found.
    pub(crate) fn put(&self, dir: &Path, found: impl Iterator<Item = (OsString, Stat)>) {
        if self.ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut inner = self.inner.lock().unwrap();
        for (name, st) in found {
            if inner.stats.len() >= MAX_STATS {
                inner.stats.clear();
            }
            inner.stats.insert(dir.join(name), (st, now));
        }
    }

    /// src's answer to getxattr of `xattr` on `path`, if a batch brought it within the
    /// ttl (used once).
    pub(crate) fn take_xattr(&self, path: &Path, xattr: &OsStr) -> Option<XattrAnswer> {
        if self.ttl.is_zero() {
            return None;
        }
        let mut inner = self.inner.lock().unwrap();
        if inner.xattrs.is_empty() {
            return None;
        }
        let (r, at) = inner
            .xattrs
            .remove(&(path.to_path_buf(), xattr.to_os_string()))?;
        (at.elapsed() < self.ttl).then_some(r)
    }

    /// src's getxattr answers of `xattr` for names of `dir`.
    pub(crate) fn put_xattrs(
        &self,
        dir: &Path,
        xattr: &OsStr,
        answers: impl Iterator<Item = (OsString, XattrAnswer)>,
    ) {
        if self.ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut inner = self.inner.lock().unwrap();
        for (name, r) in answers {
            if inner.xattrs.len() >= MAX_STATS {
                inner.xattrs.clear();
            }
            inner
                .xattrs
                .insert((dir.join(name), xattr.to_os_string()), (r, now));
        }
    }

    /// `path` changes on src (or may have): forget what is known of it and below it,
    /// and the listings of its parent and of itself.
    pub(crate) fn forget(&self, path: &Path) {
        if self.ttl.is_zero() {
            return;
        }
        let mut inner = self.inner.lock().unwrap();
        if !inner.stats.is_empty() {
            inner.stats.retain(|p, _| !p.starts_with(path));
        }
        if !inner.xattrs.is_empty() {
            inner.xattrs.retain(|(p, _), _| !p.starts_with(path));
        }
        if let Some(parent) = path.parent() {
            inner.listings.remove(parent);
        }
        inner.listings.retain(|p, _| !p.starts_with(path));
    }

    /// Forget everything (src went offline, or was reopened).
    pub(crate) fn clear(&self) {
        let mut inner = self.inner.lock().unwrap();
        inner.stats.clear();
        inner.xattrs.clear();
        inner.listings.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat_of(size: i64) -> Stat {
        // SAFETY: a zeroed stat is a valid value.
        let mut st: Stat = unsafe { std::mem::zeroed() };
        st.st_size = size;
        st
    }

    fn names(n: usize) -> Vec<OsString> {
        (0..n).map(|i| OsString::from(format!("f{i}"))).collect()
    }

    #[test]
    fn batches_follow_listing_order_and_grow() {
        let a = SrcAhead::new(Duration::from_secs(10));
        let all = names(5000);
        a.listed(Path::new("d"), all.iter().map(|n| n.as_os_str()));
        let b = a.batch_for(Path::new("d/f10")).unwrap();
        assert_eq!(b.len(), FIRST_BATCH);
        assert_eq!(b[0], "f10");
        // The next miss right after that batch: a bigger batch.
        let b = a
            .batch_for(Path::new(&format!("d/f{}", 10 + FIRST_BATCH)))
            .unwrap();
        assert_eq!(b.len(), 2 * FIRST_BATCH);
        // Out of order: no batch.
        assert!(a.batch_for(Path::new("d/f4000")).is_none());
        assert!(a.batch_for(Path::new("d/f3")).is_none());
        // Not listed: no batch.
        assert!(a.batch_for(Path::new("e/f1")).is_none());
        assert!(a.batch_for(Path::new("d/nope")).is_none());
    }

    #[test]
    fn a_packed_listing_finds_every_name_at_its_place() {
        let mut all = names(3000);
        all.push(OsString::from("x".repeat(255)));
        all.push(OsString::from("f7")); // listed twice: its first place
        let l = Listing::new(all.iter().map(|n| n.as_os_str())).unwrap();
        for (i, n) in all.iter().enumerate().take(3001) {
            assert_eq!(l.name(i), n.as_os_str());
            assert_eq!(l.position(n), Some(i), "{n:?}");
        }
        assert_eq!(l.position(OsStr::new("f7")), Some(7));
        assert_eq!(l.position(OsStr::new("f30000")), None);
        assert_eq!(l.position(OsStr::new("")), None);
        assert!(
            Listing::new(std::iter::empty())
                .unwrap()
                .position(OsStr::new("a"))
                .is_none()
        );
    }

    #[test]
    fn stats_are_used_once_and_expire() {
        let a = SrcAhead::new(Duration::from_millis(100));
        a.put(
            Path::new("d"),
            [("x".into(), stat_of(7)), ("y".into(), stat_of(8))].into_iter(),
        );
        assert_eq!(a.take(Path::new("d/x")).unwrap().st_size, 7);
        assert!(a.take(Path::new("d/x")).is_none());
        std::thread::sleep(Duration::from_millis(150));
        assert!(a.take(Path::new("d/y")).is_none(), "older than the ttl");
    }

    #[test]
    fn forget_drops_stats_and_listings() {
        let a = SrcAhead::new(Duration::from_secs(10));
        let all = names(10);
        a.listed(Path::new("d"), all.iter().map(|n| n.as_os_str()));
        a.put(Path::new("d"), [("f1".into(), stat_of(1))].into_iter());
        a.put(Path::new("d/sub"), [("g".into(), stat_of(2))].into_iter());
        a.forget(Path::new("d/f1"));
        assert!(a.take(Path::new("d/f1")).is_none());
        assert!(
            a.batch_for(Path::new("d/f2")).is_none(),
            "listing of d dropped"
        );
        a.forget(Path::new("d"));
        assert!(a.take(Path::new("d/sub/g")).is_none());
    }

    #[test]
    fn xattr_batches_are_tracked_apart_from_stat_batches() {
        let a = SrcAhead::new(Duration::from_secs(10));
        let all = names(5000);
        a.listed(Path::new("d"), all.iter().map(|n| n.as_os_str()));
        let x = OsStr::new(crate::sys::ACL_ACCESS);
        assert_eq!(a.batch_for(Path::new("d/f0")).unwrap().len(), FIRST_BATCH);
        // The getxattr of the same name is a question of its own.
        assert_eq!(
            a.xattr_batch_for(Path::new("d/f0"), x).unwrap().len(),
            FIRST_BATCH
        );
        a.put_xattrs(
            Path::new("d"),
            x,
            [
                ("f1".into(), Err(libc::ENODATA)),
                ("f2".into(), Ok(b"v".to_vec())),
            ]
            .into_iter(),
        );
        assert_eq!(a.take_xattr(Path::new("d/f1"), x), Some(Err(libc::ENODATA)));
        assert_eq!(a.take_xattr(Path::new("d/f1"), x), None, "used once");
        assert_eq!(
            a.take_xattr(Path::new("d/f2"), OsStr::new("user.other")),
            None
        );
        a.forget(Path::new("d/f2"));
        assert_eq!(a.take_xattr(Path::new("d/f2"), x), None, "forgotten");
    }

    #[test]
    fn zero_ttl_keeps_nothing() {
        let a = SrcAhead::new(Duration::ZERO);
        let all = names(10);
        a.listed(Path::new("d"), all.iter().map(|n| n.as_os_str()));
        assert!(a.batch_for(Path::new("d/f1")).is_none());
        a.put(Path::new("d"), [("f1".into(), stat_of(1))].into_iter());
        assert!(a.take(Path::new("d/f1")).is_none());
    }

    #[test]
    fn listings_are_bounded() {
        let a = SrcAhead::new(Duration::from_secs(10));
        let all = names(3);
        for i in 0..MAX_LISTINGS + 3 {
            a.listed(
                Path::new(&format!("d{i}")),
                all.iter().map(|n| n.as_os_str()),
            );
        }
        assert!(a.inner.lock().unwrap().listings.len() <= MAX_LISTINGS);
        assert!(
            a.batch_for(Path::new(&format!("d{}/f0", MAX_LISTINGS + 2)))
                .is_some()
        );
    }
}
