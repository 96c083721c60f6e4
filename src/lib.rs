//! cachefs: a FUSE daemon that puts a fast local cache directory (dst) in front of a slow
//! directory (src), copying files on a read miss and (with `-w`) writing mutations back.
//!
//! Layers, outermost first (each has its own error type, mapped to errno in one place,
//! [`fs::FsError::errno`]):
//! - `cli` / `daemon`: command line, validation, mounting, signals; `dst_lock`: one
//!   daemon per dst.
//! - `fuse`: the thin `fuser::Filesystem` adapter; the only module that knows fuser types.
//! - `fs`: the layered view (lookup, inodes, handles, whiteouts, copy-up) over two
//!   directory roots, with no fuser types.
//! - `cache`: the cache budget (usage, LRU eviction, pinning) over the core.
//! - `writeback`: the durable journal and the workers that replay it on src.
//! - `status`: `cachefs status`, the report of dst's state folder (src, writeback queue,
//!   cache), read without a daemon.
//! - `control`: the control channel of a running daemon (a Unix socket in dst) and the
//!   commands that use it: `cachefs ctl`, `cachefs warmup`, `cachefs status --watch`.
//! - `metrics`: process-wide counters, Prometheus rendering, the `--metrics-addr` server.
//! - `mountinfo`: the kernel mount table's escapes; `json`: ordered JSON objects written
//!   by serde_json (`cachefs status --json`).
//! - `sys`: the syscall wrappers (every `unsafe` path and `*at` call), a leaf.
//! - `systemd`: sd_notify (`READY=1`, `STATUS=`, start-up progress with
//!   `EXTEND_TIMEOUT_USEC=`).

pub(crate) mod cache;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub(crate) mod dst_lock;
pub mod fs;
pub(crate) mod fuse;
pub(crate) mod json;
pub mod metrics;
pub mod mountinfo;
pub mod status;
pub(crate) mod sys;
pub(crate) mod systemd;
pub mod writeback;
