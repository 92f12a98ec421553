// Package identityclient gets and keeps an X.509 SVID from a site's spoke
// (its Identity API): it attests once with a one-time node token, can ask
// for the SVID of a workload the host runs, and renews before expiry. The
// key never leaves the process.
package identityclient

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"sync"
	"time"

	meshfedv1 "github.com/meshfed/meshfed/api/meshfed/v1"
	"github.com/meshfed/meshfed/hubclient"
	"github.com/meshfed/meshfed/trust/ca"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
)

// Options configures a Client.
type Options struct {
	// Addr is the spoke's identity endpoint. Required.
	Addr string
	// Token is a one-time node token (`meshfed vm token create`). Required.
	Token string
	// Workload, when set, is the SPIFFE ID to hold instead of the node's:
	// the site's catalog must list an endpoint with that identity on the
	// node (label meshfed.io/node).
	Workload string
	Logger   *slog.Logger
}

// Client holds an SVID and the site's bundles.
type Client struct {
	o   Options
	log *slog.Logger

	mu      sync.RWMutex
	svid    *x509svid.SVID
	bundles *x509bundle.Set
	td      spiffeid.TrustDomain
}

// New attests with the node token and, if asked, gets the workload's SVID.
func New(ctx context.Context, o Options) (*Client, error) {
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	tok, err := hubclient.ParseToken(o.Token)
	if err != nil {
		return nil, fmt.Errorf("node token: %w", err)
	}
	c := &Client{o: o, log: o.Logger.With("component", "identity")}
	conn, err := hubclient.DialPinned(o.Addr, tok.CAPin)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	if err := c.fetch(ctx, conn, func(ctx context.Context, ic meshfedv1.IdentityClient, csr []byte) (*meshfedv1.SVIDResponse, error) {
		return ic.Attest(ctx, &meshfedv1.AttestRequest{Credential: &meshfedv1.AttestRequest_NodeToken{NodeToken: o.Token}, Csr: csr})
	}); err != nil {
		return nil, fmt.Errorf("attest at %s: %w", o.Addr, err)
	}
	if o.Workload != "" {
		if err := c.call(ctx, func(ctx context.Context, ic meshfedv1.IdentityClient, csr []byte) (*meshfedv1.SVIDResponse, error) {
			return ic.IssueWorkload(ctx, &meshfedv1.IssueWorkloadRequest{SpiffeId: o.Workload, Csr: csr})
		}); err != nil {
			return nil, fmt.Errorf("workload SVID %s: %w", o.Workload, err)
		}
	}
	return c, nil
}

// SVID is the current SVID.
func (c *Client) SVID() *x509svid.SVID {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.svid
}

// Bundles are the bundles the site trusts, as of the last issue.
func (c *Client) Bundles() *x509bundle.Set {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.bundles
}

// TrustDomain is the site's trust domain.
func (c *Client) TrustDomain() spiffeid.TrustDomain {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.td
}

// ClientTLS is a TLS config that presents the current SVID and accepts only
// the site's spoke (spiffe://<td>/meshfed/spoke).
func (c *Client) ClientTLS() *tls.Config {
	spoke := spiffeid.RequireFromPath(c.TrustDomain(), "/meshfed/spoke")
	tc := tlsconfig.MTLSClientConfig(svidSource{c}, bundleSource{c}, tlsconfig.AuthorizeID(spoke))
	tc.MinVersion = tls.VersionTLS13
	return tc
}

// Run renews the SVID at half-life until ctx ends.
func (c *Client) Run(ctx context.Context) error {
	for {
		s := c.SVID()
		leaf := s.Certificates[0]
		wait := time.Until(leaf.NotBefore.Add(leaf.NotAfter.Sub(leaf.NotBefore) / 2))
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(max(wait, 0)):
		}
		err := c.call(ctx, func(ctx context.Context, ic meshfedv1.IdentityClient, csr []byte) (*meshfedv1.SVIDResponse, error) {
			return ic.Renew(ctx, &meshfedv1.RenewSVIDRequest{Csr: csr})
		})
		if err != nil {
			c.log.Error("could not renew the SVID; retrying in 5s", "err", err, "expires", leaf.NotAfter)
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(5 * time.Second):
			}
			continue
		}
		c.log.Info("renewed the SVID", "id", c.SVID().ID, "expires", c.SVID().Certificates[0].NotAfter)
	}
}

type issueFunc func(ctx context.Context, ic meshfedv1.IdentityClient, csr []byte) (*meshfedv1.SVIDResponse, error)

// call runs issue over a connection authenticated with the current SVID.
func (c *Client) call(ctx context.Context, issue issueFunc) error {
	conn, err := grpc.NewClient("passthrough:///"+c.o.Addr, grpc.WithTransportCredentials(credentials.NewTLS(c.ClientTLS())))
	if err != nil {
		return err
	}
	defer conn.Close()
	return c.fetch(ctx, conn, issue)
}

func (c *Client) fetch(ctx context.Context, conn *grpc.ClientConn, issue issueFunc) error {
	key, err := ca.NewKey()
	if err != nil {
		return err
	}
	csr, err := ca.NewCSR(key)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	resp, err := issue(ctx, meshfedv1.NewIdentityClient(conn), csr)
	if err != nil {
		return err
	}
	keyPEM, err := ca.EncodeKeyPEM(key)
	if err != nil {
		return err
	}
	svid, err := x509svid.Parse(resp.GetCertificatePem(), keyPEM)
	if err != nil {
		return fmt.Errorf("the spoke sent an SVID that does not parse: %w", err)
	}
	set := x509bundle.NewSet()
	for td, pem := range resp.GetBundles() {
		certs, err := ca.ParseCertsPEM(pem)
		if err != nil {
			return fmt.Errorf("bundle of %s: %w", td, err)
		}
		t, err := spiffeid.TrustDomainFromString(td)
		if err != nil {
			return err
		}
		set.Add(x509bundle.FromX509Authorities(t, certs))
	}
	c.mu.Lock()
	c.svid, c.bundles, c.td = svid, set, svid.ID.TrustDomain()
	c.mu.Unlock()
	return nil
}

type svidSource struct{ c *Client }

func (s svidSource) GetX509SVID() (*x509svid.SVID, error) { return s.c.SVID(), nil }

type bundleSource struct{ c *Client }

func (s bundleSource) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	return s.c.Bundles().GetX509BundleForTrustDomain(td)
}

// Leaf is the current SVID's certificate.
func (c *Client) Leaf() *x509.Certificate { return c.SVID().Certificates[0] }
