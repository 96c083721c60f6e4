#!/usr/bin/env bash
# Writeback drain rate (issue 3): write N small files and one big file through a
# `cachefs -w` mount and time until src holds all of it (journal empty, bytes equal),
# next to `cp -r` of the same data straight into src, in the same run.
#
# Usage: sudo bench/drain.sh [--files N] [--big-mb MB] [--concurrent N]
# Env: CACHEFS_BIN (default target/release/cachefs), BENCH_DIR (default /var/tmp).
set -euo pipefail
FILES=10000 BIG_MB=1024 CONCURRENT=10
while [[ $# -gt 0 ]]; do
  case "$1" in
    --files) FILES="$2"; shift ;;
    --big-mb) BIG_MB="$2"; shift ;;
    --concurrent) CONCURRENT="$2"; shift ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
cd "$(dirname "$0")/.."
BIN="${CACHEFS_BIN:-target/release/cachefs}"
[[ -x "$BIN" ]] || cargo build --release --locked
W="$(mktemp -d "${BENCH_DIR:-/var/tmp}/cachefs-drain.XXXXXX")"
PID=""
cleanup() {
  if mountpoint -q "$W/mnt" 2>/dev/null; then umount -l "$W/mnt" || true; fi
  [[ -n "$PID" ]] && kill "$PID" 2>/dev/null || true
  [[ -n "${KEEP:-}" ]] || rm -rf "$W"
}
trap cleanup EXIT
mkdir -p "$W"/{data,src-cp,src,dst,mnt}

echo "preparing $FILES small files (4 KiB, 100 dirs) and one ${BIG_MB} MiB file"
python3 - "$W/data" "$FILES" <<'PY'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    d = os.path.join(root, "small", f"d{i % 100:03d}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i:05d}"), "wb") as f:
        f.write(os.urandom(4096))
PY
head -c "$((BIG_MB << 20))" /dev/urandom > "$W/data/big"
sync

now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.2f}')"; }

echo 3 > /proc/sys/vm/drop_caches
t0=$(now); cp -r "$W/data/." "$W/src-cp/"; sync; t1=$(now)
cp_time=$(secs "$t0" "$t1")

"$BIN" -src "$W/src" -dst "$W/dst" -mountpoint "$W/mnt" -w -concurrent "$CONCURRENT" \
  2>"$W/daemon.log" &
PID=$!
for _ in $(seq 100); do mountpoint -q "$W/mnt" && break; sleep 0.1; done
echo 3 > /proc/sys/vm/drop_caches
t0=$(now)
cp -r "$W/data/." "$W/mnt/"
t_written=$(now)
while :; do
  pending=$("$BIN" status "$W/dst" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["pending_ops"])')
  [[ "$pending" == 0 ]] && break
  sleep 0.2
done
sync
t_drained=$(now)
write_time=$(secs "$t0" "$t_written")
drain_time=$(secs "$t0" "$t_drained")
if diff -r "$W/data" "$W/src" >/dev/null; then same=yes; else same=NO; fi

printf '\n| what | seconds | ratio to cp -r into src |\n|---|---|---|\n'
printf '| cp -r straight into src | %s | 1.00 |\n' "$cp_time"
printf '| cp -r into the cachefs -w mount (returns) | %s | %s |\n' "$write_time" \
  "$(python3 -c "print(f'{$write_time / $cp_time:.2f}')")"
printf '| ... until src holds everything (drained) | %s | %s |\n' "$drain_time" \
  "$(python3 -c "print(f'{$drain_time / $cp_time:.2f}')")"
echo
echo "data: $FILES x 4 KiB files + ${BIG_MB} MiB; -concurrent $CONCURRENT; src == data byte for byte: $same"
