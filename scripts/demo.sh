#!/usr/bin/env bash
# Build cachefs and mount a working demo:
#   /tmp/cachefs-demo/src   the "slow" directory (stands in for an rclone mount)
#   /tmp/cachefs-demo/dst   the cache directory
#   /tmp/cachefs-demo/mnt   the mount: src's files, copied into dst on first read
# cachefs keeps running in the background; the script says how to stop it. Each
# start begins from a clean demo (src, dst and mnt are made anew), so every run
# tells the same story.
#
# Usage: scripts/demo.sh [start]   build, mount, show ls and cat through the mount
#        scripts/demo.sh stop      unmount and stop the demo daemon
# Environment: DEMO_DIR (default /tmp/cachefs-demo).
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DEMO="${DEMO_DIR:-/tmp/cachefs-demo}"
PIDFILE="$DEMO/cachefs.pid"
LOGFILE="$DEMO/cachefs.log"
MNT="$DEMO/mnt"

stop() {
  if is_mounted "$MNT"; then
    umount "$MNT" 2>/dev/null || fusermount3 -u "$MNT" 2>/dev/null || umount -l "$MNT"
    echo "unmounted $MNT"
  fi
  if [[ -f "$PIDFILE" ]]; then
    local pid i
    pid="$(cat "$PIDFILE")"
    for ((i = 0; i < 100; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      [[ $i -eq 50 ]] && kill -TERM "$pid" 2>/dev/null
      sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && die "the demo daemon (pid $pid) does not exit; stop it by hand"
    rm -f "$PIDFILE"
  fi
}

case "${1:-start}" in
  stop) stop; exit 0 ;;
  start) ;;
  -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) die "usage: $0 [start|stop]" ;;
esac

if [[ $(id -u) -ne 0 ]] && ! command -v fusermount3 >/dev/null; then
  die "as a non-root user, mounting needs fusermount3: run 'sudo apt-get install fuse3' (or run this as root)"
fi
command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs) first"

echo "== building cachefs (cargo build --release)"
(cd "$REPO_ROOT" && cargo build --release --locked --quiet)
BIN="$(cachefs_bin)"

stop # a previous demo, if any
# Start from a clean demo: a second run must not find the first run's files in dst.
# Only the demo's own entries are removed, and only once nothing is mounted there.
is_mounted "$MNT" && die "$MNT is still mounted; run '$0 stop' or 'umount -l $MNT' first"
rm -rf "${DEMO:?}/src" "${DEMO:?}/dst" "$MNT" "$LOGFILE"
mkdir -p "$DEMO/src/photos" "$DEMO/dst" "$MNT"
echo "hello from the slow side" >"$DEMO/src/hello.txt"
head -c 1048576 /dev/urandom >"$DEMO/src/photos/big.bin"

echo "== starting: $BIN -src $DEMO/src -dst $DEMO/dst -mountpoint $MNT"
nohup "$BIN" -src "$DEMO/src" -dst "$DEMO/dst" -mountpoint "$MNT" </dev/null >"$LOGFILE" 2>&1 &
echo $! >"$PIDFILE"
if ! wait_mounted "$MNT" "$(cat "$PIDFILE")" 20; then
  cat "$LOGFILE" >&2
  rm -f "$PIDFILE"
  die "cachefs did not mount; its log is above"
fi

show_dst() { local l; l="$(ls "$DEMO/dst")"; echo "${l:-(empty)}"; }
echo "== dst before any read: nothing is cached yet"
show_dst
echo "== ls -l $MNT"
# Nothing may go to stderr (an error here, say from getxattr on the mount root, is a bug).
ls -l "$MNT" 2>"$DEMO/ls.err" || true
if [[ -s "$DEMO/ls.err" ]]; then
  cat "$DEMO/ls.err" >&2
  die "ls -l $MNT printed an error (above); the daemon's log is $LOGFILE"
fi
rm -f "$DEMO/ls.err"
echo "== cat $MNT/hello.txt"
cat "$MNT/hello.txt"
echo "== dst after the read: hello.txt was copied in when it was opened"
show_dst
echo "== a write through the mount goes to dst only (src is untouched without -w)"
echo "written through cachefs" >"$MNT/new.txt"
names() { (cd "$1" && printf '%s ' *); }
echo "mount: $(names "$MNT")"
echo "dst:   $(names "$DEMO/dst")"
echo "src:   $(names "$DEMO/src")"
cat <<EOF

cachefs is running in the background (pid $(cat "$PIDFILE"), log $LOGFILE).
Stop it with either of:
  $0 stop
  umount $MNT        # the daemon exits when its mount goes away
EOF
