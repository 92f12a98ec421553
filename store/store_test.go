package store_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshfed/meshfed/store"
	"github.com/meshfed/meshfed/store/storetest"
	"github.com/meshfed/meshfed/test/harness"
)

func TestBolt_Conformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) store.Store {
		s, err := store.OpenBolt(filepath.Join(t.TempDir(), "hub.db"), time.Second)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return s
	})
}

func TestEtcd_Conformance(t *testing.T) {
	url := harness.Etcd(t)
	n := 0
	storetest.Run(t, func(t *testing.T) store.Store {
		n++
		return openEtcd(t, url, "/test"+strings.Repeat("x", n)+"/")
	})
}

func TestBolt_lockedFileIsRefused(t *testing.T) {
	path := filepath.Join(t.TempDir(), "hub.db")
	s, err := store.OpenBolt(path, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	_, err = store.OpenBolt(path, 100*time.Millisecond)
	if !errors.Is(err, store.ErrLocked) || !strings.Contains(err.Error(), "--data-dir") {
		t.Fatalf("second open = %v, want ErrLocked saying what to do", err)
	}
}

func TestBolt_corruptFileIsRefusedAndKept(t *testing.T) {
	path := filepath.Join(t.TempDir(), "hub.db")
	junk := []byte(strings.Repeat("not a bolt file ", 512))
	if err := os.WriteFile(path, junk, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := store.OpenBolt(path, time.Second); err == nil || !strings.Contains(err.Error(), "backup") {
		t.Fatalf("open corrupt = %v, want an error that says what to do", err)
	}
	after, _ := os.ReadFile(path)
	if string(after) != string(junk) {
		t.Fatal("the corrupt file was changed")
	}
}

func TestBolt_fileIsPrivate(t *testing.T) {
	path := filepath.Join(t.TempDir(), "hub.db")
	s, err := store.OpenBolt(path, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	fi, _ := os.Stat(path)
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode = %v, want 0600", fi.Mode().Perm())
	}
}

// TestEtcd_watchSeesAnotherWriter: what one client writes under the
// prefix, another's Watch reports, after a snapshot of what was there.
func TestEtcd_watchSeesAnotherWriter(t *testing.T) {
	url := harness.Etcd(t)
	open := func() *store.Etcd { return openEtcd(t, url, "/watch/") }
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	a, b := open(), open()
	if err := a.Apply(ctx, store.Op{Key: "catalog/1", Value: []byte("one")}, store.Op{Key: "other", Value: []byte("x")}); err != nil {
		t.Fatal(err)
	}
	seen := make(chan string, 16)
	done := make(chan error, 1)
	go func() {
		done <- b.Watch(ctx, "catalog/", func(cs []store.Change, snapshot bool) {
			var parts []string
			for _, c := range cs {
				parts = append(parts, c.Key+"="+string(c.Value))
			}
			seen <- fmt.Sprintf("%v %s", snapshot, strings.Join(parts, ","))
		})
	}()
	next := func(want string) {
		t.Helper()
		select {
		case got := <-seen:
			if got != want {
				t.Fatalf("watch reported %q, want %q", got, want)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("watch reported nothing, want %q", want)
		}
	}
	next("true catalog/1=one")
	if err := a.Apply(ctx, store.Op{Key: "catalog/2", Value: []byte("two")}, store.Op{Key: "catalog/1", Delete: true}, store.Op{Key: "other", Value: []byte("y")}); err != nil {
		t.Fatal(err)
	}
	next("false catalog/2=two,catalog/1=")
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Watch after its context ended: %v, want nil", err)
	}
}

// TestEtcd_twoClientsWriteUnderOneKey: a client's writes conditional on a
// key go by what another client wrote there last, not by what the first
// one saw before (two hub replicas on one etcd).
func TestEtcd_twoClientsWriteUnderOneKey(t *testing.T) {
	url := harness.Etcd(t)
	open := func() *store.Etcd { return openEtcd(t, url, "/two/") }
	ctx := context.Background()
	a, b := open(), open()
	gone := errors.New("no gate")
	present := func(cur []byte) error {
		if cur == nil {
			return gone
		}
		return nil
	}
	if err := a.Apply(ctx, store.Op{Key: "gate", Value: []byte("open")}); err != nil {
		t.Fatal(err)
	}
	if err := a.ApplyIf(ctx, "gate", present, store.Op{Key: "out/1", Value: []byte("x")}); err != nil {
		t.Fatal(err)
	}
	if err := b.Apply(ctx, store.Op{Key: "gate", Delete: true}); err != nil {
		t.Fatal(err)
	}
	if err := a.ApplyIf(ctx, "gate", present, store.Op{Key: "out/2", Value: []byte("x")}); !errors.Is(err, gone) {
		t.Fatalf("ApplyIf after another client deleted the key = %v, want cond's error", err)
	}
	// a deletes the key itself, so what it saw last is "absent"; b puts it
	// back.
	if err := b.Apply(ctx, store.Op{Key: "gate", Value: []byte("open")}); err != nil {
		t.Fatal(err)
	}
	if err := a.Update(ctx, "gate", func([]byte) ([]byte, error) { return nil, nil }); err != nil {
		t.Fatal(err)
	}
	if err := b.Apply(ctx, store.Op{Key: "gate", Value: []byte("open")}); err != nil {
		t.Fatal(err)
	}
	if err := a.ApplyIf(ctx, "gate", present, store.Op{Key: "out/3", Value: []byte("x")}); err != nil {
		t.Fatalf("ApplyIf after another client put the key back = %v", err)
	}
	if _, err := a.Get(ctx, "out/2"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("the write refused by its condition is in the store: %v", err)
	}
	inc := func(s *store.Etcd) {
		t.Helper()
		if err := s.Update(ctx, "counter", func(cur []byte) ([]byte, error) { return append(cur, 'x'), nil }); err != nil {
			t.Fatal(err)
		}
	}
	inc(a)
	inc(b)
	inc(a)
	if got, _ := b.Get(ctx, "counter"); string(got) != "xxx" {
		t.Fatalf("after three updates by two clients counter = %q, want xxx", got)
	}
}

// BenchmarkEtcd_ApplyIf: a hub's write for a site, conditional on the
// site's record, against a real etcd.
func BenchmarkEtcd_ApplyIf(b *testing.B) {
	s := openEtcd(b, harness.Etcd(b), "/bench/")
	ctx := context.Background()
	if err := s.Apply(ctx, store.Op{Key: "sites/east", Value: []byte("{}")}); err != nil {
		b.Fatal(err)
	}
	present := func(cur []byte) error {
		if cur == nil {
			return errors.New("gone")
		}
		return nil
	}
	for i := 0; b.Loop(); i++ {
		if err := s.ApplyIf(ctx, "sites/east", present, store.Op{Key: fmt.Sprintf("catalog/svc/east/%d", i%100), Value: []byte("x")}); err != nil {
			b.Fatal(err)
		}
	}
}

// openEtcd opens a store on the etcd at url, closed when the test ends.
func openEtcd(t testing.TB, url, prefix string) *store.Etcd {
	t.Helper()
	s, err := store.OpenEtcd(context.Background(), store.EtcdOptions{Endpoints: []string{url}, Prefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}
