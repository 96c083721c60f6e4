#!/usr/bin/env python3
"""Small helpers for bench/compare.sh (stdlib only).

Subcommands (each prints one machine-readable line on stdout):

  mkfile PATH SIZE_MB            write SIZE_MB MiB of pseudo-random bytes
  mksmall DIR NDIRS NFILES KB    create NFILES files of KB KiB spread over NDIRS dirs,
                                 print elapsed seconds (no fsync: page cache, as a user sees it)
  statall DIR                    lstat every entry under DIR, print "seconds count"
  readall DIR                    read every regular file under DIR, print "seconds bytes"
  ttfb PATH                      open + first 4 KiB read, then the rest in 1 MiB reads;
                                 print "ttfb_ms total_s bytes"
  mktree DIR ENTRIES             create a tree of ENTRIES entries (dirs of 100 empty files)
  fio BW|IOPS JSONFILE read|write  extract MB/s (bw_bytes/1e6) or IOPS from fio JSON
  vmhwm PID                      print VmHWM of PID in KiB (0 if unknown)
  settle MAX_S PID...            wait (at most MAX_S s) until the PIDs use under 5% of a CPU
                                 for two 0.3 s windows in a row (background uploads,
                                 flushes); print the seconds waited
"""
import json
import os
import sys
import time


def mkfile(path, size_mb):
    size_mb = int(size_mb)
    chunk = os.urandom(1 << 20)
    # vary each MiB a bit so nothing dedups/compresses trivially
    with open(path, "wb") as f:
        for i in range(size_mb):
            f.write(i.to_bytes(8, "little") + chunk[8:])
        f.flush()
        os.fsync(f.fileno())
    print(size_mb)


def mksmall(root, ndirs, nfiles, kb):
    ndirs, nfiles, kb = int(ndirs), int(nfiles), int(kb)
    data = os.urandom(kb * 1024)
    per = max(1, nfiles // ndirs)
    t0 = time.perf_counter()
    os.makedirs(root, exist_ok=True)
    made = 0
    for d in range(ndirs):
        dpath = os.path.join(root, "d%03d" % d)
        os.mkdir(dpath)
        n = per if d < ndirs - 1 else nfiles - made
        for i in range(n):
            fd = os.open(os.path.join(dpath, "f%05d" % i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, data)
            os.close(fd)
            made += 1
    print("%.4f" % (time.perf_counter() - t0))


def _walk(root):
    stack = [root]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                yield e
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)


def statall(root):
    t0 = time.perf_counter()
    n = 0
    for e in _walk(root):
        os.lstat(e.path)
        n += 1
    print("%.4f %d" % (time.perf_counter() - t0, n))


def readall(root):
    t0 = time.perf_counter()
    total = 0
    for e in _walk(root):
        if e.is_file(follow_symlinks=False):
            with open(e.path, "rb", buffering=0) as f:
                while True:
                    b = f.read(1 << 20)
                    if not b:
                        break
                    total += len(b)
    print("%.4f %d" % (time.perf_counter() - t0, total))


def ttfb(path):
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    first = os.read(fd, 4096)
    t1 = time.perf_counter()
    total = len(first)
    while True:
        b = os.read(fd, 1 << 20)
        if not b:
            break
        total += len(b)
    os.close(fd)
    t2 = time.perf_counter()
    print("%.1f %.4f %d" % ((t1 - t0) * 1000.0, t2 - t0, total))


def mktree(root, entries):
    entries = int(entries)
    os.makedirs(root, exist_ok=True)
    made = 0
    d = 0
    while made < entries:
        dpath = os.path.join(root, "t%05d" % d)
        os.mkdir(dpath)
        made += 1
        for i in range(min(99, entries - made)):
            os.close(os.open(os.path.join(dpath, "e%03d" % i), os.O_WRONLY | os.O_CREAT, 0o644))
            made += 1
        d += 1
    print(made)


def fio(kind, jsonfile, rw):
    with open(jsonfile) as f:
        txt = f.read()
    # fio may print warnings before the JSON object
    j = json.loads(txt[txt.index("{"):])
    jobs = j["jobs"]
    if kind.upper() == "BW":
        bw = sum(job[rw]["bw_bytes"] for job in jobs)
        print("%.1f" % (bw / 1e6))
    else:
        print("%.0f" % sum(job[rw]["iops"] for job in jobs))


def vmhwm(pid):
    try:
        with open("/proc/%s/status" % pid) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    print(line.split()[1])
                    return
    except OSError:
        pass
    print(0)


def _cpu_ticks(pids):
    total = 0
    for pid in pids:
        try:
            with open("/proc/%s/stat" % pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except (OSError, IndexError, ValueError):
            pass
    return total


def settle(max_s, *pids):
    hz = os.sysconf("SC_CLK_TCK")
    window = 0.3
    t0 = time.perf_counter()
    quiet = 0
    last = _cpu_ticks(pids)
    while quiet < 2 and time.perf_counter() - t0 < float(max_s):
        time.sleep(window)
        now = _cpu_ticks(pids)
        quiet = quiet + 1 if (now - last) / hz < 0.05 * window else 0
        last = now
    print("%.1f" % (time.perf_counter() - t0))


CMDS = {
    "mkfile": mkfile, "mksmall": mksmall, "statall": statall, "readall": readall,
    "ttfb": ttfb, "mktree": mktree, "fio": fio, "vmhwm": vmhwm,
    "settle": settle,
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in CMDS:
        sys.stderr.write(__doc__)
        sys.exit(2)
    CMDS[sys.argv[1]](*sys.argv[2:])
