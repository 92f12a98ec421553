#!/usr/bin/env bash
# Builds the pinned kube-apiserver (test/tools/kube/go.mod) into a cache dir
# reused across runs, and prints its path. A cold build takes minutes.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
version=$(awk '$1=="k8s.io/kubernetes" && $2 ~ /^v/ {print $2}' "$root/test/tools/kube/go.mod")
cache=${MESHFED_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/meshfed}
bin="$cache/kube-apiserver-$version"
if [ ! -x "$bin" ]; then
  echo "test/kube.sh: building kube-apiserver $version into $cache (once; a cold build takes several minutes)" >&2
  mkdir -p "$cache"
  (cd "$root/test/tools/kube" && CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=mod go build -trimpath -o "$bin.tmp" k8s.io/kubernetes/cmd/kube-apiserver)
  mv "$bin.tmp" "$bin"
fi
echo "$bin"
