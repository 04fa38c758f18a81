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

/// Fails attempt N of an order when a hash of (seed, order id, N) falls below the rate
/// (`TRANSIENT_FAILURE_SEED`): the same attempts fail on every replica and every run, so that
/// whoever knows the seed can tell, from the orders alone, which orders outlive their retries.
///
/// The rule, as docs/processing.md gives it: attempt `n` of the order with id `id` fails when
/// the 64-bit FNV-1a hash of the UTF-8 text `"{seed}:{id}:{n}"`, mixed by MurmurHash3's
/// 64-bit finalizer (`fmix64`) and read as an unsigned integer, is below `rate × 2^64`
/// (computed in 64-bit floating point, so a rate of 1 fails every attempt and 0 none). FNV-1a
/// alone would not do: texts that differ only in their last byte hash to values that differ
/// only below bit 44, so an order's attempts would nearly all fail or all succeed together.
#[derive(Debug, Clone)]
pub struct SeededFailures {
    pub seed: String,
    pub rate: f64,
}

/// FNV-1a, 64 bits.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// MurmurHash3's 64-bit finalizer: every bit of the input moves every bit of the output.
pub fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

impl SeededFailures {
    /// Whether attempt `attempt` of order `id` fails.
    pub fn attempt_fails(&self, id: &str, attempt: u32) -> bool {
        let hash = fmix64(fnv1a64(format!("{}:{id}:{attempt}", self.seed).as_bytes()));
        #[allow(clippy::cast_precision_loss)]
        let drawn = hash as f64;
        drawn < self.rate * 18_446_744_073_709_551_616.0
    }
}

impl FailureInjector for SeededFailures {
    fn fails(&self, order: &Order, _: i32, attempt: u32) -> bool {
        self.attempt_fails(&order.order_id, attempt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_fnv1a_64() {
        // the published test vectors
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        // the finalizer's fixed point, and a value tests/truth.py's implementation gives
        assert_eq!(fmix64(0), 0);
        assert_eq!(fmix64(fnv1a64(b"42:order-1:1")), CROSS_CHECK);
    }

    /// `fmix64(fnv1a64(b"42:order-1:1"))`, as tests/truth.py computes it.
    const CROSS_CHECK: u64 = 0xd20f_52f7_b036_2c8c;

    #[test]
    fn an_orders_attempts_fail_independently_of_each_other() {
        let f = SeededFailures {
            seed: "bench".into(),
            rate: 0.05,
        };
        let ids: Vec<String> = (0..100_000)
            .map(|i| format!("{i:08x}-5e1f-4c2a-9b3d-0123456789ab"))
            .collect();
        let first: Vec<&String> = ids.iter().filter(|id| f.attempt_fails(id, 1)).collect();
        let again = first.iter().filter(|id| f.attempt_fails(id, 2)).count();
        // 5 % of the 5 % that failed once fail again: about 250, not most of them
        assert!(
            (4_500..5_500).contains(&first.len()),
            "{} failed once",
            first.len()
        );
        assert!(
            (150..350).contains(&again),
            "{again} of {} failed again",
            first.len()
        );
    }

    #[test]
    fn seeded_failures_are_a_function_of_seed_order_and_attempt_at_the_rate() {
        let f = SeededFailures {
            seed: "42".into(),
            rate: 0.1,
        };
        let ids: Vec<String> = (0..20_000).map(|i| format!("order-{i}")).collect();
        let failed = ids.iter().filter(|id| f.attempt_fails(id, 1)).count();
        assert!(
            (1_700..2_300).contains(&failed),
            "{failed} of 20,000 at 10 %"
        );
        for id in &ids[..100] {
            for n in 1..5 {
                assert_eq!(f.attempt_fails(id, n), f.attempt_fails(id, n));
            }
        }
        let other = SeededFailures {
            seed: "43".into(),
            rate: 0.1,
        };
        assert!(
            ids.iter()
                .any(|id| f.attempt_fails(id, 1) != other.attempt_fails(id, 1))
        );
        let never = SeededFailures {
            seed: "42".into(),
            rate: 0.0,
        };
        let always = SeededFailures {
            seed: "42".into(),
            rate: 1.0,
        };
        assert!(
            ids.iter()
                .all(|id| !never.attempt_fails(id, 1) && always.attempt_fails(id, 1))
        );
    }
}
