//! Retry policy: exponential backoff with jitter, capped, and the park interval of ops
//! that exhausted their attempts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// No single wait is longer than this.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// The first retry of a parked (failed) op waits at least this long; later ones wait
/// twice as long as the one before, up to [`MAX_BACKOFF`].
pub(crate) const MIN_PARK: Duration = Duration::from_secs(5);

static RNG: AtomicU64 = AtomicU64::new(0);

/// A cheap pseudo-random u64 (splitmix64 over a time-seeded counter). Only for jitter.
pub(crate) fn rand_u64() -> u64 {
    let mut s = RNG.load(Ordering::Relaxed);
    if s == 0 {
        s = crate::sys::clock::now_nanos() | 1;
    }
    let next = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
    RNG.store(next, Ordering::Relaxed);
    let mut z = next;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `base * 2^(attempt-1)`, capped at [`MAX_BACKOFF`].
pub(crate) fn exp(base: Duration, attempt: u32) -> Duration {
    let shift = attempt.saturating_sub(1).min(30);
    base.checked_mul(1u32 << shift)
        .unwrap_or(MAX_BACKOFF)
        .min(MAX_BACKOFF)
}

/// Wait before attempt `attempt + 1` after `attempt` failed: exponential, +-25% jitter.
pub(crate) fn backoff(base: Duration, attempt: u32) -> Duration {
    let d = exp(base, attempt);
    let nanos = d.as_nanos() as u64;
    if nanos < 4 {
        return d;
    }
    let jitter = rand_u64() % (nanos / 2);
    Duration::from_nanos(nanos - nanos / 4 + jitter).min(MAX_BACKOFF)
}

/// How long a parked op waits before its next retry, after `parked_failures` failed
/// retries since it was parked (0 when it is parked): `max(base, MIN_PARK) * 2^k`, capped
/// at [`MAX_BACKOFF`]. With the default `-retry-delay 0`: 5 s, 10 s, 20 s, ... 5 min.
pub(crate) fn park_interval(base: Duration, parked_failures: u32) -> Duration {
    exp(base.max(MIN_PARK), parked_failures + 1).min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_with_bounded_jitter_and_cap() {
        let b = Duration::from_millis(100);
        assert_eq!(exp(b, 1), b);
        assert_eq!(exp(b, 4), Duration::from_millis(800));
        assert_eq!(exp(b, 40), MAX_BACKOFF);
        for a in 1..6 {
            let d = backoff(b, a);
            let e = exp(b, a);
            assert!(d >= e * 3 / 4 && d <= e * 5 / 4, "{d:?} vs {e:?}");
        }
        assert_eq!(backoff(Duration::ZERO, 3), Duration::ZERO);
        assert_eq!(park_interval(Duration::ZERO, 0), MIN_PARK);
        assert_eq!(park_interval(Duration::ZERO, 1), MIN_PARK * 2);
        assert_eq!(park_interval(Duration::ZERO, 3), MIN_PARK * 8);
        assert_eq!(park_interval(Duration::ZERO, 40), MAX_BACKOFF);
        assert_eq!(
            park_interval(Duration::from_secs(60), 0),
            Duration::from_secs(60)
        );
        assert_eq!(park_interval(Duration::from_secs(60), 5), MAX_BACKOFF);
    }
}
