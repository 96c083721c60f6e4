#!/usr/bin/env bash
# compare.sh - benchmark cachefs side by side with native dst, mergerfs, unionfs-fuse and
# rclone mount (--vfs-cache-mode full), plus a slow-src section (sshfs over a delayed
# loopback link in a private network namespace). See bench/README.md.
#
# usage: bench/compare.sh [--quick] [--out FILE.md] [--only NAME,...] [--keep] [-h]
#   NAME: native cachefs cachefs-nopt mergerfs unionfs rclone mem slow
# Must run as root (FUSE mounts, drop_caches, network namespace).
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
PY=${PYTHON:-python3}
LIB="$HERE/benchlib.py"

ALL_SYSTEMS="native cachefs cachefs-nopt mergerfs unionfs rclone"
ALL_SECTIONS="mem slow"

usage() {
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    cat <<'EOF'

Options:
  --quick         small sizes (smoke run, a few minutes)
  --out FILE      also write the tables as markdown to FILE
  --only LIST     comma-separated subset of: native cachefs cachefs-nopt mergerfs unionfs
                  rclone (systems), mem (peak-RSS tree walk), slow (slow-src section).
                  Ratios need native in the run.
  --keep          keep the work directory (datasets, logs) instead of deleting it
Environment (defaults in parentheses, --quick values after /):
  BENCH_DIR (/var/tmp/cachefs-bench)  work dir, must be on the local disk under test
  BIG_MB (1024/128) seq/random read file   WRITE_MB (1024/128) seq write size
  RAND_MB (256/32)  random-read bytes per job (2 jobs)
  NSMALL (5000/500) small files  NDIRS (50/10) their dirs  SMALL_KB (4) their size
  TREE_ENTRIES (100000/10000) entries of the memory tree walk
  SLOW_MB (256/32) slow-src file  SLOW_DELAY_MS (20) one-way delay (RTT = 2x)
  SLOW_RATE_MBIT (empty = no cap) slow link rate cap
  REPEAT (5/1) runs of each main-table test; the median is shown
  CACHEFS_BIN (target/release/cachefs; built with cargo if missing unless NO_BUILD=1)
  CACHEFS_ARGS extra cachefs flags   NO_INSTALL=1 skip apt-get
EOF
}

QUICK=0 OUT="" ONLY="" KEEP=${KEEP_DATA:-0}
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --out) OUT=${2:?--out needs a file}; shift ;;
        --out=*) OUT=${1#--out=} ;;
        --only) ONLY=${2:?--only needs a list}; shift ;;
        --only=*) ONLY=${1#--only=} ;;
        --keep) KEEP=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

if [ "$QUICK" = 1 ]; then
    d_big=128 d_write=128 d_rand=32 d_nsmall=500 d_ndirs=10 d_tree=10000 d_slow=32 d_rep=1
else
    d_big=1024 d_write=1024 d_rand=256 d_nsmall=5000 d_ndirs=50 d_tree=100000 d_slow=256 d_rep=5
fi
REPEAT=${REPEAT:-$d_rep}
BIG_MB=${BIG_MB:-$d_big}
WRITE_MB=${WRITE_MB:-$d_write}
RAND_MB=${RAND_MB:-$d_rand}
NSMALL=${NSMALL:-$d_nsmall}
NDIRS=${NDIRS:-$d_ndirs}
SMALL_KB=${SMALL_KB:-4}
TREE_ENTRIES=${TREE_ENTRIES:-$d_tree}
SLOW_MB=${SLOW_MB:-$d_slow}
SLOW_DELAY_MS=${SLOW_DELAY_MS:-20}
SLOW_RATE_MBIT=${SLOW_RATE_MBIT:-}
BENCH_DIR=${BENCH_DIR:-/var/tmp/cachefs-bench}
CACHEFS_BIN=${CACHEFS_BIN:-$REPO/target/release/cachefs}
read -r -a CACHEFS_EXTRA <<< "${CACHEFS_ARGS:-}"

SELECTED=""
if [ -z "$ONLY" ]; then
    SELECTED="$ALL_SYSTEMS $ALL_SECTIONS"
else
    for n in ${ONLY//,/ }; do
        case " $ALL_SYSTEMS $ALL_SECTIONS " in
            *" $n "*) SELECTED="$SELECTED $n" ;;
            *) echo "--only: unknown name '$n' (known: $ALL_SYSTEMS $ALL_SECTIONS)" >&2; exit 2 ;;
        esac
    done
fi
selected() { case " $SELECTED " in *" $1 "*) return 0 ;; esac; return 1; }

[ "$(id -u)" = 0 ] || { echo "compare.sh must run as root (FUSE, drop_caches, netns)" >&2; exit 1; }

W="$BENCH_DIR/run.$$"
RES="$W/results.tsv"
NETNS=""
MOUNTS=()   # mountpoints we created (torn down in reverse order)
PIDS=()     # daemons we started

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4:-}" >> "$RES"; }
# one-line reason from a log file: its last non-empty line, trimmed
reason() { grep -v '^[[:space:]]*$' "$1" 2>/dev/null | tail -n 1 | tr -s '\t ' ' ' | cut -c1-100; }

is_mounted() { awk -v m="$1" '$2 == m { f = 1 } END { exit !f }' /proc/mounts; }

unmount_one() {
    local m=$1 i
    is_mounted "$m" || return 0
    umount "$m" 2>/dev/null || fusermount3 -u "$m" 2>/dev/null || fusermount -u "$m" 2>/dev/null
    for i in 1 2 3 4 5 6 7 8 9 10; do is_mounted "$m" || return 0; sleep 0.5; done
    umount -l "$m" 2>/dev/null
    is_mounted "$m" && log "WARNING: $m still mounted"
    return 0
}

stop_pid() {
    local p=$1 i
    kill -0 "$p" 2>/dev/null || return 0
    kill -TERM "$p" 2>/dev/null
    for i in $(seq 1 30); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null
    wait "$p" 2>/dev/null
    return 0
}

# stop_mount MNT PID: unmount, then make sure the daemon is gone
stop_mount() {
    local m=$1 p=$2 i
    unmount_one "$m"
    for i in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    stop_pid "$p"
}

cleanup() {
    local i rc=$?
    trap - EXIT INT TERM
    log "teardown"
    for (( i=${#MOUNTS[@]}-1; i>=0; i-- )); do unmount_one "${MOUNTS[$i]}"; done
    for (( i=${#PIDS[@]}-1; i>=0; i-- )); do stop_pid "${PIDS[$i]}"; done
    if [ -n "$NETNS" ]; then ip netns del "$NETNS" 2>/dev/null; fi
    if [ "$KEEP" = 1 ]; then
        log "kept work dir $W"
    else
        rm -rf "$W"
        rmdir "$BENCH_DIR" 2>/dev/null
    fi
    if grep -q "$W" /proc/mounts 2>/dev/null; then log "WARNING: mounts left under $W"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

# start_daemon NAME MNT CMD...: run CMD (which must stay in the foreground) in the
# background, wait for MNT to appear. Sets DAEMON_PID; returns 1 (reason in NAME.log).
# Not to be called in $(...): the pid and mount must be registered in this shell.
DAEMON_PID=""
start_daemon() {
    local name=$1 mnt=$2 pid i st last
    shift 2
    mkdir -p "$mnt"
    "$@" >"$W/$name.log" 2>&1 </dev/null &
    pid=$!
    DAEMON_PID=$pid
    PIDS+=("$pid")
    MOUNTS+=("$mnt")
    for i in $(seq 1 150); do
        if is_mounted "$mnt"; then return 0; fi
        if ! kill -0 "$pid" 2>/dev/null; then
            wait "$pid"
            st=$?
            last=$(reason "$W/$name.log")
            echo "exited with status $st before mounting: ${last:-no output}" >> "$W/$name.log"
            return 1
        fi
        sleep 0.2
    done
    echo "mount did not appear within 30 s" >> "$W/$name.log"
    stop_mount "$mnt" "$pid"
    return 1
}

# ---------------------------------------------------------------- install
need_pkgs() {
    local want=() c p
    want+=("fio:fio" "python3:python3" "mountpoint:util-linux" "fusermount3:fuse3")
    selected mergerfs && want+=("mergerfs:mergerfs")
    selected unionfs && want+=("unionfs:unionfs-fuse")
    if selected rclone || selected slow; then want+=("rclone:rclone"); fi
    if selected slow; then
        want+=("sshfs:sshfs" "/usr/sbin/sshd:openssh-server" "ssh-keygen:openssh-client"
               "ip:iproute2" "nsenter:util-linux")
    fi
    for c in "${want[@]}"; do
        p=${c#*:}; c=${c%%:*}
        command -v "$c" >/dev/null 2>&1 || printf '%s\n' "$p"
    done | sort -u
}

install_deps() {
    local missing
    missing=$(need_pkgs | tr '\n' ' ')
    [ -z "${missing// /}" ] && return 0
    if [ "${NO_INSTALL:-0}" = 1 ]; then log "missing packages (NO_INSTALL=1): $missing"; return 0; fi
    log "apt-get install $missing"
    # shellcheck disable=SC2086
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >"$W/apt.log" 2>&1; then
        apt-get update -qq >>"$W/apt.log" 2>&1
        # shellcheck disable=SC2086
        for p in $missing; do
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$p" >>"$W/apt.log" 2>&1 ||
                log "could not install $p (see $W/apt.log); its rows will be n/a"
        done
    fi
}

ensure_cachefs() {
    if [ -x "$CACHEFS_BIN" ]; then return 0; fi
    if [ "${NO_BUILD:-0}" != 1 ] && command -v cargo >/dev/null && [ -f "$REPO/Cargo.toml" ]; then
        log "building cachefs (cargo build --release)"
        (cd "$REPO" && cargo build --release) >"$W/cargo.log" 2>&1
    fi
    [ -x "$CACHEFS_BIN" ]
}

# ---------------------------------------------------------------- measurements
fio_run() { # fio_run NAME OUTJSON ARGS... ; returns fio's status
    local name=$1 out=$2
    shift 2
    fio --name="$name" --output-format=json --output="$out" "$@" >"$out.err" 2>&1
}

t_seqread() {
    drop_caches
    fio_run seqread "$W/fio.json" --filename="$1/big.bin" --rw=read --bs=1M --size="${BIG_MB}M" \
        --ioengine=psync --direct=0 --fadvise_hint=0 --invalidate=1 --allow_file_create=0 ||
        { cat "$W/fio.json.err" "$W/fio.json" >&2; return 1; }
    "$PY" "$LIB" fio BW "$W/fio.json" read
}
t_randread() {
    drop_caches
    fio_run randread "$W/fio.json" --filename="$1/big.bin" --rw=randread --bs=4k --size="${BIG_MB}M" \
        --io_size="${RAND_MB}M" --numjobs=2 --group_reporting --randrepeat=1 \
        --ioengine=psync --direct=0 --fadvise_hint=0 --invalidate=1 --allow_file_create=0 ||
        { cat "$W/fio.json.err" "$W/fio.json" >&2; return 1; }
    "$PY" "$LIB" fio IOPS "$W/fio.json" read
}
t_seqwrite() {
    rm -f "$1/write.bin"
    drop_caches
    fio_run seqwrite "$W/fio.json" --filename="$1/write.bin" --rw=write --bs=1M --size="${WRITE_MB}M" \
        --ioengine=psync --direct=0 --end_fsync=1 --fallocate=none ||
        { cat "$W/fio.json.err" "$W/fio.json" >&2; rm -f "$1/write.bin"; return 1; }
    rm -f "$1/write.bin"
    "$PY" "$LIB" fio BW "$W/fio.json" write
}
t_create() { # a new directory per round (ROUND); all are removed after the last round
    "$PY" "$LIB" mksmall "$1/new.${ROUND:-0}" "$NDIRS" "$NSMALL" "$SMALL_KB"
}
t_stat() { drop_caches; "$PY" "$LIB" statall "$1/small" | cut -d' ' -f1; }
t_readsmall() { drop_caches; "$PY" "$LIB" readall "$1/small" | cut -d' ' -f1; }

# warm DIR: read every file once (cache fill through the mount), then drop caches
warm() {
    find "$1/" -type f -print0 | xargs -0 -r cat > /dev/null
    drop_caches
}

# ---------------------------------------------------------------- systems
# mount_SYSTEM SRC DST MNT: mount, set DAEMON_PID. DST is the system's cache/upper dir.
mount_cachefs() {
    start_daemon cachefs "$3" "$CACHEFS_BIN" -src "$1" -dst "$2" -mountpoint "$3" "${CACHEFS_EXTRA[@]}"
}
mount_cachefs-nopt() {
    start_daemon cachefs-nopt "$3" "$CACHEFS_BIN" -src "$1" -dst "$2" -mountpoint "$3" \
        --no-passthrough "${CACHEFS_EXTRA[@]}"
}
MERGERFS_OPTS="cache.files=partial,dropcacheonclose=true,category.create=ff,fsname=cfb-mergerfs"
mount_mergerfs() {
    start_daemon mergerfs "$3" mergerfs -f -o "$MERGERFS_OPTS" "$2=RW:$1=RO" "$3"
}
UNIONFS_OPTS="cow,use_ino,fsname=cfb-unionfs"
mount_unionfs() {
    start_daemon unionfs "$3" unionfs -f -o "$UNIONFS_OPTS" "$2=RW:$1=RO" "$3"
}
RCLONE_OPTS=(--vfs-cache-mode full --vfs-cache-max-age 24h --dir-cache-time 1h)
mount_rclone() {
    start_daemon rclone "$3" rclone mount "$1" "$3" "${RCLONE_OPTS[@]}" --cache-dir "$2"
}

system_ready() { # system_ready SYSTEM -> 0, or prints reason
    case $1 in
        native) return 0 ;;
        cachefs|cachefs-nopt)
            [ -x "$CACHEFS_BIN" ] && return 0
            echo "no cachefs binary at $CACHEFS_BIN${NO_BUILD:+ (NO_BUILD set)}$([ -s "$W/cargo.log" ] && echo "; cargo: $(reason "$W/cargo.log")")"
            return 1 ;;
        mergerfs) command -v mergerfs >/dev/null && return 0; echo "mergerfs not installed"; return 1 ;;
        unionfs) command -v unionfs >/dev/null && return 0; echo "unionfs-fuse not installed"; return 1 ;;
        rclone) command -v rclone >/dev/null && return 0; echo "rclone not installed"; return 1 ;;
    esac
}

declare -A SYSDIR=() SYSPID=() VALS=() FAILED=()
ACTIVE=()

setup_system() { # setup_system SYSTEM: mount and warm; on success add to ACTIVE
    local s=$1 base="$W/$1" why srcdir
    if ! why=$(system_ready "$s"); then record "$s" _na "" "$why"; log "$s: n/a ($why)"; return; fi
    log "setting up $s"
    mkdir -p "$base"
    if [ "$s" = native ]; then
        cp -a "$W/src" "$base/data"
        SYSDIR[$s]="$base/data"
        ACTIVE+=("$s")
        return
    fi
    mkdir -p "$base/dst"
    srcdir="$W/src"
    case $s in
        # a union with no copy-on-read: fill its upper branch like a cache would be filled
        mergerfs|unionfs) cp -a "$W/src/." "$base/dst/" ;;
        # rclone uploads what is written through it: give it its own remote, so the
        # other systems' src is not changed under them
        rclone) cp -a "$W/src" "$base/remote"; srcdir="$base/remote" ;;
    esac
    if ! "mount_$s" "$srcdir" "$base/dst" "$base/mnt"; then
        why=$(reason "$W/$s.log"); record "$s" _na "" "mount failed: $why"; log "$s: mount failed: $why"
        return
    fi
    SYSPID[$s]=$DAEMON_PID
    SYSDIR[$s]="$base/mnt"
    log "  $s pid $DAEMON_PID; warming (reading every file once through the mount)"
    if ! warm "$base/mnt" 2>"$W/warm.err"; then
        record "$s" _na "" "warm-up read failed: $(reason "$W/warm.err")"
        stop_mount "$base/mnt" "$DAEMON_PID"
        return
    fi
    ACTIVE+=("$s")
}

# settle: flush dirty data and wait until our daemons are idle (rclone uploads in the
# background what was written through it; that must not land in the next measurement)
settle() {
    local w
    sync
    w=$("$PY" "$LIB" settle 120 "${SYSPID[@]}")
    case $w in 0.*|1.*) ;; *) log "  (waited ${w}s for the daemons to go idle)" ;; esac
}

# bench_main: every system is mounted at once; each test runs REPEAT rounds, and in each
# round every system once, back to back (the order rotates per round), so drift in the
# machine's speed hits all systems alike. The median of the rounds is recorded.
bench_main() {
    local s t r i n v med order
    for s in $ALL_SYSTEMS; do selected "$s" && setup_system "$s"; done
    sync
    n=${#ACTIVE[@]}
    [ "$n" = 0 ] && return
    for t in seqread randread seqwrite create stat readsmall; do
        log "== $t"
        for (( r=0; r<REPEAT; r++ )); do
            order=()
            for (( i=0; i<n; i++ )); do order+=("${ACTIVE[$(( (i + r) % n ))]}"); done
            for s in "${order[@]}"; do
                [ -n "${FAILED[$s.$t]:-}" ] && continue
                settle
                if v=$(ROUND=$r "t_$t" "${SYSDIR[$s]}" 2>"$W/measure.err") && [ -n "$v" ]; then
                    VALS[$s.$t]="${VALS[$s.$t]:-} $v"
                else
                    FAILED[$s.$t]=$(reason "$W/measure.err")
                    log "  $s $t failed: ${FAILED[$s.$t]}"
                fi
            done
        done
        for s in "${ACTIVE[@]}"; do
            if [ -n "${FAILED[$s.$t]:-}" ]; then
                record "$s" "$t" "n/a" "${FAILED[$s.$t]}"
                continue
            fi
            # shellcheck disable=SC2086
            med=$(printf '%s\n' ${VALS[$s.$t]} | sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }')
            record "$s" "$t" "$med"
            log "  $s $t = $med (rounds:${VALS[$s.$t]})"
        done
        for s in "${ACTIVE[@]}"; do rm -rf "${SYSDIR[$s]}"/new.*; done
    done
    for s in "${ACTIVE[@]}"; do
        if [ -n "${SYSPID[$s]:-}" ]; then stop_mount "${SYSDIR[$s]}" "${SYSPID[$s]}"; fi
        rm -rf "${W:?}/$s"
    done
}

bench_mem() { # peak RSS of each FUSE daemon while `find` walks TREE_ENTRIES entries twice
    local s pid kb why base
    log "== mem: tree of $TREE_ENTRIES entries"
    "$PY" "$LIB" mktree "$W/tree" "$TREE_ENTRIES" >/dev/null
    local list=""
    for s in cachefs mergerfs unionfs rclone; do selected "$s" && list="$list $s"; done
    selected cachefs-nopt && ! selected cachefs && list="cachefs $list"
    [ -z "$list" ] && list="cachefs mergerfs unionfs rclone"   # `--only mem`: all of them
    # one cachefs figure: with and without passthrough the metadata path is the same
    for s in $list; do
        if ! why=$(system_ready "$s"); then record "$s" rss "n/a" "$why"; continue; fi
        base="$W/mem-$s"
        mkdir -p "$base/dst"
        if "mount_$s" "$W/tree" "$base/dst" "$base/mnt"; then pid=$DAEMON_PID; else
            record "$s" rss "n/a" "mount failed: $(reason "$W/$s.log")"; continue
        fi
        drop_caches
        find "$base/mnt" -printf '%i %s\n' >/dev/null 2>"$W/find.err"
        find "$base/mnt" -printf '%i %s\n' >/dev/null 2>>"$W/find.err"
        kb=$("$PY" "$LIB" vmhwm "$pid")
        if [ "${kb:-0}" -gt 0 ]; then
            record "$s" rss "$(awk -v k="$kb" 'BEGIN { printf "%.1f", k / 1024 }')"
            log "  $s VmHWM ${kb} kB"
        else
            record "$s" rss "n/a" "no VmHWM for pid $pid"
        fi
        stop_mount "$base/mnt" "$pid"
        rm -rf "$base"
    done
    rm -rf "$W/tree"
}

# ---------------------------------------------------------------- slow src
SLOW_SSHD_PORT=2222
SLOW_PORT=2223
in_ns() { nsenter --net="/run/netns/$NETNS" "$@"; }

SLOW_WHY=""
fail_slow() { SLOW_WHY=$1; return 1; }
slow_setup() { # sets SLOW_WHY on failure; not in $(...) (registers pids, mounts, netns)
    local S="$W/slow" i
    for c in sshfs /usr/sbin/sshd ssh-keygen ip nsenter; do
        command -v "$c" >/dev/null || { fail_slow "$c not installed"; return; }
    done
    mkdir -p "$S/export" "$S/sshfs" /run/sshd
    NETNS="cfbench-$$"
    ip netns add "$NETNS" || { NETNS=""; fail_slow "ip netns add failed"; return; }
    ip -n "$NETNS" link set lo up || { fail_slow "netns lo up failed"; return; }
    if ! ssh-keygen -q -t ed25519 -N '' -f "$S/hostkey" >/dev/null </dev/null ||
        ! ssh-keygen -q -t ed25519 -N '' -f "$S/clientkey" >/dev/null </dev/null; then
        fail_slow "ssh-keygen failed"; return
    fi
    cp "$S/clientkey.pub" "$S/authorized_keys"
    cat > "$S/sshd_config" <<EOF
ListenAddress 127.0.0.1:$SLOW_SSHD_PORT
HostKey $S/hostkey
PidFile $S/sshd.pid
AuthorizedKeysFile $S/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
LogLevel ERROR
EOF
    ip netns exec "$NETNS" /usr/sbin/sshd -D -e -f "$S/sshd_config" >"$W/sshd.log" 2>&1 </dev/null &
    PIDS+=("$!")
    ip netns exec "$NETNS" "$PY" "$HERE/delay_proxy.py" "$SLOW_PORT" "$SLOW_SSHD_PORT" \
        "$SLOW_DELAY_MS" "$SLOW_RATE_MBIT" >"$W/proxy.log" 2>&1 </dev/null &
    PIDS+=("$!")
    for i in $(seq 1 50); do
        in_ns "$PY" -c "import socket; socket.create_connection(('127.0.0.1', $SLOW_PORT), 1).recv(1)" \
            2>/dev/null && break
        sleep 0.2
    done
    log "slow: creating ${SLOW_MB} MiB file"
    "$PY" "$LIB" mkfile "$S/export/big.bin" "$SLOW_MB" >/dev/null
    if ! start_daemon sshfs "$S/sshfs" nsenter --net="/run/netns/$NETNS" sshfs -f -p "$SLOW_PORT" \
            -o "IdentityFile=$S/clientkey,StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,BatchMode=yes" \
            "root@127.0.0.1:$S/export" "$S/sshfs"; then
        fail_slow "sshfs mount failed: $(reason "$W/sshfs.log") $(reason "$W/sshd.log")"; return
    fi
    return 0
}

# slow_read ROW FILE: uncached read (ttfb + MB/s), then a second read after dropping caches
slow_read() {
    local row=$1 f=$2 out ttfb secs bytes
    drop_caches
    if ! out=$("$PY" "$LIB" ttfb "$f" 2>"$W/measure.err"); then
        record "slow:$row" _na "" "read failed: $(reason "$W/measure.err")"; return
    fi
    read -r ttfb secs bytes <<< "$out"
    record "slow:$row" ttfb "$ttfb"
    record "slow:$row" mbps "$(awk -v b="$bytes" -v s="$secs" 'BEGIN { printf "%.1f", b / s / 1e6 }')"
    log "  slow:$row first byte ${ttfb} ms, ${bytes} B in ${secs} s"
    drop_caches
    if out=$("$PY" "$LIB" ttfb "$f" 2>"$W/measure.err"); then
        read -r ttfb secs bytes <<< "$out"
        record "slow:$row" reread "$(awk -v b="$bytes" -v s="$secs" 'BEGIN { printf "%.1f", b / s / 1e6 }')"
    else
        record "slow:$row" reread "n/a" "$(reason "$W/measure.err")"
    fi
}

bench_slow() {
    local S="$W/slow" why pid
    log "== slow src: sshfs over loopback in netns, ${SLOW_DELAY_MS} ms each way${SLOW_RATE_MBIT:+, ${SLOW_RATE_MBIT} Mbit/s}"
    if ! slow_setup; then
        record slow:sshfs _na "" "$SLOW_WHY"; log "slow: n/a ($SLOW_WHY)"; return
    fi
    slow_read sshfs "$S/sshfs/big.bin"

    if why=$(system_ready cachefs); then
        mkdir -p "$S/cachefs-dst"
        if mount_cachefs "$S/sshfs" "$S/cachefs-dst" "$S/cachefs"; then
            pid=$DAEMON_PID
            slow_read cachefs "$S/cachefs/big.bin"
            stop_mount "$S/cachefs" "$pid"
        else
            record slow:cachefs _na "" "mount failed: $(reason "$W/cachefs.log")"
        fi
    else
        record slow:cachefs _na "" "$why"
    fi

    if command -v rclone >/dev/null; then
        mkdir -p "$S/rclone-cache"
        # sftp remote defined by environment; rclone runs in the netns (net only, so the
        # mount is visible here) and talks to the delayed port directly.
        if start_daemon rclone-slow "$S/rclone" env RCLONE_CONFIG_CFBSLOW_TYPE=sftp \
                RCLONE_CONFIG_CFBSLOW_HOST=127.0.0.1 RCLONE_CONFIG_CFBSLOW_PORT=$SLOW_PORT \
                RCLONE_CONFIG_CFBSLOW_USER=root RCLONE_CONFIG_CFBSLOW_KEY_FILE="$S/clientkey" \
                RCLONE_CONFIG_CFBSLOW_DISABLE_HASHCHECK=true \
                nsenter --net="/run/netns/$NETNS" rclone mount "cfbslow:$S/export" "$S/rclone" \
                "${RCLONE_OPTS[@]}" --cache-dir "$S/rclone-cache"; then
            pid=$DAEMON_PID
            slow_read rclone "$S/rclone/big.bin"
            stop_mount "$S/rclone" "$pid"
        else
            record slow:rclone _na "" "mount failed: $(reason "$W/rclone-slow.log")"
        fi
    else
        record slow:rclone _na "" "rclone not installed"
    fi
}

# ---------------------------------------------------------------- main
mkdir -p "$W"
: > "$RES"
install_deps
if selected cachefs || selected cachefs-nopt || selected mem || selected slow; then
    ensure_cachefs || log "cachefs not available: its rows will be n/a"
fi

record _meta date "$(date -u '+%Y-%m-%d %H:%M UTC')"
record _meta machine "$(uname -r), $(nproc) cpus, $(awk '/MemTotal/ { printf "%.0f GiB", $2/1048576 }' /proc/meminfo), disk $(df -h --output=source "$BENCH_DIR" | tail -n 1) ($(df --output=fstype "$BENCH_DIR" | tail -n 1 | tr -d ' '))"
record _meta sizes "seq file ${BIG_MB} MiB, write ${WRITE_MB} MiB, random 4 KiB: 2 jobs x ${RAND_MB} MiB (psync, direct=0, fadvise_hint=0, randrepeat), small: ${NSMALL} x ${SMALL_KB} KiB in ${NDIRS} dirs, tree walk ${TREE_ENTRIES} entries; main table: median of ${REPEAT} run(s)"
vers="fio $(fio --version 2>/dev/null | sed 's/^fio-//')"
command -v mergerfs >/dev/null && vers="$vers, mergerfs $(mergerfs --version 2>/dev/null | awk 'NR==1 { print $NF }')"
command -v unionfs >/dev/null && vers="$vers, unionfs-fuse $(unionfs --version 2>&1 | awk '/unionfs-fuse version/ { print $NF }')"
command -v rclone >/dev/null && vers="$vers, rclone $(rclone version 2>/dev/null | awk 'NR==1 { print $2 }')"
[ -x "$CACHEFS_BIN" ] && vers="$vers, cachefs $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)"
record _meta versions "$vers"

RUN_MAIN=0
for s in $ALL_SYSTEMS; do selected "$s" && RUN_MAIN=1; done
if [ "$RUN_MAIN" = 1 ]; then
    log "creating dataset in $W/src"
    mkdir -p "$W/src"
    "$PY" "$LIB" mkfile "$W/src/big.bin" "$BIG_MB" >/dev/null
    "$PY" "$LIB" mksmall "$W/src/small" "$NDIRS" "$NSMALL" "$SMALL_KB" >/dev/null
    sync
    bench_main
fi
selected mem && bench_mem
selected slow && bench_slow

echo
if [ -n "$OUT" ]; then
    "$PY" "$HERE/report.py" "$RES" "$OUT"
    log "markdown written to $OUT"
else
    "$PY" "$HERE/report.py" "$RES"
fi
