package cli

import (
	"fmt"
	"io"
	"time"

	meshfedv1 "github.com/meshfed/meshfed/api/meshfed/v1"
	"github.com/meshfed/meshfed/gossip"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"google.golang.org/protobuf/types/known/durationpb"
)

// gossipFlags registers a component's WAN gossip flags: where it listens,
// where members reach it, and how often it probes.
func gossipFlags(f *pflag.FlagSet, listen, advertise *string, probe *time.Duration, listenUsage, advertiseUsage string) {
	f.StringVar(listen, "gossip-listen", "", listenUsage)
	f.StringVar(advertise, "gossip-advertise", "", advertiseUsage)
	*probe = gossip.DefaultProbeInterval
	f.Var((*probeInterval)(probe), "gossip-probe-interval",
		"how often a member probes another: a dead one is found in about 5-8 of these; at least twice the largest round trip between sites")
}

// probeInterval is a duration flag that refuses intervals too short to
// probe with.
type probeInterval time.Duration

func (p *probeInterval) String() string { return time.Duration(*p).String() }
func (p *probeInterval) Type() string   { return "duration" }
func (p *probeInterval) Set(s string) error {
	d, err := time.ParseDuration(s)
	if err != nil {
		return err
	}
	if d < gossip.MinProbeInterval {
		return fmt.Errorf("%s is too short: at least %s", d, gossip.MinProbeInterval)
	}
	*p = probeInterval(d)
	return nil
}

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
