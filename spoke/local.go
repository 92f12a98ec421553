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

// Local is the site's own catalog, which a Source writes and the spoke
// streams to the hub. Writes of unchanged content cost nothing downstream:
// versions are content hashes, so the table ignores them.
type Local struct {
	site  string
	td    spiffeid.TrustDomain
	table *federation.Table

	statusMu sync.Mutex
}

// TrustDomain is the site's trust domain, which names its workloads.
func (l *Local) TrustDomain() spiffeid.TrustDomain { return l.td }

// NewLocal returns an empty local catalog for site.
func NewLocal(site string) *Local {
	return &Local{site: site, table: federation.NewTable()}
}

// Table is the versioned table the federation session publishes.
func (l *Local) Table() *federation.Table { return l.table }

// Upsert sets one service.
func (l *Local) Upsert(s catalog.Service) {
	l.table.Put(federation.ServiceResource(federation.ServiceToWire(l.site, s)))
}

// Remove deletes one service.
func (l *Local) Remove(namespace, name string) {
	l.table.Delete(federation.ServiceKey(l.site, namespace, name))
}

// Replace makes services the whole local catalog.
func (l *Local) Replace(services []catalog.Service) {
	keep := map[string]bool{}
	for _, s := range services {
		keep[federation.ServiceKey(l.site, s.Namespace, s.Name)] = true
		l.Upsert(s)
	}
	for k := range l.table.Versions("svc/") {
		if !keep[k] {
			l.table.Delete(k)
		}
	}
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
