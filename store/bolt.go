package store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
)

var _ Store = (*Bolt)(nil)

var boltBucket = []byte("meshfed")

// ErrLocked is returned by OpenBolt when another process holds the file.
var ErrLocked = errors.New("store: data file is locked by another process")

// Bolt is a Store in one bbolt file. Every write is fsynced before it
// returns, so a crash, SIGKILL included, loses no acknowledged write.
type Bolt struct {
	db *bolt.DB
}

// OpenBolt opens (or creates, 0600) the bbolt file at path. A file another
// process has open gives ErrLocked after lockWait; a damaged file gives an
// error and is left untouched.
func OpenBolt(path string, lockWait time.Duration) (*Bolt, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("store: create %s: %w", filepath.Dir(path), err)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: lockWait})
	if errors.Is(err, bolterrors.ErrTimeout) {
		return nil, fmt.Errorf("%w: %s (is another meshfed running with this data dir? stop it or pick another --data-dir)", ErrLocked, path)
	}
	if err != nil {
		return nil, fmt.Errorf("store: open %s: %w (the file is not a valid meshfed store; restore it from a backup or move it away to start empty)", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		_, err := tx.CreateBucketIfNotExists(boltBucket)
		return err
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("store: init %s: %w", path, err)
	}
	return &Bolt{db: db}, nil
}

// Get implements Store.
func (b *Bolt) Get(_ context.Context, key string) ([]byte, error) {
	var out []byte
	err := b.db.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(boltBucket).Get([]byte(key))
		if v == nil {
			return ErrNotFound
		}
		out = bytes.Clone(v)
		return nil
	})
	return out, err
}

// List implements Store.
func (b *Bolt) List(_ context.Context, prefix string) ([]KV, error) {
	var out []KV
	err := b.db.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(boltBucket).Cursor()
		p := []byte(prefix)
		for k, v := c.Seek(p); k != nil && bytes.HasPrefix(k, p); k, v = c.Next() {
			out = append(out, KV{Key: string(k), Value: bytes.Clone(v)})
		}
		return nil
	})
	return out, err
}

// Apply implements Store.
func (b *Bolt) Apply(_ context.Context, ops ...Op) error {
	return b.db.Update(func(tx *bolt.Tx) error { return apply(tx.Bucket(boltBucket), ops) })
}

// ApplyIf implements Store.
func (b *Bolt) ApplyIf(_ context.Context, key string, cond func([]byte) error, ops ...Op) error {
	return b.db.Update(func(tx *bolt.Tx) error {
		bk := tx.Bucket(boltBucket)
		if err := cond(bytes.Clone(bk.Get([]byte(key)))); err != nil {
			return err
		}
		return apply(bk, ops)
	})
}

func apply(bk *bolt.Bucket, ops []Op) error {
	for _, op := range ops {
		var err error
		if op.Delete {
			err = bk.Delete([]byte(op.Key))
		} else {
			err = bk.Put([]byte(op.Key), op.Value)
		}
		if err != nil {
			return fmt.Errorf("store: write %s: %w", op.Key, err)
		}
	}
	return nil
}

// Update implements Store.
func (b *Bolt) Update(_ context.Context, key string, fn UpdateFunc) error {
	return b.db.Update(func(tx *bolt.Tx) error {
		bk := tx.Bucket(boltBucket)
		next, err := fn(bytes.Clone(bk.Get([]byte(key))))
		if err != nil {
			return err
		}
		if next == nil {
			return bk.Delete([]byte(key))
		}
		return bk.Put([]byte(key), next)
	})
}

// Close implements Store.
func (b *Bolt) Close() error { return b.db.Close() }
