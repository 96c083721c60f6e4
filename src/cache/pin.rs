//! Pinning: paths that are fetched ahead of use and never evicted.
//!
//! Two sources, either one pins:
//! - `--pin GLOB` (repeatable), matched against mount-relative paths (no leading `/`).
//!   A glob with no `/` matches a name at any depth (`*.jpg` pins every JPEG, like a
//!   .gitignore line); one with a `/` is anchored at the mount's root (`videos/**`,
//!   `photos/2024/*.jpg`). `*` and `?` never cross `/`; `**` does. A glob that matches a
//!   directory pins everything below it (`videos` pins the tree of every `videos` dir).
//! - The xattr `user.cachefs.pin`, set through the mount on a file or a directory
//!   (`setfattr -n user.cachefs.pin -v 1 mnt/dir`). It is stored on the dst copy like
//!   any user xattr; a file is pinned when it or any ancestor directory carries it
//!   with a value other than `0`.
//!
//! Globs use the `globset` crate (ripgrep's matcher): `**`, classes and `{a,b}`
//! alternatives with exact path-separator semantics, and `regex`, which it builds on,
//! is already in the dependency tree (through env_logger).

use std::ffi::OsStr;
use std::path::{Component, Path, PathBuf};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

use crate::fs::layer::Layer;

/// The pin xattr.
pub(crate) const PIN_XATTR: &str = "user.cachefs.pin";

/// Whether an xattr value means "pinned".
pub(crate) fn pin_value(v: &[u8]) -> bool {
    let t = String::from_utf8_lossy(v);
    t.trim() != "0"
}

/// The `--pin` globs.
#[derive(Debug, Clone)]
pub(crate) struct Pins {
    set: GlobSet,
    /// How many globs.
    count: usize,
    /// Directories (mount-relative) under which every glob's matches lie: the walk
    /// roots of the prefetch ("" for a glob that can match anywhere).
    roots: Vec<PathBuf>,
}

fn normalized(glob: &str) -> String {
    let g = glob.trim().trim_start_matches('/');
    let g = g.strip_prefix("./").unwrap_or(g);
    if g.contains('/') {
        g.trim_end_matches('/').to_string()
    } else {
        format!("**/{g}")
    }
}

/// Checks one `--pin` value; the error is a short phrase for the CLI.
pub(crate) fn check_glob(glob: &str) -> Result<(), String> {
    let g = normalized(glob);
    if glob.trim().trim_matches('/').is_empty() {
        return Err("is empty".into());
    }
    if Path::new(&g)
        .components()
        .any(|c| matches!(c, Component::ParentDir))
    {
        return Err("may not contain '..'".into());
    }
    GlobBuilder::new(&g)
        .literal_separator(true)
        .build()
        .map(drop)
        .map_err(|e| e.kind().to_string())
}

/// The leading components of a glob without glob syntax.
fn literal_root(glob: &str) -> PathBuf {
    let mut root = PathBuf::new();
    let parts: Vec<&str> = glob.split('/').collect();
    for part in &parts[..parts.len().saturating_sub(1)] {
        if part.contains(['*', '?', '[', '{', '\\']) {
            break;
        }
        root.push(part);
    }
    root
}

impl Pins {
    /// Builds the matcher; globs were checked by the CLI ([`check_glob`]).
    pub(crate) fn new(globs: &[String]) -> Result<Pins, String> {
        let mut b = GlobSetBuilder::new();
        let mut roots: Vec<PathBuf> = Vec::new();
        for g in globs {
            check_glob(g).map_err(|e| format!("--pin '{g}': {e}"))?;
            let n = normalized(g);
            let glob = GlobBuilder::new(&n)
                .literal_separator(true)
                .build()
                .map_err(|e| e.to_string())?;
            b.add(glob);
            roots.push(literal_root(&n));
        }
        // Drop roots nested in other roots.
        roots.sort();
        roots.dedup();
        let all = roots.clone();
        roots.retain(|r| !all.iter().any(|o| o != r && r.starts_with(o)));
        let set = b.build().map_err(|e| e.to_string())?;
        Ok(Pins {
            set,
            count: globs.len(),
            roots,
        })
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.count
    }

    /// Where the prefetch walks to find the globs' matches.
    pub(crate) fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// Whether a glob matches `path` or one of its ancestors.
    pub(crate) fn matches(&self, path: &Path) -> bool {
        !self.set.is_empty()
            && path
                .ancestors()
                .take_while(|a| !a.as_os_str().is_empty())
                .any(|a| self.set.is_match(a))
    }
}

/// Whether dst's entry at `path` itself carries a pin xattr.
pub(crate) fn has_pin_xattr(dst: &Layer, path: &Path) -> bool {
    dst.getxattr(path, OsStr::new(PIN_XATTR))
        .is_ok_and(|v| pin_value(&v))
}

/// Whether `path` or an ancestor directory in dst carries the pin xattr.
pub(crate) fn pinned_by_xattr(dst: &Layer, path: &Path) -> bool {
    path.ancestors()
        .take_while(|a| !a.as_os_str().is_empty())
        .any(|a| has_pin_xattr(dst, a))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pins(g: &[&str]) -> Pins {
        Pins::new(&g.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn glob_semantics() {
        let p = pins(&["*.jpg", "videos/**", "docs/*.pdf", "keep"]);
        for yes in [
            "a.jpg",
            "x/y/a.jpg",
            "videos/a.mp4",
            "videos/x/y.mkv",
            "docs/a.pdf",
            "keep/deep/file",
            "x/keep/f",
        ] {
            assert!(p.matches(Path::new(yes)), "{yes}");
        }
        for no in [
            "a.jpeg",
            "video/a",
            "docs/x/a.pdf",
            "x/docs/a.pdf",
            "keeper",
        ] {
            assert!(!p.matches(Path::new(no)), "{no}");
        }
        assert!(!pins(&[]).matches(Path::new("a")));
    }

    #[test]
    fn walk_roots() {
        let p = pins(&["videos/**", "videos/old/*.mp4", "a/b/c*.x", "/abs/x/"]);
        assert_eq!(
            p.roots(),
            &[PathBuf::from("a/b"), "abs".into(), "videos".into()]
        );
        assert_eq!(pins(&["*.jpg", "videos/**"]).roots(), &[PathBuf::from("")]);
    }

    #[test]
    fn bad_globs() {
        assert!(check_glob("a/[b").is_err());
        assert!(check_glob("").is_err());
        assert!(check_glob("/").is_err());
        assert!(check_glob("../x").is_err());
        assert!(check_glob("a/{b,c}/*").is_ok());
    }

    #[test]
    fn xattr_values() {
        assert!(pin_value(b"1"));
        assert!(pin_value(b""));
        assert!(pin_value(b"yes"));
        assert!(!pin_value(b"0"));
    }
}
