package e2e

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/meshfed/meshfed/test/harness"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/xds"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// whoServer is a gRPC server that answers /meshfed.test.Who/Name with its
// name.
func whoServer(t *testing.T, name string) (addr string, stop func()) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer(grpc.UnknownServiceHandler(func(_ any, stream grpc.ServerStream) error {
		var in wrapperspb.StringValue
		if err := stream.RecvMsg(&in); err != nil {
			return err
		}
		return stream.SendMsg(wrapperspb.String(name))
	}))
	go func() { _ = s.Serve(ln) }()
	t.Cleanup(s.Stop)
	return ln.Addr().String(), s.Stop
}

func whoEndpoint(addr, zone string) string {
	host, port, _ := net.SplitHostPort(addr)
	return fmt.Sprintf("  - {address: %s, port: %s, region: r1, zone: %s}\n", host, port, zone)
}

// TestProxylessGRPC: grpc-go's own xDS client, bootstrapped at a spoke,
// resolves xds:///who.default:9090, balances over the endpoints of its
// zone and fails over to the next priority when they stop. A delta ADS
// stream gets the same listener.
func TestProxylessGRPC(t *testing.T) {
	a1, stopA1 := whoServer(t, "a1")
	a2, stopA2 := whoServer(t, "a2")
	b1, _ := whoServer(t, "b1")
	f := newFederation(t)
	c := f.addSite("c", "r1/c-1", "services:\n- namespace: default\n  name: who\n  ports: [{name: grpc, port: 9090, protocol: TCP}]\n  endpoints:\n"+
		whoEndpoint(a1, "c-1")+whoEndpoint(a2, "c-1")+whoEndpoint(b1, "c-2"))
	harness.WaitReady(t, c.http, 20*time.Second)

	// The client's credential for the spoke: a node SVID, as files.
	w, _ := f.attest(t, c, "grpc-host")
	dir := t.TempDir()
	var chain []byte
	for _, cert := range w.svid.Certificates {
		chain = append(chain, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw})...)
	}
	_, keyPEM, err := w.svid.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	td := spiffeid.RequireTrustDomainFromString("c.test.meshfed")
	bundle, err := w.bundles.GetX509BundleForTrustDomain(td)
	if err != nil {
		t.Fatal(err)
	}
	bundlePEM, _ := bundle.Marshal()
	for name, b := range map[string][]byte{"svid.pem": chain, "key.pem": keyPEM, "bundle.pem": bundlePEM} {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	bootstrap := fmt.Sprintf(`{
  "xds_servers": [{
    "server_uri": %q,
    "channel_creds": [{"type": "tls", "config": {"ca_certificate_file": %q, "certificate_file": %q, "private_key_file": %q}}],
    "server_features": ["xds_v3"]
  }],
  "node": {"id": %q, "locality": {"region": "r1", "zone": "c-1"}}
}`, c.xds, filepath.Join(dir, "bundle.pem"), filepath.Join(dir, "svid.pem"), filepath.Join(dir, "key.pem"), w.svid.ID.String())
	resolver, err := xds.NewXDSResolverWithConfigForTesting([]byte(bootstrap))
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient("xds:///who.default:9090", grpc.WithResolvers(resolver), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	who := func() (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		out := &wrapperspb.StringValue{}
		err := conn.Invoke(ctx, "/meshfed.test.Who/Name", wrapperspb.String("?"), out)
		return out.GetValue(), err
	}
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
	harness.Eventually(t, 20*time.Second, "failover to zone c-2", func() error {
		name, err := who()
		if err != nil || name != "b1" {
			return fmt.Errorf("%q %v", name, err)
		}
		return nil
	})
	for i := 0; i < 20; i++ {
		if name, err := who(); err != nil || name != "b1" {
			t.Fatalf("after failover: %q %v", name, err)
		}
	}

	t.Run("delta ADS", func(t *testing.T) {
		dc, err := grpc.NewClient("passthrough:///"+c.xds, grpc.WithTransportCredentials(mtlsCreds(t, dir)))
		if err != nil {
			t.Fatal(err)
		}
		defer dc.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		stream, err := discoveryv3.NewAggregatedDiscoveryServiceClient(dc).DeltaAggregatedResources(ctx)
		if err != nil {
			t.Fatal(err)
		}
		node := &corev3.Node{Id: w.svid.ID.String(), UserAgentName: "gRPC Go delta test"}
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
		spoof, err := discoveryv3.NewAggregatedDiscoveryServiceClient(dc).StreamAggregatedResources(ctx)
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

// mtlsCreds presents dir's SVID and trusts dir's bundle.
func mtlsCreds(t *testing.T, dir string) credentials.TransportCredentials {
	t.Helper()
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "svid.pem"), filepath.Join(dir, "key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	b, _ := os.ReadFile(filepath.Join(dir, "bundle.pem"))
	pool.AppendCertsFromPEM(b)
	return credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: pool, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS13})
}
