package cli

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"time"

	meshfedv1 "github.com/meshfed/meshfed/api/meshfed/v1"
	"github.com/meshfed/meshfed/federation"
	"github.com/meshfed/meshfed/trust/ca"
	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
)

func newTrustCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "trust", Short: "Trust domains and their bundles: list, show, import outside ones"}
	cmd.AddCommand(newTrustListCmd(g), newTrustBundleCmd(g), newTrustFederateCmd(g), newTrustRotateCmd(g))
	return cmd
}

// bundleRow is one trust domain in `trust list`.
type bundleRow struct {
	TrustDomain string    `json:"trustDomain" yaml:"trustDomain"`
	Site        string    `json:"site,omitempty" yaml:"site,omitempty"`
	Source      string    `json:"source" yaml:"source"`
	Sequence    uint64    `json:"sequence" yaml:"sequence"`
	Authorities int       `json:"authorities" yaml:"authorities"`
	Expires     time.Time `json:"expires" yaml:"expires"`
}

func (g *globals) bundles(cmd *cobra.Command) (*meshfedv1.ListBundlesResponse, error) {
	ctx, c, done, err := g.admin(cmd)
	if err != nil {
		return nil, err
	}
	defer done()
	return c.ListBundles(ctx, &meshfedv1.ListBundlesRequest{})
}

func newTrustListCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "list",
		Short: "List the federation's trust domains with their bundles",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			resp, err := g.bundles(cmd)
			if err != nil {
				return err
			}
			rows := []bundleRow{}
			for _, w := range append([]*meshfedv1.Bundle{resp.GetFederationBundle()}, resp.GetBundles()...) {
				b, err := federation.BundleFromWire(w)
				if err != nil {
					return err
				}
				r := bundleRow{TrustDomain: w.GetTrustDomain(), Site: w.GetSite(), Sequence: w.GetSequence(), Authorities: len(w.GetX509Authorities())}
				switch {
				case w.GetSite() != "":
					r.Source = "site"
				case w.GetEndpoint() != "":
					r.Source = "imported from " + w.GetEndpoint()
				default:
					r.Source = "federation CA"
				}
				for _, c := range b.X509Authorities() {
					if r.Expires.IsZero() || c.NotAfter.Before(r.Expires) {
						r.Expires = c.NotAfter
					}
				}
				rows = append(rows, r)
			}
			return g.render(rows, func(w io.Writer) {
				row(w, "TRUST DOMAIN", "SITE", "SOURCE", "SEQUENCE", "AUTHORITIES", "EXPIRES")
				for _, r := range rows {
					row(w, r.TrustDomain, r.Site, r.Source, r.Sequence, r.Authorities, r.Expires.Format(time.DateOnly))
				}
			})
		},
	}
}

func newTrustBundleCmd(g *globals) *cobra.Command {
	var td string
	show := &cobra.Command{
		Use:   "show",
		Short: "Print trust bundles: -o pem (CA certificates) or -o json (SPIFFE bundle format)",
		Example: `  meshfed trust bundle show --trust-domain east.meshfed -o pem > east.pem
  meshfed trust bundle show --trust-domain east.meshfed -o json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			resp, err := g.bundles(cmd)
			if err != nil {
				return err
			}
			var picked []*spiffebundle.Bundle
			for _, w := range append([]*meshfedv1.Bundle{resp.GetFederationBundle()}, resp.GetBundles()...) {
				if td != "" && w.GetTrustDomain() != td {
					continue
				}
				b, err := federation.BundleFromWire(w)
				if err != nil {
					return err
				}
				picked = append(picked, b)
			}
			if len(picked) == 0 {
				return fmt.Errorf("trust domain %s is not federated: `meshfed trust list` shows those that are", td)
			}
			switch g.output {
			case "pem", "table", "":
				for _, b := range picked {
					if _, err := g.out.Write(ca.EncodeCertPEM(b.X509Authorities()...)); err != nil {
						return err
					}
				}
				return nil
			case "json":
				docs := map[string]json.RawMessage{}
				for _, b := range picked {
					doc, err := b.Marshal()
					if err != nil {
						return err
					}
					docs[b.TrustDomain().Name()] = doc
				}
				if td != "" {
					_, err := fmt.Fprintln(g.out, string(docs[td]))
					return err
				}
				enc := json.NewEncoder(g.out)
				enc.SetIndent("", "  ")
				return enc.Encode(docs)
			}
			return fmt.Errorf("-o %s: bundles print as pem or json", g.output)
		},
	}
	show.Flags().StringVar(&td, "trust-domain", "", "the trust domain (default: all)")
	cmd := &cobra.Command{Use: "bundle", Short: "Trust bundles"}
	cmd.AddCommand(show)
	return cmd
}

func newTrustRotateCmd(g *globals) *cobra.Command {
	var site string
	cmd := &cobra.Command{
		Use:   "rotate",
		Short: "Rotate a site's CA without breaking live connections",
		Long: `The site's spoke creates a new CA and publishes it next to the old one;
after --ca-activation-delay it signs new SVIDs, and the old CA leaves the
bundle once the last SVID it signed has expired. Watch it with
` + "`meshfed trust list`" + ` (sequence and authorities).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, c, done, err := g.admin(cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := c.RotateCA(ctx, &meshfedv1.RotateCARequest{Site: site})
			if err != nil {
				return err
			}
			out := map[string]any{"site": site, "generation": resp.GetGeneration()}
			return g.render(out, func(w io.Writer) {
				fmt.Fprintf(w, "CA rotation %d of site %s requested; its spoke carries it out\n", resp.GetGeneration(), site)
			})
		},
	}
	cmd.Flags().StringVar(&site, "site", "", "the site (required)")
	_ = cmd.MarkFlagRequired("site")
	return cmd
}

func newTrustFederateCmd(g *globals) *cobra.Command {
	var req meshfedv1.FederateRequest
	var bootstrap string
	cmd := &cobra.Command{
		Use:   "federate",
		Short: "Import an outside trust domain from its SPIFFE bundle endpoint (https_spiffe), refreshed on its hint",
		Example: `  meshfed trust federate --trust-domain example.org \
    --bundle-endpoint https://spire.example.org:8443 \
    --endpoint-spiffe-id spiffe://example.org/spire/server --bootstrap-bundle example.org.pem`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if bootstrap != "" {
				b, err := os.ReadFile(bootstrap)
				if err != nil {
					return fmt.Errorf("--bootstrap-bundle: %w", err)
				}
				req.BootstrapPem = b
			}
			ctx, c, done, err := g.admin(cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := c.Federate(ctx, &req)
			if err != nil {
				return err
			}
			out := map[string]any{"trustDomain": resp.GetBundle().GetTrustDomain(), "sequence": resp.GetBundle().GetSequence(), "authorities": len(resp.GetBundle().GetX509Authorities())}
			return g.render(out, func(w io.Writer) {
				fmt.Fprintf(w, "federating with %s (bundle sequence %d, %d authorities)\n", out["trustDomain"], out["sequence"], out["authorities"])
			})
		},
	}
	f := cmd.Flags()
	f.StringVar(&req.TrustDomain, "trust-domain", "", "the outside trust domain (required)")
	f.StringVar(&req.BundleEndpointUrl, "bundle-endpoint", "", "its bundle endpoint URL, https://… (required)")
	f.StringVar(&req.EndpointSpiffeId, "endpoint-spiffe-id", "", "the SPIFFE ID the endpoint serves with (required)")
	f.StringVar(&bootstrap, "bootstrap-bundle", "", "PEM file with the CA certificates that authenticate the endpoint on the first fetch")
	for _, n := range []string{"trust-domain", "bundle-endpoint", "endpoint-spiffe-id"} {
		_ = cmd.MarkFlagRequired(n)
	}
	return cmd
}
