#!/usr/bin/env bash
# Installs meshfed's host agent on a Docker/VM host as a systemd service:
#
#   deploy/vm/install.sh --spoke dc1-spoke:7181 --token-file /root/token [--network apps] [--binary bin/meshfed-vmagent]
#   deploy/vm/install.sh --binary bin/meshfed-vmagent   # upgrade in place: the config and the node's SVID stay
#   deploy/vm/install.sh --uninstall               # stops the agent and removes everything this script made
#
# The token (or MESHFED_TOKEN) is needed on the first install only: it
# goes into /etc/meshfed/vmagent.yaml (0600), and the agent keeps the
# SVID it buys in /var/lib/meshfed-vmagent. Running it again with the same
# arguments changes nothing. --root DIR installs into DIR instead of /
# (for tests and images); systemctl is then left alone.
set -euo pipefail

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "install.sh: $*" >&2; exit 1; }

ROOT=/ SPOKE= TOKEN=${MESHFED_TOKEN:-} NETWORK= BINARY= UNINSTALL= EXTRA=()
while [ $# -gt 0 ]; do
  case $1 in
    --spoke) SPOKE=$2; shift 2 ;;
    --token-file) [ -r "$2" ] || die "--token-file $2: cannot read it"; TOKEN=$(tr -d '[:space:]' <"$2"); shift 2 ;;
    --network) NETWORK=$2; shift 2 ;;
    --binary) BINARY=$2; shift 2 ;;
    --root) ROOT=$2; shift 2 ;;
    --set) EXTRA+=("$2"); shift 2 ;; # --set key=value: any other vmagent flag
    --uninstall) UNINSTALL=1; shift ;;
    -h|--help) usage ;;
    *) echo "install.sh: unknown argument $1" >&2; usage 2 >&2 ;;
  esac
done

ROOT=${ROOT%/}
BIN_PATH=/usr/local/bin/meshfed-vmagent
CONFIG_DIR=/etc/meshfed
CONFIG=$CONFIG_DIR/vmagent.yaml
UNIT=/etc/systemd/system/meshfed-vmagent.service
STATE=/var/lib/meshfed-vmagent
systemd() { # systemd ARGS...: systemctl on a real root only
  [ -z "$ROOT" ] && command -v systemctl >/dev/null && systemctl "$@"
  return 0
}
[ -n "$ROOT" ] || [ "$(id -u)" -eq 0 ] || die "run it as root (it installs a system service)"

if [ -n "$UNINSTALL" ]; then
  systemd disable --now meshfed-vmagent.service 2>/dev/null || true
  rm -f "$ROOT$UNIT" "$ROOT$CONFIG" "$ROOT$BIN_PATH"
  rm -rf "$ROOT$STATE"
  rmdir "$ROOT$CONFIG_DIR" 2>/dev/null || true
  systemd daemon-reload
  echo "meshfed-vmagent removed: binary, config, unit and the node's SVID"
  exit 0
fi

# The binary (meshfed-vmagent, the agent alone): the one given, or the one
# this script sits next to (bin/meshfed-vmagent in a checkout), or the one
# on PATH.
if [ -z "$BINARY" ]; then
  here=$(cd "$(dirname "$0")" && pwd)
  for b in "$here/meshfed-vmagent" "$here/../../bin/meshfed-vmagent" "$(command -v meshfed-vmagent || true)"; do
    [ -n "$b" ] && [ -x "$b" ] && [ "$b" != "$ROOT$BIN_PATH" ] && { BINARY=$b; break; }
  done
fi
if [ -n "$BINARY" ]; then
  [ -x "$BINARY" ] || die "--binary $BINARY: not an executable"
elif [ ! -x "$ROOT$BIN_PATH" ]; then
  die "no meshfed-vmagent binary: give one with --binary (make build makes bin/meshfed-vmagent)"
fi

changed=
install -d -m 0755 "$ROOT/usr/local/bin" "$ROOT/etc/systemd/system"
install -d -m 0700 "$ROOT$CONFIG_DIR"
if [ -n "$BINARY" ] && ! cmp -s "$BINARY" "$ROOT$BIN_PATH"; then
  # Into place by rename, so a running agent is never half-written over.
  install -m 0755 "$BINARY" "$ROOT$BIN_PATH.new" && mv -f "$ROOT$BIN_PATH.new" "$ROOT$BIN_PATH"
  echo "installed $BIN_PATH"
  changed=1
fi

# The config: written when the spoke is given; kept as it is otherwise
# (an upgrade).
if [ -n "$SPOKE" ]; then
  [ -n "$TOKEN" ] || [ -d "$ROOT$STATE" ] || die "the first install needs a node token: --token-file FILE or MESHFED_TOKEN (meshfed vm token create --site ... --node $(hostname))"
  tmp=$(mktemp "$ROOT$CONFIG_DIR/.vmagent.yaml.XXXXXX")
  {
    echo "# meshfed-vmagent --config: the keys are its flags (meshfed-vmagent --help)."
    echo "spoke: $SPOKE"
    echo "data-dir: $STATE"
    [ -n "$NETWORK" ] && echo "network: $NETWORK"
    [ -n "$TOKEN" ] && echo "token: $TOKEN"
    for kv in ${EXTRA[@]+"${EXTRA[@]}"}; do echo "${kv%%=*}: ${kv#*=}"; done
  } >"$tmp"
  chmod 0600 "$tmp"
  if cmp -s "$tmp" "$ROOT$CONFIG"; then rm -f "$tmp"; else mv -f "$tmp" "$ROOT$CONFIG"; changed=1; echo "wrote $CONFIG (0600)"; fi
elif [ ! -f "$ROOT$CONFIG" ]; then
  die "no $CONFIG yet: give --spoke (and a node token) for the first install"
fi

tmp=$(mktemp "$ROOT/etc/systemd/system/.meshfed-vmagent.XXXXXX")
cat >"$tmp" <<UNIT
[Unit]
Description=meshfed host agent: this host's containers in the federation
Documentation=https://github.com/meshfed/meshfed#add-a-docker-host
After=network-online.target docker.service
Wants=network-online.target

[Service]
ExecStart=$BIN_PATH --config $CONFIG
Restart=on-failure
RestartSec=5s
# The node's SVID lives here (0700); nothing else on disk is written.
StateDirectory=meshfed-vmagent
StateDirectoryMode=0700
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
# The one path beyond its state: the Docker Engine's socket.
ReadWritePaths=/run/docker.sock
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictSUIDSGID=yes
RestrictRealtime=yes
RestrictNamespaces=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
# The host proxy's local route (netlink) and its DNS on port 53.
CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_BIND_SERVICE
AmbientCapabilities=CAP_NET_ADMIN CAP_NET_BIND_SERVICE
UMask=0077

[Install]
WantedBy=multi-user.target
UNIT
chmod 0644 "$tmp"
if cmp -s "$tmp" "$ROOT$UNIT"; then rm -f "$tmp"; else mv -f "$tmp" "$ROOT$UNIT"; changed=1; echo "wrote $UNIT"; fi

if [ -n "$ROOT" ]; then
  echo "installed into $ROOT; systemctl left alone"
  exit 0
fi
systemd daemon-reload
systemd enable meshfed-vmagent.service >/dev/null 2>&1
if [ -n "$changed" ]; then
  systemd restart meshfed-vmagent.service
  echo "meshfed-vmagent (re)started: journalctl -u meshfed-vmagent; meshfed vm list at the hub"
else
  systemd start meshfed-vmagent.service
  echo "meshfed-vmagent is installed and up to date"
fi
