//! A request's filter, checked once before anything starts and then applied to each dead
//! letter.

use order_runtime::dead_letter::{self, Category, Metadata};

use super::request::{Filter, Options, RedriveError};

fn millis(text: &str, what: &str) -> Result<i64, RedriveError> {
    dead_letter::rfc3339_millis(text).map_err(|e| RedriveError::BadRequest(format!("{what}: {e}")))
}

/// A [`Filter`] checked and ready to apply.
pub struct Compiled {
    filter: Filter,
    category: Option<Category>,
    since: Option<i64>,
    until: Option<i64>,
}

impl Compiled {
    pub fn new(filter: &Filter) -> Result<Self, RedriveError> {
        let category = match filter.category.as_deref() {
            None => None,
            Some(c) => match Category::ALL.into_iter().find(|k| k.as_str() == c) {
                Some(k) => Some(k),
                None => {
                    return Err(RedriveError::BadRequest(format!(
                        "category {c:?} is none of deserialization, validation, retries_exhausted, unknown"
                    )));
                }
            },
        };
        Ok(Compiled {
            filter: filter.clone(),
            category,
            since: filter
                .since
                .as_deref()
                .map(|t| millis(t, "since"))
                .transpose()?,
            until: filter
                .until
                .as_deref()
                .map(|t| millis(t, "until"))
                .transpose()?,
        })
    }

    /// Whether the dead letter matches everything but the product.
    pub fn matches_headers(&self, meta: &Metadata, timestamp: Option<i64>) -> bool {
        let f = &self.filter;
        self.category.is_none_or(|c| c == meta.category)
            && f.kind.as_deref().is_none_or(|k| k == meta.kind)
            && f.partition.is_none_or(|p| p == meta.original_partition)
            && f.from_offset.is_none_or(|o| meta.original_offset >= o)
            && f.to_offset.is_none_or(|o| meta.original_offset <= o)
            && self.since.is_none_or(|s| timestamp.is_some_and(|t| t >= s))
            && self.until.is_none_or(|u| timestamp.is_some_and(|t| t < u))
    }

    pub fn matches_product(&self, product: Option<&str>) -> bool {
        self.filter
            .product
            .as_deref()
            .is_none_or(|want| product.is_some_and(|p| p.eq_ignore_ascii_case(want)))
    }
}

/// Checks a request before anything starts: its filter and its rate. The filter, ready.
pub fn check(options: &Options) -> Result<Compiled, RedriveError> {
    let filter = Compiled::new(&options.filter)?;
    if let Some(r) = options.rate
        && !(r.is_finite() && r >= 0.0)
    {
        return Err(RedriveError::BadRequest(format!(
            "rate {r} is not a number of records per second"
        )));
    }
    Ok(filter)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use rdkafka::message::OwnedHeaders;

    use super::*;

    #[test]
    fn filters_check_headers_and_product() {
        let f = Compiled::new(&Filter {
            category: Some("validation".into()),
            partition: Some(2),
            from_offset: Some(10),
            to_offset: Some(20),
            product: Some("Drone".into()),
            ..Filter::default()
        })
        .unwrap();
        let mut meta = Metadata::from_headers::<OwnedHeaders>(None);
        meta.category = Category::Validation;
        meta.original_partition = 2;
        meta.original_offset = 15;
        assert!(f.matches_headers(&meta, None));
        assert!(f.matches_product(Some("drone")));
        assert!(
            !f.matches_product(None),
            "a dead letter that does not decode has no product"
        );
        meta.original_offset = 21;
        assert!(!f.matches_headers(&meta, None));
        assert!(
            Compiled::new(&Filter {
                category: Some("nope".into()),
                ..Filter::default()
            })
            .is_err()
        );
    }
}
