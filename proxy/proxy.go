// Package proxy is meshfed's workload proxy (`meshfed proxy`): an xDS
// client of its site's spoke that runs outbound listeners per service
// (mTLS origination with the service's SNI, priority load balancing with
// Envoy's semantics, outlier detection, retries of connect failures,
// weighted splits) and inbound listeners (mTLS termination, callers
// authorized by SPIFFE ID). The engine below it, shared with the gateway,
// is in dataplane/.
package proxy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/dataplane/loop"
	"github.com/meshfed/meshfed/dataplane/servicedns"
	"github.com/meshfed/meshfed/dataplane/upstream"
	"github.com/meshfed/meshfed/dataplane/xdsclient"
	"github.com/meshfed/meshfed/identityclient"
	"github.com/meshfed/meshfed/telemetry"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
)

// Options configures a Proxy. Start from DefaultOptions.
type Options struct {
	// XDS is the spoke's xDS address. Required.
	XDS string
	// Identity holds the proxy's attested SVID, which authenticates it to
	// the spoke; its SPIFFE ID is the node ID. Required.
	Identity *identityclient.Client
	// Locality is the proxy's; empty: its site's.
	Locality catalog.Locality
	// Address is the IP the workload's endpoints are registered at; the
	// inbound listeners bind there.
	Address string
	// Inbound maps endpoint ports to the local app behind them.
	Inbound map[uint32]string
	// OutboundPrefix is the range outbound listener addresses come from;
	// "-": no outbound listeners.
	OutboundPrefix string
	// DNSListen serves the federated service names
	// (<name>.<namespace>.svc.clusterset.local) with the outbound
	// listeners' addresses, and forwards other names to DNSForward (empty:
	// /etc/resolv.conf's); "-" or empty: no DNS.
	DNSListen  string
	DNSForward []string
	// OutboundFrom, when set, admits an outbound connection only from a
	// source address it accepts: a host proxy's listeners are its
	// workload's, not every local process's.
	OutboundFrom func(netip.Addr) bool
	// HTTPListen serves /healthz, /readyz and /metrics; "-" or empty
	// disables.
	HTTPListen string
	// DrainTimeout bounds how long live connections may finish at shutdown.
	DrainTimeout time.Duration
	// Loops is how many event loops (one thread each) relay connections
	// (Linux).
	Loops    int
	Logger   *slog.Logger
	Registry *prometheus.Registry
}

// DefaultOptions are a sidecar's defaults; XDS and Identity are left to
// the caller.
func DefaultOptions() Options {
	return Options{
		// A /9 of loopback: an address per service port, so apps reach
		// each service on its own port number, as they would the real one.
		OutboundPrefix: "127.128.0.0/9",
		HTTPListen:     "127.0.0.1:15090",
		// Long enough for request/response traffic to finish, short
		// enough for a pod's default 30s termination grace.
		DrainTimeout: 10 * time.Second,
		// One loop per CPU Go uses: a loop is one thread.
		Loops:    runtime.GOMAXPROCS(0),
		Logger:   slog.Default(),
		Registry: telemetry.NewRegistry(),
	}
}

// Proxy is a running workload proxy.
type Proxy struct {
	o    Options
	log  *slog.Logger
	m    *metrics
	tele *telemetry.Server
	dns  *servicedns.Server

	cfg       atomic.Pointer[xdsclient.Config]
	vips      atomic.Pointer[map[string]netip.Addr] // namespace/name → outbound address
	upstreams *upstream.Set
	relayer   *loop.Relayer
	// conns: the live connections, which the drain waits for.
	conns loop.Tracker

	mu        sync.Mutex
	renode    context.CancelFunc // ends the xDS stream, for a new one
	listeners map[string]*runningListener
	accepting sync.WaitGroup // the listeners' accept loops
}

type runningListener struct {
	ln   net.Listener
	conf atomic.Pointer[xdsclient.Listener]
}

// New checks the options and binds the HTTP listener.
func New(o Options) (*Proxy, error) {
	switch {
	case o.XDS == "" || o.Identity == nil:
		return nil, errors.New("proxy: the spoke's xDS address and an identity are required")
	case o.OutboundPrefix == "":
		return nil, errors.New(`proxy: OutboundPrefix is required ("-" for no outbound listeners): start from proxy.DefaultOptions()`)
	case o.Loops <= 0 || o.DrainTimeout <= 0 || o.Logger == nil || o.Registry == nil:
		return nil, errors.New("proxy: Loops, DrainTimeout, Logger and Registry are required: start from proxy.DefaultOptions()")
	}
	p := &Proxy{o: o, log: o.Logger.With("component", "proxy"), m: newMetrics(o.Registry), listeners: map[string]*runningListener{}}
	p.upstreams = upstream.NewSet(upstream.NewMetrics(o.Registry), p.log)
	p.relayer = loop.NewRelayer(loop.RelayOptions{Loops: o.Loops, Tracker: &p.conns, Gauge: loop.NewLoopsGauge(o.Registry), Logger: p.log})
	if o.DNSListen != "-" && o.DNSListen != "" {
		var err error
		p.dns, err = servicedns.Listen(servicedns.Options{Listen: o.DNSListen, Forward: o.DNSForward, Logger: p.log,
			Lookup: func(_ netip.Addr, namespace, name string) (netip.Addr, bool) { return p.ServiceAddr(namespace, name) }})
		if err != nil {
			return nil, fmt.Errorf("proxy: %w", err)
		}
	}
	if o.HTTPListen != "-" && o.HTTPListen != "" {
		var err error
		p.tele, err = telemetry.Listen(telemetry.Options{
			Listen: o.HTTPListen, Registry: o.Registry, Logger: p.log, Ready: p.ready,
			Handlers: map[string]http.Handler{"/v1/listeners": http.HandlerFunc(p.serveListeners)},
		})
		if err != nil {
			return nil, fmt.Errorf("proxy: %w", err)
		}
	}
	return p, nil
}

// Listeners returns the running listeners' addresses by name: where an app
// reaches each service (name <service>.<namespace>:<port>).
func (p *Proxy) Listeners() map[string]string {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := map[string]string{}
	for name, rl := range p.listeners {
		out[name] = rl.ln.Addr().String()
	}
	return out
}

func (p *Proxy) serveListeners(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(p.Listeners())
}

func (p *Proxy) ready() error {
	if p.cfg.Load() == nil {
		return errors.New("no configuration from the spoke yet")
	}
	return nil
}

// ServiceAddr is the address of the outbound listeners of a federated
// service: what its service name resolves to for this proxy's app.
func (p *Proxy) ServiceAddr(namespace, name string) (netip.Addr, bool) {
	m := p.vips.Load()
	if m == nil {
		return netip.Addr{}, false
	}
	a, ok := (*m)[namespace+"/"+name]
	return a, ok
}

// DNSAddr is the bound DNS address ("" when disabled).
func (p *Proxy) DNSAddr() string {
	if p.dns == nil {
		return ""
	}
	return p.dns.Addr()
}

// HTTPAddr is the bound HTTP address ("" when disabled).
func (p *Proxy) HTTPAddr() string {
	if p.tele == nil {
		return ""
	}
	return p.tele.Addr()
}

func (p *Proxy) metadata() map[string]any {
	md := map[string]any{}
	if p.o.Address != "" {
		md["meshfed.address"] = p.o.Address
	}
	if p.o.OutboundPrefix != "-" {
		md["meshfed.outbound_prefix"] = p.o.OutboundPrefix
	}
	if len(p.o.Inbound) > 0 {
		in := map[string]any{}
		for port, app := range p.o.Inbound {
			in[strconv.Itoa(int(port))] = app
		}
		md["meshfed.inbound"] = in
	}
	return md
}

// Run serves until ctx ends, then drains live connections.
func (p *Proxy) Run(ctx context.Context) error {
	conn, err := xdsclient.Dial(p.o.XDS, p.o.Identity.ClientTLS())
	if err != nil {
		return fmt.Errorf("proxy: %w", err)
	}
	defer conn.Close()
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return p.runXDS(gctx, conn) })
	g.Go(func() error { return p.o.Identity.Run(gctx) })
	if p.tele != nil {
		g.Go(func() error { return p.tele.Run(gctx) })
	}
	if p.dns != nil {
		g.Go(func() error { return p.dns.Run(gctx) })
	}
	p.log.Info("proxy running", "id", p.o.Identity.SVID().ID, "xds", p.o.XDS, "http", p.HTTPAddr(), "dns", p.DNSAddr())
	err = g.Wait()
	p.drain()
	p.relayer.Stop()
	return err
}

// runXDS keeps the xDS stream, and starts it again with the node's new
// metadata after SetInbound.
func (p *Proxy) runXDS(ctx context.Context, conn *grpc.ClientConn) error {
	m := xdsclient.NewMetrics(p.o.Registry)
	for {
		sctx, cancel := context.WithCancel(ctx)
		p.mu.Lock()
		p.renode = cancel
		md := p.metadata()
		p.mu.Unlock()
		xc := &xdsclient.Client{Conn: conn, Log: p.log, Update: p.apply, Metrics: m,
			Node:    xdsclient.NewNode(p.o.Identity.SVID().ID.String(), "meshfed-proxy", p.o.Locality, md),
			Secrets: []string{"default", "federation"}}
		err := xc.Run(sctx)
		cancel()
		if err != nil || ctx.Err() != nil {
			return err
		}
	}
}

// SetInbound changes the apps behind the endpoint ports: the spoke is told
// on a new xDS stream, and the listeners that stay keep their connections
// (apply changes them in place).
func (p *Proxy) SetInbound(in map[uint32]string) {
	p.mu.Lock()
	p.o.Inbound = maps.Clone(in)
	renode := p.renode
	p.mu.Unlock()
	if renode != nil {
		renode()
	}
}

// drain stops accepting and lets live connections finish, up to the
// drain timeout.
func (p *Proxy) drain() {
	p.mu.Lock()
	for name, rl := range p.listeners {
		rl.ln.Close()
		delete(p.listeners, name)
	}
	p.mu.Unlock()
	p.accepting.Wait()
	if n := p.conns.Drain(p.o.DrainTimeout); n > 0 {
		p.log.Warn("drain timeout: closed live connections", "connections", n)
	}
}

// apply installs a new configuration: listeners are started, stopped or
// retargeted in place, so live connections are never cut.
func (p *Proxy) apply(cfg *xdsclient.Config) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.upstreams.Apply(cfg.Clusters)
	p.cfg.Store(cfg)
	p.vips.Store(serviceAddrs(cfg))
	for name, rl := range p.listeners {
		if lc := cfg.Listeners[name]; lc == nil || lc.Addr != rl.conf.Load().Addr {
			rl.ln.Close()
			delete(p.listeners, name)
		}
	}
	for name, lc := range cfg.Listeners {
		if rl := p.listeners[name]; rl != nil {
			rl.conf.Store(lc)
			continue
		}
		if lc.SNI != nil {
			continue // a gateway's listener: not a proxy's to run
		}
		handle := p.outbound
		if lc.Inbound {
			handle = p.inbound
		}
		rl, err := p.listen(lc, handle)
		if err != nil {
			p.m.listenerErrors.Inc()
			p.log.Error("could not open a listener; the others run", "listener", name, "err", err)
			continue
		}
		p.listeners[name] = rl
	}
	p.log.Info("configuration applied", "listeners", len(p.listeners), "clusters", len(cfg.Clusters))
	return nil
}

// listen opens a listener that serves each connection on a goroutine of
// its own, with the listener's configuration as it is when it comes.
func (p *Proxy) listen(lc *xdsclient.Listener, handle func(*xdsclient.Listener, net.Conn)) (*runningListener, error) {
	ln, err := net.Listen("tcp", lc.Addr)
	if err != nil {
		return nil, err
	}
	rl := &runningListener{ln: ln}
	rl.conf.Store(lc)
	p.accepting.Add(1)
	go func() {
		defer p.accepting.Done()
		loop.Accept(ln, p.log, func(c net.Conn) {
			p.conns.Add(c)
			go func() {
				defer p.conns.Done(c)
				handle(rl.conf.Load(), c)
			}()
		})
	}()
	return rl, nil
}

// serviceAddrs maps each service with outbound listeners to their address
// (listener names are <name>.<namespace>:<port>; a service's ports share
// one address).
func serviceAddrs(cfg *xdsclient.Config) *map[string]netip.Addr {
	out := map[string]netip.Addr{}
	for name, lc := range cfg.Listeners {
		if lc.Inbound || lc.SNI != nil {
			continue
		}
		svc, _, ok := strings.Cut(name, ":")
		n, ns, ok2 := strings.Cut(svc, ".")
		ap, err := netip.ParseAddrPort(lc.Addr)
		if !ok || !ok2 || err != nil {
			continue
		}
		out[ns+"/"+n] = ap.Addr()
	}
	return &out
}
