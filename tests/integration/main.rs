//! The integration tests, in one test binary so that the shared helpers compile once
//! and an unused helper is reported (issue 15). Run one test, or one file's tests:
//!
//!     cargo nextest run --test integration rclone::one_node_makes_no_false_conflicts
//!     cargo nextest run -E 'test(/^writeback_mount::/)'
//!
//! Most tests run the real `cachefs` binary on a real FUSE mount (root, /dev/fuse; they
//! skip with a printed reason otherwise). The `writeback_*` tests without `_mount` in
//! their name and `model` drive the library in process, with no mount.

// ----- helpers --------------------------------------------------------------------
// src behind a real bindfs mount that tests kill, pause and restart.
mod bindfs_support;
// The mounted-test harness: `Mounted` and its helpers.
mod common;
// The rclone + S3 test bed.
mod rclone_support;
// Temp trees and a convergence check for the in-process writeback tests.
mod writeback_support;

// ----- tests ----------------------------------------------------------------------
mod bigdir;
mod cache_budget;
mod cli;
mod coherence;
mod control;
mod copy_up;
mod dircache;
mod drain_timeout;
mod grafana;
mod hostile;
mod identity;
mod layered;
mod lazy_fetch;
mod max_dirty;
mod metrics;
mod model;
mod mount_helper;
mod outage;
mod posix_ops;
mod rclone;
mod rclone_bigfiles;
mod rclone_hung;
mod rclone_unrepresentable;
mod remount_cycle;
mod status;
mod systemd;
mod two_daemons;
mod user_mount;
mod writeback_convergence;
mod writeback_crash;
mod writeback_crash_mount;
mod writeback_drain;
mod writeback_fault;
mod writeback_mount;
mod writeback_replay;
mod writeback_temp_names;
