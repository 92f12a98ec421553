package xdsapi

import (
	"strings"
	"testing"

	_ "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	_ "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
)

// envoy names the Envoy message or enum each of ours is a subset of.
var envoy = map[protoreflect.FullName]protoreflect.FullName{
	"DiscoveryRequest":                       "envoy.service.discovery.v3.DiscoveryRequest",
	"DiscoveryResponse":                      "envoy.service.discovery.v3.DiscoveryResponse",
	"Status":                                 "google.rpc.Status",
	"Node":                                   "envoy.config.core.v3.Node",
	"Locality":                               "envoy.config.core.v3.Locality",
	"Address":                                "envoy.config.core.v3.Address",
	"SocketAddress":                          "envoy.config.core.v3.SocketAddress",
	"TransportSocket":                        "envoy.config.core.v3.TransportSocket",
	"DataSource":                             "envoy.config.core.v3.DataSource",
	"Metadata":                               "envoy.config.core.v3.Metadata",
	"Metadata.FilterMetadataEntry":           "envoy.config.core.v3.Metadata.FilterMetadataEntry",
	"TypedExtensionConfig":                   "envoy.config.core.v3.TypedExtensionConfig",
	"Listener":                               "envoy.config.listener.v3.Listener",
	"FilterChain":                            "envoy.config.listener.v3.FilterChain",
	"FilterChainMatch":                       "envoy.config.listener.v3.FilterChainMatch",
	"Filter":                                 "envoy.config.listener.v3.Filter",
	"ListenerFilter":                         "envoy.config.listener.v3.ListenerFilter",
	"TcpProxy":                               "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
	"TcpProxy.WeightedCluster":               "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy.WeightedCluster",
	"TcpProxy.WeightedCluster.ClusterWeight": "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy.WeightedCluster.ClusterWeight",
	"RBACFilter":                             "envoy.extensions.filters.network.rbac.v3.RBAC",
	"RBAC":                                   "envoy.config.rbac.v3.RBAC",
	"RBAC.Action":                            "envoy.config.rbac.v3.RBAC.Action",
	"RBAC.PoliciesEntry":                     "envoy.config.rbac.v3.RBAC.PoliciesEntry",
	"Policy":                                 "envoy.config.rbac.v3.Policy",
	"Principal":                              "envoy.config.rbac.v3.Principal",
	"Principal.Authenticated":                "envoy.config.rbac.v3.Principal.Authenticated",
	"StringMatcher":                          "envoy.type.matcher.v3.StringMatcher",
	"Cluster":                                "envoy.config.cluster.v3.Cluster",
	"Cluster.DiscoveryType":                  "envoy.config.cluster.v3.Cluster.DiscoveryType",
	"Cluster.EdsClusterConfig":               "envoy.config.cluster.v3.Cluster.EdsClusterConfig",
	"OutlierDetection":                       "envoy.config.cluster.v3.OutlierDetection",
	"ClusterLoadAssignment":                  "envoy.config.endpoint.v3.ClusterLoadAssignment",
	"ClusterLoadAssignment.Policy":           "envoy.config.endpoint.v3.ClusterLoadAssignment.Policy",
	"LocalityLbEndpoints":                    "envoy.config.endpoint.v3.LocalityLbEndpoints",
	"LbEndpoint":                             "envoy.config.endpoint.v3.LbEndpoint",
	"LbEndpoint.HealthStatus":                "envoy.config.core.v3.HealthStatus",
	"Endpoint":                               "envoy.config.endpoint.v3.Endpoint",
	"UpstreamTlsContext":                     "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
	"CommonTlsContext":                       "envoy.extensions.transport_sockets.tls.v3.CommonTlsContext",
	"CommonTlsContext.CombinedCertificateValidationContext": "envoy.extensions.transport_sockets.tls.v3.CommonTlsContext.CombinedCertificateValidationContext",
	"CertificateValidationContext":                          "envoy.extensions.transport_sockets.tls.v3.CertificateValidationContext",
	"SubjectAltNameMatcher":                                 "envoy.extensions.transport_sockets.tls.v3.SubjectAltNameMatcher",
	"SPIFFECertValidatorConfig":                             "envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig",
	"SPIFFECertValidatorConfig.TrustDomain":                 "envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig.TrustDomain",
	"Secret":                                                "envoy.extensions.transport_sockets.tls.v3.Secret",
	"TlsCertificate":                                        "envoy.extensions.transport_sockets.tls.v3.TlsCertificate",
	"GenericSecret":                                         "envoy.extensions.transport_sockets.tls.v3.GenericSecret",
}

// theirs is the Envoy name of one of our types; other packages' types
// (google.protobuf) are shared, not copied.
func theirs(n protoreflect.FullName) protoreflect.FullName {
	if local, ok := strings.CutPrefix(string(n), "meshfed.xdsapi."); ok {
		return envoy[protoreflect.FullName(local)]
	}
	return n
}

// TestSubsetOfEnvoy: every field of every message here has the number,
// cardinality and type of the Envoy field of the same name, so Envoy's
// bytes decode into it; every enum value means what Envoy's does.
func TestSubsetOfEnvoy(t *testing.T) {
	fd := File_meshfed_xdsapi_xds_proto
	var walkMsgs func(protoreflect.MessageDescriptors)
	var checkEnums func(protoreflect.EnumDescriptors)
	checkEnums = func(es protoreflect.EnumDescriptors) {
		for i := 0; i < es.Len(); i++ {
			e := es.Get(i)
			want := theirs(e.FullName())
			d, err := protoregistry.GlobalFiles.FindDescriptorByName(want)
			if err != nil || want == "" {
				t.Errorf("%s: no Envoy enum %q: %v", e.FullName(), want, err)
				continue
			}
			ed := d.(protoreflect.EnumDescriptor)
			for j := 0; j < e.Values().Len(); j++ {
				v := e.Values().Get(j)
				ev := ed.Values().ByNumber(v.Number())
				if ev == nil || ev.Name() != v.Name() {
					t.Errorf("%s: value %d is %s here, %v in Envoy", e.FullName(), v.Number(), v.Name(), ev)
				}
			}
		}
	}
	walkMsgs = func(ms protoreflect.MessageDescriptors) {
		for i := 0; i < ms.Len(); i++ {
			m := ms.Get(i)
			want := theirs(m.FullName())
			d, err := protoregistry.GlobalFiles.FindDescriptorByName(want)
			if err != nil || want == "" {
				t.Errorf("%s: no Envoy message %q: %v", m.FullName(), want, err)
				continue
			}
			em := d.(protoreflect.MessageDescriptor)
			for j := 0; j < m.Fields().Len(); j++ {
				f := m.Fields().Get(j)
				ef := em.Fields().ByName(f.Name())
				switch {
				case ef == nil:
					t.Errorf("%s.%s: Envoy's %s has no such field", m.FullName(), f.Name(), want)
				case ef.Number() != f.Number() || ef.Kind() != f.Kind() || ef.Cardinality() != f.Cardinality():
					t.Errorf("%s.%s: %d %v %v here, %d %v %v in Envoy", m.FullName(), f.Name(),
						f.Number(), f.Cardinality(), f.Kind(), ef.Number(), ef.Cardinality(), ef.Kind())
				case f.Message() != nil && theirs(f.Message().FullName()) != ef.Message().FullName():
					t.Errorf("%s.%s: is %s, Envoy's is %s", m.FullName(), f.Name(), f.Message().FullName(), ef.Message().FullName())
				case f.Enum() != nil && theirs(f.Enum().FullName()) != ef.Enum().FullName():
					t.Errorf("%s.%s: is %s, Envoy's is %s", m.FullName(), f.Name(), f.Enum().FullName(), ef.Enum().FullName())
				}
			}
			walkMsgs(m.Messages())
			checkEnums(m.Enums())
		}
	}
	walkMsgs(fd.Messages())
	checkEnums(fd.Enums())
}
