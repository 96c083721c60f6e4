#!/usr/bin/env bash
# treewalk.sh - a whole-tree scan (issue 17): a tree of N entries (directories of 100
# empty files, `benchlib.py mktree`) only in src, mounted through cachefs, walked twice
# with `find -printf '%i %s'` after drop_caches. Prints, per N: both walk times, the
# daemon's peak RSS (VmHWM) and its most open descriptors (sampled every 0.1 s), and
# whether both walks showed the same inode numbers. With two or more N, also the bytes
# of peak RSS per entry between the smallest and the largest (the slope: the fixed
# base drops out).
#
# usage: sudo bench/treewalk.sh [N ...]      (default: 100000 1000000)
# Environment: BENCH_DIR (/var/tmp/cachefs-treewalk), CACHEFS_BIN
#   (target/release/cachefs), CACHEFS_ARGS (extra flags), KEEP_TREES=1 (keep the trees
#   for the next run: building 1,000,000 entries takes about a minute).
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
# shellcheck source=scripts/common.sh
source "$REPO/scripts/common.sh"
BENCH_DIR=${BENCH_DIR:-/var/tmp/cachefs-treewalk}
CACHEFS_BIN=${CACHEFS_BIN:-$REPO/target/release/cachefs}
read -r -a EXTRA <<< "${CACHEFS_ARGS:-}"
SIZES=("$@")
[ ${#SIZES[@]} -gt 0 ] || SIZES=(100000 1000000)
[ "$(id -u)" = 0 ] || die "treewalk.sh must run as root (drop_caches)"
[ -x "$CACHEFS_BIN" ] || die "no cachefs binary at $CACHEFS_BIN (cargo build --release)"

W="$BENCH_DIR/run.$$"
MNT="$W/mnt" PID="" SAMPLER=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    [ -n "$SAMPLER" ] && kill "$SAMPLER" 2>/dev/null
    if awk -v m="$MNT" '$2 == m { f = 1 } END { exit !f }' /proc/mounts; then
        fusermount3 -u "$MNT" 2>/dev/null || umount -l "$MNT"
    fi
    [ -n "$PID" ] && { kill "$PID" 2>/dev/null; wait "$PID" 2>/dev/null; }
    rm -rf "$W"
    [ "${KEEP_TREES:-0}" = 1 ] || rm -rf "$BENCH_DIR"/tree.*
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

now() { date +%s.%N; }
printf '| entries | walk 1 (s) | walk 2 (s) | peak RSS (MiB) | most open fds | same inode numbers |\n'
printf '| ---: | ---: | ---: | ---: | ---: | --- |\n'
declare -A HWM
for n in "${SIZES[@]}"; do
    tree="$BENCH_DIR/tree.$n"
    if [ ! -d "$tree" ]; then
        python3 "$HERE/benchlib.py" mktree "$tree" "$n" >/dev/null || die "mktree $n failed"
    fi
    rm -rf "$W"
    mkdir -p "$W/dst" "$MNT"
    "$CACHEFS_BIN" -src "$tree" -dst "$W/dst" -mountpoint "$MNT" "${EXTRA[@]}" \
        >"$W/log" 2>&1 </dev/null &
    PID=$!
    for _ in $(seq 100); do
        awk -v m="$MNT" '$2 == m { f = 1 } END { exit !f }' /proc/mounts && break
        sleep 0.1
    done
    ( most=0
      while kill -0 "$PID" 2>/dev/null; do
          c=$(find "/proc/$PID/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
          [ "$c" -gt "$most" ] && { most=$c; echo "$most" > "$W/fds"; }
          sleep 0.1
      done ) &
    SAMPLER=$!
    sync
    echo 3 > /proc/sys/vm/drop_caches
    t0=$(now)
    find "$MNT" -printf '%i %s\n' > "$W/find1"
    t1=$(now)
    find "$MNT" -printf '%i %s\n' > "$W/find2"
    t2=$(now)
    hwm=$(awk '/VmHWM/ { print $2 }' "/proc/$PID/status")
    HWM[$n]=$hwm
    same=no
    cmp -s "$W/find1" "$W/find2" && same=yes
    fusermount3 -u "$MNT"
    wait "$PID"
    PID=""
    kill "$SAMPLER" 2>/dev/null
    wait "$SAMPLER" 2>/dev/null
    SAMPLER=""
    printf '| %d | %.2f | %.2f | %.1f | %s | %s |\n' "$(wc -l < "$W/find1")" \
        "$(echo "$t1 - $t0" | bc)" "$(echo "$t2 - $t1" | bc)" "$(echo "$hwm / 1024" | bc -l)" \
        "$(cat "$W/fds" 2>/dev/null || echo '?')" "$same"
done
if [ ${#SIZES[@]} -ge 2 ]; then
    lo=${SIZES[0]} hi=${SIZES[-1]}
    printf '\npeak RSS per entry between %d and %d entries: %.0f bytes\n' "$lo" "$hi" \
        "$(echo "(${HWM[$hi]} - ${HWM[$lo]}) * 1024 / ($hi - $lo)" | bc -l)"
fi
