package hub

import (
	"context"
	"encoding/json"
	"strings"
	"time"

	meshfedv1 "github.com/meshfed/meshfed/api/meshfed/v1"
	"github.com/meshfed/meshfed/federation"
	"github.com/meshfed/meshfed/hub/trustfed"
	"github.com/meshfed/meshfed/store"
	"google.golang.org/protobuf/proto"
)

// Several hubs may share one store (etcd). Each serves its own spokes from
// memory; followStore brings in what the others write to the store: sites
// added, changed or removed, the catalog's resources, and outside trust
// domains, whose bundles every replica then refreshes. A hub's own writes
// come back the same way and change nothing.

// A hub records in the shared store which sites' spokes it holds, and
// renews that every heartbeatEvery; the other replicas show such a site
// connected until heartbeatLapse passes without a renewal (its hub died).
const (
	heartbeatEvery = 10 * time.Second
	heartbeatLapse = 3 * heartbeatEvery
)

// followStore keeps this hub in step with the shared store until ctx ends,
// starting the watch again (from a fresh snapshot) when it breaks.
func (h *Hub) followStore(ctx context.Context, w store.Watcher) error {
	go h.heartbeat(ctx)
	for {
		err := w.Watch(ctx, "", h.applyStored)
		if ctx.Err() != nil {
			return nil
		}
		h.log.Warn("lost the store's watch, which brings other hubs' writes; watching again", "err", err)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(time.Second):
		}
	}
}

// applyStored applies writes to the store. A snapshot is the whole store:
// sites and spoke-owned resources it lacks were deleted meanwhile.
func (h *Hub) applyStored(changes []store.Change, snapshot bool) {
	sites, resources := map[string]bool{}, map[string]bool{}
	for _, c := range changes {
		if name, ok := strings.CutPrefix(c.Key, keySites); ok {
			sites[name] = true
			h.syncSite(name, c.Value)
		} else if key, ok := strings.CutPrefix(c.Key, keyResource); ok {
			resources[key] = true
			h.syncResource(key, c.Value)
		} else if strings.HasPrefix(c.Key, trustfed.KeyPrefix) && c.Value != nil {
			h.fed.Follow(c.Value, snapshot)
		}
	}
	if !snapshot {
		return
	}
	h.mu.Lock()
	var gone []string
	for name := range h.sites {
		if !sites[name] {
			gone = append(gone, name)
		}
	}
	h.mu.Unlock()
	for _, name := range gone {
		h.syncSite(name, nil)
	}
	for key := range h.table.Versions("") {
		if federation.KeySite(key) != "" && !resources[key] {
			h.syncResource(key, nil)
		}
	}
}

// syncSite takes a site record as stored (nil: removed).
func (h *Hub) syncSite(name string, raw []byte) {
	h.mu.Lock()
	st := h.sites[name]
	h.mu.Unlock()
	if raw == nil {
		if st == nil {
			return
		}
		st.mu.Lock() // after a removal under way here, if there is one
		defer st.mu.Unlock()
		if h.forgetSite(st) {
			h.log.Info("site removed (through another hub)", "site", name)
		}
		return
	}
	var rec siteRecord
	if err := json.Unmarshal(raw, &rec); err != nil {
		h.log.Error("a stored site record does not decode; keeping what this hub has", "site", name, "err", err)
		return
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if st := h.sites[name]; st != nil {
		if st.rec.LastSync.After(rec.LastSync) {
			rec.LastSync = st.rec.LastSync
		}
		if st.conn != nil {
			rec.ConnectedVia = h.o.Advertise // this hub holds the stream
		}
		st.rec = rec
		h.publishSiteLocked(st)
		return
	}
	st = &siteState{rec: rec}
	h.sites[name] = st
	h.publishSiteLocked(st)
	h.refreshGaugesLocked()
	h.log.Info("site added (through another hub)", "site", name)
}

// syncResource takes a catalog resource as stored (nil: deleted). A spoke's
// resource counts only while its site is known here.
func (h *Hub) syncResource(key string, raw []byte) {
	var st *siteState
	if owner := federation.KeySite(key); owner != "" {
		h.mu.Lock()
		st = h.sites[owner]
		h.mu.Unlock()
		if st == nil {
			return
		}
		st.mu.Lock()
		defer st.mu.Unlock()
	}
	// Most changes are this hub's own writes coming back: same version.
	version, had := h.table.Version(key)
	var r *meshfedv1.Resource
	if raw != nil {
		r = &meshfedv1.Resource{}
		if err := proto.Unmarshal(raw, r); err != nil {
			h.log.Error("a stored resource does not decode; keeping what this hub has", "key", key, "err", err)
			return
		}
		if had && version == r.GetVersion() {
			return
		}
	} else if !had {
		return
	}
	services, endpoints := 0, 0
	if old, ok := h.table.Get(key); ok {
		services -= countServices(old)
		endpoints -= len(old.GetService().GetEndpoints())
	}
	if r != nil {
		services += countServices(r)
		endpoints += len(r.GetService().GetEndpoints())
		h.table.Put(r)
	} else {
		h.table.Delete(key)
	}
	if st != nil {
		h.mu.Lock()
		st.services += services
		st.endpoints += endpoints
		h.refreshGaugesLocked()
		h.mu.Unlock()
	}
}

// heartbeat renews the records of the sites whose spokes this hub holds,
// and publishes every site's state again, as another replica's lapses.
func (h *Hub) heartbeat(ctx context.Context) {
	t := time.NewTicker(heartbeatEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		var held []siteRecord
		h.mu.Lock()
		for _, st := range h.sites {
			if st.conn != nil {
				st.rec.LastSync, st.rec.ConnectedVia = time.Now(), h.o.Advertise
				held = append(held, st.rec)
			}
			h.publishSiteLocked(st)
		}
		h.mu.Unlock()
		for _, rec := range held {
			if _, err := h.saveSite(ctx, rec); err != nil && ctx.Err() == nil {
				h.log.Warn("could not renew the site's connection record", "site", rec.Site.Name, "err", err)
			}
		}
	}
}
