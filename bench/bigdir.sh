#!/usr/bin/env bash
# bigdir.sh - one big directory (issue 17): `ls -l`, `find -ls` and a stat of every entry
# of a directory of N empty files, through cachefs (uncached: only src has the files;
# cached: dst has them too; -noxattr: with --no-xattr), libfuse's passthrough_hp (the
# FUSE reference), unionfs-fuse, mergerfs and an rclone mount (local-path remote), side
# by side in one run, and the src directory itself (native). Prints one table: medians
# of ROUNDS rounds and the ratio to passthrough_hp; then each daemon's peak RSS and open
# fds after the runs. unionfs-fuse as Debian builds it answers no xattr call, so the
# kernel stops asking it and its `ls -l` costs no GETXATTR: the -noxattr rows make the
# same trade.
#
# usage: sudo bench/bigdir.sh [--out FILE.md] [--only NAME,...] [--keep]
#   NAME: native passthrough_hp cachefs cachefs-cached cachefs-noxattr
#         cachefs-cached-noxattr unionfs mergerfs rclone
# Environment: N (100000) entries, ROUNDS (3), BENCH_DIR (/var/tmp/cachefs-bigdir),
#   CACHEFS_BIN (target/release/cachefs), CACHEFS_ARGS (extra flags), NO_INSTALL=1.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
# shellcheck source=scripts/common.sh
source "$REPO/scripts/common.sh"
PY=${PYTHON:-python3}
LIB="$HERE/benchlib.py"

N=${N:-100000}
ROUNDS=${ROUNDS:-3}
BENCH_DIR=${BENCH_DIR:-/var/tmp/cachefs-bigdir}
CACHEFS_BIN=${CACHEFS_BIN:-$REPO/target/release/cachefs}
read -r -a CACHEFS_EXTRA <<< "${CACHEFS_ARGS:-}"
ALL="native passthrough_hp cachefs cachefs-cached cachefs-noxattr cachefs-cached-noxattr unionfs mergerfs rclone"
OUT="" ONLY="" KEEP=0
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT=${2:?}; shift ;;
        --only) ONLY=${2:?}; shift ;;
        --keep) KEEP=1 ;;
        -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done
SYSTEMS=${ONLY:+${ONLY//,/ }}
SYSTEMS=${SYSTEMS:-$ALL}
[ "$(id -u)" = 0 ] || die "bigdir.sh must run as root (FUSE mounts, drop_caches)"

W="$BENCH_DIR/run.$$"
MOUNTS=() PIDS=()
is_mounted() { awk -v m="$1" '$2 == m { f = 1 } END { exit !f }' /proc/mounts; }
cleanup() {
    local i rc=$?
    trap - EXIT INT TERM
    for (( i=${#MOUNTS[@]}-1; i>=0; i-- )); do
        is_mounted "${MOUNTS[$i]}" && { fusermount3 -uz "${MOUNTS[$i]}" 2>/dev/null || umount -l "${MOUNTS[$i]}"; }
    done
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    sleep 0.5
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
    if [ "$KEEP" = 1 ]; then log "kept $W"; else rm -rf "$W"; rmdir "$BENCH_DIR" 2>/dev/null; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

# start NAME MNT CMD...: CMD stays in the foreground; waits for MNT to be mounted.
declare -A PID_OF=() DIR_OF=()
start() {
    local name=$1 mnt=$2 i
    shift 2
    mkdir -p "$mnt"
    "$@" >"$W/$name.log" 2>&1 </dev/null &
    PIDS+=("$!"); MOUNTS+=("$mnt")
    PID_OF[$name]=$!
    for i in $(seq 1 150); do
        is_mounted "$mnt" && { DIR_OF[$name]="$mnt/big"; return 0; }
        kill -0 "${PID_OF[$name]}" 2>/dev/null || break
        sleep 0.2
    done
    log "$name did not mount: $(tail -n 2 "$W/$name.log")"
    return 1
}

mkdir -p "$W/src/big"
log "creating $N empty files in $W/src/big"
"$PY" - "$W/src/big" "$N" <<'EOF'
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    os.close(os.open(os.path.join(d, "f%07d" % i), os.O_CREAT | os.O_WRONLY, 0o644))
EOF

PT_HP=""
for s in $SYSTEMS; do
    case $s in
        native) DIR_OF[native]="$W/src/big" ;;
        passthrough_hp)
            command -v meson >/dev/null || { [ "${NO_INSTALL:-0}" = 1 ] || apt-get install -y -qq meson ninja-build pkg-config libudev-dev g++ >/dev/null 2>&1; }
            build_libfuse_example passthrough_hp && PT_HP=$LIBFUSE_EXAMPLE
            # passthrough_hp keeps an O_PATH fd per inode the kernel holds: it needs a
            # nofile limit above N. Raising the hard limit needs CAP_SYS_RESOURCE (not
            # given in some containers, even to root): then the hard limit is used, and
            # N must stay below it.
            want=$((N + 4096)) hard=$(ulimit -Hn)
            if [ "$hard" != unlimited ] && [ "$hard" -lt "$want" ] &&
                ! prlimit --nofile="$want:$want" true 2>/dev/null; then
                log "passthrough_hp: nofile limited to $hard (cannot raise it); N=$N must stay below it"
                want=$hard
            fi
            [ -n "$PT_HP" ] && start passthrough_hp "$W/pt/mnt" \
                prlimit --nofile="$want:$want" "$PT_HP" --foreground "$W/src" "$W/pt/mnt" ;;
        cachefs|cachefs-cached|cachefs-noxattr|cachefs-cached-noxattr)
            d="$W/$s" args=("${CACHEFS_EXTRA[@]}")
            mkdir -p "$d/dst"
            case $s in *cached*) cp -a "$W/src/big" "$d/dst/" ;; esac
            case $s in *noxattr) args+=(--no-xattr) ;; esac
            start "$s" "$d/mnt" "$CACHEFS_BIN" -src "$W/src" -dst "$d/dst" \
                -mountpoint "$d/mnt" "${args[@]}" ;;
        unionfs)
            command -v unionfs >/dev/null || { [ "${NO_INSTALL:-0}" = 1 ] || apt-get install -y -qq unionfs-fuse >/dev/null 2>&1; }
            mkdir -p "$W/uf/dst"
            start unionfs "$W/uf/mnt" unionfs -f -o cow,use_ino,fsname=bd-unionfs "$W/uf/dst=RW:$W/src=RO" "$W/uf/mnt" ;;
        mergerfs)
            command -v mergerfs >/dev/null || { [ "${NO_INSTALL:-0}" = 1 ] || apt-get install -y -qq mergerfs >/dev/null 2>&1; }
            mkdir -p "$W/mf/dst"
            start mergerfs "$W/mf/mnt" mergerfs -f -o cache.files=partial,category.create=ff,fsname=bd-mergerfs \
                "$W/mf/dst=RW:$W/src=RO" "$W/mf/mnt" ;;
        rclone)
            mkdir -p "$W/rc/cache"
            start rclone "$W/rc/mnt" rclone mount "$W/src" "$W/rc/mnt" --cache-dir "$W/rc/cache" ;;
        *) die "unknown system $s (known: $ALL)" ;;
    esac
done
ACTIVE=()
for s in $SYSTEMS; do [ -n "${DIR_OF[$s]:-}" ] && ACTIVE+=("$s"); done
log "systems: ${ACTIVE[*]}"

# secs CMD...: wall seconds of CMD (its output discarded); "err" if it failed.
secs() {
    local t0 t1
    t0=$(date +%s.%N)
    if ! "$@" >/dev/null 2>"$W/cmd.err"; then echo err; return; fi
    t1=$(date +%s.%N)
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }'
}
t_lsl_cold() { drop_caches; secs ls -l "$1"; }
t_lsl_warm() { secs ls -l "$1"; }   # right after the cold run: within the attribute timeout
t_find_cold() { drop_caches; secs find "$1" -ls; }
t_stat_cold() { drop_caches; secs "$PY" "$LIB" statall "$1"; }
TESTS="lsl_cold lsl_warm find_cold stat_cold"
declare -A VALS=()
for (( r=0; r<ROUNDS; r++ )); do
    n=${#ACTIVE[@]}
    for (( i=0; i<n; i++ )); do
        s=${ACTIVE[$(( (i + r) % n ))]}
        for t in $TESTS; do
            [ "$t" = lsl_warm ] || sleep 1.1   # the previous test's kernel caches expire
            v=$("t_$t" "${DIR_OF[$s]}")
            VALS[$s.$t]="${VALS[$s.$t]:-} $v"
            log "round $r $s $t $v"
        done
    done
done

median() { printf '%s\n' "$@" | grep -v err | sort -g | awk '{ a[NR] = $1 } END { if (NR) print a[int((NR + 1) / 2)]; else print "err" }'; }
{
    echo "bigdir: $N empty files in one directory; $(date -u '+%Y-%m-%d %H:%M UTC'); $(uname -r), $(nproc) cpus; medians of $ROUNDS rounds, seconds (ratio to passthrough_hp)"
    echo
    printf '| system | ls -l, cold | ls -l, again | find -ls, cold | stat every entry, cold | peak RSS (MiB) | open fds |\n'
    printf '| --- | --- | --- | --- | --- | --- | --- |\n'
    for s in "${ACTIVE[@]}"; do
        row="| $s"
        for t in $TESTS; do
            # shellcheck disable=SC2086
            m=$(median ${VALS[$s.$t]})
            # shellcheck disable=SC2086
            b=$(median ${VALS[passthrough_hp.$t]:-err})
            if [ "$m" != err ] && [ "$b" != err ]; then
                row="$row | $m ($(awk -v a="$m" -v b="$b" 'BEGIN { printf "%.2fx", a / b }'))"
            else
                row="$row | $m"
            fi
        done
        if [ -n "${PID_OF[$s]:-}" ]; then
            p=${PID_OF[$s]}
            kb=$("$PY" "$LIB" vmhwm "$p")
            fds=$(ls "/proc/$p/fd" 2>/dev/null | wc -l)
            row="$row | $(awk -v k="$kb" 'BEGIN { printf "%.1f", k / 1024 }') | $fds |"
        else
            row="$row | - | - |"
        fi
        echo "$row"
    done
} | tee "${OUT:-/dev/null}"
