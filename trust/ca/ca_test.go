package ca

import (
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// TestRenewAt: a certificate is renewed halfway through its life from its
// issue, for short lives too, whose backdated NotBefore lies further back
// than half of them.
func TestRenewAt(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("renew.test")
	c, err := New(td, "test CA", 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	key, err := NewKey()
	if err != nil {
		t.Fatal(err)
	}
	for _, ttl := range []time.Duration{4 * time.Second, time.Minute, time.Hour} {
		issued := time.Now()
		cert, err := c.Sign(Leaf{ID: spiffeid.RequireFromPath(td, "/w"), Key: key.Public(), TTL: ttl})
		if err != nil {
			t.Fatal(err)
		}
		// NotAfter has whole seconds: the life is ttl give or take one.
		at := RenewAt(cert).Sub(issued)
		if at < ttl/2-time.Second || at > ttl/2+time.Second {
			t.Errorf("a certificate for %v is renewed %v after its issue; want about %v", ttl, at, ttl/2)
		}
	}
}
