//! `/proc/self/mountinfo`, the kernel's mount table: its field escapes. Used by the
//! command line (is the mountpoint already mounted?), the daemon and `cachefs warmup`
//! (which mount is this path under?). This module uses no other module of cachefs.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

/// One mount of the table: the fields cachefs reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// `major:minor` of the filesystem: the same for every mount of one superblock
    /// (a bind mount shares it with the mount it binds).
    pub device: String,
    /// Where it is mounted (unescaped).
    pub point: PathBuf,
    /// The filesystem type, e.g. `fuse.cachefs`.
    pub fstype: String,
    /// The mount source (cachefs's is `cachefs:SRC`).
    pub source: String,
}

/// The mounts of a mountinfo text, in its order (lines that do not parse are skipped).
pub fn mounts(info: &str) -> impl Iterator<Item = Mount> + '_ {
    info.lines().filter_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut fields = left.split(' ');
        let device = fields.nth(2)?.to_string();
        let point = PathBuf::from(OsStr::from_bytes(&unescape(fields.nth(1)?)));
        let mut right = right.split(' ');
        let fstype = right.next()?.to_string();
        let source = right.next().unwrap_or("").to_string();
        Some(Mount {
            device,
            point,
            fstype,
            source,
        })
    })
}

/// Undo mountinfo's octal escapes (`\040` for space, `\011`, `\012`, `\134`).
pub fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        if let (b'\\', Some(d)) = (b[i], octal) {
            let v =
                u32::from(d[0] - b'0') * 64 + u32::from(d[1] - b'0') * 8 + u32::from(d[2] - b'0');
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_are_read_with_device_point_and_type() {
        let info = "36 35 98:0 /mnt1 /mnt/a\\040b rw,noatime master:1 - ext3 /dev/root rw\n\
                    40 36 0:52 / /srv/view rw shared:2 - fuse.cachefs uploads rw\n\
                    41 36 0:52 / /srv/second rw - fuse.cachefs uploads rw\n\
                    garbage\n";
        let all: Vec<Mount> = mounts(info).collect();
        assert_eq!(all.len(), 3);
        assert_eq!(all[0].point, PathBuf::from("/mnt/a b"));
        assert_eq!(
            (all[0].device.as_str(), all[0].fstype.as_str()),
            ("98:0", "ext3")
        );
        assert_eq!(all[1].device, all[2].device);
        assert_eq!(all[2].point, PathBuf::from("/srv/second"));
        assert_eq!(all[2].fstype, "fuse.cachefs");
        assert_eq!(
            (all[0].source.as_str(), all[2].source.as_str()),
            ("/dev/root", "uploads")
        );
    }

    #[test]
    fn octal_escapes_are_undone() {
        assert_eq!(unescape("/a\\040b\\134c\\011"), b"/a b\\c\t");
        assert_eq!(unescape("/plain\\"), b"/plain\\");
        assert_eq!(unescape("/x\\09"), b"/x\\09");
    }
}
