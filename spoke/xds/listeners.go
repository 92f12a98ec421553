package xds

// The listeners a node gets: outbound per federated service port (and
// API listeners for proxyless gRPC), inbound per endpoint of its workload.

import (
	"cmp"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"

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
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/envoyproxy/go-control-plane/pkg/wellknown"
	"github.com/meshfed/meshfed/catalog"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

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
