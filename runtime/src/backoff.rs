//! How long to wait before replacing an instance that exited on its own (pure).
//!
//! Kubernetes' CrashLoopBackOff starts at 10 s, doubles, caps at 5 min and resets after 10 min of running.
//! Locally we want a fixed app back at once, so the first replacement is immediate; then 500 ms doubling,
//! capped at 30 s, reset once an instance has stayed up 60 s. All four are [`BackoffPolicy`] fields.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// Delay of the second consecutive restart (the first is immediate).
    pub initial: Duration,
    /// Upper bound of the delay.
    pub max: Duration,
    /// An instance that ran at least this long before exiting resets the count.
    pub reset_after: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        BackoffPolicy {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
            reset_after: Duration::from_secs(60),
        }
    }
}

/// Consecutive crashes of one revision's instances.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestartBackoff {
    consecutive: u32,
}

impl RestartBackoff {
    /// Records an instance that exited on its own after running `ran_for`; returns how long to wait
    /// before starting its replacement.
    pub fn on_exit(&mut self, policy: &BackoffPolicy, ran_for: Duration) -> Duration {
        if ran_for >= policy.reset_after {
            self.consecutive = 0;
        }
        let delay = match self.consecutive {
            0 => Duration::ZERO,
            n => policy
                .initial
                .saturating_mul(2u32.saturating_pow(n.saturating_sub(1).min(31)))
                .min(policy.max),
        };
        self.consecutive = self.consecutive.saturating_add(1);
        delay
    }

    pub fn consecutive(&self) -> u32 {
        self.consecutive
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHORT: Duration = Duration::from_millis(10);

    #[test]
    fn first_restart_is_immediate_then_doubles_up_to_the_cap() {
        let policy = BackoffPolicy::default();
        let mut b = RestartBackoff::default();
        let got: Vec<u64> = (0..9)
            .map(|_| b.on_exit(&policy, SHORT).as_millis() as u64)
            .collect();
        assert_eq!(
            got,
            vec![0, 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]
        );
    }

    #[test]
    fn a_long_run_resets_the_backoff() {
        let policy = BackoffPolicy::default();
        let mut b = RestartBackoff::default();
        for _ in 0..5 {
            b.on_exit(&policy, SHORT);
        }
        assert_eq!(b.on_exit(&policy, policy.reset_after), Duration::ZERO);
        assert_eq!(b.on_exit(&policy, SHORT), policy.initial);
    }

    #[test]
    fn many_crashes_do_not_overflow() {
        let policy = BackoffPolicy::default();
        let mut b = RestartBackoff::default();
        for _ in 0..100 {
            assert!(b.on_exit(&policy, SHORT) <= policy.max);
        }
    }
}
