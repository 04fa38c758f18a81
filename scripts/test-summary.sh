#!/usr/bin/env bash
# Adds up what `make test` ran (cargo's and each pytest run's result lines, and the demo's own check)
# and prints one closing line: "make test: N passed, M failed".
set -euo pipefail
dir=${1:-target/test-logs}
cargo_counts=$(grep -h -E '^test result: ' "$dir"/cargo.log 2>/dev/null \
  | sed -E 's/.* ([0-9]+) passed; ([0-9]+) failed.*/\1 \2/' \
  | awk '{ p += $1; f += $2 } END { print p + 0, f + 0 }')
read -r passed failed <<<"$cargo_counts"
for log in "$dir"/pytest*.log; do
  [ -f "$log" ] || continue
  py_passed=$(grep -h -o -E '[0-9]+ passed' "$log" | tail -n 1 | grep -o -E '[0-9]+' || echo 0)
  py_failed=$(grep -h -o -E '[0-9]+ (failed|error)' "$log" | tail -n 1 | grep -o -E '[0-9]+' || echo 0)
  passed=$((passed + py_passed)); failed=$((failed + py_failed))
done
if [ -f "$dir/demo.log" ]; then
  if grep -q '^all [0-9]* records accounted for' "$dir/demo.log"; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
fi
echo "make test: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
