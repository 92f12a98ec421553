package consul

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"strconv"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/spoke"
	"github.com/meshfed/meshfed/spoke/xds"
	"github.com/prometheus/client_golang/prometheus"
)

var _ spoke.Importer = (*Registrar)(nil)

// Tag and meta of meshfed's registrations in Consul.
const (
	TagMeshfed  = "meshfed"
	MetaSite    = "meshfed-site"
	MetaService = "meshfed-service"
)

// RegistrarOptions configures a Registrar.
type RegistrarOptions struct {
	// Client is the Consul API client; its token needs write on the
	// nodes and services it registers. Required.
	Client     *api.Client
	Datacenter string
	// Prefix is the --outbound-prefix of the site's proxy that Consul
	// clients connect through: each service is registered at its
	// listener's address there. Required.
	Prefix netip.Prefix
	// Snapshot is the spoke's view of every site's services. Required.
	Snapshot func() catalog.SiteView
	// Resync is how often Consul is read again without a change here, to
	// put back what someone removed (and after a Consul restart).
	Resync time.Duration
	// WritesPerSecond bounds the writes to Consul.
	WritesPerSecond int
	Logger          *slog.Logger
	Registry        prometheus.Registerer
}

// Registrar registers every other site's services in Consul, one
// synthetic node per site (meshfed-<site>, node meta
// external-source=meshfed), tagged meshfed, at the address of the site's
// proxy listener for each, so a plain Consul client that looks one up
// (HTTP API or DNS) and connects reaches it with mTLS between the sites.
// It writes only what differs from what Consul holds: a restart with no
// change writes nothing.
type Registrar struct {
	o      RegistrarOptions
	writes prometheus.Counter
	errors prometheus.Counter
	synced prometheus.Gauge
}

// NewRegistrar checks the options.
func NewRegistrar(o RegistrarOptions) (*Registrar, error) {
	if o.Client == nil || o.Snapshot == nil || !o.Prefix.IsValid() {
		return nil, errors.New("consul: the registrar needs a client, the spoke's snapshot and the proxy's outbound prefix")
	}
	if o.Resync <= 0 {
		o.Resync = 30 * time.Second
	}
	if o.WritesPerSecond <= 0 {
		o.WritesPerSecond = 100
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Registry == nil {
		o.Registry = prometheus.NewRegistry()
	}
	r := &Registrar{o: o,
		writes: prometheus.NewCounter(prometheus.CounterOpts{Name: "meshfed_consul_writes_total", Help: "Registrations and deregistrations written to Consul."}),
		errors: prometheus.NewCounter(prometheus.CounterOpts{Name: "meshfed_consul_register_errors_total", Help: "Writes or reads of meshfed's registrations in Consul that failed."}),
		synced: prometheus.NewGauge(prometheus.GaugeOpts{Name: "meshfed_consul_services_registered", Help: "Federated service instances registered in Consul."}),
	}
	o.Registry.MustRegister(r.writes, r.errors, r.synced)
	return r, nil
}

// Run keeps Consul in step with the view until ctx ends: on every change
// (at most every 200ms, so a burst is one batch) and every Resync.
func (r *Registrar) Run(ctx context.Context, site string, view *spoke.View, _ *spoke.Local) error {
	sub := view.Table().Subscribe(func(string) bool { return true })
	defer sub.Close()
	limit := time.NewTicker(time.Second / time.Duration(r.o.WritesPerSecond))
	defer limit.Stop()
	resync := time.NewTicker(r.o.Resync)
	defer resync.Stop()
	for {
		if err := r.reconcile(ctx, site, limit.C); err != nil && ctx.Err() == nil {
			r.errors.Inc()
			r.o.Logger.Error("could not bring Consul in step with the federation; retrying", "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-sub.C():
			sub.Take(1 << 30)
		case <-resync.C:
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// instance is one registration: a service port of a site, and its check.
type instance struct {
	node    string
	service *api.AgentService
	status  string
}

// desired are the registrations the view calls for, by node and
// service ID.
func (r *Registrar) desired(site string) map[string]map[string]instance {
	snap := r.o.Snapshot()
	addrs := xds.ServiceAddrs(snap.Services, r.o.Prefix)
	out := map[string]map[string]instance{}
	for _, s := range snap.Services {
		addr, ok := addrs[s.ID()]
		if s.Site == site || !ok {
			continue
		}
		node := "meshfed-" + s.Site
		status := api.HealthCritical
		if slices.ContainsFunc(s.Endpoints, func(e catalog.Endpoint) bool { return e.Health == "" || e.Health == catalog.HealthHealthy }) {
			status = api.HealthPassing
		}
		name := s.Name
		if s.Namespace != "default" {
			name = s.Name + "--" + s.Namespace
		}
		for _, p := range s.Ports {
			id := fmt.Sprintf("meshfed-%s-%s-%d", s.Namespace, s.Name, p.Port)
			if out[node] == nil {
				out[node] = map[string]instance{}
			}
			out[node][id] = instance{node: node, status: status, service: &api.AgentService{
				ID: id, Service: name, Address: addr.String(), Port: int(p.Port), Tags: []string{TagMeshfed},
				Meta: map[string]string{MetaExternalSource: ExternalSource, MetaSite: s.Site, MetaService: s.ID()},
			}}
		}
	}
	return out
}

// current are meshfed's registrations in Consul now.
func (r *Registrar) current(ctx context.Context) (map[string]map[string]instance, error) {
	q := (&api.QueryOptions{Datacenter: r.o.Datacenter, NodeMeta: map[string]string{MetaExternalSource: ExternalSource}}).WithContext(ctx)
	nodes, _, err := r.o.Client.Catalog().Nodes(q)
	if err != nil {
		return nil, fmt.Errorf("list meshfed's nodes: %w", err)
	}
	out := map[string]map[string]instance{}
	for _, n := range nodes {
		out[n.Node] = map[string]instance{}
		cn, _, err := r.o.Client.Catalog().Node(n.Node, q)
		if err != nil {
			return nil, fmt.Errorf("read node %s: %w", n.Node, err)
		}
		checks, _, err := r.o.Client.Health().Node(n.Node, q)
		if err != nil {
			return nil, fmt.Errorf("read the checks of node %s: %w", n.Node, err)
		}
		status := map[string]string{}
		for _, c := range checks {
			status[c.ServiceID] = c.Status
		}
		if cn == nil {
			continue
		}
		for id, svc := range cn.Services {
			out[n.Node][id] = instance{node: n.Node, service: svc, status: status[id]}
		}
	}
	return out, nil
}

func same(a, b instance) bool {
	x, y := a.service, b.service
	return a.status == b.status && x.Service == y.Service && x.Address == y.Address && x.Port == y.Port &&
		slices.Equal(x.Tags, y.Tags) && maps.Equal(x.Meta, y.Meta)
}

// reconcile writes the difference between what the view calls for and
// what Consul holds, one write per tick of limit.
func (r *Registrar) reconcile(ctx context.Context, site string, limit <-chan time.Time) error {
	want := r.desired(site)
	have, err := r.current(ctx)
	if err != nil {
		return err
	}
	write := func(what string, do func() error) error {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-limit:
		}
		if err := do(); err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		r.writes.Inc()
		return nil
	}
	w := (&api.WriteOptions{Datacenter: r.o.Datacenter}).WithContext(ctx)
	n := 0
	for _, node := range slices.Sorted(maps.Keys(want)) {
		site := want[node][slices.Sorted(maps.Keys(want[node]))[0]].service.Meta[MetaSite]
		for _, id := range slices.Sorted(maps.Keys(want[node])) {
			in := want[node][id]
			n++
			if cur, ok := have[node][id]; ok && same(cur, in) {
				continue
			}
			reg := &api.CatalogRegistration{
				Node: node, Address: r.o.Prefix.Addr().String(), Datacenter: r.o.Datacenter,
				NodeMeta: map[string]string{MetaExternalSource: ExternalSource, MetaSite: site},
				Service:  in.service,
				Check: &api.AgentCheck{Node: node, CheckID: "meshfed:" + id, Name: "meshfed: the federation's health of " + in.service.Meta[MetaService],
					Status: in.status, ServiceID: id, Output: "endpoints healthy in site " + site + ": " + strconv.FormatBool(in.status == api.HealthPassing)},
			}
			if err := write("register "+id+" on "+node, func() error { _, err := r.o.Client.Catalog().Register(reg, w); return err }); err != nil {
				return err
			}
		}
	}
	for _, node := range slices.Sorted(maps.Keys(have)) {
		if want[node] == nil {
			if err := write("deregister node "+node, func() error {
				_, err := r.o.Client.Catalog().Deregister(&api.CatalogDeregistration{Node: node, Datacenter: r.o.Datacenter}, w)
				return err
			}); err != nil {
				return err
			}
			continue
		}
		for id := range have[node] {
			if _, ok := want[node][id]; !ok {
				if err := write("deregister "+id, func() error {
					_, err := r.o.Client.Catalog().Deregister(&api.CatalogDeregistration{Node: node, ServiceID: id, Datacenter: r.o.Datacenter}, w)
					return err
				}); err != nil {
					return err
				}
			}
		}
	}
	r.synced.Set(float64(n))
	return nil
}
