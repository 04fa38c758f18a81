//! The dead-letter contract (SPEC "Topics").
//!
//! A dead letter is the original record, key and value bytes unchanged, with the original
//! headers plus error headers whose names all start with [`PREFIX`] and whose values are
//! UTF-8 strings. The processor writes them with [`headers`]; the analyzer reads them back
//! with [`Metadata::from_headers`].

use std::time::SystemTime;

use rdkafka::message::{Header, Headers, OwnedHeaders};
use serde::{Deserialize, Serialize};

/// Every error header starts with this.
pub const PREFIX: &str = "dlq.";
/// Why the record failed: one of the [`Category`] names.
pub const CATEGORY: &str = "dlq.error.category";
/// A short stable name for the exact failure (`unknown_product`, `bad_magic_byte`, ...).
pub const KIND: &str = "dlq.error.kind";
/// The error message, human-readable.
pub const MESSAGE: &str = "dlq.error.message";
pub const ORIGINAL_TOPIC: &str = "dlq.original.topic";
pub const ORIGINAL_PARTITION: &str = "dlq.original.partition";
pub const ORIGINAL_OFFSET: &str = "dlq.original.offset";
/// The original record's timestamp, milliseconds since the Unix epoch.
pub const ORIGINAL_TIMESTAMP: &str = "dlq.original.timestamp";
/// Processing attempts made before giving up (1 for permanent failures).
pub const ATTEMPTS: &str = "dlq.attempts";
/// The service that gave up on the record.
pub const FAILED_SERVICE: &str = "dlq.failed.service";
/// When it gave up, RFC 3339 UTC with milliseconds.
pub const FAILED_AT: &str = "dlq.failed.at";

/// Why a record was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// The bytes are not a valid Order (garbage, wrong magic byte, unknown schema, bad Avro).
    Deserialization,
    /// A decoded Order that breaks a business rule.
    Validation,
    /// A temporary failure that outlived its retries.
    RetriesExhausted,
    /// A record on the dead-letter topic without our headers (written by someone else).
    Unknown,
}

impl Category {
    pub const ALL: [Category; 4] = [
        Category::Deserialization,
        Category::Validation,
        Category::RetriesExhausted,
        Category::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Category::Deserialization => "deserialization",
            Category::Validation => "validation",
            Category::RetriesExhausted => "retries_exhausted",
            Category::Unknown => "unknown",
        }
    }

    pub fn parse(s: &str) -> Category {
        Category::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .unwrap_or(Category::Unknown)
    }
}

impl std::fmt::Display for Category {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the processor knows about a failure when it dead-letters a record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Metadata {
    pub category: Category,
    pub kind: String,
    pub message: String,
    pub original_topic: String,
    pub original_partition: i32,
    pub original_offset: i64,
    pub original_timestamp: Option<i64>,
    pub attempts: u32,
    pub failed_service: String,
    pub failed_at: String,
}

/// Now as RFC 3339 UTC with milliseconds.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// Milliseconds since the epoch of an RFC 3339 time (`2026-12-01T10:00:00Z`).
pub fn rfc3339_millis(text: &str) -> Result<i64, String> {
    let at = humantime::parse_rfc3339_weak(text)
        .map_err(|e| format!("{text:?} is not an RFC 3339 time: {e}"))?;
    let ms = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|_| format!("{text} is before 1970"))?
        .as_millis();
    Ok(i64::try_from(ms).unwrap_or(i64::MAX))
}

/// The headers a record carries on to a new life (dead letter, redrive): the original ones
/// less trace context and `dlq.*` headers, which would be stale, and less `also_drop`; room
/// for `room` more.
pub fn carried_headers<H: Headers>(
    original: Option<&H>,
    also_drop: &[&str],
    room: usize,
) -> OwnedHeaders {
    let mut out = OwnedHeaders::new_with_capacity(original.map_or(0, Headers::count) + room);
    if let Some(h) = original {
        for header in h.iter() {
            if header.key.starts_with(PREFIX)
                || crate::trace::PROPAGATION_HEADERS.contains(&header.key)
                || also_drop.contains(&header.key)
            {
                continue;
            }
            out = out.insert(header);
        }
    }
    out
}

/// The dead letter's headers: the original ones carried on ([`carried_headers`]) followed by
/// ours.
pub fn headers<H: Headers>(original: Option<&H>, meta: &Metadata) -> OwnedHeaders {
    let mut out = carried_headers(original, &[], 10);
    let partition = meta.original_partition.to_string();
    let offset = meta.original_offset.to_string();
    let timestamp = meta.original_timestamp.map(|t| t.to_string());
    let attempts = meta.attempts.to_string();
    let pairs: [(&str, Option<&str>); 10] = [
        (CATEGORY, Some(meta.category.as_str())),
        (KIND, Some(&meta.kind)),
        (MESSAGE, Some(&meta.message)),
        (ORIGINAL_TOPIC, Some(&meta.original_topic)),
        (ORIGINAL_PARTITION, Some(&partition)),
        (ORIGINAL_OFFSET, Some(&offset)),
        (ORIGINAL_TIMESTAMP, timestamp.as_deref()),
        (ATTEMPTS, Some(&attempts)),
        (FAILED_SERVICE, Some(&meta.failed_service)),
        (FAILED_AT, Some(&meta.failed_at)),
    ];
    for (key, value) in pairs {
        if let Some(v) = value {
            out = out.insert(Header {
                key,
                value: Some(v.as_bytes()),
            });
        }
    }
    out
}

/// The error headers [`Metadata::from_headers`] reads, in the order of its `found` slots.
const READ: [&str; 10] = [
    CATEGORY,
    KIND,
    MESSAGE,
    ORIGINAL_TOPIC,
    ORIGINAL_PARTITION,
    ORIGINAL_OFFSET,
    ORIGINAL_TIMESTAMP,
    ATTEMPTS,
    FAILED_SERVICE,
    FAILED_AT,
];

impl Metadata {
    /// Reads our headers back. A record without a category header is `Unknown`; other missing
    /// or unreadable fields get neutral values rather than failing the read. Of headers with
    /// the same name, the first counts. One pass over the headers: each look-up by name is a
    /// walk through them all (librdkafka hands them out by index).
    pub fn from_headers<H: Headers>(headers: Option<&H>) -> Metadata {
        // per name: not seen yet, or the first one's value when it is UTF-8
        let mut found: [Option<Option<&str>>; READ.len()] = [None; READ.len()];
        for h in headers.iter().flat_map(|h| h.iter()) {
            if !h.key.starts_with(PREFIX) {
                continue;
            }
            if let Some(i) = READ.iter().position(|k| *k == h.key)
                && found[i].is_none()
            {
                found[i] = Some(h.value.and_then(|v| std::str::from_utf8(v).ok()));
            }
        }
        let [
            category,
            kind,
            message,
            original_topic,
            original_partition,
            original_offset,
            original_timestamp,
            attempts,
            failed_service,
            failed_at,
        ] = found.map(Option::flatten);
        Metadata {
            category: category.map_or(Category::Unknown, Category::parse),
            kind: kind.unwrap_or("unknown").to_owned(),
            message: message.unwrap_or("").to_owned(),
            original_topic: original_topic.unwrap_or("").to_owned(),
            original_partition: original_partition
                .and_then(|v| v.parse().ok())
                .unwrap_or(-1),
            original_offset: original_offset.and_then(|v| v.parse().ok()).unwrap_or(-1),
            original_timestamp: original_timestamp.and_then(|v| v.parse().ok()),
            attempts: attempts.and_then(|v| v.parse().ok()).unwrap_or(0),
            failed_service: failed_service.unwrap_or("").to_owned(),
            failed_at: failed_at.unwrap_or("").to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn meta() -> Metadata {
        Metadata {
            category: Category::RetriesExhausted,
            kind: "transient_failure".into(),
            message: "simulated outage".into(),
            original_topic: "orders".into(),
            original_partition: 2,
            original_offset: 41,
            original_timestamp: Some(1_700_000_000_000),
            attempts: 4,
            failed_service: "order-processor".into(),
            failed_at: "2026-11-25T19:00:00.000Z".into(),
        }
    }

    #[test]
    fn headers_round_trip_and_keep_the_originals() {
        let original = OwnedHeaders::new()
            .insert(Header {
                key: "source",
                value: Some("web".as_bytes()),
            })
            .insert(Header {
                key: "traceparent",
                value: Some("00-stale".as_bytes()),
            })
            .insert(Header {
                key: CATEGORY,
                value: Some("validation".as_bytes()),
            });
        let out = headers(Some(&original), &meta());
        let keys: Vec<&str> = out.iter().map(|h| h.key).collect();
        assert_eq!(keys[0], "source");
        assert!(!keys.contains(&"traceparent"));
        assert_eq!(keys.iter().filter(|k| **k == CATEGORY).count(), 1);
        assert!(keys[1..].iter().all(|k| k.starts_with(PREFIX)));
        assert_eq!(Metadata::from_headers(Some(&out)), meta());
    }

    #[test]
    fn records_without_our_headers_are_unknown() {
        let m = Metadata::from_headers::<OwnedHeaders>(None);
        assert_eq!(m.category, Category::Unknown);
        let odd = OwnedHeaders::new().insert(Header {
            key: CATEGORY,
            value: Some("alien".as_bytes()),
        });
        assert_eq!(
            Metadata::from_headers(Some(&odd)).category,
            Category::Unknown
        );
    }

    #[test]
    fn the_first_header_of_a_name_counts() {
        let h = |key, value: &'static [u8]| Header {
            key,
            value: Some(value),
        };
        let twice = OwnedHeaders::new()
            .insert(h("x", b"1"))
            .insert(h(CATEGORY, b"validation"))
            .insert(h(ATTEMPTS, b"\xff"))
            .insert(h(CATEGORY, b"deserialization"))
            .insert(h(ATTEMPTS, b"3"))
            .insert(h(KIND, b"unknown_product"));
        let m = Metadata::from_headers(Some(&twice));
        assert_eq!(m.category, Category::Validation);
        // the first is not UTF-8: unreadable, as if missing
        assert_eq!(m.attempts, 0);
        assert_eq!(m.kind, "unknown_product");
        assert_eq!(m.original_offset, -1);
    }
}
