package xds

import (
	"context"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// DefaultResolveEvery is how often host names are looked up again for
// nodes that take only IP addresses: a cloud load balancer's addresses
// change, and so do containers'.
const DefaultResolveEvery = 30 * time.Second

// resolver keeps the addresses of other sites' gateway host names, and of
// this site's endpoints', while a node that takes only IP addresses (Envoy)
// is connected. A failed lookup
// keeps the addresses from the last one that worked.
type resolver struct {
	every   time.Duration
	lookup  func(ctx context.Context, host string) ([]netip.Addr, error)
	log     *slog.Logger
	changed func()
	lookups *prometheus.CounterVec

	wake chan struct{}
	mu   sync.Mutex
	want []string // host names to keep, sorted
	have map[string][]netip.Addr
}

func newResolver(every time.Duration, log *slog.Logger, changed func()) *resolver {
	if every <= 0 {
		every = DefaultResolveEvery
	}
	return &resolver{
		every: every, log: log, changed: changed, wake: make(chan struct{}, 1), have: map[string][]netip.Addr{},
		lookup: func(ctx context.Context, host string) ([]netip.Addr, error) {
			return net.DefaultResolver.LookupNetIP(ctx, "ip", host)
		},
		lookups: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshfed_xds_gateway_lookups_total",
			Help: "DNS lookups of other sites' gateway host names and this site's endpoint host names, for nodes that take only IP addresses (Envoy), by result.",
		}, []string{"result"}),
	}
}

// resolved returns the addresses known for hosts, and asks for a lookup
// when hosts are not the ones it keeps.
func (r *resolver) resolved(hosts []string) map[string][]netip.Addr {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !slices.Equal(hosts, r.want) {
		r.want = hosts
		select {
		case r.wake <- struct{}{}:
		default:
		}
	}
	return maps.Clone(r.have)
}

// run looks the host names up when they change and every r.every.
func (r *resolver) run(ctx context.Context) {
	t := time.NewTicker(r.every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.wake:
		case <-t.C:
		}
		r.mu.Lock()
		hosts := r.want
		r.mu.Unlock()
		next := map[string][]netip.Addr{}
		for _, h := range hosts {
			lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			addrs, err := r.lookup(lctx, h)
			cancel()
			for i, a := range addrs {
				addrs[i] = a.Unmap()
			}
			sort.Slice(addrs, func(i, j int) bool { return addrs[i].Less(addrs[j]) })
			r.mu.Lock()
			old := r.have[h]
			r.mu.Unlock()
			switch {
			case err != nil || len(addrs) == 0:
				r.lookups.WithLabelValues("error").Inc()
				r.log.Warn("could not look up a host name; Envoy nodes keep its last addresses", "host", h, "addresses", len(old), "err", err)
				next[h] = old
			default:
				r.lookups.WithLabelValues("ok").Inc()
				next[h] = addrs
			}
		}
		r.mu.Lock()
		same := sameAddrs(r.have, next)
		r.have = next
		r.mu.Unlock()
		if !same {
			r.changed()
		}
	}
}

// sameAddrs: every host has the same addresses in a and b (none counts as
// not there).
func sameAddrs(a, b map[string][]netip.Addr) bool {
	for h, addrs := range a {
		if !slices.Equal(addrs, b[h]) {
			return false
		}
	}
	for h, addrs := range b {
		if !slices.Equal(addrs, a[h]) {
			return false
		}
	}
	return true
}

// hostNames are the host names (not IP addresses) a node that takes only
// IP addresses needs looked up: other sites' gateway addresses and this
// site's endpoints. Sorted.
func hostNames(c *Catalog) []string {
	seen := map[string]bool{}
	add := func(host string) {
		if _, err := netip.ParseAddr(host); err != nil && host != "" {
			seen[host] = true
		}
	}
	for name, s := range c.Sites {
		if name == c.Site {
			continue
		}
		for _, gw := range s.GatewayAddresses {
			if host, _, err := net.SplitHostPort(gw); err == nil {
				add(host)
			}
		}
	}
	for _, svc := range c.Services {
		if svc.Site == c.Site {
			for _, e := range svc.Endpoints {
				add(e.Address)
			}
		}
	}
	return slices.Sorted(maps.Keys(seen))
}
