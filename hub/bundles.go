package hub

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"time"

	meshfedv1 "github.com/meshfed/meshfed/api/meshfed/v1"
	"github.com/meshfed/meshfed/federation"
	"github.com/meshfed/meshfed/store"
	"github.com/meshfed/meshfed/telemetry"
	"github.com/meshfed/meshfed/trust/ca"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	spiffefed "github.com/spiffe/go-spiffe/v2/federation"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// keyFederations holds the outside trust domains the hub imports.
const keyFederations = "federations/"

// federationRecord is one imported trust domain's bundle endpoint.
type federationRecord struct {
	TrustDomain  string `json:"trustDomain"`
	URL          string `json:"url"`
	EndpointID   string `json:"endpointSpiffeId"`
	BootstrapPEM string `json:"bootstrapPem,omitempty"`
}

// federationBundle is the federation CA as a bundle: what clients of the
// hub's bundle endpoint authenticate it with.
func (h *Hub) federationBundle() *spiffebundle.Bundle {
	return spiffebundle.FromX509Authorities(h.td, []*x509.Certificate{h.ca.Cert})
}

// GetBundleForTrustDomain implements spiffebundle.Source over every trust
// domain the hub federates: the federation's own, each site's, and each
// imported one.
func (h *Hub) GetBundleForTrustDomain(td spiffeid.TrustDomain) (*spiffebundle.Bundle, error) {
	if td == h.td {
		return h.federationBundle(), nil
	}
	if r, ok := h.table.Get(federation.ExternalBundleKey(td.Name())); ok {
		return federation.BundleFromWire(r.GetBundle())
	}
	for _, r := range h.table.List("bundle/") {
		if r.GetBundle().GetTrustDomain() == td.Name() {
			return federation.BundleFromWire(r.GetBundle())
		}
	}
	return nil, fmt.Errorf("hub does not federate with trust domain %s", td)
}

// GetX509BundleForTrustDomain implements x509bundle.Source, for
// authenticating outside bundle endpoints.
func (h *Hub) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	b, err := h.GetBundleForTrustDomain(td)
	if err != nil {
		return nil, err
	}
	return b.X509Bundle(), nil
}

// bundleHandler serves https://HOST/<trust-domain> in the SPIFFE bundle
// format, one go-spiffe handler per trust domain.
func (h *Hub) bundleHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		td, err := spiffeid.TrustDomainFromString(strings.Trim(r.URL.Path, "/"))
		if err != nil {
			http.Error(w, "want /<trust-domain>", http.StatusNotFound)
			return
		}
		if _, err := h.GetBundleForTrustDomain(td); err != nil {
			http.Error(w, err.Error(), http.StatusNotFound)
			return
		}
		handler, err := spiffefed.NewHandler(td, h)
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		handler.ServeHTTP(w, r)
	})
}

// Federate imports an outside trust domain: it fetches its bundle once (so
// the caller hears at once whether the endpoint works), keeps the
// relationship and the bundle in the store, and refreshes it in the
// background on its refresh hint.
func (s *adminServer) Federate(ctx context.Context, req *meshfedv1.FederateRequest) (*meshfedv1.FederateResponse, error) {
	h := s.h
	rec := federationRecord{TrustDomain: req.GetTrustDomain(), URL: req.GetBundleEndpointUrl(), EndpointID: req.GetEndpointSpiffeId(), BootstrapPEM: string(req.GetBootstrapPem())}
	td, err := rec.check()
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if td == h.td || h.sitesTrustDomain(td.Name()) {
		return nil, status.Errorf(codes.InvalidArgument, "%s is a trust domain of this federation already", td)
	}
	fctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	b, err := h.fetch(fctx, rec)
	if err != nil {
		return nil, status.Errorf(codes.FailedPrecondition, "fetch the bundle of %s from %s: %v (check the URL, the endpoint SPIFFE ID and the bootstrap bundle)", td, rec.URL, err)
	}
	recJSON, _ := json.Marshal(rec)
	if err := h.store.Apply(ctx, store.Op{Key: keyFederations + td.Name(), Value: recJSON}); err != nil {
		return nil, status.Errorf(codes.Unavailable, "store: %v", err)
	}
	w, err := h.keepBundle(ctx, rec, b)
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "store: %v", err)
	}
	h.startWatch(rec)
	h.log.Info("federating with an outside trust domain", "trust_domain", td, "endpoint", rec.URL)
	return &meshfedv1.FederateResponse{Bundle: w}, nil
}

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

func (r federationRecord) check() (spiffeid.TrustDomain, error) {
	td, err := spiffeid.TrustDomainFromString(r.TrustDomain)
	if err != nil {
		return td, fmt.Errorf("--trust-domain %q: %w", r.TrustDomain, err)
	}
	u, err := url.Parse(r.URL)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return td, fmt.Errorf("--bundle-endpoint %q: want an https:// URL", r.URL)
	}
	if _, err := spiffeid.FromString(r.EndpointID); err != nil {
		return td, fmt.Errorf("--endpoint-spiffe-id %q: %w", r.EndpointID, err)
	}
	if r.BootstrapPEM != "" {
		if _, err := ca.ParseCertsPEM([]byte(r.BootstrapPEM)); err != nil {
			return td, fmt.Errorf("--bootstrap-bundle: %w", err)
		}
	}
	return td, nil
}

// fetch gets rec's bundle over https_spiffe: the endpoint must present the
// SVID rec.EndpointID, verified with the newest bundle of its trust domain
// the hub holds, or the bootstrap bundle before the first fetch.
func (h *Hub) fetch(ctx context.Context, rec federationRecord) (*spiffebundle.Bundle, error) {
	td := spiffeid.RequireTrustDomainFromString(rec.TrustDomain)
	endpointID := spiffeid.RequireFromString(rec.EndpointID)
	auth := x509bundle.NewSet()
	if b, err := h.GetX509BundleForTrustDomain(endpointID.TrustDomain()); err == nil {
		auth.Add(b)
	} else if rec.BootstrapPEM != "" {
		certs, _ := ca.ParseCertsPEM([]byte(rec.BootstrapPEM))
		auth.Add(x509bundle.FromX509Authorities(endpointID.TrustDomain(), certs))
	} else {
		return nil, fmt.Errorf("no bundle of %s to authenticate the endpoint with: pass --bootstrap-bundle", endpointID.TrustDomain())
	}
	return spiffefed.FetchBundle(ctx, td, rec.URL, spiffefed.WithSPIFFEAuth(auth, endpointID))
}

// keepBundle stores an imported bundle and publishes it to every site.
func (h *Hub) keepBundle(ctx context.Context, rec federationRecord, b *spiffebundle.Bundle) (*meshfedv1.Bundle, error) {
	w := federation.BundleToWire("", b)
	w.Endpoint = rec.URL
	r := federation.BundleResource(w)
	if v, ok := h.table.Version(r.Key); ok && v == r.Version {
		return w, nil
	}
	return w, h.publish(ctx, "", r)
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

// startWatch refreshes rec's bundle until the hub stops, keeping the last
// good bundle through failures: a peer that is down drops nothing.
func (h *Hub) startWatch(rec federationRecord) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.watching[rec.TrustDomain] != nil {
		h.watching[rec.TrustDomain]()
	}
	if h.runCtx == nil {
		return // Run starts every stored one (watchStored)
	}
	ctx, cancel := context.WithCancel(h.runCtx)
	h.watching[rec.TrustDomain] = cancel
	h.bg.Add(1)
	go func() {
		defer h.bg.Done()
		// The hint is read every second: a replica that starts refreshing
		// before the bundle (and its hint) reaches it must not sleep the
		// default out.
		last := time.Now()
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			wait := 5 * time.Minute
			if r, ok := h.table.Get(federation.ExternalBundleKey(rec.TrustDomain)); ok && r.GetBundle().GetRefreshHintSeconds() > 0 {
				wait = time.Duration(r.GetBundle().GetRefreshHintSeconds()) * time.Second
			}
			if time.Since(last) < wait {
				continue
			}
			last = time.Now()
			fctx, fcancel := context.WithTimeout(ctx, 30*time.Second)
			b, err := h.fetch(fctx, rec)
			if err == nil {
				_, err = h.keepBundle(fctx, rec, b)
			}
			fcancel()
			if err != nil && !errors.Is(ctx.Err(), context.Canceled) {
				h.log.Warn("could not refresh an imported bundle; keeping the last one", "trust_domain", rec.TrustDomain, "err", err)
			}
		}
	}()
}

// watchStored starts refreshing every imported trust domain in the store.
func (h *Hub) watchStored(ctx context.Context) error {
	recs, err := listJSON[federationRecord](ctx, h.store, keyFederations)
	if err != nil {
		return err
	}
	for _, rec := range recs {
		h.startWatch(rec)
	}
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

func (s *adminServer) ListBundles(context.Context, *meshfedv1.ListBundlesRequest) (*meshfedv1.ListBundlesResponse, error) {
	h := s.h
	out := &meshfedv1.ListBundlesResponse{FederationBundle: federation.BundleToWire("", h.federationBundle())}
	for _, r := range h.table.List("bundle/") {
		out.Bundles = append(out.Bundles, r.GetBundle())
	}
	for _, r := range h.table.List("xbundle/") {
		out.Bundles = append(out.Bundles, r.GetBundle())
	}
	return out, nil
}

// serveBundles serves the bundle endpoint over TLS with the hub's SVID.
func (h *Hub) serveBundles(ctx context.Context) error {
	srv := &http.Server{
		Handler:           h.bundleHandler(),
		ReadHeaderTimeout: 10 * time.Second,
		TLSConfig:         &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{h.serving}},
	}
	if err := telemetry.Serve(ctx, srv, h.bundleLn); err != nil {
		return fmt.Errorf("hub: bundle endpoint: %w", err)
	}
	return nil
}
