package cli

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strings"
	"time"

	meshfedv1 "github.com/meshfed/meshfed/api/meshfed/v1"
	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/federation"
	"github.com/spf13/cobra"
)

func newServiceCmd(g *globals) *cobra.Command {
	var spokeAddr string
	cmd := &cobra.Command{Use: "service", Short: "List and inspect federated services"}
	cmd.PersistentFlags().StringVar(&spokeAddr, "spoke", "", "read the catalog as this spoke sees it (its --http-listen address) instead of from the hub")
	cmd.AddCommand(&cobra.Command{
		Use:   "list",
		Short: "List federated services with their sites and endpoint counts",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			services, err := g.services(cmd, spokeAddr, "", "")
			if err != nil {
				return err
			}
			return g.printServiceList(services)
		},
	}, &cobra.Command{
		Use:     "show NAMESPACE/NAME",
		Short:   "Show a service's endpoints per site and locality, with health",
		Example: "  meshfed service show default/echo",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ns, name, err := catalog.ParseServiceID(args[0])
			if err != nil {
				return err
			}
			services, err := g.services(cmd, spokeAddr, ns, name)
			if err != nil {
				return err
			}
			if len(services) == 0 {
				return fmt.Errorf("service %s is not in this catalog: `meshfed service list` shows what is", args[0])
			}
			return g.printServiceShow(services)
		},
	})
	return cmd
}

// services reads services from the hub, or from a spoke's view when
// spokeAddr is set; ns/name filter to one service.
func (g *globals) services(cmd *cobra.Command, spokeAddr, ns, name string) ([]catalog.Service, error) {
	if spokeAddr != "" {
		v, err := fetchView(spokeAddr)
		if err != nil {
			return nil, err
		}
		out := []catalog.Service{}
		for _, s := range v.Services {
			if ns == "" || (s.Namespace == ns && s.Name == name) {
				out = append(out, s)
			}
		}
		return out, nil
	}
	ctx, c, done, err := g.admin(cmd)
	if err != nil {
		return nil, err
	}
	defer done()
	out := []catalog.Service{}
	if ns == "" {
		resp, err := c.ListServices(ctx, &meshfedv1.ListServicesRequest{})
		if err != nil {
			return nil, err
		}
		for _, s := range resp.GetServices() {
			out = append(out, federation.ServiceFromWire(s, catalog.Locality{}))
		}
		return out, nil
	}
	resp, err := c.GetService(ctx, &meshfedv1.GetServiceRequest{Namespace: ns, Name: name})
	if err != nil {
		return nil, err
	}
	localities := map[string]catalog.Locality{}
	for _, s := range resp.GetSites() {
		localities[s.GetName()] = federation.SiteFromWire(s).Locality
	}
	for _, s := range resp.GetServices() {
		out = append(out, federation.ServiceFromWire(s, localities[s.GetSite()]))
	}
	return out, nil
}

func fetchView(addr string) (*catalog.SiteView, error) {
	c := &http.Client{Timeout: 10 * time.Second}
	resp, err := c.Get("http://" + addr + "/v1/catalog")
	if err != nil {
		return nil, fmt.Errorf("cannot reach the spoke at %s: %w (pass its --http-listen address)", addr, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("spoke %s answered %s", addr, resp.Status)
	}
	var v catalog.SiteView
	if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
		return nil, fmt.Errorf("spoke %s: %w", addr, err)
	}
	return &v, nil
}

// serviceSummary is one row of `service list`.
type serviceSummary struct {
	Namespace string   `json:"namespace" yaml:"namespace"`
	Name      string   `json:"name" yaml:"name"`
	Sites     []string `json:"sites" yaml:"sites"`
	Endpoints int      `json:"endpoints" yaml:"endpoints"`
	Healthy   int      `json:"healthy" yaml:"healthy"`
}

func summarize(services []catalog.Service) []serviceSummary {
	by := map[string]*serviceSummary{}
	for _, s := range services {
		sum := by[s.ID()]
		if sum == nil {
			sum = &serviceSummary{Namespace: s.Namespace, Name: s.Name}
			by[s.ID()] = sum
		}
		sum.Sites = append(sum.Sites, s.Site)
		for _, e := range s.Endpoints {
			sum.Endpoints++
			if e.Health == catalog.HealthHealthy {
				sum.Healthy++
			}
		}
	}
	out := make([]serviceSummary, 0, len(by))
	for _, s := range by {
		sort.Strings(s.Sites)
		out = append(out, *s)
	}
	sort.Slice(out, func(i, j int) bool {
		return out[i].Namespace+"/"+out[i].Name < out[j].Namespace+"/"+out[j].Name
	})
	return out
}

func (g *globals) printServiceList(services []catalog.Service) error {
	sums := summarize(services)
	return g.render(sums, func(w io.Writer) {
		row(w, "NAMESPACE", "NAME", "SITES", "ENDPOINTS", "HEALTHY")
		for _, s := range sums {
			row(w, s.Namespace, s.Name, strings.Join(s.Sites, ","), s.Endpoints, s.Healthy)
		}
	})
}

func (g *globals) printServiceShow(services []catalog.Service) error {
	return g.render(services, func(w io.Writer) {
		row(w, "SITE", "LOCALITY", "ADDRESS", "PORT", "HEALTH", "WEIGHT", "LABELS", "IDENTITY")
		for _, s := range services {
			for _, e := range s.Endpoints {
				loc := catalog.Locality{Region: e.Region, Zone: e.Zone}
				row(w, s.Site, loc, e.Address, e.Port, e.Health, e.Weight, labels(e.Labels), e.Identity)
			}
		}
	})
}
