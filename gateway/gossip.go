package gateway

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"

	"github.com/meshfed/meshfed/gossip"
)

// offerGossip hands the SDS secret "gossip" (the WAN pool's keyring and
// seeds, JSON) to runGossip when it changes; only the newest waits.
func (g *Gateway) offerGossip(raw []byte) {
	if raw == nil || g.o.GossipListen == "" || bytes.Equal(raw, g.lastGossip) {
		return
	}
	g.lastGossip = raw
	var s gossip.Secret
	if err := json.Unmarshal(raw, &s); err != nil {
		g.log.Error("the spoke sent a gossip secret that does not decode", "err", err)
		return
	}
	select {
	case <-g.gossip: // an older one, not taken yet
	default:
	}
	g.gossip <- s
}

// runGossip joins the pool with the first keyring the spoke sends and
// follows later ones; it leaves the pool when ctx ends.
func (g *Gateway) runGossip(ctx context.Context) error {
	var s gossip.Secret
	select {
	case <-ctx.Done():
		return nil
	case s = <-g.gossip:
	}
	pool, err := gossip.New(gossip.Options{
		Name: g.o.Site + "/gateway/" + cmp.Or(g.o.GossipAdvertise, g.o.GossipListen), Site: g.o.Site, Role: gossip.RoleGateway,
		Bind: g.o.GossipListen, Advertise: g.o.GossipAdvertise, ProbeInterval: g.o.GossipProbeInterval, Keys: s.Keyring, Logger: g.o.Logger,
	})
	if err != nil {
		// Not fatal: the gateway serves on, and other sites find its
		// death by connecting.
		g.log.Error("could not join the gossip pool", "err", err)
		return nil
	}
	pool.SetSeeds(s.Seeds)
	g.log.Info("in the WAN gossip pool", "addr", pool.Addr(), "seeds", len(s.Seeds))
	done := make(chan error, 1)
	go func() { done <- pool.Run(ctx) }()
	for {
		select {
		case err := <-done:
			return err
		case s := <-g.gossip:
			pool.SetSeeds(s.Seeds)
			if err := pool.SetKeys(s.Keyring); err != nil {
				g.log.Error("could not apply the gossip keyring", "err", err)
			}
		}
	}
}
