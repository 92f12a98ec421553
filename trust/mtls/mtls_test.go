package mtls

import (
	"crypto/tls"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/meshfed/meshfed/trust/ca"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// server is a TLS server on loopback presenting a leaf for id, signed by
// authority, with the CA in its chain as the hub and spokes send it.
func server(t *testing.T, authority *ca.CA, id spiffeid.ID) string {
	t.Helper()
	key, err := ca.NewKey()
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := authority.Sign(ca.Leaf{ID: id, Key: key.Public(), TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{{
		Certificate: [][]byte{leaf.Raw, authority.Cert.Raw}, PrivateKey: key, Leaf: leaf}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_ = c.(*tls.Conn).Handshake()
			c.Close()
		}
	}()
	return ln.Addr().String()
}

func handshake(addr string, tc *tls.Config) error {
	raw, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer raw.Close()
	_ = raw.SetDeadline(time.Now().Add(5 * time.Second))
	return tls.Client(raw, tc).Handshake()
}

// TestPinnedClientConfig: a join token's pin admits the server whose chain
// carries that CA and whose SVID has the expected path, and nothing else.
func TestPinnedClientConfig(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("fed.example")
	hubCA, err := ca.New(td, "hub CA", 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	otherCA, err := ca.New(td, "someone else", 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	hub := server(t, hubCA, ca.HubID(td))
	notHub := server(t, hubCA, spiffeid.RequireFromPath(td, "/meshfed/admin"))
	impostor := server(t, otherCA, ca.HubID(td))
	pin := ca.Pin(hubCA.Cert)

	for _, tc := range []struct {
		name, addr, pin, want string
	}{
		{"the pinned CA's hub is trusted", hub, pin, ""},
		{"another CA with the same names is refused", impostor, pin, "does not match the token's pin"},
		{"the pinned CA's other identities are refused", notHub, pin, "not a /meshfed/hub"},
		{"a pin of another CA refuses the real hub", hub, ca.Pin(otherCA.Cert), "does not match the token's pin"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := handshake(tc.addr, PinnedClientConfig(tc.pin, AuthorizePath(ca.HubPath)))
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("handshake: %v; want it to succeed", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("handshake: %v; want an error saying %q", err, tc.want)
			}
		})
	}
}

// TestAuthorizeOneOf: an empty list admits any ID; a list only its own.
func TestAuthorizeOneOf(t *testing.T) {
	id := spiffeid.RequireFromString("spiffe://east.example/ns/default/sa/echo")
	if err := AuthorizeOneOf(nil)(id, nil); err != nil {
		t.Errorf("no list: %v; want any ID admitted", err)
	}
	if err := AuthorizeOneOf([]string{id.String()})(id, nil); err != nil {
		t.Errorf("listed: %v; want it admitted", err)
	}
	if err := AuthorizeOneOf([]string{"spiffe://east.example/ns/default/sa/other"})(id, nil); err == nil {
		t.Error("an ID not listed is admitted")
	}
}
