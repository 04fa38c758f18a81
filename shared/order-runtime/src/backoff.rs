//! Exponential backoff, the one schedule every wait-and-try-again in the services uses: the
//! processor's retries of a failed attempt, waiting out a registry or a broker, the producer
//! of dead letters, the restore of a partition's state, the generator's schema registration.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Waits that start at `initial`, grow by `factor` each time and never exceed `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    factor: f64,
    max: Duration,
    /// Waits handed out so far.
    taken: u32,
}

impl Backoff {
    /// Doubling waits from `initial`, capped at `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self::with_factor(initial, 2.0, max)
    }

    /// Waits from `initial`, each `factor` times the one before, capped at `max`.
    pub fn with_factor(initial: Duration, factor: f64, max: Duration) -> Self {
        Backoff {
            initial,
            factor,
            max,
            taken: 0,
        }
    }

    /// The `n`th wait (1-based) of the schedule: initial × factor^(n-1), capped. Pure.
    pub fn nth(&self, n: u32) -> Duration {
        let exp = i32::try_from(n.saturating_sub(1)).unwrap_or(i32::MAX);
        let ms = self.initial.as_secs_f64() * 1000.0 * self.factor.powi(exp);
        #[allow(clippy::cast_precision_loss)]
        let max_ms = self.max.as_millis() as f64;
        // both are finite and non-negative here; `min` also tames an infinite power
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        Duration::from_millis(ms.min(max_ms) as u64)
    }

    /// The next wait, moving the schedule on.
    pub fn next_wait(&mut self) -> Duration {
        self.taken = self.taken.saturating_add(1);
        self.nth(self.taken)
    }

    /// Sleeps the next wait. `false` when `cancel` fired first.
    pub async fn wait(&mut self, cancel: &CancellationToken) -> bool {
        let wait = self.next_wait();
        tokio::select! {
            () = cancel.cancelled() => false,
            () = tokio::time::sleep(wait) => true,
        }
    }

    /// The wait [`Backoff::wait`] will sleep next, in milliseconds, for logs.
    pub fn upcoming_ms(&self) -> u64 {
        u64::try_from(self.nth(self.taken.saturating_add(1)).as_millis()).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(250), Duration::from_secs(2));
        let waits: Vec<u128> = (0..6).map(|_| b.next_wait().as_millis()).collect();
        assert_eq!(waits, [250, 500, 1000, 2000, 2000, 2000]);
    }

    #[test]
    fn any_factor_and_a_huge_attempt_number_stay_capped() {
        let b = Backoff::with_factor(Duration::from_secs(1), 3.0, Duration::from_secs(30));
        assert_eq!(b.nth(1), Duration::from_secs(1));
        assert_eq!(b.nth(3), Duration::from_secs(9));
        assert_eq!(b.nth(u32::MAX), Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn waits_sleep_the_schedule_and_stop_when_cancelled() {
        let cancel = CancellationToken::new();
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let started = tokio::time::Instant::now();
        assert!(b.wait(&cancel).await);
        assert!(b.wait(&cancel).await);
        assert_eq!(started.elapsed(), Duration::from_millis(300));
        cancel.cancel();
        assert!(!b.wait(&cancel).await);
        assert_eq!(started.elapsed(), Duration::from_millis(300));
    }
}
