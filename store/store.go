// Package store is the hub's durable key/value storage: one small interface
// with an embedded implementation (bbolt, a file in the data dir) and a
// shared one (etcd, for several hub replicas). Both pass the conformance
// suite in store/storetest. A call returns only after its write is durable.
//
// Keys are slash-separated paths such as "sites/east"; values are opaque.
package store

import (
	"context"
	"errors"
)

// ErrNotFound is returned by Get for a key that does not exist.
var ErrNotFound = errors.New("store: key not found")

// ErrConflict is returned by Update and ApplyIf when another writer changed
// the key between read and write too many times in a row.
var ErrConflict = errors.New("store: too many concurrent updates of one key")

// KV is one stored pair.
type KV struct {
	Key   string
	Value []byte
}

// Op is one write in a batch: a put, or a delete when Delete is set.
type Op struct {
	Key    string
	Value  []byte
	Delete bool
}

// UpdateFunc gets the key's current value (nil when absent) and returns the
// value to store: nil deletes the key. An error aborts the update unchanged
// and is returned by Update as it is.
type UpdateFunc func(current []byte) (next []byte, err error)

// Store is durable storage. Every method is safe for concurrent use.
type Store interface {
	// Get returns the value of key, or ErrNotFound.
	Get(ctx context.Context, key string) ([]byte, error)
	// List returns every pair whose key starts with prefix, sorted by key.
	List(ctx context.Context, prefix string) ([]KV, error)
	// Apply writes all ops atomically: all of them or none.
	Apply(ctx context.Context, ops ...Op) error
	// Update atomically reads, changes and writes one key.
	Update(ctx context.Context, key string, fn UpdateFunc) error
	// ApplyIf writes ops as Apply does, if cond accepts the value key has
	// (nil when absent) as they are written: another writer's change to
	// key in between is seen. cond's error aborts the write unchanged and
	// is returned as it is.
	ApplyIf(ctx context.Context, key string, cond func(current []byte) error, ops ...Op) error
	// Close releases the store.
	Close() error
}

// Change is the value a key has after a write; Value is nil when the key
// was deleted.
type Change struct {
	Key   string
	Value []byte
}

// Watcher is a Store that several processes write (etcd, under hub
// replicas): it tells each of them what the others wrote.
type Watcher interface {
	// Watch calls fn first with every pair under prefix (snapshot true),
	// then with each later write under prefix, in the order the store made
	// them, until ctx ends or the watch breaks (its error is returned; a
	// new Watch starts again with a snapshot).
	Watch(ctx context.Context, prefix string, fn func(changes []Change, snapshot bool)) error
}
