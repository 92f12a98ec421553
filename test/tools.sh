#!/usr/bin/env bash
# Installs the real parts meshfed's tests and `make generate` run against,
# when they are missing: etcd (Debian's etcd-server), curl, and protoc
# (Debian's protobuf-compiler 3.21.12, which the committed code was made with).
set -euo pipefail
need=()
command -v etcd >/dev/null || need+=(etcd-server)
command -v curl >/dev/null || need+=(curl)
command -v protoc >/dev/null || need+=(protobuf-compiler)
[ ${#need[@]} -eq 0 ] && exit 0
echo "test/tools.sh: installing ${need[*]} from Debian"
SUDO=
[ "$(id -u)" -eq 0 ] || SUDO=sudo
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
