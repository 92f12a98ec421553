package e2e

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshfed/meshfed/test/harness"
	"github.com/meshfed/meshfed/trust/credential"
)

// TestBadInput checks that what a user gets wrong is refused with an error
// that says what to do, and changes nothing stored.
func TestBadInput(t *testing.T) {
	f := newFederation(t)
	b := f.addSite("b", "z1", siteB)
	f.addSite("c", "z2", siteC)
	want := strings.Join([]string{
		"b:default/echo:127.0.0.21:18080map[]",
		"b:shop/bravo:127.0.0.22:9000map[]",
		"c:shop/charlie:127.0.0.31:9000map[]",
	}, "\n")
	f.converged(30*time.Second, want)

	refused := func(t *testing.T, says string, args ...string) {
		t.Helper()
		out, err := harness.Run(f.bin, args...)
		if err == nil || !strings.Contains(out, says) {
			t.Fatalf("meshfed %s: err=%v, output %q; want a refusal saying %q", strings.Join(args, " "), err, out, says)
		}
	}
	config := []string{"--config", filepath.Join(f.dir, "hub", "admin.conf")}
	// joinRefused: a spoke whose join is refused says so, exits, and
	// leaves its data dir as it was: an empty one stays empty, a missing
	// one is not made.
	joinRefused := func(t *testing.T, says, site, token string) {
		t.Helper()
		empty, missing := t.TempDir(), filepath.Join(t.TempDir(), "not-yet")
		for _, dir := range []string{empty, missing} {
			refused(t, says, "spoke", "--site", site, "--hub", f.hubAddr, "--token", token, "--http-listen", "-", "--identity-listen", "-", "--xds-listen", "-", "--data-dir", dir)
		}
		if left, _ := os.ReadDir(empty); len(left) > 0 {
			t.Errorf("a refused join left %d files in the data dir (%s, …)", len(left), left[0].Name())
		}
		if _, err := os.Stat(missing); err == nil {
			t.Errorf("a refused join made the data dir %s", missing)
		}
	}

	t.Run("a bad services file shows at the hub within a second, and clears", func(t *testing.T) {
		writeFile(t, b.file, "services:\n- {namespace: default, name: echo, endpoints: [{address: 127.0.0.21, port: 18080, helth: ok}]}\n")
		harness.Eventually(t, 2*time.Second, "site show b says the file is invalid", func() error {
			return siteSourceSays(f, "b", `unknown field "helth"`)
		})
		f.converged(time.Second, want) // the last valid content stays
		if got, err := harness.GetText("http://" + b.http + "/readyz"); err != nil || !strings.Contains(got, "degraded") || !strings.Contains(got, "helth") {
			t.Errorf("b's /readyz with its file invalid: %q (%v), want ok, degraded, and why", got, err)
		}
		writeFile(t, b.file, siteB)
		harness.Eventually(t, 2*time.Second, "site show b says ok again", func() error { return siteSourceSays(f, "b", "ok") })
		if got, err := harness.GetText("http://" + b.http + "/readyz"); err != nil || strings.TrimSpace(got) != "ok" {
			t.Errorf("b's /readyz with its file good again: %q (%v)", got, err)
		}
	})
	t.Run("an admin certificate of another CA is refused, naming the hub's CA", func(t *testing.T) {
		conf, err := credential.Load(filepath.Join(f.dir, "hub", "admin.conf"))
		if err != nil {
			t.Fatal(err)
		}
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "another CA's admin"},
			NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour), ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
		if err != nil {
			t.Fatal(err)
		}
		keyDER, _ := x509.MarshalECPrivateKey(key)
		conf.Cert = string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
		conf.Key = string(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}))
		path := filepath.Join(t.TempDir(), "admin.conf")
		if err := conf.Write(path); err != nil {
			t.Fatal(err)
		}
		// The old CLI said "no client certificate".
		refused(t, "the hub does not trust its certificate", "--config", path, "site", "list")
		refused(t, "sha256:", "--config", path, "site", "list")
	})
	t.Run("an invalid site name is refused", func(t *testing.T) {
		refused(t, "DNS-1123", append(config, "site", "add", "Bad_Name")...)
	})
	t.Run("a duplicate site is refused", func(t *testing.T) {
		refused(t, "already exists", append(config, "site", "add", "b")...)
	})
	t.Run("a second hub on the same data dir is refused", func(t *testing.T) {
		refused(t, "locked", "hub", "--data-dir", filepath.Join(f.dir, "hub"), "--listen", "127.0.0.1:0", "--http-listen", "-")
	})
	t.Run("a corrupt hub data file is refused and kept", func(t *testing.T) {
		dir := t.TempDir()
		junk := strings.Repeat("definitely not bbolt ", 400)
		os.WriteFile(filepath.Join(dir, "hub.db"), []byte(junk), 0o600)
		refused(t, "backup", "hub", "--data-dir", dir, "--listen", "127.0.0.1:0", "--http-listen", "-")
		if got, _ := os.ReadFile(filepath.Join(dir, "hub.db")); string(got) != junk {
			t.Fatal("the corrupt file was changed")
		}
	})
	t.Run("a replayed join token is refused", func(t *testing.T) {
		token := strings.TrimSpace(f.mustCLI("site", "token", "create", "--site", "c"))
		dir := t.TempDir()
		spoke := []string{"spoke", "--site", "c", "--hub", f.hubAddr, "--token", token, "--http-listen", "-", "--identity-listen", "-", "--data-dir"}
		// A data dir others may read, as a config manager might make it:
		// the spoke makes it 0700 before it keeps a key there.
		if err := os.Chmod(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		p := harness.Start(t, "spoke-c2", f.bin, append(spoke, dir)...)
		harness.Eventually(t, 10*time.Second, "the data dir is made 0700", func() error {
			if info, err := os.Stat(dir); err != nil || info.Mode().Perm() != 0o700 {
				return fmt.Errorf("data dir mode %v (%v)", info.Mode().Perm(), err)
			}
			return nil
		})
		harness.Eventually(t, 10*time.Second, "the token is redeemed", func() error {
			_, err := os.Stat(filepath.Join(dir, "spoke.conf"))
			return err
		})
		p.Kill()
		refused(t, "already used", append(spoke, t.TempDir())...)
		joinRefused(t, "already used", "c", token)
	})
	t.Run("an expired join token is refused", func(t *testing.T) {
		token := strings.TrimSpace(f.mustCLI("site", "token", "create", "--site", "c", "--ttl", "1ms"))
		joinRefused(t, "expired", "c", token)
	})
	t.Run("a token for another site is refused", func(t *testing.T) {
		token := strings.TrimSpace(f.mustCLI("site", "token", "create", "--site", "c"))
		joinRefused(t, `is for site "c"`, "b", token)
	})
	t.Run("a token from another hub is refused at once, saying so", func(t *testing.T) {
		token := strings.TrimSpace(f.mustCLI("site", "token", "create", "--site", "c"))
		// The same token with another hub's CA pin.
		other := token[:strings.LastIndex(token, ".")+1] + strings.Repeat("0", 64)
		// The old spoke waited out its join timeout and said the hub did
		// not answer in time.
		joinRefused(t, "its CA does not match the join token's pin", "c", other)
	})
	t.Run("a spoke cannot claim another site with its credential", func(t *testing.T) {
		dir := t.TempDir()
		conf, err := os.ReadFile(filepath.Join(b.dir, "spoke.conf"))
		if err != nil {
			t.Fatal(err)
		}
		os.WriteFile(filepath.Join(dir, "spoke.conf"), conf, 0o600)
		refused(t, "not site c", "spoke", "--site", "c", "--http-listen", "-", "--identity-listen", "-", "--data-dir", dir)
	})
	t.Run("credential files are private", func(t *testing.T) {
		for _, p := range []string{filepath.Join(f.dir, "hub", "admin.conf"), filepath.Join(f.dir, "hub", "hub.db"), filepath.Join(b.dir, "spoke.conf"), filepath.Join(b.dir, "view.db")} {
			fi, err := os.Stat(p)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode().Perm() != 0o600 {
				t.Errorf("%s has mode %v, want 0600", p, fi.Mode().Perm())
			}
		}
	})
	t.Run("the catalog is unchanged by all of it", func(t *testing.T) {
		f.converged(10*time.Second, want)
	})
	t.Run("a removed site is cut off and withdrawn everywhere", func(t *testing.T) {
		f.mustCLI("site", "remove", "b")
		delete(f.spokes, "b")
		// c's view keeps only its own service; b's spoke is refused.
		f.converged(10*time.Second, "c:shop/charlie:127.0.0.31:9000map[]")
		harness.Eventually(t, 10*time.Second, "b's spoke is refused", func() error {
			if !strings.Contains(b.p.Log(), "not registered at this hub") {
				return os.ErrNotExist
			}
			return nil
		})
	})
}
