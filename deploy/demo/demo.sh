#!/usr/bin/env bash
# make demo: a hub and three sites on loopback. east and west run example
# services, default/echo behind a proxy and a gateway each; central runs a
# client proxy. Prints the federated catalog, sends calls from central
# through east's gateway, kills that gateway and shows the calls move to
# west, a proxyless gRPC client doing the same (mTLS, no proxy), and
# west's gateway refusing names that are not its own services, and (with a
# Docker engine) a vmagent in east exporting two labelled containers,
# which central calls through east's gateway and which call default/echo
# by its DNS name; (with the pinned Consul agent) a Consul site whose
# service central calls and whose Consul lists the other sites' services;
# then keeps running until Ctrl-C, when it stops everything and
# cleans up.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-bin/meshfed}
GRPC_APP=${GRPC_APP:-bin/proxyless-grpc}
DEMO=$(mktemp -d /tmp/meshfed-demo.XXXXXX)
PIDS=()
cleanup() {
  # A second Ctrl-C or TERM while cleaning up would leave $DEMO behind:
  # cleanup is short (each process stops within its drain timeout), so it
  # ignores them.
  trap '' INT TERM
  trap - EXIT
  echo; echo "stopping the demo…"
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "${DOCKER_NET:-}" ]; then
    docker rm -f "$DOCKER_NET-hello-1" "$DOCKER_NET-hello-2" >/dev/null 2>&1 || true
    docker network rm "$DOCKER_NET" >/dev/null 2>&1 || true
    docker rmi -f "$DOCKER_NET:latest" >/dev/null 2>&1 || true
  fi
  rm -rf "$DEMO"
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
wait_http() { # wait_http URL what
  for _ in $(seq 1 100); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "$2 did not come up; its log:"; cat "$DEMO/$3.log"; exit 1
}

export MESHFED_CONFIG="$DEMO/hub/admin.conf"
HUB=127.0.0.1:17443
# The demo's ports are fixed: a second demo would talk to the first's hub.
if curl -s --max-time 1 http://127.0.0.1:17080/healthz >/dev/null 2>&1; then
  echo "something already serves 127.0.0.1:17080, the demo hub's port: another make demo? Stop it (Ctrl-C there) first." >&2
  exit 1
fi

step "starting the hub (state in $DEMO/hub)"
"$BIN" hub --data-dir "$DEMO/hub" --listen "$HUB" --http-listen 127.0.0.1:17080 --bundle-listen 127.0.0.1:17444 \
  --gossip-listen 127.0.0.1:17300 --federation demo.meshfed >"$DEMO/hub.log" 2>&1 &
PIDS+=($!)
wait_http http://127.0.0.1:17080/readyz hub hub

step "registering three sites"
"$BIN" site add east --kind docker --region us-east --zone us-east-1a --gateway-address 127.0.0.1:15443 >/dev/null
"$BIN" site add west --kind docker --region us-west --zone us-west-2a --gateway-address 127.0.0.1:25443 >/dev/null
"$BIN" site add central --kind docker --region us-central --zone us-central-1a --gateway-address 127.0.0.1:35443 >/dev/null
"$BIN" site list

port=17180
idport=17190
for site in east west central; do
  services=()
  [ -f "deploy/demo/$site.yaml" ] && services=(--services "deploy/demo/$site.yaml" --services-poll 200ms)
  step "joining site $site with a one-time token"
  token=$("$BIN" site token create --site "$site" --ttl 10m)
  echo "token: ${token:0:12}… (single-use, pins the hub's CA)"
  # The token goes in the environment, not on the command line, where
  # any local user's ps would show it.
  MESHFED_TOKEN=$token "$BIN" spoke --site "$site" --hub "$HUB" --data-dir "$DEMO/$site" \
    "${services[@]}" --http-listen "127.0.0.1:$port" --identity-listen "127.0.0.1:$idport" --xds-listen "127.0.0.1:$((idport + 10))" \
    --gossip-listen "127.0.0.1:$((port + 130))" >"$DEMO/$site.log" 2>&1 &
  PIDS+=($!)
  wait_http "http://127.0.0.1:$port/readyz" "spoke $site" "$site"
  port=$((port + 1)); idport=$((idport + 1))
done

# A Consul site, when the pinned Consul agent is at hand (test/consul.sh
# builds it once; `make tools` does): the agent in dev mode on loopback,
# and dc1's spoke syncing with it both ways.
CONSUL=$(test/consul.sh --cached 2>/dev/null || true)
if [ -n "$CONSUL" ]; then
  step "a Consul site: consul agent -dev, and dc1's spoke syncing with it both ways"
  "$CONSUL" agent -dev -datacenter dc1 -node consul-demo -bind 127.0.0.1 -client 127.0.0.1 -http-port 18500 -dns-port 18600 \
    -grpc-port 18502 -server-port 18300 -serf-lan-port 18301 -serf-wan-port 18302 -hcl 'ports { grpc_tls = -1 }' >"$DEMO/consul.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 1 100); do curl -sf http://127.0.0.1:18500/v1/status/leader | grep -q : && break; sleep 0.1; done
  "$BIN" site add dc1 --kind consul --region us-east --zone us-east-1b --gateway-address 127.0.0.1:45443 >/dev/null
  MESHFED_TOKEN=$("$BIN" site token create --site dc1 --ttl 10m) "$BIN" spoke --site dc1 --hub "$HUB" --data-dir "$DEMO/dc1" \
    --consul-addr http://127.0.0.1:18500 --consul-register-prefix 127.140.0.0/16 \
    --http-listen 127.0.0.1:17183 --identity-listen 127.0.0.1:17193 --xds-listen 127.0.0.1:17203 >"$DEMO/dc1.log" 2>&1 &
  PIDS+=($!)
  wait_http http://127.0.0.1:17183/readyz "spoke dc1" dc1
  # A service registered in Consul, at the inbound listener of the meshfed
  # proxy in front of it (started with the data plane below).
  curl -sf -X PUT http://127.0.0.1:18500/v1/agent/service/register -d '{"ID": "inventory-1", "Name": "inventory", "Address": "127.0.0.61",
    "Port": 18090, "Tags": ["meshfed-export"], "Meta": {"version": "v1"}}'
  echo "consul: registered inventory at 127.0.0.61:18090, tagged meshfed-export"
else
  step "no Consul agent built (make tools builds it): skipping the Consul site"
fi

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

# A Docker host in east: the agent finds two labelled containers, east's
# spoke adds them to the site's catalog next to its services file, and the
# agent's host proxy puts each behind mTLS with the workload's own SVID.
if docker info >/dev/null 2>&1; then
  step "a Docker host in east: meshfed vmagent discovers two labelled containers (FROM scratch)"
  DOCKER_NET=meshfed-demo-$$
  mkdir -p "$DEMO/image"
  CGO_ENABLED=0 go build -o "$DEMO/image/app" ./test/echoapp
  printf 'FROM scratch\nCOPY app /app\nENTRYPOINT ["/app"]\n' >"$DEMO/image/Dockerfile"
  docker build -q -t "$DOCKER_NET:latest" "$DEMO/image" >"$DEMO/docker-build.log" 2>&1 || { cat "$DEMO/docker-build.log"; exit 1; }
  docker network create "$DOCKER_NET" >/dev/null
  DNS=$(docker network inspect -f '{{(index .IPAM.Config 0).Gateway}}' "$DOCKER_NET")
  for v in 1 2; do
    docker run -d --name "$DOCKER_NET-hello-$v" --network "$DOCKER_NET" --dns "$DNS" -e NAME="hello-v$v" \
      -l meshfed.io/service=hello -l meshfed.io/port=8080 -l meshfed.io/version=v$v -l meshfed.io/health=/health \
      "$DOCKER_NET:latest" >/dev/null
  done
  echo "docker run --dns $DNS -l meshfed.io/service=hello -l meshfed.io/port=8080 -l meshfed.io/version=v1|v2 -l meshfed.io/health=/health …"
  # The host proxy's outbound range: a /16 of RFC 2544's test range, made
  # local to this host while the agent runs.
  MESHFED_TOKEN=$("$BIN" vm token create --site east --node east-docker) "$BIN" vmagent --spoke 127.0.0.1:17190 --xds 127.0.0.1:17200 \
    --data-dir "$DEMO/vmagent" --http-listen 127.0.0.1:17199 --network "$DOCKER_NET" --outbound-prefix 198.18.0.0/16 >"$DEMO/vmagent.log" 2>&1 &
  PIDS+=($!)
  wait_http http://127.0.0.1:17199/readyz vmagent vmagent
  for _ in $(seq 1 100); do
    [ "$("$BIN" service show default/hello -o json 2>/dev/null | grep -c '"healthy"')" -ge 2 ] && break; sleep 0.1
  done
  "$BIN" vm list
  "$BIN" service show default/hello
else
  step "no Docker engine reachable: skipping the Docker host (meshfed vmagent)"
fi

# The data plane: for each of east and west, the echo app, the proxy in
# front of it (its endpoint) and the site's gateway; a client proxy in central.
step "starting apps, proxies and gateways (each attests with a one-time node token)"
dataplane() { # dataplane NAME SITE COMMAND ARGS...
  local name=$1 site=$2; shift 2
  local token
  token=$("$BIN" vm token create --site "$site" --node "$name")
  MESHFED_TOKEN=$token "$BIN" "$@" >"$DEMO/$name.log" 2>&1 &
  PIDS+=($!)
}
i=0
for site in east west; do
  sid=$((17190 + i)); gw=$([ "$site" = east ] && echo 15443 || echo 25443)
  "$BIN" debug echo --listen "127.0.0.1:$((18081 + i))" --name "$site" >"$DEMO/$site-app.log" 2>&1 &
  PIDS+=($!)
  greeter=()
  if [ "$site" = east ]; then # east's greeter is behind the proxy; west's serves alone (below)
    "$GRPC_APP" serve --listen 127.0.0.1:19091 --name east >"$DEMO/east-greeter.log" 2>&1 &
    PIDS+=($!)
    greeter=(--inbound 19090=127.0.0.1:19091)
  fi
  dataplane "$site-host" "$site" proxy --identity "127.0.0.1:$sid" --xds "127.0.0.1:$((sid + 10))" --http-listen "127.0.0.1:$((17400 + i))" \
    --workload "spiffe://$site.demo.meshfed/ns/default/sa/echo" --address "127.0.0.$((11 + 10 * i))" \
    --inbound "18080=127.0.0.1:$((18081 + i))" "${greeter[@]}" --outbound-prefix -
  dataplane "$site-gw" "$site" gateway --site "$site" --listen "127.0.0.1:$gw" --identity "127.0.0.1:$sid" --xds "127.0.0.1:$((sid + 10))" \
    --http-listen "127.0.0.1:$((17410 + i))" --gossip-listen "127.0.0.1:$((17320 + i))"
  [ "$site" = east ] && EAST_GW=${PIDS[-1]}
  i=$((i + 1))
done
if [ -n "$CONSUL" ]; then
  # dc1: the app behind Consul's inventory, the proxy in front of it (its
  # node token names the Consul node, so it gets inventory's SVID), the
  # site's gateway, and the proxy Consul clients connect through.
  "$BIN" debug echo --listen 127.0.0.1:18092 --name dc1-inventory >"$DEMO/dc1-app.log" 2>&1 &
  PIDS+=($!)
  dataplane consul-demo dc1 proxy --identity 127.0.0.1:17193 --xds 127.0.0.1:17203 --http-listen 127.0.0.1:17403 \
    --workload spiffe://dc1.demo.meshfed/ns/default/sa/inventory --address 127.0.0.61 --inbound 18090=127.0.0.1:18092 --outbound-prefix -
  dataplane dc1-gw dc1 gateway --site dc1 --listen 127.0.0.1:45443 --identity 127.0.0.1:17193 --xds 127.0.0.1:17203 --http-listen 127.0.0.1:17413
  dataplane consul-clients dc1 proxy --identity 127.0.0.1:17193 --xds 127.0.0.1:17203 --http-listen 127.0.0.1:17423 --outbound-prefix 127.140.0.0/16
fi
# svid_files NAME SITE HTTP_PORT [meshfed svid flags]: a one-time node
# token for host NAME, then meshfed svid keeping its SVID and bundles in
# $DEMO/NAME, for proxyless gRPC.
svid_files() {
  local name=$1 site=$2 http=$3; shift 3
  local token sid
  sid=$(case $site in east) echo 17190 ;; west) echo 17191 ;; *) echo 17192 ;; esac)
  token=$("$BIN" vm token create --site "$site" --node "$name")
  MESHFED_TOKEN=$token "$BIN" svid --identity "127.0.0.1:$sid" --dir "$DEMO/$name" --http-listen "127.0.0.1:$http" "$@" >"$DEMO/$name-svid.log" 2>&1 &
  PIDS+=($!)
  wait_http "http://127.0.0.1:$http/readyz" "meshfed svid for $name" "$name-svid"
}
# West's greeter: a proxyless gRPC server with its own workload SVID.
svid_files west-greeter west 17431 --workload spiffe://west.demo.meshfed/ns/default/sa/greeter
"$BIN" proxy bootstrap --grpc --id spiffe://west.demo.meshfed/ns/default/sa/greeter --xds 127.0.0.1:17201 \
  --dir "$DEMO/west-greeter" >"$DEMO/west-greeter-bootstrap.json"
GRPC_XDS_BOOTSTRAP="$DEMO/west-greeter-bootstrap.json" "$GRPC_APP" serve --xds --listen 127.0.0.24:19090 --name west \
  >"$DEMO/west-greeter.log" 2>&1 &
PIDS+=($!)
# Only central's client may call default/echo; after zone and region, east
# comes before west.
cat >"$DEMO/echo-policy.yaml" <<YAML
service: default/echo
failover: [east, west]
outlierDetection: {consecutiveFailures: 3, interval: 1s, baseEjectionTime: 5s}
allow: [spiffe://central.demo.meshfed/meshfed/node/client-host, spiffe://east.demo.meshfed/ns/default/sa/hello, spiffe://dc1.demo.meshfed/meshfed/node/consul-clients]
YAML
cat >>"$DEMO/echo-policy.yaml" <<YAML
---
service: default/greeter
failover: [east, west]
allow: [spiffe://central.demo.meshfed/meshfed/node/grpc-client]
---
service: default/hello
allow: [spiffe://central.demo.meshfed/meshfed/node/client-host]
---
service: default/inventory
allow: [spiffe://central.demo.meshfed/meshfed/node/client-host]
YAML
"$BIN" policy apply -f "$DEMO/echo-policy.yaml"
dataplane client-host central proxy --identity 127.0.0.1:17192 --xds 127.0.0.1:17202 --http-listen 127.0.0.1:17420 --outbound-prefix 127.130.0.0/16
wait_http http://127.0.0.1:17420/readyz "central's proxy" client-host
# listener NAME: the address of central's proxy listener NAME.
listener() { curl -s 127.0.0.1:17420/v1/listeners | sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p"; }
# until_answers NAME WHO: listener NAME's address, once a call through it
# is answered by WHO.
until_answers() {
  local addr=""
  for _ in $(seq 1 100); do
    addr=$(listener "$1")
    [ -n "$addr" ] && "$BIN" debug call "$addr" --count 1 --timeout 1s 2>/dev/null | grep -q "$2" && break
    sleep 0.2
  done
  echo "$addr"
}
ECHO=$(until_answers echo.default:8080 east)
# The hub is in the gossip pool too: wait until it sees both gateways.
for _ in $(seq 1 100); do [ "$("$BIN" site list | grep -Ec ' alive ')" -ge 2 ] && break; sleep 0.1; done
step "calls from central to default/echo at $ECHO (the client proxy's listener): through east's gateway"
"$BIN" debug call "$ECHO" --count 20
if [ -n "${DOCKER_NET:-}" ]; then
  step "central calls east's Docker containers: client proxy → east's gateway → the host proxy (mTLS, policy) → the container"
  HELLO=$(listener hello.default:8080)
  for _ in $(seq 1 6); do curl -s --max-time 2 "http://$HELLO/"; done
  step "a container calls default/echo by its name: the host proxy's DNS and its listener, with the hello workload's SVID"
  echo "docker exec $DOCKER_NET-hello-1 /app greet echo.default.svc.clusterset.local:8080"
  docker exec "$DOCKER_NET-hello-1" /app greet echo.default.svc.clusterset.local:8080
fi
if [ -n "$CONSUL" ]; then
  step "Consul's inventory, called from central: client proxy -> dc1's gateway -> the proxy in front of it"
  INVENTORY=$(until_answers inventory.default:18090 inventory)
  "$BIN" debug call "$INVENTORY" --count 5
  step "the other sites' services in Consul, and a plain Consul client calling default/echo"
  curl -s 127.0.0.1:18500/v1/catalog/services | tr -d ' \n'; echo
  for _ in $(seq 1 100); do curl -s 127.0.0.1:18500/v1/catalog/service/echo | grep -q ServiceAddress && break; sleep 0.1; done
  ECHO_CONSUL=$(curl -s 127.0.0.1:18500/v1/catalog/service/echo | tr -d ' \n' | sed -n 's/.*"ServiceAddress":"\([^"]*\)".*"ServicePort":\([0-9]*\).*/\1:\2/p')
  echo "consul catalog service echo -> $ECHO_CONSUL (node meshfed-east, tagged meshfed; the dc1 proxy's listener)"
  "$BIN" debug call "$ECHO_CONSUL" --count 5
fi
step "proxyless gRPC in central: grpc-go resolves xds:///greeter.default:9090 at central's spoke, mTLS through east's gateway"
# meshfed svid keeps the client's SVID and the bundles as files; the
# bootstrap points gRPC's ADS connection and its certificate provider there.
svid_files grpc-client central 17430
"$BIN" proxy bootstrap --grpc --id spiffe://central.demo.meshfed/meshfed/node/grpc-client --xds 127.0.0.1:17202 \
  --dir "$DEMO/grpc-client" >"$DEMO/grpc-bootstrap.json"
grpc_calls() {
  GRPC_XDS_BOOTSTRAP="$DEMO/grpc-bootstrap.json" GRPC_EXPERIMENTAL_XDS_SNI=true GRPC_EXPERIMENTAL_XDS_MTLS_SPIFFE=true \
    "$GRPC_APP" call xds:///greeter.default:9090 --count 20
}
grpc_calls
step "the sites, by the hub (STATE) and by the gossip pool (GOSSIP)"
"$BIN" site list
step "killing east's gateway (SIGKILL): gossip marks east down everywhere within about a second"
{ kill -9 "$EAST_GW" && wait "$EAST_GW"; } 2>/dev/null || true
for _ in $(seq 1 50); do "$BIN" site list | grep -Eq '^east +docker +[^ ]+ +[a-z]+ +(dead|suspect)' && break; sleep 0.1; done
"$BIN" debug call "$ECHO" --count 20
"$BIN" site list
step "proxyless gRPC from central again: west answers, through west's gateway, from a proxyless gRPC server"
grpc_calls
step "west's gateway passes only west's exported services: no open relay"
# curl connects to the gateway on loopback with each server name; nothing
# else is dialed.
for sni in 8080.echo.default.east.demo.meshfed www.example.com; do
  if curl -sk --max-time 2 --connect-to "$sni:443:127.0.0.1:25443" "https://$sni/" >/dev/null 2>&1; then
    echo "SNI $sni: passed (unexpected)"
  else
    echo "SNI $sni: refused"
  fi
done
curl -s 127.0.0.1:17411/metrics | grep '^meshfed_gateway_connections_total'

cat <<TXT

The federation is running. Try, in another shell:
  export MESHFED_CONFIG=$MESHFED_CONFIG
  $BIN site list                      # state, gossip, last sync, counts
  $BIN debug call $ECHO --count 50      # calls from central's proxy
  $BIN policy get default/echo -o yaml
  curl -s 127.0.0.1:17420/metrics | grep meshfed_proxy_upstream   # per cluster and locality
  curl -s 127.0.0.1:17411/metrics | grep meshfed_gateway_          # west's gateway: passed, refused and why
  export GRPC_XDS_BOOTSTRAP=$DEMO/grpc-bootstrap.json GRPC_EXPERIMENTAL_XDS_SNI=true GRPC_EXPERIMENTAL_XDS_MTLS_SPIFFE=true
  $GRPC_APP call xds:///greeter.default:9090 --count 50      # proxyless gRPC from central
  $BIN service show shop/payments -o yaml
  edit deploy/demo/east.yaml and watch: $BIN service list --spoke 127.0.0.1:17181
  curl -s 127.0.0.1:17080/metrics | grep meshfed_hub_
  $BIN trust bundle show --trust-domain east.demo.meshfed -o json   # SPIFFE bundle format
  curl -sk https://127.0.0.1:17444/west.demo.meshfed               # the hub's SPIFFE bundle endpoint
Logs are in $DEMO/*.log. Press Ctrl-C to stop.
TXT
# Until Ctrl-C, or until whatever started the demo (make, say) is gone.
PARENT=$PPID
while kill -0 "$PARENT" 2>/dev/null; do sleep 1; done
