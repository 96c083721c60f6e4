//! Bounded-time calls into src (`--src-timeout`).
//!
//! A src that stalls (a hung network under an rclone or sshfs mount) must not freeze
//! the mount: every src call runs on one of a few worker threads, and the FUSE thread
//! waits at most the timeout for it. A call that does not finish in time fails with
//! ETIMEDOUT (the core turns that into EIO and marks src offline); its worker stays
//! stuck until the kernel gives up, so while every worker is stuck new calls fail at
//! once instead of queueing forever.
//!
//! Long transfers (copy-up of a large file) are watched for progress instead: they fail
//! only after a whole timeout with no byte moved.
//!
//! Invariant: a job owns everything it touches (`'static`), so a late finish after a
//! timeout cannot touch freed memory; its result is dropped.
//!
//! Hand-offs block: the job queue and each call's answer are a mutex and a condvar
//! (a futex wait), never a spin or `sched_yield` loop. A src call costs two thread
//! wake-ups, so callers with many questions for one directory batch them into one job
//! (see `CacheFs::lookup_many`). Locks: the queue's and each answer slot's mutex are
//! leaves, held only to move a job or a result, never across a job.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

type Job = Box<dyn FnOnce() + Send>;

/// The job queue the workers wait on.
#[derive(Default)]
struct Queue {
    jobs: Mutex<(VecDeque<Job>, bool)>,
    ready: Condvar,
}

impl Queue {
    fn push(&self, job: Job) {
        self.jobs.lock().unwrap().0.push_back(job);
        self.ready.notify_one();
    }

    /// The next job; `None` once the pool is dropped.
    fn pop(&self) -> Option<Job> {
        let mut q = self.jobs.lock().unwrap();
        loop {
            if let Some(job) = q.0.pop_front() {
                return Some(job);
            }
            if q.1 {
                return None;
            }
            q = self.ready.wait(q).unwrap();
        }
    }
}

/// One call's answer: filled once by the worker, waited for by the caller.
struct Slot<T> {
    /// `Some(None)`: the job ended without an answer (it panicked).
    value: Mutex<Option<Option<T>>>,
    done: Condvar,
}

/// The worker's end of a [`Slot`]: answers `None` if dropped unanswered.
struct Answer<T>(Arc<Slot<T>>);

impl<T> Answer<T> {
    fn send(self, v: T) {
        *self.0.value.lock().unwrap() = Some(Some(v));
        self.0.done.notify_all();
    }
}

impl<T> Drop for Answer<T> {
    fn drop(&mut self) {
        let mut v = self.0.value.lock().unwrap();
        if v.is_none() {
            *v = Some(None);
            self.0.done.notify_all();
        }
    }
}

enum Waited<T> {
    Got(T),
    Timeout,
    Lost,
}

impl<T> Slot<T> {
    fn new() -> (Arc<Slot<T>>, Answer<T>) {
        let s = Arc::new(Slot {
            value: Mutex::new(None),
            done: Condvar::new(),
        });
        (Arc::clone(&s), Answer(s))
    }

    /// Waits at most `bound` for the answer (blocking, no spinning).
    fn wait(&self, bound: Duration) -> Waited<T> {
        let deadline = Instant::now() + bound;
        let mut v = self.value.lock().unwrap();
        loop {
            match v.take() {
                Some(Some(x)) => return Waited::Got(x),
                Some(None) => return Waited::Lost,
                None => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Waited::Timeout;
            }
            v = self.done.wait_timeout(v, deadline - now).unwrap().0;
        }
    }
}

pub(crate) struct SrcPool {
    queue: Arc<Queue>,
    busy: Arc<AtomicUsize>,
    workers: usize,
    timeout: Duration,
}

impl Drop for SrcPool {
    fn drop(&mut self) {
        self.queue.jobs.lock().unwrap().1 = true;
        self.queue.ready.notify_all();
    }
}

fn timed_out() -> io::Error {
    io::Error::from_raw_os_error(libc::ETIMEDOUT)
}

impl SrcPool {
    /// `timeout` zero: calls run inline, unbounded (no threads are started).
    pub(crate) fn new(workers: usize, timeout: Duration) -> SrcPool {
        let queue = Arc::new(Queue::default());
        let busy = Arc::new(AtomicUsize::new(0));
        if !timeout.is_zero() {
            for i in 0..workers {
                let queue = Arc::clone(&queue);
                std::thread::Builder::new()
                    .name(format!("cachefs-src-{i}"))
                    .spawn(move || {
                        while let Some(job) = queue.pop() {
                            job();
                        }
                    })
                    .expect("spawn a src worker thread");
            }
        }
        SrcPool {
            queue,
            busy,
            workers,
            timeout,
        }
    }

    /// Runs `f` on a worker with nobody waiting for it (a probe). Counted as busy
    /// while it runs, so that stuck background work also makes calls fail at once.
    /// With no timeout (no workers), on a thread of its own.
    pub(crate) fn spawn(&self, f: impl FnOnce() + Send + 'static) {
        if self.timeout.is_zero() {
            let _ = std::thread::Builder::new()
                .name("cachefs-src-probe".into())
                .spawn(f);
            return;
        }
        let busy = Arc::clone(&self.busy);
        busy.fetch_add(1, Ordering::AcqRel);
        let job: Job = Box::new(move || {
            f();
            busy.fetch_sub(1, Ordering::AcqRel);
        });
        self.queue.push(job);
    }

    /// Runs `f` and waits at most `bound` (never more than the timeout) for it: `None`
    /// when it has not finished by then. It goes on in the background and its result
    /// is dropped. For questions whose answer can wait (revalidation).
    pub(crate) fn run_bounded<T: Send + 'static>(
        &self,
        bound: Duration,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> Option<io::Result<T>> {
        if self.timeout.is_zero() || bound >= self.timeout {
            return Some(self.run(f));
        }
        if self.busy.load(Ordering::Acquire) >= self.workers {
            return Some(Err(timed_out()));
        }
        let (slot, answer) = Slot::new();
        self.spawn(move || answer.send(f()));
        match slot.wait(bound) {
            Waited::Got(r) => Some(r),
            Waited::Timeout => None,
            Waited::Lost => Some(Err(timed_out())),
        }
    }

    /// Runs `f` with the timeout.
    pub(crate) fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        self.run_watched(None, f)
    }

    /// Runs `f`; with `progress`, waits as long as the counter keeps moving within
    /// each timeout window.
    pub(crate) fn run_watched<T: Send + 'static>(
        &self,
        progress: Option<Arc<AtomicU64>>,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        if self.timeout.is_zero() {
            return f();
        }
        if self.busy.load(Ordering::Acquire) >= self.workers {
            // Every worker is stuck on a stalled src: fail now rather than queue.
            return Err(timed_out());
        }
        let (slot, answer) = Slot::new();
        let busy = Arc::clone(&self.busy);
        busy.fetch_add(1, Ordering::AcqRel);
        let job: Job = Box::new(move || {
            let r = f();
            busy.fetch_sub(1, Ordering::AcqRel);
            answer.send(r);
        });
        self.queue.push(job);
        let mut seen = progress.as_ref().map(|p| p.load(Ordering::Relaxed));
        loop {
            match slot.wait(self.timeout) {
                Waited::Got(r) => return r,
                Waited::Lost => return Err(timed_out()),
                Waited::Timeout => {
                    let now = progress.as_ref().map(|p| p.load(Ordering::Relaxed));
                    if now.is_none() || now == seen {
                        return Err(timed_out());
                    }
                    seen = now;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn fast_calls_pass_and_stalls_time_out() {
        let pool = SrcPool::new(2, Duration::from_millis(100));
        assert_eq!(pool.run(|| Ok(7)).unwrap(), 7);
        let t = Instant::now();
        let e = pool
            .run(|| {
                std::thread::sleep(Duration::from_secs(2));
                Ok(())
            })
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ETIMEDOUT));
        assert!(t.elapsed() < Duration::from_secs(1));
        // One worker is stuck, the other still serves.
        assert_eq!(pool.run(|| Ok(1)).unwrap(), 1);
        // With both stuck, calls fail at once.
        let _ = pool.run(|| {
            std::thread::sleep(Duration::from_secs(2));
            Ok(())
        });
        let t = Instant::now();
        assert!(pool.run(|| Ok(2)).is_err());
        assert!(t.elapsed() < Duration::from_millis(50));
    }

    #[test]
    fn progress_keeps_a_long_call_alive() {
        let pool = SrcPool::new(1, Duration::from_millis(100));
        let progress = Arc::new(AtomicU64::new(0));
        let p = Arc::clone(&progress);
        let r = pool.run_watched(Some(progress), move || {
            for _ in 0..6 {
                std::thread::sleep(Duration::from_millis(50));
                p.fetch_add(1, Ordering::Relaxed);
            }
            Ok("done")
        });
        assert_eq!(r.unwrap(), "done");
    }

    #[test]
    fn a_bounded_call_returns_at_its_bound_and_goes_on() {
        let pool = SrcPool::new(2, Duration::from_secs(5));
        let done = Arc::new(AtomicU64::new(0));
        let d = Arc::clone(&done);
        let t = Instant::now();
        let r = pool.run_bounded(Duration::from_millis(50), move || {
            std::thread::sleep(Duration::from_millis(300));
            d.store(1, Ordering::Relaxed);
            Ok(())
        });
        assert!(r.is_none() && t.elapsed() < Duration::from_millis(250));
        assert_eq!(
            pool.run_bounded(Duration::from_millis(500), || Ok(5))
                .unwrap()
                .unwrap(),
            5
        );
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(
            done.load(Ordering::Relaxed),
            1,
            "the slow call finished in the background"
        );
    }

    #[test]
    fn zero_timeout_runs_inline() {
        let pool = SrcPool::new(0, Duration::ZERO);
        assert_eq!(pool.run(|| Ok(3)).unwrap(), 3);
    }
}
