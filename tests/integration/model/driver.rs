//! Drives the real core (`cachefs::fs::CacheFs`, no FUSE) and makes the src changes on
//! disk. Where the kernel would answer before calling the filesystem (path walk,
//! rename's checks, link's EEXIST/EPERM, I/O on a directory), this driver does what the
//! kernel does, using only what the core's lookups return.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use cachefs::config::Config;
use cachefs::fs::{Attr, CacheFs, Caller, FsError, Kind, OpenRequest, ROOT, SetAttr};
use tempfile::TempDir;

use super::ops::*;

pub struct Driver {
    _dirs: (TempDir, TempDir),
    pub src: PathBuf,
    pub dst: PathBuf,
    pub fs: CacheFs,
    /// Kernel references taken (forgotten at the end of the step without a dentry
    /// cache, else when the cache is dropped).
    refs: Vec<u64>,
    /// The kernel's dentry cache, if simulated: path -> (ino, kind), kept up to date
    /// by the ops that go through the mount (as the kernel does) and dropped whenever
    /// src changes (as if its TTL ran out). Path walks use it instead of lookups, so
    /// the core sees calls on inodes it was not asked to look up again.
    cache: Option<BTreeMap<String, (u64, K)>>,
}

fn caller() -> Caller {
    // SAFETY: cannot fail.
    unsafe {
        Caller {
            uid: libc::geteuid(),
            gid: libc::getegid(),
        }
    }
}

fn fail(e: FsError) -> Outcome {
    err(e.errno())
}

fn kind_of(k: Kind) -> K {
    match k {
        Kind::Dir => K::Dir,
        Kind::Symlink => K::Symlink,
        _ => K::File,
    }
}

type R<T> = Result<T, Outcome>;

fn tempdir(what: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(&format!("cachefs-model-{what}."))
        .tempdir()
        .expect("tempdir")
}

/// The core's configuration: revalidation off, because the model has no clock (a
/// clean cached copy of a file src deleted is dropped only by revalidation, which
/// coherence.rs covers).
fn core_config(src: &std::path::Path, dst: &std::path::Path) -> Config {
    let mut cfg = Config::new(
        src.to_path_buf(),
        dst.to_path_buf(),
        PathBuf::from("/nonexistent"),
    );
    cfg.revalidate = std::time::Duration::ZERO;
    // The model has no clock: every src change it makes comes after any TTL ran out
    // (the driver drops its simulated dentry cache then). The core's own TTL-bound
    // memory of what src lacks (`fs::src_absent`) is turned off the same way.
    cfg.attr_ttl = std::time::Duration::ZERO;
    cfg
}

impl Driver {
    pub fn new(kernel_cache: bool) -> Driver {
        let (s, d) = (tempdir("src"), tempdir("dst"));
        let (src, dst) = (s.path().to_path_buf(), d.path().to_path_buf());
        let fs = CacheFs::new(&core_config(&src, &dst), None).expect("CacheFs::new");
        Driver {
            _dirs: (s, d),
            src,
            dst,
            fs,
            refs: Vec::new(),
            cache: kernel_cache.then(BTreeMap::new),
        }
    }

    fn lookup(&mut self, parent: u64, name: &str) -> R<Attr> {
        let a = self.fs.lookup(parent, OsStr::new(name)).map_err(fail)?;
        self.refs.push(a.ino);
        Ok(a)
    }

    /// A lookup by the kernel's path walk: answered from the dentry cache if there is
    /// one and it has the path.
    fn walk_lookup(&mut self, parent: u64, path: &str) -> R<(u64, K)> {
        if let Some(hit) = self.cache.as_ref().and_then(|c| c.get(path)) {
            return Ok(*hit);
        }
        let a = self.lookup(parent, name_of(path))?;
        self.cached(path, &a);
        Ok((a.ino, kind_of(a.kind)))
    }

    fn cached(&mut self, path: &str, a: &Attr) {
        if let Some(c) = &mut self.cache {
            c.insert(path.to_string(), (a.ino, kind_of(a.kind)));
        }
    }

    /// The dentry cache after a successful unlink/rmdir/rename (what the kernel does
    /// with its dentries).
    fn cache_remove(&mut self, path: &str) {
        if let Some(c) = &mut self.cache {
            c.retain(|k, _| k != path && !is_below(k, path));
        }
    }

    fn cache_move(&mut self, from: &str, to: &str) {
        if let Some(c) = &mut self.cache {
            let moved: Vec<(String, (u64, K))> = c
                .iter()
                .filter(|(k, _)| *k == from || is_below(k, from))
                .map(|(k, v)| (format!("{to}{}", &k[from.len()..]), *v))
                .collect();
            c.retain(|k, _| k != from && !is_below(k, from));
            c.extend(moved);
        }
    }

    /// The TTL ran out (src changed, or the daemon restarted).
    fn drop_cache(&mut self) {
        if let Some(c) = &mut self.cache {
            c.clear();
            for ino in self.refs.drain(..) {
                self.fs.forget(ino, 1);
            }
        }
    }

    /// The kernel's path walk: (ino, kind) of `path`.
    fn resolve(&mut self, path: &str) -> R<(u64, K)> {
        let mut cur = (ROOT, K::Dir);
        if path.is_empty() {
            return Ok(cur);
        }
        let mut walked = String::new();
        for comp in path.split('/') {
            if cur.1 != K::Dir {
                return Err(err(libc::ENOTDIR));
            }
            walked = join(&walked, comp);
            cur = self.walk_lookup(cur.0, &walked)?;
        }
        Ok(cur)
    }

    fn resolve_parent(&mut self, path: &P) -> R<u64> {
        match self.resolve(path.parent())? {
            (ino, K::Dir) => Ok(ino),
            _ => Err(err(libc::ENOTDIR)),
        }
    }

    /// The final component, not followed; `None` if it does not exist.
    fn probe(&mut self, parent: u64, path: &P) -> R<Option<(u64, K)>> {
        match self.walk_lookup(parent, &path.0) {
            Ok(a) => Ok(Some(a)),
            Err(Outcome::Err(Errno(libc::ENOENT))) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A file for open/read/write/truncate (symlinks would be followed: skipped).
    fn file_for_io(&mut self, path: &P) -> R<u64> {
        match self.resolve(&path.0)? {
            (_, K::Dir) => Err(err(libc::EISDIR)),
            (_, K::Symlink) => Err(Outcome::Skip),
            (ino, K::File) => Ok(ino),
        }
    }

    pub fn apply(&mut self, op: &Op) -> Outcome {
        if let Op::Restart = op {
            if let Some(c) = &mut self.cache {
                c.clear();
            }
            self.refs.clear();
            self.fs = CacheFs::new(&core_config(&self.src, &self.dst), None)
                .expect("CacheFs::new after restart");
            return Outcome::Ok;
        }
        let r = if op.is_src() {
            self.drop_cache();
            self.src_change(op)
        } else {
            self.core_op(op)
        };
        r.unwrap_or_else(|o| o)
    }

    fn open(&mut self, ino: u64, flags: i32) -> R<u64> {
        let req = OpenRequest {
            flags,
            for_backing: false,
        };
        Ok(self.fs.open(ino, req).map_err(fail)?.fh)
    }

    fn core_op(&mut self, op: &Op) -> R<Outcome> {
        let fs_ok = |r: Result<(), FsError>| r.map(|_| Outcome::Ok).map_err(fail);
        match op {
            Op::Create(p, m) => {
                let parent = self.resolve_parent(p)?;
                let req = OpenRequest {
                    flags: libc::O_RDWR,
                    for_backing: false,
                };
                let (a, fh) = self
                    .fs
                    .create(caller(), parent, OsStr::new(p.name()), m.0, UMASK, req)
                    .map_err(fail)?;
                self.refs.push(a.ino);
                self.cached(&p.0, &a);
                fs_ok(self.fs.release(fh))
            }
            Op::Mkdir(p, m) => {
                let parent = self.resolve_parent(p)?;
                let a = self
                    .fs
                    .mkdir(caller(), parent, OsStr::new(p.name()), m.0, UMASK)
                    .map_err(fail)?;
                self.refs.push(a.ino);
                self.cached(&p.0, &a);
                Ok(Outcome::Ok)
            }
            Op::Symlink(p, t) => {
                let parent = self.resolve_parent(p)?;
                let a = self
                    .fs
                    .symlink(caller(), parent, OsStr::new(p.name()), OsStr::new(t))
                    .map_err(fail)?;
                self.refs.push(a.ino);
                self.cached(&p.0, &a);
                Ok(Outcome::Ok)
            }
            Op::Write(p, off, data) => {
                let ino = self.file_for_io(p)?;
                let fh = self.open(ino, libc::O_WRONLY)?;
                let w = self.fs.write(fh, *off, data.as_bytes());
                self.fs.release(fh).map_err(fail)?;
                assert_eq!(w.map_err(fail)?, data.len() as u32, "short write");
                Ok(Outcome::Ok)
            }
            Op::Truncate(p, size) => {
                let ino = self.file_for_io(p)?;
                let set = SetAttr {
                    size: Some(*size),
                    ..Default::default()
                };
                self.fs.setattr(caller(), ino, None, set).map_err(fail)?;
                Ok(Outcome::Ok)
            }
            Op::Chmod(p, m) => {
                let (ino, kind) = self.resolve(&p.0)?;
                if kind == K::Symlink {
                    return Err(Outcome::Skip);
                }
                let set = SetAttr {
                    mode: Some(m.0),
                    ..Default::default()
                };
                self.fs.setattr(caller(), ino, None, set).map_err(fail)?;
                Ok(Outcome::Ok)
            }
            Op::Read(p) => {
                let ino = self.file_for_io(p)?;
                let data = self.read_all(ino)?;
                Ok(Outcome::Data(data))
            }
            Op::Unlink(p) => {
                let parent = self.resolve_parent(p)?;
                fs_ok(self.fs.unlink(parent, OsStr::new(p.name())))?;
                self.cache_remove(&p.0);
                Ok(Outcome::Ok)
            }
            Op::Rmdir(p) => {
                let parent = self.resolve_parent(p)?;
                fs_ok(self.fs.rmdir(parent, OsStr::new(p.name())))?;
                self.cache_remove(&p.0);
                Ok(Outcome::Ok)
            }
            Op::Rename(from, to, flags) => {
                // do_renameat2 / vfs_rename, in the kernel's order.
                let fp = self.resolve_parent(from)?;
                let tp = self.resolve_parent(to)?;
                let fa = self.walk_lookup(fp, &from.0)?;
                let ta = self.probe(tp, to)?;
                let exchange = *flags == Flags::Exchange;
                if *flags == Flags::NoReplace && ta.is_some() {
                    return Err(err(libc::EEXIST));
                }
                if exchange && ta.is_none() {
                    return Err(err(libc::ENOENT));
                }
                if is_below(&to.0, &from.0) {
                    return Err(err(libc::EINVAL));
                }
                if is_below(&from.0, &to.0) {
                    return Err(err(if exchange {
                        libc::EINVAL
                    } else {
                        libc::ENOTEMPTY
                    }));
                }
                if let Some(t) = &ta {
                    if t.0 == fa.0 {
                        return Ok(Outcome::Ok);
                    }
                    if !exchange {
                        match (fa.1 == K::Dir, t.1 == K::Dir) {
                            (true, false) => return Err(err(libc::ENOTDIR)),
                            (false, true) => return Err(err(libc::EISDIR)),
                            _ => {}
                        }
                    }
                }
                fs_ok(self.fs.rename(
                    fp,
                    OsStr::new(from.name()),
                    tp,
                    OsStr::new(to.name()),
                    flags.bits(),
                ))?;
                if exchange {
                    let tmp = "\0exchange";
                    self.cache_move(&from.0, tmp);
                    self.cache_move(&to.0, &from.0);
                    self.cache_move(tmp, &to.0);
                } else {
                    self.cache_remove(&to.0);
                    self.cache_move(&from.0, &to.0);
                }
                Ok(Outcome::Ok)
            }
            Op::Link(old, new) => {
                let (ino, kind) = self.resolve(&old.0)?;
                let parent = self.resolve_parent(new)?;
                if self.probe(parent, new)?.is_some() {
                    return Err(err(libc::EEXIST));
                }
                if kind == K::Dir {
                    return Err(err(libc::EPERM));
                }
                let a = self
                    .fs
                    .link(ino, parent, OsStr::new(new.name()))
                    .map_err(fail)?;
                self.refs.push(a.ino);
                self.cached(&new.0, &a);
                Ok(Outcome::Ok)
            }
            _ => unreachable!("src ops are not core ops"),
        }
    }

    fn read_all(&mut self, ino: u64) -> R<String> {
        let fh = self.open(ino, libc::O_RDONLY)?;
        let data = self.fs.read(fh, 0, 1 << 16);
        self.fs.release(fh).map_err(fail)?;
        let data = data.map_err(fail)?;
        Ok(String::from_utf8_lossy(&data).into_owned())
    }

    // ----- src changes (another machine writing the bucket) ---------------------------

    fn src_change(&mut self, op: &Op) -> R<Outcome> {
        let path = match op {
            Op::SrcWrite(p, ..) | Op::SrcMkdir(p) | Op::SrcSymlink(p, _) | Op::SrcRemove(p) => p,
            _ => unreachable!(),
        };
        let full = self.src.join(&path.0);
        let existing = fs::symlink_metadata(&full).ok();
        if let Op::SrcRemove(_) = op {
            return match existing {
                None => Err(Outcome::Skip),
                Some(m) if m.is_dir() => {
                    Ok(fs::remove_dir_all(&full).map(|_| Outcome::Ok).unwrap())
                }
                Some(_) => Ok(fs::remove_file(&full).map(|_| Outcome::Ok).unwrap()),
            };
        }
        // mkdir -p of the parent, unless a non-directory is in the way.
        let mut cur = self.src.clone();
        for comp in Path::new(path.parent()).components() {
            cur.push(comp);
            match fs::symlink_metadata(&cur) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(Outcome::Skip),
                Err(_) => {}
            }
        }
        match (&existing, op) {
            (None, _) => {}
            (Some(m), Op::SrcWrite(..)) if m.is_file() => {}
            _ => return Err(Outcome::Skip),
        }
        let mut cur = self.src.clone();
        for comp in Path::new(path.parent()).components() {
            cur.push(comp);
            if fs::symlink_metadata(&cur).is_err() {
                fs::create_dir(&cur).unwrap();
                fs::set_permissions(&cur, fs::Permissions::from_mode(0o755)).unwrap();
            }
        }
        match op {
            Op::SrcWrite(_, data, m) => {
                fs::write(&full, data).unwrap();
                fs::set_permissions(&full, fs::Permissions::from_mode(m.0)).unwrap();
            }
            Op::SrcMkdir(_) => {
                fs::create_dir(&full).unwrap();
                fs::set_permissions(&full, fs::Permissions::from_mode(0o755)).unwrap();
            }
            Op::SrcSymlink(_, t) => symlink(t, &full).unwrap(),
            _ => unreachable!(),
        }
        Ok(Outcome::Ok)
    }

    // ----- observing the whole view -------------------------------------------------

    /// Lists the whole view from the root (opendir/readdir/lookup), as the kernel would.
    /// `read_content(path)`: whether to open and read a file (only those already in dst,
    /// so that the walk itself copies nothing up). Returns path -> (observation, st_ino).
    pub fn walk(
        &mut self,
        read_content: impl Fn(&str) -> bool,
    ) -> Result<BTreeMap<String, (Obs, u64)>, String> {
        let mut out = BTreeMap::new();
        let mut stack = vec![(String::new(), ROOT)];
        while let Some((dir, dino)) = stack.pop() {
            let fh = self
                .fs
                .opendir(dino)
                .map_err(|e| format!("opendir({dir:?}): {e}"))?;
            let items = self.fs.readdir(fh, 0);
            self.fs.releasedir(fh);
            let items = items.map_err(|e| format!("readdir({dir:?}): {e}"))?;
            for item in items.iter() {
                let name = item.name.to_str().expect("utf-8 names").to_string();
                let path = join(&dir, &name);
                if is_reserved(&name) {
                    return Err(format!("readdir({dir:?}) lists reserved name {name:?}"));
                }
                if out.contains_key(&path) {
                    return Err(format!("readdir({dir:?}) lists {name:?} twice"));
                }
                let a = self
                    .lookup(dino, &name)
                    .map_err(|e| format!("lookup of listed {path:?}: {e:?}"))?;
                if a.ino != item.ino {
                    return Err(format!(
                        "{path:?}: readdir d_ino {} but lookup st_ino {}",
                        item.ino, a.ino
                    ));
                }
                if a.kind != item.kind {
                    return Err(format!(
                        "{path:?}: readdir d_type {:?} but lookup {:?}",
                        item.kind, a.kind
                    ));
                }
                let kind = kind_of(a.kind);
                let obs = match kind {
                    K::Dir => {
                        stack.push((path.clone(), a.ino));
                        Obs {
                            kind,
                            perm: Some(u32::from(a.perm)),
                            size: None,
                            nlink: None,
                            target: None,
                            content: None,
                        }
                    }
                    K::File => Obs {
                        kind,
                        perm: Some(u32::from(a.perm)),
                        size: Some(a.size),
                        nlink: Some(a.nlink),
                        target: None,
                        content: if read_content(&path) {
                            Some(
                                self.read_all(a.ino)
                                    .map_err(|e| format!("reading {path:?}: {e:?}"))?,
                            )
                        } else {
                            None
                        },
                    },
                    K::Symlink => Obs {
                        kind,
                        perm: None,
                        size: None,
                        nlink: None,
                        target: Some(
                            self.fs
                                .readlink(a.ino)
                                .map_err(|e| format!("readlink({path:?}): {e}"))?
                                .to_string_lossy()
                                .into_owned(),
                        ),
                        content: None,
                    },
                };
                out.insert(path, (obs, a.ino));
            }
        }
        Ok(out)
    }

    /// The kernel forgets everything it looked up this step (unless it caches it).
    pub fn end_step(&mut self) {
        if self.cache.is_some() {
            return;
        }
        for ino in self.refs.drain(..) {
            self.fs.forget(ino, 1);
        }
    }

    /// Whether dst holds an entry at `path` (to check that only opens and mutations copy).
    pub fn dst_has(&self, path: &str) -> bool {
        fs::symlink_metadata(self.dst.join(path)).is_ok()
    }

    /// Copy-up temp files left anywhere in dst (there must be none between calls).
    pub fn temp_files(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![self.dst.clone()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(".cachefs-tmp.") {
                    out.push(e.path().display().to_string());
                }
                if e.file_type().unwrap().is_dir() {
                    stack.push(e.path());
                }
            }
        }
        out
    }
}
