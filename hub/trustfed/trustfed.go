// Package trustfed is the hub's trust federation with outside SPIFFE trust
// domains: it keeps each imported domain's bundle endpoint, fetches its
// bundle over https_spiffe, refreshes it on the bundle's hint while keeping
// the last good one, and serves the hub's own bundle endpoint for every
// trust domain the federation holds. The hub owns the store, the table and
// publishing; this package is handed them.
package trustfed

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
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
)

// KeyPrefix holds the outside trust domains the hub imports.
const KeyPrefix = "federations/"

// Record is one imported trust domain's bundle endpoint, as stored.
type Record struct {
	TrustDomain  string `json:"trustDomain"`
	URL          string `json:"url"`
	EndpointID   string `json:"endpointSpiffeId"`
	BootstrapPEM string `json:"bootstrapPem,omitempty"`
}

// Options are what the hub hands the federator.
type Options struct {
	Store store.Store
	// Table is the hub's federated table: site bundles are read from it,
	// imported ones are published into it.
	Table *federation.Table
	// TrustDomain and CA are the federation's own.
	TrustDomain spiffeid.TrustDomain
	CA          *x509.Certificate
	// Publish stores a hub-owned resource durably and puts it in Table.
	Publish func(context.Context, *meshfedv1.Resource) error
	// OwnTrustDomain reports whether td is one of the federation's sites'.
	OwnTrustDomain func(td string) bool
	// Listener serves the bundle endpoint with Serving; nil disables it.
	Listener net.Listener
	Serving  tls.Certificate
	Logger   *slog.Logger
}

// ErrInvalid marks a request that is wrong as given; ErrUnreachable one
// whose endpoint could not be fetched from. Errors.Is finds them; the
// message is only the reason.
var (
	ErrInvalid     = errors.New("invalid trust federation")
	ErrUnreachable = errors.New("bundle endpoint unreachable")
)

type kindError struct {
	kind error
	msg  string
}

func (e kindError) Error() string        { return e.msg }
func (e kindError) Is(target error) bool { return target == e.kind }

func errorOf(kind error, format string, args ...any) error {
	return kindError{kind: kind, msg: fmt.Sprintf(format, args...)}
}

// Federator keeps the hub's imported trust domains.
type Federator struct {
	o   Options
	log *slog.Logger

	mu sync.Mutex
	// watching cancels the refresh of each imported trust domain; runCtx
	// is Run's context (nil before Run) and bg tracks the refreshes.
	watching map[string]context.CancelFunc
	runCtx   context.Context
	bg       sync.WaitGroup
}

// New makes a federator; Run starts its refreshes and bundle endpoint.
func New(o Options) *Federator {
	return &Federator{o: o, log: o.Logger, watching: map[string]context.CancelFunc{}}
}

// Run refreshes every stored trust domain and serves the bundle endpoint
// until ctx ends; every refresh has ended when it returns.
func (f *Federator) Run(ctx context.Context) error {
	defer f.stop()
	// runCtx first: a record another replica adds meanwhile is followed
	// (Follow), not lost between the list and the start.
	f.mu.Lock()
	f.runCtx = ctx
	f.mu.Unlock()
	recs, err := store.ListJSON[Record](ctx, f.o.Store, KeyPrefix)
	if err != nil {
		return fmt.Errorf("trust federation: %w", err)
	}
	for _, rec := range recs {
		f.watch(rec)
	}
	if f.o.Listener == nil {
		<-ctx.Done()
		return nil
	}
	srv := &http.Server{
		Handler:           f.handler(),
		ReadHeaderTimeout: 10 * time.Second,
		TLSConfig:         &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{f.o.Serving}},
	}
	if err := telemetry.Serve(ctx, srv, f.o.Listener); err != nil {
		return fmt.Errorf("hub: bundle endpoint: %w", err)
	}
	return nil
}

func (f *Federator) stop() {
	if f.o.Listener != nil {
		f.o.Listener.Close()
	}
	f.mu.Lock()
	for _, cancel := range f.watching {
		cancel()
	}
	f.mu.Unlock()
	f.bg.Wait()
}

// federationBundle is the federation CA as a bundle: what clients of the
// hub's bundle endpoint authenticate it with.
func (f *Federator) federationBundle() *spiffebundle.Bundle {
	return spiffebundle.FromX509Authorities(f.o.TrustDomain, []*x509.Certificate{f.o.CA})
}

// GetBundleForTrustDomain implements spiffebundle.Source over every trust
// domain the hub federates: the federation's own, each site's, and each
// imported one.
func (f *Federator) GetBundleForTrustDomain(td spiffeid.TrustDomain) (*spiffebundle.Bundle, error) {
	if td == f.o.TrustDomain {
		return f.federationBundle(), nil
	}
	if r, ok := f.o.Table.Get(federation.ExternalBundleKey(td.Name())); ok {
		return federation.BundleFromWire(r.GetBundle())
	}
	for _, r := range f.o.Table.List("bundle/") {
		if r.GetBundle().GetTrustDomain() == td.Name() {
			return federation.BundleFromWire(r.GetBundle())
		}
	}
	return nil, fmt.Errorf("hub does not federate with trust domain %s", td)
}

// GetX509BundleForTrustDomain implements x509bundle.Source, for
// authenticating outside bundle endpoints.
func (f *Federator) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	b, err := f.GetBundleForTrustDomain(td)
	if err != nil {
		return nil, err
	}
	return b.X509Bundle(), nil
}

// Bundles lists the federation's own bundle and then every site's and
// imported one.
func (f *Federator) Bundles() (own *meshfedv1.Bundle, others []*meshfedv1.Bundle) {
	for _, prefix := range []string{"bundle/", "xbundle/"} {
		for _, r := range f.o.Table.List(prefix) {
			others = append(others, r.GetBundle())
		}
	}
	return federation.BundleToWire("", f.federationBundle()), others
}

// handler serves https://HOST/<trust-domain> in the SPIFFE bundle format,
// one go-spiffe handler per trust domain.
func (f *Federator) handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		td, err := spiffeid.TrustDomainFromString(strings.Trim(r.URL.Path, "/"))
		if err != nil {
			http.Error(w, "want /<trust-domain>", http.StatusNotFound)
			return
		}
		if _, err := f.GetBundleForTrustDomain(td); err != nil {
			http.Error(w, err.Error(), http.StatusNotFound)
			return
		}
		handler, err := spiffefed.NewHandler(td, f)
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		handler.ServeHTTP(w, r)
	})
}

// Add imports an outside trust domain: it fetches its bundle once (so the
// caller hears at once whether the endpoint works), keeps the relationship
// and the bundle in the store, and refreshes it in the background on its
// refresh hint. Errors wrap ErrInvalid or ErrUnreachable, or are the
// store's.
func (f *Federator) Add(ctx context.Context, rec Record) (*meshfedv1.Bundle, error) {
	td, err := rec.check()
	if err != nil {
		return nil, errorOf(ErrInvalid, "%v", err)
	}
	if td == f.o.TrustDomain || f.o.OwnTrustDomain(td.Name()) {
		return nil, errorOf(ErrInvalid, "%s is a trust domain of this federation already", td)
	}
	fctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	b, err := f.fetch(fctx, rec)
	if err != nil {
		return nil, errorOf(ErrUnreachable, "fetch the bundle of %s from %s: %v (check the URL, the endpoint SPIFFE ID and the bootstrap bundle)", td, rec.URL, err)
	}
	recJSON, _ := json.Marshal(rec)
	if err := f.o.Store.Apply(ctx, store.Op{Key: KeyPrefix + td.Name(), Value: recJSON}); err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	w, err := f.keep(ctx, rec, b)
	if err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	f.watch(rec)
	f.log.Info("federating with an outside trust domain", "trust_domain", td, "endpoint", rec.URL)
	return w, nil
}

func (r Record) check() (spiffeid.TrustDomain, error) {
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
func (f *Federator) fetch(ctx context.Context, rec Record) (*spiffebundle.Bundle, error) {
	td := spiffeid.RequireTrustDomainFromString(rec.TrustDomain)
	endpointID := spiffeid.RequireFromString(rec.EndpointID)
	auth := x509bundle.NewSet()
	if b, err := f.GetX509BundleForTrustDomain(endpointID.TrustDomain()); err == nil {
		auth.Add(b)
	} else if rec.BootstrapPEM != "" {
		certs, _ := ca.ParseCertsPEM([]byte(rec.BootstrapPEM))
		auth.Add(x509bundle.FromX509Authorities(endpointID.TrustDomain(), certs))
	} else {
		return nil, fmt.Errorf("no bundle of %s to authenticate the endpoint with: pass --bootstrap-bundle", endpointID.TrustDomain())
	}
	return spiffefed.FetchBundle(ctx, td, rec.URL, spiffefed.WithSPIFFEAuth(auth, endpointID))
}

// keep stores an imported bundle and publishes it to every site.
func (f *Federator) keep(ctx context.Context, rec Record, b *spiffebundle.Bundle) (*meshfedv1.Bundle, error) {
	w := federation.BundleToWire("", b)
	w.Endpoint = rec.URL
	r := federation.BundleResource(w)
	if v, ok := f.o.Table.Version(r.Key); ok && v == r.Version {
		return w, nil
	}
	return w, f.o.Publish(ctx, r)
}

// watch refreshes rec's bundle until Run ends, keeping the last good
// bundle through failures: a peer that is down drops nothing.
func (f *Federator) watch(rec Record) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.watching[rec.TrustDomain] != nil {
		f.watching[rec.TrustDomain]()
	}
	if f.runCtx == nil {
		return // Run starts every stored one
	}
	ctx, cancel := context.WithCancel(f.runCtx)
	f.watching[rec.TrustDomain] = cancel
	f.bg.Add(1)
	go func() {
		defer f.bg.Done()
		f.refresh(ctx, rec)
	}()
}

func (f *Federator) refresh(ctx context.Context, rec Record) {
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
		if r, ok := f.o.Table.Get(federation.ExternalBundleKey(rec.TrustDomain)); ok && r.GetBundle().GetRefreshHintSeconds() > 0 {
			wait = time.Duration(r.GetBundle().GetRefreshHintSeconds()) * time.Second
		}
		if time.Since(last) < wait {
			continue
		}
		last = time.Now()
		fctx, fcancel := context.WithTimeout(ctx, 30*time.Second)
		b, err := f.fetch(fctx, rec)
		if err == nil {
			_, err = f.keep(fctx, rec, b)
		}
		fcancel()
		if err != nil && !errors.Is(ctx.Err(), context.Canceled) {
			f.log.Warn("could not refresh an imported bundle; keeping the last one", "trust_domain", rec.TrustDomain, "err", err)
		}
	}
}

// Follow refreshes a trust domain another hub replica added (raw is its
// stored Record). A snapshot leaves alone the ones refreshed already.
func (f *Federator) Follow(raw []byte, snapshot bool) {
	var rec Record
	if err := json.Unmarshal(raw, &rec); err != nil {
		f.log.Error("a stored trust domain record does not decode", "err", err)
		return
	}
	f.mu.Lock()
	running := f.watching[rec.TrustDomain] != nil
	f.mu.Unlock()
	if !snapshot || !running {
		f.log.Info("refreshing an outside trust domain's bundle (added through this or another hub)", "trust_domain", rec.TrustDomain)
		f.watch(rec)
	}
}
