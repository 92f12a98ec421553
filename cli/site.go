package cli

import (
	"context"
	"fmt"
	"io"
	"strings"
	"time"

	meshfedv1 "github.com/meshfed/meshfed/api/meshfed/v1"
	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/federation"
	"github.com/meshfed/meshfed/hubclient"
	"github.com/meshfed/meshfed/trust/credential"
	"github.com/spf13/cobra"
	"google.golang.org/protobuf/types/known/durationpb"
)

// admin dials the hub with the CLI's credential and bounds the call's
// time; done releases both.
func (g *globals) admin(cmd *cobra.Command) (ctx context.Context, c meshfedv1.AdminClient, done func(), err error) {
	conf, err := credential.Load(g.config)
	if err != nil {
		return nil, nil, nil, err
	}
	conn, err := hubclient.Dial(conf)
	if err != nil {
		return nil, nil, nil, err
	}
	ctx, cancel := hubclient.Call(cmd.Context())
	return ctx, meshfedv1.NewAdminClient(conn), func() { cancel(); conn.Close() }, nil
}

func newSiteCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "site", Short: "Register, list, inspect and remove sites"}
	cmd.AddCommand(newSiteAddCmd(g), newSiteListCmd(g, "", "List sites with their state, last sync, counts and source health"), newSiteShowCmd(g), newSiteRemoveCmd(g), newSiteTokenCmd(g))
	return cmd
}

func newSiteAddCmd(g *globals) *cobra.Command {
	var s catalog.Site
	cmd := &cobra.Command{
		Use:     "add NAME",
		Short:   "Register a site at the hub",
		Example: "  meshfed site add east --kind docker --region us-east --zone us-east-1a --gateway-address 203.0.113.7:15443",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			s.Name = args[0]
			if err := catalog.ValidateSite(s); err != nil {
				return err
			}
			ctx, c, done, err := g.admin(cmd)
			if err != nil {
				return err
			}
			defer done()
			st, err := c.AddSite(ctx, &meshfedv1.AddSiteRequest{Site: federation.SiteToWire(s)})
			if err != nil {
				return err
			}
			return g.printSites([]catalog.Site{federation.SiteStatusFromWire(st)})
		},
	}
	f := cmd.Flags()
	f.StringVar(&s.Kind, "kind", catalog.KindDocker, "site kind: kubernetes, docker or consul")
	f.StringVar(&s.Locality.Region, "region", "", "the site's region")
	f.StringVar(&s.Locality.Zone, "zone", "", "the site's default zone")
	f.StringVar(&s.Network, "network", "", "network name; sites on one network reach each other's endpoints directly")
	f.StringVar(&s.TrustDomain, "trust-domain", "", "the site's SPIFFE trust domain (default <site>.<federation>)")
	f.StringSliceVar(&s.GatewayAddresses, "gateway-address", nil, "east-west gateway host:port (repeatable)")
	return cmd
}

// newSiteListCmd lists the sites of kind ("": every kind).
func newSiteListCmd(g *globals, kind, short string) *cobra.Command {
	return &cobra.Command{
		Use:   "list",
		Short: short,
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
			sites := []catalog.Site{}
			for _, s := range resp.GetSites() {
				if kind == "" || s.GetSite().GetKind() == kind {
					sites = append(sites, federation.SiteStatusFromWire(s))
				}
			}
			return g.printSites(sites)
		},
	}
}

func (g *globals) printSites(sites []catalog.Site) error {
	return g.render(sites, func(w io.Writer) {
		row(w, "NAME", "KIND", "LOCALITY", "STATE", "GOSSIP", "LAST SYNC", "SERVICES", "ENDPOINTS", "SOURCE", "TRUST DOMAIN", "GATEWAYS")
		for _, s := range sites {
			row(w, s.Name, s.Kind, s.Locality, s.State, s.Gossip, age(s.LastSync), s.Services, s.Endpoints, s.Source, s.TrustDomain, strings.Join(s.GatewayAddresses, ","))
		}
	})
}

func newSiteShowCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "show NAME",
		Short: "Show one site",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, c, done, err := g.admin(cmd)
			if err != nil {
				return err
			}
			defer done()
			st, err := c.GetSite(ctx, &meshfedv1.GetSiteRequest{Name: args[0]})
			if err != nil {
				return err
			}
			s := federation.SiteStatusFromWire(st)
			return g.render(s, func(w io.Writer) {
				row(w, "Name:", s.Name)
				row(w, "Kind:", s.Kind)
				row(w, "Locality:", s.Locality)
				row(w, "Network:", s.Network)
				row(w, "Trust domain:", s.TrustDomain)
				row(w, "Gateways:", strings.Join(s.GatewayAddresses, ", "))
				row(w, "State:", s.State)
				row(w, "Gossip:", s.Gossip)
				row(w, "Connected since:", timeOrDash(s.ConnectedSince))
				row(w, "Last sync:", age(s.LastSync))
				row(w, "Services:", s.Services)
				row(w, "Endpoints:", s.Endpoints)
				row(w, "Source:", s.Source)
				row(w, "Created:", timeOrDash(s.Created))
			})
		},
	}
}

func timeOrDash(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.Local().Format(time.RFC3339)
}

func newSiteRemoveCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "remove NAME",
		Short: "Remove a site, its services and its tokens; its spoke is cut off",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, c, done, err := g.admin(cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := c.RemoveSite(ctx, &meshfedv1.RemoveSiteRequest{Name: args[0]})
			if err != nil {
				return err
			}
			out := map[string]any{"site": args[0], "removed": true, "servicesRemoved": resp.GetServicesRemoved()}
			return g.render(out, func(w io.Writer) {
				fmt.Fprintf(w, "site %s removed (%d services withdrawn from the federation)\n", args[0], resp.GetServicesRemoved())
			})
		},
	}
}

func newSiteTokenCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "token", Short: "Manage one-time join tokens"}
	var site string
	var ttl time.Duration
	create := &cobra.Command{
		Use:     "create",
		Short:   "Create a one-time join token for a site's spoke",
		Example: "  meshfed site token create --site east --ttl 1h",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, c, done, err := g.admin(cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := c.CreateToken(ctx, &meshfedv1.CreateTokenRequest{Site: site, Ttl: durationpb.New(ttl)})
			if err != nil {
				return err
			}
			out := map[string]any{"site": site, "token": resp.GetToken(), "expires": resp.GetExpires().AsTime()}
			return g.render(out, func(w io.Writer) { fmt.Fprintln(w, resp.GetToken()) })
		},
	}
	create.Flags().StringVar(&site, "site", "", "the site the token joins (required)")
	create.Flags().DurationVar(&ttl, "ttl", time.Hour, "how long the token is valid")
	_ = create.MarkFlagRequired("site")
	cmd.AddCommand(create)
	return cmd
}
