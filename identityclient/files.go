package identityclient

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/meshfed/meshfed/atomicfile"
	"github.com/meshfed/meshfed/trust/ca"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// The files WriteFiles keeps in its directory, for processes that read
// their credentials from disk (Envoy, proxyless gRPC).
const (
	// FileSVID is the SVID's certificate chain, leaf first (PEM).
	FileSVID = "svid.pem"
	// FileKey is the SVID's private key (PKCS#8 PEM).
	FileKey = "svid-key.pem"
	// FileBundle is the site's own CA certificates: what its spoke's
	// certificate chains to (PEM).
	FileBundle = "bundle.pem"
	// FileFederation is every trusted trust domain's CA certificates in
	// one PEM file, for clients that take a flat root list.
	FileFederation = "federation.pem"
	// FileFederationMap is a SPIFFE bundle map ({"trust_domains": {td:
	// JWKS}}): each peer is checked against its own trust domain's
	// bundle. gRPC's file_watcher provider reads it.
	FileFederationMap = "federation.json"
)

// WriteFiles writes the current SVID, its key and the bundles to dir, all
// replaced at once (atomicfile.WriteSet: each name a symlink through
// dir/..data) and readable by the owner only. The key leaves the process
// here, and only here.
func (c *Client) WriteFiles(dir string) error {
	svid, set, td := c.SVID(), c.Bundles(), c.TrustDomain()
	chain, key, err := svid.Marshal()
	if err != nil {
		return fmt.Errorf("encode the SVID: %w", err)
	}
	own, ok := set.Get(td)
	if !ok {
		return fmt.Errorf("the spoke sent no bundle for its own trust domain %s", td)
	}
	bundles := set.Bundles()
	sort.Slice(bundles, func(i, j int) bool { return bundles[i].TrustDomain().Compare(bundles[j].TrustDomain()) < 0 })
	var flat []byte
	m := map[string]json.RawMessage{}
	for _, b := range bundles {
		flat = append(flat, ca.EncodeCertPEM(b.X509Authorities()...)...)
		js, err := spiffebundle.FromX509Authorities(b.TrustDomain(), b.X509Authorities()).Marshal()
		if err != nil {
			return fmt.Errorf("encode the bundle of %s: %w", b.TrustDomain(), err)
		}
		m[b.TrustDomain().Name()] = js
	}
	bundleMap, err := json.MarshalIndent(map[string]any{"trust_domains": m}, "", "  ")
	if err != nil {
		return err
	}
	// All five switch at once: a reader never pairs a new chain with an
	// old key.
	return atomicfile.WriteSet(dir, map[string][]byte{
		FileKey: key, FileSVID: chain, FileBundle: ca.EncodeCertPEM(own.X509Authorities()...),
		FileFederation: flat, FileFederationMap: bundleMap,
	}, 0o600)
}

// keep writes the SVID to Options.Dir, when set.
func (c *Client) keep() error {
	if c.o.Dir == "" {
		return nil
	}
	if err := c.WriteFiles(c.o.Dir); err != nil {
		return fmt.Errorf("keep the SVID in %s: %w", c.o.Dir, err)
	}
	return nil
}

// load starts from the SVID kept in Options.Dir: false when there is none;
// an error when the one there cannot be used, saying what to do.
func (c *Client) load() (bool, error) {
	dir := c.o.Dir
	chain, err := os.ReadFile(filepath.Join(dir, FileSVID))
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	key, err := os.ReadFile(filepath.Join(dir, FileKey))
	if err != nil {
		return false, err
	}
	svid, err := x509svid.Parse(chain, key)
	if err != nil {
		return false, fmt.Errorf("the SVID kept in %s does not parse (%v): attest again with a new node token", dir, err)
	}
	if exp := svid.Certificates[0].NotAfter; time.Now().After(exp) {
		return false, fmt.Errorf("the SVID kept in %s expired at %s: the agent missed its renewal (was it stopped that long?); attest again with a new node token (meshfed vm token create)", dir, exp.Format(time.RFC3339))
	}
	raw, err := os.ReadFile(filepath.Join(dir, FileFederationMap))
	if err != nil {
		return false, err
	}
	var m struct {
		TrustDomains map[string]json.RawMessage `json:"trust_domains"`
	}
	if err := json.Unmarshal(raw, &m); err != nil {
		return false, fmt.Errorf("the bundles kept in %s: %w", dir, err)
	}
	set := x509bundle.NewSet()
	for name, js := range m.TrustDomains {
		td, err := spiffeid.TrustDomainFromString(name)
		if err != nil {
			return false, fmt.Errorf("the bundles kept in %s: %w", dir, err)
		}
		b, err := spiffebundle.Parse(td, js)
		if err != nil {
			return false, fmt.Errorf("the bundle of %s kept in %s: %w", td, dir, err)
		}
		set.Add(x509bundle.FromX509Authorities(td, b.X509Authorities()))
	}
	c.mu.Lock()
	c.svid, c.bundles, c.td = svid, set, svid.ID.TrustDomain()
	c.mu.Unlock()
	return true, nil
}
