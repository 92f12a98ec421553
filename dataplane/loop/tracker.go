package loop

import (
	"io"
	"sync"
	"time"
)

// Tracker holds a node's live connections, so that a drain can wait for
// them to finish and, past its deadline, close them. The zero value is
// ready to use.
type Tracker struct {
	mu   sync.Mutex
	wg   sync.WaitGroup
	live map[io.Closer]struct{}
}

// Add counts c as live.
func (t *Tracker) Add(c io.Closer) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.live == nil {
		t.live = map[io.Closer]struct{}{}
	}
	t.wg.Add(1)
	t.live[c] = struct{}{}
}

// Done closes c and counts it no longer live.
func (t *Tracker) Done(c io.Closer) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.live, c)
	c.Close()
	t.wg.Done()
}

// Drain waits for the live connections to finish, up to timeout; then it
// closes those left, waits for them to end, and says how many it closed.
func (t *Tracker) Drain(timeout time.Duration) int {
	done := make(chan struct{})
	go func() { t.wg.Wait(); close(done) }()
	select {
	case <-done:
		return 0
	case <-time.After(timeout):
	}
	t.mu.Lock()
	n := len(t.live)
	for c := range t.live {
		c.Close()
	}
	t.mu.Unlock()
	<-done
	return n
}

// Track runs serve(c) with c counted live, and closes c after.
func (t *Tracker) Track(c io.Closer, serve func()) {
	t.Add(c)
	defer t.Done(c)
	serve()
}
