package proxy

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// An event loop relays connections on non-blocking sockets in an
// edge-triggered epoll set, with no goroutine per connection. Moving bytes
// costs little next to waking up for them: a loop wakes once for a batch of
// ready sockets, where goroutines hand each wakeup from thread to thread
// (the gateway made about 9 futex calls per connection that way). The
// gateway runs its listeners on loops; a proxy hands its connections to
// loops of its own once they are connected and past their TLS handshake.

const (
	// One read, shared by every connection of a loop; a proxy's relay
	// loops read half as much, which a TLS side encrypts into eight
	// records that leave in one write (see batchedTLS).
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
	r             route
	u             *upstream
	e             endpointConf
	tried         triedSet
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
	tls      *batchedTLS
	buffered bool
	out      []byte
}

// eventLoop is one loop: its epoll set, sockets and connections.
type eventLoop struct {
	p    *Proxy
	rl   *runningListener
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
// a time.
func (p *Proxy) newLoop(buf int) (*eventLoop, error) {
	l := &eventLoop{p: p, ep: -1, lfd: -1, wake: -1,
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

// tune sets what Go's net package sets on its TCP connections: no Nagle
// delay, and keepalive probes (after 15s idle, every 15s, 9 of them), so a
// peer that vanished without a word is found and its connection closed.
func tune(fd int) {
	noDelay(fd)
	keepAlive(fd)
}

func noDelay(fd int) { _ = unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1) }

func keepAlive(fd int) {
	for _, o := range [...]struct{ level, opt, v int }{
		{unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1},
		{unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, 15},
		{unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, 15},
		{unix.IPPROTO_TCP, unix.TCP_KEEPCNT, 9},
	} {
		_ = unix.SetsockoptInt(fd, o.level, o.opt, o.v)
	}
}

// keepaliveAfter: how long a gateway's upstream connection lasts before it
// gets its keepalive probes (four system calls); most of its connections
// end sooner and are spared them. Probes start after 15s idle anyway.
const keepaliveAfter = time.Second

// probeLater gives s keepalive probes at the first turn after
// keepaliveAfter, if it is still open then.
func (l *eventLoop) probeLater(s *sock) {
	if len(l.unprobed) == 0 {
		l.probeAt = time.Now().Add(keepaliveAfter)
	}
	l.unprobed = append(l.unprobed, s)
}

// probe sets keepalive probes on the sockets waiting for them that are
// still open.
func (l *eventLoop) probe() {
	for _, s := range l.unprobed {
		if l.socks[s.token] == s {
			keepAlive(int(s.fd))
		}
	}
	clear(l.unprobed)
	l.unprobed = l.unprobed[:0]
}

// detach takes a socket's descriptor from Go's poller: a duplicate that
// stays non-blocking, the original closed.
func detach(c interface {
	syscall.Conn
	io.Closer
}) (int, error) {
	fd := -1
	rc, err := c.SyscallConn()
	if err == nil {
		cerr := rc.Control(func(s uintptr) { fd, err = unix.FcntlInt(s, unix.F_DUPFD_CLOEXEC, 0) })
		err = errors.Join(err, cerr)
	}
	c.Close()
	return fd, err
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
	l.p.m.loops.Inc()
	l.state.Lock()
	defer func() {
		l.p.m.loops.Dec()
		l.mu.Lock()
		l.done = true
		l.mu.Unlock()
		l.closeFDs()
		l.state.Unlock()
		if l.rl != nil {
			l.p.track(loopCloser{l}, false)
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
			l.p.log.Error("event loop failed; its connections end", "err", err)
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
	l.p.m.gatewayLive.Dec()
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

// read reads what s has into buf: unix.EAGAIN when it has nothing now,
// io.EOF at the end of the stream.
func (s *sock) read(buf []byte) (int, error) {
	if s.tls != nil {
		n, err := s.tls.Read(buf)
		s.buffered = n > 0 && err == nil
		if errors.Is(err, os.ErrDeadlineExceeded) {
			err = unix.EAGAIN
		}
		return n, err
	}
	return s.readFD(buf)
}

// readFD reads from the socket itself.
func (s *sock) readFD(buf []byte) (int, error) {
	for {
		n, err := unix.Read(int(s.fd), buf)
		switch {
		case err == unix.EINTR:
			continue
		case err != nil:
			if err == unix.EAGAIN {
				s.readable = false
			}
			return 0, err
		case n == 0:
			return 0, io.EOF
		case n < len(buf) && !s.hup:
			s.readable = false // a short read took all there was
		}
		return n, nil
	}
}

// write writes p to s; a TLS side takes all of p (what its socket does
// not take waits in out).
func (s *sock) write(p []byte) (int, error) {
	if s.tls != nil {
		return s.tls.Write(p)
	}
	return unix.Write(int(s.fd), p)
}

// shutWrite passes an end of stream on: a close_notify alert on a TLS
// side, a TCP half-close otherwise.
func (s *sock) shutWrite() {
	if s.tls != nil {
		_ = s.tls.CloseWrite()
		return
	}
	_ = unix.Shutdown(int(s.fd), unix.SHUT_WR)
}

// flush writes what a TLS side holds in out, as far as its socket takes
// it.
func (s *sock) flush() error {
	for len(s.out) > 0 && s.writable {
		n, err := unix.Write(int(s.fd), s.out)
		switch {
		case err == unix.EAGAIN:
			s.writable = false
		case err == unix.EINTR:
		case err != nil:
			return err
		case n == len(s.out):
			s.out = nil // a connection holds no buffer while its socket keeps up
		default:
			s.out = s.out[:copy(s.out, s.out[n:])]
		}
	}
	return nil
}

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
