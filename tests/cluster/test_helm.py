"""The Helm chart on a real single-node Kubernetes running here (cluster/cluster.sh: etcd, the API
server, controller manager, scheduler and kubelet built from k8s.io/kubernetes, on Debian's
containerd and runc), with the three images of `make images` loaded into its containerd.

Kafka, the registry and Jaeger are the native stack's: their images come from Docker Hub, which
cannot be reached here, so the chart's own are switched off. Pods reach the stack on the
cluster bridge's host address (the broker's second listener, the registry and Jaeger's OTLP/HTTP
receiver forwarded there). The ground truth is the topics' content (tests/truth.py).

One scenario, in the order a user lives it: `helm install --wait`, whose topics Job (`order-processor
create-topics`, in our image) creates the topics on the external cluster with the partitions,
replication factor and configs from values; orders flowing, the processor and the analyzer in
their groups as static members named after their pods; the processor
scaled to three, one of its pods deleted, back to one; one order's trace across the three pods in
Jaeger; `helm upgrade` with a changed env value (every pod rolls); the generator stopped; exact
group totals and each dead letter once; `helm uninstall` leaving nothing of the release.
With the Prometheus Operator's and KEDA's CRDs applied, the chart's ServiceMonitor,
PrometheusRule, Grafana dashboard and ScaledObject are accepted by the API server under strict
field validation, and every metric their queries name is in the pods' live `/metrics`.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from support import get_json, unique, wait_for  # noqa: E402
from truth import BOOTSTRAP, Failures, check_totals, read_all  # noqa: E402
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType  # noqa: E402

CLUSTER = ROOT / "cluster" / "cluster.sh"
HELM = os.environ.get("HELM", str(ROOT / ".stack" / "bin" / "helm-v4.3.2"))
CHART = ROOT / "helm" / "order-pipeline"
TAG = os.environ.get("IMAGE_TAG", "dev")
# the cluster bridge's host address (cluster/cluster.sh), where the stack listens for pods
POD_HOST = os.environ.get("CLUSTER_HOST_ADDRESS", "10.213.0.1")
JAEGER = "http://127.0.0.1:16686"
SERVICES = ("order-generator", "order-processor", "dlq-analyzer")
PORTS = {"order-generator": 8101, "order-processor": 8102, "dlq-analyzer": 8103}


def cluster_env():
    env = dict(os.environ)
    out = subprocess.run(["bash", CLUSTER, "env"], check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        key, value = line.removeprefix("export ").split("=", 1)
        env[key] = value.replace("$PATH", os.environ["PATH"])
    return env


ENV = cluster_env()


def run(*args, timeout=120):
    done = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def kubectl(*args, timeout=120):
    return run("kubectl", *args, timeout=timeout)


def objects(namespace, kind, selector):
    return json.loads(kubectl("get", kind, "-n", namespace, "-l", selector, "-o", "json"))["items"]


def services_pods(namespace, selector):
    """The services' pods among `selector`'s (the topics Job's pod left out)."""
    return objects(namespace, "pods", f"{selector},app.kubernetes.io/component!=topics")


def ready_pods(namespace, selector):
    pods = objects(namespace, "pods", selector)
    return [p for p in pods if p["metadata"].get("deletionTimestamp") is None
            and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))]


def wait_ready(namespace, component, count, timeout=180):
    selector = f"app.kubernetes.io/component={component}"

    def settled():
        pods = objects(namespace, "pods", selector)
        ready = ready_pods(namespace, selector)
        return ready if len(ready) == count == len(pods) else None

    return wait_for(f"{count} ready {component} pod(s) and no other", settled, timeout)


def address(namespace, component):
    pod = wait_ready(namespace, component, 1)[0]
    return f"{pod['status']['podIP']}:{PORTS[component]}"


def pod_processes(name):
    """(pid, uid) of each process named `name` that runs in a pod of this cluster (cgroup kubepods)."""
    found = []
    for proc in pathlib.Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "comm").read_text().strip() != name[:15] or "kubepods" not in (proc / "cgroup").read_text():
                continue
            status = (proc / "status").read_text()
        except OSError:
            continue
        found.append((int(proc.name), int(next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:")))))
    return found


def crd_files():
    """The CRDs of the ServiceMonitor, PrometheusRule and ScaledObject (scripts/check-deploy.sh)."""
    out = run("bash", str(ROOT / "scripts" / "check-deploy.sh"), "crds", timeout=600)
    return [line for line in out.splitlines() if line.endswith(".yaml")]


def metric_names(expr):
    """The metric names a PromQL expression selects (every selector here has braces)."""
    return set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", expr)) - {"by", "without"}


def scraped_names(where):
    with urllib.request.urlopen(f"http://{where}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def jaeger_trace(trace_id):
    with urllib.request.urlopen(f"{JAEGER}/api/traces/{trace_id}", timeout=5) as r:
        return json.load(r)["data"][0]


def test_helm_install_scale_trace_upgrade_uninstall():
    release = "orders"
    namespace = unique("op")
    orders, dlq = f"{namespace}-orders", f"{namespace}-dlq"
    values = {
        "kafka.enabled": "false", "kafka.bootstrapServers": f"{POD_HOST}:19092",
        "schemaRegistry.enabled": "false", "schemaRegistry.url": f"http://{POD_HOST}:8081/apis/ccompat/v7",
        "jaeger.enabled": "false", "jaeger.otlpEndpoint": f"http://{POD_HOST}:4318",
        "topics.orders": orders, "topics.dlq": dlq,
        # the topics Job against the external cluster, with values' partitions and configs
        "topics.ordersPartitions": "6", "topics.replicationFactor": "1",
        r"topics.ordersConfig.retention\.ms": "3600000", r"topics.dlqConfig.max\.message\.bytes": "2097152",
        # static group membership: each consumer's group.instance.id is its pod's name
        "orderProcessor.staticMembership": "true", "dlqAnalyzer.staticMembership": "true",
        "default.image.tag": TAG, "default.image.pullPolicy": "Never",
        # accepted by the API server and removed by uninstall; the bridge CNI does not enforce it
        "networkPolicy.enabled": "true",
        # the Prometheus Operator's objects and the dashboard (their CRDs applied below)
        "serviceMonitor.enabled": "true", "prometheusRule.enabled": "true", "grafanaDashboard.enabled": "true",
    }
    failures = Failures(unique("seed"), 0.1)  # the chart's rate
    env = {
        "orderGenerator.env.ORDER_RATE": "40",
        "orderProcessor.env.RETRY_INITIAL_BACKOFF_MS": "100",
        "orderProcessor.env.TRANSIENT_FAILURE_SEED": failures.seed,
    }
    # settings from Secrets, the way credentials are given: the processor's group through
    # extraEnv (secretKeyRef), the analyzer's through existingSecret (every key a variable; its
    # default in `env` removed, since `env` wins over envFrom), and a Secret mounted as files
    # in every pod through extraVolumes
    from_secrets = {
        "orderProcessor.extraEnv[0].name": "CONSUMER_GROUP",
        "orderProcessor.extraEnv[0].valueFrom.secretKeyRef.name": "processor-env",
        "orderProcessor.extraEnv[0].valueFrom.secretKeyRef.key": "group",
        "dlqAnalyzer.env.CONSUMER_GROUP": "null",
        "dlqAnalyzer.existingSecret": "analyzer-env",
        "default.extraVolumes[0].name": "files", "default.extraVolumes[0].secret.secretName": "files",
        "default.extraVolumeMounts[0].name": "files", "default.extraVolumeMounts[0].mountPath": "/etc/op-test",
        "default.extraVolumeMounts[0].readOnly": "true",
    }
    sets = [a for k, v in {**values, **from_secrets}.items() for a in ("--set", f"{k}={v}")]
    sets += [a for k, v in env.items() for a in ("--set-string", f"{k}={v}")]
    kubectl("create", "namespace", namespace)
    kubectl("create", "secret", "generic", "processor-env", "-n", namespace, f"--from-literal=group={namespace}-processor")
    kubectl("create", "secret", "generic", "analyzer-env", "-n", namespace, f"--from-literal=CONSUMER_GROUP={namespace}-analyzer")
    kubectl("create", "secret", "generic", "files", "-n", namespace, f"--from-literal=marker={namespace}")
    selector = f"app.kubernetes.io/instance={release}"
    timings = {}
    crds = crd_files()
    assert len(crds) == 3, crds
    for f in crds:
        kubectl("apply", "--server-side", "-f", f)
    kubectl("wait", "--for=condition=Established", "crd/servicemonitors.monitoring.coreos.com",
            "crd/prometheusrules.monitoring.coreos.com", "crd/scaledobjects.keda.sh", "--timeout=60s")
    try:
        # --- install: every pod Ready through the chart's own probes
        t = time.time()
        run(HELM, "install", release, CHART, "-n", namespace, "--wait", "--timeout", "5m",
            *sets, timeout=360)
        timings["install --wait"] = time.time() - t
        assert len(objects(namespace, "networkpolicies", selector)) == 3
        # the topics Job: done, and the topics as values say
        # (the services are ready once the topics exist; the Job's own status may follow a moment later)
        job = objects(namespace, "jobs", selector)
        assert len(job) == 1, job
        kubectl("wait", "--for=condition=Complete", f"job/{job[0]['metadata']['name']}", "-n", namespace, "--timeout=60s")
        job_log = kubectl("logs", f"job/{job[0]['metadata']['name']}", "-n", namespace)
        assert f"topic {orders}: created, 6 partitions, replication factor 1, retention.ms=3600000" in job_log, job_log
        admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
        meta = admin.list_topics(timeout=10).topics
        assert (len(meta[orders].partitions), len(meta[dlq].partitions)) == (6, 3)
        configs = admin.describe_configs([ConfigResource(ResourceType.TOPIC, orders),
                                          ConfigResource(ResourceType.TOPIC, dlq)])
        described = {r.name: f.result(timeout=30) for r, f in configs.items()}
        assert described[orders]["retention.ms"].value == "3600000"
        assert described[dlq]["max.message.bytes"].value == "2097152"
        print(job_log.strip())
        pods = services_pods(namespace, selector)
        assert sorted(p["metadata"]["labels"]["app.kubernetes.io/component"] for p in pods) == sorted(SERVICES)
        for pod in pods:
            spec = pod["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True, pod["metadata"]["name"]
            for c in spec["containers"]:
                sc = c["securityContext"]
                assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"]["drop"] == ["ALL"], c["name"]
                assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert all(s["ready"] for s in pod["status"]["containerStatuses"]), pod["metadata"]["name"]
        # the custom resources, accepted by the API server against their CRDs with unknown
        # fields refused; the ScaledObject too (KEDA itself is not here to act on it)
        assert len(objects(namespace, "servicemonitors", selector)) == 1
        assert len(objects(namespace, "prometheusrules", selector)) == 1
        keda = run(HELM, "template", release, CHART, "-n", namespace, *sets,
                   "--set", "orderProcessor.keda.enabled=true", "--show-only", "templates/processor-scaling.yaml")
        pathlib.Path(f"/tmp/{namespace}-keda.yaml").write_text(keda)
        try:
            kubectl("apply", "--dry-run=server", "--validate=strict", "-n", namespace, "-f", f"/tmp/{namespace}-keda.yaml")
        finally:
            pathlib.Path(f"/tmp/{namespace}-keda.yaml").unlink()
        # the processes themselves, seen from the machine: each service runs in its pod as 65532
        for name in SERVICES:
            found = pod_processes(name)
            assert [uid for _pid, uid in found] == [65532], (name, found)
            # the Secret mounted through extraVolumes, seen in the process's own root
            marker = pathlib.Path(f"/proc/{found[0][0]}/root/etc/op-test/marker")
            assert marker.read_text() == namespace, name
        # the consumer groups named in Secrets are the ones in use (asked until the broker's
        # group coordinator answers: it may still be loading after the stack's restart)
        wanted = {f"{namespace}-processor", f"{namespace}-analyzer"}
        wait_for("the consumer groups named in the Secrets", lambda: wanted <= {
            g.group_id for g in admin.list_consumer_groups().result(timeout=30).valid}, 60)
        # static members: each group's member is the one pod, its instance id the pod's name
        for group, component in ((f"{namespace}-processor", "order-processor"), (f"{namespace}-analyzer", "dlq-analyzer")):
            pod = wait_ready(namespace, component, 1)[0]["metadata"]["name"]

            def members(g=group):
                found = admin.describe_consumer_groups([g])[g].result(timeout=30).members
                return [m.group_instance_id for m in found] or None
            assert wait_for(f"{group}'s members", members, 60) == [pod], (group, pod)
        print("static members: each consumer's group.instance.id is its pod's name")
        processor = f"deployment/{release}-order-pipeline-order-processor"
        generator = f"deployment/{release}-order-pipeline-order-generator"

        # --- orders flow; the processor scales to three, loses a pod, goes back to one
        wait_for("orders processed in the cluster",
                 lambda: get_json(address(namespace, "order-processor"), "/stats/global")["processed"] >= 100, 120)
        t = time.time()
        kubectl("scale", processor, "-n", namespace, "--replicas=3")
        three = wait_ready(namespace, "order-processor", 3)
        # the work is shared: each replica processes orders of its own (/stats is its share)
        for pod in three:
            where = f"{pod['status']['podIP']}:{PORTS['order-processor']}"
            wait_for(f"{pod['metadata']['name']} processing", lambda w=where: get_json(w, "/stats")["processed"] > 0, 60)
        victim = three[1]["metadata"]["name"]
        kubectl("delete", "pod", victim, "-n", namespace, "--wait=true", timeout=90)
        after = wait_ready(namespace, "order-processor", 3)
        assert victim not in {p["metadata"]["name"] for p in after}
        kubectl("scale", processor, "-n", namespace, "--replicas=1")
        wait_ready(namespace, "order-processor", 1)
        timings["scale 1 -> 3, delete a pod, 3 -> 1"] = time.time() - t

        # --- one order's journey in Jaeger: a dead letter's trace has spans of all three pods
        def traced_dead_letter():
            for _p, _o, _k, _v, headers in read_all(dlq):
                if "traceparent" not in headers:
                    continue
                trace_id = headers["traceparent"].decode().split("-")[1]
                try:
                    trace = jaeger_trace(trace_id)
                except OSError:
                    continue
                seen = {}
                for p in trace["processes"].values():
                    tags = {tag["key"]: tag["value"] for tag in p["tags"]}
                    if tags.get("k8s.namespace.name") == namespace:
                        seen[p["serviceName"]] = tags
                if set(SERVICES) <= set(seen):
                    return trace_id, seen
            return None

        trace_id, processes = wait_for("a dead letter's trace with spans from the three pods", traced_dead_letter, 90)
        print(f"trace {trace_id}: {sorted(processes)}")

        # --- every metric the alerts and the dashboard query is in the pods' live /metrics
        rules = objects(namespace, "prometheusrules", selector)[0]["spec"]["groups"][0]["rules"]
        board = json.loads(objects(namespace, "configmaps", selector + ",app.kubernetes.io/component=monitoring")[0]
                           ["data"]["order-pipeline.json"])
        queried = set()
        for expr in [r["expr"] for r in rules] + [t["expr"] for p in board["panels"] for t in p["targets"]]:
            queried |= metric_names(expr)
        live = set()

        def all_exposed():
            # a series appears once there is something to measure (the lag of a partition this
            # replica has, after librdkafka's next statistics): scraped until all are there
            for component in SERVICES:
                live.update(scraped_names(address(namespace, component)))
            return queried <= live
        assert queried
        try:
            wait_for("every queried metric in a scrape", all_exposed, 60)
        except AssertionError:
            raise AssertionError(f"queried but not exposed: {sorted(queried - live)}") from None
        print(f"{len(rules)} alerts and {len(board['panels'])} panels query {len(queried)} metrics, all exposed")

        # --- upgrade with a changed env value: every pod rolls, no order is lost (checked below)
        before = {p["metadata"]["name"] for p in services_pods(namespace, selector)}
        t = time.time()
        run(HELM, "upgrade", release, CHART, "-n", namespace, "--wait", "--timeout", "5m", *sets,
            "--set-string", r"default.env.RUST_LOG=info\,rdkafka=warn\,order_runtime=debug", timeout=360)
        timings["upgrade --wait"] = time.time() - t
        for component in SERVICES:
            wait_ready(namespace, component, 1)
        now = {p["metadata"]["name"] for p in services_pods(namespace, selector)}
        assert not before & now, f"pods not rolled by the upgrade: {before & now}"
        for pod in services_pods(namespace, selector):
            env_now = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
            assert env_now["RUST_LOG"] == "info,rdkafka=warn,order_runtime=debug"

        # --- the generator stops (SIGTERM: it flushes); then the totals must be exact
        kubectl("scale", generator, "-n", namespace, "--replicas=0")
        wait_for("the generator gone", lambda: not objects(namespace, "pods", "app.kubernetes.io/component=order-generator"), 90)
        processed, dead = check_totals(orders, dlq, address(namespace, "order-processor"), address(namespace, "dlq-analyzer"),
                                       failures)
        assert processed > 100 and dead > 0, (processed, dead)
        print(f"exact: {processed} processed, {dead} dead-lettered; timings (s): "
              + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))

        # --- uninstall leaves nothing of the release
        run(HELM, "uninstall", release, "-n", namespace, "--wait", "--timeout", "2m", timeout=180)
        kinds = ("all,configmaps,secrets,serviceaccounts,poddisruptionbudgets,horizontalpodautoscalers,jobs,"
                 "endpoints,networkpolicies,servicemonitors,prometheusrules")

        def names(items):
            return [f"{i['kind']}/{i['metadata']['name']}" for i in items]

        seen = {}

        def gone():
            seen["release"] = names(json.loads(kubectl("get", kinds, "-n", namespace, "-l", selector, "-o", "json"))["items"])
            seen["pods"] = names(json.loads(kubectl("get", "pods", "-n", namespace, "-o", "json"))["items"])
            return not seen["release"] and not seen["pods"]

        try:
            wait_for("nothing of the release left, no pod in the namespace", gone, 90)
        except AssertionError as e:
            raise AssertionError(f"{e}: {seen}") from None
        assert "helm.sh/release" not in kubectl("get", "secrets", "-n", namespace)
    finally:
        subprocess.run(["kubectl", "delete", "namespace", namespace, "--wait=false"], env=ENV, capture_output=True)
        for f in crds:
            subprocess.run(["kubectl", "delete", "--ignore-not-found", "-f", f], env=ENV, capture_output=True)
