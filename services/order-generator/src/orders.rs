//! Random orders and the send pace.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use order_schema::{Order, PRODUCTS};
use rand::Rng;
use rand::seq::IndexedRandom;

/// A random order: a UUID id, one of the ten products, $10.00 to $1000.00 in whole cents.
/// With probability `invalid_ratio` the order breaks one business rule on purpose; the bool
/// says whether it does.
pub fn random_order(rng: &mut impl Rng, invalid_ratio: f64) -> (Order, bool) {
    let cents: i64 = rng.random_range(1_000..=100_000);
    #[allow(clippy::cast_precision_loss)]
    let mut order = Order {
        // a version-4 UUID from the thread's generator: no system call per order
        order_id: uuid::Builder::from_random_bytes(random_bytes(rng))
            .into_uuid()
            .to_string(),
        product: (*PRODUCTS.choose(rng).unwrap_or(&PRODUCTS[0])).to_owned(),
        price: cents as f64 / 100.0,
    };
    let invalid = invalid_ratio > 0.0 && rng.random::<f64>() < invalid_ratio;
    if invalid {
        match rng.random_range(0..3) {
            0 => order.price = -order.price,
            1 => order.price = 0.0,
            _ => order.product = "unicorn".to_owned(),
        }
    }
    (order, invalid)
}

/// 16 random bytes in one read of the generator (`rng.random::<[u8; 16]>()` draws a `u32` for
/// each byte).
fn random_bytes(rng: &mut impl Rng) -> [u8; 16] {
    let mut bytes = [0; 16];
    rng.fill_bytes(&mut bytes);
    bytes
}

/// Open-loop pacing: the n-th order is due at start + n / rate, whatever the sends before it
/// cost, so a slow send shows up as latency rather than as a lower rate. The time an order
/// was due becomes its record timestamp, so latency measured from it includes any delay in
/// sending it (no coordinated omission).
#[derive(Debug)]
pub struct Pacer {
    interval: Option<Duration>,
    start: Instant,
    start_wall: SystemTime,
    sent: u64,
    due: Instant,
}

impl Pacer {
    pub fn new(rate_per_s: f64) -> Self {
        let start = Instant::now();
        Pacer {
            interval: (rate_per_s > 0.0).then(|| Duration::from_secs_f64(1.0 / rate_per_s)),
            start,
            start_wall: SystemTime::now(),
            sent: 0,
            due: start,
        }
    }

    /// How long after `now` to wait before the next order (`None`: it is due now).
    pub fn wait_before_next(&mut self, now: Instant) -> Option<Duration> {
        let Some(interval) = self.interval else {
            self.due = now;
            return None;
        };
        #[allow(clippy::cast_precision_loss)]
        let offset = interval.mul_f64(self.sent as f64);
        self.due = self.start + offset;
        self.sent += 1;
        self.due
            .checked_duration_since(now)
            .filter(|d| !d.is_zero())
    }

    /// When the order last asked about was due, in milliseconds since the Unix epoch.
    pub fn due_timestamp_ms(&self) -> i64 {
        let due = self.start_wall + self.due.duration_since(self.start);
        due.duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn valid_orders_pass_validation_and_invalid_ones_fail() {
        let mut rng = rand::rng();
        for _ in 0..2000 {
            let (o, invalid) = random_order(&mut rng, 0.3);
            assert_eq!(o.validate().is_err(), invalid, "{o:?}");
            let id = uuid::Uuid::parse_str(&o.order_id).unwrap();
            assert_eq!(id.get_version_num(), 4, "{o:?}");
            if !invalid {
                let c = o.validate().unwrap().0;
                assert!((1_000..=100_000).contains(&c));
            }
        }
    }

    #[test]
    fn the_invalid_share_follows_the_ratio() {
        let mut rng = rand::rng();
        let invalid = (0..100_000)
            .filter(|_| random_order(&mut rng, 0.05).1)
            .count();
        assert!(
            (4_500..5_500).contains(&invalid),
            "{invalid} of 100000 at ratio 0.05"
        );
    }

    #[test]
    fn no_invalid_orders_at_ratio_zero() {
        let mut rng = rand::rng();
        assert!((0..1000).all(|_| !random_order(&mut rng, 0.0).1));
    }

    #[test]
    fn pacer_spaces_sends() {
        let mut p = Pacer::new(100.0);
        assert_eq!(p.wait_before_next(Instant::now()), None);
        let second = p.wait_before_next(Instant::now()).unwrap();
        assert!(second <= Duration::from_millis(10) && second > Duration::from_millis(5));
        assert_eq!(Pacer::new(0.0).wait_before_next(Instant::now()), None);
    }

    #[test]
    fn the_timestamp_is_when_the_order_was_due_not_when_it_was_sent() {
        let mut p = Pacer::new(10.0);
        let _ = p.wait_before_next(Instant::now());
        let first = p.due_timestamp_ms();
        // a sender that fell 250 ms behind still stamps each order with its due time
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(p.wait_before_next(Instant::now()), None);
        assert_eq!(p.due_timestamp_ms() - first, 100);
        assert_eq!(p.wait_before_next(Instant::now()), None);
        assert_eq!(p.due_timestamp_ms() - first, 200);
    }
}
