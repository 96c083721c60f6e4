#!/usr/bin/env bash
# Build a Debian package of cachefs: target/deb/cachefs_VERSION-REVISION_ARCH.deb
#
#   /usr/bin/cachefs                                the daemon (stripped)
#   /sbin/mount.fuse.cachefs                        the mount(8)/fstab helper
#   /usr/lib/systemd/system/cachefs@.service        template unit: /etc/cachefs/NAME.conf
#   /usr/share/man/man1/cachefs.1.gz                man page (generated: cachefs man)
#   /usr/share/bash-completion/completions/cachefs  completions (cachefs completions SHELL)
#   /usr/share/zsh/vendor-completions/_cachefs
#   /usr/share/fish/vendor_completions.d/cachefs.fish
#   /usr/share/doc/cachefs/                         README, docs/, examples/, copyright
#
# The man page and completions come from the binary being packaged, so they match
# its flags. Nothing is enabled or started at install time; the template unit is
# used with `systemctl enable --now cachefs@NAME`.
#
# Usage: scripts/package-deb.sh [--no-build] [--binary PATH]
#   --no-build     package target/release/cachefs as it is
#   --binary PATH  package this binary (e.g. a static build)
# Environment: DEB_REVISION (default 1),
#              DEB_MAINTAINER (default "cachefs developers <root@localhost>").
# Needs dpkg-deb (and dpkg-shlibdeps from dpkg-dev, if installed, for Depends).
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

build=yes
bin=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --no-build) build=no; shift ;;
    --binary) [[ $# -ge 2 ]] || die "--binary needs a path"; bin="$2"; build=no; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

command -v dpkg-deb >/dev/null || die "dpkg-deb not found: run this on Debian/Ubuntu (apt-get install dpkg)"
cd "$REPO_ROOT"
if [[ $build == yes ]]; then
  log "cargo build --release --locked"
  cargo build --release --locked --quiet
fi
bin="${bin:-target/release/cachefs}"
[[ -x "$bin" ]] || die "$bin does not exist: build it first (cargo build --release) or drop --no-build"

version="$(awk -F'"' '/^version = / { print $2; exit }' Cargo.toml)"
[[ "$("$bin" --version)" == "cachefs $version" ]] ||
  die "$bin says '$("$bin" --version)', Cargo.toml says $version: rebuild it"
revision="${DEB_REVISION:-1}"
arch="$(dpkg --print-architecture)"
maintainer="${DEB_MAINTAINER:-cachefs developers <root@localhost>}"
name="cachefs_${version}-${revision}_${arch}"
out="target/deb"
root="$out/$name"
rm -rf "$root"
mkdir -p "$root/DEBIAN"

log "staging $root"
install -D -m 755 "$bin" "$root/usr/bin/cachefs"
strip --strip-unneeded "$root/usr/bin/cachefs" 2>/dev/null || log "strip failed: packaging unstripped"
install -D -m 755 examples/mount.fuse.cachefs "$root/sbin/mount.fuse.cachefs"
install -D -m 644 packaging/systemd/cachefs@.service "$root/usr/lib/systemd/system/cachefs@.service"

mkdir -p "$root/usr/share/man/man1"
"$bin" man | gzip -9n >"$root/usr/share/man/man1/cachefs.1.gz"
install -d "$root/usr/share/bash-completion/completions" \
  "$root/usr/share/zsh/vendor-completions" "$root/usr/share/fish/vendor_completions.d"
"$bin" completions bash >"$root/usr/share/bash-completion/completions/cachefs"
"$bin" completions zsh >"$root/usr/share/zsh/vendor-completions/_cachefs"
"$bin" completions fish >"$root/usr/share/fish/vendor_completions.d/cachefs.fish"

doc="$root/usr/share/doc/cachefs"
install -d "$doc/examples/systemd/apache2.service.d"
install -m 644 README.md docs/PRODUCTION.md docs/SEMANTICS.md docs/CACHE.md docs/METRICS.md \
  docs/BAD_INPUT.md "$doc/"
install -m 644 examples/README.md "$doc/examples/"
install -m 644 packaging/cachefs-NAME.conf "$doc/examples/"
install -m 644 examples/systemd/*.service "$doc/examples/systemd/"
install -m 644 examples/systemd/apache2.service.d/cachefs-uploads.conf \
  "$doc/examples/systemd/apache2.service.d/"
{
  echo "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"
  echo "Upstream-Name: cachefs"
  echo
  echo "Files: *"
  echo "Copyright: The cachefs developers"
  echo "License: MIT or Apache-2.0"
  echo " The Apache License 2.0 is in /usr/share/common-licenses/Apache-2.0."
  echo " The MIT license:"
  echo " ."
  sed -e 's/^$/./' -e 's/^/ /' LICENSE-MIT
} >"$doc/copyright"
{
  echo "cachefs ($version-$revision) unstable; urgency=medium"
  echo
  echo "  * Built from $(git rev-parse --short HEAD 2>/dev/null || echo 'a source tree') by scripts/package-deb.sh."
  echo
  echo " -- $maintainer  $(date -R -d "@$(git log -1 --format=%ct 2>/dev/null || date +%s)")"
} | gzip -9n >"$doc/changelog.Debian.gz"

# Depends: the shared libraries the binary links (dpkg-shlibdeps wants a
# debian/control to run from), else libc6 without a version.
depends="libc6"
if command -v dpkg-shlibdeps >/dev/null; then
  tmp="$(mktemp -d)"
  mkdir -p "$tmp/debian"
  printf 'Source: cachefs\n\nPackage: cachefs\nArchitecture: any\n' >"$tmp/debian/control"
  if shlibs="$(cd "$tmp" && dpkg-shlibdeps -O "$REPO_ROOT/$root/usr/bin/cachefs" 2>/dev/null)"; then
    depends="${shlibs#shlibs:Depends=}"
  fi
  rm -rf "$tmp"
fi
# The helper runs awk and setsid (util-linux, essential) under /bin/sh.
depends="${depends:+$depends, }mawk | awk"

cat >"$root/DEBIAN/control" <<EOF
Package: cachefs
Version: $version-$revision
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $(du -sk --exclude=DEBIAN "$root" | cut -f1)
Depends: $depends
Recommends: fuse3
Suggests: rclone
Section: utils
Priority: optional
Description: FUSE cache directory in front of a slow directory (rclone, NFS)
 cachefs mounts a merged view of a slow directory (src, e.g. an rclone mount
 of a bucket) and a fast local cache directory (dst). Files are copied into
 dst on first open; every change happens in dst and, with -w, is written back
 to src in the background from a durable journal. A drop-in replacement for
 GoCacheFS (the same flags).
 .
 Includes the mount.fuse.cachefs helper for fstab, a systemd template unit
 (cachefs@NAME, configured in /etc/cachefs/NAME.conf), the man page and
 shell completions.
EOF

for s in postinst postrm; do
  cat >"$root/DEBIAN/$s" <<'EOF'
#!/bin/sh
set -e
# Let systemd see the template unit come or go; nothing is enabled or started.
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload >/dev/null 2>&1 || true
fi
EOF
  chmod 755 "$root/DEBIAN/$s"
done

(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z |
  xargs -0 md5sum) >"$root/DEBIAN/md5sums"

dpkg-deb --root-owner-group -Zxz --build "$root" "$out/$name.deb" >/dev/null
rm -rf "$root"
log "built $out/$name.deb"
dpkg-deb --info "$out/$name.deb" | sed -n '/Package:/,/Description:/p' >&2
echo "$out/$name.deb"
