//! The operations of the model test, their outcomes and what a walk observes. Shared by
//! the reference model and the driver of the real core. `Debug` output is valid Rust for
//! the regression tests in `model.rs` (paste a shrunk case as it is printed).

use std::fmt;

/// Names the generator draws from: few, so that ops collide. The last two are reserved
/// (a whiteout name, the opaque marker): creating them through the mount must fail,
/// looking them up finds nothing, src may hold them (and they stay hidden).
pub const NAMES: [&str; 6] = ["a", "b", "x", "y", ".cachefs-wh.x", ".cachefs-opaque"];
/// Bytes written through the mount or into src.
pub const DATA: [&str; 5] = ["", "1", "hello", "abc", "0123456789"];
/// Symlink targets (never followed by the test).
pub const TARGETS: [&str; 3] = ["x", "../a/y", "/nowhere"];
/// The umask passed with create/mkdir.
pub const UMASK: u32 = 0o022;

/// A mount-relative path of one or two components, e.g. `p("a/x")`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct P(pub String);

pub fn p(s: &str) -> P {
    P(s.to_string())
}

impl fmt::Debug for P {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "p({:?})", self.0)
    }
}

impl P {
    pub fn parent(&self) -> &str {
        parent_of(&self.0)
    }
    pub fn name(&self) -> &str {
        name_of(&self.0)
    }
}

pub fn parent_of(p: &str) -> &str {
    p.rfind('/').map_or("", |i| &p[..i])
}

pub fn name_of(p: &str) -> &str {
    p.rfind('/').map_or(p, |i| &p[i + 1..])
}

pub fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// `inner` is strictly below `outer`.
pub fn is_below(inner: &str, outer: &str) -> bool {
    inner.len() > outer.len() && inner.starts_with(outer) && inner.as_bytes()[outer.len()] == b'/'
}

pub fn is_reserved(name: &str) -> bool {
    cachefs::fs::names::is_reserved(std::ffi::OsStr::new(name))
}

/// Permission bits, printed in octal.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Mode(pub u32);

impl fmt::Debug for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Mode(0o{:o})", self.0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flags {
    Plain,
    NoReplace,
    Exchange,
}

impl Flags {
    pub fn bits(self) -> u32 {
        match self {
            Flags::Plain => 0,
            Flags::NoReplace => libc::RENAME_NOREPLACE,
            Flags::Exchange => libc::RENAME_EXCHANGE,
        }
    }
}

/// One step: an operation through the core, or (`Src*`) a change made directly in src
/// the way another machine changes the bucket.
#[derive(Clone, Debug)]
pub enum Op {
    /// create(O_EXCL) + release.
    Create(P, Mode),
    Mkdir(P, Mode),
    Symlink(P, &'static str),
    /// open(O_WRONLY) + write at an offset + release.
    Write(P, u64, &'static str),
    /// truncate(2): setattr size.
    Truncate(P, u64),
    /// chmod(2): setattr mode.
    Chmod(P, Mode),
    /// open(O_RDONLY) + read everything + release.
    Read(P),
    Unlink(P),
    Rmdir(P),
    Rename(P, P, Flags),
    /// link(existing, new).
    Link(P, P),
    /// Create or overwrite a file in src (parents created as needed).
    SrcWrite(P, &'static str, Mode),
    SrcMkdir(P),
    SrcSymlink(P, &'static str),
    /// rm -rf in src.
    SrcRemove(P),
    /// The daemon restarts on the same src and dst (a new `CacheFs`; inode numbers
    /// start over).
    Restart,
}

impl Op {
    pub fn is_src(&self) -> bool {
        matches!(
            self,
            Op::SrcWrite(..) | Op::SrcMkdir(_) | Op::SrcSymlink(..) | Op::SrcRemove(_)
        )
    }
}

/// An errno, printed by name.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.0 {
            libc::ENOENT => "ENOENT",
            libc::EEXIST => "EEXIST",
            libc::ENOTEMPTY => "ENOTEMPTY",
            libc::ENOTDIR => "ENOTDIR",
            libc::EISDIR => "EISDIR",
            libc::EPERM => "EPERM",
            libc::EINVAL => "EINVAL",
            libc::EXDEV => "EXDEV",
            libc::ELOOP => "ELOOP",
            libc::EIO => "EIO",
            libc::ESTALE => "ESTALE",
            libc::EACCES => "EACCES",
            libc::EBUSY => "EBUSY",
            n => return write!(f, "errno {n}"),
        };
        f.write_str(name)
    }
}

/// What a step returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// The bytes a `Read` returned.
    Data(String),
    /// Not applicable: the kernel would have followed a symlink (never done here), or a
    /// src change that does not fit what src holds.
    Skip,
    Err(Errno),
}

pub fn err(errno: i32) -> Outcome {
    Outcome::Err(Errno(errno))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum K {
    Dir,
    File,
    Symlink,
}

/// What the test compares for one visible path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Obs {
    pub kind: K,
    /// Permission bits (not for symlinks).
    pub perm: Option<u32>,
    /// Files: size and link count.
    pub size: Option<u64>,
    pub nlink: Option<u32>,
    /// Symlinks: the target.
    pub target: Option<String>,
    /// Files whose bytes are in dst (reading them has no side effect): the bytes.
    pub content: Option<String>,
}
