package hub

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	meshfedv1 "github.com/meshfed/meshfed/api/meshfed/v1"
	"github.com/meshfed/meshfed/atomicfile"
	"github.com/meshfed/meshfed/federation"
	"github.com/meshfed/meshfed/gossip"
	"github.com/meshfed/meshfed/hub/trustfed"
	"github.com/meshfed/meshfed/store"
	"github.com/meshfed/meshfed/telemetry"
	"github.com/meshfed/meshfed/trust/ca"
	"github.com/meshfed/meshfed/trust/credential"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/protobuf/proto"
)

// Options configures a Hub. Zero values take the documented defaults.
type Options struct {
	// DataDir holds admin.conf (the CLI's credential) and, with the default
	// store, hub.db. Required.
	DataDir string
	// Store is where the hub keeps its state. Default: bbolt in DataDir.
	Store store.Store
	// Listen is the gRPC (federation and admin API) address. Default ":7443".
	Listen string
	// HTTPListen serves /healthz, /readyz and /metrics. Default
	// "127.0.0.1:7080"; "" after defaults means the default, "-" disables.
	HTTPListen string
	// Federation is the name and root trust domain of the federation.
	// Default "meshfed". A store made for another federation is refused.
	Federation string
	// Advertise is the host:port spokes and the CLI reach the hub at; it
	// goes into admin.conf and the serving certificate. Default: the listen
	// address, with 127.0.0.1 for an unspecified host.
	Advertise string
	// BundleListen serves the SPIFFE bundle endpoint (https_spiffe profile,
	// authenticated as spiffe://<federation>/meshfed/hub) at
	// https://ADDR/<trust-domain>. "" disables it.
	BundleListen string
	// GossipListen puts the hub in the WAN gossip pool as an observer, so
	// `site list` shows the pool's view of each site. Empty: not in the pool.
	GossipListen string
	// GossipAdvertise is where pool members reach the hub; default
	// GossipListen.
	GossipAdvertise string
	// GossipProbeInterval is how often it probes pool members (default
	// gossip.DefaultProbeInterval).
	GossipProbeInterval time.Duration
	// SpokeCertTTL is how long a spoke certificate lives; spokes renew at
	// half-life. Default 30 days.
	SpokeCertTTL time.Duration
	// MaxTokenTTL caps join token lifetimes. Default 7 days.
	MaxTokenTTL time.Duration
	Logger      *slog.Logger
	// Registry receives the hub's metrics. Default: a new registry.
	Registry *prometheus.Registry
}

// Hub is the federation's control plane.
type Hub struct {
	o     Options
	log   *slog.Logger
	store store.Store
	ca    *ca.CA
	td    spiffeid.TrustDomain
	table *federation.Table
	m     *metrics

	grpcLn   net.Listener
	bundleLn net.Listener
	tele     *telemetry.Server
	serving  tls.Certificate

	// fed keeps the outside trust domains and serves the bundle endpoint.
	fed *trustfed.Federator

	mu    sync.Mutex
	sites map[string]*siteState
	// bg tracks the work Run started that outlives a call (records
	// written after a stream ends), all of which ends before the store
	// closes.
	bg sync.WaitGroup
	// pool is the hub's membership in the WAN gossip pool, when enabled.
	pool *gossip.Pool
}

// siteState is the hub's live view of one site.
type siteState struct {
	rec       siteRecord
	conn      *spokeConn
	services  int
	endpoints int
	// mu serialises writes of this site's catalog with its removal.
	mu sync.Mutex
	// saving serialises the records saveSiteLater writes; saves counts
	// them (h.mu held) and saved is the newest one written, so an older
	// one that comes late is dropped.
	saving       sync.Mutex
	saves, saved uint64
}

type spokeConn struct {
	cancel context.CancelFunc
	since  time.Time
}

// DefaultOptions are a hub's defaults; DataDir is left to the caller.
func DefaultOptions() Options {
	return Options{
		// The API port every spoke and the CLI dial; all addresses, as
		// spokes come from other networks.
		Listen: ":7443",
		// Metrics and health on loopback: a scraper on the host reaches
		// them, nobody else.
		HTTPListen: "127.0.0.1:7080",
		Federation: "meshfed",
		// A spoke renews at half-life: a month lets a spoke stay away
		// for two weeks and still come back on its own.
		SpokeCertTTL: 30 * 24 * time.Hour,
		// A join token outlives a weekend's change window, not more.
		MaxTokenTTL: 7 * 24 * time.Hour,
		Logger:      slog.Default(),
		Registry:    telemetry.NewRegistry(),
	}
}

// New opens the hub's state, creating the federation CA and the admin
// credential on first start, and binds its listeners.
func New(ctx context.Context, o Options) (*Hub, error) {
	if o.DataDir == "" {
		return nil, errors.New("hub: --data-dir is required")
	}
	if o.Listen == "" || o.HTTPListen == "" || o.Federation == "" || o.SpokeCertTTL <= 0 || o.MaxTokenTTL <= 0 || o.Logger == nil || o.Registry == nil {
		return nil, errors.New("hub: Listen, HTTPListen, Federation, SpokeCertTTL, MaxTokenTTL, Logger and Registry are required: start from hub.DefaultOptions()")
	}
	td, err := spiffeid.TrustDomainFromString(o.Federation)
	if err != nil {
		return nil, fmt.Errorf("hub: federation name %q is not a valid trust domain: %w", o.Federation, err)
	}
	if tightened, err := atomicfile.PrivateDir(o.DataDir); err != nil {
		return nil, fmt.Errorf("hub: data dir: %w", err)
	} else if tightened {
		o.Logger.Warn("the data dir was open to other users: made it 0700", "dir", o.DataDir)
	}
	h := &Hub{o: o, log: o.Logger.With("component", "hub"), td: td, table: federation.NewTable(), sites: map[string]*siteState{}}
	if o.Store == nil {
		s, err := store.OpenBolt(filepath.Join(o.DataDir, "hub.db"), time.Second)
		if err != nil {
			return nil, fmt.Errorf("hub: %w", err)
		}
		h.store = s
	} else {
		h.store = o.Store
	}
	ok := false
	defer func() {
		if !ok {
			h.close()
		}
	}()
	// Bound first: the advertised address names this hub in the sites'
	// records it loads.
	h.grpcLn, err = net.Listen("tcp", o.Listen)
	if err != nil {
		return nil, fmt.Errorf("hub: listen %s: %w", o.Listen, err)
	}
	if o.Advertise == "" {
		o.Advertise = advertised(h.grpcLn.Addr().(*net.TCPAddr))
		h.o.Advertise = o.Advertise
	}
	if err := h.loadCA(ctx); err != nil {
		return nil, err
	}
	if err := h.load(ctx); err != nil {
		return nil, err
	}
	if err := h.ensureGossipKeyring(ctx); err != nil {
		return nil, err
	}
	if err := h.issueServing(); err != nil {
		return nil, err
	}
	if o.BundleListen != "" {
		if h.bundleLn, err = net.Listen("tcp", o.BundleListen); err != nil {
			return nil, fmt.Errorf("hub: bundle endpoint: listen %s: %w", o.BundleListen, err)
		}
	}
	h.fed = trustfed.New(trustfed.Options{
		Store: h.store, Table: h.table, TrustDomain: td, CA: h.ca.Cert,
		Publish:        func(ctx context.Context, r *meshfedv1.Resource) error { return h.publish(ctx, "", r) },
		OwnTrustDomain: h.sitesTrustDomain,
		Listener:       h.bundleLn, Serving: h.serving, Logger: h.log,
	})
	if err := h.writeAdminConfig(); err != nil {
		return nil, err
	}
	if o.HTTPListen != "-" {
		h.tele, err = telemetry.Listen(telemetry.Options{Listen: o.HTTPListen, Registry: o.Registry, Logger: h.log})
		if err != nil {
			return nil, fmt.Errorf("hub: %w", err)
		}
	}
	h.m = newMetrics(o.Registry)
	h.refreshGauges()
	ok = true
	return h, nil
}

// BundleAddr is the bound bundle endpoint address ("" when disabled).
func (h *Hub) BundleAddr() string {
	if h.bundleLn == nil {
		return ""
	}
	return h.bundleLn.Addr().String()
}

// Addr is the bound gRPC address.
func (h *Hub) Addr() string { return h.grpcLn.Addr().String() }

// HTTPAddr is the bound telemetry address ("" when disabled).
func (h *Hub) HTTPAddr() string {
	if h.tele == nil {
		return ""
	}
	return h.tele.Addr()
}

// AdminConfigPath is where the admin credential is written.
func (h *Hub) AdminConfigPath() string { return filepath.Join(h.o.DataDir, "admin.conf") }

// Run serves until ctx ends: it stops accepting, ends the streams and
// waits for their handlers and for the records they write, then closes
// the store, last.
func (h *Hub) Run(ctx context.Context) error {
	defer h.close()
	tc := &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{h.serving},
		// Join is the one call made before a spoke has a certificate;
		// every other call checks the peer's verified identity.
		ClientAuth: tls.VerifyClientCertIfGiven,
		ClientCAs:  h.caPool(),
	}
	srv := grpc.NewServer(
		grpc.Creds(credentials.NewTLS(tc)),
		grpc.UnaryInterceptor(h.authorizeUnary),
		grpc.StreamInterceptor(h.authorizeStream),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 20 * time.Second, Timeout: 10 * time.Second}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		grpc.MaxRecvMsgSize(16<<20),
		// A stream's handler records the spoke's last sync as it ends:
		// even a hard stop waits for it, so nothing writes to a closed
		// store.
		grpc.WaitForHandlers(true),
	)
	meshfedv1.RegisterFederationServer(srv, &federationServer{h: h})
	meshfedv1.RegisterAdminServer(srv, &adminServer{h: h})
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return h.fed.Run(ctx) })
	if w, ok := h.store.(store.Watcher); ok {
		g.Go(func() error { return h.followStore(ctx, w) })
	}
	if h.o.GossipListen != "" {
		g.Go(func() error { return h.runGossip(ctx) })
	}
	g.Go(func() error { h.sweepTokensRegularly(ctx); return nil })
	g.Go(func() error {
		if err := srv.Serve(h.grpcLn); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
			return fmt.Errorf("hub: serve: %w", err)
		}
		return nil
	})
	g.Go(func() error {
		<-ctx.Done()
		// Streams never end by themselves: stop them, then the server.
		h.mu.Lock()
		for _, st := range h.sites {
			if st.conn != nil {
				st.conn.cancel()
			}
		}
		h.mu.Unlock()
		done := make(chan struct{})
		go func() { srv.GracefulStop(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			srv.Stop()
		}
		return nil
	})
	if h.tele != nil {
		g.Go(func() error { return h.tele.Run(ctx) })
	}
	h.log.Info("hub serving", "federation", h.o.Federation, "grpc", h.Addr(), "http", h.HTTPAddr(), "admin_config", h.AdminConfigPath())
	return g.Wait()
}

func (h *Hub) close() {
	if h.grpcLn != nil {
		h.grpcLn.Close()
	}
	if h.bundleLn != nil {
		h.bundleLn.Close()
	}
	h.bg.Wait()
	if h.store != nil {
		h.store.Close()
	}
}

// loadCA loads the federation CA from the store, creating it on first start.
func (h *Hub) loadCA(ctx context.Context) error {
	var rec caRecord
	err := h.store.Update(ctx, keyCA, func(cur []byte) ([]byte, error) {
		if cur != nil {
			return cur, json.Unmarshal(cur, &rec)
		}
		c, err := ca.New(h.td, "meshfed federation "+h.o.Federation, 10*365*24*time.Hour)
		if err != nil {
			return nil, err
		}
		key, err := ca.EncodeKeyPEM(c.Key)
		if err != nil {
			return nil, err
		}
		rec = caRecord{Federation: h.o.Federation, CertPEM: string(ca.EncodeCertPEM(c.Cert)), KeyPEM: string(key)}
		h.log.Info("created the federation CA", "federation", h.o.Federation, "pin", ca.Pin(c.Cert))
		return json.Marshal(rec)
	})
	if err != nil {
		return fmt.Errorf("hub: federation CA: %w", err)
	}
	if rec.Federation != h.o.Federation {
		return fmt.Errorf("hub: the store belongs to federation %q, not %q: start with --federation %s or use another data dir/store", rec.Federation, h.o.Federation, rec.Federation)
	}
	h.ca, err = ca.Load([]byte(rec.CertPEM), []byte(rec.KeyPEM))
	if err != nil {
		return fmt.Errorf("hub: federation CA: %w", err)
	}
	return nil
}

func (h *Hub) caPool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(h.ca.Cert)
	return p
}

// issueServing makes a fresh serving certificate for this process; its key
// lives only in memory.
func (h *Hub) issueServing() error {
	key, err := ca.NewKey()
	if err != nil {
		return fmt.Errorf("hub: serving key: %w", err)
	}
	dns, ips := []string{"localhost"}, []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback}
	if hn, err := os.Hostname(); err == nil {
		dns = append(dns, hn)
	}
	if host, _, err := net.SplitHostPort(h.o.Advertise); err == nil {
		if ip := net.ParseIP(host); ip != nil {
			ips = append(ips, ip)
		} else {
			dns = append(dns, host)
		}
	}
	cert, err := h.ca.Sign(ca.Leaf{ID: ca.HubID(h.td), Key: key.Public(), TTL: 365 * 24 * time.Hour, DNSNames: dns, IPs: ips})
	if err != nil {
		return fmt.Errorf("hub: serving certificate: %w", err)
	}
	h.serving = tls.Certificate{Certificate: [][]byte{cert.Raw, h.ca.Cert.Raw}, PrivateKey: key, Leaf: cert}
	return nil
}

// writeAdminConfig writes the CLI's credential once; an existing one is
// kept (only its hub address follows --advertise).
func (h *Hub) writeAdminConfig() error {
	path := h.AdminConfigPath()
	if c, err := credential.Load(path); err == nil {
		if c.Hub == h.o.Advertise {
			return nil
		}
		c.Hub = h.o.Advertise
		return c.Write(path)
	}
	key, err := ca.NewKey()
	if err != nil {
		return err
	}
	cert, err := h.ca.Sign(ca.Leaf{ID: ca.AdminID(h.td), Key: key.Public(), TTL: 365 * 24 * time.Hour})
	if err != nil {
		return fmt.Errorf("hub: admin credential: %w", err)
	}
	keyPEM, err := ca.EncodeKeyPEM(key)
	if err != nil {
		return err
	}
	c := &credential.File{Hub: h.o.Advertise, Federation: h.o.Federation, CA: string(ca.EncodeCertPEM(h.ca.Cert)), Cert: string(ca.EncodeCertPEM(cert)), Key: string(keyPEM)}
	if err := c.Write(path); err != nil {
		return fmt.Errorf("hub: admin credential: %w", err)
	}
	h.log.Info("wrote the admin credential", "path", path)
	return nil
}

func advertised(a *net.TCPAddr) string {
	if a.IP.IsUnspecified() {
		return net.JoinHostPort("127.0.0.1", fmt.Sprint(a.Port))
	}
	return a.String()
}

// load reads sites and the catalog from the store into memory.
func (h *Hub) load(ctx context.Context) error {
	sites, err := store.ListJSON[siteRecord](ctx, h.store, keySites)
	if err != nil {
		return fmt.Errorf("hub: %w", err)
	}
	for _, rec := range sites {
		if rec.ConnectedVia == h.o.Advertise {
			rec.ConnectedVia = "" // this hub's, from before it restarted: no stream now
		}
		h.sites[rec.Site.Name] = &siteState{rec: rec}
	}
	kvs, err := h.store.List(ctx, keyResource)
	if err != nil {
		return fmt.Errorf("hub: load catalog: %w", err)
	}
	leftovers := map[string]bool{}
	for _, kv := range kvs {
		r := &meshfedv1.Resource{}
		if err := proto.Unmarshal(kv.Value, r); err != nil {
			return fmt.Errorf("hub: stored resource %s is damaged: %w", kv.Key, err)
		}
		owner := federation.KeySite(r.Key)
		if site := hubOwnedSite(r); site != "" && h.sites[site] == nil {
			leftovers[site] = true // a rotation request or removed hosts of a removed site
			continue
		}
		st := h.sites[owner]
		if owner == "" {
			h.table.Put(r) // hub-owned: an imported bundle, a rotation request, removed hosts
			continue
		}
		if st == nil {
			leftovers[owner] = true // from a removal that was cut short
			continue
		}
		st.services += countServices(r)
		st.endpoints += len(r.GetService().GetEndpoints())
		h.table.Put(r)
	}
	tokens, err := store.ListJSON[tokenRecord](ctx, h.store, keyTokens)
	if err != nil {
		return fmt.Errorf("hub: %w", err)
	}
	for _, t := range tokens {
		if h.sites[t.Site] == nil {
			leftovers[t.Site] = true
		}
	}
	for _, st := range h.sites {
		h.publishSiteLocked(st)
	}
	h.log.Info("loaded state", "sites", len(h.sites), "resources", h.table.Len())
	for site := range leftovers {
		n, err := h.clearSite(ctx, site)
		if err != nil && !errors.Is(err, errSiteBack) {
			h.log.Warn("could not clear what a removed site left; the next start tries again", "site", site, "err", err)
			continue
		}
		h.log.Info("cleared what a removed site left", "site", site, "keys", n)
	}
	return nil
}

// publishSiteLocked puts the site's wire record, with its state, into the
// federated table. Callers hold h.mu (or own h exclusively).
func (h *Hub) publishSiteLocked(st *siteState) {
	w := federation.SiteToWire(st.rec.Site)
	w.State = st.state()
	h.table.Put(federation.SiteResource(w))
}

// ownedVersions are the versions of every resource site's spoke owns: its
// services and its bundle.
func (h *Hub) ownedVersions(site string) map[string]string {
	out := h.table.Versions(federation.SiteServicesPrefix(site))
	for _, key := range []string{federation.BundleKey(site), federation.SourceStatusKey(site)} {
		if r, ok := h.table.Get(key); ok {
			out[r.Key] = r.Version
		}
	}
	return out
}

func (st *siteState) state() meshfedv1.SiteState {
	switch {
	case st.conn != nil:
		return meshfedv1.SiteState_SITE_STATE_CONNECTED
	case st.rec.ConnectedVia != "" && time.Since(st.rec.LastSync) < heartbeatLapse:
		return meshfedv1.SiteState_SITE_STATE_CONNECTED // to another hub replica
	case st.rec.LastSync.IsZero():
		return meshfedv1.SiteState_SITE_STATE_PENDING
	default:
		return meshfedv1.SiteState_SITE_STATE_STALE
	}
}

func (h *Hub) refreshGauges() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.refreshGaugesLocked()
}

func (h *Hub) refreshGaugesLocked() {
	var services, endpoints, connected int
	for _, st := range h.sites {
		services += st.services
		endpoints += st.endpoints
		if st.conn != nil {
			connected++
		}
	}
	h.m.sites.Set(float64(len(h.sites)))
	h.m.services.Set(float64(services))
	h.m.endpoints.Set(float64(endpoints))
	h.m.spokesConnected.Set(float64(connected))
}
