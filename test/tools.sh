#!/usr/bin/env bash
# Installs the real parts meshfed's tests and `make generate` run against,
# when they are missing: etcd (Debian's etcd-server), curl, gcc (for -race), HAProxy (for make bench), systemd (systemd-analyze), protoc (Debian's
# protobuf-compiler 3.21.12, which the committed code was made with), and
# the well-known .proto files (libprotobuf-dev), and the pinned kube-apiserver and Consul agent, built once into a cache dir (test/kube.sh, test/consul.sh).
set -euo pipefail
need=()
command -v etcd >/dev/null || need+=(etcd-server)
command -v curl >/dev/null || need+=(curl)
# The race detector (make test runs the unit tests with -race) needs cgo.
command -v gcc >/dev/null || need+=(gcc libc6-dev)
# HAProxy 2.6, the peer `make bench` measures the gateway against.
command -v haproxy >/dev/null || need+=(haproxy)
command -v protoc >/dev/null || need+=(protobuf-compiler)
# systemd-analyze verify checks the unit deploy/vm/install.sh writes.
command -v systemd-analyze >/dev/null || need+=(systemd)
# The well-known types (timestamp.proto, duration.proto) protoc imports.
[ -f /usr/include/google/protobuf/duration.proto ] || need+=(libprotobuf-dev)
if [ ${#need[@]} -gt 0 ]; then
  echo "test/tools.sh: installing ${need[*]} from Debian"
  SUDO=
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
"$(dirname "$0")/kube.sh" >/dev/null
"$(dirname "$0")/consul.sh" >/dev/null
