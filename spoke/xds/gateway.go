package xds

import (
	"encoding/json"
	"net"
	"sort"
	"strconv"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	tlsinspectorv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/tls_inspector/v3"
	tcpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/envoyproxy/go-control-plane/pkg/wellknown"
	"github.com/meshfed/meshfed/catalog"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// GatewayListenerName is the gateway's one listener.
const GatewayListenerName = "gateway"

// GatewayClusterName names the cluster behind one SNI at the gateway.
func GatewayClusterName(sni string) string { return "gateway|" + sni }

// gateway builds the east-west gateway's configuration: one listener that
// reads the SNI (tls_inspector, no decryption) and one filter chain per
// local service port and subset, passing the bytes to that subset's local
// endpoints. Nothing else has a route: an SNI of another site, of a service
// this site does not export, or none at all matches no chain.
func (b *builder) gateway() {
	host, portStr, err := net.SplitHostPort(b.n.GatewayListen)
	if err != nil {
		return
	}
	port, _ := strconv.ParseUint(portStr, 10, 16)
	l := &listenerv3.Listener{
		Name:    GatewayListenerName,
		Address: socketAddress(host, uint32(port)),
		ListenerFilters: []*listenerv3.ListenerFilter{{
			Name:       wellknown.TlsInspector,
			ConfigType: &listenerv3.ListenerFilter_TypedConfig{TypedConfig: mustAny(&tlsinspectorv3.TlsInspector{})},
		}},
		TrafficDirection: corev3.TrafficDirection_INBOUND,
	}
	fs := b.services()
	for _, f := range fs {
		s, ok := f.bySite[b.c.Site]
		if !ok {
			continue // not exported by this site
		}
		pol := b.c.Policies[f.namespace+"/"+f.name]
		subsets := []catalog.Split{{}}
		for _, sp := range pol.Split {
			if sp.Site == "" || sp.Site == b.c.Site {
				subsets = append(subsets, sp)
			}
		}
		for _, p := range f.ports {
			for _, sub := range subsets {
				sni := SNI(b.c.Federation, b.c.Site, f.namespace, f.name, p.Port, sub.Name)
				cn := GatewayClusterName(sni)
				cla := &endpointv3.ClusterLoadAssignment{ClusterName: cn, Endpoints: []*endpointv3.LocalityLbEndpoints{{}}}
				for _, e := range endpointsFor(s, p) {
					if hasLabels(e.Labels, sub.Labels) {
						cla.Endpoints[0].LbEndpoints = append(cla.Endpoints[0].LbEndpoints, b.lbEndpoint(e.Address, e.Port, health(e.Health), max(e.Weight, 1), b.c.Site, f, p, sub.Name))
					}
				}
				b.add(resource.EndpointType, cla)
				c := b.cluster(f, p, sub.Name, pol, cn, nil)
				c.TransportSocket, c.TransportSocketMatches = nil, nil // passthrough: the callee terminates TLS
				b.add(resource.ClusterType, c)
				l.FilterChains = append(l.FilterChains, &listenerv3.FilterChain{
					Name:             sni,
					FilterChainMatch: &listenerv3.FilterChainMatch{ServerNames: []string{sni}},
					Filters: []*listenerv3.Filter{typedFilter(wellknown.TCPProxy, &tcpv3.TcpProxy{
						StatPrefix:         sni,
						ClusterSpecifier:   &tcpv3.TcpProxy_Cluster{Cluster: cn},
						MaxConnectAttempts: wrapperspb.UInt32(uint32(DefaultRetries) + 1),
					})},
				})
			}
		}
	}
	sort.Slice(l.FilterChains, func(i, j int) bool { return l.FilterChains[i].Name < l.FilterChains[j].Name })
	b.add(resource.ListenerType, l)
}

// SecretGossip is the gateway's generic secret with the gossip keyring.
const SecretGossip = "gossip"

func (b *builder) gossipSecret() {
	if b.c.Gossip == nil {
		return
	}
	js, err := json.Marshal(b.c.Gossip)
	if err != nil {
		return
	}
	b.add(resource.SecretType, &tlsv3.Secret{Name: SecretGossip, Type: &tlsv3.Secret_GenericSecret{GenericSecret: &tlsv3.GenericSecret{
		Secret: &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: js}},
	}}})
}
