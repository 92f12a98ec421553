package loop

import (
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime"
	"sync"
	"time"
	"unsafe"

	"github.com/meshfed/meshfed/dataplane/upstream"
	"github.com/meshfed/meshfed/dataplane/xdsclient"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
)

// An event loop relays connections on non-blocking sockets in an
// edge-triggered epoll set, with no goroutine per connection. Moving bytes
// costs little next to waking up for them: a loop wakes once for a batch of
// ready sockets, where goroutines hand each wakeup from thread to thread
// (the gateway made about 9 futex calls per connection that way). The
// gateway runs its listeners on loops (ListenRouted); a proxy hands its
// connections to loops of its own once they are connected and past their
// TLS handshake (Relayer).

const (
	// One read, shared by every connection of a loop; a proxy's relay
	// loops read half as much, which a TLS side encrypts into eight
	// records that leave in one write (see TLSConn).
	gatewayBuffer = 256 << 10
	relayBuffer   = 128 << 10
	loopBudget    = 4 // reads per direction and turn, so no connection holds up the rest
	yieldEvery    = 5 * time.Millisecond
)

// Epoll tokens of the loop's own descriptors; sockets get the ones after.
const (
	wakeToken int32 = iota
	listenToken
	firstToken
)

type connState int

const (
	readingHello connState = iota
	connecting
	relaying
	closed
)

// loopConn is one connection a loop relays: a gateway's caller and, once
// routed, its upstream; or a proxy's two sides.
type loopConn struct {
	down, up *sock
	state    connState
	// gen changes with every state and connection attempt; timers and
	// dials from before are ignored.
	gen int
	// hello: what the caller sent before it was routed, replayed
	// upstream; borrowed: it lies in the loop's shared buffer (see
	// ownHello).
	hello         []byte
	helloBorrowed bool
	r             xdsclient.Route
	u             *upstream.Upstream
	e             xdsclient.Endpoint
	tried         upstream.Tried
	// fdWait: out of descriptors to connect upstream with, the caller
	// waits until then; zero while it has not had to.
	fdWait time.Time
	again  bool // waits in the loop's again list
	// done is closed when a proxy connection the loop relays ends (nil
	// for the gateway's own connections).
	done chan struct{}
}

// sock is one non-blocking socket and what the loop knows of it.
type sock struct {
	fd, token int32
	c         *loopConn
	// pending was read from this socket and waits for the other one;
	// borrowed: it lies in the loop's shared buffer; else, when it was
	// read there, in spare, the loop's until pending is written.
	pending  []byte
	borrowed bool
	spare    *[]byte
	// readable and writable until a call says otherwise (edge-triggered);
	// hup: the peer closed or reset, so read to the end whatever a read
	// returns.
	readable, writable, hup bool
	eof                     bool // a read returned the end of the stream
	shut                    bool // writing to it was shut down
	// tls: the socket carries TLS, read and written through it (a proxy's
	// side that it terminates or originates); buffered: crypto/tls may
	// hold data the socket no longer has; out: bytes it wrote that the
	// socket did not take yet.
	tls      *TLSConn
	buffered bool
	out      []byte
}

// eventLoop is one loop: its epoll set, sockets and connections.
type eventLoop struct {
	log   *slog.Logger
	gauge prometheus.Gauge // running loops
	// rt: a routing loop's options (nil for a relay loop).
	rt   *RouterOptions
	addr net.Addr
	ep   int
	lfd  int // -1 once no longer accepting
	wake int // eventfd that posted work rings
	// keep: the loop runs on without connections (a proxy's relay loop,
	// until the proxy stops).
	keep bool

	mu     sync.Mutex
	posted []func()
	done   bool

	// state guards what follows, and the sockets and connections: the
	// loop holds it but while it waits for events. A proxy's connection
	// goroutine takes it to hand its connection over and make the first
	// turn itself, sparing a wakeup of the loop's thread.
	state sync.Mutex

	socks  map[int32]*sock
	conns  map[*loopConn]struct{}
	timers timers
	// acceptAt: accepting paused (out of descriptors) until then;
	// acceptFailing since the first failure, until an accept succeeds.
	acceptAt      time.Time
	acceptFailing bool
	// keepP: a gateway loop, which keeps its P while it waits within
	// busyFor of lastEvent, its last event (see wait).
	keepP     bool
	lastEvent time.Time
	again     []*loopConn
	// unprobed: sockets that get keepalive probes at probeAt (see
	// probeLater).
	unprobed []*sock
	probeAt  time.Time
	token    int32
	buf      []byte
	spares   sync.Pool // of *[]byte as long as buf
}

// newLoop makes an event loop with no sockets yet, reading buf bytes at
// a time; it logs to log and counts itself in gauge while it runs.
func newLoop(buf int, log *slog.Logger, gauge prometheus.Gauge) (*eventLoop, error) {
	l := &eventLoop{log: log, gauge: gauge, ep: -1, lfd: -1, wake: -1,
		socks: map[int32]*sock{}, conns: map[*loopConn]struct{}{}, token: firstToken, buf: make([]byte, buf)}
	l.spares.New = func() any { b := make([]byte, buf); return &b }
	var err error
	l.ep, err = unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err == nil {
		l.wake, err = unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	}
	if err == nil {
		err = unix.EpollCtl(l.ep, unix.EPOLL_CTL_ADD, l.wake, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: wakeToken})
	}
	if err != nil {
		l.closeFDs()
		return nil, fmt.Errorf("event loop: %w", err)
	}
	return l, nil
}

// post runs f on the loop; false once the loop has ended.
func (l *eventLoop) post(f func()) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.done {
		return false
	}
	l.posted = append(l.posted, f)
	one := [8]byte{1}
	_, _ = unix.Write(l.wake, one[:])
	return true
}

// ended: the loop has stopped and takes no more work.
func (l *eventLoop) ended() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.done
}

func (l *eventLoop) closeFDs() {
	for _, fd := range []int{l.lfd, l.ep, l.wake} {
		if fd >= 0 {
			unix.Close(fd)
		}
	}
}

func (l *eventLoop) run() {
	l.gauge.Inc()
	l.state.Lock()
	defer func() {
		l.gauge.Dec()
		l.mu.Lock()
		l.done = true
		l.mu.Unlock()
		l.closeFDs()
		l.state.Unlock()
		if l.rt != nil {
			l.rt.Tracker.Done(loopCloser{l})
		}
	}()
	events := make([]unix.EpollEvent, 128)
	yielded := time.Now()
	for !l.idle() {
		// Go's scheduler preempts a goroutine that has not been through it
		// for 10ms, system calls or not, whatever it is doing then. The
		// loop goes through it itself between batches, before that comes.
		now := time.Now()
		if now.Sub(yielded) > yieldEvery {
			runtime.Gosched()
			yielded = now
		}
		timeout := -1
		if len(l.again) > 0 {
			timeout = 0
		} else if at, ok := l.nextDeadline(); ok {
			timeout = int(max(0, (at.Sub(now)+time.Millisecond-1)/time.Millisecond))
		}
		l.state.Unlock()
		n, err := l.wait(events, timeout, now)
		l.state.Lock()
		if err != nil && err != unix.EINTR {
			l.log.Error("event loop failed; its connections end", "err", err)
			l.stopAccepting()
			for c := range l.conns {
				l.close(c)
			}
			return
		}
		for _, ev := range events[:max(n, 0)] {
			l.event(ev)
		}
		again := l.again
		l.again = nil
		for _, c := range again {
			c.again = false
			l.progress(c)
		}
		now = time.Now()
		if n > 0 {
			l.lastEvent = now
		}
		l.expire(now)
		if len(l.unprobed) > 0 && !now.Before(l.probeAt) {
			l.probe()
		}
		if !l.acceptAt.IsZero() && !now.Before(l.acceptAt) {
			l.acceptAt = time.Time{}
			l.accept()
		}
	}
}

// busyFor: how long after its last event a gateway loop waits unseen by
// Go's scheduler (see wait).
const busyFor = time.Second

// wait waits for events on the loop's set for up to timeout ms (-1: no
// limit); now is the loop's turn's time. A gateway loop that had an event within busyFor waits in a
// system call Go's scheduler does not see: the loop keeps its P, so the
// runtime's monitor thread (sysmon) finds no P to take back and hand on,
// and is not woken each time the loop wakes. Waiting through the
// scheduler, sysmon woke every 20µs while connections came and went:
// bench/gateway counted 17–20 times on a CPU per new connection for the
// gateway (HAProxy 9.2–9.5) and 1.4× HAProxy's CPU; waiting this way, 9.5–9.7
// and 1.1×. Idle for longer, the loop waits through the scheduler, so an
// idle gateway sleeps. Sysmon still preempts a loop that keeps its P for
// over 10ms (the wait ends with EINTR), and the gateway runs one P more
// than it has loops (proxycmd.ConcurrencyFlag), so goroutines have one.
// A proxy's relay loops wait through the scheduler: mTLS handshakes run on
// goroutines there and need the Ps.
func (l *eventLoop) wait(events []unix.EpollEvent, timeout int, now time.Time) (int, error) {
	if !l.keepP {
		return unix.EpollWait(l.ep, events, timeout)
	}
	raw := int((busyFor - now.Sub(l.lastEvent)) / time.Millisecond)
	if timeout >= 0 {
		raw = min(raw, timeout)
	}
	if raw <= 0 && timeout != 0 {
		return unix.EpollWait(l.ep, events, timeout)
	}
	r, _, e := unix.RawSyscall6(unix.SYS_EPOLL_PWAIT, uintptr(l.ep), uintptr(unsafe.Pointer(&events[0])), uintptr(len(events)), uintptr(max(raw, 0)), 0, 0)
	if e != 0 {
		return -1, e
	}
	return int(r), nil
}

// idle: the loop has nothing left to do, neither a listener nor a
// connection nor work posted to it, and need not wait for more; it takes
// no more work then.
func (l *eventLoop) idle() bool {
	if l.lfd >= 0 || len(l.conns) > 0 || l.keep {
		return false
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.done = len(l.posted) == 0
	return l.done
}

// nextDeadline is when the loop must wake without an event: the first
// timer, the end of a pause in accepting, or when sockets get keepalive
// probes.
func (l *eventLoop) nextDeadline() (time.Time, bool) {
	at, ok := l.timers.next()
	earlier := func(t time.Time) {
		if !t.IsZero() && (!ok || t.Before(at)) {
			at, ok = t, true
		}
	}
	earlier(l.acceptAt)
	if len(l.unprobed) > 0 {
		earlier(l.probeAt)
	}
	return at, ok
}

func (l *eventLoop) event(ev unix.EpollEvent) {
	switch ev.Fd {
	case wakeToken:
		var b [8]byte
		_, _ = unix.Read(l.wake, b[:])
		l.mu.Lock()
		posted := l.posted
		l.posted = nil
		l.mu.Unlock()
		for _, f := range posted {
			f()
		}
	case listenToken:
		l.accept()
	default:
		s := l.socks[ev.Fd]
		if s == nil {
			return
		}
		const gone = unix.EPOLLRDHUP | unix.EPOLLHUP | unix.EPOLLERR
		s.readable = s.readable || ev.Events&(unix.EPOLLIN|gone) != 0
		s.writable = s.writable || ev.Events&(unix.EPOLLOUT|unix.EPOLLHUP|unix.EPOLLERR) != 0
		s.hup = s.hup || ev.Events&gone != 0
		l.progress(s.c)
	}
}

func (l *eventLoop) progress(c *loopConn) {
	switch c.state {
	case readingHello:
		l.readHello(c)
	case connecting:
		if c.up != nil && c.up.writable {
			l.connected(c)
		}
	case relaying:
		l.relay(c)
	}
}

// add watches fd for c.
func (l *eventLoop) add(fd int, c *loopConn) (*sock, error) {
	for l.socks[l.token] != nil || l.token < firstToken {
		l.token++ // wrapped around
	}
	s := &sock{fd: int32(fd), token: l.token, c: c}
	l.token++
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLOUT | unix.EPOLLRDHUP | unix.EPOLLET, Fd: s.token}
	if err := unix.EpollCtl(l.ep, unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
		return nil, err
	}
	l.socks[s.token] = s
	return s, nil
}

// drop closes a socket, which also takes it out of the epoll set.
func (l *eventLoop) drop(s *sock) {
	if s != nil {
		delete(l.socks, s.token)
		unix.Close(int(s.fd))
		l.release(s)
		if s.tls != nil {
			s.tls.raw.release()
			s.out = nil
		}
	}
}

func (l *eventLoop) close(c *loopConn) {
	if c.state == closed {
		return
	}
	l.drop(c.down)
	l.drop(c.up)
	c.state = closed
	delete(l.conns, c)
	if c.done != nil {
		close(c.done)
		return
	}
	l.rt.Live.Dec()
}

func (l *eventLoop) relay(c *loopConn) {
	if c.down.flush() != nil || c.up.flush() != nil {
		l.close(c)
		return
	}
	more1, ok1 := l.pump(c.down, c.up)
	more2, ok2 := l.pump(c.up, c.down)
	switch {
	case !ok1 || !ok2:
		l.close(c)
	case c.down.shut && c.up.shut && len(c.down.out) == 0 && len(c.up.out) == 0:
		l.close(c)
	case (more1 || more2) && !c.again:
		c.again = true
		l.again = append(l.again, c)
	}
}

// pump moves what src has to dst, up to loopBudget reads, and passes an
// end of stream on as a half-close. more: the budget ran out with src
// still readable; ok false: a socket failed, so the connection ends.
func (l *eventLoop) pump(src, dst *sock) (more, ok bool) {
	for reads := 0; ; {
		if len(src.pending) > 0 {
			if !dst.writable {
				break
			}
			n, err := dst.write(src.pending)
			if n > 0 {
				src.pending = src.pending[n:]
			}
			if len(src.pending) == 0 {
				l.release(src)
			}
			switch {
			case err == unix.EAGAIN || err == nil && len(src.pending) > 0:
				dst.writable = false
			case err == unix.EINTR || err == nil:
				continue
			default:
				return false, false
			}
			break
		}
		if src.eof {
			if !dst.shut {
				// A plain side whose peer has ended too, with
				// nothing left to pass on, is closed this turn,
				// which sends its FIN.
				if dst.tls != nil || !dst.eof || len(dst.pending) > 0 {
					dst.shutWrite()
				}
				dst.shut = true
			}
			break
		}
		// A TLS side that holds unsent bytes takes no more.
		if !src.readable && !src.buffered || !dst.writable {
			break
		}
		if reads == loopBudget {
			return true, true
		}
		n, err := src.read(l.buf)
		reads++
		if n > 0 {
			src.pending, src.borrowed = l.buf[:n], true
		}
		switch {
		case err == unix.EAGAIN:
			if n == 0 {
				return false, true
			}
		case err == io.EOF:
			src.eof = true
		case err != nil:
			return false, false
		}
	}
	// What dst could not take yet moves out of the shared buffer, into a
	// spare one: a connection holds a buffer only while its peer is slow.
	if src.borrowed {
		if len(src.pending) > 0 {
			src.spare = l.spares.Get().(*[]byte)
			src.pending = (*src.spare)[:copy(*src.spare, src.pending)]
		}
		src.borrowed = false
	}
	return false, true
}

// release gives s's spare buffer back.
func (l *eventLoop) release(s *sock) {
	if s.spare != nil {
		l.spares.Put(s.spare)
		s.spare = nil
	}
}
