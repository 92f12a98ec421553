package cli

import (
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/spoke/consul"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// consulFlags are the spoke's flags for a Consul datacenter as its source.
type consulFlags struct {
	addr, tokenFile, datacenter, exportTag, direction, registerPrefix string
	exportAll                                                         bool
	emptyGrace                                                        time.Duration
	client                                                            *api.Client
}

func (c *consulFlags) register(f *pflag.FlagSet) {
	f.StringVar(&c.addr, "consul-addr", "", "sync the site's catalog from this Consul agent's HTTP API, e.g. http://127.0.0.1:8500 (instead of --services)")
	f.StringVar(&c.tokenFile, "consul-token-file", "", "file holding the Consul ACL token (read for the catalog and health; default: none, or CONSUL_HTTP_TOKEN)")
	f.StringVar(&c.datacenter, "consul-datacenter", "", "Consul datacenter to read (default: the agent's)")
	f.StringVar(&c.exportTag, "consul-export-tag", "meshfed-export", "export the Consul services with this tag")
	f.BoolVar(&c.exportAll, "consul-export-all", false, "export every Consul service, tagged or not")
	f.DurationVar(&c.emptyGrace, "consul-empty-grace", time.Minute, "hold the site's services this long when Consul suddenly answers with none at all (a reset Consul), before withdrawing them")
	f.StringVar(&c.direction, "consul-direction", "", "from-consul, to-consul or both (default: both with --consul-register-prefix, else from-consul)")
	f.StringVar(&c.registerPrefix, "consul-register-prefix", "", "register the other sites' services in Consul at their listeners in this range: the --outbound-prefix of the site's proxy that Consul clients connect through")
}

// directions reads --consul-direction: whether to read Consul, whether
// to write it.
func (c *consulFlags) directions() (from, to bool, err error) {
	d := c.direction
	if d == "" {
		d = "from-consul"
		if c.registerPrefix != "" {
			d = "both"
		}
	}
	switch d {
	case "from-consul":
		from = true
	case "to-consul":
		to = true
	case "both":
		from, to = true, true
	default:
		return false, false, fmt.Errorf("--consul-direction %q: want from-consul, to-consul or both", c.direction)
	}
	if to && c.registerPrefix == "" {
		return false, false, fmt.Errorf("--consul-direction %s writes to Consul: give --consul-register-prefix, the outbound prefix of the site's proxy that Consul clients connect through", d)
	}
	return from, to, nil
}

// registrar is the to-Consul side the flags describe.
func (c *consulFlags) registrar(log *slog.Logger, reg prometheus.Registerer, snapshot func() catalog.SiteView) (*consul.Registrar, error) {
	prefix, err := netip.ParsePrefix(c.registerPrefix)
	if err != nil {
		return nil, fmt.Errorf("--consul-register-prefix %q: want a CIDR such as 127.130.0.0/16", c.registerPrefix)
	}
	return consul.NewRegistrar(consul.RegistrarOptions{Client: c.client, Datacenter: c.datacenter, Prefix: prefix, Snapshot: snapshot,
		Logger: log.With("component", "consul-register"), Registry: reg})
}

// source is the Consul source the flags describe.
func (c *consulFlags) source(log *slog.Logger, reg prometheus.Registerer, onError func(error)) (*consul.Source, error) {
	return consul.New(consul.Options{Client: c.client, Datacenter: c.datacenter, ExportTag: c.exportTag, ExportAll: c.exportAll, EmptyGrace: c.emptyGrace,
		Logger: log.With("component", "consul"), OnError: onError, Registry: reg})
}

// dial makes the Consul API client.
func (c *consulFlags) dial() error {
	cfg := api.DefaultConfig()
	cfg.Address = c.addr
	if c.tokenFile != "" {
		tok, err := os.ReadFile(c.tokenFile)
		if err != nil {
			return fmt.Errorf("--consul-token-file: %w", err)
		}
		cfg.Token = strings.TrimSpace(string(tok))
	}
	var err error
	if c.client, err = api.NewClient(cfg); err != nil {
		return fmt.Errorf("--consul-addr %s: %w", c.addr, err)
	}
	return nil
}

// newConsulCmd is `meshfed consul sync`: a Consul site's spoke, named for
// what it does, with the Consul flags short (--direction, --datacenter).
func newConsulCmd(g *globals) *cobra.Command {
	sync := newSpokeCmd(g)
	sync.Use = "sync --site SITE --consul-addr URL"
	sync.Short = "Sync a Consul datacenter with the federation, both ways: the spoke of a site of kind consul"
	sync.Long = `Runs the site's spoke with the Consul datacenter as its catalog: Consul
services tagged meshfed-export join the federation, and (with
--register-prefix, the outbound prefix of the site's proxy that Consul
clients connect through) the other sites' services are registered in
Consul, tagged meshfed. It is 'meshfed spoke --consul-addr …'; every spoke
flag applies. See "Sync a Consul catalog" in the README.`
	sync.Example = `  meshfed consul sync --site dc1 --hub hub.example:7443 --token-file join.token --data-dir /var/lib/meshfed-dc1 \
    --consul-addr http://127.0.0.1:8500 --register-prefix 10.200.0.0/16 --direction both`
	short := map[string]string{"direction": "consul-direction", "datacenter": "consul-datacenter", "register-prefix": "consul-register-prefix",
		"export-tag": "consul-export-tag", "export-all": "consul-export-all"}
	sync.Flags().SetNormalizeFunc(func(_ *pflag.FlagSet, name string) pflag.NormalizedName {
		if long, ok := short[name]; ok {
			return pflag.NormalizedName(long)
		}
		return pflag.NormalizedName(name)
	})
	_ = sync.MarkFlagRequired("consul-addr")
	cmd := &cobra.Command{Use: "consul", Short: "Consul datacenters in the federation"}
	cmd.AddCommand(sync)
	return cmd
}
