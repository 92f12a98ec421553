package hub

import (
	"context"

	meshfedv1 "github.com/meshfed/meshfed/api/meshfed/v1"
	"github.com/meshfed/meshfed/trust/ca"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

// peerID is the SPIFFE ID of the caller's verified client certificate.
func peerID(ctx context.Context) (spiffeid.ID, bool) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return spiffeid.ID{}, false
	}
	ti, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(ti.State.VerifiedChains) == 0 || len(ti.State.VerifiedChains[0]) == 0 {
		return spiffeid.ID{}, false
	}
	id, err := ca.SPIFFEID(ti.State.VerifiedChains[0][0])
	return id, err == nil
}

type spokeSiteKey struct{}

// spokeSite is the site of the spoke making the call (set by the
// interceptors from its certificate).
func spokeSite(ctx context.Context) string {
	s, _ := ctx.Value(spokeSiteKey{}).(string)
	return s
}

// authorize checks the caller may call method and returns the context the
// handler runs with.
func (h *Hub) authorize(ctx context.Context, method string) (context.Context, error) {
	if method == meshfedv1.Federation_Join_FullMethodName {
		return ctx, nil
	}
	id, ok := peerID(ctx)
	if !ok {
		return nil, status.Error(codes.Unauthenticated, "no client certificate: spokes join with a token first, the CLI uses the admin.conf from the hub's data dir")
	}
	switch method {
	case meshfedv1.Federation_Renew_FullMethodName, meshfedv1.Federation_Sync_FullMethodName, meshfedv1.Federation_RedeemNodeToken_FullMethodName:
		site, err := ca.SiteOfSpoke(h.td, id)
		if err != nil {
			return nil, status.Error(codes.PermissionDenied, err.Error())
		}
		return context.WithValue(ctx, spokeSiteKey{}, site), nil
	}
	if !ca.IsAdmin(h.td, id) {
		return nil, status.Errorf(codes.PermissionDenied, "%s may not call %s: the admin API needs the admin credential", id, method)
	}
	return ctx, nil
}

func (h *Hub) authorizeUnary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	ctx, err := h.authorize(ctx, info.FullMethod)
	if err != nil {
		return nil, err
	}
	return handler(ctx, req)
}

type authedStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s authedStream) Context() context.Context { return s.ctx }

func (h *Hub) authorizeStream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	ctx, err := h.authorize(ss.Context(), info.FullMethod)
	if err != nil {
		return err
	}
	return handler(srv, authedStream{ServerStream: ss, ctx: ctx})
}
