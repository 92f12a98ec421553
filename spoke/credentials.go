package spoke

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	meshfedv1 "github.com/meshfed/meshfed/api/meshfed/v1"
	"github.com/meshfed/meshfed/atomicfile"
	"github.com/meshfed/meshfed/hubclient"
	"github.com/meshfed/meshfed/trust/ca"
	"github.com/meshfed/meshfed/trust/credential"
	"github.com/meshfed/meshfed/trust/siteca"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// credentials is the spoke's identity at the hub, kept as spoke.conf
// (0600) in the data dir, or in a Kubernetes Secret for an in-cluster spoke
// whose data dir does not outlive its pod, so a restart needs no new token.
type credentials struct {
	store siteca.Storage
	path  string
	mu    sync.Mutex
	conf  *credential.File
	cert  *tls.Certificate
}

const credentialFile = "spoke.conf"

func (c *credentials) save(conf *credential.File) error {
	b, err := conf.Marshal()
	if err != nil {
		return err
	}
	if c.store != nil {
		return c.store.Save(map[string][]byte{credentialFile: b})
	}
	return atomicfile.Write(c.path, b, 0o600)
}

func (c *credentials) load() (*credential.File, error) {
	if c.store == nil {
		return credential.Load(c.path)
	}
	files, err := c.store.Load()
	if err != nil {
		return nil, err
	}
	if files[credentialFile] == nil {
		return nil, os.ErrNotExist
	}
	return credential.Parse(files[credentialFile], c.path)
}

// loadOrJoin loads the stored credential, or redeems token for one.
func loadOrJoin(ctx context.Context, dataDir string, store siteca.Storage, site, hub, token string) (*credentials, error) {
	c := &credentials{store: store, path: filepath.Join(dataDir, credentialFile)}
	conf, err := c.load()
	switch {
	case err == nil:
		c.conf = conf
		if err := c.parse(site); err != nil {
			return nil, err
		}
		if hub != "" && hub != conf.Hub {
			conf.Hub = hub
			if err := c.save(conf); err != nil {
				return nil, err
			}
		}
		return c, nil
	case !errors.Is(err, os.ErrNotExist):
		return nil, fmt.Errorf("spoke: credential: %w (move it away and join again with a new token)", err)
	}
	if token == "" {
		return nil, fmt.Errorf("spoke: no credential stored yet: pass --token (from `meshfed site token create --site %s`)", site)
	}
	if hub == "" {
		return nil, errors.New("spoke: pass --hub HOST:PORT to join")
	}
	tok, err := credential.ParseToken(token)
	if err != nil {
		return nil, fmt.Errorf("spoke: %w", err)
	}
	key, err := ca.NewKey()
	if err != nil {
		return nil, err
	}
	csr, err := ca.NewCSR(key)
	if err != nil {
		return nil, err
	}
	conn, err := hubclient.DialPinned(hub, tok.CAPin)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	join := func(wait bool) (*meshfedv1.JoinResponse, error) {
		return meshfedv1.NewFederationClient(conn).Join(cctx, &meshfedv1.JoinRequest{Token: token, Site: site, Csr: csr}, grpc.WaitForReady(wait))
	}
	// At once first: a hub whose CA is not the token's fails the
	// handshake for good, and waiting out the timeout would only hide why.
	// A hub that is not up yet is waited for.
	resp, err := join(false)
	if status.Code(err) == codes.Unavailable && !strings.Contains(err.Error(), ca.PinMismatch) {
		resp, err = join(true)
	}
	if err != nil && strings.Contains(err.Error(), ca.PinMismatch) {
		return nil, fmt.Errorf("spoke: join hub %s: its CA does not match the join token's pin: the token is from another hub (or someone is in the middle); create one at this hub with `meshfed site token create --site %s`", hub, site)
	}
	if err != nil {
		return nil, fmt.Errorf("spoke: join hub %s: %w", hub, err)
	}
	keyPEM, err := ca.EncodeKeyPEM(key)
	if err != nil {
		return nil, err
	}
	conf = &credential.File{Hub: hub, Federation: resp.GetFederation(), TrustDomain: resp.GetTrustDomain(), CA: string(resp.GetCaPem()), Cert: string(resp.GetCertificatePem()), Key: string(keyPEM)}
	if err := c.save(conf); err != nil {
		return nil, fmt.Errorf("spoke: keep credential: %w", err)
	}
	c.conf = conf
	return c, c.parse(site)
}

// parse loads the key pair and checks it is this site's.
func (c *credentials) parse(site string) error {
	pair, err := tls.X509KeyPair([]byte(c.conf.Cert), []byte(c.conf.Key))
	if err != nil {
		return fmt.Errorf("spoke: credential %s: %w", c.path, err)
	}
	leaf, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		return err
	}
	id, err := ca.SPIFFEID(leaf)
	if err != nil {
		return err
	}
	if want := "/meshfed/spoke/" + site; id.Path() != want {
		return fmt.Errorf("spoke: the data dir's credential is %s, not site %s: use the data dir of site %s or another one", id, site, site)
	}
	pair.Leaf = leaf
	c.mu.Lock()
	c.cert = &pair
	c.mu.Unlock()
	return nil
}

// tlsConfig presents the current certificate, so a renewal takes effect on
// the next handshake without redialing.
func (c *credentials) tlsConfig() (*tls.Config, error) {
	tc, err := c.conf.TLS()
	if err != nil {
		return nil, err
	}
	tc.Certificates = nil
	tc.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.cert, nil
	}
	return tc, nil
}

// renewAt is the half-life of the current certificate.
func (c *credentials) renewAt() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	l := c.cert.Leaf
	return ca.RenewAt(l)
}

// renew exchanges the certificate for a fresh one and stores it.
func (c *credentials) renew(ctx context.Context, conn *grpc.ClientConn, site string) error {
	key, csr, err := ca.NewKeyAndCSR()
	if err != nil {
		return err
	}
	resp, err := meshfedv1.NewFederationClient(conn).Renew(ctx, &meshfedv1.RenewRequest{Csr: csr})
	if err != nil {
		return fmt.Errorf("spoke: renew certificate: %w", err)
	}
	keyPEM, err := ca.EncodeKeyPEM(key)
	if err != nil {
		return err
	}
	next := *c.conf
	next.Cert, next.Key = string(resp.GetCertificatePem()), string(keyPEM)
	if err := c.save(&next); err != nil {
		return err
	}
	c.conf = &next
	return c.parse(site)
}
