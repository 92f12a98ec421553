package proxy

import (
	"container/heap"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"runtime"
	"sync"
	"syscall"
	"time"

	"github.com/meshfed/meshfed/gateway/clienthello"
	"golang.org/x/sys/unix"
)

// On Linux a gateway listener's connections run on event loops, one per
// CPU Go uses: non-blocking sockets in an edge-triggered epoll set per
// loop, with no goroutine per connection. Passthrough does no work per
// byte but copy, so what a connection costs is mostly waking up for it; a
// loop wakes once for a batch of ready sockets, where goroutines hand each
// wakeup from thread to thread (the gateway made about 9 futex calls per
// connection that way).

const (
	loopBuffer = 256 << 10 // one read, shared by every connection
	loopBudget = 4         // reads per direction and turn (1 MiB), so no connection holds up the rest
	yieldEvery = 5 * time.Millisecond
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

// gwConn is one caller's connection and, once routed, its upstream.
type gwConn struct {
	down, up *sock
	state    connState
	// gen changes with every state and connection attempt; timers and
	// dials from before are ignored.
	gen   int
	hello []byte // what the caller sent before it was routed, replayed upstream
	r     route
	u     *upstream
	e     endpointConf
	tried map[string]bool
	// fdWait: out of descriptors to connect upstream with, the caller
	// waits until then; zero while it has not had to.
	fdWait time.Time
	again  bool // waits in the loop's again list
}

// sock is one non-blocking socket and what the loop knows of it.
type sock struct {
	fd, token int32
	c         *gwConn
	// pending was read from this socket and waits for the other one;
	// borrowed: it lies in the loop's shared buffer.
	pending  []byte
	borrowed bool
	spare    []byte
	// readable and writable until a call says otherwise (edge-triggered);
	// hup: the peer closed or reset, so read to the end whatever a read
	// returns.
	readable, writable, hup bool
	eof                     bool // a read returned the end of the stream
	shut                    bool // writing to it was shut down
}

type gatewayLoop struct {
	p    *Proxy
	rl   *runningListener
	addr net.Addr
	ep   int
	lfd  int // -1 once no longer accepting
	wake int // eventfd that posted work rings

	mu     sync.Mutex
	posted []func()
	done   bool

	socks  map[int32]*sock
	conns  map[*gwConn]struct{}
	timers timers
	// acceptAt: accepting paused (out of descriptors) until then;
	// acceptFailing since the first failure, until an accept succeeds.
	acceptAt      time.Time
	acceptFailing bool
	again         []*gwConn
	token         int32
	buf           []byte
}

// listenGateway opens the gateway listener and starts its loops, one per
// CPU Go uses, each on a listening socket of its own on the same port
// (SO_REUSEPORT: the kernel spreads connections over them). p.mu is held.
func (p *Proxy) listenGateway(rl *runningListener, addr string) (listener, error) {
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var err error
		cerr := c.Control(func(fd uintptr) { err = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1) })
		return errors.Join(cerr, err)
	}}
	// A plain bind first, so a port another process holds is refused as
	// "address in use", not silently shared with it.
	probe, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	addr = probe.Addr().String() // the port picked, when addr asks for any
	probe.Close()
	var group loopGroup
	for range runtime.GOMAXPROCS(0) {
		ln, err := lc.Listen(context.Background(), "tcp", addr)
		if err == nil {
			err = p.startLoop(rl, ln.(*net.TCPListener), &group)
		}
		if err != nil {
			group.Close()
			return nil, err
		}
	}
	return group, nil
}

// loopGroup is a gateway listener's loops.
type loopGroup []*gatewayLoop

func (g loopGroup) Addr() net.Addr { return g[0].addr }

// Close stops accepting; live connections go on.
func (g loopGroup) Close() error {
	for _, l := range g {
		l.post(l.stopAccepting)
	}
	return nil
}

func (p *Proxy) startLoop(rl *runningListener, ln *net.TCPListener, group *loopGroup) error {
	l := &gatewayLoop{p: p, rl: rl, addr: ln.Addr(), ep: -1, lfd: -1, wake: -1,
		socks: map[int32]*sock{}, conns: map[*gwConn]struct{}{}, token: firstToken, buf: make([]byte, loopBuffer)}
	var err error
	if l.lfd, err = detach(ln); err == nil {
		// Accepted once the hello is there: one wakeup, not two. A caller
		// that sends nothing waits in the kernel's queue up to the hello
		// timeout before its own hello timeout starts.
		_ = unix.SetsockoptInt(l.lfd, unix.IPPROTO_TCP, unix.TCP_DEFER_ACCEPT, int(max(1, p.o.HelloTimeout/time.Second)))
		tune(l.lfd) // accepted sockets inherit it
		l.ep, err = unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	}
	if err == nil {
		l.wake, err = unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	}
	if err == nil {
		err = errors.Join(
			unix.EpollCtl(l.ep, unix.EPOLL_CTL_ADD, l.wake, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: wakeToken}),
			unix.EpollCtl(l.ep, unix.EPOLL_CTL_ADD, l.lfd, &unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLET, Fd: listenToken}))
	}
	if err != nil {
		l.closeFDs()
		return fmt.Errorf("gateway event loop: %w", err)
	}
	// The loop counts as one live connection until its last one ends; the
	// drain timeout aborts them all through it.
	p.conns.Add(1)
	p.live[loopConns{l}] = struct{}{}
	*group = append(*group, l)
	go l.run()
	return nil
}

// tune sets what Go's net package sets on its TCP connections: no Nagle
// delay, and keepalive probes (after 15s idle, every 15s, 9 of them), so a
// peer that vanished without a word is found and its connection closed.
func tune(fd int) {
	for _, o := range [...]struct{ level, opt, v int }{
		{unix.IPPROTO_TCP, unix.TCP_NODELAY, 1},
		{unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1},
		{unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, 15},
		{unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, 15},
		{unix.IPPROTO_TCP, unix.TCP_KEEPCNT, 9},
	} {
		_ = unix.SetsockoptInt(fd, o.level, o.opt, o.v)
	}
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

// loopConns lets the drain timeout end a loop's live connections.
type loopConns struct{ l *gatewayLoop }

func (lc loopConns) Close() error {
	lc.l.post(func() {
		l := lc.l
		l.stopAccepting()
		for c := range l.conns {
			l.close(c)
		}
	})
	return nil
}

// post runs f on the loop; false once the loop has ended.
func (l *gatewayLoop) post(f func()) bool {
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

func (l *gatewayLoop) stopAccepting() {
	if l.lfd >= 0 {
		unix.Close(l.lfd)
		l.lfd = -1
	}
}

func (l *gatewayLoop) closeFDs() {
	for _, fd := range []int{l.lfd, l.ep, l.wake} {
		if fd >= 0 {
			unix.Close(fd)
		}
	}
}

func (l *gatewayLoop) run() {
	defer func() {
		l.mu.Lock()
		l.done = true
		l.mu.Unlock()
		l.closeFDs()
		l.p.track(loopConns{l}, false)
	}()
	events := make([]unix.EpollEvent, 128)
	yielded := time.Now()
	for l.lfd >= 0 || len(l.conns) > 0 {
		// Go's scheduler preempts a goroutine that has not been through it
		// for 10ms, system calls or not, whatever it is doing then. The
		// loop goes through it itself between batches, before that comes.
		if now := time.Now(); now.Sub(yielded) > yieldEvery {
			runtime.Gosched()
			yielded = now
		}
		timeout := -1
		if len(l.again) > 0 {
			timeout = 0
		} else if at, ok := l.nextDeadline(); ok {
			timeout = int(max(0, (time.Until(at)+time.Millisecond-1)/time.Millisecond))
		}
		n, err := unix.EpollWait(l.ep, events, timeout)
		if err != nil && err != unix.EINTR {
			l.p.log.Error("gateway event loop failed; its connections end", "err", err)
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
		now := time.Now()
		l.expire(now)
		if !l.acceptAt.IsZero() && !now.Before(l.acceptAt) {
			l.acceptAt = time.Time{}
			l.accept()
		}
	}
}

// nextDeadline is when the loop must wake without an event: the first
// timer, or the end of a pause in accepting.
func (l *gatewayLoop) nextDeadline() (time.Time, bool) {
	at, ok := l.timers.next()
	if !l.acceptAt.IsZero() && (!ok || l.acceptAt.Before(at)) {
		return l.acceptAt, true
	}
	return at, ok
}

func (l *gatewayLoop) event(ev unix.EpollEvent) {
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

func (l *gatewayLoop) progress(c *gwConn) {
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

func (l *gatewayLoop) accept() {
	for l.lfd >= 0 {
		fd, _, err := unix.Accept4(l.lfd, unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC)
		switch err {
		case nil:
		case unix.EINTR, unix.ECONNABORTED:
			continue
		case unix.EAGAIN:
			return
		default:
			// The listener is edge-triggered: callers left in the queue
			// would wait for the next one to arrive, so try again soon.
			if outOfDescriptors(err) {
				l.p.m.acceptPaused.Inc()
			}
			if !l.acceptFailing {
				l.p.log.Error("gateway could not accept a connection; trying again every 100ms until it can", "err", err)
				l.acceptFailing = true
			}
			l.acceptAt = time.Now().Add(descriptorPause)
			return
		}
		if l.acceptFailing {
			l.p.log.Info("gateway accepts connections again")
			l.acceptFailing = false
		}
		c := &gwConn{state: readingHello}
		if c.down, err = l.add(fd, c); err != nil {
			unix.Close(fd)
			l.p.log.Error("gateway could not watch a connection", "err", err)
			continue
		}
		l.conns[c] = struct{}{}
		l.p.m.gatewayLive.Inc()
		heap.Push(&l.timers, timer{at: time.Now().Add(l.p.o.HelloTimeout), c: c, gen: c.gen})
		c.down.readable = true // the hello often comes with the handshake
		l.readHello(c)
	}
}

// add watches fd for c.
func (l *gatewayLoop) add(fd int, c *gwConn) (*sock, error) {
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
func (l *gatewayLoop) drop(s *sock) {
	if s != nil {
		delete(l.socks, s.token)
		unix.Close(int(s.fd))
	}
}

func (l *gatewayLoop) close(c *gwConn) {
	if c.state == closed {
		return
	}
	l.drop(c.down)
	l.drop(c.up)
	c.state = closed
	delete(l.conns, c)
	l.p.m.gatewayLive.Dec()
}

// refuse closes a connection that gets no route, counting why.
func (l *gatewayLoop) refuse(c *gwConn, result string, err error) {
	l.p.refused(result, err, func() net.Addr { return peerAddr(int(c.down.fd)) })
	l.close(c)
}

func peerAddr(fd int) net.Addr {
	sa, err := unix.Getpeername(fd)
	if err != nil {
		return nil
	}
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return net.TCPAddrFromAddrPort(netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port)))
	case *unix.SockaddrInet6:
		return net.TCPAddrFromAddrPort(netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), uint16(sa.Port)))
	}
	return nil
}

// readHello collects the caller's bytes until they hold a ClientHello,
// then routes the connection by its SNI.
func (l *gatewayLoop) readHello(c *gwConn) {
	s := c.down
	for s.readable {
		n, err := unix.Read(int(s.fd), l.buf[:clienthello.MaxSize-len(c.hello)])
		switch {
		case err == unix.EAGAIN:
			s.readable = false
			return
		case err == unix.EINTR:
			continue
		case err != nil:
			l.refuse(c, "malformed", err)
			return
		case n == 0:
			l.refuse(c, "malformed", errors.New("connection closed before a whole ClientHello"))
			return
		}
		if n < clienthello.MaxSize-len(c.hello) && !s.hup {
			s.readable = false // a short read took all there was
		}
		c.hello = append(c.hello, l.buf[:n]...)
		name, _, err := clienthello.Parse(c.hello)
		if errors.Is(err, clienthello.ErrIncomplete) {
			continue
		}
		if err != nil {
			l.refuse(c, helloResult(err), err)
			return
		}
		l.route(c, name)
		return
	}
}

func (l *gatewayLoop) route(c *gwConn, name string) {
	r, ok := l.rl.conf.Load().sni[name]
	if !ok {
		l.p.refusedSNI(name, peerAddr(int(c.down.fd)))
		l.close(c)
		return
	}
	l.p.mu.Lock()
	c.u = l.p.upstreams[r.cluster]
	l.p.mu.Unlock()
	if c.u == nil {
		l.refuse(c, "no_cluster", nil)
		return
	}
	c.r, c.tried, c.state = r, map[string]bool{}, connecting
	l.dial(c)
}

// dial starts a connection to the next endpoint to try: non-blocking
// connect for an IP, a goroutine for a host name (which needs resolving).
func (l *gatewayLoop) dial(c *gwConn) {
	for len(c.tried) < max(c.r.attempts, 1) {
		e, ok := c.u.pick(c.tried, time.Now())
		if !ok {
			break
		}
		c.tried[hostKey(e)] = true
		c.e = e
		c.gen++
		timeout := c.u.config().connectTimeout
		heap.Push(&l.timers, timer{at: time.Now().Add(timeout), c: c, gen: c.gen})
		ap, err := netip.ParseAddrPort(e.addr)
		if err != nil {
			gen := c.gen
			go func() {
				var fd int
				conn, err := (&net.Dialer{Timeout: timeout}).Dial("tcp", e.addr)
				if err == nil {
					fd, err = detach(conn.(*net.TCPConn))
				}
				if !l.post(func() { l.dialed(c, gen, fd, err) }) && err == nil {
					unix.Close(fd)
				}
			}()
			return
		}
		if err = l.connect(c, ap); err == nil {
			c.up.writable = true
			l.connected(c)
			return
		}
		if outOfDescriptors(err) {
			l.waitForDescriptor(c, err)
			return
		}
		l.p.attempted(c.r.cluster, c.u, e, err)
	}
	l.refuse(c, unconnected(c.tried), nil)
}

// waitForDescriptor keeps a routed caller while the process has no
// descriptor to connect upstream with: the endpoint does not count as
// tried (the shortage is not its fault), and dialling starts again after
// a pause, for as long as a connect may take; then the caller is refused.
func (l *gatewayLoop) waitForDescriptor(c *gwConn, err error) {
	now := time.Now()
	if c.fdWait.IsZero() {
		c.fdWait = now.Add(c.u.config().connectTimeout)
	}
	if !now.Before(c.fdWait) {
		l.refuse(c, "out_of_descriptors", err)
		return
	}
	l.p.m.fdWaits.Inc()
	delete(c.tried, hostKey(c.e))
	l.drop(c.up)
	c.up = nil
	c.gen++
	at := now.Add(descriptorPause)
	if at.After(c.fdWait) {
		at = c.fdWait
	}
	heap.Push(&l.timers, timer{at: at, c: c, gen: c.gen, redial: true})
}

func (l *gatewayLoop) connect(c *gwConn, ap netip.AddrPort) error {
	var sa unix.Sockaddr = &unix.SockaddrInet6{Port: int(ap.Port()), Addr: ap.Addr().As16()}
	family := unix.AF_INET6
	if ap.Addr().Unmap().Is4() {
		sa, family = &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().Unmap().As4()}, unix.AF_INET
	}
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	tune(fd)
	if err = unix.Connect(fd, sa); err != nil && err != unix.EINPROGRESS {
		unix.Close(fd)
		return err
	}
	if c.up, err = l.add(fd, c); err != nil {
		unix.Close(fd)
	}
	return err
}

// dialed takes a goroutine's connection to a host name.
func (l *gatewayLoop) dialed(c *gwConn, gen, fd int, err error) {
	if c.state != connecting || c.gen != gen {
		if err == nil {
			unix.Close(fd)
		}
		return
	}
	if err == nil {
		if c.up, err = l.add(fd, c); err != nil {
			unix.Close(fd)
		}
	}
	if err != nil {
		l.failed(c, err)
		return
	}
	c.up.writable = true
	l.connected(c)
}

// failed records a failed attempt and tries the next endpoint.
func (l *gatewayLoop) failed(c *gwConn, err error) {
	if outOfDescriptors(err) {
		l.waitForDescriptor(c, err)
		return
	}
	l.p.attempted(c.r.cluster, c.u, c.e, err)
	l.drop(c.up)
	c.up = nil
	l.dial(c)
}

// connected passes the hello on once the upstream may be connected: a
// write that succeeds means the connect has (on loopback it has before
// connect returns, which saves waiting for the loop's next turn); EAGAIN
// means it is still under way.
func (l *gatewayLoop) connected(c *gwConn) {
	n, err := unix.Write(int(c.up.fd), c.hello)
	for err == unix.EINTR {
		n, err = unix.Write(int(c.up.fd), c.hello)
	}
	if err == unix.EAGAIN {
		c.up.writable = false
		return
	}
	if err != nil {
		l.failed(c, err)
		return
	}
	l.p.attempted(c.r.cluster, c.u, c.e, nil)
	l.p.m.gateway.WithLabelValues("ok").Inc()
	c.state = relaying
	c.gen++
	c.down.pending, c.hello = c.hello[n:], nil
	c.u, c.tried = nil, nil
	l.relay(c)
}

func (l *gatewayLoop) relay(c *gwConn) {
	more1, ok1 := l.pump(c.down, c.up)
	more2, ok2 := l.pump(c.up, c.down)
	switch {
	case !ok1 || !ok2:
		l.close(c)
	case c.down.shut && c.up.shut:
		l.close(c)
	case (more1 || more2) && !c.again:
		c.again = true
		l.again = append(l.again, c)
	}
}

// pump moves what src has to dst, up to loopBudget reads, and passes an
// end of stream on as a half-close. more: the budget ran out with src
// still readable; ok false: a socket failed, so the connection ends.
func (l *gatewayLoop) pump(src, dst *sock) (more, ok bool) {
	for reads := 0; ; {
		if len(src.pending) > 0 {
			if !dst.writable {
				break
			}
			n, err := unix.Write(int(dst.fd), src.pending)
			if n > 0 {
				src.pending = src.pending[n:]
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
				_ = unix.Shutdown(int(dst.fd), unix.SHUT_WR)
				dst.shut = true
			}
			break
		}
		if !src.readable {
			break
		}
		if reads == loopBudget {
			return true, true
		}
		n, err := unix.Read(int(src.fd), l.buf)
		reads++
		switch {
		case err == unix.EAGAIN:
			src.readable = false
			return false, true
		case err == unix.EINTR:
			continue
		case err != nil:
			return false, false
		case n == 0:
			src.eof = true
			continue
		}
		if n < len(l.buf) && !src.hup {
			src.readable = false
		}
		src.pending, src.borrowed = l.buf[:n], true
	}
	// What dst could not take yet moves out of the shared buffer.
	if src.borrowed {
		if len(src.pending) > 0 {
			src.spare = append(src.spare[:0], src.pending...)
			src.pending = src.spare
		}
		src.borrowed = false
	}
	return false, true
}

// expire ends hellos and connection attempts that ran out of time.
func (l *gatewayLoop) expire(now time.Time) {
	for len(l.timers) > 0 && !l.timers[0].at.After(now) {
		t := heap.Pop(&l.timers).(timer)
		if t.gen != t.c.gen {
			continue
		}
		switch t.c.state {
		case readingHello:
			l.refuse(t.c, "hello_timeout", errors.New("no whole ClientHello in time"))
		case connecting:
			if t.redial {
				l.dial(t.c)
			} else {
				l.failed(t.c, errors.New("connect timed out"))
			}
		}
	}
}

type timer struct {
	at  time.Time
	c   *gwConn
	gen int
	// redial: the caller waited for a descriptor; try to connect again.
	redial bool
}

// timers is a min-heap by deadline; stale ones are dropped when they come
// up.
type timers []timer

func (t timers) Len() int           { return len(t) }
func (t timers) Less(i, j int) bool { return t[i].at.Before(t[j].at) }
func (t timers) Swap(i, j int)      { t[i], t[j] = t[j], t[i] }
func (t *timers) Push(x any)        { *t = append(*t, x.(timer)) }
func (t *timers) Pop() any {
	old := *t
	x := old[len(old)-1]
	*t = old[:len(old)-1]
	return x
}

// next is the earliest deadline still in force.
func (t *timers) next() (time.Time, bool) {
	for len(*t) > 0 {
		top := (*t)[0]
		if top.gen == top.c.gen && (top.c.state == readingHello || top.c.state == connecting) {
			return top.at, true
		}
		heap.Pop(t)
	}
	return time.Time{}, false
}
