package hub

import (
	"context"
	"errors"
	"maps"
	"slices"
	"strings"
	"time"

	meshfedv1 "github.com/meshfed/meshfed/api/meshfed/v1"
	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/federation"
	"github.com/meshfed/meshfed/store"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// hubOwnedSite is the site a hub-owned resource is about (a CA rotation
// request, removed hosts); "" for any other.
func hubOwnedSite(r *meshfedv1.Resource) string {
	if rot := r.GetRotation(); rot != nil {
		return rot.GetSite()
	}
	return r.GetRevocations().GetSite()
}

// RemoveNode removes a host from its site: the site's removed hosts are a
// hub-owned resource its spoke sees in its view, and acts on (endpoints
// withdrawn, the host's SVIDs issued until now refused).
func (s *adminServer) RemoveNode(ctx context.Context, req *meshfedv1.RemoveNodeRequest) (*meshfedv1.RemoveNodeResponse, error) {
	h := s.h
	node := req.GetNode()
	if err := catalog.ValidateName("node name", node); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	site := req.GetSite()
	if site == "" {
		var err error
		if site, err = h.nodeSite(ctx, node); err != nil {
			return nil, err
		}
	}
	if !h.siteExists(site) {
		return nil, notFoundSite(site)
	}
	now := time.Now().UTC()
	revs := &meshfedv1.NodeRevocations{Site: site}
	if r, ok := h.table.Get(federation.RevocationsKey(site)); ok {
		revs = proto.Clone(r.GetRevocations()).(*meshfedv1.NodeRevocations)
	}
	revs.Nodes = slices.DeleteFunc(revs.Nodes, func(n *meshfedv1.RevokedNode) bool { return n.GetNode() == node })
	revs.Nodes = append(revs.Nodes, &meshfedv1.RevokedNode{Node: node, RevokedAt: timestamppb.New(now)})
	slices.SortFunc(revs.Nodes, func(a, b *meshfedv1.RevokedNode) int { return strings.Compare(a.GetNode(), b.GetNode()) })
	if err := h.publish(ctx, site, federation.RevocationsResource(revs)); errors.Is(err, errSiteGone) {
		return nil, notFoundSite(site)
	} else if err != nil {
		return nil, status.Errorf(codes.Unavailable, "store: %v", err)
	}
	h.log.Info("host removed", "site", site, "node", node)
	return &meshfedv1.RemoveNodeResponse{Site: site, Node: node, RevokedAt: timestamppb.New(now)}, nil
}

// nodeSite is the one site that knows a host by that name: from the hosts
// its spoke reports, or the node tokens made for it.
func (h *Hub) nodeSite(ctx context.Context, node string) (string, error) {
	sites := map[string]bool{}
	for _, r := range h.table.List(federation.SourceStatusKey("")) {
		for _, x := range r.GetSourceStatus().GetHosts() {
			if x.GetNode() == node {
				sites[r.GetSourceStatus().GetSite()] = true
			}
		}
	}
	tokens, err := store.ListJSON[tokenRecord](ctx, h.store, keyTokens)
	if err != nil {
		return "", status.Errorf(codes.Unavailable, "store: %v", err)
	}
	for _, t := range tokens {
		if t.Node == node {
			sites[t.Site] = true
		}
	}
	switch names := slices.Sorted(maps.Keys(sites)); len(names) {
	case 0:
		return "", status.Errorf(codes.NotFound, "no site knows a host %s (`meshfed vm list` shows the hosts): give its site with --site", node)
	case 1:
		return names[0], nil
	default:
		return "", status.Errorf(codes.FailedPrecondition, "sites %s each know a host %s: say which with --site", strings.Join(names, ", "), node)
	}
}
