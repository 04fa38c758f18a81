#!/usr/bin/env bash
# The whole pipeline on the native stack: about a hundred orders with the seed's flavour (some
# invalid orders, a little garbage, visible retries with 1 s / 2 s / 4 s backoff, a handful of
# dead letters), then each service's summary and where to see the traces.
#
# Each run uses its own topics and consumer groups, so runs never mix. The services it starts
# are stopped at the end; the stack keeps running so that Jaeger still shows the traces
# (`make stack-down` stops it).
#
# Settings (environment): DEMO_ORDERS (100), DEMO_RATE (20 orders/s), DEMO_INVALID_RATIO
# (0.05), DEMO_FAILURE_RATE (0.25), CARGO_PROFILE (dev; `release` for optimised binaries).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

orders_n=${DEMO_ORDERS:-100}
rate=${DEMO_RATE:-20}
invalid=${DEMO_INVALID_RATIO:-0.05}
failure=${DEMO_FAILURE_RATE:-0.25}
profile=${CARGO_PROFILE:-dev}
garbage_n=2

step() { printf '\n==> %s\n' "$*"; }

step "native stack"
bash stack/stack.sh up
eval "$(bash stack/stack.sh env)"
export KAFKA_BOOTSTRAP_SERVERS SCHEMA_REGISTRY_URL OTEL_EXPORTER_OTLP_ENDPOINT

step "building the services ($profile profile)"
cargo build --profile "$profile" -p order-generator -p order-processor -p dlq-analyzer
bin_dir="target/$([ "$profile" = dev ] && echo debug || echo "$profile")"

run=$(date +%Y%m%d-%H%M%S)
# short topic names (seconds since the epoch), so that a trace's span names fit 80 columns
topics="demo-$(date +%s)"
export ORDERS_TOPIC="$topics-orders" DLQ_TOPIC="$topics-dlq"
export RUST_LOG=${RUST_LOG:-info,rdkafka=warn} LOG_FORMAT=${LOG_FORMAT:-pretty} NO_COLOR=1
logs=".stack/logs/demo-$run"
mkdir -p "$logs"
bash stack/stack.sh kafka-class org.apache.kafka.tools.TopicCommand --bootstrap-server "$KAFKA_BOOTSTRAP_SERVERS" \
  --create --topic "$ORDERS_TOPIC" --partitions 3 --replication-factor 1 >/dev/null 2>&1
bash stack/stack.sh kafka-class org.apache.kafka.tools.TopicCommand --bootstrap-server "$KAFKA_BOOTSTRAP_SERVERS" \
  --create --topic "$DLQ_TOPIC" --partitions 3 --replication-factor 1 >/dev/null 2>&1
echo "topics: $ORDERS_TOPIC, $DLQ_TOPIC; logs: $logs/"

pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

wait_http() { # url seconds
  local i
  for i in $(seq 1 $(( $2 * 10 ))); do curl -sf -o /dev/null "$1" && return 0; sleep 0.1; done
  echo "no answer from $1 after $2 s" >&2; return 1
}
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

step "starting order-processor (transient failure rate $failure) and dlq-analyzer"
HTTP_PORT=8102 CONSUMER_GROUP="order-processor-$run" TRANSIENT_FAILURE_RATE="$failure" \
  OTEL_SERVICE_NAME=order-processor "$bin_dir/order-processor" >"$logs/order-processor.log" 2>&1 &
pids+=($!); processor=$!
HTTP_PORT=8103 CONSUMER_GROUP="dlq-analyzer-$run" OTEL_SERVICE_NAME=dlq-analyzer \
  "$bin_dir/dlq-analyzer" >"$logs/dlq-analyzer.log" 2>&1 &
pids+=($!); analyzer=$!
wait_http http://127.0.0.1:8102/readyz 60
wait_http http://127.0.0.1:8103/readyz 60

step "order-generator: $orders_n orders at $rate/s, invalid ratio $invalid"
HTTP_PORT=8101 ORDER_COUNT="$orders_n" ORDER_RATE="$rate" INVALID_ORDER_RATIO="$invalid" \
  "$bin_dir/order-generator" >"$logs/order-generator.log" 2>&1
sent=$(grep '^SUMMARY ' "$logs/order-generator.log" | sed 's/^SUMMARY //' | json 'd["produced"]')
# a little garbage, written by Kafka's own console producer: not Avro at all
printf 'this is not an order\n{"orderId": "json-instead-of-avro"}\n' \
  | bash stack/stack.sh kafka-class org.apache.kafka.tools.ConsoleProducer \
      --bootstrap-server "$KAFKA_BOOTSTRAP_SERVERS" --topic "$ORDERS_TOPIC" >/dev/null 2>&1
expected=$(( sent + garbage_n ))

step "waiting for all $expected records to be processed or dead-lettered (retries back off 1 s, 2 s, 4 s)"
echo "  status page, while the demo runs: http://127.0.0.1:8102/"
deadline=$(( $(date +%s) + 180 ))
while :; do
  stats=$(curl -sf http://127.0.0.1:8102/stats)
  done_n=$(echo "$stats" | json 'd["processed"] + d["dead_lettered"]')
  progress=$(printf '  %s/%s done, %s retries so far' "$done_n" "$expected" "$(echo "$stats" | json 'd["retries"]')")
  if [ -t 1 ]; then printf '\r%s' "$progress"; elif [ "$progress" != "${last_progress:-}" ]; then echo "$progress"; fi
  last_progress=$progress
  [ "$done_n" -ge "$expected" ] && break
  [ "$(date +%s)" -lt "$deadline" ] || { echo; echo "timed out; see $logs/" >&2; exit 1; }
  sleep 1
done
echo
dead=$(echo "$stats" | json 'd["dead_lettered"]')
deadline=$(( $(date +%s) + 60 ))
until [ "$(curl -sf http://127.0.0.1:8103/report | json 'd["total"]')" -ge "$dead" ]; do
  [ "$(date +%s)" -lt "$deadline" ] || { echo "the analyzer did not see all $dead dead letters" >&2; exit 1; }
  sleep 0.5
done
# the latest dead letter with the longest story: retries that ran out, else a broken rule
trace_id=$(curl -sf http://127.0.0.1:8103/report | json 'next((f["trace_id"] for c in ("retries_exhausted", "validation") for f in reversed(d["recent"]) if f.get("trace_id") and f["category"] == c), "")')

step "stopping the services"
kill -TERM "$processor" "$analyzer"
wait "$processor" "$analyzer" || { echo "a service did not exit cleanly; see $logs/" >&2; exit 1; }
trap - EXIT

step "summaries"
for s in order-generator order-processor dlq-analyzer; do
  echo
  sed -n "/^$s summary/,/^SUMMARY /p" "$logs/$s.log" | grep -v '^SUMMARY '
done

# the demo checks itself: nothing lost, and the analyzer saw exactly the dead letters
processed=$(echo "$stats" | json 'd["processed"]')
analysed=$(grep '^SUMMARY ' "$logs/dlq-analyzer.log" | sed 's/^SUMMARY //' | json 'd["total"]')
echo
if [ $(( processed + dead )) -ne "$expected" ] || [ "$analysed" -ne "$dead" ]; then
  echo "MISMATCH: $processed processed + $dead dead-lettered != $expected sent, or analyzer saw $analysed" >&2
  exit 1
fi
echo "all $expected records accounted for: $processed processed, $dead dead-lettered ($analysed analysed)"

step "one dead letter's journey (make trace draws it again; ID=<trace id> for another)"
if [ -n "$trace_id" ]; then
  echo "$trace_id" >.stack/logs/last-demo-trace
  "$bin_dir/dlq-analyzer" trace "$trace_id"
fi
echo
echo "Jaeger query API: http://127.0.0.1:16686/api/traces/${trace_id:-<trace id>}"
echo "                  (this Jaeger has no UI; make compose-demo and the Helm chart have it)"
echo "logs:             $logs/"
echo "the stack is still running (make stack-status); stop it with: make stack-down"
