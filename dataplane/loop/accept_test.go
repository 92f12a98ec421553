package loop

import (
	"log/slog"
	"net"
	"os"
	"syscall"
	"testing"
	"time"
)

// outOfFDs is a listener whose first accepts fail for want of file
// descriptors, then hands out one connection, then is closed.
type outOfFDs struct {
	fails int
	conn  net.Conn
}

func (l *outOfFDs) Accept() (net.Conn, error) {
	switch {
	case l.fails > 0:
		l.fails--
		return nil, &net.OpError{Op: "accept", Net: "tcp", Err: os.NewSyscallError("accept4", syscall.EMFILE)}
	case l.conn != nil:
		c := l.conn
		l.conn = nil
		return c, nil
	}
	return nil, net.ErrClosed
}
func (l *outOfFDs) Close() error   { return nil }
func (l *outOfFDs) Addr() net.Addr { return &net.TCPAddr{} }

// TestAcceptGoesOnWhenOutOfDescriptors: a listener that runs out of file
// descriptors pauses and accepts again, rather than stop for good.
func TestAcceptGoesOnWhenOutOfDescriptors(t *testing.T) {
	a, b := net.Pipe()
	defer b.Close()
	ln := &outOfFDs{fails: 3, conn: a}
	var got []net.Conn
	done := make(chan struct{})
	go func() {
		Accept(ln, slog.New(slog.DiscardHandler), func(c net.Conn) { got = append(got, c) })
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("accept did not end when its listener was closed")
	}
	if len(got) != 1 || got[0] != a {
		t.Fatalf("after 3 accepts failed with EMFILE, handled %v; want the connection that came next", got)
	}
}
