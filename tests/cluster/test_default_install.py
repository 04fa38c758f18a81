"""The chart as a user installs it: `helm install --wait` with the chart's defaults, its own
Kafka, schema registry and Jaeger in the cluster, changing only image names and tags (the
services' from `make images`, the dependencies' from `make deps-images`) and the registry switch
(`schemaRegistry.server=apicurio`, since Confluent's image cannot be had here).

Every connection is by Service name, resolved by the cluster's CoreDNS and translated by
kube-proxy (cluster/cluster.sh): the topics Job and the services reach `<release>-...-kafka`,
the registry and Jaeger; the status page asks the analyzer. The test reaches the pods only
through the NOTES' own `kubectl port-forward` commands (with free local ports, since the native
stack holds 16686 here), never by a pod address. The ground truth is the orders topic's end
offsets, read by the Kafka image's own `kafka-get-offsets.sh` in the broker's pod: after the
processor was scaled 1 -> 3 -> 1 and one of its pods deleted, and the broker's pod deleted and
back on its volume (the default StorageClass's: the local-path provisioner), every order on the
topic is counted or dead-lettered exactly once; `helm uninstall` takes the volume with it.
"""

import json
import pathlib
import re
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from browser import browser, check_final_figures  # noqa: E402
from support import free_port, get_json, unique, wait_for  # noqa: E402
from test_helm import CHART, ENV, HELM, ROOT, SERVICES, TAG, kubectl, objects, ready_pods, run, wait_ready  # noqa: E402

SCREENSHOT = ROOT / "target" / "test-logs" / "cluster-status-page.png"
# the images built here in place of Docker Hub's: the chart's values for them, and nothing else
IMAGES = {"kafka.image": "order-pipeline/kafka:4.1.1",
          "schemaRegistry.apicurioImage": "order-pipeline/apicurio-registry:3.3.3",
          "jaeger.image": "order-pipeline/jaeger:2.13.0",
          "default.image.tag": TAG}


class PortForward:
    """One of the NOTES' `kubectl -n NS port-forward svc/NAME LOCAL:REMOTE` commands, run with a
    free local port; stopped by pid."""

    def __init__(self, notes, service):
        match = re.search(rf"kubectl -n (\S+) port-forward (svc/\S+-{service}) (\d+):(\d+)", notes)
        assert match, f"no port-forward to {service} in the NOTES:\n{notes}"
        namespace, target, _local, remote = match.groups()
        self.port = free_port()
        self.proc = subprocess.Popen(["kubectl", "-n", namespace, "port-forward", target, f"{self.port}:{remote}"],
                                     env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        # kubectl says "Forwarding from 127.0.0.1:PORT" once it listens
        assert "Forwarding from" in self.proc.stdout.readline()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


def end_offsets(namespace, release, topic):
    """The topic's records, counted by the broker's own tool in its pod (partition:offset lines)."""
    out = kubectl("exec", "-n", namespace, f"{release}-order-pipeline-kafka-0", "--",
                  "/opt/kafka/bin/kafka-get-offsets.sh", "--bootstrap-server", "localhost:9092", "--topic", topic)
    return sum(int(line.rsplit(":", 1)[1]) for line in out.split())


def test_default_install_with_its_own_kafka_registry_and_jaeger():
    release, namespace = "orders", unique("op-default")
    sets = [a for k, v in {**IMAGES, "schemaRegistry.server": "apicurio"}.items() for a in ("--set", f"{k}={v}")]
    kubectl("create", "namespace", namespace)
    forwards, driver = [], None
    try:
        run(HELM, "install", release, CHART, "-n", namespace, "--wait", "--timeout", "8m", *sets, timeout=540)
        notes = run(HELM, "get", "notes", release, "-n", namespace)
        selector = f"app.kubernetes.io/instance={release}"
        components = sorted(p["metadata"]["labels"]["app.kubernetes.io/component"]
                            for p in objects(namespace, "pods", selector + ",app.kubernetes.io/component!=topics"))
        assert components == sorted([*SERVICES, "kafka", "schema-registry", "jaeger"]), components
        # the services were given Service names, never addresses
        processor_env = {e["name"]: e.get("value") for e in objects(namespace, "pods", "app.kubernetes.io/component=order-processor")
                         [0]["spec"]["containers"][0]["env"]}
        assert processor_env["KAFKA_BOOTSTRAP_SERVERS"] == f"{release}-order-pipeline-kafka.{namespace}.svc:9092"
        assert processor_env["SCHEMA_REGISTRY_URL"] == f"http://{release}-order-pipeline-schema-registry:8081/apis/ccompat/v7"
        assert processor_env["ANALYZER_URL"] == f"http://{release}-order-pipeline-dlq-analyzer:8103"

        processor, analyzer, jaeger = (PortForward(notes, s) for s in ("order-processor", "dlq-analyzer", "jaeger"))
        forwards += [processor, analyzer, jaeger]
        wait_for("orders counted", lambda: get_json(processor.port, "/stats/global")["processed"] >= 100, 180)

        # the processor scaled 1 -> 3 while orders flow, one of its pods deleted, back to 1
        deployment = f"deployment/{release}-order-pipeline-order-processor"
        kubectl("scale", deployment, "-n", namespace, "--replicas=3")
        victim = wait_ready(namespace, "order-processor", 3)[1]["metadata"]["name"]
        kubectl("delete", "pod", victim, "-n", namespace, "--wait=true", timeout=90)
        assert victim not in {p["metadata"]["name"] for p in wait_ready(namespace, "order-processor", 3)}
        kubectl("scale", deployment, "-n", namespace, "--replicas=1")
        wait_ready(namespace, "order-processor", 1)
        # the Service's endpoints changed under the port-forward: a new one to the pod now behind it
        processor.stop()
        processor = PortForward(notes, "order-processor")
        forwards.append(processor)

        # Kafka on its volume (the default StorageClass's, local-path): the broker's pod deleted
        # mid-stream comes back on the same volume with the records it had
        claim = objects(namespace, "persistentvolumeclaims", selector)
        assert len(claim) == 1 and claim[0]["status"]["phase"] == "Bound", claim
        volume = json.loads(kubectl("get", "pv", claim[0]["spec"]["volumeName"], "-o", "json"))
        assert volume["metadata"]["annotations"]["pv.kubernetes.io/provisioned-by"] == "rancher.io/local-path"
        before = end_offsets(namespace, release, "orders")
        kafka = f"{release}-order-pipeline-kafka-0"
        uid = objects(namespace, "pods", "app.kubernetes.io/component=kafka")[0]["metadata"]["uid"]
        kubectl("delete", "pod", kafka, "-n", namespace, "--wait=true", timeout=120)
        wait_for("the broker back in a new pod", lambda: [
            p for p in ready_pods(namespace, "app.kubernetes.io/component=kafka") if p["metadata"]["uid"] != uid], 180)
        after = end_offsets(namespace, release, "orders")
        assert after >= before, f"the broker lost records with its pod: {before} before, {after} after"
        wait_for("orders counted after the broker's return",
                 lambda: get_json(processor.port, "/stats/global")["processed"] > 0 and end_offsets(namespace, release, "orders") > after, 120)
        print(f"default install: Kafka's pod deleted with {before} orders on the topic; back on volume "
              f"{claim[0]['spec']['volumeName']} with {after}, and orders flowing again")

        # the generator stops (SIGTERM: it flushes); every order on the topic is then counted or
        # dead-lettered, exactly once
        kubectl("scale", f"deployment/{release}-order-pipeline-order-generator", "-n", namespace, "--replicas=0")
        wait_for("the generator gone", lambda: not objects(namespace, "pods", "app.kubernetes.io/component=order-generator"), 90)
        sent = end_offsets(namespace, release, "orders")
        stats = wait_for(f"all {sent} orders settled", lambda: (
            s if (s := get_json(processor.port, "/stats/global"))["processed"] + s["dead_lettered"] >= sent else None), 180)
        assert stats["processed"] + stats["dead_lettered"] == sent, (stats, sent)
        assert end_offsets(namespace, release, "orders-dlq") > 0
        report = wait_for("the analyzer's report of every dead letter", lambda: (
            r if (r := get_json(analyzer.port, "/report"))["total"] == stats["dead_lettered"] else None), 60)
        print(f"default install: {sent} orders on the topic = {stats['processed']} processed + "
              f"{stats['dead_lettered']} dead-lettered; the analyzer reports {report['total']}")

        # the status page through the NOTES' port-forward, as a person opens it
        driver = browser()
        links = check_final_figures(driver, processor.port, stats, report, SCREENSHOT)
        assert links and all(href == f"http://localhost:16686/trace/{t}" for t, href in links.items()), links

        # an order's trace through the NOTES' port-forward to the chart's Jaeger: all three services
        order = next(f["trace_id"] for f in report["recent"] if f.get("trace_id"))
        found = wait_for("the order's trace in the chart's Jaeger", lambda: (
            s if set(SERVICES) <= (s := {p["serviceName"] for p in
                                         get_json(jaeger.port, f"/api/traces/{order}")["data"][0]["processes"].values()})
            else None), 30)
        print(f"default install: trace {order} holds spans of {sorted(found)}; page screenshot {SCREENSHOT}")
        run(HELM, "uninstall", release, "-n", namespace, "--wait", "--timeout", "2m", timeout=180)
        # the release's volume goes with it (the StatefulSet's retention policy), and its directory
        wait_for("the Kafka volume deleted", lambda: not objects(namespace, "persistentvolumeclaims", selector)
                 and claim[0]["spec"]["volumeName"] not in kubectl("get", "pv", "-o", "name"), 120)
        # and every pod gone (the next test counts the services' processes on this machine)
        wait_for("no pod left in the namespace", lambda: not json.loads(
            kubectl("get", "pods", "-n", namespace, "-o", "json"))["items"], 120)
    finally:
        if driver is not None:
            driver.quit()
        for forward in forwards:
            forward.stop()
        subprocess.run(["kubectl", "delete", "namespace", namespace, "--wait=false"], env=ENV, capture_output=True)
