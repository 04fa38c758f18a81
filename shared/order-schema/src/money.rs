//! Money: dollars (a double) on the wire, integer cents wherever amounts are added up, so that
//! a sum over millions of orders is exact to the cent.

use serde::{Serialize, Serializer};

/// An amount in US cents.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cents(pub i64);

impl Cents {
    /// The cents in `dollars` if it is a finite whole number of cents (within the tiny error a
    /// double has for such values), else `None`.
    pub fn from_dollars(dollars: f64) -> Option<Self> {
        if !dollars.is_finite() || dollars.abs() > 9.0e13 {
            return None;
        }
        let scaled = dollars * 100.0;
        let rounded = scaled.round();
        // 19.99 * 100 = 1998.9999999999998: a representation error, not a fraction of a cent
        if (scaled - rounded).abs() > 1e-6 {
            return None;
        }
        // the bound above keeps `rounded` well inside i64
        #[allow(clippy::cast_possible_truncation)]
        Some(Self(rounded as i64))
    }

    /// Dollars as a double, for JSON and logs (exact for any amount below 2^53 cents).
    #[allow(clippy::cast_precision_loss)]
    pub fn dollars(self) -> f64 {
        self.0 as f64 / 100.0
    }
}

impl std::ops::Add for Cents {
    type Output = Cents;
    fn add(self, rhs: Cents) -> Cents {
        Cents(self.0 + rhs.0)
    }
}

impl std::ops::AddAssign for Cents {
    fn add_assign(&mut self, rhs: Cents) {
        self.0 += rhs.0;
    }
}

impl std::fmt::Display for Cents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        write!(
            f,
            "{sign}${}.{:02}",
            self.0.unsigned_abs() / 100,
            self.0.unsigned_abs() % 100
        )
    }
}

/// Money in JSON is a decimal number of dollars (SPEC).
impl Serialize for Cents {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(self.dollars())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn whole_cents_survive_double_representation() {
        assert_eq!(Cents::from_dollars(19.99), Some(Cents(1999)));
        assert_eq!(Cents::from_dollars(0.07), Some(Cents(7)));
        assert_eq!(Cents::from_dollars(1000.0), Some(Cents(100_000)));
        assert_eq!(Cents::from_dollars(10.005), None);
        assert_eq!(Cents::from_dollars(f64::NAN), None);
    }

    #[test]
    fn a_million_dimes_sum_exactly() {
        let mut cents = Cents(0);
        for _ in 0..1_000_000 {
            cents += Cents::from_dollars(0.1).unwrap();
        }
        assert_eq!(cents, Cents(10_000_000));
        assert_eq!(cents.to_string(), "$100000.00");
        assert_eq!(serde_json::to_string(&Cents(123_456)).unwrap(), "1234.56");
    }
}
