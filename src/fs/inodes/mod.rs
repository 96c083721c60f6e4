//! Inode numbers of the mount, stable for the life of the mount.
//!
//! The table is a tree, as libfuse keeps it: a node stores its link (parent node + name),
//! not its path; full paths are built on demand by walking parents ([`Inodes::path`]).
//!
//! Invariants:
//! - Nodes live in a slab (`slots`); a node's inode number is its slot and the slot's
//!   generation, `gen << 32 | (slot + 1)`, so finding a node by number is an index,
//!   with no table (the root, slot 0 of generation 0, is [`ROOT`]). A slot is reused
//!   once its node is dropped, with its generation one higher, so an inode number is
//!   never reused and the kernel's generation number is always 0; a slot whose
//!   generation reaches `u32::MAX` is never reused. Numbers are dense (1, 2, 3, ...)
//!   until slots are reused, then above 2^32.
//! - Kernel references (`lookups`) are counted in a `u32`; a node whose count reaches
//!   `u32::MAX` keeps the exact count in `big_lookups` (a side table that is empty in
//!   practice).
//! - A node has at most one *primary* link (`parent`, `name`); `parent == NONE` means
//!   it has no link at all (unlinked, replaced, or inside a detached directory). Extra
//!   links (dst hard links; files only) live in `extra_links` / `extra_index`, in the
//!   order they were added; when the primary link goes, the first extra link becomes
//!   primary (it is the name used for path-based calls).
//! - `by_link` indexes every primary link by (parent slot, name). `children` of a node
//!   counts the links (primary and extra) whose parent it is; a node is dropped only
//!   when it has no link, no kernel reference and no linked child, so a parent stays
//!   while it has linked children.
//! - A node is reachable iff walking its primary parents ends at the root; only a
//!   reachable node has a path. Detaching a directory detaches every link below it
//!   (its descendants report no path; those the kernel still knows stay until forgotten).
//! - A node's number survives copy-up (src -> dst) and rename: rename moves one link (a
//!   directory's subtree follows by itself, it is a re-parent).
//! - Nodes the kernel has forgotten stay while a link reaches them (numbers stay
//!   stable); a node with no link left is dropped once the kernel forgets it.
//! - Hard links in dst: `by_dst_ident[(dev, ino)]` maps a dst inode to the one node that
//!   all its names share, so `st_ino` is the same through every link. The dst identity
//!   and the revalidation time are kept aside (`dst`) for the non-directory nodes that
//!   have them, so a src-only node costs nothing there.
//!
//! - Each directory keeps the nodes whose primary link is in it in an intrusive
//!   doubly-linked list (`first_child`, `next`, `prev`), for subtree walks.
//!
//! Memory: a node is one 56-byte slot (names of up to 22 bytes are stored inline, longer
//! ones in one allocation) plus one 4-byte `by_link` entry (and its control byte, at a
//! load factor between 7/16 and 7/8); the size is pinned by a unit test
//! (`a_node_is_small`). A walk of 1,000,000 entries peaks at ~74 MiB of daemon RSS
//! (~69 B per entry above the 100,000-entry walk's 14.5 MiB); the former table of full
//! paths took ~300 B per entry, the former tree with a counter and a number index ~117 B
//! (measured: see the commit log).
//!
//! Complexity: lookup by inode O(1); `ino_of(path)` and `path(ino)` O(depth); `upsert`,
//! `add_path`, `rename` (also of a directory: a re-parent) and `exchange` O(depth);
//! numbering a listing's entry (`number_entry`, after one `dir_slot`) O(1).
//! Detaching a directory that still has linked children and `clear_merge_below` cost
//! O(subtree + hard links) (extra links are found by a scan of `extra_index`).
//!
//! Locking: the table is guarded by one mutex in `CacheFs`; nothing here blocks or does I/O.
//!
//! Files: this one holds the types, the invariants and the public operations; `links`
//! holds the machinery they are built on (slots, the number index, linking and
//! unlinking, resolving paths, subtree walks).

mod links;

use hashbrown::HashTable;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::hash::RandomState;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use links::split;

/// The root directory's inode number (FUSE_ROOT_ID).
pub const ROOT: u64 = 1;

/// The root's slot.
const ROOT_SLOT: u32 = 0;
/// "No parent": a node without a (primary) link.
const NONE: u32 = u32::MAX;
/// Deeper than any real path (PATH_MAX allows 2048 components): a guard against cycles.
const MAX_DEPTH: usize = 4096;

/// What kind of object a node is; a node never changes kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

impl Kind {
    pub(crate) fn from_mode(mode: u32) -> Kind {
        match mode & libc::S_IFMT {
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFREG => Kind::File,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDevice,
            libc::S_IFBLK => Kind::BlockDevice,
            // Unknown types are shown as regular files (never happens on Linux).
            _ => Kind::File,
        }
    }
}

/// A name of one directory entry: up to 22 bytes inline (no allocation), else boxed.
/// The representation is canonical (inline iff short), so derived `Eq`/`Hash` are sound.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Name {
    Inline(u8, [u8; 22]),
    Heap(Box<[u8]>),
}

impl Name {
    fn new(b: &[u8]) -> Name {
        if b.len() <= 22 {
            let mut buf = [0u8; 22];
            buf[..b.len()].copy_from_slice(b);
            Name::Inline(b.len() as u8, buf)
        } else {
            Name::Heap(b.into())
        }
    }

    fn empty() -> Name {
        Name::Inline(0, [0; 22])
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            Name::Inline(len, buf) => &buf[..*len as usize],
            Name::Heap(b) => b,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Node {
    /// The slot's generation: the high half of the inode number.
    generation: u32,
    /// Kernel references (lookups not yet forgotten); `u32::MAX`: see `big_lookups`.
    lookups: u32,
    /// The primary link's name (empty without a link).
    name: Name,
    /// The primary link's parent slot, or `NONE`.
    parent: u32,
    /// Links (primary or extra) whose parent is this node.
    children: u32,
    /// The list of nodes whose primary link is in this directory: its head, and this
    /// node's neighbours in its parent's list (`NONE` at the ends).
    first_child: u32,
    next: u32,
    prev: u32,
    pub(crate) kind: Kind,
    /// Directories: whether src is consulted for this directory's children.
    pub(crate) merge_src: bool,
    /// Whether `extra_links` has an entry for this node.
    more_links: bool,
}

#[derive(Debug)]
enum Slot {
    Used(Node),
    /// A free slot: the next free one (or `NONE`), and the generation of the node it
    /// held last.
    Free {
        next: u32,
        generation: u32,
    },
}

/// Kept aside for the (non-directory) nodes that live in dst or were revalidated.
#[derive(Debug, Default, Clone, Copy)]
struct DstInfo {
    /// Identity of the dst object, for hard-link sharing.
    ident: Option<(u64, u64)>,
    /// Files: when the cached copy was last compared with src (revalidation).
    checked: Option<Instant>,
}

/// A directory's slot, for numbering a listing's entries (see [`Inodes::dir_slot`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct DirSlot(u32);

/// Where one link of a node is: its primary link or its `i`th extra link.
#[derive(Debug, Clone, Copy)]
enum LinkPos {
    Primary,
    Extra(usize),
}

#[derive(Debug)]
pub(crate) struct Inodes {
    slots: Vec<Slot>,
    /// Head of the free slot list, or `NONE`.
    free: u32,
    /// Slots by primary link (parent slot, name).
    by_link: HashTable<u32>,
    /// Extra links (parent slot, name) of hard-linked nodes, by slot, in order added.
    extra_links: HashMap<u32, Vec<(u32, Name)>>,
    /// Slots by extra link.
    extra_index: HashMap<(u32, Name), u32>,
    dst: HashMap<u32, DstInfo>,
    by_dst_ident: HashMap<(u64, u64), u32>,
    /// Exact kernel references of the nodes whose `lookups` is `u32::MAX`, by slot.
    big_lookups: HashMap<u32, u64>,
    hasher: RandomState,
    live: usize,
    /// Names `upsert` linked anew (a name not in the table, or one that now names
    /// another object): the caller compares it before and after (see `relinks`).
    relinks: u64,
}

impl Default for Inodes {
    fn default() -> Self {
        Self::new()
    }
}

impl Inodes {
    pub(crate) fn new() -> Inodes {
        let root = Node {
            generation: 0,
            lookups: 1,
            name: Name::empty(),
            parent: NONE,
            children: 0,
            first_child: NONE,
            next: NONE,
            prev: NONE,
            kind: Kind::Dir,
            merge_src: true,
            more_links: false,
        };
        Inodes {
            slots: vec![Slot::Used(root)],
            free: NONE,
            by_link: HashTable::new(),
            extra_links: HashMap::new(),
            extra_index: HashMap::new(),
            dst: HashMap::new(),
            by_dst_ident: HashMap::new(),
            big_lookups: HashMap::new(),
            hasher: RandomState::new(),
            live: 1,
            relinks: 0,
        }
    }

    // ----- the public operations ------------------------------------------------------

    pub(crate) fn get(&self, ino: u64) -> Option<&Node> {
        self.slot_of(ino).map(|s| self.node(s))
    }

    pub(crate) fn get_mut(&mut self, ino: u64) -> Option<&mut Node> {
        self.slot_of(ino).map(|s| self.node_mut(s))
    }

    pub(crate) fn ino_of(&self, path: &Path) -> Option<u64> {
        self.resolve(path).map(|s| self.ino_at(s))
    }

    /// The path of slot `s` through its primary links, or `None` if it is unreachable.
    fn slot_path(&self, s: u32) -> Option<PathBuf> {
        let mut names: Vec<&[u8]> = Vec::new();
        let mut x = s;
        while x != ROOT_SLOT {
            let n = self.node(x);
            if n.parent == NONE || names.len() >= MAX_DEPTH {
                return None;
            }
            names.push(n.name.as_bytes());
            x = n.parent;
        }
        let mut p = PathBuf::with_capacity(names.iter().map(|n| n.len() + 1).sum());
        for name in names.iter().rev() {
            p.push(OsStr::from_bytes(name));
        }
        Some(p)
    }

    /// The path used for path-based calls, or `None` once every name is gone (or the
    /// node is inside a detached directory). The root's path is "".
    pub(crate) fn path(&self, ino: u64) -> Option<PathBuf> {
        self.slot_path(self.slot_of(ino)?)
    }

    /// Every path of `ino`: the one used for path-based calls first, then the other
    /// names (hard links) in the order they were added.
    pub(crate) fn paths(&self, ino: u64) -> Vec<PathBuf> {
        let Some(s) = self.slot_of(ino) else {
            return Vec::new();
        };
        let mut out: Vec<PathBuf> = self.slot_path(s).into_iter().collect();
        for (p, name) in self.extra_links.get(&s).into_iter().flatten() {
            if let Some(dir) = self.slot_path(*p) {
                out.push(dir.join(OsStr::from_bytes(name.as_bytes())));
            }
        }
        out
    }

    fn ident_of(&self, s: u32) -> Option<(u64, u64)> {
        self.dst.get(&s).and_then(|d| d.ident)
    }

    /// Records slot `s` (a non-directory) as dst object `id`: its hard links join it.
    fn index_ident(&mut self, s: u32, id: (u64, u64)) {
        self.dst.entry(s).or_default().ident = Some(id);
        self.by_dst_ident.insert(id, s);
    }

    /// Where a new name of slot `s` goes: its primary link if it has none, else after
    /// its other names.
    fn new_link_pos(&self, s: u32) -> LinkPos {
        if self.node(s).parent == NONE {
            LinkPos::Primary
        } else {
            LinkPos::Extra(usize::MAX)
        }
    }

    /// The node for `path` as just found on disk, creating it if needed, and adding
    /// `lookups` kernel references. A node of another kind at that path (replaced behind
    /// our back) is detached first; a dst hard link of a known node joins that node.
    pub(crate) fn upsert(
        &mut self,
        path: &Path,
        kind: Kind,
        merge_src: bool,
        dst_ident: Option<(u64, u64)>,
        lookups: u64,
    ) -> u64 {
        let Some((dir, name)) = split(path) else {
            // The root (or a path that names no entry): the root node.
            self.add_lookups(ROOT_SLOT, lookups);
            self.node_mut(ROOT_SLOT).merge_src = merge_src;
            return ROOT;
        };
        let Some(parent) = self.resolve_dir(dir) else {
            // Below a non-directory (never so for a path the kernel names): no link.
            let s = self.alloc(kind, merge_src, lookups);
            let ino = self.ino_at(s);
            self.settle(s);
            return ino;
        };
        self.upsert_in(parent, name, kind, merge_src, dst_ident, lookups)
    }

    /// Directory `dir`, resolved once for [`Inodes::number_entry`] calls on its entries
    /// (the table may not change in between: hold its lock). `None` below a
    /// non-directory.
    pub(crate) fn dir_slot(&mut self, dir: &Path) -> Option<DirSlot> {
        self.resolve_dir(dir).map(DirSlot)
    }

    /// The number a listing of `dir` shows for its entry `name` of kind `kind`: the
    /// node linked there if it is of that kind, else [`Inodes::upsert`]'s (with no
    /// kernel reference). The same as `ino_of` then `upsert` of `dir/name`, without
    /// resolving `dir` again.
    pub(crate) fn number_entry(
        &mut self,
        dir: DirSlot,
        name: &OsStr,
        kind: Kind,
        merge_src: bool,
        dst_ident: Option<(u64, u64)>,
    ) -> u64 {
        let name = name.as_bytes();
        if let Some(s) = self.child(dir.0, name)
            && self.node(s).kind == kind
        {
            return self.ino_at(s);
        }
        self.upsert_in(dir.0, name, kind, merge_src, dst_ident, 0)
    }

    /// [`Inodes::upsert`] of `name` in directory slot `parent`.
    fn upsert_in(
        &mut self,
        parent: u32,
        name: &[u8],
        kind: Kind,
        merge_src: bool,
        dst_ident: Option<(u64, u64)>,
        lookups: u64,
    ) -> u64 {
        if let Some(s) = self.child(parent, name) {
            let same_object = match (self.ident_of(s), dst_ident) {
                (Some(a), Some(b)) => a == b || kind == Kind::Dir,
                _ => true,
            };
            if self.node(s).kind == kind && same_object {
                self.add_lookups(s, lookups);
                self.node_mut(s).merge_src = merge_src;
                let ino = self.ino_at(s);
                // A directory's dst identity is never used (no hard links): not kept.
                if kind != Kind::Dir
                    && self.ident_of(s).is_none()
                    && let Some(id) = dst_ident
                {
                    self.index_ident(s, id);
                }
                return ino;
            }
            self.detach_at(parent, name);
        }
        self.relinks += 1;
        if kind != Kind::Dir
            && let Some(id) = dst_ident
            && let Some(s) = self.by_dst_ident.get(&id).copied()
        {
            self.add_lookups(s, lookups);
            self.link(s, self.new_link_pos(s), parent, Name::new(name));
            return self.ino_at(s);
        }
        let s = self.alloc(kind, merge_src, lookups);
        self.link(s, LinkPos::Primary, parent, Name::new(name));
        if kind != Kind::Dir
            && let Some(id) = dst_ident
        {
            self.index_ident(s, id);
        }
        self.ino_at(s)
    }

    /// How many names [`Inodes::upsert`] has linked anew so far: a lookup that changes
    /// it found a name the table (and so the directory's last listing) did not have.
    pub(crate) fn relinks(&self) -> u64 {
        self.relinks
    }

    /// Records that `ino` now lives in dst as `ident` (after a copy-up).
    pub(crate) fn set_dst_ident(&mut self, ino: u64, ident: (u64, u64)) {
        let Some(s) = self.slot_of(ino) else {
            return;
        };
        if let Some(old) = self.ident_of(s)
            && self.by_dst_ident.get(&old) == Some(&s)
        {
            self.by_dst_ident.remove(&old);
        }
        if self.node(s).kind != Kind::Dir {
            self.index_ident(s, ident);
        }
    }

    /// `ino` no longer lives in dst (evicted): it is src-backed again.
    pub(crate) fn clear_dst_ident(&mut self, ino: u64) {
        let Some(s) = self.slot_of(ino) else {
            return;
        };
        if let Some(d) = self.dst.get_mut(&s)
            && let Some(old) = d.ident.take()
        {
            if d.checked.is_none() {
                self.dst.remove(&s);
            }
            if self.by_dst_ident.get(&old) == Some(&s) {
                self.by_dst_ident.remove(&old);
            }
        }
    }

    /// Notes that `ino`'s cached copy was compared with src just now.
    pub(crate) fn mark_checked(&mut self, ino: u64) {
        if let Some(s) = self.slot_of(ino) {
            self.dst.entry(s).or_default().checked = Some(Instant::now());
        }
    }

    /// Forgets every "compared with src" time (a revalidation asked for now; the
    /// origin store's verified times decide which files are really asked again).
    pub(crate) fn uncheck_all(&mut self) {
        for d in self.dst.values_mut() {
            d.checked = None;
        }
    }

    /// Whether `ino`'s cached copy was compared with src less than `within` ago.
    pub(crate) fn checked_within(&self, ino: u64, within: Duration) -> bool {
        self.slot_of(ino)
            .and_then(|s| self.dst.get(&s))
            .and_then(|d| d.checked)
            .is_some_and(|c| c.elapsed() < within)
    }

    /// Adds a name to an existing node (hard link).
    pub(crate) fn add_path(&mut self, ino: u64, path: &Path) {
        self.detach_path(path);
        let (Some(s), Some((dir, name))) = (self.slot_of(ino), split(path)) else {
            return;
        };
        let Some(parent) = self.resolve_dir(dir) else {
            return;
        };
        if parent == s || self.is_below(parent, s) {
            return; // a directory into its own subtree
        }
        self.link(s, self.new_link_pos(s), parent, Name::new(name));
    }

    /// The name `path` is gone (unlink, rmdir, replaced by rename). Descendants of a
    /// removed directory lose their links too.
    pub(crate) fn detach_path(&mut self, path: &Path) {
        if let Some((dir, name)) = split(path)
            && let Some(parent) = self.resolve(dir)
        {
            self.detach_at(parent, name);
        }
    }

    /// Renames `from` to `to` (replacing whatever `to` named): the node keeps its number,
    /// and a directory's descendants move with it.
    pub(crate) fn rename(&mut self, from: &Path, to: &Path) {
        let Some((fdir, fname)) = split(from) else {
            return;
        };
        let Some(fparent) = self.resolve(fdir) else {
            return;
        };
        let Some(s) = self.child(fparent, fname) else {
            return;
        };
        let Some((tdir, tname)) = split(to) else {
            return;
        };
        let Some(tparent) = self.resolve_dir(tdir) else {
            return;
        };
        if tparent == s || self.is_below(tparent, s) {
            return; // into itself (the kernel refuses this: EINVAL)
        }
        if (tparent, tname) == (fparent, fname) {
            return;
        }
        if let Some(t) = self.child(tparent, tname)
            && self.is_below(s, t)
        {
            return; // over one of its own ancestors (the kernel refuses this)
        }
        self.detach_at(tparent, tname);
        let Some(pos) = self.link_pos(s, fparent, fname) else {
            return;
        };
        self.unindex(s, pos);
        self.node_mut(fparent).children -= 1;
        self.link(s, pos, tparent, Name::new(tname));
    }

    /// RENAME_EXCHANGE: `a` and `b` swap places (with their descendants).
    pub(crate) fn exchange(&mut self, a: &Path, b: &Path) {
        let here = |t: &Self, p: &Path| -> Option<(u32, Name, u32)> {
            let (dir, name) = split(p)?;
            let parent = t.resolve(dir)?;
            Some((parent, Name::new(name), t.child(parent, name)?))
        };
        match (here(self, a), here(self, b)) {
            (Some(_), None) => self.rename(a, b),
            (None, Some(_)) => self.rename(b, a),
            (Some((ap, an, sa)), Some((bp, bn, sb))) => {
                if sa == sb && (ap, &an) == (bp, &bn) {
                    return;
                }
                if self.is_below(bp, sa) || self.is_below(ap, sb) || bp == sa || ap == sb {
                    return; // one inside the other (the kernel refuses this: EINVAL)
                }
                if sa == sb {
                    // Two names of one node: they trade places in its list of links.
                    let idx = |pos| match pos {
                        LinkPos::Primary => 0,
                        LinkPos::Extra(i) => i + 1,
                    };
                    let (Some(pa), Some(pb)) = (
                        self.link_pos(sa, ap, an.as_bytes()),
                        self.link_pos(sa, bp, bn.as_bytes()),
                    ) else {
                        return;
                    };
                    let mut links = self.take_links(sa);
                    links.swap(idx(pa), idx(pb));
                    for (p, name) in links {
                        self.link(sa, self.new_link_pos(sa), p, name);
                    }
                    return;
                }
                let (Some(pa), Some(pb)) = (
                    self.link_pos(sa, ap, an.as_bytes()),
                    self.link_pos(sb, bp, bn.as_bytes()),
                ) else {
                    return;
                };
                self.unindex(sa, pa);
                self.unindex(sb, pb);
                self.node_mut(ap).children -= 1;
                self.node_mut(bp).children -= 1;
                self.link(sa, pa, bp, bn);
                self.link(sb, pb, ap, an);
            }
            (None, None) => {}
        }
    }

    /// No directory at or below `dir` consults src any more (it moved, complete, in dst).
    pub(crate) fn clear_merge_below(&mut self, dir: &Path) {
        let Some(top) = self.resolve(dir) else {
            return;
        };
        self.node_mut(top).merge_src = false;
        if self.node(top).children == 0 {
            return;
        }
        let below: Vec<u32> = self
            .links_below(top)
            .into_iter()
            .map(|(s, _, _)| s)
            .collect();
        for s in below {
            self.node_mut(s).merge_src = false;
        }
    }

    /// The kernel dropped `n` references.
    pub(crate) fn forget(&mut self, ino: u64, n: u64) {
        if ino == ROOT {
            return;
        }
        if let Some(s) = self.slot_of(ino) {
            self.sub_lookups(s, n);
            self.settle(s);
        }
    }

    /// Number of nodes.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.live
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks the table's invariants (see the module docs).
    fn check(t: &Inodes) {
        let mut count = 0;
        for (i, slot) in t.slots.iter().enumerate() {
            let Slot::Used(n) = slot else { continue };
            let s = i as u32;
            count += 1;
            assert_eq!(t.slot_of(t.ino_at(s)), Some(s));
            assert_eq!(n.generation, t.node(s).generation);
            assert_eq!(n.lookups == u32::MAX, t.big_lookups.contains_key(&s));
            let mut links = 0;
            let mut c = n.first_child;
            let mut prev = NONE;
            while c != NONE {
                let k = t.node(c);
                assert_eq!((k.parent, k.prev), (s, prev));
                links += 1;
                (prev, c) = (c, k.next);
            }
            links += t.extra_index.keys().filter(|(p, _)| *p == s).count();
            assert_eq!(n.children as usize, links, "children of slot {s}");
            if n.parent != NONE {
                assert_eq!(t.child(n.parent, n.name.as_bytes()), Some(s));
            } else {
                assert!(!n.more_links);
                assert!(s == ROOT_SLOT || t.lookups(s) > 0 || n.children > 0);
            }
            assert_eq!(n.more_links, t.extra_links.contains_key(&s));
        }
        assert_eq!(count, t.len());
        // The free list holds free slots only, each once.
        let mut free = 0;
        let mut f = t.free;
        while f != NONE {
            let Slot::Free { next, generation } = t.slots[f as usize] else {
                panic!("free list at used slot {f}");
            };
            assert!(generation < u32::MAX, "a retired slot is never reused");
            free += 1;
            f = next;
        }
        assert!(count + free <= t.slots.len());
        let primary = t
            .slots
            .iter()
            .filter(|x| matches!(x, Slot::Used(n) if n.parent != NONE));
        assert_eq!(t.by_link.len(), primary.count());
        let extra: usize = t.extra_links.values().map(Vec::len).sum();
        assert_eq!(t.extra_index.len(), extra);
        for (id, &s) in &t.by_dst_ident {
            assert_eq!(t.dst.get(&s).and_then(|d| d.ident), Some(*id));
            assert!(t.node(s).parent != NONE || t.lookups(s) > 0);
        }
    }

    fn p(s: &str) -> &Path {
        Path::new(s)
    }

    #[test]
    fn numbers_survive_copy_up_and_rename() {
        let mut t = Inodes::new();
        let d = t.upsert(p("d"), Kind::Dir, true, None, 1);
        let f = t.upsert(p("d/f"), Kind::File, true, None, 1);
        t.set_dst_ident(f, (1, 100));
        assert_eq!(t.upsert(p("d/f"), Kind::File, true, Some((1, 100)), 1), f);
        t.rename(p("d"), p("e"));
        assert_eq!(t.ino_of(p("e")), Some(d));
        assert_eq!(t.ino_of(p("e/f")), Some(f));
        assert_eq!(t.ino_of(p("d/f")), None);
        assert_eq!(t.path(f).as_deref(), Some(p("e/f")));
        t.rename(p("e/f"), p("g"));
        // Exactly "g", not "g/" (which opens as ENOTDIR for a file).
        assert_eq!(t.path(f).unwrap().as_os_str(), "g");
        check(&t);
    }

    #[test]
    fn hard_links_share_one_node() {
        let mut t = Inodes::new();
        let a = t.upsert(p("a"), Kind::File, true, Some((1, 7)), 1);
        let b = t.upsert(p("b"), Kind::File, true, Some((1, 7)), 1);
        assert_eq!(a, b);
        t.detach_path(p("a"));
        assert_eq!(t.path(a).as_deref(), Some(p("b")));
        check(&t);
    }

    #[test]
    fn replaced_kind_gets_new_number_and_forget_drops_orphans() {
        let mut t = Inodes::new();
        let f = t.upsert(p("x"), Kind::File, true, None, 1);
        let d = t.upsert(p("x"), Kind::Dir, true, None, 1);
        assert_ne!(f, d);
        assert!(t.get(f).is_some());
        t.forget(f, 1);
        assert!(t.get(f).is_none());
        t.forget(d, 1);
        assert!(t.get(d).is_some(), "still reachable by path: number kept");
        check(&t);
    }

    #[test]
    fn subtree_is_exactly_the_descendants() {
        let mut t = Inodes::new();
        for path in ["a", "a/b", "a/b/c", "a/b0", "a/bc", "a/b/c/d", "ab"] {
            t.upsert(p(path), Kind::Dir, true, None, 1);
        }
        let top = t.resolve(p("a/b")).unwrap();
        let mut got: Vec<_> = t
            .links_below(top)
            .into_iter()
            .map(|(s, _, _)| t.slot_path(s).unwrap())
            .collect();
        got.sort();
        assert_eq!(got, [p("a/b/c"), p("a/b/c/d")]);
        t.rename(p("a/b"), p("z"));
        assert!(t.ino_of(p("z/c/d")).is_some() && t.ino_of(p("a/b0")).is_some());
        check(&t);
    }

    #[test]
    fn exchange_swaps_subtrees() {
        let mut t = Inodes::new();
        let a = t.upsert(p("a"), Kind::Dir, true, None, 1);
        let ac = t.upsert(p("a/c"), Kind::File, true, None, 1);
        let b = t.upsert(p("b"), Kind::File, true, None, 1);
        t.exchange(p("a"), p("b"));
        assert_eq!(t.ino_of(p("b")), Some(a));
        assert_eq!(t.ino_of(p("b/c")), Some(ac));
        assert_eq!(t.ino_of(p("a")), Some(b));
        check(&t);
    }

    #[test]
    fn rename_of_a_directory_is_a_reparent() {
        let mut t = Inodes::new();
        let a = t.upsert(p("a"), Kind::Dir, true, None, 1);
        let b = t.upsert(p("a/b"), Kind::Dir, true, None, 0);
        let f = t.upsert(p("a/b/f"), Kind::File, true, None, 0);
        let x = t.upsert(p("x"), Kind::Dir, true, None, 1);
        t.rename(p("a/b"), p("x/y"));
        assert_eq!(t.path(f).as_deref(), Some(p("x/y/f")));
        assert_eq!(t.ino_of(p("x/y/f")), Some(f));
        assert_eq!(t.ino_of(p("x/y")), Some(b));
        assert_eq!(t.ino_of(p("a/b")), None);
        assert_eq!(t.ino_of(p("a/b/f")), None);
        // Forgotten nodes keep their numbers while a path reaches them.
        t.forget(a, 1);
        t.forget(x, 1);
        assert_eq!(t.ino_of(p("x/y/f")), Some(f));
        assert_eq!(t.ino_of(p("a")), Some(a));
        // Into its own subtree: refused, nothing moves.
        t.rename(p("x"), p("x/y/z"));
        assert_eq!(t.path(x).as_deref(), Some(p("x")));
        assert_eq!(t.path(f).as_deref(), Some(p("x/y/f")));
        assert_eq!(t.len(), 5);
        check(&t);
    }

    #[test]
    fn a_detached_directory_takes_its_subtree_along() {
        let mut t = Inodes::new();
        let d = t.upsert(p("d"), Kind::Dir, true, None, 1);
        let e = t.upsert(p("d/e"), Kind::Dir, true, None, 0);
        let f = t.upsert(p("d/e/f"), Kind::File, true, None, 1); // the kernel holds it
        let g = t.upsert(p("d/e/g"), Kind::File, true, None, 0);
        let len = t.len();
        // Replaced behind our back by a file: the directory and all below it detach.
        let d2 = t.upsert(p("d"), Kind::File, true, None, 1);
        assert_ne!(d2, d);
        for i in [d, f] {
            assert!(t.get(i).is_some(), "the kernel still knows {i}");
            assert_eq!(t.path(i), None);
        }
        for i in [e, g] {
            assert!(t.get(i).is_none(), "{i} is unreferenced and unreachable");
        }
        assert_eq!(t.ino_of(p("d/e/f")), None);
        assert_eq!(t.len(), len - 2 + 1);
        t.forget(f, 1);
        t.forget(d, 1);
        assert!(t.get(f).is_none() && t.get(d).is_none());
        assert_eq!(t.len(), 2);
        // Numbers are never reused (slots are).
        let h = t.upsert(p("h"), Kind::File, true, None, 0);
        assert!(![d, e, f, g, d2].contains(&h));
        check(&t);
    }

    #[test]
    fn a_parent_stays_while_it_has_linked_children() {
        let mut t = Inodes::new();
        let d = t.upsert(p("d"), Kind::Dir, true, None, 1);
        let f = t.upsert(p("d/f"), Kind::File, true, None, 1);
        t.forget(d, 1);
        assert_eq!(t.ino_of(p("d")), Some(d));
        // Unlinking the child leaves the (still linked) parent alone.
        t.detach_path(p("d/f"));
        assert!(t.get(f).is_some() && t.path(f).is_none());
        assert_eq!(t.ino_of(p("d")), Some(d));
        t.forget(f, 1);
        assert!(t.get(f).is_none());
        t.detach_path(p("d"));
        assert!(t.get(d).is_none());
        assert_eq!(t.len(), 1);
        check(&t);
    }

    #[test]
    fn hard_links_keep_their_order_through_unlink_rename_and_exchange() {
        let mut t = Inodes::new();
        t.upsert(p("d"), Kind::Dir, true, None, 1);
        let a = t.upsert(p("a"), Kind::File, true, Some((1, 7)), 1);
        t.add_path(a, p("d/b"));
        assert_eq!(t.upsert(p("c"), Kind::File, true, Some((1, 7)), 1), a);
        assert_eq!(t.paths(a), [p("a"), p("d/b"), p("c")]);
        assert_eq!(t.ino_of(p("d/b")), Some(a));
        // An extra link renames in place.
        t.rename(p("d/b"), p("d/b2"));
        assert_eq!(t.paths(a), [p("a"), p("d/b2"), p("c")]);
        // Exchanging two names of one file swaps them in the list.
        t.exchange(p("a"), p("c"));
        assert_eq!(t.paths(a), [p("c"), p("d/b2"), p("a")]);
        // The primary name goes: the next one is used for path-based calls.
        t.detach_path(p("c"));
        assert_eq!(t.path(a).as_deref(), Some(p("d/b2")));
        assert_eq!(t.paths(a), [p("d/b2"), p("a")]);
        // A directory holding a link goes: that link goes with it, the file stays.
        t.detach_path(p("d"));
        assert_eq!(t.paths(a), [p("a")]);
        t.detach_path(p("a"));
        assert!(t.paths(a).is_empty());
        // Unlinked but still open: its dst inode number now names another file.
        let other = t.upsert(p("n"), Kind::File, true, Some((1, 7)), 1);
        assert_ne!(other, a);
        t.forget(a, 3);
        assert!(t.get(a).is_none());
        assert_eq!(
            t.len(),
            3,
            "root, n, and the detached d the kernel still knows"
        );
        check(&t);
    }

    #[test]
    fn exchange_of_a_directory_and_a_missing_name_is_a_rename() {
        let mut t = Inodes::new();
        let a = t.upsert(p("a"), Kind::Dir, true, None, 1);
        let f = t.upsert(p("a/f"), Kind::File, true, None, 1);
        t.exchange(p("a"), p("b"));
        assert_eq!(t.path(a).as_deref(), Some(p("b")));
        assert_eq!(t.path(f).as_deref(), Some(p("b/f")));
        t.clear_merge_below(p("b"));
        assert!(!t.get(a).unwrap().merge_src && !t.get(f).unwrap().merge_src);
        check(&t);
    }

    #[test]
    fn long_names_and_checked_times() {
        let mut t = Inodes::new();
        let long = "x".repeat(200);
        let f = t.upsert(Path::new(&long), Kind::File, true, None, 1);
        assert_eq!(t.ino_of(Path::new(&long)), Some(f));
        assert_eq!(t.path(f).unwrap().as_os_str(), long.as_str());
        assert!(!t.checked_within(f, Duration::from_secs(60)));
        t.mark_checked(f);
        assert!(t.checked_within(f, Duration::from_secs(60)));
        assert!(!t.checked_within(f, Duration::ZERO));
        check(&t);
    }

    /// The per-entry cost of the table (see the module docs): pinned, so that it cannot
    /// grow silently. A new field belongs in a side table used only by the nodes that
    /// need it (as `dst` and `big_lookups` are).
    #[test]
    fn a_node_is_small() {
        assert_eq!(std::mem::size_of::<Name>(), 24);
        assert_eq!(std::mem::size_of::<Node>(), 56);
        assert_eq!(std::mem::size_of::<Slot>(), 56);
    }

    #[test]
    fn numbers_are_slots_and_generations_and_never_reused() {
        let mut t = Inodes::new();
        let mut seen = std::collections::HashSet::new();
        for round in 0..5 {
            let f = t.upsert(p("f"), Kind::File, true, None, 1);
            assert!(seen.insert(f), "number {f} given twice");
            assert_eq!(f >> 32, round, "slot reused with the next generation");
            assert_eq!(t.slot_of(f), Some(1));
            t.detach_path(p("f"));
            t.forget(f, 1);
            assert!(t.get(f).is_none() && t.slot_of(f).is_none());
            check(&t);
        }
        // Not a number of this table: low half 0, a slot out of range, a generation ahead.
        for ino in [0, 1 << 32, 1000, (7 << 32) | 2] {
            assert!(t.get(ino).is_none(), "{ino:#x}");
        }
        // A slot whose generation is used up is never handed out again.
        let g = t.upsert(p("g"), Kind::File, true, None, 1);
        let s = t.slot_of(g).unwrap();
        t.node_mut(s).generation = u32::MAX;
        let g = t.ino_at(s);
        assert_eq!(t.get(g).map(|n| n.kind), Some(Kind::File));
        t.detach_path(p("g"));
        t.forget(g, 1);
        assert!(t.get(g).is_none());
        let h = t.upsert(p("h"), Kind::File, true, None, 1);
        assert_ne!(t.slot_of(h), Some(s));
        check(&t);
    }

    #[test]
    fn reference_counts_beyond_u32_are_exact() {
        let mut t = Inodes::new();
        let f = t.upsert(p("f"), Kind::File, true, None, u64::from(u32::MAX) - 1);
        assert!(t.big_lookups.is_empty());
        t.upsert(p("f"), Kind::File, true, None, 3);
        let s = t.slot_of(f).unwrap();
        assert_eq!(t.lookups(s), u64::from(u32::MAX) + 2);
        check(&t);
        t.forget(f, 3);
        assert_eq!(t.lookups(s), u64::from(u32::MAX) - 1);
        assert!(t.big_lookups.is_empty());
        t.detach_path(p("f"));
        t.forget(f, u64::from(u32::MAX) - 2);
        assert!(t.get(f).is_some(), "one reference left");
        t.forget(f, 1);
        assert!(t.get(f).is_none());
        check(&t);
    }

    /// Random operations on a small namespace keep the invariants, and every node's
    /// paths lead back to it.
    #[test]
    fn random_operations_keep_the_invariants() {
        for seed in 1..=8 {
            random_operations(0x2545_F491_4F6C_DD1D_u64.wrapping_mul(seed));
        }
    }

    fn random_operations(mut seed: u64) {
        let mut rnd = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let names = [
            "a", "b", "a/b", "a/c", "b/a", "a/b/c", "b/a/c", "c", "a/b/d",
        ];
        let mut t = Inodes::new();
        let mut known: Vec<u64> = Vec::new();
        for _ in 0..3_000 {
            let path = p(names[rnd(names.len() as u64) as usize]);
            let other = p(names[rnd(names.len() as u64) as usize]);
            match rnd(9) {
                0 | 1 => {
                    let kind = if rnd(2) == 0 { Kind::Dir } else { Kind::File };
                    let id = (rnd(2) == 0).then(|| (1, rnd(4)));
                    let ino = t.upsert(path, kind, true, id, rnd(2));
                    if !known.contains(&ino) {
                        known.push(ino);
                    }
                }
                2 => t.detach_path(path),
                3 => {
                    if !other.starts_with(path) && !path.starts_with(other) {
                        t.detach_path(other);
                        t.rename(path, other);
                    }
                }
                4 => {
                    if !other.starts_with(path) && !path.starts_with(other) {
                        t.exchange(path, other);
                    }
                }
                5 => {
                    if let Some(ino) = t.ino_of(path)
                        && t.get(ino).unwrap().kind == Kind::File
                    {
                        t.add_path(ino, other);
                    }
                }
                6 => {
                    if let Some(&ino) = known.get(rnd(known.len() as u64 + 1) as usize) {
                        t.forget(ino, 1);
                    }
                }
                7 => t.clear_merge_below(path),
                _ => {
                    if let Some(ino) = t.ino_of(path) {
                        if rnd(2) == 0 {
                            t.set_dst_ident(ino, (1, rnd(4)));
                        } else {
                            t.clear_dst_ident(ino);
                        }
                    }
                }
            }
            check(&t);
            for &ino in &known {
                for q in t.paths(ino) {
                    assert_eq!(t.ino_of(&q), Some(ino), "{}", q.display());
                }
            }
        }
    }
}
