// Package proxy is meshfed's built-in data plane: an xDS client of its
// site's spoke that runs outbound listeners per service (mTLS origination
// with the service's SNI, priority load balancing with Envoy's semantics,
// outlier detection, retries of connect failures, weighted splits) and
// inbound listeners (mTLS termination, callers authorized by SPIFFE ID).
package proxy

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	xds "github.com/meshfed/meshfed/api/meshfed/xdsapi"
	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/identityclient"
	"github.com/meshfed/meshfed/telemetry"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/protobuf/types/known/structpb"
)

// Options configures a Proxy.
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
	// OutboundPrefix is the range outbound listener addresses come from
	// (default 127.128.0.0/9); "-": no outbound listeners.
	OutboundPrefix string
	// GatewayListen makes this the site's east-west gateway: one listener
	// there routes TLS connections by SNI, without decrypting, to local
	// endpoints of exported services. No outbound or inbound listeners.
	GatewayListen string
	// HelloTimeout bounds how long the gateway waits for a ClientHello.
	// Default 5s.
	HelloTimeout time.Duration
	// OnGossip receives the SDS generic secret "gossip" (the WAN pool's
	// keyring and seeds, JSON) whenever it changes; gateways only.
	OnGossip func([]byte)
	// HTTPListen serves /healthz, /readyz and /metrics; "-" disables.
	HTTPListen string
	// DrainTimeout bounds how long live connections may finish at shutdown.
	DrainTimeout time.Duration
	// Loops is how many event loops (one thread each) relay connections,
	// and how many a gateway listener accepts on (Linux). Default: one per
	// CPU Go uses (GOMAXPROCS). A gateway's loops keep their P while they
	// wait for a busy moment: leave goroutines a P of their own
	// (GOMAXPROCS one above Loops, as `meshfed gateway` runs).
	Loops    int
	Logger   *slog.Logger
	Registry *prometheus.Registry
}

// Proxy is a running data plane.
type Proxy struct {
	o    Options
	log  *slog.Logger
	m    *metrics
	tele *telemetry.Server

	cfg    atomic.Pointer[config]
	gossip []byte

	mu        sync.Mutex
	listeners map[string]*runningListener
	upstreams map[string]*upstream
	conns     sync.WaitGroup
	// live: what the drain timeout closes.
	live       map[io.Closer]struct{}
	relayLoops loopSet
}

type runningListener struct {
	ln   listener
	conf atomic.Pointer[listenerConf]
}

// listener is a running listener as the proxy manages it: a net.Listener,
// or a gateway's event loop.
type listener interface {
	Addr() net.Addr
	Close() error
}

// New checks the options and binds the HTTP listener.
func New(o Options) (*Proxy, error) {
	if o.XDS == "" || o.Identity == nil {
		return nil, errors.New("proxy: the spoke's xDS address and an identity are required")
	}
	if o.OutboundPrefix == "" {
		o.OutboundPrefix = "127.128.0.0/9"
	}
	if o.GatewayListen != "" {
		host, port, err := net.SplitHostPort(o.GatewayListen)
		if err != nil {
			return nil, fmt.Errorf("proxy: gateway listen address %q: %w", o.GatewayListen, err)
		}
		if host == "" {
			host = "0.0.0.0"
		}
		o.GatewayListen, o.OutboundPrefix = net.JoinHostPort(host, port), "-"
	}
	if o.HelloTimeout == 0 {
		o.HelloTimeout = 5 * time.Second
	}
	if o.Loops <= 0 {
		o.Loops = runtime.GOMAXPROCS(0)
	}
	if o.DrainTimeout == 0 {
		o.DrainTimeout = 10 * time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Registry == nil {
		o.Registry = telemetry.NewRegistry()
	}
	p := &Proxy{
		o: o, log: o.Logger.With("component", "proxy"), m: newMetrics(o.Registry),
		listeners: map[string]*runningListener{}, upstreams: map[string]*upstream{}, live: map[io.Closer]struct{}{},
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

// HTTPAddr is the bound HTTP address ("" when disabled).
func (p *Proxy) HTTPAddr() string {
	if p.tele == nil {
		return ""
	}
	return p.tele.Addr()
}

func (p *Proxy) node() *xds.Node {
	md := map[string]any{}
	if p.o.Address != "" {
		md["meshfed.address"] = p.o.Address
	}
	if p.o.GatewayListen != "" {
		md["meshfed.gateway_listen"] = p.o.GatewayListen
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
	st, err := structpb.NewStruct(md)
	if err != nil {
		panic(err) // strings and maps of strings only
	}
	agent := "meshfed-proxy"
	if p.o.GatewayListen != "" {
		agent = "meshfed-gateway"
	}
	n := &xds.Node{Id: p.o.Identity.SVID().ID.String(), UserAgentName: agent, Metadata: st}
	if p.o.Locality != (catalog.Locality{}) {
		n.Locality = &xds.Locality{Region: p.o.Locality.Region, Zone: p.o.Locality.Zone}
	}
	return n
}

// Run serves until ctx ends, then drains live connections.
func (p *Proxy) Run(ctx context.Context) error {
	conn, err := grpc.NewClient("passthrough:///"+p.o.XDS,
		grpc.WithTransportCredentials(credentials.NewTLS(p.o.Identity.ClientTLS())),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 20 * time.Second, Timeout: 10 * time.Second}),
	)
	if err != nil {
		return fmt.Errorf("proxy: dial spoke xDS %s: %w", p.o.XDS, err)
	}
	defer conn.Close()
	xc := &xdsClient{conn: conn, node: p.node(), log: p.log, update: p.apply, onNack: func(typ string) { p.m.nacks.WithLabelValues(typ).Inc() },
		secrets: []string{"default", "federation"}}
	if p.o.GatewayListen != "" {
		xc.secrets = append(xc.secrets, "gossip")
	}
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return xc.run(gctx) })
	g.Go(func() error { return p.o.Identity.Run(gctx) })
	if p.tele != nil {
		g.Go(func() error { return p.tele.Run(gctx) })
	}
	p.log.Info("proxy running", "id", xc.node.GetId(), "xds", p.o.XDS, "http", p.HTTPAddr())
	err = g.Wait()
	p.drain()
	p.stopRelayLoops()
	return err
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
	done := make(chan struct{})
	go func() { p.conns.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(p.o.DrainTimeout):
		p.mu.Lock()
		n := len(p.live)
		for c := range p.live {
			c.Close()
		}
		p.mu.Unlock()
		p.log.Warn("drain timeout: closed live connections", "connections", n)
		<-done
	}
}

// apply installs a new configuration: listeners are started, stopped or
// retargeted in place, so live connections are never cut.
func (p *Proxy) apply(r *resources) error {
	cfg, err := translate(r)
	if err != nil {
		p.m.nacks.WithLabelValues("config").Inc()
		return err
	}
	if g := r.secrets["gossip"].GetGenericSecret().GetSecret().GetInlineBytes(); g != nil && p.o.OnGossip != nil && string(g) != string(p.gossip) {
		p.gossip = g
		p.o.OnGossip(g)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for name, cc := range cfg.clusters {
		u := p.upstreams[name]
		if u == nil {
			u = &upstream{hosts: map[string]*hostState{}, ejected: p.onEject}
			p.upstreams[name] = u
		}
		u.setConf(cc)
	}
	for name := range p.upstreams {
		if cfg.clusters[name] == nil {
			delete(p.upstreams, name)
		}
	}
	p.cfg.Store(cfg)
	for name, rl := range p.listeners {
		if lc := cfg.listeners[name]; lc == nil || lc.addr != rl.conf.Load().addr {
			rl.ln.Close()
			delete(p.listeners, name)
		}
	}
	for name, lc := range cfg.listeners {
		if rl := p.listeners[name]; rl != nil {
			rl.conf.Store(lc)
			continue
		}
		rl := &runningListener{}
		rl.conf.Store(lc)
		var err error
		switch {
		case lc.sni != nil:
			rl.ln, err = p.listenGateway(rl, lc.addr)
		case lc.inbound:
			rl.ln, err = p.listen(rl, p.inbound)
		default:
			rl.ln, err = p.listen(rl, p.outbound)
		}
		if err != nil {
			p.m.listenerErrors.Inc()
			p.log.Error("could not open a listener; the others run", "listener", name, "err", err)
			continue
		}
		p.listeners[name] = rl
	}
	p.m.configs.Inc()
	p.log.Info("configuration applied", "listeners", len(p.listeners), "clusters", len(cfg.clusters))
	return nil
}

func (p *Proxy) onEject(c *clusterConf, e endpointConf) {
	p.m.ejections.WithLabelValues(c.name, e.site, e.zone).Inc()
	p.log.Warn("endpoint ejected after consecutive connect failures", "cluster", c.name, "endpoint", e.addr, "site", e.site)
}

// listen opens a listener that serves each connection on a goroutine of
// its own.
func (p *Proxy) listen(rl *runningListener, handle func(*listenerConf, net.Conn)) (listener, error) {
	ln, err := net.Listen("tcp", rl.conf.Load().addr)
	if err != nil {
		return nil, err
	}
	go p.accept(ln, func(c net.Conn) {
		p.track(c, true)
		go func() {
			defer p.track(c, false)
			handle(rl.conf.Load(), c)
		}()
	})
	return ln, nil
}

// accept hands ln's connections to handle until ln is closed. Any other
// error (out of file descriptors, most likely) pauses it, 5 ms at first,
// doubling up to 1 s, as net/http does: callers wait in the kernel's queue
// meanwhile, and are served once descriptors are free.
func (p *Proxy) accept(ln net.Listener, handle func(net.Conn)) {
	var pause time.Duration
	for {
		c, err := ln.Accept()
		if errors.Is(err, net.ErrClosed) {
			return
		}
		if err != nil {
			pause = min(max(2*pause, 5*time.Millisecond), time.Second)
			if pause == 5*time.Millisecond || pause == time.Second {
				p.log.Error("could not accept a connection; trying again shortly", "listener", ln.Addr(), "err", err, "in", pause)
			}
			time.Sleep(pause)
			continue
		}
		pause = 0
		handle(c)
	}
}

// descriptorPause is how long the process waits before the next try when
// it is out of file descriptors: a gateway loop's accepting pauses (callers
// wait in the kernel's queue, as HAProxy has them), and a caller already
// accepted, by a gateway or an outbound listener, waits to connect
// upstream. (A proxy listener's accept loop backs off on its own, above.)
const descriptorPause = 100 * time.Millisecond

// outOfDescriptors: err is this process's (or the system's) lack of file
// descriptors or memory, not a peer's doing.
func outOfDescriptors(err error) bool {
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) || errors.Is(err, syscall.ENOBUFS) || errors.Is(err, syscall.ENOMEM)
}

func (p *Proxy) track(c io.Closer, add bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if add {
		p.conns.Add(1)
		p.live[c] = struct{}{}
		return
	}
	delete(p.live, c)
	c.Close()
	p.conns.Done()
}

// outbound carries one app connection to the service: it picks a subset by
// weight, then endpoints by priority.
func (p *Proxy) outbound(lc *listenerConf, down net.Conn) {
	cluster := pickRoute(lc.routes)
	up, result := p.connect(cluster, lc.attempts)
	if up == nil {
		p.m.downstream.WithLabelValues(lc.name, result).Inc()
		return
	}
	p.m.downstream.WithLabelValues(lc.name, "ok").Inc()
	p.m.active.WithLabelValues(cluster).Inc()
	p.relay(down, up)
	p.m.active.WithLabelValues(cluster).Dec()
}

// connect opens a connection to one of cluster's endpoints, trying the next
// endpoint when a connection or handshake fails, up to attempts. Without a
// connection, it says why.
func (p *Proxy) connect(cluster string, attempts int) (net.Conn, string) {
	cfg := p.cfg.Load()
	p.mu.Lock()
	u := p.upstreams[cluster]
	p.mu.Unlock()
	if u == nil {
		return nil, "no_cluster"
	}
	var tried triedSet
	var fdWait time.Time
	for attempt := 0; attempt < max(attempts, 1); attempt++ {
		e, ok := u.pick(tried, time.Now())
		if !ok {
			break
		}
		tried.add(hostKey(e))
		up, err := p.dialUpstream(cfg, u.config(), e)
		if outOfDescriptors(err) {
			// Not the endpoint's fault: wait for a descriptor, as long as
			// a connect may take.
			if fdWait.IsZero() {
				fdWait = time.Now().Add(u.config().connectTimeout)
			}
			pause := min(descriptorPause, time.Until(fdWait))
			if pause <= 0 {
				return nil, "out_of_descriptors"
			}
			p.m.fdWaits.Inc()
			time.Sleep(pause)
			tried.remove(hostKey(e))
			attempt--
			continue
		}
		p.attempted(cluster, u, e, err)
		if err == nil {
			return up, ""
		}
	}
	return nil, unconnected(tried)
}

// attempted records how a connection attempt to e ended, for outlier
// detection and the metrics.
func (p *Proxy) attempted(cluster string, u *upstream, e endpointConf, err error) {
	u.result(e, err == nil, time.Now())
	if err != nil {
		p.m.upstream.WithLabelValues(cluster, e.site, e.zone, "connect_failure").Inc()
		p.log.Debug("upstream connect failed", "cluster", cluster, "endpoint", e.addr, "err", err)
		return
	}
	p.m.upstream.WithLabelValues(cluster, e.site, e.zone, "success").Inc()
}

// unconnected says why attempts at the endpoints in tried gave no
// connection.
func unconnected(tried triedSet) string {
	if len(tried) == 0 {
		return "no_endpoint"
	}
	return "upstream_failure"
}

func pickRoute(rs []route) string {
	if len(rs) == 1 {
		return rs[0].cluster
	}
	total := uint32(0)
	for _, r := range rs {
		total += r.weight
	}
	if total == 0 {
		return rs[0].cluster
	}
	n := rand.Uint32N(total)
	for _, r := range rs {
		if n < r.weight {
			return r.cluster
		}
		n -= r.weight
	}
	return rs[len(rs)-1].cluster
}

// dialUpstream connects to e and completes mTLS: the SNI names the
// service, the peer must chain to a federated bundle and, when the
// cluster lists identities, present one of them.
func (p *Proxy) dialUpstream(cfg *config, c *clusterConf, e endpointConf) (net.Conn, error) {
	deadline := time.Now().Add(c.connectTimeout)
	raw, err := (&net.Dialer{Deadline: deadline}).Dial("tcp", e.addr)
	if err != nil || !c.tls {
		return raw, err
	}
	tc := &tls.Config{
		MinVersion:         tls.VersionTLS13,
		ServerName:         e.sni,
		Certificates:       []tls.Certificate{*cfg.cert},
		InsecureSkipVerify: true, // verified as SPIFFE below
		VerifyConnection: func(cs tls.ConnectionState) error {
			id, err := verifySPIFFE(cs.PeerCertificates, cfg)
			if err != nil {
				return err
			}
			if len(c.sans) == 0 {
				return nil
			}
			for _, s := range c.sans {
				if s == id {
					return nil
				}
			}
			return fmt.Errorf("upstream presented %s, which is not an identity of this service", id)
		},
	}
	tlsConn := tlsClient(raw, tc)
	_ = raw.SetDeadline(deadline)
	if err := tlsConn.Handshake(); err != nil {
		raw.Close()
		return nil, err
	}
	_ = raw.SetDeadline(time.Time{})
	return tlsConn, nil
}

// verifySPIFFE checks the peer's chain (as crypto/tls parsed it) against
// the federated bundles and returns its SPIFFE ID.
func verifySPIFFE(certs []*x509.Certificate, cfg *config) (string, error) {
	if len(certs) == 0 {
		return "", errors.New("the peer presented no certificate")
	}
	id, _, err := x509svid.Verify(certs, cfg.bundles)
	if err != nil {
		return "", err
	}
	return id.String(), nil
}

// inbound terminates mTLS, authorizes the caller by SPIFFE ID and carries
// the connection to the app.
func (p *Proxy) inbound(lc *listenerConf, raw net.Conn) {
	cfg := p.cfg.Load()
	var caller string
	tc := &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{*cfg.cert},
		ClientAuth:   tls.RequireAnyClientCert,
		VerifyConnection: func(cs tls.ConnectionState) error {
			id, err := verifySPIFFE(cs.PeerCertificates, cfg)
			caller = id
			return err
		},
	}
	// The app speaks whatever the caller means to: agree to the caller's
	// first application protocol (a gRPC client insists on h2 being
	// agreed), as the app would if it terminated TLS itself.
	tc.GetConfigForClient = func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
		if len(hello.SupportedProtos) == 0 {
			return nil, nil
		}
		c := tc.Clone()
		c.GetConfigForClient, c.NextProtos = nil, hello.SupportedProtos[:1]
		return c, nil
	}
	down := tlsServer(raw, tc)
	_ = raw.SetDeadline(time.Now().Add(10 * time.Second))
	if err := down.Handshake(); err != nil {
		p.m.inbound.WithLabelValues(lc.name, "tls_failure").Inc()
		p.log.Debug("inbound handshake failed", "listener", lc.name, "remote", raw.RemoteAddr(), "err", err)
		return
	}
	_ = raw.SetDeadline(time.Time{})
	allowed := false
	for _, pr := range lc.allow {
		if pr.match(caller) {
			allowed = true
			break
		}
	}
	if !allowed {
		p.m.inbound.WithLabelValues(lc.name, "denied").Inc()
		p.log.Warn("refused a caller the policy does not allow", "listener", lc.name, "caller", caller)
		return
	}
	up, err := net.DialTimeout("tcp", lc.app, 5*time.Second)
	if err != nil {
		p.m.inbound.WithLabelValues(lc.name, "app_unreachable").Inc()
		p.log.Error("the app does not accept connections", "app", lc.app, "err", err)
		return
	}
	p.m.inbound.WithLabelValues(lc.name, "ok").Inc()
	p.relay(down, up)
}

// Copy buffers: every direction of a connection starts with a small one;
// one whose reads fill it (bulk data) moves to a large one, so each read
// brings more: a plain-text read, more bytes per system call; a TLS read,
// the records already read off the network (batchedTLS).
var (
	smallBuffers = sync.Pool{New: func() any { b := make([]byte, 16<<10); return &b }}
	largeBuffers = sync.Pool{New: func() any { b := make([]byte, 128<<10); return &b }}
)

// copyConn copies src to dst until src ends or either fails.
func copyConn(dst io.Writer, src net.Conn) {
	pool := &smallBuffers
	buf := pool.Get().(*[]byte)
	defer func() { pool.Put(buf) }()
	var grow bool
	switch src.(type) {
	case *net.TCPConn, *batchedTLS:
		grow = true
	}
	for {
		n, err := src.Read(*buf)
		if n > 0 {
			if _, err := dst.Write((*buf)[:n]); err != nil {
				return
			}
			if grow && n == len(*buf) {
				pool.Put(buf)
				pool, grow = &largeBuffers, false
				buf = pool.Get().(*[]byte)
			}
		}
		if err != nil {
			return
		}
	}
}

// pipe copies both ways until both sides are done, passing half-closes on.
// One direction runs on the caller's goroutine.
func pipe(a, b net.Conn) {
	done := make(chan struct{})
	cp := func(dst, src net.Conn) {
		copyConn(dst, src)
		if cw, ok := dst.(interface{ CloseWrite() error }); ok {
			_ = cw.CloseWrite()
		} else {
			dst.Close()
		}
	}
	go func() { cp(a, b); close(done) }()
	cp(b, a)
	<-done
	a.Close()
	b.Close()
}
