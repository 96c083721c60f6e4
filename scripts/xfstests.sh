#!/usr/bin/env bash
# Run xfstests (fstests) through cachefs and through libfuse's passthrough_ll,
# the baseline (a plain FUSE passthrough of the same local file system), as
# FSTYP=fuse targets (see README.fuse in xfstests):
#   passthrough_ll  libfuse's example/passthrough_ll (the baseline)
#   cachefs         cachefs (FUSE passthrough where the kernel has it)
#   cachefs-nopt    cachefs --no-passthrough (the daemon serves all I/O)
#   cachefs-w       cachefs -w (writeback to src)
#   cachefs-mirror  cachefs -w -concurrent 0 (mirror mode)
# Each target gets fresh src and dst dirs for its TEST and its SCRATCH mount.
# mount(8) mounts cachefs through its helper (examples/mount.fuse.cachefs,
# installed as /sbin/mount.fuse.cachefs) as `NAME MNT -o src=..,dst=..`, so
# that the mount's source is TEST_DEV / SCRATCH_DEV, as xfstests expects.
# xfstests and libfuse are built once, from the tarballs in ../shared/thirdparty/
# beside the repository (or cloned from upstream), into target/thirdparty/.
#
# Prints, per target, passed/failed/not-run counts and wall time, then the
# tests that pass on the baseline and fail on cachefs (and the reverse). Exits
# non-zero if a test passes on the baseline and fails on a cachefs target,
# unless tests/xfstests/known-failures lists it for that target, or if, for a
# writeback target (cachefs-w, cachefs-mirror), src differs from the view once
# the run's writeback has drained (checked for the TEST and SCRATCH dirs after
# the run, not after each test: xfstests has no per-test hook for FSTYP=fuse;
# TEST holds what every test left there, SCRATCH what the last one left). A per-test
# watchdog kills a test that runs too long (and, if its processes hang in the
# file system, that target's FUSE daemons): it fails, the run goes on.
#
# Usage: scripts/xfstests.sh [--fast | -g GROUP | TEST...] [--targets LIST]
#          [--no-baseline] [--results DIR] [--timeout SECS] [--build-only]
#          [--no-deps]
#   --fast         the fast subset, tests/xfstests/fast (the default)
#   -g GROUP       an xfstests group, e.g. quick (11-14 min per target)
#   TEST...        tests by name, e.g. generic/001 generic/035
#   --targets LIST comma-separated cachefs targets (default: all four);
#                  the baseline passthrough_ll runs too unless --no-baseline
#                  (then every failure not in known-failures counts)
#   --reuse-baseline reuse the baseline's last results for the same tests,
#                  kernel, xfstests, libfuse and wrapper (kept in
#                  target/thirdparty/baseline/) instead of running it again
#   --timeout SECS the watchdog's limit per test (default 600: generic/069, 3 million
#                  4-byte O_APPEND writes, each a FUSE round trip without
#                  passthrough, takes 150-300 s on a busy 2-core machine)
#   --build-only   build xfstests and libfuse (if not built yet), then exit
#   --no-deps      do not run install-deps.sh --xfstests-only
# Environment: CACHEFS_BIN (default target/release/cachefs), THIRDPARTY_DIR
#   (default ../shared/thirdparty beside the repo), XFSTESTS_BUILD_DIR
#   (default target/thirdparty), TEST_TMPDIR (where mounts go, default /tmp).
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ALL_TARGETS=(cachefs cachefs-nopt cachefs-w cachefs-mirror)
BASELINE_TARGET=passthrough_ll
TARGETS=("${ALL_TARGETS[@]}")
BASELINE=1 REUSE_BASELINE=0 TIMEOUT=600 BUILD_ONLY=0 DEPS=1
RESULTS="$REPO_ROOT/target/test-results/xfstests"
SELECTION=() # what check gets: test names or -g GROUP
FAST_LIST="$REPO_ROOT/tests/xfstests/fast"
KNOWN_FAILURES="$REPO_ROOT/tests/xfstests/known-failures"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --fast) SELECTION=() ;;
    -g) SELECTION=(-g "$2"); shift ;;
    --targets) IFS=, read -r -a TARGETS <<<"$2"; shift ;;
    --no-baseline) BASELINE=0 ;;
    --reuse-baseline) REUSE_BASELINE=1 ;;
    --results) RESULTS="$2"; shift ;;
    --timeout) TIMEOUT="$2"; shift ;;
    --build-only) BUILD_ONLY=1 ;;
    --no-deps) DEPS=0 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown argument: $1 (see --help)" ;;
    */*) SELECTION+=("$1") ;;
    *) die "not a test name (DIR/NUMBER): $1" ;;
  esac
  shift
done
for t in "${TARGETS[@]}"; do
  [[ " ${ALL_TARGETS[*]} " == *" $t "* ]] || die "unknown target $t (known: ${ALL_TARGETS[*]})"
done
if [[ ${#SELECTION[@]} -eq 0 ]]; then
  mapfile -t SELECTION < <(sed 's/#.*//' "$FAST_LIST" | awk 'NF { print $1 }')
fi

[[ $(id -u) -eq 0 ]] || die "xfstests must run as root (it mounts and switches users)"
if [[ $DEPS -eq 1 ]]; then "$REPO_ROOT/scripts/install-deps.sh" --xfstests-only; fi

# ---- build xfstests and libfuse (once) -----------------------------------
BUILD_DIR="${XFSTESTS_BUILD_DIR:-$REPO_ROOT/target/thirdparty}"
# Used only without the tarballs: the commit the tarball was made from.
XFSTESTS_GIT=https://git.kernel.org/pub/scm/fs/xfs/xfstests-dev.git
XFSTESTS_COMMIT=63a29724a85f1999e49bf0a9bf0d22643b6116e5
# (unpack, build_libfuse_example: scripts/common.sh)

build_thirdparty() {
  mkdir -p "$BUILD_DIR"
  build_libfuse_example passthrough_ll
  PASSTHROUGH_LL="$LIBFUSE_EXAMPLE"
  XFSTESTS_DIR="$(unpack xfstests "$XFSTESTS_GIT" "$XFSTESTS_COMMIT")"
  if [[ ! -f "$XFSTESTS_DIR/.built" ]]; then
    log "building xfstests in $XFSTESTS_DIR (make -j2, about 3 minutes)"
    (cd "$XFSTESTS_DIR" && make -j2 >build.log 2>&1) ||
      { tail -n 30 "$XFSTESTS_DIR/build.log" >&2; die "xfstests build failed (log: $XFSTESTS_DIR/build.log)"; }
    touch "$XFSTESTS_DIR/.built"
  fi
  log "xfstests: $XFSTESTS_DIR; passthrough_ll: $PASSTHROUGH_LL"
}
build_thirdparty
[[ $BUILD_ONLY -eq 0 ]] || exit 0

BIN="$(cachefs_bin)"
BIN="$(realpath "$BIN")"

# ---- mount helpers --------------------------------------------------------
# mount(8) runs /sbin/mount.fuse.SUBTYPE SOURCE MNT -o OPTIONS for -t fuse.SUBTYPE.
# cachefs: the repository's helper, finding the binary through CACHEFS_BIN.
install -m 755 "$REPO_ROOT/examples/mount.fuse.cachefs" /sbin/mount.fuse.cachefs
export CACHEFS_BIN="$BIN"
# passthrough_ll: as README.fuse says (the source becomes fsname=).
# Plus what the cachefs helper does: the highest open-files limit allowed, a
# remount changes the mount's flags (with -i: no helper) instead of starting a
# second passthrough_ll, and dev,suid unless nodev / nosuid are given.
cat >/sbin/mount.fuse.passthrough_ll <<EOF
#!/bin/bash
# Installed by cachefs's scripts/xfstests.sh (xfstests' README.fuse).
ulimit -n 1048576 2>/dev/null || ulimit -n "\$(ulimit -Hn)"
if [[ ",\$*," =~ [,\ ]remount[,\ ] ]]; then
  mnt="\$(realpath "\$2")"
  cur="\$(awk -v m="\$mnt" '\$5 == m { o = \$6 } END { print o }' /proc/self/mountinfo)"
  want="\$(tr ',' '\n' <<<"\${*:4}" | grep -xE 'ro|rw|(no)?(exec|suid|dev|atime|diratime|relatime|strictatime|lazytime)|sync|async|dirsync' | paste -sd, -)"
  exec mount -i -o "remount,\$cur\${want:+,\$want}" "\$mnt"
fi
# mount(8) passes nodev / nosuid but never dev / suid: add them as mount.fuse3 does.
extra=()
[[ ",\${*:4}," == *,nodev,* ]] || extra+=(-o dev)
[[ ",\${*:4}," == *,nosuid,* ]] || extra+=(-o suid)
exec "$PASSTHROUGH_LL" -ofsname="\$@" "\${extra[@]}"
EOF
chmod 755 /sbin/mount.fuse.passthrough_ll

# ---- the run ------------------------------------------------------------
mkdir -p "$RESULTS"
RESULTS="$(cd "$RESULTS" && pwd)"
WORK="$(mktemp -d "${TEST_TMPDIR:-/tmp}/xfs.XXXXXX")"
chmod 755 "$WORK" # xfstests' users (fsgqa) must reach the mounts
WATCHDOG_PID=""

# daemon_pids: the FUSE daemons serving this run (their command lines name WORK).
daemon_pids() {
  pgrep -f -- "$WORK/" || true
}

# shellcheck disable=SC2317 # invoked by the trap
cleanup() {
  local rc=$? p
  if [[ -n "$WATCHDOG_PID" ]]; then kill "$WATCHDOG_PID" 2>/dev/null || true; fi
  if [[ -n "$CHILD_PID" ]]; then kill -TERM "$CHILD_PID" 2>/dev/null || true; fi
  unmount_all_under "$WORK"
  for p in $(daemon_pids); do reap_any "$p" 30; done
  if [[ -n "$CHILD_PID" ]]; then reap "$CHILD_PID" 10; fi
  if [[ -z "$(mounts_under "$WORK")" ]]; then rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# reap_any PID SECS: like reap, for a process that is not our child (the mount
# helpers start the daemons): wait, SIGTERM after 5 s, SIGKILL after SECS.
reap_any() {
  local pid="$1" secs="$2" i
  for ((i = 0; i < secs * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    [[ $i -eq 50 ]] && kill -TERM "$pid" 2>/dev/null
    sleep 0.1
  done
  log "pid $pid did not exit after ${secs}s; killing it"
  kill -KILL "$pid" 2>/dev/null || true
}

# descendants PID: PID and every process below it.
descendants() {
  ps -e -o pid=,ppid= | awk -v root="$1" '
    { parent[$1] = $2 }
    END {
      for (p in parent) {
        q = p
        while (q != "" && q != 0 && q != 1) { if (q == root) { print p; break }; q = parent[q] }
      }
    }'
}

# watchdog CHECK_PID TARGET_DIR: every 5 s, find the test check is running (the
# process `/bin/bash .../tests/DIR/NUMBER` below CHECK_PID); past TIMEOUT seconds kill
# it and what it started; if they are still there 10 s later (stuck in the file
# system), kill this run's FUSE daemons, which fails their pending requests.
watchdog() {
  local check_pid="$1" tdir="$2" pid et name p i seen="" since=0
  while kill -0 "$check_pid" 2>/dev/null; do
    sleep 5
    read -r pid name < <(
      ps -e -o pid=,args= | awk -v pids=" $(descendants "$check_pid" | tr '\n' ' ') " '
        index(pids, " " $1 " ") && $NF ~ /(^|\/)tests\/[^\/]+\/[0-9]+$/ && $(NF-1) ~ /bash$/ {
          n = split($NF, part, "/"); print $1, part[n-1] "/" part[n]; exit
        }'
    ) || continue
    [[ -n "${pid:-}" ]] || continue
    # Timed from when this loop first saw the test, not from ps's etimes: for a
    # process started while ps runs, ps reads a start time later than the uptime it
    # read before and reports 4123168608 s (a wrap); the watchdog then killed tests
    # that had just begun (generic/122 and 256, 2026-12-07).
    if [[ "$seen" != "$pid $name" ]]; then
      seen="$pid $name" since=$(date +%s)
    fi
    et=$(($(date +%s) - since))
    [[ $et -gt $TIMEOUT ]] || continue
    log "watchdog: $name has run ${et}s (limit ${TIMEOUT}s); killing it"
    echo "$name: killed by the watchdog after ${et}s" >>"$tdir/watchdog.log"
    local victims
    victims="$(descendants "$pid")"
    # shellcheck disable=SC2086 # a list of pids
    kill -KILL $victims 2>/dev/null || true
    for ((i = 0; i < 10; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 1
    done
    if kill -0 "$pid" 2>/dev/null; then
      log "watchdog: $name is stuck; killing the FUSE daemons of this target"
      echo "$name: stuck after SIGKILL; FUSE daemons killed" >>"$tdir/watchdog.log"
      for p in $(daemon_pids); do kill -KILL "$p" 2>/dev/null || true; done
      # The mounts are dead now; check unmounts and mounts them again.
    fi
  done
}

# write_config TARGET DIR: xfstests' local.config for TARGET, mounts under DIR.
write_config() {
  local target="$1" d="$2" subtype opts_t opts_s extra=""
  case "$target" in
    passthrough_ll)
      subtype=passthrough_ll
      opts_t="source=$d/test/src,allow_other,default_permissions"
      opts_s="source=$d/scratch/src,allow_other,default_permissions"
      ;;
    cachefs*)
      subtype=cachefs
      case "$target" in
        cachefs-nopt) extra=",no-passthrough" ;;
        cachefs-w) extra=",w" ;;
        cachefs-mirror) extra=",w,concurrent=0" ;;
      esac
      opts_t="src=$d/test/src,dst=$d/test/dst,logfile=$RESULTS/$target/test.daemon.log$extra"
      opts_s="src=$d/scratch/src,dst=$d/scratch/dst,logfile=$RESULTS/$target/scratch.daemon.log$extra"
      ;;
  esac
  cat >"$d/local.config" <<EOF
# xfstests config written by cachefs's scripts/xfstests.sh for $target
export FSTYP=fuse
export FUSE_SUBTYP=.$subtype
export TEST_DEV=xfs-$target-test
export TEST_DIR=$d/test/mnt
export SCRATCH_DEV=xfs-$target-scratch
export SCRATCH_MNT=$d/scratch/mnt
export TEST_FS_MOUNT_OPTS="-o $opts_t"
export MOUNT_OPTIONS="-o $opts_s"
export RESULT_BASE=$RESULTS/$target/results
EOF
}

# list_field LOG PREFIX: the tests on check's summary line "PREFIX: a b c".
list_field() {
  sed -n "s/^$1: //p" "$2" | tail -n1 | tr ' ' '\n' | sed '/^$/d' | sort -u
}

declare -A SUMMARY
SRC_DIFFERS=0
# run_target TARGET: run check for TARGET; leaves TARGET/{ran,failed,notrun,passed}.
run_target() {
  local target="$1"
  local d="$WORK/$target" tdir="$RESULTS/$target" rc=0 t0 t1 p
  rm -rf "$tdir"
  mkdir -p "$tdir" "$d/test/src" "$d/test/dst" "$d/test/mnt" \
    "$d/scratch/src" "$d/scratch/dst" "$d/scratch/mnt"
  chmod -R 755 "$d"
  write_config "$target" "$d"
  cp "$d/local.config" "$tdir/local.config"
  log "xfstests on $target: ${SELECTION[*]} (log: $tdir/check.log)"
  t0=$(date +%s)
  (cd "$XFSTESTS_DIR" && exec env HOST_OPTIONS="$d/local.config" ./check "${SELECTION[@]}") \
    </dev/null >"$tdir/check.log" 2>&1 &
  CHILD_PID=$!
  watchdog "$CHILD_PID" "$tdir" &
  WATCHDOG_PID=$!
  wait "$CHILD_PID" || rc=$?
  CHILD_PID=""
  kill "$WATCHDOG_PID" 2>/dev/null || true
  wait "$WATCHDOG_PID" 2>/dev/null || true
  WATCHDOG_PID=""
  t1=$(date +%s)
  # Leave nothing mounted; the daemons exit once unmounted.
  unmount_all_under "$d"
  for p in $(daemon_pids); do reap_any "$p" 30; done

  list_field "Ran" "$tdir/check.log" >"$tdir/ran"
  list_field "Failures" "$tdir/check.log" >"$tdir/failed"
  list_field "Not run" "$tdir/check.log" >"$tdir/notrun"
  # check counts the tests it did not run in "Ran" too.
  comm -23 "$tdir/ran" <(sort -u "$tdir/failed" "$tdir/notrun") >"$tdir/passed"
  local note=""
  if ! grep -qE '^(Passed all|Failed) [0-9]+ ' "$tdir/check.log" ||
    grep -qx 'Interrupted!' "$tdir/check.log"; then
    note=" (check did not finish, exit $rc: see its log)"
    tail -n 20 "$tdir/check.log" >&2
  fi
  [[ -s "$tdir/watchdog.log" ]] && note+=" (watchdog: $(wc -l <"$tdir/watchdog.log") killed)"
  if [[ $target == cachefs-w || $target == cachefs-mirror ]]; then
    local dev
    for dev in test scratch; do
      if ! src_equals_view "$target" "$dev" >>"$tdir/src-vs-view"; then
        note+=" (src != view, see $tdir/src-vs-view)"
        SRC_DIFFERS=1
      fi
    done
    log "$target: $(paste -sd';' "$tdir/src-vs-view")"
  fi
  SUMMARY[$target]="$(printf '%-15s %4d passed %4d failed %4d not run %6ss%s' "$target:" \
    "$(wc -l <"$tdir/passed")" "$(wc -l <"$tdir/failed")" "$(wc -l <"$tdir/notrun")" \
    $((t1 - t0)) "$note")"
  log "${SUMMARY[$target]}"
  if [[ -s "$tdir/failed" ]]; then log "$target failed: $(tr '\n' ' ' <"$tdir/failed")"; fi
}

# tree_listing DIR: one line per entry below DIR: path, type, mode, owner, and
# for regular files size, mtime and a hash of the bytes (files over 64 MiB: size
# and mtime only), for symlinks the target, and user.* xattrs. Directory sizes
# and times legitimately differ between src and the view, so are left out.
tree_listing() {
  python3 - "$1" <<'EOF'
import hashlib, os, stat, sys
root = sys.argv[1]
for dirpath, dirs, files in os.walk(root):
    dirs.sort()
    for name in sorted(dirs + files):
        p = os.path.join(dirpath, name)
        rel = os.path.relpath(p, root)
        st = os.lstat(p)
        line = [rel, oct(st.st_mode), str(st.st_uid), str(st.st_gid)]
        if stat.S_ISREG(st.st_mode):
            line += [str(st.st_size), str(st.st_mtime_ns)]
            if st.st_size <= 64 << 20:
                h = hashlib.sha1()
                with open(p, "rb") as f:
                    for b in iter(lambda: f.read(1 << 20), b""):
                        h.update(b)
                line.append(h.hexdigest())
        elif stat.S_ISLNK(st.st_mode):
            line.append(os.readlink(os.fsencode(p)).hex())
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            line.append(hex(st.st_rdev))
        if not stat.S_ISLNK(st.st_mode):
            try:
                xs = sorted(x for x in os.listxattr(p, follow_symlinks=False) if x.startswith("user."))
                line += [x + "=" + os.getxattr(p, x, follow_symlinks=False).hex() for x in xs]
            except OSError as e:
                line.append("xattrs:" + e.strerror)
        print("\t".join(line))
EOF
}

# src_equals_view TARGET DEV: for a writeback target whose daemons have exited,
# mount DEV's (test or scratch) src and dst again in the target's mode, wait until
# `cachefs status` shows nothing pending, and compare src with the view (see
# tree_listing). Prints "DEV: src = view" or how many entries differ (the diff
# is in the target's results as src-vs-view.DEV.diff); false if they differ.
src_equals_view() {
  local target="$1" dev="$2" d="$WORK/$1/$2" tdir="$RESULTS/$1" args=(-w) pid i rc=0 pending=""
  [[ $target == cachefs-mirror ]] && args+=(-concurrent 0)
  "$BIN" -src "$d/src" -dst "$d/dst" -mountpoint "$d/mnt" "${args[@]}" \
    >"$tdir/src-vs-view.$dev.log" 2>&1 </dev/null &
  pid=$!
  if ! wait_mounted "$d/mnt" "$pid" 30; then
    echo "$dev: src vs view not checked: cachefs did not mount (log: $tdir/src-vs-view.$dev.log)"
    reap "$pid" 10
    return 1
  fi
  for ((i = 0; i < 120; i++)); do
    pending="$("$BIN" status "$d/dst" --json 2>/dev/null | tr -d ' \n' | grep -o '"pending_ops":[0-9]*' | cut -d: -f2 || true)"
    [[ $pending == 0 ]] && break
    sleep 1
  done
  if tree_listing "$d/src" >"$tdir/src-vs-view.$dev.src" &&
    tree_listing "$d/mnt" >"$tdir/src-vs-view.$dev.view"; then
    diff "$tdir/src-vs-view.$dev.src" "$tdir/src-vs-view.$dev.view" >"$tdir/src-vs-view.$dev.diff" || rc=$?
  else
    echo "listing failed" >"$tdir/src-vs-view.$dev.diff"
    rc=2
  fi
  umount "$d/mnt" 2>/dev/null || umount -l "$d/mnt" 2>/dev/null || true
  reap "$pid" 60
  if [[ $pending != 0 ]]; then echo -n "$dev: writeback not drained after 120 s ($pending ops pending); "; fi
  if [[ $rc -eq 0 ]]; then
    echo "$dev: src = view ($(wc -l <"$tdir/src-vs-view.$dev.src") entries)"
  else
    echo "$dev: src != view: $(grep -c '^[<>]' "$tdir/src-vs-view.$dev.diff") lines differ (src-vs-view.$dev.diff)"
    return 1
  fi
}

# known TARGET: the tests known-failures lists for TARGET.
known() {
  sed 's/#.*//' "$KNOWN_FAILURES" |
    awk -v t="$1" 'NF >= 2 { n = split($2, ts, ","); for (i = 1; i <= n; i++) if (ts[i] == "all" || ts[i] == t) print $1 }' |
    sort -u
}

# The baseline's results depend only on these; --reuse-baseline keeps them here.
BASELINE_KEY="$(
  {
    uname -r
    printf '%s\n' "${SELECTION[@]}" "$XFSTESTS_DIR" "$LIBFUSE_DIR"
    cat /sbin/mount.fuse.passthrough_ll
  } | sha256sum | cut -c1-16
)"
BASELINE_CACHE="$BUILD_DIR/baseline/$BASELINE_KEY"

ORDER=()
if [[ $BASELINE -eq 1 ]]; then ORDER+=("$BASELINE_TARGET"); fi
ORDER+=("${TARGETS[@]}")
for t in "${ORDER[@]}"; do
  if [[ $t == "$BASELINE_TARGET" && $REUSE_BASELINE -eq 1 && -f "$BASELINE_CACHE/summary" ]]; then
    log "$t: reusing the results of $(cat "$BASELINE_CACHE/date") ($BASELINE_CACHE)"
    rm -rf "${RESULTS:?}/$t"
    mkdir -p "$RESULTS/$t"
    cp "$BASELINE_CACHE"/{ran,failed,notrun,passed} "$RESULTS/$t/"
    SUMMARY[$t]="$(cat "$BASELINE_CACHE/summary") (reused from $(cat "$BASELINE_CACHE/date"))"
    continue
  fi
  run_target "$t"
  if [[ $t == "$BASELINE_TARGET" && ${SUMMARY[$t]} != *"did not finish"* ]]; then
    rm -rf "$BASELINE_CACHE"
    mkdir -p "$BASELINE_CACHE"
    cp "$RESULTS/$t"/{ran,failed,notrun,passed} "$BASELINE_CACHE/"
    printf '%s\n' "${SUMMARY[$t]}" >"$BASELINE_CACHE/summary"
    date -u '+%Y-%m-%d %H:%M UTC' >"$BASELINE_CACHE/date"
  fi
done

# ---- the comparison -------------------------------------------------------
words() { tr '\n' ' ' | sed 's/ $//'; }
FAILED=0
SUMMARY_FILE="$RESULTS/summary.txt"
{
  echo "xfstests results ($(date -u '+%Y-%m-%d %H:%M UTC'); tests: ${SELECTION[*]}):"
  for t in "${ORDER[@]}"; do echo "  ${SUMMARY[$t]}"; done
} >"$SUMMARY_FILE"
B="$RESULTS/$BASELINE_TARGET"
for t in "${TARGETS[@]}"; do
  T="$RESULTS/$t"
  if [[ $BASELINE -eq 1 ]]; then
    worse="$(comm -12 "$B/passed" "$T/failed")"
    better="$(comm -12 "$B/failed" "$T/passed")"
  else
    worse="$(cat "$T/failed")"
    better=""
  fi
  new="$(comm -23 <(sed '/^$/d' <<<"$worse") <(known "$t") | words)"
  listed="$(comm -12 <(sed '/^$/d' <<<"$worse") <(known "$t") | words)"
  fixed="$(comm -12 <(known "$t") "$T/passed" | words)"
  better="$(words <<<"$better")"
  skipped=""
  if [[ $BASELINE -eq 1 ]]; then skipped="$(comm -12 "$B/passed" "$T/notrun" | words)"; fi
  {
    if [[ -n "$new" && $BASELINE -eq 1 ]]; then echo "$t FAILS where $BASELINE_TARGET passes: $new"; fi
    if [[ -n "$new" && $BASELINE -eq 0 ]]; then echo "$t FAILS (not in known-failures): $new"; fi
    if [[ -n "$listed" ]]; then echo "$t fails (listed in known-failures): $listed"; fi
    if [[ -n "$better" ]]; then echo "$t passes where $BASELINE_TARGET fails: $better"; fi
    if [[ -n "$skipped" ]]; then echo "$t does not run (a feature it lacks) where $BASELINE_TARGET passes: $skipped"; fi
    if [[ -n "$fixed" ]]; then echo "$t passes these known failures (remove them from the list?): $fixed"; fi
  } >>"$SUMMARY_FILE"
  [[ -z "$new" ]] || FAILED=1
done
for t in "${TARGETS[@]}"; do
  if [[ -f "$RESULTS/$t/src-vs-view" ]]; then
    echo "$t, after the run's writeback: $(paste -sd';' "$RESULTS/$t/src-vs-view")" >>"$SUMMARY_FILE"
  fi
done
cat "$SUMMARY_FILE"
[[ $SRC_DIFFERS -eq 0 ]] || FAILED=1
exit "$FAILED"
