package cli

import (
	"fmt"
	"io"
	"os"
	"strings"

	meshfedv1 "github.com/meshfed/meshfed/api/meshfed/v1"
	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/federation"
	"github.com/meshfed/meshfed/spoke/xds"
	"github.com/spf13/cobra"
)

func newPolicyCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "policy", Short: "Traffic policies: failover order, weighted splits, timeouts, outlier detection, allowed callers"}
	var file string
	apply := &cobra.Command{
		Use:   "apply -f FILE",
		Short: "Create or replace the traffic policies in a YAML file (--- between several)",
		Example: `  cat > echo-policy.yaml <<EOF
  service: default/echo
  failover: [east, west]
  split:
  - {name: stable, weight: 90, labels: {version: v1}}
  - {name: canary, weight: 10, labels: {version: v2}}
  allow: [spiffe://west.example/ns/default/sa/client]
  EOF
  meshfed policy apply -f echo-policy.yaml`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			data, err := os.ReadFile(file)
			if err != nil {
				return err
			}
			policies, err := catalog.ParsePolicies(data)
			if err != nil {
				return fmt.Errorf("%s: %w", file, err)
			}
			ctx, c, done, err := g.admin(cmd)
			if err != nil {
				return err
			}
			defer done()
			for _, p := range policies {
				if _, err := c.ApplyPolicy(ctx, &meshfedv1.ApplyPolicyRequest{Policy: federation.PolicyToWire(p)}); err != nil {
					return err
				}
				fmt.Fprintf(g.out, "policy %s applied\n", p.Service)
			}
			return nil
		},
	}
	apply.Flags().StringVarP(&file, "filename", "f", "", "the policy file (required)")
	_ = apply.MarkFlagRequired("filename")
	get := &cobra.Command{
		Use:   "get [NAMESPACE/NAME]",
		Short: "Show one service's traffic policy, or list them all",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req := &meshfedv1.ListPoliciesRequest{}
			if len(args) == 1 {
				ns, name, err := catalog.ParseServiceID(args[0])
				if err != nil {
					return err
				}
				req.Namespace, req.Name = ns, name
			}
			ctx, c, done, err := g.admin(cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := c.ListPolicies(ctx, req)
			if err != nil {
				return err
			}
			out := []catalog.Policy{}
			for _, p := range resp.GetPolicies() {
				out = append(out, federation.PolicyFromWire(p))
			}
			if len(args) == 1 && g.output != "table" && g.output != "" {
				return g.render(out[0], nil)
			}
			return g.render(out, func(w io.Writer) {
				row(w, "SERVICE", "FAILOVER", "SPLIT", "RETRIES", "OUTLIER", "ALLOW")
				for _, p := range out {
					var split []string
					for _, s := range p.Split {
						split = append(split, fmt.Sprintf("%s=%d", s.Name, s.Weight))
					}
					outlier := ""
					if o := p.OutlierDetection; o != nil {
						outlier = fmt.Sprintf("%d failures", xds.OutlierDetection(o).ConsecutiveFailures)
					}
					row(w, p.Service, strings.Join(p.Failover, ","), strings.Join(split, ","), retries(p.Retries), outlier, len(p.Allow))
				}
			})
		},
	}
	del := &cobra.Command{
		Use:   "delete NAMESPACE/NAME",
		Short: "Delete a service's traffic policy (its proxies go back to the defaults)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ns, name, err := catalog.ParseServiceID(args[0])
			if err != nil {
				return err
			}
			ctx, c, done, err := g.admin(cmd)
			if err != nil {
				return err
			}
			defer done()
			if _, err := c.DeletePolicy(ctx, &meshfedv1.DeletePolicyRequest{Namespace: ns, Name: name}); err != nil {
				return err
			}
			fmt.Fprintf(g.out, "policy %s deleted\n", args[0])
			return nil
		},
	}
	cmd.AddCommand(apply, get, del)
	return cmd
}

func retries(r *uint32) string {
	if r == nil {
		return "default"
	}
	return fmt.Sprint(*r)
}
