package cli

import (
	"fmt"
	"io"
	"time"

	meshfedv1 "github.com/meshfed/meshfed/api/meshfed/v1"
	"github.com/spf13/cobra"
	"google.golang.org/protobuf/types/known/durationpb"
)

func newGossipCmd(g *globals) *cobra.Command {
	var delay time.Duration
	rotate := &cobra.Command{
		Use:   "rotate-key",
		Short: "Add a new WAN gossip key: every member installs it now and encrypts with it after --delay",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, c, done, err := g.admin(cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := c.RotateGossipKey(ctx, &meshfedv1.RotateGossipKeyRequest{Delay: durationpb.New(delay)})
			if err != nil {
				return err
			}
			out := map[string]any{"keys": resp.GetKeys(), "useNewestAfter": resp.GetUseNewestAfter().AsTime()}
			return g.render(out, func(w io.Writer) {
				fmt.Fprintf(w, "new gossip key added (%d in the keyring); it encrypts from %s\n", resp.GetKeys(), resp.GetUseNewestAfter().AsTime().Format(time.RFC3339))
			})
		},
	}
	rotate.Flags().DurationVar(&delay, "delay", 30*time.Second, "how long members have to install the new key before it encrypts")
	cmd := &cobra.Command{Use: "gossip", Short: "The WAN gossip pool that spokes, gateways and the hub share"}
	cmd.AddCommand(rotate)
	return cmd
}
