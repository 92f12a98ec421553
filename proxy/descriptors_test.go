package proxy

import (
	"log/slog"
	"net"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
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
	p := &Proxy{log: slog.New(slog.DiscardHandler)}
	var got []net.Conn
	done := make(chan struct{})
	go func() {
		p.accept(ln, func(c net.Conn) { got = append(got, c) })
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
	if outOfDescriptors(&net.OpError{Op: "dial", Err: os.NewSyscallError("socket", syscall.ECONNREFUSED)}) {
		t.Error("a refused connection is taken for a shortage of descriptors")
	}
}

// TestConnectWaitsForADescriptor: a caller whose upstream connection
// finds the process out of file descriptors waits for one, up to the
// cluster's connect timeout, rather than be refused at once; the shortage
// is not counted against the endpoint.
func TestConnectWaitsForADescriptor(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	e := endpointConf{key: ln.Addr().String(), addr: ln.Addr().String(), healthy: true, weight: 1}
	u := &upstream{conf: &clusterConf{name: "c", connectTimeout: 2 * time.Second, opf: 140, priorities: [][]endpointConf{{e}}}, hosts: map[string]*hostState{}}
	p := &Proxy{log: slog.New(slog.DiscardHandler), m: newMetrics(prometheus.NewRegistry()), upstreams: map[string]*upstream{"c": u}}
	p.cfg.Store(&config{})

	// Use up the descriptors under a lowered limit.
	var was syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &was); err != nil {
		t.Fatal(err)
	}
	var held []*os.File
	release := func() {
		for _, f := range held {
			f.Close()
		}
		held = nil
	}
	defer func() {
		release()
		_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &was)
	}()
	low := was
	low.Cur = 256
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &low); err != nil {
		t.Fatal(err)
	}
	exhaust := func() {
		for {
			f, err := os.Open(os.DevNull)
			if err != nil {
				if !outOfDescriptors(err) {
					t.Fatal(err)
				}
				return
			}
			held = append(held, f)
		}
	}
	exhaust()

	type result struct {
		c   net.Conn
		why string
	}
	got := make(chan result, 1)
	go func() { c, why := p.connect("c", 1); got <- result{c, why} }()
	deadline := time.Now().Add(10 * time.Second)
	for value(p.m.fdWaits) < 2 {
		if time.Now().After(deadline) {
			t.Fatal("connect does not wait for a descriptor")
		}
		time.Sleep(10 * time.Millisecond)
	}
	release()
	r := <-got
	if r.c == nil {
		t.Fatalf("connect once descriptors are free again: %s; want a connection", r.why)
	}
	r.c.Close()

	// Nothing frees one: refused once the connect timeout has passed.
	u.conf.connectTimeout = 300 * time.Millisecond
	exhaust()
	start := time.Now()
	if c, why := p.connect("c", 1); c != nil || why != "out_of_descriptors" {
		t.Fatalf("connect with no descriptor for longer than the connect timeout: %v, %q; want out_of_descriptors", c, why)
	}
	if waited := time.Since(start); waited < 250*time.Millisecond {
		t.Errorf("refused after %v; want it to wait up to the connect timeout", waited)
	}
	if n := value(p.m.upstream.WithLabelValues("c", "", "", "connect_failure")); n != 0 {
		t.Errorf("%v connect failures counted against the endpoint; want none", n)
	}
}

func value(c prometheus.Metric) float64 {
	var m dto.Metric
	_ = c.Write(&m)
	return m.GetCounter().GetValue()
}
