#!/usr/bin/env bash
# Run the pjdfstest POSIX suite (crates.io `pjdfstest`, as root) against
#   1. a fresh directory on the local file system (the baseline, ext4 here), and
#   2. a cachefs mount over fresh temp dirs (cache mode), and
#   3. with --daemon-io, cachefs --no-passthrough (the daemon serves all I/O),
#   4. with --writeback, cachefs -w and mirror mode (-w -concurrent 0).
# Prints one summary line per target, e.g.
#   ext4: 383 passed, 0 failed, 15 skipped
#   cachefs: 383 passed, 0 failed, 15 skipped
# keeps full logs in the results dir, and exits non-zero if any cachefs run has
# a failure (or, with --strict, if cachefs passes fewer tests than the baseline:
# tests the baseline passes and cachefs skips are listed either way).
# Through any FUSE mount link::link_count_max is skipped (pathconf(LINK_MAX) is
# unknown for FUSE), so the best cachefs can do is the baseline minus that one;
# --strict allows exactly that.
#
# Usage: scripts/pjdfstest.sh [--writeback] [--daemon-io] [--no-cache] [--baseline-only]
#          [--no-baseline] [--strict] [--results DIR] [--timeout SECS]
#          [-- PATTERN...]
#   PATTERN   only run the pjdfstest cases whose name contains it (e.g. rename)
# Environment: CACHEFS_BIN (default target/release/cachefs), CACHEFS_ARGS
#   (extra daemon flags, e.g. "-d"), TEST_TMPDIR (where temp dirs go, /tmp).
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WRITEBACK=0 DAEMON_IO=0 CACHE=1 BASELINE=1 CACHEFS=1 STRICT=0 TIMEOUT=1200
RESULTS="$REPO_ROOT/target/test-results/pjdfstest"
PATTERNS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --writeback) WRITEBACK=1 ;;
    --daemon-io) DAEMON_IO=1 ;;
    --no-cache) CACHE=0 ;;
    --baseline-only) CACHEFS=0 ;;
    --no-baseline) BASELINE=0 ;;
    --strict) STRICT=1 ;;
    --results) RESULTS="$2"; shift ;;
    --timeout) TIMEOUT="$2"; shift ;;
    --) shift; PATTERNS=("$@"); break ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
  shift
done

[[ $(id -u) -eq 0 ]] || die "pjdfstest must run as root (it switches to the users nobody and tests)"
command -v pjdfstest >/dev/null || die "pjdfstest not found: run scripts/install-deps.sh"
if [[ $CACHEFS -eq 1 ]]; then BIN="$(cachefs_bin)"; fi

mkdir -p "$RESULTS"
RESULTS="$(cd "$RESULTS" && pwd)"
# Keep paths short: AF_UNIX socket paths are limited to 108 bytes, and the
# socket tests bind() a few levels below the directory given to pjdfstest.
WORK="$(mktemp -d "${TEST_TMPDIR:-/tmp}/pjd.XXXXXX")"
chmod 755 "$WORK" # the dummy users must be able to reach the test dirs
DAEMON_PID=""

# shellcheck disable=SC2317 # invoked by the trap
cleanup() {
  local rc=$?
  cleanup_work "$WORK" "$DAEMON_PID"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# pjdfstest's config (TOML): features are keys of [features] with an empty
# table as value; the dummy users are [user, user's primary group] pairs.
CONF="$WORK/pjdfstest.toml"
cat >"$CONF" <<'EOF'
[features]
posix_fallocate = {}
rename_ctime = {}
utime_now = {}
utimensat = {}

[settings]
naptime = 0.05
allow_remount = false

[dummy_auth]
entries = [
  ["nobody", "nogroup"],
  ["tests", "tests"],
]
EOF
cp "$CONF" "$RESULTS/pjdfstest.toml"

SUMMARIES=()
# Baseline passes that no FUSE file system can pass (see the header).
FUSE_INHERENT=(link::link_count_max)

# ok_tests LOG: sorted names of the test cases that passed.
ok_tests() {
  sed 's/\x1b\[[0-9;]*m//g' "$1" | awk 'NF == 2 && $2 == "ok" { print $1 }' | sort -u
}
FAILED=0
BASE_PASSED=""

# run_suite LABEL DIR LOG: run pjdfstest in DIR; sets PASSED/FAILED_N/SKIPPED.
run_suite() {
  local label="$1" dir="$2" logf="$3" rc=0 line
  log "pjdfstest on $label ($dir), log: $logf"
  run_child env NO_COLOR=1 timeout --kill-after=30 "$TIMEOUT" \
    pjdfstest -c "$CONF" -p "$dir" ${PATTERNS[@]+"${PATTERNS[@]}"} </dev/null >"$logf" 2>&1 || rc=$?
  # "Summary: 0 failed, 15 skipped, 383 passed, 0 expected failures, 398 total"
  line="$(sed 's/\x1b\[[0-9;]*m//g' "$logf" | grep -E '^Summary: ' | tail -n1 || true)"
  if [[ -z "$line" ]]; then
    PASSED=0 FAILED_N=1 SKIPPED=0
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
      log "$label: pjdfstest timed out after ${TIMEOUT}s (hung file system?)"
    else
      log "$label: pjdfstest produced no summary (exit $rc); tail of log:"
      tail -n 20 "$logf" >&2 || true
    fi
    return 0
  fi
  PASSED="$(sed -E 's/.* ([0-9]+) passed.*/\1/' <<<"$line")"
  SKIPPED="$(sed -E 's/.* ([0-9]+) skipped.*/\1/' <<<"$line")"
  FAILED_N="$(sed -E 's/^Summary: ([0-9]+) failed.*/\1/' <<<"$line")"
  if [[ $FAILED_N -gt 0 ]]; then
    sed 's/\x1b\[[0-9;]*m//g' "$logf" | grep -E ' FAILED$' | sed 's/ *FAILED$//; s/^/    FAILED: /' >&2 || true
  fi
}

if [[ $BASELINE -eq 1 ]]; then
  mkdir -p "$WORK/b"
  FSTYPE="$(stat -f -c %T "$WORK/b")"
  [[ "$FSTYPE" == ext2/ext3 ]] && FSTYPE=ext4 # stat -f can't tell ext2/3/4 apart
  run_suite "$FSTYPE" "$WORK/b" "$RESULTS/baseline.log"
  BASE_PASSED="$PASSED"
  SUMMARIES+=("$FSTYPE: $PASSED passed, $FAILED_N failed, $SKIPPED skipped")
  # Only a baseline-only run fails on the baseline's failures.
  [[ $CACHEFS -eq 1 || $FAILED_N -eq 0 ]] || FAILED=1
fi

# run_cachefs LABEL SHORTNAME [DAEMON FLAGS...]
run_cachefs() {
  local label="$1" d="$WORK/$2"
  shift 2
  mkdir -p "$d/src" "$d/dst" "$d/m"
  chmod 755 "$d" "$d/src" "$d/dst" "$d/m"
  local dlog="$RESULTS/$label.daemon.log"
  # shellcheck disable=SC2086 # CACHEFS_ARGS is a list of flags
  "$BIN" -src "$d/src" -dst "$d/dst" -mountpoint "$d/m" "$@" ${CACHEFS_ARGS:-} \
    </dev/null >"$dlog" 2>&1 &
  DAEMON_PID=$!
  if ! wait_mounted "$d/m" "$DAEMON_PID" 30; then
    tail -n 20 "$dlog" >&2 || true
    SUMMARIES+=("$label: 0 passed, 1 failed, 0 skipped (did not mount)")
    FAILED=1
    DAEMON_PID=""
    return 0
  fi
  run_suite "$label" "$d/m" "$RESULTS/$label.log"
  if ! is_mounted "$d/m" || ! kill -0 "$DAEMON_PID" 2>/dev/null; then
    log "$label: the daemon died during the run; see $dlog"
    FAILED_N=$((FAILED_N + 1))
  fi
  stop_daemon "$d/m" "$DAEMON_PID" 60
  DAEMON_PID=""
  SUMMARIES+=("$label: $PASSED passed, $FAILED_N failed, $SKIPPED skipped")
  [[ $FAILED_N -eq 0 ]] || FAILED=1
  if [[ -n "$BASE_PASSED" && $PASSED -lt $BASE_PASSED ]]; then
    local missing
    missing="$(comm -23 <(ok_tests "$RESULTS/baseline.log") <(ok_tests "$RESULTS/$label.log") |
      grep -vxF -f <(printf '%s\n' "${FUSE_INHERENT[@]}") || true)"
    log "$label passes $PASSED tests, the baseline $BASE_PASSED"
    if [[ -n "$missing" ]]; then
      log "$label does not pass these tests that the baseline passes:"
      printf '    %s\n' "$missing" | sed '2,$s/^/    /' >&2
      [[ $STRICT -eq 0 ]] || FAILED=1
    fi
  fi
}

if [[ $CACHEFS -eq 1 ]]; then
  [[ $CACHE -eq 1 ]] && run_cachefs cachefs c
  [[ $DAEMON_IO -eq 1 ]] && run_cachefs cachefs-nopt n --no-passthrough
  if [[ $WRITEBACK -eq 1 ]]; then
    run_cachefs cachefs-writeback w -w
    run_cachefs cachefs-mirror r -w -concurrent 0
  fi
fi

echo "pjdfstest results (logs in $RESULTS):"
printf '%s\n' "${SUMMARIES[@]}" | tee "$RESULTS/summary.txt"
exit "$FAILED"
