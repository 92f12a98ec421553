// Package upstream holds the data plane's view of its clusters: per
// endpoint, outlier detection's state, and the choice of endpoint the way
// Envoy makes it (priorities, health, weights), with the retries of
// connect failures the proxy and the gateway both make.
package upstream

import (
	"math/rand/v2"
	"slices"
	"sync"
	"time"

	"github.com/meshfed/meshfed/dataplane/xdsclient"
)

// Upstream is one cluster's live state: its configuration and, per
// endpoint, outlier detection's counters. It survives configuration
// pushes, so an ejected endpoint stays ejected.
type Upstream struct {
	mu    sync.Mutex
	conf  *xdsclient.Cluster
	hosts map[string]*hostState
	// ejected is called when an endpoint is ejected.
	ejected func(c *xdsclient.Cluster, e xdsclient.Endpoint)
}

type hostState struct {
	consecutive  uint32
	ejectedUntil time.Time
	ejections    int
}

// Key identifies e in outlier state.
func Key(e xdsclient.Endpoint) string { return e.Key }

// Tried holds the host keys a connection has tried, a few at most: a
// slice costs less to make than a map.
type Tried []string

func (t Tried) has(key string) bool { return slices.Contains(t, key) }

// Add records key as tried.
func (t *Tried) Add(key string) { *t = append(*t, key) }

// Remove forgets key (an attempt that was not the endpoint's fault).
func (t *Tried) Remove(key string) {
	*t = slices.DeleteFunc(*t, func(k string) bool { return k == key })
}

func (u *Upstream) setConf(c *xdsclient.Cluster) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.conf = c
	keep := map[string]bool{}
	for _, p := range c.Priorities {
		for _, e := range p {
			keep[Key(e)] = true
		}
	}
	for k := range u.hosts {
		if !keep[k] {
			delete(u.hosts, k)
		}
	}
}

// Config is the cluster's configuration now.
func (u *Upstream) Config() *xdsclient.Cluster {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.conf
}

func (u *Upstream) host(e xdsclient.Endpoint) *hostState {
	k := Key(e)
	h := u.hosts[k]
	if h == nil {
		h = &hostState{}
		u.hosts[k] = h
	}
	return h
}

// Pick chooses an endpoint the way Envoy does: each priority takes the
// share of traffic its health allows (healthy fraction times the
// overprovisioning factor), the rest spills to the next; within a priority,
// weighted random among usable endpoints. Endpoints in tried are skipped.
// With no usable endpoint anywhere, any untried one is used (panic mode).
func (u *Upstream) Pick(tried Tried, now time.Time) (xdsclient.Endpoint, bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	c := u.conf
	usable := func(e xdsclient.Endpoint) bool {
		if tried.has(Key(e)) || !e.Healthy {
			return false
		}
		h := u.hosts[Key(e)]
		return h == nil || !now.Before(h.ejectedUntil)
	}
	health := make([]float64, len(c.Priorities))
	sum := 0.0
	for i, p := range c.Priorities {
		if len(p) == 0 {
			continue
		}
		n := 0
		for _, e := range p {
			if usable(e) {
				n++
			}
		}
		health[i] = min(100, float64(c.OPF)/100*100*float64(n)/float64(len(p)))
		sum += health[i]
	}
	if sum > 0 {
		// Loads: each priority takes what its health allows of what is left;
		// when all together fall short of 100, they are scaled up.
		loads := make([]float64, len(health))
		left := 100.0
		for i, h := range health {
			loads[i] = min(left, h*max(1, 100/sum))
			left -= loads[i]
		}
		r := rand.Float64() * (100 - max(left, 0))
		for i, l := range loads {
			if r < l || i == len(loads)-1 {
				if e, ok := weighted(c.Priorities[i], usable); ok {
					return e, true
				}
			}
			r -= l
		}
		for i := range c.Priorities {
			if e, ok := weighted(c.Priorities[i], usable); ok {
				return e, true
			}
		}
	}
	for _, p := range c.Priorities {
		if e, ok := weighted(p, func(e xdsclient.Endpoint) bool { return !tried.has(Key(e)) }); ok {
			return e, true
		}
	}
	return xdsclient.Endpoint{}, false
}

func weighted(eps []xdsclient.Endpoint, ok func(xdsclient.Endpoint) bool) (xdsclient.Endpoint, bool) {
	total := uint32(0)
	for _, e := range eps {
		if ok(e) {
			total += e.Weight
		}
	}
	if total == 0 {
		return xdsclient.Endpoint{}, false
	}
	r := rand.Uint32N(total)
	for _, e := range eps {
		if !ok(e) {
			continue
		}
		if r < e.Weight {
			return e, true
		}
		r -= e.Weight
	}
	return xdsclient.Endpoint{}, false
}

// result records a connection attempt for outlier detection: consecutive
// failures eject the endpoint for the base ejection time times the number
// of its ejections, while fewer than the maximum share are ejected.
func (u *Upstream) result(e xdsclient.Endpoint, ok bool, now time.Time) {
	u.mu.Lock()
	c := u.conf
	h := u.host(e)
	if ok {
		h.consecutive = 0
		u.mu.Unlock()
		return
	}
	h.consecutive++
	eject := false
	if c.Outlier.Consecutive > 0 && h.consecutive >= c.Outlier.Consecutive && !now.Before(h.ejectedUntil) {
		total, ejected := 0, 0
		for _, p := range c.Priorities {
			for _, x := range p {
				total++
				if hs := u.hosts[Key(x)]; hs != nil && now.Before(hs.ejectedUntil) {
					ejected++
				}
			}
		}
		// Envoy ejects at least one endpoint whatever the percentage.
		if ejected == 0 || float64(ejected+1)*100 <= float64(c.Outlier.MaxPercent)*float64(total) {
			h.ejections++
			h.ejectedUntil = now.Add(c.Outlier.BaseEjection * time.Duration(h.ejections))
			h.consecutive = 0
			eject = true
		}
	}
	u.mu.Unlock()
	if eject && u.ejected != nil {
		u.ejected(c, e)
	}
}
