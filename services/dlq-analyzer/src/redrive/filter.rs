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

/// The most records per second a request may ask for (`REDRIVE_RATE`'s range).
const MAX_RATE: f64 = 10_000_000.0;

/// Checks a whole request before anything starts, so that a bad one is refused at once with
/// the field and the reason, and no run is made of it: the filter (category, times, offsets,
/// partition), the limit, the rate, the id, and that a request selecting every dead letter
/// says so (`all`, unless it is a dry run). The filter, ready.
pub fn check(options: &Options) -> Result<Compiled, RedriveError> {
    let bad = |why: String| Err(RedriveError::BadRequest(why));
    let f = &options.filter;
    for (field, value) in [("kind", &f.kind), ("product", &f.product)] {
        if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
            return bad(format!("{field}: empty; leave it out to match any"));
        }
    }
    if let Some(p) = f.partition
        && p < 0
    {
        return bad(format!(
            "partition: {p} is not a partition number (0 or more)"
        ));
    }
    for (field, value) in [("from_offset", f.from_offset), ("to_offset", f.to_offset)] {
        if let Some(o) = value
            && o < 0
        {
            return bad(format!("{field}: {o} is not an offset (0 or more)"));
        }
    }
    if let (Some(from), Some(to)) = (f.from_offset, f.to_offset)
        && from > to
    {
        return bad(format!(
            "from_offset {from} is past to_offset {to}: nothing could match"
        ));
    }
    let compiled = Compiled::new(f)?;
    if let (Some(since), Some(until)) = (compiled.since, compiled.until)
        && since >= until
    {
        return bad("since is not before until: nothing could match".to_owned());
    }
    if options.limit == Some(0) {
        return bad("limit: 0 would take nothing; leave it out for no limit".to_owned());
    }
    if let Some(r) = options.rate
        && !(r.is_finite() && (0.0..=MAX_RATE).contains(&r))
    {
        return bad(format!(
            "rate: {r} is not a number of records per second from 0 (no limit) to {MAX_RATE}"
        ));
    }
    if let Some(id) = &options.id {
        let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if id.is_empty() || id.len() > 200 || !id.chars().all(legal) {
            return bad(format!(
                "id: {id:?} must be 1 to 200 characters of a-z, A-Z, 0-9, '.', '_' and '-' (it \
                 names a consumer group and a transactional id)"
            ));
        }
    }
    let everything = *f == Filter::default();
    if everything && !options.all && !options.dry_run {
        return bad(
            "this request names no filter, so it would send every dead letter back: give a \
             filter (category, kind, product, since, until, partition, from_offset, to_offset), \
             or say \"all\": true (--all) if every one is meant"
                .to_owned(),
        );
    }
    if options.all && !everything {
        return bad("all: true selects every dead letter; give it without a filter".to_owned());
    }
    Ok(compiled)
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
