// Package siteca is a site's own certificate authority: the root of the
// site's SPIFFE trust domain, kept in a directory of the spoke's data dir
// (key 0600) so the key never leaves the site. It signs the site's SVIDs and
// gives the trust bundle the spoke publishes to the hub.
package siteca

import (
	"crypto"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/meshfed/meshfed/atomicfile"
	"github.com/meshfed/meshfed/trust/ca"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Options configures a site CA. Zero values take the documented defaults.
type Options struct {
	// Dir holds ca.key, ca.crt and state.json. Required.
	Dir         string
	TrustDomain spiffeid.TrustDomain
	// KeyType is ec-p256 (default), ec-p384 or rsa-2048.
	KeyType string
	// CATTL is the CA's lifetime. Default 1 year.
	CATTL time.Duration
	// SVIDTTL is the default SVID lifetime. Default 1 hour.
	SVIDTTL time.Duration
	// RefreshHint tells bundle consumers how often to refetch. Default 5m.
	RefreshHint time.Duration
}

// SiteCA is a site's CA.
type SiteCA struct {
	o     Options
	ca    *ca.CA
	state state
}

type state struct {
	TrustDomain string `json:"trustDomain"`
	Sequence    uint64 `json:"sequence"`
}

// Open loads the CA from o.Dir, or creates it there on first use. A CA of
// another trust domain in the directory is an error.
func Open(o Options) (*SiteCA, error) {
	if o.Dir == "" || o.TrustDomain.IsZero() {
		return nil, errors.New("siteca: a directory and a trust domain are required")
	}
	if o.CATTL == 0 {
		o.CATTL = 365 * 24 * time.Hour
	}
	if o.SVIDTTL == 0 {
		o.SVIDTTL = time.Hour
	}
	if o.RefreshHint == 0 {
		o.RefreshHint = 5 * time.Minute
	}
	s := &SiteCA{o: o}
	certPath, keyPath, statePath := s.paths()
	certPEM, err := os.ReadFile(certPath)
	if errors.Is(err, os.ErrNotExist) {
		return s, s.create()
	}
	if err != nil {
		return nil, fmt.Errorf("siteca: %w", err)
	}
	keyPEM, err := os.ReadFile(keyPath)
	if err != nil {
		return nil, fmt.Errorf("siteca: %w", err)
	}
	if s.ca, err = ca.Load(certPEM, keyPEM); err != nil {
		return nil, fmt.Errorf("siteca: %s: %w", o.Dir, err)
	}
	b, err := os.ReadFile(statePath)
	if err != nil {
		return nil, fmt.Errorf("siteca: %w", err)
	}
	if err := json.Unmarshal(b, &s.state); err != nil {
		return nil, fmt.Errorf("siteca: %s: %w", statePath, err)
	}
	if s.state.TrustDomain != o.TrustDomain.Name() {
		return nil, fmt.Errorf("siteca: %s holds the CA of trust domain %s, not %s: use that trust domain or another data dir", o.Dir, s.state.TrustDomain, o.TrustDomain)
	}
	return s, nil
}

func (s *SiteCA) paths() (cert, key, state string) {
	return filepath.Join(s.o.Dir, "ca.crt"), filepath.Join(s.o.Dir, "ca.key"), filepath.Join(s.o.Dir, "state.json")
}

func (s *SiteCA) create() error {
	c, err := ca.NewWithKeyType(s.o.TrustDomain, "meshfed site CA "+s.o.TrustDomain.Name(), s.o.CATTL, s.o.KeyType)
	if err != nil {
		return fmt.Errorf("siteca: %w", err)
	}
	keyPEM, err := ca.EncodeKeyPEM(c.Key)
	if err != nil {
		return err
	}
	certPath, keyPath, statePath := s.paths()
	st := state{TrustDomain: s.o.TrustDomain.Name(), Sequence: 1}
	b, _ := json.Marshal(st)
	// The key first: a CA certificate without its key on disk would be
	// loaded next time and fail; a key without certificate is recreated.
	for _, f := range []struct {
		path string
		data []byte
	}{{keyPath, keyPEM}, {statePath, b}, {certPath, ca.EncodeCertPEM(c.Cert)}} {
		if err := atomicfile.Write(f.path, f.data, 0o600); err != nil {
			return fmt.Errorf("siteca: %w", err)
		}
	}
	s.ca, s.state = c, st
	return nil
}

// TrustDomain is the CA's trust domain.
func (s *SiteCA) TrustDomain() spiffeid.TrustDomain { return s.o.TrustDomain }

// Cert is the CA certificate.
func (s *SiteCA) Cert() *x509.Certificate { return s.ca.Cert }

// Bundle is the site's trust bundle, with its sequence number and refresh
// hint.
func (s *SiteCA) Bundle() *spiffebundle.Bundle {
	b := spiffebundle.FromX509Authorities(s.o.TrustDomain, []*x509.Certificate{s.ca.Cert})
	b.SetSequenceNumber(s.state.Sequence)
	b.SetRefreshHint(s.o.RefreshHint)
	return b
}

// SignSVID issues an X.509 SVID for id (which must be in the CA's trust
// domain) to the holder of pub; ttl 0 means the default.
func (s *SiteCA) SignSVID(pub crypto.PublicKey, id spiffeid.ID, ttl time.Duration) (*x509.Certificate, error) {
	if id.TrustDomain() != s.o.TrustDomain {
		return nil, fmt.Errorf("siteca: %s is not in trust domain %s", id, s.o.TrustDomain)
	}
	if ttl == 0 {
		ttl = s.o.SVIDTTL
	}
	return s.ca.Sign(ca.Leaf{ID: id, Key: pub, TTL: ttl})
}
