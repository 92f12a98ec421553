package loop

import (
	"log/slog"
	"net"
	"slices"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
)

// TestKeepaliveComesLater: a gateway's upstream socket gets no keepalive
// probes when it connects; the loop wakes for them about a second later
// and sets them on the sockets still open (a closed one's descriptor may
// be another's by then), and waits for no more.
func TestKeepaliveComesLater(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	l, err := newLoop(4<<10, slog.New(slog.DiscardHandler), prometheus.NewGauge(prometheus.GaugeOpts{Name: "loops"}))
	if err != nil {
		t.Fatal(err)
	}
	defer l.closeFDs()
	upstream := func() *sock {
		t.Helper()
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		fd, err := detach(c.(*net.TCPConn))
		if err != nil {
			t.Fatal(err)
		}
		s, err := l.add(fd, &loopConn{})
		if err != nil {
			t.Fatal(err)
		}
		l.probeLater(s)
		return s
	}
	option := func(s *sock, level, opt int) int {
		t.Helper()
		v, err := unix.GetsockoptInt(int(s.fd), level, opt)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}

	before := time.Now()
	open, gone := upstream(), upstream()
	// detach's socket comes from Go's net package, which sets keepalive:
	// clear it, as a raw socket has it.
	for _, s := range []*sock{open, gone} {
		if err := unix.SetsockoptInt(int(s.fd), unix.SOL_SOCKET, unix.SO_KEEPALIVE, 0); err != nil {
			t.Fatal(err)
		}
	}
	l.drop(gone)
	at, ok := l.nextDeadline()
	if !ok || at.Before(before.Add(keepaliveAfter)) || at.After(time.Now().Add(keepaliveAfter)) {
		t.Fatalf("next deadline %v (set: %v); want the loop to wake %v after the sockets connected", at, ok, keepaliveAfter)
	}
	l.probe()
	if got := option(open, unix.SOL_SOCKET, unix.SO_KEEPALIVE); got != 1 {
		t.Errorf("SO_KEEPALIVE of the open socket after probe: %d; want 1", got)
	}
	if got := option(open, unix.IPPROTO_TCP, unix.TCP_KEEPIDLE); got != 15 {
		t.Errorf("TCP_KEEPIDLE %d; want 15", got)
	}
	if _, ok := l.nextDeadline(); ok || len(l.unprobed) != 0 {
		t.Errorf("after probe the loop still waits to set keepalive on %d sockets", len(l.unprobed))
	}
}

// TestTimersPopInDeadlineOrder: the loop's timer heap gives its timers
// back earliest first, whatever order they came in.
func TestTimersPopInDeadlineOrder(t *testing.T) {
	base := time.Now()
	var h timers
	for _, ms := range []int{50, 10, 40, 10, 90, 0, 70, 20, 60, 30} {
		h.push(timer{at: base.Add(time.Duration(ms) * time.Millisecond), gen: ms})
	}
	var got []int
	for len(h) > 0 {
		got = append(got, h.pop().gen)
	}
	if want := []int{0, 10, 10, 20, 30, 40, 50, 60, 70, 90}; !slices.Equal(got, want) {
		t.Fatalf("popped %v; want %v", got, want)
	}
}
