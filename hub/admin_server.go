package hub

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base32"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	meshfedv1 "github.com/meshfed/meshfed/api/meshfed/v1"
	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/federation"
	"github.com/meshfed/meshfed/store"
	"github.com/meshfed/meshfed/trust/ca"
	"github.com/meshfed/meshfed/trust/credential"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"
)

type adminServer struct {
	meshfedv1.UnimplementedAdminServer
	h *Hub
}

var errExists = errors.New("exists")

// AddSite registers a site; a name already taken is refused and nothing
// stored changes.
func (s *adminServer) AddSite(ctx context.Context, req *meshfedv1.AddSiteRequest) (*meshfedv1.SiteStatus, error) {
	h := s.h
	site := federation.SiteFromWire(req.GetSite())
	site.State = ""
	if site.TrustDomain == "" {
		site.TrustDomain = site.Name + "." + h.o.Federation
	}
	if err := catalog.ValidateSite(site); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	// What a removal cut short left of an earlier site of that name is not
	// this one's.
	if _, err := h.clearSite(ctx, site.Name); err != nil && !errors.Is(err, errSiteBack) {
		return nil, status.Errorf(codes.Unavailable, "clear what an earlier site %s left: %v", site.Name, err)
	}
	rec := siteRecord{Site: site, Created: time.Now().UTC()}
	var existing siteRecord
	err := h.store.Update(ctx, keySites+site.Name, func(cur []byte) ([]byte, error) {
		if cur != nil {
			_ = json.Unmarshal(cur, &existing)
			return nil, errExists
		}
		return json.Marshal(rec)
	})
	if errors.Is(err, errExists) {
		return nil, status.Errorf(codes.AlreadyExists, "site %s already exists (kind %s, %s): see it with `meshfed site show %s`, or remove it first with `meshfed site remove %s`",
			site.Name, existing.Site.Kind, existing.Site.Locality, site.Name, site.Name)
	}
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "store site: %v", err)
	}
	h.mu.Lock()
	st := &siteState{rec: rec}
	h.sites[site.Name] = st
	h.publishSiteLocked(st)
	h.refreshGaugesLocked()
	out := h.statusLocked(st)
	h.mu.Unlock()
	h.log.Info("site added", "site", site.Name, "kind", site.Kind, "locality", site.Locality.String())
	return out, nil
}

func (h *Hub) statusLocked(st *siteState) *meshfedv1.SiteStatus {
	w := federation.SiteToWire(st.rec.Site)
	w.State = st.state()
	out := &meshfedv1.SiteStatus{
		Site:      w,
		Created:   timestamppb.New(st.rec.Created),
		Services:  uint32(st.services),
		Endpoints: uint32(st.endpoints),
	}
	if !st.rec.LastSync.IsZero() {
		out.LastSync = timestamppb.New(st.rec.LastSync)
	}
	if st.conn != nil {
		out.ConnectedSince = timestamppb.New(st.conn.since)
	}
	if r, ok := h.table.Get(federation.SourceStatusKey(st.rec.Site.Name)); ok {
		out.Source = r.GetSourceStatus()
	}
	if h.pool != nil {
		out.Gossip = h.pool.SiteStates()[st.rec.Site.Name]
	}
	return out
}

func (s *adminServer) ListSites(context.Context, *meshfedv1.ListSitesRequest) (*meshfedv1.ListSitesResponse, error) {
	h := s.h
	h.mu.Lock()
	defer h.mu.Unlock()
	out := &meshfedv1.ListSitesResponse{}
	for _, st := range h.sites {
		out.Sites = append(out.Sites, h.statusLocked(st))
	}
	sort.Slice(out.Sites, func(i, j int) bool { return out.Sites[i].Site.Name < out.Sites[j].Site.Name })
	return out, nil
}

func (s *adminServer) GetSite(_ context.Context, req *meshfedv1.GetSiteRequest) (*meshfedv1.SiteStatus, error) {
	h := s.h
	h.mu.Lock()
	defer h.mu.Unlock()
	st := h.sites[req.GetName()]
	if st == nil {
		return nil, notFoundSite(req.GetName())
	}
	return h.statusLocked(st), nil
}

func notFoundSite(name string) error {
	return status.Errorf(codes.NotFound, "site %s is not registered: `meshfed site list` shows the sites", name)
}

// RemoveSite removes a site, its services and its unused tokens, and cuts
// its spoke off: the spoke's certificate is no longer accepted. The record
// goes first, so no hub replica writes for the site after it
// (applyForSite); what the site left in the store goes next. A removal cut
// short is finished by running it again.
func (s *adminServer) RemoveSite(ctx context.Context, req *meshfedv1.RemoveSiteRequest) (*meshfedv1.RemoveSiteResponse, error) {
	h := s.h
	name := req.GetName()
	h.mu.Lock()
	st := h.sites[name]
	h.mu.Unlock()
	if st != nil {
		st.mu.Lock()
		defer st.mu.Unlock()
	}
	recorded := false
	if err := h.store.Update(ctx, keySites+name, func(cur []byte) ([]byte, error) {
		recorded = cur != nil
		return nil, nil
	}); err != nil {
		return nil, status.Errorf(codes.Unavailable, "remove site %s: %v (nothing was removed)", name, err)
	}
	services := 0
	if st != nil {
		services = st.services
		h.forgetSite(st)
	}
	cleared, err := h.clearSite(ctx, name)
	switch {
	case errors.Is(err, errSiteBack):
		return nil, status.Errorf(codes.Aborted, "site %s was added again while it was being removed; what is left is the new site's: run the removal again to remove that one", name)
	case err != nil:
		return nil, status.Errorf(codes.Unavailable, "remove site %s: its record is gone, but not all it left: %v (run the command again to finish)", name, err)
	case !recorded && st == nil && cleared == 0:
		return nil, notFoundSite(name)
	}
	h.log.Info("site removed", "site", name, "services", services, "keys", cleared)
	return &meshfedv1.RemoveSiteResponse{ServicesRemoved: uint32(services)}, nil
}

// forgetSite drops a removed site from memory, with its resources, and
// cuts its spoke off; false if st is no longer the site's state here. st.mu
// is held.
func (h *Hub) forgetSite(st *siteState) bool {
	name := st.rec.Site.Name
	keys := h.ownedVersions(name)
	for _, k := range []string{federation.RotationKey(name), federation.RevocationsKey(name)} {
		if r, ok := h.table.Get(k); ok {
			keys[r.Key] = r.Version
		}
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.sites[name] != st {
		return false
	}
	if st.conn != nil {
		st.conn.cancel()
	}
	delete(h.sites, name)
	for k := range keys {
		h.table.Delete(k)
	}
	h.table.Delete(federation.SiteKey(name))
	h.refreshGaugesLocked()
	return true
}

// CreateToken makes a one-time join token for a registered site. Only a
// hash of the secret is stored; the token is shown once.
func (s *adminServer) CreateToken(ctx context.Context, req *meshfedv1.CreateTokenRequest) (*meshfedv1.CreateTokenResponse, error) {
	h := s.h
	if !h.siteExists(req.GetSite()) {
		return nil, status.Errorf(codes.NotFound, "site %s is not registered: add it first with `meshfed site add %s --kind docker --region R --zone Z`", req.GetSite(), req.GetSite())
	}
	ttl := req.GetTtl().AsDuration()
	if ttl <= 0 {
		ttl = time.Hour
	}
	if ttl > h.o.MaxTokenTTL {
		return nil, status.Errorf(codes.InvalidArgument, "--ttl %s is longer than the hub allows (%s): join tokens are meant to be used soon", ttl, h.o.MaxTokenTTL)
	}
	pin := ca.Pin(h.ca.Cert)
	if req.GetNode() != "" {
		// A node token pins the site's CA: the host talks to its spoke.
		if err := catalog.ValidateName("node name", req.GetNode()); err != nil {
			return nil, status.Error(codes.InvalidArgument, err.Error())
		}
		var err error
		if pin, err = h.siteCAPin(req.GetSite()); err != nil {
			return nil, err
		}
	}
	tok := credential.Token{ID: randomString(6), Secret: randomString(16), CAPin: pin}
	sum := sha256.Sum256([]byte(tok.Secret))
	rec := tokenRecord{Site: req.GetSite(), SecretHash: hex.EncodeToString(sum[:]), Expires: time.Now().Add(ttl).UTC(), Node: req.GetNode()}
	b, err := json.Marshal(rec)
	if err != nil {
		return nil, err
	}
	if err := h.applyForSite(ctx, rec.Site, store.Op{Key: keyTokens + tok.ID, Value: b}); errors.Is(err, errSiteGone) {
		return nil, notFoundSite(rec.Site)
	} else if err != nil {
		return nil, status.Errorf(codes.Unavailable, "store token: %v", err)
	}
	h.log.Info("join token created", "site", rec.Site, "token_id", tok.ID, "expires", rec.Expires)
	return &meshfedv1.CreateTokenResponse{Token: tok.String(), Expires: timestamppb.New(rec.Expires)}, nil
}

// siteCAPin is the pin of the newest CA in site's published bundle.
func (h *Hub) siteCAPin(site string) (string, error) {
	r, ok := h.table.Get(federation.BundleKey(site))
	if !ok {
		return "", status.Errorf(codes.FailedPrecondition, "site %s has not published its CA yet: start its spoke first", site)
	}
	b, err := federation.BundleFromWire(r.GetBundle())
	if err != nil {
		return "", status.Errorf(codes.Internal, "bundle of site %s: %v", site, err)
	}
	auth := b.X509Authorities()
	return ca.Pin(auth[len(auth)-1]), nil
}

func randomString(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(fmt.Sprintf("hub: no randomness: %v", err))
	}
	return strings.ToLower(base32.StdEncoding.WithPadding(base32.NoPadding).EncodeToString(b))[:n]
}

func (s *adminServer) ListServices(context.Context, *meshfedv1.ListServicesRequest) (*meshfedv1.ListServicesResponse, error) {
	out := &meshfedv1.ListServicesResponse{}
	for _, r := range s.h.table.List("svc/") {
		out.Services = append(out.Services, r.GetService())
	}
	return out, nil
}

func (s *adminServer) GetService(_ context.Context, req *meshfedv1.GetServiceRequest) (*meshfedv1.GetServiceResponse, error) {
	h := s.h
	out := &meshfedv1.GetServiceResponse{}
	seen := map[string]bool{}
	for _, r := range h.table.List("svc/") {
		svc := r.GetService()
		if svc.GetNamespace() != req.GetNamespace() || svc.GetName() != req.GetName() {
			continue
		}
		out.Services = append(out.Services, svc)
		if !seen[svc.GetSite()] {
			seen[svc.GetSite()] = true
			if sr, ok := h.table.Get(federation.SiteKey(svc.GetSite())); ok {
				out.Sites = append(out.Sites, sr.GetSite())
			}
		}
	}
	if len(out.Services) == 0 {
		return nil, status.Errorf(codes.NotFound, "service %s/%s is not exported by any site: `meshfed service list` shows what is", req.GetNamespace(), req.GetName())
	}
	return out, nil
}
