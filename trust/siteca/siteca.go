// Package siteca is a site's own certificate authority: the root of the
// site's SPIFFE trust domain, kept in the spoke's data dir (key 0600) or, for
// an in-cluster spoke, a Kubernetes Secret, so the key never leaves the site. It signs the site's SVIDs and
// gives the trust bundle the spoke publishes to the hub.
package siteca

import (
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/meshfed/meshfed/trust/ca"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Options configures a site CA. Zero values take the documented defaults.
type Options struct {
	// Dir holds ca.key, ca.crt and state.json when Storage is nil.
	Dir string
	// Storage keeps the CA; default Dir.
	Storage     Storage
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

// Open loads the CA from its storage, or creates it there on first use. A
// CA of another trust domain there is an error.
func Open(o Options) (*SiteCA, error) {
	if o.Storage == nil && o.Dir != "" {
		o.Storage = Dir(o.Dir)
	}
	if o.Storage == nil || o.TrustDomain.IsZero() {
		return nil, errors.New("siteca: a storage and a trust domain are required")
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
	files, err := o.Storage.Load()
	if err != nil {
		return nil, err
	}
	if files["ca.crt"] == nil {
		return s, s.create()
	}
	if s.ca, err = ca.Load(files["ca.crt"], files["ca.key"]); err != nil {
		return nil, fmt.Errorf("siteca: %w", err)
	}
	if err := json.Unmarshal(files["state.json"], &s.state); err != nil {
		return nil, fmt.Errorf("siteca: state: %w", err)
	}
	if s.state.TrustDomain != o.TrustDomain.Name() {
		return nil, fmt.Errorf("siteca: the stored CA is of trust domain %s, not %s: use that trust domain or another data dir", s.state.TrustDomain, o.TrustDomain)
	}
	if !s.state.ActivateAt.IsZero() {
		if s.next, err = ca.Load(files["next.crt"], files["next.key"]); err != nil {
			return nil, fmt.Errorf("siteca: prepared CA: %w", err)
		}
	}
	return s, nil
}

func (s *SiteCA) create() error {
	c, err := ca.NewWithKeyType(s.o.TrustDomain, "meshfed site CA "+s.o.TrustDomain.Name(), s.o.CATTL, s.o.KeyType)
	if err != nil {
		return fmt.Errorf("siteca: %w", err)
	}
	s.ca, s.state = c, state{TrustDomain: s.o.TrustDomain.Name(), Sequence: 1}
	return s.save()
}

// save stores the CA, a prepared one and the state, as one set.
func (s *SiteCA) save() error {
	st, err := json.Marshal(s.state)
	if err != nil {
		return err
	}
	files := map[string][]byte{"state.json": st}
	for prefix, c := range map[string]*ca.CA{"ca": s.ca, "next": s.next} {
		if c == nil {
			continue
		}
		key, err := ca.EncodeKeyPEM(c.Key)
		if err != nil {
			return err
		}
		files[prefix+".key"], files[prefix+".crt"] = key, ca.EncodeCertPEM(c.Cert)
	}
	return s.o.Storage.Save(files)
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
		return s.save()
	}
	c, err := ca.NewWithKeyType(s.o.TrustDomain, "meshfed site CA "+s.o.TrustDomain.Name(), s.o.CATTL, s.o.KeyType)
	if err != nil {
		return fmt.Errorf("siteca: %w", err)
	}
	s.next = c
	s.state.ActivateAt = now.Add(s.o.ActivationDelay)
	s.state.Sequence++
	return s.save()
}

// Tick moves a rotation on at now: it activates the prepared CA when due,
// and drops retired CAs whose last SVID has expired. It reports whether the
// bundle changed.
func (s *SiteCA) Tick(now time.Time) (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	changed := false
	if s.next != nil && !now.Before(s.state.ActivateAt) {
		// Every SVID the old CA signed ends by now + SVIDTTL.
		s.state.Retired = append(s.state.Retired, retired{CertPEM: string(ca.EncodeCertPEM(s.ca.Cert)), DropAfter: now.Add(s.o.SVIDTTL + time.Second)})
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
	return true, s.save()
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
	return s.Sign(ca.Leaf{ID: id, Key: pub, TTL: ttl})
}

// Sign issues an X.509 SVID for l, which may also name DNS names and IPs
// (a serving certificate that hostname-checking clients accept).
func (s *SiteCA) Sign(l ca.Leaf) (*x509.Certificate, error) {
	if l.ID.TrustDomain() != s.o.TrustDomain {
		return nil, fmt.Errorf("siteca: %s is not in trust domain %s", l.ID, s.o.TrustDomain)
	}
	if l.TTL == 0 || l.TTL > s.o.SVIDTTL {
		// Never longer than SVIDTTL: retiring a CA waits that long.
		l.TTL = s.o.SVIDTTL
	}
	s.mu.Lock()
	signer := s.ca
	s.mu.Unlock()
	return signer.Sign(l)
}

// ServerTLS is a TLS 1.3 server configuration whose client CAs follow the
// site's authorities, rotations included: every CA whose SVIDs are live.
func (s *SiteCA) ServerTLS(getCert func(*tls.ClientHelloInfo) (*tls.Certificate, error), auth tls.ClientAuthType) *tls.Config {
	base := &tls.Config{MinVersion: tls.VersionTLS13, GetCertificate: getCert, ClientAuth: auth}
	base.GetConfigForClient = func(*tls.ClientHelloInfo) (*tls.Config, error) {
		c := base.Clone()
		c.GetConfigForClient = nil
		c.ClientCAs = x509.NewCertPool()
		for _, a := range s.Authorities() {
			c.ClientCAs.AddCert(a)
		}
		return c, nil
	}
	return base
}
