package loop

import (
	"errors"
	"io"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

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
