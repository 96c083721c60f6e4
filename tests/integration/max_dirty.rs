//! `--max-dirty`: when more data waits for src than the limit, new writers wait for the
//! writeback to catch up (backpressure); if nothing reaches src for `--src-timeout`
//! they get ENOSPC instead of hanging, and nothing already written is lost.
//! src is a real bindfs mount that is paused (SIGSTOP) to hold the queue. Waiting
//! writers never hold the FUSE threads: readers go on meanwhile.

use std::io::Write;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::bindfs_support::{self, BindfsSrc};
use crate::common::*;

const MIB: usize = 1 << 20;

/// A mount with `-w --max-dirty 1M` over a bindfs src, with `big` and `second`
/// already written back (so opening them later needs nothing from src).
fn setup(src_timeout: &str) -> Option<(Mounted, BindfsSrc)> {
    let real = dir_with(&[]);
    let srcmnt = tempdir();
    let bind = BindfsSrc::start(real, srcmnt.path())?;
    let m = Mounted::with_dirs(
        srcmnt,
        tempdir(),
        // One FUSE thread: a writer waiting on it would block every reader.
        &[
            "-w",
            "--max-dirty",
            "1M",
            "--src-timeout",
            src_timeout,
            "--threads",
            "1",
        ],
    );
    std::fs::write(m.mnt_path("big"), b"small").unwrap();
    std::fs::write(m.mnt_path("second"), b"").unwrap();
    wait_drained(&m, Duration::from_secs(20));
    Some((m, bind))
}

/// Write 2 MiB into `big` while src is paused: more than the limit now waits.
fn overrun(m: &Mounted) -> Vec<u8> {
    let data = pattern(2 * MIB, 7);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(m.mnt_path("big"))
        .unwrap();
    f.write_all(&data).unwrap();
    drop(f);
    data
}

/// Open `second` for writing in a thread; the receiver gets the open's result.
fn open_second(m: &Mounted) -> Answer {
    let (tx, rx) = mpsc::channel();
    let p = m.mnt_path("second");
    // Before the spawn: the caller's waits count from here, and a thread that starts
    // late under load must not measure a shorter wait than the caller saw.
    let t = Instant::now();
    std::thread::spawn(move || {
        let r = std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .and_then(|mut f| f.write_all(b"after the wait"));
        let _ = tx.send((r, t.elapsed()));
    });
    rx
}

type Answer = mpsc::Receiver<(std::io::Result<()>, Duration)>;

/// The scene of both tests: src paused, 2 MiB written into `big` (over the 1M limit),
/// and a second writer trying to open `second`. None if mounts cannot run here.
fn overrun_paused_src(
    test: &str,
    src_timeout: &str,
) -> Option<(Mounted, BindfsSrc, Vec<u8>, Answer)> {
    if !can_mount(test) || !bindfs_support::have_bindfs() {
        return None;
    }
    let (m, bind) = setup(src_timeout).expect("bindfs starts");
    bind.pause(true);
    let data = overrun(&m);
    let rx = open_second(&m);
    Some((m, bind, data, rx))
}

#[test]
fn writers_wait_while_too_much_waits_for_src() {
    let Some((m, bind, data, rx)) = overrun_paused_src("writers_wait_while", "30") else {
        return;
    };
    // Still waiting after a while: the 2 MiB cannot reach the paused src.
    assert!(
        rx.recv_timeout(Duration::from_millis(1500)).is_err(),
        "a writer got in over --max-dirty"
    );
    m.wait_for_log("over --max-dirty", Duration::from_secs(5));
    // Readers (and stat) are served meanwhile, even with a single FUSE thread.
    let t = Instant::now();
    assert_eq!(std::fs::read(m.mnt_path("big")).unwrap(), data);
    assert!(std::fs::metadata(m.mnt_path("second")).is_ok());
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "{:?} {}",
        t.elapsed(),
        m.stderr()
    );
    assert!(rx.try_recv().is_err(), "the writer is still waiting");
    bind.pause(false);
    let (r, waited) = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the writer is let in once src catches up");
    r.unwrap();
    assert!(waited >= Duration::from_millis(1500), "{waited:?}");
    wait_drained(&m, Duration::from_secs(20));
    assert_eq!(std::fs::read(m.src_path("big")).unwrap(), data);
    assert_eq!(
        std::fs::read(m.src_path("second")).unwrap(),
        b"after the wait"
    );
    m.stop();
}

#[test]
fn a_stalled_src_gives_enospc_and_loses_nothing() {
    let Some((m, bind, data, rx)) = overrun_paused_src("a_stalled_src", "2") else {
        return;
    };
    let (r, waited) = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the writer is answered, not left hanging");
    assert_eq!(
        errno_of("open over --max-dirty with src stalled", r),
        libc::ENOSPC
    );
    assert!(waited >= Duration::from_secs(2), "{waited:?}");
    m.wait_for_log("refusing new writes (ENOSPC)", Duration::from_secs(5));
    // What was written before is intact, and reads still work.
    assert_eq!(std::fs::read(m.mnt_path("big")).unwrap(), data);
    bind.pause(false);
    wait_drained(&m, Duration::from_secs(30));
    assert_eq!(std::fs::read(m.src_path("big")).unwrap(), data);
    // Under the limit again: writers get in at once.
    std::fs::write(m.mnt_path("second"), b"later").unwrap();
    wait_drained(&m, Duration::from_secs(20));
    assert_eq!(std::fs::read(m.src_path("second")).unwrap(), b"later");
    m.stop();
}
