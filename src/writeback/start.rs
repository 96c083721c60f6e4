//! Starting writeback: opening the journal and its companions (intents, leftovers,
//! caps, unrep), loading what an earlier run left pending, starting the threads, and
//! the crash-recovery resyncs that must run before the first request.
//!
//! Invariants:
//! - Without `-w`, [`Writeback::start`] returns an inert instance and touches neither
//!   src nor the journal.
//! - With `-w`, src is the `Layer` the view uses ([`crate::fs::src_state::open_src`],
//!   or the one handed to [`Writeback::start_with_src`]): writeback has no other way
//!   to open src.

use super::workers::{PROBE_WAIT, dispatcher, leftover_checks, probe_src, worker};
use super::*;

impl Writeback {
    /// Open (or create) the journal in `cfg.dst`, load what is pending and start the
    /// replay workers. Pending ops (failed ones included) start after `start_delay`.
    /// Fails if another process holds the journal.
    pub fn start(cfg: &Config) -> Result<Arc<Writeback>, WritebackError> {
        if !cfg.writeback {
            return Ok(Arc::new(Writeback {
                shared: None,
                threads: Mutex::new(Vec::new()),
                mirror: false,
            }));
        }
        let src = crate::fs::src_state::open_src(&cfg.src, &cfg.dst)?;
        Self::start_with_src(cfg, Arc::new(src))
    }

    /// Like [`Writeback::start`] with `-w`, replaying through `src`: the layer the view
    /// uses ([`crate::fs::src_state::open_src`]).
    pub(crate) fn start_with_src(
        cfg: &Config,
        src: Arc<crate::fs::layer::Layer>,
    ) -> Result<Arc<Writeback>, WritebackError> {
        let (journal, live, next_seq) = Journal::open(&cfg.dst)?;
        let (intents, interrupted) = Intents::open(&journal::dir(&cfg.dst))?;
        let now = Instant::now();
        let mut sched = Sched::default();
        let loaded = live.len();
        for (seq, l) in live {
            sched.insert(seq, l.ms, l.op, l.ids, now + cfg.start_delay, now);
            if let Some(f) = l.fail {
                let e = sched.entries.get_mut(&seq).expect("just inserted");
                e.attempts = f.attempts;
                e.fail = Some(f);
            }
            let op = &sched.entries[&seq].op;
            sched.note_bytes(seq, upload_size(&cfg.dst, op));
        }
        let mut inner = Inner {
            journal,
            sched,
            next_seq,
            written_upto: next_seq - 1,
            durable_upto: next_seq - 1,
            accepting: true,
            shut: false,
        };
        if inner.journal.lines > loaded as u64 + 1 {
            Shared::compact(&mut inner)?;
        }
        Shared::publish_depth(&inner);
        let unrep = unrep::Store::open(&cfg.dst)?;
        METRICS
            .writeback_not_representable
            .set(unrep.map.len() as i64);
        if loaded > 0 {
            log::info!("writeback: resuming {loaded} pending ops from the journal");
        }
        let (wake_tx, wake_rx) = crossbeam_channel::bounded(1);
        let runs = journal::new_run(&cfg.dst)?;
        log::info!(
            "writeback: temp names on src this run: {}wb.{}.*",
            crate::fs::names::TEMP_PREFIX,
            runs.current
        );
        let sh = Arc::new(Shared {
            caps: caps::Caps::new(&runs, &cfg.src, &cfg.dst),
            unrep: Mutex::new(unrep),
            unrep_logged: std::sync::atomic::AtomicU64::new(0),
            leftovers: leftovers::Leftovers::open(&cfg.dst, cfg.src_settle),
            mirror: cfg.concurrent == 0,
            src,
            dst: cfg.dst.clone(),
            attempts: cfg.retries.max(1),
            retry_delay: cfg.retry_delay,
            start_delay: cfg.start_delay,
            log: cfg.log_writeback,
            runs,
            first_seq: next_seq,
            state: Mutex::new(inner),
            cond: Condvar::new(),
            sync_lock: Mutex::new(()),
            wake: wake_tx,
            stop: AtomicBool::new(false),
            changes: RwLock::new(()),
            max_dirty: AtomicU64::new(cfg.max_dirty.unwrap_or(u64::MAX)),
            dirty_stall: cfg.src_timeout.max(Duration::from_secs(1)),
            intents,
        });
        let workers = (cfg.concurrent as usize).max(1);
        let (job_tx, job_rx) = crossbeam_channel::unbounded();
        let mut threads = Vec::new();
        for i in 0..workers {
            let (s, r) = (sh.clone(), job_rx.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("writeback-{i}"))
                    .spawn(move || worker(s, r))?,
            );
        }
        // Not joined at shutdown: it may sit in a call to a hung src.
        let weak = Arc::downgrade(&sh);
        std::thread::Builder::new()
            .name("writeback-leftovers".into())
            .spawn(move || leftover_checks(weak))?;
        let s = sh.clone();
        threads.push(
            std::thread::Builder::new()
                .name("writeback-dispatch".into())
                .spawn(move || dispatcher(s, job_tx, wake_rx, workers))?,
        );
        // src's capabilities are probed before the first replay (see `worker`), so a
        // mount that changes nothing leaves src untouched. With paths listed as not
        // representable, they are probed now (src may have changed: rclone restarted
        // with --links), in a thread the start waits for at most PROBE_WAIT. Not
        // joined: it may sit in a call to a hung src; it holds no lock meanwhile.
        let probe_now = !lock(&sh.unrep).map.is_empty();
        if probe_now {
            let weak = Arc::downgrade(&sh);
            let (tried_tx, tried_rx) = crossbeam_channel::bounded(1);
            std::thread::Builder::new()
                .name("writeback-probe".into())
                .spawn(move || probe_src(weak, tried_tx))?;
            if matches!(
                tried_rx.recv_timeout(PROBE_WAIT),
                Err(RecvTimeoutError::Timeout)
            ) {
                log::info!(
                    "writeback: src does not answer the capability probe within {PROBE_WAIT:?}; \
                     probing in the background"
                );
            }
        }
        let wb = Arc::new(Writeback {
            shared: Some(sh),
            threads: Mutex::new(threads),
            mirror: cfg.concurrent == 0,
        });
        // Crash recovery, before the first request: what the journal cannot know.
        wb.resync_interrupted(interrupted)?;
        wb.requeue_open_writers()?;
        wb.resync_now_representable()?;
        Ok(wb)
    }

    /// Journals a `sync` of every path listed as not representable for a reason src
    /// can hold now (rclone restarted with `--links`, say), if the probe answered
    /// during the start. A hard link stays a copy (a sync does not link).
    fn resync_now_representable(&self) -> Result<(), WritebackError> {
        let Some(sh) = &self.shared else {
            return Ok(());
        };
        let Some(c) = sh.caps.get() else {
            return Ok(());
        };
        let fixed = [
            (c.symlinks, unrep::SYMLINK),
            (c.special_files, unrep::SPECIAL),
            (c.chmod, unrep::MODE),
            (c.chown, unrep::OWNER),
            (c.utimes, unrep::MTIME),
            (c.user_xattrs, unrep::XATTRS),
        ]
        .iter()
        .filter(|(can, _)| *can)
        .fold(0, |acc, (_, bit)| acc | bit);
        let paths: Vec<PathBuf> = lock(&sh.unrep)
            .map
            .iter()
            .filter(|(_, e)| e.what & fixed != 0)
            .map(|(p, _)| p.clone())
            .collect();
        for path in &paths {
            self.record(Op::Sync { path: path.clone() })?;
        }
        if !paths.is_empty() {
            log::info!(
                "writeback: src can now hold what {} path(s) listed as not representable \
                 need: queued a sync of each",
                paths.len()
            );
        }
        Ok(())
    }

    /// Journals a `sync` of every path whose change a crash interrupted (left in the
    /// intent file), then empties that file.
    fn resync_interrupted(&self, paths: Vec<PathBuf>) -> Result<(), WritebackError> {
        let Some(sh) = &self.shared else {
            return Ok(());
        };
        let mut seen = std::collections::BTreeSet::new();
        for path in paths.iter().filter_map(|p| op::normalize_path(p)) {
            if seen.insert(path.clone()) {
                self.record(Op::Sync { path })?;
            }
        }
        if !seen.is_empty() {
            log::info!(
                "writeback: {} path(s) were being changed when the daemon last stopped: queued a sync of each",
                seen.len()
            );
        }
        sh.intents.clear()?;
        Ok(())
    }
}
