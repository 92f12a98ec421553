package store

import (
	"bytes"
	"context"
	"fmt"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

var (
	_ Store   = (*Etcd)(nil)
	_ Watcher = (*Etcd)(nil)
)

// EtcdOptions configures OpenEtcd.
type EtcdOptions struct {
	// Endpoints are the etcd client URLs.
	Endpoints []string
	// Prefix is put before every key, so several federations can share one
	// etcd. Default "/meshfed/".
	Prefix string
	// DialTimeout bounds the first connection. Default 5s.
	DialTimeout time.Duration
}

// Etcd is a Store in etcd, for hub replicas that share state. etcd commits a
// write to a quorum's disks before it answers, which makes it durable.
type Etcd struct {
	cli    *clientv3.Client
	prefix string

	mu   sync.Mutex
	seen map[string]seenKey // see ifUnchanged
}

// seenKey is a key's value and revision as last read or written here.
type seenKey struct {
	val []byte
	rev int64
}

// seenMax bounds Etcd.seen; the keys writes are conditional on are site
// records and tokens, so it is rarely reached, and reaching it only
// costs a read per key again.
const seenMax = 4096

// OpenEtcd connects to etcd and checks that it answers.
func OpenEtcd(ctx context.Context, o EtcdOptions) (*Etcd, error) {
	if len(o.Endpoints) == 0 {
		return nil, fmt.Errorf("store: etcd: no endpoints: pass --etcd-endpoints http://HOST:2379")
	}
	if o.Prefix == "" {
		o.Prefix = "/meshfed/"
	}
	if o.DialTimeout == 0 {
		o.DialTimeout = 5 * time.Second
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: o.Endpoints, DialTimeout: o.DialTimeout, Logger: nopZap()})
	if err != nil {
		return nil, fmt.Errorf("store: etcd %v: %w", o.Endpoints, err)
	}
	cctx, cancel := context.WithTimeout(ctx, o.DialTimeout)
	defer cancel()
	if _, err := cli.Get(cctx, o.Prefix+"\x00"); err != nil {
		cli.Close()
		return nil, fmt.Errorf("store: etcd %v does not answer: %w (is etcd running and reachable?)", o.Endpoints, err)
	}
	return &Etcd{cli: cli, prefix: o.Prefix, seen: map[string]seenKey{}}, nil
}

// Get implements Store.
func (e *Etcd) Get(ctx context.Context, key string) ([]byte, error) {
	r, err := e.cli.Get(ctx, e.prefix+key)
	if err != nil {
		return nil, fmt.Errorf("store: etcd get %s: %w", key, err)
	}
	if len(r.Kvs) == 0 {
		return nil, ErrNotFound
	}
	return r.Kvs[0].Value, nil
}

// List implements Store.
func (e *Etcd) List(ctx context.Context, prefix string) ([]KV, error) {
	r, err := e.cli.Get(ctx, e.prefix+prefix, clientv3.WithPrefix(), clientv3.WithSort(clientv3.SortByKey, clientv3.SortAscend))
	if err != nil {
		return nil, fmt.Errorf("store: etcd list %s: %w", prefix, err)
	}
	out := make([]KV, 0, len(r.Kvs))
	for _, kv := range r.Kvs {
		out = append(out, KV{Key: string(kv.Key[len(e.prefix):]), Value: kv.Value})
	}
	return out, nil
}

// etcdMaxOps stays under etcd's default --max-txn-ops of 128.
const etcdMaxOps = 128

// Apply implements Store. etcd limits one transaction to 128 operations, so a
// larger batch must be split, and then it is no longer atomic as a whole:
// Apply refuses it rather than pretend.
func (e *Etcd) Apply(ctx context.Context, ops ...Op) error {
	txn, err := e.txnOps(ops)
	if err != nil {
		return err
	}
	if _, err := e.cli.Txn(ctx).Then(txn...).Commit(); err != nil {
		return fmt.Errorf("store: etcd write: %w", err)
	}
	return nil
}

func (e *Etcd) txnOps(ops []Op) ([]clientv3.Op, error) {
	if len(ops) > etcdMaxOps {
		return nil, fmt.Errorf("store: etcd: a batch of %d writes exceeds etcd's %d per transaction", len(ops), etcdMaxOps)
	}
	txn := make([]clientv3.Op, 0, len(ops))
	for _, op := range ops {
		if op.Delete {
			txn = append(txn, clientv3.OpDelete(e.prefix+op.Key))
		} else {
			txn = append(txn, clientv3.OpPut(e.prefix+op.Key, string(op.Value)))
		}
	}
	return txn, nil
}

// Update implements Store.
func (e *Etcd) Update(ctx context.Context, key string, fn UpdateFunc) error {
	k := e.prefix + key
	return e.ifUnchanged(ctx, key, func(cur []byte) ([]clientv3.Op, error) {
		next, err := fn(cur)
		if err != nil {
			return nil, err
		}
		if next == nil {
			return []clientv3.Op{clientv3.OpDelete(k)}, nil
		}
		return []clientv3.Op{clientv3.OpPut(k, string(next))}, nil
	})
}

// ApplyIf implements Store.
func (e *Etcd) ApplyIf(ctx context.Context, key string, cond func([]byte) error, ops ...Op) error {
	txn, err := e.txnOps(ops)
	if err != nil {
		return err
	}
	return e.ifUnchanged(ctx, key, func(cur []byte) ([]clientv3.Op, error) { return txn, cond(cur) })
}

// ifUnchanged reads key, has write decide what to write from its value,
// and writes that only if key is still as read: optimistic concurrency,
// retried when another writer moved the key's revision in between.
//
// The value and revision last seen here stand in for the first read, so a
// write under a key nobody else changed takes one round trip. A stale one
// costs a round trip, nothing wrong: the transaction's compare fails and
// the key is read. An error from write is returned only for a value read
// from etcd in this call.
func (e *Etcd) ifUnchanged(ctx context.Context, key string, write func(cur []byte) ([]clientv3.Op, error)) error {
	k := e.prefix + key
	e.mu.Lock()
	last, have := e.seen[k]
	e.mu.Unlock()
	remembered := have // last is from memory, not read in this call
	for range 16 {
		if !have {
			r, err := e.cli.Get(ctx, k)
			if err != nil {
				return fmt.Errorf("store: etcd get %s: %w", key, err)
			}
			last, have, remembered = seenKey{}, true, false
			if len(r.Kvs) > 0 {
				last = seenKey{r.Kvs[0].Value, r.Kvs[0].ModRevision}
			}
		}
		txn, err := write(bytes.Clone(last.val)) // write may keep or change it
		if err != nil && remembered {
			have = false
			continue
		}
		if err != nil {
			return err
		}
		tr, err := e.cli.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(k), "=", last.rev)).Then(txn...).Commit()
		if err != nil {
			e.forget(k)
			return fmt.Errorf("store: etcd write under %s: %w", key, err)
		}
		if tr.Succeeded {
			for _, op := range txn {
				if string(op.KeyBytes()) == k {
					last = seenKey{op.ValueBytes(), tr.Header.Revision}
					if op.IsDelete() {
						last = seenKey{}
					}
				}
			}
			e.remember(k, last)
			return nil
		}
		have = false // someone else wrote: read it
	}
	e.forget(k)
	return fmt.Errorf("%w: %s", ErrConflict, key)
}

func (e *Etcd) remember(k string, v seenKey) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if len(e.seen) >= seenMax {
		clear(e.seen)
	}
	e.seen[k] = v
}

func (e *Etcd) forget(k string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	delete(e.seen, k)
}

// Watch implements Watcher: a listing at one revision, then etcd's watch
// from the next, so no write falls between them.
func (e *Etcd) Watch(ctx context.Context, prefix string, fn func([]Change, bool)) error {
	r, err := e.cli.Get(ctx, e.prefix+prefix, clientv3.WithPrefix())
	if err != nil {
		return fmt.Errorf("store: etcd list %s: %w", prefix, err)
	}
	snap := make([]Change, 0, len(r.Kvs))
	for _, kv := range r.Kvs {
		snap = append(snap, Change{Key: string(kv.Key[len(e.prefix):]), Value: kv.Value})
	}
	fn(snap, true)
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	for wr := range e.cli.Watch(wctx, e.prefix+prefix, clientv3.WithPrefix(), clientv3.WithRev(r.Header.Revision+1)) {
		if err := wr.Err(); err != nil {
			return fmt.Errorf("store: etcd watch %s: %w", prefix, err)
		}
		changes := make([]Change, 0, len(wr.Events))
		for _, ev := range wr.Events {
			c := Change{Key: string(ev.Kv.Key[len(e.prefix):])}
			if ev.Type == clientv3.EventTypePut {
				c.Value = ev.Kv.Value
			}
			changes = append(changes, c)
		}
		fn(changes, false)
	}
	if err := ctx.Err(); err != nil {
		return nil
	}
	return fmt.Errorf("store: etcd watch %s ended", prefix)
}

// Close implements Store.
func (e *Etcd) Close() error { return e.cli.Close() }
