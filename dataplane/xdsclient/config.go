package xdsclient

import (
	"fmt"
	"net"
	"sort"
	"strconv"
	"strings"
	"time"

	xds "github.com/meshfed/meshfed/api/meshfed/xdsapi"
	"github.com/meshfed/meshfed/trust/ca"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// The typed configs inside the resources a node reads.
const (
	spiffeValidatorType = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig"
	upstreamTLSType     = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
	tcpProxyType        = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
	rbacType            = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC"
)

// Config is a node's data-plane configuration, translated from xDS: what
// a proxy or a gateway runs.
type Config struct {
	// Listeners and Clusters by name.
	Listeners map[string]*Listener
	Clusters  map[string]*Cluster
	// SVID is the node's (SDS secret "default"); Bundles the trust
	// domains it trusts (secret "federation").
	SVID    *x509svid.SVID
	Bundles *x509bundle.Set
	// Generic holds the generic secrets' bytes by name (a gateway's
	// "gossip": the WAN pool's keyring and seeds, JSON).
	Generic map[string][]byte
}

// Listener is one listener: outbound (Routes), inbound (Allow, App) or a
// gateway's passthrough by server name (SNI).
type Listener struct {
	Name    string
	Addr    string
	Inbound bool
	// Routes (outbound): the clusters new connections are split over.
	Routes   []Route
	Attempts int
	// Allow (inbound): who may call; App: where the app is.
	Allow []Principal
	App   string
	// SNI (a gateway): the route of each server name; nil otherwise.
	SNI map[string]Route
}

// Route leads connections to a cluster: by Weight among an outbound
// listener's routes, with up to Attempts connection attempts.
type Route struct {
	Cluster  string
	Weight   uint32
	Attempts int
}

// Principal is a SPIFFE ID an inbound listener accepts: an exact ID or
// every ID under a prefix.
type Principal struct {
	Exact, Prefix string
}

// Match reports whether id is the principal's.
func (p Principal) Match(id string) bool {
	if p.Exact != "" {
		return id == p.Exact
	}
	return strings.HasPrefix(id, p.Prefix)
}

// Cluster is a set of endpoints by priority, with how to reach them.
type Cluster struct {
	Name           string
	ConnectTimeout time.Duration
	Outlier        Outlier
	// OPF is the overprovisioning factor, in percent (Envoy's default 140).
	OPF uint32
	// SANs are the SPIFFE IDs an upstream may present (any, when empty);
	// TLS: connections originate mTLS.
	SANs       []string
	TLS        bool
	Priorities [][]Endpoint
}

// Outlier is a cluster's outlier detection: consecutive connect failures
// eject an endpoint for BaseEjection times its ejections, while at most
// MaxPercent of the cluster is ejected.
type Outlier struct {
	Consecutive  uint32
	Interval     time.Duration
	BaseEjection time.Duration
	MaxPercent   uint32
}

// Endpoint is one endpoint of a cluster.
type Endpoint struct {
	// Key identifies the endpoint in outlier state: address and SNI.
	Key      string
	Addr     string
	SNI      string
	Site     string
	Zone     string
	Weight   uint32
	Healthy  bool
	Priority int
}

// translate turns the node's xDS resources into a config.
func translate(r *resources) (*Config, error) {
	c := &Config{Listeners: map[string]*Listener{}, Clusters: map[string]*Cluster{}}
	if err := c.secrets(r.secrets); err != nil {
		return nil, err
	}
	for name, cl := range r.clusters {
		cc, err := translateCluster(cl, r.endpoints[edsName(cl)])
		if err != nil {
			return nil, fmt.Errorf("cluster %s: %w", name, err)
		}
		c.Clusters[name] = cc
	}
	for name, l := range r.listeners {
		lc, err := translateListener(l, c.Clusters)
		if err != nil {
			return nil, fmt.Errorf("listener %s: %w", name, err)
		}
		if lc != nil {
			c.Listeners[name] = lc
		}
	}
	return c, nil
}

func (c *Config) secrets(s map[string]*xds.Secret) error {
	tc := s["default"].GetTlsCertificate()
	svid, err := x509svid.Parse(tc.GetCertificateChain().GetInlineBytes(), tc.GetPrivateKey().GetInlineBytes())
	if err != nil {
		return fmt.Errorf("secret default: %w", err)
	}
	c.SVID = svid
	v := &xds.SPIFFECertValidatorConfig{}
	if err := unpack(s["federation"].GetValidationContext().GetCustomValidatorConfig().GetTypedConfig(), spiffeValidatorType, v); err != nil {
		return fmt.Errorf("secret federation: want a SPIFFE validator config: %w", err)
	}
	for name, sec := range s {
		if g := sec.GetGenericSecret().GetSecret().GetInlineBytes(); g != nil {
			if c.Generic == nil {
				c.Generic = map[string][]byte{}
			}
			c.Generic[name] = g
		}
	}
	c.Bundles = x509bundle.NewSet()
	for _, td := range v.GetTrustDomains() {
		t, err := spiffeid.TrustDomainFromString(td.GetName())
		if err != nil {
			return fmt.Errorf("secret federation: %w", err)
		}
		certs, err := ca.ParseCertsPEM(td.GetTrustBundle().GetInlineBytes())
		if err != nil {
			return fmt.Errorf("secret federation: bundle of %s: %w", td.GetName(), err)
		}
		c.Bundles.Add(x509bundle.FromX509Authorities(t, certs))
	}
	return nil
}

func translateCluster(cl *xds.Cluster, cla *xds.ClusterLoadAssignment) (*Cluster, error) {
	cc := &Cluster{Name: cl.GetName(), ConnectTimeout: cl.GetConnectTimeout().AsDuration(), OPF: 140}
	if cc.ConnectTimeout <= 0 {
		cc.ConnectTimeout = 5 * time.Second
	}
	if od := cl.GetOutlierDetection(); od != nil {
		cc.Outlier = Outlier{
			Consecutive:  od.GetConsecutive_5Xx().GetValue(),
			Interval:     od.GetInterval().AsDuration(),
			BaseEjection: od.GetBaseEjectionTime().AsDuration(),
			MaxPercent:   od.GetMaxEjectionPercent().GetValue(),
		}
		if od.Consecutive_5Xx == nil {
			cc.Outlier.Consecutive = 5
		}
		if cc.Outlier.BaseEjection == 0 {
			cc.Outlier.BaseEjection = 30 * time.Second
		}
		if od.MaxEjectionPercent == nil {
			cc.Outlier.MaxPercent = 10
		}
	}
	if ts := cl.GetTransportSocket(); ts != nil {
		cc.TLS = true
		up := &xds.UpstreamTlsContext{}
		if err := unpack(ts.GetTypedConfig(), upstreamTLSType, up); err != nil {
			return nil, fmt.Errorf("transport socket: %w", err)
		}
		for _, m := range up.GetCommonTlsContext().GetCombinedValidationContext().GetDefaultValidationContext().GetMatchTypedSubjectAltNames() {
			cc.SANs = append(cc.SANs, m.GetMatcher().GetExact())
		}
	}
	if cla == nil {
		cla = cl.GetLoadAssignment()
	}
	if f := cla.GetPolicy().GetOverprovisioningFactor(); f != nil {
		cc.OPF = f.GetValue()
	}
	for _, loc := range cla.GetEndpoints() {
		p := int(loc.GetPriority())
		for len(cc.Priorities) <= p {
			cc.Priorities = append(cc.Priorities, nil)
		}
		for _, e := range loc.GetLbEndpoints() {
			sa := e.GetEndpoint().GetAddress().GetSocketAddress()
			md := e.GetMetadata().GetFilterMetadata()["meshfed"].GetFields()
			h := e.GetHealthStatus()
			addr, sni := net.JoinHostPort(sa.GetAddress(), strconv.Itoa(int(sa.GetPortValue()))), md["sni"].GetStringValue()
			cc.Priorities[p] = append(cc.Priorities[p], Endpoint{
				Key:      addr + "|" + sni,
				Addr:     addr,
				SNI:      sni,
				Site:     md["site"].GetStringValue(),
				Zone:     loc.GetLocality().GetZone(),
				Weight:   max(e.GetLoadBalancingWeight().GetValue(), 1),
				Healthy:  h == xds.LbEndpoint_HEALTHY || h == xds.LbEndpoint_UNKNOWN,
				Priority: p,
			})
		}
	}
	return cc, nil
}

func translateListener(l *xds.Listener, clusters map[string]*Cluster) (*Listener, error) {
	sa := l.GetAddress().GetSocketAddress()
	if sa == nil || len(l.GetFilterChains()) == 0 {
		return nil, nil // an API listener, for proxyless gRPC
	}
	lc := &Listener{Name: l.GetName(), Addr: net.JoinHostPort(sa.GetAddress(), strconv.Itoa(int(sa.GetPortValue()))), Attempts: 1}
	if len(l.GetListenerFilters()) > 0 {
		return translatePassthrough(lc, l, clusters)
	}
	fc := l.GetFilterChains()[0]
	lc.Inbound = fc.GetTransportSocket() != nil
	for _, f := range fc.GetFilters() {
		switch f.GetName() {
		case "envoy.filters.network.tcp_proxy":
			tp := &xds.TcpProxy{}
			if err := unpack(f.GetTypedConfig(), tcpProxyType, tp); err != nil {
				return nil, err
			}
			if n := tp.GetMaxConnectAttempts(); n != nil {
				lc.Attempts = int(n.GetValue())
			}
			if c := tp.GetCluster(); c != "" {
				lc.Routes = []Route{{Cluster: c, Weight: 1}}
			}
			for _, w := range tp.GetWeightedClusters().GetClusters() {
				lc.Routes = append(lc.Routes, Route{Cluster: w.GetName(), Weight: w.GetWeight()})
			}
		case "envoy.filters.network.rbac":
			rb := &xds.RBACFilter{}
			if err := unpack(f.GetTypedConfig(), rbacType, rb); err != nil {
				return nil, err
			}
			if rb.GetRules().GetAction() != xds.RBAC_ALLOW {
				return nil, fmt.Errorf("only ALLOW RBAC rules are supported")
			}
			for _, p := range rb.GetRules().GetPolicies() {
				for _, pr := range p.GetPrincipals() {
					m := pr.GetAuthenticated().GetPrincipalName()
					lc.Allow = append(lc.Allow, Principal{Exact: m.GetExact(), Prefix: m.GetPrefix()})
				}
			}
		}
	}
	for _, r := range lc.Routes {
		if clusters[r.Cluster] == nil {
			return nil, fmt.Errorf("names cluster %s, which the spoke did not send", r.Cluster)
		}
	}
	if lc.Inbound {
		if len(lc.Routes) != 1 {
			return nil, fmt.Errorf("an inbound listener leads to one cluster")
		}
		eps := clusters[lc.Routes[0].Cluster].Priorities
		if len(eps) == 0 || len(eps[0]) == 0 {
			return nil, fmt.Errorf("inbound cluster %s has no app address", lc.Routes[0].Cluster)
		}
		lc.App = eps[0][0].Addr
	}
	sort.Slice(lc.Allow, func(i, j int) bool {
		return lc.Allow[i].Exact+lc.Allow[i].Prefix < lc.Allow[j].Exact+lc.Allow[j].Prefix
	})
	return lc, nil
}

// translatePassthrough reads a gateway listener: each filter chain routes
// the server names it matches to one cluster, without terminating TLS.
func translatePassthrough(lc *Listener, l *xds.Listener, clusters map[string]*Cluster) (*Listener, error) {
	lc.SNI = map[string]Route{}
	for _, fc := range l.GetFilterChains() {
		for _, f := range fc.GetFilters() {
			tp := &xds.TcpProxy{}
			if f.GetName() != "envoy.filters.network.tcp_proxy" || unpack(f.GetTypedConfig(), tcpProxyType, tp) != nil {
				return nil, fmt.Errorf("filter chain %s: want one tcp_proxy", fc.GetName())
			}
			if clusters[tp.GetCluster()] == nil {
				return nil, fmt.Errorf("filter chain %s names cluster %s, which the spoke did not send", fc.GetName(), tp.GetCluster())
			}
			r := Route{Cluster: tp.GetCluster(), Attempts: max(int(tp.GetMaxConnectAttempts().GetValue()), 1)}
			for _, name := range fc.GetFilterChainMatch().GetServerNames() {
				lc.SNI[strings.ToLower(name)] = r
			}
		}
	}
	return lc, nil
}
