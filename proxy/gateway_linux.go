package proxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"
	"time"

	"github.com/meshfed/meshfed/gateway/clienthello"
	"golang.org/x/sys/unix"
)

// On Linux a gateway listener's connections run on event loops (see
// eventLoop), Options.Loops of them, each with a listening socket of its own
// on the same port. A connection's hello is read, routed by its SNI and
// passed upstream, all on the loop; only a host name to resolve takes a
// goroutine.

// listenGateway opens the gateway listener and starts its loops,
// Options.Loops of them, each on a listening socket of its own on the same port
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
	for range max(1, p.o.Loops) {
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
type loopGroup []*eventLoop

func (g loopGroup) Addr() net.Addr { return g[0].addr }

// Close stops accepting; live connections go on.
func (g loopGroup) Close() error {
	for _, l := range g {
		l.post(l.stopAccepting)
	}
	return nil
}

func (p *Proxy) startLoop(rl *runningListener, ln *net.TCPListener, group *loopGroup) error {
	l, err := p.newLoop(gatewayBuffer)
	if err != nil {
		ln.Close()
		return err
	}
	l.rl, l.addr, l.keepP = rl, ln.Addr(), true
	if l.lfd, err = detach(ln); err == nil {
		// Accepted once the hello is there: one wakeup, not two. A caller
		// that sends nothing waits in the kernel's queue up to the hello
		// timeout before its own hello timeout starts.
		_ = unix.SetsockoptInt(l.lfd, unix.IPPROTO_TCP, unix.TCP_DEFER_ACCEPT, int(max(1, p.o.HelloTimeout/time.Second)))
		tune(l.lfd) // accepted sockets inherit it
		err = unix.EpollCtl(l.ep, unix.EPOLL_CTL_ADD, l.lfd, &unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLET, Fd: listenToken})
	}
	if err != nil {
		l.closeFDs()
		return fmt.Errorf("gateway event loop: %w", err)
	}
	// The loop counts as one live connection until its last one ends; the
	// drain timeout aborts them all through it.
	p.conns.Add(1)
	p.live[loopCloser{l}] = struct{}{}
	*group = append(*group, l)
	go l.run()
	return nil
}

// loopCloser lets the drain timeout end a gateway loop's live connections.
type loopCloser struct{ l *eventLoop }

func (lc loopCloser) Close() error {
	lc.l.post(func() {
		l := lc.l
		l.stopAccepting()
		for c := range l.conns {
			l.close(c)
		}
	})
	return nil
}

func (l *eventLoop) stopAccepting() {
	if l.lfd >= 0 {
		unix.Close(l.lfd)
		l.lfd = -1
	}
}

func (l *eventLoop) accept() {
	for l.lfd >= 0 {
		fd, err := accept4(l.lfd)
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
		c := &loopConn{state: readingHello}
		if c.down, err = l.add(fd, c); err != nil {
			unix.Close(fd)
			l.p.log.Error("gateway could not watch a connection", "err", err)
			continue
		}
		l.conns[c] = struct{}{}
		l.p.m.gatewayLive.Inc()
		l.timers.push(timer{at: time.Now().Add(l.p.o.HelloTimeout), c: c, gen: c.gen})
		c.down.readable = true // the hello often comes with the handshake
		l.readHello(c)
	}
}

// accept4 accepts a connection without asking for its peer's address,
// which unix.Accept4 would decode at the cost of a getsockopt call per
// connection (peerAddr asks, for a refused one).
func accept4(lfd int) (int, error) {
	fd, _, e := unix.Syscall6(unix.SYS_ACCEPT4, uintptr(lfd), 0, 0, unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0, 0)
	if e != 0 {
		return -1, e
	}
	return int(fd), nil
}

// refuse closes a connection that gets no route, counting why.
func (l *eventLoop) refuse(c *loopConn, result string, err error) {
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
func (l *eventLoop) readHello(c *loopConn) {
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
		if c.hello == nil {
			// Most hellos come whole in one read: they stay in the
			// loop's buffer if they leave at once.
			c.hello, c.helloBorrowed = l.buf[:n:n], true
		} else {
			c.hello = append(c.hello, l.buf[:n]...)
		}
		name, _, err := clienthello.Parse(c.hello)
		if errors.Is(err, clienthello.ErrIncomplete) {
			c.ownHello()
			continue
		}
		if err != nil {
			l.refuse(c, helloResult(err), err)
			return
		}
		l.route(c, name)
		if c.state == connecting {
			c.ownHello() // the loop reads into its buffer again before the hello leaves
		}
		return
	}
}

// ownHello copies a hello that lies in the loop's buffer into one of
// the connection's own.
func (c *loopConn) ownHello() {
	if c.helloBorrowed {
		c.hello, c.helloBorrowed = bytes.Clone(c.hello), false
	}
}

func (l *eventLoop) route(c *loopConn, name string) {
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
	c.r, c.tried, c.state = r, nil, connecting
	l.dial(c)
}

// dial starts a connection to the next endpoint to try: non-blocking
// connect for an IP, a goroutine for a host name (which needs resolving).
func (l *eventLoop) dial(c *loopConn) {
	for len(c.tried) < max(c.r.attempts, 1) {
		e, ok := c.u.pick(c.tried, time.Now())
		if !ok {
			break
		}
		c.tried.add(hostKey(e))
		c.e = e
		c.gen++
		timeout := c.u.config().connectTimeout
		l.timers.push(timer{at: time.Now().Add(timeout), c: c, gen: c.gen})
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
func (l *eventLoop) waitForDescriptor(c *loopConn, err error) {
	now := time.Now()
	if c.fdWait.IsZero() {
		c.fdWait = now.Add(c.u.config().connectTimeout)
	}
	if !now.Before(c.fdWait) {
		l.refuse(c, "out_of_descriptors", err)
		return
	}
	l.p.m.fdWaits.Inc()
	c.tried.remove(hostKey(c.e))
	l.drop(c.up)
	c.up = nil
	c.gen++
	at := now.Add(descriptorPause)
	if at.After(c.fdWait) {
		at = c.fdWait
	}
	l.timers.push(timer{at: at, c: c, gen: c.gen, redial: true})
}

func (l *eventLoop) connect(c *loopConn, ap netip.AddrPort) error {
	var sa unix.Sockaddr
	family := unix.AF_INET6
	if ap.Addr().Unmap().Is4() {
		sa, family = &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().Unmap().As4()}, unix.AF_INET
	} else {
		sa = &unix.SockaddrInet6{Port: int(ap.Port()), Addr: ap.Addr().As16()}
	}
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	noDelay(fd)
	if err = unix.Connect(fd, sa); err != nil && err != unix.EINPROGRESS {
		unix.Close(fd)
		return err
	}
	if c.up, err = l.add(fd, c); err != nil {
		unix.Close(fd)
		return err
	}
	l.probeLater(c.up)
	return nil
}

// dialed takes a goroutine's connection to a host name.
func (l *eventLoop) dialed(c *loopConn, gen, fd int, err error) {
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
func (l *eventLoop) failed(c *loopConn, err error) {
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
func (l *eventLoop) connected(c *loopConn) {
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
	c.down.pending, c.down.borrowed = c.hello[n:], c.helloBorrowed
	c.hello, c.helloBorrowed = nil, false
	c.u, c.tried = nil, nil
	l.relay(c)
}

// expire ends hellos and connection attempts that ran out of time.
func (l *eventLoop) expire(now time.Time) {
	for len(l.timers) > 0 && !l.timers[0].at.After(now) {
		t := l.timers.pop()
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
