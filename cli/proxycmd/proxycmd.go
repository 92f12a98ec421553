// Package proxycmd is the `proxy` command: part of the meshfed CLI, and
// the whole of the small meshfed-proxy binary, which links nothing else.
package proxycmd

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime/debug"
	"strconv"
	"strings"
	"time"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	httpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/gateway"
	"github.com/meshfed/meshfed/identityclient"
	"github.com/meshfed/meshfed/proxy"
	"github.com/spf13/cobra"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
	"sigs.k8s.io/yaml"
)

// proxyFlags are what a proxy says about itself to the spoke, shared by
// `proxy` and `proxy bootstrap`.
type proxyFlags struct {
	xds, region, zone, address, outbound string
	inbound                              []string
}

func (pf *proxyFlags) register(cmd *cobra.Command) {
	f := cmd.Flags()
	f.StringVar(&pf.xds, "xds", "127.0.0.1:7182", "the spoke's xDS address")
	f.StringVar(&pf.region, "region", "", "the proxy's region (default: its site's)")
	f.StringVar(&pf.zone, "zone", "", "the proxy's zone (default: its site's)")
	f.StringVar(&pf.address, "address", "", "the IP the workload's endpoints are registered at; inbound listeners bind there")
	f.StringArrayVar(&pf.inbound, "inbound", nil, "ENDPOINT_PORT=APP_HOST:PORT: terminate mTLS on the endpoint port and pass to the app (repeatable)")
	f.StringVar(&pf.outbound, "outbound-prefix", "127.128.0.0/9", "address range of the outbound listeners, one address per service (- for none)")
}

func (pf *proxyFlags) parseInbound() (map[uint32]string, error) {
	out := map[uint32]string{}
	for _, in := range pf.inbound {
		port, app, ok := strings.Cut(in, "=")
		n, err := strconv.ParseUint(port, 10, 16)
		if !ok || err != nil || n == 0 {
			return nil, fmt.Errorf("--inbound %q: want ENDPOINT_PORT=APP_HOST:PORT, for example 9080=127.0.0.1:8080", in)
		}
		if err := catalog.ValidateHostPort("--inbound app address", app); err != nil {
			return nil, err
		}
		out[uint32(n)] = app
	}
	if len(out) > 0 && pf.address == "" {
		return nil, fmt.Errorf("--inbound needs --address: the IP the endpoints are registered at")
	}
	return out, nil
}

// New returns the proxy command; logger and out are the CLI's.
func New(logger func() *slog.Logger, out func() io.Writer) *cobra.Command {
	var pf proxyFlags
	var o proxy.Options
	var ido identityclient.Options
	cmd := &cobra.Command{
		Use:   "proxy",
		Short: "Run the built-in data plane: outbound listeners per service, inbound mTLS with authorization",
		Long: `The proxy attests to its site's spoke with a one-time node token, gets its
configuration over xDS and carries its workload's traffic with mTLS:

  outbound  one listener per federated service port, on an address from
            --outbound-prefix (see 'meshfed service list' for each service's);
            connections go to the closest healthy endpoints (zone, region,
            then other sites in failover order), failed connects are retried
            on the next endpoint and repeated failures eject an endpoint.
  inbound   --inbound 9080=127.0.0.1:8080 terminates mTLS on the registered
            endpoint port, checks the caller's SPIFFE ID against the service's
            policy, and passes the connection to the app.`,
		Example: `  meshfed proxy --identity 10.0.0.2:7181 --xds 10.0.0.2:7182 --token "$NODE_TOKEN" \
    --workload spiffe://east.meshfed/ns/default/sa/echo --address 10.0.0.7 --inbound 9080=127.0.0.1:8080`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			in, err := pf.parseInbound()
			if err != nil {
				return err
			}
			id, err := attest(ctx, ido, logger())
			if err != nil {
				return err
			}
			o.XDS, o.Identity, o.Address, o.Inbound, o.OutboundPrefix = pf.xds, id, pf.address, in, pf.outbound
			o.Locality = catalog.Locality{Region: pf.region, Zone: pf.zone}
			o.Logger = logger()
			p, err := proxy.New(o)
			if err != nil {
				return err
			}
			return p.Run(ctx)
		},
	}
	pf.register(cmd)
	identityFlags(cmd, &ido, &o, "127.0.0.1:15090")
	cmd.Flags().StringVar(&ido.Workload, "workload", "", "run as this workload's SPIFFE ID (the host must run one of its endpoints); default: the node's ID")
	cmd.AddCommand(newBootstrapCmd(out))
	return cmd
}

// identityFlags registers what the proxy and the gateway share: how they
// attest, and their HTTP and drain settings.
func identityFlags(cmd *cobra.Command, ido *identityclient.Options, o *proxy.Options, httpDefault string) {
	f := cmd.Flags()
	f.StringVar(&ido.Addr, "identity", "127.0.0.1:7181", "the spoke's identity (SVID) API")
	f.StringVar(&ido.Token, "token", "", "one-time node token from `meshfed vm token create` (or MESHFED_TOKEN)")
	f.StringVar(&ido.KubernetesTokenFile, "kubernetes-token-file", "", "in a pod, instead of --token: a projected ServiceAccount token with audience meshfed")
	f.StringVar(&ido.CAFile, "ca-file", "", "with --kubernetes-token-file: the site's CA certificates (the spoke's ConfigMap meshfed-system/meshfed-site-bundle)")
	f.StringVar(&o.HTTPListen, "http-listen", httpDefault, "address for /healthz, /readyz and /metrics (- disables)")
	f.DurationVar(&o.DrainTimeout, "drain-timeout", 10*time.Second, "how long live connections may finish after SIGTERM")
}

// attest gets the process's SVID from its spoke with a node token.
func attest(ctx context.Context, ido identityclient.Options, log *slog.Logger) (*identityclient.Client, error) {
	if ido.Token == "" {
		ido.Token = os.Getenv("MESHFED_TOKEN")
	}
	if ido.Token == "" && ido.KubernetesTokenFile == "" {
		return nil, fmt.Errorf("--token (or MESHFED_TOKEN) is required: create one with `meshfed vm token create --site SITE --node NODE`; in a pod, pass --kubernetes-token-file and --ca-file instead")
	}
	if ido.KubernetesTokenFile != "" && ido.CAFile == "" {
		return nil, fmt.Errorf("--kubernetes-token-file needs --ca-file: the site's CA certificates, which the spoke publishes in ConfigMap meshfed-system/meshfed-site-bundle")
	}
	ido.Logger = log
	return identityclient.New(ctx, ido)
}

// NewGateway returns the gateway command.
func NewGateway(logger func() *slog.Logger) *cobra.Command {
	var o gateway.Options
	var ido identityclient.Options
	var xdsAddr string
	cmd := &cobra.Command{
		Use:   "gateway --site SITE",
		Short: "Run the site's east-west gateway: TLS passthrough by SNI to exported services, never an open relay",
		Long: `The gateway reads the server name (SNI) of each TLS connection from its
ClientHello without decrypting it, and passes the connection to a healthy
local endpoint of the exported service that name stands for
([<subset>.]<port>.<name>.<namespace>.<site>.<federation>). Any other name, a
malformed or oversized hello, or one that does not arrive within --hello-timeout is
refused and counted. It takes its routes from its spoke over xDS and, with
--gossip-listen, joins the WAN gossip pool so other sites stop sending
traffic here within about a second of its death. SIGTERM: it leaves the
pool, stops accepting, and lets live connections finish (--drain-timeout).`,
		Example: `  meshfed gateway --site east --listen :15443 --identity 10.0.0.2:7181 --xds 10.0.0.2:7182 \
    --token "$NODE_TOKEN" --gossip-listen :7947`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			if os.Getenv("GOGC") == "" {
				// A gateway's heap is small and short-lived per connection:
				// collecting less often costs some memory, saves latency.
				debug.SetGCPercent(400)
			}
			id, err := attest(ctx, ido, logger())
			if err != nil {
				return err
			}
			o.Proxy.XDS, o.Proxy.Identity, o.Logger = xdsAddr, id, logger()
			g, err := gateway.New(o)
			if err != nil {
				return err
			}
			return g.Run(ctx)
		},
	}
	identityFlags(cmd, &ido, &o.Proxy, "127.0.0.1:15091")
	f := cmd.Flags()
	f.StringVar(&o.Site, "site", "", "the gateway's site (required)")
	f.StringVar(&o.Listen, "listen", ":15443", "where other sites connect: what the site's --gateway-address leads to")
	f.StringVar(&xdsAddr, "xds", "127.0.0.1:7182", "the spoke's xDS address")
	f.StringVar(&o.GossipListen, "gossip-listen", "", "join the WAN gossip pool here (UDP and TCP), e.g. :7947")
	f.StringVar(&o.GossipAdvertise, "gossip-advertise", "", "where pool members reach this gateway (default --gossip-listen)")
	f.DurationVar(&o.Proxy.HelloTimeout, "hello-timeout", 5*time.Second, "how long a caller may take to send its ClientHello")
	_ = cmd.MarkFlagRequired("site")
	return cmd
}

func newBootstrapCmd(out func() io.Writer) *cobra.Command {
	var pf proxyFlags
	var id, certFile, keyFile, caFile string
	var envoy bool
	cmd := &cobra.Command{
		Use:   "bootstrap --envoy",
		Short: "Print an Envoy bootstrap that takes its configuration from the spoke (bring your own Envoy)",
		Long: `Prints an Envoy v3 bootstrap (YAML) whose node is --id and whose ADS
connection to the spoke uses mTLS with the given SVID files. Envoy then gets
the same listeners, clusters, endpoints and secrets the meshfed proxy gets.
meshfed does not ship or test Envoy itself; the resources are checked with
Envoy's own validation rules.`,
		Example: `  meshfed proxy bootstrap --envoy --id spiffe://east.meshfed/ns/default/sa/echo --xds 10.0.0.2:7182 \
    --cert-file svid.pem --key-file svid-key.pem --ca-file bundle.pem > envoy.yaml`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if !envoy {
				return fmt.Errorf("only --envoy bootstraps exist: pass --envoy")
			}
			in, err := pf.parseInbound()
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
			_, err = out().Write(y)
			return err
		},
	}
	pf.register(cmd)
	f := cmd.Flags()
	f.BoolVar(&envoy, "envoy", false, "print an Envoy bootstrap")
	f.StringVar(&id, "id", "", "the node's SPIFFE ID, which its SVID must carry (required)")
	f.StringVar(&certFile, "cert-file", "/etc/meshfed/svid.pem", "the SVID chain Envoy presents to the spoke")
	f.StringVar(&keyFile, "key-file", "/etc/meshfed/svid-key.pem", "the SVID's key")
	f.StringVar(&caFile, "ca-file", "/etc/meshfed/bundle.pem", "the site's CA bundle, which the spoke's certificate chains to")
	_ = cmd.MarkFlagRequired("id")
	return cmd
}

func envoyBootstrap(id string, pf proxyFlags, in map[uint32]string, certFile, keyFile, caFile string) (*bootstrapv3.Bootstrap, error) {
	host, portStr, err := net.SplitHostPort(pf.xds)
	if err != nil {
		return nil, fmt.Errorf("--xds %q: %w", pf.xds, err)
	}
	port, _ := strconv.ParseUint(portStr, 10, 16)
	md := map[string]any{"meshfed.outbound_prefix": pf.outbound}
	if pf.address != "" {
		md["meshfed.address"] = pf.address
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
	tlsCtx := &tlsv3.UpstreamTlsContext{CommonTlsContext: &tlsv3.CommonTlsContext{
		TlsCertificates:       []*tlsv3.TlsCertificate{{CertificateChain: file(certFile), PrivateKey: file(keyFile)}},
		ValidationContextType: &tlsv3.CommonTlsContext_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{TrustedCa: file(caFile)}},
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
	if pf.region != "" || pf.zone != "" {
		b.Node.Locality = &corev3.Locality{Region: pf.region, Zone: pf.zone}
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
