//! Client-side pacing for the crawler: request and token rate limits, retry back-off, and the
//! `Retry-After` header.
//!
//! The limiter is a token bucket of depth one request (GCRA, "virtual scheduling"): each start
//! is at least 60/rpm s after the previous one, so no 60 s window ever holds more than rpm
//! starts, and an idle spell does not bank a burst. Tokens are paced the same way on an estimate
//! made before the request; when the reply reports `usage`, the difference is settled, so the
//! long-run rate is the real one.

use rand::{Rng, RngExt};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Shared rpm/tpm pacer. Times are seconds since `origin`.
pub struct Limiter {
    origin: Instant,
    /// Seconds per request and per token (0 when unlimited).
    per_request: f64,
    per_token: f64,
    /// Earliest next start allowed by each budget.
    next: Mutex<(f64, f64)>,
}

impl Limiter {
    /// `rpm` requests and `tpm` tokens per minute; `None` (or ≤ 0) is unlimited.
    pub fn new(rpm: Option<f64>, tpm: Option<f64>) -> Self {
        let per = |x: Option<f64>| match x {
            Some(r) if r > 0.0 => 60.0 / r,
            _ => 0.0,
        };
        Limiter {
            origin: Instant::now(),
            per_request: per(rpm),
            per_token: per(tpm),
            next: Mutex::new((0.0, 0.0)),
        }
    }

    /// Reserve the next start for a request expected to use `est_tokens`; returns how long to wait.
    /// Reservations are taken in call order, so concurrent workers queue fairly.
    pub fn reserve(&self, est_tokens: u64) -> Duration {
        let now = self.origin.elapsed().as_secs_f64();
        let mut g = self.next.lock().unwrap();
        let start = now.max(g.0).max(g.1);
        g.0 = start + self.per_request;
        g.1 = start + self.per_token * est_tokens as f64;
        Duration::from_secs_f64(start - now)
    }

    /// Hold every start for at least `d` from now (a server's `Retry-After` applies to all workers).
    pub fn pause_for(&self, d: Duration) {
        let until = self.origin.elapsed().as_secs_f64() + d.as_secs_f64();
        let mut g = self.next.lock().unwrap();
        g.0 = g.0.max(until);
        g.1 = g.1.max(until);
    }

    /// Correct the token budget once the real count is known (`actual − estimated` tokens).
    pub fn settle(&self, delta_tokens: i64) {
        if self.per_token > 0.0 {
            let mut g = self.next.lock().unwrap();
            g.1 += self.per_token * delta_tokens as f64;
        }
    }
}

/// Back-off before retry number `attempt` (0-based): `base·2^attempt` capped at `cap`, then
/// "equal jitter" (uniform in [d/2, d]) so that workers hit by the same outage do not retry in step.
pub fn backoff(attempt: u32, base: Duration, cap: Duration, rng: &mut impl Rng) -> Duration {
    let d = base
        .saturating_mul(1u32 << attempt.min(20))
        .min(cap)
        .as_secs_f64();
    Duration::from_secs_f64(rng.random_range(d / 2.0..=d))
}

/// Wait asked by a response: `retry-after-ms` (milliseconds, sent by OpenAI), else `Retry-After`
/// as delta-seconds or an HTTP-date (RFC 9110 §10.2.3). Unparseable values are ignored.
pub fn retry_after(retry_after_ms: Option<&str>, retry_after: Option<&str>) -> Option<Duration> {
    if let Some(ms) = retry_after_ms.and_then(|v| v.trim().parse::<f64>().ok())
        && ms.is_finite()
        && ms >= 0.0
    {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    let v = retry_after?.trim();
    if let Ok(s) = v.parse::<f64>() {
        return (s.is_finite() && s >= 0.0).then(|| Duration::from_secs_f64(s));
    }
    let at = parse_http_date(v)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
    Some(Duration::from_secs(at.saturating_sub(now)))
}

/// Unix seconds of an IMF-fixdate such as `Sun, 06 Nov 1994 08:49:37 GMT`.
pub fn parse_http_date(s: &str) -> Option<u64> {
    let parts: Vec<&str> = s.split_whitespace().collect();
    let [_, day, mon, year, hms, "GMT"] = parts.as_slice() else {
        return None;
    };
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let m = MONTHS.iter().position(|x| x == mon)? as i64 + 1;
    let d: i64 = day.parse().ok()?;
    let y: i64 = year.parse().ok()?;
    let t: Vec<i64> = hms
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let [hh, mm, ss] = t.as_slice() else {
        return None;
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y2, m2) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * m2 + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    u64::try_from(secs).ok()
}

/// Token estimate when a server reports no `usage`: one per CJK character (what BPE vocabularies
/// without Chinese merges spend, an upper-side guess) and one per four other bytes.
pub fn estimate_tokens(text: &str) -> u64 {
    let (mut cjk, mut other) = (0u64, 0u64);
    for c in text.chars() {
        if (c as u32) >= 0x2E80 {
            cjk += 1;
        } else {
            other += c.len_utf8() as u64;
        }
    }
    cjk + other.div_ceil(4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn http_dates() {
        // Reference values from `date -u -d '...' +%s`.
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784111777)
        );
        assert_eq!(parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(
            parse_http_date("Tue, 29 Feb 2028 23:59:59 GMT"),
            Some(1835481599)
        );
        assert_eq!(parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT"), None);
        assert_eq!(parse_http_date("garbage"), None);
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(retry_after(None, Some("2")), Some(Duration::from_secs(2)));
        assert_eq!(
            retry_after(None, Some(" 0.5 ")),
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            retry_after(Some("250"), Some("9")),
            Some(Duration::from_millis(250))
        );
        assert_eq!(retry_after(None, Some("-1")), None);
        assert_eq!(retry_after(None, Some("soon")), None);
        assert_eq!(
            retry_after(None, Some("Thu, 01 Jan 1970 00:00:00 GMT")),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after(None, None), None);
    }

    #[test]
    fn backoff_doubles_within_jitter_and_caps() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(2);
        for attempt in 0..8 {
            let full = (0.1 * 2f64.powi(attempt as i32)).min(2.0);
            for _ in 0..50 {
                let d = backoff(attempt, base, cap, &mut rng).as_secs_f64();
                assert!(d >= full / 2.0 - 1e-9 && d <= full + 1e-9, "{attempt}: {d}");
            }
        }
        // Huge attempt numbers must not overflow.
        assert!(backoff(1000, base, cap, &mut rng) <= cap);
    }

    /// Reservations, not sleeps: the schedule handed out is spaced by 60/rpm, and by
    /// tokens·60/tpm, each against the later of the two budgets.
    #[test]
    fn limiter_schedule() {
        let l = Limiter::new(Some(600.0), None); // 0.1 s apart
        let waits: Vec<f64> = (0..5).map(|_| l.reserve(0).as_secs_f64()).collect();
        for (i, w) in waits.iter().enumerate() {
            // Reserving takes microseconds; 5 ms absorbs that and scheduler noise.
            assert!((w - 0.1 * i as f64).abs() < 5e-3, "{waits:?}");
        }
        let l = Limiter::new(None, Some(6000.0)); // 100 tokens per second
        assert!(l.reserve(50).as_secs_f64() < 5e-3);
        assert!((l.reserve(50).as_secs_f64() - 0.5).abs() < 5e-3);
        // The second request really used 150 tokens, not 50: the next start moves out by 1 s.
        l.settle(100);
        assert!((l.reserve(0).as_secs_f64() - 2.0).abs() < 5e-3);
        let unlimited = Limiter::new(None, None);
        assert_eq!(unlimited.reserve(1_000_000), Duration::ZERO);
    }

    #[test]
    fn token_estimate() {
        assert_eq!(estimate_tokens(""), 0);
        assert_eq!(estimate_tokens("你好"), 2);
        assert_eq!(estimate_tokens("hello world!"), 3);
        assert_eq!(estimate_tokens("写code"), 2);
    }
}
