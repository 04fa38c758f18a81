//! The headers of a record a redrive sends: back to the orders topic without the dead
//! letter's error metadata, or to the parking topic as it was.

use order_runtime::dead_letter;
use order_runtime::trace;
use rdkafka::message::{Header, Headers, OwnedHeaders};

/// The header that counts how often a record was redriven.
pub const REDRIVE_COUNT: &str = "redrive.count";

/// The redriven record's headers: the dead letter's less `dlq.*`, trace context and the old
/// count, plus the new count.
pub fn redriven_headers(dead: Option<&impl Headers>, count: u32) -> OwnedHeaders {
    let count = count.to_string();
    dead_letter::carried_headers(dead, &[REDRIVE_COUNT], 4).insert(Header {
        key: REDRIVE_COUNT,
        value: Some(count.as_bytes()),
    })
}

/// The dead letter's `redrive.count` (0 when it has none).
pub fn redrive_count(headers: Option<&impl Headers>) -> u32 {
    headers
        .and_then(|h| h.iter().find(|x| x.key == REDRIVE_COUNT))
        .and_then(|x| x.value)
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// A parked record's headers: the dead letter's as they were, so that what failed stays
/// readable, plus `redrive.parked.count`; the trace context becomes the park's send when
/// `span` records one.
pub fn parked_headers(
    dead: Option<&impl Headers>,
    count: u32,
    span: &tracing::Span,
) -> OwnedHeaders {
    let mut h = OwnedHeaders::new_with_capacity(dead.map_or(0, Headers::count) + 4);
    for header in dead.into_iter().flat_map(Headers::iter) {
        if span.is_none() || !trace::PROPAGATION_HEADERS.contains(&header.key) {
            h = h.insert(header);
        }
    }
    let c = count.to_string();
    h = h.insert(Header {
        key: "redrive.parked.count",
        value: Some(c.as_bytes()),
    });
    trace::inject_or_carry(span, h, None::<&OwnedHeaders>)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_redriven_record_loses_the_error_headers_and_counts_one_more() {
        let dead = OwnedHeaders::new()
            .insert(Header {
                key: "tenant",
                value: Some("acme".as_bytes()),
            })
            .insert(Header {
                key: "dlq.error.kind",
                value: Some("unknown_product".as_bytes()),
            })
            .insert(Header {
                key: "traceparent",
                value: Some("00-aa-bb-01".as_bytes()),
            })
            .insert(Header {
                key: REDRIVE_COUNT,
                value: Some("2".as_bytes()),
            });
        assert_eq!(redrive_count(Some(&dead)), 2);
        let out = redriven_headers(Some(&dead), 3);
        let keys: Vec<(&str, Option<&[u8]>)> = out.iter().map(|h| (h.key, h.value)).collect();
        assert_eq!(
            keys,
            [
                ("tenant", Some("acme".as_bytes())),
                (REDRIVE_COUNT, Some("3".as_bytes()))
            ]
        );
    }
}
