package hub_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	meshfedv1 "github.com/meshfed/meshfed/api/meshfed/v1"
	"github.com/meshfed/meshfed/federation"
	"github.com/meshfed/meshfed/hub"
	"github.com/meshfed/meshfed/hubclient"
	"github.com/meshfed/meshfed/trust/ca"
	"github.com/meshfed/meshfed/trust/credential"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
)

// testHub runs a hub on loopback and returns an admin client and the hub.
func testHub(t *testing.T) (meshfedv1.AdminClient, *hub.Hub) {
	t.Helper()
	h := hub.RunForTest(t, hub.Options{})
	conf, err := credential.Load(h.AdminConfigPath())
	if err != nil {
		t.Fatal(err)
	}
	conn, err := hubclient.Dial(conf)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return meshfedv1.NewAdminClient(conn), h
}

func addSite(t *testing.T, admin meshfedv1.AdminClient, name string) {
	t.Helper()
	_, err := admin.AddSite(context.Background(), &meshfedv1.AddSiteRequest{Site: &meshfedv1.Site{Name: name, Kind: "docker"}})
	if err != nil {
		t.Fatal(err)
	}
}

func token(t *testing.T, admin meshfedv1.AdminClient, site string, ttl time.Duration) string {
	t.Helper()
	r, err := admin.CreateToken(context.Background(), &meshfedv1.CreateTokenRequest{Site: site, Ttl: durationpb.New(ttl)})
	if err != nil {
		t.Fatal(err)
	}
	return r.GetToken()
}

// join redeems tok for site and returns a client conn with the spoke's
// certificate (nil conn and the error when refused).
func join(t *testing.T, addr, tok, site string) (*grpc.ClientConn, error) {
	t.Helper()
	parsed, err := credential.ParseToken(tok)
	if err != nil {
		return nil, err
	}
	pinned, err := hubclient.DialPinned(addr, parsed.CAPin)
	if err != nil {
		t.Fatal(err)
	}
	defer pinned.Close()
	key, _ := ca.NewKey()
	csr, _ := ca.NewCSR(key)
	resp, err := meshfedv1.NewFederationClient(pinned).Join(context.Background(), &meshfedv1.JoinRequest{Token: tok, Site: site, Csr: csr})
	if err != nil {
		return nil, err
	}
	keyPEM, _ := ca.EncodeKeyPEM(key)
	conf := &credential.File{Hub: addr, CA: string(resp.GetCaPem()), Cert: string(resp.GetCertificatePem()), Key: string(keyPEM)}
	conn, err := hubclient.Dial(conf)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn, nil
}

func TestJoin_tokens(t *testing.T) {
	admin, h := testHub(t)
	addSite(t, admin, "east")
	addSite(t, admin, "west")

	good := token(t, admin, "east", time.Hour)
	if _, err := join(t, h.Addr(), good, "east"); err != nil {
		t.Fatalf("first use of a token: %v", err)
	}
	wrongSite := token(t, admin, "west", time.Hour)
	expired := token(t, admin, "east", time.Millisecond)
	time.Sleep(5 * time.Millisecond) // let the 1ms token expire: wall-clock is the thing under test
	tampered := good[:len("mf1.xxxxxx.")] + "aaaaaaaaaaaaaaaa" + good[len("mf1.xxxxxx.aaaaaaaaaaaaaaaa"):]

	tests := []struct {
		name, token, site string
		code              codes.Code
		says              string
	}{
		{"a replayed token is refused", good, "east", codes.Unauthenticated, "already used"},
		{"an expired token is refused", expired, "east", codes.Unauthenticated, "expired"},
		{"a token for another site is refused", wrongSite, "east", codes.Unauthenticated, `is for site "west"`},
		{"a token with a wrong secret is unknown", tampered, "east", codes.Unauthenticated, "not known"},
		{"a malformed token is refused before it is sent", "mf1.abc", "east", codes.Unknown, "malformed"},
		{"an invalid site name is refused", good, "East_1", codes.InvalidArgument, "DNS-1123"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := join(t, h.Addr(), tc.token, tc.site)
			if err == nil || status.Code(err) != tc.code || !strings.Contains(err.Error(), tc.says) {
				t.Fatalf("join = %v, want %v saying %q", err, tc.code, tc.says)
			}
		})
	}
	t.Run("a refused wrong-site attempt does not burn the token", func(t *testing.T) {
		if _, err := join(t, h.Addr(), wrongSite, "west"); err != nil {
			t.Fatalf("join west with its own token after a wrong-site try: %v", err)
		}
	})
}

func TestSync_spokeWritesOnlyItsOwnSite(t *testing.T) {
	admin, h := testHub(t)
	addSite(t, admin, "east")
	addSite(t, admin, "west")
	conn, err := join(t, h.Addr(), token(t, admin, "west", time.Hour), "west")
	if err != nil {
		t.Fatal(err)
	}
	fed := meshfedv1.NewFederationClient(conn)

	t.Run("a hello claiming another site is refused", func(t *testing.T) {
		stream, err := fed.Sync(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		stream.Send(&meshfedv1.SyncMessage{Kind: &meshfedv1.SyncMessage_Hello{Hello: &meshfedv1.Hello{Site: "east"}}})
		_, err = stream.Recv()
		if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "certificate is for site west") {
			t.Fatalf("recv = %v, want PermissionDenied naming the certificate's site", err)
		}
	})

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stream, err := fed.Sync(ctx)
	if err != nil {
		t.Fatal(err)
	}
	stream.Send(&meshfedv1.SyncMessage{Kind: &meshfedv1.SyncMessage_Hello{Hello: &meshfedv1.Hello{Site: "west"}}})
	if m, err := stream.Recv(); err != nil || m.GetHello() == nil {
		t.Fatalf("want the hub's hello, got %v, %v", m, err)
	}
	// send a delta and wait for its ack, skipping the hub's own deltas.
	send := func(d *meshfedv1.Delta) *meshfedv1.Ack {
		t.Helper()
		if err := stream.Send(&meshfedv1.SyncMessage{Kind: &meshfedv1.SyncMessage_Delta{Delta: d}}); err != nil {
			t.Fatal(err)
		}
		for {
			m, err := stream.Recv()
			if err != nil {
				t.Fatal(err)
			}
			if m.GetAck() != nil {
				return m.GetAck()
			}
			hd := m.GetDelta()
			stream.Send(&meshfedv1.SyncMessage{Kind: &meshfedv1.SyncMessage_Ack{Ack: &meshfedv1.Ack{Nonce: hd.GetNonce()}}})
		}
	}
	svc := func(site string) *meshfedv1.Resource {
		return federation.ServiceResource(&meshfedv1.Service{Site: site, Namespace: "default", Name: "echo", Endpoints: []*meshfedv1.Endpoint{{Address: "10.0.0.1", Port: 80, Weight: 1}}})
	}
	forged := svc("west")
	forged.Version = "0000"
	badName := federation.ServiceResource(&meshfedv1.Service{Site: "west", Namespace: "Default", Name: "echo"})

	tests := []struct {
		name  string
		delta *meshfedv1.Delta
		says  string
	}{
		{"writing another site's service is NACKed", &meshfedv1.Delta{Nonce: "1", Updated: []*meshfedv1.Resource{svc("east")}}, "may not write"},
		{"removing another site's service is NACKed", &meshfedv1.Delta{Nonce: "2", Removed: []string{"svc/east/default/echo"}}, "may not write"},
		{"a version that does not match the content is NACKed", &meshfedv1.Delta{Nonce: "3", Updated: []*meshfedv1.Resource{forged}}, "does not match"},
		{"an invalid namespace is NACKed", &meshfedv1.Delta{Nonce: "4", Updated: []*meshfedv1.Resource{badName}}, "DNS-1123"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ack := send(tc.delta)
			if ack.GetNonce() != tc.delta.Nonce || !strings.Contains(ack.GetError(), tc.says) {
				t.Fatalf("ack = %v, want a NACK of %s saying %q", ack, tc.delta.Nonce, tc.says)
			}
		})
	}
	t.Run("nothing refused was stored, and a valid write is", func(t *testing.T) {
		if ack := send(&meshfedv1.Delta{Nonce: "5", Updated: []*meshfedv1.Resource{svc("west")}}); ack.GetError() != "" {
			t.Fatalf("valid delta NACKed: %s", ack.GetError())
		}
		r, err := admin.ListServices(context.Background(), &meshfedv1.ListServicesRequest{})
		if err != nil {
			t.Fatal(err)
		}
		if len(r.GetServices()) != 1 || r.GetServices()[0].GetSite() != "west" {
			t.Fatalf("catalog = %v, want only west's echo", r.GetServices())
		}
	})
}

func TestAdmin_badInput(t *testing.T) {
	admin, _ := testHub(t)
	addSite(t, admin, "east")
	ctx := context.Background()
	_, err := admin.AddSite(ctx, &meshfedv1.AddSiteRequest{Site: &meshfedv1.Site{Name: "east", Kind: "docker"}})
	if status.Code(err) != codes.AlreadyExists || !strings.Contains(err.Error(), "meshfed site remove east") {
		t.Errorf("duplicate site = %v, want AlreadyExists saying what to do", err)
	}
	for _, s := range []*meshfedv1.Site{
		{Name: "Bad_Name", Kind: "docker"},
		{Name: "ok", Kind: "mainframe"},
		{Name: "ok", Kind: "docker", GatewayAddresses: []string{"no-port"}},
	} {
		if _, err := admin.AddSite(ctx, &meshfedv1.AddSiteRequest{Site: s}); status.Code(err) != codes.InvalidArgument {
			t.Errorf("AddSite(%v) = %v, want InvalidArgument", s, err)
		}
	}
	if _, err := admin.CreateToken(ctx, &meshfedv1.CreateTokenRequest{Site: "nowhere"}); status.Code(err) != codes.NotFound {
		t.Errorf("token for an unknown site = %v, want NotFound", err)
	}
	r, _ := admin.ListSites(ctx, &meshfedv1.ListSitesRequest{})
	if len(r.GetSites()) != 1 {
		t.Errorf("sites = %d, want only east: refused input must not be stored", len(r.GetSites()))
	}
}

func TestAdmin_needsTheAdminCredential(t *testing.T) {
	admin, h := testHub(t)
	addSite(t, admin, "west")
	conn, err := join(t, h.Addr(), token(t, admin, "west", time.Hour), "west")
	if err != nil {
		t.Fatal(err)
	}
	_, err = meshfedv1.NewAdminClient(conn).ListSites(context.Background(), &meshfedv1.ListSitesRequest{})
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("a spoke calling the admin API = %v, want PermissionDenied", err)
	}
	// No client certificate at all.
	conf, _ := credential.Load(h.AdminConfigPath())
	tc, _ := conf.TLS()
	tc.Certificates = nil
	anon, err := hubclient.DialTLS(h.Addr(), tc)
	if err != nil {
		t.Fatal(err)
	}
	defer anon.Close()
	_, err = meshfedv1.NewAdminClient(anon).ListSites(context.Background(), &meshfedv1.ListSitesRequest{})
	if status.Code(err) != codes.Unauthenticated {
		t.Fatalf("no certificate = %v, want Unauthenticated", err)
	}
}

// openSync opens a Sync stream for site and exchanges hellos.
func openSync(t *testing.T, ctx context.Context, conn *grpc.ClientConn, site string) meshfedv1.Federation_SyncClient {
	t.Helper()
	stream, err := meshfedv1.NewFederationClient(conn).Sync(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&meshfedv1.SyncMessage{Kind: &meshfedv1.SyncMessage_Hello{Hello: &meshfedv1.Hello{Site: site}}}); err != nil {
		t.Fatal(err)
	}
	if m, err := stream.Recv(); err != nil || m.GetHello() == nil {
		t.Fatalf("want the hub's hello, got %v, %v", m, err)
	}
	return stream
}

func TestSync_aStalledSpokeDoesNotHoldBackOthers(t *testing.T) {
	admin, h := testHub(t)
	conns := map[string]*grpc.ClientConn{}
	for _, s := range []string{"east", "west", "stalled"} {
		addSite(t, admin, s)
		c, err := join(t, h.Addr(), token(t, admin, s, time.Hour), s)
		if err != nil {
			t.Fatal(err)
		}
		conns[s] = c
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// stalled reads nothing and ACKs nothing after its hello.
	openSync(t, ctx, conns["stalled"], "stalled")

	// west ACKs everything and reports the ports of east's echo it sees.
	west := openSync(t, ctx, conns["west"], "west")
	seen := make(chan uint32, 1024)
	go func() {
		for {
			m, err := west.Recv()
			if err != nil {
				return
			}
			if d := m.GetDelta(); d != nil {
				for _, r := range d.GetUpdated() {
					if s := r.GetService(); s != nil && s.GetSite() == "east" {
						seen <- s.GetEndpoints()[0].GetPort()
					}
				}
				west.Send(&meshfedv1.SyncMessage{Kind: &meshfedv1.SyncMessage_Ack{Ack: &meshfedv1.Ack{Nonce: d.GetNonce()}}})
			}
		}
	}()

	east := openSync(t, ctx, conns["east"], "east")
	const writes = 300
	for i := 1; i <= writes; i++ {
		r := federation.ServiceResource(&meshfedv1.Service{Site: "east", Namespace: "default", Name: "echo", Endpoints: []*meshfedv1.Endpoint{{Address: "10.0.0.1", Port: uint32(i), Weight: 1}}})
		d := &meshfedv1.Delta{Nonce: fmt.Sprint(i), Updated: []*meshfedv1.Resource{r}}
		if err := east.Send(&meshfedv1.SyncMessage{Kind: &meshfedv1.SyncMessage_Delta{Delta: d}}); err != nil {
			t.Fatal(err)
		}
		for {
			m, err := east.Recv()
			if err != nil {
				t.Fatal(err)
			}
			if a := m.GetAck(); a != nil {
				if a.GetError() != "" {
					t.Fatalf("write %d NACKed: %s", i, a.GetError())
				}
				break
			}
			east.Send(&meshfedv1.SyncMessage{Kind: &meshfedv1.SyncMessage_Ack{Ack: &meshfedv1.Ack{Nonce: m.GetDelta().GetNonce()}}})
		}
	}
	deadline := time.After(10 * time.Second)
	received := 0
	for {
		select {
		case p := <-seen:
			received++
			if p == writes {
				// Coalescing: west need not see every intermediate write.
				t.Logf("west saw the last of %d writes after %d updates while another spoke was stalled", writes, received)
				return
			}
		case <-deadline:
			t.Fatalf("west did not get east's last write within 10s (saw %d updates): the stalled spoke held it back", received)
		}
	}
}
