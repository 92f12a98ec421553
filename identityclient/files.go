package identityclient

import (
	"encoding/json"
	"fmt"
	"sort"

	"github.com/meshfed/meshfed/atomicfile"
	"github.com/meshfed/meshfed/trust/ca"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
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
