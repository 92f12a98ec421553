package xds

import (
	"fmt"
	"net/netip"
	"sort"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/gossip"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
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
