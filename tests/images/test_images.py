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

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from support import free_port, get_json, unique, wait_for  # noqa: E402
from truth import BOOTSTRAP, REGISTRY, Failures, check_totals, create_topics, send_garbage  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
ENGINE = ROOT / "scripts" / "engine.sh"
TAG = os.environ.get("IMAGE_TAG", "dev")
# the constraints the Helm chart sets on every pod
CONSTRAINED = ["--network", "host", "--read-only", "--cap-drop", "ALL",
               "--security-opt", "no-new-privileges", "--user", "65532:65532"]
# the image's own HEALTHCHECK command, asked more often than its 10 s so the test is quick
HEALTH_OFTEN = ["--health-interval", "1s", "--health-start-period", "60s"]


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


def health(container):
    return docker("inspect", "-f", "{{if .State.Health}}{{.State.Health.Status}}{{end}}", container)


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
    failures = Failures(unique("seed"), 0.2)
    try:
        run_service(names["processor"], "order-processor", {
            **common, "HTTP_PORT": ports["processor"], "CONSUMER_GROUP": f"{run}-processor",
            **failures.env(), "RETRY_INITIAL_BACKOFF_MS": "20", "RETRY_MAX_BACKOFF_MS": "100"})
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
        processed, dead = check_totals(orders, dlq, ports["processor"], ports["analyzer"], failures)
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
    failures = Failures(unique("seed"), 0.1)  # the Compose file's rate
    env = {**ENV, "COMPOSE_PROJECT_NAME": run, "IMAGE_TAG": TAG, "KAFKA_BOOTSTRAP_SERVERS": BOOTSTRAP,
           "TRANSIENT_FAILURE_SEED": failures.seed,
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
        processed, dead = check_totals(orders, dlq, replica_ports[0], ports["analyzer"], failures)
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
