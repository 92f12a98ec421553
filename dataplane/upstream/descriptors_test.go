package upstream

import (
	"log/slog"
	"net"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/meshfed/meshfed/dataplane/xdsclient"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// TestOutOfDescriptors: a shortage of descriptors is told apart from a
// peer's refusal.
func TestOutOfDescriptors(t *testing.T) {
	if !OutOfDescriptors(&net.OpError{Op: "accept", Err: os.NewSyscallError("accept4", syscall.EMFILE)}) {
		t.Error("EMFILE is not taken for a shortage of descriptors")
	}
	if OutOfDescriptors(&net.OpError{Op: "dial", Err: os.NewSyscallError("socket", syscall.ECONNREFUSED)}) {
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
	e := xdsclient.Endpoint{Key: ln.Addr().String(), Addr: ln.Addr().String(), Healthy: true, Weight: 1}
	cluster := &xdsclient.Cluster{Name: "c", ConnectTimeout: 2 * time.Second, OPF: 140, Priorities: [][]xdsclient.Endpoint{{e}}}
	m := NewMetrics(prometheus.NewRegistry())
	s := NewSet(m, slog.New(slog.DiscardHandler))
	s.Apply(map[string]*xdsclient.Cluster{"c": cluster})
	dial := func(c *xdsclient.Cluster, e xdsclient.Endpoint) (net.Conn, error) {
		return net.DialTimeout("tcp", e.Addr, c.ConnectTimeout)
	}

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
				if !OutOfDescriptors(err) {
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
	go func() { c, why := s.Connect("c", 1, dial); got <- result{c, why} }()
	deadline := time.Now().Add(10 * time.Second)
	for value(m.FDWaits) < 2 {
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
	cluster.ConnectTimeout = 300 * time.Millisecond
	exhaust()
	start := time.Now()
	if c, why := s.Connect("c", 1, dial); c != nil || why != "out_of_descriptors" {
		t.Fatalf("connect with no descriptor for longer than the connect timeout: %v, %q; want out_of_descriptors", c, why)
	}
	if waited := time.Since(start); waited < 250*time.Millisecond {
		t.Errorf("refused after %v; want it to wait up to the connect timeout", waited)
	}
	if n := value(m.Attempts.WithLabelValues("c", "", "", "connect_failure")); n != 0 {
		t.Errorf("%v connect failures counted against the endpoint; want none", n)
	}
}

func value(c prometheus.Metric) float64 {
	var m dto.Metric
	_ = c.Write(&m)
	return m.GetCounter().GetValue()
}
