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
		s, err := store.OpenEtcd(context.Background(), store.EtcdOptions{Endpoints: []string{url}, Prefix: "/test" + strings.Repeat("x", n) + "/"})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return s
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
	open := func() *store.Etcd {
		s, err := store.OpenEtcd(context.Background(), store.EtcdOptions{Endpoints: []string{url}, Prefix: "/watch/"})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return s
	}
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
