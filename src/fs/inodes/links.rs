//! The table's machinery below the public operations: the slab of slots and the
//! inode numbers they carry (`slots`, `free`, kernel reference counts), and the links that make the tree (primary
//! links indexed in `by_link`, extra links of hard-linked files, the per-directory child
//! lists), with resolving paths and walking subtrees. Every invariant listed in the
//! parent module's docs is kept by these functions together; nothing here blocks or
//! does I/O.

use std::hash::{BuildHasher, Hasher, RandomState};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use super::{Inodes, Kind, LinkPos, MAX_DEPTH, NONE, Name, Node, ROOT_SLOT, Slot};

fn link_hash(hasher: &RandomState, parent: u32, name: &[u8]) -> u64 {
    let mut h = hasher.build_hasher();
    h.write_u32(parent);
    h.write(name);
    h.finish()
}

fn node_in(slots: &[Slot], s: u32) -> &Node {
    match &slots[s as usize] {
        Slot::Used(n) => n,
        Slot::Free { .. } => unreachable!("slot {s} is free"),
    }
}

/// The inode number of the node of generation `generation` in slot `s`.
fn ino_of_slot(s: u32, generation: u32) -> u64 {
    (u64::from(generation) << 32) | (u64::from(s) + 1)
}

/// A path's parent and last name; `None` for the root ("") and odd paths.
pub(super) fn split(path: &Path) -> Option<(&Path, &[u8])> {
    match path.components().next_back()? {
        Component::Normal(name) => Some((path.parent().unwrap_or(Path::new("")), name.as_bytes())),
        _ => None,
    }
}

impl Inodes {
    // ----- slots ---------------------------------------------------------------------

    pub(super) fn node(&self, s: u32) -> &Node {
        node_in(&self.slots, s)
    }

    pub(super) fn node_mut(&mut self, s: u32) -> &mut Node {
        match &mut self.slots[s as usize] {
            Slot::Used(n) => n,
            Slot::Free { .. } => unreachable!("slot {s} is free"),
        }
    }

    /// The slot of the node numbered `ino`, if that node is live.
    pub(super) fn slot_of(&self, ino: u64) -> Option<u32> {
        let s = u32::try_from(ino & 0xFFFF_FFFF).ok()?.checked_sub(1)?;
        match self.slots.get(s as usize)? {
            Slot::Used(n) if u64::from(n.generation) == ino >> 32 => Some(s),
            _ => None,
        }
    }

    /// The inode number of the node in slot `s`.
    pub(super) fn ino_at(&self, s: u32) -> u64 {
        ino_of_slot(s, self.node(s).generation)
    }

    /// Kernel references of slot `s`.
    pub(super) fn lookups(&self, s: u32) -> u64 {
        match self.node(s).lookups {
            u32::MAX => self.big_lookups[&s],
            n => u64::from(n),
        }
    }

    fn set_lookups(&mut self, s: u32, n: u64) {
        let small = u32::try_from(n).ok().filter(|&n| n != u32::MAX);
        self.node_mut(s).lookups = small.unwrap_or(u32::MAX);
        if small.is_some() {
            if !self.big_lookups.is_empty() {
                self.big_lookups.remove(&s);
            }
        } else {
            self.big_lookups.insert(s, n);
        }
    }

    pub(super) fn add_lookups(&mut self, s: u32, n: u64) {
        if n != 0 {
            self.set_lookups(s, self.lookups(s).saturating_add(n));
        }
    }

    pub(super) fn sub_lookups(&mut self, s: u32, n: u64) {
        if n != 0 {
            self.set_lookups(s, self.lookups(s).saturating_sub(n));
        }
    }

    /// A new node without a link.
    pub(super) fn alloc(&mut self, kind: Kind, merge_src: bool, lookups: u64) -> u32 {
        let node = Node {
            generation: 0,
            lookups: 0,
            name: Name::empty(),
            parent: NONE,
            children: 0,
            first_child: NONE,
            next: NONE,
            prev: NONE,
            kind,
            merge_src,
            more_links: false,
        };
        let s = if self.free != NONE {
            let s = self.free;
            let Slot::Free { next, generation } = self.slots[s as usize] else {
                unreachable!("free list points at a used slot");
            };
            self.free = next;
            // Never `u32::MAX` here: such a slot is not put on the free list.
            self.slots[s as usize] = Slot::Used(Node {
                generation: generation + 1,
                ..node
            });
            s
        } else {
            let s = u32::try_from(self.slots.len())
                .ok()
                .filter(|&s| s != NONE)
                .expect("fewer than 2^32 - 1 live nodes");
            self.slots.push(Slot::Used(node));
            s
        };
        self.add_lookups(s, lookups);
        self.live += 1;
        s
    }

    /// Drops a node that has no link and no linked child.
    fn remove_node(&mut self, s: u32) {
        let n = self.node(s);
        debug_assert!(s != ROOT_SLOT && n.parent == NONE && n.children == 0 && !n.more_links);
        debug_assert!(n.first_child == NONE);
        let generation = n.generation;
        if n.lookups == u32::MAX {
            self.big_lookups.remove(&s);
        }
        if let Some(d) = self.dst.remove(&s)
            && let Some(id) = d.ident
            && self.by_dst_ident.get(&id) == Some(&s)
        {
            self.by_dst_ident.remove(&id);
        }
        // A slot whose generation is used up is left free but off the list: its
        // numbers are never given again.
        let next = if generation == u32::MAX {
            NONE
        } else {
            std::mem::replace(&mut self.free, s)
        };
        self.slots[s as usize] = Slot::Free { next, generation };
        self.live -= 1;
    }

    /// After `s` lost a link or a reference: drops it if nothing holds it any more, and
    /// forgets its dst identity once it has no name (a new file that reuses its dst
    /// inode number is another file, not a hard link of this one).
    pub(super) fn settle(&mut self, s: u32) {
        if s == ROOT_SLOT {
            return;
        }
        let n = self.node(s);
        if n.parent != NONE {
            return;
        }
        if n.lookups == 0 && n.children == 0 {
            self.remove_node(s);
        } else if let Some(id) = self.dst.get(&s).and_then(|d| d.ident)
            && self.by_dst_ident.get(&id) == Some(&s)
        {
            self.by_dst_ident.remove(&id);
        }
    }

    // ----- links -------------------------------------------------------------------

    /// The node linked as `name` in directory slot `parent`.
    pub(super) fn child(&self, parent: u32, name: &[u8]) -> Option<u32> {
        let slots = &self.slots;
        let h = link_hash(&self.hasher, parent, name);
        if let Some(&s) = self.by_link.find(h, |&s| {
            let n = node_in(slots, s);
            n.parent == parent && n.name.as_bytes() == name
        }) {
            return Some(s);
        }
        if self.extra_index.is_empty() {
            return None;
        }
        self.extra_index.get(&(parent, Name::new(name))).copied()
    }

    /// The slot at `path`, if a reachable node has that path.
    pub(super) fn resolve(&self, path: &Path) -> Option<u32> {
        let mut s = ROOT_SLOT;
        for c in path.components() {
            match c {
                Component::Normal(name) => s = self.child(s, name.as_bytes())?,
                Component::CurDir => {}
                _ => return None,
            }
        }
        Some(s)
    }

    /// The directory slot at `dir`, creating missing directories on the way (without
    /// kernel references: they are numbered now, as a listing numbers its entries).
    /// `None` if a node on the way is not a directory (nothing can be linked below it).
    pub(super) fn resolve_dir(&mut self, dir: &Path) -> Option<u32> {
        let mut s = ROOT_SLOT;
        for c in dir.components() {
            if let Component::Normal(name) = c {
                s = match self.child(s, name.as_bytes()) {
                    Some(c) if self.node(c).kind == Kind::Dir => c,
                    Some(_) => return None,
                    None => {
                        let c = self.alloc(Kind::Dir, true, 0);
                        self.link(c, LinkPos::Primary, s, Name::new(name.as_bytes()));
                        c
                    }
                };
            }
        }
        Some(s)
    }

    /// Where the link (`parent`, `name`) of `s` is among its links.
    pub(super) fn link_pos(&self, s: u32, parent: u32, name: &[u8]) -> Option<LinkPos> {
        let n = self.node(s);
        if n.parent == parent && n.name.as_bytes() == name {
            return Some(LinkPos::Primary);
        }
        self.extra_links
            .get(&s)?
            .iter()
            .position(|(p, m)| *p == parent && m.as_bytes() == name)
            .map(LinkPos::Extra)
    }

    /// Takes the link at `pos` of `s` out of the indexes and the node (not the counts).
    pub(super) fn unindex(&mut self, s: u32, pos: LinkPos) -> (u32, Name) {
        match pos {
            LinkPos::Primary => {
                let n = self.node(s);
                let h = link_hash(&self.hasher, n.parent, n.name.as_bytes());
                if let Ok(e) = self.by_link.find_entry(h, |&x| x == s) {
                    e.remove();
                }
                let n = self.node_mut(s);
                let old = (n.parent, std::mem::replace(&mut n.name, Name::empty()));
                let (next, prev) = (n.next, n.prev);
                (n.parent, n.next, n.prev) = (NONE, NONE, NONE);
                if prev == NONE {
                    self.node_mut(old.0).first_child = next;
                } else {
                    self.node_mut(prev).next = next;
                }
                if next != NONE {
                    self.node_mut(next).prev = prev;
                }
                old
            }
            LinkPos::Extra(i) => {
                let links = self.extra_links.get_mut(&s).expect("node has extra links");
                let (p, name) = links.remove(i);
                if links.is_empty() {
                    self.extra_links.remove(&s);
                    self.node_mut(s).more_links = false;
                }
                self.extra_index.remove(&(p, name.clone()));
                (p, name)
            }
        }
    }

    /// Gives `s` the link (`parent`, `name`): as its primary link (which must be free)
    /// or as extra link `i`. Counts the child in `parent`.
    pub(super) fn link(&mut self, s: u32, pos: LinkPos, parent: u32, name: Name) {
        self.node_mut(parent).children += 1;
        match pos {
            LinkPos::Primary => {
                debug_assert_eq!(self.node(s).parent, NONE);
                let h = link_hash(&self.hasher, parent, name.as_bytes());
                let next = self.node(parent).first_child;
                let n = self.node_mut(s);
                n.parent = parent;
                n.name = name;
                (n.next, n.prev) = (next, NONE);
                if next != NONE {
                    self.node_mut(next).prev = s;
                }
                self.node_mut(parent).first_child = s;
                let (slots, hasher) = (&self.slots, &self.hasher);
                self.by_link.insert_unique(h, s, |&x| {
                    let n = node_in(slots, x);
                    link_hash(hasher, n.parent, n.name.as_bytes())
                });
            }
            LinkPos::Extra(i) => {
                self.extra_index.insert((parent, name.clone()), s);
                let links = self.extra_links.entry(s).or_default();
                links.insert(i.min(links.len()), (parent, name));
                self.node_mut(s).more_links = true;
            }
        }
    }

    /// Removes the link (`parent`, `name`) of `s`; the first extra link, if any, becomes
    /// primary. Then the node and its old parent are settled.
    pub(super) fn unlink(&mut self, s: u32, parent: u32, name: &[u8]) {
        let Some(pos) = self.link_pos(s, parent, name) else {
            return;
        };
        self.unindex(s, pos);
        self.node_mut(parent).children -= 1;
        if matches!(pos, LinkPos::Primary) && self.node(s).more_links {
            let (p, next) = self.unindex(s, LinkPos::Extra(0));
            self.node_mut(p).children -= 1;
            self.link(s, LinkPos::Primary, p, next);
        }
        self.settle(s);
        self.settle(parent);
    }

    /// Whether `s` is strictly below `top` (following primary links).
    pub(super) fn is_below(&self, s: u32, top: u32) -> bool {
        let mut x = self.node(s).parent;
        for _ in 0..MAX_DEPTH {
            if x == NONE {
                return false;
            }
            if x == top {
                return true;
            }
            x = self.node(x).parent;
        }
        false
    }

    /// Every link below directory `top` (primary and extra): O(subtree + hard links).
    pub(super) fn links_below(&self, top: u32) -> Vec<(u32, u32, Name)> {
        let mut out = Vec::new();
        let mut dirs = vec![top];
        while let Some(d) = dirs.pop() {
            let mut c = self.node(d).first_child;
            while c != NONE {
                let n = self.node(c);
                out.push((c, d, n.name.clone()));
                if n.first_child != NONE {
                    dirs.push(c);
                }
                c = n.next;
            }
        }
        for ((p, name), &s) in &self.extra_index {
            if *p == top || self.is_below(*p, top) {
                out.push((s, *p, name.clone()));
            }
        }
        out
    }

    /// The name at `parent`/`name` is gone; a directory's links below go with it.
    pub(super) fn detach_at(&mut self, parent: u32, name: &[u8]) {
        let Some(s) = self.child(parent, name) else {
            return;
        };
        let below = if self.node(s).children > 0 {
            self.links_below(s)
        } else {
            Vec::new()
        };
        // Keep `s` while its descendants are detached (an extra reference).
        self.add_lookups(s, 1);
        self.unlink(s, parent, name);
        for (c, p, n) in below {
            self.unlink(c, p, n.as_bytes());
        }
        self.sub_lookups(s, 1);
        self.settle(s);
    }

    /// Takes every link of `s` out (primary first, then the extra ones in order).
    pub(super) fn take_links(&mut self, s: u32) -> Vec<(u32, Name)> {
        let mut out = Vec::new();
        if self.node(s).parent != NONE {
            out.push(self.unindex(s, LinkPos::Primary));
        }
        while self.node(s).more_links {
            out.push(self.unindex(s, LinkPos::Extra(0)));
        }
        for (p, _) in &out {
            self.node_mut(*p).children -= 1;
        }
        out
    }
}
