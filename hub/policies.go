package hub

import (
	"context"

	meshfedv1 "github.com/meshfed/meshfed/api/meshfed/v1"
	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/federation"
	"github.com/meshfed/meshfed/store"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// ApplyPolicy validates a traffic policy, stores it and sends it to every
// spoke. Failover and split sites must be registered: a typo there would
// silently never match.
func (s *adminServer) ApplyPolicy(ctx context.Context, req *meshfedv1.ApplyPolicyRequest) (*meshfedv1.TrafficPolicy, error) {
	h := s.h
	p := federation.PolicyFromWire(req.GetPolicy())
	if err := catalog.ValidatePolicy(p); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	sites := append([]string(nil), p.Failover...)
	for _, sp := range p.Split {
		if sp.Site != "" {
			sites = append(sites, sp.Site)
		}
	}
	for _, site := range sites {
		if !h.siteExists(site) {
			return nil, status.Errorf(codes.InvalidArgument, "%s: site %s is not registered (see `meshfed site list`)", p.Service, site)
		}
	}
	w := federation.PolicyToWire(p)
	if err := h.publish(ctx, "", federation.PolicyResource(w)); err != nil {
		return nil, status.Errorf(codes.Unavailable, "store: %v", err)
	}
	h.log.Info("traffic policy applied", "service", p.Service)
	return w, nil
}

// ListPolicies returns every policy, or the one asked for.
func (s *adminServer) ListPolicies(_ context.Context, req *meshfedv1.ListPoliciesRequest) (*meshfedv1.ListPoliciesResponse, error) {
	out := &meshfedv1.ListPoliciesResponse{}
	if req.GetName() != "" {
		r, ok := s.h.table.Get(federation.PolicyKey(req.GetNamespace(), req.GetName()))
		if !ok {
			return nil, status.Errorf(codes.NotFound, "service %s/%s has no traffic policy", req.GetNamespace(), req.GetName())
		}
		out.Policies = append(out.Policies, r.GetPolicy())
		return out, nil
	}
	for _, r := range s.h.table.List("policy/") {
		out.Policies = append(out.Policies, r.GetPolicy())
	}
	return out, nil
}

// DeletePolicy removes a service's policy; its proxies go back to the
// defaults (locality failover, any federated caller admitted).
func (s *adminServer) DeletePolicy(ctx context.Context, req *meshfedv1.DeletePolicyRequest) (*meshfedv1.DeletePolicyResponse, error) {
	h := s.h
	key := federation.PolicyKey(req.GetNamespace(), req.GetName())
	if _, ok := h.table.Get(key); !ok {
		return nil, status.Errorf(codes.NotFound, "service %s/%s has no traffic policy", req.GetNamespace(), req.GetName())
	}
	if err := h.store.Apply(ctx, store.Op{Key: keyResource + key, Delete: true}); err != nil {
		return nil, status.Errorf(codes.Unavailable, "store: %v", err)
	}
	h.table.Delete(key)
	h.log.Info("traffic policy deleted", "service", req.GetNamespace()+"/"+req.GetName())
	return &meshfedv1.DeletePolicyResponse{}, nil
}
