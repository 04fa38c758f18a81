//! Simulated temporary failures (`TRANSIENT_FAILURE_RATE`), and the seam tests use to fail
//! exactly the records they choose.

use order_schema::Order;

/// Decides whether one processing attempt fails temporarily (the seed's simulated outage).
/// Tests plug in their own to fail exactly the records they choose.
pub trait FailureInjector: Send + Sync + std::fmt::Debug {
    fn fails(&self, order: &Order, partition: i32, attempt: u32) -> bool;
}

/// Fails each attempt with probability `rate` (`TRANSIENT_FAILURE_RATE`).
#[derive(Debug, Clone, Copy)]
pub struct RandomFailures(pub f64);

impl FailureInjector for RandomFailures {
    fn fails(&self, _: &Order, _: i32, _: u32) -> bool {
        self.0 > 0.0 && rand::random::<f64>() < self.0
    }
}
