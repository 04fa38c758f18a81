"""A Confluent client written by someone else talks to our stack and our services.

Python's confluent-kafka, with its Schema Registry client, Avro serializer and deserializer,
uses the endpoints `make -s stack-env` prints: it reads the orders our generator wrote, and
our processor reads the orders it writes, down to the cent.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import time
import urllib.request
import uuid

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = ROOT / "target" / "debug"
BOOTSTRAP = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
REGISTRY = os.environ.get("SCHEMA_REGISTRY_URL", "http://127.0.0.1:8081/apis/ccompat/v7")
SCHEMA = (ROOT / "schemas" / "order.avsc").read_text()
PRODUCTS = ["laptop", "phone", "tablet", "monitor", "keyboard", "mouse", "headphones", "camera", "printer", "speaker"]


def unique(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def registry():
    # a request the registry never answers fails after 10 s and is retried (the client retries
    # transport errors, timeouts included) instead of holding the test, and CI, indefinitely
    return SchemaRegistryClient({"url": REGISTRY, "timeout": 10})


def create_topic(name, partitions=1):
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    for f in admin.create_topics([NewTopic(name, partitions, 1)]).values():
        f.result(timeout=30)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_env(orders, **extra):
    env = {
        "PATH": os.environ["PATH"],
        "KAFKA_BOOTSTRAP_SERVERS": BOOTSTRAP,
        "SCHEMA_REGISTRY_URL": REGISTRY,
        "ORDERS_TOPIC": orders,
        "DLQ_TOPIC": orders + "-dlq",
        "RUST_LOG": "warn",
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


def test_python_reads_what_our_generator_wrote():
    topic = unique("py-orders")
    create_topic(topic, 3)
    run = subprocess.run(
        [BIN / "order-generator"],
        env=service_env(topic, ORDER_COUNT=25, ORDER_RATE=0, HTTP_PORT=free_port()),
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr + run.stdout

    deserializer = AvroDeserializer(registry())
    consumer = Consumer({"bootstrap.servers": BOOTSTRAP, "group.id": unique("py"), "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    orders = []
    deadline = time.time() + 30
    while len(orders) < 25 and time.time() < deadline:
        msg = consumer.poll(0.5)
        if msg is None or msg.error():
            continue
        order = deserializer(msg.value(), SerializationContext(topic, MessageField.VALUE))
        assert msg.key().decode() == order["orderId"]
        orders.append(order)
    consumer.close()
    assert len(orders) == 25
    for o in orders:
        assert set(o) == {"orderId", "product", "price"}
        assert o["product"] in PRODUCTS
        assert 10.0 <= o["price"] <= 1000.0
        assert round(o["price"] * 100) == round(o["price"] * 100, 6)


def test_our_processor_reads_what_python_wrote():
    topic = unique("py-orders")
    create_topic(topic, 2)
    serializer = AvroSerializer(registry(), SCHEMA)
    producer = Producer({"bootstrap.servers": BOOTSTRAP})
    prices = [19.99, 250.0, 999.99, 10.01, 42.42, 123.45]
    for p in prices:
        order = {"orderId": str(uuid.uuid4()), "product": "camera", "price": p}
        value = serializer(order, SerializationContext(topic, MessageField.VALUE))
        producer.produce(topic, key=order["orderId"], value=value)
    assert producer.flush(30) == 0

    port = free_port()
    proc = subprocess.Popen(
        [BIN / "order-processor"],
        env=service_env(topic, HTTP_PORT=port, CONSUMER_GROUP=unique("py-processor")),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        stats = {}
        deadline = time.time() + 60
        while stats.get("processed") != len(prices) and time.time() < deadline:
            time.sleep(0.3)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=2) as r:
                    stats = json.load(r)
            except OSError:
                pass
        assert stats.get("processed") == len(prices), stats
        assert stats["dead_lettered"] == 0
        assert stats["revenue"] == round(sum(prices), 2)
        assert stats["min"] == 10.01 and stats["max"] == 999.99
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
