//! The Confluent wire format (magic byte 0, 4-byte schema id, Avro body): [`OrderCodec`]
//! through `schema_registry_converter`, and the hot paths beside it, [`OrderWriter`] and
//! [`OrderReader`]. Its errors say whether they are temporary (the registry cannot be asked:
//! retry) or permanent (bytes that are not an Order: dead-letter).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, RwLock};

use apache_avro::Schema;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use schema_registry_converter::async_impl::avro::{AvroDecoder, AvroEncoder};
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::{
    SchemaType, SubjectNameStrategy, SuppliedSchema,
};

use crate::access::RegistryAccess;
use crate::order::{ORDER_RECORD_NAME, ORDER_SCHEMA, Order};

impl Order {
    /// The record's fields in schema order, as `schema_registry_converter` wants them.
    pub fn to_avro_fields(&self) -> Vec<(&'static str, Value)> {
        vec![
            ("orderId", Value::String(self.order_id.clone())),
            ("product", Value::String(self.product.clone())),
            ("price", Value::Double(self.price)),
        ]
    }

    /// Reads an Order out of a decoded Avro record. Field order does not matter, so a record
    /// written with a compatible newer schema (extra fields) still reads.
    pub fn from_avro_value(value: Value) -> Result<Self, CodecError> {
        let Value::Record(fields) = value else {
            return Err(CodecError::invalid_avro(format!(
                "expected an Avro record, found {value:?}"
            )));
        };
        let (mut order_id, mut product, mut price) = (None, None, None);
        for (name, field) in fields {
            match (name.as_str(), field) {
                ("orderId", Value::String(s)) => order_id = Some(s),
                ("product", Value::String(s)) => product = Some(s),
                ("price", Value::Double(d)) => price = Some(d),
                ("price", Value::Float(f)) => price = Some(f64::from(f)),
                ("orderId" | "product" | "price", other) => {
                    return Err(CodecError::invalid_avro(format!(
                        "field {name} has the wrong type: {other:?}"
                    )));
                }
                _ => {}
            }
        }
        match (order_id, product, price) {
            (Some(order_id), Some(product), Some(price)) => Ok(Order {
                order_id,
                product,
                price,
            }),
            _ => Err(CodecError::invalid_avro(
                "record lacks orderId, product or price".to_owned(),
            )),
        }
    }
}

/// Why bytes are not an Order, decided where it is known: a stable name for dead letters'
/// `dlq.error.kind`, metrics and reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MalformedKind {
    /// The record has no value (a tombstone).
    NullValue,
    /// Fewer bytes than the 5-byte Confluent header.
    TooShort,
    /// The first byte is not the Confluent wire format's 0.
    BadMagicByte,
    /// The registry does not know the schema id in the header.
    UnknownSchemaId,
    /// The body does not decode as an Order under its writer schema.
    InvalidAvro,
}

impl MalformedKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NullValue => "null_value",
            Self::TooShort => "too_short",
            Self::BadMagicByte => "bad_magic_byte",
            Self::UnknownSchemaId => "unknown_schema_id",
            Self::InvalidAvro => "invalid_avro",
        }
    }
}

impl std::fmt::Display for MalformedKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Errors at the codec boundary.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The bytes are not an Order under any schema the registry knows: dead-letter them.
    #[error("not a valid Order ({kind}): {reason}")]
    Malformed { kind: MalformedKind, reason: String },
    /// The registry could not be asked (network, 5xx): try again later, keep the data.
    #[error("schema registry unavailable: {0}")]
    RegistryUnavailable(String),
    /// The registry answered but refused (for example an incompatible schema).
    #[error("schema registry refused the request: {0}")]
    RegistryRejected(String),
}

impl CodecError {
    /// Temporary errors are worth retrying; permanent ones will fail the same way forever.
    pub fn is_temporary(&self) -> bool {
        matches!(self, Self::RegistryUnavailable(_))
    }

    fn malformed(kind: MalformedKind, reason: impl Into<String>) -> Self {
        Self::Malformed {
            kind,
            reason: reason.into(),
        }
    }

    fn invalid_avro(reason: impl Into<String>) -> Self {
        Self::malformed(MalformedKind::InvalidAvro, reason)
    }
}

/// What a failed registry call means for the record that needed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RegistryFailure {
    /// Nothing is known about the record: it waits (see [`classify_registry_error`]).
    Unavailable,
    /// The registry answered that the schema id does not exist.
    UnknownSchema,
    /// Any other refusal; for a decode, the bytes did not read under their schema.
    Refused,
}

/// The one place that reads schema_registry_converter's message text, which is all it gives
/// for the HTTP status and the Confluent error code (it flags only 502/503 as retriable).
/// Each wording relied on has a unit test below, so a release of the crate that changes one
/// fails a test instead of silently turning "wait" into "dead-letter".
///
/// Unavailable: the client says retriable; the registry answered with a server error,
/// throttling or an authorization failure; or the answer was not the Confluent API's at all
/// (no Confluent `error_code` in the body: a wrong base URL or a proxy in the way). None of
/// these says anything about the record. Unknown schema: HTTP 404 with Confluent's 40403.
fn classify_registry_error(e: &SRCError) -> RegistryFailure {
    if e.retriable {
        return RegistryFailure::Unavailable;
    }
    let text = e.to_string();
    if !text.contains("HTTP request to schema registry failed") {
        return RegistryFailure::Refused;
    }
    let not_the_confluent_api = text.contains("error_code: 0,");
    let server_side = [
        "status 401",
        "status 403",
        "status 429",
        "status 500",
        "status 502",
        "status 503",
        "status 504",
    ]
    .iter()
    .any(|s| text.contains(s));
    if not_the_confluent_api || server_side {
        RegistryFailure::Unavailable
    } else if text.contains("status 404") && text.contains("error_code: 40403") {
        RegistryFailure::UnknownSchema
    } else {
        RegistryFailure::Refused
    }
}

/// Writes Orders in the Confluent wire format under an id the registry already gave
/// (see [`OrderCodec::register`]), for producers that send many.
#[derive(Debug)]
pub struct OrderWriter {
    header: [u8; 5],
    schema: &'static Schema,
}

/// order.avsc, parsed once for the process.
static ORDER_AVSC: LazyLock<Result<Schema, String>> =
    LazyLock::new(|| Schema::parse_str(ORDER_SCHEMA).map_err(|e| e.to_string()));

fn order_avsc() -> Result<&'static Schema, CodecError> {
    ORDER_AVSC
        .as_ref()
        .map_err(|e| CodecError::invalid_avro(format!("order.avsc does not parse: {e}")))
}

impl OrderWriter {
    /// A writer for `order.avsc` registered under `schema_id`.
    pub fn new(schema_id: u32) -> Result<Self, CodecError> {
        let [a, b, c, d] = schema_id.to_be_bytes();
        Ok(Self {
            header: [0, a, b, c, d],
            schema: order_avsc()?,
        })
    }

    /// Replaces `buf`'s contents with `order`'s wire-format bytes.
    pub fn write(&self, order: &Order, buf: &mut Vec<u8>) -> Result<(), CodecError> {
        buf.clear();
        buf.extend_from_slice(&self.header);
        // order.avsc names no other types, so there are no references to resolve
        apache_avro::writer::datum::write_avro_datum_ref(self.schema, &HashMap::new(), order, buf)
            .map(|_| ())
            .map_err(|e| CodecError::invalid_avro(format!("order does not fit order.avsc: {e}")))
    }
}

/// Reads the Avro body (after the 5-byte header) of records written with order.avsc itself.
///
/// Only for bytes whose writer schema has order.avsc's Parsing Canonical Form: then the field
/// order and types are known and apache-avro's schema-aware serde reader builds the `Order`
/// directly, with its names resolved once rather than per record.
pub struct OrderReader {
    datum: GenericDatumReader<'static>,
}

impl std::fmt::Debug for OrderReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrderReader").finish_non_exhaustive()
    }
}

/// The most a decoded string may claim, well above Kafka's default 1 MiB record limit. Avro
/// allocates a string's length before reading it, and apache-avro's own default is 512 MiB: a
/// six-byte garbage record could otherwise make a 50 MB service allocate half a gigabyte.
pub const MAX_AVRO_ALLOCATION_BYTES: usize = 16 * 1024 * 1024;

impl OrderReader {
    pub fn new() -> Result<Self, CodecError> {
        // process-wide, first caller wins; the generic decoder path honours it too
        apache_avro::util::max_allocation_bytes(MAX_AVRO_ALLOCATION_BYTES);
        let datum = GenericDatumReader::builder(order_avsc()?)
            .build()
            .map_err(|e| CodecError::invalid_avro(format!("order.avsc does not resolve: {e}")))?;
        Ok(Self { datum })
    }

    /// Whether bytes written with `writer` can be read by [`OrderReader::read`].
    pub fn reads(writer: &Schema) -> bool {
        order_avsc().is_ok_and(|ours| ours.canonical_form() == writer.canonical_form())
    }

    /// The Order in `body`, an Avro datum written with order.avsc. Bytes that end early or hold
    /// invalid UTF-8 are `Malformed`.
    pub fn read(&self, mut body: &[u8]) -> Result<Order, CodecError> {
        self.datum.read_deser(&mut body).map_err(|e| {
            CodecError::invalid_avro(format!("Could not transform bytes using schema: {e}"))
        })
    }
}

/// Encodes and decodes Orders in the Confluent wire format for one topic.
///
/// Cheap to share behind an `Arc`: both halves cache schemas (the encoder per subject, the
/// decoder per id), so only the first message of each schema talks to the registry.
#[derive(Debug)]
pub struct OrderCodec {
    topic: String,
    encoder: AvroEncoder,
    decoder: AvroDecoder,
    reader: OrderReader,
    /// Per schema id met so far: whether its schema is order.avsc (the [`OrderReader`] path).
    layouts: RwLock<HashMap<u32, bool>>,
    /// The last id found to be order.avsc ([`NO_ID`] before the first): the common case, every
    /// record written with our schema, answered without the lock and the hash.
    order_avsc_id: AtomicU64,
}

/// No schema id: ids are 32-bit, so this never matches one.
const NO_ID: u64 = u64::MAX;

/// A record that [`OrderCodec::decode_now`] cannot decode without asking the registry: its
/// bytes and the schema id they name.
#[derive(Debug)]
pub struct NeedsRegistry<'b>(&'b [u8], u32);

impl OrderCodec {
    pub fn new(registry_url: &str, topic: &str) -> Result<Self, CodecError> {
        Self::with_access(&RegistryAccess::new(registry_url), topic)
    }

    /// A codec for `topic` through the registry `access` (URL, credentials, trust roots).
    pub fn with_access(access: &RegistryAccess, topic: &str) -> Result<Self, CodecError> {
        let settings = access.settings().map_err(CodecError::RegistryRejected)?;
        Ok(Self {
            topic: topic.to_owned(),
            encoder: AvroEncoder::new(settings.clone()),
            decoder: AvroDecoder::new(settings),
            reader: OrderReader::new()?,
            layouts: RwLock::default(),
            order_avsc_id: AtomicU64::new(NO_ID),
        })
    }

    /// The registry subject of the topic's values (`<topic>-value`).
    pub fn subject(&self) -> String {
        format!("{}-value", self.topic)
    }

    fn strategy(&self) -> SubjectNameStrategy {
        SubjectNameStrategy::TopicNameStrategyWithSchema(
            self.topic.clone(),
            false,
            SuppliedSchema::new(
                Some(ORDER_RECORD_NAME.to_owned()),
                SchemaType::Avro,
                ORDER_SCHEMA.to_owned(),
            ),
        )
    }

    /// Registers `order.avsc` under the topic's subject (a no-op if already there) and
    /// returns its id. A registry whose compatibility rules refuse it gives `RegistryRejected`.
    pub async fn register(&self) -> Result<u32, CodecError> {
        let subject = self.subject();
        match self
            .encoder
            .get_schema_and_id(&subject, self.strategy())
            .await
        {
            Ok(schema) => Ok(schema.id),
            Err(e) => {
                self.encoder.remove_errors_from_cache();
                if classify_registry_error(&e) == RegistryFailure::Unavailable {
                    Err(CodecError::RegistryUnavailable(e.to_string()))
                } else {
                    Err(CodecError::RegistryRejected(e.to_string()))
                }
            }
        }
    }

    /// Confluent wire-format bytes of `order`. Registers the schema on first use.
    pub async fn encode(&self, order: &Order) -> Result<Vec<u8>, CodecError> {
        // the subject's schema is cached after the first call, so the supplied schema is only
        // sent to the registry once
        self.encoder
            .encode(order.to_avro_fields(), self.strategy())
            .await
            .map_err(|e| {
                self.encoder.remove_errors_from_cache();
                if classify_registry_error(&e) == RegistryFailure::Unavailable {
                    CodecError::RegistryUnavailable(e.to_string())
                } else {
                    CodecError::RegistryRejected(e.to_string())
                }
            })
    }

    /// Decodes Confluent wire-format bytes into an Order.
    ///
    /// Garbage, a wrong magic byte, an unknown schema id, truncated Avro or a record of another
    /// shape are `Malformed`; an unreachable registry is `RegistryUnavailable`.
    pub async fn decode(&self, payload: Option<&[u8]>) -> Result<Order, CodecError> {
        match self.decode_now(payload) {
            Ok(decoded) => decoded,
            Err(NeedsRegistry(bytes, id)) => self.decode_asking(bytes, id).await,
        }
    }

    /// What [`OrderCodec::decode`] gives, when it can be had without asking the registry: a
    /// record that is not wire format, or one written with `order.avsc`'s id once that is
    /// known (nearly every record). A consumer calls this first and awaits `decode` only
    /// for the rest, so that the common record's path has nothing to wait on.
    pub fn decode_now<'b>(
        &self,
        payload: Option<&'b [u8]>,
    ) -> Result<Result<Order, CodecError>, NeedsRegistry<'b>> {
        let bytes = match payload {
            None => {
                return Ok(Err(CodecError::malformed(
                    MalformedKind::NullValue,
                    "record has no value (tombstone)",
                )));
            }
            Some(b) if b.len() < 5 => {
                return Ok(Err(CodecError::malformed(
                    MalformedKind::TooShort,
                    format!(
                        "{} bytes is shorter than the 5-byte Confluent header",
                        b.len()
                    ),
                )));
            }
            Some(b) if b[0] != 0 => {
                return Ok(Err(CodecError::malformed(
                    MalformedKind::BadMagicByte,
                    format!(
                        "magic byte is {:#04x}, not 0x00: not Confluent wire format",
                        b[0]
                    ),
                )));
            }
            Some(b) => b,
        };
        // the header was checked above, so the id is there
        let Some(id) = Self::schema_id(bytes) else {
            return Ok(Err(CodecError::malformed(
                MalformedKind::TooShort,
                "no Confluent wire-format header",
            )));
        };
        if self.order_avsc_id.load(Ordering::Relaxed) == u64::from(id) {
            return Ok(self.reader.read(&bytes[5..]));
        }
        Err(NeedsRegistry(bytes, id))
    }

    /// The rest of `decode`: a schema id not yet known to be `order.avsc`'s.
    async fn decode_asking(&self, bytes: &[u8], id: u32) -> Result<Order, CodecError> {
        let known = self.layouts.read().ok().and_then(|l| l.get(&id).copied());
        let is_order_avsc = match known {
            Some(known) => known,
            None => {
                let schema = self
                    .decoder
                    .get_schema(id)
                    .await
                    .map_err(|e| self.decode_error(e))?;
                let is_order_avsc = OrderReader::reads(&schema.parsed);
                if let Ok(mut l) = self.layouts.write() {
                    l.insert(id, is_order_avsc);
                }
                is_order_avsc
            }
        };
        if is_order_avsc {
            self.order_avsc_id.store(u64::from(id), Ordering::Relaxed);
            return self.reader.read(&bytes[5..]);
        }
        match self.decoder.decode(Some(bytes)).await {
            Ok(result) => Order::from_avro_value(result.value),
            Err(e) => Err(self.decode_error(e)),
        }
    }

    fn decode_error(&self, e: SRCError) -> CodecError {
        match classify_registry_error(&e) {
            RegistryFailure::Unavailable => {
                // a server error must not stay cached as if the id were unknown
                self.decoder.remove_errors_from_cache();
                CodecError::RegistryUnavailable(e.to_string())
            }
            RegistryFailure::UnknownSchema => {
                CodecError::malformed(MalformedKind::UnknownSchemaId, e.to_string())
            }
            RegistryFailure::Refused => {
                CodecError::malformed(MalformedKind::InvalidAvro, e.to_string())
            }
        }
    }

    /// The schema id a wire-format payload names, if it has a Confluent header.
    pub fn schema_id(payload: &[u8]) -> Option<u32> {
        match payload {
            [0, a, b, c, d, ..] => Some(u32::from_be_bytes([*a, *b, *c, *d])),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use apache_avro::Schema;

    fn order() -> Order {
        Order {
            order_id: "9d1c4f0e-0000-4000-8000-000000000001".into(),
            product: "laptop".into(),
            price: 1234.56,
        }
    }

    /// Orders at the edges of the wire format: empty and long strings, multi-byte UTF-8,
    /// negative zero and the largest double.
    fn edge_orders() -> [Order; 3] {
        [
            order(),
            Order {
                order_id: String::new(),
                product: "ünïcödé".into(),
                price: -0.0,
            },
            Order {
                order_id: "x".repeat(300),
                product: "phone".into(),
                price: f64::MAX,
            },
        ]
    }

    #[test]
    fn rust_type_and_avsc_do_not_drift() {
        // as in the services, the codec's allocation limit is set before anything decodes
        OrderReader::new().unwrap();
        let schema = Schema::parse_str(ORDER_SCHEMA).expect("order.avsc parses");
        let Schema::Record(record) = &schema else {
            panic!("order.avsc is not a record");
        };
        assert_eq!(record.name.fullname(None), ORDER_RECORD_NAME);

        // serde's view of the Rust type, field by field, must be exactly the schema's fields
        let Value::Record(from_serde) = apache_avro::to_value(order()).unwrap() else {
            panic!("Order does not serialize to a record");
        };
        let serde_names: Vec<&str> = from_serde.iter().map(|(n, _)| n.as_str()).collect();
        let schema_names: Vec<&str> = record.fields.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(serde_names, schema_names);
        // and every value must have the type the schema declares
        assert!(Value::Record(from_serde.clone()).validate(&schema));

        // the hand-written conversion used on the hot path agrees with serde
        let manual: Vec<(String, Value)> = order()
            .to_avro_fields()
            .into_iter()
            .map(|(n, v)| (n.to_owned(), v))
            .collect();
        assert_eq!(manual, from_serde);

        // and a full Avro round trip through the schema gives the same Order back
        let datum = apache_avro::writer::datum::GenericDatumWriter::builder(&schema)
            .build()
            .unwrap()
            .write_value_to_vec(Value::Record(manual))
            .unwrap();
        let read = apache_avro::reader::datum::GenericDatumReader::builder(&schema)
            .build()
            .unwrap()
            .read_value(&mut datum.as_slice())
            .unwrap();
        assert_eq!(Order::from_avro_value(read).unwrap(), order());
        assert_eq!(
            apache_avro::from_value::<Order>(&Value::Record(from_serde)).unwrap(),
            order()
        );
    }

    #[test]
    fn the_writer_writes_what_the_generic_avro_path_writes() {
        let schema = Schema::parse_str(ORDER_SCHEMA).unwrap();
        let writer = OrderWriter::new(0x0102_0304).unwrap();
        let mut buf = vec![9; 3];
        for o in edge_orders() {
            writer.write(&o, &mut buf).unwrap();
            assert_eq!(buf[..5], [0, 1, 2, 3, 4]);
            let generic = apache_avro::writer::datum::GenericDatumWriter::builder(&schema)
                .build()
                .unwrap()
                .write_value_to_vec(Value::Record(
                    o.to_avro_fields()
                        .into_iter()
                        .map(|(n, v)| (n.to_owned(), v))
                        .collect(),
                ))
                .unwrap();
            assert_eq!(buf[5..], generic[..], "{o:?}");
        }
    }

    #[test]
    fn the_reader_reads_what_the_generic_avro_path_reads() {
        let schema = Schema::parse_str(ORDER_SCHEMA).unwrap();
        let reader = OrderReader::new().unwrap();
        let generic = |body: &[u8]| {
            apache_avro::reader::datum::GenericDatumReader::builder(&schema)
                .build()
                .unwrap()
                .read_value(&mut &body[..])
                .map_err(|e| e.to_string())
                .and_then(|v| Order::from_avro_value(v).map_err(|e| e.to_string()))
        };
        let writer = OrderWriter::new(7).unwrap();
        let mut buf = Vec::new();
        for o in edge_orders() {
            writer.write(&o, &mut buf).unwrap();
            let body = &buf[5..];
            assert_eq!(reader.read(body).unwrap(), o);
            assert_eq!(generic(body).unwrap(), o);
            // every truncation fails on both paths, never panics
            for end in 0..body.len() {
                assert!(reader.read(&body[..end]).is_err(), "{o:?} cut at {end}");
                assert!(generic(&body[..end]).is_err(), "{o:?} cut at {end}");
            }
        }
        // invalid UTF-8 in a string field, and a length beyond the bytes
        for bad in [&[2, 0xff, 0][..], &[0x7e, b'a', b'b'][..], &[1][..]] {
            assert!(reader.read(bad).is_err(), "{bad:?}");
            assert!(generic(bad).is_err(), "{bad:?}");
        }
        // a string claiming 400 MB is refused before it is allocated
        let huge = [0x80, 0x80, 0x80, 0x80, 0x03];
        let e = reader.read(&huge).unwrap_err().to_string();
        assert!(e.contains("allocat"), "{e}");
        assert!(generic(&huge).unwrap_err().contains("allocat"));
    }

    #[test]
    fn the_reader_takes_only_order_avsc() {
        // docs do not change the layout; an added field or another type does
        let without_docs = r#"{"type":"record","name":"Order","namespace":"io.github.orderpipeline.orders.v1",
            "fields":[{"name":"orderId","type":"string"},{"name":"product","type":"string"},
                      {"name":"price","type":"double"}]}"#;
        assert!(OrderReader::reads(
            &Schema::parse_str(without_docs).unwrap()
        ));
        assert!(OrderReader::reads(
            &Schema::parse_str(ORDER_SCHEMA).unwrap()
        ));
        let evolved = without_docs.replace(
            r#"{"name":"price","type":"double"}"#,
            r#"{"name":"price","type":"double"},{"name":"note","type":"string","default":""}"#,
        );
        assert!(!OrderReader::reads(&Schema::parse_str(&evolved).unwrap()));
        let float_price = without_docs.replace(r#""type":"double""#, r#""type":"float""#);
        assert!(!OrderReader::reads(
            &Schema::parse_str(&float_price).unwrap()
        ));
    }

    #[test]
    fn from_avro_value_rejects_other_shapes() {
        assert!(Order::from_avro_value(Value::Long(3)).is_err());
        let missing = Value::Record(vec![("orderId".into(), Value::String("x".into()))]);
        assert!(Order::from_avro_value(missing).is_err());
        let wrong = Value::Record(vec![
            ("orderId".into(), Value::String("x".into())),
            ("product".into(), Value::String("phone".into())),
            ("price".into(), Value::String("1.00".into())),
        ]);
        assert!(matches!(
            Order::from_avro_value(wrong),
            Err(CodecError::Malformed {
                kind: MalformedKind::InvalidAvro,
                ..
            })
        ));
    }

    #[test]
    fn decode_now_waits_for_the_registry_only_for_an_id_not_yet_known() {
        // never asked: the registry's port is closed
        let codec = OrderCodec::new("http://127.0.0.1:1", "orders").unwrap();
        let kind = |decoded: Result<Result<Order, CodecError>, NeedsRegistry<'_>>| match decoded {
            Ok(Err(CodecError::Malformed { kind, .. })) => kind,
            other => panic!("{other:?}"),
        };
        assert_eq!(kind(codec.decode_now(None)), MalformedKind::NullValue);
        assert_eq!(
            kind(codec.decode_now(Some(&[0, 0]))),
            MalformedKind::TooShort
        );
        assert_eq!(
            kind(codec.decode_now(Some(&[1, 0, 0, 0, 7, 2]))),
            MalformedKind::BadMagicByte
        );
        let mut wire = Vec::new();
        OrderWriter::new(7)
            .unwrap()
            .write(&order(), &mut wire)
            .unwrap();
        assert!(matches!(
            codec.decode_now(Some(&wire)),
            Err(NeedsRegistry(_, 7))
        ));
        // what `decode` notes once the registry said id 7 is order.avsc
        codec.order_avsc_id.store(7, Ordering::Relaxed);
        assert_eq!(codec.decode_now(Some(&wire)).unwrap().unwrap(), order());
        let mut other = wire.clone();
        other[4] = 8;
        assert!(matches!(
            codec.decode_now(Some(&other)),
            Err(NeedsRegistry(_, 8))
        ));
    }

    #[test]
    fn schema_id_reads_the_confluent_header() {
        assert_eq!(OrderCodec::schema_id(&[0, 0, 0, 1, 2, 9]), Some(258));
        assert_eq!(OrderCodec::schema_id(&[1, 0, 0, 0, 1]), None);
        assert_eq!(OrderCodec::schema_id(&[0, 0]), None);
    }

    /// The error schema_registry_converter 6 builds for a non-2xx answer (`send_with_auth`):
    /// what the registry's JSON body said, as the cause.
    fn http_error(status: &str, error_code: u32, retriable: bool) -> SRCError {
        SRCError::new(
            &format!("HTTP request to schema registry failed with status {status}"),
            Some(format!("error_code: {error_code}, message: something")),
            retriable,
        )
    }

    #[test]
    fn registry_errors_are_classified_from_the_crates_wording() {
        use RegistryFailure::{Refused, Unavailable, UnknownSchema};
        let cases = [
            (http_error("404 Not Found", 40403, false), UnknownSchema),
            (
                http_error("503 Service Unavailable", 50003, true),
                Unavailable,
            ),
            (
                http_error("500 Internal Server Error", 50001, false),
                Unavailable,
            ),
            (http_error("401 Unauthorized", 40101, false), Unavailable),
            (http_error("403 Forbidden", 40301, false), Unavailable),
            (
                http_error("429 Too Many Requests", 42901, false),
                Unavailable,
            ),
            (http_error("504 Gateway Timeout", 0, false), Unavailable),
            // a 404 without Confluent's error code: a wrong base URL, not an unknown id
            (http_error("404 Not Found", 0, false), Unavailable),
            (
                http_error("422 Unprocessable Entity", 42201, false),
                Refused,
            ),
            (
                SRCError::new("Could not transform bytes using schema", None, false),
                Refused,
            ),
            (
                SRCError::new("http call to schema registry failed", None, true),
                Unavailable,
            ),
        ];
        for (e, expected) in cases {
            assert_eq!(classify_registry_error(&e), expected, "{e}");
        }
    }

    #[test]
    fn malformed_errors_say_their_kind() {
        let e = CodecError::malformed(MalformedKind::BadMagicByte, "magic byte is 0x01");
        assert_eq!(
            e.to_string(),
            "not a valid Order (bad_magic_byte): magic byte is 0x01"
        );
        assert!(!e.is_temporary());
    }
}
