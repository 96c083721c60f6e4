//! Helpers on [`Op`]: kind names, touched paths, normalisation, coalescing and the
//! follow-up ops a rename implies.

use std::ffi::OsStr;
use std::path::{Component, Path, PathBuf};

use crate::fs::change::Op;
pub(crate) use crate::fs::change::op_paths as paths;
use crate::fs::names;

/// Journal and log name of each kind.
pub(crate) fn kind(op: &Op) -> &'static str {
    match op {
        Op::Write { .. } => "write",
        Op::Create { .. } => "create",
        Op::Mknod { .. } => "mknod",
        Op::Mkdir { .. } => "mkdir",
        Op::Symlink { .. } => "symlink",
        Op::Link { .. } => "link",
        Op::Unlink { .. } => "unlink",
        Op::Rmdir { .. } => "rmdir",
        Op::Rename {
            exchange: false, ..
        } => "rename",
        Op::Rename { exchange: true, .. } => "exchange",
        Op::SetAttr { .. } => "setattr",
        Op::Xattr { .. } => "xattr",
        Op::Sync { .. } => "sync",
    }
}

/// The `op` label of a replay in the src latency histogram: uploads of file content
/// (write, create, and sync, which may upload a tree) are `write`, the rest `meta`.
pub(crate) fn src_op(op: &Op) -> crate::metrics::SrcOp {
    match op {
        Op::Write { .. } | Op::Create { .. } | Op::Sync { .. } => crate::metrics::SrcOp::Write,
        _ => crate::metrics::SrcOp::Meta,
    }
}

/// Build an op from its kind name and paths (the inverse of [`kind`] + [`paths`]).
pub(crate) fn from_parts(kind: &str, a: PathBuf, b: Option<PathBuf>) -> Option<Op> {
    Some(match (kind, b) {
        ("write", None) => Op::Write { path: a },
        ("create", None) => Op::Create { path: a },
        ("mknod", None) => Op::Mknod { path: a },
        ("mkdir", None) => Op::Mkdir { path: a },
        ("symlink", None) => Op::Symlink { path: a },
        ("unlink", None) => Op::Unlink { path: a },
        ("rmdir", None) => Op::Rmdir { path: a },
        ("setattr", None) => Op::SetAttr { path: a },
        ("xattr", None) => Op::Xattr { path: a },
        ("sync", None) => Op::Sync { path: a },
        ("link", Some(b)) => Op::Link {
            existing: a,
            new: b,
        },
        ("rename", Some(b)) => Op::Rename {
            from: a,
            to: b,
            exchange: false,
        },
        ("exchange", Some(b)) => Op::Rename {
            from: a,
            to: b,
            exchange: true,
        },
        _ => return None,
    })
}

fn map_paths(op: &Op, f: impl Fn(&Path) -> Option<PathBuf>) -> Option<Op> {
    let g = |p: &PathBuf| f(p);
    Some(match op {
        Op::Write { path } => Op::Write { path: g(path)? },
        Op::Create { path } => Op::Create { path: g(path)? },
        Op::Mknod { path } => Op::Mknod { path: g(path)? },
        Op::Mkdir { path } => Op::Mkdir { path: g(path)? },
        Op::Symlink { path } => Op::Symlink { path: g(path)? },
        Op::Unlink { path } => Op::Unlink { path: g(path)? },
        Op::Rmdir { path } => Op::Rmdir { path: g(path)? },
        Op::SetAttr { path } => Op::SetAttr { path: g(path)? },
        Op::Xattr { path } => Op::Xattr { path: g(path)? },
        Op::Sync { path } => Op::Sync { path: g(path)? },
        Op::Link { existing, new } => Op::Link {
            existing: g(existing)?,
            new: g(new)?,
        },
        Op::Rename { from, to, exchange } => Op::Rename {
            from: g(from)?,
            to: g(to)?,
            exchange: *exchange,
        },
    })
}

/// The paths whose dst object an op syncs, by slot: replay materialises such a path only
/// if dst still holds the object recorded for it (a later object at the same path has
/// its own, later ops). Slot 0 is the first path, slot 1 the second (rename `to`, link
/// `new`).
pub(crate) fn id_paths(op: &Op) -> [Option<&Path>; 2] {
    match op {
        Op::Unlink { .. } | Op::Rmdir { .. } => [None, None],
        Op::Link { new, .. } => [None, Some(new)],
        Op::Rename {
            from, to, exchange, ..
        } => [exchange.then_some(from.as_path()), Some(to)],
        other => [Some(paths(other)[0]), None],
    }
}

/// Normalise a mount-relative path: no leading `/`, no `.` components; rejects `..`
/// and reserved names (whiteouts, the state folder, temp files), which never reach src.
pub(crate) fn normalize_path(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) if !names::is_reserved(n) && !n.is_empty() => out.push(n),
            _ => return None,
        }
    }
    Some(out)
}

pub(crate) fn normalize(op: &Op) -> Option<Op> {
    map_paths(op, normalize_path)
}

fn rebase(p: &Path, from: &Path, to: &Path) -> Option<PathBuf> {
    p.strip_prefix(from).ok().map(|rest| {
        if rest.as_os_str().is_empty() {
            to.to_path_buf()
        } else {
            to.join(rest)
        }
    })
}

/// True if replaying `old` (not started yet) also does everything `new` asks, so `new`
/// need not be journaled. Every replay of a path-syncing kind re-reads dst's content
/// (files) and all metadata (mode, owner, times, user xattrs).
pub(crate) fn covers(old: &Op, new: &Op) -> bool {
    if paths(old) != paths(new) || paths(old).len() != 1 {
        return false;
    }
    let syncs_meta = !matches!(
        old,
        Op::Unlink { .. } | Op::Rmdir { .. } | Op::Rename { .. } | Op::Link { .. }
    );
    match new {
        Op::SetAttr { .. } | Op::Xattr { .. } => syncs_meta,
        Op::Write { .. } => matches!(old, Op::Write { .. } | Op::Create { .. } | Op::Sync { .. }),
        _ => false,
    }
}

/// The ops that must follow `rename` so that content still pending under its source
/// reaches src under the new name: replay skips an op whose dst path has gone, and the
/// rename on src moves only what src already had. `pending` are the ops not yet applied
/// that touch `from` or below (or `to` or below for an exchange).
pub(crate) fn rename_followups<'a>(rename: &Op, pending: impl Iterator<Item = &'a Op>) -> Vec<Op> {
    let Op::Rename { from, to, exchange } = rename else {
        return Vec::new();
    };
    let mut maps = vec![(from.as_path(), to.as_path())];
    if *exchange {
        maps.push((to.as_path(), from.as_path()));
    }
    let mut out: Vec<Op> = Vec::new();
    for op in pending {
        for (a, b) in &maps {
            let moved: Vec<Op> = match op {
                Op::Unlink { .. } | Op::Rmdir { .. } => Vec::new(),
                Op::Link { new, .. } => rebase(new, a, b)
                    .map(|path| Op::Sync { path })
                    .into_iter()
                    .collect(),
                Op::Rename {
                    from: rf,
                    to: rt,
                    exchange: rx,
                } => {
                    let mut v: Vec<Op> = rebase(rt, a, b)
                        .map(|path| Op::Sync { path })
                        .into_iter()
                        .collect();
                    if *rx {
                        v.extend(rebase(rf, a, b).map(|path| Op::Sync { path }));
                    }
                    v
                }
                other => map_paths(other, |p| rebase(p, a, b)).into_iter().collect(),
            };
            for m in moved {
                if !out.contains(&m) {
                    out.push(m);
                }
            }
        }
    }
    out
}

/// Split a normalised path into its parent components and final name
/// (`None` for the root).
pub(crate) fn split(p: &Path) -> Option<(Vec<&OsStr>, &OsStr)> {
    let mut comps: Vec<&OsStr> = p.iter().collect();
    let last = comps.pop()?;
    Some((comps, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    #[test]
    fn normalize_rejects_dotdot_and_reserved() {
        assert_eq!(normalize_path(Path::new("/a/./b")), Some(p("a/b")));
        assert_eq!(normalize_path(Path::new("")), Some(p("")));
        assert_eq!(normalize_path(Path::new("a/../b")), None);
        assert_eq!(normalize_path(Path::new("a/.cachefs-wh.x")), None);
        assert_eq!(normalize_path(Path::new(".cachefs-state/j")), None);
    }

    #[test]
    fn coverage() {
        let w = Op::Write { path: p("a") };
        let c = Op::Create { path: p("a") };
        let s = Op::SetAttr { path: p("a") };
        let x = Op::Xattr { path: p("a") };
        let m = Op::Mkdir { path: p("a") };
        assert!(covers(&w, &w) && covers(&c, &w) && covers(&w, &s) && covers(&s, &x));
        assert!(covers(&m, &s) && !covers(&m, &w) && !covers(&s, &w));
        assert!(!covers(&w, &Op::Write { path: p("b") }));
        assert!(!covers(&Op::Unlink { path: p("a") }, &s));
    }

    #[test]
    fn rename_followups_rebase_pending_content() {
        let r = Op::Rename {
            from: p("a"),
            to: p("b"),
            exchange: false,
        };
        let pending = [
            Op::Mkdir { path: p("a") },
            Op::Write { path: p("a/f") },
            Op::Write { path: p("a/f") },
            Op::Unlink { path: p("a/g") },
            Op::Rename {
                from: p("x"),
                to: p("a/y"),
                exchange: false,
            },
        ];
        assert_eq!(
            rename_followups(&r, pending.iter()),
            vec![
                Op::Mkdir { path: p("b") },
                Op::Write { path: p("b/f") },
                Op::Sync { path: p("b/y") },
            ]
        );
    }

    #[test]
    fn parts_round_trip() {
        let ops = [
            Op::Write { path: p("a") },
            Op::Link {
                existing: p("a"),
                new: p("b"),
            },
            Op::Rename {
                from: p("a"),
                to: p("b"),
                exchange: true,
            },
        ];
        for op in ops {
            let ps: Vec<PathBuf> = paths(&op).iter().map(|x| x.to_path_buf()).collect();
            let back = from_parts(kind(&op), ps[0].clone(), ps.get(1).cloned()).unwrap();
            assert_eq!(back, op);
        }
    }
}
