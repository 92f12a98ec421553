package credential

import (
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/meshfed/meshfed/atomicfile"
	"gopkg.in/yaml.v3"
)

// File is a credential for the hub, kept like a kubeconfig: where the hub
// is, the CA to trust, and a client certificate with its key. The hub
// writes one for the admin; a spoke writes its own when it redeems its
// join token. It is stored 0600.
type File struct {
	Hub        string `yaml:"hub"`
	Federation string `yaml:"federation"`
	// TrustDomain is a spoke's own site trust domain (empty for admin).
	TrustDomain string `yaml:"trustDomain,omitempty"`
	CA          string `yaml:"ca"`
	Cert        string `yaml:"certificate"`
	Key         string `yaml:"key"`
}

// Load reads a credential file.
func Load(path string) (*File, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("hub credential %s does not exist: point --config or MESHFED_CONFIG at the admin.conf in the hub's data dir: %w", path, err)
	}
	if err != nil {
		return nil, fmt.Errorf("read hub credential: %w", err)
	}
	return Parse(b, path)
}

// Parse decodes a credential; path names it in errors.
func Parse(b []byte, path string) (*File, error) {
	var c File
	dec := yaml.NewDecoder(strings.NewReader(string(b)))
	dec.KnownFields(true)
	if err := dec.Decode(&c); err != nil {
		return nil, fmt.Errorf("hub credential %s: %w", path, err)
	}
	if c.Hub == "" || c.CA == "" || c.Cert == "" || c.Key == "" {
		return nil, fmt.Errorf("hub credential %s is incomplete: it needs hub, ca, certificate and key", path)
	}
	return &c, nil
}

// Marshal encodes the credential.
func (c *File) Marshal() ([]byte, error) { return yaml.Marshal(c) }

// Write stores the credential at path, 0600, atomically.
func (c *File) Write(path string) error {
	b, err := c.Marshal()
	if err != nil {
		return err
	}
	return atomicfile.Write(path, b, 0o600)
}

// TLS returns the mTLS client configuration of the credential.
func (c *File) TLS() (*tls.Config, error) {
	pair, err := tls.X509KeyPair([]byte(c.Cert), []byte(c.Key))
	if err != nil {
		return nil, fmt.Errorf("hub credential: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM([]byte(c.CA)) {
		return nil, errors.New("hub credential: no CA certificate in it")
	}
	if err := c.checkSigned(pair, roots); err != nil {
		return nil, err
	}
	return &tls.Config{Certificates: []tls.Certificate{pair}, RootCAs: roots, MinVersion: tls.VersionTLS13, ServerName: hostOf(c.Hub)}, nil
}

// checkSigned refuses a certificate the hub CA in the file did not sign:
// the hub would refuse it in the handshake, and the client would hear
// only "bad certificate".
func (c *File) checkSigned(pair tls.Certificate, roots *x509.CertPool) error {
	leaf, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		return fmt.Errorf("hub credential: certificate: %w", err)
	}
	_, err = leaf.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	if err == nil {
		return nil
	}
	var fps []string
	for rest := []byte(c.CA); ; {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			break
		}
		sum := sha256.Sum256(b.Bytes)
		fps = append(fps, "sha256:"+hex.EncodeToString(sum[:]))
	}
	return fmt.Errorf("hub credential: the hub does not trust its certificate (issued by %q): the hub's CA is %s (%v); use the admin.conf from the hub's data dir, or the spoke.conf its join wrote", leaf.Issuer.String(), strings.Join(fps, ", "), err)
}

func hostOf(addr string) string {
	if i := strings.LastIndex(addr, ":"); i >= 0 {
		return strings.Trim(addr[:i], "[]")
	}
	return addr
}
