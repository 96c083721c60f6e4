#!/usr/bin/env bash
# THE test command: runs every test cachefs has, on a fresh Debian/Ubuntu
# machine, as root (FUSE mounts, pjdfstest's user switching):
#   deps      scripts/install-deps.sh (apt packages, pjdfstest, fsx, users)
#   build     cargo build --release --locked
#   fmt       cargo fmt --check
#   clippy    cargo clippy --all-targets --locked -- -D warnings
#   modules   scripts/module-graph.sh: the top-level modules' imports, no cycle
#   tests     cargo nextest run (cargo test if nextest is missing): unit tests
#             and mounted integration tests
#   pjdfstest scripts/pjdfstest.sh --daemon-io (ext4 baseline, cachefs with
#             passthrough where the kernel has it, cachefs --no-passthrough)
#   fsx       scripts/fsx.sh --daemon-io (uncached, block-mode and new files,
#             with and without passthrough)
#   xfstests  scripts/xfstests.sh --targets cachefs,cachefs-w: the fast subset
#             (tests/xfstests/fast) through cachefs and cachefs -w against
#             libfuse's passthrough_ll (xfstests and libfuse built once from
#             ../shared/thirdparty/ into target/thirdparty/; about 5 minutes)
# Prints a summary, exits non-zero if any step failed, leaves no mount behind.
#
# Usage: scripts/test.sh [--no-writeback] [--no-deps] [--no-external]
#          [--no-xfstests] [--fsx-ops N]
#   --no-writeback skip the pjdfstest and fsx runs against `cachefs -w` and
#                  mirror mode (on by default)
#   --no-deps      skip install-deps.sh
#   --no-external  skip pjdfstest, fsx and xfstests
#   --no-xfstests  skip xfstests (--xfstests: run it, the default)
# Environment: WRITEBACK_SUITES=0 is the same as --no-writeback.
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"

# pjdfstest and fsx also run against `cachefs -w` and mirror mode (-w
# -concurrent 0) unless WRITEBACK_SUITES=0 or --no-writeback.
WRITEBACK="${WRITEBACK_SUITES:-1}"
DEPS=1 EXTERNAL=1 FSX_OPS=20000 XFSTESTS=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --writeback) WRITEBACK=1 ;;
    --no-writeback) WRITEBACK=0 ;;
    --no-deps) DEPS=0 ;;
    --no-external) EXTERNAL=0 ;;
    --xfstests) XFSTESTS=1 ;;
    --no-xfstests) XFSTESTS=0 ;;
    --fsx-ops) FSX_OPS="$2"; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
  shift
done
[[ $(id -u) -eq 0 ]] || die "run as root: the tests mount FUSE file systems and pjdfstest switches users"

RESULTS="$REPO_ROOT/target/test-results"
rm -rf "$RESULTS"
mkdir -p "$RESULTS"
# Every temp dir of this run (the Rust tests' too, through TMPDIR) lives here,
# so the trap can find and unmount whatever a failed test left mounted.
# Short name: pjdfstest's socket tests need short paths (see pjdfstest.sh).
TEST_TMPDIR="$(mktemp -d /tmp/cft.XXXXXX)"
chmod 755 "$TEST_TMPDIR"
export TEST_TMPDIR

# shellcheck disable=SC2317 # invoked by the trap
cleanup() {
  local rc=$?
  if [[ -n "$CHILD_PID" ]]; then kill -TERM "$CHILD_PID" 2>/dev/null || true; fi
  if [[ -n "$(mounts_under "$TEST_TMPDIR")" ]]; then
    log "unmounting what the tests left mounted under $TEST_TMPDIR:"
    mounts_under "$TEST_TMPDIR" | sed 's/^/    /' >&2
    unmount_all_under "$TEST_TMPDIR"
  fi
  if [[ -n "$CHILD_PID" ]]; then reap "$CHILD_PID" 10; fi
  if [[ -z "$(mounts_under "$TEST_TMPDIR")" ]]; then rm -rf "$TEST_TMPDIR"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

T0=$(date +%s)
STEP_LINES=()
PASS_N=0 FAIL_N=0 SKIP_N=0

# step NAME CMD...: run one step, output to the terminal and RESULTS/NAME.log.
step() {
  local name="$1" rc=0 t0 t1
  shift
  printf '\n==> %s: %s\n' "$name" "$*"
  t0=$(date +%s)
  # shellcheck disable=SC2016 # expanded by the inner bash
  run_child bash -c '"$@" 2>&1 | tee "$0"; exit "${PIPESTATUS[0]}"' "$RESULTS/$name.log" "$@" </dev/null || rc=$?
  t1=$(date +%s)
  if [[ $rc -eq 0 ]]; then
    STEP_LINES+=("$(printf '%-10s ok     %4ss' "$name" $((t1 - t0)))")
    PASS_N=$((PASS_N + 1))
  else
    STEP_LINES+=("$(printf '%-10s FAILED %4ss (exit %s, log target/test-results/%s.log)' "$name" $((t1 - t0)) "$rc" "$name")")
    FAIL_N=$((FAIL_N + 1))
  fi
  return "$rc"
}
skip() { # skip NAME REASON
  STEP_LINES+=("$(printf '%-10s skipped (%s)' "$1" "$2")")
  SKIP_N=$((SKIP_N + 1))
}

if [[ $DEPS -eq 1 ]]; then step deps ./scripts/install-deps.sh || true; else skip deps "--no-deps"; fi

BUILT=0
step build cargo build --release --locked && BUILT=1
step fmt cargo fmt --all --check || true
step clippy cargo clippy --all-targets --locked -- -D warnings || true
step modules ./scripts/module-graph.sh || true

# The Rust tests create their temp dirs (and mounts) under TMPDIR.
if command -v cargo-nextest >/dev/null; then
  step tests env TMPDIR="$TEST_TMPDIR" cargo nextest run --locked --no-fail-fast || true
else
  log "cargo-nextest not found; using cargo test"
  step tests env TMPDIR="$TEST_TMPDIR" cargo test --locked --no-fail-fast || true
fi

if [[ $EXTERNAL -eq 0 ]]; then
  skip pjdfstest "--no-external"
  skip fsx "--no-external"
  skip xfstests "--no-external"
elif [[ $BUILT -eq 0 ]]; then
  skip pjdfstest "the build failed"
  skip fsx "the build failed"
  skip xfstests "the build failed"
else
  suite_flags=(--daemon-io)
  [[ $WRITEBACK -eq 1 ]] && suite_flags+=(--writeback)
  step pjdfstest ./scripts/pjdfstest.sh "${suite_flags[@]}" --results "$RESULTS/pjdfstest" || true
  step fsx ./scripts/fsx.sh "${suite_flags[@]}" --ops "$FSX_OPS" --results "$RESULTS/fsx" || true
  if [[ $XFSTESTS -eq 1 ]]; then
    xfs_flags=(--targets "cachefs,cachefs-w" --reuse-baseline --results "$RESULTS/xfstests")
    [[ $DEPS -eq 1 ]] || xfs_flags+=(--no-deps)
    step xfstests ./scripts/xfstests.sh "${xfs_flags[@]}" || true
  else
    skip xfstests "--no-xfstests"
  fi
fi

printf '\n==> summary (%ss in all; logs in target/test-results/)\n' $(($(date +%s) - T0))
printf '  %s\n' "${STEP_LINES[@]}"
# The per-suite lines, for the record.
grep -hE '^(Summary|\s+Summary) ' "$RESULTS/tests.log" 2>/dev/null | tail -n1 | sed 's/^ */  rust tests: /' || true
grep -hE '^test result: ' "$RESULTS/tests.log" 2>/dev/null | sed 's/^/  rust tests: /' || true
[[ -f "$RESULTS/pjdfstest/summary.txt" ]] && sed 's/^/  pjdfstest /' "$RESULTS/pjdfstest/summary.txt"
[[ -f "$RESULTS/fsx/summary.txt" ]] && tail -n1 "$RESULTS/fsx/summary.txt" | sed 's/^fsx: /  fsx checks: /'
[[ -f "$RESULTS/xfstests/summary.txt" ]] && sed -n 's/^  \(.*\)/  xfstests \1/p' "$RESULTS/xfstests/summary.txt"
echo "steps: $PASS_N passed, $FAIL_N failed, $SKIP_N skipped"
[[ $FAIL_N -eq 0 ]]
