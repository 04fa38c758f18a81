"""The three container images, run the way the Helm chart runs them, against the native stack.

Each service runs as its image (`make images`) in the project's own engine, as user 65532, with
a read-only root file system, every capability dropped and no privilege escalation, on the host
network, so that all traffic stays on loopback. The ground truth comes from the topics
themselves, read back with Python's confluent-kafka: every record on the orders topic is decoded
and judged by the business rules here, independently of our Rust code.

The Compose file's own service definitions run too: `tests/images/compose.native.yml` points
them at the native stack (Compose cannot pull the Kafka, registry and Jaeger images here), and
the processor is scaled to three replicas with `--scale`.
"""

import json
import os
import pathlib
import subprocess
import sys
import time

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from support import free_port, get_json, unique, wait_for  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
ENGINE = ROOT / "scripts" / "engine.sh"
BOOTSTRAP = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
REGISTRY = os.environ.get("SCHEMA_REGISTRY_URL", "http://127.0.0.1:8081/apis/ccompat/v7")
TAG = os.environ.get("IMAGE_TAG", "dev")
PRODUCTS = {"laptop", "phone", "tablet", "monitor", "keyboard", "mouse", "headphones", "camera", "printer", "speaker"}
MAX_PRICE_CENTS = 1_000_000_00
# the constraints the Helm chart sets on every pod
CONSTRAINED = ["--network", "host", "--read-only", "--cap-drop", "ALL",
               "--security-opt", "no-new-privileges", "--user", "65532:65532"]
# the image's own HEALTHCHECK command, asked more often than its 10 s so the test is quick
HEALTH_OFTEN = ["--health-interval", "1s", "--health-start-period", "60s"]
GARBAGE = [b"this is not an order", b'{"orderId": "json-instead-of-avro"}', b"\x00\x00"]


def engine_env():
    line = subprocess.run(["bash", ENGINE, "env"], check=True, capture_output=True, text=True).stdout
    key, value = line.strip().removeprefix("export ").split("=", 1)
    return {**os.environ, key: value}


ENV = engine_env()


def docker(*args, check=True, timeout=120):
    run = subprocess.run(["/usr/bin/docker", *args], env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and run.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: {run.stderr.strip()}")
    return run.stdout.strip()


def create_topics(orders, dlq):
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    for f in admin.create_topics([NewTopic(orders, 3, 1), NewTopic(dlq, 3, 1)]).values():
        f.result(timeout=30)


def health(container):
    return docker("inspect", "-f", "{{if .State.Health}}{{.State.Health.Status}}{{end}}", container)


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


def judge(orders_topic):
    """The ground truth of the orders topic: {(partition, offset): cents} of the valid orders and
    {(partition, offset): category} of the records that must be dead-lettered."""
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
        else:
            valid[where] = cents
    return valid, failing


def check_totals(orders_topic, dlq_topic, processor_port, analyzer_port):
    """Asserts the processor's group totals and the dead-letter topic against the ground truth."""
    valid, failing = judge(orders_topic)
    expected = len(valid) + len(failing)
    seen = {}

    def settled():
        seen["stats"] = get_json(processor_port, "/stats/global")
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
    # every record that breaks a rule is dead-lettered once, with the right category; a valid
    # order may be dead-lettered only because its temporary failures outlived the retries
    for origin, category in failing.items():
        assert origin in by_origin, f"record {origin} ({category}) was not dead-lettered"
        assert by_origin[origin][0] == category, (origin, by_origin[origin][0], category)
    exhausted = {o for o, (c, _k, _v) in by_origin.items() if c == "retries_exhausted"}
    assert set(by_origin) == set(failing) | exhausted, "a dead letter that has no reason to be there"
    assert exhausted <= set(valid)
    processed = {o: c for o, c in valid.items() if o not in exhausted}
    assert stats["processed"] == len(processed)
    assert stats["dead_lettered"] == len(by_origin)
    assert round(stats["revenue"] * 100) == sum(processed.values())
    assert round(stats["min"] * 100) == min(processed.values())
    assert round(stats["max"] * 100) == max(processed.values())
    report = wait_for("the analyzer's report", lambda: (
        r if (r := get_json(analyzer_port, "/report"))["total"] >= len(by_origin) else None), 60)
    assert report["total"] == len(by_origin)
    return len(processed), len(by_origin)


def run_service(name, image, env, *extra):
    args = ["run", "-d", "--name", name, *CONSTRAINED, *HEALTH_OFTEN, *extra]
    for k, v in env.items():
        args += ["-e", f"{k}={v}"]
    return docker(*args, f"order-pipeline/{image}:{TAG}")


def assert_untouched(container):
    logs = subprocess.run(["/usr/bin/docker", "logs", container], env=ENV, capture_output=True, text=True).stderr
    assert "Read-only file system" not in logs
    assert docker("diff", container) == "", f"{container} changed its root file system"


def test_images_process_a_known_mix_exactly_and_survive_docker_stop():
    run = unique("img")
    orders, dlq = f"{run}-orders", f"{run}-orders-dlq"
    create_topics(orders, dlq)
    common = {"KAFKA_BOOTSTRAP_SERVERS": BOOTSTRAP, "SCHEMA_REGISTRY_URL": REGISTRY,
              "ORDERS_TOPIC": orders, "DLQ_TOPIC": dlq, "RUST_LOG": "info,rdkafka=warn"}
    ports = {s: free_port() for s in ("generator", "processor", "analyzer")}
    names = {s: f"{run}-{s}" for s in ports}
    try:
        run_service(names["processor"], "order-processor", {
            **common, "HTTP_PORT": ports["processor"], "CONSUMER_GROUP": f"{run}-processor",
            "TRANSIENT_FAILURE_RATE": "0.2", "RETRY_INITIAL_BACKOFF_MS": "20", "RETRY_MAX_BACKOFF_MS": "100"})
        run_service(names["analyzer"], "dlq-analyzer", {
            **common, "HTTP_PORT": ports["analyzer"], "CONSUMER_GROUP": f"{run}-analyzer"})
        for s in ("processor", "analyzer"):
            wait_for(f"{names[s]} healthy", lambda s=s: health(names[s]) == "healthy", 60)

        run_service(names["generator"], "order-generator", {
            **common, "HTTP_PORT": ports["generator"], "ORDER_COUNT": "600", "ORDER_RATE": "100",
            "INVALID_ORDER_RATIO": "0.1"})
        wait_for("the generator healthy", lambda: health(names["generator"]) == "healthy", 60)
        send_garbage(orders)

        # the processor is stopped mid-stream, the way Docker stops it (SIGTERM), and started again
        wait_for("the processor under way", lambda: get_json(ports["processor"], "/stats")["processed"] > 20, 60)
        assert docker("inspect", "-f", "{{.State.Running}}", names["generator"]) == "true", "too late to stop mid-stream"
        docker("stop", "-t", "30", names["processor"])
        assert docker("inspect", "-f", "{{.State.ExitCode}}", names["processor"]) == "0"
        docker("start", names["processor"])
        wait_for("the processor healthy again", lambda: health(names["processor"]) == "healthy", 60)

        assert docker("wait", names["generator"], timeout=120) == "0"
        processed, dead = check_totals(orders, dlq, ports["processor"], ports["analyzer"])
        assert processed > 400 and dead >= 3 + 30  # the garbage and about 10 % invalid orders
        print(f"images: {processed} processed, {dead} dead-lettered, exact; stopped and restarted mid-stream")
        for s in ("processor", "analyzer"):
            assert health(names[s]) == "healthy"
        for name in names.values():
            assert_untouched(name)
    finally:
        for name in names.values():
            docker("rm", "-f", name, check=False)


def listening_port(container):
    """The HTTP port a service logged at start (`HTTP listening`, JSON logs)."""
    def port():
        logs = subprocess.run(["/usr/bin/docker", "logs", container], env=ENV, capture_output=True, text=True)
        for line in (logs.stdout + logs.stderr).splitlines():
            if line.startswith("{") and (entry := json.loads(line)).get("fields", {}).get("message") == "HTTP listening":
                return entry["fields"]["port"]
        return None
    return wait_for(f"{container}'s HTTP port", port, 30)


def test_compose_services_scale_to_three_replicas_with_exact_totals():
    run = unique("compose")
    orders, dlq = f"{run}-orders", f"{run}-orders-dlq"
    create_topics(orders, dlq)
    ports = {"generator": free_port(), "analyzer": free_port()}
    env = {**ENV, "COMPOSE_PROJECT_NAME": run, "IMAGE_TAG": TAG, "KAFKA_BOOTSTRAP_SERVERS": BOOTSTRAP,
           "SCHEMA_REGISTRY_URL": REGISTRY, "ORDERS_TOPIC": orders, "DLQ_TOPIC": dlq,
           "GENERATOR_PORT": str(ports["generator"]), "ANALYZER_PORT": str(ports["analyzer"]),
           "CONSUMER_GROUP_PREFIX": run}
    compose = ["bash", str(ENGINE), "compose", "-f", str(ROOT / "docker-compose.yml"),
               "-f", str(ROOT / "tests" / "images" / "compose.native.yml")]

    def up(*args):
        done = subprocess.run([*compose, "up", "-d", "--no-deps", "--no-build", *args],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr

    replicas = []
    try:
        # --wait: every replica's own Compose health check passes (the port from its port file)
        up("--wait", "--wait-timeout", "120", "--scale", "order-processor=3", "order-processor", "dlq-analyzer")
        replicas = docker("ps", "-q", "--filter", f"label=com.docker.compose.project={run}",
                          "--filter", "label=com.docker.compose.service=order-processor").split()
        assert len(replicas) == 3
        assert all(health(r) == "healthy" for r in replicas)
        up("order-generator")
        generator = docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={run}",
                           "--filter", "label=com.docker.compose.service=order-generator")
        assert docker("wait", generator, timeout=120) == "0"
        send_garbage(orders)
        # any replica answers for the whole group
        replica_ports = [listening_port(r) for r in replicas]
        processed, dead = check_totals(orders, dlq, replica_ports[0], ports["analyzer"])
        assert processed > 200 and dead >= 3
        # all three replicas took part: each owns one of the three partitions
        shares = [get_json(p, "/stats") for p in replica_ports]
        assert all(s["processed"] > 0 for s in shares), shares
        print(f"compose: {processed} processed, {dead} dead-lettered, exact; replicas' shares "
              f"{[s['processed'] for s in shares]} on ports {replica_ports}")
        for r in replicas:
            assert_untouched(r)
    except AssertionError:
        for r in replicas:  # what each replica said, for the reader of a failure
            logs = subprocess.run(["/usr/bin/docker", "logs", "--tail", "40", r], env=ENV, capture_output=True, text=True)
            print(f"--- {r}\n{logs.stdout}{logs.stderr}")
        raise
    finally:
        subprocess.run([*compose, "down", "--timeout", "20"], env=env, capture_output=True, timeout=120)
