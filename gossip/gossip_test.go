package gossip

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/meshfed/meshfed/test/harness"
)

func start(t *testing.T, name, site, role string, key []byte, seeds ...string) (*Pool, context.CancelFunc) {
	t.Helper()
	p, err := New(Options{Name: name, Site: site, Role: role, Bind: harness.FreePort(t), Keys: Keyring{Keys: [][]byte{key}}})
	if err != nil {
		t.Fatal(err)
	}
	p.SetSeeds(seeds)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = p.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return p, cancel
}

func waitFor(t *testing.T, within time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > within {
			t.Fatalf("%s: not within %s", what, within)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return time.Since(start)
}

func TestDeadGatewayIsSeenWithinASecond(t *testing.T) {
	key := make([]byte, 32)
	watcher, _ := start(t, "c/spoke", "c", RoleSpoke, key)
	gw, _ := start(t, "east/gateway/1", "east", RoleGateway, key, watcher.Addr())
	start(t, "west/gateway/1", "west", RoleGateway, key, watcher.Addr())
	waitFor(t, 10*time.Second, "both gateways alive", func() bool {
		s := watcher.SiteStates()
		return s["east"] == StateAlive && s["west"] == StateAlive
	})
	// A crash: no leave message.
	gw.kill()
	took := waitFor(t, 5*time.Second, "east down", func() bool { return watcher.Down()["east"] })
	t.Logf("a dead gateway was seen down after %s", took)
	if watcher.Down()["west"] {
		t.Fatal("west is marked down too")
	}

	// A member with another key cannot join.
	other := make([]byte, 32)
	other[0] = 1
	stranger, _ := start(t, "x/gateway/1", "x", RoleGateway, other, watcher.Addr())
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) {
		if watcher.SiteStates()["x"] != "" || len(stranger.Members()) > 1 {
			t.Fatal("a member with another key joined the pool")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestProbeIntervalTooShortIsRefused(t *testing.T) {
	_, err := New(Options{Name: "a", Site: "east", Role: RoleSpoke, Bind: harness.FreePort(t), Keys: Keyring{Keys: [][]byte{make([]byte, 32)}}, ProbeInterval: time.Millisecond})
	if err == nil || !strings.Contains(err.Error(), "at least 10ms") {
		t.Fatalf("a 1ms probe interval: got %v, want an error that names the minimum", err)
	}
}
