# shellcheck shell=bash
# Helpers shared by the scripts in this directory. Source it; don't run it.

# CI (and `sudo`) may start us with a PATH that lacks cargo's bin dir.
CARGO_HOME="${CARGO_HOME:-${HOME:-/root}/.cargo}"
export CARGO_HOME
case ":$PATH:" in
  *":$CARGO_HOME/bin:"*) ;;
  *) export PATH="$CARGO_HOME/bin:$PATH" ;;
esac

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export REPO_ROOT

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# mi_path DIR: DIR made absolute and escaped the way /proc/self/mountinfo
# writes it (space -> \040), then doubled backslashes for awk -v.
mi_path() {
  local dir
  dir="$(realpath -m "$1")"
  dir="${dir// /\\\\040}"
  printf '%s\n' "$dir"
}

# is_mounted DIR: true if DIR is a mount point (reads /proc/self/mountinfo,
# field 5 is the mount point, with spaces etc. octal-escaped).
is_mounted() {
  awk -v d="$(mi_path "$1")" '$5 == d { found = 1 } END { exit !found }' /proc/self/mountinfo
}

# wait_mounted DIR PID [SECONDS]: wait until DIR shows up as a mount point;
# fail early if PID (the daemon) died.
wait_mounted() {
  local dir="$1" pid="$2" secs="${3:-20}" i
  for ((i = 0; i < secs * 10; i++)); do
    if is_mounted "$dir"; then return 0; fi
    if ! kill -0 "$pid" 2>/dev/null; then
      log "daemon (pid $pid) exited before $dir was mounted"
      return 1
    fi
    sleep 0.1
  done
  log "timed out after ${secs}s waiting for $dir to be mounted"
  return 1
}

# mounts_under DIR: mount points at or below DIR, as mountinfo spells them.
mounts_under() {
  awk -v r="$(mi_path "$1")" '$5 == r || index($5, r "/") == 1 { print $5 }' /proc/self/mountinfo
}

# unmount_all_under DIR: unmount (lazily if busy) every mount at or below DIR,
# deepest first.
unmount_all_under() {
  local m
  mounts_under "$1" | sort -r | while read -r m; do
      m="$(printf '%b' "$m")" # undo mountinfo's \040-style escapes
      umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || fusermount3 -uz "$m" 2>/dev/null || true
    done
}

# reap PID [SECONDS]: wait for PID (a child of this shell) to exit; send it
# SIGTERM after 5 s and SIGKILL after SECONDS.
reap() {
  local pid="$1" secs="${2:-30}" i
  [[ -n "$pid" ]] || return 0
  for ((i = 0; i < secs * 10; i++)); do
    if ! kill -0 "$pid" 2>/dev/null; then
      wait "$pid" 2>/dev/null || true
      return 0
    fi
    [[ $i -eq 50 ]] && kill -TERM "$pid" 2>/dev/null
    sleep 0.1
  done
  log "pid $pid did not exit after ${secs}s; killing it"
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

# stop_daemon MNT PID [SECONDS]: unmount MNT (the daemon then exits by itself),
# then reap PID: SIGTERM after 5 s, SIGKILL after SECONDS.
stop_daemon() {
  local mnt="$1" pid="$2" secs="${3:-30}"
  if is_mounted "$mnt"; then
    umount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true
  fi
  reap "$pid" "$secs"
}

# run_child CMD...: run CMD in the background and wait for it, returning its
# status. bash runs a trap only once the foreground command is done, so a
# long test run in the foreground would keep an INT/TERM from cleaning up;
# `wait` is interrupted at once. The cleanup trap kills $CHILD_PID.
CHILD_PID=""
run_child() {
  local rc=0
  "$@" &
  CHILD_PID=$!
  wait "$CHILD_PID" || rc=$?
  CHILD_PID=""
  return "$rc"
}

# cleanup_work WORK DAEMON_PID: what every script's EXIT trap does: stop the
# running test command, unmount everything under WORK, stop the daemon, and
# remove WORK once nothing is mounted there.
cleanup_work() {
  local work="$1" daemon="${2:-}"
  if [[ -n "$CHILD_PID" ]]; then kill -TERM "$CHILD_PID" 2>/dev/null || true; fi
  unmount_all_under "$work"
  if [[ -n "$daemon" ]]; then
    kill -TERM "$daemon" 2>/dev/null || true
    reap "$daemon" 10
  fi
  if [[ -n "$CHILD_PID" ]]; then reap "$CHILD_PID" 10; fi
  if [[ -z "$(mounts_under "$work")" ]]; then rm -rf "$work"; fi
}

# cachefs_bin: path to the release binary (override with CACHEFS_BIN).
cachefs_bin() {
  local b="${CACHEFS_BIN:-$REPO_ROOT/target/release/cachefs}"
  [[ -x "$b" ]] || die "cachefs binary not found at $b (run: cargo build --release)"
  printf '%s\n' "$b"
}

# ---- third-party test tools (sources in ../shared/thirdparty/) -------------------
THIRDPARTY_DIR="${THIRDPARTY_DIR:-$REPO_ROOT/../shared/thirdparty}"
BUILD_DIR="${BUILD_DIR:-$REPO_ROOT/target/thirdparty}"
# Used only without the tarballs: the commit the tarball was made from.
LIBFUSE_GIT=https://github.com/libfuse/libfuse.git
LIBFUSE_COMMIT=e8d407ce93bf0d87efe7bbfafdfbd3c471597a02

# unpack NAME GIT COMMIT: print the source dir of NAME, unpacked from
# THIRDPARTY_DIR/NAME-*.tar.gz (the newest) or cloned, under BUILD_DIR.
unpack() {
  local name="$1" git="$2" commit="$3" tarball="" dir
  if [[ -d "$THIRDPARTY_DIR" ]]; then
    tarball="$(find "$THIRDPARTY_DIR" -maxdepth 1 -name "$name-*.tar.gz" | sort | tail -n1)"
  fi
  if [[ -n "$tarball" ]]; then
    dir="$BUILD_DIR/$(basename "$tarball" .tar.gz)"
    if [[ ! -d "$dir" ]]; then
      log "unpacking $tarball"
      rm -rf "$dir.tmp"
      mkdir -p "$dir.tmp"
      tar -xzf "$tarball" -C "$dir.tmp" --strip-components=1
      mv "$dir.tmp" "$dir"
    fi
  else
    dir="$BUILD_DIR/$name-${commit:0:7}"
    if [[ ! -d "$dir" ]]; then
      log "no $name tarball in $THIRDPARTY_DIR; cloning $git"
      rm -rf "$dir.tmp"
      git clone --quiet "$git" "$dir.tmp"
      git -C "$dir.tmp" checkout --quiet "$commit"
      mv "$dir.tmp" "$dir"
    fi
  fi
  printf '%s\n' "$dir"
}

# build_libfuse_example NAME: builds libfuse's example/NAME (passthrough_ll,
# passthrough_hp, ...) once under BUILD_DIR (meson + ninja) and sets LIBFUSE_EXAMPLE to
# its path. Used by xfstests.sh (the baseline) and bench/bigdir.sh (the reference).
build_libfuse_example() {
  local name="$1" dir
  mkdir -p "$BUILD_DIR"
  dir="$(unpack libfuse "$LIBFUSE_GIT" "$LIBFUSE_COMMIT")"
  LIBFUSE_DIR="$dir"
  LIBFUSE_EXAMPLE="$dir/build/example/$name"
  if [[ ! -x "$LIBFUSE_EXAMPLE" ]]; then
    log "building libfuse's $name in $dir (meson + ninja)"
    (
      cd "$dir"
      if [[ ! -f build/build.ninja ]]; then
        rm -rf build
        meson setup build -Dutils=false -Dtests=false -Dexamples=true >build.log 2>&1 ||
          { tail -n 30 build.log >&2; exit 1; }
      fi
      ninja -C build -j2 "example/$name" >>build.log 2>&1 ||
        { tail -n 30 build.log >&2; exit 1; }
    ) || die "libfuse build failed (log: $dir/build.log)"
  fi
}
