//! The per-session send rate (`--send-rate`, messages per minute): a token bucket, full
//! at `rate`, refilled continuously. WhatsApp bans numbers that flood; a 429 with
//! `Retry-After` is cheaper than a banned bot.

use std::time::{Duration, Instant};

use dashmap::DashMap;

/// One bucket per session.
pub struct SendLimit {
    per_minute: f64,
    buckets: DashMap<String, (f64, Instant)>,
}

impl SendLimit {
    /// `per_minute` sends a minute, with bursts of as many.
    pub fn new(per_minute: u32) -> SendLimit {
        SendLimit {
            per_minute: f64::from(per_minute.max(1)),
            buckets: DashMap::new(),
        }
    }

    /// Takes one send for `user_id` at `now`; `Err(wait)` until one is available.
    pub fn take(&self, user_id: &str, now: Instant) -> Result<(), Duration> {
        let mut bucket = self
            .buckets
            .entry(user_id.to_string())
            .or_insert((self.per_minute, now));
        let (tokens, last) = *bucket;
        let refilled = (tokens + now.duration_since(last).as_secs_f64() * self.per_minute / 60.0)
            .min(self.per_minute);
        if refilled >= 1.0 {
            *bucket = (refilled - 1.0, now);
            Ok(())
        } else {
            *bucket = (refilled, now);
            Err(Duration::from_secs_f64(
                (1.0 - refilled) * 60.0 / self.per_minute,
            ))
        }
    }

    /// Forgets a deleted session's bucket.
    pub fn forget(&self, user_id: &str) {
        self.buckets.remove(user_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_per_interval() {
        let limit = SendLimit::new(6); // one every 10 s
        let t0 = Instant::now();
        for _ in 0..6 {
            assert!(limit.take("u", t0).is_ok());
        }
        let wait = limit.take("u", t0).unwrap_err();
        assert!((wait.as_secs_f64() - 10.0).abs() < 0.01, "{wait:?}");
        assert!(limit.take("u", t0 + Duration::from_secs(5)).is_err());
        assert!(limit.take("u", t0 + Duration::from_secs(11)).is_ok());
        // Sessions have their own buckets.
        assert!(limit.take("other", t0).is_ok());
    }
}
