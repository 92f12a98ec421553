package e2e

import (
	"crypto/x509"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/meshfed/meshfed/trust/ca"
)

func mustCert(t *testing.T, pemBytes []byte) *x509.Certificate {
	t.Helper()
	c, err := ca.ParseCertPEM(pemBytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// agent keeps a workload's SVID and bundles fresh, as a host agent does.
type agent struct {
	mu sync.Mutex
	w  workload
}

func (a *agent) get() workload {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.w
}

// keepRenewing renews w at s every period until the test ends.
func keepRenewing(t *testing.T, s *spokeProc, w workload, period time.Duration) *agent {
	a := &agent{w: w}
	stop := make(chan struct{})
	done := make(chan struct{})
	t.Cleanup(func() { close(stop); <-done })
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			case <-time.After(period):
			}
			next, err := renew(t, s, a.get())
			if err != nil {
				t.Logf("renew at %s: %v", s.site, err)
				continue
			}
			a.mu.Lock()
			a.w = next
			a.mu.Unlock()
		}
	}()
	return a
}

func TestCARotation_underLiveHandshakes(t *testing.T) {
	f := newFederation(t)
	a := f.addSite("a", "z1", siteB, "--svid-ttl", "4s", "--ca-activation-delay", "3s")
	b := f.addSite("b", "z2", siteC, "--svid-ttl", "4s")
	f.waitBundles(t)
	wa0, _ := f.attest(t, a, "host-a")
	wb0, _ := f.attest(t, b, "host-b")
	aw := keepRenewing(t, a, wa0, time.Second)
	bw := keepRenewing(t, b, wb0, time.Second)
	oldCA, err := os.ReadFile(filepath.Join(a.dir, "ca", "ca.crt"))
	if err != nil {
		t.Fatal(err)
	}

	var total, failed int
	shake := func() {
		for _, pair := range [][2]*agent{{aw, bw}, {bw, aw}} {
			total++
			if err := handshake(pair[0].get(), pair[1].get()); err != nil {
				failed++
				t.Logf("handshake %d failed: %v", total, err)
			}
		}
	}
	for range 20 {
		shake()
	}
	f.mustCLI("trust", "rotate", "--site", "a")
	deadline := time.Now().Add(45 * time.Second)
	// Sequence 1 at creation, 2 when the new CA is published, 3 when it
	// signs, 4 when the old one leaves the bundle.
	for trustListHas(f.cli, "a.test.meshfed", 4, 1) != nil {
		if time.Now().After(deadline) {
			t.Fatalf("rotation did not finish within 45s: %v", trustListHas(f.cli, "a.test.meshfed", 4, 1))
		}
		shake()
		time.Sleep(50 * time.Millisecond)
	}
	for range 20 {
		shake()
	}
	newCA, _ := os.ReadFile(filepath.Join(a.dir, "ca", "ca.crt"))
	if string(newCA) == string(oldCA) {
		t.Fatal("site a's CA did not change")
	}
	if cur, _ := os.ReadFile(filepath.Join(a.dir, "ca", "ca.crt")); aw.get().svid.Certificates[0].CheckSignatureFrom(mustCert(t, cur)) != nil {
		t.Fatal("host-a's SVID is not signed by the new CA after the rotation")
	}
	t.Logf("CA rotation of site a under live traffic: %d handshakes, %d failed", total, failed)
	if failed != 0 {
		t.Fatalf("%d of %d handshakes failed during the rotation, want 0", failed, total)
	}
	if total < 100 {
		t.Fatalf("only %d handshakes ran: the test did not exercise the rotation", total)
	}
}
