//! The restart policy: OTP-style intensity (at most N restarts in a window) plus
//! exponential backoff with jitter, reset after stable uptime.
//!
//! It is a pure function of (history, now, uptime, random draw) so it can be tested
//! without actors, clocks or sleeping.

use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

/// Tunables of the restart policy; every field comes from a CLI flag.
#[derive(Debug, Clone, PartialEq)]
pub struct RestartPolicy {
    /// At most this many automatic restarts inside `window`; the next crash fails the session.
    pub max_restarts: u32,
    /// The sliding window the restart budget is counted over.
    pub window: Duration,
    /// Delay before the first restart.
    pub backoff_initial: Duration,
    /// Upper bound of any delay, jitter included.
    pub backoff_max: Duration,
    /// Growth factor between consecutive restarts.
    pub backoff_multiplier: f64,
    /// Proportional jitter: the delay is scaled by a factor drawn from `[1-j, 1+j]`.
    pub backoff_jitter: f64,
    /// A child that stayed up this long resets the backoff to `backoff_initial`.
    pub backoff_reset_after: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            max_restarts: 5,
            window: Duration::from_secs(60),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            backoff_multiplier: 2.0,
            backoff_jitter: 0.2,
            backoff_reset_after: Duration::from_secs(60),
        }
    }
}

/// What a session has been through: restarts inside the window and the backoff step.
#[derive(Debug, Clone, Default)]
pub struct RestartHistory {
    restarts: VecDeque<Instant>,
    consecutive: u32,
}

impl RestartHistory {
    /// Forget everything (a user's `start` gives the session a fresh budget).
    pub fn reset(&mut self) {
        self.restarts.clear();
        self.consecutive = 0;
    }

    /// Restarts currently counted inside the window (as of the last decision).
    pub fn in_window(&self) -> usize {
        self.restarts.len()
    }
}

/// The policy's answer to a crash.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// Restart after this delay.
    Restart {
        /// Backoff before the new child is spawned.
        delay: Duration,
    },
    /// The budget is spent: put the session in `failed`.
    GiveUp,
}

impl RestartPolicy {
    /// Decides what to do about a crash at `now` of a child that had been up for `uptime`.
    /// `draw` is a uniform random number in `[0, 1)` used for jitter.
    pub fn on_crash(
        &self,
        history: &mut RestartHistory,
        now: Instant,
        uptime: Duration,
        draw: f64,
    ) -> Decision {
        if uptime >= self.backoff_reset_after {
            history.consecutive = 0;
        }
        while let Some(first) = history.restarts.front() {
            if now.saturating_duration_since(*first) >= self.window {
                history.restarts.pop_front();
            } else {
                break;
            }
        }
        if history.restarts.len() >= self.max_restarts as usize {
            return Decision::GiveUp;
        }
        history.restarts.push_back(now);
        let delay = self.backoff(history.consecutive, draw);
        history.consecutive = history.consecutive.saturating_add(1);
        Decision::Restart { delay }
    }

    /// The delay before restart number `step` (0-based), with jitter from `draw`.
    pub fn backoff(&self, step: u32, draw: f64) -> Duration {
        let base = self.backoff_initial.as_secs_f64()
            * self.backoff_multiplier.powi(step.min(1_000) as i32);
        let jitter = self.backoff_jitter.clamp(0.0, 1.0);
        let factor = 1.0 + jitter * (2.0 * draw.clamp(0.0, 1.0) - 1.0);
        let secs = (base.min(self.backoff_max.as_secs_f64()) * factor)
            .clamp(0.0, self.backoff_max.as_secs_f64());
        Duration::from_secs_f64(secs)
    }
}

/// A small deterministic random source (SplitMix64) for jitter; seedable for tests.
#[derive(Debug, Clone)]
pub struct Jitter(u64);

impl Jitter {
    /// A source with a fixed seed.
    pub fn seeded(seed: u64) -> Self {
        Jitter(seed)
    }

    /// A source seeded from the clock and the process id.
    pub fn from_entropy() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Jitter(nanos ^ ((std::process::id() as u64) << 32))
    }

    /// The next uniform draw in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RestartPolicy {
        RestartPolicy {
            max_restarts: 3,
            window: Duration::from_secs(60),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(4),
            backoff_multiplier: 2.0,
            backoff_jitter: 0.0,
            backoff_reset_after: Duration::from_secs(30),
        }
    }

    fn delay(d: Decision) -> Duration {
        match d {
            Decision::Restart { delay } => delay,
            Decision::GiveUp => panic!("expected a restart"),
        }
    }

    #[test]
    fn backoff_grows_exponentially_and_is_capped() {
        let p = RestartPolicy {
            max_restarts: 100,
            ..policy()
        };
        let mut h = RestartHistory::default();
        let t = Instant::now();
        let got: Vec<u128> = (0..5)
            .map(|i| {
                delay(p.on_crash(&mut h, t + Duration::from_millis(i), Duration::ZERO, 0.5))
                    .as_millis()
            })
            .collect();
        assert_eq!(got, vec![500, 1000, 2000, 4000, 4000]);
    }

    #[test]
    fn n_restarts_fit_in_the_window_and_the_next_crash_gives_up() {
        let p = policy();
        let mut h = RestartHistory::default();
        let t = Instant::now();
        for i in 0..3 {
            assert!(matches!(
                p.on_crash(&mut h, t + Duration::from_secs(i), Duration::ZERO, 0.5),
                Decision::Restart { .. }
            ));
        }
        assert_eq!(
            p.on_crash(&mut h, t + Duration::from_secs(4), Duration::ZERO, 0.5),
            Decision::GiveUp
        );
    }

    #[test]
    fn restarts_older_than_the_window_stop_counting() {
        let p = policy();
        let mut h = RestartHistory::default();
        let t = Instant::now();
        for i in 0..3 {
            p.on_crash(&mut h, t + Duration::from_secs(i), Duration::ZERO, 0.5);
        }
        let later = t + Duration::from_secs(61);
        assert!(matches!(
            p.on_crash(&mut h, later, Duration::ZERO, 0.5),
            Decision::Restart { .. }
        ));
        assert_eq!(h.in_window(), 2);
    }

    #[test]
    fn stable_uptime_resets_the_backoff_but_not_the_budget() {
        let p = policy();
        let mut h = RestartHistory::default();
        let t = Instant::now();
        p.on_crash(&mut h, t, Duration::ZERO, 0.5);
        assert_eq!(
            delay(p.on_crash(&mut h, t, Duration::ZERO, 0.5)),
            Duration::from_secs(1)
        );
        let d = delay(p.on_crash(&mut h, t, Duration::from_secs(31), 0.5));
        assert_eq!(d, Duration::from_millis(500));
        assert_eq!(
            p.on_crash(&mut h, t, Duration::from_secs(31), 0.5),
            Decision::GiveUp
        );
    }

    #[test]
    fn jitter_stays_within_its_fraction_and_the_cap() {
        let p = RestartPolicy {
            backoff_jitter: 0.2,
            ..policy()
        };
        assert_eq!(p.backoff(0, 0.0), Duration::from_millis(400));
        assert_eq!(p.backoff(0, 1.0), Duration::from_millis(600));
        assert_eq!(p.backoff(10, 1.0), Duration::from_secs(4));
        let mut j = Jitter::seeded(7);
        for _ in 0..1000 {
            let d = p.backoff(1, j.next_f64());
            assert!(
                d >= Duration::from_millis(800) && d <= Duration::from_millis(1200),
                "{d:?}"
            );
        }
    }

    #[test]
    fn zero_budget_fails_on_first_crash() {
        let p = RestartPolicy {
            max_restarts: 0,
            ..policy()
        };
        let mut h = RestartHistory::default();
        assert_eq!(
            p.on_crash(&mut h, Instant::now(), Duration::ZERO, 0.5),
            Decision::GiveUp
        );
    }
}
