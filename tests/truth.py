"""The ground truth of a run, from the topics themselves, read back with Python's
confluent-kafka: every record on the orders topic is decoded and judged by the business rules
here, independently of our Rust code, and the orders whose temporary failures outlive their
retries are computed from the processor's TRANSIENT_FAILURE_SEED by the rule
docs/processing.md states; the dead-letter topic is checked against that judgement. Shared by
the interoperability, image and cluster tests."""

import os
import time

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext

from support import get_json, unique, wait_for

BOOTSTRAP = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
REGISTRY = os.environ.get("SCHEMA_REGISTRY_URL", "http://127.0.0.1:8081/apis/ccompat/v7")
PRODUCTS = {"laptop", "phone", "tablet", "monitor", "keyboard", "mouse", "headphones", "camera", "printer", "speaker"}
MAX_PRICE_CENTS = 1_000_000_00
GARBAGE = [b"this is not an order", b'{"orderId": "json-instead-of-avro"}', b"\x00\x00"]


class Failures:
    """Seeded temporary failures as the processor runs them (TRANSIENT_FAILURE_SEED,
    TRANSIENT_FAILURE_RATE, MAX_RETRIES): attempt n of order `id` fails when the 64-bit FNV-1a
    hash of the UTF-8 text "<seed>:<id>:<n>", mixed by MurmurHash3's fmix64, is below
    rate * 2**64."""

    def __init__(self, seed, rate, max_retries=3):
        self.seed, self.rate, self.max_retries = seed, float(rate), int(max_retries)

    def env(self):
        """The processor's settings for these failures."""
        return {"TRANSIENT_FAILURE_SEED": self.seed, "TRANSIENT_FAILURE_RATE": str(self.rate),
                "MAX_RETRIES": str(self.max_retries)}

    @staticmethod
    def draw(text):
        mask = 0xFFFFFFFFFFFFFFFF
        h = 0xcbf29ce484222325
        for b in text.encode():
            h = ((h ^ b) * 0x100000001b3) & mask
        for factor in (0xff51afd7ed558ccd, 0xc4ceb9fe1a85ec53):
            h = ((h ^ (h >> 33)) * factor) & mask
        return h ^ (h >> 33)

    def fails(self, order_id, attempt):
        return float(self.draw(f"{self.seed}:{order_id}:{attempt}")) < self.rate * 2.0 ** 64

    def exhausts(self, order_id):
        return all(self.fails(order_id, n) for n in range(1, self.max_retries + 2))


def create_topics(orders, dlq, partitions=3):
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    for f in admin.create_topics([NewTopic(orders, partitions, 1), NewTopic(dlq, 3, 1)]).values():
        f.result(timeout=30)


def send_garbage(topic):
    producer = Producer({"bootstrap.servers": BOOTSTRAP})
    for i, value in enumerate(GARBAGE):
        producer.produce(topic, key=f"garbage-{i}", value=value)
    assert producer.flush(30) == 0


def read_all(topic):
    """Every record of `topic`, from the first offset to the end, as (partition, offset, key, value, headers)."""
    consumer = Consumer({"bootstrap.servers": BOOTSTRAP, "group.id": unique("truth"),
                         "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    meta = consumer.list_topics(topic, timeout=10).topics[topic]
    ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in meta.partitions}
    consumer.assign([TopicPartition(topic, p, 0) for p in ends])
    records, done = [], {p for p, end in ends.items() if end == 0}
    deadline = time.time() + 60
    while len(done) < len(ends) and time.time() < deadline:
        msg = consumer.poll(0.5)
        if msg is not None and not msg.error():
            records.append((msg.partition(), msg.offset(), msg.key(), msg.value(), dict(msg.headers() or [])))
        # the position, not the last record: transaction markers (exactly-once dead letters)
        # take offsets that no record has
        for tp in consumer.position([TopicPartition(topic, p) for p in ends if p not in done]):
            if tp.offset >= ends[tp.partition]:
                done.add(tp.partition)
    consumer.close()
    assert len(done) == len(ends), f"could not read {topic} to its end"
    return records


def judge(orders_topic, failures):
    """The ground truth of the orders topic: {(partition, offset): cents} of the orders to be
    processed and {(partition, offset): category} of the records that must be dead-lettered
    (the ones that are not Orders, break a rule, or whose seeded failures outlive their retries)."""
    deserializer = AvroDeserializer(SchemaRegistryClient({"url": REGISTRY, "timeout": 10}))
    valid, failing = {}, {}
    for partition, offset, _key, value, _headers in read_all(orders_topic):
        where = (partition, offset)
        try:
            order = deserializer(value, SerializationContext(orders_topic, MessageField.VALUE))
        except Exception:  # noqa: BLE001 - any bytes that are not an Order
            failing[where] = "deserialization"
            continue
        cents = round(order["price"] * 100)
        if (not order["orderId"].strip() or order["product"] not in PRODUCTS or not order["price"] > 0
                or abs(order["price"] * 100 - cents) > 1e-6 or cents > MAX_PRICE_CENTS):
            failing[where] = "validation"
        elif failures.exhausts(order["orderId"]):
            failing[where] = "retries_exhausted"
        else:
            valid[where] = cents
    return valid, failing


def check_totals(orders_topic, dlq_topic, processor, analyzer, failures, stats="/stats/global"):
    """Asserts the processor's group totals and the dead-letter topic against the ground truth.
    `processor` and `analyzer` are where support.get_json finds them (a port, or host:port);
    `failures` the processor's seeded failures (Failures). `stats` is where the totals are: the
    group's (exactly-once), or `/stats` for the one at-least-once processor of a run without
    crashes."""
    valid, failing = judge(orders_topic, failures)
    expected = len(valid) + len(failing)
    seen = {}

    def settled():
        seen["stats"] = get_json(processor, stats)
        done = seen["stats"]["processed"] + seen["stats"]["dead_lettered"]
        return seen["stats"] if done >= expected else None

    try:
        stats = wait_for(f"{expected} records settled", settled, 180)
    except AssertionError as e:
        raise AssertionError(f"{e}; the group's last totals: {seen.get('stats')}") from None
    dead = read_all(dlq_topic)
    by_origin = {}
    for _p, _o, key, value, headers in dead:
        origin = (int(headers["dlq.original.partition"]), int(headers["dlq.original.offset"]))
        assert origin not in by_origin, f"{origin} dead-lettered twice"
        by_origin[origin] = (headers["dlq.error.category"].decode(), key, value)
    # every record that must fail is dead-lettered once, with the right category, and no other
    for origin, category in failing.items():
        assert origin in by_origin, f"record {origin} ({category}) was not dead-lettered"
        assert by_origin[origin][0] == category, (origin, by_origin[origin][0], category)
    assert set(by_origin) == set(failing), \
        f"dead letters with no reason to be there: {sorted(set(by_origin) - set(failing))[:10]}"
    processed = valid
    assert stats["processed"] == len(processed)
    assert stats["dead_lettered"] == len(by_origin)
    assert round(stats["revenue"] * 100) == sum(processed.values())
    assert round(stats["min"] * 100) == min(processed.values())
    assert round(stats["max"] * 100) == max(processed.values())
    report = wait_for("the analyzer's report", lambda: (
        r if (r := get_json(analyzer, "/report"))["total"] >= len(by_origin) else None), 60)
    assert report["total"] == len(by_origin)
    return len(processed), len(by_origin)
