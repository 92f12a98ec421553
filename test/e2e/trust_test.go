package e2e

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meshfed/meshfed/test/harness"
	"github.com/meshfed/meshfed/trust/ca"
	"github.com/meshfed/meshfed/trust/credential"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	spiffefed "github.com/spiffe/go-spiffe/v2/federation"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

func TestTrust(t *testing.T) {
	f := newFederation(t)
	a := f.addSite("a", "z1", siteB)
	b := f.addSite("b", "z2", siteC)
	harness.Eventually(t, 20*time.Second, "each site holds the other's bundle", func() error {
		for _, s := range []*spokeProc{a, b} {
			v, err := harness.View(s.http)
			if err != nil {
				return err
			}
			if want := []string{"a.test.meshfed", "b.test.meshfed"}; !slices.Equal(v.TrustDomains, want) {
				return fmt.Errorf("site %s holds %v, want %v", s.site, v.TrustDomains, want)
			}
		}
		return nil
	})

	conf, err := credential.Load(filepath.Join(f.dir, "hub", "admin.conf"))
	if err != nil {
		t.Fatal(err)
	}
	fedCA, err := ca.ParseCertsPEM([]byte(conf.CA))
	if err != nil {
		t.Fatal(err)
	}
	fedTD := spiffeid.RequireTrustDomainFromString("test.meshfed")
	hubAuth := x509bundle.FromX509Authorities(fedTD, fedCA)
	hubID := spiffeid.RequireFromString("spiffe://test.meshfed/meshfed/hub")

	t.Run("go-spiffe fetches each site's bundle from the hub's bundle endpoint", func(t *testing.T) {
		for _, s := range []*spokeProc{a, b} {
			want, err := os.ReadFile(filepath.Join(s.dir, "ca", "ca.crt"))
			if err != nil {
				t.Fatal(err)
			}
			td := spiffeid.RequireTrustDomainFromString(s.site + ".test.meshfed")
			got, err := spiffefed.FetchBundle(context.Background(), td, "https://"+f.bundles+"/"+td.Name(), spiffefed.WithSPIFFEAuth(hubAuth, hubID))
			if err != nil {
				t.Fatalf("FetchBundle(%s): %v", td, err)
			}
			if pemOf(got.X509Authorities()) != string(want) {
				t.Errorf("bundle of %s from the hub differs from the site's CA", td)
			}
			if seq, ok := got.SequenceNumber(); !ok || seq != 1 {
				t.Errorf("bundle of %s: sequence %d (set %v), want 1", td, seq, ok)
			}
			if _, ok := got.RefreshHint(); !ok {
				t.Errorf("bundle of %s has no refresh hint", td)
			}
		}
	})
	t.Run("the bundle endpoint refuses a client expecting another SPIFFE ID", func(t *testing.T) {
		td := spiffeid.RequireTrustDomainFromString("a.test.meshfed")
		wrong := spiffeid.RequireFromString("spiffe://test.meshfed/someone-else")
		if _, err := spiffefed.FetchBundle(context.Background(), td, "https://"+f.bundles+"/"+td.Name(), spiffefed.WithSPIFFEAuth(hubAuth, wrong)); err == nil {
			t.Fatal("fetch succeeded against the wrong endpoint ID")
		}
	})

	outside := newOutsideDomain(t)

	t.Run("the hub imports a bundle served by go-spiffe's federation handler", func(t *testing.T) {
		f.mustCLI(outside.federate()...)
		harness.Eventually(t, 10*time.Second, "every site holds example.org", func() error {
			for _, s := range []*spokeProc{a, b} {
				v, err := harness.View(s.http)
				if err != nil {
					return err
				}
				if !slices.Contains(v.TrustDomains, "example.org") {
					return fmt.Errorf("site %s holds %v", s.site, v.TrustDomains)
				}
			}
			return nil
		})
	})
	t.Run("an imported bundle refreshes on its hint", func(t *testing.T) {
		outside.addRoot(t)
		harness.Eventually(t, 15*time.Second, "the hub holds sequence 2", func() error {
			return trustListHas(f.cli, "example.org", 2, 2)
		})
	})
	t.Run("a hub restart with the peer down keeps the imported bundle", func(t *testing.T) {
		outside.peer.Close()
		f.hub.Kill()
		f.startHub()
		if err := trustListHas(f.cli, "example.org", 2, 2); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("no site CA key reaches the hub or a log, and key files are 0600", func(t *testing.T) {
		hubDB, _ := os.ReadFile(filepath.Join(f.dir, "hub", "hub.db"))
		logs := f.hub.Log() + a.p.Log() + b.p.Log()
		for _, s := range []*spokeProc{a, b} {
			path := filepath.Join(s.dir, "ca", "ca.key")
			fi, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode().Perm() != 0o600 {
				t.Errorf("%s has mode %v, want 0600", path, fi.Mode().Perm())
			}
			keyPEM, _ := os.ReadFile(path)
			blk, _ := pem.Decode(keyPEM)
			if blk == nil {
				t.Fatalf("%s holds no PEM key", path)
			}
			if bytes.Contains(hubDB, blk.Bytes) || bytes.Contains(hubDB, keyPEM[30:90]) || strings.Contains(logs, string(keyPEM[30:90])) {
				t.Errorf("site %s's CA key appears in the hub's store or a log", s.site)
			}
		}
	})
}

// outsideDomain is the trust domain example.org, its bundle served by
// go-spiffe's own federation handler with a one-second refresh hint.
type outsideDomain struct {
	td        spiffeid.TrustDomain
	roots     []*x509.Certificate
	set       *spiffebundle.Set
	peer      *httptest.Server
	bootstrap string
}

func newOutsideDomain(t *testing.T) *outsideDomain {
	o := &outsideDomain{td: spiffeid.RequireTrustDomainFromString("example.org"), set: spiffebundle.NewSet()}
	root, err := ca.New(o.td, "example.org root 1", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	o.serve(root.Cert)
	o.peer = bundleServer(t, o.td, root, o.set)
	o.bootstrap = filepath.Join(t.TempDir(), "example.org.pem")
	if err := os.WriteFile(o.bootstrap, ca.EncodeCertPEM(root.Cert), 0o600); err != nil {
		t.Fatal(err)
	}
	return o
}

// serve publishes the next bundle: one more root, the next sequence number.
func (o *outsideDomain) serve(root *x509.Certificate) {
	o.roots = append(o.roots, root)
	b := spiffebundle.FromX509Authorities(o.td, o.roots)
	b.SetSequenceNumber(uint64(len(o.roots)))
	b.SetRefreshHint(time.Second)
	o.set.Add(b)
}

// addRoot serves a bundle with a second root, at sequence 2.
func (o *outsideDomain) addRoot(t *testing.T) {
	root, err := ca.New(o.td, fmt.Sprintf("example.org root %d", len(o.roots)+1), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	o.serve(root.Cert)
}

// federate is the CLI command that imports it.
func (o *outsideDomain) federate() []string {
	return []string{"trust", "federate", "--trust-domain", o.td.Name(), "--bundle-endpoint", o.peer.URL,
		"--endpoint-spiffe-id", "spiffe://example.org/bundle-server", "--bootstrap-bundle", o.bootstrap}
}

// bundleServer serves set's bundle of td with go-spiffe's handler over TLS,
// authenticated with an SVID spiffe://<td>/bundle-server from root.
func bundleServer(t *testing.T, td spiffeid.TrustDomain, root *ca.CA, set *spiffebundle.Set) *httptest.Server {
	t.Helper()
	h, err := spiffefed.NewHandler(td, set)
	if err != nil {
		t.Fatal(err)
	}
	key, _ := ca.NewKey()
	leaf, err := root.Sign(ca.Leaf{ID: spiffeid.RequireFromPath(td, "/bundle-server"), Key: key.Public(), TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(h)
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{leaf.Raw}, PrivateKey: key}}}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	return srv
}

func trustListHas(cli func(args ...string) (string, error), td string, seq uint64, authorities int) error {
	out, err := cli("trust", "list", "-o", "json")
	if err != nil {
		return err
	}
	var rows []struct {
		TrustDomain string
		Sequence    uint64
		Authorities int
	}
	if err := json.Unmarshal([]byte(out), &rows); err != nil {
		return err
	}
	for _, r := range rows {
		if r.TrustDomain == td && r.Sequence == seq && r.Authorities == authorities {
			return nil
		}
	}
	return fmt.Errorf("trust list has no %s at sequence %d with %d authorities: %s", td, seq, authorities, out)
}

func pemOf(certs []*x509.Certificate) string { return string(ca.EncodeCertPEM(certs...)) }
