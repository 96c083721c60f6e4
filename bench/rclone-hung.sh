#!/usr/bin/env bash
# bench/rclone-hung.sh: what each operation costs through cachefs -w while the bucket
# hangs, against the same operation with the bucket up, on the rclone test bed (a
# local S3 server stopped with SIGSTOP, rclone alive and blocking). The measurement is
# tests/integration/rclone_hung.rs (which also asserts the bounds); this runs it and prints its
# table. Root; needs what scripts/install-deps.sh installs.
#
#   sudo bench/rclone-hung.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ "$(id -u)" = 0 ] || { echo "run as root (FUSE mounts)" >&2; exit 2; }
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
if ! cargo nextest run --locked --test integration -E 'test(/^rclone_hung::/)' --no-capture >"$out" 2>&1; then
  cat "$out" >&2
  echo "bench/rclone-hung.sh: the measurement failed (its log is above)" >&2
  exit 1
fi
echo "hung bucket, $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, $(uname -r)"
sed -n '/^operation /,/^read uncached file/p' "$out"
