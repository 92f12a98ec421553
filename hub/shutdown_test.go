package hub_test

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	meshfedv1 "github.com/meshfed/meshfed/api/meshfed/v1"
	"github.com/meshfed/meshfed/hub"
	"github.com/meshfed/meshfed/hubclient"
	"github.com/meshfed/meshfed/store"
	"github.com/meshfed/meshfed/trust/credential"
)

// closeWatch is a store that counts the writes tried after its Close. Its
// site records are slow to write, as on a loaded disk, so a write that
// runs beside the shutdown instead of before the close comes too late.
type closeWatch struct {
	store.Store
	closed, late atomic.Int32
}

func (c *closeWatch) write() {
	if c.closed.Load() > 0 {
		c.late.Add(1)
	}
}

func (c *closeWatch) Apply(ctx context.Context, ops ...store.Op) error {
	c.write()
	return c.Store.Apply(ctx, ops...)
}

func (c *closeWatch) Update(ctx context.Context, key string, fn store.UpdateFunc) error {
	if strings.HasPrefix(key, "sites/") {
		time.Sleep(200 * time.Millisecond)
	}
	c.write()
	return c.Store.Update(ctx, key, fn)
}

func (c *closeWatch) ApplyIf(ctx context.Context, key string, cond func([]byte) error, ops ...store.Op) error {
	c.write()
	return c.Store.ApplyIf(ctx, key, cond, ops...)
}

func (c *closeWatch) Close() error {
	c.closed.Add(1)
	return c.Store.Close()
}

// syncBuffer is a log sink the hub's goroutines may share.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestRun_storeClosesLast: a hub stopped while a spoke's stream is open
// ends the stream, records the spoke's last sync and disconnection, and
// only then closes its store: no write comes after, nothing is logged as
// failed.
func TestRun_storeClosesLast(t *testing.T) {
	dir := t.TempDir()
	bolt, err := store.OpenBolt(filepath.Join(dir, "hub.db"), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	st := &closeWatch{Store: bolt}
	var logs syncBuffer
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	o := hub.DefaultOptions()
	o.DataDir, o.Listen, o.HTTPListen, o.Federation, o.Store = dir, "127.0.0.1:0", "-", "test.meshfed", st
	o.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelWarn}))
	h, err := hub.New(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	ran := make(chan error, 1)
	go func() { ran <- h.Run(ctx) }()

	conf, err := credential.Load(h.AdminConfigPath())
	if err != nil {
		t.Fatal(err)
	}
	aconn, err := hubclient.Dial(conf)
	if err != nil {
		t.Fatal(err)
	}
	defer aconn.Close()
	admin := meshfedv1.NewAdminClient(aconn)
	addSite(t, admin, "east")
	conn, err := join(t, h.Addr(), token(t, admin, "east", time.Hour), "east")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	streamCtx, endStream := context.WithCancel(context.Background())
	defer endStream()
	openSync(t, streamCtx, conn, "east")

	stop() // as SIGTERM does, with the stream open
	select {
	case err := <-ran:
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the hub did not stop")
	}
	if n := st.late.Load(); n > 0 {
		t.Errorf("%d writes came after the store was closed", n)
	}
	if l := logs.String(); strings.Contains(l, "could not record") || strings.Contains(l, "database not open") {
		t.Errorf("the hub logged a failed write on the way down:\n%s", l)
	}

	reopened, err := store.OpenBolt(filepath.Join(dir, "hub.db"), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer reopened.Close()
	raw, err := reopened.Get(context.Background(), "sites/east")
	if err != nil {
		t.Fatal(err)
	}
	var rec struct {
		LastSync     time.Time `json:"lastSync"`
		ConnectedVia string    `json:"connectedVia"`
	}
	if err := json.Unmarshal(raw, &rec); err != nil {
		t.Fatal(err)
	}
	if rec.LastSync.IsZero() || rec.ConnectedVia != "" {
		t.Errorf("stored site record: last sync %v, connected via %q; want the stream's last sync and no connection", rec.LastSync, rec.ConnectedVia)
	}
}
