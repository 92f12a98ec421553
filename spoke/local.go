package spoke

import (
	"context"
	"sort"
	"sync"

	meshfedv1 "github.com/meshfed/meshfed/api/meshfed/v1"
	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/federation"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Local is the site's own catalog, which a Source and the site's host
// agents write and the spoke streams to the hub. A service's endpoints are
// the union of what the source says and what each host reports, so two
// hosts running the same service, or a host and a services file, add up.
// Writes of unchanged content cost nothing downstream: versions are
// content hashes, so the table ignores them.
type Local struct {
	site  string
	td    spiffeid.TrustDomain
	table *federation.Table

	mu     sync.Mutex
	source map[string]catalog.Service            // by service key
	hosts  map[string]map[string]catalog.Service // node → key → service

	statusMu sync.Mutex
}

// TrustDomain is the site's trust domain, which names its workloads.
func (l *Local) TrustDomain() spiffeid.TrustDomain { return l.td }

// NewLocal returns an empty local catalog for site.
func NewLocal(site string) *Local {
	return &Local{
		site: site, table: federation.NewTable(),
		source: map[string]catalog.Service{}, hosts: map[string]map[string]catalog.Service{},
	}
}

// Table is the versioned table the federation session publishes.
func (l *Local) Table() *federation.Table { return l.table }

func (l *Local) key(s catalog.Service) string {
	return federation.ServiceKey(l.site, s.Namespace, s.Name)
}

// Upsert sets one service of the source.
func (l *Local) Upsert(s catalog.Service) {
	l.mu.Lock()
	defer l.mu.Unlock()
	k := l.key(s)
	l.source[k] = s
	l.publish(k)
}

// Remove deletes one service of the source.
func (l *Local) Remove(namespace, name string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	k := federation.ServiceKey(l.site, namespace, name)
	delete(l.source, k)
	l.publish(k)
}

// Replace makes services the source's whole catalog.
func (l *Local) Replace(services []catalog.Service) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.replace(l.source, services)
}

// SetHost makes services everything node runs, replacing its last report.
func (l *Local) SetHost(node string, services []catalog.Service) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.hosts[node] == nil {
		l.hosts[node] = map[string]catalog.Service{}
	}
	l.replace(l.hosts[node], services)
}

// RemoveHost withdraws everything node reported.
func (l *Local) RemoveHost(node string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if h, ok := l.hosts[node]; ok {
		l.replace(h, nil)
		delete(l.hosts, node)
	}
}

// replace swaps the services of one writer (its map, old, changed in
// place) for services and republishes every key either holds. Called with
// mu held.
func (l *Local) replace(old map[string]catalog.Service, services []catalog.Service) {
	next := make(map[string]catalog.Service, len(services))
	for _, s := range services {
		next[l.key(s)] = s
	}
	for k := range old {
		delete(old, k)
		if _, ok := next[k]; !ok {
			l.publish(k)
		}
	}
	for k, s := range next {
		old[k] = s
	}
	for k := range next {
		l.publish(k)
	}
}

// publish writes key's service as the union of what the source and every
// host hold for it, or deletes it when none does. Called with mu held.
func (l *Local) publish(k string) {
	var parts []catalog.Service
	if s, ok := l.source[k]; ok {
		parts = append(parts, s)
	}
	nodes := make([]string, 0, len(l.hosts))
	for n := range l.hosts {
		nodes = append(nodes, n)
	}
	sort.Strings(nodes)
	for _, n := range nodes {
		if s, ok := l.hosts[n][k]; ok {
			parts = append(parts, s)
		}
	}
	if len(parts) == 0 {
		l.table.Delete(k)
		return
	}
	// The first writer's ports stand: the source's, else the first host's
	// by name, so the result does not depend on report order.
	merged := parts[0]
	merged.Endpoints = nil
	for _, p := range parts {
		merged.Endpoints = append(merged.Endpoints, p.Endpoints...)
	}
	l.table.Put(federation.ServiceResource(federation.ServiceToWire(l.site, merged)))
}

// Services returns the local services, sorted.
func (l *Local) Services() []catalog.Service {
	var out []catalog.Service
	for _, r := range l.table.List("svc/") {
		out = append(out, federation.ServiceFromWire(r.GetService(), catalog.Locality{}))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID() < out[j].ID() })
	return out
}

// SetSourceStatus publishes how the site's source is doing; the time of
// the last change of health is kept, so repeating a status costs nothing.
func (l *Local) SetSourceStatus(healthy bool, message string) {
	l.updateStatus(func(st *meshfedv1.SourceStatus) {
		if st.GetSince() == nil || st.GetHealthy() != healthy {
			st.Since = timestamppb.Now()
		}
		st.Healthy, st.Message = healthy, message
	})
}

// SetGossipAddresses publishes where the spoke takes part in the WAN
// gossip pool, in the site's status record.
func (l *Local) SetGossipAddresses(addrs []string) {
	l.updateStatus(func(st *meshfedv1.SourceStatus) { st.GossipAddresses = addrs })
}

// updateStatus changes the site's status record; the source and the
// gossip pool set different fields of it, one at a time.
func (l *Local) updateStatus(change func(*meshfedv1.SourceStatus)) {
	l.statusMu.Lock()
	defer l.statusMu.Unlock()
	key := federation.SourceStatusKey(l.site)
	st := &meshfedv1.SourceStatus{Site: l.site, Healthy: true}
	if r, ok := l.table.Get(key); ok {
		st = r.GetSourceStatus()
	}
	change(st)
	if st.Since == nil {
		st.Since = timestamppb.Now()
	}
	l.table.Put(federation.SourceStatusResource(st))
}

// RunsOn reports whether an endpoint with identity id runs on node.
func (l *Local) RunsOn(id, node string) bool {
	for _, r := range l.table.List("svc/") {
		for _, e := range r.GetService().GetEndpoints() {
			if e.GetIdentity() == id && e.GetLabels()[catalog.LabelNode] == node {
				return true
			}
		}
	}
	return false
}

// Importer writes the federated view into the site (for Kubernetes: MCS
// ServiceImports and EndpointSlices) until ctx ends.
type Importer interface {
	Run(ctx context.Context, site string, view *View, local *Local) error
}

// Source fills a site's local catalog until ctx ends.
type Source interface {
	Run(ctx context.Context, local *Local) error
}
