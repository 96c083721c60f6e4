//! Inode numbers of the mount, stable for the life of the mount.
//!
//! Invariants:
//! - Inode numbers are allocated from a counter and never reused, so the kernel's
//!   generation number is always 0. The root is [`ROOT`].
//! - A node is reached by one or more mount-relative paths (more than one only for hard
//!   links). `by_path[p] == ino` iff `p` is in `nodes[ino].paths`.
//! - A node's number survives copy-up (src -> dst) and rename: both only edit paths.
//! - Nodes the kernel has forgotten stay while a path reaches them (numbers stay stable);
//!   a node with no path left (unlinked, replaced) is dropped once the kernel forgets it.
//! - `by_path` is ordered by path components, so a directory's descendants are the
//!   contiguous range right after it: subtree operations cost O(subtree + log n).
//! - Hard links in dst: `by_dst_ident[(dev, ino)]` maps a dst inode to the one node
//!   that all its names share, so `st_ino` is the same through every link.
//!
//! Locking: the table is guarded by one mutex in `CacheFs`; nothing here blocks or does I/O.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The root directory's inode number (FUSE_ROOT_ID).
pub const ROOT: u64 = 1;

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
    pub fn from_mode(mode: u32) -> Kind {
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

#[derive(Debug, Clone)]
pub struct Node {
    pub kind: Kind,
    /// Live paths; `paths[0]` is the one used for path-based calls.
    pub paths: Vec<PathBuf>,
    /// Kernel references (lookups not yet forgotten).
    pub lookups: u64,
    /// Directories: whether src is consulted for this directory's children.
    pub merge_src: bool,
    /// Identity of the dst object, for hard-link sharing.
    pub dst_ident: Option<(u64, u64)>,
    /// Files: when the cached copy was last compared with src (revalidation).
    pub checked: Option<std::time::Instant>,
}

impl Node {
    /// The path used for path-based calls, or `None` once every name is gone.
    pub fn path(&self) -> Option<&Path> {
        self.paths.first().map(PathBuf::as_path)
    }
}

#[derive(Debug)]
pub struct Inodes {
    nodes: HashMap<u64, Node>,
    by_path: BTreeMap<PathBuf, u64>,
    by_dst_ident: HashMap<(u64, u64), u64>,
    next: u64,
}

impl Default for Inodes {
    fn default() -> Self {
        Self::new()
    }
}

impl Inodes {
    pub fn new() -> Inodes {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node {
                kind: Kind::Dir,
                paths: vec![PathBuf::new()],
                lookups: 1,
                merge_src: true,
                dst_ident: None,
                checked: None,
            },
        );
        let mut by_path = BTreeMap::new();
        by_path.insert(PathBuf::new(), ROOT);
        Inodes {
            nodes,
            by_path,
            by_dst_ident: HashMap::new(),
            next: ROOT + 1,
        }
    }

    pub fn get(&self, ino: u64) -> Option<&Node> {
        self.nodes.get(&ino)
    }

    pub fn get_mut(&mut self, ino: u64) -> Option<&mut Node> {
        self.nodes.get_mut(&ino)
    }

    pub fn ino_of(&self, path: &Path) -> Option<u64> {
        self.by_path.get(path).copied()
    }

    /// The node for `path` as just found on disk, creating it if needed, and adding
    /// `lookups` kernel references. A node of another kind at that path (replaced behind
    /// our back) is detached first; a dst hard link of a known node joins that node.
    pub fn upsert(
        &mut self,
        path: &Path,
        kind: Kind,
        merge_src: bool,
        dst_ident: Option<(u64, u64)>,
        lookups: u64,
    ) -> u64 {
        if let Some(ino) = self.by_path.get(path).copied() {
            let node = self.nodes.get_mut(&ino).expect("by_path points at a node");
            let same_object = match (node.dst_ident, dst_ident) {
                (Some(a), Some(b)) => a == b || kind == Kind::Dir,
                _ => true,
            };
            if node.kind == kind && same_object {
                node.lookups += lookups;
                node.merge_src = merge_src;
                if node.dst_ident.is_none()
                    && let Some(id) = dst_ident
                {
                    node.dst_ident = Some(id);
                    if kind != Kind::Dir {
                        self.by_dst_ident.insert(id, ino);
                    }
                }
                return ino;
            }
            self.detach_path(path);
        }
        if kind != Kind::Dir
            && let Some(id) = dst_ident
            && let Some(ino) = self.by_dst_ident.get(&id).copied()
            && let Some(node) = self.nodes.get_mut(&ino)
        {
            node.lookups += lookups;
            node.paths.push(path.to_path_buf());
            self.by_path.insert(path.to_path_buf(), ino);
            return ino;
        }
        let ino = self.next;
        self.next += 1;
        self.nodes.insert(
            ino,
            Node {
                kind,
                paths: vec![path.to_path_buf()],
                lookups,
                merge_src,
                dst_ident,
                checked: None,
            },
        );
        self.by_path.insert(path.to_path_buf(), ino);
        if kind != Kind::Dir
            && let Some(id) = dst_ident
        {
            self.by_dst_ident.insert(id, ino);
        }
        ino
    }

    /// Records that `ino` now lives in dst as `ident` (after a copy-up).
    pub fn set_dst_ident(&mut self, ino: u64, ident: (u64, u64)) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            if let Some(old) = node.dst_ident.replace(ident)
                && self.by_dst_ident.get(&old) == Some(&ino)
            {
                self.by_dst_ident.remove(&old);
            }
            if node.kind != Kind::Dir {
                self.by_dst_ident.insert(ident, ino);
            }
        }
    }

    /// `ino` no longer lives in dst (evicted): it is src-backed again.
    pub fn clear_dst_ident(&mut self, ino: u64) {
        if let Some(node) = self.nodes.get_mut(&ino)
            && let Some(old) = node.dst_ident.take()
            && self.by_dst_ident.get(&old) == Some(&ino)
        {
            self.by_dst_ident.remove(&old);
        }
    }

    /// Adds a name to an existing node (hard link).
    pub fn add_path(&mut self, ino: u64, path: &Path) {
        self.detach_path(path);
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.paths.push(path.to_path_buf());
            self.by_path.insert(path.to_path_buf(), ino);
        }
    }

    /// The name `path` is gone (unlink, rmdir, replaced by rename). Descendant paths of
    /// a removed directory go too.
    pub fn detach_path(&mut self, path: &Path) {
        let Some(ino) = self.by_path.remove(path) else {
            return;
        };
        let mut drop_node = false;
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.paths.retain(|p| p != path);
            drop_node = node.paths.is_empty() && node.lookups == 0;
            if node.kind == Kind::Dir {
                let children: Vec<PathBuf> = self
                    .subtree(path)
                    .filter(|(p, _)| p.as_path() != path)
                    .map(|(p, _)| p.clone())
                    .collect();
                for c in children {
                    self.detach_path(&c);
                }
            }
        }
        if drop_node {
            self.remove_node(ino);
        } else if let Some(node) = self.nodes.get(&ino)
            && node.paths.is_empty()
            && let Some(id) = node.dst_ident
            && self.by_dst_ident.get(&id) == Some(&ino)
        {
            // Unlinked but still known to the kernel: a new file that reuses its dst
            // inode number is another file, not a hard link of this one.
            self.by_dst_ident.remove(&id);
        }
    }

    /// Renames `from` to `to` for the node there and every descendant path.
    pub fn rename(&mut self, from: &Path, to: &Path) {
        let moved: Vec<(PathBuf, u64)> = self.subtree(from).map(|(p, i)| (p.clone(), *i)).collect();
        for (old, ino) in moved {
            // Not `to.join("")`: that would be "to/", and "file/" opens as ENOTDIR.
            let rest = old.strip_prefix(from).expect("filtered by prefix");
            let new = if rest.as_os_str().is_empty() {
                to.to_path_buf()
            } else {
                to.join(rest)
            };
            self.by_path.remove(&old);
            if let Some(node) = self.nodes.get_mut(&ino) {
                for p in node.paths.iter_mut() {
                    if *p == old {
                        *p = new.clone();
                    }
                }
            }
            self.by_path.insert(new, ino);
        }
    }

    /// RENAME_EXCHANGE: `a` and `b` swap places (with their descendants).
    pub fn exchange(&mut self, a: &Path, b: &Path) {
        let tmp = PathBuf::from("\0exchange");
        self.rename(a, &tmp);
        self.rename(b, a);
        self.rename(&tmp, b);
    }

    /// No directory at or below `dir` consults src any more (it moved, complete, in dst).
    pub fn clear_merge_below(&mut self, dir: &Path) {
        let below: Vec<u64> = self.subtree(dir).map(|(_, i)| *i).collect();
        for ino in below {
            if let Some(n) = self.nodes.get_mut(&ino) {
                n.merge_src = false;
            }
        }
    }

    /// `dir` and every path below it (contiguous in component order).
    fn subtree<'a>(&'a self, dir: &'a Path) -> impl Iterator<Item = (&'a PathBuf, &'a u64)> + 'a {
        self.by_path
            .range::<Path, _>((std::ops::Bound::Included(dir), std::ops::Bound::Unbounded))
            .take_while(move |(p, _)| p.starts_with(dir))
    }

    /// The kernel dropped `n` references.
    pub fn forget(&mut self, ino: u64, n: u64) {
        if ino == ROOT {
            return;
        }
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.lookups = node.lookups.saturating_sub(n);
            if node.lookups == 0 && node.paths.is_empty() {
                self.remove_node(ino);
            }
        }
    }

    fn remove_node(&mut self, ino: u64) {
        if let Some(node) = self.nodes.remove(&ino)
            && let Some(id) = node.dst_ident
            && self.by_dst_ident.get(&id) == Some(&ino)
        {
            self.by_dst_ident.remove(&id);
        }
    }

    /// Number of nodes (for status and tests).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(t.get(f).unwrap().path(), Some(p("e/f")));
        t.rename(p("e/f"), p("g"));
        // Exactly "g", not "g/" (which opens as ENOTDIR for a file).
        assert_eq!(t.get(f).unwrap().path().unwrap().as_os_str(), "g");
    }

    #[test]
    fn hard_links_share_one_node() {
        let mut t = Inodes::new();
        let a = t.upsert(p("a"), Kind::File, true, Some((1, 7)), 1);
        let b = t.upsert(p("b"), Kind::File, true, Some((1, 7)), 1);
        assert_eq!(a, b);
        t.detach_path(p("a"));
        assert_eq!(t.get(a).unwrap().path(), Some(p("b")));
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
    }

    #[test]
    fn subtree_is_exactly_the_descendants() {
        let mut t = Inodes::new();
        for path in ["a", "a/b", "a/b/c", "a/b0", "a/bc", "a/b/c/d", "ab"] {
            t.upsert(p(path), Kind::Dir, true, None, 1);
        }
        let got: Vec<_> = t.subtree(p("a/b")).map(|(p, _)| p.clone()).collect();
        assert_eq!(got, [p("a/b"), p("a/b/c"), p("a/b/c/d")]);
        t.rename(p("a/b"), p("z"));
        assert!(t.ino_of(p("z/c/d")).is_some() && t.ino_of(p("a/b0")).is_some());
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
    }
}
