package federation

import (
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	meshfedv1 "github.com/meshfed/meshfed/api/meshfed/v1"
	"google.golang.org/protobuf/proto"
)

// Table is a set of versioned resources one side publishes, with
// subscriptions that learn which keys changed. It is safe for concurrent use.
//
// Resources are held encoded: a decoded endpoint with its labels map costs
// several times its wire size, and the hub holds every endpoint of the
// federation. Get decodes a fresh copy, so callers may keep or change it.
type Table struct {
	mu    sync.RWMutex
	items map[string]item
	subs  map[*Subscription]struct{}
}

type item struct {
	version string
	raw     []byte
	changed time.Time
}

func (it item) decode() *meshfedv1.Resource {
	r := &meshfedv1.Resource{}
	if err := proto.Unmarshal(it.raw, r); err != nil {
		// raw was produced by proto.Marshal in Put.
		panic(fmt.Sprintf("federation: table entry does not decode: %v", err))
	}
	return r
}

// NewTable returns an empty table.
func NewTable() *Table {
	return &Table{items: map[string]item{}, subs: map[*Subscription]struct{}{}}
}

// Put stores r (its Version must be set) and reports whether anything
// changed; an equal version is a no-op, so no subscriber hears of it.
func (t *Table) Put(r *meshfedv1.Resource) bool {
	// Sources re-put unchanged resources often: skip the encoding then.
	t.mu.RLock()
	old, ok := t.items[r.Key]
	t.mu.RUnlock()
	if ok && old.version == r.Version {
		return false
	}
	raw, err := proto.Marshal(r)
	if err != nil {
		panic(fmt.Sprintf("federation: marshal %s: %v", r.Key, err))
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if old, ok := t.items[r.Key]; ok && old.version == r.Version {
		return false
	}
	t.items[r.Key] = item{version: r.Version, raw: raw, changed: time.Now()}
	t.markLocked(r.Key)
	return true
}

// Delete removes key and reports whether it was there.
func (t *Table) Delete(key string) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if _, ok := t.items[key]; !ok {
		return false
	}
	delete(t.items, key)
	t.markLocked(key)
	return true
}

// Get returns the resource at key.
func (t *Table) Get(key string) (*meshfedv1.Resource, bool) {
	t.mu.RLock()
	it, ok := t.items[key]
	t.mu.RUnlock()
	if !ok {
		return nil, false
	}
	return it.decode(), true
}

// List returns the resources whose key starts with prefix, sorted by key.
func (t *Table) List(prefix string) []*meshfedv1.Resource {
	t.mu.RLock()
	var items []item
	for k, it := range t.items {
		if strings.HasPrefix(k, prefix) {
			items = append(items, it)
		}
	}
	t.mu.RUnlock()
	out := make([]*meshfedv1.Resource, 0, len(items))
	for _, it := range items {
		out = append(out, it.decode())
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Key < out[j].Key })
	return out
}

// Version returns the version of the resource at key, without decoding it.
func (t *Table) Version(key string) (string, bool) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	it, ok := t.items[key]
	return it.version, ok
}

// Versions returns key → version of the resources whose key starts with
// prefix.
func (t *Table) Versions(prefix string) map[string]string {
	t.mu.RLock()
	defer t.mu.RUnlock()
	out := map[string]string{}
	for k, it := range t.items {
		if strings.HasPrefix(k, prefix) {
			out[k] = it.version
		}
	}
	return out
}

// Len is the number of resources.
func (t *Table) Len() int {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return len(t.items)
}

func (t *Table) markLocked(key string) {
	for s := range t.subs {
		if s.filter(key) {
			s.mark(key)
		}
	}
}

// Subscribe returns a subscription to the keys filter accepts, with every
// such key present now already marked dirty.
func (t *Table) Subscribe(filter func(key string) bool) *Subscription {
	s := &Subscription{t: t, filter: filter, dirty: map[string]struct{}{}, notify: make(chan struct{}, 1)}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.subs[s] = struct{}{}
	for k := range t.items {
		if filter(k) {
			s.mark(k)
		}
	}
	return s
}

// Subscription is the set of keys changed since its owner last took them.
type Subscription struct {
	t      *Table
	filter func(string) bool
	mu     sync.Mutex
	dirty  map[string]struct{}
	notify chan struct{}
}

// C is signalled after keys are marked dirty.
func (s *Subscription) C() <-chan struct{} { return s.notify }

// Mark marks keys dirty, for example the keys a peer holds that may have
// been deleted meanwhile.
func (s *Subscription) Mark(keys ...string) {
	for _, k := range keys {
		s.mark(k)
	}
}

func (s *Subscription) mark(key string) {
	s.mu.Lock()
	s.dirty[key] = struct{}{}
	s.mu.Unlock()
	select {
	case s.notify <- struct{}{}:
	default:
	}
}

// Take removes and returns up to max dirty keys, sorted, and how many stay.
func (s *Subscription) Take(max int) (keys []string, left int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for k := range s.dirty {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	if len(keys) > max {
		keys = keys[:max]
	}
	for _, k := range keys {
		delete(s.dirty, k)
	}
	return keys, len(s.dirty)
}

// changedAt returns when key last changed in the table.
func (s *Subscription) changedAt(key string) time.Time {
	s.t.mu.RLock()
	defer s.t.mu.RUnlock()
	return s.t.items[key].changed
}

// Close ends the subscription.
func (s *Subscription) Close() {
	s.t.mu.Lock()
	delete(s.t.subs, s)
	s.t.mu.Unlock()
}
