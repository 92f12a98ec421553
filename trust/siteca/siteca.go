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
	"sync"
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
	// ActivationDelay is how long a new CA is only published before it
	// signs, so every peer trusts it before it meets an SVID it signed.
	// Default 5m.
	ActivationDelay time.Duration
}

// SiteCA is a site's CA.
type SiteCA struct {
	o  Options
	mu sync.Mutex
	ca *ca.CA
	// next is the prepared CA of a rotation in progress.
	next  *ca.CA
	state state
}

type state struct {
	TrustDomain string `json:"trustDomain"`
	Sequence    uint64 `json:"sequence"`
	// Generation is the last rotation request carried out.
	Generation uint64 `json:"generation,omitempty"`
	// ActivateAt is when the prepared CA (next.crt, next.key) takes over.
	ActivateAt time.Time `json:"activateAt,omitzero"`
	// Retired are former CAs kept in the bundle until the last SVID they
	// signed has expired.
	Retired []retired `json:"retired,omitempty"`
}

type retired struct {
	CertPEM   string    `json:"cert"`
	DropAfter time.Time `json:"dropAfter"`
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
	if o.ActivationDelay == 0 {
		o.ActivationDelay = 5 * time.Minute
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
	if !s.state.ActivateAt.IsZero() {
		if s.next, err = s.loadPair("next"); err != nil {
			return nil, err
		}
	}
	return s, nil
}

func (s *SiteCA) loadPair(name string) (*ca.CA, error) {
	certPEM, err := os.ReadFile(filepath.Join(s.o.Dir, name+".crt"))
	if err != nil {
		return nil, fmt.Errorf("siteca: %w", err)
	}
	keyPEM, err := os.ReadFile(filepath.Join(s.o.Dir, name+".key"))
	if err != nil {
		return nil, fmt.Errorf("siteca: %w", err)
	}
	return ca.Load(certPEM, keyPEM)
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
	certPath, keyPath, _ := s.paths()
	// Key and state first: the certificate is what Open looks for, so a
	// crash before it is written leaves a directory that is created anew.
	s.ca, s.state = c, state{TrustDomain: s.o.TrustDomain.Name(), Sequence: 1}
	if err := writeFiles(keyPath, keyPEM); err != nil {
		return err
	}
	if err := s.saveState(); err != nil {
		return err
	}
	return writeFiles(certPath, ca.EncodeCertPEM(c.Cert))
}

// writeFiles writes path/data pairs in order, each 0600 and atomically.
func writeFiles(pairs ...any) error {
	for i := 0; i < len(pairs); i += 2 {
		if err := atomicfile.Write(pairs[i].(string), pairs[i+1].([]byte), 0o600); err != nil {
			return fmt.Errorf("siteca: %w", err)
		}
	}
	return nil
}

func (s *SiteCA) saveState() error {
	_, _, statePath := s.paths()
	b, err := json.Marshal(s.state)
	if err != nil {
		return err
	}
	return writeFiles(statePath, b)
}

// Generation is the last rotation request the CA carried out.
func (s *SiteCA) Generation() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.state.Generation
}

// Rotate prepares a new CA for rotation request generation: it joins the
// bundle now and starts signing after ActivationDelay (see Tick). A request
// while a rotation is in progress is recorded and otherwise ignored.
func (s *SiteCA) Rotate(generation uint64, now time.Time) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if generation <= s.state.Generation {
		return nil
	}
	s.state.Generation = generation
	if s.next != nil {
		return s.saveState()
	}
	c, err := ca.NewWithKeyType(s.o.TrustDomain, "meshfed site CA "+s.o.TrustDomain.Name(), s.o.CATTL, s.o.KeyType)
	if err != nil {
		return fmt.Errorf("siteca: %w", err)
	}
	keyPEM, err := ca.EncodeKeyPEM(c.Key)
	if err != nil {
		return err
	}
	if err := writeFiles(filepath.Join(s.o.Dir, "next.key"), keyPEM, filepath.Join(s.o.Dir, "next.crt"), ca.EncodeCertPEM(c.Cert)); err != nil {
		return err
	}
	s.next = c
	s.state.ActivateAt = now.Add(s.o.ActivationDelay)
	s.state.Sequence++
	return s.saveState()
}

// Tick moves a rotation on at now: it activates the prepared CA when due,
// and drops retired CAs whose last SVID has expired. It reports whether the
// bundle changed.
func (s *SiteCA) Tick(now time.Time) (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	changed := false
	if s.next != nil && !now.Before(s.state.ActivateAt) {
		certPath, keyPath, _ := s.paths()
		keyPEM, err := ca.EncodeKeyPEM(s.next.Key)
		if err != nil {
			return false, err
		}
		// Every SVID the old CA signed ends by now + SVIDTTL.
		s.state.Retired = append(s.state.Retired, retired{CertPEM: string(ca.EncodeCertPEM(s.ca.Cert)), DropAfter: now.Add(s.o.SVIDTTL + time.Second)})
		if err := writeFiles(keyPath, keyPEM, certPath, ca.EncodeCertPEM(s.next.Cert)); err != nil {
			return false, err
		}
		s.ca, s.next, s.state.ActivateAt = s.next, nil, time.Time{}
		changed = true
	}
	kept := s.state.Retired[:0]
	for _, r := range s.state.Retired {
		if now.Before(r.DropAfter) {
			kept = append(kept, r)
		} else {
			changed = true
		}
	}
	s.state.Retired = kept
	if !changed {
		return false, nil
	}
	s.state.Sequence++
	return true, s.saveState()
}

// TrustDomain is the CA's trust domain.
func (s *SiteCA) TrustDomain() spiffeid.TrustDomain { return s.o.TrustDomain }

// Cert is the CA certificate that signs now.
func (s *SiteCA) Cert() *x509.Certificate {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.ca.Cert
}

// Authorities are every CA the site's SVIDs may chain to: retired ones
// still covering live SVIDs, a prepared one, and last the one that signs.
func (s *SiteCA) Authorities() []*x509.Certificate {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []*x509.Certificate
	for _, r := range s.state.Retired {
		if c, err := ca.ParseCertPEM([]byte(r.CertPEM)); err == nil {
			out = append(out, c)
		}
	}
	if s.next != nil {
		out = append(out, s.next.Cert)
	}
	return append(out, s.ca.Cert)
}

// Bundle is the site's trust bundle, with its sequence number and refresh
// hint. Its last authority is the CA that signs now.
func (s *SiteCA) Bundle() *spiffebundle.Bundle {
	b := spiffebundle.FromX509Authorities(s.o.TrustDomain, s.Authorities())
	s.mu.Lock()
	defer s.mu.Unlock()
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
	if ttl == 0 || ttl > s.o.SVIDTTL {
		// Never longer than SVIDTTL: retiring a CA waits that long.
		ttl = s.o.SVIDTTL
	}
	s.mu.Lock()
	signer := s.ca
	s.mu.Unlock()
	return signer.Sign(ca.Leaf{ID: id, Key: pub, TTL: ttl})
}
