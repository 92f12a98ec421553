package cli

import (
	"fmt"
	"log/slog"
	"os"
	"strings"

	"github.com/hashicorp/consul/api"
	"github.com/meshfed/meshfed/spoke/consul"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/pflag"
)

// consulFlags are the spoke's flags for a Consul datacenter as its source.
type consulFlags struct {
	addr, tokenFile, datacenter, exportTag string
	exportAll                              bool
}

func (c *consulFlags) register(f *pflag.FlagSet) {
	f.StringVar(&c.addr, "consul-addr", "", "sync the site's catalog from this Consul agent's HTTP API, e.g. http://127.0.0.1:8500 (instead of --services)")
	f.StringVar(&c.tokenFile, "consul-token-file", "", "file holding the Consul ACL token (read for the catalog and health; default: none, or CONSUL_HTTP_TOKEN)")
	f.StringVar(&c.datacenter, "consul-datacenter", "", "Consul datacenter to read (default: the agent's)")
	f.StringVar(&c.exportTag, "consul-export-tag", "meshfed-export", "export the Consul services with this tag")
	f.BoolVar(&c.exportAll, "consul-export-all", false, "export every Consul service, tagged or not")
}

// source is the Consul source the flags describe.
func (c *consulFlags) source(log *slog.Logger, reg prometheus.Registerer, onError func(error)) (*consul.Source, error) {
	cfg := api.DefaultConfig()
	cfg.Address = c.addr
	if c.tokenFile != "" {
		tok, err := os.ReadFile(c.tokenFile)
		if err != nil {
			return nil, fmt.Errorf("--consul-token-file: %w", err)
		}
		cfg.Token = strings.TrimSpace(string(tok))
	}
	client, err := api.NewClient(cfg)
	if err != nil {
		return nil, fmt.Errorf("--consul-addr %s: %w", c.addr, err)
	}
	return consul.New(consul.Options{Client: client, Datacenter: c.datacenter, ExportTag: c.exportTag, ExportAll: c.exportAll,
		Logger: log.With("component", "consul"), OnError: onError, Registry: reg})
}
