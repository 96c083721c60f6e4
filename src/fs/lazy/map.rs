//! A partial file's on-disk form: where its files live in dst's state folder, the
//! persisted map of the blocks it holds, and how maps are read and written.
//!
//! Naming: a partial of mount path `p` is `.cachefs-state/lazy/<key>.data` (the sparse
//! data file) and `<key>.map` (its map), `<key>` the FNV-1a hash of `p` in hex. The data
//! file's dst-relative name is the partial's key in the cache's usage index
//! ([`data_rel_of`]).
//!
//! Invariants:
//! - A map is written whole with temp + rename ([`write_atomic`]) and carries a
//!   checksum: [`Map::decode`] accepts only a whole, intact map of the current format
//!   (`None` for a missing, torn or foreign one, which means "no block present").
//! - A map names its mount path and the src version (size, mtime) it was fetched from
//!   ([`origin_key`]); a map whose path does not hash to its key is not that key's.
//!
//! No locks here: callers hold what they need (see the lock order in the parent module).

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::fs::layer::{Layer, Stat};
use crate::fs::names::STATE_DIR;
use crate::fs::origin::Origin;

const MAGIC: &[u8; 8] = b"CFSLAZY1";

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

pub(super) fn key_of(path: &Path) -> String {
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

pub(super) fn map_rel_of(data_rel: &Path) -> PathBuf {
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

    pub(super) fn set(&mut self, b: u64) {
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
pub(super) fn origin_key(st: &Stat) -> (u64, i64, i64, u64) {
    let o = Origin::of(st);
    (o.size, o.mtime_sec, o.mtime_nsec, 0)
}

pub(super) fn bit(set: &[u8], b: u64) -> bool {
    set.get((b / 8) as usize)
        .is_some_and(|x| x & (1 << (b % 8)) != 0)
}

pub(super) fn set_bit(set: &mut [u8], b: u64) {
    set[(b / 8) as usize] |= 1 << (b % 8);
}

pub(super) fn write_atomic(dst: &Layer, rel: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = rel.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = dst.create_file(&tmp, libc::O_WRONLY | libc::O_TRUNC, 0o600)?;
    f.write_all(bytes)?;
    drop(f);
    dst.rename(&tmp, rel, 0)
}

pub(super) fn rels(key: &str) -> (PathBuf, PathBuf) {
    (
        lazy_dir().join(format!("{key}.data")),
        lazy_dir().join(format!("{key}.map")),
    )
}

pub(super) fn read_all(f: &File) -> io::Result<Vec<u8>> {
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
}
