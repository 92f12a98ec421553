package xds

// The clusters a node gets, with their outlier detection and upstream mTLS.

import (
	"cmp"
	"sort"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"github.com/envoyproxy/go-control-plane/pkg/wellknown"
	"github.com/meshfed/meshfed/catalog"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

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
