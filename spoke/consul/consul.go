// Package consul feeds a spoke's local catalog from a Consul datacenter
// through consul/api blocking queries: the catalog's service list, then the
// health of each exported service, each query waiting on Consul's index,
// so a change is seen within a round trip and nothing polls.
//
// An instance is an endpoint with the identity
// spiffe://<site trust domain>/ns/default/sa/<service> and the node label
// of its Consul node: a meshfed proxy in front of it (registered in
// Consul at its inbound listener) gets that SVID when it is attested as
// that node, and other sites reach it through the site's gateway.
//
// Which services: those tagged ExportTag ("meshfed-export"), or all with
// ExportAll. meshfed's own registrations (node meta external-source=meshfed)
// are never imported. Only passing instances are healthy; an instance with
// a warning check is unhealthy and labelled consul-health=warning. Consul
// Enterprise namespaces and admin partitions are not read: services go to
// the meshfed namespace "default".
package consul

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"regexp"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/spoke"
	"github.com/prometheus/client_golang/prometheus"
)

var _ spoke.Source = (*Source)(nil)

// labelKey is what a Consul meta key or tag must look like to become an
// endpoint label.
var labelKey = regexp.MustCompile(`^[A-Za-z0-9]([-A-Za-z0-9_./]{0,251}[A-Za-z0-9])?$`)

// Node meta of meshfed's own registrations in Consul.
const (
	MetaExternalSource = "external-source"
	ExternalSource     = "meshfed"
)

// Options configures a Source.
type Options struct {
	// Client is the Consul API client (address, ACL token). Required.
	Client *api.Client
	// Datacenter to read; empty: the agent's.
	Datacenter string
	// ExportTag marks the services to export; ExportAll exports every
	// service (but meshfed's own and "consul").
	ExportTag string
	ExportAll bool
	// Wait bounds one blocking query.
	Wait time.Duration
	// EmptyGrace is how long an answer with no exported service at all,
	// after some, is held (and reported) before the site's services are
	// withdrawn: a reset or restored Consul answers empty, and taking a
	// whole site out of the federation on that would be worse than a
	// minute's delay when every service really went.
	EmptyGrace time.Duration
	Logger     *slog.Logger
	// OnError is called with each failure to read Consul.
	OnError  func(error)
	Registry prometheus.Registerer
}

// Source is a Consul datacenter's exported services.
type Source struct {
	o Options
	m *metrics

	local   *spoke.Local // set by Run, for the source status
	holding atomic.Bool  // an empty answer is held: the status says so

	mu        sync.Mutex
	instances map[string][]catalog.Endpoint // by service name
	changed   chan struct{}
}

// New checks the options.
func New(o Options) (*Source, error) {
	if o.Client == nil {
		return nil, errors.New("consul: a client is required")
	}
	if o.ExportTag == "" && !o.ExportAll {
		return nil, errors.New("consul: an export tag (meshfed-export) or export-all is required")
	}
	if o.Wait <= 0 {
		o.Wait = 30 * time.Second
	}
	if o.EmptyGrace < 0 {
		o.EmptyGrace = 0
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Registry == nil {
		o.Registry = prometheus.NewRegistry()
	}
	return &Source{o: o, m: newMetrics(o.Registry), instances: map[string][]catalog.Endpoint{}, changed: make(chan struct{}, 1)}, nil
}

// Run follows the datacenter's services until ctx ends and publishes them
// on every change. While Consul is out of reach the last state stands.
func (s *Source) Run(ctx context.Context, local *spoke.Local) error {
	s.local = local
	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	wg.Go(func() { s.publishLoop(ctx, local) })
	watchers := map[string]context.CancelFunc{}
	var index uint64
	var dc string // the datacenter read, when the agent's
	backoff := newBackoff()
	for {
		if s.o.Datacenter == "" {
			// An agent moved to another datacenter: its indexes mean
			// nothing here, so every query starts over.
			now, err := s.agentDatacenter()
			if err == nil && dc != "" && now != dc {
				s.o.Logger.Warn("the Consul agent's datacenter changed: reading it anew", "was", dc, "now", now)
				index = 0
				for name, stop := range watchers {
					stop()
					delete(watchers, name)
				}
			}
			if err == nil {
				dc = now
			}
		}
		q := (&api.QueryOptions{Datacenter: s.o.Datacenter, WaitIndex: index, WaitTime: s.o.Wait}).WithContext(ctx)
		services, meta, err := s.o.Client.Catalog().Services(q)
		if ctx.Err() != nil {
			for _, stop := range watchers {
				stop()
			}
			return nil
		}
		if err != nil {
			s.fail(fmt.Errorf("consul catalog services: %w", err))
			if !backoff.wait(ctx) {
				return nil
			}
			continue
		}
		backoff.reset()
		s.ok()
		index = nextIndex(index, meta.LastIndex)
		want := map[string]bool{}
		for name, tags := range services {
			if name != "consul" && (s.o.ExportAll || slices.Contains(tags, s.o.ExportTag)) {
				want[name] = true
			}
		}
		for name, stop := range watchers {
			if !want[name] {
				stop()
				delete(watchers, name)
				s.set(name, nil)
			}
		}
		for name := range want {
			if watchers[name] == nil {
				wctx, stop := context.WithCancel(ctx)
				watchers[name] = stop
				wg.Go(func() { s.watch(wctx, name) })
			}
		}
		s.m.services.Set(float64(len(want)))
	}
}

func (s *Source) agentDatacenter() (string, error) {
	self, err := s.o.Client.Agent().Self()
	if err != nil {
		return "", err
	}
	dc, _ := self["Config"]["Datacenter"].(string)
	return dc, nil
}

// nextIndex follows Consul's advice on blocking queries: an index that
// went backwards (a snapshot restore, a new leader's reset) starts over,
// and an index is never taken below 1.
func nextIndex(prev, last uint64) uint64 {
	if last < prev {
		return 0
	}
	return max(last, 1)
}

// watch follows one service's healthy and unhealthy instances until ctx
// ends.
func (s *Source) watch(ctx context.Context, name string) {
	var index uint64
	backoff := newBackoff()
	for {
		q := (&api.QueryOptions{Datacenter: s.o.Datacenter, WaitIndex: index, WaitTime: s.o.Wait}).WithContext(ctx)
		start := time.Now()
		entries, meta, err := s.o.Client.Health().Service(name, "", false, q)
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			s.fail(fmt.Errorf("consul health of %s: %w", name, err))
			if !backoff.wait(ctx) {
				return
			}
			continue
		}
		backoff.reset()
		if index != 0 && meta.LastIndex != index {
			s.m.lag.Observe(time.Since(start).Seconds())
		}
		index = nextIndex(index, meta.LastIndex)
		s.set(name, s.endpoints(name, entries))
	}
}

// endpoints turns a service's Consul instances into endpoints, skipping
// meshfed's own and the ones that cannot be endpoints (with a reason).
func (s *Source) endpoints(name string, entries []*api.ServiceEntry) []catalog.Endpoint {
	var out []catalog.Endpoint
	seen := map[string]bool{}
	for _, e := range entries {
		if e.Node == nil || e.Service == nil {
			continue
		}
		if e.Node.Meta[MetaExternalSource] == ExternalSource || e.Service.Meta[MetaExternalSource] == ExternalSource {
			continue // meshfed's own registration: never re-imported
		}
		id := e.Node.Node + "/" + e.Service.ID
		addr := e.Service.Address
		if addr == "" {
			addr = e.Node.Address
		}
		var reason string
		switch {
		case seen[id]:
			reason = "its instance ID is there twice"
		case e.Service.Port <= 0 || e.Service.Port > 65535:
			reason = fmt.Sprintf("port %d is not 1-65535", e.Service.Port)
		case addr == "":
			reason = "it has no address"
		}
		if reason != "" {
			s.skip(name, e.Service.ID, reason)
			continue
		}
		seen[id] = true
		ep := catalog.Endpoint{Address: addr, Port: uint32(e.Service.Port), Health: catalog.HealthHealthy,
			Labels: map[string]string{"consul.io/node": e.Node.Node, catalog.LabelNode: e.Node.Node}}
		if s.local != nil && !s.local.TrustDomain().IsZero() {
			// The workload identity a meshfed proxy in front of the
			// instance holds (meshfed proxy --workload, attested with a
			// node token for the Consul node's name).
			ep.Identity = fmt.Sprintf("spiffe://%s/ns/default/sa/%s", s.local.TrustDomain().Name(), name)
		}
		switch e.Checks.AggregatedStatus() {
		case api.HealthPassing:
		case api.HealthWarning:
			ep.Health = catalog.HealthUnhealthy
			ep.Labels["consul-health"] = "warning"
		default:
			ep.Health = catalog.HealthUnhealthy
		}
		for k, v := range e.Service.Meta {
			if labelKey.MatchString(k) {
				ep.Labels[k] = v
			}
		}
		for _, tag := range e.Service.Tags {
			if k := "consul.io/tag." + tag; tag != s.o.ExportTag && labelKey.MatchString(k) {
				ep.Labels[k] = "true"
			}
		}
		if r, z := e.Node.Meta["region"], e.Node.Meta["zone"]; r != "" || z != "" {
			ep.Region, ep.Zone = r, z
		}
		if err := catalog.ValidateService(catalog.Service{Namespace: "default", Name: name, Endpoints: []catalog.Endpoint{ep}}); err != nil {
			s.skip(name, e.Service.ID, err.Error())
			continue
		}
		out = append(out, ep)
	}
	catalog.SortEndpoints(out)
	return out
}

func (s *Source) skip(service, id, reason string) {
	s.m.skipped.Inc()
	s.o.Logger.Warn("Consul instance not exported", "service", service, "id", id, "reason", reason)
}

// set records a service's instances (nil: gone) and asks for a publish.
func (s *Source) set(name string, eps []catalog.Endpoint) {
	s.mu.Lock()
	if eps == nil {
		delete(s.instances, name)
	} else {
		s.instances[name] = eps
	}
	s.mu.Unlock()
	select {
	case s.changed <- struct{}{}:
	default:
	}
}

// publishLoop replaces the local catalog with the current services on
// every change.
func (s *Source) publishLoop(ctx context.Context, local *spoke.Local) {
	var last []catalog.Service
	var emptySince time.Time
	grace := time.NewTimer(time.Hour)
	grace.Stop()
	defer grace.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.changed:
		case <-grace.C:
		}
		services := s.services()
		if catalog.SameServices(services, last) {
			continue
		}
		if len(services) == 0 && len(last) > 0 && s.o.EmptyGrace > 0 {
			if emptySince.IsZero() {
				emptySince = time.Now()
				grace.Reset(s.o.EmptyGrace)
				s.holding.Store(true)
				s.o.Logger.Warn("Consul answers with no exported service at all: holding the last state", "services", len(last), "for", s.o.EmptyGrace)
				local.SetSourceStatus(false, fmt.Sprintf("Consul answers with no exported service at all: holding the last %d for %v (an empty Consul is more often a reset one than every service gone)", len(last), s.o.EmptyGrace))
			}
			if time.Since(emptySince) < s.o.EmptyGrace {
				continue
			}
			s.o.Logger.Warn("Consul still has no exported service after the grace: withdrawing the site's services", "grace", s.o.EmptyGrace)
		}
		if !emptySince.IsZero() {
			emptySince = time.Time{}
			grace.Stop()
			s.holding.Store(false)
			local.SetSourceStatus(true, "")
		}
		last = services
		local.Replace(services)
		n := 0
		for _, svc := range services {
			n += len(svc.Endpoints)
		}
		s.m.instances.Set(float64(n))
		s.o.Logger.Info("Consul services published", "services", len(services), "instances", n)
	}
}

// services are the exported services with a valid name, sorted.
func (s *Source) services() []catalog.Service {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []catalog.Service
	for _, name := range slices.Sorted(maps.Keys(s.instances)) {
		eps := s.instances[name]
		var ports []catalog.Port
		for _, e := range eps {
			if !slices.ContainsFunc(ports, func(p catalog.Port) bool { return p.Port == e.Port }) {
				ports = append(ports, catalog.Port{Name: fmt.Sprintf("tcp-%d", e.Port), Port: e.Port})
			}
		}
		svc := catalog.Service{Namespace: "default", Name: name, Ports: ports, Endpoints: eps}
		if svc.Endpoints == nil {
			svc.Endpoints = []catalog.Endpoint{}
		}
		if err := catalog.ValidateService(svc); err != nil {
			s.skip(name, "", err.Error())
			continue
		}
		out = append(out, svc)
	}
	return out
}

// fail counts and shows a failed read: at the hub (site list), in the
// logs and metrics, and to OnError.
func (s *Source) fail(err error) {
	s.m.errors.Inc()
	s.o.Logger.Error("Consul is out of reach; keeping the last state", "err", err)
	s.local.SetSourceStatus(false, err.Error()+"; serving the last state read")
	if s.o.OnError != nil {
		s.o.OnError(err)
	}
}

func (s *Source) ok() {
	if !s.holding.Load() {
		s.local.SetSourceStatus(true, "")
	}
}

// backoff is a jittered exponential wait between failed queries.
type backoff struct{ d time.Duration }

func newBackoff() *backoff { return &backoff{d: 250 * time.Millisecond} }

func (b *backoff) reset() { b.d = 250 * time.Millisecond }

// wait sleeps the jittered backoff or until ctx ends; false when it ended.
func (b *backoff) wait(ctx context.Context) bool {
	t := time.NewTimer(b.d/2 + rand.N(b.d/2+1))
	defer t.Stop()
	b.d = min(2*b.d, 30*time.Second)
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

type metrics struct {
	services, instances prometheus.Gauge
	errors, skipped     prometheus.Counter
	lag                 prometheus.Histogram
}

func newMetrics(r prometheus.Registerer) *metrics {
	m := &metrics{
		services:  prometheus.NewGauge(prometheus.GaugeOpts{Name: "meshfed_consul_services_imported", Help: "Consul services exported to the federation."}),
		instances: prometheus.NewGauge(prometheus.GaugeOpts{Name: "meshfed_consul_instances_imported", Help: "Consul instances exported to the federation."}),
		errors:    prometheus.NewCounter(prometheus.CounterOpts{Name: "meshfed_consul_api_errors_total", Help: "Consul API calls that failed."}),
		skipped:   prometheus.NewCounter(prometheus.CounterOpts{Name: "meshfed_consul_skipped_total", Help: "Consul services or instances not exported, each logged with its reason."}),
		lag: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "meshfed_consul_blocking_query_seconds",
			Help: "How long a blocking query on a service's health waited before it returned a change.", Buckets: prometheus.ExponentialBuckets(0.001, 4, 10)}),
	}
	r.MustRegister(m.services, m.instances, m.errors, m.skipped, m.lag)
	return m
}
