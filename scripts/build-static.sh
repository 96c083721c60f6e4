#!/usr/bin/env bash
# Build a statically linked cachefs (glibc, crt-static, on the gnu target):
#   target/x86_64-unknown-linux-gnu/release/cachefs (or the host's gnu triple)
# It runs on any Linux of the same architecture with no shared libraries at all
# (it needs none from glibc's NSS or dlopen), e.g. in a minimal container or an
# initramfs. What it costs, against the default dynamic build:
#   - about 1 MB more once stripped (libc and libgcc inside the binary);
#   - glibc fixes arrive only by rebuilding cachefs, not with the distribution's
#     libc6 updates;
#   - a separate target directory: the first build compiles every crate again.
# Package it with: scripts/package-deb.sh --binary PATH
#
# Usage: scripts/build-static.sh
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"
host="$(rustc -vV | awk '/^host:/ { print $2 }')"
[[ $host == *-linux-gnu ]] || die "the host target is $host: crt-static here is for *-linux-gnu"
log "cargo build --release --target $host with -C target-feature=+crt-static"
RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-C target-feature=+crt-static" \
  cargo build --release --locked --quiet --target "$host"
bin="target/$host/release/cachefs"
file "$bin" >&2 || true
ldd "$bin" >&2 || true
echo "$bin"
