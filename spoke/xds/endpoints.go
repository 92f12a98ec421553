package xds

// The endpoints of a cluster: local ones and remote sites' gateways, by
// priority (zone, region, failover order).

import (
	"net"
	"net/netip"
	"sort"
	"strconv"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	"github.com/meshfed/meshfed/catalog"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// group is the endpoints of one site and locality in a load assignment.
type group struct {
	site     string
	locality catalog.Locality
	eps      []*endpointv3.LbEndpoint
	weight   uint32
}

// loadAssignment builds the endpoints of a service port's subset, by
// priority, and returns the sites they are in.
func (b *builder) loadAssignment(f *federated, p catalog.Port, sub catalog.Split, pol catalog.Policy, cn string) (*endpointv3.ClusterLoadAssignment, []string) {
	groups := map[string]*group{}
	var siteNames []string
	for site := range f.bySite {
		siteNames = append(siteNames, site)
	}
	sort.Strings(siteNames)
	var sites []string
	for _, site := range siteNames {
		if sub.Site != "" && sub.Site != site {
			continue
		}
		var eps []catalog.Endpoint
		for _, e := range endpointsFor(f.bySite[site], p) {
			if hasLabels(e.Labels, sub.Labels) {
				eps = append(eps, e)
			}
		}
		if len(eps) == 0 {
			continue
		}
		sites = append(sites, site)
		if site == b.c.Site {
			for _, e := range eps {
				addrs := b.addrs(e.Address)
				if len(addrs) == 0 {
					continue // a host name not looked up yet
				}
				g := groupFor(groups, site, catalog.Locality{Region: e.Region, Zone: e.Zone})
				for _, addr := range addrs {
					g.eps = append(g.eps, b.lbEndpoint(addr, e.Port, health(e.Health), max(e.Weight, 1), site, f, p, sub.Name))
					g.weight += max(e.Weight, 1)
				}
			}
			continue
		}
		b.remoteEndpoints(groups, site, eps, f, p, sub.Name)
	}
	cla := &endpointv3.ClusterLoadAssignment{ClusterName: cn}
	opf := uint32(DefaultOverprovisioningFactor)
	if pol.OverprovisioningFactor != 0 {
		opf = pol.OverprovisioningFactor
	}
	cla.Policy = &endpointv3.ClusterLoadAssignment_Policy{OverprovisioningFactor: wrapperspb.UInt32(opf)}
	prio := b.priorities(groups, pol)
	keys := make([]string, 0, len(groups))
	for k := range groups {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		if prio[keys[i]] != prio[keys[j]] {
			return prio[keys[i]] < prio[keys[j]]
		}
		return keys[i] < keys[j]
	})
	for _, k := range keys {
		g := groups[k]
		cla.Endpoints = append(cla.Endpoints, &endpointv3.LocalityLbEndpoints{
			Locality:            &corev3.Locality{Region: g.locality.Region, Zone: g.locality.Zone, SubZone: g.site},
			LbEndpoints:         g.eps,
			LoadBalancingWeight: wrapperspb.UInt32(max(g.weight, 1)),
			Priority:            prio[k],
		})
	}
	return cla, sites
}

// remoteEndpoints adds a remote site's gateways: one endpoint per gateway
// address, healthy while the site has a healthy endpoint of the subset,
// weighted by how many it has.
func (b *builder) remoteEndpoints(groups map[string]*group, site string, eps []catalog.Endpoint, f *federated, p catalog.Port, subset string) {
	rec := b.c.Sites[site]
	healthy := uint32(0)
	for _, e := range eps {
		if e.Health == "" || e.Health == catalog.HealthHealthy {
			healthy++
		}
	}
	h := corev3.HealthStatus_HEALTHY
	if healthy == 0 || b.c.Down[site] {
		h = corev3.HealthStatus_UNHEALTHY
	}
	g := groupFor(groups, site, rec.Locality)
	for _, gw := range rec.GatewayAddresses {
		host, portStr, err := net.SplitHostPort(gw)
		if err != nil {
			continue
		}
		port, err := strconv.ParseUint(portStr, 10, 32)
		if err != nil {
			continue
		}
		for _, addr := range b.addrs(host) {
			g.eps = append(g.eps, b.lbEndpoint(addr, uint32(port), h, max(healthy, 1), site, f, p, subset))
			g.weight += max(healthy, 1)
		}
	}
	if len(g.eps) == 0 {
		delete(groups, groupKey(site, rec.Locality))
	}
}

// addrs is how the node is to be given a gateway's or an endpoint's host:
// as it is, or, for a node that takes only IP addresses, the addresses it
// resolves to.
func (b *builder) addrs(host string) []string {
	if _, err := netip.ParseAddr(host); err == nil || !b.n.IPOnly {
		return []string{host}
	}
	var out []string
	for _, a := range b.c.Resolved[host] {
		out = append(out, a.String())
	}
	return out
}

func groupKey(site string, l catalog.Locality) string { return site + "|" + l.Region + "|" + l.Zone }

func groupFor(groups map[string]*group, site string, l catalog.Locality) *group {
	k := groupKey(site, l)
	g := groups[k]
	if g == nil {
		g = &group{site: site, locality: l}
		groups[k] = g
	}
	return g
}

// priorities ranks each group: 0 the node's zone, 1 its region, then the
// rest by site: the local site, the policy's failover order, then the
// other sites by name. Priorities are contiguous from 0, as Envoy wants.
func (b *builder) priorities(groups map[string]*group, pol catalog.Policy) map[string]uint32 {
	rank := map[string]int{}
	for k, g := range groups {
		switch {
		case g.locality.Region == b.n.Locality.Region && g.locality.Zone == b.n.Locality.Zone:
			rank[k] = 0
		case g.locality.Region == b.n.Locality.Region:
			rank[k] = 1
		default:
			rank[k] = 2 + b.siteRank(g.site, pol)
		}
	}
	distinct := map[int]bool{}
	for _, r := range rank {
		distinct[r] = true
	}
	var order []int
	for r := range distinct {
		order = append(order, r)
	}
	sort.Ints(order)
	dense := map[int]uint32{}
	for i, r := range order {
		dense[r] = uint32(i)
	}
	out := map[string]uint32{}
	for k, r := range rank {
		out[k] = dense[r]
	}
	return out
}

func (b *builder) siteRank(site string, pol catalog.Policy) int {
	if site == b.c.Site {
		return 0
	}
	for i, s := range pol.Failover {
		if s == site {
			return 1 + i
		}
	}
	// Sites the policy leaves out follow in name order.
	return 1 + len(pol.Failover) + sort.SearchStrings(b.siteNames, site)
}

func hasLabels(have, want map[string]string) bool {
	for k, v := range want {
		if have[k] != v {
			return false
		}
	}
	return true
}

func health(h string) corev3.HealthStatus {
	switch h {
	case "", catalog.HealthHealthy:
		return corev3.HealthStatus_HEALTHY
	case catalog.HealthUnhealthy:
		return corev3.HealthStatus_UNHEALTHY
	case catalog.HealthDraining:
		return corev3.HealthStatus_DRAINING
	}
	return corev3.HealthStatus_UNKNOWN
}

func (b *builder) lbEndpoint(addr string, port uint32, h corev3.HealthStatus, weight uint32, site string, f *federated, p catalog.Port, subset string) *endpointv3.LbEndpoint {
	sni := SNI(b.c.Federation, site, f.namespace, f.name, p.Port, subset)
	md := &corev3.Metadata{FilterMetadata: map[string]*structpb.Struct{
		MetadataNamespace: {Fields: map[string]*structpb.Value{
			"site": structpb.NewStringValue(site),
			"sni":  structpb.NewStringValue(sni),
		}},
	}}
	return &endpointv3.LbEndpoint{
		HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{
			Address:  socketAddress(addr, port),
			Hostname: sni,
		}},
		HealthStatus:        h,
		LoadBalancingWeight: wrapperspb.UInt32(weight),
		Metadata:            md,
	}
}
