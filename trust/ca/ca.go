// Package ca is a small X.509 certificate authority for meshfed's own
// identities: the hub's federation CA signs the hub's serving certificate,
// spoke certificates (after a join token is redeemed) and the admin
// credential. Every identity is a SPIFFE ID in a URI SAN.
//
// Private keys are ECDSA P-256, generated where they are used; a CSR carries
// only the public half.
package ca

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// CA signs certificates with one key.
type CA struct {
	Cert *x509.Certificate
	Key  crypto.Signer
	// now is the clock, for tests.
	now func() time.Time
}

// Key types NewKeyOfType makes.
const (
	KeyECP256  = "ec-p256"
	KeyECP384  = "ec-p384"
	KeyRSA2048 = "rsa-2048"
)

// NewKeyOfType generates a key of kind ("" is ec-p256).
func NewKeyOfType(kind string) (crypto.Signer, error) {
	switch kind {
	case "", KeyECP256:
		return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case KeyECP384:
		return ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	case KeyRSA2048:
		return rsa.GenerateKey(rand.Reader, 2048)
	}
	return nil, fmt.Errorf("ca: key type %q is unknown: want %s, %s or %s", kind, KeyECP256, KeyECP384, KeyRSA2048)
}

// New creates a self-signed ECDSA P-256 CA for trust domain td, valid for
// ttl.
func New(td spiffeid.TrustDomain, commonName string, ttl time.Duration) (*CA, error) {
	return NewWithKeyType(td, commonName, ttl, KeyECP256)
}

// NewWithKeyType creates a self-signed CA with a key of keyType.
func NewWithKeyType(td spiffeid.TrustDomain, commonName string, ttl time.Duration, keyType string) (*CA, error) {
	key, err := NewKeyOfType(keyType)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: commonName, Organization: []string{"meshfed"}},
		NotBefore:             now.Add(-Backdate),
		NotAfter:              now.Add(ttl),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		URIs:                  []*url.URL{td.ID().URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("ca: self-sign: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &CA{Cert: cert, Key: key, now: time.Now}, nil
}

// Load parses a CA from its PEM certificate and PEM PKCS#8 key.
func Load(certPEM, keyPEM []byte) (*CA, error) {
	cert, err := ParseCertPEM(certPEM)
	if err != nil {
		return nil, err
	}
	key, err := ParseKeyPEM(keyPEM)
	if err != nil {
		return nil, err
	}
	return &CA{Cert: cert, Key: key, now: time.Now}, nil
}

// Leaf is what Sign is asked to certify.
type Leaf struct {
	ID  spiffeid.ID
	Key crypto.PublicKey
	TTL time.Duration
	// DNSNames and IPs make a serving certificate.
	DNSNames []string
	IPs      []net.IP
}

// Backdate is how far before its issue a certificate's validity starts, so
// a peer whose clock is a little behind accepts it at once.
const Backdate = time.Minute

// RenewAt is the half-life of cert counted from its issue, not from its
// backdated NotBefore: for a certificate that lives less than twice
// Backdate the latter lies before the issue, and renewing "at half-life"
// would renew at once, again and again.
func RenewAt(cert *x509.Certificate) time.Time {
	issued := Issued(cert)
	return issued.Add(cert.NotAfter.Sub(issued) / 2)
}

// Issued is when cert was signed: its NotBefore, less the backdating.
func Issued(cert *x509.Certificate) time.Time {
	issued := cert.NotBefore.Add(Backdate)
	if !issued.Before(cert.NotAfter) {
		return cert.NotBefore // not one of ours: not backdated
	}
	return issued
}

// Current: c, a serving certificate whose chain ends in its signer, was
// signed by signer and is not due for renewal yet. After a CA rotation it
// is due at once.
func Current(c *tls.Certificate, signer *x509.Certificate, now time.Time) bool {
	return c != nil && len(c.Certificate) > 1 && bytes.Equal(c.Certificate[1], signer.Raw) && now.Before(RenewAt(c.Leaf))
}

// Sign issues a certificate for l, never outliving the CA.
func (c *CA) Sign(l Leaf) (*x509.Certificate, error) {
	now := c.now()
	notAfter := now.Add(l.TTL)
	if notAfter.After(c.Cert.NotAfter) {
		notAfter = c.Cert.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: l.ID.Path(), Organization: []string{"meshfed"}},
		NotBefore:    now.Add(-Backdate),
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
		URIs:         []*url.URL{l.ID.URL()},
		DNSNames:     l.DNSNames,
		IPAddresses:  l.IPs,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.Cert, l.Key, c.Key)
	if err != nil {
		return nil, fmt.Errorf("ca: sign %s: %w", l.ID, err)
	}
	return x509.ParseCertificate(der)
}

// SignCSR checks a DER PKCS#10 request's signature and issues a certificate
// for id with the request's public key. Everything else the CSR asks for is
// ignored: the CA decides names.
func (c *CA) SignCSR(csrDER []byte, id spiffeid.ID, ttl time.Duration) (*x509.Certificate, error) {
	csr, err := x509.ParseCertificateRequest(csrDER)
	if err != nil {
		return nil, fmt.Errorf("ca: parse CSR: %w", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("ca: CSR signature: %w", err)
	}
	return c.Sign(Leaf{ID: id, Key: csr.PublicKey, TTL: ttl})
}

// Pin is the hex SHA-256 of the certificate's public key (its DER
// SubjectPublicKeyInfo), the form kubeadm's discovery hash uses.
func Pin(cert *x509.Certificate) string {
	sum := sha256.Sum256(cert.RawSubjectPublicKeyInfo)
	return hex.EncodeToString(sum[:])
}

// VerifyPinned checks a TLS peer's chain against a pinned CA: one
// certificate of the chain must be a CA whose key has the pin, and the leaf
// must verify against it. It returns that CA.
func VerifyPinned(rawCerts [][]byte, pin string) (*x509.Certificate, error) {
	if len(rawCerts) == 0 {
		return nil, errors.New("ca: the server sent no certificate")
	}
	certs := make([]*x509.Certificate, 0, len(rawCerts))
	for _, raw := range rawCerts {
		c, err := x509.ParseCertificate(raw)
		if err != nil {
			return nil, fmt.Errorf("ca: server certificate: %w", err)
		}
		certs = append(certs, c)
	}
	for _, c := range certs[1:] {
		if !c.IsCA || Pin(c) != pin {
			continue
		}
		roots := x509.NewCertPool()
		roots.AddCert(c)
		if _, err := certs[0].Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
			return nil, fmt.Errorf("ca: server certificate does not verify against the pinned CA: %w", err)
		}
		return c, nil
	}
	return nil, errors.New(PinMismatch)
}

// NewKey generates an ECDSA P-256 key.
func NewKey() (*ecdsa.PrivateKey, error) {
	return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
}

// NewCSR makes a DER certificate request for key.
func NewCSR(key crypto.Signer) ([]byte, error) {
	return x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{Organization: []string{"meshfed"}}}, key)
}

// NewKeyAndCSR makes a key and a CSR for it, to be signed elsewhere.
func NewKeyAndCSR() (crypto.Signer, []byte, error) {
	key, err := NewKey()
	if err != nil {
		return nil, nil, err
	}
	csr, err := NewCSR(key)
	if err != nil {
		return nil, nil, err
	}
	return key, csr, nil
}

// EncodeCertPEM encodes certificates as PEM.
func EncodeCertPEM(certs ...*x509.Certificate) []byte {
	var out []byte
	for _, c := range certs {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return out
}

// EncodeKeyPEM encodes a private key as PEM PKCS#8.
func EncodeKeyPEM(key crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("ca: encode key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// ParseCertPEM parses the first certificate of a PEM bundle.
func ParseCertPEM(data []byte) (*x509.Certificate, error) {
	certs, err := ParseCertsPEM(data)
	if err != nil {
		return nil, err
	}
	return certs[0], nil
}

// ParseCertsPEM parses every certificate of a PEM bundle.
func ParseCertsPEM(data []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("ca: parse certificate: %w", err)
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, errors.New("ca: no PEM certificate found")
	}
	return out, nil
}

// ParseKeyPEM parses a PEM PKCS#8 private key.
func ParseKeyPEM(data []byte) (crypto.Signer, error) {
	b, _ := pem.Decode(data)
	if b == nil {
		return nil, errors.New("ca: no PEM private key found")
	}
	k, err := x509.ParsePKCS8PrivateKey(b.Bytes)
	if err != nil {
		return nil, fmt.Errorf("ca: parse private key: %w", err)
	}
	s, ok := k.(crypto.Signer)
	if !ok {
		return nil, errors.New("ca: private key cannot sign")
	}
	return s, nil
}

// SPIFFEID returns the single SPIFFE ID in a certificate's URI SANs.
func SPIFFEID(cert *x509.Certificate) (spiffeid.ID, error) {
	if len(cert.URIs) != 1 {
		return spiffeid.ID{}, fmt.Errorf("ca: certificate has %d URI SANs, want one SPIFFE ID", len(cert.URIs))
	}
	return spiffeid.FromURI(cert.URIs[0])
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(fmt.Sprintf("ca: no randomness: %v", err))
	}
	return n
}

// PinMismatch is the error of a pinned dial whose server chains to another
// CA than the token pins; it reaches callers inside gRPC's transport error,
// as text.
const PinMismatch = "ca: the server's CA does not match the token's pin: the token is for another hub or site, or someone is in the middle"
