package xds

import (
	"cmp"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	httprbacv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	netrbacv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	tcpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/envoyproxy/go-control-plane/pkg/wellknown"
	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/gossip"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// Defaults for services without a policy, or policies that leave a field
// out. Connect failures are retried and repeated failures eject an endpoint
// by default: failover should not need a policy.
const (
	DefaultConnectTimeout         = 2 * time.Second
	DefaultRetries                = 2
	DefaultConsecutiveFailures    = 5
	DefaultOutlierInterval        = 5 * time.Second
	DefaultBaseEjectionTime       = 30 * time.Second
	DefaultMaxEjectionPercent     = 100
	DefaultOverprovisioningFactor = 140
)

// Catalog is everything a site's data plane is built from.
type Catalog struct {
	// Federation is the federation's name, the last part of every SNI.
	Federation string
	// Site is the local site.
	Site string
	// Sites are every site's records by name (localities, gateways).
	Sites map[string]catalog.Site
	// Services are every site's services; endpoints without a locality
	// take their site's.
	Services []catalog.Service
	// Policies are the traffic policies by service ID.
	Policies map[string]catalog.Policy
	// Bundles are the PEM CA certificates of each trusted trust domain.
	Bundles map[string][]byte
	// Down marks sites whose gateways are known dead (WAN gossip): their
	// endpoints are unhealthy whatever the catalog says.
	Down map[string]bool
	// Gossip is what the site's gateways need to join the WAN pool; nil
	// while the spoke is not in it.
	Gossip *gossip.Secret
	// Resolved are the addresses of gateway and endpoint host names, for
	// nodes that take only IP addresses; the xDS server fills it in.
	Resolved map[string][]netip.Addr
}

// Node is one xDS client as it describes itself.
type Node struct {
	// ID is the node's SPIFFE ID.
	ID string
	// Locality is the node's; empty: the site's.
	Locality catalog.Locality
	// IPOnly: the node takes only IP addresses in its endpoints (Envoy):
	// a gateway or local endpoint known by host name is given as the
	// addresses it resolves to (Catalog.Resolved), and left out until it
	// has some.
	IPOnly bool
	// GRPC: a proxyless gRPC client, which gets API listeners instead of
	// TCP listeners, and clusters whose mTLS names the certificate
	// provider of its bootstrap (GRPCCertProvider) instead of SDS secrets.
	GRPC bool
	// Address is where the node's workload endpoints are (its inbound
	// listeners bind there).
	Address string
	// Inbound maps an endpoint port to the local app address behind it.
	Inbound map[uint32]string
	// OutboundPrefix is the range outbound listener addresses are taken
	// from; invalid: no outbound listeners.
	OutboundPrefix netip.Prefix
	// GatewayListen, when set, makes the node the site's east-west
	// gateway: one SNI-routing listener there, to local endpoints only.
	GatewayListen string
}

// SVID is the node's certificate chain and key, PEM.
type SVID struct {
	CertPEM, KeyPEM []byte
}

// Build returns the node's resources by type URL.
func Build(c *Catalog, n Node, svid SVID) map[resource.Type][]types.Resource {
	if n.Locality == (catalog.Locality{}) {
		n.Locality = c.Sites[c.Site].Locality
	}
	b := &builder{c: c, n: n, out: map[resource.Type][]types.Resource{}}
	for name := range c.Sites {
		b.siteNames = append(b.siteNames, name)
	}
	sort.Strings(b.siteNames)
	if n.GatewayListen != "" {
		b.gateway()
		b.secrets(svid)
		b.gossipSecret()
		return b.out
	}
	b.outbound()
	if n.GRPC {
		b.grpcServers()
	} else {
		b.inbound()
		b.secrets(svid)
	}
	return b.out
}

type builder struct {
	c   *Catalog
	n   Node
	out map[resource.Type][]types.Resource
	// siteNames are the catalog's sites, sorted, for failover order.
	siteNames []string
}

func (b *builder) add(typ resource.Type, r types.Resource) { b.out[typ] = append(b.out[typ], r) }

// federated is one service as the whole federation offers it.
type federated struct {
	namespace, name string
	ports           []catalog.Port
	bySite          map[string]catalog.Service
}

func (b *builder) services() []*federated {
	byID := map[string]*federated{}
	var ids []string
	for _, s := range b.c.Services {
		f := byID[s.ID()]
		if f == nil {
			f = &federated{namespace: s.Namespace, name: s.Name, bySite: map[string]catalog.Service{}}
			byID[s.ID()] = f
			ids = append(ids, s.ID())
		}
		f.bySite[s.Site] = s
		for _, p := range s.Ports {
			if !hasPort(f.ports, p.Port) {
				f.ports = append(f.ports, p)
			}
		}
	}
	sort.Strings(ids)
	out := make([]*federated, 0, len(ids))
	for _, id := range ids {
		f := byID[id]
		sort.Slice(f.ports, func(i, j int) bool { return f.ports[i].Port < f.ports[j].Port })
		out = append(out, f)
	}
	return out
}

func hasPort(ps []catalog.Port, port uint32) bool {
	for _, p := range ps {
		if p.Port == port {
			return true
		}
	}
	return false
}

// endpointsFor returns a site's endpoints that serve port p of s.
func endpointsFor(s catalog.Service, p catalog.Port) []catalog.Endpoint {
	if len(s.Ports) <= 1 {
		return s.Endpoints
	}
	var out []catalog.Endpoint
	for _, e := range s.Endpoints {
		if e.PortName != "" && e.PortName == p.Name || e.PortName == "" && e.Port == p.Port {
			out = append(out, e)
		}
	}
	return out
}

func (b *builder) outbound() {
	fs := b.services()
	ids := make([]string, len(fs))
	for i, f := range fs {
		ids[i] = f.namespace + "/" + f.name
	}
	vips := AssignVIPs(b.n.OutboundPrefix, ids)
	for _, f := range fs {
		id := f.namespace + "/" + f.name
		pol := b.c.Policies[id]
		subsets := []catalog.Split{{}}
		if len(pol.Split) > 0 {
			subsets = append(subsets, pol.Split...)
		}
		for _, p := range f.ports {
			for _, sub := range subsets {
				cn := ClusterName(f.namespace, f.name, p.Port, sub.Name)
				cla, sites := b.loadAssignment(f, p, sub, pol, cn)
				b.add(resource.EndpointType, cla)
				b.add(resource.ClusterType, b.cluster(f, p, sub.Name, pol, cn, sites))
			}
			if b.n.GRPC {
				b.add(resource.ListenerType, b.apiListener(f, p, pol))
			} else if vip, ok := vips[id]; ok {
				b.add(resource.ListenerType, b.tcpListener(f, p, pol, vip))
			}
		}
	}
}

// weightedClusters returns the subsets new connections are split over;
// nil without a split (one cluster of all endpoints).
func weightedClusters(pol catalog.Policy) []*catalog.Split {
	if len(pol.Split) == 0 {
		return nil
	}
	out := make([]*catalog.Split, len(pol.Split))
	for i := range pol.Split {
		out[i] = &pol.Split[i]
	}
	return out
}

func (b *builder) tcpListener(f *federated, p catalog.Port, pol catalog.Policy, vip netip.Addr) *listenerv3.Listener {
	attempts := uint32(DefaultRetries) + 1
	if pol.Retries != nil {
		attempts = *pol.Retries + 1
	}
	tp := &tcpv3.TcpProxy{
		StatPrefix:         ListenerName(f.namespace, f.name, p.Port),
		MaxConnectAttempts: wrapperspb.UInt32(attempts),
	}
	if split := weightedClusters(pol); split != nil {
		wc := &tcpv3.TcpProxy_WeightedCluster{}
		for _, s := range split {
			wc.Clusters = append(wc.Clusters, &tcpv3.TcpProxy_WeightedCluster_ClusterWeight{
				Name: ClusterName(f.namespace, f.name, p.Port, s.Name), Weight: s.Weight,
			})
		}
		tp.ClusterSpecifier = &tcpv3.TcpProxy_WeightedClusters{WeightedClusters: wc}
	} else {
		tp.ClusterSpecifier = &tcpv3.TcpProxy_Cluster{Cluster: ClusterName(f.namespace, f.name, p.Port, "")}
	}
	return &listenerv3.Listener{
		Name:    ListenerName(f.namespace, f.name, p.Port),
		Address: socketAddress(vip.String(), p.Port),
		FilterChains: []*listenerv3.FilterChain{{
			Filters: []*listenerv3.Filter{typedFilter(wellknown.TCPProxy, tp)},
		}},
		TrafficDirection: corev3.TrafficDirection_OUTBOUND,
	}
}

// apiListener is what a proxyless gRPC client resolves xds:///<name> with.
func (b *builder) apiListener(f *federated, p catalog.Port, pol catalog.Policy) *listenerv3.Listener {
	action := &routev3.RouteAction{}
	if split := weightedClusters(pol); split != nil {
		wc := &routev3.WeightedCluster{}
		for _, s := range split {
			wc.Clusters = append(wc.Clusters, &routev3.WeightedCluster_ClusterWeight{
				Name: ClusterName(f.namespace, f.name, p.Port, s.Name), Weight: wrapperspb.UInt32(s.Weight),
			})
		}
		action.ClusterSpecifier = &routev3.RouteAction_WeightedClusters{WeightedClusters: wc}
	} else {
		action.ClusterSpecifier = &routev3.RouteAction_Cluster{Cluster: ClusterName(f.namespace, f.name, p.Port, "")}
	}
	name := ListenerName(f.namespace, f.name, p.Port)
	m := httpManager(name, &routev3.Route{Action: &routev3.Route_Route{Route: action}})
	return &listenerv3.Listener{
		Name:        name,
		ApiListener: &listenerv3.ApiListener{ApiListener: mustAny(m)},
	}
}

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

// OutlierDetection is the outlier detection a policy's block (nil: none)
// comes to: each field it leaves out (or 0) takes its default.
func OutlierDetection(o *catalog.OutlierDetection) catalog.OutlierDetection {
	var set catalog.OutlierDetection
	if o != nil {
		set = *o
	}
	return catalog.OutlierDetection{
		ConsecutiveFailures: cmp.Or(set.ConsecutiveFailures, DefaultConsecutiveFailures),
		Interval:            cmp.Or(set.Interval, catalog.Duration(DefaultOutlierInterval)),
		BaseEjectionTime:    cmp.Or(set.BaseEjectionTime, catalog.Duration(DefaultBaseEjectionTime)),
		MaxEjectionPercent:  cmp.Or(set.MaxEjectionPercent, DefaultMaxEjectionPercent),
	}
}

func (b *builder) cluster(f *federated, p catalog.Port, subset string, pol catalog.Policy, cn string, sites []string) *clusterv3.Cluster {
	timeout := DefaultConnectTimeout
	if pol.ConnectTimeout > 0 {
		timeout = time.Duration(pol.ConnectTimeout)
	}
	od := OutlierDetection(pol.OutlierDetection)
	c := &clusterv3.Cluster{
		Name:                 cn,
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS},
		EdsClusterConfig: &clusterv3.Cluster_EdsClusterConfig{
			EdsConfig:   adsSource(),
			ServiceName: cn,
		},
		ConnectTimeout: durationpb.New(timeout),
		LbPolicy:       clusterv3.Cluster_ROUND_ROBIN,
		OutlierDetection: &clusterv3.OutlierDetection{
			Consecutive_5Xx:                wrapperspb.UInt32(od.ConsecutiveFailures),
			EnforcingConsecutive_5Xx:       wrapperspb.UInt32(100),
			ConsecutiveLocalOriginFailure:  wrapperspb.UInt32(od.ConsecutiveFailures),
			Interval:                       durationpb.New(time.Duration(od.Interval)),
			BaseEjectionTime:               durationpb.New(time.Duration(od.BaseEjectionTime)),
			MaxEjectionPercent:             wrapperspb.UInt32(od.MaxEjectionPercent),
			SplitExternalLocalOriginErrors: false,
		},
	}
	// Every endpoint is reached with mTLS; the SNI depends on the site the
	// endpoint is in, so each site gets a transport socket match. gRPC
	// knows no matches: it sends each endpoint's host name, which is its
	// SNI (auto_host_sni).
	ids := identities(f, p)
	if b.n.GRPC {
		if pol.OutlierDetection != nil {
			// gRPC has no consecutive-failure ejection (gRFC A50). The
			// nearest it has: eject an endpoint that failed at least 85 %
			// (the default threshold) of at least that many calls in an
			// interval, however few endpoints the cluster has. gRPC counts
			// every non-OK status, answers such as NotFound too, so only a
			// policy that asks for outlier detection turns it on.
			c.OutlierDetection.EnforcingFailurePercentage = wrapperspb.UInt32(100)
			c.OutlierDetection.FailurePercentageMinimumHosts = wrapperspb.UInt32(1)
			c.OutlierDetection.FailurePercentageRequestVolume = wrapperspb.UInt32(od.ConsecutiveFailures)
		}
		c.TransportSocket = grpcTLS(ids)
		return c
	}
	c.TransportSocket = b.upstreamTLS(SNI(b.c.Federation, b.c.Site, f.namespace, f.name, p.Port, subset), ids)
	for _, site := range sites {
		c.TransportSocketMatches = append(c.TransportSocketMatches, &clusterv3.Cluster_TransportSocketMatch{
			Name:            "site-" + site,
			Match:           &structpb.Struct{Fields: map[string]*structpb.Value{"site": structpb.NewStringValue(site)}},
			TransportSocket: b.upstreamTLS(SNI(b.c.Federation, site, f.namespace, f.name, p.Port, subset), ids),
		})
	}
	return c
}

// identities are the SPIFFE IDs a service port's endpoints may present:
// the callee is checked against them.
func identities(f *federated, p catalog.Port) []string {
	seen := map[string]bool{}
	var out []string
	for _, s := range f.bySite {
		for _, e := range endpointsFor(s, p) {
			if e.Identity != "" && !seen[e.Identity] {
				seen[e.Identity] = true
				out = append(out, e.Identity)
			}
		}
	}
	sort.Strings(out)
	return out
}

func (b *builder) upstreamTLS(sni string, ids []string) *corev3.TransportSocket {
	dvc := &tlsv3.CertificateValidationContext{}
	for _, id := range ids {
		dvc.MatchTypedSubjectAltNames = append(dvc.MatchTypedSubjectAltNames, &tlsv3.SubjectAltNameMatcher{
			SanType: tlsv3.SubjectAltNameMatcher_URI,
			Matcher: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: id}},
		})
	}
	ctx := &tlsv3.UpstreamTlsContext{
		Sni:              sni,
		CommonTlsContext: commonTLS(dvc),
	}
	return &corev3.TransportSocket{Name: wellknown.TransportSocketTLS, ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: mustAny(ctx)}}
}

// httpManager is what gRPC reads from a listener: every request takes
// route (its match set here), after filters and then the router.
func httpManager(name string, route *routev3.Route, filters ...*hcmv3.HttpFilter) *hcmv3.HttpConnectionManager {
	route.Match = &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: ""}}
	return &hcmv3.HttpConnectionManager{
		StatPrefix: name,
		RouteSpecifier: &hcmv3.HttpConnectionManager_RouteConfig{RouteConfig: &routev3.RouteConfiguration{
			Name:         name,
			VirtualHosts: []*routev3.VirtualHost{{Name: name, Domains: []string{"*"}, Routes: []*routev3.Route{route}}},
		}},
		HttpFilters: append(filters, &hcmv3.HttpFilter{
			Name:       wellknown.Router,
			ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: mustAny(&routerv3.Router{})},
		}),
	}
}

// grpcTLS is a proxyless gRPC client's upstream mTLS: identity and roots
// from its bootstrap's certificate provider (a SPIFFE bundle map there
// checks each peer against its own trust domain's bundle), SNI from the
// endpoint's host name, the callee checked against the service's
// identities.
func grpcTLS(ids []string) *corev3.TransportSocket {
	provider := &tlsv3.CertificateProviderPluginInstance{InstanceName: GRPCCertProvider}
	dvc := &tlsv3.CertificateValidationContext{CaCertificateProviderInstance: provider}
	for _, id := range ids {
		dvc.MatchSubjectAltNames = append(dvc.MatchSubjectAltNames, &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: id}})
	}
	ctx := &tlsv3.UpstreamTlsContext{
		AutoHostSni: true,
		CommonTlsContext: &tlsv3.CommonTlsContext{
			// No tls_params: gRPC refuses a cluster that has them. meshfed
			// proxies insist on TLS 1.3; grpc-go negotiates it by default.
			TlsCertificateProviderInstance: provider,
			ValidationContextType:          &tlsv3.CommonTlsContext_ValidationContext{ValidationContext: dvc},
		},
	}
	return &corev3.TransportSocket{Name: wellknown.TransportSocketTLS, ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: mustAny(ctx)}}
}

func commonTLS(dvc *tlsv3.CertificateValidationContext) *tlsv3.CommonTlsContext {
	return &tlsv3.CommonTlsContext{
		TlsParams:                      &tlsv3.TlsParameters{TlsMinimumProtocolVersion: tlsv3.TlsParameters_TLSv1_3},
		TlsCertificateSdsSecretConfigs: []*tlsv3.SdsSecretConfig{{Name: SecretSVID, SdsConfig: adsSource()}},
		ValidationContextType: &tlsv3.CommonTlsContext_CombinedValidationContext{
			CombinedValidationContext: &tlsv3.CommonTlsContext_CombinedCertificateValidationContext{
				DefaultValidationContext:         dvc,
				ValidationContextSdsSecretConfig: &tlsv3.SdsSecretConfig{Name: SecretFederation, SdsConfig: adsSource()},
			},
		},
	}
}

// callers is one endpoint address of a workload and who may call it: the
// policies of the services it serves there, and whether one of them has
// none (any authenticated caller then).
type callers struct {
	host     string
	port     uint32
	policies []catalog.Policy
	open     bool
}

// ownEndpoints returns, ordered by address, each endpoint of this site
// whose identity is the node's and that keep says to serve.
func (b *builder) ownEndpoints(keep func(catalog.Endpoint) bool) []*callers {
	byAddr := map[string]*callers{}
	for _, s := range b.c.Services {
		if s.Site != b.c.Site {
			continue
		}
		for _, e := range s.Endpoints {
			if e.Identity != b.n.ID || !keep(e) {
				continue
			}
			k := net.JoinHostPort(e.Address, strconv.Itoa(int(e.Port)))
			x := byAddr[k]
			if x == nil {
				x = &callers{host: e.Address, port: e.Port}
				byAddr[k] = x
			}
			if pol, ok := b.c.Policies[s.ID()]; ok {
				x.policies = append(x.policies, pol)
			} else {
				x.open = true
			}
		}
	}
	out := slices.Collect(maps.Values(byAddr))
	slices.SortFunc(out, func(a, b *callers) int { return cmp.Or(strings.Compare(a.host, b.host), cmp.Compare(a.port, b.port)) })
	return out
}

// inbound builds a listener per endpoint of this node's workload: mTLS
// terminated with the node's SVID, callers authorized by SPIFFE ID, bytes
// passed to the app.
func (b *builder) inbound() {
	if b.n.GRPC || b.n.Address == "" || len(b.n.Inbound) == 0 {
		return
	}
	for _, x := range b.ownEndpoints(func(e catalog.Endpoint) bool { return e.Address == b.n.Address && b.n.Inbound[e.Port] != "" }) {
		port := x.port
		app := b.n.Inbound[port]
		host, appPortStr, err := net.SplitHostPort(app)
		if err != nil {
			continue
		}
		appPort, _ := strconv.ParseUint(appPortStr, 10, 32)
		cn := InboundClusterName(port)
		b.add(resource.ClusterType, &clusterv3.Cluster{
			Name:                 cn,
			ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_STATIC},
			ConnectTimeout:       durationpb.New(DefaultConnectTimeout),
			LoadAssignment: &endpointv3.ClusterLoadAssignment{
				ClusterName: cn,
				Endpoints: []*endpointv3.LocalityLbEndpoints{{LbEndpoints: []*endpointv3.LbEndpoint{{
					HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{Address: socketAddress(host, uint32(appPort))}},
				}}}},
			},
		})
		down := &tlsv3.DownstreamTlsContext{
			RequireClientCertificate: wrapperspb.Bool(true),
			CommonTlsContext:         commonTLS(&tlsv3.CertificateValidationContext{}),
		}
		name := "inbound|" + net.JoinHostPort(b.n.Address, strconv.Itoa(int(port)))
		b.add(resource.ListenerType, &listenerv3.Listener{
			Name:    name,
			Address: socketAddress(b.n.Address, port),
			FilterChains: []*listenerv3.FilterChain{{
				Filters: []*listenerv3.Filter{
					typedFilter(wellknown.RoleBasedAccessControl, &netrbacv3.RBAC{StatPrefix: name, Rules: x.rules()}),
					typedFilter(wellknown.TCPProxy, &tcpv3.TcpProxy{StatPrefix: name, ClusterSpecifier: &tcpv3.TcpProxy_Cluster{Cluster: cn}}),
				},
				TransportSocket: &corev3.TransportSocket{Name: wellknown.TransportSocketTLS, ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: mustAny(down)}},
			}},
			TrafficDirection: corev3.TrafficDirection_INBOUND,
		})
	}
}

// rules allow callers by SPIFFE ID. An endpoint of a service that has no
// policy admits any caller the federation's bundles authenticate; with
// policies, only their allow lists.
func (x *callers) rules() *rbacv3.RBAC {
	var principals []*rbacv3.Principal
	if x.open {
		principals = append(principals, &rbacv3.Principal{Identifier: &rbacv3.Principal_Authenticated_{
			Authenticated: &rbacv3.Principal_Authenticated{PrincipalName: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Prefix{Prefix: "spiffe://"}}},
		}})
	}
	seen := map[string]bool{}
	for _, p := range x.policies {
		for _, a := range p.Allow {
			if seen[a] {
				continue
			}
			seen[a] = true
			m := &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: a}}
			if prefix, ok := strings.CutSuffix(a, "*"); ok {
				m.MatchPattern = &matcherv3.StringMatcher_Prefix{Prefix: prefix}
			}
			principals = append(principals, &rbacv3.Principal{Identifier: &rbacv3.Principal_Authenticated_{
				Authenticated: &rbacv3.Principal_Authenticated{PrincipalName: m},
			}})
		}
	}
	rules := &rbacv3.RBAC{Action: rbacv3.RBAC_ALLOW, Policies: map[string]*rbacv3.Policy{}}
	if len(principals) > 0 {
		rules.Policies["allowed-callers"] = &rbacv3.Policy{
			Permissions: []*rbacv3.Permission{{Rule: &rbacv3.Permission_Any{Any: true}}},
			Principals:  principals,
		}
	}
	return rules
}

// grpcServers builds, for a proxyless gRPC server (an xDS-enabled
// grpc.Server holding the workload's SVID), the listener of each of its
// endpoints, named GRPCServerListenerPrefix+host:port as its bootstrap's
// template asks: mTLS with a client certificate required, callers
// authorized by SPIFFE ID (RBAC), calls served by the server itself.
func (b *builder) grpcServers() {
	for _, x := range b.ownEndpoints(func(catalog.Endpoint) bool { return true }) {
		name := GRPCServerListenerPrefix + net.JoinHostPort(x.host, strconv.Itoa(int(x.port)))
		provider := &tlsv3.CertificateProviderPluginInstance{InstanceName: GRPCCertProvider}
		down := &tlsv3.DownstreamTlsContext{
			RequireClientCertificate: wrapperspb.Bool(true),
			CommonTlsContext: &tlsv3.CommonTlsContext{
				TlsCertificateProviderInstance: provider,
				ValidationContextType: &tlsv3.CommonTlsContext_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
					CaCertificateProviderInstance: provider,
				}},
			},
		}
		m := httpManager(name, &routev3.Route{Action: &routev3.Route_NonForwardingAction{NonForwardingAction: &routev3.NonForwardingAction{}}},
			&hcmv3.HttpFilter{Name: wellknown.HTTPRoleBasedAccessControl, ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: mustAny(&httprbacv3.RBAC{Rules: x.rules()})}})
		b.add(resource.ListenerType, &listenerv3.Listener{
			Name:    name,
			Address: socketAddress(x.host, x.port),
			FilterChains: []*listenerv3.FilterChain{{
				Filters:         []*listenerv3.Filter{typedFilter(wellknown.HTTPConnectionManager, m)},
				TransportSocket: &corev3.TransportSocket{Name: wellknown.TransportSocketTLS, ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: mustAny(down)}},
			}},
			TrafficDirection: corev3.TrafficDirection_INBOUND,
		})
	}
}

func (b *builder) secrets(svid SVID) {
	if len(svid.CertPEM) > 0 {
		b.add(resource.SecretType, &tlsv3.Secret{Name: SecretSVID, Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
			CertificateChain: &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: svid.CertPEM}},
			PrivateKey:       &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: svid.KeyPEM}},
		}}})
	}
	tds := make([]string, 0, len(b.c.Bundles))
	for td := range b.c.Bundles {
		tds = append(tds, td)
	}
	sort.Strings(tds)
	v := &tlsv3.SPIFFECertValidatorConfig{}
	for _, td := range tds {
		v.TrustDomains = append(v.TrustDomains, &tlsv3.SPIFFECertValidatorConfig_TrustDomain{
			Name:        td,
			TrustBundle: &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: b.c.Bundles[td]}},
		})
	}
	b.add(resource.SecretType, &tlsv3.Secret{Name: SecretFederation, Type: &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
		CustomValidatorConfig: &corev3.TypedExtensionConfig{Name: "envoy.tls.cert_validator.spiffe", TypedConfig: mustAny(v)},
	}}})
}

func adsSource() *corev3.ConfigSource {
	return &corev3.ConfigSource{
		ResourceApiVersion:    corev3.ApiVersion_V3,
		ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}},
	}
}

func socketAddress(host string, port uint32) *corev3.Address {
	return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
		Address: host, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port},
	}}}
}

func typedFilter(name string, m proto.Message) *listenerv3.Filter {
	return &listenerv3.Filter{Name: name, ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(m)}}
}

func mustAny(m proto.Message) *anypb.Any {
	a, err := anypb.New(m)
	if err != nil {
		panic(fmt.Sprintf("xds: pack %T: %v", m, err))
	}
	return a
}
