package spoke

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"time"

	meshfedv1 "github.com/meshfed/meshfed/api/meshfed/v1"
	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/federation"
	"github.com/meshfed/meshfed/trust/ca"
	"github.com/meshfed/meshfed/trust/credential"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	grpccreds "google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// identityServer issues X.509 SVIDs of the site's trust domain to callers
// that prove who they are.
type identityServer struct {
	meshfedv1.UnimplementedIdentityServer
	s   *Spoke
	hub meshfedv1.FederationClient

	mu      sync.Mutex
	serving *tls.Certificate
}

// NodeID is the SPIFFE ID of a host attested with a node token.
func NodeID(td spiffeid.TrustDomain, node string) (spiffeid.ID, error) {
	return spiffeid.FromPath(td, "/meshfed/node/"+node)
}

// servingCert is the spoke's own SVID for the identity endpoint, reissued
// at half-life; its chain carries the site CA, which node tokens pin.
func (is *identityServer) servingCert(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	is.mu.Lock()
	defer is.mu.Unlock()
	signer := is.s.ca.Cert()
	// Reissued at half-life, and at once after a CA rotation: node tokens
	// pin the CA that signs now.
	if ca.Current(is.serving, signer, time.Now()) {
		return is.serving, nil
	}
	key, err := ca.NewKey()
	if err != nil {
		return nil, err
	}
	id := spiffeid.RequireFromPath(is.s.ca.TrustDomain(), ca.SiteSpokePath)
	leaf, err := is.s.ca.SignSVID(key.Public(), id, 0)
	if err != nil {
		return nil, err
	}
	is.serving = &tls.Certificate{Certificate: [][]byte{leaf.Raw, signer.Raw}, PrivateKey: key, Leaf: leaf}
	return is.serving, nil
}

// serve runs the identity endpoint on ln until ctx ends.
func (is *identityServer) serve(ctx context.Context, ln net.Listener) error {
	// Attest is called before the caller has an SVID; Renew checks one.
	base := is.s.ca.ServerTLS(is.servingCert, tls.VerifyClientCertIfGiven)
	srv := grpc.NewServer(grpc.Creds(grpccreds.NewTLS(base)))
	meshfedv1.RegisterIdentityServer(srv, is)
	go func() {
		<-ctx.Done()
		srv.GracefulStop()
	}()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return fmt.Errorf("spoke: identity endpoint: %w", err)
	}
	return nil
}

// Attest exchanges a one-time node token, checked and burnt by the hub,
// for the node's SVID.
func (is *identityServer) Attest(ctx context.Context, req *meshfedv1.AttestRequest) (*meshfedv1.SVIDResponse, error) {
	if kt := req.GetKubernetesToken(); kt != "" {
		return is.attestKubernetes(ctx, kt, req.GetCsr())
	}
	tok := req.GetNodeToken()
	if tok == "" {
		return nil, status.Error(codes.InvalidArgument, "no credential: pass a node token from `meshfed vm token create` or a Kubernetes ServiceAccount token")
	}
	resp, err := is.hub.RedeemNodeToken(ctx, &meshfedv1.RedeemNodeTokenRequest{Token: tok})
	if err != nil {
		is.s.m.svids.WithLabelValues("attest", "refused").Inc()
		if status.Code(err) == codes.Unavailable {
			return nil, status.Errorf(codes.Unavailable, "the hub, which checks node tokens, is unreachable: %v", status.Convert(err).Message())
		}
		return nil, err
	}
	if err := catalog.ValidateName("node name", resp.GetNode()); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	id, err := NodeID(is.s.ca.TrustDomain(), resp.GetNode())
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	return is.issue(id, req.GetCsr(), "attest")
}

// attestKubernetes checks a ServiceAccount token with the cluster's
// TokenReview and issues spiffe://<td>/ns/<namespace>/sa/<name>.
func (is *identityServer) attestKubernetes(ctx context.Context, token string, csr []byte) (*meshfedv1.SVIDResponse, error) {
	if is.s.o.Attestor == nil {
		return nil, status.Error(codes.FailedPrecondition, "this spoke has no Kubernetes cluster to check the token with (start it with --kubeconfig, or in the cluster)")
	}
	sa, err := is.s.o.Attestor.Review(ctx, token)
	if errors.Is(err, ErrNotAuthenticated) {
		is.s.m.svids.WithLabelValues("attest", "refused").Inc()
		return nil, status.Error(codes.Unauthenticated, err.Error())
	}
	if err != nil {
		return nil, status.Error(codes.Unavailable, err.Error())
	}
	id, err := spiffeid.FromSegments(is.s.ca.TrustDomain(), "ns", sa.Namespace, "sa", sa.Name)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	return is.issue(id, csr, "attest")
}

// Renew gives the holder of a valid SVID of this site a fresh one with the
// same ID. A caller that let its SVID expire attests again.
func (is *identityServer) Renew(ctx context.Context, req *meshfedv1.RenewSVIDRequest) (*meshfedv1.SVIDResponse, error) {
	id, _, err := is.caller(ctx, "renewal")
	if err != nil {
		return nil, err
	}
	return is.issue(id, req.GetCsr(), "renew")
}

// caller is the SPIFFE ID of the caller's verified SVID of this site.
func (is *identityServer) caller(ctx context.Context, what string) (spiffeid.ID, *x509.Certificate, error) {
	p, _ := peer.FromContext(ctx)
	ti, ok := p.AuthInfo.(grpccreds.TLSInfo)
	if !ok || len(ti.State.VerifiedChains) == 0 {
		return spiffeid.ID{}, nil, status.Errorf(codes.Unauthenticated, "%s needs a valid SVID of this site as client certificate; an expired SVID must attest again", what)
	}
	leaf := ti.State.VerifiedChains[0][0]
	id, err := ca.SPIFFEID(leaf)
	if err != nil || id.TrustDomain() != is.s.ca.TrustDomain() {
		return spiffeid.ID{}, nil, status.Errorf(codes.PermissionDenied, "not an SVID of %s", is.s.ca.TrustDomain())
	}
	if node, ok := strings.CutPrefix(id.Path(), "/meshfed/node/"); ok {
		if at, revoked := is.s.removedAt(node); revoked && !ca.Issued(leaf).After(at) {
			return spiffeid.ID{}, nil, status.Errorf(codes.PermissionDenied, "%s %s: %s", credential.RemovedHost, node, RemovedHostHelp(is.s.o.Site, at))
		}
	}
	return id, leaf, nil
}

// RemovedHostHelp says what a removed host can do.
func RemovedHostHelp(site string, at time.Time) string {
	return fmt.Sprintf("this host was removed from site %s at %s (meshfed vm remove): its credential is refused; to bring it back, create a new node token (meshfed vm token create --site %s --node ...) and start the agent with it and an empty data dir", site, at.Format(time.RFC3339), site)
}

// removedAt is when a host was removed from this site (meshfed vm remove).
func (s *Spoke) removedAt(node string) (time.Time, bool) {
	r, ok := s.view.table.Get(federation.RevocationsKey(s.o.Site))
	if !ok {
		return time.Time{}, false
	}
	for _, n := range r.GetRevocations().GetNodes() {
		if n.GetNode() == node {
			return n.GetRevokedAt().AsTime(), true
		}
	}
	return time.Time{}, false
}

// IssueWorkload gives a host the SVID of a workload it runs, and only of
// one it runs: the site's catalog must have an endpoint with that identity
// labelled with the host's node name.
func (is *identityServer) IssueWorkload(ctx context.Context, req *meshfedv1.IssueWorkloadRequest) (*meshfedv1.SVIDResponse, error) {
	caller, _, err := is.caller(ctx, "a workload SVID")
	if err != nil {
		return nil, err
	}
	node, ok := strings.CutPrefix(caller.Path(), "/meshfed/node/")
	if !ok {
		return nil, status.Errorf(codes.PermissionDenied, "%s is not a host: only hosts (node SVIDs) ask for their workloads' SVIDs", caller)
	}
	id, err := spiffeid.FromString(req.GetSpiffeId())
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "spiffe_id: %v", err)
	}
	if id.TrustDomain() != is.s.ca.TrustDomain() {
		return nil, status.Errorf(codes.PermissionDenied, "%s is not in this site's trust domain %s", id, is.s.ca.TrustDomain())
	}
	if !is.s.local.RunsOn(id.String(), node) {
		is.s.m.svids.WithLabelValues("workload", "refused").Inc()
		return nil, status.Errorf(codes.PermissionDenied, "node %s runs no workload %s: the site's catalog has no endpoint with that identity and label %s=%s", node, id, catalog.LabelNode, node)
	}
	return is.issue(id, req.GetCsr(), "workload")
}

func (is *identityServer) issue(id spiffeid.ID, csrDER []byte, how string) (*meshfedv1.SVIDResponse, error) {
	csr, err := x509.ParseCertificateRequest(csrDER)
	if err == nil {
		err = csr.CheckSignature()
	}
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "csr: %v", err)
	}
	cert, err := is.s.ca.SignSVID(csr.PublicKey, id, 0)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	is.s.m.svids.WithLabelValues(how, "issued").Inc()
	return &meshfedv1.SVIDResponse{
		SpiffeId:       id.String(),
		CertificatePem: ca.EncodeCertPEM(cert),
		Expires:        timestamppb.New(cert.NotAfter),
		Bundles:        is.s.Bundles(),
	}, nil
}

// Bundles are the PEM CA certificates of every trust domain this site
// trusts: its own and every federated one it holds.
func (s *Spoke) Bundles() map[string][]byte {
	// All of the site's authorities, not only the signing one: during a
	// rotation, peers must trust the prepared CA before it signs.
	out := map[string][]byte{s.ca.TrustDomain().Name(): ca.EncodeCertPEM(s.ca.Authorities()...)}
	for _, r := range append(s.view.table.List("bundle/"), s.view.table.List("xbundle/")...) {
		b, err := federation.BundleFromWire(r.GetBundle())
		if err != nil {
			continue // refused by CheckResource's peer long before; never trusted
		}
		out[b.TrustDomain().Name()] = ca.EncodeCertPEM(b.X509Authorities()...)
	}
	return out
}
