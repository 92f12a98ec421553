package hub

import (
	"cmp"
	"context"
	"encoding/json"
	"log/slog"
	"strings"
	"testing"
	"time"

	meshfedv1 "github.com/meshfed/meshfed/api/meshfed/v1"
	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/federation"
	"github.com/meshfed/meshfed/store"
	"github.com/meshfed/meshfed/trust/credential"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// RunForTest runs a hub on a bbolt store (in a temporary directory unless
// o.DataDir is set), on loopback, until the test ends; o's other fields as
// given. (Exported for the package's external tests too.)
func RunForTest(t *testing.T, o Options) *Hub {
	t.Helper()
	d := DefaultOptions()
	if o.DataDir == "" {
		o.DataDir = t.TempDir()
	}
	o.Listen, o.HTTPListen, o.Federation = "127.0.0.1:0", "-", "test.meshfed"
	o.SpokeCertTTL, o.MaxTokenTTL, o.Registry = cmp.Or(o.SpokeCertTTL, d.SpokeCertTTL), cmp.Or(o.MaxTokenTTL, d.MaxTokenTTL), d.Registry
	o.Logger = slog.New(slog.DiscardHandler)
	ctx, cancel := context.WithCancel(context.Background())
	h, err := New(ctx, o)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	done := make(chan error)
	go func() { done <- h.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("hub Run: %v", err)
		}
	})
	return h
}

// runHub is a hub that calls itself hub-a:7443.
func runHub(t *testing.T) (*Hub, context.Context) {
	return RunForTest(t, Options{Advertise: "hub-a:7443"}), context.Background()
}

// TestSaveSite_clearsOnlyItsOwnClaim: a stream that ends at this replica
// clears the stored claim only if it is this replica's; a newer claim of
// another replica (the spoke moved while this stream lingered) stays.
func TestSaveSite_clearsOnlyItsOwnClaim(t *testing.T) {
	h, ctx := runHub(t)
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

// TestRemoveSite_leavesNothingBehind: a spoke's delta that reaches this
// replica after another one removed the site is refused and writes
// nothing; a removal takes what the site has in the store, also what this
// replica has not seen; a removal cut short is finished by running it
// again, and a new site of the name does not inherit what it left.
func TestRemoveSite_leavesNothingBehind(t *testing.T) {
	h, ctx := runHub(t)
	admin := &adminServer{h: h}
	add := func() {
		t.Helper()
		if _, err := admin.AddSite(ctx, &meshfedv1.AddSiteRequest{Site: &meshfedv1.Site{Name: "east", Kind: "docker"}}); err != nil {
			t.Fatal(err)
		}
	}
	service := func(name string) *meshfedv1.Resource {
		return federation.ServiceResource(&meshfedv1.Service{Site: "east", Namespace: "default", Name: name, Ports: []*meshfedv1.Port{{Port: 80}}})
	}
	left := func() []string {
		t.Helper()
		var keys []string
		for _, prefix := range []string{keySites, keyResource + "svc/", keyTokens} {
			kvs, err := h.store.List(ctx, prefix)
			if err != nil {
				t.Fatal(err)
			}
			for _, kv := range kvs {
				keys = append(keys, kv.Key)
			}
		}
		return keys
	}
	sink := &spokeSink{h: h, site: "east"}

	add()
	if err := sink.Apply(ctx, &meshfedv1.Delta{Updated: []*meshfedv1.Resource{service("a")}}); err != nil {
		t.Fatal(err)
	}
	// Another replica wrote a service this one has not seen yet.
	raw, _ := proto.Marshal(service("b"))
	if err := h.store.Apply(ctx, store.Op{Key: keyResource + service("b").Key, Value: raw}); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.CreateToken(ctx, &meshfedv1.CreateTokenRequest{Site: "east"}); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.RemoveSite(ctx, &meshfedv1.RemoveSiteRequest{Name: "east"}); err != nil {
		t.Fatal(err)
	}
	if got := left(); len(got) != 0 {
		t.Errorf("after the removal the store holds %v", got)
	}
	if _, err := admin.RemoveSite(ctx, &meshfedv1.RemoveSiteRequest{Name: "east"}); status.Code(err) != codes.NotFound {
		t.Errorf("removing it again: %v; want NotFound", err)
	}

	// Another replica removed the site while this one still has it.
	add()
	if err := h.store.Apply(ctx, store.Op{Key: keySites + "east", Delete: true}); err != nil {
		t.Fatal(err)
	}
	if err := sink.Apply(ctx, &meshfedv1.Delta{Updated: []*meshfedv1.Resource{service("c")}}); err == nil || !strings.Contains(err.Error(), "removed") {
		t.Errorf("a delta after the removal: %v; want it refused", err)
	}
	if _, err := admin.CreateToken(ctx, &meshfedv1.CreateTokenRequest{Site: "east"}); status.Code(err) != codes.NotFound {
		t.Errorf("a token after the removal: %v; want NotFound", err)
	}
	if got := left(); len(got) != 0 {
		t.Errorf("writes after the removal left %v", got)
	}

	// A removal cut short after the record: running it again finishes it.
	if err := h.store.Apply(ctx, store.Op{Key: keyResource + service("d").Key, Value: raw}); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.RemoveSite(ctx, &meshfedv1.RemoveSiteRequest{Name: "east"}); err != nil {
		t.Fatal(err)
	}
	if got := left(); len(got) != 0 {
		t.Errorf("after running the removal again the store holds %v", got)
	}
	// Or a new site of the name clears it.
	if err := h.store.Apply(ctx, store.Op{Key: keyResource + service("e").Key, Value: raw}); err != nil {
		t.Fatal(err)
	}
	add()
	if got := left(); len(got) != 1 || got[0] != keySites+"east" {
		t.Errorf("a new site east starts with %v; want only its record", got)
	}
}

// TestLoad_clearsWhatARemovedSiteLeft: a hub that starts on a store with
// catalog keys, a join token or a CA rotation request of a site that has
// no record (a removal cut short) deletes them, and keeps those of
// registered sites.
func TestLoad_clearsWhatARemovedSiteLeft(t *testing.T) {
	dir := t.TempDir()
	put := func(h *Hub, site, name string) {
		t.Helper()
		r := federation.ServiceResource(&meshfedv1.Service{Site: site, Namespace: "default", Name: name, Ports: []*meshfedv1.Port{{Port: 80}}})
		raw, _ := proto.Marshal(r)
		if err := h.store.Apply(context.Background(), store.Op{Key: keyResource + r.Key, Value: raw}); err != nil {
			t.Fatal(err)
		}
	}
	t.Run("a removal cut short", func(t *testing.T) {
		h := RunForTest(t, Options{DataDir: dir})
		if _, err := (&adminServer{h: h}).AddSite(context.Background(), &meshfedv1.AddSiteRequest{Site: &meshfedv1.Site{Name: "west", Kind: "docker"}}); err != nil {
			t.Fatal(err)
		}
		put(h, "west", "kept")
		put(h, "east", "a")
		put(h, "east", "b")
		// north left only a join token and a CA rotation request.
		tok, _ := json.Marshal(tokenRecord{Site: "north", SecretHash: "x", Expires: time.Now().Add(time.Hour)})
		rot, _ := proto.Marshal(federation.RotationResource(&meshfedv1.CARotation{Site: "north"}))
		if err := h.store.Apply(context.Background(),
			store.Op{Key: keyTokens + "north-token", Value: tok},
			store.Op{Key: keyResource + federation.RotationKey("north"), Value: rot}); err != nil {
			t.Fatal(err)
		}
	})
	h := RunForTest(t, Options{DataDir: dir})
	var keys []string
	for _, prefix := range []string{keyResource, keyTokens} {
		kvs, err := h.store.List(context.Background(), prefix)
		if err != nil {
			t.Fatal(err)
		}
		for _, kv := range kvs {
			if strings.Contains(kv.Key, "east") || strings.Contains(kv.Key, "north") {
				keys = append(keys, kv.Key)
			}
		}
	}
	if len(keys) > 0 {
		t.Errorf("after a start the store still holds the removed sites' %v", keys)
	}
	if _, err := h.store.Get(context.Background(), keyResource+federation.ServiceKey("west", "default", "kept")); err != nil {
		t.Errorf("west's service, a registered site's, is gone after a start: %v", err)
	}
	if _, ok := h.table.Get(federation.RotationKey("north")); ok {
		t.Error("the removed site's CA rotation request is published")
	}
}

// TestSweepTokens_deletesOnlyLongExpired: a token record goes a day after
// its token expired, used or not; until then a replay is told why it is
// refused, and a live token is untouched.
func TestSweepTokens_deletesOnlyLongExpired(t *testing.T) {
	h := RunForTest(t, Options{})
	ctx := context.Background()
	admin := &adminServer{h: h}
	if _, err := admin.AddSite(ctx, &meshfedv1.AddSiteRequest{Site: &meshfedv1.Site{Name: "east", Kind: "docker"}}); err != nil {
		t.Fatal(err)
	}
	mint := func(expired time.Duration) string {
		t.Helper()
		r, err := admin.CreateToken(ctx, &meshfedv1.CreateTokenRequest{Site: "east"})
		if err != nil {
			t.Fatal(err)
		}
		if expired > 0 {
			tok, _ := credential.ParseToken(r.GetToken())
			if err := h.store.Update(ctx, keyTokens+tok.ID, func(cur []byte) ([]byte, error) {
				var rec tokenRecord
				if err := json.Unmarshal(cur, &rec); err != nil {
					return nil, err
				}
				rec.Expires = time.Now().Add(-expired)
				return json.Marshal(rec)
			}); err != nil {
				t.Fatal(err)
			}
		}
		return r.GetToken()
	}
	old, recent, live := mint(keepTokensAfterExpiry+time.Minute), mint(time.Hour), mint(0)
	n, err := h.sweepTokens(ctx, time.Now())
	if err != nil || n != 1 {
		t.Fatalf("sweep = %d, %v; want the one token that expired over a day ago", n, err)
	}
	for _, c := range []struct{ tok, refusal string }{{old, "not known"}, {recent, "expired at"}, {live, ""}} {
		_, _, err := h.redeem(ctx, c.tok, "east", false)
		switch {
		case c.refusal == "" && err != nil:
			t.Errorf("a live token after the sweep: %v", err)
		case c.refusal != "" && (err == nil || !strings.Contains(err.Error(), c.refusal)):
			t.Errorf("redeeming a token that expired earlier = %v; want a refusal saying %q", err, c.refusal)
		}
	}
}
