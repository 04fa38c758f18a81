#!/usr/bin/env bash
# A container engine of the project's own, and the three images built and kept in it.
#
# Debian's docker.io runs a daemon whose state, socket and pid file live in .engine/ (git-ignored;
# ENGINE_DIR moves it): never the machine's default daemon, its settings or its socket.
#
# Network: the daemon touches no iptables (no NAT, no masquerading, no forwarding) and has no
# default bridge. Networks that Compose makes are bridges whose subnets come from a pool this
# project owns on the machine (ENGINE_POOL, 10.215.0.0/16, /24 each), with an `unreachable` route
# for the whole pool beside each bridge's own, so that nothing addressed into it leaves the
# machine, and a rule (mangle FORWARD) that drops whatever a container sends outside the pool.
# Ports are published by docker-proxy on the host's addresses the file names (127.0.0.1 in ours);
# the engine's DNS answers containers' names; a query for any other name goes towards the
# machine's resolver and is dropped by that rule. The daemon pulls nothing (no registry is
# reachable).
# `down` removes the route and whatever bridge the daemon left. Containers with --network host
# (the tests against the native stack) are unaffected.
#
# No image registry is needed: the base images are made here from Debian's
# packages (mmdebstrap) and the machine's Rust toolchain, and the Dockerfile is pointed at them
# with its BUILDER_IMAGE and RUNTIME_IMAGE build arguments.
#
#   engine.sh install   the Debian packages (docker.io, mmdebstrap, iproute2), when missing
#   engine.sh up        start the daemon (a no-op when it runs)
#   engine.sh down      stop what `up` started, by pid, and anything it left mounted
#   engine.sh status    one line
#   engine.sh env       `export DOCKER_HOST=...` for `eval`
#   engine.sh bases     make and import the local base images (once; kept in the daemon)
#   engine.sh build     build the Dockerfile's three targets on the local bases
#   engine.sh deps      build the images of Compose's and the chart's dependencies (Kafka, Apicurio
#                       Registry, Jaeger) from what the native stack installs (images/*)
#   engine.sh sizes     image sizes as JSON (all of each image, and our layers above the base)
#   engine.sh compose   Docker Compose v5 (built once from the Go module proxy) on this engine
#   engine.sh save IMAGE...   the images as a tar archive on stdout (for the local cluster)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
dir=${ENGINE_DIR:-$repo/.engine}
sock=$dir/docker.sock
pidfile=$dir/dockerd.pid
log=$dir/dockerd.log
export DOCKER_HOST=unix://$sock
# Debian's 20.10 client, which has BuildKit built in; a newer client found first on PATH would
# need the buildx plugin, which no registry here serves
docker=/usr/bin/docker
debian_mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
suite=bookworm
services=(order-generator order-processor dlq-analyzer)
pool=${ENGINE_POOL:-10.215.0.0/16}
# the rule that keeps the pool's packets on this machine (mangle FORWARD), found by its comment
guard_comment="order-pipeline engine: the pool's packets stay on this machine"
image_tag=${IMAGE_TAG:-dev}
runtime_image=order-pipeline-base/runtime:$suite
# the toolchain that builds the images is the one that builds the workspace here
rust_sysroot=$(rustc --print sysroot)
rust_version=$(rustc --version | awk '{print $2}')
builder_image=order-pipeline-base/builder:$suite-rust$rust_version
# the dependencies' bases: a Java 21 runtime (Debian 13 has it; Apicurio Registry 3.3 needs it, and
# the official Kafka image runs on 21 too), and the runtime base with busybox
jre_image=order-pipeline-base/jre21:trixie
busybox_image=order-pipeline-base/busybox:$suite
stack_dir=${STACK_DIR:-$repo/.stack}
# the dependencies' versions are the native stack's
stack_version() { awk -F= -v k="$1" '$1 == k { sub(/[ \t].*/, "", $2); print $2; exit }' "$repo/stack/stack.sh"; }
kafka_version=$(stack_version KAFKA_VERSION)
apicurio_version=$(stack_version APICURIO_VERSION)
jaeger_module_version=$(stack_version JAEGER_MODULE_VERSION)
jaeger_version=$(stack_version JAEGER_VERSION)
dependency_images=("order-pipeline/kafka:$kafka_version" "order-pipeline/apicurio-registry:$apicurio_version" "order-pipeline/jaeger:$jaeger_version")

say() { printf '[engine] %s\n' "$*"; }
fail() { printf 'engine: %s\n' "$*" >&2; exit 1; }

running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

install() {
  local missing=() p
  # iproute2: the pool's route; binutils (strip) comes with build-essential, as the build needs
  for p in docker.io mmdebstrap iproute2; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  say "installing ${missing[*]}"
  local sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  # where an init system runs, the package may start the machine's own docker service as Debian
  # sets it up; ours is a separate daemon, started by `up`
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

up() {
  if running; then say "daemon running (pid $(cat "$pidfile"))"; return 0; fi
  install
  mkdir -p "$dir/data" "$dir/exec"
  printf '{"default-address-pools": [{"base": "%s", "size": 24}]}\n' "$pool" >"$dir/daemon.json"
  ip route show type unreachable | grep -q "^unreachable $pool " || ip route add unreachable "$pool"
  # a packet from a container to anything outside the pool is dropped, whatever the machine's
  # forwarding setting: the engine's DNS asks the machine's resolver from the container's side
  # for a name it does not know, and that query goes no further than this machine (builds run
  # on the host's network and resolve as the host does)
  iptables -t mangle -C FORWARD -s "$pool" ! -d "$pool" -m comment --comment "$guard_comment" -j DROP 2>/dev/null \
    || iptables -t mangle -I FORWARD 1 -s "$pool" ! -d "$pool" -m comment --comment "$guard_comment" -j DROP
  # --config-file: none of /etc/docker/daemon.json; --bridge=none, --iptables=false,
  # --ip-forward=false: no default bridge, and the daemon changes no packet-filter or forwarding
  # setting of the machine; docker-proxy publishes ports. No registry is reachable and the daemon
  # asks none: its proxy is a closed port on loopback, so an image that is not here is refused
  # at once, without a lookup of a registry's name (Docker 20.10 takes the proxy from its
  # environment only)
  HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 NO_PROXY= setsid /usr/sbin/dockerd \
    --config-file "$dir/daemon.json" \
    --data-root "$dir/data" --exec-root "$dir/exec" \
    --pidfile "$pidfile" -H "unix://$sock" \
    --bridge=none --iptables=false --ip6tables=false --ip-masq=false --ip-forward=false \
    --userland-proxy=true --userland-proxy-path=/usr/sbin/docker-proxy --storage-driver=overlay2 \
    >"$log" 2>&1 </dev/null &
  local i
  for i in $(seq 1 120); do
    if $docker version >/dev/null 2>&1; then
      say "daemon up (pid $(cat "$pidfile"), socket $sock)"
      return 0
    fi
    sleep 0.5
  done
  tail -20 "$log" >&2
  fail "the daemon did not answer within 60 s (log: $log)"
}

down() {
  if running; then
    local pid; pid=$(cat "$pidfile")
    # stop our containers first, then the daemon (which stops the containerd it started)
    $docker ps -q | xargs -r $docker stop -t 10 >/dev/null 2>&1 || true
    kill -TERM "$pid"
    local i
    for i in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && { say "daemon did not stop in 30 s; killing it"; kill -KILL "$pid"; }
    say "daemon stopped"
  fi
  rm -f "$pidfile"
  # the containerd our daemon started, if the daemon died without stopping it
  local containerd_pid=$dir/exec/containerd/containerd.pid
  if [ -f "$containerd_pid" ] && kill -0 "$(cat "$containerd_pid")" 2>/dev/null; then
    kill -TERM "$(cat "$containerd_pid")"; say "stopped the daemon's containerd"
  fi
  # whatever the daemon left mounted below its folders (a killed daemon leaves overlays)
  local m
  for m in $(awk -v d="$dir/" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r); do
    umount -l "$m" 2>/dev/null || true
  done
  # the bridges of networks left behind (br-<id>, with an address in the pool), and the route
  local link
  for link in $(ip -o -4 addr show | awk -v p="${pool%.0.0/*}." '$2 ~ /^br-/ && index($4, p) == 1 { print $2 }'); do
    ip link delete "$link" && say "removed bridge $link"
  done
  if ip route show type unreachable | grep -q "^unreachable $pool "; then
    ip route del unreachable "$pool" && say "removed the route unreachable $pool"
  fi
  while iptables -t mangle -D FORWARD -s "$pool" ! -d "$pool" -m comment --comment "$guard_comment" -j DROP 2>/dev/null; do
    say "removed the FORWARD rule that kept the pool's packets here"
  done
}

status() {
  if running; then echo "engine    running (pid $(cat "$pidfile"), $DOCKER_HOST)"; else echo "engine    stopped"; fi
}

have_image() { $docker image inspect "$1" >/dev/null 2>&1; }

# A bookworm root with apt and nothing else (minbase), plus the machine's Rust toolchain: the
# clean root that proves scripts/debian-build-packages.txt complete, since the Dockerfile's
# builder stage installs that list and nothing more into it.
builder_base() {
  have_image "$builder_image" && return 0
  local root="$dir/roots/builder"
  rm -rf "$root"; mkdir -p "$root"
  say "making the builder base: mmdebstrap minbase $suite, Rust $rust_version ($rust_sysroot)"
  mmdebstrap --quiet --variant=minbase --mode=root "$suite" "$root" "$debian_mirror"
  mkdir -p "$root/usr/local/rust"
  # the toolchain without its documentation and sources (cargo, rustc, the std library)
  tar -C "$rust_sysroot" --exclude=./share/doc --exclude=./lib/rustlib/src -c . | tar -C "$root/usr/local/rust" -x
  tar -C "$root" -c . | $docker import \
    --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV CARGO_HOME=/usr/local/cargo' \
    --change 'WORKDIR /' - "$builder_image" >/dev/null
  rm -rf "$root"
  say "imported $builder_image"
}

# What distroless base-nossl gives, made from the same Debian packages: glibc and libgcc, time
# zones, /etc/services, Mozilla's CA certificates, and a user 65532 (nonroot); no shell, no
# package manager. The root is merged-/usr (/lib is a link to usr/lib), as Debian's own are.
runtime_base() {
  have_image "$runtime_image" && return 0
  local root="$dir/roots/runtime"
  rm -rf "$root"; mkdir -p "$root"
  say "making the runtime base: glibc, tzdata, netbase, ca-certificates from $suite"
  mmdebstrap --quiet --variant=extract --mode=root \
    --include=libc6,libgcc-s1,base-files,netbase,tzdata,ca-certificates \
    "$suite" "$root" "$debian_mirror"
  # merged-/usr, as Debian's own roots are since bookworm: /bin, /sbin, /lib and /lib64 are links
  # into /usr, so an image that copies a real /lib over it loses its loader
  local d
  for d in bin sbin lib lib64; do
    [ -d "$root/$d" ] && [ ! -L "$root/$d" ] || continue
    mkdir -p "$root/usr/$d"; cp -a "$root/$d/." "$root/usr/$d/"; rm -rf "${root:?}/$d"; ln -s "usr/$d" "$root/$d"
  done
  # ca-certificates' own script did not run in an extract: build its bundle the same way
  mkdir -p "$root/etc/ssl/certs"
  cat "$root"/usr/share/ca-certificates/mozilla/*.crt >"$root/etc/ssl/certs/ca-certificates.crt"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$root/etc/passwd"
  printf 'root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n' >"$root/etc/group"
  mkdir -p "$root/home/nonroot" "$root/tmp" "$root/root"
  chown 65532:65532 "$root/home/nonroot"; chmod 1777 "$root/tmp"; chmod 700 "$root/root"
  rm -rf "$root/usr/share/doc" "$root/usr/share/man" "$root/usr/share/info" "$root/usr/share/lintian" \
    "$root/var/cache/apt" "$root/var/lib/apt" "$root/etc/apt" "$root"/usr/share/ca-certificates/mozilla
  tar -C "$root" -c . | $docker import --change 'USER 65532:65532' - "$runtime_image" >/dev/null
  rm -rf "$root"
  say "imported $runtime_image"
}

bases() { up; builder_base; runtime_base; }

# Debian 13's OpenJDK 21 runtime on a minbase root (bash, coreutils, apt), with curl for
# healthchecks, as the official Java images carry a shell and a package manager.
jre_base() {
  have_image "$jre_image" && return 0
  local root="$dir/roots/jre"
  rm -rf "$root"; mkdir -p "$root"
  say "making the Java base: mmdebstrap minbase trixie, openjdk-21-jre-headless, curl"
  mmdebstrap --quiet --variant=minbase --mode=root --include=openjdk-21-jre-headless,curl,ca-certificates \
    trixie "$root" "$debian_mirror"
  rm -rf "$root/usr/share/doc" "$root/usr/share/man" "$root/usr/share/info" "$root/var/cache/apt"/*.bin \
    "$root/var/lib/apt/lists"/*
  tar -C "$root" -c . | $docker import \
    --change 'ENV JAVA_HOME=/usr/lib/jvm/java-21-openjdk-amd64' --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - "$jre_image" >/dev/null
  rm -rf "$root"
  say "imported $jre_image"
}

# The runtime base with Debian's static busybox and its applets (sh, wget, ...), for images
# whose healthchecks or helpers need a shell.
busybox_base() {
  have_image "$busybox_image" && return 0
  runtime_base
  local root="$dir/roots/busybox" ctx="$dir/contexts/busybox"
  rm -rf "$root" "$ctx"; mkdir -p "$root" "$ctx"
  mmdebstrap --quiet --variant=extract --mode=root --include=busybox-static "$suite" "$root" "$debian_mirror"
  cp "$root/bin/busybox" "$ctx/busybox" 2>/dev/null || cp "$root/usr/bin/busybox" "$ctx/busybox"
  printf '%s\n' "FROM $runtime_image" 'USER 0' 'COPY busybox /usr/bin/busybox' \
    'RUN ["/usr/bin/busybox", "--install", "-s", "/usr/bin"]' 'USER 65532:65532' >"$ctx/Dockerfile"
  DOCKER_BUILDKIT=1 $docker build --network none -q -t "$busybox_image" "$ctx" >/dev/null
  rm -rf "$root" "$ctx"
  say "built $busybox_image"
}

# A build context: images/NAME, plus what the caller copies in (hard links where they can be)
context() {
  local ctx="$dir/contexts/$1"
  rm -rf "$ctx"; mkdir -p "$dir/contexts"; cp -r "$repo/images/$1" "$ctx"
  echo "$ctx"
}
link_or_copy() { cp -l "$@" 2>/dev/null || cp "$@"; }

build_dependency() { # image context build-args...
  local image=$1 ctx=$2; shift 2
  say "docker build $image"
  DOCKER_BUILDKIT=1 $docker build --network none --progress plain "$@" -t "$image" "$ctx" >"$ctx.log" 2>&1 \
    || { tail -30 "$ctx.log" >&2; fail "docker build of $image failed (log: $ctx.log)"; }
}

deps() {
  up; jre_base; busybox_base
  bash "$repo/stack/stack.sh" install
  local started=$SECONDS ctx jars tool class
  # Kafka: the jars, and a launcher for each tool whose class they hold
  ctx=$(context kafka); mkdir -p "$ctx/libs"
  link_or_copy "$stack_dir/kafka-$kafka_version/libs/"*.jar "$ctx/libs/"
  jars=$(python3 -c 'import sys, zipfile
for j in sys.argv[1:]:
    print("\n".join(n[:-6].replace("/", ".") for n in zipfile.ZipFile(j).namelist() if n.endswith(".class")))' "$ctx/libs/"*.jar)
  while read -r tool class; do
    grep -qxF "$class" <<<"$jars" || fail "images/kafka/docker/tools.txt: $tool's class $class is in none of Kafka $kafka_version's jars"
  done <"$ctx/docker/tools.txt"
  build_dependency "${dependency_images[0]}" "$ctx" --build-arg "JRE_IMAGE=$jre_image"
  # Apicurio Registry: the unpacked distribution
  ctx=$(context apicurio-registry); mkdir -p "$ctx/app"
  link_or_copy -r "$stack_dir/apicurio-registry-$apicurio_version/." "$ctx/app/"
  rm -f "$ctx/app/.installed"
  build_dependency "${dependency_images[1]}" "$ctx" --build-arg "JRE_IMAGE=$jre_image"
  # Jaeger: the stack's binary and the module's sampling strategies
  ctx=$(context jaeger)
  # without its symbols and debug information, as release builds ship
  strip -o "$ctx/jaeger-linux" "$stack_dir/bin/jaeger-$jaeger_module_version"
  cp "$(go env GOMODCACHE)/github.com/jaegertracing/jaeger@$jaeger_module_version/cmd/jaeger/sampling-strategies.json" "$ctx/"
  build_dependency "${dependency_images[2]}" "$ctx" --build-arg "BASE_IMAGE=$busybox_image"
  rm -rf "$dir/contexts"
  say "built ${dependency_images[*]} in $((SECONDS - started)) s"
  local image
  for image in "${dependency_images[@]}"; do
    printf '[engine] %-42s %s MB\n' "$image" "$($docker image inspect -f '{{.Size}}' "$image" | awk '{ printf "%.0f", $1 / 1e6 }')"
  done
}

build() {
  bases
  local s started=$SECONDS
  # HTTPS from the build is verified with this machine's CA bundle, given to the cargo steps as
  # a build secret: it is in no layer of any image
  local ca=${BUILD_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
  for s in "${services[@]}"; do
    say "docker build --target $s"
    DOCKER_BUILDKIT=1 $docker build --network host --progress plain \
      --secret "id=build-ca,src=$ca" \
      --build-arg "BUILDER_IMAGE=$builder_image" --build-arg "RUNTIME_IMAGE=$runtime_image" \
      --target "$s" -t "order-pipeline/$s:$image_tag" "$repo" >"$dir/build-$s.log" 2>&1 \
      || { tail -40 "$dir/build-$s.log" >&2; fail "docker build --target $s failed (log: $dir/build-$s.log)"; }
  done
  say "built ${services[*]} in $((SECONDS - started)) s"
  sizes
}

# MB of each image, and of the layers our Dockerfile adds on top of the runtime base
sizes() {
  local base s total
  base=$($docker image inspect -f '{{.Size}}' "$runtime_image")
  printf '{"runtime_base_mb": %s' "$(awk -v b="$base" 'BEGIN { printf "%.1f", b / 1e6 }')"
  for s in "${services[@]}"; do
    total=$($docker image inspect -f '{{.Size}}' "order-pipeline/$s:$image_tag")
    printf ', "%s": {"image_mb": %s, "our_layers_mb": %s}' "$s" \
      "$(awk -v t="$total" 'BEGIN { printf "%.1f", t / 1e6 }')" \
      "$(awk -v t="$total" -v b="$base" 'BEGIN { printf "%.1f", (t - b) / 1e6 }')"
  done
  printf '}\n'
}

# Docker Compose v5, built from the Go module proxy (version pinned in tools/compose/go.mod):
# Debian's docker-compose is 1.29, which predates the Compose specification our file follows
compose() {
  local version bin
  # the version on the module's line, whether go.mod has it on a `require` line or in a block
  version=$(awk '{ for (i = 1; i < NF; i++) if ($i == "github.com/docker/compose/v5") { print $(i + 1); exit } }' "$repo/tools/compose/go.mod")
  [ -n "$version" ] || fail "no github.com/docker/compose/v5 in tools/compose/go.mod"
  bin=$dir/bin/docker-compose-$version
  if [ ! -x "$bin" ]; then
    say "building Docker Compose $version from the Go module proxy" >&2
    mkdir -p "$dir/bin"
    (cd "$repo/tools/compose" && go build -trimpath -o "$bin.part" github.com/docker/compose/v5/cmd) && mv "$bin.part" "$bin"
  fi
  up >&2
  exec "$bin" "$@"
}

case "${1:-}" in
  install) install ;;
  up) up ;;
  down) down ;;
  status) status ;;
  env) echo "export DOCKER_HOST=$DOCKER_HOST" ;;
  bases) bases ;;
  build) build ;;
  deps) deps ;;
  sizes) sizes ;;
  compose) shift; compose "$@" ;;
  save) shift; running || fail "the engine is not running (make engine-up)"; $docker save "$@" ;;
  *) echo "usage: $0 install|up|down|status|env|bases|build|deps|sizes|compose ARGS..." >&2; exit 2 ;;
esac
