"""`make compose-demo` as a Docker user runs it: the real docker-compose.yml with its Apicurio
switch (`SCHEMA_REGISTRY=apicurio`, compose.apicurio.yml), on the project's engine, with only the
images replaced by those built here (tests/compose/local-images.yml: the dependencies' from
`make deps-images`, the services' from `make images`).

The containers are on the Compose project's own bridge network, in the engine's address pool,
and find each other by service name through the engine's DNS: the services reach `kafka:9092`,
`schema-registry:8081` and `jaeger:4318`, wait on `kafka-init`, and the status page asks
`dlq-analyzer:8103`. The test itself reaches them only through the ports the file publishes on
127.0.0.1. The services run as the chart runs them (user 65532, read-only root file system),
scaled 1 -> 3 -> 1 while orders flow. The ground truth is the orders topic read back through the published broker port
(tests/truth.py). `make compose-down` leaves no container, network or volume behind; the make
target compares the machine's network settings before and after.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
# the ground truth through the ports the Compose file publishes on the host
os.environ["KAFKA_BOOTSTRAP_SERVERS"] = "127.0.0.1:29092"
os.environ["SCHEMA_REGISTRY_URL"] = "http://127.0.0.1:8081/apis/ccompat/v7"
sys.path.insert(0, str(ROOT / "tests"))
from browser import browser, check_final_figures  # noqa: E402
from engine import ENGINE, ENV, docker  # noqa: E402
from support import get_json, unique, wait_for  # noqa: E402
from truth import Failures, check_totals, send_garbage  # noqa: E402

OVERRIDE = "tests/compose/local-images.yml"
SCREENSHOT = ROOT / "target" / "test-logs" / "compose-status-page.png"
SERVICES = {"order-generator", "order-processor", "dlq-analyzer"}
POOL_PREFIX = "10.215."  # the engine's address pool (scripts/engine.sh)


def run(*args, env=ENV, timeout=300):
    done = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, args))}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def project_objects(kind, project):
    flag = "-aq" if kind == "ps" else "-q"
    return docker(kind, *(["ls"] if kind != "ps" else []), flag, "--filter", f"label=com.docker.compose.project={project}").split()


def bridges():
    return sorted(re.findall(r"^\d+: (br-[0-9a-f]+)", run("ip", "-o", "link", "show"), re.M))


def test_compose_demo_runs_the_real_file_on_its_own_network():
    project = unique("compose")
    failures = Failures(unique("seed"), 0.1)  # the Compose file's TRANSIENT_FAILURE_RATE
    env = {**ENV, "COMPOSE_PROJECT_NAME": project, "TRANSIENT_FAILURE_SEED": failures.seed}
    make = ["make", "--no-print-directory", f"COMPOSE=bash {ENGINE} compose", "SCHEMA_REGISTRY=apicurio",
            f"COMPOSE_OVERRIDE=-f {OVERRIDE}", "COMPOSE_BUILD=--no-build"]
    compose = ["bash", str(ENGINE), "compose", "-f", "docker-compose.yml", "-f", "compose.apicurio.yml", "-f", OVERRIDE]
    volumes_before, bridges_before = set(docker("volume", "ls", "-q").split()), bridges()
    driver = None
    try:
        demo = run(*make, "compose-demo", env=env, timeout=600)
        print(demo)
        page = int(re.search(r"status page\s+http://localhost:(\d+)/", demo).group(1))

        # every container on the project's own bridge network, addressed from the engine's pool,
        # and every published port on the host's loopback only
        network = f"{project}_default"
        subnet = docker("network", "inspect", "-f", "{{.Driver}} {{range .IPAM.Config}}{{.Subnet}}{{end}}", network)
        assert subnet.startswith("bridge " + POOL_PREFIX), subnet
        containers = project_objects("ps", project)
        for c in containers:
            info = docker("inspect", "-f", "{{.Name}} {{.HostConfig.NetworkMode}} {{json .NetworkSettings.Ports}}", c)
            name, mode, ports = info.split(" ", 2)
            assert mode == network, f"{name} on {mode}"
            published = [b for bindings in json.loads(ports).values() if bindings for b in bindings]
            assert all(b["HostIp"] == "127.0.0.1" for b in published), f"{name} publishes {published}"
        print(f"compose: {len(containers)} containers on {network} ({subnet.split()[1]}), ports on 127.0.0.1 only")

        # orders flow from the generator through the processor to the analyzer, by service names
        wait_for("orders counted", lambda: get_json(page, "/stats/global")["processed"] >= 100, 120)

        # the processor scaled out while orders flow, and back
        run(*compose, "up", "-d", "--no-build", "--wait", "--scale", "order-processor=3", "order-processor", env=env)
        replicas = [int(run(*compose, "port", "--index", str(i), "order-processor", "8102", env=env).strip().rsplit(":", 1)[1])
                    for i in (1, 2, 3)]
        shares = wait_for("each replica counting its partitions", lambda: (
            s if all((s := [get_json(p, "/stats")["processed"] for p in replicas])) else None), 120)
        print(f"compose: three processors on ports {replicas}, each counting: {shares}")
        run(*compose, "up", "-d", "--no-build", "--wait", "--scale", "order-processor=1", "order-processor", env=env)
        run(*compose, "stop", "order-generator", env=env)
        send_garbage("orders")
        page = int(run(*compose, "port", "order-processor", "8102", env=env).strip().rsplit(":", 1)[1])

        processed, dead = check_totals("orders", "orders-dlq", page, 8103, failures)
        assert processed > 100 and dead >= 3, (processed, dead)  # the garbage at least
        stats = get_json(page, "/stats/global")
        report = wait_for("the analyzer's report of every dead letter", lambda: (
            r if (r := get_json(8103, "/report"))["total"] == stats["dead_lettered"] else None), 60)
        print(f"compose: {processed} processed, {dead} dead-lettered, exact against the orders topic")

        # the status page, as a browser on the host opens it: the group's totals and the analyzer's
        # dead letters (asked by the processor at dlq-analyzer:8103), each trace linked to the UI
        driver = browser()
        links = check_final_figures(driver, page, stats, report, SCREENSHOT)
        assert links and all(href == f"http://localhost:16686/trace/{t}" for t, href in links.items()), links

        # an order's trace, read back from the Compose Jaeger's query API: all three services
        order = next(f["trace_id"] for f in report["recent"] if f.get("trace_id") and not f.get("key", "").startswith("garbage"))
        found = wait_for("the order's trace in Jaeger with the analyzer's span", lambda: (
            s if SERVICES <= (s := {p["serviceName"] for p in get_json(16686, f"/api/traces/{order}")["data"][0]["processes"].values()})
            else None), 30)
        print(f"compose: trace {order} holds spans of {sorted(found)}; page screenshot {SCREENSHOT}")
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == [], errors
        # the services ran as the chart runs them: nothing written to their root file systems
        for c in project_objects("ps", project):
            name, service = docker("inspect", "-f", '{{.Name}} {{index .Config.Labels "com.docker.compose.service"}}', c).split()
            if service in SERVICES:
                assert docker("diff", c) == "", f"{name} changed its root file system"
    except AssertionError:
        logs = subprocess.run([*compose, "logs", "--tail", "30"], env=env, cwd=ROOT, capture_output=True, text=True)
        print(logs.stdout[-12000:], logs.stderr[-3000:])
        raise
    finally:
        if driver is not None:
            driver.quit()
        down = subprocess.run([*make, "compose-down"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        print(down.stdout, down.stderr[-2000:])
    assert down.returncode == 0
    # nothing of the project is left: containers, its network and bridge, volumes
    assert project_objects("ps", project) == []
    assert project_objects("network", project) == []
    assert set(docker("volume", "ls", "-q").split()) <= volumes_before
    assert bridges() == bridges_before
