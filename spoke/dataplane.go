package spoke

import (
	"context"
	"fmt"
	"time"

	meshfedv1 "github.com/meshfed/meshfed/api/meshfed/v1"
	"github.com/meshfed/meshfed/gossip"

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
	if pool := s.pool.Load(); pool != nil {
		c.Down = pool.Down()
		if r, ok := s.view.table.Get(federation.GossipKeyringKey); ok {
			c.Gossip = &gossip.Secret{Keyring: federation.KeyringFromWire(r.GetGossipKeyring()), Seeds: append([]string{pool.Addr()}, federation.GossipSeeds(s.view.table, s.o.Site)...)}
		}
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

// runGossip takes part in the WAN gossip pool once the hub's keyring is in
// the view (it is kept there, so a restart joins without the hub): it
// publishes the spoke's address for other sites to join through, follows
// key rotations, and rebuilds EDS when a site's gateways die or return.
func (s *Spoke) runGossip(ctx context.Context) error {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	var keyring *meshfedv1.GossipKeyring
	for keyring == nil {
		if r, ok := s.view.table.Get(federation.GossipKeyringKey); ok {
			keyring = r.GetGossipKeyring()
			break
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
	pool, err := gossip.New(gossip.Options{
		Name: s.o.Site + "/spoke", Site: s.o.Site, Role: gossip.RoleSpoke,
		Bind: s.o.GossipListen, Advertise: s.o.GossipAdvertise, ProbeInterval: s.o.GossipProbeInterval,
		Keys: federation.KeyringFromWire(keyring), Logger: s.log,
		OnChange: func() {
			if s.xds != nil {
				s.xds.Changed()
			}
			if pool := s.pool.Load(); pool != nil {
				for site, st := range pool.SiteStates() {
					s.m.gossipSiteAlive.WithLabelValues(site).Set(map[bool]float64{true: 1}[st == gossip.StateAlive])
				}
			}
		},
	})
	if err != nil {
		return fmt.Errorf("spoke: %w", err)
	}
	s.pool.Store(pool)
	s.local.SetGossipAddresses([]string{pool.Addr()})
	return federation.RunGossip(ctx, pool, s.view.table, s.o.Site, s.log)
}
