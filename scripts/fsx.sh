#!/usr/bin/env bash
# Data-integrity runs of fsx (crates.io `fsx`, File System eXerciser) through a
# cachefs mount: random pread/pwrite/mmap read+write/ftruncate/fsync/
# fdatasync/posix_fallocate/close-reopen/msync(MS_INVALIDATE) ops, every read
# checked against an in-memory model. Cases, per mode:
#   uncached   fsx on a file that exists only in src when the mount starts
#              (fsx opens it O_RDWR|O_TRUNC, then grows and shrinks it)
#   uncached-block  fsx in block mode on another multi-MiB src-only file:
#              opened O_RDWR without truncation (so the whole file is copied
#              up first), size never changes, no truncate/fallocate
#   new        fsx on a file that does not exist yet
# plus a read-through check (sha256 of a src-only file read via the mount) and,
# after all cases, an unmount + remount check that every file still has the same
# content. Modes: cache (default flags: FUSE passthrough where the kernel has
# it), with --daemon-io also cache mode with --no-passthrough (the daemon
# serves every read and write), and with --writeback, -w and mirror mode
# (-w -concurrent 0), where src must also end up with the same bytes (polled for
# up to WB_WAIT seconds).
#
# Usage: scripts/fsx.sh [--writeback] [--daemon-io] [--no-cache] [--ops N]
#          [--seed N|random] [--extra] [--plain DIR] [--results DIR]
#          [--timeout SECS]
#   --ops N     operations per fsx run (default 20000)
#   --seed N    base seed (default 1; each case adds its index); "random" picks one
#   --extra     also punch_hole, sendfile, copy_file_range, posix_fadvise
#   --plain DIR run the same cases directly in DIR, no cachefs (sanity check)
# Environment: CACHEFS_BIN, CACHEFS_ARGS (extra daemon flags), TEST_TMPDIR,
#   WB_WAIT (default 120).
# Exits non-zero on any miscompare, fsx error, daemon death or unmount problem.
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WRITEBACK=0 DAEMON_IO=0 CACHE=1 OPS=20000 SEED=1 EXTRA=0 PLAIN="" TIMEOUT=900
WB_WAIT="${WB_WAIT:-120}"
RESULTS="$REPO_ROOT/target/test-results/fsx"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --writeback) WRITEBACK=1 ;;
    --daemon-io) DAEMON_IO=1 ;;
    --no-cache) CACHE=0 ;;
    --ops) OPS="$2"; shift ;;
    --seed) SEED="$2"; shift ;;
    --extra) EXTRA=1 ;;
    --plain) PLAIN="$2"; shift ;;
    --results) RESULTS="$2"; shift ;;
    --timeout) TIMEOUT="$2"; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
  shift
done
command -v fsx >/dev/null || die "fsx not found: run scripts/install-deps.sh"
if [[ "$SEED" == random ]]; then SEED=$((RANDOM * 32768 + RANDOM)); fi
[[ "$SEED" =~ ^[0-9]+$ ]] || die "--seed takes a number or 'random'"
[[ -n "$PLAIN" ]] || BIN="$(cachefs_bin)"

mkdir -p "$RESULTS"
RESULTS="$(cd "$RESULTS" && pwd)"
WORK="$(mktemp -d "${TEST_TMPDIR:-/tmp}/cachefs-fsx.XXXXXX")"
DAEMON_PID=""
# shellcheck disable=SC2317 # invoked by the trap
cleanup() {
  local rc=$?
  cleanup_work "$WORK" "$DAEMON_PID"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

FILE_MIB=4 # size of the src-only files
write_conf() { # write_conf FILE blockmode(0|1)
  local extra_w=0
  [[ $EXTRA -eq 1 ]] && extra_w=1
  if [[ $2 -eq 1 ]]; then
    cat >"$1" <<EOF
blockmode = true
nosizechecks = true
[opsize]
max = 131072
[weights]
close_open = 0
read = 10
write = 10
mapread = 10
mapwrite = 10
invalidate = 1
truncate = 0
fsync = 1
fdatasync = 1
posix_fallocate = 0
punch_hole = $extra_w
sendfile = $extra_w
posix_fadvise = $extra_w
copy_file_range = $extra_w
EOF
  else
    cat >"$1" <<EOF
# at most 8 MiB, so the 4 MiB src file's size is within range
flen = 8388608
[opsize]
max = 131072
[weights]
close_open = 1
read = 10
write = 10
mapread = 10
mapwrite = 10
invalidate = 1
truncate = 3
fsync = 1
fdatasync = 1
posix_fallocate = 3
punch_hole = $extra_w
sendfile = $extra_w
posix_fadvise = $extra_w
copy_file_range = $extra_w
EOF
  fi
}
write_conf "$WORK/fsx.toml" 0
write_conf "$WORK/fsx-block.toml" 1
cp "$WORK/fsx.toml" "$WORK/fsx-block.toml" "$RESULTS/"

SUMMARIES=()
FAILED=0
PASS_N=0 FAIL_N=0

result() { # result LABEL ok|FAIL DETAIL
  SUMMARIES+=("$(printf '%-40s %s %s' "$1" "$2" "${3:-}")")
  if [[ "$2" == ok ]]; then PASS_N=$((PASS_N + 1)); else FAIL_N=$((FAIL_N + 1)); FAILED=1; fi
}

# run_fsx LABEL FILE CONF SEED: one fsx run, log to RESULTS/LABEL.log.
run_fsx() {
  local label="$1" file="$2" conf="$3" seed="$4" rc=0 t0 t1
  local logf="$RESULTS/$label.log" art="$RESULTS/$label.artifacts"
  mkdir -p "$art"
  log "fsx $label: $OPS ops, seed $seed, on $file"
  t0=$(date +%s)
  run_child timeout --kill-after=30 "$TIMEOUT" fsx -N "$OPS" -S "$seed" -f "$conf" -P "$art" "$file" \
    </dev/null >"$logf" 2>&1 || rc=$?
  t1=$(date +%s)
  rmdir "$art" 2>/dev/null || true # empty unless fsx failed
  if [[ $rc -eq 0 ]] && grep -q 'All operations completed A-OK!' "$logf"; then
    result "fsx $label" ok "($OPS ops, seed $seed, $((t1 - t0))s)"
  else
    [[ $rc -eq 124 || $rc -eq 137 ]] && log "fsx $label: timed out after ${TIMEOUT}s"
    log "fsx $label FAILED (exit $rc; reproduce: fsx -N $OPS -S $seed -f $conf FILE); tail of $logf:"
    tail -n 30 "$logf" >&2 || true
    result "fsx $label" FAIL "(exit $rc, seed $seed, log $logf)"
  fi
}

# make_random FILE MIB
make_random() { head -c "$(($2 * 1024 * 1024))" /dev/urandom >"$1"; }

start_daemon() { # start_daemon DIR LABEL [FLAGS...]
  local d="$1" label="$2"
  shift 2
  # shellcheck disable=SC2086 # CACHEFS_ARGS is a list of flags
  "$BIN" -src "$d/src" -dst "$d/dst" -mountpoint "$d/mnt" "$@" ${CACHEFS_ARGS:-} \
    </dev/null >>"$RESULTS/$label.daemon.log" 2>&1 &
  DAEMON_PID=$!
  if ! wait_mounted "$d/mnt" "$DAEMON_PID" 30; then
    tail -n 20 "$RESULTS/$label.daemon.log" >&2 || true
    DAEMON_PID=""
    return 1
  fi
}

# wait_src_match FILE_IN_MNT FILE_IN_SRC: poll until src has the mount's bytes.
wait_src_match() {
  local i
  for ((i = 0; i < WB_WAIT * 2; i++)); do
    if cmp -s "$1" "$2"; then return 0; fi
    sleep 0.5
  done
  return 1
}

# run_mode LABEL [DAEMON FLAGS...]
run_mode() {
  local label="$1" d mnt seed=$SEED names=(uncached uncached-block new) n f wb=0
  shift
  [[ " $* " == *" -w "* ]] && wb=1
  d="$WORK/$label"
  if [[ -n "$PLAIN" ]]; then
    mnt="$PLAIN"
  else
    mnt="$d/mnt"
    mkdir -p "$d/src" "$d/dst" "$mnt"
  fi
  local src="${PLAIN:-$d/src}"
  make_random "$src/uncached" "$FILE_MIB"
  make_random "$src/uncached-block" "$FILE_MIB"
  make_random "$src/readcheck" "$FILE_MIB"
  local want_read
  want_read="$(sha256sum <"$src/readcheck")"
  if [[ -z "$PLAIN" ]] && ! start_daemon "$d" "$label" "$@"; then
    result "$label: mount" FAIL "(see $RESULTS/$label.daemon.log)"
    return 0
  fi

  if [[ "$(sha256sum <"$mnt/readcheck")" == "$want_read" ]]; then
    result "$label: read-through of a src-only file" ok
  else
    result "$label: read-through of a src-only file" FAIL "(sha256 differs)"
  fi
  run_fsx "$label-uncached" "$mnt/uncached" "$WORK/fsx.toml" "$seed"
  run_fsx "$label-uncached-block" "$mnt/uncached-block" "$WORK/fsx-block.toml" "$((seed + 1))"
  run_fsx "$label-new" "$mnt/new" "$WORK/fsx.toml" "$((seed + 2))"
  [[ -n "$PLAIN" ]] && return 0

  if ! kill -0 "$DAEMON_PID" 2>/dev/null || ! is_mounted "$mnt"; then
    result "$label: daemon alive after fsx" FAIL "(see $RESULTS/$label.daemon.log)"
    DAEMON_PID=""
    return 0
  fi
  declare -A sums
  for n in "${names[@]}" readcheck; do sums[$n]="$(sha256sum <"$mnt/$n")"; done

  if [[ $wb -eq 1 ]]; then
    local bad=()
    for n in "${names[@]}"; do
      wait_src_match "$mnt/$n" "$d/src/$n" || bad+=("$n")
    done
    if [[ ${#bad[@]} -eq 0 ]]; then
      result "$label: src has the mount's bytes" ok
    else
      result "$label: src has the mount's bytes" FAIL "(after ${WB_WAIT}s, differs: ${bad[*]})"
    fi
  fi

  # Unmount, remount, and compare: what the mount showed must persist.
  stop_daemon "$mnt" "$DAEMON_PID" 60
  DAEMON_PID=""
  if is_mounted "$mnt"; then
    result "$label: clean unmount" FAIL "(still mounted)"
    return 0
  fi
  if ! start_daemon "$d" "$label" "$@"; then
    result "$label: remount" FAIL "(see $RESULTS/$label.daemon.log)"
    return 0
  fi
  local bad=()
  for n in "${names[@]}" readcheck; do
    [[ "$(sha256sum <"$mnt/$n")" == "${sums[$n]}" ]] || bad+=("$n")
  done
  if [[ ${#bad[@]} -eq 0 ]]; then
    result "$label: same bytes after remount" ok
  else
    result "$label: same bytes after remount" FAIL "(differs: ${bad[*]})"
  fi
  stop_daemon "$mnt" "$DAEMON_PID" 60
  DAEMON_PID=""
  if [[ $wb -eq 1 ]]; then
    bad=()
    for n in "${names[@]}"; do
      f="$d/src/$n"
      [[ -f "$f" && "$(sha256sum <"$f")" == "${sums[$n]}" ]] || bad+=("$n")
    done
    if [[ ${#bad[@]} -eq 0 ]]; then
      result "$label: src matches after unmount" ok
    else
      result "$label: src matches after unmount" FAIL "(differs: ${bad[*]})"
    fi
  fi
}

if [[ -n "$PLAIN" ]]; then
  mkdir -p "$PLAIN"
  run_mode plain
else
  [[ $CACHE -eq 1 ]] && run_mode cachefs
  [[ $DAEMON_IO -eq 1 ]] && run_mode cachefs-nopt --no-passthrough
  if [[ $WRITEBACK -eq 1 ]]; then
    run_mode cachefs-writeback -w
    run_mode cachefs-mirror -w -concurrent 0
  fi
fi

echo "fsx results (logs in $RESULTS):"
{
  printf '  %s\n' "${SUMMARIES[@]}"
  echo "fsx: $PASS_N passed, $FAIL_N failed"
} | tee "$RESULTS/summary.txt"
exit "$FAILED"
