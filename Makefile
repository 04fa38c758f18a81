# The order system's commands. `make demo` and `make test` are the two a newcomer needs.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
.DEFAULT_GOAL := help
LOGS := target/test-logs

STACK := bash stack/stack.sh
ENGINE := bash scripts/engine.sh
CLUSTER := bash cluster/cluster.sh
# the local cluster bridge's host address (cluster/cluster.sh), where pods reach the stack
CLUSTER_HOST_ADDRESS := 10.213.0.1
VENV := .venv
PY_REQS := tests/interop/requirements.txt

.PHONY: help demo test reset-test-logs check-deploy k8s-manifests kind-up kind-load kind-install kind-down \
        minikube-up minikube-load minikube-install minikube-down stack-up stack-down stack-status stack-env build lint \
        test-rust test-interop test-demo test-images python-env compose-demo compose-down bench engine-up engine-down engine-status images trace \
        cluster-up cluster-down cluster-status test-cluster deps-images test-compose

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{ printf "  make %-14s %s\n", $$1, $$2 }'

demo: ## native stack + build + about a hundred orders end to end, with summaries and one dead letter's trace
	bash scripts/demo.sh

test: reset-test-logs stack-up lint test-rust test-interop test-demo check-deploy test-images test-cluster test-compose ## everything CI checks (starts the native stack, the container engine and the local cluster itself)
	@bash scripts/test-summary.sh $(LOGS)

reset-test-logs:
	@rm -rf $(LOGS)

stack-up: ## install (cached) and start Kafka, the schema registry and Jaeger; a no-op when running
	$(STACK) up

stack-down: ## stop what stack-up started
	$(STACK) down

stack-status: ## one line per stack component
	$(STACK) status

stack-env: ## export lines for the running stack: eval "$$(make -s stack-env)"
	@$(STACK) env

build: ## debug build of the workspace
	cargo build --workspace --all-targets

lint: ## formatting, clippy (warnings are errors), no import circle in any crate, every docs link resolves
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --locked -- -D warnings
	python3 scripts/check-modules.py
	python3 scripts/check-links.py

test-rust: stack-up ## unit and integration tests (against the running native stack); then, alone, the one that restarts the broker
	@mkdir -p $(LOGS)
	cargo test --workspace --all-targets --locked 2>&1 | tee $(LOGS)/cargo.log
	cargo test --locked -p order-processor --test it -- --ignored 2>&1 | tee -a $(LOGS)/cargo.log

python-env: $(VENV)/.installed
$(VENV)/.installed: $(PY_REQS)
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r $(PY_REQS)
	touch $@

test-interop: stack-up python-env ## a foreign Confluent client (Python) against our stack and services; the status page in Chromium
	cargo build --locked -p order-generator -p order-processor -p dlq-analyzer
	@mkdir -p $(LOGS)
	$(VENV)/bin/pytest tests/interop -q --timeout=300 2>&1 | tee $(LOGS)/pytest.log

test-demo: stack-up ## run the demo; it fails if any record is unaccounted for
	@mkdir -p $(LOGS)
	DEMO_RATE=50 bash scripts/demo.sh 2>&1 | tee $(LOGS)/demo.log

check-deploy: ## Dockerfile, Compose file and Helm chart through hadolint, compose-go, helm, kubernetes-validate
	@mkdir -p $(LOGS)
	bash scripts/check-deploy.sh 2>&1 | tee $(LOGS)/deploy.log

engine-up: ## start the project's own container engine (Debian's docker.io; state in .engine/)
	$(ENGINE) up

engine-down: ## stop the engine that engine-up started
	$(ENGINE) down

engine-status: ## one line: is the engine running
	$(ENGINE) status

images: ## build the three images in that engine, on base images made here from Debian's packages
	$(ENGINE) build

deps-images: ## build Kafka, Apicurio Registry and Jaeger images in the official images' layouts, from the native stack's packages
	$(ENGINE) deps

test-images: stack-up python-env images ## the images under the chart's constraints, and the Compose services scaled, against the native stack
	@mkdir -p $(LOGS)
	$(ENGINE) compose version
	$(VENV)/bin/pytest tests/images -q -rA --timeout=600 2>&1 | tee $(LOGS)/pytest-images.log

cluster-up: ## a real single-node Kubernetes here: control plane and kubelet as local processes, state in .cluster/
	$(CLUSTER) up
	@echo 'kubectl and the cluster: eval "$$(bash cluster/cluster.sh env)"'

cluster-down: ## stop the local cluster by pid; remove its bridge, and what the kubelet changed on the machine
	$(CLUSTER) down

cluster-status: ## one line per cluster component
	$(CLUSTER) status

test-cluster: python-env images deps-images ## the chart's default install (its own Kafka, registry, Jaeger) and one against the native stack, on the local cluster
	@mkdir -p $(LOGS)
	bash scripts/check-deploy.sh helm
	$(CLUSTER) install
	$(CLUSTER) fingerprint >$(LOGS)/machine-before-cluster.txt
	$(CLUSTER) up
	STACK_POD_ADDRESS=$(CLUSTER_HOST_ADDRESS) $(STACK) up
	$(CLUSTER) load order-pipeline/order-generator:dev order-pipeline/order-processor:dev order-pipeline/dlq-analyzer:dev \
	  order-pipeline/kafka:4.1.1 order-pipeline/apicurio-registry:3.3.3 order-pipeline/jaeger:2.13.0
	status=0; CLUSTER_HOST_ADDRESS=$(CLUSTER_HOST_ADDRESS) $(VENV)/bin/pytest tests/cluster -q -rA -s --timeout=900 \
	  2>&1 | tee $(LOGS)/pytest-cluster.log || status=$$?; \
	  $(CLUSTER) down; \
	  $(CLUSTER) fingerprint >$(LOGS)/machine-after-cluster.txt; \
	  if diff $(LOGS)/machine-before-cluster.txt $(LOGS)/machine-after-cluster.txt; then \
	    echo "the machine's network and kernel settings are as before the cluster"; \
	  else echo "cluster-down left the machine changed (diff above)"; status=1; fi; \
	  exit $$status

k8s-manifests: ## regenerate k8s/order-pipeline.yaml from the chart
	bash scripts/check-deploy.sh manifests

COMPOSE ?= docker compose
# SCHEMA_REGISTRY=apicurio: Apicurio Registry in place of Confluent's (compose.apicurio.yml);
# COMPOSE_OVERRIDE: more -f files (the test's images built here); COMPOSE_BUILD=--no-build: use
# the images as they are
SCHEMA_REGISTRY ?= confluent
COMPOSE_OVERRIDE ?=
COMPOSE_BUILD ?= --build
COMPOSE_FILES = -f docker-compose.yml $(if $(filter apicurio,$(SCHEMA_REGISTRY)),-f compose.apicurio.yml) $(COMPOSE_OVERRIDE)
compose-demo: ## the demo with Docker Compose: build, start, wait for health, show where to look (SCHEMA_REGISTRY=apicurio for Apicurio)
	$(COMPOSE) $(COMPOSE_FILES) up -d $(COMPOSE_BUILD) --wait
	@echo
	@echo "status page             http://localhost:$$($(COMPOSE) $(COMPOSE_FILES) port order-processor 8102 | cut -d: -f2)/"
	@echo "order-generator stats   http://localhost:8101/stats"
	@echo "dlq-analyzer report     http://localhost:8103/report"
	@echo "Jaeger UI               http://localhost:16686"
	@echo "Kafka from the host     localhost:29092; schema registry http://localhost:8081$(if $(filter apicurio,$(SCHEMA_REGISTRY)),/apis/ccompat/v7)"
	@echo "scale the processor:    $(COMPOSE) $(COMPOSE_FILES) up -d --scale order-processor=3"
	@echo "stop and clean up:      make compose-down$(if $(filter apicurio,$(SCHEMA_REGISTRY)), SCHEMA_REGISTRY=apicurio)"

compose-down: ## stop the Compose demo and remove its containers, network and volumes
	$(COMPOSE) $(COMPOSE_FILES) --profile ui down -v --remove-orphans

# The Compose file as a laptop runs it, on the engine's bridge network, with only the images
# replaced by those built here. It publishes the ports the native stack listens on (8081, 16686),
# so the stack is stopped first. The engine is restarted around the test so that the machine's
# network settings are compared with none of its own.
test-compose: python-env images deps-images ## make compose-demo and compose-down on the engine, Apicurio switch, images built here
	@mkdir -p $(LOGS)
	$(STACK) down
	$(ENGINE) down
	$(CLUSTER) fingerprint >$(LOGS)/machine-before-compose.txt
	$(ENGINE) up
	status=0; $(VENV)/bin/pytest tests/compose -q -rA -s --timeout=900 2>&1 | tee $(LOGS)/pytest-compose.log || status=$$?; \
	  $(ENGINE) down; \
	  $(CLUSTER) fingerprint >$(LOGS)/machine-after-compose.txt; \
	  if diff $(LOGS)/machine-before-compose.txt $(LOGS)/machine-after-compose.txt; then \
	    echo "the machine's network and kernel settings are as before the engine and Compose"; \
	  else echo "the engine or Compose left the machine changed (diff above)"; status=1; fi; \
	  exit $$status

KIND ?= kind
HELM ?= .stack/bin/helm-v4.3.2
KIND_CLUSTER ?= order-pipeline
# the images' tag: the commit, and a digest of uncommitted changes, so that a rebuilt image is a
# new tag and reaches the pods (the chart pulls IfNotPresent)
IMAGE_TAG ?= $(shell v=$$(git rev-parse --short HEAD 2>/dev/null || echo dev); \
  git diff --quiet HEAD 2>/dev/null || v=$$v-$$(git diff HEAD | sha256sum | cut -c1-8); echo 0.1.0-$$v)
kind-up: ## create the kind cluster (k8s/kind-config.yaml)
	$(KIND) create cluster --config k8s/kind-config.yaml --name $(KIND_CLUSTER)

kind-load: ## build the three images (tag IMAGE_TAG) and load them into the kind cluster
	@# through an archive: `kind load docker-image` fails on images that carry BuildKit's
	@# provenance in Docker's containerd image store (kind#3795)
	set -e; archive=$$(mktemp); trap 'rm -f "$$archive"' EXIT; \
	for s in order-generator order-processor dlq-analyzer; do \
	  docker build --target $$s -t order-pipeline/$$s:$(IMAGE_TAG) .; \
	  docker save -o "$$archive" order-pipeline/$$s:$(IMAGE_TAG); \
	  $(KIND) load image-archive "$$archive" --name $(KIND_CLUSTER); \
	done

# the cluster the chart goes to: kind's context for KIND_CLUSTER, or minikube's
KUBE_CONTEXT ?= kind-$(KIND_CLUSTER)
kind-install: ## install (or upgrade) the chart into the kind cluster (HELM=helm to use your own)
	@command -v $(HELM) >/dev/null || bash scripts/check-deploy.sh helm
	$(HELM) upgrade --install order-pipeline helm/order-pipeline --kube-context $(KUBE_CONTEXT) \
	  --namespace order-pipeline --create-namespace --set default.image.tag=$(IMAGE_TAG) --wait --timeout 10m

kind-down: ## delete the kind cluster
	$(KIND) delete cluster --name $(KIND_CLUSTER)

MINIKUBE ?= minikube
minikube-up: ## start minikube with room for the chart's Kafka, registry and Jaeger
	$(MINIKUBE) start --cpus 4 --memory 6g

minikube-load: ## build the three images (tag IMAGE_TAG) in minikube's own Docker, where its node finds them
	eval "$$($(MINIKUBE) docker-env)"; set -e; \
	for s in order-generator order-processor dlq-analyzer; do \
	  docker build --target $$s -t order-pipeline/$$s:$(IMAGE_TAG) .; \
	done

minikube-install: ## install (or upgrade) the chart into minikube
	$(MAKE) kind-install KUBE_CONTEXT=minikube IMAGE_TAG=$(IMAGE_TAG)

minikube-down: ## delete the minikube cluster
	$(MINIKUBE) delete

trace: ## one trace from Jaeger as a waterfall: make trace ID=<trace id>; without ID, the last demo's dead letter
	@id="$(ID)"; [ -n "$$id" ] || id=$$(cat .stack/logs/last-demo-trace 2>/dev/null || true); \
	  [ -n "$$id" ] || { echo "no trace id: run make demo first, or give one: make trace ID=<trace id>" >&2; exit 2; }; \
	  cargo run -q --locked -p dlq-analyzer -- trace "$$id"

bench: ## benchmarks against Kafka's own perf tools on the native stack (target/bench/results.json)
	python3 scripts/bench.py
