package proxy

import (
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshfed/meshfed/test/harness"
)

// BenchmarkGatewayConnection: new connections through a gateway event
// loop, each passing a ClientHello to a plain echo server and back.
func BenchmarkGatewayConnection(b *testing.B) {
	echo := harness.TCPEcho(b).String()
	e := endpointConf{key: echo, addr: echo, healthy: true, weight: 1}
	u := &upstream{conf: &clusterConf{name: "c", connectTimeout: 2 * time.Second, opf: 140, priorities: [][]endpointConf{{e}}}, hosts: map[string]*hostState{}}
	p := &Proxy{log: slog.New(slog.DiscardHandler), m: newMetrics(prometheus.NewRegistry()), upstreams: map[string]*upstream{"c": u}, live: map[io.Closer]struct{}{}}
	p.o.HelloTimeout = 10 * time.Second
	p.cfg.Store(&config{})
	rl := &runningListener{}
	rl.conf.Store(&listenerConf{sni: map[string]route{"bench": {cluster: "c", weight: 1, attempts: 1}}})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	addr := ln.Addr().String()
	var group loopGroup
	if err := p.startLoop(rl, ln.(*net.TCPListener), &group); err != nil {
		b.Fatal(err)
	}
	defer group.Close()

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
