//! Sizes on the command line and the budget arithmetic: how many bytes must leave dst
//! before (or without) a fetch, given `--cache-size` and `--min-free`.
//!
//! Units are binary (1K = 1024 bytes), as `du -h` and `df -h` print them: `500M`,
//! `20G`, `1T`, `1.5G`; an optional `B`/`iB` suffix is accepted (`20GiB`, `20GB`).
//! A plain number is bytes.

use std::fmt;

pub use crate::config::MinFree;

impl fmt::Display for MinFree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MinFree::Bytes(b) => write!(f, "{}", human(*b)),
            MinFree::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// Parses `20G`, `500M`, `1T`, `1.5G`, `4096`, `20GiB`. Errors are short phrases for
/// the CLI's one-line messages.
pub fn parse_size(v: &str) -> Result<u64, String> {
    let t = v.trim();
    let lower = t.to_ascii_lowercase();
    let body = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (num, mult) = match body.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c {
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                'p' => 1 << 50,
                _ => return Err(format!("unknown unit '{c}' (use K, M, G or T)")),
            };
            (&body[..i], m)
        }
        _ => (body, 1),
    };
    let n: f64 = num.trim().parse().map_err(|_| "not a size".to_string())?;
    if !n.is_finite() || n < 0.0 {
        return Err("not a size".into());
    }
    let bytes = n * mult as f64;
    if bytes >= u64::MAX as f64 {
        return Err("too large".into());
    }
    Ok(bytes as u64)
}

/// Parses `--min-free`: a size (`10G`) or a percentage (`5%`, 0 < p < 100).
pub fn parse_min_free(v: &str) -> Result<MinFree, String> {
    match v.trim().strip_suffix('%') {
        Some(p) => match p.trim().parse::<f64>() {
            Ok(p) if p > 0.0 && p < 100.0 => Ok(MinFree::Percent(p)),
            _ => Err("not a percentage between 0 and 100".into()),
        },
        None => parse_size(v).map(MinFree::Bytes),
    }
}

/// `1536` -> `1.5K`, for log lines and status.
pub fn human(b: u64) -> String {
    const UNITS: [&str; 6] = ["", "K", "M", "G", "T", "P"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b}")
    } else if v >= 10.0 || v.fract() == 0.0 {
        format!("{v:.0}{}", UNITS[u])
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

/// The two limits on dst.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    /// `--cache-size`: most bytes cachefs's files may occupy in dst.
    pub budget: Option<u64>,
    /// `--min-free`.
    pub min_free: Option<MinFree>,
}

/// dst's filesystem: available bytes (for unprivileged writers, `f_bavail`) and size.
#[derive(Debug, Clone, Copy)]
pub struct Space {
    pub avail: u64,
    pub total: u64,
}

impl Space {
    pub fn of(st: &libc::statvfs) -> Space {
        let frsize = if st.f_frsize > 0 {
            st.f_frsize
        } else {
            st.f_bsize
        };
        Space {
            avail: st.f_bavail.saturating_mul(frsize),
            total: st.f_blocks.saturating_mul(frsize),
        }
    }
}

impl Limits {
    pub fn any(&self) -> bool {
        self.budget.is_some() || self.min_free.is_some()
    }

    /// Bytes to free before `incoming` more bytes may be written into a cache that
    /// uses `usage` bytes, on a filesystem with `space` (0: nothing to do).
    pub fn excess(&self, usage: u64, incoming: u64, space: Option<Space>) -> u64 {
        let mut need = 0;
        if let Some(b) = self.budget {
            need = (usage + incoming).saturating_sub(b);
        }
        if let (Some(m), Some(s)) = (self.min_free, space) {
            let want = m.bytes_of(s.total) + incoming;
            need = need.max(want.saturating_sub(s.avail));
        }
        need
    }
}

/// What a file of `size` bytes will occupy (whole 4 KiB blocks).
pub fn on_disk(size: u64) -> u64 {
    size.div_ceil(4096) * 4096
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("500M"), Ok(500 << 20));
        assert_eq!(parse_size("20G"), Ok(20 << 30));
        assert_eq!(parse_size("20g"), Ok(20 << 30));
        assert_eq!(parse_size("20GiB"), Ok(20 << 30));
        assert_eq!(parse_size("20GB"), Ok(20 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("1.5K"), Ok(1536));
        assert_eq!(parse_size("0"), Ok(0));
        for bad in ["", "G", "-1G", "10X", "ten", "1e400", "nan"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn min_free() {
        assert_eq!(parse_min_free("5%"), Ok(MinFree::Percent(5.0)));
        assert_eq!(parse_min_free("10G"), Ok(MinFree::Bytes(10 << 30)));
        for bad in ["0%", "100%", "x%", "%", "-5%"] {
            assert!(parse_min_free(bad).is_err(), "{bad}");
        }
        assert_eq!(MinFree::Percent(10.0).bytes_of(1000), 100);
        assert_eq!(MinFree::Percent(2.5).to_string(), "2.5%");
        assert_eq!(MinFree::Bytes(10 << 30).to_string(), "10G");
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(0), "0");
        assert_eq!(human(1536), "1.5K");
        assert_eq!(human(20 << 30), "20G");
        assert_eq!(human(15 << 20), "15M");
    }

    #[test]
    fn excess_from_both_limits() {
        let l = Limits {
            budget: Some(100),
            min_free: None,
        };
        assert_eq!(l.excess(50, 40, None), 0);
        assert_eq!(l.excess(90, 40, None), 30);
        let s = Space {
            avail: 300,
            total: 1000,
        };
        let l = Limits {
            budget: Some(1000),
            min_free: Some(MinFree::Percent(25.0)),
        };
        // Keep 250 free: 300 avail - 100 incoming = 200 -> free 50.
        assert_eq!(l.excess(10, 100, Some(s)), 50);
        assert_eq!(l.excess(10, 0, Some(s)), 0);
        let l = Limits {
            budget: Some(50),
            min_free: Some(MinFree::Bytes(250)),
        };
        assert_eq!(l.excess(100, 0, Some(s)), 50);
        assert!(!Limits::default().any());
    }

    #[test]
    fn block_rounding() {
        assert_eq!(on_disk(0), 0);
        assert_eq!(on_disk(1), 4096);
        assert_eq!(on_disk(4096), 4096);
        assert_eq!(on_disk(4097), 8192);
    }
}
