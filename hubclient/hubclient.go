// Package hubclient is the client side of the hub's API: the credential
// file the CLI and spokes keep (like a kubeconfig) and dialing the hub over
// mTLS with it, or, before a spoke has a certificate, over TLS pinned to
// the hub's CA by a join token.
package hubclient

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/meshfed/meshfed/atomicfile"
	"github.com/meshfed/meshfed/trust/ca"
	"github.com/meshfed/meshfed/trust/mtls"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"gopkg.in/yaml.v3"
)

// Config is a credential for the hub: where it is, the CA to trust, and a
// client certificate with its key. It is written 0600.
type Config struct {
	Hub        string `yaml:"hub"`
	Federation string `yaml:"federation"`
	// TrustDomain is a spoke's own site trust domain (empty for admin).
	TrustDomain string `yaml:"trustDomain,omitempty"`
	CA          string `yaml:"ca"`
	Cert        string `yaml:"certificate"`
	Key         string `yaml:"key"`
}

// Load reads a credential file.
func Load(path string) (*Config, error) {
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
func Parse(b []byte, path string) (*Config, error) {
	var c Config
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
func (c *Config) Marshal() ([]byte, error) { return yaml.Marshal(c) }

// Write stores the credential at path, 0600, atomically.
func (c *Config) Write(path string) error {
	b, err := c.Marshal()
	if err != nil {
		return err
	}
	return atomicfile.Write(path, b, 0o600)
}

// TLS returns the mTLS client configuration of the credential.
func (c *Config) TLS() (*tls.Config, error) {
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

// Dial connects to the hub with the credential.
func (c *Config) Dial() (*grpc.ClientConn, error) {
	tc, err := c.TLS()
	if err != nil {
		return nil, err
	}
	return DialTLS(c.Hub, tc)
}

// DialPinned connects to the hub at addr without a client certificate,
// trusting the server only if its CA's key has the given pin and it is the
// hub of that CA's trust domain: the way a spoke first reaches the hub to
// redeem its join token.
func DialPinned(addr, pin string) (*grpc.ClientConn, error) {
	return DialTLS(addr, mtls.PinnedClientConfig(pin, mtls.AuthorizePath(ca.HubPath)))
}

// DialTLS connects to the hub at addr with tc.
func DialTLS(addr string, tc *tls.Config) (*grpc.ClientConn, error) {
	conn, err := grpc.NewClient("passthrough:///"+addr,
		grpc.WithTransportCredentials(credentials.NewTLS(tc)),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 20 * time.Second, Timeout: 10 * time.Second}),
	)
	if err != nil {
		return nil, fmt.Errorf("dial hub %s: %w", addr, err)
	}
	return conn, nil
}

func hostOf(addr string) string {
	if i := strings.LastIndex(addr, ":"); i >= 0 {
		return strings.Trim(addr[:i], "[]")
	}
	return addr
}

// Call bounds a CLI call's time.
func Call(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, 15*time.Second)
}
