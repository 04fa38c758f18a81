//! One partition's queue of a high-level consumer, consumed in batches.
//!
//! rust-rdkafka hands out one message per poll. Each poll of librdkafka's queue pays a fixed
//! toll: rust-rdkafka's deadline, three clock reads in librdkafka, and a poll-idle-ratio
//! average that librdkafka updates under a client-wide mutex (`rd_kafka_app_poll_start`),
//! which the partition tasks of one consumer all contend for, a large share of the
//! processor's CPU. `rd_kafka_consume_batch_queue` pays it once per batch.
//!
//! [`PartitionBatches::split`] does what rust-rdkafka's `split_partition_queue` does (take the
//! partition's queue, stop its forwarding to the consumer's queue), with a wake-up that a
//! task can await; [`PartitionBatches::pop`] takes what is queued, without waiting.
//!
//! [`RawMessage::last_header`] reads one header in place from the bytes librdkafka keeps of a
//! fetched record (`wire.rs` has the framing), where asking librdkafka (`headers()`) makes it
//! parse and copy every header of the record first, in several allocations. With 1 % of traces
//! sampled upstream the processor reads every record's `traceparent`, so that parse is paid
//! on every record. Those bytes are not in librdkafka's public API: they
//! are read from its message struct, whose layout is known for one librdkafka version
//! ([`LAYOUT_VERSION`]); with any other, `last_header` asks librdkafka instead.
//!
//! This crate is the workspace's only unsafe code: every block says why it is sound.

use std::ffi::{CStr, CString, c_int, c_void};
use std::marker::PhantomData;
use std::ptr::{self, NonNull};
use std::sync::{Arc, OnceLock};

use rdkafka::bindings as rd;
use rdkafka::consumer::{Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage, Timestamp};
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::Notify;

mod wire;

/// The most messages one [`PartitionBatches::pop`] takes.
pub const MAX_BATCH: usize = 64;

/// The librdkafka version (`rd_kafka_version()`) whose `rd_kafka_msg_t` [`MsgPrefix`] mirrors:
/// 2.12.1, the one rdkafka-sys 4.10 bundles. A test fails when the linked one is another, so
/// that whoever upgrades checks the struct again (`src/rdkafka_msg.h`) and moves this on.
pub const LAYOUT_VERSION: c_int = 0x020c_01ff;

/// Whether [`RawMessage::last_header`] reads headers in place: the linked librdkafka is the
/// one whose message layout this crate knows ([`LAYOUT_VERSION`]).
pub fn reads_headers_in_place() -> bool {
    static KNOWN: OnceLock<bool> = OnceLock::new();
    // SAFETY: a plain query of a constant, callable at any time.
    *KNOWN.get_or_init(|| unsafe { rd::rd_kafka_version() } == LAYOUT_VERSION)
}

/// The front of librdkafka's private `rd_kafka_msg_t` (`src/rdkafka_msg.h` of librdkafka
/// [`LAYOUT_VERSION`]), up to the consumer's unparsed headers: every `rd_kafka_message_t`
/// librdkafka hands out is the first field of one (`rd_kafka_message2msg` is a cast). Only read
/// where [`reads_headers_in_place`].
#[repr(C)]
struct MsgPrefix {
    rkmessage: rd::rd_kafka_message_t,
    /// `TAILQ_ENTRY(rd_kafka_msg_s) rkm_link`: next and prev pointers.
    link: [*mut c_void; 2],
    flags: c_int,
    /// `rd_kafka_timestamp_type_t`, an `int`-sized enum.
    tstype: c_int,
    timestamp: i64,
    headers: *mut c_void,
    /// `rd_kafka_msg_status_t`, an `int`-sized enum.
    status: c_int,
    broker_id: i32,
    /// `rkm_u.consumer.binhdrs`, at the start of the union (8-aligned: its producer member has
    /// 64-bit fields, and so does everything before it).
    binhdrs: KafkaBytes,
}

/// librdkafka's `rd_kafkap_bytes_t`, without its trailing inline bytes.
#[repr(C)]
struct KafkaBytes {
    /// -1 for null, else the length of `data`.
    len: i32,
    data: *const c_void,
}

/// One partition's queue, split from its consumer's.
pub struct PartitionBatches {
    queue: NonNull<rd::rd_kafka_queue_t>,
    /// Notified by librdkafka when the queue stops being empty.
    wake: Arc<Notify>,
    /// Keeps the consumer (and so librdkafka's handle) alive as long as the queue.
    _consumer: Arc<dyn Send + Sync>,
}

// SAFETY: librdkafka's queues are thread-safe (every operation takes the queue's lock), and
// the handle is only used through them.
unsafe impl Send for PartitionBatches {}
// SAFETY: as above; `&self` methods only call thread-safe librdkafka functions.
unsafe impl Sync for PartitionBatches {}

impl std::fmt::Debug for PartitionBatches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionBatches").finish_non_exhaustive()
    }
}

/// librdkafka calls this, under the queue's lock, when a message arrives in an empty queue.
unsafe extern "C" fn queue_nonempty(_rk: *mut rd::rd_kafka_t, opaque: *mut c_void) {
    // SAFETY: `opaque` is `Arc::as_ptr` of the queue's `wake`, set in `split`; the Arc lives
    // in the `PartitionBatches`, whose `Drop` disables this callback (under the same lock)
    // before the Arc can go.
    let wake = unsafe { &*opaque.cast::<Notify>() };
    wake.notify_one();
}

impl PartitionBatches {
    /// Splits `partition` of `topic` from the consumer's queue, as rust-rdkafka's
    /// `split_partition_queue` does: call it when the partition is assigned, before its
    /// records reach the consumer's queue. `None` when librdkafka does not know the partition.
    pub fn split<K, C>(consumer: &Arc<K>, topic: &str, partition: i32) -> Option<Self>
    where
        K: Consumer<C> + Send + Sync + 'static,
        C: ConsumerContext + 'static,
    {
        let topic = CString::new(topic).ok()?;
        let rk = consumer.client().native_ptr();
        // SAFETY: `rk` is the live handle of `consumer`, `topic` a NUL-terminated string that
        // outlives the call; librdkafka returns a new reference to the partition's queue, or
        // NULL.
        let queue = NonNull::new(unsafe {
            rd::rd_kafka_queue_get_partition(rk, topic.as_ptr(), partition)
        })?;
        let wake = Arc::new(Notify::new());
        // SAFETY: `queue` is the reference just taken. Forwarding to NULL detaches it from
        // the consumer's queue. The callback's opaque pointer stays valid until `Drop`
        // disables the callback (see `queue_nonempty`).
        unsafe {
            rd::rd_kafka_queue_forward(queue.as_ptr(), ptr::null_mut());
            rd::rd_kafka_queue_cb_event_enable(
                queue.as_ptr(),
                Some(queue_nonempty),
                Arc::as_ptr(&wake).cast_mut().cast::<c_void>(),
            );
        }
        Some(PartitionBatches {
            queue,
            wake,
            _consumer: consumer.clone(),
        })
    }

    /// Takes up to [`MAX_BATCH`] messages that are queued now, without waiting, in order.
    /// A message can carry a consumer error instead of a record ([`RawMessage::error`]).
    pub fn pop<'q>(&'q self, out: &mut Vec<RawMessage<'q>>) {
        self.pop_at_most(out, MAX_BATCH);
    }

    /// Takes up to `max` (at most [`MAX_BATCH`]) messages that are queued now, without
    /// waiting, in order: [`PartitionBatches::pop`] for a worker with room for fewer.
    pub fn pop_at_most<'q>(&'q self, out: &mut Vec<RawMessage<'q>>, max: usize) {
        let max = max.min(MAX_BATCH);
        if max == 0 {
            return;
        }
        let mut batch: [*mut rd::rd_kafka_message_t; MAX_BATCH] = [ptr::null_mut(); MAX_BATCH];
        // SAFETY: the queue is live; librdkafka writes at most `max` (<= MAX_BATCH) message
        // pointers into `batch` and returns how many (or -1 on error, when it writes none).
        // Timeout 0: it does not block.
        let n = unsafe {
            rd::rd_kafka_consume_batch_queue(self.queue.as_ptr(), 0, batch.as_mut_ptr(), max)
        };
        let n = usize::try_from(n).unwrap_or(0).min(max);
        out.extend(
            batch
                .iter()
                .take(n)
                .filter_map(|m| NonNull::new(*m))
                .map(|ptr| RawMessage {
                    ptr,
                    headers: OnceLock::new(),
                    _queue: PhantomData,
                }),
        );
    }

    /// Waits until a message may have arrived. A wake-up can come with nothing to pop (one
    /// left over from messages already popped): pop, then wait again.
    pub async fn wait(&self) {
        self.wake.notified().await;
    }
}

impl Drop for PartitionBatches {
    fn drop(&mut self) {
        // SAFETY: disabling takes the queue's lock, the one the callback runs under, so no
        // callback runs after it and `wake` may go; then the reference from `split` is
        // released (the partition stays detached, as with rust-rdkafka's split queue).
        unsafe {
            rd::rd_kafka_queue_cb_event_enable(self.queue.as_ptr(), None, ptr::null_mut());
            rd::rd_kafka_queue_destroy(self.queue.as_ptr());
        }
    }
}

/// A message popped from a [`PartitionBatches`], freed when dropped; it cannot outlive its
/// queue (and so the consumer).
pub struct RawMessage<'q> {
    ptr: NonNull<rd::rd_kafka_message_t>,
    /// Parsed by librdkafka on first use (it allocates), so only when asked for.
    headers: OnceLock<Option<RawHeaders>>,
    _queue: PhantomData<&'q PartitionBatches>,
}

// SAFETY: a popped message belongs to whoever holds it: librdkafka does not touch it again
// until `rd_kafka_message_destroy`, and it may be read and freed from any thread.
unsafe impl Send for RawMessage<'_> {}
// SAFETY: `&self` methods only read the message; the one lazy write (header parsing) is done
// once, under the `OnceLock`.
unsafe impl Sync for RawMessage<'_> {}

impl std::fmt::Debug for RawMessage<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawMessage")
            .field("partition", &self.partition())
            .field("offset", &self.offset())
            .finish_non_exhaustive()
    }
}

impl RawMessage<'_> {
    fn raw(&self) -> &rd::rd_kafka_message_t {
        // SAFETY: the pointer came from librdkafka and stays valid until `Drop`.
        unsafe { self.ptr.as_ref() }
    }

    /// The consumer error this message carries instead of a record, if any.
    pub fn error(&self) -> Option<KafkaError> {
        let err = self.raw().err;
        (err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR)
            .then(|| KafkaError::MessageConsumption(RDKafkaErrorCode::from(err)))
    }

    /// The value of the last header called `name` (`Some(&[])` for a null value): what
    /// `headers()` and [`RawHeaders::last`] give, without librdkafka parsing and copying every
    /// header first. Read in place where [`reads_headers_in_place`], else through
    /// librdkafka. `None` for a consumer error too.
    pub fn last_header(&self, name: &CStr) -> Option<&[u8]> {
        if !reads_headers_in_place() {
            return self.headers()?.last(name);
        }
        if self.raw().err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            return None;
        }
        // SAFETY: the message librdkafka handed out is the first field of its `rd_kafka_msg_t`,
        // whose front `MsgPrefix` mirrors for the linked version (checked just above), and
        // it lives until `Drop`. For a fetched record, `binhdrs` was written by the broker
        // thread before the message was queued, is never written again, and points at `len`
        // bytes of the fetch buffer that the message holds a reference to, as `key` and
        // `payload` do; for any other message it is zeroed.
        let bytes = unsafe {
            let b = &(*self.ptr.as_ptr().cast::<MsgPrefix>()).binhdrs;
            match usize::try_from(b.len) {
                Ok(len) if len > 0 && !b.data.is_null() => {
                    std::slice::from_raw_parts(b.data.cast::<u8>(), len)
                }
                _ => &[],
            }
        };
        wire::last_header(bytes, name.to_bytes())
    }
}

impl Drop for RawMessage<'_> {
    fn drop(&mut self) {
        // SAFETY: the message is ours (popped) and freed once, here; `RawHeaders` borrowed
        // from it cannot outlive `self`.
        unsafe { rd::rd_kafka_message_destroy(self.ptr.as_ptr()) }
    }
}

/// # Safety of the slices
/// `key`, `payload` and the topic name point into the message, which lives as long as `self`.
impl Message for RawMessage<'_> {
    type Headers = RawHeaders;

    fn key(&self) -> Option<&[u8]> {
        let m = self.raw();
        // SAFETY: see the impl's note; librdkafka gives `key_len` bytes at `key` (or NULL).
        (!m.key.is_null())
            .then(|| unsafe { std::slice::from_raw_parts(m.key.cast::<u8>(), m.key_len) })
    }

    fn payload(&self) -> Option<&[u8]> {
        let m = self.raw();
        // SAFETY: as for `key`, `len` bytes at `payload`.
        (!m.payload.is_null())
            .then(|| unsafe { std::slice::from_raw_parts(m.payload.cast::<u8>(), m.len) })
    }

    unsafe fn payload_mut(&mut self) -> Option<&mut [u8]> {
        let m = self.raw();
        let (p, len) = (m.payload, m.len);
        // SAFETY: the caller takes on librdkafka's (lack of) guarantee, as the trait says;
        // the bytes are the message's own.
        (!p.is_null()).then(|| unsafe { std::slice::from_raw_parts_mut(p.cast::<u8>(), len) })
    }

    fn topic(&self) -> &str {
        // SAFETY: a consumed message has its topic handle; its name is a NUL-terminated
        // string that the handle, kept by the message, owns.
        let name = unsafe { CStr::from_ptr(rd::rd_kafka_topic_name(self.raw().rkt)) };
        // Kafka topic names are ASCII ([a-zA-Z0-9._-]); never panic on the impossible
        name.to_str().unwrap_or("")
    }

    fn partition(&self) -> i32 {
        self.raw().partition
    }

    fn offset(&self) -> i64 {
        self.raw().offset
    }

    fn timestamp(&self) -> Timestamp {
        let mut kind = rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
        // SAFETY: a live message and a place for the type.
        let ts = unsafe { rd::rd_kafka_message_timestamp(self.ptr.as_ptr(), &raw mut kind) };
        match kind {
            _ if ts == -1 => Timestamp::NotAvailable,
            rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_CREATE_TIME => {
                Timestamp::CreateTime(ts)
            }
            rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_LOG_APPEND_TIME => {
                Timestamp::LogAppendTime(ts)
            }
            rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE => {
                Timestamp::NotAvailable
            }
        }
    }

    fn headers(&self) -> Option<&RawHeaders> {
        self.headers
            .get_or_init(|| {
                let mut h = ptr::null_mut();
                // SAFETY: a live message; librdkafka parses its headers once and keeps them
                // with the message (NULL and an error when there are none).
                let err = unsafe { rd::rd_kafka_message_headers(self.ptr.as_ptr(), &raw mut h) };
                (err == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR)
                    .then(|| NonNull::new(h).map(|ptr| RawHeaders { ptr }))
                    .flatten()
            })
            .as_ref()
    }
}

/// The headers of a [`RawMessage`], read in place.
pub struct RawHeaders {
    ptr: NonNull<rd::rd_kafka_headers_t>,
}

// SAFETY: read-only access to headers owned by a message that is itself Send and Sync.
unsafe impl Send for RawHeaders {}
// SAFETY: as above.
unsafe impl Sync for RawHeaders {}

impl RawHeaders {
    /// The value of the last header called `name` (`Some(&[])` for a null value), found by
    /// librdkafka itself: no name is converted or checked on the way.
    pub fn last(&self, name: &CStr) -> Option<&[u8]> {
        let (mut value, mut size) = (ptr::null(), 0usize);
        // SAFETY: live headers and a NUL-terminated name; on success librdkafka points `value`
        // at `size` bytes owned by the headers (or NULL for a null value).
        let err = unsafe {
            rd::rd_kafka_header_get_last(
                self.ptr.as_ptr(),
                name.as_ptr(),
                &raw mut value,
                &raw mut size,
            )
        };
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            return None;
        }
        Some(if value.is_null() {
            &[]
        } else {
            // SAFETY: as above.
            unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) }
        })
    }
}

/// A header name that is not UTF-8 (Kafka allows any bytes) reads as this, so that iterating
/// never panics; its value is still there.
const NOT_UTF8: &str = "\u{fffd}";

impl Headers for RawHeaders {
    fn count(&self) -> usize {
        // SAFETY: live headers (they belong to the message that lent them).
        unsafe { rd::rd_kafka_header_cnt(self.ptr.as_ptr()) }
    }

    fn try_get(&self, idx: usize) -> Option<Header<'_, &[u8]>> {
        let (mut name, mut value, mut size) = (ptr::null(), ptr::null(), 0usize);
        // SAFETY: live headers; librdkafka fills the three places or returns an error for an
        // index out of range.
        let err = unsafe {
            rd::rd_kafka_header_get_all(
                self.ptr.as_ptr(),
                idx,
                &raw mut name,
                &raw mut value,
                &raw mut size,
            )
        };
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            return None;
        }
        // SAFETY: on success `name` is a NUL-terminated string and `value` `size` bytes (or
        // NULL for a null value), both owned by the headers.
        let key = unsafe { CStr::from_ptr(name) }.to_str().unwrap_or(NOT_UTF8);
        let value = (!value.is_null())
            // SAFETY: as above.
            .then(|| unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) });
        Some(Header { key, value })
    }
}

/// A copy of the message that owns its bytes and headers, for a record kept longer than a
/// batch: a popped librdkafka message keeps its whole fetch buffer alive.
pub fn detach(m: &RawMessage<'_>) -> OwnedMessage {
    let headers = m.headers().map(|h| {
        let mut owned = OwnedHeaders::new_with_capacity(h.count());
        for header in h.iter() {
            owned = owned.insert(header);
        }
        owned
    });
    OwnedMessage::new(
        m.payload().map(<[u8]>::to_vec),
        m.key().map(<[u8]>::to_vec),
        m.topic().to_owned(),
        m.timestamp(),
        m.partition(),
        m.offset(),
        headers,
    )
}
