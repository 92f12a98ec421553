package federation_test

import (
	"fmt"
	"testing"

	meshfedv1 "github.com/meshfed/meshfed/api/meshfed/v1"
	"github.com/meshfed/meshfed/federation"
)

func svc(site, name string, port uint32) *meshfedv1.Resource {
	return federation.ServiceResource(&meshfedv1.Service{Site: site, Namespace: "default", Name: name, Endpoints: []*meshfedv1.Endpoint{{Address: "10.0.0.1", Port: port}}})
}

func TestTable_superseded_updates_coalesce(t *testing.T) {
	tbl := federation.NewTable()
	sub := tbl.Subscribe(func(string) bool { return true })
	defer sub.Close()
	for i := range 1000 {
		tbl.Put(svc("east", "echo", uint32(i+1)))
	}
	keys, left := sub.Take(100)
	if len(keys) != 1 || left != 0 {
		t.Fatalf("after 1000 updates of one key: took %v, %d left; want that one key once", keys, left)
	}
	r, _ := tbl.Get(keys[0])
	if got := r.GetService().GetEndpoints()[0].GetPort(); got != 1000 {
		t.Fatalf("the subscriber sees port %d, want the last write's 1000", got)
	}
}

func TestTable_equal_content_is_not_a_change(t *testing.T) {
	tbl := federation.NewTable()
	if !tbl.Put(svc("east", "echo", 80)) {
		t.Fatal("first put reported no change")
	}
	sub := tbl.Subscribe(func(string) bool { return true })
	defer sub.Close()
	sub.Take(100)
	if tbl.Put(svc("east", "echo", 80)) {
		t.Fatal("a put of equal content reported a change")
	}
	if keys, _ := sub.Take(100); len(keys) != 0 {
		t.Fatalf("subscriber was told of %v after an equal put", keys)
	}
}

func TestTable_filter_and_batches(t *testing.T) {
	tbl := federation.NewTable()
	for i := range 250 {
		tbl.Put(svc("east", fmt.Sprintf("s%d", i), 80))
		tbl.Put(svc("west", fmt.Sprintf("s%d", i), 80))
	}
	sub := tbl.Subscribe(func(k string) bool { return federation.KeySite(k) != "west" })
	defer sub.Close()
	var total int
	for {
		keys, left := sub.Take(federation.DefaultMaxBatch)
		if len(keys) > federation.DefaultMaxBatch {
			t.Fatalf("batch of %d, want at most %d", len(keys), federation.DefaultMaxBatch)
		}
		for _, k := range keys {
			if federation.KeySite(k) == "west" {
				t.Fatalf("filtered key %s delivered", k)
			}
		}
		total += len(keys)
		if left == 0 {
			break
		}
	}
	if total != 250 {
		t.Fatalf("delivered %d keys, want east's 250", total)
	}
}

func TestCheckResource(t *testing.T) {
	good := svc("east", "echo", 80)
	tests := []struct {
		name   string
		mutate func(r *meshfedv1.Resource)
		ok     bool
	}{
		{"a resource as made is valid", func(*meshfedv1.Resource) {}, true},
		{"a stale version is refused", func(r *meshfedv1.Resource) { r.Version = svc("east", "echo", 81).Version }, false},
		{"a body under another key is refused", func(r *meshfedv1.Resource) { r.Key = "svc/west/default/echo" }, false},
		{"a resource without body is refused", func(r *meshfedv1.Resource) { r.Body = nil }, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := svc("east", "echo", 80)
			r.Version, r.Key = good.Version, good.Key
			tc.mutate(r)
			if err := federation.CheckResource(r); (err == nil) != tc.ok {
				t.Fatalf("CheckResource = %v, want ok=%v", err, tc.ok)
			}
		})
	}
}
