package spoke

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync/atomic"
	"time"

	meshfedv1 "github.com/meshfed/meshfed/api/meshfed/v1"
	"github.com/meshfed/meshfed/atomicfile"
	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/federation"
	"github.com/meshfed/meshfed/gossip"
	"github.com/meshfed/meshfed/hubclient"
	"github.com/meshfed/meshfed/spoke/xds"
	"github.com/meshfed/meshfed/telemetry"
	"github.com/meshfed/meshfed/trust/ca"
	"github.com/meshfed/meshfed/trust/siteca"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
)

// Options configures a Spoke. Zero values take the documented defaults.
type Options struct {
	// Site is this spoke's site name. Required.
	Site string
	// Hub is the hub's host:port; needed to join, optional afterwards
	// (the data dir remembers it).
	Hub string
	// Token is a one-time join token, needed only on first start.
	Token string
	// DataDir keeps the credential (spoke.conf) and the federated view
	// (view.db). Required.
	DataDir string
	// Source fills the local catalog. Nil: the site exports nothing.
	Source Source
	// Importer writes the federated view into the site. Nil: none.
	Importer Importer
	// HTTPListen serves /healthz, /readyz, /metrics and /v1/catalog.
	// Default "127.0.0.1:7180"; "-" disables.
	HTTPListen string
	// MaxStale is how long the spoke keeps serving other sites' services
	// after it last heard from the hub. Default 24h; negative: forever.
	MaxStale time.Duration
	// Credentials keep the spoke's hub credential; default spoke.conf in
	// DataDir. An in-cluster spoke uses a Secret (spoke/kube).
	Credentials siteca.Storage
	// CA configures the site CA (its Dir and TrustDomain are set by the
	// spoke: <data dir>/ca and the site's trust domain from the hub).
	CA siteca.Options
	// Attestor checks workloads' platform tokens (a Kubernetes site's
	// ServiceAccount tokens: spoke/kube). Nil: the site attests hosts by
	// node token only.
	Attestor WorkloadAttestor
	// Bundles, when set, receives the site's CA certificates whenever
	// they change, for pods that attest with their ServiceAccount token
	// (gateways, proxies) to trust the spoke (spoke/kube's ConfigMap).
	Bundles BundlePublisher
	// IdentityListen serves the SVID API (Identity) to the site's hosts and
	// workloads. Default "127.0.0.1:7181"; "-" disables.
	IdentityListen string
	// XDSListen serves xDS (ADS) to the site's proxies, Envoys and
	// proxyless gRPC clients. Default "127.0.0.1:7182"; "-" disables.
	XDSListen string
	// GossipListen joins the WAN gossip pool here (UDP and TCP), once the
	// hub has sent the keyring. Empty: not in the pool.
	GossipListen string
	// GossipAdvertise is where other members reach this spoke; default
	// GossipListen.
	GossipAdvertise string
	// GossipProbeInterval is how often it probes pool members (default
	// gossip.DefaultProbeInterval).
	GossipProbeInterval time.Duration
	// MaxBackoff caps the wait between reconnects. Default 5s.
	MaxBackoff time.Duration
	// HostReportInterval is how often host agents report when nothing
	// changes (they report at once when something does).
	HostReportInterval time.Duration
	// HostStaleAfter: a host agent silent this long has its endpoints
	// marked unhealthy until it reports again.
	HostStaleAfter time.Duration
	// HostExpireAfter: a host agent silent this long has its endpoints
	// removed from the catalog.
	HostExpireAfter time.Duration
	Logger          *slog.Logger
	Registry        *prometheus.Registry
}

// Spoke is a site's control plane.
type Spoke struct {
	o         Options
	log       *slog.Logger
	creds     *credentials
	view      *View
	local     *Local
	ca        *siteca.SiteCA
	m         *metrics
	tele      *telemetry.Server
	idLn      net.Listener
	xds       *xds.Server
	hosts     *hosts
	pool      atomic.Pointer[gossip.Pool]
	connected atomic.Bool
}

// DefaultOptions are a spoke's defaults; Site, DataDir and how it reaches
// the hub are left to the caller.
func DefaultOptions() Options {
	return Options{
		// Every listener on loopback: a site's proxies and gateway run
		// beside the spoke unless it is told where else to listen.
		HTTPListen:     "127.0.0.1:7180",
		IdentityListen: "127.0.0.1:7181",
		XDSListen:      "127.0.0.1:7182",
		// A day without the hub keeps other sites' services served
		// through any outage short of a lost hub, and bounded.
		MaxStale: 24 * time.Hour,
		// Reconnects back off to 5s: a restarted hub hears from every
		// spoke within seconds, not all at once.
		MaxBackoff: 5 * time.Second,
		// Agents report every 5s; three missed reports make a host stale,
		// so its endpoints stop taking traffic within 15s of it going
		// quiet, while one lost report does nothing.
		HostReportInterval: 5 * time.Second,
		HostStaleAfter:     15 * time.Second,
		// Five minutes rides out an agent upgrade, a reboot or a short
		// network cut without the host's services leaving the federation
		// and coming back; a host gone for good leaves in bounded time.
		HostExpireAfter: 5 * time.Minute,
		Logger:          slog.Default(),
		Registry:        telemetry.NewRegistry(),
	}
}

// New opens the spoke's view, joins the hub if the data dir has no
// credential yet, and binds the HTTP listener.
func New(ctx context.Context, o Options) (*Spoke, error) {
	if err := catalog.ValidateName("site name", o.Site); err != nil {
		return nil, fmt.Errorf("spoke: --site: %w", err)
	}
	if o.DataDir == "" {
		return nil, errors.New("spoke: --data-dir is required")
	}
	if o.HTTPListen == "" || o.IdentityListen == "" || o.XDSListen == "" || o.MaxBackoff <= 0 || o.Logger == nil || o.Registry == nil || o.HostReportInterval <= 0 {
		return nil, errors.New("spoke: HTTPListen, IdentityListen, XDSListen, MaxBackoff, HostReportInterval, Logger and Registry are required: start from spoke.DefaultOptions()")
	}
	if o.HostStaleAfter <= o.HostReportInterval || o.HostExpireAfter < o.HostStaleAfter {
		return nil, fmt.Errorf("spoke: want host report interval (%s) < --host-stale-after (%s) <= --host-expire-after (%s)", o.HostReportInterval, o.HostStaleAfter, o.HostExpireAfter)
	}
	if o.MaxStale == 0 {
		return nil, errors.New("spoke: --max-stale 0 would drop other sites' services the moment the hub is out of reach: give a duration, or a negative one to keep them forever")
	}
	// A refused join leaves the data dir as it was: what this start made
	// before it joined goes again.
	_, statErr := os.Stat(o.DataDir)
	newDir := errors.Is(statErr, os.ErrNotExist)
	viewPath := filepath.Join(o.DataDir, "view.db")
	_, statErr = os.Stat(viewPath)
	newView := errors.Is(statErr, os.ErrNotExist)
	if tightened, err := atomicfile.PrivateDir(o.DataDir); err != nil {
		return nil, fmt.Errorf("spoke: data dir: %w", err)
	} else if tightened {
		o.Logger.Warn("the data dir was open to other users: made it 0700", "dir", o.DataDir)
	}
	s := &Spoke{o: o, log: o.Logger.With("component", "spoke", "site", o.Site), local: NewLocal(o.Site)}
	var err error
	// The view is opened first: its file lock keeps two spokes off one
	// data dir before either touches the credential.
	if s.view, err = OpenView(ctx, o.DataDir, o.Site); err != nil {
		return nil, err
	}
	if s.creds, err = loadOrJoin(ctx, o.DataDir, o.Credentials, o.Site, o.Hub, o.Token); err != nil {
		s.view.Close()
		if newView {
			_ = os.Remove(viewPath)
		}
		if newDir {
			_ = os.Remove(o.DataDir) // only if empty: nothing else is lost
		}
		return nil, err
	}
	if s.ca, err = openSiteCA(o, s.creds.conf.TrustDomain); err != nil {
		s.view.Close()
		return nil, err
	}
	s.local.td = s.ca.TrustDomain()
	// The site's bundle is published like its services.
	s.local.table.Put(federation.BundleResource(federation.BundleToWire(o.Site, s.ca.Bundle())))
	if s.hosts, err = openHosts(o, s.local, s.removedAt, s.log.With("component", "hosts")); err != nil {
		s.view.Close()
		return nil, fmt.Errorf("spoke: %w", err)
	}
	s.m = newMetrics(o.Registry, s)
	if o.IdentityListen != "-" {
		if s.idLn, err = net.Listen("tcp", o.IdentityListen); err != nil {
			s.view.Close()
			return nil, fmt.Errorf("spoke: identity endpoint: listen %s: %w", o.IdentityListen, err)
		}
	}
	if o.XDSListen != "-" {
		s.xds, err = xds.New(xds.Options{
			Listen: o.XDSListen, CA: s.ca, Catalog: s.xdsCatalog, Logger: s.log, Registry: o.Registry,
		})
		if err != nil {
			s.view.Close()
			return nil, fmt.Errorf("spoke: %w", err)
		}
	}
	if o.HTTPListen != "-" {
		s.tele, err = telemetry.Listen(telemetry.Options{
			Listen: o.HTTPListen, Registry: o.Registry, Logger: s.log, Ready: s.ready, Degraded: s.degraded,
			Handlers: map[string]http.Handler{"/v1/catalog": http.HandlerFunc(s.serveView)},
		})
		if err != nil {
			s.view.Close()
			return nil, fmt.Errorf("spoke: %w", err)
		}
	}
	return s, nil
}

func openSiteCA(o Options, trustDomain string) (*siteca.SiteCA, error) {
	td, err := spiffeid.TrustDomainFromString(trustDomain)
	if err != nil {
		return nil, fmt.Errorf("spoke: the credential names no valid trust domain (%q): move spoke.conf away and join again: %w", trustDomain, err)
	}
	o.CA.Dir, o.CA.TrustDomain = filepath.Join(o.DataDir, "ca"), td
	return siteca.Open(o.CA)
}

// CA is the site's certificate authority.
func (s *Spoke) CA() *siteca.SiteCA { return s.ca }

// Local is the site's own catalog.
func (s *Spoke) Local() *Local { return s.local }

// View is the federated view.
func (s *Spoke) View() *View { return s.view }

// IdentityAddr is the bound identity endpoint ("" when disabled).
func (s *Spoke) IdentityAddr() string {
	if s.idLn == nil {
		return ""
	}
	return s.idLn.Addr().String()
}

// XDSAddr is the bound xDS address ("" when disabled).
func (s *Spoke) XDSAddr() string {
	if s.xds == nil {
		return ""
	}
	return s.xds.Addr()
}

// HTTPAddr is the bound HTTP address ("" when disabled).
func (s *Spoke) HTTPAddr() string {
	if s.tele == nil {
		return ""
	}
	return s.tele.Addr()
}

// OnSourceError counts an invalid input of the local source.
func (s *Spoke) OnSourceError(error) { s.m.sourceErrors.Inc() }

// degraded is what is wrong with the site's source while the spoke serves
// its last valid content ("" when nothing is).
func (s *Spoke) degraded() string {
	r, ok := s.local.table.Get(federation.SourceStatusKey(s.o.Site))
	if st := r.GetSourceStatus(); ok && st.GetSince() != nil && !st.GetHealthy() {
		return "source: " + st.GetMessage()
	}
	return ""
}

func (s *Spoke) ready() error {
	if s.view.LastContact().IsZero() {
		return errors.New("no federated view yet: the hub has not been reached")
	}
	return nil
}

// Run runs the spoke until ctx ends.
func (s *Spoke) Run(ctx context.Context) error {
	defer s.view.Close()
	tc, err := s.creds.tlsConfig()
	if err != nil {
		return err
	}
	conn, err := hubclient.DialTLS(s.creds.conf.Hub, tc)
	if err != nil {
		return err
	}
	defer conn.Close()
	g, ctx := errgroup.WithContext(ctx)
	if s.o.Source != nil {
		g.Go(func() error { return s.o.Source.Run(ctx, s.local) })
	}
	if s.o.Importer != nil {
		g.Go(func() error { return s.o.Importer.Run(ctx, s.o.Site, s.view, s.local) })
	}
	g.Go(func() error { return s.syncLoop(ctx, conn) })
	g.Go(func() error { return s.renewLoop(ctx, conn) })
	g.Go(func() error { return s.expireLoop(ctx) })
	g.Go(func() error { return s.caLoop(ctx) })
	g.Go(func() error { return s.hosts.Run(ctx) })
	if s.tele != nil {
		g.Go(func() error { return s.tele.Run(ctx) })
	}
	if s.o.GossipListen != "" {
		g.Go(func() error { return s.runGossip(ctx) })
	}
	if s.xds != nil {
		g.Go(func() error { return s.xds.Run(ctx) })
		g.Go(func() error { return s.watchCatalog(ctx) })
	}
	if s.idLn != nil {
		is := &identityServer{s: s, hub: meshfedv1.NewFederationClient(conn)}
		g.Go(func() error { return is.serve(ctx, s.idLn) })
	}
	s.log.Info("spoke running", "hub", s.creds.conf.Hub, "http", s.HTTPAddr(), "identity", s.IdentityAddr(), "xds", s.XDSAddr(), "view", s.view.table.Len())
	return g.Wait()
}

// syncLoop keeps a federation stream up, reconnecting with jittered
// exponential backoff.
func (s *Spoke) syncLoop(ctx context.Context, conn *grpc.ClientConn) error {
	const minBackoff = 100 * time.Millisecond
	backoff := minBackoff
	for {
		start := time.Now()
		err := s.syncOnce(ctx, conn)
		s.connected.Store(false)
		s.m.hubConnected.Set(0)
		if ctx.Err() != nil {
			return nil
		}
		if time.Since(start) > 10*time.Second {
			backoff = minBackoff
		}
		s.log.Warn("federation stream ended; serving the last federated view and retrying", "err", err, "retry_in", backoff)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(backoff/2 + rand.N(backoff/2+1)):
		}
		backoff = min(backoff*2, s.o.MaxBackoff)
	}
}

func (s *Spoke) syncOnce(ctx context.Context, conn *grpc.ClientConn) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := meshfedv1.NewFederationClient(conn).Sync(ctx)
	if err != nil {
		return err
	}
	hello := &meshfedv1.Hello{Site: s.o.Site, KnownVersions: s.view.Versions()}
	if err := stream.Send(&meshfedv1.SyncMessage{Kind: &meshfedv1.SyncMessage_Hello{Hello: hello}}); err != nil {
		return err
	}
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	if first.GetHello() == nil {
		return errors.New("spoke: the hub did not open with a hello")
	}
	s.connected.Store(true)
	s.m.hubConnected.Set(1)
	s.m.syncs.Inc()
	s.log.Info("federation stream up", "hub_holds", len(first.GetHello().GetKnownVersions()), "view_holds", len(hello.KnownVersions))
	sess := &federation.Session{
		Stream:    stream,
		Out:       s.local.Table(),
		PeerKnown: first.GetHello().GetKnownVersions(),
		In:        s.view,
		Logger:    s.log,
		OnSent:    func(n int, _ time.Time) { s.m.resourcesSent.Add(float64(n)) },
		OnNack:    func(string) { s.m.nacks.WithLabelValues("hub").Inc() },
		OnReceived: func(d *meshfedv1.Delta) {
			for _, r := range d.GetUpdated() {
				s.m.resourcesReceived.WithLabelValues(kindOf(r.GetKey())).Inc()
			}
			for _, k := range d.GetRemoved() {
				s.m.resourcesReceived.WithLabelValues(kindOf(k)).Inc()
			}
		},
	}
	return sess.Run(ctx)
}

func (s *Spoke) renewLoop(ctx context.Context, conn *grpc.ClientConn) error {
	for {
		wait := time.Until(s.creds.renewAt())
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(max(wait, 0)):
		}
		cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		err := s.creds.renew(cctx, conn, s.o.Site)
		cancel()
		if err != nil {
			s.log.Error("could not renew the spoke certificate; retrying in a minute", "err", err, "expires", s.creds.cert.Leaf.NotAfter)
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(time.Minute):
			}
			continue
		}
		s.log.Info("renewed the spoke certificate", "expires", s.creds.cert.Leaf.NotAfter)
	}
}

// caLoop carries out CA rotations the hub asks for and moves them on:
// the bundle is republished whenever its authorities change.
func (s *Spoke) caLoop(ctx context.Context) error {
	// A ConfigMap write that failed (the API down at start) is retried
	// every tick until it lands.
	unpublished := s.publishBundle(ctx) != nil
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		now := time.Now()
		changed := false
		if r, ok := s.view.table.Get(federation.RotationKey(s.o.Site)); ok && r.GetRotation().GetGeneration() > s.ca.Generation() {
			if err := s.ca.Rotate(r.GetRotation().GetGeneration(), now); err != nil {
				s.log.Error("could not rotate the site CA", "err", err)
				continue
			}
			s.log.Info("CA rotation started: the new CA is published now and signs after the activation delay", "generation", r.GetRotation().GetGeneration())
			changed = true
		}
		ticked, err := s.ca.Tick(now)
		if err != nil {
			s.log.Error("could not move the CA rotation on", "err", err)
			continue
		}
		if ticked {
			s.log.Info("site CA bundle changed", "authorities", len(s.ca.Authorities()))
		}
		if changed || ticked {
			s.local.table.Put(federation.BundleResource(federation.BundleToWire(s.o.Site, s.ca.Bundle())))
		}
		if changed || ticked || unpublished {
			unpublished = s.publishBundle(ctx) != nil
		}
	}
}

func (s *Spoke) expireLoop(ctx context.Context) error {
	if s.o.MaxStale < 0 {
		return nil
	}
	every := min(s.o.MaxStale/10, time.Minute)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		if !s.connected.Load() {
			n, err := s.view.Expire(ctx, s.o.MaxStale)
			if err != nil {
				s.log.Error("could not expire the stale view", "err", err)
			} else if n > 0 {
				s.m.expired.Add(float64(n))
				s.log.Error("the hub was unreachable for longer than --max-stale; dropped other sites' services", "services", n, "last_contact", s.view.LastContact())
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// Snapshot is the catalog as this site sees it: its own services and the
// federated view.
func (s *Spoke) Snapshot() catalog.SiteView {
	v := catalog.SiteView{Site: s.o.Site, HubConnected: s.connected.Load(), Synced: s.view.Synced(), LastHubContact: s.view.LastContact()}
	localities := map[string]catalog.Locality{}
	for _, r := range s.view.table.List("site/") {
		site := federation.SiteFromWire(r.GetSite())
		localities[site.Name] = site.Locality
		v.Sites = append(v.Sites, site)
	}
	for _, r := range s.view.table.List("svc/") {
		v.Services = append(v.Services, federation.ServiceFromWire(r.GetService(), localities[r.GetService().GetSite()]))
	}
	v.TrustDomains = []string{s.ca.TrustDomain().Name()}
	for _, prefix := range []string{"bundle/", "xbundle/"} {
		for _, r := range s.view.table.List(prefix) {
			v.TrustDomains = append(v.TrustDomains, r.GetBundle().GetTrustDomain())
		}
	}
	sort.Strings(v.TrustDomains)
	for _, r := range s.local.table.List("svc/") {
		v.Services = append(v.Services, federation.ServiceFromWire(r.GetService(), localities[s.o.Site]))
	}
	sort.SliceStable(v.Services, func(i, j int) bool {
		a, b := v.Services[i], v.Services[j]
		if a.ID() != b.ID() {
			return a.ID() < b.ID()
		}
		return a.Site < b.Site
	})
	return v
}

func (s *Spoke) serveView(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(s.Snapshot())
}

func countEndpoints(rs []*meshfedv1.Resource) int {
	n := 0
	for _, r := range rs {
		n += len(r.GetService().GetEndpoints())
	}
	return n
}

func kindOf(key string) string {
	if strings.HasPrefix(key, "site/") {
		return "site"
	}
	return "service"
}

// publishBundle hands the site's CA certificates to the publisher.
func (s *Spoke) publishBundle(ctx context.Context) error {
	if s.o.Bundles == nil {
		return nil
	}
	err := s.o.Bundles.PublishBundle(ctx, ca.EncodeCertPEM(s.ca.Authorities()...))
	if err != nil {
		s.log.Error("could not publish the site CA for pods; retrying", "err", err)
	}
	return err
}
