package servicedns_test

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/meshfed/meshfed/dataplane/servicedns"
	"github.com/miekg/dns"
)

// serve runs a Server on loopback until the test ends and returns a Go
// resolver pointed at it, as an app's would be.
func serve(t *testing.T, o servicedns.Options) *net.Resolver {
	t.Helper()
	o.Listen = "127.0.0.1:0"
	s, err := servicedns.Listen(o)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	return &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, s.Addr())
	}}
}

// upstream is a resolver for the host's other names: example.test. only.
func upstream(t *testing.T) string {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &dns.Server{PacketConn: pc, Handler: dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(r)
		if r.Question[0].Name == "example.test." && r.Question[0].Qtype == dns.TypeA {
			rr, _ := dns.NewRR("example.test. 60 IN A 192.0.2.7")
			m.Answer = append(m.Answer, rr)
		} else if r.Question[0].Name != "example.test." {
			m.Rcode = dns.RcodeNameError
		}
		_ = w.WriteMsg(m)
	})}
	go func() { _ = srv.ActivateAndServe() }()
	t.Cleanup(func() { _ = srv.Shutdown() })
	return pc.LocalAddr().String()
}

func TestServiceNames(t *testing.T) {
	vip := netip.MustParseAddr("127.128.3.4")
	var mu sync.Mutex // the server answers queries concurrently
	var asked []netip.Addr
	r := serve(t, servicedns.Options{
		Forward: []string{upstream(t)},
		Lookup: func(src netip.Addr, namespace, name string) (netip.Addr, bool) {
			mu.Lock()
			defer mu.Unlock()
			asked = append(asked, src)
			return vip, namespace == "default" && name == "echo"
		},
	})
	ctx := context.Background()
	for _, name := range []string{"echo.default.svc.clusterset.local", "ECHO.Default.svc.clusterset.local."} {
		got, err := r.LookupHost(ctx, name)
		if err != nil || !slices.Equal(got, []string{vip.String()}) {
			t.Errorf("%s: got %v, %v; want [%s]", name, got, err, vip)
		}
	}
	mu.Lock()
	if len(asked) == 0 || asked[0] != netip.MustParseAddr("127.0.0.1") {
		t.Errorf("the lookup was asked for sources %v; want the caller's address 127.0.0.1", asked)
	}
	mu.Unlock()
	for _, name := range []string{"nope.default.svc.clusterset.local", "echo.other.svc.clusterset.local", "a.b.echo.default.svc.clusterset.local", "svc.clusterset.local"} {
		_, err := r.LookupHost(ctx, name)
		var de *net.DNSError
		if !errors.As(err, &de) || !de.IsNotFound {
			t.Errorf("%s: got %v; want NXDOMAIN (not found)", name, err)
		}
	}
	got, err := r.LookupHost(ctx, "example.test")
	if err != nil || !slices.Equal(got, []string{"192.0.2.7"}) {
		t.Errorf("a forwarded name: got %v, %v; want [192.0.2.7] from the upstream resolver", got, err)
	}
	if _, err := r.LookupHost(ctx, "missing.test"); err == nil {
		t.Error("a name the upstream does not know resolved")
	}
}

func TestNoUpstreamIsServfail(t *testing.T) {
	// A port nobody serves: the forward fails, the federated names do not.
	pc, _ := net.ListenPacket("udp", "127.0.0.1:0")
	dead := pc.LocalAddr().String()
	pc.Close()
	r := serve(t, servicedns.Options{Forward: []string{dead}, ForwardTimeout: 200 * time.Millisecond,
		Lookup: func(netip.Addr, string, string) (netip.Addr, bool) { return netip.MustParseAddr("127.128.0.9"), true }})
	if _, err := r.LookupHost(context.Background(), "example.test"); err == nil {
		t.Error("a name no resolver answered resolved")
	}
	if got, err := r.LookupHost(context.Background(), "echo.default.svc.clusterset.local"); err != nil || len(got) != 1 {
		t.Errorf("a federated name with the upstream down: %v, %v", got, err)
	}
}
