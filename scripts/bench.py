#!/usr/bin/env python3
"""The benchmark harness behind `make bench`.

Measures our release binaries against Kafka's own tools on the same native broker, in the
same run, interleaving the contestants and repeating each (medians and min-max spread):

- generator: orders/s of `order-generator` (ORDER_RATE=0) vs `ProducerPerformance` with the
  same record size, acks=all, the same batching and compression;
- processor: records/s of `order-processor` (no simulated failures) draining a pre-filled
  topic, at-least-once and exactly-once, vs `ConsumerPerformance`'s fetch rate on that topic;
- end-to-end latency: p50/p99/p99.9 from the moment the generator meant to send an order
  (open loop: its record timestamp is the order's due time) to its aggregation in the
  processor, at fixed rates, next to `EndToEndLatency` (one record in flight at a time);
- tracing: the processor with default settings (no OTLP endpoint), exporting every record's
  span to the stack's Jaeger, and exporting with 1 % sampled upstream, each against spans off;
- temporary failures (5 %, seeded, the default backoff of 1 s, 2 s, 4 s): the drain of a
  100,000-order backlog in key order, both guarantees, and of a 6,000-order one in partition
  order (which takes over a minute: 100,000 would take a quarter of an hour); a sustained run at
  a fixed rate in both orders: the lag (orders sent and not final) over time, the end-to-end
  p99 of the orders that needed no retry, and peak RSS;
- dlq-analyzer: records/s over real dead letters vs `ConsumerPerformance` on the same topic;
- memory: peak RSS of each service at full load, and RSS when idle;
- start-up: process start to `/healthz`, and to `/readyz` (which includes joining the group);
- images: the size of each service's image (`make images`, on the runtime base made here from
  Debian's packages) and the megabytes our layers add on top of that base. Built first, so the
  build's CPU does not overlap a measurement. `BENCH_IMAGES=0` skips it;
  `scripts/bench.py images` measures only this.

Writes target/bench/results.json and prints a table. The goals are `figures` there, each with
its runs, its goal and whether the median meets it; the gate then compares each with the last
accepted run (docs/bench-baseline.json) and exits 1 when one fell behind by more than the noise.
"""

import json
import os
import pathlib
import re
import resource
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
# 4,000,000 records: a 1,000,000-record drain lasts ~0.7 s, so its ramp-up and the
# /stats polling weigh on its rate, and paired rounds of the same processor against itself
# spread 0.82-1.04; at 4,000,000 they spread 0.97-1.02 (docs/benchmarks.md)
RECORDS = int(os.environ.get("BENCH_RECORDS", "4000000"))
# real dead letters for the analyzer, made by our processor from invalid orders; not tied to
# RECORDS, as at-least-once dead-letters ~1,000 records/s (each waits for its send)
DEAD_LETTERS = int(os.environ.get("BENCH_DEAD_LETTERS", "200000"))
# export to the native stack's Jaeger, and the sampler of the 1 % runs
OTLP = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
ONE_PERCENT = {**OTLP, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"}
# the figures the gate compares with the last accepted run (committed): figure -> better
BASELINE = ROOT / "docs" / "bench-baseline.json"
# a figure fails the gate when worse than the baseline by more than this share, or by more than
# the spread its runs show (half the min-max range over the median), in this run or in the
# baseline's, whichever is largest: a figure whose rounds ranged widely when it was accepted
# can land that far from its median in the next run without anything having changed
TOLERANCE = float(os.environ.get("BENCH_TOLERANCE", "0.10"))
LATENCY_SECONDS = int(os.environ.get("BENCH_LATENCY_SECONDS", "10"))
LATENCY_RATES = [int(r) for r in os.environ.get("BENCH_LATENCY_RATES", "1000,10000").split(",")]
REPEATS = int(os.environ.get("BENCH_REPEATS", "5"))
# the producer settings both contestants use (ours are the generator's defaults)
PRODUCER = {"acks": "all", "linger.ms": "5", "batch.size": "262144", "compression.type": "snappy", "enable.idempotence": "true"}
# what EndToEndLatency's producer uses (acks=all, no linger, no compression), for our generator
# in the like-for-like latency runs
LATENCY_PRODUCER = {"RDKAFKA_LINGER_MS": "0", "COMPRESSION_TYPE": "none"}
# temporary failures: the share of attempts that fail, decided by the seed rule (the same
# orders fail in every contestant), with the default backoff
FAILURES = {"TRANSIENT_FAILURE_RATE": "0.05", "TRANSIENT_FAILURE_SEED": "bench"}
FAILING_BACKLOG = int(os.environ.get("BENCH_FAILING_BACKLOG", "100000"))
# in partition order every failing record holds its partition for 1 s at least: 6,000 orders
# (50 failing per partition) take over a minute
FAILING_BACKLOG_PARTITION_ORDER = int(os.environ.get("BENCH_FAILING_BACKLOG_PARTITION_ORDER", "6000"))
SUSTAINED_RATE = int(os.environ.get("BENCH_SUSTAINED_RATE", "5000"))
SUSTAINED_SECONDS = int(os.environ.get("BENCH_SUSTAINED_SECONDS", "20"))
FAILURE_REPEATS = int(os.environ.get("BENCH_FAILURE_REPEATS", "3"))


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


def children_cpu_s():
    """CPU seconds (user and system) of this process's children that have been waited for."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def jaeger_cpu_s():
    """CPU seconds the stack's Jaeger has used so far, or None when its pid is not at hand."""
    run = pathlib.Path(os.environ.get("STACK_DIR", ROOT / ".stack")) / "run" / "jaeger.pid"
    try:
        fields = pathlib.Path(f"/proc/{int(run.read_text())}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kb(pid, field):
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def watch(proc, done, timeout, what):
    """Polls until done() or proc exits; returns the highest VmHWM seen (kB)."""
    peak = 0
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not done():
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{what} did not finish in {timeout} s")
        try:
            peak = max(peak, rss_kb(proc.pid, "VmHWM"))
        except OSError:
            pass
        time.sleep(0.01)
    return peak


def run_generator(topic, n, **extra):
    """Our generator: n orders; returns (orders/s, peak RSS MB)."""
    proc = subprocess.Popen([BIN / "order-generator"], env=env(topic, ORDER_COUNT=n, HTTP_PORT=free_port(), **{"ORDER_RATE": 0, **extra}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = watch(proc, lambda: False, 600, "order-generator")
    out, err = proc.communicate(timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(err[-2000:])
    summary = json.loads(next(l for l in out.splitlines() if l.startswith("SUMMARY "))[8:])
    assert summary["produced"] == n and summary["failed"] == 0, summary
    return n / summary["elapsed_s"], peak / 1024


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
    /stats answers late while the workers are busy, so the rate errs low, never high. Also the
    processor's CPU per record over its whole life (the only child running meanwhile), and the
    CPU the stack's Jaeger used while it ran."""
    port = free_port()
    group = "bench-" + uuid.uuid4().hex[:8]
    cpu_before, jaeger_before = children_cpu_s(), jaeger_cpu_s()
    started = time.monotonic()
    proc = subprocess.Popen([BIN / "order-processor"], env=env(topic, HTTP_PORT=port, CONSUMER_GROUP=group,
                            PROCESSING_GUARANTEE=guarantee, **extra), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        healthz = readyz = counting_from = last = None
        while True:
            now = time.monotonic()
            if now - started > 300:
                raise RuntimeError("processor did not finish in 300 s")
            # start-up times are read when the answer is in (a request sent before the server
            # was up can still be answered: one run showed 0.5 ms to /healthz from the send);
            # the rate counts from the send, so that it errs low
            if healthz is None and status(port, "/healthz") == 200:
                healthz = time.monotonic() - started
            if healthz is not None and readyz is None and status(port, "/readyz") == 200:
                readyz = time.monotonic() - started
                counting_from = now - started
            if readyz is not None and get_json(port, "/stats")["processed"] >= n:
                last = time.monotonic() - started
                break
            time.sleep(0.005)
        peak = rss_kb(proc.pid, "VmHWM")
        after = rss_kb(proc.pid, "VmRSS")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    jaeger_after = jaeger_cpu_s()
    return {"rate": n / (last - counting_from), "peak_rss_mb": peak / 1024, "after_load_rss_mb": after / 1024,
            "healthz_ms": healthz * 1000, "readyz_ms": readyz * 1000,
            "cpu_ns_per_record": (children_cpu_s() - cpu_before) / n * 1e9,
            "jaeger_cpu_s": None if jaeger_before is None or jaeger_after is None else jaeger_after - jaeger_before}


def start_ready_processor(topic, group, guarantee, **extra):
    port = free_port()
    proc = subprocess.Popen([BIN / "order-processor"], env=env(topic, HTTP_PORT=port, CONSUMER_GROUP=group,
                            PROCESSING_GUARANTEE=guarantee, **extra), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while status(port, "/readyz") != 200:
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("processor not ready in 60 s")
        time.sleep(0.01)
    return proc, port


def wait_processed(port, n, timeout=120, count=lambda stats: stats["processed"]):
    """The processor's /stats once `count` of it (processed orders, by default) reaches n."""
    deadline = time.monotonic() + timeout
    while count(stats := get_json(port, "/stats")) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"processor got {count(stats)} of {n} in time")
        time.sleep(0.05)
    return stats


def run_latency(rate, seconds, guarantee, producer):
    """Generator at `rate` orders/s for `seconds` into a topic that a ready processor drains;
    returns the processor's end-to-end latency percentiles (ms). A first processor and a
    second's worth of orders warm the new topic up (leaders known, fetch positions set); the
    measured processor then joins the same group at the end of the topic."""
    topic = f"bench-lat-{uuid.uuid4().hex[:8]}"
    group = "lat-" + uuid.uuid4().hex[:8]
    create_topic(topic, 6)
    proc, port = start_ready_processor(topic, group, guarantee)
    try:
        run_generator(topic, rate, ORDER_RATE=rate, **producer)
        wait_processed(port, rate)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    proc, port = start_ready_processor(topic, group, guarantee)
    try:
        n = rate * seconds
        run_generator(topic, n, ORDER_RATE=rate, **producer)
        # exactly-once /stats include the warm-up orders restored from the changelog
        restored = rate if guarantee == "exactly_once" else 0
        return wait_processed(port, n + restored)["end_to_end_latency_ms"]
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def final(stats):
    return stats["processed"] + stats["dead_lettered"]


def run_failing_drain(topic, n, guarantee, order):
    """Our processor draining n orders of which 5 % of attempts fail (FAILURES): seconds from
    ready (group joined) to the first /stats that shows every order final, processed or
    dead-lettered, and peak RSS MB."""
    proc, port = start_ready_processor(topic, "drain-" + uuid.uuid4().hex[:8], guarantee,
                                       PROCESSING_ORDER=order, **FAILURES)
    try:
        ready = time.monotonic()
        deadline = ready + 1800
        while final(get_json(port, "/stats")) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{n} orders with failures not drained in 1800 s")
            time.sleep(0.01)
        return {"seconds": time.monotonic() - ready, "peak_rss_mb": rss_kb(proc.pid, "VmHWM") / 1024}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def run_sustained(guarantee, order):
    """The generator at SUSTAINED_RATE orders/s for SUSTAINED_SECONDS into a new topic that a
    ready processor with 5 % failing attempts drains (after a warm-up without failures, as in
    run_latency). Every 0.25 s: the lag, orders the generator has had acknowledged and the
    processor has not made final. Returns the peak lag in each half of the sending, the lag when
    sending ended, the first-attempt orders' end-to-end percentiles, and peak RSS MB. In key order
    it then waits until every order is final; in partition order it does not (it would take
    minutes), so its percentiles count only what was final by then."""
    topic = f"bench-sus-{uuid.uuid4().hex[:8]}"
    group = "sus-" + uuid.uuid4().hex[:8]
    create_topic(topic, 6)
    proc, port = start_ready_processor(topic, group, guarantee)
    try:
        run_generator(topic, 1000, ORDER_RATE=1000)
        wait_processed(port, 1000)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    # exactly-once /stats include the warm-up orders restored from the changelog
    restored = 1000 if guarantee == "exactly_once" else 0
    proc, port = start_ready_processor(topic, group, guarantee, PROCESSING_ORDER=order, **FAILURES)
    n = SUSTAINED_RATE * SUSTAINED_SECONDS
    gen_port = free_port()
    gen = subprocess.Popen([BIN / "order-generator"], env=env(topic, ORDER_COUNT=n, ORDER_RATE=SUSTAINED_RATE,
                           HTTP_PORT=gen_port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        started, samples = time.monotonic(), []
        while gen.poll() is None:
            if time.monotonic() - started > SUSTAINED_SECONDS + 60:
                raise RuntimeError("the generator did not finish its sustained run")
            try:
                produced = get_json(gen_port, "/stats")["produced"]
            except (OSError, ValueError):
                time.sleep(0.05)
                continue
            samples.append((time.monotonic() - started, produced - (final(get_json(port, "/stats")) - restored)))
            time.sleep(0.25)
        if gen.returncode != 0:
            raise RuntimeError("the generator failed in a sustained run")
        ended = final(get_json(port, "/stats")) - restored
        if order == "key":
            stats = wait_processed(port, n + restored, timeout=60, count=final)
        else:
            stats = get_json(port, "/stats")
        half = samples[-1][0] / 2
        first, second = [l for t, l in samples if t <= half], [l for t, l in samples if t > half]
        return {"lag_peak_first_half": max(first), "lag_peak_second_half": max(second), "lag_at_end": n - ended,
                "first_attempt": stats["end_to_end_latency_first_attempt_ms"],
                "peak_rss_mb": rss_kb(proc.pid, "VmHWM") / 1024}
    finally:
        for p in (gen, proc):
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=60)


def run_end_to_end_latency_tool(n):
    """Kafka's EndToEndLatency: n records of RECORD_SIZE bytes, acks=all, one at a time."""
    topic = f"bench-e2e-{uuid.uuid4().hex[:8]}"
    create_topic(topic, 1)
    out = kafka_class("org.apache.kafka.tools.EndToEndLatency", BOOTSTRAP, topic, str(n), "all", "56")
    avg = float(re.search(r"Avg latency: ([\d.]+) ms", out).group(1))
    p = re.search(r"Percentiles: 50th = (\d+), 99th = (\d+), 99.9th = (\d+)", out)
    return {"count": n, "avg": avg, "p50": float(p.group(1)), "p99": float(p.group(2)), "p999": float(p.group(3))}


def run_analyzer(topic, n):
    """dlq-analyzer reading the n dead letters of `topic`: records/s from ready (group joined,
    as for the processor) to the first /report that counts all n, and peak RSS MB."""
    port = free_port()
    started = time.monotonic()
    proc = subprocess.Popen([BIN / "dlq-analyzer"], env=env(topic + "-unused", HTTP_PORT=port, CONSUMER_GROUP="an-" + uuid.uuid4().hex[:8], DLQ_TOPIC=topic),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ready = last = None
        while last is None:
            if time.monotonic() - started > 300:
                raise RuntimeError("dlq-analyzer did not finish in 300 s")
            now = time.monotonic()
            if ready is None and status(port, "/readyz") == 200:
                ready = now
            if ready is not None and get_json(port, "/report")["total"] >= n:
                last = time.monotonic()
            time.sleep(0.005)
        return {"rate": n / (last - ready), "peak_rss_mb": rss_kb(proc.pid, "VmHWM") / 1024}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def paired(round_no, a, b):
    """Runs a and b, a first in even rounds and b first in odd ones; returns (a's, b's)."""
    if round_no % 2 == 0:
        x = a()
        return x, b()
    y = b()
    return a(), y


def fill_dead_letters(n, run_id):
    """A dead-letter topic of n real dead letters: n invalid orders from our generator, sent
    there by our processor. Returns the topic."""
    invalid = f"bench-{run_id}-invalid"
    create_topic(invalid, 6)
    create_topic(invalid + "-dlq", 3)
    run_generator(invalid, n, INVALID_ORDER_RATIO=1)
    port = free_port()
    proc = subprocess.Popen([BIN / "order-processor"], env=env(invalid, HTTP_PORT=port, CONSUMER_GROUP="dead-" + run_id,
                            PROCESSING_GUARANTEE="at_least_once"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while True:
            if time.monotonic() > deadline:
                raise RuntimeError("dead letters not written in 600 s")
            try:
                if get_json(port, "/stats")["dead_lettered"] >= n:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return invalid + "-dlq"


def idle_rss(binary, topic, path="/readyz", seconds=5, **extra):
    """RSS (MB) of a service that is ready with nothing to do, `seconds` after ready."""
    port = free_port()
    proc = subprocess.Popen([BIN / binary], env=env(topic, HTTP_PORT=port, **extra), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while status(port, path) != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{binary} not ready in 60 s")
            time.sleep(0.01)
        time.sleep(seconds)
        return rss_kb(proc.pid, "VmRSS") / 1024
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def image_sizes():
    """{"runtime_base_mb": .., "<service>": {"image_mb": .., "our_layers_mb": ..}} after `make images`."""
    engine = ["bash", str(ROOT / "scripts" / "engine.sh")]
    subprocess.run(engine + ["build"], check=True, stdout=subprocess.DEVNULL)
    return json.loads(subprocess.run(engine + ["sizes"], check=True, capture_output=True, text=True).stdout)


def print_image_sizes(images):
    print(f"\nimages (MB; runtime base made here {images['runtime_base_mb']:.1f})\n")
    print(f"| {'image':<20} | {'image_mb':>10} | {'our_layers_mb':>14} |")
    print(f"|{'-' * 22}|{'-' * 12}|{'-' * 16}|")
    for service, size in images.items():
        if isinstance(size, dict):
            print(f"| {service:<20} | {size['image_mb']:>10.1f} | {size['our_layers_mb']:>14.1f} |")


def main():
    if sys.argv[1:] == ["images"]:
        images = image_sizes()
        print_image_sizes(images)
        out = ROOT / "target" / "bench"
        out.mkdir(parents=True, exist_ok=True)
        (out / "images.json").write_text(json.dumps(images, indent=2) + "\n")
        return
    images = image_sizes() if os.environ.get("BENCH_IMAGES", "1") != "0" else None
    subprocess.run(STACK + ["up"], check=True)
    subprocess.run(["cargo", "build", "--release", "--locked", "-p", "order-generator", "-p", "order-processor",
                    "-p", "dlq-analyzer"], check=True, cwd=ROOT)
    run_id = uuid.uuid4().hex[:8]
    # the processor's input: RECORDS orders written by our generator (valid orders only)
    filled = f"bench-{run_id}-filled"
    create_topic(filled, 6)
    log(f"pre-filling {filled} with {RECORDS} orders")
    run_generator(filled, RECORDS)
    # mean on-the-wire value size of an order: 5-byte header + Avro (uuid string, product, double)
    record_size = int(os.environ.get("BENCH_RECORD_SIZE", "56"))
    # the same orders as upstream would send them with tracing at 1 %: each carries a traceparent,
    # sampled in or out by the generator (parentbased_traceidratio), as the processor follows
    sampled = f"bench-{run_id}-sampled"
    create_topic(sampled, 6)
    log(f"pre-filling {sampled} with {RECORDS} orders traced at 1 %")
    run_generator(sampled, RECORDS, RUST_LOG="info", **ONE_PERCENT)
    log(f"writing {DEAD_LETTERS} dead letters for the analyzer")
    dead = fill_dead_letters(DEAD_LETTERS, run_id)

    gen, gen_rss, perf_prod, alo, eos, perf_cons = [], [], [], [], [], []
    default_alo, default_eos, spans_all, off_sampled, spans_1pct, analyzer, perf_cons_dead = [], [], [], [], [], [], []
    for i in range(REPEATS):
        log(f"throughput round {i + 1}/{REPEATS}")
        t = f"bench-{run_id}-gen-{i}"
        create_topic(t, 6)
        rate, rss = run_generator(t, RECORDS)
        gen.append(rate)
        gen_rss.append(rss)
        t = f"bench-{run_id}-perf-{i}"
        create_topic(t, 6)
        perf_prod.append(run_producer_perf(t, RECORDS, record_size))
        # the pairs compared with each other swap places every round: in probes, the default
        # run measured 0.85-0.93 of spans off when it ran second, 0.98-1.38 when it ran first
        # spans off against default settings (RUST_LOG=info and no OTLP endpoint)
        r = paired(i, lambda: run_processor(filled, RECORDS, "at_least_once"),
                   lambda: run_processor(filled, RECORDS, "at_least_once", RUST_LOG="info"))
        alo.append(r[0])
        default_alo.append(r[1])
        perf_cons.append(run_consumer_perf(filled, RECORDS))
        r = paired(i, lambda: run_processor(filled, RECORDS, "exactly_once"),
                   lambda: run_processor(filled, RECORDS, "exactly_once", RUST_LOG="info"))
        eos.append(r[0])
        default_eos.append(r[1])
        # exporting to the stack's Jaeger, every record's span sampled. As many records as the
        # spans-off run it is divided by: a run's rate counts its ramp-up, which weighs more on
        # a shorter run (spans off measured ~0.7x on 200,000 records of what it does on 1,000,000)
        spans_all.append(run_processor(filled, RECORDS, "at_least_once", RUST_LOG="info",
                                       OTEL_TRACES_SAMPLER="always_on", **OTLP))
        # exporting, 1 % sampled upstream, against spans off on the same records
        r = paired(i, lambda: run_processor(sampled, RECORDS, "at_least_once"),
                   lambda: run_processor(sampled, RECORDS, "at_least_once", RUST_LOG="info", **ONE_PERCENT))
        off_sampled.append(r[0])
        spans_1pct.append(r[1])
        analyzer.append(run_analyzer(dead, DEAD_LETTERS))
        perf_cons_dead.append(run_consumer_perf(dead, DEAD_LETTERS))

    # end-to-end latency: ours like-for-like with EndToEndLatency's producer, both guarantees,
    # and once with the generator's own defaults (linger 5 ms, snappy)
    latency_cases = [(rate, g, "like_for_like", LATENCY_PRODUCER) for rate in LATENCY_RATES
                     for g in ("at_least_once", "exactly_once")]
    latency_cases.append((LATENCY_RATES[0], "at_least_once", "generator_defaults", {}))
    latency = {f"{r}_per_s_{g}_{k}": [] for r, g, k, _ in latency_cases}
    e2e_tool = []
    for i in range(REPEATS):
        log(f"latency round {i + 1}/{REPEATS}")
        e2e_tool.append(run_end_to_end_latency_tool(LATENCY_RATES[0] * LATENCY_SECONDS))
        for rate, g, kind, producer in latency_cases:
            latency[f"{rate}_per_s_{g}_{kind}"].append(run_latency(rate, LATENCY_SECONDS, g, producer))

    # temporary failures: a backlog's drain and a sustained run, key order against partition order
    log("temporary failures")
    backlog, small = f"bench-{run_id}-failing", f"bench-{run_id}-failing-small"
    for topic, n in ((backlog, FAILING_BACKLOG), (small, FAILING_BACKLOG_PARTITION_ORDER)):
        create_topic(topic, 6)
        run_generator(topic, n)
    guarantees = ("at_least_once", "exactly_once")
    drains = {g: [] for g in guarantees}
    sustained = {g: [] for g in guarantees}
    for i in range(FAILURE_REPEATS):
        log(f"failures round {i + 1}/{FAILURE_REPEATS}")
        for g in guarantees:
            drains[g].append(run_failing_drain(backlog, FAILING_BACKLOG, g, "key"))
            sustained[g].append(run_sustained(g, "key"))
    log("failures in partition order (once each)")
    partition_drains = {g: run_failing_drain(small, FAILING_BACKLOG_PARTITION_ORDER, g, "partition") for g in guarantees}
    partition_sustained = {g: run_sustained(g, "partition") for g in guarantees}

    log("memory at rest")
    idle_topic = f"bench-{run_id}-idle"
    create_topic(idle_topic, 6)
    idle = {
        "order_processor_at_least_once": idle_rss("order-processor", idle_topic, CONSUMER_GROUP="idle-" + run_id,
                                                  PROCESSING_GUARANTEE="at_least_once"),
        "order_processor_exactly_once": idle_rss("order-processor", idle_topic, CONSUMER_GROUP="idle-eos-" + run_id),
        "order_generator": idle_rss("order-generator", idle_topic, path="/healthz", ORDER_RATE=1),
        "dlq_analyzer": idle_rss("dlq-analyzer", idle_topic + "-unused", DLQ_TOPIC=idle_topic, CONSUMER_GROUP="idle-an-" + run_id),
    }

    pct = lambda runs, key: summary([r[key] for r in runs])
    results = {
        "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release},
        "records": RECORDS, "repeats": REPEATS, "record_size_bytes": record_size,
        "generator_msgs_per_s": summary(gen),
        "producer_perf_msgs_per_s": summary(perf_prod),
        "processor_at_least_once_msgs_per_s": summary([r["rate"] for r in alo]),
        "processor_exactly_once_msgs_per_s": summary([r["rate"] for r in eos]),
        "consumer_perf_fetch_msgs_per_s": summary(perf_cons),
        "processor_at_least_once_default_settings_msgs_per_s": summary([r["rate"] for r in default_alo]),
        "processor_exactly_once_default_settings_msgs_per_s": summary([r["rate"] for r in default_eos]),
        "processor_spans_all_sampled_msgs_per_s": summary([r["rate"] for r in spans_all]),
        "processor_spans_off_on_sampled_topic_msgs_per_s": summary([r["rate"] for r in off_sampled]),
        "processor_spans_1pct_sampled_msgs_per_s": summary([r["rate"] for r in spans_1pct]),
        # what the 1 % figure is made of: the processor's own CPU per record, and Jaeger's CPU on
        # the same machine while the processor ran
        "processor_spans_off_on_sampled_topic_cpu_ns_per_record": pct(off_sampled, "cpu_ns_per_record"),
        "processor_spans_1pct_sampled_cpu_ns_per_record": pct(spans_1pct, "cpu_ns_per_record"),
        "jaeger_cpu_s_during_spans_1pct_sampled": (pct(spans_1pct, "jaeger_cpu_s")
                                                   if all(r["jaeger_cpu_s"] is not None for r in spans_1pct) else None),
        "dead_letters": DEAD_LETTERS,
        "dlq_analyzer_msgs_per_s": summary([r["rate"] for r in analyzer]),
        "consumer_perf_fetch_dead_letters_msgs_per_s": summary(perf_cons_dead),
        "generator_peak_rss_mb": summary(gen_rss),
        "processor_at_least_once_peak_rss_mb": summary([r["peak_rss_mb"] for r in alo]),
        "processor_exactly_once_peak_rss_mb": summary([r["peak_rss_mb"] for r in eos]),
        "dlq_analyzer_peak_rss_mb": summary([r["peak_rss_mb"] for r in analyzer]),
        "idle_rss_mb": idle,
        "processor_start_to_healthz_ms": summary([r["healthz_ms"] for r in alo + eos]),
        "processor_start_to_readyz_ms": summary([r["readyz_ms"] for r in alo + eos]),
        "processor_exactly_once_start_to_readyz_ms": summary([r["readyz_ms"] for r in eos]),
        "end_to_end_latency_ms": {
            "seconds_per_run": LATENCY_SECONDS,
            "end_to_end_latency_tool": {k: pct(e2e_tool, k) for k in ("p50", "p99", "p999", "avg")},
            **{case: {k: pct(runs, k) for k in ("p50", "p99", "p999", "max")} for case, runs in latency.items()},
        },
    }
    lag_ratio = lambda r: r["lag_peak_second_half"] / max(r["lag_peak_first_half"], 1)
    sustained_row = lambda r: {"lag_peak_first_half": r["lag_peak_first_half"], "lag_peak_second_half": r["lag_peak_second_half"],
                               "lag_at_end": r["lag_at_end"], "first_attempt_p99_ms": r["first_attempt"]["p99"],
                               "first_attempt_max_ms": r["first_attempt"]["max"], "peak_rss_mb": r["peak_rss_mb"]}
    results["temporary_failures"] = {
        "failing_attempts": float(FAILURES["TRANSIENT_FAILURE_RATE"]), "backoff_s": [1, 2, 4],
        "backlog": FAILING_BACKLOG, "backlog_partition_order": FAILING_BACKLOG_PARTITION_ORDER,
        "sustained_rate_per_s": SUSTAINED_RATE, "sustained_seconds": SUSTAINED_SECONDS, "repeats": FAILURE_REPEATS,
        **{f"drain_key_order_{g}_s": summary([r["seconds"] for r in drains[g]]) for g in guarantees},
        **{f"drain_key_order_{g}_orders_per_s": summary([FAILING_BACKLOG / r["seconds"] for r in drains[g]]) for g in guarantees},
        **{f"drain_partition_order_{g}_s": partition_drains[g]["seconds"] for g in guarantees},
        **{f"drain_partition_order_{g}_orders_per_s": FAILING_BACKLOG_PARTITION_ORDER / partition_drains[g]["seconds"]
           for g in guarantees},
        **{f"sustained_key_order_{g}": {k: summary([sustained_row(r)[k] for r in sustained[g]])
                                        for k in sustained_row(sustained[g][0])} for g in guarantees},
        **{f"sustained_partition_order_{g}": sustained_row(partition_sustained[g]) for g in guarantees},
    }
    if images is not None:
        results["images"] = images
    med = lambda k: results[k]["median"]
    results["generator_vs_producer_perf"] = med("generator_msgs_per_s") / med("producer_perf_msgs_per_s")
    results["processor_vs_consumer_perf"] = med("processor_at_least_once_msgs_per_s") / med("consumer_perf_fetch_msgs_per_s")
    results["processor_exactly_once_vs_consumer_perf"] = med("processor_exactly_once_msgs_per_s") / med("consumer_perf_fetch_msgs_per_s")
    results["exactly_once_vs_at_least_once"] = med("processor_exactly_once_msgs_per_s") / med("processor_at_least_once_msgs_per_s")
    lat = results["end_to_end_latency_ms"]
    tool_p99 = lat["end_to_end_latency_tool"]["p99"]["median"]
    results["end_to_end_p99_vs_end_to_end_latency_tool"] = (
        lat[f"{LATENCY_RATES[0]}_per_s_at_least_once_like_for_like"]["p99"]["median"] / tool_p99 if tool_p99 else None)

    # the goals, each a figure of this run with its runs (paired by round) and its goal
    rate = lambda runs: [r["rate"] for r in runs]
    per = lambda xs, ys: [x / y for x, y in zip(xs, ys)]
    eos_p99 = [r["p99"] for r in latency[f"{LATENCY_RATES[0]}_per_s_exactly_once_like_for_like"]]
    tool_p99s = [max(r["p99"], 1.0) for r in e2e_tool]  # the tool reports whole ms; 0 would divide
    figures = {
        "exactly_once_vs_consumer_perf": (per(rate(eos), perf_cons), ">=", 1.0),
        "exactly_once_p99_vs_end_to_end_latency_tool": (per(eos_p99, tool_p99s), "<=", 5.0),
        "default_settings_vs_spans_off": (per(rate(default_alo), rate(alo)), ">=", 0.95),
        "spans_all_sampled_vs_spans_off": (per(rate(spans_all), rate(alo)), ">=", 0.5),
        "spans_1pct_sampled_vs_spans_off": (per(rate(spans_1pct), rate(off_sampled)), ">=", 0.95),
        "dlq_analyzer_vs_consumer_perf": (per(rate(analyzer), perf_cons_dead), ">=", 1.0),
        "exactly_once_start_to_readyz_ms": ([r["readyz_ms"] for r in eos], "<", 100.0),
        "processor_peak_rss_mb": ([max(a["peak_rss_mb"], e["peak_rss_mb"]) for a, e in zip(alo, eos)], "<", 32.0),
        "generator_peak_rss_mb": (gen_rss, "<", 32.0),
        "processor_vs_consumer_perf": (per(rate(alo), perf_cons), ">=", 1.0),
        "generator_vs_producer_perf": (per(gen, perf_prod), ">=", 1.0),
        # temporary failures, key order: the longest retry chain is 7 s
        "failing_backlog_drain_at_least_once_s": ([r["seconds"] for r in drains["at_least_once"]], "<=", 10.0),
        "failing_backlog_drain_exactly_once_s": ([r["seconds"] for r in drains["exactly_once"]], "<=", 10.0),
        "sustained_with_failures_first_attempt_p99_ms": ([max(a["first_attempt"]["p99"], e["first_attempt"]["p99"])
                                                          for a, e in zip(*sustained.values())], "<=", 100.0),
        "sustained_with_failures_peak_rss_mb": ([max(a["peak_rss_mb"], e["peak_rss_mb"]) for a, e in zip(*sustained.values())],
                                                "<", 64.0),
        # bounded: the lag's peak in the second half of the run no higher than in the first, noise aside
        "sustained_with_failures_lag_second_half_vs_first_half": ([max(lag_ratio(a), lag_ratio(e))
                                                                   for a, e in zip(*sustained.values())], "<=", 1.5),
    }
    # the processor's own share of the 1 % figure, paired by round as the figure is (Jaeger's
    # share is its CPU above, taken from the same two CPUs)
    cpu = lambda runs: [r["cpu_ns_per_record"] for r in runs]
    results["spans_1pct_sampled_vs_spans_off_cpu_per_record"] = statistics.median(per(cpu(spans_1pct), cpu(off_sampled)))
    results["figures"] = {}
    for name, (runs, op, goal) in figures.items():
        median = statistics.median(runs)
        met = {">=": median >= goal, "<=": median <= goal, "<": median < goal}[op]
        results["figures"][name] = {"median": median, "min": min(runs), "max": max(runs), "runs": runs,
                                    "goal": f"{op} {goal}", "met": met}

    out = ROOT / "target" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    rows = [
        ("generator (orders/s)", "generator_msgs_per_s"),
        ("ProducerPerformance (records/s)", "producer_perf_msgs_per_s"),
        ("processor at-least-once (records/s)", "processor_at_least_once_msgs_per_s"),
        ("processor exactly-once (records/s)", "processor_exactly_once_msgs_per_s"),
        ("ConsumerPerformance fetch (records/s)", "consumer_perf_fetch_msgs_per_s"),
        ("processor at-least-once, default settings", "processor_at_least_once_default_settings_msgs_per_s"),
        ("processor exactly-once, default settings", "processor_exactly_once_default_settings_msgs_per_s"),
        ("processor, spans exported, all sampled", "processor_spans_all_sampled_msgs_per_s"),
        ("processor, spans off (1 %-traced topic)", "processor_spans_off_on_sampled_topic_msgs_per_s"),
        ("processor, spans exported, 1 % sampled", "processor_spans_1pct_sampled_msgs_per_s"),
        ("  its CPU per record (ns), spans off", "processor_spans_off_on_sampled_topic_cpu_ns_per_record"),
        ("  its CPU per record (ns), 1 % sampled", "processor_spans_1pct_sampled_cpu_ns_per_record"),
        ("dlq-analyzer (records/s)", "dlq_analyzer_msgs_per_s"),
        ("ConsumerPerformance on dead letters", "consumer_perf_fetch_dead_letters_msgs_per_s"),
        ("generator peak RSS (MB)", "generator_peak_rss_mb"),
        ("processor at-least-once peak RSS (MB)", "processor_at_least_once_peak_rss_mb"),
        ("processor exactly-once peak RSS (MB)", "processor_exactly_once_peak_rss_mb"),
        ("dlq-analyzer peak RSS (MB)", "dlq_analyzer_peak_rss_mb"),
        ("processor start to /healthz (ms)", "processor_start_to_healthz_ms"),
        ("processor start to /readyz (ms)", "processor_start_to_readyz_ms"),
    ]
    print(f"\n{RECORDS} records, {REPEATS} runs each, {os.cpu_count()} CPUs\n")
    print(f"| {'measure':<46} | {'median':>12} | {'min':>12} | {'max':>12} |")
    print(f"|{'-' * 48}|{'-' * 14}|{'-' * 14}|{'-' * 14}|")
    if results["jaeger_cpu_s_during_spans_1pct_sampled"] is not None:
        rows.append(("Jaeger's CPU (s) during a 1 % sampled run", "jaeger_cpu_s_during_spans_1pct_sampled"))
    for label, key in rows:
        r = results[key]
        print(f"| {label:<46} | {r['median']:>12.1f} | {r['min']:>12.1f} | {r['max']:>12.1f} |")
    print("\nidle RSS (MB): " + ", ".join(f"{k} {v:.1f}" for k, v in idle.items()))
    print(f"\nend-to-end latency (ms; median of {REPEATS} runs of {LATENCY_SECONDS} s, [min-max])\n")
    print(f"| {'case':<52} | {'p50':>16} | {'p99':>16} | {'p99.9':>16} |")
    print(f"|{'-' * 54}|{'-' * 18}|{'-' * 18}|{'-' * 18}|")
    cell = lambda r: f"{r['median']:.1f} [{r['min']:.0f}-{r['max']:.0f}]"
    for case, r in lat.items():
        if case == "seconds_per_run":
            continue
        print(f"| {case:<52} | {cell(r['p50']):>16} | {cell(r['p99']):>16} | {cell(r['p999']):>16} |")
    tf = results["temporary_failures"]
    print(f"\ntemporary failures: {tf['failing_attempts']:.0%} of attempts fail, backoff 1 s, 2 s, 4 s "
          f"(key order: median of {FAILURE_REPEATS} runs [min-max]; partition order: one run)\n")
    print(f"| {'case':<58} | {'key order':>22} | {'partition order':>16} |")
    print(f"|{'-' * 60}|{'-' * 24}|{'-' * 18}|")
    for g in guarantees:
        k = tf[f"drain_key_order_{g}_s"]
        print(f"| {f'drain, {g} (s; key {FAILING_BACKLOG}, partition {FAILING_BACKLOG_PARTITION_ORDER} orders)':<58} | "
              f"{cell(k):>22} | {tf[f'drain_partition_order_{g}_s']:>16.1f} |")
        print(f"| {f'drain, {g} (orders/s)':<58} | {tf[f'drain_key_order_{g}_orders_per_s']['median']:>22.0f} | "
              f"{tf[f'drain_partition_order_{g}_orders_per_s']:>16.0f} |")
        for m in ("lag_peak_first_half", "lag_peak_second_half", "lag_at_end", "first_attempt_p99_ms", "peak_rss_mb"):
            label = f"{SUSTAINED_RATE}/s for {SUSTAINED_SECONDS} s, {g}: {m}"
            print(f"| {label:<58} | {cell(tf[f'sustained_key_order_{g}'][m]):>22} | "
                  f"{tf[f'sustained_partition_order_{g}'][m]:>16.1f} |")
    print()
    for key in ["generator_vs_producer_perf", "processor_vs_consumer_perf", "processor_exactly_once_vs_consumer_perf",
                "exactly_once_vs_at_least_once", "end_to_end_p99_vs_end_to_end_latency_tool",
                "spans_1pct_sampled_vs_spans_off_cpu_per_record"]:
        v = results[key]
        print(f"{key:<48} {v:.2f}" if v is not None else f"{key:<48} n/a")
    if images is not None:
        print_image_sizes(images)
    print(f"\nwritten to {out / 'results.json'}")
    sys.exit(gate(results["figures"]))


def half_range(f):
    """The noise a figure's runs show: half their min-max range over the median (0 when the
    figure has no range, as a baseline written before ranges were kept)."""
    if "min" not in f or not f["median"]:
        return 0.0
    return (f["max"] - f["min"]) / 2 / f["median"]


def gate(figures):
    """Prints each goal figure against its goal and the committed baseline; returns 1 when one
    fell behind the baseline by more than the noise (see TOLERANCE). BENCH_ACCEPT=1 makes this
    run the new baseline instead."""
    baseline = json.loads(BASELINE.read_text()) if BASELINE.exists() else {}
    failed = []
    print(f"\ngoals and regression gate (baseline {BASELINE.relative_to(ROOT)})\n")
    print(f"| {'figure':<45} | {'median':>8} | {'runs spread':>11} | {'goal':>8} | {'baseline':>8} | verdict")
    print(f"|{'-' * 47}|{'-' * 10}|{'-' * 13}|{'-' * 10}|{'-' * 10}|{'-' * 20}")
    for name, f in figures.items():
        spread = half_range(f)
        # a baseline written before it kept its runs' range is a bare median
        base_f = baseline.get(name)
        base_f = {"median": base_f} if isinstance(base_f, (int, float)) else base_f
        base = base_f["median"] if base_f else None
        verdict = "goal met" if f["met"] else "goal not met"
        if base is not None:
            allowed = max(TOLERANCE, spread, half_range(base_f))
            lower_better = f["goal"].startswith("<")
            worse = (f["median"] - base) / base if lower_better else (base - f["median"]) / base
            if worse > allowed:
                verdict += f", REGRESSED {worse:.0%} > {allowed:.0%}"
                failed.append(name)
        shown = f"{base:8.2f}" if base is not None else f"{'none':>8}"
        print(f"| {name:<45} | {f['median']:8.2f} | {spread:>10.0%} | {f['goal']:>8} | {shown} | {verdict}")
    if os.environ.get("BENCH_ACCEPT") == "1":
        kept = {k: {m: round(f[m], 4) for m in ("median", "min", "max")} for k, f in figures.items()}
        BASELINE.write_text(json.dumps(kept, indent=2) + "\n")
        print(f"\nBENCH_ACCEPT=1: this run is the new baseline ({BASELINE.relative_to(ROOT)}; commit it)")
        return 0
    if failed:
        print(f"\nregression: {', '.join(failed)} fell behind the baseline (BENCH_ACCEPT=1 accepts a run)")
        return 1
    return 0


if __name__ == "__main__":
    main()
