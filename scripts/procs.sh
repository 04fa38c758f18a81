# The background processes a script of ours starts and stops, sourced by stack/stack.sh and
# cluster/cluster.sh. The sourcing script sets procs_dir (pid files in its run/, logs in its
# logs/) and procs_stop_s (how long `stop` waits before it kills), and defines say.

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

pidfile() { echo "$procs_dir/run/$1.pid"; }

# A component counts as ours only if its pid file names a live process whose command line
# carries procs_dir, so a recycled pid never gets killed by a `down`.
running() {
  local f pid
  f=$(pidfile "$1")
  [ -f "$f" ] || return 1
  pid=$(cat "$f")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$procs_dir"
}

spawn() { # name command...: in the background, its output appended to logs/<name>.log
  local name=$1 i; shift
  nohup "$@" >>"$procs_dir/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$(pidfile "$name")"
  # until the child has exec'd: before that its command line is this script's, which `running`
  # takes for a stranger's, and a check right after the launch said "exited during start-up"
  for i in $(seq 1 200); do running "$name" && break; kill -0 "$!" 2>/dev/null || break; sleep 0.01; done
  say "$name started (pid $!), log: $procs_dir/logs/$name.log"
}

stop() { # name: TERM, then KILL if it is still there after procs_stop_s
  local name=$1 limit=$procs_stop_s f pid i
  f=$(pidfile "$name")
  if ! running "$name"; then rm -f "$f"; say "$name not running"; return 0; fi
  pid=$(cat "$f")
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 $((limit * 5))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then say "$name did not stop in ${limit}s; killing"; kill -KILL "$pid" 2>/dev/null || true; fi
  rm -f "$f"
  say "$name stopped"
}
