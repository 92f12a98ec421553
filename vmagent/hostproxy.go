package vmagent

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/docker/docker/api/types/network"
	"github.com/meshfed/meshfed/atomicfile"
	"github.com/meshfed/meshfed/dataplane/servicedns"
	"github.com/meshfed/meshfed/proxy"
	"github.com/prometheus/client_golang/prometheus"
)

// hostProxy is the host's data plane: a meshfed proxy per workload
// identity the host's containers run, each with that workload's SVID.
//
//   - inbound: each exported container is an endpoint at the host's
//     address (Options.ProxyAddress) on a port of its own
//     (Options.InboundPorts); the workload's proxy terminates mTLS there,
//     checks the caller's SPIFFE ID against the service's policy and
//     passes the bytes to the container's app on its Docker network;
//   - outbound: each workload's listeners are on a /24 of its own out of
//     Options.OutboundPrefix, a range the agent makes local to the host
//     (a local route on lo), so containers reach them through their
//     network's gateway without host networking; a listener admits only
//     its workload's containers;
//   - DNS on the Docker network's gateway: a container's query for
//     <name>.<namespace>.svc.clusterset.local is answered with its own
//     workload's listener (by the query's source address), other names
//     are forwarded.
type hostProxy struct {
	a         *Agent
	log       *slog.Logger
	address   string
	prefix    netip.Prefix
	statePath string
	dns       *servicedns.Server
	kick      chan struct{}

	mu       sync.Mutex
	state    proxyState
	want     map[string]*workload      // by SPIFFE ID
	bySource map[netip.Addr]string     // container address → SPIFFE ID
	running  map[string]*workloadProxy // by SPIFFE ID
}

// proxyState is kept in the data dir (hostproxy.json), so a restarted
// agent gives each container and workload the ports and addresses it had.
type proxyState struct {
	Inbound  map[string]uint32 `json:"inbound"`  // container ID → endpoint port
	Outbound map[string]string `json:"outbound"` // SPIFFE ID → its /24
	// Route is the outbound range while this agent's local route for it
	// is in place.
	Route string `json:"route,omitempty"`
}

// workload is what the host runs of one identity.
type workload struct {
	inbound map[uint32]string // endpoint port → the app's address
	sources map[netip.Addr]bool
}

type workloadProxy struct {
	p       *proxy.Proxy
	inbound map[uint32]string
	sources atomic.Pointer[map[netip.Addr]bool]
	cancel  context.CancelFunc
	done    chan struct{}
}

// slotBits is the size of a workload's outbound range: a /24, 254
// service addresses.
const slotBits = 24

func newHostProxy(ctx context.Context, a *Agent) (*hostProxy, error) {
	o := a.o
	if !o.OutboundPrefix.IsValid() || !o.OutboundPrefix.Addr().Is4() || o.OutboundPrefix.Bits() > slotBits {
		return nil, fmt.Errorf("vmagent: --outbound-prefix %s: want an IPv4 range of at least a /%d (a /%d per workload), such as 198.18.0.0/16", o.OutboundPrefix, slotBits, slotBits)
	}
	if o.InboundPorts[0] == 0 || o.InboundPorts[1] < o.InboundPorts[0] {
		return nil, fmt.Errorf("vmagent: --inbound-ports %d-%d: want a range such as 16000-16999", o.InboundPorts[0], o.InboundPorts[1])
	}
	h := &hostProxy{
		a: a, log: a.log.With("component", "host-proxy"), prefix: o.OutboundPrefix.Masked(),
		statePath: filepath.Join(o.DataDir, "hostproxy.json"), kick: make(chan struct{}, 1),
		state:   proxyState{Inbound: map[string]uint32{}, Outbound: map[string]string{}},
		running: map[string]*workloadProxy{}, bySource: map[netip.Addr]string{},
	}
	if data, err := os.ReadFile(h.statePath); err == nil {
		if err := json.Unmarshal(data, &h.state); err != nil {
			h.log.Warn("the host proxy's kept ports do not parse; giving out new ones", "file", h.statePath, "err", err)
			h.state = proxyState{Inbound: map[string]uint32{}, Outbound: map[string]string{}}
		}
	}
	h.address = o.ProxyAddress
	if h.address == "" {
		addr, err := addressTowards(o.Spoke)
		if err != nil {
			return nil, fmt.Errorf("vmagent: the host's address for its inbound listeners: %w: give it with --proxy-address", err)
		}
		h.address = addr
	}
	listen := o.DNSListen
	if listen == "" && a.docker == nil {
		return nil, errors.New("vmagent: DNS for containers: without Docker there is no network gateway to serve it on: give --dns-listen (- for none)")
	}
	if listen == "" {
		gw, err := a.docker.gateway(ctx, o.Network)
		if err != nil {
			return nil, fmt.Errorf("vmagent: DNS for containers: %w: give an address with --dns-listen (- for none)", err)
		}
		listen = net.JoinHostPort(gw, "53")
	}
	if listen != "-" {
		var err error
		h.dns, err = servicedns.Listen(servicedns.Options{Listen: listen, Lookup: h.lookup, Logger: h.log})
		if err != nil {
			return nil, fmt.Errorf("vmagent: DNS for containers: %w: free the port or give --dns-listen", err)
		}
	}
	return h, nil
}

// addressTowards is the host's address on its route to hostport: where
// the site's gateway and proxies, on the spoke's side, reach the host.
func addressTowards(hostport string) (string, error) {
	c, err := net.Dial("udp", hostport)
	if err != nil {
		return "", err
	}
	defer c.Close()
	return c.LocalAddr().(*net.UDPAddr).IP.String(), nil
}

// gateway is the host's address on a Docker network ("" = bridge).
func (d *docker) gateway(ctx context.Context, name string) (string, error) {
	if name == "" {
		name = "bridge"
	}
	n, err := d.cli.NetworkInspect(ctx, name, network.InspectOptions{})
	if err != nil {
		return "", fmt.Errorf("Docker network %s: %w", name, err)
	}
	for _, c := range n.IPAM.Config {
		if ip, err := netip.ParseAddr(c.Gateway); err == nil && ip.Is4() {
			return c.Gateway, nil
		}
	}
	return "", fmt.Errorf("Docker network %s has no IPv4 gateway", name)
}

// DNSAddr is where containers send DNS queries (docker run --dns).
func (h *hostProxy) DNSAddr() string {
	if h.dns == nil {
		return ""
	}
	return h.dns.Addr()
}

// Run makes the outbound range local, serves DNS and keeps a proxy per
// workload in step with what the agent last reported, until ctx ends.
func (h *hostProxy) Run(ctx context.Context) error {
	added, err := addLocalRoute(h.prefix)
	if err != nil {
		return fmt.Errorf("host proxy: cannot make %s local to the host (ip route add local %s dev lo): %w: run the agent as root (or with CAP_NET_ADMIN), or with --host-proxy=false", h.prefix, h.prefix, err)
	}
	h.mu.Lock()
	// A route that was there is this agent's if its last run added it
	// and could not remove it (it was killed).
	owned := added || h.state.Route == h.prefix.String()
	if added {
		h.state.Route = h.prefix.String()
		h.save()
	}
	h.mu.Unlock()
	if owned {
		defer func() {
			if err := delLocalRoute(h.prefix); err != nil {
				h.log.Warn("could not remove the outbound range's local route", "prefix", h.prefix, "err", err)
			}
			h.mu.Lock()
			h.state.Route = ""
			h.save()
			h.mu.Unlock()
		}()
	}
	var wg sync.WaitGroup
	if h.dns != nil {
		wg.Go(func() {
			if err := h.dns.Run(ctx); err != nil {
				h.log.Error("DNS stopped", "err", err)
			}
		})
	}
	h.log.Info("host proxy running", "inbound_address", h.address, "outbound_prefix", h.prefix, "dns", h.DNSAddr())
	if h.dns != nil {
		host, _, _ := net.SplitHostPort(h.DNSAddr())
		h.log.Info("containers resolve <name>.<namespace>.svc.clusterset.local when started with: docker run --dns " + host)
	}
	retry := time.NewTimer(time.Hour)
	defer retry.Stop()
	for {
		if h.reconcile(ctx) {
			retry.Reset(2 * time.Second)
		}
		select {
		case <-ctx.Done():
			h.stopAll()
			wg.Wait()
			return nil
		case <-h.kick:
		case <-retry.C:
		}
	}
}

// poke asks for a reconcile: after a report, the spoke knows the
// endpoints the workload SVIDs are issued for.
func (h *hostProxy) poke() {
	select {
	case h.kick <- struct{}{}:
	default:
	}
}

// reconcile starts, changes and stops proxies to match h.want; true when
// a start failed and is to be tried again.
func (h *hostProxy) reconcile(ctx context.Context) (retry bool) {
	h.mu.Lock()
	want := h.want
	var stop []*workloadProxy
	for id, wp := range h.running {
		if _, ok := want[id]; !ok {
			stop = append(stop, wp)
			delete(h.running, id)
		}
	}
	h.mu.Unlock()
	for _, wp := range stop {
		wp.cancel()
		<-wp.done
	}
	for id, w := range want {
		h.mu.Lock()
		wp := h.running[id]
		h.mu.Unlock()
		if wp != nil {
			wp.sources.Store(&w.sources)
			if !maps.Equal(wp.inbound, w.inbound) {
				wp.inbound = w.inbound
				wp.p.SetInbound(w.inbound)
			}
			continue
		}
		wp, err := h.start(ctx, id, w)
		if err != nil {
			if ctx.Err() == nil {
				h.log.Error("could not start a workload's proxy; retrying", "workload", id, "err", err)
			}
			retry = true
			continue
		}
		h.mu.Lock()
		h.running[id] = wp
		h.mu.Unlock()
	}
	return retry
}

func (h *hostProxy) start(ctx context.Context, id string, w *workload) (*workloadProxy, error) {
	svid, err := h.a.id.Workload(ctx, id)
	if err != nil {
		return nil, err
	}
	slot, err := h.slot(id)
	if err != nil {
		return nil, err
	}
	wp := &workloadProxy{inbound: w.inbound, done: make(chan struct{})}
	wp.sources.Store(&w.sources)
	o := proxy.DefaultOptions()
	o.XDS, o.Identity, o.Address, o.Inbound, o.OutboundPrefix = h.a.o.XDS, svid, h.address, w.inbound, slot.String()
	o.HTTPListen, o.Loops, o.DrainTimeout = "-", 1, 5*time.Second
	o.Logger = h.log.With("workload", id)
	// Each proxy's own metrics: one registry per proxy would clash.
	o.Registry = prometheus.NewRegistry()
	o.OutboundFrom = func(a netip.Addr) bool { return (*wp.sources.Load())[a] }
	if wp.p, err = proxy.New(o); err != nil {
		return nil, err
	}
	pctx, cancel := context.WithCancel(ctx)
	wp.cancel = cancel
	go func() {
		defer close(wp.done)
		err := wp.p.Run(pctx)
		if pctx.Err() != nil {
			return
		}
		// Ended on its own (its SVID lapsed): start it again.
		h.log.Error("a workload's proxy stopped; starting it again", "workload", id, "err", err)
		h.mu.Lock()
		if h.running[id] == wp {
			delete(h.running, id)
		}
		h.mu.Unlock()
		h.poke()
	}()
	h.log.Info("workload proxy started", "workload", id, "outbound", slot, "inbound", w.inbound)
	return wp, nil
}

func (h *hostProxy) stopAll() {
	h.mu.Lock()
	all := slices.Collect(maps.Values(h.running))
	h.running = map[string]*workloadProxy{}
	h.mu.Unlock()
	for _, wp := range all {
		wp.cancel()
	}
	for _, wp := range all {
		<-wp.done
	}
}

// lookup answers a container's query with its own workload's listener.
func (h *hostProxy) lookup(src netip.Addr, namespace, name string) (netip.Addr, bool) {
	h.mu.Lock()
	wp := h.running[h.bySource[src]]
	h.mu.Unlock()
	if wp == nil {
		return netip.Addr{}, false
	}
	return wp.p.ServiceAddr(namespace, name)
}

// inboundPort is the endpoint port of a container: the one it had, or the
// lowest free one of the range.
func (h *hostProxy) inboundPort(containerID string) (uint32, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if p, ok := h.state.Inbound[containerID]; ok {
		return p, nil
	}
	used := map[uint32]bool{}
	for _, p := range h.state.Inbound {
		used[p] = true
	}
	for p := uint32(h.a.o.InboundPorts[0]); p <= uint32(h.a.o.InboundPorts[1]); p++ {
		if !used[p] {
			h.state.Inbound[containerID] = p
			h.save()
			return p, nil
		}
	}
	return 0, fmt.Errorf("every inbound port of %d-%d is taken: widen --inbound-ports", h.a.o.InboundPorts[0], h.a.o.InboundPorts[1])
}

// setWant records what the host runs now (from the agent's last state)
// and frees the ports of containers that are gone.
func (h *hostProxy) setWant(want map[string]*workload, containers map[string]bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.want = want
	h.bySource = map[netip.Addr]string{}
	for id, w := range want {
		for a := range w.sources {
			h.bySource[a] = id
		}
	}
	changed := false
	for cid := range h.state.Inbound {
		if !containers[cid] {
			delete(h.state.Inbound, cid)
			changed = true
		}
	}
	if changed {
		h.save()
	}
}

// slot is a workload's outbound /24: the one it had, or one picked by a
// hash of its ID (the next free one on a collision), so it stays the same
// across restarts and hosts.
func (h *hostProxy) slot(id string) (netip.Prefix, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if s, ok := h.state.Outbound[id]; ok {
		if p, err := netip.ParsePrefix(s); err == nil && h.prefix.Contains(p.Addr()) && p.Bits() == slotBits {
			return p, nil
		}
	}
	n := uint32(1) << (slotBits - h.prefix.Bits())
	owner := map[netip.Prefix]string{}
	for other, s := range h.state.Outbound {
		if p, err := netip.ParsePrefix(s); err == nil {
			owner[p] = other
		}
	}
	f := fnv.New32a()
	f.Write([]byte(id))
	start := f.Sum32() % n
	base := binary.BigEndian.Uint32(h.prefix.Addr().AsSlice())
	for i := uint32(0); i < n; i++ {
		var b [4]byte
		binary.BigEndian.PutUint32(b[:], base+((start+i)%n)<<(32-slotBits))
		p := netip.PrefixFrom(netip.AddrFrom4(b), slotBits)
		// A slot is free if nobody has it, or its owner runs no more here.
		if other, taken := owner[p]; taken && h.want[other] != nil {
			continue
		} else if taken {
			delete(h.state.Outbound, other)
		}
		h.state.Outbound[id] = p.String()
		h.save()
		return p, nil
	}
	return netip.Prefix{}, errors.New("every /24 of --outbound-prefix is a running workload's: widen it")
}

// save keeps the state; h.mu is held.
func (h *hostProxy) save() {
	data, err := json.Marshal(h.state)
	if err == nil {
		err = atomicfile.Write(h.statePath, data, 0o600)
	}
	if err != nil {
		h.log.Error("could not keep the host proxy's ports; a restart may give containers new ones", "err", err)
	}
}
