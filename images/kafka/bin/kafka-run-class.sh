#!/usr/bin/env bash
# kafka-run-class.sh CLASS [ARGS...]: a class of Kafka's jars on the image's JVM, honouring the
# variables of Kafka's own launcher: KAFKA_HEAP_OPTS, KAFKA_JVM_PERFORMANCE_OPTS,
# KAFKA_GC_LOG_OPTS, KAFKA_JMX_OPTS, KAFKA_LOG4J_OPTS, KAFKA_OPTS, CLASSPATH and JAVA_HOME.
# The broker (kafka.Kafka) gets a 1 GB heap and config/log4j2.yaml unless told; tools 256 MB and
# config/tools-log4j2.yaml (warnings on stderr), as in the distribution.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 CLASS [ARGS...]" >&2
  exit 1
fi
class=$1; shift
home=$(cd "$(dirname "$0")/.." && pwd)
if [ "$class" = kafka.Kafka ]; then
  heap=${KAFKA_HEAP_OPTS:--Xmx1G -Xms1G}
  log4j=${KAFKA_LOG4J_OPTS:--Dlog4j2.configurationFile=$home/config/log4j2.yaml}
else
  heap=${KAFKA_HEAP_OPTS:--Xmx256M}
  log4j=${KAFKA_LOG4J_OPTS:--Dlog4j2.configurationFile=$home/config/tools-log4j2.yaml}
fi
jvm=${KAFKA_JVM_PERFORMANCE_OPTS:--server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true}
java=java
[ -z "${JAVA_HOME:-}" ] || java=$JAVA_HOME/bin/java
# the options are word lists, as in Kafka's launcher
# shellcheck disable=SC2086
exec "$java" $heap $jvm ${KAFKA_GC_LOG_OPTS:-} ${KAFKA_JMX_OPTS:-} $log4j \
  -cp "${CLASSPATH:+$CLASSPATH:}$home/libs/*" ${KAFKA_OPTS:-} "$class" "$@"
