//! `PartitionBatches` against the native broker: a split partition's records arrive whole, in
//! order, in batches, only from that partition, and a record reaching the emptied queue wakes
//! the task that waits for it. A header read in place is the one librdkafka's parse gives.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use kafka_batch::{MAX_BATCH, PartitionBatches};
use order_testkit::{Stack, unique};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, Timestamp};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

const N: i64 = 300;
/// The header names each record is looked up by, in place and through librdkafka.
const NAMES: [&std::ffi::CStr; 3] = [c"n", c"empty", c"missing"];
const T0: i64 = 1_700_000_000_000;

/// Record `i` of partition 0: every tenth from 3 has no key, from 7 no value (a tombstone),
/// from 5 no headers at all. The others carry `n`; even ones a header with no value besides;
/// every third one `n` again last, with another value.
async fn produce(producer: &FutureProducer, topic: &str, i: i64) {
    let (key, value) = (format!("k{i}"), format!("v{i}"));
    let mut headers = OwnedHeaders::new().insert(Header {
        key: "n",
        value: Some(value.as_bytes()),
    });
    if i % 2 == 0 {
        headers = headers.insert(Header {
            key: "empty",
            value: None::<&[u8]>,
        });
    }
    if i % 3 == 0 {
        headers = headers.insert(Header {
            key: "n",
            value: Some(b"again"),
        });
    }
    let mut r: FutureRecord<'_, [u8], [u8]> =
        FutureRecord::to(topic).partition(0).timestamp(T0 + i);
    if i % 10 != 5 {
        r = r.headers(headers);
    }
    if i % 10 != 3 {
        r = r.key(key.as_bytes());
    }
    if i % 10 != 7 {
        r = r.payload(value.as_bytes());
    }
    producer
        .send(r, Duration::from_secs(30))
        .await
        .map_err(|(e, _)| e)
        .expect("produce");
}

#[test]
fn the_linked_librdkafka_is_the_one_whose_message_layout_is_known() {
    // a new librdkafka (an rdkafka upgrade) makes RawMessage::last_header ask librdkafka again,
    // which is safe but slow: check rd_kafka_msg_t in its src/rdkafka_msg.h against MsgPrefix,
    // then move LAYOUT_VERSION on
    assert!(
        kafka_batch::reads_headers_in_place(),
        "librdkafka {:#x} is linked, MsgPrefix mirrors {:#x}",
        rdkafka::util::get_rdkafka_version().0,
        kafka_batch::LAYOUT_VERSION
    );
}

#[tokio::test]
async fn a_split_partition_is_popped_whole_in_order_and_wakes_its_waiter() {
    let stack = Stack::from_env();
    let topic = unique("batch");
    stack.create_topic(&topic, 2).await;
    let producer = stack.producer();
    for i in 0..N {
        produce(&producer, &topic, i).await;
    }
    // the other partition's record must not show up in partition 0's queue
    stack
        .produce_raw(&producer, &topic, Some(1), Some(b"x"), Some(b"x"), &[])
        .await;

    let consumer: Arc<StreamConsumer> = Arc::new(
        ClientConfig::new()
            .set("bootstrap.servers", &stack.bootstrap)
            .set("group.id", unique("g"))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap(),
    );
    let queue = PartitionBatches::split(&consumer, &topic, 0).expect("partition 0's queue");
    let mut tpl = TopicPartitionList::new();
    for p in 0..2 {
        tpl.add_partition_offset(&topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();

    let mut batch = Vec::new();
    let mut offsets = Vec::new();
    let mut largest = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while offsets.len() < usize::try_from(N).unwrap() {
        assert!(
            Instant::now() < deadline,
            "only {} records in 60 s",
            offsets.len()
        );
        queue.pop(&mut batch);
        largest = largest.max(batch.len());
        if batch.is_empty() {
            tokio::time::timeout(Duration::from_secs(20), queue.wait())
                .await
                .expect("woken when records arrive");
            continue;
        }
        for m in batch.drain(..) {
            assert!(m.error().is_none(), "{:?}", m.error());
            let i = m.offset();
            assert_eq!((m.topic(), m.partition()), (topic.as_str(), 0));
            let (key, value) = (format!("k{i}"), format!("v{i}"));
            assert_eq!(
                m.key(),
                (i % 10 != 3).then_some(key.as_bytes()),
                "key of {i}"
            );
            assert_eq!(
                m.payload(),
                (i % 10 != 7).then_some(value.as_bytes()),
                "value of {i}"
            );
            assert_eq!(m.timestamp(), Timestamp::CreateTime(T0 + i));
            // read in place before librdkafka parses the headers, then compared with its parse
            let in_place = NAMES.map(|name| m.last_header(name));
            let headers: Vec<(String, Option<Vec<u8>>)> = m
                .headers()
                .iter()
                .flat_map(|h| h.iter())
                .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                .collect();
            let mut expected = vec![("n".to_owned(), Some(value.clone().into_bytes()))];
            if i % 2 == 0 {
                expected.push(("empty".to_owned(), None));
            }
            if i % 3 == 0 {
                expected.push(("n".to_owned(), Some(b"again".to_vec())));
            }
            if i % 10 == 5 {
                expected.clear();
            }
            assert_eq!(headers, expected, "headers of {i}");
            let parsed = NAMES.map(|name| m.headers().and_then(|h| h.last(name)));
            assert_eq!(in_place, parsed, "headers of {i} read in place");
            let n = if i % 3 == 0 {
                &b"again"[..]
            } else {
                value.as_bytes()
            };
            let expected_n = (i % 10 != 5).then_some(n);
            assert_eq!(in_place[0], expected_n, "the last n of {i}");
            offsets.push(i);
        }
    }
    assert_eq!(
        offsets,
        (0..N).collect::<Vec<_>>(),
        "every record once, in order"
    );
    assert!(
        (2..=MAX_BATCH).contains(&largest),
        "records come in batches of up to {MAX_BATCH}: the largest was {largest}"
    );

    // a record that reaches the emptied queue wakes the task waiting on it
    let _ = tokio::time::timeout(Duration::from_millis(200), queue.wait()).await; // a stale wake-up
    queue.pop(&mut batch);
    assert!(batch.is_empty(), "nothing left: {batch:?}");
    let late = {
        let (producer, topic) = (producer.clone(), topic.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            produce(&producer, &topic, N).await;
        })
    };
    tokio::time::timeout(Duration::from_secs(20), queue.wait())
        .await
        .expect("woken by the late record");
    late.await.unwrap();
    queue.pop(&mut batch);
    assert_eq!(
        batch.iter().map(Message::offset).collect::<Vec<_>>(),
        vec![N],
        "the late record"
    );
    drop(batch);
    drop(queue);
}
