package hub

import (
	"context"
	"errors"

	meshfedv1 "github.com/meshfed/meshfed/api/meshfed/v1"
	"github.com/meshfed/meshfed/federation"
	"github.com/meshfed/meshfed/hub/trustfed"
	"github.com/meshfed/meshfed/store"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// Federate imports an outside trust domain (hub/trustfed does the work).
func (s *adminServer) Federate(ctx context.Context, req *meshfedv1.FederateRequest) (*meshfedv1.FederateResponse, error) {
	rec := trustfed.Record{TrustDomain: req.GetTrustDomain(), URL: req.GetBundleEndpointUrl(), EndpointID: req.GetEndpointSpiffeId(), BootstrapPEM: string(req.GetBootstrapPem())}
	w, err := s.h.fed.Add(ctx, rec)
	switch {
	case errors.Is(err, trustfed.ErrInvalid):
		return nil, status.Error(codes.InvalidArgument, err.Error())
	case errors.Is(err, trustfed.ErrUnreachable):
		return nil, status.Error(codes.FailedPrecondition, err.Error())
	case err != nil:
		return nil, status.Error(codes.Unavailable, err.Error())
	}
	return &meshfedv1.FederateResponse{Bundle: w}, nil
}

func (s *adminServer) ListBundles(context.Context, *meshfedv1.ListBundlesRequest) (*meshfedv1.ListBundlesResponse, error) {
	own, others := s.h.fed.Bundles()
	return &meshfedv1.ListBundlesResponse{FederationBundle: own, Bundles: others}, nil
}

// sitesTrustDomain: td is one of the federation's sites'.
func (h *Hub) sitesTrustDomain(td string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, st := range h.sites {
		if st.rec.Site.TrustDomain == td {
			return true
		}
	}
	return false
}

// publish stores a hub-owned resource durably, then sends it to every site.
// One about a site (site set) is stored only while the site is registered.
func (h *Hub) publish(ctx context.Context, site string, r *meshfedv1.Resource) error {
	raw, err := proto.Marshal(r)
	if err != nil {
		return err
	}
	op := store.Op{Key: keyResource + r.Key, Value: raw}
	if site != "" {
		err = h.applyForSite(ctx, site, op)
	} else {
		err = h.store.Apply(ctx, op)
	}
	if err != nil {
		return err
	}
	h.table.Put(r)
	return nil
}

// RotateCA asks a site's spoke to rotate its CA: the request is a
// hub-owned resource the spoke sees in its view.
func (s *adminServer) RotateCA(ctx context.Context, req *meshfedv1.RotateCARequest) (*meshfedv1.RotateCAResponse, error) {
	h := s.h
	site := req.GetSite()
	if !h.siteExists(site) {
		return nil, notFoundSite(site)
	}
	if _, ok := h.table.Get(federation.BundleKey(site)); !ok {
		return nil, status.Errorf(codes.FailedPrecondition, "site %s has not published a CA yet: start its spoke first", site)
	}
	gen := uint64(1)
	if r, ok := h.table.Get(federation.RotationKey(site)); ok {
		gen = r.GetRotation().GetGeneration() + 1
	}
	r := federation.RotationResource(&meshfedv1.CARotation{Site: site, Generation: gen})
	if err := h.publish(ctx, site, r); errors.Is(err, errSiteGone) {
		return nil, notFoundSite(site)
	} else if err != nil {
		return nil, status.Errorf(codes.Unavailable, "store: %v", err)
	}
	h.log.Info("CA rotation requested", "site", site, "generation", gen)
	return &meshfedv1.RotateCAResponse{Generation: gen}, nil
}
