// Package mtls is meshfed's one way to do SPIFFE TLS: every component's
// client and server configurations come from go-spiffe's
// spiffetls/tlsconfig, with an Authorizer that says which SPIFFE IDs may
// be on the other end. The peer's chain is always verified against a
// bundle of its trust domain (x509svid.ParseAndVerify); only how that
// bundle is found differs: from the federation's bundles, or, before a
// component has any, from the CA that a join token pins.
package mtls

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"slices"

	"github.com/meshfed/meshfed/trust/ca"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// ClientConfig is a TLS 1.3 client configuration that presents svid's
// SVID (none when svid is nil) and accepts a server whose SVID chains to
// bundles and passes authorize.
func ClientConfig(svid x509svid.Source, bundles x509bundle.Source, authorize tlsconfig.Authorizer) *tls.Config {
	var tc *tls.Config
	if svid == nil {
		tc = tlsconfig.TLSClientConfig(bundles, authorize)
	} else {
		tc = tlsconfig.MTLSClientConfig(svid, bundles, authorize)
	}
	tc.MinVersion = tls.VersionTLS13
	return tc
}

// ServerConfig is a TLS 1.3 server configuration that presents svid's
// SVID and requires a client SVID that chains to bundles and passes
// authorize.
func ServerConfig(svid x509svid.Source, bundles x509bundle.Source, authorize tlsconfig.Authorizer) *tls.Config {
	tc := tlsconfig.MTLSServerConfig(svid, bundles, authorize)
	tc.MinVersion = tls.VersionTLS13
	return tc
}

// PinnedClientConfig is a TLS 1.3 client configuration for a component
// that has no bundle yet, only a join token: it accepts a server whose
// chain carries a CA certificate with the token's key pin, whose SVID
// chains to that CA (the CA's trust domain the only one trusted), and
// that passes authorize.
func PinnedClientConfig(pin string, authorize tlsconfig.Authorizer) *tls.Config {
	tc := ClientConfig(nil, x509bundle.NewSet(), authorize)
	tc.VerifyPeerCertificate = func(raw [][]byte, _ [][]*x509.Certificate) error {
		root, err := ca.VerifyPinned(raw, pin)
		if err != nil {
			return err
		}
		id, err := ca.SPIFFEID(root)
		if err != nil {
			return fmt.Errorf("the pinned CA names no trust domain: %w", err)
		}
		bundle := x509bundle.FromX509Authorities(id.TrustDomain(), []*x509.Certificate{root})
		return tlsconfig.VerifyPeerCertificate(bundle, authorize)(raw, nil)
	}
	return tc
}

// AuthorizePath accepts the SPIFFE ID with this path in whichever trust
// domain the bundle admitted: with a pinned CA, the CA's own.
func AuthorizePath(path string) tlsconfig.Authorizer {
	return func(id spiffeid.ID, _ [][]*x509.Certificate) error {
		if id.Path() != path {
			return fmt.Errorf("the peer is %s, not a %s", id, path)
		}
		return nil
	}
}

// AuthorizeOneOf accepts the IDs in ids, given as strings (as xDS carries
// them); any ID when ids is empty.
func AuthorizeOneOf(ids []string) tlsconfig.Authorizer {
	return func(id spiffeid.ID, _ [][]*x509.Certificate) error {
		if len(ids) == 0 || slices.Contains(ids, id.String()) {
			return nil
		}
		return fmt.Errorf("the peer presented %s, which is not an identity of this service", id)
	}
}
