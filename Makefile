# The order system's commands. `make demo` and `make test` are the two a newcomer needs.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
.DEFAULT_GOAL := help
LOGS := target/test-logs

STACK := bash stack/stack.sh
VENV := .venv
PY_REQS := tests/interop/requirements.txt

.PHONY: help demo test reset-test-logs stack-up stack-down stack-status stack-env build lint \
        test-rust test-interop test-demo python-env compose-demo compose-down bench

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{ printf "  make %-14s %s\n", $$1, $$2 }'

demo: ## native stack + build + about a hundred orders end to end, with summaries and a trace link
	bash scripts/demo.sh

test: reset-test-logs stack-up lint test-rust test-interop test-demo ## everything CI checks (starts the native stack itself)
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

lint: ## formatting and clippy, warnings are errors
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

test-rust: stack-up ## unit and integration tests (against the running native stack)
	@mkdir -p $(LOGS)
	cargo test --workspace --all-targets --locked 2>&1 | tee $(LOGS)/cargo.log

python-env: $(VENV)/.installed
$(VENV)/.installed: $(PY_REQS)
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r $(PY_REQS)
	touch $@

test-interop: stack-up python-env ## a foreign Confluent client (Python) against our stack and services
	cargo build --locked -p order-generator -p order-processor
	@mkdir -p $(LOGS)
	$(VENV)/bin/pytest tests/interop -q 2>&1 | tee $(LOGS)/pytest.log

test-demo: stack-up ## run the demo; it fails if any record is unaccounted for
	@mkdir -p $(LOGS)
	DEMO_RATE=50 bash scripts/demo.sh 2>&1 | tee $(LOGS)/demo.log

compose-demo compose-down bench:
	@echo "make $@ is not available yet: it comes with its issue (containers/Compose/Helm, benchmarks)." >&2; exit 2
