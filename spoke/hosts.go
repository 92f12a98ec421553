package spoke

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	meshfedv1 "github.com/meshfed/meshfed/api/meshfed/v1"
	"github.com/meshfed/meshfed/atomicfile"
	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/federation"
	"github.com/meshfed/meshfed/trust/ca"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// hostsFile keeps the host agents' last reports in the data dir, so a
// restarted spoke publishes them at once instead of emptying the site
// until every agent has reported again.
const hostsFile = "hosts.json"

// host is what a host agent last reported, and when.
type host struct {
	Node       string            `json:"node"`
	Version    string            `json:"agentVersion"`
	LastSeen   time.Time         `json:"lastSeen"`
	Containers uint32            `json:"containers"`
	Services   []catalog.Service `json:"services"`
	// Issued is when the SVID of the last report was signed: a host
	// removed (meshfed vm remove) after it leaves at once.
	Issued time.Time `json:"credentialIssued,omitzero"`
	stale  bool
}

// hosts tracks the site's host agents: each report replaces the host's
// whole state in the local catalog; a host silent past staleAfter has its
// endpoints marked unhealthy, and past expireAfter they leave.
type hosts struct {
	local *Local
	// removedAt says when a host was removed from the site, if it was.
	removedAt   func(node string) (time.Time, bool)
	path        string
	interval    time.Duration
	staleAfter  time.Duration
	expireAfter time.Duration
	log         *slog.Logger

	mu        sync.Mutex
	m         map[string]*host
	published time.Time // when the status last went out
}

// openHosts loads the hosts file from dir (missing: no hosts yet) and
// publishes what it holds.
func openHosts(o Options, local *Local, removedAt func(string) (time.Time, bool), log *slog.Logger) (*hosts, error) {
	h := &hosts{
		local: local, removedAt: removedAt, path: filepath.Join(o.DataDir, hostsFile), log: log,
		interval: o.HostReportInterval, staleAfter: o.HostStaleAfter, expireAfter: o.HostExpireAfter,
		m: map[string]*host{},
	}
	data, err := os.ReadFile(h.path)
	if errors.Is(err, os.ErrNotExist) {
		return h, nil
	}
	if err != nil {
		return nil, fmt.Errorf("host agents' state: %w", err)
	}
	var list []*host
	if err := json.Unmarshal(data, &list); err != nil {
		return nil, fmt.Errorf("host agents' state %s is damaged (%v): move it aside to start with no hosts; agents report again within %s", h.path, err, h.interval)
	}
	now := time.Now()
	for _, x := range list {
		h.m[x.Node] = x
		h.apply(x, now)
	}
	h.publishStatus(now, true)
	return h, nil
}

// report takes a host's whole state.
func (h *hosts) report(node string, issued time.Time, req *meshfedv1.HostReport) error {
	services := make([]catalog.Service, 0, len(req.GetServices()))
	for _, ws := range req.GetServices() {
		s := federation.ServiceFromWire(ws, catalog.Locality{})
		s.Site = ""
		for i := range s.Endpoints {
			e := &s.Endpoints[i]
			e.Site = ""
			labels := map[string]string{}
			for k, v := range e.Labels {
				labels[k] = v
			}
			// The node is who called, whatever the report says.
			labels[catalog.LabelNode] = node
			e.Labels = labels
		}
		if err := catalog.ValidateService(s); err != nil {
			return status.Errorf(codes.InvalidArgument, "service %s: %v", s.ID(), err)
		}
		for _, e := range s.Endpoints {
			if e.Identity != "" && !strings.HasPrefix(e.Identity, "spiffe://"+h.local.TrustDomain().Name()+"/") {
				return status.Errorf(codes.InvalidArgument, "service %s: endpoint %s:%d has identity %s outside this site's trust domain %s", s.ID(), e.Address, e.Port, e.Identity, h.local.TrustDomain())
			}
		}
		services = append(services, s)
	}
	now := time.Now()
	h.mu.Lock()
	defer h.mu.Unlock()
	x := &host{Node: node, Version: req.GetAgentVersion(), LastSeen: now, Containers: req.GetContainers(), Services: services, Issued: issued.UTC()}
	old, known := h.m[node]
	h.m[node] = x
	h.apply(x, now)
	changed := !known || old.stale || !old.Issued.Equal(x.Issued) || old.Version != x.Version || old.Containers != x.Containers || !catalog.SameServices(old.Services, x.Services)
	if changed {
		if err := h.save(); err != nil {
			h.log.Error("could not keep the host agents' state; a restarted spoke waits for their next reports", "err", err)
		}
	}
	h.publishStatus(now, changed)
	return nil
}

// remove withdraws a host's endpoints at once.
func (h *hosts) remove(node string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if _, ok := h.m[node]; !ok {
		return
	}
	delete(h.m, node)
	h.local.RemoveHost(node)
	if err := h.save(); err != nil {
		h.log.Error("could not keep the host agents' state", "err", err)
	}
	h.publishStatus(time.Now(), true)
}

// apply publishes x's services, unhealthy while the host is stale. Called
// with mu held (or before the hosts are shared).
func (h *hosts) apply(x *host, now time.Time) {
	x.stale = now.Sub(x.LastSeen) > h.staleAfter
	services := x.Services
	if x.stale {
		services = make([]catalog.Service, len(x.Services))
		for i, s := range x.Services {
			s.Endpoints = append([]catalog.Endpoint(nil), s.Endpoints...)
			for j := range s.Endpoints {
				s.Endpoints[j].Health = catalog.HealthUnhealthy
			}
			services[i] = s
		}
	}
	h.local.SetHost(x.Node, services)
}

// Run marks silent hosts stale and expires them until ctx ends.
func (h *hosts) Run(ctx context.Context) error {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case now := <-t.C:
			h.sweep(now)
		}
	}
}

func (h *hosts) sweep(now time.Time) {
	h.mu.Lock()
	defer h.mu.Unlock()
	changed := false
	for node, x := range h.m {
		silent := now.Sub(x.LastSeen)
		if at, removed := h.removedAt(node); removed && !x.Issued.After(at) {
			h.log.Warn("host removed from the site (meshfed vm remove): its endpoints leave the catalog, its credential is refused", "node", node, "removed_at", at)
			delete(h.m, node)
			h.local.RemoveHost(node)
			changed = true
			continue
		}
		switch {
		case silent > h.expireAfter:
			h.log.Warn("host agent silent past the expiry: its endpoints leave the catalog", "node", node, "last_seen", x.LastSeen)
			delete(h.m, node)
			h.local.RemoveHost(node)
			changed = true
		case silent > h.staleAfter && !x.stale:
			h.log.Warn("host agent missed its reports: its endpoints are unhealthy until it reports again", "node", node, "last_seen", x.LastSeen, "expires_in", (h.expireAfter - silent).Round(time.Second))
			h.apply(x, now)
			changed = true
		}
	}
	if changed {
		if err := h.save(); err != nil {
			h.log.Error("could not keep the host agents' state", "err", err)
		}
	}
	h.publishStatus(now, changed)
}

// save writes the hosts file. Called with mu held.
func (h *hosts) save() error {
	list := make([]*host, 0, len(h.m))
	for _, x := range h.m {
		list = append(list, x)
	}
	sort.Slice(list, func(i, j int) bool { return list[i].Node < list[j].Node })
	data, err := json.Marshal(list)
	if err != nil {
		return err
	}
	return atomicfile.Write(h.path, data, 0o600)
}

// publishStatus puts the hosts into the site's status record when they
// changed, and otherwise at most every 30s so last-seen times stay fresh
// without a push to the hub for every report. Called with mu held.
func (h *hosts) publishStatus(now time.Time, changed bool) {
	if !changed && now.Sub(h.published) < 30*time.Second {
		return
	}
	h.published = now
	list := make([]*meshfedv1.HostStatus, 0, len(h.m))
	for _, x := range h.m {
		st := &meshfedv1.HostStatus{
			Node: x.Node, AgentVersion: x.Version, LastSeen: timestamppb.New(x.LastSeen),
			Containers: x.Containers, Stale: x.stale,
		}
		for _, s := range x.Services {
			for _, e := range s.Endpoints {
				st.Endpoints++
				if e.Health == "" || e.Health == catalog.HealthHealthy {
					st.HealthyEndpoints++
				}
			}
		}
		if x.stale {
			st.HealthyEndpoints = 0
		}
		list = append(list, st)
	}
	sort.Slice(list, func(i, j int) bool { return list[i].Node < list[j].Node })
	h.local.updateStatus(func(st *meshfedv1.SourceStatus) { st.Hosts = list })
}

// ReportHost takes a host agent's whole state; only a node SVID may send
// one, and only for itself.
func (is *identityServer) ReportHost(ctx context.Context, req *meshfedv1.HostReport) (*meshfedv1.HostReportResponse, error) {
	caller, leaf, err := is.caller(ctx, "a host report")
	if err != nil {
		return nil, err
	}
	node, ok := strings.CutPrefix(caller.Path(), "/meshfed/node/")
	if !ok {
		return nil, status.Errorf(codes.PermissionDenied, "%s is not a host: only host agents (node SVIDs) report hosts", caller)
	}
	if err := is.s.hosts.report(node, ca.Issued(leaf), req); err != nil {
		is.s.m.sourceErrors.Inc()
		return nil, err
	}
	return &meshfedv1.HostReportResponse{ReportInterval: durationpb.New(is.s.o.HostReportInterval)}, nil
}
