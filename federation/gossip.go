package federation

import (
	"context"
	"log/slog"
	"time"

	meshfedv1 "github.com/meshfed/meshfed/api/meshfed/v1"
	"github.com/meshfed/meshfed/gossip"
)

// KeyringFromWire converts the wire keyring for a gossip pool.
func KeyringFromWire(k *meshfedv1.GossipKeyring) gossip.Keyring {
	return gossip.Keyring{Keys: k.GetKeys(), UseNewestAfter: k.GetUseNewestAfter().AsTime()}
}

// GossipSeeds are the spokes' gossip addresses from the status records in
// t, but for site's own.
func GossipSeeds(t *Table, site string) []string {
	var out []string
	for _, r := range t.List("status/") {
		if st := r.GetSourceStatus(); st.GetSite() != site {
			out = append(out, st.GetGossipAddresses()...)
		}
	}
	return out
}

// RunGossip runs pool until ctx ends, keeping its seeds and keyring in step
// with t (a hub's table or a spoke's view), site's own seeds left out.
func RunGossip(ctx context.Context, pool *gossip.Pool, t *Table, site string, log *slog.Logger) error {
	done := make(chan error, 1)
	go func() { done <- pool.Run(ctx) }()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		pool.SetSeeds(GossipSeeds(t, site))
		if r, ok := t.Get(GossipKeyringKey); ok {
			if err := pool.SetKeys(KeyringFromWire(r.GetGossipKeyring())); err != nil {
				log.Error("could not apply the gossip keyring", "err", err)
			}
		}
		select {
		case err := <-done:
			return err
		case <-tick.C:
		}
	}
}
