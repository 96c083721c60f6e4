#!/usr/bin/env bash
# Try the Debian package the way a user would, without changing this machine:
# `apt-get install` it into a throwaway overlay of the root filesystem (in a private
# mount namespace, as root), check `cachefs --version`, `man cachefs`, the bash
# completion, a mount through `mount -t fuse.cachefs` with the installed helper
# (read through it, write back to src, umount), one through an /etc/fstab line
# (`mount MOUNTPOINT`), then `apt-get remove --purge` it
# and throw the overlay away. Files already on the machine (say another
# /sbin/mount.fuse.cachefs) are never touched.
#
# Usage: scripts/deb-try.sh target/deb/cachefs_VERSION_ARCH.deb
set -euo pipefail
[[ $# -eq 1 && -f "$1" ]] || { echo "usage: $0 PACKAGE.deb" >&2; exit 2; }
[[ $(id -u) -eq 0 ]] || { echo "$0: needs root (mount namespaces, overlayfs, chroot)" >&2; exit 2; }
deb="$(realpath "$1")"
work="$(mktemp -d /tmp/cachefs-deb-try.XXXXXX)"
trap 'rmdir "$work" 2>/dev/null || true' EXIT
# shellcheck disable=SC2016 # expanded by the inner bash
unshare --mount --propagation private bash -euo pipefail -c '
work=$1 deb=$2
mount -t tmpfs -o size=512m tmpfs "$work"
mkdir "$work"/upper "$work"/ovlwork "$work"/root
mount -t overlay overlay -o "lowerdir=/,upperdir=$work/upper,workdir=$work/ovlwork" "$work/root"
for d in proc sys dev; do mount --rbind "/$d" "$work/root/$d"; done
mount -t tmpfs tmpfs "$work/root/run"
cp "$deb" "$work/root/tmp/"
run() { echo "# $*"; chroot "$work/root" "$@"; }
run sh -c "ls -l /usr/bin/cachefs 2>&1 || true"
run apt-get install -y --no-install-recommends "/tmp/$(basename "$deb")"
run dpkg -L cachefs
run cachefs --version
run sh -c "MANWIDTH=80 man cachefs 2>&1 | head -25"
run sh -c "MANWIDTH=80 man cachefs | grep -A3 ^SIGNALS"
run sh -c "ls -l /sbin/mount.fuse.cachefs /usr/lib/systemd/system/cachefs@.service /usr/share/bash-completion/completions/cachefs"
run bash -c ". /usr/share/bash-completion/bash_completion 2>/dev/null; . /usr/share/bash-completion/completions/cachefs; COMP_WORDS=(cachefs --reval); COMP_CWORD=1; _cachefs cachefs --reval cachefs 2>/dev/null || true; echo completion: \${COMPREPLY[*]}"
run mkdir -p /srv/demo/src /srv/demo/dst /srv/demo/mnt
run sh -c "echo hello from src > /srv/demo/src/hello.txt"
run env -u CACHEFS_BIN PATH=/usr/sbin:/usr/bin:/sbin:/bin mount -t fuse.cachefs /srv/demo/src /srv/demo/mnt -o dst=/srv/demo/dst,w,logfile=/srv/demo/cachefs.log
run findmnt /srv/demo/mnt
run sh -c "ps -o pid,args -C cachefs | grep /srv/demo"
run cat /srv/demo/mnt/hello.txt
run sh -c "echo written through the mount > /srv/demo/mnt/new.txt"
sleep 2
run cat /srv/demo/src/new.txt
run umount /srv/demo/mnt
for i in $(seq 50); do grep -q "cachefs exiting" "$work/root/srv/demo/cachefs.log" && break; sleep 0.2; done
run cat /srv/demo/cachefs.log
run sh -c "findmnt /srv/demo/mnt || echo not mounted"
# The same through /etc/fstab (in the overlay), as the fstab example in the docs does.
run mkdir -p /srv/demo/fstab-dst /srv/demo/fstab-mnt
run sh -c "echo /srv/demo/src /srv/demo/fstab-mnt fuse.cachefs dst=/srv/demo/fstab-dst,nofail,logfile=/srv/demo/fstab.log 0 0 >> /etc/fstab"
run env -u CACHEFS_BIN PATH=/usr/sbin:/usr/bin:/sbin:/bin mount /srv/demo/fstab-mnt
run findmnt /srv/demo/fstab-mnt
run cat /srv/demo/fstab-mnt/hello.txt
run umount /srv/demo/fstab-mnt
run apt-get remove -y --purge cachefs
run sh -c "dpkg -l cachefs 2>&1 | tail -1; ls /usr/bin/cachefs /sbin/mount.fuse.cachefs /usr/lib/systemd/system/cachefs@.service 2>&1 || true"
umount -R "$work/root"
umount -R "$work"
' _ "$work" "$deb"
