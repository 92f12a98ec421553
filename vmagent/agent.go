package vmagent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	meshfedv1 "github.com/meshfed/meshfed/api/meshfed/v1"
	"github.com/meshfed/meshfed/atomicfile"
	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/federation"
	"github.com/meshfed/meshfed/identityclient"
	"github.com/meshfed/meshfed/telemetry"
	"github.com/meshfed/meshfed/trust/credential"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
)

// Options configures an Agent.
type Options struct {
	// Spoke is the site spoke's identity endpoint, host:port. Required.
	Spoke string
	// Token is the one-time node token; needed on the first start only
	// (DataDir keeps the SVID it buys).
	Token string
	// DataDir keeps the node's SVID (0600). Required.
	DataDir string
	// DockerHost is the Docker Engine's address; empty: DOCKER_HOST or
	// the local socket. "-": no Docker (static services only).
	DockerHost string
	// Network is the Docker network whose container address is an
	// endpoint's, for containers on several networks without the
	// meshfed.io/network label.
	Network string
	// StaticServices is a services file (the spoke's format) for the
	// host's processes that are not containers; empty: none.
	StaticServices string
	// CheckInterval is how often containers without a HEALTHCHECK are
	// checked (TCP connect, or HTTP GET of their meshfed.io/health path).
	CheckInterval time.Duration
	// CheckTimeout bounds one check.
	CheckTimeout time.Duration
	// HostProxy runs the host's data plane (see hostProxy): containers
	// are then endpoints at ProxyAddress behind mTLS, and call other
	// services through their workload's own listeners. Off: endpoints
	// are the containers' own addresses, in plain text.
	HostProxy bool
	// XDS is the spoke's xDS address; empty: the spoke's host, port 7182.
	XDS string
	// ProxyAddress is where the site's gateway and proxies reach this
	// host's inbound listeners; empty: the host's address on its route to
	// the spoke.
	ProxyAddress string
	// InboundPorts is the range the containers' endpoint ports come from.
	InboundPorts [2]uint16
	// OutboundPrefix is made local to the host; each workload's outbound
	// listeners are on a /24 of it.
	OutboundPrefix netip.Prefix
	// DNSListen serves the service names to the containers; empty: port 53
	// on the gateway of Network (or of Docker's default bridge); "-": none.
	DNSListen string
	// HTTPListen serves /healthz, /readyz and /metrics; "-" disables.
	HTTPListen string
	// Version is reported to the spoke (meshfed vm list shows it).
	Version  string
	Logger   *slog.Logger
	Registry *prometheus.Registry
}

// DefaultOptions are an agent's defaults; Spoke, Token and DataDir are
// left to the caller.
func DefaultOptions() Options {
	return Options{
		// Checked every 2s with a 1s bound: a dead app is unhealthy in the
		// federation within about 3s, at one connection per container per
		// interval.
		CheckInterval: 2 * time.Second,
		CheckTimeout:  time.Second,
		HostProxy:     true,
		// Clear of the ports meshfed's own components default to (7180s,
		// 15443 for gateways, 15090 for proxies' telemetry).
		InboundPorts: [2]uint16{16000, 16999},
		// Part of 198.18.0.0/15, which RFC 2544 sets aside for tests of
		// network devices: no real service is there to be shadowed.
		OutboundPrefix: netip.MustParsePrefix("198.18.0.0/16"),
		// Loopback, next to the spoke's own default ports.
		HTTPListen: "127.0.0.1:7190",
		Version:    "dev",
		Logger:     slog.Default(),
		Registry:   telemetry.NewRegistry(),
	}
}

// Agent is a host's meshfed agent: it holds the node's SVID, discovers the
// host's labelled containers and reports the host's whole state to its
// spoke.
type Agent struct {
	o      Options
	log    *slog.Logger
	id     *identityclient.Client
	docker *docker
	hp     *hostProxy // nil without HostProxy
	tele   *telemetry.Server
	m      *metrics

	changed chan struct{}
	fresh   chan string // containers just started, for a first check at once

	mu         sync.Mutex
	containers map[string]container
	checks     map[string]string // container ID → health of the agent's check
	dockerErr  error
	listed     bool // Docker's containers listed once: until then, no report
	reportErr  error
	static     []catalog.Service
}

// New attests the host (or reuses the SVID kept in DataDir) and binds the
// HTTP listener.
func New(ctx context.Context, o Options) (*Agent, error) {
	if o.Spoke == "" || o.DataDir == "" {
		return nil, errors.New("vmagent: --spoke and --data-dir are required")
	}
	if o.CheckInterval <= 0 || o.CheckTimeout <= 0 || o.HTTPListen == "" || o.Logger == nil || o.Registry == nil {
		return nil, errors.New("vmagent: CheckInterval, CheckTimeout, HTTPListen, Logger and Registry are required: start from vmagent.DefaultOptions()")
	}
	if tightened, err := atomicfile.PrivateDir(o.DataDir); err != nil {
		return nil, fmt.Errorf("vmagent: data dir: %w", err)
	} else if tightened {
		o.Logger.Warn("the data dir was open to other users: made it 0700", "dir", o.DataDir)
	}
	a := &Agent{
		o: o, log: o.Logger.With("component", "vmagent"), changed: make(chan struct{}, 1), fresh: make(chan string, 256),
		containers: map[string]container{}, checks: map[string]string{},
	}
	if o.StaticServices != "" {
		if _, err := a.loadStatic(); err != nil {
			return nil, err
		}
	}
	var err error
	a.id, err = identityclient.New(ctx, identityclient.Options{Addr: o.Spoke, Token: o.Token, Dir: o.DataDir, Logger: o.Logger})
	if err != nil {
		return nil, fmt.Errorf("vmagent: %w", err)
	}
	if o.DockerHost != "-" {
		if a.docker, err = newDocker(o.DockerHost); err != nil {
			return nil, fmt.Errorf("vmagent: %w", err)
		}
	}
	if o.HostProxy {
		if a.o.XDS == "" {
			host, _, err := net.SplitHostPort(o.Spoke)
			if err != nil {
				return nil, fmt.Errorf("vmagent: --spoke %q: want host:port", o.Spoke)
			}
			a.o.XDS = net.JoinHostPort(host, "7182")
		}
		if a.hp, err = newHostProxy(ctx, a); err != nil {
			return nil, err
		}
	}
	a.m = newMetrics(o.Registry, a)
	if o.HTTPListen != "-" {
		a.tele, err = telemetry.Listen(telemetry.Options{Listen: o.HTTPListen, Registry: o.Registry, Ready: a.ready, Logger: a.log})
		if err != nil {
			return nil, fmt.Errorf("vmagent: %w", err)
		}
	}
	return a, nil
}

// HTTPAddr is where /healthz and /metrics are served.
func (a *Agent) HTTPAddr() string {
	if a.tele == nil {
		return ""
	}
	return a.tele.Addr()
}

func (a *Agent) ready() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.dockerErr != nil {
		return fmt.Errorf("docker: %w", a.dockerErr)
	}
	if a.docker != nil && !a.listed {
		return errors.New("the host's containers are not listed yet")
	}
	if a.reportErr != nil {
		return fmt.Errorf("report to the spoke: %w", a.reportErr)
	}
	return nil
}

// Run discovers, checks and reports until ctx ends.
func (a *Agent) Run(ctx context.Context) error {
	if a.docker != nil {
		defer a.docker.Close()
	}
	conn, err := grpc.NewClient("passthrough:///"+a.o.Spoke, grpc.WithTransportCredentials(credentials.NewTLS(a.id.ClientTLS())))
	if err != nil {
		return fmt.Errorf("vmagent: %w", err)
	}
	defer conn.Close()
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return a.id.Run(ctx) })
	g.Go(func() error { return a.reportLoop(ctx, meshfedv1.NewIdentityClient(conn)) })
	if a.docker != nil {
		g.Go(func() error { return a.discoverLoop(ctx) })
		g.Go(func() error { return a.checkLoop(ctx) })
		g.Go(func() error { return a.firstChecks(ctx) })
	}
	if a.o.StaticServices != "" {
		g.Go(func() error { return a.staticLoop(ctx) })
	}
	if a.tele != nil {
		g.Go(func() error { return a.tele.Run(ctx) })
	}
	if a.hp != nil {
		g.Go(func() error { return a.hp.Run(ctx) })
	}
	a.log.Info("vmagent running", "node", a.id.SVID().ID, "spoke", a.o.Spoke, "http", a.HTTPAddr())
	return g.Wait()
}

// poke asks for a report now.
func (a *Agent) poke() {
	select {
	case a.changed <- struct{}{}:
	default:
	}
}

// sleep waits d or until ctx ends; false when it ended.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// discoverLoop keeps the container state in step with Docker: the list,
// then events; when Docker is out of reach the last state stands (nothing
// leaves the catalog because the agent lost its socket) and the agent
// lists again once it is back.
func (a *Agent) discoverLoop(ctx context.Context) error {
	backoff := 500 * time.Millisecond
	for {
		err := a.discover(ctx)
		if ctx.Err() != nil {
			return nil
		}
		a.m.dockerErrors.Inc()
		a.mu.Lock()
		a.dockerErr = err
		a.mu.Unlock()
		a.log.Error("Docker is out of reach; keeping the last known containers", "err", err, "retry_in", backoff)
		if !sleep(ctx, backoff) {
			return nil
		}
		backoff = min(2*backoff, 10*time.Second)
	}
}

func (a *Agent) discover(ctx context.Context) error {
	since := time.Now()
	all, err := a.docker.list(ctx)
	if err != nil {
		return err
	}
	a.mu.Lock()
	a.containers = all
	a.dockerErr = nil
	a.listed = true
	a.mu.Unlock()
	a.poke()
	// Events from before the list are replayed (since), so none falls
	// between the list and the stream.
	return a.docker.watch(ctx, since, func(id string, at time.Time) {
		c, ok, err := a.docker.inspect(ctx, id)
		if err != nil {
			a.m.dockerErrors.Inc()
			a.log.Warn("could not inspect a container after its event", "id", id, "err", err)
			return
		}
		a.mu.Lock()
		if ok {
			if was, known := a.containers[id]; c.Running && (!known || !was.Running) {
				select {
				case a.fresh <- id:
				default: // a burst: the check loop gets to the rest
				}
			}
			a.containers[id] = c
		} else {
			delete(a.containers, id)
			delete(a.checks, id)
		}
		a.mu.Unlock()
		a.m.eventsLag.Observe(time.Since(at).Seconds())
		a.poke()
	})
}

// checkLoop checks the containers that have no HEALTHCHECK of their own.
func (a *Agent) checkLoop(ctx context.Context) error {
	client := &http.Client{Timeout: a.o.CheckTimeout}
	for {
		a.mu.Lock()
		var todo []container
		for _, c := range a.containers {
			if c.Running && !c.Paused && c.DockerHealth == "" && c.Labels[LabelService] != "" {
				todo = append(todo, c)
			}
		}
		a.mu.Unlock()
		results := map[string]string{}
		for _, c := range todo {
			results[c.ID] = a.check(ctx, client, c)
		}
		a.mu.Lock()
		changed := false
		for id, h := range results {
			if _, ok := a.containers[id]; ok && a.checks[id] != h {
				a.checks[id], changed = h, true
			}
		}
		a.mu.Unlock()
		if changed {
			a.poke()
		}
		if !sleep(ctx, a.o.CheckInterval) {
			return nil
		}
	}
}

// firstChecks checks each container that just started at once, and again
// at a short backoff until its app answers: it serves in the federation
// moments after it listens, not at the next check interval.
func (a *Agent) firstChecks(ctx context.Context) error {
	client := &http.Client{Timeout: a.o.CheckTimeout}
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		select {
		case <-ctx.Done():
			return nil
		case id := <-a.fresh:
			wg.Go(func() { a.firstCheck(ctx, client, id) })
		}
	}
}

func (a *Agent) firstCheck(ctx context.Context, client *http.Client, id string) {
	for wait := 25 * time.Millisecond; wait < a.o.CheckInterval; wait *= 2 {
		a.mu.Lock()
		c, ok := a.containers[id]
		a.mu.Unlock()
		if !ok || !c.Running || c.Paused || c.DockerHealth != "" || c.Labels[LabelService] == "" {
			return // gone, or Docker's own HEALTHCHECK decides
		}
		h := a.check(ctx, client, c)
		a.mu.Lock()
		_, still := a.containers[id]
		changed := still && a.checks[id] != h
		if changed {
			a.checks[id] = h
		}
		a.mu.Unlock()
		if changed {
			a.poke()
		}
		if h == catalog.HealthHealthy || !sleep(ctx, wait) {
			return
		}
	}
}

// check is one TCP or HTTP check of c.
func (a *Agent) check(ctx context.Context, client *http.Client, c container) string {
	addr, port, err := a.address(c)
	if err != nil {
		return catalog.HealthUnknown
	}
	hp := net.JoinHostPort(addr, strconv.Itoa(int(port)))
	if path := c.Labels[LabelHealth]; path != "" {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+hp+path, nil)
		if err != nil {
			return catalog.HealthUnhealthy
		}
		resp, err := client.Do(req)
		if err != nil {
			return catalog.HealthUnhealthy
		}
		resp.Body.Close()
		if resp.StatusCode >= 200 && resp.StatusCode < 400 {
			return catalog.HealthHealthy
		}
		return catalog.HealthUnhealthy
	}
	d := net.Dialer{Timeout: a.o.CheckTimeout}
	conn, err := d.DialContext(ctx, "tcp", hp)
	if err != nil {
		return catalog.HealthUnhealthy
	}
	conn.Close()
	return catalog.HealthHealthy
}

// address is where c's app is reached: its address on the Docker network
// its meshfed.io/network label (or --network) names, or on its only one.
// Not a published host port: that would put the app on the host's
// interfaces, around the mesh's mTLS.
func (a *Agent) address(c container) (string, uint32, error) {
	p, err := strconv.ParseUint(c.Labels[LabelPort], 10, 16)
	if err != nil || p == 0 {
		return "", 0, fmt.Errorf("container %s: label %s=%q: want the port the app listens on, 1-65535", c.Name, LabelPort, c.Labels[LabelPort])
	}
	network := c.Labels[LabelNetwork]
	if network == "" {
		network = a.o.Network
	}
	if network == "" {
		if len(c.IPs) != 1 {
			return "", 0, fmt.Errorf("container %s is on %d networks: name the one to use with the label %s", c.Name, len(c.IPs), LabelNetwork)
		}
		for n := range c.IPs {
			network = n
		}
	}
	ip, ok := c.IPs[network]
	if !ok {
		return "", 0, fmt.Errorf("container %s has no address on Docker network %q", c.Name, network)
	}
	return ip, uint32(p), nil
}

// services is the host's whole state: every running labelled container as
// an endpoint of its service, and the static services.
func (a *Agent) services() (services []catalog.Service, seen int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	td := a.id.TrustDomain()
	byID := map[string]*catalog.Service{}
	var health = map[string]int{}
	want, exported := map[string]*workload{}, map[string]bool{}
	for _, c := range a.containers {
		seen++
		name := c.Labels[LabelService]
		if name == "" || !c.Running {
			continue
		}
		ns := c.Labels[LabelNamespace]
		if ns == "" {
			ns = "default"
		}
		addr, port, err := a.address(c)
		if err == nil {
			err = catalog.ValidateService(catalog.Service{Namespace: ns, Name: name})
		}
		if err != nil {
			a.log.Warn("container not exported", "container", c.Name, "err", err)
			continue
		}
		labels := map[string]string{"meshfed.io/container": c.Name}
		if v := c.Labels[LabelVersion]; v != "" {
			labels["version"] = v
		}
		for k, v := range c.Labels {
			if rest, ok := strings.CutPrefix(k, LabelPrefix); ok && rest != "" {
				labels[rest] = v
			}
		}
		e := catalog.Endpoint{
			Address: addr, Port: port, Health: a.health(c), Labels: labels,
			Identity: fmt.Sprintf("spiffe://%s/ns/%s/sa/%s", td.Name(), ns, name),
		}
		if a.hp != nil {
			if !a.behindProxy(&e, c, want) {
				continue
			}
			exported[c.ID] = true
		}
		health[e.Health]++
		key := ns + "/" + name
		s, ok := byID[key]
		if !ok {
			s = &catalog.Service{Namespace: ns, Name: name, Ports: []catalog.Port{{Name: "tcp", Port: port}}}
			byID[key] = s
		}
		s.Endpoints = append(s.Endpoints, e)
	}
	for _, s := range a.static {
		if have, ok := byID[s.ID()]; ok {
			have.Endpoints = append(have.Endpoints, s.Endpoints...)
			continue
		}
		s := s
		byID[s.ID()] = &s
	}
	for _, k := range slices.Sorted(maps.Keys(byID)) {
		s := byID[k]
		catalog.SortEndpoints(s.Endpoints)
		services = append(services, *s)
	}
	if a.hp != nil {
		a.hp.setWant(want, exported)
	}
	for _, h := range []string{catalog.HealthHealthy, catalog.HealthUnhealthy, catalog.HealthUnknown} {
		a.m.endpoints.WithLabelValues(h).Set(float64(health[h]))
	}
	return services, seen
}

// behindProxy makes e the host proxy's inbound listener for c's app, and
// adds it to c's workload in want; false when no port is left for it.
func (a *Agent) behindProxy(e *catalog.Endpoint, c container, want map[string]*workload) bool {
	port, err := a.hp.inboundPort(c.ID)
	if err != nil {
		a.log.Warn("container not exported", "container", c.Name, "err", err)
		return false
	}
	w := want[e.Identity]
	if w == nil {
		w = &workload{inbound: map[uint32]string{}, sources: map[netip.Addr]bool{}}
		want[e.Identity] = w
	}
	w.inbound[port] = net.JoinHostPort(e.Address, strconv.Itoa(int(e.Port)))
	for _, ip := range c.IPs {
		if ip, err := netip.ParseAddr(ip); err == nil {
			w.sources[ip] = true
		}
	}
	e.Address, e.Port, e.PortName = a.hp.address, port, "tcp"
	return true
}

// health is c's endpoint health: Docker's HEALTHCHECK where the image has
// one, else the agent's own check; a paused container is unhealthy.
func (a *Agent) health(c container) string {
	switch {
	case c.Paused:
		return catalog.HealthUnhealthy
	case c.DockerHealth == "healthy":
		return catalog.HealthHealthy
	case c.DockerHealth == "unhealthy":
		return catalog.HealthUnhealthy
	case c.DockerHealth != "":
		return catalog.HealthUnknown
	case a.checks[c.ID] != "":
		return a.checks[c.ID]
	}
	return catalog.HealthUnknown
}

// reportLoop sends the host's state at once on every change, and every
// interval the spoke asks for when nothing changes.
func (a *Agent) reportLoop(ctx context.Context, ic meshfedv1.IdentityClient) error {
	interval := 5 * time.Second
	var last string
	for {
		a.mu.Lock()
		unlisted := a.docker != nil && !a.listed
		a.mu.Unlock()
		if unlisted {
			// A report before the first list would withdraw every
			// container the spoke holds for this host: wait for Docker.
			select {
			case <-ctx.Done():
				return nil
			case <-a.changed:
			}
			continue
		}
		services, seen := a.services()
		req := &meshfedv1.HostReport{AgentVersion: a.o.Version, Containers: uint32(seen)}
		for _, s := range services {
			req.Services = append(req.Services, federation.ServiceToWire("", s))
		}
		rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		resp, err := ic.ReportHost(rctx, req)
		cancel()
		if ctx.Err() != nil {
			return nil
		}
		a.mu.Lock()
		a.reportErr = err
		a.mu.Unlock()
		if status.Code(err) == codes.PermissionDenied && strings.Contains(err.Error(), credential.RemovedHost) {
			// The host is out of the federation: its endpoints are gone
			// already, and no retry can bring them back.
			return errors.New(status.Convert(err).Message())
		}
		wait := interval
		if err != nil {
			a.m.reports.WithLabelValues("failed").Inc()
			if msg := err.Error(); msg != last {
				a.log.Error("could not report to the spoke; retrying", "err", err)
				last = msg
			}
			wait = time.Second
		} else {
			a.m.reports.WithLabelValues("ok").Inc()
			last = ""
			if a.hp != nil {
				a.hp.poke()
			}
			if d := resp.GetReportInterval().AsDuration(); d > 0 {
				interval, wait = d, d
			}
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-a.changed:
		case <-t.C:
		}
		t.Stop()
	}
}
