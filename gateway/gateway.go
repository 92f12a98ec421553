package gateway

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/dataplane/loop"
	"github.com/meshfed/meshfed/dataplane/sni"
	"github.com/meshfed/meshfed/dataplane/upstream"
	"github.com/meshfed/meshfed/dataplane/xdsclient"
	"github.com/meshfed/meshfed/gossip"
	"github.com/meshfed/meshfed/identityclient"
	"github.com/meshfed/meshfed/telemetry"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"
)

// Options configures a Gateway. Start from DefaultOptions.
type Options struct {
	// Site is the gateway's site. Required.
	Site string
	// Listen is where callers from other sites connect: the address the
	// site record's gateway addresses lead to.
	Listen string
	// GossipListen joins the WAN gossip pool here (UDP and TCP); empty:
	// not in the pool, so other sites learn of this gateway's failure only
	// from failed connections.
	GossipListen string
	// GossipAdvertise is where members reach it; default GossipListen.
	GossipAdvertise string
	// GossipProbeInterval is how often it probes pool members.
	GossipProbeInterval time.Duration
	// XDS is the spoke's xDS address. Required.
	XDS string
	// Identity holds the gateway's attested SVID, which authenticates it
	// to the spoke. Required.
	Identity *identityclient.Client
	// HelloTimeout bounds how long a caller may take to send its
	// ClientHello.
	HelloTimeout time.Duration
	// HTTPListen serves /healthz, /readyz and /metrics; "-" or empty
	// disables.
	HTTPListen string
	// DrainTimeout bounds how long live connections may finish at shutdown.
	DrainTimeout time.Duration
	// Loops is how many event loops accept and relay (Linux), each on a
	// listening socket of its own. They keep their P while they wait for
	// a busy moment: leave goroutines a P of their own (GOMAXPROCS one
	// above Loops, as `meshfed gateway` runs).
	Loops    int
	Logger   *slog.Logger
	Registry *prometheus.Registry
}

// DefaultOptions are a gateway's defaults; Site, XDS and Identity are left
// to the caller.
func DefaultOptions() Options {
	return Options{
		// Istio's east-west gateway port, which operators know.
		Listen: ":15443",
		// memberlist's WAN default is 5s; meshfed's 100ms finds a dead
		// site within about a second (docs/gateway.md has what it costs).
		GossipProbeInterval: gossip.DefaultProbeInterval,
		// A real ClientHello comes with the connection; 5s is for slow
		// links, not for callers that send nothing.
		HelloTimeout: 5 * time.Second,
		HTTPListen:   "127.0.0.1:15091",
		DrainTimeout: 10 * time.Second,
		// One loop per CPU Go uses: a loop is one thread.
		Loops:    runtime.GOMAXPROCS(0),
		Logger:   slog.Default(),
		Registry: telemetry.NewRegistry(),
	}
}

// Gateway is a running east-west gateway.
type Gateway struct {
	o    Options
	log  *slog.Logger
	m    *metrics
	tele *telemetry.Server

	upstreams *upstream.Set
	router    loop.RouterOptions
	conns     loop.Tracker
	gossip    chan gossip.Secret

	cfg atomic.Pointer[xdsclient.Config]
	// routes is the SNI listener's configuration, which route reads on
	// the loops; mu guards ln, the listener running it.
	routes atomic.Pointer[xdsclient.Listener]
	mu     sync.Mutex
	ln     loop.Listener
	// lastGossip: the gossip secret last offered to runGossip.
	lastGossip []byte
}

// New checks the options and binds the HTTP listener.
func New(o Options) (*Gateway, error) {
	if err := catalog.ValidateName("site", o.Site); err != nil {
		return nil, err
	}
	switch {
	case o.XDS == "" || o.Identity == nil:
		return nil, errors.New("gateway: the spoke's xDS address and an identity are required")
	case o.Listen == "" || o.HelloTimeout <= 0 || o.Loops <= 0 || o.DrainTimeout <= 0 || o.Logger == nil || o.Registry == nil:
		return nil, errors.New("gateway: Listen, HelloTimeout, Loops, DrainTimeout, Logger and Registry are required: start from gateway.DefaultOptions()")
	}
	host, port, err := net.SplitHostPort(o.Listen)
	if err != nil {
		return nil, fmt.Errorf("gateway: listen address %q: %w", o.Listen, err)
	}
	if host == "" {
		host = "0.0.0.0"
	}
	o.Listen = net.JoinHostPort(host, port)
	g := &Gateway{o: o, log: o.Logger.With("component", "gateway", "site", o.Site), m: newMetrics(o.Registry), gossip: make(chan gossip.Secret, 1)}
	g.upstreams = upstream.NewSet(upstream.NewMetrics(o.Registry), g.log)
	g.router = loop.RouterOptions{
		Loops: o.Loops, HelloTimeout: o.HelloTimeout, MaxHello: sni.MaxSize, Route: g.route,
		Upstreams: g.upstreams, Tracker: &g.conns, Gauge: loop.NewLoopsGauge(o.Registry),
		Live: g.m.live, Results: g.m.results, AcceptPaused: g.m.acceptPaused, Logger: g.log,
	}
	if o.HTTPListen != "-" && o.HTTPListen != "" {
		g.tele, err = telemetry.Listen(telemetry.Options{Listen: o.HTTPListen, Registry: o.Registry, Logger: g.log, Ready: g.ready})
		if err != nil {
			return nil, fmt.Errorf("gateway: %w", err)
		}
	}
	return g, nil
}

func (g *Gateway) ready() error {
	if g.cfg.Load() == nil {
		return errors.New("no configuration from the spoke yet")
	}
	return nil
}

// HTTPAddr is the bound HTTP address ("" when disabled).
func (g *Gateway) HTTPAddr() string {
	if g.tele == nil {
		return ""
	}
	return g.tele.Addr()
}

// Run serves until ctx ends, then leaves the gossip pool and drains.
func (g *Gateway) Run(ctx context.Context) error {
	conn, err := xdsclient.Dial(g.o.XDS, g.o.Identity.ClientTLS())
	if err != nil {
		return fmt.Errorf("gateway: %w", err)
	}
	defer conn.Close()
	xc := &xdsclient.Client{Conn: conn, Log: g.log, Update: g.apply, Metrics: xdsclient.NewMetrics(g.o.Registry),
		Node:    xdsclient.NewNode(g.o.Identity.SVID().ID.String(), "meshfed-gateway", catalog.Locality{}, map[string]any{"meshfed.gateway_listen": g.o.Listen}),
		Secrets: []string{"default", "federation", "gossip"}}
	eg, gctx := errgroup.WithContext(ctx)
	eg.Go(func() error { return xc.Run(gctx) })
	eg.Go(func() error { return g.o.Identity.Run(gctx) })
	if g.tele != nil {
		eg.Go(func() error { return g.tele.Run(gctx) })
	}
	// The pool's failure is the gateway's exit status, but does not stop
	// it: other sites still reach it, and find its death by connecting.
	var poolErr error
	if g.o.GossipListen != "" {
		eg.Go(func() error { poolErr = g.runGossip(gctx); return nil })
	}
	g.log.Info("gateway running", "id", xc.Node.GetId(), "xds", g.o.XDS, "listen", g.o.Listen, "http", g.HTTPAddr())
	err = eg.Wait()
	g.drain()
	return errors.Join(err, poolErr)
}

// drain stops accepting and lets live connections finish, up to the
// drain timeout.
func (g *Gateway) drain() {
	g.mu.Lock()
	if g.ln != nil {
		g.ln.Close()
		g.ln = nil
	}
	g.mu.Unlock()
	if n := g.conns.Drain(g.o.DrainTimeout); n > 0 {
		g.log.Warn("drain timeout: closed live connections", "connections", n)
	}
}

// apply installs a new configuration: the SNI listener is opened, closed
// or its routes replaced in place, so live connections are never cut.
func (g *Gateway) apply(cfg *xdsclient.Config) error {
	g.offerGossip(cfg.Generic["gossip"])
	g.mu.Lock()
	defer g.mu.Unlock()
	g.upstreams.Apply(cfg.Clusters)
	g.cfg.Store(cfg)
	var lc *xdsclient.Listener
	for _, l := range cfg.Listeners {
		if l.SNI != nil {
			lc = l
		}
	}
	if old := g.routes.Load(); g.ln != nil && (lc == nil || lc.Addr != old.Addr) {
		g.ln.Close()
		g.ln = nil
	}
	g.routes.Store(lc)
	if lc != nil && g.ln == nil {
		ln, err := loop.ListenRouted(lc.Addr, &g.router)
		if err != nil {
			g.m.listenerErrors.Inc()
			g.log.Error("could not open the gateway listener", "listener", lc.Name, "err", err)
		}
		g.ln = ln
	}
	routes := 0
	if lc != nil {
		routes = len(lc.SNI)
	}
	g.log.Info("configuration applied", "routes", routes, "clusters", len(cfg.Clusters))
	return nil
}
