#!/usr/bin/env bash
# The entrypoint of a Java application image, with the variables of the one the official image
# uses: JAVA_OPTS (replaces the defaults), JAVA_OPTS_APPEND (added after them),
# JAVA_MAX_MEM_RATIO (the heap's share of the container's memory, 50 by default, 0 for the
# JVM's own default), JAVA_APP_JAR (the application), then the arguments.
set -euo pipefail
ratio=${JAVA_MAX_MEM_RATIO:-50}
opts=${JAVA_OPTS:--XX:+UseParallelGC -XX:MinHeapFreeRatio=10 -XX:MaxHeapFreeRatio=20 -XX:GCTimeRatio=4 -XX:AdaptiveSizePolicyWeight=90 -XX:+ExitOnOutOfMemoryError}
if [ "$ratio" != 0 ]; then
  opts="-XX:MaxRAMPercentage=$ratio.0 $opts"
fi
# the options are word lists, as in the image this follows
# shellcheck disable=SC2086
exec java $opts ${JAVA_OPTS_APPEND:-} -jar "${JAVA_APP_JAR:?}" "$@"
