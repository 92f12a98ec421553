package e2e

import (
	"bytes"
	"cmp"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3" // in the bootstrap's Any
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/meshfed/meshfed/test/harness"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	xdscreds "google.golang.org/grpc/credentials/xds"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/xds"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/wrapperspb"
	"sigs.k8s.io/yaml"
)

// whoServer is a gRPC server that answers /meshfed.test.Who/Name with its
// name.
func whoServer(t *testing.T, name string) (addr string, stop func()) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer(answer(name))
	go func() { _ = s.Serve(ln) }()
	t.Cleanup(s.Stop)
	return ln.Addr().String(), s.Stop
}

// answer makes a server answer every call with name.
func answer(name string) grpc.ServerOption {
	return grpc.UnknownServiceHandler(func(_ any, stream grpc.ServerStream) error {
		var in wrapperspb.StringValue
		if err := stream.RecvMsg(&in); err != nil {
			return err
		}
		return stream.SendMsg(wrapperspb.String(name))
	})
}

// answeredBy is a condition: a call on conn is answered by want.
func answeredBy(conn *grpc.ClientConn, want string) func() error {
	return func() error {
		name, err := askWho(conn)
		if err != nil || name != want {
			return fmt.Errorf("%q %v", name, err)
		}
		return nil
	}
}

// xdsConn is a proxyless client of target with gRPC's xDS credentials
// (mTLS as the spoke's clusters say).
func xdsConn(t *testing.T, bootstrap []byte, target string) *grpc.ClientConn {
	t.Helper()
	creds, err := xdscreds.NewClientCredentials(xdscreds.ClientOptions{FallbackCreds: insecure.NewCredentials()})
	if err != nil {
		t.Fatal(err)
	}
	return xdsConnWith(t, bootstrap, target, creds)
}

// plainXDSConn is a proxyless client of target with plain-text
// credentials: gRPC then ignores the clusters' mTLS and dials the
// endpoints (plain gRPC servers) as they are.
func plainXDSConn(t *testing.T, bootstrap []byte, target string) *grpc.ClientConn {
	t.Helper()
	return xdsConnWith(t, bootstrap, target, insecure.NewCredentials())
}

func xdsConnWith(t *testing.T, bootstrap []byte, target string, creds credentials.TransportCredentials) *grpc.ClientConn {
	t.Helper()
	resolver, err := xds.NewXDSResolverWithConfigForTesting(bootstrap)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient(target, grpc.WithResolvers(resolver), grpc.WithTransportCredentials(creds))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// askWho calls /meshfed.test.Who/Name once.
func askWho(conn *grpc.ClientConn) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	out := &wrapperspb.StringValue{}
	err := conn.Invoke(ctx, "/meshfed.test.Who/Name", wrapperspb.String("?"), out)
	return out.GetValue(), err
}

// grpcClient is how a user sets up a proxyless gRPC client of site s:
// `meshfed svid` keeps node's SVID and the bundles in a directory, and
// `meshfed proxy bootstrap --grpc` writes the bootstrap that uses them.
// http is the svid command's HTTP address. With workload set, the SVID
// and the node ID are that workload's.
func (f *federation) grpcClient(t *testing.T, s *spokeProc, node, workload string) (dir string, bootstrap []byte, http string) {
	t.Helper()
	dir = filepath.Join(t.TempDir(), "meshfed")
	token := strings.TrimSpace(f.mustCLI("vm", "token", "create", "--site", s.site, "--node", node))
	http = harness.FreePort(t)
	harness.Start(t, "svid-"+node, f.bin, "svid", "--identity", s.identity, "--token", token, "--dir", dir, "--http-listen", http, "--workload", workload)
	harness.WaitReady(t, http, 20*time.Second)
	for _, name := range []string{"svid.pem", "svid-key.pem", "bundle.pem", "federation.pem", "federation.json"} {
		st, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != 0o600 {
			t.Errorf("%s has mode %v, want 0600", name, st.Mode().Perm())
		}
	}
	id := cmp.Or(workload, "spiffe://"+s.site+".test.meshfed/meshfed/node/"+node)
	out := f.mustCLI("proxy", "bootstrap", "--grpc", "--id", id, "--xds", s.xds, "--dir", dir, "--region", "r1", "--zone", s.site+"-1")
	return dir, []byte(out), http
}

func whoEndpoint(addr, zone string) string {
	host, port, _ := net.SplitHostPort(addr)
	return fmt.Sprintf("  - {address: %s, port: %s, region: r1, zone: %s}\n", host, port, zone)
}

// TestProxylessGRPC: grpc-go's own xDS client, bootstrapped at a spoke,
// resolves xds:///who.default:9090, balances over the endpoints of its
// zone and fails over to the next priority when they stop. `meshfed svid`
// rewrites the files as the (4 s) SVID renews. A delta ADS stream gets the
// same listener.
func TestProxylessGRPC(t *testing.T) {
	a1, stopA1 := whoServer(t, "a1")
	a2, stopA2 := whoServer(t, "a2")
	b1, _ := whoServer(t, "b1")
	f := newFederation(t)
	c := f.addSite("c", "r1/c-1", "services:\n- namespace: default\n  name: who\n  ports: [{name: grpc, port: 9090, protocol: TCP}]\n  endpoints:\n"+
		whoEndpoint(a1, "c-1")+whoEndpoint(a2, "c-1")+whoEndpoint(b1, "c-2"), "--svid-ttl", "4s")
	harness.WaitReady(t, c.http, 20*time.Second)

	svidStarted := time.Now()
	dir, bootstrap, svidHTTP := f.grpcClient(t, c, "grpc-host", "")
	first, err := os.ReadFile(filepath.Join(dir, "svid.pem"))
	if err != nil {
		t.Fatal(err)
	}
	conn := plainXDSConn(t, bootstrap, "xds:///who.default:9090")
	who := func() (string, error) { return askWho(conn) }
	harness.Eventually(t, 20*time.Second, "first call over xds:///", func() error {
		_, err := who()
		return err
	})
	// grpc-go's round robin uses an endpoint once its connection is ready,
	// so the first calls may all go to one; zone c-2 must never answer.
	harness.Eventually(t, 20*time.Second, "calls spread over both endpoints of zone c-1", func() error {
		seen := map[string]int{}
		for i := 0; i < 40; i++ {
			name, err := who()
			if err != nil {
				t.Fatal(err)
			}
			seen[name]++
		}
		if seen["b1"] != 0 {
			t.Fatalf("40 calls: %v; zone c-2 answered while zone c-1 is healthy", seen)
		}
		if seen["a1"] == 0 || seen["a2"] == 0 {
			return fmt.Errorf("40 calls: %v; want both endpoints of zone c-1", seen)
		}
		return nil
	})

	stopA1()
	stopA2()
	harness.Eventually(t, 20*time.Second, "failover to zone c-2", answeredBy(conn, "b1"))
	for i := 0; i < 20; i++ {
		if name, err := who(); err != nil || name != "b1" {
			t.Fatalf("after failover: %q %v", name, err)
		}
	}

	t.Run("meshfed svid rewrites the files as the SVID renews", func(t *testing.T) {
		harness.Eventually(t, 15*time.Second, "a renewed SVID in the files, with its key", func() error {
			if _, err := tls.LoadX509KeyPair(filepath.Join(dir, "svid.pem"), filepath.Join(dir, "svid-key.pem")); err != nil {
				return err
			}
			if now, err := os.ReadFile(filepath.Join(dir, "svid.pem")); err != nil || bytes.Equal(now, first) {
				return fmt.Errorf("svid.pem not rewritten yet (%v)", err)
			}
			if v, err := harness.Metric(svidHTTP, "meshfed_svid_file_writes_total", `result="ok"`); err != nil || v < 2 {
				return fmt.Errorf("writes: %v (%v)", v, err)
			}
			return nil
		})
		// Renewed at half-life (2 s), not over and over: a 4 s SVID's
		// NotBefore lies a minute back, before its half-life counted
		// from the NotBefore.
		up := time.Since(svidStarted)
		if v, err := harness.Metric(svidHTTP, "meshfed_svid_file_writes_total", `result="ok"`); err != nil || v > 2+up.Seconds() {
			t.Errorf("%v writes of the SVID files in %v (%v); want about one per 2 s", v, up.Round(time.Second), err)
		}
	})

	t.Run("meshfed svid --once writes the files and exits", func(t *testing.T) {
		once := t.TempDir()
		token := strings.TrimSpace(f.mustCLI("vm", "token", "create", "--site", "c", "--node", "once-host"))
		if _, err := harness.Run(f.bin, "svid", "--once", "--identity", c.identity, "--token", token, "--dir", once); err != nil {
			t.Fatal(err)
		}
		if _, err := tls.LoadX509KeyPair(filepath.Join(once, "svid.pem"), filepath.Join(once, "svid-key.pem")); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("delta ADS", func(t *testing.T) {
		ads := adsClient(t, c, dir)
		id := "spiffe://c.test.meshfed/meshfed/node/grpc-host"
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		stream, err := ads.DeltaAggregatedResources(ctx)
		if err != nil {
			t.Fatal(err)
		}
		node := &corev3.Node{Id: id, UserAgentName: "gRPC Go delta test"}
		if err := stream.Send(&discoveryv3.DeltaDiscoveryRequest{Node: node, TypeUrl: resource.ListenerType}); err != nil {
			t.Fatal(err)
		}
		resp, err := stream.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.GetResources()) != 1 || resp.GetResources()[0].GetName() != "who.default:9090" {
			t.Fatalf("delta listeners: %v", resp.GetResources())
		}

		// A node ID that is not the caller's SPIFFE ID is refused.
		spoof, err := ads.StreamAggregatedResources(ctx)
		if err != nil {
			t.Fatal(err)
		}
		node.Id = "spiffe://c.test.meshfed/ns/default/sa/someone-else"
		if err := spoof.Send(&discoveryv3.DiscoveryRequest{Node: node, TypeUrl: resource.ListenerType}); err != nil {
			t.Fatal(err)
		}
		if _, err := spoof.Recv(); status.Code(err) != codes.PermissionDenied {
			t.Fatalf("a stream with another node ID: %v; want PermissionDenied", err)
		}
	})
}

// TestProxylessGRPCEjectsAFailingEndpoint: gRPC has no consecutive-failure
// ejection, so for a gRPC node the spoke turns a policy's outlier detection
// into gRPC's failure-percentage ejection. Of two endpoints, one answers
// every call with an error: once it is ejected, every call is answered.
func TestProxylessGRPCEjectsAFailingEndpoint(t *testing.T) {
	good, _ := whoServer(t, "good")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var sickCalls atomic.Int64
	sick := grpc.NewServer(grpc.UnknownServiceHandler(func(any, grpc.ServerStream) error {
		sickCalls.Add(1)
		return status.Error(codes.Internal, "this endpoint fails every call")
	}))
	go func() { _ = sick.Serve(ln) }()
	t.Cleanup(sick.Stop)

	f := newFederation(t)
	c := f.addSite("c", "r1/c-1", "services:\n- namespace: default\n  name: who\n  ports: [{name: grpc, port: 9090, protocol: TCP}]\n  endpoints:\n"+
		whoEndpoint(good, "c-1")+whoEndpoint(ln.Addr().String(), "c-1"))
	harness.WaitReady(t, c.http, 20*time.Second)
	policy := filepath.Join(f.dir, "policy.yaml")
	writeFile(t, policy, "service: default/who\noutlierDetection: {consecutiveFailures: 3, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 50}\n")
	f.mustCLI("policy", "apply", "-f", policy)
	_, bootstrap, _ := f.grpcClient(t, c, "grpc-host", "")
	conn := plainXDSConn(t, bootstrap, "xds:///who.default:9090")

	// The picker may start with the good endpoint alone, before the
	// failing one is connected: calls in a row answered by good count only
	// once the failing endpoint has had calls of its own.
	failed := 0
	harness.Eventually(t, 20*time.Second, "the failing endpoint called, then ejected: 40 calls in a row answered by good", func() error {
		for i := range 40 {
			name, err := askWho(conn)
			if err != nil {
				failed++
				return fmt.Errorf("call %d: %v", i, err)
			}
			if name != "good" {
				t.Fatalf("answered by %q", name)
			}
		}
		if sickCalls.Load() == 0 {
			return errors.New("the failing endpoint has had no call yet")
		}
		return nil
	})
	t.Logf("%d calls failed before the failing endpoint was ejected", failed)
}

// adsClient is an ADS client of s's xDS server that presents dir's SVID.
func adsClient(t *testing.T, s *spokeProc, dir string) discoveryv3.AggregatedDiscoveryServiceClient {
	t.Helper()
	cc, err := grpc.NewClient("passthrough:///"+s.xds, grpc.WithTransportCredentials(mtlsCreds(t, dir)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return discoveryv3.NewAggregatedDiscoveryServiceClient(cc)
}

// mtlsCreds presents dir's SVID and trusts dir's bundle.
func mtlsCreds(t *testing.T, dir string) credentials.TransportCredentials {
	t.Helper()
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "svid.pem"), filepath.Join(dir, "svid-key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	b, _ := os.ReadFile(filepath.Join(dir, "bundle.pem"))
	pool.AppendCertsFromPEM(b)
	return credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: pool, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS13})
}

// TestProxylessGRPCAcrossSites: a proxyless gRPC client in site c, set up
// with `meshfed svid` and `meshfed proxy bootstrap --grpc`, calls
// default/who with mTLS (gRPC's xDS credentials): first the endpoint in
// its own site, behind a meshfed proxy; when that dies, west's, through
// west's gateway (known by a DNS name), which routes by the SNI gRPC takes
// from the endpoint's host name. Both proxies admit the caller by its SPIFFE ID.
func TestProxylessGRPCAcrossSites(t *testing.T) {
	f := newFederation(t)
	cIn, westIn := freeAddr(t, "127.0.0.31"), freeAddr(t, "127.0.0.32")
	westGW := freeAddr(t, "127.0.0.1")
	// West's gateway is known by host name, as a cloud load balancer is.
	_, westPort, _ := net.SplitHostPort(westGW)
	f.gateways["west"] = "localhost:" + westPort
	// Another service: gRPC asks for one listener by name while the site
	// serves more.
	c := f.addSite("c", "r1/c-1", echoServices("who", "v1", "c", cIn)+"- {namespace: default, name: other, ports: [{port: 7000}], endpoints: [{address: 127.0.0.33, port: 7000}]}\n")
	west := f.addSite("west", "r2/w-1", echoServices("who", "v1", "west", westIn))
	for _, s := range []*spokeProc{c, west} {
		harness.WaitReady(t, s.http, 20*time.Second)
	}
	policy := filepath.Join(f.dir, "policy.yaml")
	writeFile(t, policy, "service: default/who\nallow: [spiffe://c.test.meshfed/meshfed/node/grpc-host]\n")
	f.mustCLI("policy", "apply", "-f", policy)

	proxies := map[string]*proxyProc{}
	for _, x := range []struct {
		s  *spokeProc
		in string
	}{{c, cIn}, {west, westIn}} {
		app, _ := whoServer(t, x.s.site)
		host, port, _ := net.SplitHostPort(x.in)
		proxies[x.s.site] = f.startProxy(t, x.s, x.s.site+"-host", "--workload", "spiffe://"+x.s.site+".test.meshfed/ns/default/sa/echo",
			"--address", host, "--inbound", port+"="+app, "--outbound-prefix", "-")
	}
	gw := f.startDataPlane(t, west, "gateway", "west-gw", "--site", "west", "--listen", westGW)

	dir, bootstrap, _ := f.grpcClient(t, c, "grpc-host", "")

	// A gRPC client with its own TLS (the SVID files, SPIFFE checks) may
	// call a proxied endpoint directly too: the inbound agrees to h2, which
	// grpc-go's TLS credentials insist on.
	svid, err := x509svid.Load(filepath.Join(dir, "svid.pem"), filepath.Join(dir, "svid-key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	bundle, err := x509bundle.Load(svid.ID.TrustDomain(), filepath.Join(dir, "bundle.pem"))
	if err != nil {
		t.Fatal(err)
	}
	echoID := spiffeid.RequireFromString("spiffe://c.test.meshfed/ns/default/sa/echo")
	direct, err := grpc.NewClient("passthrough:///"+cIn, grpc.WithTransportCredentials(credentials.NewTLS(tlsconfig.MTLSClientConfig(svid, bundle, tlsconfig.AuthorizeID(echoID)))))
	if err != nil {
		t.Fatal(err)
	}
	defer direct.Close()
	harness.Eventually(t, 20*time.Second, "a direct gRPC call over TLS to c's proxy", answeredBy(direct, "c"))

	conn := xdsConn(t, bootstrap, "xds:///who.default:9080")
	answers := func(want string, n int) {
		t.Helper()
		for i := 0; i < n; i++ {
			if name, err := askWho(conn); err != nil || name != want {
				t.Fatalf("call %d: %q %v; want %s", i, name, err, want)
			}
		}
	}
	harness.Eventually(t, 30*time.Second, "first call over mTLS to c's endpoint", answeredBy(conn, "c"))
	answers("c", 20)

	proxies["c"].p.Kill()
	harness.Eventually(t, 30*time.Second, "failover to west through its gateway", answeredBy(conn, "west"))
	answers("west", 20)
	if v, err := harness.Metric(gw.http, "meshfed_gateway_connections_total", `result="ok"`); err != nil || v < 1 {
		t.Errorf("west's gateway passed %v connections (%v); the calls did not come through it", v, err)
	}
	if v, err := harness.Metric(proxies["west"].http, "meshfed_proxy_inbound_connections_total", `result="ok"`); err != nil || v < 1 {
		t.Errorf("west's proxy admitted %v callers (%v)", v, err)
	}

	t.Run("Envoy gets the gateway host name's addresses", func(t *testing.T) {
		// Envoy takes only IP addresses in EDS: the spoke looks west's
		// gateway host name up for it.
		want := net.JoinHostPort("127.0.0.1", westPort)
		got := envoyEndpoints(t, c, dir, "spiffe://c.test.meshfed/meshfed/node/grpc-host", ".west.", func(addrs []string) bool {
			return slices.Contains(addrs, want)
		})
		for _, a := range got {
			if _, err := netip.ParseAddrPort(a); err != nil {
				t.Errorf("Envoy was given %s for west's gateway: not an IP address", a)
			}
		}
		if v, err := harness.Metric(c.http, "meshfed_xds_gateway_lookups_total", `result="ok"`); err != nil || v < 1 {
			t.Errorf("lookups: %v (%v)", v, err)
		}
	})
}

// envoyEndpoints follows the endpoints (EDS) a node with Envoy's user agent
// gets on a state-of-the-world ADS stream, ACKing each response, until the
// addresses of those whose SNI holds sni satisfy done; it returns them.
func envoyEndpoints(t *testing.T, s *spokeProc, dir, id, sni string, done func([]string) bool) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	stream, err := adsClient(t, s, dir).StreamAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	req := &discoveryv3.DiscoveryRequest{Node: &corev3.Node{Id: id, UserAgentName: "envoy"}, TypeUrl: resource.EndpointType}
	var addrs []string
	for {
		if err := stream.Send(req); err != nil {
			t.Fatal(err)
		}
		resp, err := stream.Recv()
		if err != nil {
			t.Fatalf("EDS as Envoy: %v; last endpoints for %q: %v", err, sni, addrs)
		}
		addrs = nil
		for _, a := range resp.GetResources() {
			var cla endpointv3.ClusterLoadAssignment
			if err := a.UnmarshalTo(&cla); err != nil {
				t.Fatal(err)
			}
			if err := cla.Validate(); err != nil {
				t.Error(err)
			}
			for _, l := range cla.GetEndpoints() {
				for _, e := range l.GetLbEndpoints() {
					if ep := e.GetEndpoint(); strings.Contains(ep.GetHostname(), sni) {
						sa := ep.GetAddress().GetSocketAddress()
						addrs = append(addrs, net.JoinHostPort(sa.GetAddress(), fmt.Sprint(sa.GetPortValue())))
					}
				}
			}
		}
		if done(addrs) {
			return addrs
		}
		req = &discoveryv3.DiscoveryRequest{TypeUrl: resource.EndpointType, VersionInfo: resp.GetVersionInfo(), ResponseNonce: resp.GetNonce()}
	}
}

// TestProxylessGRPCServer: an xDS-enabled grpc-go server, no proxy, holds
// default/who's workload SVID (`meshfed svid --workload`); the spoke gives
// it the listener of its endpoint: mTLS with a client certificate required,
// callers authorized by the service's policy. A proxyless client the
// policy allows is answered, one it does not is refused.
func TestProxylessGRPCServer(t *testing.T) {
	f := newFederation(t)
	host, port, _ := net.SplitHostPort(freeAddr(t, "127.0.0.41"))
	c := f.addSite("c", "r1/c-1", fmt.Sprintf(`services:
- namespace: default
  name: who
  ports: [{name: grpc, port: 9090}]
  endpoints:
  - {address: %s, port: %s, identity: "spiffe://c.test.meshfed/ns/default/sa/who", labels: {meshfed.io/node: who-host}}
`, host, port))
	harness.WaitReady(t, c.http, 20*time.Second)
	policy := filepath.Join(f.dir, "policy.yaml")
	writeFile(t, policy, "service: default/who\nallow: [spiffe://c.test.meshfed/meshfed/node/grpc-host]\n")
	f.mustCLI("policy", "apply", "-f", policy)

	_, serverBootstrap, _ := f.grpcClient(t, c, "who-host", "spiffe://c.test.meshfed/ns/default/sa/who")
	serverCreds, err := xdscreds.NewServerCredentials(xdscreds.ServerOptions{FallbackCreds: insecure.NewCredentials()})
	if err != nil {
		t.Fatal(err)
	}
	srv, err := xds.NewGRPCServer(grpc.Creds(serverCreds), xds.BootstrapContentsForTesting(serverBootstrap), answer("who"))
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", net.JoinHostPort(host, port))
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(srv.Stop)

	client := func(node string) *grpc.ClientConn {
		_, bootstrap, _ := f.grpcClient(t, c, node, "")
		return xdsConn(t, bootstrap, "xds:///who.default:9090")
	}
	allowed := client("grpc-host")
	harness.Eventually(t, 30*time.Second, "the allowed client is answered over mTLS", answeredBy(allowed, "who"))
	intruder := client("other-host")
	harness.Eventually(t, 30*time.Second, "a client the policy leaves out is refused", func() error {
		if _, err := askWho(intruder); status.Code(err) != codes.PermissionDenied {
			return fmt.Errorf("got %v, want PermissionDenied", err)
		}
		return nil
	})
}

// TestEnvoyBootstrap: `proxy bootstrap --envoy --dir` prints a bootstrap
// Envoy's own rules accept, whose ADS connection presents the files
// `meshfed svid` keeps there and watches their directory for renewals.
func TestEnvoyBootstrap(t *testing.T) {
	dir := t.TempDir()
	out, err := harness.Run(harness.Binary(t), "proxy", "bootstrap", "--envoy", "--id", "spiffe://east.test.meshfed/ns/default/sa/echo",
		"--xds", "127.0.0.1:7182", "--dir", dir, "--zone", "e-1")
	if err != nil {
		t.Fatal(err)
	}
	js, err := yaml.YAMLToJSON([]byte(out))
	if err != nil {
		t.Fatal(err)
	}
	b := &bootstrapv3.Bootstrap{}
	if err := protojson.Unmarshal(js, b); err != nil {
		t.Fatalf("not an Envoy bootstrap: %v\n%s", err, out)
	}
	if err := b.ValidateAll(); err != nil {
		t.Fatalf("Envoy's rules: %v", err)
	}
	ctx := &tlsv3.UpstreamTlsContext{}
	if err := b.GetStaticResources().GetClusters()[0].GetTransportSocket().GetTypedConfig().UnmarshalTo(ctx); err != nil {
		t.Fatal(err)
	}
	cert := ctx.GetCommonTlsContext().GetTlsCertificates()[0]
	vc := ctx.GetCommonTlsContext().GetValidationContext()
	if cert.GetCertificateChain().GetFilename() != filepath.Join(dir, "svid.pem") || cert.GetPrivateKey().GetFilename() != filepath.Join(dir, "svid-key.pem") ||
		vc.GetTrustedCa().GetFilename() != filepath.Join(dir, "bundle.pem") {
		t.Errorf("files: %v, %v, %v", cert.GetCertificateChain(), cert.GetPrivateKey(), vc.GetTrustedCa())
	}
	if cert.GetWatchedDirectory().GetPath() != dir || vc.GetWatchedDirectory().GetPath() != dir {
		t.Errorf("watched directories %q and %q, want %s", cert.GetWatchedDirectory().GetPath(), vc.GetWatchedDirectory().GetPath(), dir)
	}
}
