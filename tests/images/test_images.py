"""The three container images, run the way the Helm chart runs them, against the native stack.

Each service runs as its image (`make images`) in the project's own engine, as user 65532, with
a read-only root file system, every capability dropped and no privilege escalation, on the host
network, so that all traffic stays on loopback. The ground truth comes from the topics
themselves, read back with Python's confluent-kafka: every record on the orders topic is decoded
and judged by the business rules here, independently of our Rust code.
The Compose file itself runs in tests/compose, on the engine's bridge network.
"""

import os
import pathlib
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from engine import ENV, docker  # noqa: E402
from support import free_port, get_json, unique, wait_for  # noqa: E402
from truth import BOOTSTRAP, REGISTRY, Failures, check_totals, create_topics, send_garbage  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
TAG = os.environ.get("IMAGE_TAG", "dev")
# the constraints the Helm chart sets on every pod
CONSTRAINED = ["--network", "host", "--read-only", "--cap-drop", "ALL",
               "--security-opt", "no-new-privileges", "--user", "65532:65532"]
# the image's own HEALTHCHECK command, asked more often than its 10 s so the test is quick
HEALTH_OFTEN = ["--health-interval", "1s", "--health-start-period", "60s"]


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
