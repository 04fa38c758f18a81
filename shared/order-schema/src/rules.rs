//! The business rules an Order must keep, and the catalogue of products a processor
//! accepts (`PRODUCT_CATALOGUE`).

use std::sync::LazyLock;

use crate::money::Cents;
use crate::order::Order;

/// The products the system sells; anything else fails validation.
pub const PRODUCTS: [&str; 10] = [
    "laptop",
    "phone",
    "tablet",
    "monitor",
    "keyboard",
    "mouse",
    "headphones",
    "camera",
    "printer",
    "speaker",
];

/// Highest price we accept, in cents: anything above is a data error, not a sale.
pub const MAX_PRICE_CENTS: i64 = 100_000_000;

/// Why an Order breaks a business rule. Always permanent: retrying cannot fix the data.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValidationError {
    #[error("orderId is empty")]
    EmptyOrderId,
    #[error("price {0} is not positive")]
    NonPositivePrice(f64),
    #[error("price {0} is not a finite whole number of cents")]
    NotWholeCents(f64),
    #[error("price {0} is above the limit of {max} dollars", max = MAX_PRICE_CENTS / 100)]
    PriceTooHigh(f64),
    #[error("unknown product {0:?}")]
    UnknownProduct(String),
}

impl ValidationError {
    /// A short, stable name for the rule that failed (metrics labels, dead-letter headers).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::EmptyOrderId => "empty_order_id",
            Self::NonPositivePrice(_) => "non_positive_price",
            Self::NotWholeCents(_) => "price_not_whole_cents",
            Self::PriceTooHigh(_) => "price_too_high",
            Self::UnknownProduct(_) => "unknown_product",
        }
    }
}

/// The products a processor accepts (`PRODUCT_CATALOGUE`). Names match ignoring ASCII case,
/// and an accepted order is counted under the catalogue's spelling ("Laptop" is "laptop").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Catalogue {
    /// Any non-empty product name, counted as sent (`PRODUCT_CATALOGUE=*`).
    Any,
    /// These names only.
    Only(Vec<String>),
}

impl Default for Catalogue {
    /// [`PRODUCTS`].
    fn default() -> Self {
        Catalogue::Only(PRODUCTS.iter().map(|p| (*p).to_owned()).collect())
    }
}

impl Catalogue {
    /// `*` for any product, otherwise a comma-separated list of names (blanks around names
    /// are ignored; an empty list is refused).
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.trim() == "*" {
            return Ok(Catalogue::Any);
        }
        let names: Vec<String> = text
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
            .collect();
        if names.is_empty() {
            return Err(format!(
                "{text:?} names no product; give a comma-separated list, or * for any product"
            ));
        }
        Ok(Catalogue::Only(names))
    }

    /// The catalogue's spelling of `product`, if it sells it.
    pub fn lookup<'a>(&'a self, product: &'a str) -> Option<&'a str> {
        match self {
            Catalogue::Any => (!product.trim().is_empty()).then_some(product),
            Catalogue::Only(names) => names
                .iter()
                .find(|n| n.eq_ignore_ascii_case(product))
                .map(String::as_str),
        }
    }
}

/// [`Catalogue::default`], built once.
static DEFAULT_CATALOGUE: LazyLock<Catalogue> = LazyLock::new(Catalogue::default);

impl Order {
    /// Checks the business rules against the default catalogue ([`PRODUCTS`]) and returns the
    /// price in cents.
    pub fn validate(&self) -> Result<Cents, ValidationError> {
        self.check(&DEFAULT_CATALOGUE).map(|(cents, _)| cents)
    }

    /// Checks the business rules against `catalogue`, returns the price in cents and puts
    /// the product under the catalogue's spelling.
    pub fn validate_in(&mut self, catalogue: &Catalogue) -> Result<Cents, ValidationError> {
        let (cents, spelling) = self.check(catalogue)?;
        if let Some(name) = spelling {
            self.product = name;
        }
        Ok(cents)
    }

    /// The price in cents, and the catalogue's spelling of the product when it differs.
    fn check(&self, catalogue: &Catalogue) -> Result<(Cents, Option<String>), ValidationError> {
        if self.order_id.trim().is_empty() {
            return Err(ValidationError::EmptyOrderId);
        }
        let spelling = match catalogue.lookup(&self.product) {
            None => return Err(ValidationError::UnknownProduct(self.product.clone())),
            Some(name) if name == self.product => None,
            Some(name) => Some(name.to_owned()),
        };
        let cents = self.price_cents()?;
        Ok((cents, spelling))
    }

    fn price_cents(&self) -> Result<Cents, ValidationError> {
        if self.price.is_nan() || self.price <= 0.0 {
            return Err(ValidationError::NonPositivePrice(self.price));
        }
        let cents =
            Cents::from_dollars(self.price).ok_or(ValidationError::NotWholeCents(self.price))?;
        if cents.0 > MAX_PRICE_CENTS {
            return Err(ValidationError::PriceTooHigh(self.price));
        }
        Ok(cents)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn order() -> Order {
        Order {
            order_id: "9d1c4f0e-0000-4000-8000-000000000001".into(),
            product: "laptop".into(),
            price: 1234.56,
        }
    }

    #[test]
    fn validation_rules() {
        assert_eq!(order().validate(), Ok(Cents(123_456)));
        let with = |f: fn(&mut Order)| {
            let mut o = order();
            f(&mut o);
            o.validate().unwrap_err().kind()
        };
        assert_eq!(with(|o| o.order_id = " ".into()), "empty_order_id");
        assert_eq!(with(|o| o.product = "unicorn".into()), "unknown_product");
        assert_eq!(with(|o| o.price = 0.0), "non_positive_price");
        assert_eq!(with(|o| o.price = -5.0), "non_positive_price");
        assert_eq!(with(|o| o.price = f64::NAN), "non_positive_price");
        assert_eq!(with(|o| o.price = f64::INFINITY), "price_not_whole_cents");
        assert_eq!(with(|o| o.price = 10.005), "price_not_whole_cents");
        assert_eq!(with(|o| o.price = 2_000_000.0), "price_too_high");
    }

    #[test]
    fn the_catalogue_matches_ignoring_case_and_counts_under_its_own_spelling() {
        let mut o = order();
        o.product = "LapTop".into();
        assert_eq!(o.validate_in(&Catalogue::default()), Ok(Cents(123_456)));
        assert_eq!(o.product, "laptop");
        let only = Catalogue::parse(" Widget , gadget ").unwrap();
        assert_eq!(
            only,
            Catalogue::Only(vec!["Widget".into(), "gadget".into()])
        );
        o.product = "widget".into();
        assert!(o.validate_in(&only).is_ok());
        assert_eq!(o.product, "Widget");
        o.product = "laptop".into();
        assert_eq!(
            o.validate_in(&only).unwrap_err().kind(),
            "unknown_product",
            "not in this catalogue"
        );
    }

    #[test]
    fn a_catalogue_switched_off_takes_any_product_but_an_empty_one() {
        let any = Catalogue::parse("*").unwrap();
        let mut o = order();
        o.product = "Anything At All".into();
        assert!(o.validate_in(&any).is_ok());
        assert_eq!(o.product, "Anything At All");
        o.product = "  ".into();
        assert_eq!(o.validate_in(&any).unwrap_err().kind(), "unknown_product");
        assert!(Catalogue::parse(" , ").is_err());
    }
}
