//! When to try again: one backoff for every retry in the client and the mirror. Exponential from
//! [`BASE`] to [`MAX_DELAY`], jittered (so clients that failed together do not come back
//! together), and never sooner than a server's `Retry-After` (seconds or an HTTP date).

use std::time::{Duration, SystemTime};

/// The first retry's delay (before jitter).
pub const BASE: Duration = Duration::from_millis(200);
/// The longest delay between two tries.
pub const MAX_DELAY: Duration = Duration::from_secs(10);
/// The longest `Retry-After` honoured: a server asking for more is an error now, not a wait.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(120);

/// The delay before retry number `failure` (1 for the first retry): `BASE * 2^(failure-1)` capped
/// at [`MAX_DELAY`], a uniformly random point in its upper half, at least `retry_after`.
pub fn delay(failure: u32, retry_after: Option<Duration>) -> Duration {
    jittered(failure, retry_after, fastrand::f64())
}

fn jittered(failure: u32, retry_after: Option<Duration>, random: f64) -> Duration {
    let exp = BASE.saturating_mul(1u32 << failure.saturating_sub(1).min(16)).min(MAX_DELAY);
    let d = exp / 2 + exp.mul_f64(random.clamp(0.0, 1.0)) / 2;
    retry_after.map_or(d, |a| d.max(a))
}

/// A `Retry-After` header's value: delay-seconds or an HTTP date (RFC 9110 10.2.3), as a delay
/// from `now`. A date in the past is no wait; anything else unreadable is ignored.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_are_capped_and_jittered_within_their_upper_half() {
        assert_eq!(jittered(1, None, 0.0), Duration::from_millis(100));
        assert_eq!(jittered(1, None, 1.0), Duration::from_millis(200));
        assert_eq!(jittered(3, None, 1.0), Duration::from_millis(800));
        assert_eq!(jittered(40, None, 1.0), MAX_DELAY);
        assert_eq!(jittered(40, None, 0.0), MAX_DELAY / 2);
        // A server's Retry-After is the least we wait.
        assert_eq!(jittered(1, Some(Duration::from_secs(7)), 1.0), Duration::from_secs(7));
        let spread: std::collections::HashSet<Duration> = (0..50).map(|_| delay(4, None)).collect();
        assert!(spread.len() > 1, "jittered");
        assert!(spread.iter().all(|d| *d >= Duration::from_millis(800) && *d <= Duration::from_millis(1600)));
    }

    #[test]
    fn retry_after_takes_seconds_and_http_dates() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-3", now), None);
    }
}
