package proxy

import (
	"math/rand/v2"
	"slices"
	"sync"
	"time"
)

// upstream is one cluster's live state: its configuration and, per
// endpoint, outlier detection's counters. It survives configuration
// pushes, so an ejected endpoint stays ejected.
type upstream struct {
	mu    sync.Mutex
	conf  *clusterConf
	hosts map[string]*hostState
	// ejected is called when an endpoint is ejected.
	ejected func(c *clusterConf, e endpointConf)
}

type hostState struct {
	consecutive  uint32
	ejectedUntil time.Time
	ejections    int
}

func hostKey(e endpointConf) string { return e.key }

// triedSet holds the host keys a connection has tried, a few at most: a
// slice costs less to make than a map.
type triedSet []string

func (t triedSet) has(key string) bool { return slices.Contains(t, key) }

func (t *triedSet) add(key string) { *t = append(*t, key) }

func (t *triedSet) remove(key string) {
	*t = slices.DeleteFunc(*t, func(k string) bool { return k == key })
}

func (u *upstream) setConf(c *clusterConf) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.conf = c
	keep := map[string]bool{}
	for _, p := range c.priorities {
		for _, e := range p {
			keep[hostKey(e)] = true
		}
	}
	for k := range u.hosts {
		if !keep[k] {
			delete(u.hosts, k)
		}
	}
}

func (u *upstream) config() *clusterConf {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.conf
}

func (u *upstream) host(e endpointConf) *hostState {
	k := hostKey(e)
	h := u.hosts[k]
	if h == nil {
		h = &hostState{}
		u.hosts[k] = h
	}
	return h
}

// pick chooses an endpoint the way Envoy does: each priority takes the
// share of traffic its health allows (healthy fraction times the
// overprovisioning factor), the rest spills to the next; within a priority,
// weighted random among usable endpoints. Endpoints in tried are skipped.
// With no usable endpoint anywhere, any untried one is used (panic mode).
func (u *upstream) pick(tried triedSet, now time.Time) (endpointConf, bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	c := u.conf
	usable := func(e endpointConf) bool {
		if tried.has(hostKey(e)) || !e.healthy {
			return false
		}
		h := u.hosts[hostKey(e)]
		return h == nil || !now.Before(h.ejectedUntil)
	}
	health := make([]float64, len(c.priorities))
	sum := 0.0
	for i, p := range c.priorities {
		if len(p) == 0 {
			continue
		}
		n := 0
		for _, e := range p {
			if usable(e) {
				n++
			}
		}
		health[i] = min(100, float64(c.opf)/100*100*float64(n)/float64(len(p)))
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
				if e, ok := weighted(c.priorities[i], usable); ok {
					return e, true
				}
			}
			r -= l
		}
		for i := range c.priorities {
			if e, ok := weighted(c.priorities[i], usable); ok {
				return e, true
			}
		}
	}
	for _, p := range c.priorities {
		if e, ok := weighted(p, func(e endpointConf) bool { return !tried.has(hostKey(e)) }); ok {
			return e, true
		}
	}
	return endpointConf{}, false
}

func weighted(eps []endpointConf, ok func(endpointConf) bool) (endpointConf, bool) {
	total := uint32(0)
	for _, e := range eps {
		if ok(e) {
			total += e.weight
		}
	}
	if total == 0 {
		return endpointConf{}, false
	}
	r := rand.Uint32N(total)
	for _, e := range eps {
		if !ok(e) {
			continue
		}
		if r < e.weight {
			return e, true
		}
		r -= e.weight
	}
	return endpointConf{}, false
}

// result records a connection attempt for outlier detection: consecutive
// failures eject the endpoint for the base ejection time times the number
// of its ejections, while fewer than the maximum share are ejected.
func (u *upstream) result(e endpointConf, ok bool, now time.Time) {
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
	if c.outlier.consecutive > 0 && h.consecutive >= c.outlier.consecutive && !now.Before(h.ejectedUntil) {
		total, ejected := 0, 0
		for _, p := range c.priorities {
			for _, x := range p {
				total++
				if hs := u.hosts[hostKey(x)]; hs != nil && now.Before(hs.ejectedUntil) {
					ejected++
				}
			}
		}
		// Envoy ejects at least one endpoint whatever the percentage.
		if ejected == 0 || float64(ejected+1)*100 <= float64(c.outlier.maxPercent)*float64(total) {
			h.ejections++
			h.ejectedUntil = now.Add(c.outlier.baseEjection * time.Duration(h.ejections))
			h.consecutive = 0
			eject = true
		}
	}
	u.mu.Unlock()
	if eject && u.ejected != nil {
		u.ejected(c, e)
	}
}
