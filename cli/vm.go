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
	cmd.AddCommand(token)
	return cmd
}
