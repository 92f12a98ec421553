package cli

import (
	"log/slog"

	"github.com/meshfed/meshfed/cli/proxycmd"
	"github.com/meshfed/meshfed/cpuslice"
	"github.com/meshfed/meshfed/gateway"
	"github.com/meshfed/meshfed/identityclient"
	"github.com/spf13/cobra"
)

// newGatewayCmd returns the gateway command.
func newGatewayCmd(g *globals) *cobra.Command {
	logger := g.logger
	o := gateway.DefaultOptions()
	var ido identityclient.Options
	var concurrency func() (int, error)
	var slice func(*slog.Logger) error
	cmd := &cobra.Command{
		Use:   "gateway --site SITE",
		Short: "Run the site's east-west gateway: TLS passthrough by SNI to exported services, never an open relay",
		Long: `The gateway reads the server name (SNI) of each TLS connection from its
ClientHello without decrypting it, and passes the connection to a healthy
local endpoint of the exported service that name stands for
([<subset>.]<port>.<name>.<namespace>.<site>.<federation>). Any other name, a
malformed or oversized hello, or one that does not arrive within --hello-timeout is
refused and counted. It takes its routes from its spoke over xDS and, with
--gossip-listen, joins the WAN gossip pool so other sites stop sending
traffic here within about a second of its death. SIGTERM: it leaves the
pool, stops accepting, and lets live connections finish (--drain-timeout).`,
		Example: `  meshfed gateway --site east --listen :15443 --identity 10.0.0.2:7181 --xds 10.0.0.2:7182 \
    --token "$NODE_TOKEN" --gossip-listen :7947`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			// A gateway's heap is small and short-lived per connection:
			// collecting less often costs some memory, saves latency.
			proxycmd.SetGCPercent(400)
			loops, err := concurrency()
			if err != nil {
				return err
			}
			if err := slice(logger()); err != nil {
				return err
			}
			id, err := proxycmd.Attest(ctx, ido, logger())
			if err != nil {
				return err
			}
			o.Loops, o.Identity, o.Logger = loops, id, logger()
			g, err := gateway.New(o)
			if err != nil {
				return err
			}
			return g.Run(ctx)
		},
	}
	proxycmd.IdentityFlags(cmd, &ido, &o.HTTPListen, &o.DrainTimeout)
	concurrency = proxycmd.ConcurrencyFlag(cmd, 0, true) // a gateway has its host to itself
	slice = proxycmd.SliceFlag(cmd, cpuslice.Min)
	f := cmd.Flags()
	f.StringVar(&o.Site, "site", "", "the gateway's site (required)")
	f.StringVar(&o.Listen, "listen", o.Listen, "where other sites connect: what the site's --gateway-address leads to")
	f.StringVar(&o.XDS, "xds", "127.0.0.1:7182", "the spoke's xDS address")
	gossipFlags(f, &o.GossipListen, &o.GossipAdvertise, &o.GossipProbeInterval,
		"join the WAN gossip pool here (UDP and TCP), e.g. :7947",
		"where pool members reach this gateway (default --gossip-listen)")
	f.DurationVar(&o.HelloTimeout, "hello-timeout", o.HelloTimeout, "how long a caller may take to send its ClientHello")
	_ = cmd.MarkFlagRequired("site")
	return cmd
}
