//! Every POSIX operation on a real mount in cache mode, mostly on files that exist only in
//! src (uncached) so that each op has to copy up first. One compact test per op; each ends
//! by proving src untouched.

use std::ffi::CString;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{
    FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt, symlink,
};
use std::path::Path;

use crate::common::*;

const ARGS: &[&str] = &["--attr-ttl", "0"];

fn lstat(p: &Path) -> fs::Metadata {
    fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()))
}

/// Runs `f` on a fresh mount of `src` (and `dst`), then checks src is untouched.
fn with_mount(src: TempDir, dst: TempDir, f: impl FnOnce(&Mounted)) {
    let before = snapshot(src.path());
    let m = Mounted::with_dirs(src, dst, ARGS);
    f(&m);
    assert_unchanged(m.src.path(), &before);
    m.stop();
}

fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> Result<(), i32> {
    let (a, b) = (cpath(from), cpath(to));
    // SAFETY: valid paths.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    };
    if r == 0 { Ok(()) } else { Err(last_errno()) }
}

fn listxattr(p: &Path) -> Vec<String> {
    let c = cpath(p);
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid path, buffer.
    let r = unsafe { libc::listxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(r >= 0, "listxattr: {}", std::io::Error::last_os_error());
    let mut v: Vec<String> = buf[..r as usize]
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .filter(|n| n.starts_with("user."))
        .collect();
    v.sort();
    v
}

fn removexattr(p: &Path, name: &str) -> Result<(), i32> {
    let (c, n) = (cpath(p), CString::new(name).unwrap());
    // SAFETY: valid path, name.
    let r = unsafe { libc::removexattr(c.as_ptr(), n.as_ptr()) };
    if r == 0 { Ok(()) } else { Err(last_errno()) }
}

fn utimens(p: &Path, atime: (i64, i64), mtime: (i64, i64)) {
    let ts = [
        libc::timespec {
            tv_sec: atime.0,
            tv_nsec: atime.1,
        },
        libc::timespec {
            tv_sec: mtime.0,
            tv_nsec: mtime.1,
        },
    ];
    let c = cpath(p);
    // SAFETY: valid path and 2 timespecs.
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), ts.as_ptr(), 0) };
    assert_eq!(r, 0, "utimensat: {}", std::io::Error::last_os_error());
}

fn access(p: &Path, mode: libc::c_int) -> Result<(), i32> {
    let c = cpath(p);
    // SAFETY: valid path.
    if unsafe { libc::access(c.as_ptr(), mode) } == 0 {
        Ok(())
    } else {
        Err(last_errno())
    }
}

fn rw(p: &Path) -> fs::File {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap_or_else(|e| panic!("open rw {}: {e}", p.display()))
}

#[test]
fn setattr_chmod_chown_utimens_on_uncached_entries() {
    if !can_mount("setattr_chmod_chown_utimens_on_uncached_entries") {
        return;
    }
    let src = dir_with(&[("f", b"data"), ("g", b"g"), ("d/x", b"x")]);
    with_mount(src, tempdir(), |m| {
        let f = m.mnt_path("f");
        fs::set_permissions(&f, fs::Permissions::from_mode(0o604)).unwrap();
        assert_eq!(lstat(&f).mode(), libc::S_IFREG | 0o604);
        assert_eq!(lstat(&m.dst_path("f")).mode(), libc::S_IFREG | 0o604);
        std::os::unix::fs::chown(&f, Some(42), Some(43)).unwrap();
        assert_eq!((lstat(&f).uid(), lstat(&f).gid()), (42, 43));
        assert_eq!(lstat(&m.dst_path("f")).uid(), 42);
        utimens(&f, (1_000_000_001, 111), (1_000_000_002, 999_999_999));
        let md = lstat(&f);
        assert_eq!(
            (md.atime(), md.atime_nsec(), md.mtime(), md.mtime_nsec()),
            (1_000_000_001, 111, 1_000_000_002, 999_999_999)
        );
        // mtime only (atime UTIME_OMIT), on another uncached file.
        let g = m.mnt_path("g");
        let atime_before = (lstat(&g).atime(), lstat(&g).atime_nsec());
        let ts = [
            libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
            libc::timespec {
                tv_sec: 5,
                tv_nsec: 6,
            },
        ];
        // SAFETY: valid path and 2 timespecs.
        let r = unsafe { libc::utimensat(libc::AT_FDCWD, cpath(&g).as_ptr(), ts.as_ptr(), 0) };
        assert_eq!(r, 0);
        let md = lstat(&g);
        assert_eq!((md.mtime(), md.mtime_nsec()), (5, 6));
        assert_eq!((md.atime(), md.atime_nsec()), atime_before);
        // chmod of an uncached directory.
        fs::set_permissions(m.mnt_path("d"), fs::Permissions::from_mode(0o710)).unwrap();
        assert_eq!(lstat(&m.mnt_path("d")).mode() & 0o7777, 0o710);
        assert_eq!(names(&m.mnt_path("d")), ["x"]);
        assert_eq!(fs::read(&f).unwrap(), b"data");
    });
}

#[test]
fn truncate_uncached_files_shrink_grow_and_o_trunc() {
    if !can_mount("truncate_uncached_files_shrink_grow_and_o_trunc") {
        return;
    }
    let data = pattern(100_000, 5);
    let src = dir_with(&[
        ("shrink", &data),
        ("grow", &data),
        ("otrunc", &data),
        ("zero", &data),
    ]);
    with_mount(src, tempdir(), |m| {
        let f = fs::OpenOptions::new()
            .write(true)
            .open(m.mnt_path("shrink"));
        drop(f.unwrap());
        // truncate(2) by path, without an open handle.
        let c = cpath(&m.mnt_path("grow"));
        // SAFETY: valid path.
        assert_eq!(unsafe { libc::truncate(c.as_ptr(), 250_000) }, 0);
        let c = cpath(&m.mnt_path("zero"));
        // SAFETY: valid path.
        assert_eq!(unsafe { libc::truncate(c.as_ptr(), 0) }, 0);
        rw(&m.mnt_path("shrink")).set_len(40_000).unwrap();
        assert!(fs::read(m.mnt_path("shrink")).unwrap() == data[..40_000]);
        let mut want = data.clone();
        want.resize(250_000, 0);
        assert!(fs::read(m.mnt_path("grow")).unwrap() == want);
        assert_eq!(lstat(&m.mnt_path("grow")).len(), 250_000);
        assert!(fs::read(m.mnt_path("zero")).unwrap().is_empty());
        let mut t = fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(m.mnt_path("otrunc"))
            .unwrap();
        t.write_all(b"new").unwrap();
        drop(t);
        assert_eq!(fs::read(m.mnt_path("otrunc")).unwrap(), b"new");
        assert_eq!(fs::read(m.dst_path("otrunc")).unwrap(), b"new");
    });
}

#[test]
fn readlink_and_symlink() {
    if !can_mount("readlink_and_symlink") {
        return;
    }
    let src = dir_with(&[("d/t", b"target")]);
    symlink("t", src.path().join("d/rel")).unwrap();
    symlink("/abs/path", src.path().join("abs")).unwrap();
    symlink("../nowhere", src.path().join("d/dangling")).unwrap();
    with_mount(src, tempdir(), |m| {
        assert_eq!(fs::read_link(m.mnt_path("d/rel")).unwrap(), Path::new("t"));
        assert_eq!(
            fs::read_link(m.mnt_path("abs")).unwrap(),
            Path::new("/abs/path")
        );
        assert_eq!(
            fs::read_link(m.mnt_path("d/dangling")).unwrap(),
            Path::new("../nowhere")
        );
        assert_eq!(fs::read(m.mnt_path("d/rel")).unwrap(), b"target");
        let e = errno_of("read_link of a file", fs::read_link(m.mnt_path("d/t")));
        assert_eq!(e, libc::EINVAL);
        // New symlink in an uncached directory.
        symlink("some/target", m.mnt_path("d/new")).unwrap();
        let md = lstat(&m.mnt_path("d/new"));
        assert!(md.file_type().is_symlink());
        assert_eq!(md.len(), "some/target".len() as u64);
        assert_eq!(
            fs::read_link(m.mnt_path("d/new")).unwrap(),
            Path::new("some/target")
        );
        assert_eq!(
            fs::read_link(m.dst_path("d/new")).unwrap(),
            Path::new("some/target")
        );
        let e = errno_of("symlink over existing", symlink("x", m.mnt_path("d/rel")));
        assert_eq!(e, libc::EEXIST);
    });
}

#[test]
fn mknod_fifo_and_mkdir_in_uncached_dirs() {
    if !can_mount("mknod_fifo_and_mkdir_in_uncached_dirs") {
        return;
    }
    let src = dir_with(&[("sd/x", b"x")]);
    fs::set_permissions(src.path().join("sd"), fs::Permissions::from_mode(0o711)).unwrap();
    std::os::unix::fs::chown(src.path().join("sd"), Some(77), Some(88)).unwrap();
    with_mount(src, tempdir(), |m| {
        let c = cpath(&m.mnt_path("sd/fifo"));
        assert_eq!(
            // SAFETY: valid NUL-terminated path.
            unsafe { libc::mkfifo(c.as_ptr(), 0o640) },
            0,
            "{}",
            last_errno()
        );
        let md = lstat(&m.mnt_path("sd/fifo"));
        assert_eq!(md.mode(), libc::S_IFIFO | 0o640);
        assert!(lstat(&m.dst_path("sd/fifo")).file_type().is_fifo());
        let c = cpath(&m.mnt_path("sd/new"));
        assert_eq!(
            // SAFETY: valid NUL-terminated path.
            unsafe { libc::mkdir(c.as_ptr(), 0o750) },
            0,
            "{}",
            last_errno()
        );
        let md = lstat(&m.mnt_path("sd/new"));
        assert_eq!(md.mode(), libc::S_IFDIR | 0o750);
        assert_eq!((md.uid(), md.gid()), (0, 0));
        assert!(names(&m.mnt_path("sd/new")).is_empty());
        // The uncached parent was created in dst with src's mode and owner.
        let p = lstat(&m.dst_path("sd"));
        assert_eq!((p.mode() & 0o7777, p.uid(), p.gid()), (0o711, 77, 88));
        assert_eq!(names(&m.mnt_path("sd")), ["fifo", "new", "x"]);
        let e = errno_of("mkdir existing", fs::create_dir(m.mnt_path("sd/x")));
        assert_eq!(e, libc::EEXIST);
        let e = errno_of("mkdir existing", fs::create_dir(m.mnt_path("sd")));
        assert_eq!(e, libc::EEXIST);
    });
}

#[test]
fn unlink_src_dst_both_and_open_files() {
    if !can_mount("unlink_src_dst_both_and_open_files") {
        return;
    }
    let src = dir_with(&[
        ("s", b"s"),
        ("both", b"src"),
        ("open", b"still readable"),
        ("d/x", b"x"),
    ]);
    let dst = dir_with(&[("donly", b"d"), ("both", b"dst")]);
    with_mount(src, dst, |m| {
        for n in ["s", "donly", "both"] {
            fs::remove_file(m.mnt_path(n)).unwrap();
            let e = errno_of(n, fs::symlink_metadata(m.mnt_path(n)));
            assert_eq!(e, libc::ENOENT, "{n}");
        }
        let e = errno_of("unlink a dir", fs::remove_file(m.mnt_path("d")));
        assert!(
            e == libc::EISDIR || e == libc::EPERM,
            "unlink of a directory: {e}"
        );
        let e = errno_of("unlink missing", fs::remove_file(m.mnt_path("missing")));
        assert_eq!(e, libc::ENOENT);
        // Unlinking an open (uncached) file: the handle keeps working.
        let mut f = fs::File::open(m.mnt_path("open")).unwrap();
        fs::remove_file(m.mnt_path("open")).unwrap();
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "still readable");
        assert_eq!(f.metadata().unwrap().len(), 14);
        drop(f);
        assert_eq!(names(m.mountpoint()), ["d"]);
    });
}

#[test]
fn rmdir_merged_src_only_and_whited_out_dirs() {
    if !can_mount("rmdir_merged_src_only_and_whited_out_dirs") {
        return;
    }
    let src = dir_with(&[("merged/x", b"x"), ("f", b"f")]);
    mkdirs(src.path(), "emptysrc");
    let dst = tempdir();
    mkdirs(dst.path(), "merged");
    mkdirs(dst.path(), "emptydst");
    with_mount(src, dst, |m| {
        let e = errno_of("rmdir merged", fs::remove_dir(m.mnt_path("merged")));
        assert_eq!(e, libc::ENOTEMPTY);
        assert_eq!(names(&m.mnt_path("merged")), ["x"]);
        let e = errno_of("rmdir file", fs::remove_dir(m.mnt_path("f")));
        assert_eq!(e, libc::ENOTDIR);
        fs::remove_dir(m.mnt_path("emptysrc")).unwrap();
        fs::remove_dir(m.mnt_path("emptydst")).unwrap();
        // Empty once its only child is whited out.
        fs::remove_file(m.mnt_path("merged/x")).unwrap();
        fs::remove_dir(m.mnt_path("merged")).unwrap();
        assert_eq!(names(m.mountpoint()), ["f"]);
        for n in ["merged", "emptysrc", "emptydst"] {
            let e = errno_of(n, fs::symlink_metadata(m.mnt_path(n)));
            assert_eq!(e, libc::ENOENT, "{n}");
        }
    });
}

/// An open directory whose name went (rmdir, or another directory renamed over it)
/// still answers fstat, with `st_nlink` 0, as an unlinked open file does (xfstests
/// generic/035); a directory only src has included.
#[test]
fn fstat_of_an_open_directory_after_rmdir_or_rename_over_it() {
    if !can_mount("fstat_of_an_open_directory_after_rmdir_or_rename_over_it") {
        return;
    }
    let src = tempdir();
    mkdirs(src.path(), "from_src");
    with_mount(src, tempdir(), |m| {
        for d in ["gone", "over", "mover"] {
            fs::create_dir(m.mnt_path(d)).unwrap();
        }
        fs::set_permissions(m.mnt_path("over"), fs::Permissions::from_mode(0o711)).unwrap();
        let gone = fs::File::open(m.mnt_path("gone")).unwrap();
        let over = fs::File::open(m.mnt_path("over")).unwrap();
        let mover = fs::File::open(m.mnt_path("mover")).unwrap();
        let from_src = fs::File::open(m.mnt_path("from_src")).unwrap();
        let ino_over = over.metadata().unwrap().ino();

        fs::remove_dir(m.mnt_path("gone")).unwrap();
        fs::rename(m.mnt_path("mover"), m.mnt_path("over")).unwrap();
        fs::remove_dir(m.mnt_path("from_src")).unwrap();

        for (what, f) in [
            ("rmdir", &gone),
            ("renamed over", &over),
            ("src's", &from_src),
        ] {
            let md = f
                .metadata()
                .unwrap_or_else(|e| panic!("fstat of the open {what} directory: {e}"));
            assert!(md.is_dir(), "{what}");
            assert_eq!(md.nlink(), 0, "{what}: st_nlink");
        }
        let md = over.metadata().unwrap();
        assert_eq!((md.ino(), md.mode() & 0o7777), (ino_over, 0o711));
        // The directory moved onto the name is alive and well.
        assert!(mover.metadata().unwrap().nlink() >= 2);
        assert_eq!(
            mover.metadata().unwrap().ino(),
            lstat(&m.mnt_path("over")).ino()
        );
    });
}

/// Every name readdir(3) gives until the end of the stream.
fn read_to_end(dir: *mut libc::DIR) -> Vec<String> {
    let mut names = Vec::new();
    loop {
        // SAFETY: a valid DIR*; the entry is read before the next call.
        let ent = unsafe { libc::readdir64(dir) };
        if ent.is_null() {
            break;
        }
        // SAFETY: d_name is NUL-terminated.
        let name = unsafe { std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()) };
        let name = name.to_string_lossy().into_owned();
        if name != "." && name != ".." {
            names.push(name);
        }
    }
    names.sort();
    names
}

/// rewinddir(3) lists afresh: names made and removed since opendir show as they are
/// now (xfstests generic/471); without a rewind the open stream keeps its listing.
#[test]
fn rewinddir_shows_names_made_after_opendir() {
    if !can_mount("rewinddir_shows_names_made_after_opendir") {
        return;
    }
    let src = dir_with(&[("d/src_old", b"s"), ("d/src_gone", b"s")]);
    with_mount(src, tempdir(), |m| {
        fs::write(m.mnt_path("d/old"), b"o").unwrap();
        let c = cpath(&m.mnt_path("d"));
        // SAFETY: valid path.
        let dir = unsafe { libc::opendir(c.as_ptr()) };
        assert!(
            !dir.is_null(),
            "opendir: {}",
            std::io::Error::last_os_error()
        );
        assert_eq!(read_to_end(dir), ["old", "src_gone", "src_old"]);
        let new: Vec<String> = (0..300).map(|i| format!("new{i:03}")).collect();
        for n in &new {
            fs::write(m.mnt_path(&format!("d/{n}")), b"n").unwrap();
        }
        fs::remove_file(m.mnt_path("d/src_gone")).unwrap();
        // SAFETY: a valid DIR*.
        unsafe { libc::rewinddir(dir) };
        let mut want: Vec<String> = new.clone();
        want.extend(["old".to_string(), "src_old".to_string()]);
        want.sort();
        assert_eq!(read_to_end(dir), want, "after rewinddir");
        // SAFETY: a valid DIR*, not used again.
        unsafe { libc::closedir(dir) };

        // xfstests generic/471: names made between opendir and the first readdir (the
        // listing used to be taken at opendir).
        // SAFETY: valid path.
        let dir = unsafe { libc::opendir(c.as_ptr()) };
        assert!(!dir.is_null());
        fs::write(m.mnt_path("d/after_opendir"), b"a").unwrap();
        // SAFETY: a valid DIR*.
        unsafe { libc::rewinddir(dir) };
        assert!(
            read_to_end(dir).contains(&"after_opendir".to_string()),
            "a name made after opendir, before the first readdir"
        );
        // SAFETY: a valid DIR*, not used again.
        unsafe { libc::closedir(dir) };
    });
}

#[test]
fn rename_noreplace_is_eexist() {
    if !can_mount("rename_noreplace_is_eexist") {
        return;
    }
    let src = dir_with(&[("a", b"a"), ("b", b"b"), ("d/x", b"x")]);
    with_mount(src, tempdir(), |m| {
        let r = renameat2(&m.mnt_path("a"), &m.mnt_path("b"), libc::RENAME_NOREPLACE);
        assert_eq!(r, Err(libc::EEXIST));
        let r = renameat2(&m.mnt_path("a"), &m.mnt_path("d"), libc::RENAME_NOREPLACE);
        assert_eq!(r, Err(libc::EEXIST));
        assert_eq!(fs::read(m.mnt_path("a")).unwrap(), b"a");
        assert_eq!(fs::read(m.mnt_path("b")).unwrap(), b"b");
        // To a free name it works (checked by stat only: see the ignored file-rename test).
        renameat2(&m.mnt_path("d"), &m.mnt_path("e"), libc::RENAME_NOREPLACE).unwrap();
        assert_eq!(names(m.mountpoint()), ["a", "b", "e"]);
        assert_eq!(fs::read(m.mnt_path("e/x")).unwrap(), b"x");
    });
}

#[test]
fn rename_exchange_swaps_an_uncached_file_and_dir() {
    if !can_mount("rename_exchange_swaps_an_uncached_file_and_dir") {
        return;
    }
    let src = dir_with(&[("f", b"file F"), ("d/c", b"child"), ("d/sub/deep", b"deep")]);
    with_mount(src, tempdir(), |m| {
        let (fi, di) = (lstat(&m.mnt_path("f")).ino(), lstat(&m.mnt_path("d")).ino());
        renameat2(&m.mnt_path("f"), &m.mnt_path("d"), libc::RENAME_EXCHANGE).unwrap();
        assert!(lstat(&m.mnt_path("f")).is_dir());
        assert!(lstat(&m.mnt_path("d")).is_file());
        assert_eq!(lstat(&m.mnt_path("f")).ino(), di);
        assert_eq!(lstat(&m.mnt_path("d")).ino(), fi);
        assert_eq!(names(&m.mnt_path("f")), ["c", "sub"]);
        assert_eq!(fs::read(m.mnt_path("f/c")).unwrap(), b"child");
        assert_eq!(fs::read(m.mnt_path("f/sub/deep")).unwrap(), b"deep");
        assert_eq!(fs::read(m.mnt_path("d")).unwrap(), b"file F");
        let r = renameat2(&m.mnt_path("f"), &m.mnt_path("nope"), libc::RENAME_EXCHANGE);
        assert_eq!(r, Err(libc::ENOENT));
    });
}

#[test]
fn open_read_write_append_on_uncached_files() {
    if !can_mount("open_read_write_append_on_uncached_files") {
        return;
    }
    let data = pattern(100_000, 11);
    let src = dir_with(&[("f", &data), ("log", b"line1\n")]);
    with_mount(src, tempdir(), |m| {
        let f = rw(&m.mnt_path("f"));
        f.write_all_at(b"XYZ", 50_000).unwrap();
        f.write_all_at(b"END", 100_000).unwrap();
        let mut buf = vec![0u8; 6];
        f.read_exact_at(&mut buf, 49_998).unwrap();
        assert_eq!(&buf[2..5], b"XYZ");
        drop(f);
        let mut want = data.clone();
        want[50_000..50_003].copy_from_slice(b"XYZ");
        want.extend_from_slice(b"END");
        assert!(fs::read(m.mnt_path("f")).unwrap() == want);
        assert!(fs::read(m.dst_path("f")).unwrap() == want);
        let mut a = fs::OpenOptions::new()
            .append(true)
            .open(m.mnt_path("log"))
            .unwrap();
        a.write_all(b"line2\n").unwrap();
        drop(a);
        assert_eq!(fs::read(m.mnt_path("log")).unwrap(), b"line1\nline2\n");
        // Read-only open refuses writes.
        let mut ro = fs::File::open(m.mnt_path("log")).unwrap();
        assert_eq!(errno_of("write to O_RDONLY", ro.write(b"x")), libc::EBADF);
    });
}

#[test]
fn fsync_fdatasync_and_fsyncdir() {
    if !can_mount("fsync_fdatasync_and_fsyncdir") {
        return;
    }
    let src = dir_with(&[("d/f", b"abc")]);
    with_mount(src, tempdir(), |m| {
        let mut f = rw(&m.mnt_path("d/f"));
        f.seek(SeekFrom::End(0)).unwrap();
        f.write_all(b"def").unwrap();
        f.sync_all().unwrap();
        f.write_all(b"ghi").unwrap();
        f.sync_data().unwrap();
        drop(f);
        fs::File::open(m.mnt_path("d")).unwrap().sync_all().unwrap();
        assert_eq!(fs::read(m.dst_path("d/f")).unwrap(), b"abcdefghi");
    });
}

#[test]
fn statfs_reports_dst_filesystem() {
    if !can_mount("statfs_reports_dst_filesystem") {
        return;
    }
    with_mount(tempdir(), tempdir(), |m| {
        let sv = |p: &Path| {
            let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
            assert_eq!(
                // SAFETY: valid NUL-terminated path and out-pointer.
                unsafe { libc::statvfs(cpath(p).as_ptr(), st.as_mut_ptr()) },
                0
            );
            // SAFETY: initialised on success.
            unsafe { st.assume_init() }
        };
        let (a, b) = (sv(m.mountpoint()), sv(m.dst.path()));
        assert_eq!(
            (a.f_bsize, a.f_frsize, a.f_blocks, a.f_files, a.f_namemax),
            (b.f_bsize, b.f_frsize, b.f_blocks, b.f_files, b.f_namemax)
        );
        // Free space moves with other tests writing; it is the same order of magnitude.
        assert!(a.f_bavail > 0 && a.f_bavail <= b.f_blocks);
    });
}

#[test]
fn xattrs_on_an_uncached_file() {
    if !can_mount("xattrs_on_an_uncached_file") {
        return;
    }
    let src = dir_with(&[("f", b"f")]);
    let c = cpath(&src.path().join("f"));
    // SAFETY: valid path, name, value.
    let r = unsafe { libc::setxattr(c.as_ptr(), c"user.k".as_ptr(), b"v".as_ptr().cast(), 1, 0) };
    assert_eq!(r, 0, "user xattrs on the test filesystem");
    with_mount(src, tempdir(), |m| {
        let f = m.mnt_path("f");
        assert_eq!(getxattr(&f, "user.k"), Ok(b"v".to_vec()));
        assert_eq!(listxattr(&f), ["user.k"]);
        assert_eq!(getxattr(&f, "user.none"), Err(libc::ENODATA));
        setxattr(&f, "user.n", b"new value").unwrap();
        assert_eq!(getxattr(&f, "user.n"), Ok(b"new value".to_vec()));
        assert_eq!(listxattr(&f), ["user.k", "user.n"]);
        removexattr(&f, "user.k").unwrap();
        assert_eq!(getxattr(&f, "user.k"), Err(libc::ENODATA));
        assert_eq!(removexattr(&f, "user.k"), Err(libc::ENODATA));
        assert_eq!(listxattr(&f), ["user.n"]);
        assert_eq!(
            user_xattrs(&m.dst_path("f")),
            [("user.n".to_string(), b"new value".to_vec())]
        );
        assert_eq!(fs::read(&f).unwrap(), b"f");
    });
}

/// The mount's root answers every xattr call as any directory does (`ls -l MOUNT` asks
/// for `security.selinux` and the ACL names; xfstests generic/069 runs `getfattr` on it).
#[test]
fn xattrs_on_the_mount_root() {
    if !can_mount("xattrs_on_the_mount_root") {
        return;
    }
    with_mount(tempdir(), tempdir(), |m| {
        let root = m.mountpoint();
        // A name the root does not have: ENODATA, as `ls -l` expects.
        assert_eq!(getxattr(root, "user.none"), Err(libc::ENODATA));
        assert_eq!(listxattr(root), Vec::<String>::new());
        setxattr(root, "user.r", b"root value").unwrap();
        assert_eq!(getxattr(root, "user.r"), Ok(b"root value".to_vec()));
        assert_eq!(listxattr(root), ["user.r"]);
        assert_eq!(
            user_xattrs(m.dst.path()),
            [("user.r".to_string(), b"root value".to_vec())]
        );
        removexattr(root, "user.r").unwrap();
        assert_eq!(getxattr(root, "user.r"), Err(libc::ENODATA));
        assert_eq!(removexattr(root, "user.r"), Err(libc::ENODATA));
        assert_eq!(listxattr(root), Vec::<String>::new());
        // What `ls -l` does, end to end: no "Bad file descriptor" on stderr.
        let out = std::process::Command::new("ls")
            .arg("-ld")
            .arg(root)
            .output()
            .unwrap();
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "ls -ld {}: {}",
            root.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// cachefs implements no ioctl: each fails with ENOTTY (what isatty(3), lsattr and
/// tools probing for features expect), quietly: no log line per call.
#[test]
fn ioctls_fail_with_enotty_and_are_not_logged() {
    if !can_mount("ioctls_fail_with_enotty_and_are_not_logged") {
        return;
    }
    with_mount(dir_with(&[("f", b"f")]), tempdir(), |m| {
        fs::write(m.mnt_path("new"), b"n").unwrap();
        fs::create_dir(m.mnt_path("d")).unwrap();
        let paths = [m.mnt_path("f"), m.mnt_path("new"), m.mnt_path("d")];
        for p in paths.iter().map(|p| p.as_path()).chain([m.mountpoint()]) {
            let f = fs::File::open(p).unwrap();
            for cmd in [libc::TCGETS, libc::FS_IOC_GETFLAGS] {
                for _ in 0..10 {
                    let mut buf = [0u8; 256];
                    // SAFETY: valid fd; the buffer is larger than either command's
                    // argument.
                    let r = unsafe { libc::ioctl(f.as_raw_fd(), cmd, buf.as_mut_ptr()) };
                    assert_eq!(
                        (r, last_errno()),
                        (-1, libc::ENOTTY),
                        "ioctl {cmd:#x} on {}",
                        p.display()
                    );
                }
            }
        }
        let log = m.stderr();
        assert!(!log.contains("ioctl"), "the daemon logged ioctls:\n{log}");
    });
}

/// poll(2)/epoll on a file of the mount (Go programs such as rclone register every
/// file they open with epoll): ready at once, as on a local file, and no warning in
/// the log (fuser's default answer logged "[Not Implemented] poll" for each).
#[test]
fn poll_says_ready_and_is_not_logged() {
    if !can_mount("poll_says_ready_and_is_not_logged") {
        return;
    }
    with_mount(dir_with(&[("f", b"f")]), tempdir(), |m| {
        fs::write(m.mnt_path("new"), b"n").unwrap();
        for p in [m.mnt_path("f"), m.mnt_path("new")] {
            let f = fs::File::open(&p).unwrap();
            let mut pfd = libc::pollfd {
                fd: f.as_raw_fd(),
                events: libc::POLLIN | libc::POLLOUT,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, 1000) };
            assert_eq!(n, 1, "poll on {}: {}", p.display(), last_errno());
            assert!(pfd.revents & libc::POLLIN != 0, "{:#x}", pfd.revents);
        }
        let log = m.stderr();
        assert!(!log.contains("poll"), "the daemon logged polls:\n{log}");
    });
}

#[test]
fn access_follows_the_mode_bits() {
    if !can_mount("access_follows_the_mode_bits") {
        return;
    }
    let src = dir_with(&[("plain", b"p"), ("exec", b"#!/bin/sh\n")]);
    fs::set_permissions(src.path().join("plain"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::set_permissions(src.path().join("exec"), fs::Permissions::from_mode(0o755)).unwrap();
    with_mount(src, tempdir(), |m| {
        assert_eq!(
            access(&m.mnt_path("plain"), libc::R_OK | libc::W_OK),
            Ok(())
        );
        // Even root needs an x bit to execute.
        assert_eq!(access(&m.mnt_path("plain"), libc::X_OK), Err(libc::EACCES));
        assert_eq!(access(&m.mnt_path("exec"), libc::X_OK), Ok(()));
        assert_eq!(
            access(&m.mnt_path("missing"), libc::F_OK),
            Err(libc::ENOENT)
        );
        assert_eq!(access(m.mountpoint(), libc::X_OK), Ok(()));
        let copied: Vec<_> = names(m.dst.path())
            .into_iter()
            .filter(|n| n != ".cachefs-state")
            .collect();
        assert!(copied.is_empty(), "access copied {copied:?}");
    });
}

#[test]
fn create_with_o_excl() {
    if !can_mount("create_with_o_excl") {
        return;
    }
    let src = dir_with(&[("s", b"s"), ("gone", b"g")]);
    with_mount(src, tempdir(), |m| {
        let excl = |p: &Path| {
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o640)
                .open(p)
        };
        assert_eq!(
            errno_of("excl on src file", excl(&m.mnt_path("s"))),
            libc::EEXIST
        );
        excl(&m.mnt_path("new")).unwrap().write_all(b"n").unwrap();
        assert_eq!(lstat(&m.mnt_path("new")).mode(), libc::S_IFREG | 0o640);
        assert_eq!(
            errno_of("excl twice", excl(&m.mnt_path("new"))),
            libc::EEXIST
        );
        fs::remove_file(m.mnt_path("gone")).unwrap();
        excl(&m.mnt_path("gone"))
            .unwrap()
            .write_all(b"again")
            .unwrap();
        assert_eq!(fs::read(m.mnt_path("gone")).unwrap(), b"again");
        assert_eq!(fs::read(m.mnt_path("s")).unwrap(), b"s");
    });
}

#[test]
fn fallocate_on_an_uncached_file() {
    if !can_mount("fallocate_on_an_uncached_file") {
        return;
    }
    let src = dir_with(&[("f", b"0123456789"), ("p", &pattern(64 << 10, 3))]);
    with_mount(src, tempdir(), |m| {
        let f = rw(&m.mnt_path("f"));
        // SAFETY: valid fd.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, 1 << 20) };
        assert_eq!(r, 0, "fallocate: {}", std::io::Error::last_os_error());
        assert_eq!(lstat(&m.mnt_path("f")).len(), 1 << 20);
        // SAFETY: valid fd.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 0, 2 << 20) };
        assert_eq!(
            r,
            0,
            "fallocate keep size: {}",
            std::io::Error::last_os_error()
        );
        drop(f);
        let got = fs::read(m.mnt_path("f")).unwrap();
        assert_eq!(got.len(), 1 << 20);
        assert_eq!(&got[..10], b"0123456789");
        assert!(got[10..].iter().all(|b| *b == 0));
        // Punch a hole in another uncached file.
        let p = rw(&m.mnt_path("p"));
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: valid fd.
        let r = unsafe { libc::fallocate(p.as_raw_fd(), mode, 8192, 16384) };
        assert_eq!(r, 0, "punch hole: {}", std::io::Error::last_os_error());
        drop(p);
        let mut want = pattern(64 << 10, 3);
        want[8192..24576].fill(0);
        assert!(fs::read(m.mnt_path("p")).unwrap() == want);
    });
}

#[test]
fn lseek_data_and_hole_on_a_sparse_file() {
    if !can_mount("lseek_data_and_hole_on_a_sparse_file") {
        return;
    }
    with_mount(tempdir(), tempdir(), |m| {
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(m.mnt_path("sparse"))
            .unwrap();
        f.write_all_at(&[1u8; 4096], 0).unwrap();
        f.write_all_at(&[2u8; 4096], 1 << 20).unwrap();
        f.sync_all().unwrap();
        let fd = f.as_raw_fd();
        // SAFETY: valid fd.
        let seek = |off: i64, whence| unsafe { libc::lseek(fd, off, whence) };
        assert_eq!(seek(0, libc::SEEK_DATA), 0);
        assert_eq!(seek(0, libc::SEEK_HOLE), 4096);
        assert_eq!(seek(4096, libc::SEEK_DATA), 1 << 20);
        assert_eq!(seek(1 << 20, libc::SEEK_HOLE), (1 << 20) + 4096);
        assert_eq!(seek((1 << 20) + 4096, libc::SEEK_DATA), -1);
        assert_eq!(last_errno(), libc::ENXIO);
        assert_eq!(seek(10, libc::SEEK_SET), 10);
        assert_eq!(seek(0, libc::SEEK_END), (1 << 20) + 4096);
    });
}

#[test]
fn copy_file_range_between_files_in_the_mount() {
    if !can_mount("copy_file_range_between_files_in_the_mount") {
        return;
    }
    let data = pattern(1 << 20, 21);
    let src = dir_with(&[("a", &data), ("b", b"0123456789")]);
    with_mount(src, tempdir(), |m| {
        let a = fs::File::open(m.mnt_path("a")).unwrap();
        let out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(m.mnt_path("c"))
            .unwrap();
        let (mut oi, mut oo): (i64, i64) = (100, 0);
        let mut left = 500_000usize;
        while left > 0 {
            // SAFETY: valid fds and offsets.
            let r = unsafe {
                libc::copy_file_range(a.as_raw_fd(), &mut oi, out.as_raw_fd(), &mut oo, left, 0)
            };
            assert!(
                r > 0,
                "copy_file_range: {}",
                std::io::Error::last_os_error()
            );
            left -= r as usize;
        }
        drop(out);
        assert!(fs::read(m.mnt_path("c")).unwrap() == data[100..500_100]);
        // Into the middle of another uncached file.
        let b = rw(&m.mnt_path("b"));
        let (mut oi, mut oo): (i64, i64) = (0, 3);
        // SAFETY: valid fds and offsets.
        let r =
            unsafe { libc::copy_file_range(a.as_raw_fd(), &mut oi, b.as_raw_fd(), &mut oo, 4, 0) };
        assert_eq!(r, 4, "{}", std::io::Error::last_os_error());
        drop(b);
        let mut want = b"0123456789".to_vec();
        want[3..7].copy_from_slice(&data[..4]);
        assert_eq!(fs::read(m.mnt_path("b")).unwrap(), want);
    });
}

/// Writes one byte through a shared mapping of `p` (opened read-write), then unmaps
/// and closes it.
fn mmap_write_one_byte(p: &Path) {
    let f = rw(p);
    let len = f.metadata().unwrap().len() as usize;
    assert!(len > 0);
    // SAFETY: a fresh shared read-write mapping of an open file, unmapped below.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(
        map,
        libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: inside the mapping.
    unsafe {
        *(map as *mut u8) ^= 0xff;
        assert_eq!(libc::munmap(map, len), 0);
    }
    drop(f);
}

/// (mtime, ctime) as `statx` gives them when asked for those two only, as `stat -c %Y`
/// asks: the kernel may then answer from its attribute cache even if it dropped the
/// cached atime (which mmap through FUSE passthrough does).
fn statx_times(p: &Path) -> ((i64, u32), (i64, u32)) {
    let c = cpath(p);
    // SAFETY: statx fills the zeroed struct.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and buffer.
    let r = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_MTIME | libc::STATX_CTIME,
            &mut stx,
        )
    };
    assert_eq!(r, 0, "statx: {}", std::io::Error::last_os_error());
    let t = |ts: libc::statx_timestamp| (ts.tv_sec, ts.tv_nsec);
    (t(stx.stx_mtime), t(stx.stx_ctime))
}

/// xfstests generic/080 and 215: a write through a shared mapping changes mtime and
/// ctime, and stat(2) after close() shows it, also with FUSE passthrough (where the
/// kernel writes the dst file without telling the daemon) and with attributes cached
/// for a long time (`--attr-ttl 1h`, so a stale cached value cannot expire meanwhile).
#[test]
fn mmap_write_updates_mtime_and_ctime_seen_after_close() {
    if !can_mount("mmap_write_updates_mtime_and_ctime_seen_after_close") {
        return;
    }
    for mode in [&[][..], &["--no-passthrough"][..], &["-w"][..]] {
        let mut args = vec!["--attr-ttl", "1h"];
        args.extend_from_slice(mode);
        let m = Mounted::with_dirs(tempdir(), tempdir(), &args);
        let p = m.mnt_path("mapped");
        fs::write(&p, vec![7u8; 4096]).unwrap();
        utimens(&p, (1_000_000, 0), (1_000_000, 0));
        let (mtime, ctime) = statx_times(&p);
        assert_eq!(mtime, (1_000_000, 0), "{mode:?}");
        // ctime only moves forward in whole ticks: make sure the write's is later.
        std::thread::sleep(std::time::Duration::from_millis(20));

        mmap_write_one_byte(&p);

        let after = statx_times(&p);
        assert_ne!(after.0, mtime, "{mode:?}: mtime after an mmap write");
        assert!(after.1 > ctime, "{mode:?}: ctime after an mmap write");
        assert_eq!(fs::read(&p).unwrap()[0], 7 ^ 0xff, "{mode:?}");
        m.stop();
    }
}

/// The permission bits as `statx` gives them when asked for the mode only, as
/// `stat -c %A` and `ls -l` ask (a request that also wants ctime would be answered
/// afresh, since the kernel drops its cached ctime at setxattr).
fn statx_mode(p: &Path) -> u32 {
    let c = cpath(p);
    // SAFETY: statx fills the zeroed struct.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and buffer.
    let r = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_MODE,
            &mut stx,
        )
    };
    assert_eq!(r, 0, "statx: {}", std::io::Error::last_os_error());
    u32::from(stx.stx_mode) & 0o7777
}

/// An access ACL with only the three base entries (owner, group, other), in the
/// kernel's `system.posix_acl_access` format.
fn base_acl(user: u16, group: u16, other: u16) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec(); // POSIX_ACL_XATTR_VERSION
    for (tag, perm) in [(0x01u16, user), (0x04, group), (0x20, other)] {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&u32::MAX.to_le_bytes());
    }
    v
}

/// xfstests generic/375 (first half): setfacl changes the mode (an ACL's base entries
/// are the mode's bits), and stat shows it at once, not after `--attr-ttl` (1 h here).
#[test]
fn setting_an_access_acl_changes_the_mode_seen_at_once() {
    if !can_mount("setting_an_access_acl_changes_the_mode_seen_at_once") {
        return;
    }
    let m = Mounted::with_dirs(tempdir(), tempdir(), &["--attr-ttl", "1h"]);
    let p = m.mnt_path("f");
    fs::write(&p, b"x").unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o2755)).unwrap();
    assert_eq!(statx_mode(&p), 0o2755);
    match setxattr(&p, "system.posix_acl_access", &base_acl(7, 7, 7)) {
        Err(libc::EOPNOTSUPP) => {
            eprintln!("skipping: dst's file system has no POSIX ACLs");
            m.stop();
            return;
        }
        r => r.expect("set the access ACL"),
    }
    // Root keeps the setgid bit (CAP_FSETID); the rwx bits follow the ACL.
    assert_eq!(statx_mode(&p), 0o2777, "mode after setfacl");
    removexattr(&p, "system.posix_acl_access").unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
    setxattr(&p, "system.posix_acl_access", &base_acl(4, 0, 0)).unwrap();
    assert_eq!(statx_mode(&p), 0o400, "mode after a second setfacl");
    m.stop();
}

// ----- POSIX ACLs (FUSE_POSIX_ACL: the kernel checks them) -----------------------------

/// Tags of a POSIX ACL entry (linux/posix_acl.h).
const ACL_USER_OBJ: u16 = 0x01;
const ACL_USER: u16 = 0x02;
const ACL_GROUP_OBJ: u16 = 0x04;
const ACL_MASK: u16 = 0x10;
const ACL_OTHER: u16 = 0x20;
/// Two users of the test machine's passwd (xfstests'), or any two ids: only numbers count.
const GRANTED: (u32, u32) = (1002, 1002);
const STRANGER: (u32, u32) = (1003, 1003);

/// A POSIX ACL in the kernel's xattr format from (tag, perm, id) entries (ids only
/// for named users and groups), sorted as the kernel wants them.
fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for &(tag, perm, id) in entries {
        let id = if tag == ACL_USER { id } else { u32::MAX };
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

/// The (tag, perm) of each entry of an ACL xattr value.
fn acl_entries(v: &[u8]) -> Vec<(u16, u16)> {
    v[4..]
        .chunks(8)
        .map(|e| {
            (
                u16::from_le_bytes([e[0], e[1]]),
                u16::from_le_bytes([e[2], e[3]]),
            )
        })
        .collect()
}

/// The access ACL: owner rw, `GRANTED` read, owning group and others nothing.
fn grant_read() -> Vec<u8> {
    acl(&[
        (ACL_USER_OBJ, 6, 0),
        (ACL_USER, 4, GRANTED.0),
        (ACL_GROUP_OBJ, 0, 0),
        (ACL_MASK, 4, 0),
        (ACL_OTHER, 0, 0),
    ])
}

/// 0 if `ids` can open `p` for reading (`<`) or writing (`>>`), else the errno.
fn open_as(ids: (u32, u32), how: &str, p: &Path) -> i32 {
    errno_as(
        ids,
        &format!("open(my $f, '{how}', $ARGV[0]) or exit($!+0)"),
        &[p],
    )
}

/// Runs `script` with `sh -c`, `$1` being `dir`; asserts it succeeded.
fn sh_in(dir: &Path, script: &str) {
    let out = std::process::Command::new("sh")
        .args(["-c", script, "sh"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A mount (with [`ARGS`]) of empty [`acl_dirs`].
fn acl_mounted(test: &str) -> Option<Mounted> {
    acl_dirs(test, &[]).map(|(src, dst)| Mounted::with_dirs(src, dst, ARGS))
}

/// src and dst whose roots every user may traverse (TempDirs are 0700), with `files`
/// in src; `None` (after saying so) where the test file system has no POSIX ACLs.
fn acl_dirs(test: &str, files: &[(&str, &[u8])]) -> Option<(TempDir, TempDir)> {
    if !can_mount(test) {
        return None;
    }
    let (src, dst) = (dir_with(files), tempdir());
    for d in [src.path(), dst.path()] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
    }
    if getxattr(dst.path(), "system.posix_acl_access") == Err(libc::EOPNOTSUPP) {
        eprintln!("skipping {test}: no POSIX ACLs on the test file system");
        return None;
    }
    Some((src, dst))
}

/// The kernel checks ACLs, not just the mode: a user named in a file's ACL reads what
/// its mode (0640, root's) keeps from others; another user is still refused. Once for
/// an ACL only src has (uncached; the copy made for the read keeps it), once for one
/// set through the mount.
#[test]
fn an_acl_grants_a_named_user_what_the_mode_does_not() {
    let name = "an_acl_grants_a_named_user_what_the_mode_does_not";
    let Some((src, dst)) = acl_dirs(name, &[("uncached", b"in src"), ("set_here", b"x")]) else {
        return;
    };
    for f in ["uncached", "set_here"] {
        fs::set_permissions(src.path().join(f), fs::Permissions::from_mode(0o600)).unwrap();
    }
    setxattr(
        &src.path().join("uncached"),
        "system.posix_acl_access",
        &grant_read(),
    )
    .unwrap();
    let m = Mounted::with_dirs(src, dst, ARGS);
    let p = m.mnt_path("uncached");
    assert_eq!(lstat(&p).mode() & 0o777, 0o640, "mode shows the ACL's mask");
    assert_eq!(open_as(GRANTED, "<", &p), 0, "the named user reads");
    assert_eq!(open_as(STRANGER, "<", &p), libc::EACCES);
    assert_eq!(open_as(GRANTED, ">>", &p), libc::EACCES, "read only");
    assert_eq!(
        getxattr(&m.dst_path("uncached"), "system.posix_acl_access"),
        Ok(grant_read()),
        "the copy in dst has src's ACL"
    );
    let p = m.mnt_path("set_here");
    assert_eq!(open_as(GRANTED, "<", &p), libc::EACCES, "no ACL yet");
    setxattr(&p, "system.posix_acl_access", &grant_read()).unwrap();
    assert_eq!(open_as(GRANTED, "<", &p), 0, "granted by the new ACL");
    assert_eq!(open_as(STRANGER, "<", &p), libc::EACCES);
    removexattr(&p, "system.posix_acl_access").unwrap();
    assert_eq!(open_as(GRANTED, "<", &p), libc::EACCES, "ACL removed");
    assert!(m.stderr().contains("POSIX ACLs: on"), "{}", m.stderr());
    m.stop();
}

/// A directory's default ACL is inherited by what is made in it, and replaces the
/// umask (POSIX): `touch` and `mkdir` with umask 022 give group write (0664, 0775).
#[test]
fn a_default_acl_is_inherited_and_replaces_the_umask() {
    let Some(m) = acl_mounted("a_default_acl_is_inherited_and_replaces_the_umask") else {
        return;
    };
    let d = m.mnt_path("d");
    fs::create_dir(&d).unwrap();
    fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
    let default = acl(&[
        (ACL_USER_OBJ, 7, 0),
        (ACL_USER, 7, GRANTED.0),
        (ACL_GROUP_OBJ, 7, 0),
        (ACL_MASK, 7, 0),
        (ACL_OTHER, 5, 0),
    ]);
    setxattr(&d, "system.posix_acl_default", &default).unwrap();
    sh_in(&d, "umask 022 && touch \"$1/f\" && mkdir \"$1/sub\"");
    assert_eq!(lstat(&d.join("f")).mode() & 0o7777, 0o664, "file: no umask");
    assert_eq!(
        lstat(&d.join("sub")).mode() & 0o7777,
        0o775,
        "dir: no umask"
    );
    let f_acl = getxattr(&d.join("f"), "system.posix_acl_access").expect("f's ACL");
    assert_eq!(
        acl_entries(&f_acl),
        [
            (ACL_USER_OBJ, 6),
            (ACL_USER, 7),
            (ACL_GROUP_OBJ, 7),
            (ACL_MASK, 6),
            (ACL_OTHER, 4)
        ]
    );
    assert_eq!(
        getxattr(&d.join("sub"), "system.posix_acl_default"),
        Ok(default),
        "a new directory inherits the default ACL"
    );
    assert_eq!(
        open_as(GRANTED, ">>", &d.join("f")),
        0,
        "the named user writes"
    );
    assert_eq!(open_as(STRANGER, ">>", &d.join("f")), libc::EACCES);
    // Without a default ACL the umask applies as before.
    sh_in(m.mountpoint(), "umask 027 && touch \"$1/g\"");
    assert_eq!(lstat(&m.mnt_path("g")).mode() & 0o7777, 0o640);
    m.stop();
}

/// chmod changes the ACL's mask (the group bits of a file with an ACL are the mask):
/// `chmod 600` takes away what the ACL granted a named user.
#[test]
fn chmod_changes_the_acl_mask() {
    let Some(m) = acl_mounted("chmod_changes_the_acl_mask") else {
        return;
    };
    let p = m.mnt_path("f");
    fs::write(&p, b"x").unwrap();
    setxattr(&p, "system.posix_acl_access", &grant_read()).unwrap();
    assert_eq!(open_as(GRANTED, "<", &p), 0);
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
    let entries = acl_entries(&getxattr(&p, "system.posix_acl_access").unwrap());
    assert!(
        entries.contains(&(ACL_MASK, 0)),
        "mask after chmod: {entries:?}"
    );
    assert!(
        entries.contains(&(ACL_USER, 4)),
        "the named entry stays: {entries:?}"
    );
    assert_eq!(open_as(GRANTED, "<", &p), libc::EACCES, "masked out");
    fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(open_as(GRANTED, "<", &p), 0, "mask back");
    m.stop();
}

/// xfstests generic/375 (second half): an access ACL set by the owner outside the
/// file's group clears setgid, as chmod does; set by a member, setgid stays.
#[test]
fn setting_an_acl_outside_the_files_group_clears_setgid() {
    let Some(m) = acl_mounted("setting_an_acl_outside_the_files_group_clears_setgid") else {
        return;
    };
    for (f, dir) in [("f", false), ("d", true)] {
        let p = m.mnt_path(f);
        if dir {
            fs::create_dir(&p).unwrap();
        } else {
            fs::write(&p, b"x").unwrap();
        }
        std::os::unix::fs::chown(&p, Some(GRANTED.0), Some(GRANTED.1)).unwrap();
        let set_as = |ids| {
            fs::set_permissions(&p, fs::Permissions::from_mode(0o2755)).unwrap();
            let out = run_as(ids, "setfacl", &[&"-m", &"u::rwx,g::rwx,o::rwx", &p]);
            assert!(out.status.success(), "{f}: setfacl as {ids:?}: {out:?}");
            lstat(&p).mode() & 0o7777
        };
        assert_eq!(set_as(GRANTED), 0o2777, "{f}: the owner in the group");
        assert_eq!(
            set_as((GRANTED.0, STRANGER.1)),
            0o777,
            "{f}: owner outside the group"
        );
    }
    m.stop();
}

/// With `-w`, ACLs are replayed to src like user xattrs: an access ACL set through the
/// mount, a directory's default ACL and the ACL a new file inherited from it reach a
/// local src (ext4), and an ACL removed through the mount leaves src.
#[test]
fn with_writeback_acls_reach_src() {
    let name = "with_writeback_acls_reach_src";
    let Some((src, dst)) = acl_dirs(name, &[("old", b"old")]) else {
        return;
    };
    setxattr(
        &src.path().join("old"),
        "system.posix_acl_access",
        &grant_read(),
    )
    .unwrap();
    let m = Mounted::with_dirs(src, dst, &["-w", "--attr-ttl", "0"]);
    fs::write(m.mnt_path("f"), b"f").unwrap();
    setxattr(&m.mnt_path("f"), "system.posix_acl_access", &grant_read()).unwrap();
    fs::create_dir(m.mnt_path("d")).unwrap();
    let default = acl(&[
        (ACL_USER_OBJ, 7, 0),
        (ACL_USER, 7, GRANTED.0),
        (ACL_GROUP_OBJ, 5, 0),
        (ACL_MASK, 7, 0),
        (ACL_OTHER, 5, 0),
    ]);
    setxattr(&m.mnt_path("d"), "system.posix_acl_default", &default).unwrap();
    fs::write(m.mnt_path("d/g"), b"g").unwrap();
    removexattr(&m.mnt_path("old"), "system.posix_acl_access").unwrap();
    wait_drained(&m, std::time::Duration::from_secs(60));
    let both = |rel: &str, attr: &str| {
        let (s, d) = (m.src_path(rel), m.dst_path(rel));
        assert_eq!(getxattr(&s, attr), getxattr(&d, attr), "{rel} {attr}");
        assert_eq!(lstat(&s).mode(), lstat(&d).mode(), "{rel} mode");
        getxattr(&s, attr)
    };
    assert_eq!(both("f", "system.posix_acl_access"), Ok(grant_read()));
    assert_eq!(both("d", "system.posix_acl_default"), Ok(default));
    assert!(
        both("d/g", "system.posix_acl_access").is_ok(),
        "d/g inherited an ACL"
    );
    assert_eq!(both("old", "system.posix_acl_access"), Err(libc::ENODATA));
    m.stop();
}
