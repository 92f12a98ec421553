package loop

import (
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/meshfed/meshfed/dataplane/upstream"
	"github.com/meshfed/meshfed/dataplane/xdsclient"
	"github.com/meshfed/meshfed/test/harness"
	"github.com/prometheus/client_golang/prometheus"
)

// BenchmarkGatewayConnection: new connections through a routed event
// loop, as a gateway runs it, each passing a ClientHello to a plain echo
// server and back.
func BenchmarkGatewayConnection(b *testing.B) {
	echo := harness.TCPEcho(b).String()
	route := xdsclient.Route{Cluster: "c", Weight: 1, Attempts: 1}
	set := upstream.NewSet(upstream.NewMetrics(prometheus.NewRegistry()), slog.New(slog.DiscardHandler))
	set.Apply(map[string]*xdsclient.Cluster{"c": {Name: "c", ConnectTimeout: 2 * time.Second, OPF: 140,
		Priorities: [][]xdsclient.Endpoint{{{Key: echo, Addr: echo, Healthy: true, Weight: 1}}}}})
	o := &RouterOptions{
		Loops: 1, HelloTimeout: 10 * time.Second, MaxHello: 16 << 10, Upstreams: set, Tracker: &Tracker{},
		Route: func([]byte, func() net.Addr) (xdsclient.Route, error) { return route, nil },
		Gauge: prometheus.NewGauge(prometheus.GaugeOpts{Name: "loops"}), Live: prometheus.NewGauge(prometheus.GaugeOpts{Name: "live"}),
		Results: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "results"}, []string{"result"}), AcceptPaused: prometheus.NewCounter(prometheus.CounterOpts{Name: "paused"}),
		Logger: slog.New(slog.DiscardHandler),
	}
	ln, err := ListenRouted("127.0.0.1:0", o)
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	addr := ln.Addr().String()

	hello := harness.ClientHello(b, "bench")
	back := make([]byte, len(hello))
	b.ReportAllocs()
	for b.Loop() {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := c.Write(hello); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, back); err != nil {
			b.Fatal(err)
		}
		c.Close()
	}
}
