#!/usr/bin/env bash
# bench/rclone.sh: a big uncached object read through rclone's own mount and through
# cachefs in front of that mount, side by side in one run, on a local S3 server (moto,
# loopback only), without and with added latency (bench/delay_proxy.py between rclone
# and the S3 server). Prints one table; compare the two systems as ratios within a run.
#
#   sudo bench/rclone.sh                 # 1 GiB object, links "direct" and "20 ms each way"
#   sudo bench/rclone.sh --mb 256 --delay 40 --rounds 3 --keep
#
# Env: CACHEFS_BIN (default target/release/cachefs, built if missing unless NO_BUILD=1),
# CACHEFS_ARGS (extra cachefs flags), BENCH_DIR (/var/tmp/cachefs-bench), PY (python3).
set -euo pipefail

MB=1024
DELAY_MS=20
ROUNDS=1
KEEP=0
while [ $# -gt 0 ]; do
    case $1 in
        --mb) MB=$2; shift 2 ;;
        --delay) DELAY_MS=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --keep) KEEP=1; shift ;;
        -h|--help) sed -n 2,11p "$0"; exit 0 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "run as root (FUSE mounts, drop_caches)" >&2; exit 2; }

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
PY=${PY:-python3}
LIB="$HERE/benchlib.py"
CACHEFS_BIN=${CACHEFS_BIN:-$ROOT/target/release/cachefs}
CACHEFS_ARGS=${CACHEFS_ARGS:-}
BENCH_DIR=${BENCH_DIR:-/var/tmp/cachefs-bench}
W="$BENCH_DIR/rclone.$$"
for c in rclone moto_server fusermount3 "$PY"; do
    command -v "$c" >/dev/null || { echo "$c is not installed (scripts/install-deps.sh)" >&2; exit 2; }
done
if [ ! -x "$CACHEFS_BIN" ]; then
    [ "${NO_BUILD:-0}" = 1 ] && { echo "$CACHEFS_BIN missing" >&2; exit 2; }
    (cd "$ROOT" && cargo build --release --quiet)
fi

PIDS=()
MOUNTS=()
FAILED=0
log() { echo "[$(date +%T)] $*" >&2; }
cleanup() {
    local m p
    for ((i=${#MOUNTS[@]}-1; i>=0; i--)); do
        m=${MOUNTS[i]}
        mountpoint -q "$m" && { umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; }
    done
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    if [ "$KEEP" = 1 ] || [ "$FAILED" = 1 ]; then log "kept $W (logs)"; else rm -rf "$W"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mkdir -p "$W"

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 300); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }
wait_mount() { for _ in $(seq 300); do mountpoint -q "$1" && return 0; sleep 0.1; done; echo "no mount at $1" >&2; return 1; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

S3_PORT=$(free_port)
moto_server -H 127.0.0.1 -p "$S3_PORT" >"$W/s3.log" 2>&1 &
PIDS+=($!)
wait_port "$S3_PORT"
PROXY_PORT=$(free_port)
"$PY" "$HERE/delay_proxy.py" "$PROXY_PORT" "$S3_PORT" "$DELAY_MS" >"$W/proxy.log" 2>&1 &
PIDS+=($!)
wait_port "$PROXY_PORT"

# rclone's remote "s3" (no config file), at PORT.
s3env() {
    echo RCLONE_CONFIG=/dev/null RCLONE_CONFIG_S3_TYPE=s3 RCLONE_CONFIG_S3_PROVIDER=Other \
        RCLONE_CONFIG_S3_ENDPOINT=http://127.0.0.1:$1 RCLONE_CONFIG_S3_ACCESS_KEY_ID=test \
        RCLONE_CONFIG_S3_SECRET_ACCESS_KEY=test RCLONE_CONFIG_S3_REGION=us-east-1
}
env $(s3env "$S3_PORT") rclone mkdir s3:bench
log "making a ${MB} MiB object"
"$PY" "$LIB" mkfile "$W/big.bin" "$MB" >/dev/null
env $(s3env "$S3_PORT") rclone copyto "$W/big.bin" s3:bench/big.bin
rm -f "$W/big.bin"

# rclone mount with the flags of examples/systemd/rclone-gcs-uploads.service.
rclone_mount() { # PORT DIR NAME
    mkdir -p "$2" "$W/$3.cache"
    env $(s3env "$1") rclone mount s3:bench "$2" --allow-other --uid 33 --gid 33 --umask 002 \
        --vfs-cache-mode writes --dir-cache-time 30s --cache-dir "$W/$3.cache" \
        --log-level NOTICE >"$W/$3.log" 2>&1 &
    PIDS+=($!)
    MOUNTS+=("$2")
    wait_mount "$2"
}
cachefs_mount() { # SRC DST MNT NAME
    mkdir -p "$2" "$3"
    # shellcheck disable=SC2086
    "$CACHEFS_BIN" -src "$1" -dst "$2" -mountpoint "$3" $CACHEFS_ARGS 2>"$W/$4.log" &
    PIDS+=($!)
    MOUNTS+=("$3")
    wait_mount "$3"
}

declare -A R
FAILED=0
# measure KEY FILE: uncached read (first 4 KiB ms, MB/s), caches dropped, second read MB/s
measure() {
    local key=$1 f=$2 out ttfb secs bytes
    drop_caches
    if ! out=$("$PY" "$LIB" ttfb "$f" 2>"$W/measure.err"); then
        log "  $key: FAILED: $(tail -3 "$W/measure.err" | tr '\n' ' ')"
        FAILED=1
        R[$key.ttfb]+="n/a "; R[$key.mbps]+="n/a "; R[$key.again]+="n/a "; return
    fi
    read -r ttfb secs bytes <<< "$out"
    [ "$bytes" = $((MB << 20)) ] || { log "$key: read $bytes bytes"; R[$key.ttfb]+="n/a "; return; }
    R[$key.ttfb]+="$ttfb "
    R[$key.mbps]+="$(awk -v b="$bytes" -v s="$secs" 'BEGIN { printf "%.1f", b / s / 1e6 }') "
    log "  $key: first 4 KiB ${ttfb} ms, ${bytes} B in ${secs} s"
    drop_caches
    out=$("$PY" "$LIB" ttfb "$f" 2>"$W/measure.err") || { R[$key.again]+="n/a "; return; }
    read -r ttfb secs bytes <<< "$out"
    R[$key.again]+="$(awk -v b="$bytes" -v s="$secs" 'BEGIN { printf "%.1f", b / s / 1e6 }') "
}

LINKS=("direct:$S3_PORT" "delay:$PROXY_PORT")
for link in "${LINKS[@]}"; do
    name=${link%%:*}; port=${link#*:}
    rclone_mount "$port" "$W/$name/rclone" "$name-rclone"
    rclone_mount "$port" "$W/$name/src" "$name-src"
done
for round in $(seq "$ROUNDS"); do
    for link in "${LINKS[@]}"; do
        name=${link%%:*}
        log "round $round, link $name"
        # A fresh, empty dst every round: the object is uncached for cachefs.
        rm -rf "$W/$name/dst"
        cachefs_mount "$W/$name/src" "$W/$name/dst" "$W/$name/mnt" "$name-cachefs.$round"
        # Alternate who goes first.
        if [ $((round % 2)) = 1 ]; then order="rclone cachefs"; else order="cachefs rclone"; fi
        for sys in $order; do
            case $sys in
                rclone) measure "$name.rclone" "$W/$name/rclone/big.bin" ;;
                cachefs) measure "$name.cachefs" "$W/$name/mnt/big.bin" ;;
            esac
        done
        umount "$W/$name/mnt"
        unset 'MOUNTS[${#MOUNTS[@]}-1]'
        MOUNTS=("${MOUNTS[@]}")
    done
done

# median of the numbers in a space-separated list ("n/a" if any run failed)
median() { tr ' ' '\n' | awk 'NF { if ($1 == "n/a") bad = 1; a[++n] = $1 } END { if (n == 0 || bad) { print "n/a"; exit } asort(a); print a[int((n + 1) / 2)] }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a+0 > 0 && b+0 > 0) printf "%.2fx", a / b; else print "-" }'; }
echo
echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, $(uname -r), ${MB} MiB object on moto_server (loopback), rclone $(rclone version | head -1 | awk '{print $2}'), median of $ROUNDS round(s)"
echo
echo "| link | read through | first 4 KiB (ms) | uncached read (MB/s) | second read, after drop_caches (MB/s) |"
echo "|---|---|---:|---:|---:|"
for link in "${LINKS[@]}"; do
    name=${link%%:*}
    label=$name; [ "$name" = delay ] && label="+${DELAY_MS} ms each way"
    rt=$(median <<< "${R[$name.rclone.ttfb]:-}"); rm_=$(median <<< "${R[$name.rclone.mbps]:-}"); ra=$(median <<< "${R[$name.rclone.again]:-}")
    ct=$(median <<< "${R[$name.cachefs.ttfb]:-}"); cm=$(median <<< "${R[$name.cachefs.mbps]:-}"); ca=$(median <<< "${R[$name.cachefs.again]:-}")
    echo "| $label | rclone mount | $rt | $rm_ | $ra |"
    echo "| $label | cachefs over it | $ct ($(ratio "$ct" "$rt")) | $cm ($(ratio "$cm" "$rm_")) | $ca ($(ratio "$ca" "$ra")) |"
done
