package spoke

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"time"

	meshfedv1 "github.com/meshfed/meshfed/api/meshfed/v1"
	"github.com/meshfed/meshfed/federation"
	"github.com/meshfed/meshfed/store"
	"google.golang.org/protobuf/proto"
)

const (
	viewPrefix = "view/"
	keyContact = "meta/last-hub-contact"
)

// View is the federated catalog as this site last heard it from the hub:
// every other site's services and every site's record. It is kept on disk
// so a restarted spoke serves it before the hub answers, and it is the Sink
// of the federation session.
type View struct {
	site  string
	db    *store.Bolt
	table *federation.Table

	mu      sync.Mutex
	contact time.Time
	synced  bool
}

// OpenView opens the view in dataDir (view.db), loading what it holds.
func OpenView(ctx context.Context, dataDir, site string) (*View, error) {
	db, err := store.OpenBolt(filepath.Join(dataDir, "view.db"), time.Second)
	if err != nil {
		return nil, fmt.Errorf("spoke: %w", err)
	}
	v := &View{site: site, db: db, table: federation.NewTable()}
	kvs, err := db.List(ctx, viewPrefix)
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("spoke: load view: %w", err)
	}
	for _, kv := range kvs {
		r := &meshfedv1.Resource{}
		if err := proto.Unmarshal(kv.Value, r); err != nil {
			db.Close()
			return nil, fmt.Errorf("spoke: stored view entry %s is damaged (move view.db away to start empty): %w", kv.Key, err)
		}
		v.table.Put(r)
	}
	if b, err := db.Get(ctx, keyContact); err == nil {
		_ = json.Unmarshal(b, &v.contact)
	}
	return v, nil
}

// Table is the view's resources (keys site/… and svc/…).
func (v *View) Table() *federation.Table { return v.table }

// Close closes the view's file.
func (v *View) Close() error { return v.db.Close() }

// Apply implements federation.Sink: it stores the delta durably, then
// updates the in-memory view.
func (v *View) Apply(ctx context.Context, d *meshfedv1.Delta) error {
	own := federation.SiteServicesPrefix(v.site)
	ops := make([]store.Op, 0, len(d.GetUpdated())+len(d.GetRemoved())+1)
	for _, r := range d.GetUpdated() {
		if strings.HasPrefix(r.GetKey(), own) {
			return fmt.Errorf("%w: the hub sent this site's own service %s back", federation.ErrRejected, r.GetKey())
		}
		if err := federation.CheckResource(r); err != nil {
			return fmt.Errorf("%w: %v", federation.ErrRejected, err)
		}
		b, err := proto.Marshal(r)
		if err != nil {
			return err
		}
		ops = append(ops, store.Op{Key: viewPrefix + r.GetKey(), Value: b})
	}
	for _, k := range d.GetRemoved() {
		ops = append(ops, store.Op{Key: viewPrefix + k, Delete: true})
	}
	now := time.Now()
	cb, _ := json.Marshal(now)
	ops = append(ops, store.Op{Key: keyContact, Value: cb})
	if err := v.db.Apply(ctx, ops...); err != nil {
		return fmt.Errorf("spoke: store view: %w", err)
	}
	for _, r := range d.GetUpdated() {
		v.table.Put(r)
	}
	for _, k := range d.GetRemoved() {
		v.table.Delete(k)
	}
	v.mu.Lock()
	v.contact = now
	if d.GetSynced() {
		v.synced = true
	}
	v.mu.Unlock()
	return nil
}

// Versions are the versions the view holds, for the Hello.
func (v *View) Versions() map[string]string { return v.table.Versions("") }

// LastContact is when the hub was last heard from.
func (v *View) LastContact() time.Time {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.contact
}

// Synced reports whether the hub said this view is complete, on this
// process's current or an earlier stream.
func (v *View) Synced() bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.synced
}

// Expire drops every remote service when the hub was last heard from more
// than maxStale ago: a view that old is more likely wrong than useful. Site
// records are kept, so the spoke still knows its peers. It returns how many
// services it dropped.
func (v *View) Expire(ctx context.Context, maxStale time.Duration) (int, error) {
	c := v.LastContact()
	if maxStale <= 0 || c.IsZero() || time.Since(c) <= maxStale {
		return 0, nil
	}
	keys := v.table.Versions("svc/")
	if len(keys) == 0 {
		return 0, nil
	}
	var ops []store.Op
	for k := range keys {
		ops = append(ops, store.Op{Key: viewPrefix + k, Delete: true})
	}
	if err := v.db.Apply(ctx, ops...); err != nil {
		return 0, errors.Join(errors.New("spoke: expire view"), err)
	}
	for k := range keys {
		v.table.Delete(k)
	}
	v.mu.Lock()
	v.synced = false
	v.mu.Unlock()
	return len(keys), nil
}
