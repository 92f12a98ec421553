// Package identityclient gets and keeps an X.509 SVID from a site's spoke
// (its Identity API): it attests once with a one-time node token, can ask
// for the SVID of a workload the host runs, and renews before expiry. The
// key never leaves the process, unless written to files for Envoy or
// proxyless gRPC (WriteFiles).
package identityclient

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"time"

	meshfedv1 "github.com/meshfed/meshfed/api/meshfed/v1"
	"github.com/meshfed/meshfed/trust/ca"
	"github.com/meshfed/meshfed/trust/credential"
	"github.com/meshfed/meshfed/trust/mtls"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
)

// Options configures a Client.
type Options struct {
	// Addr is the spoke's identity endpoint. Required.
	Addr string
	// Token is a one-time node token (`meshfed vm token create`); it pins
	// the site's CA.
	Token string
	// KubernetesTokenFile, instead of Token: a projected ServiceAccount
	// token (audience "meshfed") that the spoke checks with a TokenReview;
	// read again at each attestation, as the kubelet rotates it.
	KubernetesTokenFile string
	// CAFile is the site's CA certificates (the ConfigMap the spoke
	// publishes), which the spoke must chain to; needed with
	// KubernetesTokenFile.
	CAFile string
	// Workload, when set, is the SPIFFE ID to hold instead of the node's:
	// the site's catalog must list an endpoint with that identity on the
	// node (label meshfed.io/node).
	Workload string
	// Dir, when set, keeps the node's SVID (WriteFiles) after every issue,
	// and New starts from it while it is valid: a restart needs no new
	// token. Only for the node's own SVID (not with Workload).
	Dir string
	// Renewed, when set, is called after each renewal (for example to
	// write the new SVID to files).
	Renewed func()
	Logger  *slog.Logger
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
	c := &Client{o: o, log: o.Logger.With("component", "identity")}
	if o.Dir != "" {
		kept, err := c.load()
		switch {
		case err == nil && kept:
			c.log.Info("using the SVID kept in the data dir", "id", c.SVID().ID, "expires", c.SVID().Certificates[0].NotAfter)
			return c, nil
		case err != nil && o.Token == "":
			return nil, err
		case err == nil && o.Token == "" && o.KubernetesTokenFile == "":
			return nil, fmt.Errorf("no SVID kept in %s yet: the first start needs a node token (meshfed vm token create)", o.Dir)
		case err != nil:
			c.log.Warn("the kept SVID is of no use; attesting with the token", "err", err)
		}
	}
	if err := c.attest(ctx); err != nil {
		if strings.Contains(err.Error(), ca.PinMismatch) {
			// Not an outage: retrying cannot help.
			return nil, fmt.Errorf("attest at %s: the spoke there is not of the site the node token is for (its CA does not match the token's pin): create the token for this spoke's site (meshfed vm token create --site ...), or point at that site's spoke", o.Addr)
		}
		return nil, fmt.Errorf("attest at %s: %s", o.Addr, status.Convert(err).Message())
	}
	if err := c.keep(); err != nil {
		return nil, err
	}
	if o.Workload != "" {
		if err := c.call(ctx, issueWorkload(o.Workload)); err != nil {
			return nil, fmt.Errorf("workload SVID %s: %w", o.Workload, err)
		}
	}
	return c, nil
}

// Workload gets, with the node's SVID, the SVID of a workload the node
// runs, and returns a client that holds and renews it (a host agent's
// proxy per workload).
func (c *Client) Workload(ctx context.Context, id string) (*Client, error) {
	o := c.o
	o.Token, o.KubernetesTokenFile, o.Dir, o.Renewed, o.Workload = "", "", "", nil, id
	w := &Client{o: o, log: c.log.With("workload", id)}
	w.svid, w.bundles, w.td = c.SVID(), c.Bundles(), c.TrustDomain()
	if err := w.call(ctx, issueWorkload(id)); err != nil {
		return nil, fmt.Errorf("workload SVID %s: %s", id, status.Convert(err).Message())
	}
	return w, nil
}

func issueWorkload(id string) issueFunc {
	return func(ctx context.Context, ic meshfedv1.IdentityClient, csr []byte) (*meshfedv1.SVIDResponse, error) {
		return ic.IssueWorkload(ctx, &meshfedv1.IssueWorkloadRequest{SpiffeId: id, Csr: csr})
	}
}

// attest gets the first SVID: with a node token, trusting the spoke by the
// CA pin in the token; with a ServiceAccount token, by the CA file.
func (c *Client) attest(ctx context.Context) error {
	var conn *grpc.ClientConn
	var cred *meshfedv1.AttestRequest
	switch {
	case c.o.Token != "":
		tok, err := credential.ParseToken(c.o.Token)
		if err != nil {
			return fmt.Errorf("node token: %w", err)
		}
		if conn, err = DialPinned(c.o.Addr, tok.CAPin); err != nil {
			return err
		}
		cred = &meshfedv1.AttestRequest{Credential: &meshfedv1.AttestRequest_NodeToken{NodeToken: c.o.Token}}
	case c.o.KubernetesTokenFile != "":
		tok, err := os.ReadFile(c.o.KubernetesTokenFile)
		if err != nil {
			return fmt.Errorf("ServiceAccount token: %w", err)
		}
		pem, err := os.ReadFile(c.o.CAFile)
		if err != nil {
			return fmt.Errorf("the site's CA file (--ca-file, from the spoke's ConfigMap): %w", err)
		}
		tc, err := spokeTLS(pem)
		if err != nil {
			return err
		}
		if conn, err = grpc.NewClient("passthrough:///"+c.o.Addr, grpc.WithTransportCredentials(credentials.NewTLS(tc))); err != nil {
			return err
		}
		cred = &meshfedv1.AttestRequest{Credential: &meshfedv1.AttestRequest_KubernetesToken{KubernetesToken: strings.TrimSpace(string(tok))}}
	default:
		return fmt.Errorf("no credential: pass a node token, or a ServiceAccount token file with the site's CA file")
	}
	defer conn.Close()
	return c.fetch(ctx, conn, func(ctx context.Context, ic meshfedv1.IdentityClient, csr []byte) (*meshfedv1.SVIDResponse, error) {
		cred.Csr = csr
		return ic.Attest(ctx, cred)
	})
}

// DialPinned connects to a spoke's identity API at addr before the caller
// has an SVID, trusting the server only if its chain carries the site CA
// whose key has the node token's pin, and it is that site's spoke.
func DialPinned(addr, pin string) (*grpc.ClientConn, error) {
	tc := mtls.PinnedClientConfig(pin, mtls.AuthorizePath(ca.SiteSpokePath))
	return grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(credentials.NewTLS(tc)))
}

// spokeTLS accepts a server whose chain leads to one of the CA
// certificates in pem and whose SVID is a spoke's (…/meshfed/spoke).
func spokeTLS(pem []byte) (*tls.Config, error) {
	certs, err := ca.ParseCertsPEM(pem)
	if err != nil {
		return nil, fmt.Errorf("the site's CA file: %w", err)
	}
	if len(certs) == 0 {
		return nil, fmt.Errorf("the site's CA file holds no certificate")
	}
	td, err := ca.SPIFFEID(certs[0])
	if err != nil {
		return nil, fmt.Errorf("the site's CA certificate names no trust domain: %w", err)
	}
	bundle := x509bundle.FromX509Authorities(td.TrustDomain(), certs)
	spoke := spiffeid.RequireFromPath(td.TrustDomain(), ca.SiteSpokePath)
	return mtls.ClientConfig(nil, bundle, tlsconfig.AuthorizeID(spoke)), nil
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
	spoke := spiffeid.RequireFromPath(c.TrustDomain(), ca.SiteSpokePath)
	return mtls.ClientConfig(c, c, tlsconfig.AuthorizeID(spoke))
}

// Run renews the SVID at half-life until ctx ends.
func (c *Client) Run(ctx context.Context) error {
	for {
		s := c.SVID()
		leaf := s.Certificates[0]
		wait := time.Until(ca.RenewAt(leaf))
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(max(wait, 0)):
		}
		err := c.call(ctx, func(ctx context.Context, ic meshfedv1.IdentityClient, csr []byte) (*meshfedv1.SVIDResponse, error) {
			return ic.Renew(ctx, &meshfedv1.RenewSVIDRequest{Csr: csr})
		})
		if err != nil && time.Now().After(leaf.NotAfter) && c.o.KubernetesTokenFile != "" {
			// A pod attests again with its (rotated) ServiceAccount token.
			err = c.attest(ctx)
		}
		if err != nil && status.Code(err) == codes.PermissionDenied && strings.Contains(err.Error(), credential.RemovedHost) {
			return errors.New(status.Convert(err).Message())
		}
		if err != nil && time.Now().After(leaf.NotAfter) {
			// Renew needs a valid SVID: no retry can help now.
			return fmt.Errorf("the SVID %s expired at %s before it could be renewed (%v): attest again with a new node token (meshfed vm token create), or a fresh ServiceAccount token", s.ID, leaf.NotAfter.Format(time.RFC3339), err)
		}
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
		if err := c.keep(); err != nil {
			c.log.Error("could not keep the renewed SVID; a restart before the next renewal needs a new token", "err", err)
		}
		if c.o.Renewed != nil {
			c.o.Renewed()
		}
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
	key, csr, err := ca.NewKeyAndCSR()
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

// The client is a go-spiffe source of its SVID and bundles, always current.
var (
	_ x509svid.Source   = (*Client)(nil)
	_ x509bundle.Source = (*Client)(nil)
)

// GetX509SVID implements x509svid.Source: the current SVID.
func (c *Client) GetX509SVID() (*x509svid.SVID, error) { return c.SVID(), nil }

// GetX509BundleForTrustDomain implements x509bundle.Source: the bundle of
// td as of the last issue.
func (c *Client) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	return c.Bundles().GetX509BundleForTrustDomain(td)
}
