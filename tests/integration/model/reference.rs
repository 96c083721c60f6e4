//! The reference model: the layered view as plain maps, written from docs/SEMANTICS.md
//! section 1 and the rules in `src/fs/mod.rs`, with no I/O.
//!
//! - `src`: what the slow directory holds (a tree: every parent of a key is a `Dir`).
//! - `up`: what dst holds (the upper layer), also a tree. A dst `Dir` may be opaque.
//! - `wh`: whiteouts, by the path they hide (they live in the upper parent directory).
//! - `files`: dst file bodies by identity, so hard links share one body.
//!
//! The view of a path, component by component: the upper entry wins; else src's entry if
//! the parent merges src and no whiteout hides it. A directory merges src iff its parent
//! merges and it is not opaque (the root merges). Every object the view shows has an
//! identity (`ident`) that survives copy-up and rename and is shared by hard links; the
//! test checks that the core's `st_ino` follows identities.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::ops::*;

pub const ROOT_IDENT: u64 = 0;

#[derive(Clone, Debug)]
pub enum SrcEnt {
    Dir { mode: u32 },
    File { data: String, mode: u32 },
    Symlink { target: String },
}

#[derive(Clone, Debug)]
pub struct SrcNode {
    pub ent: SrcEnt,
    pub ident: u64,
}

#[derive(Clone, Debug)]
pub enum UpEnt {
    Dir {
        mode: u32,
        opaque: bool,
        ident: u64,
    },
    /// The body is `files[ident]`.
    File {
        ident: u64,
    },
    Symlink {
        target: String,
        ident: u64,
    },
}

#[derive(Clone, Debug)]
pub struct Body {
    pub data: String,
    pub mode: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layer {
    Up,
    Src,
}

/// A path as the view shows it.
#[derive(Clone, Copy, Debug)]
pub struct V {
    pub kind: K,
    pub layer: Layer,
    /// Directories: whether src is consulted for the children.
    pub merging: bool,
    pub ident: u64,
}

#[derive(Default, Debug)]
pub struct Model {
    pub src: BTreeMap<String, SrcNode>,
    pub up: BTreeMap<String, UpEnt>,
    pub wh: BTreeSet<String>,
    pub files: HashMap<u64, Body>,
    next_ident: u64,
}

type R<T> = Result<T, Outcome>;

fn e<T>(errno: i32) -> R<T> {
    Err(err(errno))
}

/// An expected visible entry: what a walk observes, the identity and the layer.
#[derive(Clone, Debug)]
pub struct Expected {
    pub obs: Obs,
    pub ident: u64,
    pub layer: Layer,
}

impl Model {
    pub fn new() -> Model {
        Model {
            next_ident: ROOT_IDENT + 1,
            ..Default::default()
        }
    }

    fn new_ident(&mut self) -> u64 {
        self.next_ident += 1;
        self.next_ident
    }

    // ----- the view ---------------------------------------------------------------

    /// Resolves `path` like a lookup walk: ENOENT for a missing (or reserved) component,
    /// ENOTDIR for a non-directory in the middle.
    pub fn view(&self, path: &str) -> R<V> {
        let mut v = V {
            kind: K::Dir,
            layer: Layer::Up,
            merging: true,
            ident: ROOT_IDENT,
        };
        if path.is_empty() {
            return Ok(v);
        }
        let mut cur = String::new();
        for comp in path.split('/') {
            if v.kind != K::Dir {
                return e(libc::ENOTDIR);
            }
            if is_reserved(comp) {
                return e(libc::ENOENT);
            }
            cur = join(&cur, comp);
            let parent_merges = v.merging;
            v = if let Some(u) = self.up.get(&cur) {
                match u {
                    UpEnt::Dir { opaque, ident, .. } => V {
                        kind: K::Dir,
                        layer: Layer::Up,
                        merging: parent_merges && !opaque,
                        ident: *ident,
                    },
                    UpEnt::File { ident } => V {
                        kind: K::File,
                        layer: Layer::Up,
                        merging: false,
                        ident: *ident,
                    },
                    UpEnt::Symlink { ident, .. } => V {
                        kind: K::Symlink,
                        layer: Layer::Up,
                        merging: false,
                        ident: *ident,
                    },
                }
            } else if let Some(s) = self
                .src
                .get(&cur)
                .filter(|_| parent_merges && !self.wh.contains(&cur))
            {
                let kind = match s.ent {
                    SrcEnt::Dir { .. } => K::Dir,
                    SrcEnt::File { .. } => K::File,
                    SrcEnt::Symlink { .. } => K::Symlink,
                };
                V {
                    kind,
                    layer: Layer::Src,
                    merging: kind == K::Dir,
                    ident: s.ident,
                }
            } else {
                return e(libc::ENOENT);
            };
        }
        Ok(v)
    }

    /// The parent directory of `path` in the view.
    fn parent_dir(&self, path: &P) -> R<V> {
        let v = self.view(path.parent())?;
        if v.kind != K::Dir {
            return e(libc::ENOTDIR);
        }
        Ok(v)
    }

    fn children<'a, T>(
        map: &'a BTreeMap<String, T>,
        dir: &'a str,
    ) -> impl Iterator<Item = &'a str> {
        map.keys()
            .filter(move |k| parent_of(k) == dir && !k.is_empty())
            .map(|k| name_of(k))
    }

    /// The names listed in directory `dir` (visible as `v`).
    pub fn list(&self, dir: &str, v: &V) -> BTreeSet<String> {
        let mut out: BTreeSet<String> = Self::children(&self.up, dir).map(str::to_string).collect();
        if v.merging {
            for n in Self::children(&self.src, dir) {
                let path = join(dir, n);
                if !is_reserved(n) && !self.wh.contains(&path) {
                    out.insert(n.to_string());
                }
            }
        }
        out
    }

    /// `list`, with the side effect of the core's listing: in a merging directory,
    /// whiteouts for names src no longer has are garbage-collected.
    fn list_gc(&mut self, dir: &str, v: &V) -> BTreeSet<String> {
        if v.merging {
            let src = &self.src;
            self.wh
                .retain(|w| parent_of(w) != dir || src.contains_key(w));
        }
        self.list(dir, v)
    }

    /// Everything visible, keyed by path (the root excluded).
    pub fn expected(&self) -> BTreeMap<String, Expected> {
        let mut out = BTreeMap::new();
        let mut stack = vec![String::new()];
        while let Some(dir) = stack.pop() {
            let dv = self.view(&dir).expect("listed paths resolve");
            for name in self.list(&dir, &dv) {
                let path = join(&dir, &name);
                let v = self.view(&path).expect("listed paths resolve");
                let obs = match (v.layer, &v.kind) {
                    (_, K::Dir) => {
                        stack.push(path.clone());
                        let mode = match (self.up.get(&path), self.src.get(&path)) {
                            (Some(UpEnt::Dir { mode, .. }), _) => *mode,
                            (
                                None,
                                Some(SrcNode {
                                    ent: SrcEnt::Dir { mode },
                                    ..
                                }),
                            ) => *mode,
                            _ => unreachable!(),
                        };
                        Obs {
                            kind: K::Dir,
                            perm: Some(mode),
                            size: None,
                            nlink: None,
                            target: None,
                            content: None,
                        }
                    }
                    (Layer::Up, K::File) => {
                        let body = &self.files[&v.ident];
                        let links = self
                            .up
                            .values()
                            .filter(|u| matches!(u, UpEnt::File { ident } if *ident == v.ident))
                            .count();
                        Obs {
                            kind: K::File,
                            perm: Some(body.mode),
                            size: Some(body.data.len() as u64),
                            nlink: Some(links as u32),
                            target: None,
                            content: Some(body.data.clone()),
                        }
                    }
                    (Layer::Src, K::File) => {
                        let SrcEnt::File { data, mode } = &self.src[&path].ent else {
                            unreachable!()
                        };
                        Obs {
                            kind: K::File,
                            perm: Some(*mode),
                            size: Some(data.len() as u64),
                            nlink: Some(1),
                            target: None,
                            // Reading would copy it up: only the size is compared.
                            content: None,
                        }
                    }
                    (layer, K::Symlink) => {
                        let target = match layer {
                            Layer::Up => match &self.up[&path] {
                                UpEnt::Symlink { target, .. } => target.clone(),
                                _ => unreachable!(),
                            },
                            Layer::Src => match &self.src[&path].ent {
                                SrcEnt::Symlink { target } => target.clone(),
                                _ => unreachable!(),
                            },
                        };
                        Obs {
                            kind: K::Symlink,
                            perm: None,
                            size: None,
                            nlink: None,
                            target: Some(target),
                            content: None,
                        }
                    }
                };
                out.insert(
                    path,
                    Expected {
                        obs,
                        ident: v.ident,
                        layer: v.layer,
                    },
                );
            }
        }
        out
    }

    /// What listing every directory of the view does (`list_gc` everywhere).
    pub fn gc_whiteouts(&mut self) {
        let mut stack = vec![String::new()];
        while let Some(dir) = stack.pop() {
            let v = self.view(&dir).expect("listed paths resolve");
            for name in self.list_gc(&dir, &v) {
                let path = join(&dir, &name);
                if self.view(&path).is_ok_and(|v| v.kind == K::Dir) {
                    stack.push(path);
                }
            }
        }
    }

    // ----- copy-up ----------------------------------------------------------------

    /// dst gets directory `path` (and its missing ancestors) with src's attributes.
    fn ensure_up_dir(&mut self, path: &str) {
        if path.is_empty() {
            return;
        }
        match self.up.get(path) {
            Some(UpEnt::Dir { .. }) => return,
            Some(u) => panic!("model: ensure_up_dir({path}) over {u:?}"),
            None => {}
        }
        self.ensure_up_dir(parent_of(path));
        let Some(SrcNode {
            ent: SrcEnt::Dir { mode },
            ident,
        }) = self.src.get(path)
        else {
            panic!("model: ensure_up_dir({path}) without a src dir");
        };
        let ent = UpEnt::Dir {
            mode: *mode,
            opaque: false,
            ident: *ident,
        };
        self.up.insert(path.to_string(), ent);
    }

    /// The src-only non-directory at `path` is copied into dst.
    fn copy_up(&mut self, path: &str) {
        assert!(
            !self.up.contains_key(path),
            "model: copy_up({path}) of a dst entry"
        );
        self.ensure_up_dir(parent_of(path));
        let node = self.src[path].clone();
        let ent = match node.ent {
            SrcEnt::File { data, mode } => {
                let old = self.files.insert(node.ident, Body { data, mode });
                assert!(old.is_none(), "model: src object {path} copied up twice");
                UpEnt::File { ident: node.ident }
            }
            SrcEnt::Symlink { target } => UpEnt::Symlink {
                target,
                ident: node.ident,
            },
            SrcEnt::Dir { .. } => panic!("model: copy_up of dir {path}"),
        };
        self.up.insert(path.to_string(), ent);
    }

    /// Before a directory moves: its whole visible subtree into dst.
    fn copy_up_tree(&mut self, path: &str, merging: bool) {
        self.ensure_up_dir(path);
        if !merging {
            return;
        }
        let v = self.view(path).expect("visible");
        for name in self.list_gc(path, &v) {
            let child = join(path, &name);
            let cv = self.view(&child).expect("listed");
            if cv.layer == Layer::Up && !cv.merging {
                continue;
            }
            if cv.kind == K::Dir {
                self.copy_up_tree(&child, cv.merging);
            } else if cv.layer == Layer::Src {
                self.copy_up(&child);
            }
        }
    }

    /// An entry about to move (rename) is brought fully into dst.
    fn materialize(&mut self, path: &str, v: &V) {
        if v.kind == K::Dir {
            if v.layer == Layer::Src || v.merging {
                self.copy_up_tree(path, v.merging);
            }
        } else if v.layer == Layer::Src {
            self.copy_up(path);
        }
    }

    fn body_mut(&mut self, path: &str) -> &mut Body {
        let Some(UpEnt::File { ident }) = self.up.get(path) else {
            panic!("model: {path} is not a dst file");
        };
        self.files.get_mut(ident).expect("body")
    }

    /// The non-directory at `path` (visible as `v`) is in dst afterwards.
    fn ensure_in_up(&mut self, path: &str, v: &V) {
        if v.layer == Layer::Src {
            self.copy_up(path);
        }
    }

    // ----- steps ------------------------------------------------------------------

    pub fn apply(&mut self, op: &Op) -> Outcome {
        let r = match op {
            Op::Create(p, m) => self.create(p, UpKind::File(m.0)),
            Op::Mkdir(p, m) => self.create(p, UpKind::Dir(m.0)),
            Op::Symlink(p, t) => self.create(p, UpKind::Symlink(t)),
            Op::Write(p, off, data) => self.write(p, *off, data),
            Op::Truncate(p, size) => self.truncate(p, *size),
            Op::Chmod(p, m) => self.chmod(p, m.0),
            Op::Read(p) => self.read(p),
            Op::Unlink(p) => self.remove(p, false),
            Op::Rmdir(p) => self.remove(p, true),
            Op::Rename(a, b, f) => self.rename(a, b, *f),
            Op::Link(a, b) => self.link(a, b),
            op if op.is_src() && !self.src_change_fits(op) => Err(Outcome::Skip),
            Op::SrcWrite(p, data, m) => self.src_create(
                p,
                SrcEnt::File {
                    data: data.to_string(),
                    mode: m.0,
                },
            ),
            Op::SrcMkdir(p) => self.src_create(p, SrcEnt::Dir { mode: 0o755 }),
            Op::SrcSymlink(p, t) => self.src_create(
                p,
                SrcEnt::Symlink {
                    target: t.to_string(),
                },
            ),
            Op::SrcRemove(p) => self.src_remove(p),
            // Everything the view depends on is on disk.
            Op::Restart => Ok(Outcome::Ok),
        };
        r.unwrap_or_else(|o| o)
    }

    fn create(&mut self, path: &P, kind: UpKind) -> R<Outcome> {
        self.parent_dir(path)?;
        if is_reserved(path.name()) {
            return e(libc::EPERM);
        }
        if self.view(&path.0).is_ok() {
            return e(libc::EEXIST);
        }
        self.ensure_up_dir(path.parent());
        let had_whiteout = self.wh.remove(&path.0);
        let ident = self.new_ident();
        let ent = match kind {
            UpKind::File(mode) => {
                let mode = mode & !UMASK;
                self.files.insert(
                    ident,
                    Body {
                        data: String::new(),
                        mode,
                    },
                );
                UpEnt::File { ident }
            }
            UpKind::Dir(mode) => UpEnt::Dir {
                mode: mode & !UMASK,
                // rmdir + mkdir: src's old children must not reappear.
                opaque: had_whiteout,
                ident,
            },
            UpKind::Symlink(t) => UpEnt::Symlink {
                target: t.to_string(),
                ident,
            },
        };
        self.up.insert(path.0.clone(), ent);
        Ok(Outcome::Ok)
    }

    /// A path opened by an op that follows symlinks (the test never follows them).
    fn file_for_io(&self, path: &P) -> R<V> {
        let v = self.view(&path.0)?;
        match v.kind {
            K::Dir => e(libc::EISDIR),
            K::Symlink => Err(Outcome::Skip),
            K::File => Ok(v),
        }
    }

    fn write(&mut self, path: &P, off: u64, data: &str) -> R<Outcome> {
        let v = self.file_for_io(path)?;
        self.ensure_in_up(&path.0, &v);
        if data.is_empty() {
            // pwrite(2) of nothing changes nothing, not even the size.
            return Ok(Outcome::Ok);
        }
        let body = self.body_mut(&path.0);
        let mut bytes = std::mem::take(&mut body.data).into_bytes();
        let end = off as usize + data.len();
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        bytes[off as usize..end].copy_from_slice(data.as_bytes());
        body.data = String::from_utf8(bytes).expect("ascii");
        Ok(Outcome::Ok)
    }

    fn truncate(&mut self, path: &P, size: u64) -> R<Outcome> {
        let v = self.file_for_io(path)?;
        self.ensure_in_up(&path.0, &v);
        let body = self.body_mut(&path.0);
        let mut bytes = std::mem::take(&mut body.data).into_bytes();
        bytes.resize(size as usize, 0);
        body.data = String::from_utf8(bytes).expect("ascii");
        Ok(Outcome::Ok)
    }

    fn chmod(&mut self, path: &P, mode: u32) -> R<Outcome> {
        let v = self.view(&path.0)?;
        match v.kind {
            K::Symlink => return Err(Outcome::Skip),
            K::Dir => {
                self.ensure_up_dir(&path.0);
                match self.up.get_mut(&path.0) {
                    Some(UpEnt::Dir { mode: m, .. }) => *m = mode,
                    _ => unreachable!(),
                }
            }
            K::File => {
                self.ensure_in_up(&path.0, &v);
                self.body_mut(&path.0).mode = mode;
            }
        }
        Ok(Outcome::Ok)
    }

    fn read(&mut self, path: &P) -> R<Outcome> {
        let v = self.file_for_io(path)?;
        self.ensure_in_up(&path.0, &v);
        Ok(Outcome::Data(self.body_mut(&path.0).data.clone()))
    }

    /// Removes `path` and everything below it from dst, with the whiteouts below it.
    fn drop_up_tree(&mut self, path: &str) {
        self.up.retain(|k, _| k != path && !is_below(k, path));
        self.wh.retain(|k| !is_below(k, path));
        self.files_gc();
    }

    fn files_gc(&mut self) {
        let live: BTreeSet<u64> = self
            .up
            .values()
            .filter_map(|u| match u {
                UpEnt::File { ident } => Some(*ident),
                _ => None,
            })
            .collect();
        self.files.retain(|i, _| live.contains(i));
    }

    fn remove(&mut self, path: &P, dir: bool) -> R<Outcome> {
        let pv = self.parent_dir(path)?;
        let v = self.view(&path.0)?;
        match (dir, v.kind == K::Dir) {
            (true, false) => return e(libc::ENOTDIR),
            (false, true) => return e(libc::EISDIR),
            _ => {}
        }
        if dir && !self.list_gc(&path.0, &v).is_empty() {
            return e(libc::ENOTEMPTY);
        }
        let src_has = pv.merging && self.src.contains_key(&path.0);
        if src_has {
            self.ensure_up_dir(path.parent());
        }
        if v.layer == Layer::Up {
            self.drop_up_tree(&path.0);
        }
        if src_has {
            self.wh.insert(path.0.clone());
        }
        Ok(Outcome::Ok)
    }

    /// Moves the dst subtree at `from` (with its whiteouts) to `to`.
    fn move_up_tree(&mut self, from: &str, to: &str) {
        let moved: Vec<String> = self
            .up
            .keys()
            .filter(|k| *k == from || is_below(k, from))
            .cloned()
            .collect();
        let mut ents = Vec::new();
        for k in moved {
            let ent = self.up.remove(&k).unwrap();
            ents.push((format!("{to}{}", &k[from.len()..]), ent));
        }
        self.up.extend(ents);
        let moved: Vec<String> = self
            .wh
            .iter()
            .filter(|k| is_below(k, from))
            .cloned()
            .collect();
        for k in moved {
            self.wh.remove(&k);
            self.wh.insert(format!("{to}{}", &k[from.len()..]));
        }
    }

    fn set_opaque(&mut self, path: &str) {
        match self.up.get_mut(path) {
            Some(UpEnt::Dir { opaque, .. }) => *opaque = true,
            u => panic!("model: opaque on {u:?}"),
        }
    }

    fn rename(&mut self, from: &P, to: &P, flags: Flags) -> R<Outcome> {
        // What the kernel checks before the filesystem sees the call.
        let fpv = self.parent_dir(from)?;
        let tpv = self.parent_dir(to)?;
        let fv = self.view(&from.0)?;
        let tv = self.view(&to.0).ok();
        let exchange = flags == Flags::Exchange;
        if flags == Flags::NoReplace && tv.is_some() {
            return e(libc::EEXIST);
        }
        if exchange && tv.is_none() {
            return e(libc::ENOENT);
        }
        if is_below(&to.0, &from.0) {
            return e(libc::EINVAL);
        }
        if is_below(&from.0, &to.0) {
            return e(if exchange {
                libc::EINVAL
            } else {
                libc::ENOTEMPTY
            });
        }
        if let Some(t) = &tv {
            if t.ident == fv.ident {
                return Ok(Outcome::Ok);
            }
            if !exchange {
                match (fv.kind == K::Dir, t.kind == K::Dir) {
                    (true, false) => return e(libc::ENOTDIR),
                    (false, true) => return e(libc::EISDIR),
                    _ => {}
                }
            }
        }
        // The core.
        if is_reserved(to.name()) {
            return e(libc::EPERM);
        }
        if let Some(t) = &tv
            && !exchange
            && t.kind == K::Dir
            && !self.list_gc(&to.0, t).is_empty()
        {
            return e(libc::ENOTEMPTY);
        }
        self.materialize(&from.0, &fv);
        if exchange && let Some(t) = &tv {
            self.materialize(&to.0, t);
        }
        self.ensure_up_dir(to.parent());
        let from_in_src = fpv.merging && self.src.contains_key(&from.0);
        let to_in_src = tpv.merging && self.src.contains_key(&to.0);
        if exchange {
            let tmp = "\0exchange";
            self.move_up_tree(&from.0, tmp);
            self.move_up_tree(&to.0, &from.0);
            self.move_up_tree(tmp, &to.0);
        } else {
            if tv.is_some() {
                self.drop_up_tree(&to.0);
            }
            self.move_up_tree(&from.0, &to.0);
        }
        self.wh.remove(&to.0);
        if !exchange && from_in_src {
            self.wh.insert(from.0.clone());
        }
        if fv.kind == K::Dir && (to_in_src || from_in_src || tpv.merging) {
            self.set_opaque(&to.0);
        }
        if exchange && tv.is_some_and(|t| t.kind == K::Dir) {
            self.set_opaque(&from.0);
        }
        self.files_gc();
        Ok(Outcome::Ok)
    }

    fn link(&mut self, old: &P, new: &P) -> R<Outcome> {
        let ov = self.view(&old.0)?;
        self.parent_dir(new)?;
        if self.view(&new.0).is_ok() {
            return e(libc::EEXIST);
        }
        if ov.kind == K::Dir {
            return e(libc::EPERM);
        }
        if is_reserved(new.name()) {
            return e(libc::EPERM);
        }
        self.ensure_in_up(&old.0, &ov);
        self.ensure_up_dir(new.parent());
        self.wh.remove(&new.0);
        let ent = self.up[&old.0].clone();
        self.up.insert(new.0.clone(), ent);
        Ok(Outcome::Ok)
    }

    // ----- src changes --------------------------------------------------------------

    /// Whether src could take `path` (`mkdir -p` of the parent possible); creates the
    /// missing parents.
    fn src_parents(&mut self, path: &P) -> bool {
        let mut cur = String::new();
        let parent = path.parent();
        if parent.is_empty() {
            return true;
        }
        for comp in parent.split('/') {
            cur = join(&cur, comp);
            match self.src.get(&cur).map(|n| &n.ent) {
                Some(SrcEnt::Dir { .. }) => {}
                Some(_) => return false,
                None => {
                    let ident = self.new_ident();
                    self.src.insert(
                        cur.clone(),
                        SrcNode {
                            ent: SrcEnt::Dir { mode: 0o755 },
                            ident,
                        },
                    );
                }
            }
        }
        true
    }

    /// Whether a src change fits what src holds (the driver checks the same on disk).
    pub fn src_change_fits(&self, op: &Op) -> bool {
        let (path, overwrite_ok) = match op {
            Op::SrcWrite(p, ..) => (p, true),
            Op::SrcMkdir(p) | Op::SrcSymlink(p, _) => (p, false),
            Op::SrcRemove(p) => return self.src.contains_key(&p.0),
            _ => unreachable!(),
        };
        let mut cur = String::new();
        let parent = path.parent();
        if !parent.is_empty() {
            for comp in parent.split('/') {
                cur = join(&cur, comp);
                if let Some(n) = self.src.get(&cur)
                    && !matches!(n.ent, SrcEnt::Dir { .. })
                {
                    return false;
                }
            }
        }
        match self.src.get(&path.0).map(|n| &n.ent) {
            None => true,
            Some(SrcEnt::File { .. }) => overwrite_ok,
            Some(_) => false,
        }
    }

    fn src_create(&mut self, path: &P, ent: SrcEnt) -> R<Outcome> {
        assert!(self.src_parents(path));
        match self.src.get_mut(&path.0) {
            // Overwritten in place: the same object.
            Some(node) => node.ent = ent,
            None => {
                let ident = self.new_ident();
                self.src.insert(path.0.clone(), SrcNode { ent, ident });
            }
        }
        Ok(Outcome::Ok)
    }

    fn src_remove(&mut self, path: &P) -> R<Outcome> {
        self.src
            .retain(|k, _| k != &path.0 && !is_below(k, &path.0));
        Ok(Outcome::Ok)
    }
}

enum UpKind {
    File(u32),
    Dir(u32),
    Symlink(&'static str),
}
