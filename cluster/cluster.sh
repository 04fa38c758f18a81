#!/usr/bin/env bash
# A real single-node Kubernetes on this machine, for the chart's install test: etcd, the API
# server, the controller manager, the scheduler, the kubelet and kube-proxy as local processes,
# on a containerd of the cluster's own (Debian's containerd, runc and CNI plugins), with CoreDNS
# answering the cluster's names and Rancher's local-path provisioner behind the default
# StorageClass, as kind has them. The Kubernetes binaries and etcd are built once from the Go
# module proxy (cluster/go.mod), CoreDNS and the provisioner from their own modules
# (cluster/coredns, cluster/local-path), and cached.
#
#   cluster/cluster.sh install   Debian packages and the binaries, when missing
#   cluster/cluster.sh up        start what is not running, wait until the node is Ready
#   cluster/cluster.sh down      stop what `up` started, by pid; remove the bridge and whatever
#                                the kubelet left in iptables; restore the kernel settings
#   cluster/cluster.sh status    one line per component
#   cluster/cluster.sh env       export lines: KUBECONFIG and the binaries on PATH
#   cluster/cluster.sh load IMAGE...   copy images from the project's engine into containerd
#   cluster/cluster.sh fingerprint     the machine's network and kernel settings the cluster may
#                                      touch, to compare before `up` and after `down`
#
# CLUSTER_DIR (default: <repo>/.cluster, git-ignored) holds binaries, PKI, state and logs.
#
# Network: pods get a bridge of the cluster's own (op-k8s0, 10.213.0.0/24), whose host side is
# 10.213.0.1. Pods have no default route: only the bridge's subnet and the service range
# (10.214.0.0/24) through the bridge address, where kube-proxy's rules (iptables) translate a
# Service's cluster IP to a pod's. Forwarding is on for packets that arrive on the bridge alone
# (the bridge's own setting; the machine's stays off), a rule drops any that would leave by
# another interface, nothing is masqueraded beyond the bridge, and the service range has an
# `unreachable` route on the host: a packet to a cluster IP is translated here or dropped.
# CoreDNS listens on the bridge address, answers for cluster.local (and the reverse zones of the
# two ranges) from the API, and NXDOMAIN for any other name: it has no forwarder. The API server
# listens on 127.0.0.1; the kubelet on the bridge address.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
src="$repo/cluster"
dir=${CLUSTER_DIR:-$repo/.cluster}
mkdir -p "$dir"/{bin,run,logs}
dir=$(cd "$dir" && pwd)

K8S_VERSION=v1.34.4
NODE=op-node
BRIDGE=op-k8s0
BRIDGE_ADDRESS=10.213.0.1
POD_SUBNET=10.213.0.0/24
SERVICE_RANGE=10.214.0.0/24
API_PORT=16443
ETCD_PORT=12379
KUBELET_PORT=20250
READY_TIMEOUT_S=${CLUSTER_READY_TIMEOUT_S:-180}
PAUSE_IMAGE=localhost/order-pipeline/pause:3.10
CLUSTER_DOMAIN=cluster.local
# the default StorageClass's provisioner and its helper pods' image (Debian's static busybox)
LOCAL_PATH_NS=local-path-storage
STORAGE_CLASS=standard
HELPER_IMAGE=localhost/order-pipeline/busybox:bookworm
# the rule that keeps pods' packets on the bridge (mangle FORWARD), found and removed by its comment
GUARD_COMMENT="order-pipeline cluster: pods' packets stay on $BRIDGE"
components=(containerd etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy coredns local-path-provisioner)

say() { printf '[cluster] %s\n' "$*" >&2; }
die() { printf '[cluster] error: %s\n' "$*" >&2; exit 1; }
procs_dir=$dir
procs_stop_s=20
# shellcheck source=../scripts/procs.sh
. "$repo/scripts/procs.sh"

pki="$dir/pki"
bin="$dir/bin"
cnt="$dir/containerd"
export PATH="$bin:$PATH"
kubectl() { "$bin/kubectl" --kubeconfig "$dir/admin.kubeconfig" "$@"; }

# ---------------------------------------------------------------- install

install() {
  local missing=() p
  # containerd and runc also come with docker.io (the engine); the CNI plugins do not
  # busybox-static: the local-path provisioner's helper image
  for p in containerd runc containernetworking-plugins iproute2 iptables openssl busybox-static; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    say "installing ${missing[*]}"
    local sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
  # the version the binaries report (the release build sets it the same way); Helm checks
  # charts' kubeVersion against it
  local v=${K8S_VERSION#v} x ldflags="" recipe t
  for x in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $x.gitVersion=$K8S_VERSION -X $x.gitMajor=${v%%.*} -X $x.gitMinor=$(echo "$v" | cut -d. -f2)"
    ldflags+=" -X $x.gitTreeState=clean"
  done
  # built again when the module's requirements or the flags change
  recipe="$ldflags $(cat "$src/go.mod" "$src/go.sum" "$src/coredns/go.mod" "$src/coredns/go.sum" "$src/coredns/main.go" \
    "$src/local-path/go.mod" "$src/local-path/go.sum" | sha256sum)"
  if [ "$(cat "$bin/.built" 2>/dev/null)" != "$recipe" ]; then
    command -v go >/dev/null || die "Go is needed to build Kubernetes from the Go module proxy"
    t=$(now)
    say "building Kubernetes $K8S_VERSION (kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy, kubectl), etcd, CoreDNS and the local-path provisioner from the Go module proxy; about ten minutes the first time"
    { (cd "$src" && go build -trimpath -ldflags "$ldflags" -o "$bin/" tool) \
        && (cd "$src/coredns" && go build -trimpath -o "$bin/coredns" .) \
        && (cd "$src/local-path" && go build -trimpath -o "$bin/" tool); } >"$dir/logs/build.log" 2>&1 \
      || { tail -n 20 "$dir/logs/build.log" >&2; die "the build failed; its log is $dir/logs/build.log"; }
    # go names the etcd server module's binary after its path without the major version
    mv "$bin/server" "$bin/etcd"
    echo "$recipe" >"$bin/.built"
    say "built in $(elapsed "$t")s"
  fi
  [ -x "$bin/pause" ] && [ "$src/pause.c" -ot "$bin/pause" ] \
    || gcc -Os -static -o "$bin/pause" "$src/pause.c" || die "could not build the pause program"
}

# ---------------------------------------------------------------- processes

launch() { # name command...
  running "$1" || spawn "$@"
}

wait_for() { # component check...: until check passes; fails at once when the component exits
  local name=$1 deadline; shift
  deadline=$(( $(date +%s) + READY_TIMEOUT_S ))
  until "$@" >/dev/null 2>&1; do
    if ! running "$name"; then
      tail -n 20 "$dir/logs/$name.log" >&2 || true
      die "$name exited during start-up; its log is $dir/logs/$name.log (last lines above)"
    fi
    [ "$(date +%s)" -lt "$deadline" ] || die "$name not ready after ${READY_TIMEOUT_S}s; its log is $dir/logs/$name.log"
    sleep 0.5
  done
}

# ---------------------------------------------------------------- PKI

cert() { # name CN O [subjectAltNames]
  local name=$1 cn=$2 o=$3 san=${4:-} subj ext
  [ -f "$pki/$name.crt" ] && return 0
  subj="/CN=$cn"; [ -z "$o" ] || subj="/O=$o$subj"
  ext="$pki/$name.ext"
  { echo "basicConstraints=CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    if [ -n "$san" ]; then echo "extendedKeyUsage=serverAuth,clientAuth"; echo "subjectAltName=$san"
    else echo "extendedKeyUsage=clientAuth"; fi
  } >"$ext"
  openssl req -new -newkey rsa:2048 -nodes -keyout "$pki/$name.key" -subj "$subj" -out "$pki/$name.csr" 2>/dev/null
  openssl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 365 -extfile "$ext" -out "$pki/$name.crt" 2>/dev/null
  rm -f "$pki/$name.csr" "$ext"
}

kubeconfig() { # file user cert-name
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
  - name: order-pipeline
    cluster:
      server: https://127.0.0.1:$API_PORT
      certificate-authority: $pki/ca.crt
users:
  - name: $2
    user:
      client-certificate: $pki/$3.crt
      client-key: $pki/$3.key
contexts:
  - name: order-pipeline
    context: { cluster: order-pipeline, user: $2 }
current-context: order-pipeline
EOF
}

make_pki() {
  mkdir -p "$pki"
  if [ ! -f "$pki/ca.crt" ]; then
    say "making the cluster's certificates (openssl)"
    openssl req -x509 -new -newkey rsa:2048 -nodes -keyout "$pki/ca.key" -subj "/CN=order-pipeline-cluster-ca" \
      -days 365 -out "$pki/ca.crt" 2>/dev/null
  fi
  cert apiserver kube-apiserver "" \
    "IP:127.0.0.1,IP:$BRIDGE_ADDRESS,IP:${SERVICE_RANGE%.0/*}.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  cert apiserver-kubelet-client kube-apiserver-kubelet-client system:masters
  cert admin kubernetes-admin system:masters
  cert controller-manager system:kube-controller-manager ""
  cert scheduler system:kube-scheduler ""
  cert kubelet-client "system:node:$NODE" system:nodes
  cert kubelet "$NODE" "" "IP:$BRIDGE_ADDRESS,DNS:$NODE"
  cert kube-proxy system:kube-proxy ""
  cert coredns system:coredns ""
  cert local-path local-path-provisioner ""
  [ -f "$pki/sa.key" ] || { openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null; openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null; }
  kubeconfig "$dir/admin.kubeconfig" admin admin
  kubeconfig "$dir/controller-manager.kubeconfig" controller-manager controller-manager
  kubeconfig "$dir/scheduler.kubeconfig" scheduler scheduler
  kubeconfig "$dir/kubelet.kubeconfig" "system:node:$NODE" kubelet-client
  kubeconfig "$dir/kube-proxy.kubeconfig" system:kube-proxy kube-proxy
  kubeconfig "$dir/coredns.kubeconfig" system:coredns coredns
  kubeconfig "$dir/local-path.kubeconfig" local-path-provisioner local-path
}

# ---------------------------------------------------------------- network

bridge_up() {
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    ip addr add "$BRIDGE_ADDRESS/24" dev "$BRIDGE"
  fi
  ip link set "$BRIDGE" up
  # packets that arrive on the bridge may be routed (to a Service's pod, back onto the bridge);
  # the machine's own forwarding setting stays as it is
  sysctl -qw "net.ipv4.conf.$BRIDGE.forwarding=1"
  # bridged packets pass iptables, so that a reply from a Service's pod to a pod on the same
  # bridge is translated back (kube-proxy's requirement; restored by down)
  sysctl -qw net.bridge.bridge-nf-call-iptables=1
  # in mangle, which packets pass before kube-proxy's ACCEPT rules in filter
  iptables -t mangle -C FORWARD -i "$BRIDGE" ! -o "$BRIDGE" -m comment --comment "$GUARD_COMMENT" -j DROP 2>/dev/null \
    || iptables -t mangle -I FORWARD 1 -i "$BRIDGE" ! -o "$BRIDGE" -m comment --comment "$GUARD_COMMENT" -j DROP
  ip route show type unreachable | grep -q "^unreachable $SERVICE_RANGE " || ip route add unreachable "$SERVICE_RANGE"
}

network_down() {
  while iptables -t mangle -D FORWARD -i "$BRIDGE" ! -o "$BRIDGE" -m comment --comment "$GUARD_COMMENT" -j DROP 2>/dev/null; do
    say "removed the FORWARD rule that kept pods on $BRIDGE"
  done
  if ip route show type unreachable | grep -q "^unreachable $SERVICE_RANGE "; then
    ip route del unreachable "$SERVICE_RANGE" && say "removed the route unreachable $SERVICE_RANGE"
  fi
  ip link show "$BRIDGE" >/dev/null 2>&1 && { ip link delete "$BRIDGE"; say "bridge $BRIDGE removed"; }
  return 0
}

# The kernel settings the kubelet, kube-proxy and bridge_up change, one "sysctl <key> <value>"
# line each (those this kernel has).
kernel_settings() {
  local k
  for k in vm/overcommit_memory vm/panic_on_oom kernel/panic kernel/panic_on_oops kernel/keys/root_maxkeys kernel/keys/root_maxbytes \
      net/bridge/bridge-nf-call-iptables net/ipv4/conf/all/route_localnet net/netfilter/nf_conntrack_max \
      net/netfilter/nf_conntrack_tcp_timeout_established net/netfilter/nf_conntrack_tcp_timeout_close_wait; do
    [ -e "/proc/sys/$k" ] && echo "sysctl $k $(cat "/proc/sys/$k")"
  done
  return 0
}

# The network namespaces and the kubelet's cgroups, one "netns <name>" or "cgroup <path>" line
# each. Neither exists on a machine that never ran a pod: nothing to list then (not a failure,
# which under pipefail it would be).
pod_leftovers() {
  { ls /var/run/netns 2>/dev/null || true; } | sed 's/^/netns /'
  { ls -d /sys/fs/cgroup/*/kubepods 2>/dev/null || true; } | sed 's/^/cgroup /'
}

# what the machine had before the cluster, so that `down` removes only what the kubelet added
save_machine_state() {
  [ -f "$dir/run/machine-state" ] && return 0
  local t ipt
  { kernel_settings
    for ipt in iptables ip6tables; do
      for t in filter nat mangle; do
        $ipt -t "$t" -S 2>/dev/null | awk -v i="$ipt" -v t="$t" '$1 == "-N" { print "chain " i " " t " " $2 }'
      done
    done
    pod_leftovers
  } >"$dir/run/machine-state.partial"
  # whole or not at all: a file left by a listing that failed half-way would be kept as it is
  mv "$dir/run/machine-state.partial" "$dir/run/machine-state"
}

restore_machine_state() {
  local f="$dir/run/machine-state" kind a b t chain ipt
  [ -f "$f" ] || return 0
  while read -r kind a b; do
    [ "$kind" = sysctl ] || continue
    [ "$(cat "/proc/sys/$a")" = "$b" ] || { echo "$b" >"/proc/sys/$a" && say "restored $a=$b"; }
  done <"$f"
  # chains the kubelet makes (KUBE-IPTABLES-HINT, KUBE-KUBELET-CANARY, ...) that were not there
  for ipt in iptables ip6tables; do
    for t in filter nat mangle; do
      $ipt -t "$t" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^KUBE-/ { print $2 }' | while read -r chain; do
        grep -qx "chain $ipt $t $chain" "$f" && continue
        # the rules that jump to it first (KUBE-FIREWALL from INPUT and OUTPUT)
        $ipt -t "$t" -S 2>/dev/null | awk -v c="$chain" '$1 == "-A" && $2 != c && $0 ~ (" -j " c "( |$)")' \
          | while read -r -a rule; do rule[0]=-D; $ipt -t "$t" "${rule[@]}" || true; done
        $ipt -t "$t" -F "$chain" 2>/dev/null || true
        $ipt -t "$t" -X "$chain" 2>/dev/null && say "removed $ipt chain $t/$chain"
      done
    done
  done
  # the kubelet's pod cgroups (cgroupfs driver: kubepods/ in every hierarchy), empty by now
  local cg
  for cg in /sys/fs/cgroup/*/kubepods; do
    [ -d "$cg" ] || continue
    grep -qx "cgroup $cg" "$f" && continue
    find "$cg" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    [ -d "$cg" ] && say "could not remove cgroup $cg (still in use?)"
  done
  rm -f "$f"
}

# ---------------------------------------------------------------- components

containerd_config() {
  cat <<EOF
# Generated by cluster/cluster.sh: a containerd of the cluster's own, not the machine's.
version = 2
root = "$cnt/root"
state = "$cnt/state"
[grpc]
  address = "$cnt/containerd.sock"
[ttrpc]
  address = "$cnt/containerd.sock.ttrpc"
[debug]
  level = "warn"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # these machines refuse to lower oom_score_adj; without this every sandbox fails to start
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$dir/cni/net.d"
[plugins."io.containerd.internal.v1.opt"]
  path = "$cnt/opt"
EOF
}

cni_config() {
  cat <<EOF
{
  "cniVersion": "0.4.0",
  "name": "order-pipeline-pods",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": false,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$dir/cni/ipam",
        "ranges": [[{ "subnet": "$POD_SUBNET", "rangeStart": "${POD_SUBNET%.0/*}.10" }]],
        "routes": [{ "dst": "$SERVICE_RANGE", "gw": "$BRIDGE_ADDRESS" }]
      }
    }
  ]
}
EOF
}

start_containerd() {
  mkdir -p "$cnt" "$dir/cni/net.d" "$dir/cni/ipam"
  containerd_config >"$cnt/config.toml"
  cni_config >"$dir/cni/net.d/10-order-pipeline.conflist"
  launch containerd containerd --config "$cnt/config.toml"
  wait_for containerd ctr --address "$cnt/containerd.sock" version
  local image
  for image in "$PAUSE_IMAGE" "$HELPER_IMAGE"; do
    ctr --address "$cnt/containerd.sock" -n k8s.io images ls -q | grep -qx "$image" && continue
    if [ "$image" = "$PAUSE_IMAGE" ]; then pause_image; else helper_image; fi \
      | ctr --address "$cnt/containerd.sock" -n k8s.io images import --no-unpack=false - >/dev/null \
      || die "could not import the image $image"
    say "image $image imported"
  done
}

# An OCI image archive of one layer, made from a root directory without any registry:
# oci_image NAME (with its tag) ROOT CONFIG (the image config's "config" object, JSON)
oci_image() {
  local name=$1 root=$2 cfg=$3 w
  w=$(mktemp -d)
  mkdir -p "$w/blobs/sha256"
  # the image's / as any root file system's (mktemp made it 0700)
  chmod 755 "$root"
  tar --sort=name --owner=0 --group=0 --mtime=@0 -C "$root" -cf "$w/layer.tar" .
  local layer config manifest size_l size_c size_m
  layer=$(sha256sum "$w/layer.tar" | cut -d' ' -f1); size_l=$(stat -c %s "$w/layer.tar")
  mv "$w/layer.tar" "$w/blobs/sha256/$layer"
  printf '{"architecture":"amd64","os":"linux","config":%s,"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' "$cfg" "$layer" >"$w/config.json"
  config=$(sha256sum "$w/config.json" | cut -d' ' -f1); size_c=$(stat -c %s "$w/config.json")
  mv "$w/config.json" "$w/blobs/sha256/$config"
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
    "$config" "$size_c" "$layer" "$size_l" >"$w/manifest.json"
  manifest=$(sha256sum "$w/manifest.json" | cut -d' ' -f1); size_m=$(stat -c %s "$w/manifest.json")
  mv "$w/manifest.json" "$w/blobs/sha256/$manifest"
  printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' \
    "$manifest" "$size_m" "$name" "${name##*:}" >"$w/index.json"
  echo '{"imageLayoutVersion":"1.0.0"}' >"$w/oci-layout"
  tar -C "$w" -cf - oci-layout index.json blobs
  rm -rf "$w"
}

# the pod sandbox: the static pause program alone
pause_image() {
  local root; root=$(mktemp -d)
  cp "$bin/pause" "$root/pause"
  oci_image "$PAUSE_IMAGE" "$root" '{"Entrypoint":["/pause"],"User":"65535:65535"}'
  rm -rf "$root"
}

# the local-path provisioner's helper: Debian's static busybox and its applets (sh, mkdir, rm)
helper_image() {
  local root applet; root=$(mktemp -d)
  mkdir -p "$root/bin" "$root/tmp"
  chmod 1777 "$root/tmp"
  cp /bin/busybox "$root/bin/busybox"
  for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
  done
  oci_image "$HELPER_IMAGE" "$root" '{"Env":["PATH=/bin"],"Cmd":["/bin/sh"]}'
  rm -rf "$root"
}

start_etcd() {
  launch etcd etcd --name "$NODE" --data-dir "$dir/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
    --initial-cluster "$NODE=http://127.0.0.1:$((ETCD_PORT + 1))" \
    --listen-metrics-urls "" --log-level warn
  wait_for etcd curl -sf "http://127.0.0.1:$ETCD_PORT/health"
}

start_apiserver() {
  launch kube-apiserver kube-apiserver \
    --bind-address 127.0.0.1 --secure-port "$API_PORT" --advertise-address "$BRIDGE_ADDRESS" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --service-cluster-ip-range "$SERVICE_RANGE" \
    --client-ca-file "$pki/ca.crt" \
    --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
    --kubelet-client-certificate "$pki/apiserver-kubelet-client.crt" --kubelet-client-key "$pki/apiserver-kubelet-client.key" \
    --kubelet-preferred-address-types InternalIP \
    --service-account-issuer "https://kubernetes.default.svc.cluster.local" \
    --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
    --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
    --allow-privileged=false --profiling=false --cert-dir "$dir/run/apiserver"
  wait_for kube-apiserver kubectl get --raw /readyz
}

start_controllers() {
  launch kube-controller-manager kube-controller-manager \
    --kubeconfig "$dir/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$dir/controller-manager.kubeconfig" --authorization-kubeconfig "$dir/controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port 20257 --cert-dir "$dir/run/controller-manager" \
    --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
    --use-service-account-credentials --leader-elect=false --profiling=false \
    --controllers '*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller,-node-route-controller'
  launch kube-scheduler kube-scheduler \
    --kubeconfig "$dir/scheduler.kubeconfig" \
    --authentication-kubeconfig "$dir/scheduler.kubeconfig" --authorization-kubeconfig "$dir/scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port 20259 --leader-elect=false --profiling=false
}

kubelet_config() {
  cat <<EOF
# Generated by cluster/cluster.sh
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $BRIDGE_ADDRESS
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 20248
tlsCertFile: $pki/kubelet.crt
tlsPrivateKeyFile: $pki/kubelet.key
authentication:
  anonymous: { enabled: false }
  webhook: { enabled: true }
  x509: { clientCAFile: $pki/ca.crt }
authorization:
  mode: Webhook
containerRuntimeEndpoint: unix://$cnt/containerd.sock
cgroupDriver: cgroupfs
# these machines mount cgroup v1 (the cgroup2 mount at /sys/fs/cgroup/unified is empty)
failCgroupV1: false
failSwapOn: false
# DNS: CoreDNS on the bridge address (cluster.local, NXDOMAIN for any other name); pods with
# dnsPolicy Default get the same server
clusterDNS: [$BRIDGE_ADDRESS]
clusterDomain: $CLUSTER_DOMAIN
resolvConf: $dir/resolv.conf
# the kubelet changes these kernel settings when they differ; down restores the old values
protectKernelDefaults: false
# the machine's disk is shared with everything else: evict and collect images only near full
evictionHard:
  memory.available: 100Mi
  nodefs.available: 1%
  imagefs.available: 1%
  nodefs.inodesFree: 1%
evictionPressureTransitionPeriod: 30s
imageGCHighThresholdPercent: 99
imageGCLowThresholdPercent: 98
staticPodPath: ""
serializeImagePulls: false
EOF
}

start_kubelet() {
  mkdir -p "$dir/kubelet"
  kubelet_config >"$dir/kubelet-config.yaml"
  echo "nameserver $BRIDGE_ADDRESS" >"$dir/resolv.conf"
  launch kubelet kubelet --config "$dir/kubelet-config.yaml" --kubeconfig "$dir/kubelet.kubeconfig" \
    --root-dir "$dir/kubelet" --cert-dir "$dir/run/kubelet" --hostname-override "$NODE" \
    --node-ip "$BRIDGE_ADDRESS"
  wait_for kubelet node_ready
}

kube_proxy_config() {
  cat <<EOF
# Generated by cluster/cluster.sh
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: $dir/kube-proxy.kubeconfig
hostnameOverride: $NODE
mode: iptables
clusterCIDR: $POD_SUBNET
# node ports on the bridge address only; none on loopback (which would need route_localnet)
nodePortAddresses: ["$BRIDGE_ADDRESS/32"]
iptables:
  localhostNodePorts: false
healthzBindAddress: 127.0.0.1:20256
metricsBindAddress: 127.0.0.1:20249
# the machine's connection-tracking settings are left as they are
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
EOF
}

start_kube_proxy() {
  kube_proxy_config >"$dir/kube-proxy-config.yaml"
  launch kube-proxy kube-proxy --config "$dir/kube-proxy-config.yaml"
  wait_for kube-proxy curl -sf http://127.0.0.1:20256/livez
}

# The cluster's zone and the reverse zones of its two ranges from the API (as kind's CoreDNS
# answers them); any other name NXDOMAIN, since nothing here may ask a server beyond the machine.
corefile() {
  local reverse
  reverse=$(for r in "$POD_SUBNET" "$SERVICE_RANGE"; do echo "$r" | awk -F'[./]' '{ printf "%s.%s.%s.in-addr.arpa ", $3, $2, $1 }'; done)
  cat <<EOF
$CLUSTER_DOMAIN:53 ${reverse% } {
    bind $BRIDGE_ADDRESS
    errors
    health 127.0.0.1:20180
    ready 127.0.0.1:20181
    kubernetes $CLUSTER_DOMAIN ${reverse% } {
        kubeconfig $dir/coredns.kubeconfig order-pipeline
        pods insecure
        ttl 30
    }
    cache 30
    loop
    loadbalance
}
.:53 {
    bind $BRIDGE_ADDRESS
    errors
    template ANY ANY {
        rcode NXDOMAIN
    }
}
EOF
}

# A (Cluster)RoleBinding of the role of that name to a user of the cluster's PKI:
# user_binding Role|ClusterRole NAME USER [NAMESPACE]
user_binding() {
  echo "apiVersion: rbac.authorization.k8s.io/v1"
  echo "kind: ${1}Binding"
  echo "metadata: {name: \"$2\"${4:+, namespace: $4}}"
  echo "roleRef: {apiGroup: rbac.authorization.k8s.io, kind: $1, name: \"$2\"}"
  echo "subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: \"$3\"}]"
}

# What CoreDNS's kubernetes plugin reads, granted to its user (as kind's system:coredns role).
coredns_rbac() {
  kubectl apply -f - >/dev/null <<EOF
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: system:coredns
rules:
  - apiGroups: [""]
    resources: [endpoints, services, pods, namespaces]
    verbs: [list, watch]
  - apiGroups: [discovery.k8s.io]
    resources: [endpointslices]
    verbs: [list, watch]
---
$(user_binding ClusterRole system:coredns system:coredns)
EOF
}

start_coredns() {
  coredns_rbac
  corefile >"$dir/Corefile"
  launch coredns coredns -conf "$dir/Corefile"
  wait_for coredns curl -sf http://127.0.0.1:20181/ready
}

# ---------------------------------------------------------------- storage

# The default StorageClass, as kind's: Rancher's local-path provisioner makes each volume a
# directory under $dir/local-path on this node, through a helper pod (busybox) that creates and
# removes it. The provisioner runs as a local process with a user of its own.
local_path_objects() {
  cat <<EOF
apiVersion: v1
kind: Namespace
metadata:
  name: $LOCAL_PATH_NS
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: local-path-provisioner-service-account
  namespace: $LOCAL_PATH_NS
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: local-path-provisioner-role
  namespace: $LOCAL_PATH_NS
rules:
  - apiGroups: [""]
    resources: [pods]
    verbs: [get, list, watch, create, patch, update, delete]
---
$(user_binding Role local-path-provisioner-role local-path-provisioner "$LOCAL_PATH_NS")
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: local-path-provisioner-role
rules:
  - apiGroups: [""]
    resources: [nodes, persistentvolumeclaims, configmaps, pods, pods/log]
    verbs: [get, list, watch]
  - apiGroups: [""]
    resources: [persistentvolumes]
    verbs: [get, list, watch, create, patch, update, delete]
  - apiGroups: [""]
    resources: [events]
    verbs: [create, patch]
  - apiGroups: [storage.k8s.io]
    resources: [storageclasses]
    verbs: [get, list, watch]
---
$(user_binding ClusterRole local-path-provisioner-role local-path-provisioner)
---
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: $STORAGE_CLASS
  annotations:
    storageclass.kubernetes.io/is-default-class: "true"
provisioner: rancher.io/local-path
volumeBindingMode: WaitForFirstConsumer
reclaimPolicy: Delete
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: local-path-config
  namespace: $LOCAL_PATH_NS
data:
  config.json: |-
    {"nodePathMap": [{"node": "DEFAULT_PATH_FOR_NON_LISTED_NODES", "paths": ["$dir/local-path"]}]}
  setup: |-
    #!/bin/sh
    set -eu
    mkdir -m 0777 -p "\$VOL_DIR"
  teardown: |-
    #!/bin/sh
    set -eu
    rm -rf "\$VOL_DIR"
  helperPod.yaml: |-
    apiVersion: v1
    kind: Pod
    metadata:
      name: helper-pod
    spec:
      priorityClassName: system-node-critical
      tolerations:
        - key: node.kubernetes.io/disk-pressure
          operator: Exists
          effect: NoSchedule
      containers:
        - name: helper-pod
          image: $HELPER_IMAGE
          imagePullPolicy: IfNotPresent
          securityContext:
            runAsUser: 0
EOF
}

start_local_path() {
  kubectl apply -f - >/dev/null < <(local_path_objects)
  mkdir -p "$dir/local-path"
  launch local-path-provisioner local-path-provisioner start --kubeconfig "$dir/local-path.kubeconfig" \
    --namespace "$LOCAL_PATH_NS" --configmap-name local-path-config --provisioner-name rancher.io/local-path \
    --helper-image "$HELPER_IMAGE" --service-account-name local-path-provisioner-service-account
  # no health endpoint: alive a moment after it read its configuration
  sleep 1
  running local-path-provisioner || { tail -n 20 "$dir/logs/local-path-provisioner.log" >&2; die "local-path-provisioner exited; its log is $dir/logs/local-path-provisioner.log"; }
}

node_ready() {
  [ "$(kubectl get node "$NODE" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}')" = True ]
}

up() {
  [ "$(id -u)" -eq 0 ] || die "the cluster needs root (bridge, network namespaces, cgroups, containerd): run it as root"
  install
  local t; t=$(now)
  save_machine_state
  make_pki
  bridge_up
  start_containerd
  start_etcd
  start_apiserver
  start_controllers
  start_kubelet
  start_kube_proxy
  start_coredns
  start_local_path
  say "cluster up in $(elapsed "$t")s: node $NODE Ready; KUBECONFIG=$dir/admin.kubeconfig; pods on $BRIDGE ($POD_SUBNET), services $SERVICE_RANGE, DNS $CLUSTER_DOMAIN at $BRIDGE_ADDRESS"
}

down() {
  # no controller makes new pods; then the pods go while the kubelet still runs, so that their
  # sandboxes, mounts and network go the normal way (CNI DEL)
  stop kube-scheduler; stop kube-controller-manager
  if running kubelet && running kube-apiserver; then
    kubectl delete pods --all --all-namespaces --grace-period=5 --timeout=60s >/dev/null 2>&1 \
      || say "some pods did not go in 60s; removing their containers directly"
  fi
  stop local-path-provisioner
  stop kubelet
  stop coredns
  stop kube-proxy
  # kube-proxy's own clean-up of the rules it made (restore_machine_state removes what is left)
  [ -x "$bin/kube-proxy" ] && { "$bin/kube-proxy" --cleanup >>"$dir/logs/kube-proxy.log" 2>&1 || true; }
  if running containerd; then
    # the sandboxes' shims and network namespaces; the CNI plugin releases the addresses
    local c="$cnt/containerd.sock" id
    for id in $(ctr --address "$c" -n k8s.io tasks ls -q 2>/dev/null); do
      ctr --address "$c" -n k8s.io tasks kill -s KILL "$id" >/dev/null 2>&1 || true
    done
    sleep 1
    for id in $(ctr --address "$c" -n k8s.io tasks ls -q 2>/dev/null); do
      ctr --address "$c" -n k8s.io tasks delete -f "$id" >/dev/null 2>&1 || true
    done
  fi
  stop containerd
  stop kube-apiserver; stop etcd
  # shims outlive containerd by design; ours are known by their -address argument
  local pid
  for pid in $(pgrep -f "containerd-shim.*-address $cnt/containerd.sock" || true); do
    kill -KILL "$pid" 2>/dev/null || true
  done
  # what is still mounted under our directory (pod volumes, rootfs, sandboxes' /dev/shm)
  awk -v d="$dir/" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done
  # network namespaces CRI made for our pods (cni-<uuid> under /var/run/netns) and left
  local ns
  for ns in $(ls /var/run/netns 2>/dev/null | grep '^cni-' || true); do
    grep -qx "netns $ns" "$dir/run/machine-state" 2>/dev/null && continue
    ip netns delete "$ns" 2>/dev/null && say "removed network namespace $ns"
  done
  network_down
  rm -rf "$dir/cni/ipam"
  restore_machine_state
  say "cluster down"
}

# What of the machine's network and kernel settings the cluster may touch, for a before/after
# comparison (make test-cluster): links, addresses, routes, iptables rules, network namespaces,
# the kubelet's cgroups, forwarding and the kernel settings the kubelet changes.
fingerprint() {
  ip -br link | awk '{ print "link", $1, $2 }'
  ip -br addr | awk '{ $2 = ""; print "addr", $0 }'
  ip route | sed 's/^/route /'
  local ipt t
  for ipt in iptables ip6tables; do
    for t in filter nat mangle raw; do $ipt -t "$t" -S 2>/dev/null | sed "s/^/$ipt $t /"; done
  done
  pod_leftovers
  echo "sysctl net/ipv4/ip_forward $(cat /proc/sys/net/ipv4/ip_forward)"
  kernel_settings
}

status() {
  local c
  for c in "${components[@]}"; do
    if running "$c"; then printf '%-24s running (pid %s)\n' "$c" "$(cat "$(pidfile "$c")")"
    else printf '%-24s stopped\n' "$c"; fi
  done
}

load() { # images from the project's engine into containerd's k8s.io namespace
  local image
  running containerd || die "the cluster is not up (make cluster-up)"
  for image in "$@"; do
    bash "$repo/scripts/engine.sh" save "$image" \
      | ctr --address "$cnt/containerd.sock" -n k8s.io images import --no-unpack=false - >/dev/null \
      || die "could not load $image"
    say "loaded $image"
  done
}

case "${1:-}" in
  install) install ;;
  up) up ;;
  down) down ;;
  status) status ;;
  fingerprint) fingerprint ;;
  env)
    echo "export KUBECONFIG=$dir/admin.kubeconfig"
    echo "export PATH=$bin:\$PATH" ;;
  load) shift; load "$@" ;;
  *) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
