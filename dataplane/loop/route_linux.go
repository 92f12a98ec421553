package loop

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"syscall"
	"time"

	"github.com/meshfed/meshfed/dataplane/upstream"
	"github.com/meshfed/meshfed/dataplane/xdsclient"
	"golang.org/x/sys/unix"
)

// On Linux a routed listener's connections run on event loops (see
// eventLoop), RouterOptions.Loops of them, each with a listening socket of
// its own on the same port. A connection's first bytes are read, routed
// and passed upstream, all on the loop; only a host name to resolve takes
// a goroutine.

// ListenRouted opens a routed listener at addr and starts its loops, each
// on a listening socket of its own on the same port (SO_REUSEPORT: the
// kernel spreads connections over them).
func ListenRouted(addr string, o *RouterOptions) (Listener, error) {
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
	for range max(1, o.Loops) {
		ln, err := lc.Listen(context.Background(), "tcp", addr)
		if err == nil {
			err = startLoop(o, ln.(*net.TCPListener), &group)
		}
		if err != nil {
			group.Close()
			return nil, err
		}
	}
	return group, nil
}

// loopGroup is a routed listener's loops.
type loopGroup []*eventLoop

func (g loopGroup) Addr() net.Addr { return g[0].addr }

// Close stops accepting; live connections go on.
func (g loopGroup) Close() error {
	for _, l := range g {
		l.post(l.stopAccepting)
	}
	return nil
}

func startLoop(o *RouterOptions, ln *net.TCPListener, group *loopGroup) error {
	l, err := newLoop(gatewayBuffer, o.Logger, o.Gauge)
	if err != nil {
		ln.Close()
		return err
	}
	l.rt, l.addr, l.keepP = o, ln.Addr(), true
	if l.lfd, err = detach(ln); err == nil {
		// Accepted once the hello is there: one wakeup, not two. A caller
		// that sends nothing waits in the kernel's queue up to the hello
		// timeout before its own hello timeout starts.
		_ = unix.SetsockoptInt(l.lfd, unix.IPPROTO_TCP, unix.TCP_DEFER_ACCEPT, int(max(1, o.HelloTimeout/time.Second)))
		tune(l.lfd) // accepted sockets inherit it
		err = unix.EpollCtl(l.ep, unix.EPOLL_CTL_ADD, l.lfd, &unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLET, Fd: listenToken})
	}
	if err != nil {
		l.closeFDs()
		return fmt.Errorf("gateway event loop: %w", err)
	}
	// The loop counts as one live connection until its last one ends; the
	// drain timeout aborts them all through it.
	o.Tracker.Add(loopCloser{l})
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
			if upstream.OutOfDescriptors(err) {
				l.rt.AcceptPaused.Inc()
			}
			if !l.acceptFailing {
				l.log.Error("gateway could not accept a connection; trying again every 100ms until it can", "err", err)
				l.acceptFailing = true
			}
			l.acceptAt = time.Now().Add(upstream.DescriptorPause)
			return
		}
		if l.acceptFailing {
			l.log.Info("gateway accepts connections again")
			l.acceptFailing = false
		}
		c := &loopConn{state: readingHello}
		if c.down, err = l.add(fd, c); err != nil {
			unix.Close(fd)
			l.log.Error("gateway could not watch a connection", "err", err)
			continue
		}
		l.conns[c] = struct{}{}
		l.rt.Live.Inc()
		l.timers.push(timer{at: time.Now().Add(l.rt.HelloTimeout), c: c, gen: c.gen})
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
	l.rt.Results.WithLabelValues(result).Inc()
	if l.log.Enabled(context.Background(), slog.LevelDebug) {
		l.log.Debug("gateway refused a connection", "remote", peerAddr(int(c.down.fd)), "reason", result, "err", err)
	}
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
		n, err := unix.Read(int(s.fd), l.buf[:l.rt.MaxHello-len(c.hello)])
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
		if n < l.rt.MaxHello-len(c.hello) && !s.hup {
			s.readable = false // a short read took all there was
		}
		if c.hello == nil {
			// Most hellos come whole in one read: they stay in the
			// loop's buffer if they leave at once.
			c.hello, c.helloBorrowed = l.buf[:n:n], true
		} else {
			c.hello = append(c.hello, l.buf[:n]...)
		}
		r, err := l.rt.Route(c.hello, func() net.Addr { return peerAddr(int(c.down.fd)) })
		if errors.Is(err, ErrMore) {
			c.ownHello()
			continue
		}
		if err != nil {
			l.refuse(c, refusalReason(err), err)
			return
		}
		l.route(c, r)
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

func (l *eventLoop) route(c *loopConn, r xdsclient.Route) {
	c.u = l.rt.Upstreams.Get(r.Cluster)
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
	for len(c.tried) < max(c.r.Attempts, 1) {
		e, ok := c.u.Pick(c.tried, time.Now())
		if !ok {
			break
		}
		c.tried.Add(upstream.Key(e))
		c.e = e
		c.gen++
		timeout := c.u.Config().ConnectTimeout
		l.timers.push(timer{at: time.Now().Add(timeout), c: c, gen: c.gen})
		ap, err := netip.ParseAddrPort(e.Addr)
		if err != nil {
			gen := c.gen
			go func() {
				var fd int
				conn, err := (&net.Dialer{Timeout: timeout}).Dial("tcp", e.Addr)
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
		if upstream.OutOfDescriptors(err) {
			l.waitForDescriptor(c, err)
			return
		}
		l.rt.Upstreams.Attempted(c.r.Cluster, c.u, e, err)
	}
	l.refuse(c, upstream.Unconnected(c.tried), nil)
}

// waitForDescriptor keeps a routed caller while the process has no
// descriptor to connect upstream with: the endpoint does not count as
// tried (the shortage is not its fault), and dialling starts again after
// a pause, for as long as a connect may take; then the caller is refused.
func (l *eventLoop) waitForDescriptor(c *loopConn, err error) {
	now := time.Now()
	if c.fdWait.IsZero() {
		c.fdWait = now.Add(c.u.Config().ConnectTimeout)
	}
	if !now.Before(c.fdWait) {
		l.refuse(c, "out_of_descriptors", err)
		return
	}
	l.rt.Upstreams.WaitedForDescriptor()
	c.tried.Remove(upstream.Key(c.e))
	l.drop(c.up)
	c.up = nil
	c.gen++
	at := now.Add(upstream.DescriptorPause)
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
	if upstream.OutOfDescriptors(err) {
		l.waitForDescriptor(c, err)
		return
	}
	l.rt.Upstreams.Attempted(c.r.Cluster, c.u, c.e, err)
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
	l.rt.Upstreams.Attempted(c.r.Cluster, c.u, c.e, nil)
	l.rt.Results.WithLabelValues("ok").Inc()
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
