// Package gateway benchmarks the east-west gateway side by side with
// HAProxy (Debian's 2.6, req.ssl_sni passthrough) on loopback in the same
// run: throughput over 1 and 64 TLS connections, and the latency of a small
// request/response, on a new TLS connection each and on open ones, each
// against a direct connection to the same backends; and what a new
// connection costs the proxies without the TLS ends. `make bench` runs it
// once.
package gateway

import (
	"cmp"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"runtime/debug"
	"slices"
	"testing"
	"time"

	"github.com/meshfed/meshfed/bench/load"
	"github.com/meshfed/meshfed/test/harness"
)

// TestMain removes the binaries the benchmark built. The benchmark's own
// TLS ends allocate about 150 KB per new connection: at Go's default
// target the process collected 1,211 times while it made 15,000, each
// collection holding up whichever connections were in flight, and the
// direct path's p99 read 4.3 ms. Collecting when the heap has grown 30
// times over instead (a few hundred MB) takes that to 20 collections and
// the direct p99 to 1.8–2.3 ms, so the proxies' tails show.
func TestMain(m *testing.M) {
	debug.SetGCPercent(3000)
	os.Exit(harness.Main(m))
}

const (
	bulkBytes        = 256 << 20
	throughputRounds = 9
	requests         = 5000
	reqSize          = 64
	// Requests on open connections: rate per second to each target over
	// conns connections each, for openTime.
	rate, conns, openTime = 1000, 10, 30 * time.Second
)

// backend is a TLS server (the workload terminates TLS; the proxies in
// front only pass bytes).
func backend(b *testing.B, handle func(net.Conn)) string {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "bench"}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), DNSNames: []string{"bench"}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		b.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ln.Close() })
	go load.Serve(ln, handle)
	return ln.Addr().String()
}

func tlsDial(addr, sni string) load.Dial {
	return func() (net.Conn, error) {
		c, err := tls.Dial("tcp", addr, &tls.Config{ServerName: sni, InsecureSkipVerify: true})
		if err != nil {
			return nil, err
		}
		return c, nil
	}
}

// target is what the benchmark's traffic goes through.
type target struct {
	name, addr string
	pid        int // the proxy's; 0 for direct
}

func BenchmarkGatewayVsHAProxy(b *testing.B) {
	echo, sink := backend(b, load.Echo), backend(b, load.Sink)
	// A plain echo server: the new-connection cost of the proxies alone,
	// without the TLS ends' handshakes.
	plainLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { plainLn.Close() })
	go load.Serve(plainLn, load.Echo)
	plain := plainLn.Addr().String()
	ep := func(addr string) string {
		host, port, _ := net.SplitHostPort(addr)
		return fmt.Sprintf("  endpoints: [{address: %s, port: %s}]\n", host, port)
	}
	site := harness.StartSite(b, "east", "services:\n- namespace: default\n  name: echo\n  ports: [{port: 443}]\n"+ep(echo)+
		"- namespace: default\n  name: sink\n  ports: [{port: 444}]\n"+ep(sink)+
		"- namespace: default\n  name: plain\n  ports: [{port: 445}]\n"+ep(plain))
	echoSNI, sinkSNI, plainSNI := "443.echo.default.east.bench.meshfed", "444.sink.default.east.bench.meshfed", "445.plain.default.east.bench.meshfed"
	gw := harness.FreePort(b)
	gwProc, _ := site.DataPlane(b, harness.Binary(b), "gw", "gateway", "--site", "east", "--listen", gw)

	hp := harness.FreePort(b)
	hpProc := harness.HAProxy(b, "haproxy", fmt.Sprintf(`frontend sni
  bind %s
  tcp-request inspect-delay 5s
  tcp-request content accept if { req.ssl_hello_type 1 }
  use_backend echo if { req.ssl_sni -i %s }
  use_backend sink if { req.ssl_sni -i %s }
  use_backend plain if { req.ssl_sni -i %s }
backend echo
  server echo %s
backend sink
  server sink %s
backend plain
  server plain %s
`, hp, echoSNI, sinkSNI, plainSNI, echo, sink, plain))

	// Both pass traffic before anything is measured.
	for name, addr := range map[string]string{"gateway": gw, "haproxy": hp} {
		deadline := time.Now().Add(30 * time.Second)
		for {
			if _, err := load.ConnectEach([]load.Dial{tlsDial(addr, echoSNI)}, 1, reqSize); err == nil {
				break
			} else if time.Now().After(deadline) {
				b.Fatalf("%s does not pass TLS to the echo backend: %v", name, err)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}

	fmt.Println("gateway benchmark: meshfed gateway vs HAProxy 2.6 (req.ssl_sni passthrough), TLS to backends on loopback, 2 cores")
	targets := []target{{"direct", "", 0}, {"haproxy", hp, hpProc.Pid()}, {"gateway", gw, gwProc.Pid()}}
	// Throughput: rounds of every target in rotating order; the verdict is
	// on the median of the rounds' gateway/haproxy ratios.
	for _, n := range []int{1, 64} {
		var dials []load.Dial
		for _, t := range targets {
			dials = append(dials, tlsDial(cmp.Or(t.addr, sink), sinkSNI))
		}
		thr, err := load.ThroughputRounds(dials, bulkBytes, n, throughputRounds)
		if err != nil {
			b.Fatalf("throughput over %d connection(s): %v", n, err)
		}
		direct, h, g := thr[0], thr[1], thr[2]
		ratios := make([]float64, len(g))
		for i := range g {
			ratios[i] = g[i] / h[i]
		}
		ratio := load.Median(ratios)
		fmt.Printf("throughput over %2d connection(s), median of %d rounds: direct %5.0f MB/s, haproxy %5.0f MB/s, gateway %5.0f MB/s; gateway/haproxy %.2fx (rounds %.2f..%.2f) (target >= 1.0x: %s)\n",
			n, throughputRounds, load.Median(direct)/1e6, load.Median(h)/1e6, load.Median(g)/1e6, ratio, slices.Min(ratios), slices.Max(ratios), load.Verdict(ratio >= 1))
		b.ReportMetric(ratio, fmt.Sprintf("throughput-ratio-%dconn", n))
		cpuPerGB(b, targets, dials, n)
	}
	var dials []load.Dial
	for _, t := range targets {
		dials = append(dials, tlsDial(cmp.Or(t.addr, echo), echoSNI))
	}
	ratio := newConnections(b, fmt.Sprintf("new TLS connection + %d B request/response", reqSize), targets, dials)
	fmt.Printf("gateway p99 / haproxy p99: %.2fx (target <= 1.0x: %s)\n", ratio, load.Verdict(ratio <= 1))
	b.ReportMetric(ratio, "p99-ratio")
	// The same with a ClientHello that no TLS server answers: a plain echo
	// server sends it back, then the request. What is left is the proxy's
	// own work per connection, without the handshakes' CPU and noise.
	hello := harness.ClientHello(b, plainSNI)
	var plainDials []load.Dial
	for _, t := range targets {
		plainDials = append(plainDials, helloDial(cmp.Or(t.addr, plain), hello))
	}
	newConnections(b, fmt.Sprintf("not a target: new connection passing a %d B ClientHello to a plain echo server and back, then %d B each way", len(hello), reqSize), targets, plainDials)

	// All three at once, their requests taking turns, so a stall of the
	// whole host (every connection held up for milliseconds) falls on each
	// alike; measured one after another, such stalls set whichever p99
	// they fell on.
	open, err := load.LatencyTogether(dials, rate, conns, reqSize, openTime)
	if err != nil {
		b.Fatalf("latency on open connections: %v", err)
	}
	ratio = latencyTable(fmt.Sprintf("%d B request/response on %d open TLS connections at %d req/s each, the three at once for %s, requests taking turns",
		reqSize, conns, rate, openTime), targets, open)
	fmt.Printf("gateway p99 / haproxy p99 on open connections: %.2fx (target <= 1.0x: %s)\n", ratio, load.Verdict(ratio <= 1))
	b.ReportMetric(ratio, "open-p99-ratio")
}

// newConnections makes requests new connections through each target in
// turn, one request/response on each, and prints their latency and what
// each proxy spent on one; it returns the gateway's p99 over HAProxy's.
func newConnections(b *testing.B, what string, targets []target, dials []load.Dial) float64 {
	steal := load.Steal()
	sched0 := schedStats(b, targets)
	rounds, err := load.ConnectEach(dials, requests, reqSize)
	if err != nil {
		b.Fatalf("%s: %v", what, err)
	}
	sched1 := schedStats(b, targets)
	ratio := latencyTable(fmt.Sprintf("%s, %d each, interleaved (CPU steal by the host meanwhile %.1f%%)", what, requests, 100*steal()), targets, rounds)
	// The scheduler's count of CPU time and of times a thread was put on a
	// CPU (about its wakeups), per connection: steadier than the tail.
	cpu, on, faults := make([]float64, len(targets)), make([]float64, len(targets)), make([]float64, len(targets))
	for i := range targets[1:] {
		cpu[i+1] = float64((sched1[i+1].CPU - sched0[i+1].CPU).Microseconds()) / requests
		on[i+1] = float64(sched1[i+1].Slices-sched0[i+1].Slices) / requests
		faults[i+1] = float64(sched1[i+1].Faults-sched0[i+1].Faults) / requests
	}
	fmt.Printf("  per new connection (not a target): haproxy %.0f µs of CPU, on a CPU %.1f times, %.2f page faults; gateway %.0f µs (%.2fx), %.1f times, %.2f page faults\n",
		cpu[1], on[1], faults[1], cpu[2], cpu[2]/cpu[1], on[2], faults[2])
	return ratio
}

// helloDial connects to addr, sends hello and reads it back from the echo
// server behind.
func helloDial(addr string, hello []byte) load.Dial {
	return func() (net.Conn, error) {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			return nil, err
		}
		back := make([]byte, len(hello))
		if _, err = c.Write(hello); err == nil {
			_, err = io.ReadFull(c, back)
		}
		if err != nil {
			c.Close()
			return nil, err
		}
		return c, nil
	}
}

// schedStats reads the scheduler's counts of each proxy target.
func schedStats(b *testing.B, targets []target) []harness.Sched {
	out := make([]harness.Sched, len(targets))
	for i, t := range targets {
		if t.pid != 0 {
			out[i] = harness.SchedStat(b, t.pid)
		}
	}
	return out
}

// latencyTable prints header with the direct target's p50, p99 and
// p99.9, then each proxy's and what it adds to direct; it returns the gateway's p99
// over HAProxy's. lat holds each target's sorted round trips, in targets'
// order (direct, haproxy, gateway).
func latencyTable(header string, targets []target, lat [][]time.Duration) float64 {
	p, ms := load.Percentile, load.Ms
	direct := lat[0]
	fmt.Printf("%s: direct p50 %.3f ms p99 %.3f ms p99.9 %.3f ms\n", header, ms(p(direct, 50)), ms(p(direct, 99)), ms(p(direct, 99.9)))
	for i, t := range targets[1:] {
		l := lat[i+1]
		fmt.Printf("  %-8s p50 %.3f ms p99 %.3f ms p99.9 %.3f ms; added p50 %.3f ms p99 %.3f ms\n", t.name, ms(p(l, 50)), ms(p(l, 99)), ms(p(l, 99.9)), ms(p(l, 50)-p(direct, 50)), ms(p(l, 99)-p(direct, 99)))
	}
	return float64(p(lat[2], 99)) / float64(p(lat[1], 99))
}

// cpuPerGB prints the CPU time each target costs per GB passed on over n
// connections: the proxy's own and the whole host's (the TLS ends'
// included; on loopback a sender also pays for its receiver's TCP work).
// CPU is steadier than throughput on a shared host.
func cpuPerGB(b *testing.B, targets []target, dials []load.Dial, n int) {
	const reps = 3
	own, host := make([]time.Duration, len(targets)), make([]time.Duration, len(targets))
	proxyCPU := func(t target) time.Duration {
		if t.pid == 0 {
			return 0
		}
		return harness.CPUTime(b, t.pid)
	}
	for range reps {
		for i, t := range targets {
			host0, err0 := load.HostBusy()
			own0 := proxyCPU(t)
			if _, err := load.Throughput(dials[i], bulkBytes, n); err != nil {
				b.Fatalf("throughput over %d connection(s) through %s: %v", n, t.name, err)
			}
			host1, err1 := load.HostBusy()
			if err := errors.Join(err0, err1); err != nil {
				b.Fatal(err)
			}
			own[i] += proxyCPU(t) - own0
			host[i] += host1 - host0
		}
	}
	perGB := func(d time.Duration) float64 { return d.Seconds() / (reps * bulkBytes / 1e9) }
	fmt.Printf("  CPU per GB (%d transfers each): whole host direct %.2f s", reps, perGB(host[0]))
	for i, t := range targets[1:] {
		fmt.Printf(", via %s %.2f s (%s itself %.2f s)", t.name, perGB(host[i+1]), t.name, perGB(own[i+1]))
	}
	fmt.Println()
}
