//! kill -9 of a process with a pending writeback queue, then a restart: nothing journaled
//! is lost and src converges. The victim is this test binary itself, re-run with
//! `CACHEFS_WB_VICTIM=<dir>` on the `writeback_crash::victim` test, and SIGKILLed by the
//! parent.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::writeback_support::*;
use cachefs::config::Config;
use cachefs::writeback::{Op, Writeback};

/// The child side: mutate dst, record, announce, then wait to be killed.
#[test]
fn victim() {
    let Ok(dir) = std::env::var("CACHEFS_WB_VICTIM") else {
        return; // not a child run
    };
    let dir = PathBuf::from(dir);
    let delay: u64 = std::env::var("CACHEFS_WB_DELAY").unwrap().parse().unwrap();
    let mut cfg = Config::new(dir.join("src"), dir.join("dst"), dir.join("mnt"));
    cfg.writeback = true;
    cfg.concurrent = 2;
    cfg.start_delay = Duration::from_millis(delay);
    let wb = Writeback::start(&cfg).unwrap();
    let d = |s: &str| dir.join("dst").join(s);
    fs::create_dir(d("a")).unwrap();
    wb.record(Op::Mkdir { path: p("a") }).unwrap();
    for i in 0..40 {
        let name = format!("a/f{i}");
        fs::write(d(&name), vec![b'0' + (i % 10) as u8; 1 << 20]).unwrap();
        wb.record(Op::Create { path: p(&name) }).unwrap();
    }
    fs::rename(d("a/f0"), d("a/moved")).unwrap();
    wb.record(Op::Rename {
        from: p("a/f0"),
        to: p("a/moved"),
        exchange: false,
    })
    .unwrap();
    fs::remove_file(d("a/f1")).unwrap();
    wb.record(Op::Unlink { path: p("a/f1") }).unwrap();
    fs::rename(d("a"), d("b")).unwrap();
    wb.record(Op::Rename {
        from: p("a"),
        to: p("b"),
        exchange: false,
    })
    .unwrap();
    println!("RECORDED");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(600));
}

fn run_and_kill(env: &Env, delay_ms: u64, extra_wait: Duration) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "writeback_crash::victim",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("CACHEFS_WB_VICTIM", env.tmp.path())
        .env("CACHEFS_WB_DELAY", delay_ms.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    let mut ok = false;
    for l in out.lines() {
        if l.unwrap().contains("RECORDED") {
            ok = true;
            break;
        }
    }
    assert!(ok, "victim did not record");
    std::thread::sleep(extra_wait);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

#[test]
fn kill_9_before_replay_then_restart_converges() {
    let env = Env::new();
    run_and_kill(&env, 3_600_000, Duration::ZERO);
    assert_eq!(
        fs::read_dir(&env.src).unwrap().count(),
        0,
        "start delay held"
    );
    assert!(env.journal_ops() >= 42);
    let wb = env.start(3);
    wait_idle(&wb, Duration::from_secs(30));
    assert_converged(&env);
    assert!(env.s("b/moved").exists() && !env.s("b/f1").exists());
}

#[test]
fn kill_9_mid_replay_then_restart_converges() {
    for wait_ms in [0, 20, 80] {
        let env = Env::new();
        run_and_kill(&env, 0, Duration::from_millis(wait_ms));
        let wb = env.start(3);
        wait_idle(&wb, Duration::from_secs(30));
        assert_converged(&env);
    }
}
