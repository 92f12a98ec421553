#!/usr/bin/env bash
# Builds the pinned Consul agent (test/tools/consul/go.mod: v1.14.11, the
# last release under the Mozilla Public License 2.0; later ones are not
# open source) into the tools cache dir reused across runs, and prints
# its path. A cold build takes minutes; with --cached it only prints the
# path of one built before (exit 1 if none), for make demo.
#
# GOSUMDB=off for this tools module alone: the checksum database lacks one
# of the pseudo-versions Consul 1.14's go.mod pins, so verification would
# fail on a module that the proxy serves unchanged; the committed go.sum
# still pins every hash.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
version=$(awk '$1=="require" && $2=="github.com/hashicorp/consul" {print $3}' "$root/test/tools/consul/go.mod")
cache=${MESHFED_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/meshfed}
bin="$cache/consul-$version"
if [ "${1:-}" = --cached ]; then
  [ -x "$bin" ] && echo "$bin"
  [ -x "$bin" ]
  exit
fi
if [ ! -x "$bin" ]; then
  echo "test/consul.sh: building consul $version into $cache (once; a cold build takes several minutes)" >&2
  mkdir -p "$cache"
  (cd "$root/test/tools/consul" && CGO_ENABLED=0 GOTOOLCHAIN=local GOSUMDB=off GOFLAGS=-mod=mod go build -trimpath -o "$bin.tmp" github.com/hashicorp/consul)
  mv "$bin.tmp" "$bin"
fi
echo "$bin"
