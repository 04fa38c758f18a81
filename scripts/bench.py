#!/usr/bin/env python3
"""The benchmark harness behind `make bench`.

Measures our release binaries against Kafka's own perf tools on the same native broker, in the
same run, interleaving the contestants and repeating each (medians and min-max spread):

- generator: orders/s of `order-generator` (ORDER_RATE=0) vs `ProducerPerformance` with the
  same record size, acks=all, the same batching and compression;
- processor: records/s of `order-processor` (no simulated failures) reading a pre-filled topic,
  at-least-once and exactly-once, vs `ConsumerPerformance`'s fetch rate on the same topic;
- memory: the processor's peak RSS while draining the topic, and its RSS when idle;
- start-up: process start to `/healthz`, and to `/readyz` (which includes joining the group).

Writes target/bench/results.json and prints a table. End-to-end latency is not measured yet.
"""

import json
import os
import pathlib
import re
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid

ROOT = pathlib.Path(__file__).resolve().parents[1]
BIN = ROOT / "target" / "release"
STACK = ["bash", str(ROOT / "stack" / "stack.sh")]
BOOTSTRAP = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
REGISTRY = os.environ.get("SCHEMA_REGISTRY_URL", "http://127.0.0.1:8081/apis/ccompat/v7")
RECORDS = int(os.environ.get("BENCH_RECORDS", "200000"))
REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))
# the producer settings both contestants use (ours are the generator's defaults)
PRODUCER = {"acks": "all", "linger.ms": "5", "batch.size": "262144", "compression.type": "snappy", "enable.idempotence": "true"}


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def kafka_class(*args, timeout=600):
    run = subprocess.run(STACK + ["kafka-class", *args], capture_output=True, text=True, timeout=timeout)
    if run.returncode != 0:
        raise RuntimeError(f"{args[0]} failed: {run.stderr[-2000:]}")
    return run.stdout


def create_topic(name, partitions):
    kafka_class("org.apache.kafka.tools.TopicCommand", "--bootstrap-server", BOOTSTRAP, "--create",
                "--topic", name, "--partitions", str(partitions), "--replication-factor", "1")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
        return json.load(r)


def status(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status
    except OSError:
        return None


def env(orders, **extra):
    e = {"PATH": os.environ["PATH"], "KAFKA_BOOTSTRAP_SERVERS": BOOTSTRAP, "SCHEMA_REGISTRY_URL": REGISTRY,
         "ORDERS_TOPIC": orders, "DLQ_TOPIC": orders + "-dlq", "RUST_LOG": "warn"}
    e.update({k: str(v) for k, v in extra.items()})
    return e


def rss_kb(pid, field):
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def run_generator(topic, n):
    """Our generator: n orders as fast as it goes; returns (orders/s, mean payload bytes)."""
    run = subprocess.run([BIN / "order-generator"], env=env(topic, ORDER_COUNT=n, ORDER_RATE=0, HTTP_PORT=free_port()),
                         capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-2000:])
    summary = json.loads(next(l for l in run.stdout.splitlines() if l.startswith("SUMMARY "))[8:])
    assert summary["produced"] == n and summary["failed"] == 0, summary
    return n / summary["elapsed_s"]


def run_producer_perf(topic, n, record_size):
    props = [f"bootstrap.servers={BOOTSTRAP}"] + [f"{k}={v}" for k, v in PRODUCER.items()]
    out = kafka_class("org.apache.kafka.tools.ProducerPerformance", "--topic", topic, "--num-records", str(n),
                      "--record-size", str(record_size), "--throughput", "-1", "--producer-props", *props)
    last = [l for l in out.splitlines() if "records sent" in l][-1]
    return float(re.search(r"([\d.]+) records/sec", last).group(1))


def run_consumer_perf(topic, n):
    out = kafka_class("org.apache.kafka.tools.ConsumerPerformance", "--bootstrap-server", BOOTSTRAP, "--topic", topic,
                      "--messages", str(n), "--group", "perf-" + uuid.uuid4().hex[:8], "--timeout", "60000")
    # the tool's own log lines share stdout with its CSV header and row
    lines = out.splitlines()
    header = next(l for l in lines if "fetch.nMsg.sec" in l)
    row = [l for l in lines if re.match(r"^\d{4}-\d\d-\d\d \d", l) and l.count(",") == header.count(",")][-1]
    cols = dict(zip([c.strip() for c in header.split(",")], [c.strip() for c in row.split(",")]))
    return float(cols["fetch.nMsg.sec"])


def run_processor(topic, n, guarantee, **extra):
    """Our processor draining n records: records/s from ready (partitions assigned, as
    ConsumerPerformance starts its clock after joining) to the first /stats that shows all n;
    /stats answers late while the workers are busy, so the rate errs low, never high."""
    port = free_port()
    group = "bench-" + uuid.uuid4().hex[:8]
    started = time.monotonic()
    proc = subprocess.Popen([BIN / "order-processor"], env=env(topic, HTTP_PORT=port, CONSUMER_GROUP=group,
                            PROCESSING_GUARANTEE=guarantee, **extra), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        healthz = readyz = last = None
        while True:
            now = time.monotonic()
            if now - started > 300:
                raise RuntimeError("processor did not finish in 300 s")
            if healthz is None and status(port, "/healthz") == 200:
                healthz = now - started
            if healthz is not None and readyz is None and status(port, "/readyz") == 200:
                readyz = now - started
            if readyz is not None and get_json(port, "/stats")["processed"] >= n:
                last = time.monotonic() - started
                break
            time.sleep(0.005)
        peak = rss_kb(proc.pid, "VmHWM")
        after = rss_kb(proc.pid, "VmRSS")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {"rate": n / (last - readyz), "peak_rss_mb": peak / 1024, "after_load_rss_mb": after / 1024,
            "healthz_ms": healthz * 1000, "readyz_ms": readyz * 1000}


def idle_processor(topic, seconds=5):
    """RSS of a processor that is ready and has nothing to do, after `seconds`."""
    port = free_port()
    proc = subprocess.Popen([BIN / "order-processor"], env=env(topic, HTTP_PORT=port, CONSUMER_GROUP="idle-" + uuid.uuid4().hex[:8]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while status(port, "/readyz") != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("idle processor not ready in 60 s")
            time.sleep(0.01)
        time.sleep(seconds)
        return rss_kb(proc.pid, "VmRSS") / 1024
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def main():
    subprocess.run(STACK + ["up"], check=True)
    subprocess.run(["cargo", "build", "--release", "--locked", "-p", "order-generator", "-p", "order-processor"],
                   check=True, cwd=ROOT)
    run_id = uuid.uuid4().hex[:8]
    # the processor's input: RECORDS orders written by our generator (valid orders only)
    filled = f"bench-{run_id}-filled"
    create_topic(filled, 6)
    log(f"pre-filling {filled} with {RECORDS} orders")
    run_generator(filled, RECORDS)
    # mean on-the-wire value size of an order: 5-byte header + Avro (uuid string, product, double)
    record_size = int(os.environ.get("BENCH_RECORD_SIZE", "56"))

    gen, perf_prod, alo, eos, perf_cons = [], [], [], [], []
    for i in range(REPEATS):
        log(f"round {i + 1}/{REPEATS}")
        t = f"bench-{run_id}-gen-{i}"
        create_topic(t, 6)
        gen.append(run_generator(t, RECORDS))
        t = f"bench-{run_id}-perf-{i}"
        create_topic(t, 6)
        perf_prod.append(run_producer_perf(t, RECORDS, record_size))
        alo.append(run_processor(filled, RECORDS, "at_least_once"))
        perf_cons.append(run_consumer_perf(filled, RECORDS))
        eos.append(run_processor(filled, RECORDS, "exactly_once"))

    results = {
        "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release},
        "records": RECORDS, "repeats": REPEATS, "record_size_bytes": record_size,
        "generator_msgs_per_s": summary(gen),
        "producer_perf_msgs_per_s": summary(perf_prod),
        "processor_at_least_once_msgs_per_s": summary([r["rate"] for r in alo]),
        "processor_exactly_once_msgs_per_s": summary([r["rate"] for r in eos]),
        "consumer_perf_fetch_msgs_per_s": summary(perf_cons),
        "processor_peak_rss_mb": summary([r["peak_rss_mb"] for r in alo + eos]),
        "processor_idle_rss_mb": summary([r["idle_rss_mb"] for r in alo + eos]),
        "processor_start_to_healthz_ms": summary([r["healthz_ms"] for r in alo + eos]),
        "processor_start_to_readyz_ms": summary([r["readyz_ms"] for r in alo + eos]),
        "end_to_end_latency": "not measured yet",
    }
    med = lambda k: results[k]["median"]
    results["generator_vs_producer_perf"] = med("generator_msgs_per_s") / med("producer_perf_msgs_per_s")
    results["processor_vs_consumer_perf"] = med("processor_at_least_once_msgs_per_s") / med("consumer_perf_fetch_msgs_per_s")
    results["processor_exactly_once_vs_consumer_perf"] = med("processor_exactly_once_msgs_per_s") / med("consumer_perf_fetch_msgs_per_s")
    results["exactly_once_vs_at_least_once"] = med("processor_exactly_once_msgs_per_s") / med("processor_at_least_once_msgs_per_s")

    out = ROOT / "target" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    rows = [
        ("generator (orders/s)", "generator_msgs_per_s"),
        ("ProducerPerformance (records/s)", "producer_perf_msgs_per_s"),
        ("processor at-least-once (records/s)", "processor_at_least_once_msgs_per_s"),
        ("processor exactly-once (records/s)", "processor_exactly_once_msgs_per_s"),
        ("ConsumerPerformance fetch (records/s)", "consumer_perf_fetch_msgs_per_s"),
        ("processor peak RSS (MB)", "processor_peak_rss_mb"),
        ("processor idle RSS (MB)", "processor_idle_rss_mb"),
        ("processor start to /healthz (ms)", "processor_start_to_healthz_ms"),
        ("processor start to /readyz (ms)", "processor_start_to_readyz_ms"),
    ]
    print(f"\n{RECORDS} records, {REPEATS} runs each, {os.cpu_count()} CPUs\n")
    print(f"| {'measure':<40} | {'median':>12} | {'min':>12} | {'max':>12} |")
    print(f"|{'-' * 42}|{'-' * 14}|{'-' * 14}|{'-' * 14}|")
    for label, key in rows:
        r = results[key]
        print(f"| {label:<40} | {r['median']:>12.1f} | {r['min']:>12.1f} | {r['max']:>12.1f} |")
    print()
    for key in ["generator_vs_producer_perf", "processor_vs_consumer_perf",
                "processor_exactly_once_vs_consumer_perf", "exactly_once_vs_at_least_once"]:
        print(f"{key:<42} {results[key]:.2f}")
    print(f"\nwritten to {out / 'results.json'}")


if __name__ == "__main__":
    main()
