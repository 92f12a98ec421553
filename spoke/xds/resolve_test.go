package xds

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"testing"
	"time"
)

// A failed lookup keeps the addresses of the last one that worked, and
// only a change rebuilds.
func TestResolverKeepsAddressesWhenALookupFails(t *testing.T) {
	answers := make(chan error, 1)
	changed := make(chan struct{}, 10)
	r := newResolver(time.Hour, slog.New(slog.DiscardHandler), func() { changed <- struct{}{} })
	r.lookup = func(context.Context, string) ([]netip.Addr, error) {
		if err := <-answers; err != nil {
			return nil, err
		}
		return []netip.Addr{netip.MustParseAddr("::ffff:10.0.0.2"), netip.MustParseAddr("10.0.0.1")}, nil
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go r.run(ctx)

	answers <- nil
	r.resolved([]string{"gw.test"})
	<-changed
	if got := fmt.Sprint(r.resolved([]string{"gw.test"})); got != "map[gw.test:[10.0.0.1 10.0.0.2]]" {
		t.Fatalf("after a lookup: %s", got)
	}
	answers <- errors.New("no such host")
	r.resolved([]string{"gw.test", "gw2.test"}) // a new name: looked up at once
	answers <- errors.New("no such host")
	// Both lookups fail; the round ends with the new name in the map.
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, ok := r.resolved([]string{"gw.test", "gw2.test"})["gw2.test"]; ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no lookup of the new name")
		}
		time.Sleep(time.Millisecond)
	}
	if got := fmt.Sprint(r.resolved([]string{"gw.test", "gw2.test"})); got != "map[gw.test:[10.0.0.1 10.0.0.2] gw2.test:[]]" || len(changed) != 0 {
		t.Fatalf("after failed lookups: %s (%d rebuilds asked for)", got, len(changed))
	}
}
