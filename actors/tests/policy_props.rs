//! Property tests of the restart policy: for any tunables, any history of crashes and any
//! clock, the decisions respect the restart budget, the window and the backoff bounds.

use std::time::Duration;

use botvisor_actors::policy::{Decision, RestartHistory, RestartPolicy};
use proptest::prelude::*;
use tokio::time::Instant;

fn policies() -> impl Strategy<Value = RestartPolicy> {
    (
        0u32..8,
        1u64..20_000,
        0u64..2_000,
        0u64..30_000,
        1.0f64..4.0,
        0.0f64..=1.0,
        0u64..60_000,
    )
        .prop_map(
            |(max, window, initial, extra, mult, jitter, reset)| RestartPolicy {
                max_restarts: max,
                window: Duration::from_millis(window),
                backoff_initial: Duration::from_millis(initial),
                backoff_max: Duration::from_millis(initial + extra),
                backoff_multiplier: mult,
                backoff_jitter: jitter,
                backoff_reset_after: Duration::from_millis(reset),
            },
        )
}

/// A crash: time since the previous one, the child's uptime, the jitter draw.
fn crashes() -> impl Strategy<Value = Vec<(u64, u64, f64)>> {
    prop::collection::vec((0u64..10_000, 0u64..120_000, 0.0f64..1.0), 1..60)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn decisions_respect_budget_window_and_backoff_bounds(p in policies(), seq in crashes()) {
        let start = Instant::now();
        let mut history = RestartHistory::default();
        let mut now = start;
        let mut restarts_at: Vec<Instant> = Vec::new();
        for (gap, uptime, draw) in seq {
            now += Duration::from_millis(gap);
            let in_window = restarts_at
                .iter()
                .filter(|t| now.saturating_duration_since(**t) < p.window)
                .count();
            match p.on_crash(&mut history, now, Duration::from_millis(uptime), draw) {
                Decision::Restart { delay } => {
                    // Never past the budget inside the window.
                    prop_assert!(in_window < p.max_restarts as usize,
                        "restart {} in the window with a budget of {}", in_window + 1, p.max_restarts);
                    // Never longer than the cap, never shorter than the first step's jitter floor.
                    prop_assert!(delay <= p.backoff_max, "{delay:?} > {:?}", p.backoff_max);
                    let floor = p.backoff_initial.min(p.backoff_max).as_secs_f64() * (1.0 - p.backoff_jitter);
                    prop_assert!(delay.as_secs_f64() + 1e-9 >= floor, "{delay:?} < {floor}");
                    restarts_at.push(now);
                }
                Decision::GiveUp => {
                    // Only when the budget is really spent.
                    prop_assert_eq!(in_window, p.max_restarts as usize);
                }
            }
            prop_assert!(history.in_window() <= p.max_restarts as usize);
        }
    }

    #[test]
    fn without_jitter_the_backoff_grows_and_caps(p in policies(), step in 0u32..2_000) {
        let p = RestartPolicy { backoff_jitter: 0.0, ..p };
        let d = p.backoff(step, 0.5);
        let next = p.backoff(step.saturating_add(1), 0.5);
        prop_assert!(next >= d, "{next:?} < {d:?} at step {step}");
        prop_assert!(next <= p.backoff_max);
    }
}
