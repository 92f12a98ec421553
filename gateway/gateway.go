package gateway

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"sync"
	"time"

	"github.com/meshfed/meshfed/catalog"
	"github.com/meshfed/meshfed/gossip"
	"github.com/meshfed/meshfed/proxy"
)

// Options configures a Gateway.
type Options struct {
	// Site is the gateway's site. Required.
	Site string
	// Listen is where callers from other sites connect: the address the
	// site record's gateway addresses lead to. Default ":15443".
	Listen string
	// GossipListen joins the WAN gossip pool here (UDP and TCP); empty:
	// not in the pool, so other sites learn of this gateway's failure only
	// from failed connections.
	GossipListen string
	// GossipAdvertise is where members reach it; default GossipListen.
	GossipAdvertise string
	// GossipProbeInterval is how often it probes pool members (default
	// gossip.DefaultProbeInterval).
	GossipProbeInterval time.Duration
	// Proxy carries the xDS, identity and HTTP settings.
	Proxy  proxy.Options
	Logger *slog.Logger
}

// Gateway is a running east-west gateway.
type Gateway struct {
	o   Options
	log *slog.Logger
	px  *proxy.Proxy

	mu   sync.Mutex
	ctx  context.Context
	pool *gossip.Pool
	done chan error
}

// New checks the options and prepares the gateway.
func New(o Options) (*Gateway, error) {
	if err := catalog.ValidateName("site", o.Site); err != nil {
		return nil, err
	}
	if o.Listen == "" {
		o.Listen = ":15443"
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	g := &Gateway{o: o, log: o.Logger.With("component", "gateway", "site", o.Site)}
	o.Proxy.GatewayListen = o.Listen
	o.Proxy.Logger = o.Logger
	if o.GossipListen != "" {
		o.Proxy.OnGossip = g.onGossip
	}
	var err error
	if g.px, err = proxy.New(o.Proxy); err != nil {
		return nil, err
	}
	return g, nil
}

// Run serves until ctx ends, then leaves the gossip pool and drains.
func (g *Gateway) Run(ctx context.Context) error {
	g.mu.Lock()
	g.ctx = ctx
	g.mu.Unlock()
	err := g.px.Run(ctx)
	g.mu.Lock()
	done := g.done
	g.mu.Unlock()
	if done != nil {
		err = errors.Join(err, <-done)
	}
	return err
}

// onGossip joins the pool with the first keyring the spoke sends and
// follows later ones.
func (g *Gateway) onGossip(raw []byte) {
	var s gossip.Secret
	if err := json.Unmarshal(raw, &s); err != nil {
		g.log.Error("the spoke sent a gossip secret that does not decode", "err", err)
		return
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.pool != nil {
		g.pool.SetSeeds(s.Seeds)
		if err := g.pool.SetKeys(s.Keyring); err != nil {
			g.log.Error("could not apply the gossip keyring", "err", err)
		}
		return
	}
	if g.ctx == nil {
		return
	}
	pool, err := gossip.New(gossip.Options{
		Name: g.o.Site + "/gateway/" + cmp.Or(g.o.GossipAdvertise, g.o.GossipListen), Site: g.o.Site, Role: gossip.RoleGateway,
		Bind: g.o.GossipListen, Advertise: g.o.GossipAdvertise, ProbeInterval: g.o.GossipProbeInterval, Keys: s.Keyring, Logger: g.o.Logger,
	})
	if err != nil {
		g.log.Error("could not join the gossip pool", "err", err)
		return
	}
	pool.SetSeeds(s.Seeds)
	g.pool, g.done = pool, make(chan error, 1)
	go func(ctx context.Context) { g.done <- pool.Run(ctx) }(g.ctx)
	g.log.Info("in the WAN gossip pool", "addr", pool.Addr(), "seeds", len(s.Seeds))
}
