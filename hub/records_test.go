package hub

import (
	"context"
	"encoding/json"
	"log/slog"
	"testing"
	"time"

	"github.com/meshfed/meshfed/catalog"
)

// TestSaveSite_clearsOnlyItsOwnClaim: a stream that ends at this replica
// clears the stored claim only if it is this replica's; a newer claim of
// another replica (the spoke moved while this stream lingered) stays.
func TestSaveSite_clearsOnlyItsOwnClaim(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	h, err := New(ctx, Options{DataDir: t.TempDir(), Listen: "127.0.0.1:0", HTTPListen: "-", Federation: "test.meshfed", Advertise: "hub-a:7443", Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error)
	go func() { done <- h.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("hub Run: %v", err)
		}
	}()
	put := func(rec siteRecord) {
		b, _ := json.Marshal(rec)
		if err := h.store.Update(ctx, keySites+rec.Site.Name, func([]byte) ([]byte, error) { return b, nil }); err != nil {
			t.Fatal(err)
		}
	}
	stored := func() siteRecord {
		b, err := h.store.Get(ctx, keySites+"east")
		if err != nil {
			t.Fatal(err)
		}
		var rec siteRecord
		if err := json.Unmarshal(b, &rec); err != nil {
			t.Fatal(err)
		}
		return rec
	}
	site := catalog.Site{Name: "east", Kind: "docker"}
	newer := time.Now().Truncate(time.Second)
	older := newer.Add(-time.Minute)

	put(siteRecord{Site: site, LastSync: newer, ConnectedVia: "hub-b:7443"})
	theirs, err := h.saveSite(ctx, siteRecord{Site: site, LastSync: older})
	if err != nil {
		t.Fatal(err)
	}
	if got := stored(); got.ConnectedVia != "hub-b:7443" || !got.LastSync.Equal(newer) {
		t.Errorf("after a lingering stream ended at hub A: %+v; want hub B's claim and last sync kept", got)
	}
	if theirs == nil || theirs.ConnectedVia != "hub-b:7443" || !theirs.LastSync.Equal(newer) {
		t.Errorf("saveSite returned %+v; want hub B's claim, for hub A to show", theirs)
	}

	put(siteRecord{Site: site, LastSync: older, ConnectedVia: "hub-a:7443"})
	if theirs, err := h.saveSite(ctx, siteRecord{Site: site, LastSync: newer}); err != nil || theirs != nil {
		t.Fatalf("saveSite: %+v, %v", theirs, err)
	}
	if got := stored(); got.ConnectedVia != "" || !got.LastSync.Equal(newer) {
		t.Errorf("after hub A's own stream ended: %+v; want no claim, last sync %v", got, newer)
	}
}
