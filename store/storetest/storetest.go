// Package storetest is the conformance suite every store.Store passes.
package storetest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"

	"github.com/meshfed/meshfed/store"
)

// Run runs the suite against stores made by open; each subtest gets a fresh,
// empty store.
func Run(t *testing.T, open func(t *testing.T) store.Store) {
	ctx := context.Background()
	t.Run("get of a missing key is ErrNotFound", func(t *testing.T) {
		s := open(t)
		if _, err := s.Get(ctx, "sites/none"); !errors.Is(err, store.ErrNotFound) {
			t.Fatalf("Get missing = %v, want ErrNotFound", err)
		}
	})
	t.Run("apply writes and deletes atomically", func(t *testing.T) {
		s := open(t)
		mustApply(t, s, store.Op{Key: "a/1", Value: []byte("one")}, store.Op{Key: "a/2", Value: []byte("two")}, store.Op{Key: "b/1", Value: []byte("x")})
		mustApply(t, s, store.Op{Key: "a/1", Delete: true}, store.Op{Key: "a/3", Value: []byte("three")})
		got := list(t, s, "a/")
		want := "a/2=two,a/3=three,"
		if got != want {
			t.Fatalf("List(a/) = %q, want %q", got, want)
		}
	})
	t.Run("list is sorted and bounded by the prefix", func(t *testing.T) {
		s := open(t)
		mustApply(t, s, store.Op{Key: "svc/b", Value: []byte("2")}, store.Op{Key: "svc/a", Value: []byte("1")}, store.Op{Key: "svd", Value: []byte("3")}, store.Op{Key: "sv", Value: []byte("4")})
		if got, want := list(t, s, "svc/"), "svc/a=1,svc/b=2,"; got != want {
			t.Fatalf("List(svc/) = %q, want %q", got, want)
		}
	})
	t.Run("values are binary safe", func(t *testing.T) {
		s := open(t)
		v := []byte{0, 1, 2, 255, 0}
		mustApply(t, s, store.Op{Key: "bin", Value: v})
		got, err := s.Get(ctx, "bin")
		if err != nil || !bytes.Equal(got, v) {
			t.Fatalf("Get(bin) = %v, %v; want %v", got, err, v)
		}
	})
	t.Run("update creates, changes and deletes", func(t *testing.T) {
		s := open(t)
		for _, want := range []string{"1", "12", "123"} {
			err := s.Update(ctx, "k", func(cur []byte) ([]byte, error) { return append(cur, want[len(want)-1]), nil })
			if err != nil {
				t.Fatal(err)
			}
			if got, _ := s.Get(ctx, "k"); string(got) != want {
				t.Fatalf("after update Get = %q, want %q", got, want)
			}
		}
		if err := s.Update(ctx, "k", func([]byte) ([]byte, error) { return nil, nil }); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Get(ctx, "k"); !errors.Is(err, store.ErrNotFound) {
			t.Fatalf("after delete-update Get = %v, want ErrNotFound", err)
		}
	})
	t.Run("a failed update changes nothing", func(t *testing.T) {
		s := open(t)
		mustApply(t, s, store.Op{Key: "k", Value: []byte("keep")})
		boom := errors.New("boom")
		if err := s.Update(ctx, "k", func([]byte) ([]byte, error) { return []byte("lost"), boom }); !errors.Is(err, boom) {
			t.Fatalf("Update error = %v, want boom", err)
		}
		if got, _ := s.Get(ctx, "k"); string(got) != "keep" {
			t.Fatalf("Get after failed update = %q, want keep", got)
		}
	})
	t.Run("a conditional write goes by its key's value as it writes", func(t *testing.T) {
		s := open(t)
		gone := errors.New("no gate")
		open := func(cur []byte) error {
			if string(cur) != "open" {
				return fmt.Errorf("%w: %q", gone, cur)
			}
			return nil
		}
		if err := s.ApplyIf(ctx, "gate", open, store.Op{Key: "out/1", Value: []byte("x")}); !errors.Is(err, gone) {
			t.Fatalf("ApplyIf with the key absent = %v, want cond's error", err)
		}
		mustApply(t, s, store.Op{Key: "gate", Value: []byte("open")}, store.Op{Key: "out/2", Value: []byte("keep")})
		if err := s.ApplyIf(ctx, "gate", open, store.Op{Key: "out/1", Value: []byte("x")}, store.Op{Key: "out/2", Delete: true}); err != nil {
			t.Fatal(err)
		}
		mustApply(t, s, store.Op{Key: "gate", Delete: true})
		if err := s.ApplyIf(ctx, "gate", open, store.Op{Key: "out/3", Value: []byte("x")}); !errors.Is(err, gone) {
			t.Fatalf("ApplyIf after the key's delete = %v, want cond's error", err)
		}
		if got, want := list(t, s, "out/"), "out/1=x,"; got != want {
			t.Fatalf("List(out/) = %q, want %q", got, want)
		}
	})
	t.Run("concurrent updates of one key lose nothing", func(t *testing.T) {
		s := open(t)
		const n = 20
		var wg sync.WaitGroup
		errs := make(chan error, n)
		for range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				errs <- s.Update(ctx, "counter", func(cur []byte) ([]byte, error) {
					var c int
					if cur != nil {
						fmt.Sscan(string(cur), &c)
					}
					return []byte(fmt.Sprint(c + 1)), nil
				})
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Fatal(err)
			}
		}
		if got, _ := s.Get(ctx, "counter"); string(got) != fmt.Sprint(n) {
			t.Fatalf("counter = %s, want %d", got, n)
		}
	})
}

func mustApply(t *testing.T, s store.Store, ops ...store.Op) {
	t.Helper()
	if err := s.Apply(context.Background(), ops...); err != nil {
		t.Fatal(err)
	}
}

func list(t *testing.T, s store.Store, prefix string) string {
	t.Helper()
	kvs, err := s.List(context.Background(), prefix)
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	for _, kv := range kvs {
		fmt.Fprintf(&b, "%s=%s,", kv.Key, kv.Value)
	}
	return b.String()
}
