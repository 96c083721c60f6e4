//! `/proc/self/mountinfo`, the kernel's mount table: its field escapes. Used by the
//! command line (is the mountpoint already mounted?), the daemon and `cachefs warmup`
//! (which mount is this path under?). This module uses no other module of cachefs.

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
    fn octal_escapes_are_undone() {
        assert_eq!(unescape("/a\\040b\\134c\\011"), b"/a b\\c\t");
        assert_eq!(unescape("/plain\\"), b"/plain\\");
        assert_eq!(unescape("/x\\09"), b"/x\\09");
    }
}
