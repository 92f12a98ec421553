package proxy

import (
	"crypto/tls"
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
)

// The typed configs inside the resources the proxy reads.
const (
	spiffeValidatorType = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig"
	upstreamTLSType     = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
	tcpProxyType        = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
	rbacType            = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC"
)

// config is the proxy's data-plane configuration, translated from xDS.
type config struct {
	listeners map[string]*listenerConf
	clusters  map[string]*clusterConf
	cert      *tls.Certificate
	bundles   *x509bundle.Set
}

type listenerConf struct {
	name    string
	addr    string
	inbound bool
	// outbound: the clusters new connections are split over.
	routes   []route
	attempts int
	// inbound: who may call, and where the app is.
	allow []principal
	app   string
	// passthrough (a gateway): the route of each SNI; nil otherwise.
	sni map[string]route
}

type route struct {
	cluster  string
	weight   uint32
	attempts int
}

type principal struct {
	exact, prefix string
}

func (p principal) match(id string) bool {
	if p.exact != "" {
		return id == p.exact
	}
	return strings.HasPrefix(id, p.prefix)
}

type clusterConf struct {
	name           string
	connectTimeout time.Duration
	outlier        outlierConf
	opf            uint32
	sans           []string
	tls            bool
	priorities     [][]endpointConf
}

type outlierConf struct {
	consecutive  uint32
	interval     time.Duration
	baseEjection time.Duration
	maxPercent   uint32
}

type endpointConf struct {
	// key identifies the endpoint in outlier state: address and SNI.
	key      string
	addr     string
	sni      string
	site     string
	zone     string
	weight   uint32
	healthy  bool
	priority int
}

// translate turns the node's xDS resources into a config.
func translate(r *resources) (*config, error) {
	c := &config{listeners: map[string]*listenerConf{}, clusters: map[string]*clusterConf{}}
	if err := c.secrets(r.secrets); err != nil {
		return nil, err
	}
	for name, cl := range r.clusters {
		cc, err := translateCluster(cl, r.endpoints[edsName(cl)])
		if err != nil {
			return nil, fmt.Errorf("cluster %s: %w", name, err)
		}
		c.clusters[name] = cc
	}
	for name, l := range r.listeners {
		lc, err := translateListener(l, c.clusters)
		if err != nil {
			return nil, fmt.Errorf("listener %s: %w", name, err)
		}
		if lc != nil {
			c.listeners[name] = lc
		}
	}
	return c, nil
}

func (c *config) secrets(s map[string]*xds.Secret) error {
	tc := s["default"].GetTlsCertificate()
	cert, err := tls.X509KeyPair(tc.GetCertificateChain().GetInlineBytes(), tc.GetPrivateKey().GetInlineBytes())
	if err != nil {
		return fmt.Errorf("secret default: %w", err)
	}
	c.cert = &cert
	v := &xds.SPIFFECertValidatorConfig{}
	if err := unpack(s["federation"].GetValidationContext().GetCustomValidatorConfig().GetTypedConfig(), spiffeValidatorType, v); err != nil {
		return fmt.Errorf("secret federation: want a SPIFFE validator config: %w", err)
	}
	c.bundles = x509bundle.NewSet()
	for _, td := range v.GetTrustDomains() {
		t, err := spiffeid.TrustDomainFromString(td.GetName())
		if err != nil {
			return fmt.Errorf("secret federation: %w", err)
		}
		certs, err := ca.ParseCertsPEM(td.GetTrustBundle().GetInlineBytes())
		if err != nil {
			return fmt.Errorf("secret federation: bundle of %s: %w", td.GetName(), err)
		}
		c.bundles.Add(x509bundle.FromX509Authorities(t, certs))
	}
	return nil
}

func translateCluster(cl *xds.Cluster, cla *xds.ClusterLoadAssignment) (*clusterConf, error) {
	cc := &clusterConf{name: cl.GetName(), connectTimeout: cl.GetConnectTimeout().AsDuration(), opf: 140}
	if cc.connectTimeout <= 0 {
		cc.connectTimeout = 5 * time.Second
	}
	if od := cl.GetOutlierDetection(); od != nil {
		cc.outlier = outlierConf{
			consecutive:  od.GetConsecutive_5Xx().GetValue(),
			interval:     od.GetInterval().AsDuration(),
			baseEjection: od.GetBaseEjectionTime().AsDuration(),
			maxPercent:   od.GetMaxEjectionPercent().GetValue(),
		}
		if od.Consecutive_5Xx == nil {
			cc.outlier.consecutive = 5
		}
		if cc.outlier.baseEjection == 0 {
			cc.outlier.baseEjection = 30 * time.Second
		}
		if od.MaxEjectionPercent == nil {
			cc.outlier.maxPercent = 10
		}
	}
	if ts := cl.GetTransportSocket(); ts != nil {
		cc.tls = true
		up := &xds.UpstreamTlsContext{}
		if err := unpack(ts.GetTypedConfig(), upstreamTLSType, up); err != nil {
			return nil, fmt.Errorf("transport socket: %w", err)
		}
		for _, m := range up.GetCommonTlsContext().GetCombinedValidationContext().GetDefaultValidationContext().GetMatchTypedSubjectAltNames() {
			cc.sans = append(cc.sans, m.GetMatcher().GetExact())
		}
	}
	if cla == nil {
		cla = cl.GetLoadAssignment()
	}
	if f := cla.GetPolicy().GetOverprovisioningFactor(); f != nil {
		cc.opf = f.GetValue()
	}
	for _, loc := range cla.GetEndpoints() {
		p := int(loc.GetPriority())
		for len(cc.priorities) <= p {
			cc.priorities = append(cc.priorities, nil)
		}
		for _, e := range loc.GetLbEndpoints() {
			sa := e.GetEndpoint().GetAddress().GetSocketAddress()
			md := e.GetMetadata().GetFilterMetadata()["meshfed"].GetFields()
			h := e.GetHealthStatus()
			addr, sni := net.JoinHostPort(sa.GetAddress(), strconv.Itoa(int(sa.GetPortValue()))), md["sni"].GetStringValue()
			cc.priorities[p] = append(cc.priorities[p], endpointConf{
				key:      addr + "|" + sni,
				addr:     addr,
				sni:      sni,
				site:     md["site"].GetStringValue(),
				zone:     loc.GetLocality().GetZone(),
				weight:   max(e.GetLoadBalancingWeight().GetValue(), 1),
				healthy:  h == xds.LbEndpoint_HEALTHY || h == xds.LbEndpoint_UNKNOWN,
				priority: p,
			})
		}
	}
	return cc, nil
}

func translateListener(l *xds.Listener, clusters map[string]*clusterConf) (*listenerConf, error) {
	sa := l.GetAddress().GetSocketAddress()
	if sa == nil || len(l.GetFilterChains()) == 0 {
		return nil, nil // an API listener, for proxyless gRPC
	}
	lc := &listenerConf{name: l.GetName(), addr: net.JoinHostPort(sa.GetAddress(), strconv.Itoa(int(sa.GetPortValue()))), attempts: 1}
	if len(l.GetListenerFilters()) > 0 {
		return translatePassthrough(lc, l, clusters)
	}
	fc := l.GetFilterChains()[0]
	lc.inbound = fc.GetTransportSocket() != nil
	for _, f := range fc.GetFilters() {
		switch f.GetName() {
		case "envoy.filters.network.tcp_proxy":
			tp := &xds.TcpProxy{}
			if err := unpack(f.GetTypedConfig(), tcpProxyType, tp); err != nil {
				return nil, err
			}
			if n := tp.GetMaxConnectAttempts(); n != nil {
				lc.attempts = int(n.GetValue())
			}
			if c := tp.GetCluster(); c != "" {
				lc.routes = []route{{cluster: c, weight: 1}}
			}
			for _, w := range tp.GetWeightedClusters().GetClusters() {
				lc.routes = append(lc.routes, route{cluster: w.GetName(), weight: w.GetWeight()})
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
					lc.allow = append(lc.allow, principal{exact: m.GetExact(), prefix: m.GetPrefix()})
				}
			}
		}
	}
	for _, r := range lc.routes {
		if clusters[r.cluster] == nil {
			return nil, fmt.Errorf("names cluster %s, which the spoke did not send", r.cluster)
		}
	}
	if lc.inbound {
		if len(lc.routes) != 1 {
			return nil, fmt.Errorf("an inbound listener leads to one cluster")
		}
		eps := clusters[lc.routes[0].cluster].priorities
		if len(eps) == 0 || len(eps[0]) == 0 {
			return nil, fmt.Errorf("inbound cluster %s has no app address", lc.routes[0].cluster)
		}
		lc.app = eps[0][0].addr
	}
	sort.Slice(lc.allow, func(i, j int) bool {
		return lc.allow[i].exact+lc.allow[i].prefix < lc.allow[j].exact+lc.allow[j].prefix
	})
	return lc, nil
}

// translatePassthrough reads a gateway listener: each filter chain routes
// the server names it matches to one cluster, without terminating TLS.
func translatePassthrough(lc *listenerConf, l *xds.Listener, clusters map[string]*clusterConf) (*listenerConf, error) {
	lc.sni = map[string]route{}
	for _, fc := range l.GetFilterChains() {
		for _, f := range fc.GetFilters() {
			tp := &xds.TcpProxy{}
			if f.GetName() != "envoy.filters.network.tcp_proxy" || unpack(f.GetTypedConfig(), tcpProxyType, tp) != nil {
				return nil, fmt.Errorf("filter chain %s: want one tcp_proxy", fc.GetName())
			}
			if clusters[tp.GetCluster()] == nil {
				return nil, fmt.Errorf("filter chain %s names cluster %s, which the spoke did not send", fc.GetName(), tp.GetCluster())
			}
			r := route{cluster: tp.GetCluster(), attempts: max(int(tp.GetMaxConnectAttempts().GetValue()), 1)}
			for _, name := range fc.GetFilterChainMatch().GetServerNames() {
				lc.sni[strings.ToLower(name)] = r
			}
		}
	}
	return lc, nil
}
