// Package vmagentcmd is the host agent's command: `meshfed vmagent`, and
// the meshfed-vmagent binary, which links nothing else (no hub, spoke or
// Kubernetes code) and so keeps a host's memory for its containers.
package vmagentcmd

import (
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"

	"github.com/meshfed/meshfed/cli/proxycmd"
	"github.com/spf13/pflag"
	"gopkg.in/yaml.v3"

	"github.com/meshfed/meshfed/vmagent"
	"github.com/spf13/cobra"
)

// New returns the host agent's command; logger is the CLI's, version the
// binary's.
func New(logger func() *slog.Logger, version string) *cobra.Command {
	o := vmagent.DefaultOptions()
	inbound := fmt.Sprintf("%d-%d", o.InboundPorts[0], o.InboundPorts[1])
	outbound := o.OutboundPrefix.String()
	var config string
	cmd := &cobra.Command{
		Use:   "vmagent --spoke HOST:PORT --data-dir DIR",
		Short: "Run a Docker/VM host's agent: attest the host, discover its labelled containers, report them to the site's spoke",
		Long: `The agent redeems a one-time node token (meshfed vm token create) at its
site's spoke once and keeps the node SVID it gets in --data-dir (0600), so a
restart needs no new token. It lists the host's containers and follows the
Docker events stream: every running container labelled meshfed.io/service
becomes an endpoint of that service (meshfed.io/port, meshfed.io/namespace,
meshfed.io/version, meshfed.io/health, meshfed.io/network,
meshfed.io/label.<k>). It reports the host's whole state to the spoke on
every change and every few seconds, so nothing is duplicated or left behind.

The host proxy (on unless --host-proxy=false) carries the containers'
traffic with mTLS, each workload with its own SVID:
  inbound   each container is an endpoint at --proxy-address on a port of
            --inbound-ports; callers' SPIFFE IDs are checked against the
            service's policy before bytes reach the app;
  outbound  every federated service has an address in the workload's /24 of
            --outbound-prefix (made local to the host), on its own port;
  DNS       containers started with --dns <the network's gateway> resolve
            <name>.<namespace>.svc.clusterset.local to those addresses;
            other names are forwarded to the host's resolvers.`,
		Example: `  # first start, as root on the host
  MESHFED_TOKEN=mf1.… meshfed vmagent --spoke dc1-spoke:7181 --data-dir /var/lib/meshfed-vmagent
  # a container it picks up
  docker run -d -l meshfed.io/service=echo -l meshfed.io/port=8080 -l meshfed.io/version=v2 my/echo
  # a container that calls another site's service by name
  docker run -d --dns 172.17.0.1 -l meshfed.io/service=web -l meshfed.io/port=8080 my/web \
    --backend http://echo.default.svc.clusterset.local:8080`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := applyConfigFile(cmd, config); err != nil {
				return err
			}
			if o.Token == "" {
				o.Token = os.Getenv("MESHFED_TOKEN")
			}
			o.Logger, o.Version = logger(), version
			// The host proxy's engines hold little live heap each:
			// collecting at half again keeps the agent small (bench/vmagent).
			proxycmd.SetGCPercent(50)
			var err error
			if o.InboundPorts, err = parsePortRange(inbound); err != nil {
				return err
			}
			if o.OutboundPrefix, err = netip.ParsePrefix(outbound); err != nil {
				return fmt.Errorf("--outbound-prefix %q: want a CIDR such as 198.18.0.0/16", outbound)
			}
			a, err := vmagent.New(cmd.Context(), o)
			if err != nil {
				return err
			}
			return a.Run(cmd.Context())
		},
	}
	f := cmd.Flags()
	f.StringVar(&config, "config", "", "YAML file of flag values, by flag name (spoke: dc1-spoke:7181); flags given on the command line win (deploy/vm/install.sh writes /etc/meshfed/vmagent.yaml)")
	f.StringVar(&o.Spoke, "spoke", "", "the site spoke's identity endpoint host:port (required)")
	f.StringVar(&o.Token, "token", "", "one-time node `token`, first start only (or MESHFED_TOKEN, which ps does not show)")
	f.StringVar(&o.DataDir, "data-dir", "", "directory for the node's SVID (required)")
	f.StringVar(&o.DockerHost, "docker-host", "", "Docker Engine address (default DOCKER_HOST or the local socket; - for none)")
	f.StringVar(&o.Network, "network", "", "Docker network whose container address is the endpoint's, for containers on several networks")
	f.StringVar(&o.StaticServices, "static-services", "", "services file (the spoke's format) for processes that are not containers")
	f.DurationVar(&o.CheckInterval, "check-interval", o.CheckInterval, "how often containers without a HEALTHCHECK are checked")
	f.StringVar(&o.HTTPListen, "http-listen", o.HTTPListen, "serve /healthz, /readyz and /metrics here (- disables)")
	f.BoolVar(&o.HostProxy, "host-proxy", o.HostProxy, "carry the containers' traffic with mTLS (false: endpoints are the containers' own addresses, plain)")
	f.StringVar(&o.XDS, "xds", "", "the spoke's xDS address (default: the --spoke host, port 7182)")
	f.StringVar(&o.ProxyAddress, "proxy-address", "", "where the site's gateway reaches this host's inbound listeners (default: the host's address towards the spoke)")
	f.StringVar(&inbound, "inbound-ports", inbound, "range of the containers' endpoint ports on --proxy-address")
	f.StringVar(&outbound, "outbound-prefix", outbound, "range made local to the host for the outbound listeners, a /24 per workload")
	f.StringVar(&o.DNSListen, "dns-listen", "", "serve the service names to containers here (default: port 53 on the --network's gateway, or the default bridge's; - for none)")
	return cmd
}

// applyConfigFile sets every flag the file names and the command line
// does not: the file is the flags, as YAML. An unknown key is an error
// that lists the known ones.
func applyConfigFile(cmd *cobra.Command, path string) error {
	f := cmd.Flags()
	if path != "" {
		data, err := os.ReadFile(path)
		if err != nil {
			return fmt.Errorf("--config: %w", err)
		}
		var values map[string]any
		if err := yaml.Unmarshal(data, &values); err != nil {
			return fmt.Errorf("--config %s: %w", path, err)
		}
		for _, k := range slices.Sorted(maps.Keys(values)) {
			fl := f.Lookup(k)
			if fl == nil || k == "config" {
				var known []string
				f.VisitAll(func(fl *pflag.Flag) {
					if fl.Name != "config" && fl.Name != "help" {
						known = append(known, fl.Name)
					}
				})
				return fmt.Errorf("--config %s: unknown key %q (the keys are the flags: %s)", path, k, strings.Join(known, ", "))
			}
			if fl.Changed {
				continue
			}
			if err := f.Set(k, fmt.Sprint(values[k])); err != nil {
				return fmt.Errorf("--config %s: %s: %w", path, k, err)
			}
		}
	}
	for _, k := range []string{"spoke", "data-dir"} {
		if f.Lookup(k).Value.String() == "" {
			return fmt.Errorf("--%s is required (on the command line or in --config)", k)
		}
	}
	return nil
}

// parsePortRange reads LOW-HIGH.
func parsePortRange(s string) ([2]uint16, error) {
	lo, hi, ok := strings.Cut(s, "-")
	l, err1 := strconv.ParseUint(lo, 10, 16)
	h, err2 := strconv.ParseUint(hi, 10, 16)
	if !ok || err1 != nil || err2 != nil || l == 0 || h < l {
		return [2]uint16{}, fmt.Errorf("--inbound-ports %q: want LOW-HIGH, such as 16000-16999", s)
	}
	return [2]uint16{uint16(l), uint16(h)}, nil
}

// Main runs the meshfed-vmagent binary with args and returns the exit code.
func Main(args []string) int {
	return proxycmd.MainOf("meshfed-vmagent", func(logger func() *slog.Logger) *cobra.Command { return New(logger, "standalone") }, args)
}
