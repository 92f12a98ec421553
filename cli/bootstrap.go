package cli

import (
	"encoding/json"
	"fmt"
	"net"
	"path/filepath"
	"strconv"
	"time"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	httpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"github.com/meshfed/meshfed/cli/proxycmd"
	"github.com/meshfed/meshfed/identityclient"
	"github.com/meshfed/meshfed/spoke/xds"
	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
	"sigs.k8s.io/yaml"
)

// newProxyCmd is `proxy` with the subcommand that needs Envoy's own API,
// which the meshfed-proxy binary leaves out.
func newProxyCmd(g *globals) *cobra.Command {
	cmd := proxycmd.New(g.logger)
	cmd.AddCommand(newBootstrapCmd(g))
	return cmd
}

// newBootstrapCmd returns `proxy bootstrap --envoy|--grpc`.
func newBootstrapCmd(g *globals) *cobra.Command {
	var pf proxycmd.Flags
	var id, dir, certFile, keyFile, caFile, fedFile string
	var envoy, grpc bool
	cmd := &cobra.Command{
		Use:   "bootstrap --envoy|--grpc",
		Short: "Print a bootstrap that takes its configuration from the spoke: Envoy (bring your own) or proxyless gRPC",
		Long: `--envoy prints an Envoy v3 bootstrap (YAML) whose node is --id and whose ADS
connection to the spoke uses mTLS with the given SVID files. Envoy then gets
the same listeners, clusters, endpoints and secrets the meshfed proxy gets.
meshfed does not ship or test Envoy itself; the resources are checked with
Envoy's own validation rules.

--grpc prints a gRPC xDS bootstrap (JSON, for GRPC_XDS_BOOTSTRAP): the same
ADS connection, and the certificate provider "` + xds.GRPCCertProvider + `" (file_watcher over
the same files) that the spoke's clusters name, so calls to xds:///<service>
use mTLS with the SVID, to local endpoints and through other sites'
gateways. 'meshfed svid --dir DIR' keeps the files; --dir DIR finds them.`,
		Example: `  meshfed svid --identity 10.0.0.2:7181 --token "$NODE_TOKEN" --dir /etc/meshfed &
  meshfed proxy bootstrap --envoy --id spiffe://east.meshfed/ns/default/sa/echo --xds 10.0.0.2:7182 \
    --dir /etc/meshfed > envoy.yaml
  meshfed proxy bootstrap --grpc --id spiffe://east.meshfed/meshfed/node/host-7 --xds 10.0.0.2:7182 \
    --dir /etc/meshfed > grpc-bootstrap.json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if envoy == grpc {
				return fmt.Errorf("pass one of --envoy and --grpc")
			}
			for flag, v := range map[string]*string{"cert-file": &certFile, "key-file": &keyFile, "ca-file": &caFile, "federation-file": &fedFile} {
				if !cmd.Flags().Changed(flag) {
					*v = filepath.Join(dir, filepath.Base(*v))
				}
			}
			if grpc {
				js, err := grpcBootstrap(id, pf, certFile, keyFile, caFile, fedFile)
				if err != nil {
					return err
				}
				_, err = g.out.Write(js)
				return err
			}
			in, err := pf.Inbound()
			if err != nil {
				return err
			}
			b, err := envoyBootstrap(id, pf, in, certFile, keyFile, caFile)
			if err != nil {
				return err
			}
			js, err := protojson.Marshal(b)
			if err != nil {
				return err
			}
			y, err := yaml.JSONToYAML(js)
			if err != nil {
				return err
			}
			_, err = g.out.Write(y)
			return err
		},
	}
	pf.Register(cmd)
	f := cmd.Flags()
	f.BoolVar(&envoy, "envoy", false, "print an Envoy bootstrap")
	f.BoolVar(&grpc, "grpc", false, "print a proxyless gRPC bootstrap")
	f.StringVar(&id, "id", "", "the node's SPIFFE ID, which its SVID must carry (required)")
	f.StringVar(&dir, "dir", "/etc/meshfed", "the `directory` where 'meshfed svid' keeps the files: the default one of the file flags")
	f.StringVar(&certFile, "cert-file", identityclient.FileSVID, "the SVID chain presented to the spoke (and, with --grpc, to services)")
	f.StringVar(&keyFile, "key-file", identityclient.FileKey, "the SVID's key")
	f.StringVar(&caFile, "ca-file", identityclient.FileBundle, "the site's CA bundle, which the spoke's certificate chains to")
	f.StringVar(&fedFile, "federation-file", identityclient.FileFederationMap, "with --grpc: the SPIFFE bundle map of every federated trust domain (next to it, "+identityclient.FileFederation+" with the same roots as PEM)")
	_ = cmd.MarkFlagRequired("id")
	return cmd
}

// grpcBootstrap is a gRPC xDS bootstrap (gRFC A27) for node id: ADS to the
// spoke over mTLS, and the certificate provider the spoke's clusters name.
// The provider carries both a PEM root list and a SPIFFE bundle map; gRPC
// prefers the map (each peer checked against its own trust domain's
// bundle) when GRPC_EXPERIMENTAL_XDS_MTLS_SPIFFE=true.
func grpcBootstrap(id string, pf proxycmd.Flags, certFile, keyFile, caFile, fedFile string) ([]byte, error) {
	if _, err := spiffeid.FromString(id); err != nil {
		return nil, fmt.Errorf("--id %q is not a SPIFFE ID: %w", id, err)
	}
	if _, _, err := net.SplitHostPort(pf.XDS); err != nil {
		return nil, fmt.Errorf("--xds %q: %w", pf.XDS, err)
	}
	// The SVID renews at half-life: both readers pick up new files within
	// a minute.
	const refresh = "60s"
	node := map[string]any{"id": id}
	if pf.Region != "" || pf.Zone != "" {
		node["locality"] = map[string]string{"region": pf.Region, "zone": pf.Zone}
	}
	b := map[string]any{
		"xds_servers": []any{map[string]any{
			"server_uri": pf.XDS,
			"channel_creds": []any{map[string]any{"type": "tls", "config": map[string]string{
				"ca_certificate_file": caFile, "certificate_file": certFile, "private_key_file": keyFile, "refresh_interval": refresh,
			}}},
			"server_features": []string{"xds_v3"},
		}},
		"node": node,
		// An xDS-enabled gRPC server asks for the listener of its address.
		"server_listener_resource_name_template": xds.GRPCServerListenerPrefix + "%s",
		"certificate_providers": map[string]any{xds.GRPCCertProvider: map[string]any{
			"plugin_name": "file_watcher",
			"config": map[string]string{
				"certificate_file": certFile, "private_key_file": keyFile,
				"ca_certificate_file":          filepath.Join(filepath.Dir(fedFile), identityclient.FileFederation),
				"spiffe_trust_bundle_map_file": fedFile,
				"refresh_interval":             refresh,
			},
		}},
	}
	out, err := json.MarshalIndent(b, "", "  ")
	return append(out, '\n'), err
}

func envoyBootstrap(id string, pf proxycmd.Flags, in map[uint32]string, certFile, keyFile, caFile string) (*bootstrapv3.Bootstrap, error) {
	host, portStr, err := net.SplitHostPort(pf.XDS)
	if err != nil {
		return nil, fmt.Errorf("--xds %q: %w", pf.XDS, err)
	}
	port, _ := strconv.ParseUint(portStr, 10, 16)
	md := map[string]any{"meshfed.outbound_prefix": pf.Outbound}
	if pf.Address != "" {
		md["meshfed.address"] = pf.Address
	}
	if len(in) > 0 {
		m := map[string]any{}
		for p, app := range in {
			m[strconv.Itoa(int(p))] = app
		}
		md["meshfed.inbound"] = m
	}
	st, err := structpb.NewStruct(md)
	if err != nil {
		return nil, err
	}
	ads := &corev3.ConfigSource{ResourceApiVersion: corev3.ApiVersion_V3, ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}}}
	file := func(p string) *corev3.DataSource {
		return &corev3.DataSource{Specifier: &corev3.DataSource_Filename{Filename: p}}
	}
	// `meshfed svid` renews the files by moving its ..data link in their
	// directory: Envoy reloads them when it sees that move.
	watch := func(p string) *corev3.WatchedDirectory { return &corev3.WatchedDirectory{Path: filepath.Dir(p)} }
	tlsCtx := &tlsv3.UpstreamTlsContext{CommonTlsContext: &tlsv3.CommonTlsContext{
		TlsCertificates: []*tlsv3.TlsCertificate{{CertificateChain: file(certFile), PrivateKey: file(keyFile), WatchedDirectory: watch(certFile)}},
		ValidationContextType: &tlsv3.CommonTlsContext_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
			TrustedCa: file(caFile), WatchedDirectory: watch(caFile),
		}},
	}}
	h2 := &httpv3.HttpProtocolOptions{UpstreamProtocolOptions: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_{ExplicitHttpConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig{
		ProtocolConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions{Http2ProtocolOptions: &corev3.Http2ProtocolOptions{}},
	}}}
	b := &bootstrapv3.Bootstrap{
		Node: &corev3.Node{Id: id, Cluster: "meshfed", Metadata: st},
		DynamicResources: &bootstrapv3.Bootstrap_DynamicResources{
			AdsConfig: &corev3.ApiConfigSource{
				ApiType: corev3.ApiConfigSource_GRPC, TransportApiVersion: corev3.ApiVersion_V3,
				GrpcServices: []*corev3.GrpcService{{TargetSpecifier: &corev3.GrpcService_EnvoyGrpc_{EnvoyGrpc: &corev3.GrpcService_EnvoyGrpc{ClusterName: "meshfed_xds"}}}},
			},
			CdsConfig: ads,
			LdsConfig: ads,
		},
		StaticResources: &bootstrapv3.Bootstrap_StaticResources{Clusters: []*clusterv3.Cluster{{
			Name:                 "meshfed_xds",
			ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_STRICT_DNS},
			ConnectTimeout:       durationpb.New(5 * time.Second),
			LoadAssignment: &endpointv3.ClusterLoadAssignment{ClusterName: "meshfed_xds", Endpoints: []*endpointv3.LocalityLbEndpoints{{
				LbEndpoints: []*endpointv3.LbEndpoint{{HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{
					Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
						Address: host, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: uint32(port)},
					}}},
				}}}},
			}}},
			TypedExtensionProtocolOptions: map[string]*anypb.Any{"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": mustAny(h2)},
			TransportSocket:               &corev3.TransportSocket{Name: "envoy.transport_sockets.tls", ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: mustAny(tlsCtx)}},
		}}},
	}
	if pf.Region != "" || pf.Zone != "" {
		b.Node.Locality = &corev3.Locality{Region: pf.Region, Zone: pf.Zone}
	}
	if err := b.Validate(); err != nil {
		return nil, fmt.Errorf("bootstrap: %w", err)
	}
	return b, nil
}

func mustAny(m proto.Message) *anypb.Any {
	a, err := anypb.New(m)
	if err != nil {
		panic(err)
	}
	return a
}
