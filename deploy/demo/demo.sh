#!/usr/bin/env bash
# make demo: a hub and two sites on loopback, each with example services.
# Prints the federated catalog as the hub and as each site sees it, then
# keeps running until Ctrl-C, when it stops everything and cleans up.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-bin/meshfed}
DEMO=$(mktemp -d /tmp/meshfed-demo.XXXXXX)
PIDS=()
cleanup() {
  trap - EXIT INT TERM
  echo; echo "stopping the demo…"
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$DEMO"
}
trap cleanup EXIT INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
wait_http() { # wait_http URL what
  for _ in $(seq 1 100); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "$2 did not come up; its log:"; cat "$DEMO/$3.log"; exit 1
}

export MESHFED_CONFIG="$DEMO/hub/admin.conf"
HUB=127.0.0.1:17443

step "starting the hub (state in $DEMO/hub)"
"$BIN" hub --data-dir "$DEMO/hub" --listen "$HUB" --http-listen 127.0.0.1:17080 --bundle-listen 127.0.0.1:17444 --federation demo.meshfed >"$DEMO/hub.log" 2>&1 &
PIDS+=($!)
wait_http http://127.0.0.1:17080/readyz hub hub

step "registering two sites"
"$BIN" site add east --kind docker --region us-east --zone us-east-1a --gateway-address 127.0.0.1:15443 >/dev/null
"$BIN" site add west --kind docker --region us-west --zone us-west-2a --gateway-address 127.0.0.1:25443 >/dev/null
"$BIN" site list

port=17180
idport=17190
for site in east west; do
  step "joining site $site with a one-time token"
  token=$("$BIN" site token create --site "$site" --ttl 10m)
  echo "token: ${token:0:12}… (single-use, pins the hub's CA)"
  "$BIN" spoke --site "$site" --hub "$HUB" --token "$token" --data-dir "$DEMO/$site" \
    --services "deploy/demo/$site.yaml" --services-poll 200ms --http-listen "127.0.0.1:$port" --identity-listen "127.0.0.1:$idport" --xds-listen "127.0.0.1:$((idport + 10))" >"$DEMO/$site.log" 2>&1 &
  PIDS+=($!)
  wait_http "http://127.0.0.1:$port/readyz" "spoke $site" "$site"
  port=$((port + 1)); idport=$((idport + 1))
done

# Both spokes are up; wait until each sees the other's services.
for _ in $(seq 1 100); do
  n=$("$BIN" service list -o json | grep -c '"name"' || true)
  [ "$n" -ge 3 ] && break; sleep 0.1
done

step "sites as the hub sees them"
"$BIN" site list
step "the federated catalog at the hub"
"$BIN" service list
step "default/echo: endpoints per site and locality"
"$BIN" service show default/echo
step "trust domains: the federation CA and each site's own CA (keys stay at the sites)"
"$BIN" trust list
step "the catalog as site east sees it (its spoke's view)"
"$BIN" service list --spoke 127.0.0.1:17180
step "the catalog as site west sees it"
"$BIN" service list --spoke 127.0.0.1:17181

cat <<TXT

The federation is running. Try, in another shell:
  export MESHFED_CONFIG=$MESHFED_CONFIG
  $BIN site list                      # state, last sync, counts
  $BIN service show shop/payments -o yaml
  edit deploy/demo/east.yaml and watch: $BIN service list --spoke 127.0.0.1:17181
  curl -s 127.0.0.1:17080/metrics | grep meshfed_hub_
  $BIN trust bundle show --trust-domain east.demo.meshfed -o json   # SPIFFE bundle format
  curl -sk https://127.0.0.1:17444/west.demo.meshfed               # the hub's SPIFFE bundle endpoint
Logs are in $DEMO/*.log. Press Ctrl-C to stop.
TXT
wait
