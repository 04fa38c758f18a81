#!/usr/bin/env bash
# Proves what can be proved about the deployment files without a Docker engine or a cluster,
# with the real tools: hadolint on the Dockerfile; compose-go (the loader `docker compose`
# uses) on docker-compose.yml; helm lint and helm template, the rendered objects validated
# strictly against the Kubernetes schemas (kubernetes-validate); values.schema.json refusing
# bad values; k8s/ manifests current with the chart. The images themselves are built and run by
# `make images` and `make test-images` (scripts/engine.sh, tests/images).
#
#   scripts/check-deploy.sh            everything
#   scripts/check-deploy.sh manifests  regenerate k8s/order-pipeline.yaml from the chart
#   scripts/check-deploy.sh tools      only install the tools (helm, compose-check, hadolint, ...)
#   scripts/check-deploy.sh helm       only build helm (for make kind-install without HELM=)
#   scripts/check-deploy.sh crds       only print the paths of the CRD files the custom resources are checked against
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

HELM_VERSION=v4.3.2
bin="$repo/.stack/bin"
helm="$bin/helm-$HELM_VERSION"
compose_check="$bin/compose-check"
venv="$repo/.venv"
chart=helm/order-pipeline
manifests=k8s/order-pipeline.yaml
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

step() { printf '\n==> %s\n' "$*"; }
fail() { printf 'check-deploy: %s\n' "$*" >&2; exit 1; }

build_helm() {
  mkdir -p "$bin"
  if [ ! -x "$helm" ]; then
    echo "building helm $HELM_VERSION from the Go module proxy"
    (cd tools && go build -trimpath -o "$helm.part" helm.sh/helm/v4/cmd/helm) && mv "$helm.part" "$helm"
  fi
}

# promtool (tools/promtool/go.mod), and the CRDs of the Prometheus Operator and KEDA, from the
# Go module proxy: the modules carry their CRD manifests (kept in Go's module cache)
PROMTOOL="$bin/promtool"
PROMETHEUS_OPERATOR_VERSION=v0.85.0
KEDA_VERSION=v2.21.0

build_promtool() {
  mkdir -p "$bin"
  if [ ! -x "$PROMTOOL" ] || [ tools/promtool/go.mod -nt "$PROMTOOL" ]; then
    # without the service discovery plugins (cloud SDKs): the rules and their tests need none
    echo "building promtool from the Go module proxy (tools/promtool/go.mod)"
    (cd tools/promtool && go build -trimpath -tags remove_all_sd -o "$PROMTOOL.part" github.com/prometheus/prometheus/cmd/promtool) \
      && mv "$PROMTOOL.part" "$PROMTOOL"
  fi
}

module_dir() { # module@version: its directory in Go's module cache, downloaded if need be
  (cd tools && go mod download -json "$1") | python3 -c 'import json, sys; d = json.load(sys.stdin); print(d.get("Dir") or sys.exit(d.get("Error", "no Dir")))'
}

# the CRD files rendered objects are checked against
crds() {
  local po keda
  po=$(module_dir "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION") || fail "no prometheus-operator $PROMETHEUS_OPERATOR_VERSION from the module proxy"
  keda=$(module_dir "github.com/kedacore/keda/v2@$KEDA_VERSION") || fail "no keda $KEDA_VERSION from the module proxy"
  echo "$po/example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml"
  echo "$po/example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml"
  echo "$keda/config/crd/bases/keda.sh_scaledobjects.yaml"
}

tools() {
  # helm and compose-check from the Go module proxy, versions pinned in tools/go.mod and go.sum
  build_helm
  build_promtool
  if [ ! -x "$compose_check" ] || [ tools/compose-check/main.go -nt "$compose_check" ] || [ tools/go.sum -nt "$compose_check" ]; then
    (cd tools && go build -o "$compose_check" ./compose-check)
  fi
  if [ ! -f "$venv/.deploy-tools" ] || [ tools/requirements.txt -nt "$venv/.deploy-tools" ]; then
    [ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r tools/requirements.txt
    touch "$venv/.deploy-tools"
  fi
}

render_manifests() {
  {
    echo "# Generated from the Helm chart by 'make k8s-manifests' (scripts/check-deploy.sh manifests)."
    echo "# Do not edit: change helm/order-pipeline and regenerate. Apply with:"
    echo "#   kubectl create namespace order-pipeline && kubectl apply -n order-pipeline -f k8s/order-pipeline.yaml"
    echo "# Pause, resume and redrive need a token in the Secret order-pipeline-operations (without it"
    echo "# they are refused), e.g.:"
    echo "#   kubectl -n order-pipeline create secret generic order-pipeline-operations --from-literal=token=\$(openssl rand -hex 24)"
    # Helm's ownership annotations beside its labels: a later `helm install order-pipeline -n
    # order-pipeline` adopts the applied objects instead of refusing them
    "$helm" template order-pipeline "$chart" --namespace order-pipeline \
      --set operations.existingSecret=order-pipeline-operations |
      sed '/^metadata:$/a\  annotations:\n    meta.helm.sh/release-name: order-pipeline\n    meta.helm.sh/release-namespace: order-pipeline'
  }
}

validate() { # file
  "$venv/bin/kubernetes-validate" --strict --quiet "$1" || fail "$1 does not validate against the Kubernetes schemas"
}

kinds_in() { "$venv/bin/python" -c 'import sys, yaml; print(" ".join(sorted(d["kind"] for d in yaml.safe_load_all(open(sys.argv[1])) if d)))' "$1"; }

replicas_of() { # file deployment-suffix
  "$venv/bin/python" - "$1" "$2" <<'EOF'
import sys, yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d and d["kind"] == "Deployment" and d["metadata"]["name"].endswith(sys.argv[2]):
        print(d["spec"].get("replicas", "unset"))
EOF
}

if [ "${1:-}" = helm ]; then
  build_helm
  exit 0
fi
if [ "${1:-}" = crds ]; then
  crds
  exit 0
fi
tools
if [ "${1:-}" = tools ]; then
  exit 0
fi
if [ "${1:-}" = manifests ]; then
  render_manifests >"$manifests"
  echo "wrote $manifests"
  exit 0
fi

step "hadolint Dockerfile"
# (a failing command before && does not stop a `set -e` script: say it)
"$venv/bin/hadolint" Dockerfile || fail "hadolint has findings in the Dockerfile"
echo "no findings"

step "docker-compose.yml through compose-go"
"$compose_check" docker-compose.yml | tee "$work/compose.txt"
for s in kafka kafka-init schema-registry jaeger order-generator order-processor dlq-analyzer kafka-ui; do
  grep -q "^$s"$'\t' "$work/compose.txt" || fail "docker-compose.yml has no service $s"
done
grep -v '^kafka-init' "$work/compose.txt" | grep -q 'healthcheck=false' && fail "a long-running service has no health check"
grep '^order-processor' "$work/compose.txt" | grep -q 'container_name="".*published=\[\]' \
  || fail "order-processor must have no fixed container name or host port, or it cannot scale"
# a port published on every address of the host is open to the user's LAN
grep 'host_ip=' "$work/compose.txt" | grep -v 'host_ip=\[\]' | grep -Ev 'host_ip=\[("127\.0\.0\.1" ?)+\]' \
  && fail "a port is published beyond 127.0.0.1"
echo "every service present; all long-running ones have health checks; the processor scales;"
echo "every port is published on 127.0.0.1 only"

step "helm lint"
"$helm" lint "$chart"
"$helm" lint "$chart" --set kafka.enabled=false,kafka.bootstrapServers=kafka:9092 \
  --set schemaRegistry.enabled=false,schemaRegistry.url=http://registry:8081 --set jaeger.enabled=false

step "helm template, default values (in-cluster Kafka, Schema Registry, Jaeger)"
"$helm" template op "$chart" >"$work/default.yaml"
validate "$work/default.yaml"
echo "objects: $(kinds_in "$work/default.yaml")"

step "helm template, infrastructure off, external endpoints"
"$helm" template op "$chart" \
  --set kafka.enabled=false,kafka.bootstrapServers=kafka.example:9092 \
  --set schemaRegistry.enabled=false,schemaRegistry.url=https://registry.example \
  --set jaeger.enabled=false,jaeger.otlpEndpoint=http://otel-collector.example:4318 >"$work/external.yaml"
validate "$work/external.yaml"
kinds=$(kinds_in "$work/external.yaml")
echo "objects: $kinds"
case "$kinds" in *StatefulSet*) fail "infrastructure rendered although switched off";; esac
# the topics Job works against the external cluster, with the processor's image and settings
grep -q -- '- create-topics' "$work/external.yaml" || fail "no topics Job against the external cluster"
"$helm" template op "$chart" --set kafka.enabled=false,kafka.bootstrapServers=kafka.example:9092 \
  --set topics.create=false >"$work/no-topics.yaml"
case "$(kinds_in "$work/no-topics.yaml")" in *Job*) fail "topics.create=false still renders the topics Job";; esac
grep -Eq 'value: "?kafka.example:9092"?$' "$work/external.yaml" || fail "external bootstrap servers not used"
grep -Eq 'value: "?https://registry.example"?$' "$work/external.yaml" || fail "external registry URL not used"

step "helm template, the in-cluster registry switched to Apicurio"
"$helm" template op "$chart" --set schemaRegistry.server=apicurio >"$work/apicurio.yaml"
validate "$work/apicurio.yaml"
grep -q 'image: apicurio/apicurio-registry:' "$work/apicurio.yaml" || fail "schemaRegistry.server=apicurio did not run Apicurio's image"
[ "$(grep -c 'value: "*http://op-order-pipeline-schema-registry:8081/apis/ccompat/v7"*$' "$work/apicurio.yaml")" = 3 ] \
  || fail "the three services do not reach Apicurio's Confluent-compatible API"
grep -q 'confluentinc' "$work/apicurio.yaml" && fail "Confluent's image rendered beside Apicurio"
echo "Apicurio's image, the services at /apis/ccompat/v7"

step "helm template: the services' ServiceAccount"
"$venv/bin/python" - "$work/default.yaml" <<'EOF2' || fail "the ServiceAccount is not the services' and the Job's (above)"
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
accounts = [d for d in docs if d["kind"] == "ServiceAccount"]
assert [a["metadata"]["name"] for a in accounts] == ["op-order-pipeline"], accounts
assert accounts[0]["automountServiceAccountToken"] is False
pods = {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Deployment", "Job")
        and d["metadata"]["labels"]["app.kubernetes.io/component"] in ("order-generator", "order-processor", "dlq-analyzer", "topics")}
assert len(pods) == 4, sorted(pods)
for name, pod in pods.items():
    assert pod["serviceAccountName"] == "op-order-pipeline" and pod["automountServiceAccountToken"] is False, name
print("one ServiceAccount, no token mounted, used by the three services and the topics Job")
EOF2
"$helm" template op "$chart" --set serviceAccount.create=false >"$work/no-sa.yaml"
grep -q 'kind: ServiceAccount' "$work/no-sa.yaml" && fail "serviceAccount.create=false still renders a ServiceAccount"
[ "$(grep -c 'serviceAccountName: default$' "$work/no-sa.yaml")" = 4 ] || fail "without a ServiceAccount of the chart's, the pods must run as default"

step "helm template --set orderProcessor.replicas=3, autoscaling on"
"$helm" template op "$chart" --set orderProcessor.replicas=3 >"$work/scaled.yaml"
[ "$(replicas_of "$work/scaled.yaml" order-processor)" = 3 ] || fail "orderProcessor.replicas=3 did not give 3 replicas"
echo "order-processor replicas: 3"
"$helm" template op "$chart" --set orderProcessor.autoscaling.enabled=true >"$work/hpa.yaml"
validate "$work/hpa.yaml"
grep -q 'kind: HorizontalPodAutoscaler' "$work/hpa.yaml" || fail "no HorizontalPodAutoscaler"
[ "$(replicas_of "$work/hpa.yaml" order-processor)" = unset ] || fail "with an HPA the Deployment must not fix replicas"
echo "HorizontalPodAutoscaler rendered; the Deployment leaves replicas to it"

step "helm template with secrets as env, extra volumes and NetworkPolicies"
"$helm" template op "$chart" --set networkPolicy.enabled=true \
  --set 'networkPolicy.ingressFrom[0].namespaceSelector.matchLabels.kubernetes\.io/metadata\.name=monitoring' \
  --set default.existingSecret=pipeline-env \
  --set 'orderProcessor.extraEnv[0].name=RDKAFKA_SASL_PASSWORD' \
  --set 'orderProcessor.extraEnv[0].valueFrom.secretKeyRef.name=kafka-user' \
  --set 'orderProcessor.extraEnv[0].valueFrom.secretKeyRef.key=password' \
  --set 'orderProcessor.extraEnv[1].name=CONSUMER_GROUP' --set 'orderProcessor.extraEnv[1].value=from-extra-env' \
  --set orderProcessor.env.ANALYZER_URL=http://analyzer.example:8103 \
  --set 'default.extraVolumes[0].name=ca' --set 'default.extraVolumes[0].secret.secretName=kafka-ca' \
  --set 'default.extraVolumeMounts[0].name=ca' --set 'default.extraVolumeMounts[0].mountPath=/etc/kafka-ca' \
  >"$work/secrets.yaml"
validate "$work/secrets.yaml"
"$venv/bin/python" - "$work/secrets.yaml" <<'EOF2' || fail "secrets, volumes or NetworkPolicies rendered wrong (above)"
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
services = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "order-pipeline"
            and d["metadata"]["labels"]["app.kubernetes.io/component"] in ("order-generator", "order-processor", "dlq-analyzer")]
assert len(services) == 3 and len(policies) == 3, (len(services), len(policies))
for d in services:
    pod = d["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert {"secretRef": {"name": "pipeline-env"}} in c["envFrom"], d["metadata"]["name"]
    assert pod["volumes"] == [{"name": "ca", "secret": {"secretName": "kafka-ca"}}], d["metadata"]["name"]
    assert c["volumeMounts"] == [{"name": "ca", "mountPath": "/etc/kafka-ca"}], d["metadata"]["name"]
    names = [e["name"] for e in c["env"]]
    if d["metadata"]["labels"]["app.kubernetes.io/component"] == "order-processor":
        assert names[-1] == "RDKAFKA_SASL_PASSWORD" and "valueFrom" in c["env"][-1], names
        # a name given again replaces the entry where it stood (the chart's, or env's)
        values = {e["name"]: e.get("value") for e in c["env"]}
        assert values["CONSUMER_GROUP"] == "from-extra-env", values
        assert values["ANALYZER_URL"] == "http://analyzer.example:8103", values
        assert names.index("ANALYZER_URL") < names.index("OTEL_RESOURCE_ATTRIBUTES"), names
# every name once in every container: Helm 4's server-side apply refuses a duplicate
for d in docs:
    for c in d.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
        names = [e["name"] for e in c.get("env", [])]
        assert len(names) == len(set(names)), (d["metadata"]["name"], names)
for p in policies:
    assert p["spec"]["policyTypes"] == ["Ingress"], p["spec"]
    assert len(p["spec"]["ingress"][0]["from"]) == 2, p["spec"]["ingress"]
print("envFrom the existing Secret and a mounted Secret in all three; the password from a secretKeyRef, last;"
      " extraEnv and env override a name in place, every name once; three ingress-only NetworkPolicies")
EOF2

step "monitoring: ServiceMonitor, PrometheusRule, Grafana dashboard, KEDA ScaledObject"
"$helm" template order-pipeline "$chart" --namespace order-pipeline \
  --set serviceMonitor.enabled=true,prometheusRule.enabled=true,grafanaDashboard.enabled=true \
  --set orderProcessor.keda.enabled=true,orderProcessor.keda.maxReplicas=50 >"$work/monitoring.yaml"
mapfile -t crd_files < <(crds)
# the custom resources against their CRDs' schemas (strict: a field the CRD does not know is an
# error, as with kubectl --validate=strict), the rest against Kubernetes' own
"$venv/bin/python" - "$work/monitoring.yaml" "$work" "${crd_files[@]}" <<'EOF2' || fail "the monitoring objects do not validate (above)"
import json, sys, yaml, jsonschema
rendered, work, crd_files = sys.argv[1], sys.argv[2], sys.argv[3:]
def strict(s):
    if isinstance(s, dict):
        if s.get("x-kubernetes-int-or-string"):
            s = {k: v for k, v in s.items() if k != "type"} | {"anyOf": [{"type": "integer"}, {"type": "string"}]}
        s = {k: strict(v) for k, v in s.items()}
        if "properties" in s and "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
        return s
    if isinstance(s, list):
        return [strict(x) for x in s]
    return s
schemas = {}
for f in crd_files:
    crd = yaml.safe_load(open(f))
    for v in crd["spec"]["versions"]:
        schema = strict(v["schema"]["openAPIV3Schema"])
        schema["properties"]["metadata"] = {"type": "object"}
        schemas[(crd["spec"]["group"] + "/" + v["name"], crd["spec"]["names"]["kind"])] = schema
docs = [d for d in yaml.safe_load_all(open(rendered)) if d]
custom = {}
rest = []
for d in docs:
    key = (d["apiVersion"], d["kind"])
    if key in schemas:
        errors = sorted(jsonschema.Draft7Validator(schemas[key]).iter_errors(d), key=str)
        for e in errors:
            print(f"{d['kind']} {d['metadata']['name']}: {'/'.join(map(str, e.absolute_path))}: {e.message}")
        assert not errors, d["kind"]
        custom[d["kind"]] = d
    else:
        rest.append(d)
assert sorted(custom) == ["PrometheusRule", "ScaledObject", "ServiceMonitor"], sorted(custom)
so = custom["ScaledObject"]["spec"]
assert so["maxReplicaCount"] == 6, "the ScaledObject is capped at the orders topic's partitions"
assert not [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"], "KEDA makes its own HPA"
dash = next(d for d in rest if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard"))
assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
board = json.loads(dash["data"]["order-pipeline.json"])
assert all(t["expr"] for p in board["panels"] for t in p["targets"])
yaml.safe_dump_all(rest, open(f"{work}/monitoring-core.yaml", "w"))
# the rules for promtool, in the layout its unit tests read
yaml.safe_dump(custom["PrometheusRule"]["spec"], open(f"{work}/rules.yaml", "w"))
print(f"ServiceMonitor, PrometheusRule and ScaledObject valid against their CRDs ({len(crd_files)} files);"
      f" ScaledObject capped at 6 replicas; dashboard with {len(board['panels'])} panels")
EOF2
validate "$work/monitoring-core.yaml"
[ "$(replicas_of "$work/monitoring.yaml" order-processor)" = unset ] || fail "with KEDA the Deployment must not fix replicas"
if "$helm" template op "$chart" --set orderProcessor.keda.enabled=true,orderProcessor.autoscaling.enabled=true >/dev/null 2>"$work/err"; then
  fail "KEDA and the CPU autoscaler were both accepted"
fi
echo "refused KEDA with the CPU autoscaler: $(grep -m1 -o 'pick one.*' "$work/err")"
"$PROMTOOL" check rules "$work/rules.yaml"
cp tests/alerts/order-pipeline.test.yaml "$work/"
"$PROMTOOL" test rules "$work/order-pipeline.test.yaml"

step "values.schema.json refuses bad values"
bad=(
  "orderProcessor.replicas=-1"
  "orderProcessor.replica=3"
  "orderGenerator.image.pullPolicy=Sometimes"
  "kafka.enabled=false"
  "schemaRegistry.enabled=false,schemaRegistry.url=registry:8081"
  "orderProcessor.resources.limits.memory=lots"
  "default.extraVolumeMounts[0].name=ca"
  "orderProcessor.extraEnv[0].name=not a name"
  "topics.replicationFactor=0"
  "topics.ordersConfig.Retention=1"
  "dlqAnalyzer.staticMembership=yes"
  "operations.token=short"
)
for b in "${bad[@]}"; do
  if "$helm" template op "$chart" --set "$b" >/dev/null 2>"$work/err"; then fail "--set $b was accepted"; fi
  echo "refused --set $b: $(grep -m1 -E "at '|required" "$work/err" | sed 's/^ *//')"
done

step "the in-cluster infrastructure's settings"
"$venv/bin/python" - "$work/default.yaml" <<'EOF2' || fail "the in-cluster infrastructure is set up wrong (above)"
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
def one(kind, suffix):
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix))
def env(obj):
    return {e["name"]: e.get("value") for e in obj["spec"]["template"]["spec"]["containers"][0].get("env", [])}
problems = []
job = one("Job", "-topics-1")
if "helm.sh/hook" in job["metadata"].get("annotations", {}):
    problems.append("the topics Job is a hook: with --wait it would run only after every object is ready")
kafka = one("StatefulSet", "-kafka")
if kafka["spec"]["template"]["spec"].get("enableServiceLinks") is not False:
    problems.append("the Kafka pod gets Service links (KAFKA_* variables become broker properties)")
kenv = env(kafka)
if kenv.get("KAFKA_AUTO_CREATE_TOPICS_ENABLE") != "false":
    problems.append("the broker auto-creates topics with its default partition count")
mount = kafka["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]["mountPath"]
if not kenv.get("KAFKA_LOG_DIRS", "").startswith(mount.rstrip("/") + "/"):
    problems.append("Kafka's log dir is the volume's root (lost+found stops the broker)")
jaeger = yaml.safe_load(one("ConfigMap", "-jaeger")["data"]["config.yaml"])
cap = jaeger["extensions"]["jaeger_storage"]["backends"]["memstore"]["memory"]["max_traces"]
if not 0 < cap <= 20000:
    problems.append(f"Jaeger keeps {cap} traces in memory")
heap = kenv.get("KAFKA_HEAP_OPTS", "")
request = kafka["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["memory"]
if "-Xmx512M" not in heap or request != "768Mi":
    problems.append(f"Kafka's heap ({heap or 'the script default, 1G'}) is not within its request ({request})")
if kenv.get("KAFKA_ADVERTISED_LISTENERS") != "PLAINTEXT://op-order-pipeline-kafka.default.svc:9092":
    problems.append("the broker advertises a name other namespaces (KEDA's) cannot resolve: "
                    + str(kenv.get("KAFKA_ADVERTISED_LISTENERS")))
jpod = one("Deployment", "-jaeger")["spec"]["template"]["spec"]
if not any(m["mountPath"] == "/tmp" for m in jpod["containers"][0]["volumeMounts"]):
    problems.append("Jaeger has a read-only root and no writable /tmp")
pdb = one("PodDisruptionBudget", "-order-processor")
if pdb["spec"].get("unhealthyPodEvictionPolicy") != "AlwaysAllow":
    problems.append("the PDB keeps a replica that is not ready from being evicted")
processor = one("Deployment", "-order-processor")
spread = processor["spec"]["template"]["spec"].get("topologySpreadConstraints", [])
if [c["labelSelector"]["matchLabels"]["app.kubernetes.io/name"] for c in spread] != ["order-processor"]:
    problems.append(f"the processor's replicas are not spread over the nodes: {spread}")
attrs = env(processor)["OTEL_RESOURCE_ATTRIBUTES"]
if "k8s.pod.name=$(K8S_POD_NAME)" not in attrs or "deployment.environment.name" in attrs:
    problems.append(f"resource attributes: {attrs}")
registry = one("Deployment", "-schema-registry")
if "SCHEMA_REGISTRY_HEAP_OPTS" not in env(registry) or "startupProbe" not in registry["spec"]["template"]["spec"]["containers"][0]:
    problems.append("the registry has the image's default heap or no startup probe")
for p in problems:
    print("  " + p)
if problems:
    sys.exit(1)
print(f"topics Job a release object; Kafka: no Service links, no auto-creation, log dir {kenv['KAFKA_LOG_DIRS']}; "
      f"Jaeger keeps {cap} traces; the registry's heap {env(registry)['SCHEMA_REGISTRY_HEAP_OPTS']} with a startup probe")
EOF2

step "k8s/ manifests are current with the chart"
render_manifests >"$work/manifests.yaml"
diff -u "$manifests" "$work/manifests.yaml" >/dev/null \
  || fail "$manifests is stale: run 'make k8s-manifests'"
validate "$manifests"
"$venv/bin/python" - "$manifests" <<'PY' || fail "$manifests: an object without Helm's ownership annotations"
import sys, yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d and (d["metadata"].get("annotations") or {}).get("meta.helm.sh/release-name") != "order-pipeline":
        sys.exit(f"{d['kind']} {d['metadata']['name']}")
PY
echo "$manifests is current and valid"

echo
echo "deployment checks passed"
