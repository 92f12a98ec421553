package loop

import (
	"errors"
	"net"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// On Linux a proxy's connections, once connected and past their TLS
// handshake, are relayed by event loops (see eventLoop). crypto/tls is
// driven there without blocking: a read with nothing to give fails as a
// passed deadline does, and crypto/tls keeps what it has and can be read
// again. A request and its response then cost each proxy one wakeup of
// one thread, not a hand-off from the netpoller to a goroutine and back.

// Relay carries a's and b's bytes both ways until both are done, passing
// half-closes on, and then closes them. It blocks until then, with the
// connection counted live in the options' Tracker.
func (r *Relayer) Relay(a, b net.Conn) {
	fa, fb := loopable(a), loopable(b)
	if fa == nil || fb == nil {
		pipe(a, b)
		return
	}
	da, erra := detach(fa)
	db, errb := detach(fb)
	l := r.loop()
	if erra != nil || errb != nil || l == nil {
		for _, fd := range []int{da, db} {
			if fd >= 0 {
				unix.Close(fd)
			}
		}
		return
	}
	c := &loopConn{state: relaying, done: make(chan struct{})}
	if err := l.adopt(c, da, a, db, b); err != nil {
		r.o.Logger.Error("could not relay a connection; it is closed", "err", err)
		return
	}
	r.o.Tracker.Track(relayed{l: l, c: c}, func() { <-c.done })
}

// loopable is the TCP connection under c, if a loop can relay c: plain
// TCP, or batched TLS over TCP with its handshake done.
func loopable(c net.Conn) *net.TCPConn {
	switch c := c.(type) {
	case *net.TCPConn:
		return c
	case *TLSConn:
		tc, _ := c.raw.Conn.(*net.TCPConn)
		return tc
	}
	return nil
}

// Relayer is a node's relay loops, RelayOptions.Loops of them, started as
// connections come; mu guards them.
type Relayer struct {
	o     RelayOptions
	mu    sync.Mutex
	loops []*eventLoop
	next  int
}

// loop is one of the relay loops, taking turns; it starts the loop when
// it is not running. Nil: no loop could be made.
func (r *Relayer) loop() *eventLoop {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.loops == nil {
		r.loops = make([]*eventLoop, max(1, r.o.Loops))
	}
	i := r.next % len(r.loops)
	r.next++
	if r.loops[i] == nil {
		l, err := newLoop(relayBuffer, r.o.Logger, r.o.Gauge)
		if err != nil {
			r.o.Logger.Error("could not start an event loop to relay a connection; it is closed", "err", err)
			return nil
		}
		l.keep = true
		r.loops[i] = l
		go l.run()
	}
	return r.loops[i]
}

// Stop lets the relay loops end once their connections have.
func (r *Relayer) Stop() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, l := range r.loops {
		if l != nil {
			l.post(func() { l.keep = false })
		}
	}
	r.loops = nil
}

// adopt takes a connection whose sockets (da, db; a and b as they were)
// were detached for the loop, and makes its first turn on the calling
// goroutine, under the loop's state lock: handing it over to the loop's
// own thread would cost a wakeup of that thread before the first byte
// moved. The sockets are closed if it cannot.
func (l *eventLoop) adopt(c *loopConn, da int, a net.Conn, db int, b net.Conn) error {
	l.state.Lock()
	defer l.state.Unlock()
	if l.ended() {
		unix.Close(da)
		unix.Close(db)
		return errors.New("the proxy has stopped")
	}
	var err error
	if c.down, err = l.add(da, c); err != nil {
		unix.Close(da)
		unix.Close(db)
		return err
	}
	if c.up, err = l.add(db, c); err != nil {
		l.drop(c.down)
		unix.Close(db)
		return err
	}
	l.conns[c] = struct{}{}
	for _, s := range []struct {
		s *sock
		c net.Conn
	}{{c.down, a}, {c.up, b}} {
		s.s.readable, s.s.writable = true, true
		if t, ok := s.c.(*TLSConn); ok {
			s.s.tls, s.s.buffered = t, true
			t.raw.Conn = &sockConn{Conn: t.raw.Conn, s: s.s}
		}
	}
	l.relay(c)
	if len(l.again) > 0 {
		l.post(func() {}) // the loop waits for events; it has work now
	}
	return nil
}

// relayed lets the drain timeout end a relayed connection.
type relayed struct {
	l *eventLoop
	c *loopConn
}

func (r relayed) Close() error {
	select {
	case <-r.c.done: // ended already (track closes it once more): no wakeup
	default:
		r.l.post(func() { r.l.close(r.c) })
	}
	return nil
}

// sockConn is a TLS side's socket as crypto/tls sees it on a loop: a read
// with nothing to return fails as a passed deadline does (crypto/tls keeps
// what it has read and can be read again), and a write takes everything,
// keeping what the socket does not take in the sock's out.
type sockConn struct {
	net.Conn // the one detached, closed: its addresses
	s        *sock
}

func (c *sockConn) Read(p []byte) (int, error) {
	s := c.s
	if !s.readable {
		return 0, os.ErrDeadlineExceeded
	}
	n, err := s.readFD(p)
	if err == unix.EAGAIN {
		return 0, os.ErrDeadlineExceeded
	}
	return n, err
}

func (c *sockConn) Write(p []byte) (int, error) {
	s := c.s
	total := len(p)
	if len(s.out) == 0 && s.writable {
		n, err := unix.Write(int(s.fd), p)
		for err == unix.EINTR {
			n, err = unix.Write(int(s.fd), p)
		}
		if err != nil && err != unix.EAGAIN {
			return 0, err
		}
		p = p[max(n, 0):]
	}
	if len(p) > 0 {
		s.out = append(s.out, p...)
		s.writable = false
	}
	return total, nil
}

func (c *sockConn) Close() error                     { return nil }
func (c *sockConn) SetDeadline(time.Time) error      { return nil }
func (c *sockConn) SetReadDeadline(time.Time) error  { return nil }
func (c *sockConn) SetWriteDeadline(time.Time) error { return nil }
