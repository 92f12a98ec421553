package cli

import (
	"fmt"
	"io"
	"time"

	meshfedv1 "github.com/meshfed/meshfed/api/meshfed/v1"
	"github.com/spf13/cobra"
	"google.golang.org/protobuf/types/known/durationpb"
)

func newVMCmd(g *globals) *cobra.Command {
	var site, node string
	var ttl time.Duration
	create := &cobra.Command{
		Use:   "create",
		Short: "Create a one-time node token that attests a host to its site's spoke",
		Long: `A node token lets one host (a vmagent) get its SVID,
spiffe://<site trust domain>/meshfed/node/<node>, from its site's spoke. It
pins the site's CA, is single-use and expires.`,
		Example: "  meshfed vm token create --site dc1 --node host-7 --ttl 1h",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, c, done, err := g.admin(cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := c.CreateToken(ctx, &meshfedv1.CreateTokenRequest{Site: site, Node: node, Ttl: durationpb.New(ttl)})
			if err != nil {
				return err
			}
			out := map[string]any{"site": site, "node": node, "token": resp.GetToken(), "expires": resp.GetExpires().AsTime()}
			return g.render(out, func(w io.Writer) { fmt.Fprintln(w, resp.GetToken()) })
		},
	}
	create.Flags().StringVar(&site, "site", "", "the host's site (required)")
	create.Flags().StringVar(&node, "node", "", "the host's name, a DNS-1123 label (required)")
	create.Flags().DurationVar(&ttl, "ttl", time.Hour, "how long the token is valid")
	_ = create.MarkFlagRequired("site")
	_ = create.MarkFlagRequired("node")
	token := &cobra.Command{Use: "token", Short: "Manage one-time node tokens"}
	token.AddCommand(create)
	cmd := &cobra.Command{Use: "vm", Short: "Onboard plain Docker/VM hosts"}
	cmd.AddCommand(token, newVMListCmd(g), newVMRemoveCmd(g))
	return cmd
}

func newVMRemoveCmd(g *globals) *cobra.Command {
	var site string
	cmd := &cobra.Command{
		Use:   "remove NODE",
		Short: "Remove a host from its site: its endpoints leave, its credential is refused",
		Long: `The hub records the removal and the site's spoke acts on it within about a
second: the host's endpoints leave the federated catalog, and every SVID it
was issued until now is refused (renewal, workload SVIDs, host reports), so
its agent stops. A new node token for the same name brings a host back.`,
		Example: "  meshfed vm remove host-7\n  meshfed vm remove host-7 --site dc1   # when two sites have a host-7",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, c, done, err := g.admin(cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := c.RemoveNode(ctx, &meshfedv1.RemoveNodeRequest{Site: site, Node: args[0]})
			if err != nil {
				return err
			}
			out := map[string]any{"site": resp.GetSite(), "node": resp.GetNode(), "removedAt": resp.GetRevokedAt().AsTime()}
			return g.render(out, func(w io.Writer) {
				fmt.Fprintf(w, "host %s removed from site %s: its endpoints leave the catalog and its credential is refused from now on\n", resp.GetNode(), resp.GetSite())
			})
		},
	}
	cmd.Flags().StringVar(&site, "site", "", "the host's site (default: the one site that knows the host)")
	return cmd
}

// vmHost is one row of `meshfed vm list`.
type vmHost struct {
	Site         string    `json:"site" yaml:"site"`
	Node         string    `json:"node" yaml:"node"`
	AgentVersion string    `json:"agentVersion" yaml:"agentVersion"`
	LastSeen     time.Time `json:"lastSeen" yaml:"lastSeen"`
	Stale        bool      `json:"stale" yaml:"stale"`
	Containers   uint32    `json:"containers" yaml:"containers"`
	Endpoints    uint32    `json:"endpoints" yaml:"endpoints"`
	Healthy      uint32    `json:"healthyEndpoints" yaml:"healthyEndpoints"`
}

func newVMListCmd(g *globals) *cobra.Command {
	var site string
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List the host agents of every site (or --site), as their spokes last reported them",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, c, done, err := g.admin(cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := c.ListSites(ctx, &meshfedv1.ListSitesRequest{})
			if err != nil {
				return err
			}
			hosts := []vmHost{}
			for _, st := range resp.GetSites() {
				if site != "" && st.GetSite().GetName() != site {
					continue
				}
				for _, h := range st.GetSource().GetHosts() {
					hosts = append(hosts, vmHost{
						Site: st.GetSite().GetName(), Node: h.GetNode(), AgentVersion: h.GetAgentVersion(),
						LastSeen: h.GetLastSeen().AsTime(), Stale: h.GetStale(),
						Containers: h.GetContainers(), Endpoints: h.GetEndpoints(), Healthy: h.GetHealthyEndpoints(),
					})
				}
			}
			return g.render(hosts, func(w io.Writer) {
				row(w, "SITE", "NODE", "AGENT", "LAST SEEN", "STATE", "CONTAINERS", "ENDPOINTS")
				for _, h := range hosts {
					state := "reporting"
					if h.Stale {
						state = "stale"
					}
					row(w, h.Site, h.Node, h.AgentVersion, age(h.LastSeen), state, h.Containers, fmt.Sprintf("%d/%d healthy", h.Healthy, h.Endpoints))
				}
			})
		},
	}
	cmd.Flags().StringVar(&site, "site", "", "only this site's hosts")
	return cmd
}
