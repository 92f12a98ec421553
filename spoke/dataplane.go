package spoke

import (
	"context"

	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/federation"
	"github.com/meshfed/meshfed/spoke/xds"
)

// xdsCatalog is what the site's data plane is built from: the federated
// view, the site's own services, the policies and the trusted bundles.
func (s *Spoke) xdsCatalog() *xds.Catalog {
	snap := s.Snapshot()
	c := &xds.Catalog{
		Federation: s.creds.conf.Federation,
		Site:       s.o.Site,
		Sites:      map[string]catalog.Site{},
		Services:   snap.Services,
		Policies:   map[string]catalog.Policy{},
		Bundles:    s.Bundles(),
	}
	for _, site := range snap.Sites {
		c.Sites[site.Name] = site
	}
	for _, r := range s.view.table.List("policy/") {
		p := federation.PolicyFromWire(r.GetPolicy())
		c.Policies[p.Service] = p
	}
	return c
}

// watchCatalog rebuilds the xDS snapshots whenever the view or the local
// catalog changes.
func (s *Spoke) watchCatalog(ctx context.Context) error {
	all := func(string) bool { return true }
	view, local := s.view.table.Subscribe(all), s.local.table.Subscribe(all)
	defer view.Close()
	defer local.Close()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-view.C():
			view.Take(1 << 30)
		case <-local.C():
			local.Take(1 << 30)
		}
		s.xds.Changed()
	}
}
