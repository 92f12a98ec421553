package e2e

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	meshfedv1 "github.com/meshfed/meshfed/api/meshfed/v1"
	"github.com/meshfed/meshfed/identityclient"
	"github.com/meshfed/meshfed/test/harness"
	"github.com/meshfed/meshfed/trust/ca"
	"github.com/meshfed/meshfed/trust/credential"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
)

// workload is what a host gets from its spoke: an SVID and the bundles of
// every trust domain its site trusts.
type workload struct {
	svid    *x509svid.SVID
	bundles *x509bundle.Set
}

func bundleSet(t *testing.T, pems map[string][]byte) *x509bundle.Set {
	t.Helper()
	set := x509bundle.NewSet()
	for td, p := range pems {
		certs, err := ca.ParseCertsPEM(p)
		if err != nil {
			t.Fatal(err)
		}
		set.Add(x509bundle.FromX509Authorities(spiffeid.RequireTrustDomainFromString(td), certs))
	}
	return set
}

func toWorkload(t *testing.T, resp *meshfedv1.SVIDResponse, keyPEM []byte) workload {
	t.Helper()
	svid, err := x509svid.Parse(resp.GetCertificatePem(), keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	return workload{svid: svid, bundles: bundleSet(t, resp.GetBundles())}
}

func newCSR(t *testing.T) (csr, keyPEM []byte) {
	t.Helper()
	key, _ := ca.NewKey()
	csr, _ = ca.NewCSR(key)
	keyPEM, _ = ca.EncodeKeyPEM(key)
	return csr, keyPEM
}

// attest gets a node token for node at s and redeems it at s's spoke.
func (f *federation) attest(t *testing.T, s *spokeProc, node string) (workload, string) {
	t.Helper()
	token := strings.TrimSpace(f.mustCLI("vm", "token", "create", "--site", s.site, "--node", node))
	tok, err := credential.ParseToken(token)
	if err != nil {
		t.Fatal(err)
	}
	w, err := attestWith(t, s, token, tok.CAPin)
	if err != nil {
		t.Fatal(err)
	}
	return w, token
}

// attestWith redeems token at s's spoke, trusting the spoke by pin.
func attestWith(t *testing.T, s *spokeProc, token, pin string) (workload, error) {
	t.Helper()
	return attestRequest(t, s, pin, &meshfedv1.AttestRequest{Credential: &meshfedv1.AttestRequest_NodeToken{NodeToken: token}})
}

// attestRequest sends req (its CSR is filled in) to s's spoke, trusting the
// spoke by the pin of its site CA.
func attestRequest(t *testing.T, s *spokeProc, pin string, req *meshfedv1.AttestRequest) (workload, error) {
	t.Helper()
	conn, err := identityclient.DialPinned(s.identity, pin)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	csr, keyPEM := newCSR(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req.Csr = csr
	resp, err := meshfedv1.NewIdentityClient(conn).Attest(ctx, req)
	if err != nil {
		return workload{}, err
	}
	return toWorkload(t, resp, keyPEM), nil
}

// callAs calls s's identity endpoint with w's SVID as client certificate,
// verifying the spoke as spiffe://<site td>/meshfed/spoke.
func callAs(t *testing.T, s *spokeProc, w workload, call func(ctx context.Context, c meshfedv1.IdentityClient, csr []byte) (*meshfedv1.SVIDResponse, error)) (workload, error) {
	t.Helper()
	spokeID := spiffeid.RequireFromPath(spiffeid.RequireTrustDomainFromString(s.site+".test.meshfed"), "/meshfed/spoke")
	tc := tlsconfig.MTLSClientConfig(w.svid, w.bundles, tlsconfig.AuthorizeID(spokeID))
	conn, err := grpc.NewClient("passthrough:///"+s.identity, grpc.WithTransportCredentials(credentials.NewTLS(tc)))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	csr, keyPEM := newCSR(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := call(ctx, meshfedv1.NewIdentityClient(conn), csr)
	if err != nil {
		return workload{}, err
	}
	return toWorkload(t, resp, keyPEM), nil
}

// renew asks s's spoke for a fresh SVID, authenticating with w's.
func renew(t *testing.T, s *spokeProc, w workload) (workload, error) {
	return callAs(t, s, w, func(ctx context.Context, c meshfedv1.IdentityClient, csr []byte) (*meshfedv1.SVIDResponse, error) {
		return c.Renew(ctx, &meshfedv1.RenewSVIDRequest{Csr: csr})
	})
}

// issueWorkload asks s's spoke, as host w, for the SVID of workload id.
func issueWorkload(t *testing.T, s *spokeProc, w workload, id string) (workload, error) {
	return callAs(t, s, w, func(ctx context.Context, c meshfedv1.IdentityClient, csr []byte) (*meshfedv1.SVIDResponse, error) {
		return c.IssueWorkload(ctx, &meshfedv1.IssueWorkloadRequest{SpiffeId: id, Csr: csr})
	})
}

// hostServices has one workload on host-a and one on host-z.
const hostServices = `services:
- namespace: shop
  name: cart
  endpoints:
  - {address: 127.0.0.41, port: 9000, identity: "spiffe://a.test.meshfed/ns/shop/sa/cart", labels: {meshfed.io/node: host-a}}
  - {address: 127.0.0.42, port: 9000, identity: "spiffe://a.test.meshfed/ns/shop/sa/db", labels: {meshfed.io/node: host-z}}
`

// handshake runs an mTLS exchange, server and client each verifying the
// other with go-spiffe against its own bundles, and returns the first
// refusal of either side.
func handshake(server, client workload) error {
	ln, err := tls.Listen("tcp", "127.0.0.1:0", tlsconfig.MTLSServerConfig(server.svid, server.bundles, tlsconfig.AuthorizeAny()))
	if err != nil {
		return err
	}
	defer ln.Close()
	serverErr := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			serverErr <- err
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if err := c.(*tls.Conn).Handshake(); err != nil {
			serverErr <- fmt.Errorf("server: %w", err)
			return
		}
		_, err = io.Copy(c, io.LimitReader(c, 4))
		serverErr <- err
	}()
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", ln.Addr().String(), tlsconfig.MTLSClientConfig(client.svid, client.bundles, tlsconfig.AuthorizeAny()))
	if err != nil {
		return errors.Join(fmt.Errorf("client: %w", err), <-serverErr)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	_, werr := c.Write([]byte("ping"))
	buf := make([]byte, 4)
	_, rerr := io.ReadFull(c, buf)
	if serr := <-serverErr; serr != nil {
		return serr
	}
	return errors.Join(werr, rerr)
}

// forged is an SVID for id from a CA nobody federates with; the forger
// trusts what trusts holds, so that it is the other side that refuses.
func forged(t *testing.T, id spiffeid.ID, ttl time.Duration, trusts *x509bundle.Set) workload {
	t.Helper()
	root, _ := ca.New(id.TrustDomain(), "forger", time.Hour)
	key, _ := ca.NewKey()
	leaf, err := root.Sign(ca.Leaf{ID: id, Key: key.Public(), TTL: ttl})
	if err != nil {
		t.Fatal(err)
	}
	bundles := x509bundle.NewSet(trusts.Bundles()...)
	bundles.Add(x509bundle.FromX509Authorities(id.TrustDomain(), []*x509.Certificate{root.Cert}))
	return workload{svid: &x509svid.SVID{ID: id, Certificates: []*x509.Certificate{leaf}, PrivateKey: key}, bundles: bundles}
}

// waitBundles waits until every site holds every site's bundle.
func (f *federation) waitBundles(t *testing.T) {
	t.Helper()
	harness.Eventually(t, 20*time.Second, "the sites hold each other's bundles", func() error {
		for _, s := range f.spokes {
			v, err := harness.View(s.http)
			if err != nil {
				return err
			}
			if len(v.TrustDomains) != len(f.spokes) {
				return fmt.Errorf("site %s holds %v", s.site, v.TrustDomains)
			}
		}
		return nil
	})
}

func TestSVIDs(t *testing.T) {
	f := newFederation(t)
	a := f.addSite("a", "z1", hostServices)
	b := f.addSite("b", "z2", siteC)
	c := f.addSite("c", "z3", "services: []\n", "--svid-ttl", "3s")
	f.waitBundles(t)
	wa, tokenA := f.attest(t, a, "host-a")
	wb, _ := f.attest(t, b, "host-b")

	t.Run("an attested host gets the SVID of its node", func(t *testing.T) {
		if got, want := wa.svid.ID.String(), "spiffe://a.test.meshfed/meshfed/node/host-a"; got != want {
			t.Fatalf("SVID %s, want %s", got, want)
		}
		if ttl := wa.svid.Certificates[0].NotAfter.Sub(time.Now()); ttl > time.Hour+time.Minute || ttl < 50*time.Minute {
			t.Fatalf("SVID lives %s, want the default hour", ttl)
		}
	})
	t.Run("sites that federate accept each other's SVIDs", func(t *testing.T) {
		if err := handshake(wa, wb); err != nil {
			t.Fatalf("a serving b: %v", err)
		}
		if err := handshake(wb, wa); err != nil {
			t.Fatalf("b serving a: %v", err)
		}
	})
	t.Run("a trust domain that is not federated is refused", func(t *testing.T) {
		out := forged(t, spiffeid.RequireFromString("spiffe://example.net/w"), time.Hour, wa.bundles)
		err := handshake(wa, out)
		if err == nil || !strings.Contains(err.Error(), "server:") || !strings.Contains(err.Error(), "example.net") {
			t.Fatalf("handshake = %v, want a refusal naming example.net", err)
		}
	})
	t.Run("a certificate for a federated domain from another CA is refused", func(t *testing.T) {
		trusts := x509bundle.NewSet()
		a, _ := wa.bundles.GetX509BundleForTrustDomain(wa.svid.ID.TrustDomain())
		trusts.Add(a)
		fake := forged(t, spiffeid.RequireFromString("spiffe://b.test.meshfed/meshfed/node/host-b"), time.Hour, trusts)
		err := handshake(wa, fake)
		if err == nil || !strings.Contains(err.Error(), "server:") || !strings.Contains(err.Error(), "unknown authority") {
			t.Fatalf("handshake = %v, want unknown authority", err)
		}
	})
	t.Run("a host gets SVIDs for its own workloads only", func(t *testing.T) {
		cart, err := issueWorkload(t, a, wa, "spiffe://a.test.meshfed/ns/shop/sa/cart")
		if err != nil {
			t.Fatalf("host-a asking for its workload cart: %v", err)
		}
		if err := handshake(wb, cart); err != nil {
			t.Fatalf("b refused a's workload cart: %v", err)
		}
		if _, err := issueWorkload(t, a, wa, "spiffe://a.test.meshfed/ns/shop/sa/db"); err == nil || !strings.Contains(err.Error(), "runs no workload") {
			t.Fatalf("host-a asking for host-z's workload db = %v, want a refusal", err)
		}
		if _, err := issueWorkload(t, a, cart, "spiffe://a.test.meshfed/ns/shop/sa/cart"); err == nil || !strings.Contains(err.Error(), "not a host") {
			t.Fatalf("a workload asking for workload SVIDs = %v, want a refusal", err)
		}
	})
	t.Run("a replayed node token is refused", func(t *testing.T) {
		tok, _ := credential.ParseToken(tokenA)
		_, err := attestWith(t, a, tokenA, tok.CAPin)
		if err == nil || !strings.Contains(err.Error(), "already used") {
			t.Fatalf("second attest = %v, want 'already used'", err)
		}
	})
	t.Run("a node token of another site is refused", func(t *testing.T) {
		token := strings.TrimSpace(f.mustCLI("vm", "token", "create", "--site", "b", "--node", "host-x"))
		aPin, _ := credential.ParseToken(tokenA)
		_, err := attestWith(t, a, token, aPin.CAPin)
		if err == nil || !strings.Contains(err.Error(), `is for site "b"`) {
			t.Fatalf("site a attesting a node token of site b = %v, want a refusal naming site b", err)
		}
	})
	t.Run("renewal keeps the ID; another site's SVID cannot renew", func(t *testing.T) {
		next, err := renew(t, a, wa)
		if err != nil {
			t.Fatal(err)
		}
		old, cur := wa.svid.Certificates[0], next.svid.Certificates[0]
		if next.svid.ID != wa.svid.ID || cur.SerialNumber.Cmp(old.SerialNumber) == 0 || cur.NotAfter.Before(old.NotAfter) {
			t.Fatalf("renewed %s until %s, want %s until later than %s", next.svid.ID, next.svid.Certificates[0].NotAfter, wa.svid.ID, wa.svid.Certificates[0].NotAfter)
		}
		if _, err := renew(t, a, wb); err == nil {
			t.Fatal("site a renewed an SVID of site b")
		}
	})
	t.Run("an expired SVID is refused", func(t *testing.T) {
		wc, _ := f.attest(t, c, "host-c")
		if err := handshake(wa, wc); err != nil {
			t.Fatalf("fresh SVID of c refused: %v", err)
		}
		harness.Eventually(t, 15*time.Second, "c's 3s SVID is refused once expired", func() error {
			err := handshake(wa, wc)
			if err == nil || !strings.Contains(err.Error(), "expired") {
				return fmt.Errorf("handshake = %v", err)
			}
			return nil
		})
	})
	t.Run("a removed site's SVIDs are refused", func(t *testing.T) {
		f.mustCLI("site", "remove", "b")
		delete(f.spokes, "b")
		var fresh workload
		harness.Eventually(t, 10*time.Second, "a's bundles drop b", func() error {
			var err error
			if fresh, err = renew(t, a, wa); err != nil {
				return err
			}
			if _, err := fresh.bundles.GetX509BundleForTrustDomain(spiffeid.RequireTrustDomainFromString("b.test.meshfed")); err == nil {
				return errors.New("a still trusts b")
			}
			return nil
		})
		err := handshake(fresh, wb)
		if err == nil || !strings.Contains(err.Error(), "b.test.meshfed") {
			t.Fatalf("handshake = %v, want a refusal naming b.test.meshfed", err)
		}
	})
}
