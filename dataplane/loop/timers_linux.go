package loop

import "time"

type timer struct {
	at  time.Time
	c   *loopConn
	gen int
	// redial: the caller waited for a descriptor; try to connect again.
	redial bool
}

// timers is a min-heap by deadline; stale ones are dropped when they come
// up. Its own push and pop spare container/heap's boxing of each timer in
// an interface value, an allocation apiece.
type timers []timer

func (t *timers) push(x timer) {
	h := append(*t, x)
	for i := len(h) - 1; i > 0; {
		up := (i - 1) / 2
		if !h[i].at.Before(h[up].at) {
			break
		}
		h[i], h[up] = h[up], h[i]
		i = up
	}
	*t = h
}

func (t *timers) pop() timer {
	h := *t
	top, last := h[0], len(h)-1
	h[0], h[last] = h[last], timer{}
	h = h[:last]
	for i := 0; ; {
		low := 2*i + 1
		if low >= len(h) {
			break
		}
		if low+1 < len(h) && h[low+1].at.Before(h[low].at) {
			low++
		}
		if !h[low].at.Before(h[i].at) {
			break
		}
		h[i], h[low] = h[low], h[i]
		i = low
	}
	*t = h
	return top
}

// next is the earliest deadline still in force.
func (t *timers) next() (time.Time, bool) {
	for len(*t) > 0 {
		top := (*t)[0]
		if top.gen == top.c.gen && (top.c.state == readingHello || top.c.state == connecting) {
			return top.at, true
		}
		t.pop()
	}
	return time.Time{}, false
}
