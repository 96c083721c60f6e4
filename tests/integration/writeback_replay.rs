//! Scenario tests of writeback replay on real directories (no FUSE): mutate dst as the
//! layered view would, record the ops, let the workers replay, compare src with dst.

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::time::{Duration, Instant};

use crate::writeback_support::*;
use cachefs::writeback::{Op, Writeback};

const T: Duration = Duration::from_secs(20);

#[test]
fn every_kind_of_op_converges() {
    init_logging();
    let env = Env::new();
    let wb = env.start(4);
    fs::create_dir(env.d("dir")).unwrap();
    rec(&wb, Op::Mkdir { path: p("dir") });
    fs::set_permissions(env.d("dir"), fs::Permissions::from_mode(0o750)).unwrap();
    rec(&wb, Op::SetAttr { path: p("dir") });
    fs::write(env.d("dir/f"), b"hello").unwrap();
    rec(&wb, Op::Create { path: p("dir/f") });
    fs::set_permissions(env.d("dir/f"), fs::Permissions::from_mode(0o4640)).unwrap();
    std::os::unix::fs::chown(env.d("dir/f"), Some(1234), Some(4321)).unwrap();
    set_mtime(&env.d("dir/f"), 1_000_000_000, 123_456_789);
    rec(&wb, Op::SetAttr { path: p("dir/f") });
    set_xattr(&env.d("dir/f"), "user.color", b"blue");
    rec(&wb, Op::Xattr { path: p("dir/f") });
    symlink("../dir/f", env.d("dir/l")).unwrap();
    rec(&wb, Op::Symlink { path: p("dir/l") });
    fs::hard_link(env.d("dir/f"), env.d("hard")).unwrap();
    rec(
        &wb,
        Op::Link {
            existing: p("dir/f"),
            new: p("hard"),
        },
    );
    let fifo = std::ffi::CString::new(env.d("fifo").into_os_string().into_encoded_bytes()).unwrap();
    // SAFETY: valid path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    rec(&wb, Op::Mknod { path: p("fifo") });
    fs::create_dir_all(env.d("gone/sub")).unwrap();
    rec(&wb, Op::Mkdir { path: p("gone") });
    rec(
        &wb,
        Op::Mkdir {
            path: p("gone/sub"),
        },
    );
    fs::write(env.d("x"), b"x").unwrap();
    rec(&wb, Op::Create { path: p("x") });
    wait_idle(&wb, T);
    assert_converged(&env);
    fs::remove_dir(env.d("gone/sub")).unwrap();
    rec(
        &wb,
        Op::Rmdir {
            path: p("gone/sub"),
        },
    );
    fs::remove_dir(env.d("gone")).unwrap();
    rec(&wb, Op::Rmdir { path: p("gone") });
    fs::remove_file(env.d("x")).unwrap();
    rec(&wb, Op::Unlink { path: p("x") });
    fs::rename(env.d("dir"), env.d("dir2")).unwrap();
    rec(
        &wb,
        Op::Rename {
            from: p("dir"),
            to: p("dir2"),
            exchange: false,
        },
    );
    fs::write(env.d("hard"), b"rewritten through the other link").unwrap();
    rec(&wb, Op::Write { path: p("hard") });
    wait_idle(&wb, T);
    assert_converged(&env);
    use std::os::unix::fs::MetadataExt;
    let a = fs::metadata(env.s("hard")).unwrap();
    let b = fs::metadata(env.s("dir2/f")).unwrap();
    assert_eq!(a.ino(), b.ino(), "hard link kept on src");
}

#[test]
fn ten_writes_to_one_path_are_one_journal_op() {
    let env = Env::new();
    let wb = Writeback::start(&env.cfg(2, Duration::from_secs(3600))).unwrap();
    fs::write(env.d("f"), b"0").unwrap();
    rec(&wb, Op::Create { path: p("f") });
    for i in 0..10 {
        fs::write(env.d("f"), format!("v{i}")).unwrap();
        rec(&wb, Op::Write { path: p("f") });
        rec(&wb, Op::SetAttr { path: p("f") });
    }
    assert_eq!(env.journal_ops(), 1);
    assert!(!env.s("f").exists(), "start delay holds replay back");
    // wait_synced waives the start delay.
    wb.wait_synced(&p("f")).unwrap();
    assert_eq!(fs::read(env.s("f")).unwrap(), b"v9");
}

#[test]
fn file_renamed_then_deleted_while_pending() {
    let env = Env::new();
    let wb = Writeback::start(&env.cfg(3, Duration::from_millis(300))).unwrap();
    fs::write(env.d("a"), b"data").unwrap();
    rec(&wb, Op::Create { path: p("a") });
    fs::rename(env.d("a"), env.d("b")).unwrap();
    rec(
        &wb,
        Op::Rename {
            from: p("a"),
            to: p("b"),
            exchange: false,
        },
    );
    fs::remove_file(env.d("b")).unwrap();
    rec(&wb, Op::Unlink { path: p("b") });
    // And the same with the file already on src.
    fs::write(env.s("c"), b"old").unwrap();
    fs::write(env.d("c"), b"new").unwrap();
    rec(&wb, Op::Write { path: p("c") });
    fs::rename(env.d("c"), env.d("e")).unwrap();
    rec(
        &wb,
        Op::Rename {
            from: p("c"),
            to: p("e"),
            exchange: false,
        },
    );
    wait_idle(&wb, T);
    assert_converged(&env);
    assert_eq!(fs::read(env.s("e")).unwrap(), b"new");
    fs::remove_file(env.d("e")).unwrap();
    rec(&wb, Op::Unlink { path: p("e") });
    wait_idle(&wb, T);
    assert_converged(&env);
}

#[test]
fn directory_renamed_while_children_content_pending() {
    let env = Env::new();
    // src already has the directory with old content; dst rewrote the children.
    fs::create_dir_all(env.s("a/sub")).unwrap();
    fs::write(env.s("a/f"), b"old f").unwrap();
    fs::write(env.s("a/sub/g"), b"old g").unwrap();
    fs::create_dir_all(env.d("a/sub")).unwrap();
    let wb = Writeback::start(&env.cfg(4, Duration::from_millis(200))).unwrap();
    fs::write(env.d("a/f"), b"new f").unwrap();
    rec(&wb, Op::Write { path: p("a/f") });
    fs::write(env.d("a/sub/g"), b"new g").unwrap();
    rec(&wb, Op::Write { path: p("a/sub/g") });
    fs::write(env.d("a/sub/h"), b"new h").unwrap();
    rec(&wb, Op::Create { path: p("a/sub/h") });
    fs::rename(env.d("a"), env.d("b")).unwrap();
    rec(
        &wb,
        Op::Rename {
            from: p("a"),
            to: p("b"),
            exchange: false,
        },
    );
    // And again, deeper: b/sub -> c while its content is still pending.
    fs::rename(env.d("b/sub"), env.d("c")).unwrap();
    rec(
        &wb,
        Op::Rename {
            from: p("b/sub"),
            to: p("c"),
            exchange: false,
        },
    );
    wait_idle(&wb, T);
    assert_converged(&env);
    assert_eq!(fs::read(env.s("c/g")).unwrap(), b"new g");
    assert!(!env.s("a").exists());
}

#[test]
fn directory_rename_is_a_rename_on_src() {
    use std::os::unix::fs::MetadataExt;
    let env = Env::new();
    fs::create_dir(env.s("big")).unwrap();
    fs::write(env.s("big/only-on-src"), b"never cached").unwrap();
    let ino = fs::metadata(env.s("big/only-on-src")).unwrap().ino();
    fs::create_dir(env.d("big")).unwrap();
    let wb = env.start(2);
    fs::rename(env.d("big"), env.d("moved")).unwrap();
    rec(
        &wb,
        Op::Rename {
            from: p("big"),
            to: p("moved"),
            exchange: false,
        },
    );
    wait_idle(&wb, T);
    assert_eq!(fs::metadata(env.s("moved/only-on-src")).unwrap().ino(), ino);
    assert!(!env.s("big").exists());
}

#[test]
fn rename_exchange() {
    let env = Env::new();
    let wb = env.start(2);
    fs::write(env.d("x"), b"x").unwrap();
    fs::create_dir(env.d("y")).unwrap();
    rec(&wb, Op::Create { path: p("x") });
    rec(&wb, Op::Mkdir { path: p("y") });
    wait_idle(&wb, T);
    // exchange x and y in dst by hand (three renames), record one exchange
    fs::rename(env.d("x"), env.d("t")).unwrap();
    fs::rename(env.d("y"), env.d("x")).unwrap();
    fs::rename(env.d("t"), env.d("y")).unwrap();
    rec(
        &wb,
        Op::Rename {
            from: p("x"),
            to: p("y"),
            exchange: true,
        },
    );
    wait_idle(&wb, T);
    assert_converged(&env);
}

#[test]
fn file_rewritten_during_its_own_upload() {
    let env = Env::new();
    let wb = env.start(1);
    let big = vec![b'a'; 64 << 20];
    fs::write(env.d("big"), &big).unwrap();
    rec(&wb, Op::Create { path: p("big") });
    // Let the upload start, then rewrite the file underneath it.
    let t = Instant::now();
    while !env.src.read_dir().unwrap().any(|_| true) && t.elapsed() < T {
        std::thread::yield_now();
    }
    fs::write(env.d("big"), b"short and final").unwrap();
    rec(&wb, Op::Write { path: p("big") });
    wait_idle(&wb, T);
    assert_converged(&env);
    assert_eq!(fs::read(env.s("big")).unwrap(), b"short and final");
}

#[test]
fn whiteouts_and_opaque_markers_never_reach_src() {
    let env = Env::new();
    // src has a dir with two files; the user deleted one (whiteout) and made another dir
    // opaque (rmdir + mkdir), then renamed the parent while src lacked it under that name.
    fs::create_dir_all(env.s("keep")).unwrap();
    fs::write(env.s("keep/deleted"), b"1").unwrap();
    fs::write(env.s("keep/kept"), b"2").unwrap();
    fs::create_dir_all(env.s("op")).unwrap();
    fs::write(env.s("op/hidden"), b"3").unwrap();
    fs::create_dir_all(env.d("keep")).unwrap();
    fs::write(env.d("keep/kept"), b"2").unwrap();
    fs::write(env.d("keep/.cachefs-wh.deleted"), b"").unwrap();
    fs::create_dir_all(env.d("op")).unwrap();
    fs::write(env.d("op/.cachefs-opaque"), b"").unwrap();
    fs::write(env.d("op/new"), b"4").unwrap();
    let wb = env.start(2);
    rec(&wb, Op::Sync { path: p("") });
    wait_idle(&wb, T);
    assert_converged(&env);
    assert!(!env.s("keep/deleted").exists() && !env.s("op/hidden").exists());
    // Internal names are refused outright.
    assert!(
        wb.record(Op::Create {
            path: p("keep/.cachefs-wh.x")
        })
        .is_err()
    );
    assert!(wb.record(Op::Create { path: p("../etc") }).is_err());
}

#[test]
fn mirror_mode_wait_synced_means_src_has_the_bytes() {
    let env = Env::new();
    let wb = env.start(0);
    fs::create_dir(env.d("d")).unwrap();
    rec(&wb, Op::Mkdir { path: p("d") });
    for i in 0..20 {
        let body = format!("version {i}").repeat(1000);
        fs::write(env.d("d/f"), &body).unwrap();
        rec(&wb, Op::Write { path: p("d/f") });
        wb.wait_synced(&p("d/f")).unwrap();
        assert_eq!(fs::read(env.s("d/f")).unwrap(), body.as_bytes());
    }
    assert_converged(&env);
}

#[test]
fn symlink_in_src_is_never_followed() {
    let env = Env::new();
    let outside = env.tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    // src has a symlink where the view has a directory (dst wins): replay must replace
    // the link by a real directory, never write through it.
    symlink(&outside, env.s("d")).unwrap();
    fs::create_dir(env.d("d")).unwrap();
    fs::write(env.d("d/f"), b"secret").unwrap();
    let wb = env.start(1);
    rec(&wb, Op::Create { path: p("d/f") });
    wb.wait_synced(&p("d/f")).unwrap();
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    assert!(fs::symlink_metadata(env.s("d")).unwrap().is_dir());
    assert_converged(&env);
}

#[test]
fn shutdown_persists_and_restart_resumes() {
    let env = Env::new();
    {
        let wb = Writeback::start(&env.cfg(2, Duration::from_secs(3600))).unwrap();
        fs::write(env.d("f"), b"later").unwrap();
        rec(&wb, Op::Create { path: p("f") });
        // A zero wait still drains what is ready; a retry backoff would be kept.
        wb.shutdown(Duration::ZERO);
        assert!(wb.record(Op::Write { path: p("f") }).is_err());
    }
    let wb = env.start(2);
    wait_idle(&wb, T);
    assert_converged(&env);
    assert_eq!(env.journal_ops(), 0, "applied ops leave the journal");
}

#[test]
fn journal_is_compacted() {
    let env = Env::new();
    let wb = env.start(2);
    for i in 0..3000 {
        let n = format!("f{}", i % 50);
        fs::write(env.d(&n), format!("{i}")).unwrap();
        rec(&wb, Op::Write { path: p(&n) });
        if i % 100 == 0 {
            wait_idle(&wb, T);
        }
    }
    wait_idle(&wb, T);
    assert_converged(&env);
    let j = env.dst.join(".cachefs-state/writeback/journal");
    drop(wb);
    let lines = fs::read_to_string(j).unwrap().lines().count();
    assert!(lines < 100, "{lines} lines after shutdown");
}

/// A dst file still carrying the origin xattr of a version before the origin record
/// store (`user.cachefs.origin`, written by non-root daemons) uploads without it; the
/// user's own xattrs go along.
#[test]
fn old_origin_xattrs_never_reach_src() {
    init_logging();
    let env = Env::new();
    let wb = env.start(2);
    fs::write(env.d("f"), b"data").unwrap();
    if !set_xattr(&env.d("f"), "user.cachefs.origin", b"v1 4 0 0 1 1") {
        return; // no user xattrs on this filesystem
    }
    assert!(set_xattr(&env.d("f"), "user.mine", b"kept"));
    rec(&wb, Op::Create { path: p("f") });
    wait_idle(&wb, T);
    assert_eq!(fs::read(env.s("f")).unwrap(), b"data");
    let names = |path: &std::path::Path| {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        let mut buf = vec![0u8; 4096];
        // SAFETY: buffer valid for its length.
        let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        String::from_utf8_lossy(&buf[..n.max(0) as usize]).into_owned()
    };
    let on_src = names(&env.s("f"));
    assert!(on_src.contains("user.mine"), "{on_src:?}");
    assert!(!on_src.contains("cachefs"), "{on_src:?}");
}
