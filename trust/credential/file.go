package credential

import (
	"crypto/tls"
	"crypto/x509"
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
	return &tls.Config{Certificates: []tls.Certificate{pair}, RootCAs: roots, MinVersion: tls.VersionTLS13, ServerName: hostOf(c.Hub)}, nil
}

func hostOf(addr string) string {
	if i := strings.LastIndex(addr, ":"); i >= 0 {
		return strings.Trim(addr[:i], "[]")
	}
	return addr
}
