//! The layered view on a real mount (DESIGN section 1): merged listings, no copy on
//! stat, renames, rmdir+mkdir, whiteouts, GoCacheFS whiteouts and reserved names.
//! Every test runs cachefs in cache mode (no -w) and ends by proving src untouched.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;

use crate::common::*;

/// Attribute caching off: every stat reaches the daemon, so the tests see its answers.
const ARGS: &[&str] = &["--attr-ttl", "0"];

fn mount(src: TempDir, dst: TempDir) -> Mounted {
    Mounted::with_dirs(src, dst, ARGS)
}

/// Every non-reserved path in dst (the state folder at the root is allowed).
fn dst_user_entries(m: &Mounted) -> Vec<String> {
    let mut v: Vec<String> = find_names(m.dst.path(), &|_| true)
        .into_iter()
        .map(|p| {
            p.strip_prefix(m.dst.path())
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|p| !p.starts_with(".cachefs-state"))
        .collect();
    v.sort();
    v
}

fn enoent(p: &Path) {
    assert_eq!(
        errno_of(&format!("lstat {}", p.display()), fs::symlink_metadata(p)),
        libc::ENOENT,
        "{}",
        p.display()
    );
}

// ----- 1. merged listings --------------------------------------------------------------

#[test]
fn listing_merges_src_and_dst_and_dst_wins() {
    if !can_mount("listing_merges_src_and_dst_and_dst_wins") {
        return;
    }
    let src = dir_with(&[
        ("srconly", b"s"),
        ("both", b"from src"),
        ("dir/s", b"1"),
        ("dir/shared", b"src"),
        ("opq/hidden", b"h"),
    ]);
    fs::set_permissions(src.path().join("both"), fs::Permissions::from_mode(0o644)).unwrap();
    let dst = dir_with(&[
        ("dstonly", b"d"),
        ("both", b"DST"),
        ("dir/d", b"2"),
        ("dir/shared", b"dst!"),
        ("dironly/x", b"x"),
        ("opq/mine", b"m"),
    ]);
    fs::set_permissions(dst.path().join("both"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::create_dir(dst.path().join("emptydironly")).unwrap();
    // dst's opq is opaque: src's opq/hidden must not show.
    fs::write(dst.path().join("opq/.cachefs-opaque"), b"").unwrap();
    let before = snapshot(src.path());
    let m = mount(src, dst);

    assert_eq!(
        names(m.mountpoint()),
        [
            "both",
            "dir",
            "dironly",
            "dstonly",
            "emptydironly",
            "opq",
            "srconly"
        ]
    );
    assert_eq!(names(&m.mnt_path("dir")), ["d", "s", "shared"]);
    assert_eq!(names(&m.mnt_path("dironly")), ["x"]);
    assert!(names(&m.mnt_path("emptydironly")).is_empty());
    assert_eq!(names(&m.mnt_path("opq")), ["mine"]);
    enoent(&m.mnt_path("opq/hidden"));
    // dst wins: content and attributes.
    assert_eq!(fs::read(m.mnt_path("both")).unwrap(), b"DST");
    let md = fs::metadata(m.mnt_path("both")).unwrap();
    assert_eq!((md.len(), md.mode() & 0o7777), (3, 0o600));
    assert_eq!(fs::read(m.mnt_path("dir/shared")).unwrap(), b"dst!");
    assert_eq!(fs::read(m.mnt_path("dir/s")).unwrap(), b"1");
    assert_eq!(fs::read(m.mnt_path("srconly")).unwrap(), b"s");
    assert_eq!(fs::read(m.mnt_path("dironly/x")).unwrap(), b"x");
    // d_type from readdir.
    for e in fs::read_dir(m.mountpoint()).unwrap() {
        let e = e.unwrap();
        let want_dir =
            ["dir", "dironly", "emptydironly", "opq"].contains(&e.file_name().to_str().unwrap());
        assert_eq!(
            e.file_type().unwrap().is_dir(),
            want_dir,
            "{:?}",
            e.file_name()
        );
    }
    assert_unchanged(m.src.path(), &before);
    m.stop();
}

#[test]
fn listing_never_shows_reserved_names() {
    if !can_mount("listing_never_shows_reserved_names") {
        return;
    }
    let src = dir_with(&[
        ("a", b"a"),
        // Whiteout-looking names in src are not whiteouts and are never shown.
        (".cachefs-wh.x", b""),
        (".cachefs-wh.a", b""),
        (".cachefs-opaque", b""),
        (".__gocachefs_rm__----a", b""),
        ("sub/.cachefs-wh.b", b""),
        ("sub/b", b"b"),
        ("sub/gone", b"g"),
    ]);
    let dst = dir_with(&[
        (".cachefs-wh.zzz", b""),
        (".cachefs-whh.0123456789abcdef", b"some long name"),
        (".cachefs-tmp.1.2", b"partial"),
        (".cachefs-state/journal", b"j"),
        ("sub/.cachefs-tmp.3.4", b"partial"),
        ("sub/.cachefs-wh.gone", b""),
        ("sub/mine", b"m"),
        ("empty/.cachefs-opaque", b""),
    ]);
    let before = snapshot(src.path());
    let m = mount(src, dst);
    assert_eq!(names(m.mountpoint()), ["a", "empty", "sub"]);
    assert_eq!(names(&m.mnt_path("sub")), ["b", "mine"]);
    assert!(names(&m.mnt_path("empty")).is_empty());
    // src's `.cachefs-wh.a` does not hide a.
    assert_eq!(fs::read(m.mnt_path("a")).unwrap(), b"a");
    for n in [
        ".cachefs-wh.x",
        ".cachefs-wh.a",
        ".cachefs-opaque",
        ".__gocachefs_rm__----a",
        ".cachefs-state",
        ".cachefs-state/journal",
        ".cachefs-wh.zzz",
        ".cachefs-tmp.1.2",
        "sub/.cachefs-wh.b",
        "sub/.cachefs-tmp.3.4",
        "sub/.cachefs-wh.gone",
        "sub/gone",
        "empty/.cachefs-opaque",
    ] {
        enoent(&m.mnt_path(n));
    }
    assert_unchanged(m.src.path(), &before);
    m.stop();
}

// ----- 2. stat/lookup never copy -------------------------------------------------------

#[test]
fn stat_readdir_readlink_and_xattr_reads_copy_nothing() {
    if !can_mount("stat_readdir_readlink_and_xattr_reads_copy_nothing") {
        return;
    }
    let src = dir_with(&[
        ("top", b"t"),
        ("a/b/c.txt", b"hello"),
        ("a/big", &pattern(1 << 20, 1)),
    ]);
    symlink("b/c.txt", src.path().join("a/link")).unwrap();
    fs::create_dir(src.path().join("a/emptydir")).unwrap();
    let before = snapshot(src.path());
    let m = mount(src, tempdir());
    for rel in [
        "top",
        "a",
        "a/b",
        "a/b/c.txt",
        "a/big",
        "a/link",
        "a/emptydir",
    ] {
        let md = fs::symlink_metadata(m.mnt_path(rel)).unwrap();
        let want = &before[Path::new(rel)];
        assert_eq!(md.mode(), want.mode, "{rel}");
        if !md.is_dir() {
            assert_eq!(md.size(), want.size, "{rel}");
        }
    }
    assert_eq!(fs::metadata(m.mnt_path("a/link")).unwrap().len(), 5);
    assert_eq!(
        fs::read_link(m.mnt_path("a/link")).unwrap(),
        Path::new("b/c.txt")
    );
    let out = std::process::Command::new("ls")
        .arg("-laR")
        .arg(m.mountpoint())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("c.txt"));
    let _ = user_xattrs(&m.mnt_path("a/big"));
    assert_eq!(
        // SAFETY: valid NUL-terminated path.
        unsafe { libc::access(cpath(&m.mnt_path("a/big")).as_ptr(), libc::R_OK) },
        0
    );
    assert_eq!(
        dst_user_entries(&m),
        Vec::<String>::new(),
        "dst got entries"
    );
    assert_unchanged(m.src.path(), &before);
    m.stop();
}

// ----- 7. renames ----------------------------------------------------------------------

/// A src tree of a few MiB: several levels, symlinks, odd modes, an empty dir.
fn tree_src() -> TempDir {
    let src = dir_with(&[
        ("tree/a", &pattern(1 << 20, 2)),
        ("tree/sub/b", &pattern(2 << 20, 3)),
        ("tree/sub/deeper/c", &pattern(777_777, 4)),
        ("tree/sub/deeper/deepest/d", b"d"),
        ("other", b"o"),
    ]);
    let p = src.path();
    fs::create_dir(p.join("tree/empty")).unwrap();
    symlink("../a", p.join("tree/sub/rel")).unwrap();
    symlink("/etc/passwd", p.join("tree/sub/deeper/abs")).unwrap();
    symlink("nowhere", p.join("tree/dangling")).unwrap();
    fs::set_permissions(
        p.join("tree/sub/deeper/c"),
        fs::Permissions::from_mode(0o751),
    )
    .unwrap();
    fs::set_permissions(p.join("tree/a"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::set_permissions(p.join("tree/sub/deeper"), fs::Permissions::from_mode(0o711)).unwrap();
    std::os::unix::fs::chown(p.join("tree/sub/b"), Some(1234), Some(5678)).unwrap();
    src
}

/// Compares the view at `mnt_rel` with src's tree at `src_rel`: names, kinds, bytes,
/// modes, owners, symlink targets.
fn assert_same_tree(m: &Mounted, src_rel: &str, mnt_rel: &str) {
    let want = snapshot(&m.src_path(src_rel));
    let got = snapshot(&m.mnt_path(mnt_rel));
    assert_eq!(
        want.keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>(),
        "entries of {mnt_rel} vs src {src_rel}"
    );
    for (k, w) in &want {
        let g = &got[k];
        assert_eq!(
            (w.mode, w.uid, w.gid, &w.data),
            (g.mode, g.uid, g.gid, &g.data),
            "{mnt_rel}/{} differs from src {src_rel}/{}",
            k.display(),
            k.display()
        );
        if w.mode & libc::S_IFMT != libc::S_IFDIR {
            assert_eq!(w.size, g.size, "{}", k.display());
        }
    }
}

#[test]
fn rename_uncached_file_keeps_bytes_mode_and_inode() {
    if !can_mount("rename_uncached_file_keeps_bytes_mode_and_inode") {
        return;
    }
    let data = pattern(3 << 20, 9);
    let src = dir_with(&[("f", &data), ("d/g", b"g")]);
    fs::set_permissions(src.path().join("f"), fs::Permissions::from_mode(0o640)).unwrap();
    let before = snapshot(src.path());
    let mut m = mount(src, tempdir());
    let ino = fs::metadata(m.mnt_path("f")).unwrap().ino();
    fs::rename(m.mnt_path("f"), m.mnt_path("d/renamed")).unwrap();
    enoent(&m.mnt_path("f"));
    let md = fs::metadata(m.mnt_path("d/renamed")).unwrap();
    assert_eq!(
        (md.ino(), md.mode() & 0o7777, md.len()),
        (ino, 0o640, data.len() as u64)
    );
    assert!(
        fs::read(m.mnt_path("d/renamed")).unwrap() == data,
        "content differs"
    );
    assert_eq!(names(m.mountpoint()), ["d"]);
    assert_eq!(names(&m.mnt_path("d")), ["g", "renamed"]);
    m.stop_and_restart(ARGS);
    enoent(&m.mnt_path("f"));
    assert!(
        fs::read(m.mnt_path("d/renamed")).unwrap() == data,
        "content after restart"
    );
    assert_unchanged(m.src.path(), &before);
    m.stop();
}

#[test]
fn rename_uncached_tree_preserves_everything() {
    if !can_mount("rename_uncached_tree_preserves_everything") {
        return;
    }
    let src = tree_src();
    let before = snapshot(src.path());
    let mut m = mount(src, tempdir());
    let ino_tree = fs::metadata(m.mnt_path("tree")).unwrap().ino();
    let ino_c = fs::metadata(m.mnt_path("tree/sub/deeper/c")).unwrap().ino();
    fs::rename(m.mnt_path("tree"), m.mnt_path("moved")).unwrap();
    enoent(&m.mnt_path("tree"));
    enoent(&m.mnt_path("tree/a"));
    assert_eq!(names(m.mountpoint()), ["moved", "other"]);
    assert_same_tree(&m, "tree", "moved");
    assert_eq!(fs::metadata(m.mnt_path("moved")).unwrap().ino(), ino_tree);
    assert_eq!(
        fs::metadata(m.mnt_path("moved/sub/deeper/c"))
            .unwrap()
            .ino(),
        ino_c
    );
    // A second rename of the (now cached) tree, into a subdirectory.
    fs::create_dir(m.mnt_path("newparent")).unwrap();
    fs::rename(m.mnt_path("moved"), m.mnt_path("newparent/again")).unwrap();
    assert_same_tree(&m, "tree", "newparent/again");
    m.stop_and_restart(ARGS);
    enoent(&m.mnt_path("tree"));
    enoent(&m.mnt_path("moved"));
    assert_same_tree(&m, "tree", "newparent/again");
    assert_eq!(
        find_names(m.dst.path(), &|n| n.starts_with(".cachefs-tmp")),
        Vec::<std::path::PathBuf>::new()
    );
    assert_unchanged(m.src.path(), &before);
    m.stop();
}

#[test]
fn rename_dir_over_nonempty_dir_is_enotempty() {
    if !can_mount("rename_dir_over_nonempty_dir_is_enotempty") {
        return;
    }
    let src = dir_with(&[("from/x", b"x"), ("to/only_in_src", b"s")]);
    let dst = dir_with(&[("to2/only_in_dst", b"d")]);
    let before = snapshot(src.path());
    let m = mount(src, dst);
    for to in ["to", "to2"] {
        let e = errno_of(to, fs::rename(m.mnt_path("from"), m.mnt_path(to)));
        assert_eq!(e, libc::ENOTEMPTY, "rename over {to}");
    }
    assert_eq!(names(&m.mnt_path("from")), ["x"]);
    assert_eq!(names(&m.mnt_path("to")), ["only_in_src"]);
    assert_eq!(names(&m.mnt_path("to2")), ["only_in_dst"]);
    assert_unchanged(m.src.path(), &before);
    m.stop();
}

#[test]
fn dir_renamed_over_another_hides_what_src_has_there() {
    if !can_mount("dir_renamed_over_another_hides_what_src_has_there") {
        return;
    }
    let src = tree_src();
    write_file(src.path(), "target/hidden", "old");
    write_file(src.path(), "target/sub/deep", "old");
    write_file(src.path(), "gone/x", "old");
    mkdirs(src.path(), "emptysrc");
    let before = snapshot(src.path());
    let mut m = mount(src, tempdir());
    // target is non-empty through src: empty it through the mount first.
    fs::remove_file(m.mnt_path("target/hidden")).unwrap();
    fs::remove_file(m.mnt_path("target/sub/deep")).unwrap();
    fs::remove_dir(m.mnt_path("target/sub")).unwrap();
    assert!(names(&m.mnt_path("target")).is_empty());
    fs::rename(m.mnt_path("tree"), m.mnt_path("target")).unwrap();
    assert_same_tree(&m, "tree", "target");
    enoent(&m.mnt_path("target/hidden"));
    // A removed src directory: rename a dir to its name.
    fs::remove_dir_all(m.mnt_path("gone")).unwrap();
    fs::create_dir(m.mnt_path("newdir")).unwrap();
    write_file(&m.mnt_path("newdir"), "mine", "m");
    fs::rename(m.mnt_path("newdir"), m.mnt_path("gone")).unwrap();
    assert_eq!(names(&m.mnt_path("gone")), ["mine"]);
    // An empty src dir replaced by a dst-created one.
    fs::create_dir(m.mnt_path("newdir2")).unwrap();
    fs::rename(m.mnt_path("newdir2"), m.mnt_path("emptysrc")).unwrap();
    assert!(names(&m.mnt_path("emptysrc")).is_empty());
    m.stop_and_restart(ARGS);
    assert_same_tree(&m, "tree", "target");
    enoent(&m.mnt_path("target/hidden"));
    assert_eq!(names(&m.mnt_path("gone")), ["mine"]);
    assert_eq!(
        names(m.mountpoint()),
        ["emptysrc", "gone", "other", "target"]
    );
    assert_unchanged(m.src.path(), &before);
    m.stop();
}

// ----- 8. rmdir + mkdir ----------------------------------------------------------------

#[test]
fn rmdir_then_mkdir_gives_an_empty_directory_also_after_restart() {
    if !can_mount("rmdir_then_mkdir_gives_an_empty_directory_also_after_restart") {
        return;
    }
    let src = dir_with(&[("d/x", b"x"), ("d/y/z", b"z"), ("keep", b"k")]);
    let before = snapshot(src.path());
    let mut m = mount(src, tempdir());
    fs::remove_dir_all(m.mnt_path("d")).unwrap();
    enoent(&m.mnt_path("d"));
    fs::create_dir(m.mnt_path("d")).unwrap();
    assert!(names(&m.mnt_path("d")).is_empty());
    enoent(&m.mnt_path("d/x"));
    enoent(&m.mnt_path("d/y"));
    m.stop_and_restart(ARGS);
    assert!(
        names(&m.mnt_path("d")).is_empty(),
        "src children reappeared after restart"
    );
    enoent(&m.mnt_path("d/x"));
    write_file(&m.mnt_path("d"), "new", "n");
    assert_eq!(names(&m.mnt_path("d")), ["new"]);
    // mkdir of y inside the new d must not bring back src's d/y/z either.
    fs::create_dir(m.mnt_path("d/y")).unwrap();
    assert!(names(&m.mnt_path("d/y")).is_empty());
    // And it can be removed again (the opaque marker does not make it "not empty").
    fs::remove_file(m.mnt_path("d/new")).unwrap();
    fs::remove_dir(m.mnt_path("d/y")).unwrap();
    fs::remove_dir(m.mnt_path("d")).unwrap();
    enoent(&m.mnt_path("d"));
    m.stop_and_restart(ARGS);
    enoent(&m.mnt_path("d"));
    assert_eq!(names(m.mountpoint()), ["keep"]);
    assert_unchanged(m.src.path(), &before);
    m.stop();
}

// ----- 9. whiteouts --------------------------------------------------------------------

#[test]
fn rm_hides_src_file_and_recreate_shows_new_one() {
    if !can_mount("rm_hides_src_file_and_recreate_shows_new_one") {
        return;
    }
    let src = dir_with(&[("f", b"old"), ("d/g", b"old g"), ("both", b"src both")]);
    let dst = dir_with(&[("both", b"dst both")]);
    let before = snapshot(src.path());
    let mut m = mount(src, dst);
    fs::remove_file(m.mnt_path("f")).unwrap();
    fs::remove_file(m.mnt_path("d/g")).unwrap();
    // A name in both layers: src's version must not show through afterwards.
    fs::remove_file(m.mnt_path("both")).unwrap();
    for p in ["f", "d/g", "both"] {
        enoent(&m.mnt_path(p));
    }
    assert_eq!(names(m.mountpoint()), ["d"]);
    m.stop_and_restart(ARGS);
    for p in ["f", "d/g", "both"] {
        enoent(&m.mnt_path(p));
    }
    assert!(names(&m.mnt_path("d")).is_empty());
    fs::write(m.mnt_path("f"), b"new").unwrap();
    fs::write(m.mnt_path("d/g"), b"new g").unwrap();
    assert_eq!(fs::read(m.mnt_path("f")).unwrap(), b"new");
    assert_eq!(names(m.mountpoint()), ["d", "f"]);
    // The whiteouts are gone from dst.
    assert_eq!(
        find_names(m.dst.path(), &|n| n.starts_with(".cachefs-wh")),
        vec![m.dst_path(".cachefs-wh.both")]
    );
    m.stop_and_restart(ARGS);
    assert_eq!(fs::read(m.mnt_path("f")).unwrap(), b"new");
    assert_eq!(fs::read(m.mnt_path("d/g")).unwrap(), b"new g");
    enoent(&m.mnt_path("both"));
    assert_unchanged(m.src.path(), &before);
    m.stop();
}

#[test]
fn whiteout_of_a_dashed_name_does_not_collide_with_a_path() {
    if !can_mount("whiteout_of_a_dashed_name_does_not_collide_with_a_path") {
        return;
    }
    let src = dir_with(&[
        ("a----b", b"flat"),
        ("a/b", b"nested"),
        ("c----d", b"flat2"),
        ("c/d", b"nested2"),
    ]);
    let before = snapshot(src.path());
    let mut m = mount(src, tempdir());
    fs::remove_file(m.mnt_path("a/b")).unwrap();
    fs::remove_file(m.mnt_path("c----d")).unwrap();
    for _ in 0..2 {
        enoent(&m.mnt_path("a/b"));
        assert_eq!(fs::read(m.mnt_path("a----b")).unwrap(), b"flat");
        enoent(&m.mnt_path("c----d"));
        assert_eq!(fs::read(m.mnt_path("c/d")).unwrap(), b"nested2");
        assert_eq!(names(m.mountpoint()), ["a", "a----b", "c"]);
        m.stop_and_restart(ARGS);
    }
    assert_unchanged(m.src.path(), &before);
    m.stop();
}

#[test]
fn long_src_name_can_be_deleted_and_stays_deleted() {
    if !can_mount("long_src_name_can_be_deleted_and_stays_deleted") {
        return;
    }
    let long = "L".repeat(250);
    // Same first 249 bytes: a hash or truncation bug would hide both.
    let sibling = format!("{}M", "L".repeat(249));
    let max = "m".repeat(255);
    let src = dir_with(&[
        (long.as_str(), b"long"),
        (sibling.as_str(), b"sibling"),
        (max.as_str(), b"max"),
        (&format!("d/{long}"), b"nested"),
    ]);
    let before = snapshot(src.path());
    let mut m = mount(src, tempdir());
    fs::remove_file(m.mnt_path(&long)).unwrap();
    fs::remove_file(m.mnt_path(&max)).unwrap();
    let check = |m: &Mounted| {
        enoent(&m.mnt_path(&long));
        enoent(&m.mnt_path(&max));
        assert_eq!(fs::read(m.mnt_path(&sibling)).unwrap(), b"sibling");
        assert_eq!(
            fs::read(m.mnt_path(&format!("d/{long}"))).unwrap(),
            b"nested"
        );
        let mut want = vec!["d".to_string(), sibling.clone()];
        want.sort();
        assert_eq!(names(m.mountpoint()), want);
    };
    check(&m);
    m.stop_and_restart(ARGS);
    check(&m);
    // Creating it again shows the new file.
    fs::write(m.mnt_path(&long), b"again").unwrap();
    assert_eq!(fs::read(m.mnt_path(&long)).unwrap(), b"again");
    m.stop_and_restart(ARGS);
    assert_eq!(fs::read(m.mnt_path(&long)).unwrap(), b"again");
    enoent(&m.mnt_path(&max));
    assert_unchanged(m.src.path(), &before);
    m.stop();
}

// ----- 10. GoCacheFS compatibility -----------------------------------------------------

#[test]
fn gocachefs_whiteouts_are_honoured_and_replaced() {
    if !can_mount("gocachefs_whiteouts_are_honoured_and_replaced") {
        return;
    }
    let src = dir_with(&[
        ("a/b", b"b"),
        ("a/c", b"c"),
        ("top", b"old top"),
        ("olddir/x", b"x"),
        ("keep", b"k"),
    ]);
    let dst = dir_with(&[
        (".__gocachefs_rm__----a----b", b""),
        (".__gocachefs_rm__----top", b""),
        (".__gocachefs_rm__----olddir", b""),
    ]);
    let before = snapshot(src.path());
    let mut m = mount(src, dst);
    enoent(&m.mnt_path("a/b"));
    enoent(&m.mnt_path("top"));
    enoent(&m.mnt_path("olddir"));
    enoent(&m.mnt_path("olddir/x"));
    assert_eq!(names(m.mountpoint()), ["a", "keep"]);
    assert_eq!(names(&m.mnt_path("a")), ["c"]);
    // Recreating a hidden name shows the new entry and drops the legacy whiteout.
    fs::write(m.mnt_path("top"), b"new top").unwrap();
    assert_eq!(fs::read(m.mnt_path("top")).unwrap(), b"new top");
    assert!(!m.dst_path(".__gocachefs_rm__----top").exists());
    fs::create_dir(m.mnt_path("olddir")).unwrap();
    assert!(
        names(&m.mnt_path("olddir")).is_empty(),
        "src's olddir/x reappeared"
    );
    m.stop_and_restart(ARGS);
    assert_eq!(fs::read(m.mnt_path("top")).unwrap(), b"new top");
    enoent(&m.mnt_path("a/b"));
    assert!(
        names(&m.mnt_path("olddir")).is_empty(),
        "src's olddir/x after restart"
    );
    assert_eq!(names(m.mountpoint()), ["a", "keep", "olddir", "top"]);
    assert!(m.dst_path(".__gocachefs_rm__----a----b").exists());
    // A nested hidden path can be recreated too.
    fs::write(m.mnt_path("a/b"), b"new b").unwrap();
    assert!(!m.dst_path(".__gocachefs_rm__----a----b").exists());
    m.stop_and_restart(ARGS);
    assert_eq!(fs::read(m.mnt_path("a/b")).unwrap(), b"new b");
    assert_eq!(names(&m.mnt_path("a")), ["b", "c"]);
    assert_unchanged(m.src.path(), &before);
    m.stop();
}

// ----- 11. reserved names --------------------------------------------------------------

#[test]
fn reserved_names_cannot_be_created_or_seen() {
    if !can_mount("reserved_names_cannot_be_created_or_seen") {
        return;
    }
    let src = dir_with(&[("f", b"f"), ("sub/g", b"g")]);
    let dst = dir_with(&[(".cachefs-state/journal", b"j")]);
    let before = snapshot(src.path());
    let dst_before = snapshot(dst.path());
    let m = mount(src, dst);
    let mnt = |r: &str| m.mnt_path(r);
    let eperm = |what: &str, r: std::io::Result<()>| {
        assert_eq!(errno_of(what, r), libc::EPERM, "{what}");
    };
    eperm("touch .cachefs-wh.x", fs::write(mnt(".cachefs-wh.x"), b""));
    eperm(
        "touch sub/.cachefs-opaque",
        fs::write(mnt("sub/.cachefs-opaque"), b""),
    );
    eperm(
        "touch .cachefs-whh.0",
        fs::write(mnt(".cachefs-whh.0"), b""),
    );
    eperm(
        "mkdir .cachefs-state",
        fs::create_dir(mnt(".cachefs-state")),
    );
    eperm(
        "mkdir sub/.cachefs-tmp.9",
        fs::create_dir(mnt("sub/.cachefs-tmp.9")),
    );
    eperm(
        "mv f .cachefs-opaque",
        fs::rename(mnt("f"), mnt(".cachefs-opaque")),
    );
    eperm(
        "mv sub .cachefs-wh.f",
        fs::rename(mnt("sub"), mnt(".cachefs-wh.f")),
    );
    eperm(
        "ln f .cachefs-tmp.1",
        fs::hard_link(mnt("f"), mnt(".cachefs-tmp.1")),
    );
    eperm(
        "symlink .__gocachefs_rm__x",
        symlink("f", mnt(".__gocachefs_rm__x")),
    );
    eperm(
        "symlink .__gocachefs_rm__----f",
        symlink("f", mnt(".__gocachefs_rm__----f")),
    );
    let c = cpath(&mnt(".cachefs-wh.fifo"));
    // SAFETY: valid path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EPERM)
    );
    // Existing internal entries are invisible and untouchable.
    enoent(&mnt(".cachefs-state"));
    enoent(&mnt(".cachefs-state/journal"));
    let e = errno_of("rm state", fs::remove_dir_all(mnt(".cachefs-state")));
    assert_eq!(e, libc::ENOENT);
    let e = errno_of("mv state", fs::rename(mnt(".cachefs-state"), mnt("x")));
    assert_eq!(e, libc::ENOENT);
    // Nothing happened: the view, src and dst are as before.
    assert_eq!(names(m.mountpoint()), ["f", "sub"]);
    assert_eq!(fs::read(mnt("f")).unwrap(), b"f");
    assert_unchanged(m.src.path(), &before);
    let dst_now = snapshot(m.dst.path());
    for k in dst_before.keys() {
        assert_eq!(dst_before[k].data, dst_now[k].data, "{}", k.display());
    }
    let spoofed: Vec<_> = dst_now
        .keys()
        .filter(|k| !dst_before.contains_key(*k) && !k.starts_with(".cachefs-state"))
        .filter(|k| !matches!(k.to_str(), Some("f" | "sub" | "sub/g")))
        .collect();
    assert!(spoofed.is_empty(), "dst got {spoofed:?}");
    m.stop();
}

// ----- more of the view ----------------------------------------------------------------

#[test]
fn large_merged_listing_pages_every_name_once() {
    if !can_mount("large_merged_listing_pages_every_name_once") {
        return;
    }
    // Long names so that the listing spans many readdir pages.
    let name = |i: usize| format!("entry-{i:05}-{}", "x".repeat(60));
    let (src, dst) = (tempdir(), tempdir());
    mkdirs(src.path(), "big");
    mkdirs(dst.path(), "big");
    for i in 0..2000 {
        if i < 1400 {
            fs::write(src.path().join("big").join(name(i)), b"s").unwrap();
        }
        if i >= 1000 {
            fs::write(dst.path().join("big").join(name(i)), b"d").unwrap();
        }
    }
    // Some src names are whited out, some dst entries are internal.
    for i in (0..1000).step_by(10) {
        fs::write(
            dst.path()
                .join("big")
                .join(format!(".cachefs-wh.{}", name(i))),
            b"",
        )
        .unwrap();
    }
    let before = snapshot(src.path());
    let m = mount(src, dst);
    let want: Vec<String> = (0..2000)
        .filter(|i| i >= &1000 || i % 10 != 0)
        .map(name)
        .collect();
    let got = names(&m.mnt_path("big"));
    assert_eq!(got.len(), want.len(), "entry count");
    assert!(got == want, "listing differs");
    assert_eq!(
        fs::read(m.mnt_path(&format!("big/{}", name(1200)))).unwrap(),
        b"d"
    );
    assert_eq!(
        fs::read(m.mnt_path(&format!("big/{}", name(999)))).unwrap(),
        b"s"
    );
    assert_unchanged(m.src.path(), &before);
    m.stop();
}

#[test]
fn a_deleted_name_can_come_back_as_another_type() {
    if !can_mount("a_deleted_name_can_come_back_as_another_type") {
        return;
    }
    let src = dir_with(&[
        ("wasfile", b"f"),
        ("wasdir/child", b"c"),
        ("wasdir/sub/deep", b"d"),
    ]);
    let before = snapshot(src.path());
    let mut m = mount(src, tempdir());
    fs::remove_file(m.mnt_path("wasfile")).unwrap();
    fs::create_dir(m.mnt_path("wasfile")).unwrap();
    fs::remove_dir_all(m.mnt_path("wasdir")).unwrap();
    fs::write(m.mnt_path("wasdir"), b"now a file").unwrap();
    for round in 0..2 {
        assert!(lstat_is_dir(&m.mnt_path("wasfile")), "round {round}");
        assert!(names(&m.mnt_path("wasfile")).is_empty());
        assert_eq!(fs::read(m.mnt_path("wasdir")).unwrap(), b"now a file");
        let e = errno_of(
            "lstat wasdir/child",
            fs::symlink_metadata(m.mnt_path("wasdir/child")),
        );
        assert_eq!(e, libc::ENOTDIR);
        m.stop_and_restart(ARGS);
    }
    assert_unchanged(m.src.path(), &before);
    m.stop();
}

fn lstat_is_dir(p: &Path) -> bool {
    fs::symlink_metadata(p).unwrap().is_dir()
}

#[test]
fn whiteouts_are_collected_once_src_drops_the_name() {
    if !can_mount("whiteouts_are_collected_once_src_drops_the_name") {
        return;
    }
    let long = "w".repeat(250);
    let src = dir_with(&[
        ("d/f", b"f"),
        ("d/keep", b"k"),
        (&format!("d/{long}"), b"l"),
    ]);
    let m = mount(src, tempdir());
    fs::remove_file(m.mnt_path("d/f")).unwrap();
    fs::remove_file(m.mnt_path(&format!("d/{long}"))).unwrap();
    let whiteouts = |m: &Mounted| find_names(&m.dst_path("d"), &|n| n.starts_with(".cachefs-wh"));
    assert_eq!(whiteouts(&m).len(), 2);
    // src loses the names (e.g. another machine deleted them): a listing collects them.
    fs::remove_file(m.src_path("d/f")).unwrap();
    fs::remove_file(m.src_path(&format!("d/{long}"))).unwrap();
    assert_eq!(names(&m.mnt_path("d")), ["keep"]);
    assert_eq!(whiteouts(&m), Vec::<std::path::PathBuf>::new());
    m.stop();
}

#[test]
fn renamed_dirs_keep_deletions_made_inside_them() {
    if !can_mount("renamed_dirs_keep_deletions_made_inside_them") {
        return;
    }
    let src = dir_with(&[
        ("tree/a", b"a"),
        ("tree/b", b"b"),
        ("tree/sub/c", b"c"),
        ("tree/sub/d", b"d"),
    ]);
    let before = snapshot(src.path());
    let mut m = mount(src, tempdir());
    fs::remove_file(m.mnt_path("tree/a")).unwrap();
    fs::remove_file(m.mnt_path("tree/sub/c")).unwrap();
    fs::rename(m.mnt_path("tree"), m.mnt_path("moved")).unwrap();
    assert_eq!(names(&m.mnt_path("moved")), ["b", "sub"]);
    assert_eq!(names(&m.mnt_path("moved/sub")), ["d"]);
    // Back to the old name, after deleting more: src's tree must not leak back in.
    fs::remove_file(m.mnt_path("moved/b")).unwrap();
    fs::rename(m.mnt_path("moved"), m.mnt_path("tree")).unwrap();
    for _ in 0..2 {
        assert_eq!(names(m.mountpoint()), ["tree"]);
        assert_eq!(names(&m.mnt_path("tree")), ["sub"]);
        assert_eq!(names(&m.mnt_path("tree/sub")), ["d"]);
        assert_eq!(fs::read(m.mnt_path("tree/sub/d")).unwrap(), b"d");
        m.stop_and_restart(ARGS);
    }
    assert_unchanged(m.src.path(), &before);
    m.stop();
}
