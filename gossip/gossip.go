// Package gossip is meshfed's WAN gossip pool (hashicorp/memberlist): the
// spokes and gateways of every site, and the hub, encrypted with the keyring
// the hub distributes. Members tell each other within about a second when a
// site's gateway stops answering, with or without the hub.
package gossip

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
)

// Member roles.
const (
	RoleSpoke   = "spoke"
	RoleGateway = "gateway"
	RoleHub     = "hub"
)

// Site states in the pool's view.
const (
	StateAlive   = "alive"
	StateSuspect = "suspect"
	StateDead    = "dead"
	StateUnknown = "unknown"
)

// Options configures a Pool.
type Options struct {
	// Name is unique in the pool, for example "east/gateway/10.0.0.7:15443".
	Name string
	Site string
	Role string
	// Bind is the UDP and TCP address (host:port). Required.
	Bind string
	// Advertise is the address others reach this member at; default Bind.
	Advertise string
	// Keys are the keyring, oldest first; see Keyring.
	Keys Keyring
	// ProbeInterval sets how fast failures are found (default
	// DefaultProbeInterval; a dead member is suspected after its next
	// failed probe). A probe times out after three quarters of it, so it
	// must be at least twice the largest round trip between members.
	ProbeInterval time.Duration
	// OnChange is called (from one goroutine) when a site's state changes.
	OnChange func()
	Logger   *slog.Logger
}

// Secret is what a member needs to join the pool: the keyring and the
// seeds. Spokes send it to their gateways as the SDS generic secret
// "gossip", in JSON.
type Secret struct {
	Keyring Keyring  `json:"keyring"`
	Seeds   []string `json:"seeds"`
}

// Keyring is the pool's encryption keys, oldest first: the newest becomes
// the one that encrypts after UseNewestAfter; until then the one before it
// does, so every member can install a new key before anyone needs it.
type Keyring struct {
	Keys           [][]byte
	UseNewestAfter time.Time
}

func (k Keyring) primary(now time.Time) []byte {
	if len(k.Keys) == 0 {
		return nil
	}
	if len(k.Keys) > 1 && now.Before(k.UseNewestAfter) {
		return k.Keys[len(k.Keys)-2]
	}
	return k.Keys[len(k.Keys)-1]
}

type meta struct {
	Site string `json:"site"`
	Role string `json:"role"`
}

// Pool is this process's membership.
type Pool struct {
	o    Options
	log  *slog.Logger
	ml   *memberlist.Memberlist
	ring *memberlist.Keyring

	mu      sync.Mutex
	keys    Keyring
	seeds   []string
	seen    map[string]meta // every member ever seen, by name
	states  map[string]string
	primary []byte
	down    bool
	events  chan memberlist.NodeEvent
}

// kill stops the member without telling the pool, as a crash would.
func (p *Pool) kill() {
	p.mu.Lock()
	defer p.mu.Unlock()
	_ = p.ml.Shutdown()
	p.down = true
}

// DefaultProbeInterval suits round trips up to about 50 ms between
// sites; MinProbeInterval is the shortest allowed.
const (
	DefaultProbeInterval = 100 * time.Millisecond
	MinProbeInterval     = 10 * time.Millisecond
)

// New binds the pool's address and starts the member (not yet joined).
func New(o Options) (*Pool, error) {
	if o.ProbeInterval == 0 {
		o.ProbeInterval = DefaultProbeInterval
	}
	if o.ProbeInterval < MinProbeInterval {
		return nil, fmt.Errorf("gossip: probe interval %s is too short: at least %s", o.ProbeInterval, MinProbeInterval)
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if len(o.Keys.Keys) == 0 {
		return nil, fmt.Errorf("gossip: no key: the hub has not sent the gossip keyring yet")
	}
	host, portStr, err := net.SplitHostPort(o.Bind)
	if err != nil {
		return nil, fmt.Errorf("gossip: bind address %q: %w", o.Bind, err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		return nil, fmt.Errorf("gossip: bind port %q: %w", portStr, err)
	}
	p := &Pool{o: o, log: o.Logger.With("component", "gossip"), seen: map[string]meta{}, states: map[string]string{}, events: make(chan memberlist.NodeEvent, 256)}
	c := memberlist.DefaultLANConfig()
	c.Name = o.Name
	c.BindAddr, c.BindPort = host, port
	c.AdvertiseAddr, c.AdvertisePort = host, port
	if o.Advertise != "" {
		ah, ap, err := net.SplitHostPort(o.Advertise)
		if err != nil {
			return nil, fmt.Errorf("gossip: advertise address %q: %w", o.Advertise, err)
		}
		c.AdvertiseAddr = ah
		if c.AdvertisePort, err = strconv.Atoi(ap); err != nil {
			return nil, fmt.Errorf("gossip: advertise port %q: %w", ap, err)
		}
	}
	c.ProbeInterval = o.ProbeInterval
	c.ProbeTimeout = o.ProbeInterval * 3 / 4
	c.SuspicionMult = 3
	c.GossipInterval = o.ProbeInterval / 2
	c.PushPullInterval = 10 * time.Second
	c.TCPTimeout = 2 * time.Second
	c.AwarenessMaxMultiplier = 2
	c.Logger = slog.NewLogLogger(p.log.Handler(), slog.LevelDebug)
	mb, _ := json.Marshal(meta{Site: o.Site, Role: o.Role})
	c.Delegate = metaDelegate(mb)
	// Members learnt of only as they leave or die still count as seen, so
	// their site shows as dead rather than unknown.
	c.Events = &memberlist.ChannelEventDelegate{Ch: p.events}
	p.keys = o.Keys
	p.primary = o.Keys.primary(time.Now())
	if c.Keyring, err = memberlist.NewKeyring(o.Keys.Keys, p.primary); err != nil {
		return nil, fmt.Errorf("gossip: keyring: %w", err)
	}
	p.ring = c.Keyring
	c.GossipVerifyIncoming, c.GossipVerifyOutgoing = true, true
	if p.ml, err = memberlist.Create(c); err != nil {
		return nil, fmt.Errorf("gossip: listen %s: %w", o.Bind, err)
	}
	return p, nil
}

// Addr is the advertised address.
func (p *Pool) Addr() string {
	n := p.ml.LocalNode()
	return net.JoinHostPort(n.Addr.String(), strconv.Itoa(int(n.Port)))
}

// SetSeeds sets the addresses to join through (others' gossip addresses).
func (p *Pool) SetSeeds(seeds []string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.seeds = seeds
}

// SetKeys installs a new keyring: new keys are added, the primary follows
// the keyring's schedule, keys no longer listed are removed.
func (p *Pool) SetKeys(k Keyring) error {
	if len(k.Keys) == 0 {
		return nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if k.UseNewestAfter.Equal(p.keys.UseNewestAfter) && slices.EqualFunc(k.Keys, p.keys.Keys, bytes.Equal) {
		return nil
	}
	p.keys = k
	for _, key := range k.Keys {
		if err := p.ring.AddKey(key); err != nil {
			return fmt.Errorf("gossip: add key: %w", err)
		}
	}
	// The primary must be in the ring before the keys it replaces leave.
	if err := p.followScheduleLocked(time.Now()); err != nil {
		return err
	}
	for _, key := range p.ring.GetKeys() {
		if !slices.ContainsFunc(k.Keys, func(b []byte) bool { return bytes.Equal(b, key) }) {
			_ = p.ring.RemoveKey(key)
		}
	}
	return nil
}

// followScheduleLocked encrypts with the key the keyring's schedule names
// for now.
func (p *Pool) followScheduleLocked(now time.Time) error {
	primary := p.keys.primary(now)
	if bytes.Equal(primary, p.primary) {
		return nil
	}
	if err := p.ring.UseKey(primary); err != nil {
		return fmt.Errorf("gossip: use key: %w", err)
	}
	p.primary = primary
	p.log.Info("gossip encrypts with a new key")
	return nil
}

// Run keeps the member in the pool (joining the seeds while it is alone),
// follows the keyring's schedule and watches member states, until ctx
// ends; then it leaves the pool.
func (p *Pool) Run(ctx context.Context) error {
	defer func() {
		p.mu.Lock()
		defer p.mu.Unlock()
		if !p.down {
			_ = p.ml.Leave(time.Second)
			_ = p.ml.Shutdown()
			p.down = true
		}
	}()
	t := time.NewTicker(p.o.ProbeInterval / 2)
	defer t.Stop()
	var lastJoin time.Time
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		case e := <-p.events:
			var m meta
			if json.Unmarshal(e.Node.Meta, &m) == nil {
				p.mu.Lock()
				p.seen[e.Node.Name] = m
				p.mu.Unlock()
			}
			continue
		}
		now := time.Now()
		p.mu.Lock()
		seeds := p.seeds
		if err := p.followScheduleLocked(now); err != nil {
			p.log.Error("could not apply the gossip keyring", "err", err)
		}
		p.mu.Unlock()
		if p.ml.NumMembers() <= 1 && len(seeds) > 0 && now.Sub(lastJoin) > time.Second {
			lastJoin = now
			if n, err := p.ml.Join(seeds); err != nil && n == 0 {
				p.log.Debug("could not join the gossip pool yet", "seeds", seeds, "err", err)
			} else {
				p.log.Info("joined the gossip pool", "via", n, "members", p.ml.NumMembers())
			}
		}
		if p.observe() && p.o.OnChange != nil {
			p.o.OnChange()
		}
	}
}

// observe updates the site states from the member list and reports
// whether any changed.
func (p *Pool) observe() bool {
	members := p.ml.Members()
	p.mu.Lock()
	defer p.mu.Unlock()
	current := make(map[string]memberlist.NodeStateType, len(members))
	for _, n := range members {
		// A member's name carries its site and role, so its metadata is
		// decoded once.
		if _, ok := p.seen[n.Name]; !ok {
			var m meta
			if json.Unmarshal(n.Meta, &m) != nil {
				continue
			}
			p.seen[n.Name] = m
		}
		current[n.Name] = n.State
	}
	states := map[string]string{}
	for name, m := range p.seen {
		if m.Role != RoleGateway {
			continue
		}
		st := StateDead
		if s, ok := current[name]; ok {
			st = StateSuspect
			if s == memberlist.StateAlive {
				st = StateAlive
			}
		}
		states[m.Site] = better(states[m.Site], st)
	}
	changed := len(states) != len(p.states)
	for site, st := range states {
		if p.states[site] != st {
			changed = true
			p.log.Info("site gateway state", "site", site, "state", st)
		}
	}
	p.states = states
	return changed
}

// stateRank orders gateway states from worst to best.
var stateRank = map[string]int{"": 0, StateDead: 1, StateSuspect: 2, StateAlive: 3}

// better is the best of a site's gateway states: alive if any is alive.
func better(a, b string) string {
	if stateRank[b] > stateRank[a] {
		return b
	}
	return a
}

// SiteStates is each site's state by its gateways: alive while any of its
// gateways is, suspect while the best one is suspected, dead once none is
// left. Sites whose gateways never joined are missing.
func (p *Pool) SiteStates() map[string]string {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make(map[string]string, len(p.states))
	for k, v := range p.states {
		out[k] = v
	}
	return out
}

// Down is the set of sites with no live gateway (suspect counts as down:
// a failed probe is the first sign of a dead site, and failing back costs
// one probe interval).
func (p *Pool) Down() map[string]bool {
	out := map[string]bool{}
	for site, st := range p.SiteStates() {
		if st != StateAlive {
			out[site] = true
		}
	}
	return out
}

// Members lists the members this process knows, sorted by name.
func (p *Pool) Members() []string {
	var out []string
	for _, n := range p.ml.Members() {
		out = append(out, n.Name)
	}
	sort.Strings(out)
	return out
}

type metaDelegate []byte

func (d metaDelegate) NodeMeta(int) []byte             { return d }
func (d metaDelegate) NotifyMsg([]byte)                {}
func (d metaDelegate) GetBroadcasts(int, int) [][]byte { return nil }
func (d metaDelegate) LocalState(bool) []byte          { return nil }
func (d metaDelegate) MergeRemoteState([]byte, bool)   {}
